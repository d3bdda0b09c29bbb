package redact

import "testing"

func TestURL(t *testing.T) {
	tests := map[string]string{
		"mysql://root:secret@127.0.0.1:3306/test":                     "mysql://root:xxxxx@127.0.0.1:3306/test",
		"postgres://postgres@127.0.0.1:5432/test?sslmode=disable":     "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
		"postgres://h/db?password=hunter2":                            "postgres://h/db?password=xxxxx",
		"redis://:hunter2@127.0.0.1:6379/0":                           "redis://:xxxxx@127.0.0.1:6379/0",
		"mysql://root@127.0.0.1:3306/test?password=hunter2&tls=false": "mysql://root@127.0.0.1:3306/test?password=xxxxx&tls=false",
		"sqlite:userapi.db":                                           "sqlite:userapi.db",
		"postgres://u:p%zz@h/db":                                      "<unparsable URL redacted>",
	}
	for in, want := range tests {
		if got := URL(in); got != want {
			t.Errorf("URL(%q) = %q, want %q", in, got, want)
		}
	}
}
