package bench

import (
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// fakeAPI is a small in-memory users service with the routes, statuses and
// headers the generator relies on: ETags, If-Match (412 on a stale version),
// keyset pages with an opaque next_cursor, 201 on create and 409 on a taken
// email. It counts what it saw, so tests can check what was sent.
type fakeAPI struct {
	mu       sync.Mutex
	versions map[int64]int64 // id → version
	emails   map[string]bool
	nextID   int64
	seen     map[string]int // "GET /users/{id}", "PATCH /users/{id}" …
	badPatch int            // PATCH requests without If-Match or JSON merge patch type
	hosts    map[string]bool

	// delay, when set, is called before each request is answered; it may
	// sleep to stall the server.
	delay func()
}

func newFakeAPI(users int64) *fakeAPI {
	f := &fakeAPI{versions: map[int64]int64{}, emails: map[string]bool{}, seen: map[string]int{}, hosts: map[string]bool{}}
	for id := int64(1); id <= users; id++ {
		f.versions[id] = 1
	}
	f.nextID = users + 1
	return f
}

// serve starts the fake on 127.0.0.1:0 and returns its base URL.
func (f *fakeAPI) serve(t testing.TB) string {
	t.Helper()
	return serveHandler(t, f.handle)
}

func serveHandler(t testing.TB, h fasthttp.RequestHandler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &fasthttp.Server{Handler: h, CloseOnShutdown: true}
	go srv.Serve(ln) //nolint:errcheck // ends with Shutdown
	t.Cleanup(func() { _ = srv.Shutdown() })
	return "http://" + ln.Addr().String()
}

func (f *fakeAPI) handle(c *fasthttp.RequestCtx) {
	if f.delay != nil {
		f.delay()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hosts[string(c.Host())] = true
	path := string(c.Path())
	method := string(c.Method())
	route := path
	if rest, ok := strings.CutPrefix(path, "/users/"); ok {
		route = "/users/{id}"
		id, err := strconv.ParseInt(rest, 10, 64)
		if err != nil || id < 1 {
			c.SetStatusCode(400)
			return
		}
		f.seen[method+" "+route]++
		f.user(c, method, id)
		return
	}
	f.seen[method+" "+route]++
	switch {
	case path == "/users" && method == "GET":
		f.list(c)
	case path == "/users" && method == "POST":
		var in struct{ Email, Name string }
		if err := json.Unmarshal(c.PostBody(), &in); err != nil || in.Email == "" || in.Name == "" {
			c.SetStatusCode(400)
			return
		}
		if f.emails[in.Email] {
			c.SetStatusCode(409)
			return
		}
		f.emails[in.Email] = true
		id := f.nextID
		f.nextID++
		f.versions[id] = 1
		c.SetStatusCode(201)
		writeUser(c, id, 1)
	default:
		c.SetStatusCode(404)
	}
}

func (f *fakeAPI) user(c *fasthttp.RequestCtx, method string, id int64) {
	v, ok := f.versions[id]
	if !ok {
		c.SetStatusCode(404)
		return
	}
	switch method {
	case "GET":
		writeUser(c, id, v)
	case "PATCH":
		im := string(c.Request.Header.Peek("If-Match"))
		if im == "" || string(c.Request.Header.ContentType()) != contentTypeMergePatch {
			f.badPatch++
			c.SetStatusCode(400)
			return
		}
		if im != `"`+strconv.FormatInt(v, 10)+`"` {
			c.SetStatusCode(412)
			return
		}
		var in struct{ Name string }
		if err := json.Unmarshal(c.PostBody(), &in); err != nil || in.Name == "" {
			f.badPatch++
			c.SetStatusCode(400)
			return
		}
		f.versions[id] = v + 1
		writeUser(c, id, v+1)
	default:
		c.SetStatusCode(405)
	}
}

// list serves keyset pages; the cursor is the last id in base 36 behind a
// prefix, opaque to the client.
func (f *fakeAPI) list(c *fasthttp.RequestCtx) {
	limit, err := strconv.Atoi(string(c.QueryArgs().Peek("limit")))
	if err != nil || limit < 1 {
		c.SetStatusCode(400)
		return
	}
	after := int64(0)
	if cur := string(c.QueryArgs().Peek("cursor")); cur != "" {
		rest, ok := strings.CutPrefix(cur, "k:")
		n, err := strconv.ParseInt(rest, 36, 64)
		if !ok || err != nil {
			c.SetStatusCode(400)
			return
		}
		after = n
	}
	var b []byte
	b = append(b, `{"items":[`...)
	last, n := int64(0), 0
	for id := after + 1; id < f.nextID && n < limit; id++ {
		v, ok := f.versions[id]
		if !ok {
			continue
		}
		if n > 0 {
			b = append(b, ',')
		}
		b = appendUser(b, id, v)
		last, n = id, n+1
	}
	b = append(b, `],"next_cursor":`...)
	if n == limit && last < f.nextID-1 {
		b = append(b, `"k:`+strconv.FormatInt(last, 36)+`"`...)
	} else {
		b = append(b, "null"...)
	}
	b = append(b, '}')
	c.SetContentType("application/json")
	c.SetBody(b)
}

func appendUser(b []byte, id, v int64) []byte {
	return append(b, `{"id":`+strconv.FormatInt(id, 10)+`,"email":"user`+strconv.FormatInt(id, 10)+
		`@example.com","name":"User","created_at":"2026-11-25T18:50:00.000000Z","updated_at":"2026-11-25T18:50:00.000000Z","version":`+
		strconv.FormatInt(v, 10)+`}`...)
}

func writeUser(c *fasthttp.RequestCtx, id, v int64) {
	c.SetContentType("application/json")
	c.Response.Header.Set("ETag", `"`+strconv.FormatInt(v, 10)+`"`)
	c.SetBody(appendUser(nil, id, v))
}

func (f *fakeAPI) count(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen[key]
}

// quickConfig is a small, fast run against url.
func quickConfig(url string) Config {
	return Config{
		URL: url, Connections: 4, Requests: 500, Timeout: 5 * time.Second,
		Workload: Workload{Kind: "uniform", IDs: 100, ZipfS: 1.1, KeyDist: "uniform", Mix: Mix{OpRead: 1}, ListLimit: 50},
	}
}
