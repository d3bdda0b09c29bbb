// Package redact hides secrets in connection URLs before they are logged or
// written into reports.
package redact

import (
	"net/url"
	"strings"
)

// URL returns v with the password of its user part, and the value of every
// query parameter whose name contains "password", replaced by "xxxxx".
// Values that are not URLs are returned unchanged; a URL that does not
// parse is replaced whole, since it may hold a secret.
func URL(v string) string {
	if !strings.Contains(v, "://") {
		return v
	}
	u, err := url.Parse(v)
	if err != nil {
		return "<unparsable URL redacted>"
	}
	q := u.Query()
	changed := false
	for k := range q {
		if strings.Contains(strings.ToLower(k), "password") {
			q.Set(k, "xxxxx")
			changed = true
		}
	}
	if changed {
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}
