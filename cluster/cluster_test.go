package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Load shape of the fault tests: 8 workers, each owning 6 users to start
// with, one request every 2ms at most per worker: a few hundred requests
// per second, always some in flight, bounded on a shared 2-core machine.
const (
	loadWorkers = 8
	loadUsers   = 6
	loadPace    = 2 * time.Millisecond
)

// An instance killed with SIGKILL mid-request and started again later:
// nginx retries the idempotent requests it had in flight (and every
// request it could not connect for) on the other instances, clients retry
// their POSTs with the same Idempotency-Key, and afterwards nothing
// acknowledged is lost, no create is doubled, and every instance's cache
// agrees with the database.
func TestKillInstanceUnderLoad(t *testing.T) {
	c := startCluster(t, 3)
	l := newLoad(t, c, loadWorkers, loadUsers)
	stop := l.start(loadPace)
	step := func(d time.Duration, args ...string) {
		t.Helper()
		time.Sleep(d)
		if err := c.script(args...); err != nil {
			stop()
			t.Fatal(err)
		}
	}
	step(1500*time.Millisecond, "kill", "2", "--signal", "KILL")
	// start returns once nginx takes the instance back (fail_timeout), so
	// the restarted instance serves part of the rest of the load.
	step(1500*time.Millisecond, "start", "2")
	time.Sleep(2 * time.Second)
	stop()

	l.checkNoFailures(t)
	checkDatabase(t, c, l)
	checkCaches(t, c, l)

	// The kill must have been felt: requests nginx sent to the dead
	// instance (in flight, or refused before it was marked down) were
	// passed to another one. Stopping nginx flushes its access log.
	if err := c.script("down"); err != nil {
		t.Fatal(err)
	}
	retried := c.retriedRequests(t)
	t.Logf("requests nginx retried on another instance, by method: %v", retried)
	if len(retried) == 0 {
		t.Error("nginx retried no request on another instance: the kill went unnoticed")
	}
}

// retriedRequests counts, by method, the requests in nginx's access log
// that went to more than one instance.
func (c *cluster) retriedRequests(t *testing.T) map[string]int {
	t.Helper()
	f, err := os.Open(filepath.Join(c.dir, "nginx", "access.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// 127.0.0.1 [time] "GET /users/1 HTTP/1.1" 200 … upstream=A, B ustatus=502, 200 …
	re := regexp.MustCompile(`"([A-Z]+) [^"]*" .* upstream=[^ ]+, `)
	n := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			n[m[1]]++
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// Each instance in turn is stopped with SIGTERM (it drains what it is
// serving and closes its idle keep-alive connections), started again and
// waited for, under load: not one request fails.
func TestRollingRestartUnderLoad(t *testing.T) {
	c := startCluster(t, 3)
	l := newLoad(t, c, loadWorkers, loadUsers)
	stop := l.start(loadPace)
	for i := range c.addrs {
		time.Sleep(500 * time.Millisecond)
		if err := c.script("restart", strconv.Itoa(i+1)); err != nil {
			stop()
			t.Fatal(err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	stop()

	l.checkNoFailures(t)
	for _, w := range l.workers {
		// A graceful stop answers every request it accepted, so no DELETE
		// can meet its own earlier attempt, and no POST needs a client
		// retry. A POST needs one when the instance closes an idle
		// keep-alive connection just as nginx writes the POST to it: nginx
		// logs "upstream prematurely closed connection" and, as the POST
		// was sent, answers 502 instead of trying another instance. The
		// cure is in the instance's shutdown: answer with Connection: close
		// for a moment before closing idle connections (docs/deploy.md).
		if w.deleteReplays > 0 || w.postRetries > 0 {
			t.Errorf("worker %d: %d DELETEs answered 404 and %d POST attempts failed during a graceful restart",
				w.n, w.deleteReplays, w.postRetries)
		}
	}
	checkDatabase(t, c, l)
	checkCaches(t, c, l)
}

// nginx passes the client's X-Request-ID through (or makes one), the
// service echoes it, /metrics is not public, and the service believes
// X-Forwarded-For only from the configured proxy (127.0.0.1): it logs the
// address nginx saw, never one a client wrote into the header.
func TestForwardedHeaders(t *testing.T) {
	c := startCluster(t, 2)
	direct := c.newClient(2)
	// An outside client: loopback, but not the trusted proxy address.
	outside := &http.Client{
		Transport: bearer{c.key, &http.Transport{
			DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}).DialContext,
		}},
		Timeout: 10 * time.Second,
	}
	get := func(client *http.Client, url string, hdr map[string]string) *http.Response {
		t.Helper()
		req, err := http.NewRequest("GET", url, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}

	t.Run("request id", func(t *testing.T) {
		id := "cluster-test-" + randomHex(8)
		resp := get(outside, c.url+"/readyz", map[string]string{"X-Request-ID": id})
		if got := resp.Header.Get("X-Request-ID"); got != id {
			t.Errorf("X-Request-ID through nginx = %q, want the client's %q", got, id)
		}
		if got := findRequestLog(t, c, id); got == nil {
			t.Errorf("no instance logged request id %s", id)
		}
		// Without one, nginx makes one ($request_id, 32 hex digits) that
		// the service keeps and echoes; each request gets its own.
		hex32 := regexp.MustCompile(`^[0-9a-f]{32}$`)
		a := get(outside, c.url+"/readyz", nil).Header.Get("X-Request-ID")
		b := get(outside, c.url+"/readyz", nil).Header.Get("X-Request-ID")
		if !hex32.MatchString(a) || !hex32.MatchString(b) || a == b {
			t.Errorf("generated X-Request-IDs %q, %q: want two different nginx $request_id values", a, b)
		}
	})

	t.Run("HTTP/1.0 without Host", func(t *testing.T) {
		// nginx must still send the instance a Host header.
		conn, err := net.Dial("tcp", strings.TrimPrefix(c.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(conn, "GET /readyz HTTP/1.0\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("GET /readyz HTTP/1.0 without Host through nginx: %d, want 200", resp.StatusCode)
		}
	})

	t.Run("metrics not public", func(t *testing.T) {
		for _, path := range []string{"/metrics", "/metrics?x=1", "//metrics", "/%6Detrics"} {
			if resp := get(outside, c.url+path, nil); resp.StatusCode != 404 {
				t.Errorf("GET %s through nginx: %d, want 404", path, resp.StatusCode)
			}
		}
		if resp := get(direct, c.instanceURL(1)+"/metrics", nil); resp.StatusCode != 404 {
			t.Errorf("GET /metrics on an instance's public listener: %d, want 404", resp.StatusCode)
		}
		resp, err := direct.Get("http://" + c.debugAddrs[0] + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), "userapi_") {
			t.Errorf("GET /metrics on the debug listener: %d, want 200 with userapi_ metrics", resp.StatusCode)
		}
	})

	t.Run("forwarded for", func(t *testing.T) {
		const forged = "203.0.113.7"
		cases := []struct {
			name   string
			client *http.Client
			url    string
			xff    string
			want   string
		}{
			// nginx appends its peer (127.0.0.2) to the forged header; the
			// service walks from the right, trusts 127.0.0.1's header, and
			// stops at the first untrusted hop.
			{"through nginx, forged header", outside, c.url, forged, "127.0.0.2"},
			{"through nginx, no header", outside, c.url, "", "127.0.0.2"},
			// Straight from an untrusted peer the header is ignored.
			{"direct from untrusted peer", outside, c.instanceURL(1), forged, "127.0.0.2"},
			// From the trusted proxy address the header is believed.
			{"direct from trusted proxy", direct, c.instanceURL(1), forged, forged},
		}
		for _, tc := range cases {
			id := "xff-" + randomHex(8)
			hdr := map[string]string{"X-Request-ID": id}
			if tc.xff != "" {
				hdr["X-Forwarded-For"] = tc.xff
			}
			get(tc.client, tc.url+"/livez", hdr)
			line := findRequestLog(t, c, id)
			if line == nil {
				t.Errorf("%s: no instance logged request %s", tc.name, id)
				continue
			}
			if got := line["client"]; got != tc.want {
				t.Errorf("%s: service logged client %v, want %s", tc.name, got, tc.want)
			}
		}
	})
}

// findRequestLog returns the instance log line (JSON) of the request with
// the given id, waiting briefly for it to be written.
func findRequestLog(t *testing.T, c *cluster, id string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		files, _ := filepath.Glob(filepath.Join(c.dir, "instance-*.log"))
		for _, f := range files {
			if line := scanForRequest(f, id); line != nil {
				return line
			}
		}
		if time.Now().After(deadline) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func scanForRequest(file, id string) map[string]any {
	f, err := os.Open(file)
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if !strings.Contains(sc.Text(), id) {
			continue
		}
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["request_id"] == id && m["msg"] == "request" {
			return m
		}
	}
	return nil
}

// cacheWindow bounds how long after the load an instance may still serve
// a value the database no longer holds: invalidations travel in
// milliseconds, but an instance restarted during the load may still be
// reconnecting its invalidation channel.
const cacheWindow = 3 * time.Second

// checkCaches reads every user the load knows of from each instance
// directly (bypassing nginx) and compares each answer with the database
// row: same email, name and version (and ETag), or 404 for a deleted user.
// It retries for cacheWindow before reporting what still disagrees.
func checkCaches(t *testing.T, c *cluster, l *load) {
	t.Helper()
	client := c.newClient(4)
	ctx := context.Background()
	deadline := time.Now().Add(cacheWindow)
	for {
		rows, err := c.dbUsers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// One reader per instance.
		users := l.users()
		perInstance := make([][]string, len(c.addrs))
		var wg sync.WaitGroup
		for i := range c.addrs {
			wg.Go(func() {
				base := c.instanceURL(i + 1)
				for _, u := range users {
					if msg := compareInstance(client, base, u.id, rows); msg != "" {
						perInstance[i] = append(perInstance[i], fmt.Sprintf("instance %d: %s", i+1, msg))
					}
				}
			})
		}
		wg.Wait()
		var bad []string
		for _, b := range perInstance {
			bad = append(bad, b...)
		}
		checked := len(users) * len(c.addrs)
		if len(bad) == 0 {
			t.Logf("caches: %d reads on %d instances all match the database", checked, len(c.addrs))
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%d of %d direct reads still disagree with the database %v after the load:", len(bad), checked, cacheWindow)
			for _, b := range bad[:min(len(bad), 20)] {
				t.Error(b)
			}
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// compareInstance returns "" when GET /users/id on base matches rows.
func compareInstance(client *http.Client, base string, id int64, rows map[int64]dbUser) string {
	resp, err := client.Get(base + "/users/" + strconv.FormatInt(id, 10))
	if err != nil {
		return fmt.Sprintf("user %d: %v", id, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return fmt.Sprintf("user %d: %v", id, err)
	}
	row, ok := rows[id]
	if !ok {
		if resp.StatusCode != 404 {
			return fmt.Sprintf("user %d is not in the database, instance answers %d %s", id, resp.StatusCode, body)
		}
		return ""
	}
	var got apiUser
	if resp.StatusCode != 200 || json.Unmarshal(body, &got) != nil {
		return fmt.Sprintf("user %d: database has %+v, instance answers %d %s", id, row, resp.StatusCode, body)
	}
	want := apiUser{ID: row.ID, Email: row.Email, Name: row.Name, Version: row.Version}
	if got != want {
		return fmt.Sprintf("user %d: database has %+v, instance serves %+v", id, want, got)
	}
	if etag := resp.Header.Get("ETag"); etag != `"`+strconv.FormatInt(row.Version, 10)+`"` {
		return fmt.Sprintf("user %d: version %d but ETag %s", id, row.Version, etag)
	}
	return ""
}
