// Package cluster holds the end-to-end tests of the scaled-out deployment:
// scripts/cluster starts three userapi instances on loopback ports behind
// nginx with the configuration in deploy/nginx, and the tests drive mixed
// load through nginx while instances are killed (SIGKILL) or restarted one
// by one (SIGTERM), then check that no request failed, no acknowledged write
// was lost, retried creates with an Idempotency-Key made exactly one user,
// and every instance's cache agrees with the database.
//
// The tests run when USERAPI_TEST_POSTGRES_URL and USERAPI_TEST_REDIS_URL
// are set, and fail when either server cannot be reached or nginx can be
// neither found nor installed (USERAPI_TEST_NGINX names the binary). Each
// test gets its own PostgreSQL database and its own redis-server on a free
// port, so parallel runs never share data; with USERAPI_TEST_REDIS_SERVER
// one test runs the instances over a Redis Cluster of its own (ports
// 7130-7135) and kills a master. The package has no non-test code.
package cluster
