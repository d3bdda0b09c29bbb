package http

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"time"

	"github.com/valyala/fasthttp"

	"userapi"
)

// Authenticator checks a request's credential (Options.Auth); auth.Authenticator
// is the service's. Authenticate gets the Authorization header value, never
// empty, and returns the caller, an error wrapping userapi.ErrUnauthenticated
// (401), or one wrapping userapi.ErrUnavailable (503).
type Authenticator interface {
	Authenticate(ctx context.Context, authorization []byte, now time.Time) (*userapi.Principal, error)
}

// KeyAdmin manages API keys behind the /admin/keys routes (Options.Keys).
type KeyAdmin interface {
	// Create returns the new key's secret form, shown once, and its row.
	Create(ctx context.Context, in userapi.KeyCreate) (string, *userapi.APIKey, error)
	List(ctx context.Context) ([]*userapi.APIKey, error)
	// Revoke fails with userapi.ErrKeyNotFound.
	Revoke(ctx context.Context, id int64) (*userapi.APIKey, error)
}

// principalKey is the user-value key of the request's Principal.
type principalKey struct{}

// PrincipalOf returns the authenticated caller of a request, or nil when
// authentication is off or the route is open. Middleware after the
// authentication step (the rate limiter) keys on its ID.
func PrincipalOf(rc *fasthttp.RequestCtx) *userapi.Principal {
	p, _ := rc.UserValue(principalKey{}).(*userapi.Principal)
	return p
}

var hAuthorization = []byte("Authorization")

// authorize authenticates the request and checks that its principal has
// scope; it puts the principal on the request. It runs before the handler,
// so before the cache is consulted, and allocates nothing for a credential
// verified before.
func (s *Server) authorize(rc *fasthttp.RequestCtx, ctx context.Context, scope userapi.Scope) error {
	h := rc.Request.Header.PeekBytes(hAuthorization)
	if len(h) == 0 {
		return errNoCredential
	}
	p, err := s.opts.Auth.Authenticate(ctx, h, rc.Time())
	if err != nil {
		return err
	}
	rc.SetUserValue(principalKey{}, p)
	if !p.Scopes.Has(scope) {
		return &problem{
			Status: fasthttp.StatusForbidden,
			Type:   typeForbidden,
			Title:  "Missing scope",
			Detail: "The credential lacks the scope " + scope.String() + " this operation needs.",
			Scope:  scope,
		}
	}
	return nil
}

// errNoCredential is a request without an Authorization header.
var errNoCredential = &problem{
	Status:       fasthttp.StatusUnauthorized,
	Type:         typeUnauthenticated,
	Title:        "Authentication required",
	Detail:       "Send an API key or a bearer token from the identity provider: Authorization: Bearer <credential>.",
	Authenticate: wwwAuthenticateMissing,
}

// WWW-Authenticate values (RFC 6750 §3). A bad credential, whatever is
// wrong with it (unknown, revoked, expired, wrong secret, bad signature),
// gets the same answer.
var (
	wwwAuthenticateMissing = []byte(`Bearer realm="userapi"`)
	wwwAuthenticateInvalid = []byte(`Bearer realm="userapi", error="invalid_token"`)
	hWWWAuthenticate       = []byte("WWW-Authenticate")
)

// adminKeyBody is the body of POST /admin/keys.
type adminKeyBody struct {
	Name      string     `json:"name"`
	Scopes    []string   `json:"scopes"`
	ExpiresAt *time.Time `json:"expires_at"`
	RateLimit *float64   `json:"rate_limit"`
	RateBurst *int       `json:"rate_burst"`
}

// createKey serves POST /admin/keys: 201 with the key's secret form, shown
// this once.
func (s *Server) createKey(rc *fasthttp.RequestCtx, ctx context.Context) error {
	if err := checkContentType(rc, mediaJSON); err != nil {
		return err
	}
	body, err := s.requestBody(rc)
	if err != nil {
		return err
	}
	var in adminKeyBody
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return badRequest("body", "must be a JSON object with name, scopes and optionally expires_at, rate_limit, rate_burst")
	}
	if dec.More() {
		return badRequest("body", "must hold one JSON object and nothing after it")
	}
	nk := userapi.KeyCreate{Name: in.Name}
	for _, name := range in.Scopes {
		sc, err := userapi.ParseScope(name)
		if err != nil {
			return &userapi.ValidationError{Fields: []userapi.FieldError{{Field: "scopes", Message: "must name only users:read, users:write, admin"}}}
		}
		nk.Scopes |= sc
	}
	if in.ExpiresAt != nil {
		nk.ExpiresAt = in.ExpiresAt.UTC()
	}
	if in.RateLimit != nil {
		nk.RateLimit = *in.RateLimit
	}
	if in.RateBurst != nil {
		nk.RateBurst = *in.RateBurst
	}
	secret, k, err := s.opts.Keys.Create(ctx, nk)
	if err != nil {
		return err
	}
	b := appendKey(rc.Response.SwapBody(nil)[:0], k, secret)
	rc.Response.SwapBody(b)
	rc.SetStatusCode(fasthttp.StatusCreated)
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	rc.Response.Header.Set("Location", "/admin/keys/"+strconv.FormatInt(k.ID, 10))
	// The body holds a secret: no cache anywhere may keep it.
	rc.Response.Header.Set("Cache-Control", "no-store")
	return nil
}

// listKeys serves GET /admin/keys: every key, without secrets (none are
// stored).
func (s *Server) listKeys(rc *fasthttp.RequestCtx, ctx context.Context) error {
	keys, err := s.opts.Keys.List(ctx)
	if err != nil {
		return err
	}
	b := append(rc.Response.SwapBody(nil)[:0], `{"items":[`...)
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendKey(b, k, "")
	}
	b = append(b, "]}"...)
	rc.Response.SwapBody(b)
	rc.Response.Header.SetContentTypeBytes(contentTypeJSON)
	return nil
}

// revokeKey serves DELETE /admin/keys/{id}: 204, also for a key revoked
// before; 404 for an unknown id.
func (s *Server) revokeKey(rc *fasthttp.RequestCtx, ctx context.Context) error {
	id, ok := parseID(rc.Path()[len("/admin/keys/"):])
	if !ok {
		return badRequest("id", "must be a positive 64-bit integer")
	}
	if _, err := s.opts.Keys.Revoke(ctx, id); err != nil {
		return err
	}
	rc.SetStatusCode(fasthttp.StatusNoContent)
	return nil
}

// appendKey appends k as JSON, with "key" when secret is not empty.
func appendKey(b []byte, k *userapi.APIKey, secret string) []byte {
	b = append(b, `{"id":`...)
	b = strconv.AppendInt(b, k.ID, 10)
	b = append(b, `,"name":`...)
	b = userapi.AppendJSONString(b, k.Name)
	b = append(b, `,"scopes":[`...)
	for i, n := range k.Scopes.Names() {
		if i > 0 {
			b = append(b, ',')
		}
		b = userapi.AppendJSONString(b, n)
	}
	b = append(b, ']')
	b = appendTime(b, "created_at", k.CreatedAt)
	b = appendTime(b, "last_used_at", k.LastUsedAt)
	b = appendTime(b, "expires_at", k.ExpiresAt)
	b = appendTime(b, "revoked_at", k.RevokedAt)
	b = append(b, `,"rate_limit":`...)
	if k.RateLimit > 0 {
		b = strconv.AppendFloat(b, k.RateLimit, 'g', -1, 64)
	} else {
		b = append(b, "null"...)
	}
	b = append(b, `,"rate_burst":`...)
	if k.RateBurst > 0 {
		b = strconv.AppendInt(b, int64(k.RateBurst), 10)
	} else {
		b = append(b, "null"...)
	}
	if secret != "" {
		b = append(b, `,"key":`...)
		b = userapi.AppendJSONString(b, secret)
	}
	return append(b, '}')
}

// appendTime appends ,"name":"<RFC 3339>" or ,"name":null for the zero time.
func appendTime(b []byte, name string, t time.Time) []byte {
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	if t.IsZero() {
		return append(b, "null"...)
	}
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, userapi.TimeLayout)
	return append(b, '"')
}
