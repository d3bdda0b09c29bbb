package redisurl

import (
	"slices"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		url      string
		addrs    []string
		master   string
		db       int
		user, pw string
		spw      string
		tls      bool
		tlsName  string // the name every server is verified against ("": the one it is dialled by)
	}{
		{url: "redis://127.0.0.1:6379/0", addrs: []string{"127.0.0.1:6379"}},
		{url: "redis://h:7/3", addrs: []string{"h:7"}, db: 3},
		{url: "redis://:pw@h1:7100,h2:7101,h3/0", addrs: []string{"h1:7100", "h2:7101", "h3:6379"}, pw: "pw"},
		{url: "redis://h1:7100?addr=h2:7101", addrs: []string{"h1:7100", "h2:7101"}},
		{url: "rediss://u:p@h1:7100,h2:7101", addrs: []string{"h1:7100", "h2:7101"}, user: "u", pw: "p", tls: true},
		{url: "redis-sentinel://127.0.0.1:26400,127.0.0.1:26401/mymaster", addrs: []string{"127.0.0.1:26400", "127.0.0.1:26401"}, master: "mymaster"},
		{url: "redis-sentinel://:pw@s1:26379/set/2?sentinel_password=spw", addrs: []string{"s1:26379"}, master: "set", db: 2, pw: "pw", spw: "spw"},
		{url: "rediss-sentinel://s1:26379,s2:26379/set", addrs: []string{"s1:26379", "s2:26379"}, master: "set", tls: true},
		{url: "rediss://h1:7100?tls_server_name=redis.internal", addrs: []string{"h1:7100"}, tls: true, tlsName: "redis.internal"},
		{url: "rediss-sentinel://s1,s2/set?tls_server_name=redis.internal", addrs: []string{"s1:26379", "s2:26379"}, master: "set", tls: true, tlsName: "redis.internal"},
		{url: "redis://s1:26379?addr=s2:26379&master_set=set", addrs: []string{"s1:26379", "s2:26379"}, master: "set"},
	}
	for _, tt := range tests {
		o, err := Parse(tt.url)
		if err != nil {
			t.Errorf("Parse(%q): %v", tt.url, err)
			continue
		}
		if !slices.Equal(o.InitAddress, tt.addrs) || o.Sentinel.MasterSet != tt.master || o.SelectDB != tt.db ||
			o.Username != tt.user || o.Password != tt.pw || o.Sentinel.Password != tt.spw || (o.TLSConfig != nil) != tt.tls {
			t.Errorf("Parse(%q) = addrs %v master %q db %d user %q pw %q sentinel pw %q tls %v", tt.url,
				o.InitAddress, o.Sentinel.MasterSet, o.SelectDB, o.Username, o.Password, o.Sentinel.Password, o.TLSConfig != nil)
		}
		if tt.tls && (o.TLSConfig.ServerName != tt.tlsName || tt.master != "" && o.Sentinel.TLSConfig == nil) {
			t.Errorf("Parse(%q): sentinel TLS %v, server name %q, want %q", tt.url, o.Sentinel.TLSConfig != nil, o.TLSConfig.ServerName, tt.tlsName)
		}
	}
	for _, bad := range []string{
		"", "127.0.0.1:6379", "http://h", "redis://", "redis-sentinel://h:26379", "redis-sentinel://h:26379/",
		"redis-sentinel://h:26379/a/b/c", "redis-sentinel://h/set?master_set=x", "redis://h/x", "redis://h/0/1",
	} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
}
