package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"hash/crc32"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
)

// APIKey assembles an API key of row id with secret in the documented
// format (docs/security.md), written here independently of the auth
// package so that tests check the format, not the code against itself:
// uak_<id>_<secret><CRC-32 IEEE of the rest, 6 base62 digits>.
func APIKey(id int64, secret string) string {
	const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	body := "uak_" + strconv.FormatInt(id, 10) + "_" + secret
	c := crc32.ChecksumIEEE([]byte(body))
	var sum [6]byte
	for i := 5; i >= 0; i-- {
		sum[i] = digits[c%62]
		c /= 62
	}
	return body + string(sum[:])
}

// IdP is an identity provider of a test's own: an RSA key whose public
// half is in PublicKeyFile (PEM), tokens for Issuer and Audience.
type IdP struct {
	Key           *rsa.PrivateKey
	KID           string // the key's id in JWKS and in tokens' headers; "" until Rotate
	PublicKeyPEM  []byte
	PublicKeyFile string
	Issuer        string
	Audience      string
}

// NewIdP makes an IdP with a 2048-bit RSA key.
func NewIdP(tb testing.TB) *IdP {
	tb.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		tb.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		tb.Fatal(err)
	}
	p := &IdP{
		Key:          key,
		PublicKeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}),
		Issuer:       "https://idp.example.test/",
		Audience:     "userapi",
	}
	p.PublicKeyFile = filepath.Join(tb.TempDir(), "idp.pem")
	if err := os.WriteFile(p.PublicKeyFile, p.PublicKeyPEM, 0o600); err != nil {
		tb.Fatal(err)
	}
	return p
}

// Claims are a token's claims; Token fills iss, aud, sub and exp (an hour
// ahead) unless set. A nil value removes the claim.
type Claims map[string]any

func (p *IdP) claims(c Claims) map[string]any {
	out := map[string]any{
		"iss": p.Issuer,
		"aud": p.Audience,
		"sub": "user-1",
		"exp": time.Now().Add(time.Hour).Unix(),
	}
	for k, v := range c {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = v
		}
	}
	return out
}

// Token is an RS256 token signed by the IdP's key.
func (p *IdP) Token(tb testing.TB, c Claims) string {
	tb.Helper()
	b := jwt.NewBuilder()
	for k, v := range p.claims(c) {
		if k == "exp" {
			v = time.Unix(v.(int64), 0)
		}
		b = b.Claim(k, v)
	}
	tok, err := b.Build()
	if err != nil {
		tb.Fatal(err)
	}
	var key any = p.Key
	if p.KID != "" {
		k, err := jwk.Import(p.Key)
		if err != nil {
			tb.Fatal(err)
		}
		if err := k.Set(jwk.KeyIDKey, p.KID); err != nil {
			tb.Fatal(err)
		}
		key = k // jws writes its kid into the header
	}
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.RS256(), key))
	if err != nil {
		tb.Fatal(err)
	}
	return string(signed)
}

// Rotate gives the IdP a new key named kid, as a provider rotating its
// signing key does: Token signs with it from then on.
func (p *IdP) Rotate(tb testing.TB, kid string) {
	tb.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		tb.Fatal(err)
	}
	p.Key, p.KID = key, kid
}

// JWKS is the JSON Web Key Set a provider publishes: the public half of
// the current key, with its kid and algorithm.
func (p *IdP) JWKS(tb testing.TB) []byte {
	tb.Helper()
	k, err := jwk.Import(&p.Key.PublicKey)
	if err != nil {
		tb.Fatal(err)
	}
	for name, v := range map[string]any{jwk.KeyIDKey: p.KID, jwk.AlgorithmKey: jwa.RS256(), jwk.KeyUsageKey: "sig"} {
		if err := k.Set(name, v); err != nil {
			tb.Fatal(err)
		}
	}
	set := jwk.NewSet()
	if err := set.AddKey(k); err != nil {
		tb.Fatal(err)
	}
	b, err := json.Marshal(set)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// OtherKeyToken is an ES256 token with the IdP's claims signed by a key
// the service does not trust.
func (p *IdP) OtherKeyToken(tb testing.TB, c Claims) string {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	b := jwt.NewBuilder()
	for k, v := range p.claims(c) {
		if k == "exp" {
			v = time.Unix(v.(int64), 0)
		}
		b = b.Claim(k, v)
	}
	tok, _ := b.Build()
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.ES256(), key))
	if err != nil {
		tb.Fatal(err)
	}
	return string(signed)
}

// NoneToken is an unsigned token ("alg": "none") with the IdP's claims.
func (p *IdP) NoneToken(tb testing.TB, c Claims) string {
	return compact(tb, `{"alg":"none","typ":"JWT"}`, p.claims(c), nil)
}

// HS256PublicKeyToken is the algorithm-confusion attack: an HS256 token
// whose HMAC secret is the IdP's public key, which a verifier that takes
// the algorithm from the token would accept.
func (p *IdP) HS256PublicKeyToken(tb testing.TB, c Claims) string {
	return compact(tb, `{"alg":"HS256","typ":"JWT"}`, p.claims(c), p.PublicKeyPEM)
}

// compact builds header.payload.signature by hand; hmacKey nil leaves the
// signature empty.
func compact(tb testing.TB, header string, claims map[string]any, hmacKey []byte) string {
	tb.Helper()
	payload, err := json.Marshal(claims)
	if err != nil {
		tb.Fatal(err)
	}
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString([]byte(header)) + "." + enc.EncodeToString(payload)
	sig := ""
	if hmacKey != nil {
		m := hmac.New(sha256.New, hmacKey)
		m.Write([]byte(signing))
		sig = enc.EncodeToString(m.Sum(nil))
	}
	return signing + "." + sig
}
