package http

import (
	"context"

	"github.com/valyala/fasthttp"

	"userapi"
)

// hSessionLSN is the read-your-writes session token: a write's response
// carries the database position of its commit (userapi.Position, the
// PostgreSQL LSN form "16/B374D848"), and a request that sends it back is
// served only from data at least that recent, on whichever instance it
// lands. It is used only when the store reads from replicas
// (userapi.ReplicaReader); otherwise every read is the primary's and the
// header is ignored.
var hSessionLSN = []byte("X-Session-Lsn")

// session attaches a userapi.Session to ctx when the store reads replicas:
// on every write (the store records its commit position there), and on any
// request that sends a token. A malformed token is a 400.
func (s *Server) session(rc *fasthttp.RequestCtx, ctx context.Context) (context.Context, *userapi.Session, error) {
	h := rc.Request.Header.PeekBytes(hSessionLSN)
	if len(h) == 0 && rc.IsGet() {
		return ctx, nil, nil
	}
	sess := new(userapi.Session)
	if len(h) > 0 {
		p, err := userapi.ParsePosition(string(h))
		if err != nil {
			return ctx, nil, badRequest("X-Session-LSN", "must be a token this service returned, such as 16/B374D848")
		}
		sess.After = p
	}
	return userapi.WithSession(ctx, sess), sess, nil
}

// setSession returns the token of the request's write, if it made one.
func setSession(rc *fasthttp.RequestCtx, sess *userapi.Session) {
	if sess == nil || sess.Wrote == 0 {
		return
	}
	rc.Response.Header.SetCanonical(hSessionLSN, []byte(max(sess.Wrote, sess.After).String()))
}

// onPrimary returns ctx with a session that sends reads to the primary,
// when the store reads replicas: an If-Match check must compare with the
// primary's version, not a cached copy or a replica's.
func onPrimary(ctx context.Context, replicas bool) context.Context {
	if !replicas {
		return ctx
	}
	sess := userapi.Session{Primary: true}
	if prev := userapi.SessionFrom(ctx); prev != nil {
		sess.After = prev.After
	}
	return userapi.WithSession(ctx, &sess)
}
