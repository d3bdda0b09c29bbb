package userapi

import (
	"net/mail"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Input limits of the data model.
const (
	MaxEmailBytes = 254
	MaxNameRunes  = 200
)

// NormalizeEmail checks that s is a bare RFC 5322 addr-spec (as net/mail
// parses it, with no display name or angle brackets) of at most 254 bytes,
// and returns it lower-cased.
func NormalizeEmail(s string) (string, error) {
	var v ValidationError
	// The limit applies to the stored, lower-cased form: lower-casing can
	// lengthen a string (U+023A Ⱥ is 2 bytes, ⱥ is 3).
	lower := strings.ToLower(s)
	switch {
	case s == "":
		v.add("email", "is required")
	case len(s) > MaxEmailBytes || len(lower) > MaxEmailBytes:
		v.add("email", "must be at most 254 bytes")
	default:
		addr, err := mail.ParseAddress(s)
		if err != nil || addr.Name != "" || addr.Address != s {
			v.add("email", "must be an email address such as ada@example.com")
		}
	}
	if err := v.orNil(); err != nil {
		return "", err
	}
	return lower, nil
}

// NormalizeName trims surrounding white space and checks that the rest is
// valid UTF-8 of 1..200 characters with no control characters.
func NormalizeName(s string) (string, error) {
	var v ValidationError
	s = strings.TrimSpace(s)
	switch n := utf8.RuneCountInString(s); {
	case !utf8.ValidString(s):
		v.add("name", "must be valid UTF-8")
	case n == 0:
		v.add("name", "is required")
	case n > MaxNameRunes:
		v.add("name", "must be at most 200 characters")
	case strings.IndexFunc(s, unicode.IsControl) >= 0:
		v.add("name", "must not contain control characters")
	}
	if err := v.orNil(); err != nil {
		return "", err
	}
	return s, nil
}

// Validate normalizes a create input in place and returns a
// *ValidationError listing every invalid field.
func (in *UserCreate) Validate() error {
	var v ValidationError
	var err error
	if in.Email, err = NormalizeEmail(in.Email); err != nil {
		v.Fields = append(v.Fields, err.(*ValidationError).Fields...)
	}
	if in.Name, err = NormalizeName(in.Name); err != nil {
		v.Fields = append(v.Fields, err.(*ValidationError).Fields...)
	}
	if len(in.IdempotencyKey) > 255 {
		v.add("Idempotency-Key", "must be at most 255 bytes")
	}
	return v.orNil()
}

// Validate normalizes the fields that are set and returns a
// *ValidationError listing every invalid one.
func (upd *UserUpdate) Validate() error {
	var v ValidationError
	if upd.Email != nil {
		e, err := NormalizeEmail(*upd.Email)
		if err != nil {
			v.Fields = append(v.Fields, err.(*ValidationError).Fields...)
		}
		upd.Email = &e
	}
	if upd.Name != nil {
		n, err := NormalizeName(*upd.Name)
		if err != nil {
			v.Fields = append(v.Fields, err.(*ValidationError).Fields...)
		}
		upd.Name = &n
	}
	return v.orNil()
}
