package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"hash/crc32"
	"strconv"
)

// An API key reads
//
//	uak_<id>_<secret><checksum>
//
// uak_ ("userapi key") makes a key recognisable, to people and to secret
// scanners. id is the key's row id in decimal, so the service finds the row
// without an index on the secret and names the caller "key:<id>". secret is
// 32 base62 characters from crypto/rand (190 bits: beyond guessing, so a
// fast unsalted SHA-256 is the right hash to store). checksum is the CRC-32
// (IEEE) of everything before it in 6 base62 characters, so a leaked key
// can be told from random text without a database lookup, and a mistyped
// one is refused before any lookup.
const (
	KeyPrefix     = "uak_"
	secretLen     = 32
	checksumLen   = 6
	maxKeyIDLen   = 19 // digits of the largest int64
	maxKeyLen     = len(KeyPrefix) + maxKeyIDLen + 1 + secretLen + checksumLen
	base62Digits  = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	base62Base    = uint32(len(base62Digits))
	maxUnbiasedIn = 256 - 256%62 // bytes at or above it would bias the draw
)

// newSecret returns a fresh random secret of secretLen base62 characters.
func newSecret() []byte {
	out := make([]byte, 0, secretLen)
	var buf [64]byte
	for len(out) < secretLen {
		rand.Read(buf[:]) // never fails (crypto/rand panics instead)
		for _, b := range buf {
			if b < maxUnbiasedIn && len(out) < secretLen {
				out = append(out, base62Digits[b%62])
			}
		}
	}
	return out
}

// formatKey assembles the key of row id with secret.
func formatKey(id int64, secret []byte) string {
	b := make([]byte, 0, maxKeyLen)
	b = append(b, KeyPrefix...)
	b = strconv.AppendInt(b, id, 10)
	b = append(b, '_')
	b = append(b, secret...)
	b = appendChecksum(b, crc32.ChecksumIEEE(b))
	return string(b)
}

// appendChecksum appends c as checksumLen base62 digits, most significant
// first (62^6 > 2^32, so six always suffice).
func appendChecksum(b []byte, c uint32) []byte {
	var d [checksumLen]byte
	for i := checksumLen - 1; i >= 0; i-- {
		d[i] = base62Digits[c%base62Base]
		c /= base62Base
	}
	return append(b, d[:]...)
}

// parseKey splits a key into its row id and secret. ok is false for
// anything that is not a well-formed key with a correct checksum. It does
// not allocate.
func parseKey(key []byte) (id int64, secret []byte, ok bool) {
	if len(key) > maxKeyLen || len(key) < len(KeyPrefix)+2+secretLen+checksumLen || string(key[:len(KeyPrefix)]) != KeyPrefix {
		return 0, nil, false
	}
	rest := key[len(KeyPrefix):]
	digits := 0
	for digits < len(rest) && '0' <= rest[digits] && rest[digits] <= '9' {
		digits++
	}
	if digits == 0 || digits > maxKeyIDLen || rest[0] == '0' || digits >= len(rest) || rest[digits] != '_' {
		return 0, nil, false
	}
	for _, c := range rest[:digits] {
		d := int64(c - '0')
		if id > (1<<63-1-d)/10 {
			return 0, nil, false // overflows int64
		}
		id = id*10 + d
	}
	tail := rest[digits+1:]
	if len(tail) != secretLen+checksumLen {
		return 0, nil, false
	}
	for _, c := range tail[:secretLen] {
		if base62Value[c] < 0 {
			return 0, nil, false
		}
	}
	// The checksum digits, decoded (62^6 exceeds 2^32: a value that does
	// not fit is not a checksum).
	var sum uint64
	for _, c := range tail[secretLen:] {
		v := base62Value[c]
		if v < 0 {
			return 0, nil, false
		}
		sum = sum*uint64(base62Base) + uint64(v)
	}
	if sum != uint64(crc32.ChecksumIEEE(key[:len(key)-checksumLen])) {
		return 0, nil, false
	}
	return id, tail[:secretLen], true
}

// base62Value is each byte's base62 digit value, -1 for other bytes.
var base62Value = func() (t [256]int8) {
	for i := range t {
		t[i] = -1
	}
	for i := range len(base62Digits) {
		t[base62Digits[i]] = int8(i)
	}
	return t
}()

// hashSecret is what the api_keys table stores of a key.
func hashSecret(secret []byte) [sha256.Size]byte { return sha256.Sum256(secret) }

// LooksLikeKey reports whether s is a well-formed API key with a correct
// checksum, without a database lookup: what a secret scanner checks.
func LooksLikeKey(s string) bool {
	_, _, ok := parseKey([]byte(s))
	return ok
}
