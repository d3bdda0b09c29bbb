package http

import (
	"bytes"
	"context"
	"strings"
	"time"

	"github.com/valyala/fasthttp"

	"userapi"
)

// handlerFunc serves one route. ctx carries the request deadline and is
// what the handler passes to the store. A returned error is written by
// writeError as problem+json with the status from problem.go's table; the
// handler writes only successful responses.
type handlerFunc func(rc *fasthttp.RequestCtx, ctx context.Context) error

// route is one operation of the API.
type route struct {
	method   string // GET, POST, PUT, PATCH or DELETE; GET also answers HEAD
	template string // the path as openapi.json writes it, and the metrics label
	handle   handlerFunc
	// scope is what the caller's credential must hold (when Options.Auth
	// is set); open routes have none. openapi.json lists the same scopes.
	scope userapi.Scope
}

// Scopes of the routes, by the names routes() reads best with.
const (
	open  userapi.Scope = 0
	read                = userapi.ScopeUsersRead
	write               = userapi.ScopeUsersWrite
	admin               = userapi.ScopeAdmin
)

// routes is the whole API surface. The OpenAPI test checks that this list
// and openapi.json name the same operations.
func (s *Server) routes() []route {
	rs := []route{
		{"GET", "/users", s.listUsers, read},
		{"POST", "/users", s.createUser, write},
		{"GET", "/users/{id}", s.getUser, read},
		{"PUT", "/users/{id}", s.replaceUser, write},
		{"PATCH", "/users/{id}", s.patchUser, write},
		{"DELETE", "/users/{id}", s.deleteUser, write},
		{"GET", "/livez", s.livez, open},
		{"GET", "/readyz", s.readyz, open},
		{"GET", "/openapi.json", s.openAPI, open},
	}
	if s.opts.Keys != nil {
		rs = append(rs,
			route{"POST", "/admin/keys", s.createKey, admin},
			route{"GET", "/admin/keys", s.listKeys, admin},
			route{"DELETE", "/admin/keys/{id}", s.revokeKey, admin},
		)
	}
	if s.opts.PublicMetrics && s.opts.Metrics != nil {
		// Off by default: the debug listener always has it, and the public
		// one should not tell everyone the service's internals. Open like
		// /readyz: a scraper holds no API credential.
		rs = append(rs, route{"GET", "/metrics", s.promMetrics(), open})
	}
	return rs
}

// serve is the middleware chain every request runs through, in order:
//
//  1. in-flight gauge
//  2. request id: a sane X-Request-ID is kept, otherwise one is generated;
//     it is echoed in the response and in every log line of the request
//  3. routing: raw path → route template, method → handler, else 404 or
//     405 with Allow (see endpoint)
//  4. recovery (deferred, in finish): a panic becomes a logged 500
//  5. deadline: the handler's context ends RequestTimeout after the
//     request started (rounded up to 10 ms, see context.go)
//  6. authentication (auth.go), when Options.Auth is set and the route
//     has a scope: 401 for a missing or bad credential, 403 for a missing
//     scope; the Principal is put on the request (PrincipalOf)
//  7. rate limit (limits.go): a token from the client's bucket (the
//     principal's when authenticated, else the address's, also for a
//     refused credential), and the RateLimit fields; 429 with Retry-After
//     without one
//  8. the handler; a returned error becomes problem+json (problem.go).
//     When the store reads replicas, the X-Session-LSN token is read and
//     a write's token returned (session.go)
//  9. gzip of bodies of at least GzipMinBytes the client accepts gzip for
//  10. metrics: requests by route template, method and status; duration;
//     at debug level one log line
//
// Connection caps act before all of this, at accept (capListener).
func (s *Server) serve(rc *fasthttp.RequestCtx) {
	s.metrics.inFlight.Inc()
	s.setRequestID(rc)
	ep := s.endpoint(rc)
	defer s.finish(rc, ep)
	ctx := s.deadlines.context(rc.Time())
	if ep.scope != open && s.opts.Auth != nil {
		if err := s.authorize(rc, ctx, ep.scope); err != nil {
			// Refused credentials count against the address's budget
			// too, so guessing keys is rate limited like anything else.
			if lerr := s.limit(rc, ep); lerr != nil {
				err = lerr
			}
			s.writeError(rc, err)
			return
		}
	}
	if err := s.limit(rc, ep); err != nil {
		s.writeError(rc, err)
		return
	}
	var sess *userapi.Session
	if s.replicas {
		var err error
		if ctx, sess, err = s.session(rc, ctx); err != nil {
			s.writeError(rc, err)
			return
		}
	}
	if err := ep.handle(rc, ctx); err != nil {
		s.writeError(rc, err)
		return
	}
	setSession(rc, sess)
}

// endpoint routes the request by its path as the client sent it
// (URI.PathOriginal), not fasthttp's normalized Path, which has decoded
// %2F into "/" and resolved dot segments: /users/..%2fopenapi.json would be
// /openapi.json there, past any proxy that lets only /users/* through. On
// the raw path %2F is no separator, "." and ".." are segments like any
// other, and "//" an empty segment, so none of them changes the route: a
// route's path is matched byte for byte, the {id} segment is whatever lies
// between "/users/" and the end (pathID refuses what is not digits), and
// the query string and fragment are not part of it.
func (s *Server) endpoint(rc *fasthttp.RequestCtx) *endpoint {
	return s.router.match(rc.URI().PathOriginal(), rc.Method())
}

// finish is the deferred tail of serve; it also runs when the handler
// panicked, so a panic is answered, counted and logged like any 500.
func (s *Server) finish(rc *fasthttp.RequestCtx, ep *endpoint) {
	if v := recover(); v != nil {
		s.recovered(rc, v)
	}
	s.compress(rc)
	if s.draining.Load() {
		rc.SetConnectionClose()
	}
	elapsed := time.Since(rc.Time())
	ep.metrics.observe(rc.Response.StatusCode(), elapsed)
	s.metrics.inFlight.Dec()
	s.logRequest(rc, ep, elapsed)
}

// Request methods, as indexes of resource.endpoints and metrics labels.
// Anything else is "OTHER", which keeps the label set bounded.
const (
	methodGet = iota
	methodHead
	methodPost
	methodPut
	methodPatch
	methodDelete
	methodOptions
	methodOther
	numMethods
)

var methodNames = [numMethods]string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}

func methodIndex(m []byte) int {
	switch string(m) {
	case "GET":
		return methodGet
	case "HEAD":
		return methodHead
	case "POST":
		return methodPost
	case "PUT":
		return methodPut
	case "PATCH":
		return methodPatch
	case "DELETE":
		return methodDelete
	case "OPTIONS":
		return methodOptions
	}
	return methodOther
}

// routeUnmatched is the route label of requests for unknown paths.
const routeUnmatched = "unmatched"

// router resolves a path to a resource (one path template) and a method
// to its endpoint without allocating.
type router struct {
	static   map[string]*resource // templates without parameters
	params   []*resource          // templates ending in one {param} segment
	notFound *resource
}

// resource is one path template with an endpoint for every method: the
// route's handler, or 405.
type resource struct {
	template  string
	prefix    []byte // of a parameter template: the part before "{"
	endpoints [numMethods]endpoint
}

type endpoint struct {
	handle  handlerFunc
	scope   userapi.Scope
	metrics *routeMetrics
	limited bool // rate limited: every route but the health checks
}

func (s *Server) newRouter() router {
	r := router{static: map[string]*resource{}}
	var order []*resource
	byTemplate := map[string]*resource{}
	for _, rt := range s.routes() {
		res := byTemplate[rt.template]
		if res == nil {
			res = &resource{template: rt.template}
			if i := strings.IndexByte(rt.template, '{'); i >= 0 {
				if !strings.HasSuffix(rt.template, "}") || strings.Contains(rt.template[i:], "/") {
					panic("http: route " + rt.template + ": only a trailing {param} segment is supported")
				}
				res.prefix = []byte(rt.template[:i])
				r.params = append(r.params, res)
			} else {
				r.static[rt.template] = res
			}
			byTemplate[rt.template] = res
			order = append(order, res)
		}
		m := methodIndex([]byte(rt.method))
		res.endpoints[m].handle, res.endpoints[m].scope = rt.handle, rt.scope
		if m == methodGet {
			res.endpoints[methodHead].handle, res.endpoints[methodHead].scope = rt.handle, rt.scope
		}
	}
	r.notFound = &resource{template: routeUnmatched}
	for _, res := range append(order, r.notFound) {
		allow := allowHeader(res)
		for m := range res.endpoints {
			ep := &res.endpoints[m]
			ep.metrics = s.metrics.route(res.template, methodNames[m])
			// A balancer's health checks must never be refused.
			ep.limited = res.template != "/livez" && res.template != "/readyz"
			switch {
			case ep.handle != nil:
			case res == r.notFound:
				ep.handle = notFound
			default:
				ep.handle = methodNotAllowed(allow)
			}
		}
	}
	return r
}

// match returns the endpoint for the request; for unknown paths the 404
// endpoint, for unsupported methods a 405 one.
func (r *router) match(path, method []byte) *endpoint {
	res := r.static[string(path)]
	if res == nil {
		for _, p := range r.params {
			if rest, ok := bytes.CutPrefix(path, p.prefix); ok && len(rest) > 0 && bytes.IndexByte(rest, '/') < 0 {
				res = p
				break
			}
		}
		if res == nil {
			res = r.notFound
		}
	}
	return &res.endpoints[methodIndex(method)]
}

func allowHeader(res *resource) string {
	var allowed []string
	for m, ep := range res.endpoints {
		if ep.handle != nil {
			allowed = append(allowed, methodNames[m])
		}
	}
	return strings.Join(allowed, ", ")
}
