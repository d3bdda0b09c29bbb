package userapi_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"userapi"
)

func TestAppendJSONMatchesEncodingJSON(t *testing.T) {
	names := []string{"Ada", `quote " back \ slash`, "tab\there", "\x01\x1f", "é ü 日本", "bad \xff utf8", "line\u2028sep\u2029", "<&>"}
	for _, name := range names {
		u := &userapi.User{ID: 42, Email: "a@example.com", Name: name,
			CreatedAt: time.Date(2026, 11, 25, 18, 50, 0, 123456000, time.UTC),
			UpdatedAt: time.Date(2026, 11, 25, 18, 50, 1, 0, time.UTC), Version: 3}
		b := u.AppendJSON(nil)
		var got map[string]any
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("AppendJSON(%q) = %s: not JSON: %v", name, b, err)
		}
		want := map[string]any{"id": 42.0, "email": "a@example.com", "name": strings.ToValidUTF8(name, "\ufffd"),
			"created_at": "2026-11-25T18:50:00.123456Z", "updated_at": "2026-11-25T18:50:01.000000Z", "version": 3.0}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("AppendJSON(%q) mismatch (-want +got):\n%s", name, diff)
		}
	}
}

func TestAppendJSONAllocs(t *testing.T) {
	u := &userapi.User{ID: 1, Email: "a@example.com", Name: "Ada", CreatedAt: time.Now(), UpdatedAt: time.Now(), Version: 1}
	buf := make([]byte, 0, 512)
	if n := testing.AllocsPerRun(100, func() { buf = u.AppendJSON(buf[:0]) }); n != 0 {
		t.Errorf("AppendJSON allocs = %v, want 0", n)
	}
}

func TestNormalizeEmail(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"Ada@Example.COM", "ada@example.com", true},
		{"a.b+c@x.io", "a.b+c@x.io", true},
		{"", "", false},
		{"no-at-sign", "", false},
		{"Ada <ada@example.com>", "", false},
		{" ada@example.com", "", false},
		{"a@b@c", "", false},
		{strings.Repeat("a", 250) + "@x.io", "", false},
		{strings.Repeat("Ⱥ", 124) + "@x.io", "", false}, // 253 bytes, 377 lower-cased
	}
	for _, tt := range tests {
		got, err := userapi.NormalizeEmail(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("NormalizeEmail(%q) = %q, %v; want %q, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
		var ve *userapi.ValidationError
		if err != nil && (!errors.As(err, &ve) || ve.Fields[0].Field != "email") {
			t.Errorf("NormalizeEmail(%q) error %v is not a field error on email", tt.in, err)
		}
	}
}

func TestNormalizeName(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"  Ada Lovelace ", "Ada Lovelace", true},
		{"日本", "日本", true},
		{strings.Repeat("é", 200), strings.Repeat("é", 200), true},
		{strings.Repeat("é", 201), "", false},
		{"   ", "", false},
		{"a\x00b", "", false},
		{"a\u0085b", "", false},
		{"\xff", "", false},
	}
	for _, tt := range tests {
		got, err := userapi.NormalizeName(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("NormalizeName(%q) = %q, %v; want %q, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestCreateValidateListsEveryField(t *testing.T) {
	in := userapi.UserCreate{Email: "bad", Name: ""}
	err := in.Validate()
	var ve *userapi.ValidationError
	if !errors.As(err, &ve) || len(ve.Fields) != 2 {
		t.Fatalf("Validate() = %v, want two field errors", err)
	}
}
