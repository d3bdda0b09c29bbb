package userapi

import (
	"bytes"
	"strconv"
	"unicode/utf8"
)

// TimeLayout is how timestamps appear in JSON: RFC 3339 in UTC with exactly
// six fractional digits, matching the stored microsecond precision.
const TimeLayout = "2006-01-02T15:04:05.000000Z"

// AppendJSON appends the user's JSON representation to b and returns the
// extended buffer. It uses no reflection, so encoding into a reused buffer
// allocates nothing:
//
//	{"id":1,"email":"a@example.com","name":"Ada","created_at":"…","updated_at":"…","version":1}
func (u *User) AppendJSON(b []byte) []byte {
	b = append(b, `{"id":`...)
	b = strconv.AppendInt(b, u.ID, 10)
	b = append(b, `,"email":`...)
	b = AppendJSONString(b, u.Email)
	b = append(b, `,"name":`...)
	b = AppendJSONString(b, u.Name)
	b = append(b, `,"created_at":"`...)
	b = u.CreatedAt.UTC().AppendFormat(b, TimeLayout)
	b = append(b, `","updated_at":"`...)
	b = u.UpdatedAt.UTC().AppendFormat(b, TimeLayout)
	b = append(b, `","version":`...)
	b = strconv.AppendInt(b, u.Version, 10)
	return append(b, '}')
}

// Encode returns the user encoded once, for caching. The JSON is encoded
// into a stack buffer and copied out at its exact size: appending to nil
// would leave up to half of a cached entry's bytes as unused capacity.
func (u *User) Encode() Encoded {
	var buf [512]byte
	return Encoded{ID: u.ID, Version: u.Version, JSON: bytes.Clone(u.AppendJSON(buf[:0]))}
}

const hexDigits = "0123456789abcdef"

// AppendJSONString appends s as a JSON string literal, escaping quotes,
// backslashes, control characters, U+2028 and U+2029, and replacing invalid
// UTF-8 with U+FFFD, as encoding/json does.
func AppendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
