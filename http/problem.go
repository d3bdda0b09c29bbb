package http

import (
	"context"
	"errors"
	"log/slog"
	"strconv"

	"github.com/valyala/fasthttp"

	"userapi"
)

// Problem types (RFC 9457) beyond the plain status code. Problems whose
// status says it all use "about:blank" with the status text as title.
// openapi.json lists the same URIs.
const (
	typeValidation          = "urn:userapi:problem:validation"
	typeEmailTaken          = "urn:userapi:problem:email-taken"
	typeVersionMismatch     = "urn:userapi:problem:version-mismatch"
	typeIdempotencyMismatch = "urn:userapi:problem:idempotency-mismatch"
	typeUnauthenticated     = "urn:userapi:problem:unauthenticated"
	typeForbidden           = "urn:userapi:problem:forbidden"
	typeRateLimited         = "urn:userapi:problem:rate-limited"
	typeOverloaded          = "urn:userapi:problem:overloaded"
)

// problem is an error response: the RFC 9457 members and the headers that
// go with some statuses. Handlers return *problem for errors found in the
// request itself; store errors are translated by problemFor.
type problem struct {
	Status     int
	Type       string // "" means about:blank
	Title      string // "" means the status text
	Detail     string
	Fields     []userapi.FieldError // the "errors" member
	RetryAfter int                  // > 0 adds Retry-After: this many seconds
	Allow      string               // the Allow header of a 405
	// Authenticate is the WWW-Authenticate header of a 401; Scope, of a
	// 403, names the missing scope in one.
	Authenticate []byte
	Scope        userapi.Scope
}

func (p *problem) Error() string { return strconv.Itoa(p.Status) + " " + p.Detail }

// badRequest is a 400 naming the offending parameter or field.
func badRequest(field, message string) *problem {
	return &problem{
		Status: fasthttp.StatusBadRequest,
		Detail: "The request is malformed: " + field + " " + message + ".",
		Fields: []userapi.FieldError{{Field: field, Message: message}},
	}
}

func tooLarge(limit int) problem {
	return problem{
		Status: fasthttp.StatusRequestEntityTooLarge,
		Detail: "The request body is larger than " + strconv.Itoa(limit) + " bytes.",
	}
}

func internalProblem() problem {
	return problem{
		Status: fasthttp.StatusInternalServerError,
		Detail: "The service failed to handle the request. The failure is logged under this response's X-Request-ID.",
	}
}

// problemFor is the one table from errors to responses. level is how the
// error is logged; errors the client caused are not logged (level 0 with
// logged false). The detail is written here, never taken from err, so no
// driver message reaches a client.
func problemFor(err error) (p problem, level slog.Level, logged bool) {
	if p, ok := err.(*problem); ok {
		return *p, 0, false
	}
	var verr *userapi.ValidationError
	switch {
	case errors.As(err, &verr):
		return problem{
			Status: fasthttp.StatusUnprocessableEntity,
			Type:   typeValidation,
			Title:  "Invalid input",
			Detail: "The request has invalid fields; see errors.",
			Fields: verr.Fields,
		}, 0, false
	case errors.Is(err, userapi.ErrUnauthenticated):
		// One answer for every bad credential: unknown, revoked, expired,
		// wrong secret, bad signature, wrong issuer or audience.
		return problem{
			Status:       fasthttp.StatusUnauthorized,
			Type:         typeUnauthenticated,
			Title:        "Invalid credential",
			Detail:       "The credential is not valid: unknown, revoked, expired or malformed.",
			Authenticate: wwwAuthenticateInvalid,
		}, 0, false
	case errors.Is(err, userapi.ErrKeyNotFound):
		return problem{Status: fasthttp.StatusNotFound, Detail: "No API key has this id."}, 0, false
	case errors.Is(err, userapi.ErrNotFound):
		return problem{Status: fasthttp.StatusNotFound, Detail: "No user has this id."}, 0, false
	case errors.Is(err, userapi.ErrEmailTaken):
		return problem{
			Status: fasthttp.StatusConflict,
			Type:   typeEmailTaken,
			Title:  "Email already in use",
			Detail: "Another user has this email address.",
			Fields: []userapi.FieldError{{Field: "email", Message: "is already in use"}},
		}, 0, false
	case errors.Is(err, userapi.ErrVersionMismatch):
		return problem{
			Status: fasthttp.StatusPreconditionFailed,
			Type:   typeVersionMismatch,
			Title:  "Version mismatch",
			Detail: "The user's current version does not match If-Match; fetch it again and retry with its ETag.",
		}, 0, false
	case errors.Is(err, userapi.ErrIdempotencyMismatch):
		return problem{
			Status: fasthttp.StatusUnprocessableEntity,
			Type:   typeIdempotencyMismatch,
			Title:  "Idempotency key reused",
			Detail: "This Idempotency-Key was used with a different request body.",
		}, 0, false
	case errors.Is(err, userapi.ErrOverloaded):
		// Not logged one by one: under overload that would add work; the
		// shedder counts them (userapi_shed_rejected_total).
		return problem{
			Status:     fasthttp.StatusServiceUnavailable,
			Type:       typeOverloaded,
			Title:      "Overloaded",
			Detail:     "The service is at its capacity for work that reaches the database; retry after Retry-After seconds.",
			RetryAfter: 1,
		}, 0, false
	case errors.Is(err, userapi.ErrUnavailable), errors.Is(err, userapi.ErrStaleSchema):
		return problem{
			Status:     fasthttp.StatusServiceUnavailable,
			Detail:     "The database cannot be reached now; retry later.",
			RetryAfter: 1,
		}, slog.LevelWarn, true
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return problem{
			Status:     fasthttp.StatusServiceUnavailable,
			Detail:     "The request took longer than the service allows; retry later.",
			RetryAfter: 1,
		}, slog.LevelWarn, true
	}
	return internalProblem(), slog.LevelError, true
}

// writeError answers with err's problem and logs it when the table says so.
func (s *Server) writeError(rc *fasthttp.RequestCtx, err error) {
	p, level, logged := problemFor(err)
	if logged {
		s.log.Log(context.Background(), level, "request failed",
			s.requestAttrs(rc, slog.Int("status", p.Status), slog.Any("err", err))...)
	}
	s.writeProblem(rc, p)
}

var (
	contentTypeProblem = []byte("application/problem+json")
	hRetryAfter        = []byte("Retry-After")
	hAllow             = []byte("Allow")
	one                = []byte("1")
)

// writeProblem replaces the response with p as application/problem+json.
func (s *Server) writeProblem(rc *fasthttp.RequestCtx, p problem) {
	title := p.Title
	if title == "" {
		title = fasthttp.StatusMessage(p.Status)
	}
	typ := p.Type
	if typ == "" {
		typ = "about:blank"
	}
	rc.Response.Header.Del("ETag")
	rc.Response.Header.Del("Location")
	rc.SetStatusCode(p.Status)
	rc.Response.Header.SetContentTypeBytes(contentTypeProblem)
	if p.RetryAfter == 1 {
		rc.Response.Header.SetCanonical(hRetryAfter, one)
	} else if p.RetryAfter > 1 {
		rc.Response.Header.SetCanonical(hRetryAfter, strconv.AppendInt(nil, int64(p.RetryAfter), 10))
	}
	if p.Allow != "" {
		rc.Response.Header.SetCanonical(hAllow, []byte(p.Allow))
	}
	if p.Authenticate != nil {
		rc.Response.Header.SetCanonical(hWWWAuthenticate, p.Authenticate)
	}
	if p.Scope != 0 {
		rc.Response.Header.SetCanonical(hWWWAuthenticate,
			[]byte(`Bearer realm="userapi", error="insufficient_scope", scope="`+p.Scope.String()+`"`))
	}

	b := rc.Response.SwapBody(nil)[:0]
	b = append(b, `{"type":`...)
	b = userapi.AppendJSONString(b, typ)
	b = append(b, `,"title":`...)
	b = userapi.AppendJSONString(b, title)
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(p.Status), 10)
	b = append(b, `,"detail":`...)
	b = userapi.AppendJSONString(b, p.Detail)
	if len(p.Fields) > 0 {
		b = append(b, `,"errors":[`...)
		for i, f := range p.Fields {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"field":`...)
			b = userapi.AppendJSONString(b, f.Field)
			b = append(b, `,"message":`...)
			b = userapi.AppendJSONString(b, f.Message)
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	b = append(b, '}')
	rc.Response.SwapBody(b)
}

// notFound answers paths that match no route.
func notFound(*fasthttp.RequestCtx, context.Context) error {
	return &problem{Status: fasthttp.StatusNotFound, Detail: "No route matches this path."}
}

// methodNotAllowed answers a known path with a method it does not support.
func methodNotAllowed(allow string) handlerFunc {
	return func(*fasthttp.RequestCtx, context.Context) error {
		return &problem{
			Status: fasthttp.StatusMethodNotAllowed,
			Detail: "This path supports " + allow + ".",
			Allow:  allow,
		}
	}
}
