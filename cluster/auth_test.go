package cluster

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// revokeBound is SPEC.md's bound on a revoke reaching every instance.
const revokeBound = time.Second

// TestRevokeReachesEveryInstance revokes keys on instance 1 and measures
// how long instance 2, which had verified and cached each key, keeps
// accepting it. Instance 2 learns of a revoke only from its periodic check
// of the api_keys table (--key-check-interval, 250 ms by default).
func TestRevokeReachesEveryInstance(t *testing.T) {
	c := startCluster(t, 2)
	admin := c.newClient(2)
	anon := newPlainClient()
	a := c.instanceURL(1)
	b := c.instanceURL(2)

	// nginx passes Authorization through: the cluster's key works behind
	// it, and no key is a 401 with the challenge.
	if st, _ := send(t, admin, "GET", c.url+"/users?limit=1", "", ""); st != 200 {
		t.Errorf("GET /users through nginx with the key = %d, want 200", st)
	}
	resp, err := anon.Get(c.url + "/users?limit=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
		t.Errorf("GET /users through nginx without a key = %d %q, want 401 with a Bearer challenge",
			resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}

	const revokes = 8
	var lags []time.Duration
	for i := range revokes {
		st, body := send(t, admin, "POST", a+"/admin/keys", "", fmt.Sprintf(`{"name":"revoke-%d","scopes":["users:read"]}`, i))
		if st != 201 {
			t.Fatalf("POST /admin/keys = %d %s", st, body)
		}
		var k struct {
			ID  int64  `json:"id"`
			Key string `json:"key"`
		}
		if err := json.Unmarshal(body, &k); err != nil {
			t.Fatal(err)
		}
		// Instance 2 verifies the key and caches it.
		if st, body := send(t, anon, "GET", b+"/users?limit=1", k.Key, ""); st != 200 {
			t.Fatalf("new key on instance 2 = %d %s", st, body)
		}
		// Spread the revokes over the check interval.
		time.Sleep(time.Duration(i) * 37 * time.Millisecond)
		if st, body := send(t, admin, "DELETE", fmt.Sprintf("%s/admin/keys/%d", a, k.ID), "", ""); st != 204 {
			t.Fatalf("DELETE /admin/keys/%d = %d %s", k.ID, st, body)
		}
		revoked := time.Now()
		if st, _ := send(t, anon, "GET", a+"/users?limit=1", k.Key, ""); st != 401 {
			t.Errorf("instance 1 accepted the key it had just revoked: %d", st)
		}
		for {
			st, _ := send(t, anon, "GET", b+"/users?limit=1", k.Key, "")
			if st == 401 {
				break
			}
			if st != 200 {
				t.Fatalf("instance 2 answered %d while waiting for the revoke", st)
			}
			if time.Since(revoked) > 5*revokeBound {
				t.Fatalf("instance 2 still accepts key %d %v after its revoke", k.ID, time.Since(revoked))
			}
			time.Sleep(2 * time.Millisecond)
		}
		lags = append(lags, time.Since(revoked))
	}
	slices.Sort(lags)
	p50, maxLag := lags[len(lags)/2], lags[len(lags)-1]
	t.Logf("revoke on instance 1 refused on instance 2 after: p50 %v, max %v over %d revokes (%v)",
		p50.Round(time.Millisecond), maxLag.Round(time.Millisecond), revokes, lags)
	if maxLag > revokeBound {
		t.Errorf("a revoke took %v to reach instance 2, over the %v bound", maxLag, revokeBound)
	}
}

// newPlainClient is a client that sends no credential of its own.
func newPlainClient() *http.Client { return &http.Client{Timeout: 20 * time.Second} }

// send sends a request, with key as bearer credential when not empty, and
// returns the status and body.
func send(t *testing.T, client *http.Client, method, url, key, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}
