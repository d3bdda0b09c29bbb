package http

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"unicode/utf8"

	"github.com/valyala/fasthttp"

	"userapi"
)

// parseID parses a positive decimal int64 without allocating. Leading
// zeros are allowed; signs, spaces and anything else are not.
func parseID(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 19 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := int64(c - '0')
		if n > (math.MaxInt64-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, n > 0
}

// Media types.
var (
	contentTypeJSON = []byte("application/json")
	mediaJSON       = []byte("application/json")
	mediaMergePatch = []byte("application/merge-patch+json")
)

// checkContentType returns a 415 problem unless the request's media type
// is one of accepted (compared without case, parameters ignored except a
// charset, which must be UTF-8: JSON has no other encoding).
func checkContentType(rc *fasthttp.RequestCtx, accepted ...[]byte) error {
	ct := rc.Request.Header.ContentType()
	media, params, _ := bytes.Cut(ct, []byte{';'})
	media = bytes.TrimSpace(media)
	ok := false
	for _, a := range accepted {
		if bytes.EqualFold(media, a) {
			ok = true
			break
		}
	}
	if ok {
		for p := range bytes.SplitSeq(params, []byte{';'}) {
			k, v, _ := bytes.Cut(p, []byte{'='})
			if bytes.EqualFold(bytes.TrimSpace(k), []byte("charset")) {
				v = bytes.Trim(bytes.TrimSpace(v), `"`)
				if !bytes.EqualFold(v, []byte("utf-8")) {
					ok = false
				}
			}
		}
	}
	if ok {
		return nil
	}
	want := string(accepted[0])
	for _, a := range accepted[1:] {
		want += " or " + string(a)
	}
	return &problem{
		Status: fasthttp.StatusUnsupportedMediaType,
		Detail: "The request body must be " + want + " (UTF-8).",
	}
}

// requestBody returns the body, or a 413 problem when it is over the limit
// (fasthttp.Server refuses those before reading; this catches other
// servers running Handler).
func (s *Server) requestBody(rc *fasthttp.RequestCtx) ([]byte, error) {
	body := rc.PostBody()
	if len(body) > s.opts.MaxBodyBytes {
		p := tooLarge(s.opts.MaxBodyBytes)
		return nil, &p
	}
	return body, nil
}

// userFields is a decoded user body: each field is absent, null, or a
// string.
type userFields struct {
	email, name         string
	hasEmail, hasName   bool // present in the body
	nullEmail, nullName bool // present as null
}

// decodeUserFields strictly decodes a JSON object with the optional string
// members "email" and "name". Anything else — malformed JSON, a value
// that is not an object, unknown or duplicate members (names match
// exactly, unlike encoding/json's case-insensitive matching), a non-string
// value, trailing data — is a 400 problem. null is reported as such; the
// handlers decide whether it is allowed (a 422 when not).
func decodeUserFields(body []byte) (userFields, error) {
	var f userFields
	if err := checkText(body); err != nil {
		return f, err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber() // so numbers are tokens, not float conversions
	tok, err := dec.Token()
	if err != nil {
		return f, malformed(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return f, badRequest("body", "must be a JSON object")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return f, malformed(err)
		}
		key, _ := tok.(string) // inside an object Token only returns strings here
		var val *string
		var has, isNull *bool
		switch key {
		case "email":
			val, has, isNull = &f.email, &f.hasEmail, &f.nullEmail
		case "name":
			val, has, isNull = &f.name, &f.hasName, &f.nullName
		default:
			return f, badRequest(key, "is not a known field")
		}
		if *has {
			return f, badRequest(key, "appears more than once")
		}
		*has = true
		tok, err = dec.Token()
		if err != nil {
			return f, malformed(err)
		}
		switch v := tok.(type) {
		case string:
			*val = v
		case nil:
			*isNull = true
		default:
			return f, badRequest(key, "must be a string")
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return f, malformed(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return f, badRequest("body", "must hold one JSON object and nothing after it")
	}
	return f, nil
}

// checkText returns a 400 problem unless body is valid UTF-8 whose \u
// escapes stand for Unicode characters: a high surrogate escape
// (\ud800-\udbff) directly followed by a low one (\udc00-\udfff), never
// either alone. encoding/json accepts both faults and decodes them as
// U+FFFD, which would store a replacement character in place of what the
// client sent; RFC 8259 §8.1 requires UTF-8 and RFC 7493 §2.1 forbids
// the lone escapes. It assumes nothing else about the JSON: a backslash
// outside a string is the decoder's syntax error to report.
func checkText(body []byte) error {
	if !utf8.Valid(body) {
		return badRequest("body", "is not valid UTF-8")
	}
	for i := bytes.IndexByte(body, '\\'); i >= 0; i = bytes.IndexByte(body, '\\') {
		body = body[i+1:]
		if len(body) == 0 || body[0] != 'u' {
			if len(body) > 0 {
				body = body[1:] // an escaped character, maybe a backslash
			}
			continue
		}
		r, ok := hex4(body[1:])
		if !ok {
			continue // malformed: the decoder reports it
		}
		body = body[5:]
		switch {
		case r >= 0xdc00 && r <= 0xdfff:
			return loneSurrogate()
		case r >= 0xd800 && r <= 0xdbff:
			if len(body) < 6 || body[0] != '\\' || body[1] != 'u' {
				return loneSurrogate()
			}
			if low, ok := hex4(body[2:]); !ok || low < 0xdc00 || low > 0xdfff {
				return loneSurrogate()
			}
			body = body[6:]
		}
	}
	return nil
}

func loneSurrogate() error {
	return badRequest("body", `has a \u escape of a lone UTF-16 surrogate, which is not a character`)
}

// hex4 parses the four hex digits that follow \u.
func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c -= 'a' - 10
		case c >= 'A' && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	return r, true
}

func malformed(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return badRequest("body", "must be a complete JSON object")
	}
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return badRequest("body", "is not valid JSON: "+syn.Error())
	}
	return badRequest("body", "is not valid JSON")
}

// Entity tags. The service's ETag for a user is its version in quotes,
// `"3"`. A request tag is opaque-tag syntax per RFC 9110 §8.8.3.
type etag struct {
	version int64 // 0 when the tag is not a version of ours
	weak    bool
}

// parseETags parses an If-Match / If-None-Match value: "*" or a comma
// separated list of entity tags. ok is false for malformed syntax.
func parseETags(v []byte, visit func(etag)) (any bool, ok bool) {
	v = bytes.TrimSpace(v)
	if len(v) == 1 && v[0] == '*' {
		return true, true
	}
	seen := false
	for len(v) > 0 {
		var t etag
		if bytes.HasPrefix(v, []byte("W/")) {
			t.weak = true
			v = v[2:]
		}
		if len(v) < 2 || v[0] != '"' {
			return false, false
		}
		end := bytes.IndexByte(v[1:], '"')
		if end < 0 {
			return false, false
		}
		opaque := v[1 : 1+end]
		v = v[2+end:]
		if n, isVersion := parseID(opaque); isVersion {
			t.version = n
		}
		visit(t)
		seen = true
		v = bytes.TrimLeft(v, " \t")
		if len(v) == 0 {
			break
		}
		if v[0] != ',' {
			return false, false
		}
		v = bytes.TrimLeft(v[1:], " \t,")
	}
	return false, seen
}

// noneMatch reports whether If-None-Match v matches version under the weak
// comparison RFC 9110 §13.1.2 prescribes for it. Malformed values match
// nothing, so the full response is sent. It does not allocate.
func noneMatch(v []byte, version int64) bool {
	v = bytes.TrimSpace(v)
	if len(v) == 1 && v[0] == '*' {
		return true
	}
	for len(v) > 0 {
		v = bytes.TrimPrefix(v, []byte("W/"))
		if len(v) < 2 || v[0] != '"' {
			return false
		}
		end := bytes.IndexByte(v[1:], '"')
		if end < 0 {
			return false
		}
		if n, ok := parseID(v[1 : 1+end]); ok && n == version {
			return true
		}
		v = bytes.TrimLeft(v[2+end:], " \t")
		if len(v) == 0 || v[0] != ',' {
			return false
		}
		v = bytes.TrimLeft(v[1:], " \t,")
	}
	return false
}

// Cursors are opaque to clients: base64url (no padding) of a format byte
// and the last id of the page, big-endian. The format byte lets a later
// version change the payload and still reject (400) or read old cursors.
const cursorFormat = 1

var cursorEncoding = base64.RawURLEncoding

func appendCursor(b []byte, lastID int64) []byte {
	var raw [9]byte
	raw[0] = cursorFormat
	binary.BigEndian.PutUint64(raw[1:], uint64(lastID))
	return cursorEncoding.AppendEncode(b, raw[:])
}

func parseCursor(s []byte) (afterID int64, ok bool) {
	var raw [9]byte
	if cursorEncoding.EncodedLen(len(raw)) != len(s) {
		return 0, false
	}
	n, err := cursorEncoding.Decode(raw[:], s)
	if err != nil || n != len(raw) || raw[0] != cursorFormat {
		return 0, false
	}
	id := int64(binary.BigEndian.Uint64(raw[1:]))
	return id, id > 0
}

// parseLimit parses the limit query parameter: absent or empty means the
// default, otherwise a decimal in 1..MaxLimit.
func parseLimit(b []byte) (int, bool) {
	if len(b) == 0 {
		return userapi.DefaultLimit, true
	}
	n, ok := parseID(b)
	if !ok || n > userapi.MaxLimit {
		return 0, false
	}
	return int(n), true
}
