package auth

import (
	"strings"
	"testing"

	"userapi/internal/testenv"
)

func TestKeyFormat(t *testing.T) {
	secret := newSecret()
	key := formatKey(42, secret)
	if want := testenv.APIKey(42, string(secret)); key != want {
		t.Fatalf("formatKey = %q, the documented format gives %q", key, want)
	}
	id, got, ok := parseKey([]byte(key))
	if !ok || id != 42 || string(got) != string(secret) {
		t.Fatalf("parseKey(%q) = %d %q %v", key, id, got, ok)
	}
	if !LooksLikeKey(key) {
		t.Errorf("LooksLikeKey(%q) = false", key)
	}
	for name, bad := range map[string]string{
		"empty":          "",
		"prefix only":    "uak_",
		"other prefix":   "uax" + key[3:],
		"checksum":       key[:len(key)-1] + string(key[len(key)-1]^1),
		"secret changed": key[:10] + string(key[10]^1) + key[11:],
		"id changed":     strings.Replace(key, "uak_42_", "uak_43_", 1),
		"leading zero":   testenv.APIKey(0, string(secret)),
		"zero-padded id": strings.Replace(testenv.APIKey(42, string(secret)), "uak_42", "uak_042", 1),
		"short secret":   testenv.APIKey(42, string(secret[:31])),
		"long secret":    testenv.APIKey(42, string(secret)+"a"),
		"non-base62":     testenv.APIKey(42, strings.Repeat("-", 32)),
		"id overflow":    testenv.APIKey(1, string(secret))[:4] + "99999999999999999999" + testenv.APIKey(1, string(secret))[5:],
		"trailing space": key + " ",
		"no separator":   strings.Replace(key, "42_", "42", 1),
	} {
		if _, _, ok := parseKey([]byte(bad)); ok {
			t.Errorf("%s: parseKey(%q) accepted", name, bad)
		}
	}
}

func TestSecretsDiffer(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		s := string(newSecret())
		if len(s) != secretLen || seen[s] {
			t.Fatalf("secret %q: length %d or repeated", s, len(s))
		}
		for _, c := range []byte(s) {
			if base62Value[c] < 0 {
				t.Fatalf("secret %q has %q", s, c)
			}
		}
		seen[s] = true
	}
}

func TestParseAlgorithms(t *testing.T) {
	for list, ok := range map[string]bool{
		"":             true,
		"RS256":        true,
		"RS256, ES256": true,
		"PS512,EdDSA":  true,
		"none":         false,
		"HS256":        false,
		"RS256,HS512":  false,
		"RS257":        false,
	} {
		if _, err := parseAlgorithms(list); (err == nil) != ok {
			t.Errorf("parseAlgorithms(%q) = %v, want ok=%v", list, err, ok)
		}
	}
}

func FuzzParseKey(f *testing.F) {
	f.Add(formatKey(7, newSecret()))
	f.Add("uak_1_")
	f.Fuzz(func(t *testing.T, s string) {
		id, secret, ok := parseKey([]byte(s))
		if ok && (id <= 0 || len(secret) != secretLen || formatKey(id, secret) != s) {
			t.Errorf("parseKey(%q) = %d %q accepted a key formatKey does not make", s, id, secret)
		}
	})
}
