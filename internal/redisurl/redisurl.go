// Package redisurl turns the --redis URL into rueidis client options. One
// syntax names the three ways Redis is deployed:
//
//	redis://[user:password@]host:port[/db]          one server
//	redis://[user:password@]h1:p1,h2:p2,h3:p3        a Redis Cluster, by seed nodes
//	redis-sentinel://[user:password@]s1:p1,s2:p2/master[/db]
//	                                                 the master of a Sentinel-monitored set
//
// rediss:// and rediss-sentinel:// use TLS. A single address may also be a
// node of a cluster: the client asks it (CLUSTER SHARDS) and follows the
// whole cluster, so several seeds only help when one of them is down at
// start. Every query parameter rueidis.ParseURL knows is accepted (addr=,
// dial_timeout=, …); sentinel_username= and sentinel_password= authenticate
// to the sentinels, whose credentials may differ from the servers'. With
// TLS each server (seed, node, sentinel, master) is verified against the
// host it is dialled by, so a node announced by its IP address needs that
// address in its certificate; tls_server_name= verifies every one against
// that name instead (a certificate shared by the nodes, or a wildcard).
package redisurl

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Parse parses a Redis URL (see the package comment).
func Parse(s string) (rueidis.ClientOption, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return rueidis.ClientOption{}, fmt.Errorf("redis URL %q has no scheme (redis://, rediss://, redis-sentinel://)", s)
	}
	sentinel := false
	switch scheme {
	case "redis", "rediss", "unix":
	case "redis-sentinel", "rediss-sentinel":
		sentinel = true
		scheme = strings.TrimSuffix(scheme, "-sentinel")
	default:
		return rueidis.ClientOption{}, fmt.Errorf("redis URL scheme %q is not redis, rediss, redis-sentinel, rediss-sentinel or unix", scheme)
	}
	if scheme == "unix" {
		return rueidis.ParseURL(s)
	}
	// The host list ends at the first '/' or '?' after the user part.
	auth, hostsPath := "", rest
	if at := strings.LastIndex(rest[:endOfAuthority(rest)], "@"); at >= 0 {
		auth, hostsPath = rest[:at+1], rest[at+1:]
	}
	end := endOfAuthority(hostsPath)
	hosts, tail := hostsPath[:end], hostsPath[end:]
	path, query, _ := strings.Cut(tail, "?")
	var addrs []string
	for h := range strings.SplitSeq(hosts, ",") {
		if h = strings.TrimSpace(h); h == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(h); err != nil {
			port := "6379"
			if sentinel {
				port = "26379"
			}
			h = net.JoinHostPort(strings.Trim(h, "[]"), port)
		}
		addrs = append(addrs, h)
	}
	if len(addrs) == 0 {
		return rueidis.ClientOption{}, errors.New("redis URL names no host")
	}
	master := ""
	if sentinel {
		parts := strings.Split(strings.Trim(path, "/"), "/")
		if parts[0] == "" || len(parts) > 2 {
			return rueidis.ClientOption{}, fmt.Errorf("redis-sentinel URL path %q is not /<master set>[/<db>]", path)
		}
		master, path = parts[0], ""
		if len(parts) == 2 {
			path = "/" + parts[1]
		}
	}
	q, err := url.ParseQuery(query)
	if err != nil {
		return rueidis.ClientOption{}, fmt.Errorf("redis URL query: %w", err)
	}
	if sentinel && q.Has("master_set") {
		return rueidis.ClientOption{}, errors.New("redis-sentinel URL names its master set in the path, not master_set=")
	}
	for _, a := range addrs[1:] {
		q.Add("addr", a)
	}
	su, sp, tlsName := q.Get("sentinel_username"), q.Get("sentinel_password"), q.Get("tls_server_name")
	q.Del("sentinel_username")
	q.Del("sentinel_password")
	q.Del("tls_server_name")
	o, err := rueidis.ParseURL(scheme + "://" + auth + addrs[0] + path + "?" + q.Encode())
	if err != nil {
		return o, err
	}
	if o.TLSConfig != nil {
		// Every server is verified against the name it is dialled by: the
		// other seeds, the cluster's nodes and the master are learnt at
		// run time, and the first address's name is not theirs.
		o.TLSConfig.ServerName = tlsName
	}
	if sentinel {
		o.Sentinel.MasterSet = master
		o.Sentinel.Username, o.Sentinel.Password = su, sp
		o.Sentinel.TLSConfig = o.TLSConfig
	} else if o.Sentinel.MasterSet != "" {
		// rueidis's own spelling, redis://…?master_set=name: accepted.
		o.Sentinel.Username, o.Sentinel.Password = su, sp
	}
	return o, nil
}

// endOfAuthority is the index of the first '/' or '?' in s (len(s) if none).
func endOfAuthority(s string) int {
	if i := strings.IndexAny(s, "/?"); i >= 0 {
		return i
	}
	return len(s)
}

// Prepare sets what every client of the service needs on top of the URL's
// options: no client-side caching (the cache's local tier is its own) and
// no retries (a slow Redis is failed open to, not waited for), a one-second
// dial, a connection dropped after a second without an answer, and, behind
// Sentinel, the set's topology checked every second besides the
// sentinels' +switch-master events (a missed event would otherwise keep
// the client on a demoted master).
func Prepare(o *rueidis.ClientOption) {
	o.DisableCache = true
	o.DisableRetry = true
	o.Dialer.Timeout = timeoutDial
	o.ConnWriteTimeout = timeoutWrite
	if o.Sentinel.MasterSet != "" {
		o.Sentinel.Dialer.Timeout = timeoutDial
		o.Sentinel.TopologyRefreshInterval = topologyRefresh
	}
	// A cluster's slot map is refreshed whenever a node fails or answers
	// MOVED; also every second, so a failover that breaks no connection
	// of ours is followed too.
	o.ClusterOption.ShardsRefreshInterval = topologyRefresh
}

const (
	timeoutDial     = time.Second
	timeoutWrite    = time.Second
	topologyRefresh = time.Second
)
