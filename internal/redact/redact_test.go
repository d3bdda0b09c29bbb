package redact

import (
	"slices"
	"testing"
)

func TestURL(t *testing.T) {
	tests := map[string]string{
		"mysql://root:secret@127.0.0.1:3306/test":                      "mysql://root:xxxxx@127.0.0.1:3306/test",
		"postgres://postgres@127.0.0.1:5432/test?sslmode=disable":      "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
		"postgres://h/db?password=hunter2":                             "postgres://h/db?password=xxxxx",
		"redis://:hunter2@127.0.0.1:6379/0":                            "redis://:xxxxx@127.0.0.1:6379/0",
		"redis://:hunter2@h1:7100,h2:7101":                             "redis://:xxxxx@h1:7100,h2:7101",
		"redis-sentinel://:pw@s1:26379,s2:26379/m?sentinel_password=x": "redis-sentinel://:xxxxx@s1:26379,s2:26379/m?sentinel_password=xxxxx",
		"mysql://root@127.0.0.1:3306/test?password=hunter2&tls=false":  "mysql://root@127.0.0.1:3306/test?password=xxxxx&tls=false",
		"sqlite:userapi.db":                                            "sqlite:userapi.db",
		"postgres://u:p%zz@h/db":                                       "<unparsable URL redacted>",
	}
	for in, want := range tests {
		if got := URL(in); got != want {
			t.Errorf("URL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestArgs(t *testing.T) {
	in := []string{"userapi", "serve", "--db", "postgres://u:hunter2@h/db", "--redis=redis://:hunter3@h:6379/0", "-db=mysql://r:p@h/d", "--cache=local",
		"x=postgres://u:p@h/d", "--admin-key", "k1", "--jwt-secret=s1", "--db-password", "p1", "--public-metrics", "--addr", ":8080"}
	want := []string{"userapi", "serve", "--db", "postgres://u:xxxxx@h/db", "--redis=redis://:xxxxx@h:6379/0", "-db=mysql://r:xxxxx@h/d", "--cache=local",
		"<unparsable URL redacted>", "--admin-key", "xxxxx", "--jwt-secret=xxxxx", "--db-password", "xxxxx", "--public-metrics", "--addr", ":8080"}
	if got := Args(in); !slices.Equal(got, want) {
		t.Errorf("Args(%q)\n = %q\nwant %q", in, got, want)
	}
	if in[3] != "postgres://u:hunter2@h/db" {
		t.Error("Args changed its argument")
	}
}
