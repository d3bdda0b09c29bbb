package http

import (
	"context"
	"errors"
	"slices"
	"strconv"

	"github.com/valyala/fasthttp"

	"userapi"
)

// Response headers set by the user handlers.
var (
	hETag              = []byte("ETag")
	hLocation          = []byte("Location")
	hIdempotentReplay  = []byte("Idempotent-Replayed")
	hIfNoneMatch       = []byte("If-None-Match")
	hIfMatch           = []byte("If-Match")
	hIdempotencyKey    = []byte("Idempotency-Key")
	strTrue            = []byte("true")
	argLimit           = []byte("limit")
	argCursor          = []byte("cursor")
	argEmail           = []byte("email")
	usersPrefixLen     = len("/users/")
	listHead           = []byte(`{"items":[`)
	nullCursorTail     = []byte(`],"next_cursor":null}`)
	nextCursorHead     = []byte(`],"next_cursor":"`)
	nextCursorTail     = []byte(`"}`)
	usersLocationStart = []byte("/users/")
)

// pathID parses the {id} of /users/{id} as sent (see Server.endpoint): a
// positive int64 in plain digits, else 400, so "%31" or "..%2f…" is not one.
func pathID(rc *fasthttp.RequestCtx) (int64, error) {
	id, ok := parseID(rc.URI().PathOriginal()[usersPrefixLen:])
	if !ok {
		return 0, badRequest("id", "must be a positive 64-bit integer")
	}
	return id, nil
}

// getUser serves GET /users/{id}: 200 with ETag, 304 when If-None-Match
// has the current version, 404 when absent. This is the hot path: with an
// EncodedReader store (the cache) it copies cached bytes and does no JSON
// work; otherwise it encodes into the response's own reused buffer.
func (s *Server) getUser(rc *fasthttp.RequestCtx, ctx context.Context) error {
	id, err := pathID(rc)
	if err != nil {
		return err
	}
	if s.encoded != nil {
		e, err := s.encoded.GetUserEncoded(ctx, id)
		if err != nil {
			return err
		}
		if s.notModified(rc, e.Version) {
			return nil
		}
		setETag(rc, e.Version)
		rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
		// The cache's bytes are immutable (Encoded.JSON contract), so the
		// response may point at them instead of copying.
		rc.Response.SetBodyRaw(e.JSON)
		return nil
	}
	u, err := s.store.GetUser(ctx, id)
	if err != nil {
		return err
	}
	if s.notModified(rc, u.Version) {
		return nil
	}
	writeUser(rc, fasthttp.StatusOK, u)
	return nil
}

// notModified answers 304 with the ETag when If-None-Match matches.
func (s *Server) notModified(rc *fasthttp.RequestCtx, version int64) bool {
	inm := rc.Request.Header.PeekBytes(hIfNoneMatch)
	if len(inm) == 0 || !noneMatch(inm, version) {
		return false
	}
	rc.SetStatusCode(fasthttp.StatusNotModified)
	setETag(rc, version)
	return true
}

func setETag(rc *fasthttp.RequestCtx, version int64) {
	var buf [24]byte
	b := append(buf[:0], '"')
	b = strconv.AppendInt(b, version, 10)
	b = append(b, '"')
	rc.Response.Header.SetCanonical(hETag, b)
}

// writeUser writes u as the JSON body with its ETag, encoding into the
// response's pooled body buffer.
func writeUser(rc *fasthttp.RequestCtx, status int, u *userapi.User) {
	rc.SetStatusCode(status)
	setETag(rc, u.Version)
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	b := rc.Response.SwapBody(nil)[:0]
	rc.Response.SwapBody(u.AppendJSON(b))
}

// listUsers serves GET /users?limit=&cursor=&email=: a page of users in id
// order and the cursor of the next page (null on the last one).
func (s *Server) listUsers(rc *fasthttp.RequestCtx, ctx context.Context) error {
	args := rc.QueryArgs()
	limit, ok := parseLimit(args.PeekBytes(argLimit))
	if !ok {
		return badRequest("limit", "must be an integer from 1 to "+strconv.Itoa(userapi.MaxLimit))
	}
	f := userapi.UserFilter{Limit: limit + 1} // one more tells whether a next page exists
	if c := args.PeekBytes(argCursor); len(c) > 0 {
		if f.AfterID, ok = parseCursor(c); !ok {
			return badRequest("cursor", "is not a cursor this service issued")
		}
	}
	if e := args.PeekBytes(argEmail); len(e) > 0 {
		email, err := userapi.NormalizeEmail(string(e))
		if err != nil {
			return badRequest("email", "must be an email address such as ada@example.com")
		}
		f.Email = email
	}
	users, err := s.store.ListUsers(ctx, f)
	if err != nil {
		return err
	}
	more := len(users) > limit
	if more {
		users = users[:limit]
	}
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	b := rc.Response.SwapBody(nil)[:0]
	b = append(b, listHead...)
	for i, u := range users {
		if i > 0 {
			b = append(b, ',')
		}
		b = u.AppendJSON(b)
	}
	if more {
		b = append(b, nextCursorHead...)
		b = appendCursor(b, users[len(users)-1].ID)
		b = append(b, nextCursorTail...)
	} else {
		b = append(b, nullCursorTail...)
	}
	rc.Response.SwapBody(b)
	return nil
}

// createUser serves POST /users: 201 with Location and ETag, 409 when the
// email is taken. With Idempotency-Key, a retry with the same body gets
// the first response again (with Idempotent-Replayed: true), another body
// gets 422.
func (s *Server) createUser(rc *fasthttp.RequestCtx, ctx context.Context) error {
	if err := checkContentType(rc, mediaJSON); err != nil {
		return err
	}
	body, err := s.requestBody(rc)
	if err != nil {
		return err
	}
	f, err := decodeUserFields(body)
	if err != nil {
		return err
	}
	key := rc.Request.Header.PeekBytes(hIdempotencyKey)
	if !printableASCII(key) {
		return badRequest("Idempotency-Key", "must be printable ASCII")
	}
	in := userapi.UserCreate{Email: f.email, Name: f.name, IdempotencyKey: string(key)}
	if err := in.Validate(); err != nil {
		return err
	}
	u, replayed, err := s.store.CreateUser(ctx, in)
	if err != nil {
		return err
	}
	b := strconv.AppendInt(usersLocationStart[:len(usersLocationStart):len(usersLocationStart)], u.ID, 10)
	rc.Response.Header.SetCanonical(hLocation, b)
	if replayed {
		rc.Response.Header.SetCanonical(hIdempotentReplay, strTrue)
	}
	writeUser(rc, fasthttp.StatusCreated, u)
	return nil
}

// printableASCII reports whether b is only characters 0x20..0x7E, the
// alphabet of a structured-field string: keys are stored in a text column,
// and bytes outside it would be invalid UTF-8 to some databases.
func printableASCII(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

// userWrite reads what PUT and PATCH share, in the order the errors are
// reported: the path id (400), the content type (415), the body (413) and
// its fields (400).
func (s *Server) userWrite(rc *fasthttp.RequestCtx, media ...[]byte) (int64, userFields, error) {
	id, err := pathID(rc)
	if err != nil {
		return 0, userFields{}, err
	}
	if err := checkContentType(rc, media...); err != nil {
		return 0, userFields{}, err
	}
	body, err := s.requestBody(rc)
	if err != nil {
		return 0, userFields{}, err
	}
	f, err := decodeUserFields(body)
	return id, f, err
}

// replaceUser serves PUT /users/{id}: both email and name are required and
// replace the stored ones. If-Match makes it conditional (412 on another
// version).
func (s *Server) replaceUser(rc *fasthttp.RequestCtx, ctx context.Context) error {
	id, f, err := s.userWrite(rc, mediaJSON)
	if err != nil {
		return err
	}
	var verr userapi.ValidationError
	if !f.hasEmail || f.nullEmail {
		verr.Fields = append(verr.Fields, userapi.FieldError{Field: "email", Message: "is required"})
	}
	if !f.hasName || f.nullName {
		verr.Fields = append(verr.Fields, userapi.FieldError{Field: "name", Message: "is required"})
	}
	if len(verr.Fields) > 0 {
		return &verr
	}
	return s.update(rc, ctx, id, userapi.UserUpdate{Email: &f.email, Name: &f.name})
}

// patchUser serves PATCH /users/{id}: a JSON merge patch (RFC 7396) of
// email and name. Absent members are kept; null would remove a required
// member and is 422. An empty patch changes nothing and returns the user.
func (s *Server) patchUser(rc *fasthttp.RequestCtx, ctx context.Context) error {
	id, f, err := s.userWrite(rc, mediaMergePatch, mediaJSON)
	if err != nil {
		return err
	}
	var upd userapi.UserUpdate
	var verr userapi.ValidationError
	switch {
	case f.nullEmail:
		verr.Fields = append(verr.Fields, userapi.FieldError{Field: "email", Message: "is required and cannot be removed"})
	case f.hasEmail:
		upd.Email = &f.email
	}
	switch {
	case f.nullName:
		verr.Fields = append(verr.Fields, userapi.FieldError{Field: "name", Message: "is required and cannot be removed"})
	case f.hasName:
		upd.Name = &f.name
	}
	if len(verr.Fields) > 0 {
		return &verr
	}
	if upd.Email == nil && upd.Name == nil {
		return s.unchanged(rc, ctx, id)
	}
	return s.update(rc, ctx, id, upd)
}

// update validates upd, applies If-Match and writes the new user.
func (s *Server) update(rc *fasthttp.RequestCtx, ctx context.Context, id int64, upd userapi.UserUpdate) error {
	if err := upd.Validate(); err != nil {
		return err
	}
	v, err := s.ifMatch(rc, ctx, id)
	if err != nil {
		return err
	}
	upd.IfVersion = v
	u, err := s.store.UpdateUser(ctx, id, upd)
	if err != nil {
		return err
	}
	writeUser(rc, fasthttp.StatusOK, u)
	return nil
}

// unchanged answers an empty merge patch: the current user, after the
// same If-Match check an update would make.
func (s *Server) unchanged(rc *fasthttp.RequestCtx, ctx context.Context, id int64) error {
	v, err := s.ifMatch(rc, ctx, id)
	if err != nil {
		return err
	}
	u, err := s.store.GetUser(ctx, id)
	if err != nil {
		return err
	}
	if v > 0 && u.Version != v {
		return userapi.ErrVersionMismatch
	}
	writeUser(rc, fasthttp.StatusOK, u)
	return nil
}

// deleteUser serves DELETE /users/{id}: 204, 404 when absent, 412 when
// If-Match names another version.
func (s *Server) deleteUser(rc *fasthttp.RequestCtx, ctx context.Context) error {
	id, err := pathID(rc)
	if err != nil {
		return err
	}
	v, err := s.ifMatch(rc, ctx, id)
	if err != nil {
		return err
	}
	if err := s.store.DeleteUser(ctx, id, v); err != nil {
		return err
	}
	rc.SetStatusCode(fasthttp.StatusNoContent)
	return nil
}

// ifMatch turns If-Match into the version the store must find (0: any).
// The store compares that version in the same statement as the write, so
// no update is lost between check and write.
//
// RFC 9110 §13.1.1 uses the strong comparison: W/ tags never match, nor do
// tags that are not a version of ours, nor malformed values; such a
// precondition fails (412) — unless the user does not exist, where the
// answer without preconditions (404) wins, as §13.2.2 says. `*` matches
// any existing user. With several versions listed, the current one is
// read and, if listed, required, so the write is still atomic.
func (s *Server) ifMatch(rc *fasthttp.RequestCtx, ctx context.Context, id int64) (int64, error) {
	h := rc.Request.Header.PeekBytes(hIfMatch)
	if len(h) == 0 {
		return 0, nil
	}
	var versions []int64
	anyTag, ok := parseETags(h, func(t etag) {
		if !t.weak && t.version > 0 {
			versions = append(versions, t.version)
		}
	})
	switch {
	case anyTag:
		return 0, nil
	case ok && len(versions) == 1:
		return versions[0], nil
	}
	u, err := s.store.GetUser(onPrimary(ctx, s.replicas), id)
	if err != nil {
		return 0, err
	}
	// A malformed header matches nothing, even if it began with a tag
	// that would: the user is read only to answer 404 over 412.
	if ok && slices.Contains(versions, u.Version) {
		return u.Version, nil
	}
	return 0, userapi.ErrVersionMismatch
}

// livez answers 200 while the process serves requests at all.
func (s *Server) livez(rc *fasthttp.RequestCtx, _ context.Context) error {
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	rc.Response.SetBodyString(`{"status":"ok"}`)
	return nil
}

// Readiness states, for logging changes only.
const (
	readyUnknown = iota
	readyYes
	readyNo
)

// readyz answers 200 once the readiness check (store.Ping: database
// reachable and migrated) passes, 503 with Retry-After before and while
// it fails. Balancers use it to send traffic only to ready instances.
func (s *Server) readyz(rc *fasthttp.RequestCtx, ctx context.Context) error {
	err := (*s.ready.Load())(ctx)
	if err == nil && s.draining.Load() {
		err = errDraining
	}
	now := int32(readyYes)
	if err != nil {
		now = readyNo
	}
	if s.readiness.Swap(now) != now {
		if err != nil {
			s.log.Warn("not ready", "err", err)
		} else {
			s.log.Info("ready")
		}
	}
	if err != nil {
		detail := "The service is not ready: its database is unreachable or not migrated."
		if errors.Is(err, errDraining) {
			detail = "The service is shutting down."
		}
		return &problem{
			Status:     fasthttp.StatusServiceUnavailable,
			Detail:     detail,
			RetryAfter: 1,
		}
	}
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	rc.Response.SetBodyString(`{"status":"ready"}`)
	return nil
}

// errDraining is the readiness error while Shutdown drains.
var errDraining = errors.New("shutting down")

// openAPI serves the embedded OpenAPI 3.1 document.
func (s *Server) openAPI(rc *fasthttp.RequestCtx, _ context.Context) error {
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	rc.Response.SetBodyRaw(openAPIDocument)
	return nil
}
