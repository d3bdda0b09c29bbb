package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"userapi"
	"userapi/internal/pgtest"
)

// TestServeWithReplica: two services over a primary and a streaming replica
// that applies commits 300 ms late (--db-replica on the command line for
// one, USERAPI_DB_REPLICA for the other). A write on one answers with an
// X-Session-LSN token; the other, given the token, serves the write at
// once, although its replica has not replayed it yet. A malformed token is
// a 400.
func TestServeWithReplica(t *testing.T) {
	primary, replica := pgtest.StreamingPair(t, 300*time.Millisecond)
	a, logs, _ := startService(t, nil, "--db", primary, "--db-replica", replica, "--migrate", "--cache", "local")
	key := firstKey(t, logs)
	// Until the replica has replayed the migrations, its reads fail and go
	// to the primary; wait, so that the reads below could go to it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := pgx.Connect(context.Background(), replica)
		if err != nil {
			t.Fatal(err)
		}
		var n int
		err = c.QueryRow(context.Background(), "SELECT count(*) FROM api_keys").Scan(&n)
		c.Close(context.Background())
		if err == nil && n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replica has no api key after 10s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, _, _ := startService(t, map[string]string{"USERAPI_DB_REPLICA": replica}, "--db", primary, "--cache", "local")

	resp := do(t, "POST", a+"/users", key, `{"email":"r@example.com","name":"R"}`)
	var created struct {
		ID int64 `json:"id"`
	}
	json.NewDecoder(resp.Body).Decode(&created)
	resp.Body.Close()
	tok := resp.Header.Get("X-Session-LSN")
	if resp.StatusCode != 201 || tok == "" {
		t.Fatalf("POST /users = %d, X-Session-LSN %q", resp.StatusCode, tok)
	}
	if _, err := userapi.ParsePosition(tok); err != nil {
		t.Fatalf("token: %v", err)
	}

	get := func(url, tok string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Authorization", "Bearer "+key)
		if tok != "" {
			req.Header.Set("X-Session-LSN", tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp, string(b)
	}
	r, body := get(fmt.Sprintf("%s/users/%d", b, created.ID), tok)
	if r.StatusCode != 200 || r.Header.Get("ETag") != `"1"` {
		t.Fatalf("GET on the other instance with the token = %d %s %s", r.StatusCode, r.Header.Get("ETag"), body)
	}

	req, _ := http.NewRequest("PATCH", fmt.Sprintf("%s/users/%d", a, created.ID), strings.NewReader(`{"name":"R2"}`))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/merge-patch+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	tok2 := resp.Header.Get("X-Session-LSN")
	p1, _ := userapi.ParsePosition(tok)
	p2, err := userapi.ParsePosition(tok2)
	if resp.StatusCode != 200 || err != nil || p2 <= p1 {
		t.Fatalf("PATCH = %d, X-Session-LSN %q after %q", resp.StatusCode, tok2, tok)
	}
	r, body = get(fmt.Sprintf("%s/users?email=r@example.com", b), tok2)
	if r.StatusCode != 200 || !strings.Contains(body, `"name":"R2"`) {
		t.Fatalf("list on the other instance with the token = %d %s", r.StatusCode, body)
	}

	r, body = get(fmt.Sprintf("%s/users/%d", b, created.ID), "not-a-token")
	if r.StatusCode != 400 || r.Header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("GET with a malformed token = %d %s %s", r.StatusCode, r.Header.Get("Content-Type"), body)
	}
}

// TestReplicaFlag: --db-replica repeats, one value may hold several URLs
// separated by spaces (as USERAPI_DB_REPLICA must), and passwords are
// redacted when the configuration is shown.
func TestReplicaFlag(t *testing.T) {
	var l urlList
	l.Set("postgres://u:pw1@r1:5432/db  postgres://u:pw2@r2:5432/db")
	l.Set("postgres://u@r3:5432/db")
	if len(l) != 3 || l[1] != "postgres://u:pw2@r2:5432/db" {
		t.Fatalf("urls %q", l)
	}
	if s := l.String(); strings.Contains(s, "pw1") || strings.Contains(s, "pw2") || !strings.Contains(s, "r3:5432") {
		t.Errorf("shown as %q", s)
	}
}
