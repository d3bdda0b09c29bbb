package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"userapi/internal/testenv"
)

// Three `userapi serve` instances behind nginx over a Redis Cluster of the
// test's own (3 masters with a replica each, ports 7130-7135;
// USERAPI_TEST_REDIS_SERVER), under the fault tests' load; one master is
// killed with SIGKILL and its replica takes over. Not one request fails,
// nothing acknowledged is lost, and afterwards every instance serves what
// the database holds.
func TestRedisClusterMasterKilledUnderLoad(t *testing.T) {
	serverURLs(t)            // skips without PostgreSQL and Redis
	testenv.RedisBinaries(t) // skips without USERAPI_TEST_REDIS_SERVER
	rc := testenv.StartRedisCluster(t, 30, 3, 1)
	c := startClusterOn(t, 3, rc.URL(), nil)
	l := newLoad(t, c, loadWorkers, loadUsers)
	stop := l.start(loadPace)
	time.Sleep(1500 * time.Millisecond)
	victim := rc.MasterOf(t, "userapi:{s0.0}gen")
	victim.Kill()
	killed := time.Now()
	rc.WaitFailover(t, victim, 20*time.Second)
	t.Logf("master %d killed; its replica took over after %v", victim.Port, time.Since(killed).Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	stop()

	l.checkNoFailures(t)
	checkDatabase(t, c, l)
	checkCaches(t, c, l)

	// Every instance saw the failover as a restart of the killed master's
	// groups (docs/cache.md), and none fell back to one server's layout.
	for i := range c.addrs {
		b, err := os.ReadFile(filepath.Join(c.dir, fmt.Sprintf("instance-%d.log", i+1)))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "redis restarted, failed over or was restored") {
			t.Errorf("instance %d did not log the failover", i+1)
		}
		if strings.Contains(string(b), "CROSSSLOT") {
			t.Errorf("instance %d ran a cross-slot command", i+1)
		}
	}
}
