package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"
)

// RedisServerEnv names the variable that enables the tests that build a
// Redis Cluster or a Sentinel-monitored set of their own: the path of
// redis-server (redis-cli is looked for beside it). Set but unusable, the
// tests fail.
const RedisServerEnv = "USERAPI_TEST_REDIS_SERVER"

// The loopback ports of those tests' servers: cluster nodes and
// Sentinel-monitored servers in 7100-7199, sentinels in 26400-26499.
const (
	ClusterPortBase  = 7100
	SentinelPortBase = 26400
)

// RedisBinaries returns the paths of redis-server and redis-cli from
// $USERAPI_TEST_REDIS_SERVER, skipping when it is unset and failing when
// it is set but either one does not run.
func RedisBinaries(tb testing.TB) (server, cli string) {
	tb.Helper()
	server = os.Getenv(RedisServerEnv)
	if server == "" {
		tb.Skipf("%s is not set; set it (e.g. /usr/bin/redis-server) to run the Redis Cluster and Sentinel tests", RedisServerEnv)
	}
	cli = filepath.Join(filepath.Dir(server), "redis-cli")
	for _, b := range []string{server, cli} {
		if out, err := exec.Command(b, "--version").CombinedOutput(); err != nil {
			tb.Fatalf("%s=%s is set but %s does not run: %v\n%s", RedisServerEnv, server, b, err, out)
		}
	}
	return server, cli
}

// Node is one redis-server process of a cluster or a Sentinel set.
type Node struct {
	tb   testing.TB
	Port int
	dir  string
	args []string
	cmd  *exec.Cmd
}

// Addr is the node's host:port.
func (n *Node) Addr() string { return "127.0.0.1:" + strconv.Itoa(n.Port) }

func startNode(tb testing.TB, server string, port int, dir string, args ...string) *Node {
	tb.Helper()
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 100*time.Millisecond); err == nil {
		c.Close()
		tb.Fatalf("port %d is taken (a server left over from an earlier run?): these tests use 7100-7199 and 26400-26499", port)
	}
	n := &Node{tb: tb, Port: port, dir: dir, args: args}
	n.cmd = exec.Command(server, args...)
	n.cmd.Dir = dir
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", server, err)
	}
	tb.Cleanup(n.Kill)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", n.Addr())
		if err == nil {
			c.Close()
			return n
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			tb.Fatalf("redis on %d did not start: %v\n%s", port, err, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Kill ends the node with SIGKILL, as a crash would, and waits for it.
func (n *Node) Kill() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Kill()
	n.cmd.Wait()
	n.cmd = nil
}

// Client is a client of the node alone (no cluster redirections).
func (n *Node) Client() (rueidis.Client, error) {
	return rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{n.Addr()}, DisableCache: true, ForceSingleClient: true})
}

// Do runs one command on the node and returns its reply as a string.
func (n *Node) Do(args ...string) (string, error) {
	c, err := n.Client()
	if err != nil {
		return "", err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res := c.Do(ctx, c.B().Arbitrary(args...).Build())
	if s, err := res.ToString(); err == nil {
		return s, nil
	}
	if m, err := res.ToMessage(); err == nil && m.IsInt64() {
		i, _ := m.AsInt64()
		return strconv.FormatInt(i, 10), nil
	}
	return "", res.Error()
}

func nodeArgs(port int, dir string) []string {
	return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", dir, "--daemonize", "no", "--loglevel", "warning", "--logfile", filepath.Join(dir, "redis.log"),
		// A replica syncs at once, not after the default 5 s wait for
		// more replicas: one that never synced cannot take over.
		"--repl-diskless-sync-delay", "0"}
}

// RedisCluster is a Redis Cluster of the test's own.
type RedisCluster struct {
	Nodes []*Node
}

// StartRedisCluster starts masters*(1+replicas) cluster nodes on ports
// ClusterPortBase+first…, creates the cluster with redis-cli, and waits
// until every node sees it whole. A node is declared failed after 1 s
// without an answer, so a killed master's replica takes over within a few
// seconds.
func StartRedisCluster(tb testing.TB, first, masters, replicas int) *RedisCluster {
	tb.Helper()
	server, cli := RedisBinaries(tb)
	rc := &RedisCluster{}
	var addrs []string
	for i := range masters * (1 + replicas) {
		port := ClusterPortBase + first + i
		dir := tb.TempDir()
		args := append(nodeArgs(port, dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "1000")
		rc.Nodes = append(rc.Nodes, startNode(tb, server, port, dir, args...))
		addrs = append(addrs, rc.Nodes[i].Addr())
	}
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command(cli, args...).CombinedOutput(); err != nil {
		tb.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	rc.WaitHealthy(tb, 30*time.Second)
	// And every replica in sync, so any master can fail over.
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range rc.Nodes {
		for {
			info, err := n.Do("INFO", "replication")
			if err == nil && (strings.Contains(info, "role:master") || strings.Contains(info, "master_link_status:up")) {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("replica %d not in sync: %v %s", n.Port, err, info)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return rc
}

// URL is the cluster's redis:// URL with every node as a seed.
func (rc *RedisCluster) URL() string {
	var addrs []string
	for _, n := range rc.Nodes {
		addrs = append(addrs, n.Addr())
	}
	return "redis://" + strings.Join(addrs, ",")
}

// WaitHealthy waits until every running node reports cluster_state:ok
// with every slot served.
func (rc *RedisCluster) WaitHealthy(tb testing.TB, d time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for {
		bad := ""
		for _, n := range rc.Nodes {
			if n.cmd == nil {
				continue
			}
			info, err := n.Do("CLUSTER", "INFO")
			if err != nil || !strings.Contains(info, "cluster_state:ok") || !strings.Contains(info, "cluster_slots_ok:16384") {
				bad = fmt.Sprintf("node %d: %v %s", n.Port, err, info)
				break
			}
		}
		if bad == "" {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("cluster not healthy after %v: %s", d, bad)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitFailover waits until a replica of the killed node serves all its
// slots and the cluster is whole again.
func (rc *RedisCluster) WaitFailover(tb testing.TB, killed *Node, d time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for {
		served := false
		for _, n := range rc.Nodes {
			if n.cmd == nil {
				continue
			}
			nodes, err := n.Do("CLUSTER", "NODES")
			if err != nil {
				continue
			}
			for line := range strings.Lines(nodes) {
				f := strings.Fields(line)
				if len(f) > 8 && strings.HasPrefix(f[1], killed.Addr()+"@") && strings.Contains(f[2], "master") && !strings.Contains(f[2], "fail") {
					served = true // still the master of its slots, as far as n knows
				}
			}
		}
		if !served {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("no replica took over from %d within %v", killed.Port, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rc.WaitHealthy(tb, time.Until(deadline))
}

// ReplicaOf returns a running replica of master.
func (rc *RedisCluster) ReplicaOf(tb testing.TB, master *Node) *Node {
	tb.Helper()
	id, err := master.Do("CLUSTER", "MYID")
	if err != nil {
		tb.Fatal(err)
	}
	for _, n := range rc.Nodes {
		if n.cmd == nil || n == master {
			continue
		}
		info, err := n.Do("CLUSTER", "NODES")
		if err != nil {
			continue
		}
		for line := range strings.Lines(info) {
			f := strings.Fields(line)
			if len(f) > 3 && strings.Contains(f[2], "myself") && strings.Contains(f[2], "slave") && f[3] == id {
				return n
			}
		}
	}
	tb.Fatalf("no replica of %d", master.Port)
	return nil
}

// MasterOf returns the running node that is the master of key's slot.
func (rc *RedisCluster) MasterOf(tb testing.TB, key string) *Node {
	tb.Helper()
	for _, n := range rc.Nodes {
		if n.cmd == nil {
			continue
		}
		slot, err := n.Do("CLUSTER", "KEYSLOT", key)
		if err != nil {
			continue
		}
		c, err := n.Client()
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		shards, err := c.Do(ctx, c.B().ClusterSlots().Build()).ToArray()
		cancel()
		c.Close()
		if err != nil {
			continue
		}
		s, _ := strconv.ParseInt(slot, 10, 64)
		for _, r := range shards {
			v, err := r.ToArray()
			if err != nil || len(v) < 3 {
				continue
			}
			lo, _ := v[0].AsInt64()
			hi, _ := v[1].AsInt64()
			if s < lo || s > hi {
				continue
			}
			m, _ := v[2].ToArray()
			if len(m) < 2 {
				continue
			}
			port, _ := m[1].AsInt64()
			for _, cand := range rc.Nodes {
				if cand.Port == int(port) {
					return cand
				}
			}
		}
	}
	tb.Fatalf("no master found for %q", key)
	return nil
}

// SentinelSet is a master, its replicas and the sentinels that watch them,
// all of the test's own.
type SentinelSet struct {
	Name      string
	Servers   []*Node // Servers[0] starts as the master
	Sentinels []*Node
}

// StartSentinelSet starts a master on ClusterPortBase+first, replicas
// after it, and sentinels on SentinelPortBase+firstSentinel…, which
// declare the master down after 1 s without an answer and fail over with
// a quorum of two.
func StartSentinelSet(tb testing.TB, name string, first, replicas, firstSentinel, sentinels int) *SentinelSet {
	tb.Helper()
	server, _ := RedisBinaries(tb)
	ss := &SentinelSet{Name: name}
	master := ClusterPortBase + first
	for i := range 1 + replicas {
		port := master + i
		dir := tb.TempDir()
		args := nodeArgs(port, dir)
		if i > 0 {
			args = append(args, "--replicaof", "127.0.0.1", strconv.Itoa(master))
		}
		ss.Servers = append(ss.Servers, startNode(tb, server, port, dir, args...))
	}
	for i := range sentinels {
		port := SentinelPortBase + firstSentinel + i
		dir := tb.TempDir()
		conf := filepath.Join(dir, "sentinel.conf")
		body := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nlogfile %s\nsentinel monitor %s 127.0.0.1 %d 2\n"+
			"sentinel down-after-milliseconds %s 1000\nsentinel failover-timeout %s 5000\nsentinel parallel-syncs %s 1\n",
			port, dir, filepath.Join(dir, "redis.log"), name, master, name, name, name)
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			tb.Fatal(err)
		}
		ss.Sentinels = append(ss.Sentinels, startNode(tb, server, port, dir, conf, "--sentinel"))
	}
	// Wait until the replicas are in sync and every sentinel knows them.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok := true
		for _, r := range ss.Servers[1:] {
			info, err := r.Do("INFO", "replication")
			if err != nil || !strings.Contains(info, "master_link_status:up") {
				ok = false
			}
		}
		for _, s := range ss.Sentinels {
			info, err := s.Do("INFO", "sentinel")
			if err != nil || !strings.Contains(info, fmt.Sprintf("slaves=%d,sentinels=%d", replicas, sentinels)) {
				ok = false
			}
		}
		if ok {
			return ss
		}
		if time.Now().After(deadline) {
			tb.Fatal("sentinel set did not come up within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// URL is the set's redis-sentinel:// URL.
func (ss *SentinelSet) URL() string {
	var addrs []string
	for _, s := range ss.Sentinels {
		addrs = append(addrs, s.Addr())
	}
	return "redis-sentinel://" + strings.Join(addrs, ",") + "/" + ss.Name
}

// Master returns the port the sentinels name as the master now.
func (ss *SentinelSet) Master(tb testing.TB) int {
	tb.Helper()
	for _, s := range ss.Sentinels {
		if s.cmd == nil {
			continue
		}
		c, err := s.Client()
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		addr, err := c.Do(ctx, c.B().SentinelGetMasterAddrByName().Master(ss.Name).Build()).AsStrSlice()
		cancel()
		c.Close()
		if err == nil && len(addr) == 2 {
			p, _ := strconv.Atoi(addr[1])
			return p
		}
	}
	tb.Fatal("no sentinel answers")
	return 0
}
