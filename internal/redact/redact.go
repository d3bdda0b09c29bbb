// Package redact hides secrets in connection URLs before they are logged,
// written into reports or shown on the debug listener.
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

// Flag returns the value of the flag name as it may be shown: "xxxxx" when
// the name says it is a secret (it contains "password", "secret" or
// "token", or ends in "key"), else the value with URL applied.
func Flag(name, value string) string {
	n := strings.ToLower(strings.TrimLeft(name, "-"))
	if value != "" && (strings.Contains(n, "password") || strings.Contains(n, "secret") || strings.Contains(n, "token") || strings.HasSuffix(n, "key")) {
		return "xxxxx"
	}
	return URL(value)
}

// Args returns a copy of a command line with Flag applied to the value of
// every flag (-name=value, or -name followed by its value) and URL to every
// other argument, so `--db postgres://u:pw@h/db` or `--redis=redis://:pw@h`
// is shown as the logged configuration shows it.
func Args(args []string) []string {
	out := make([]string, len(args))
	flag := "" // the flag whose value may come next
	for i, a := range args {
		if name, value, ok := strings.Cut(a, "="); ok && strings.HasPrefix(name, "-") {
			out[i], flag = name+"="+Flag(name, value), ""
			continue
		}
		if strings.HasPrefix(a, "-") {
			out[i], flag = a, a
			continue
		}
		out[i], flag = Flag(flag, a), ""
	}
	return out
}
