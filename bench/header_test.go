package bench

import (
	"bytes"
	"context"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// TestCredentialSent runs the load against a server that answers 401
// without the expected credential and header: with --api-key and --header
// every request succeeds, without them every one is an error.
func TestCredentialSent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &fasthttp.Server{Handler: func(c *fasthttp.RequestCtx) {
		if string(c.Request.Header.Peek("Authorization")) != "Bearer uak_1_secret" || string(c.Request.Header.Peek("X-Tenant")) != "a b" {
			c.SetStatusCode(401)
			return
		}
		id, _ := strconv.ParseInt(strings.TrimPrefix(string(c.Path()), "/users/"), 10, 64)
		writeUser(c, id, 1)
	}}
	go srv.Serve(ln) //nolint:errcheck // ends with Shutdown
	t.Cleanup(func() { srv.Shutdown() })
	url := "http://" + ln.Addr().String()

	for _, tc := range []struct {
		args       []string
		wantErrors bool
	}{
		{[]string{"--api-key", "uak_1_secret", "--header", "X-Tenant: a b"}, false},
		{[]string{"--header", "X-Tenant: a b"}, true},
		{nil, true},
	} {
		var out, errOut bytes.Buffer
		args := append([]string{url, "--requests", "100", "--connections", "2", "--ids", "10", "--json", "--quiet"}, tc.args...)
		if err := Main(context.Background(), args, &out, &errOut); err != nil {
			t.Fatalf("bench %v: %v\n%s", tc.args, err, errOut.String())
		}
		failed := strings.Contains(out.String(), `"401"`)
		if failed != tc.wantErrors {
			t.Errorf("bench %v: 401s = %v, want %v\n%s", tc.args, failed, tc.wantErrors, out.String())
		}
	}
}

func TestParseHeader(t *testing.T) {
	for in, ok := range map[string]bool{
		"X-A: b":        true,
		"X-A:b: c":      true, // the value may hold colons
		"X-A":           false,
		": b":           false,
		"X A: b":        false,
		"X-A: b\r\nX-B": false,
	} {
		if _, err := parseHeader(in); (err == nil) != ok {
			t.Errorf("parseHeader(%q) = %v, want ok=%v", in, err, ok)
		}
	}
}
