package main

// Tests of the deployment files under deploy/: the Kubernetes base against the
// service's flags, defaults and routes, and the Prometheus rules and the Grafana
// dashboard against the metrics the service registers. They live beside the
// flags so that they read every default from its one source (serveFlags), parse
// the pod's environment with the service's own parser, and probe the real
// service, instead of restating any value.
//
// External tools: kubectl (USERAPI_TEST_KUBECTL) and promtool
// (USERAPI_TEST_PROMTOOL). A test runs when its variable names the tool, and
// fails if the tool is missing then; with the variable unset it uses the tool
// on PATH, or skips.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	k8sjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"userapi/internal/testenv"
)

const deployDir = "../../deploy"

// externalTool returns the program a test needs: the one the environment
// variable env names (the test fails if it is not there), else name on PATH,
// else the test is skipped.
func externalTool(t *testing.T, env, name string) string {
	t.Helper()
	if p := os.Getenv(env); p != "" {
		path, err := exec.LookPath(p)
		if err != nil {
			t.Fatalf("%s=%s: %v", env, p, err)
		}
		return path
	}
	path, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not on PATH; set %s to run this test", name, env)
	}
	return path
}

func runTool(t *testing.T, dir, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", filepath.Base(name), strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out
}

// manifest is one object of a rendered kustomization, as JSON.
type manifest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	raw []byte
}

// kustomize renders dir with `kubectl kustomize` and returns its objects.
func kustomize(t *testing.T, dir string) []manifest {
	t.Helper()
	kubectl := externalTool(t, "USERAPI_TEST_KUBECTL", "kubectl")
	out := runTool(t, ".", kubectl, "kustomize", dir)
	var ms []manifest
	for _, doc := range regexp.MustCompile(`(?m)^---$`).Split(string(out), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		// Strict: a key given twice is an error, not the last one winning.
		raw, err := yaml.YAMLToJSONStrict([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v\n%s", dir, err, doc)
		}
		m := manifest{raw: raw}
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	return ms
}

// decodeStrict decodes m into a typed object as the API server does: keys
// match field names case-sensitively, and a field the type does not have (a
// typo, a field at the wrong level) or a field given twice is an error.
// (encoding/json would take "httpget" for "httpGet".)
func decodeStrict(t *testing.T, m manifest, into any) {
	t.Helper()
	strict, err := k8sjson.UnmarshalStrict(m.raw, into, k8sjson.DisallowUnknownFields, k8sjson.DisallowDuplicateFields)
	if err = errors.Join(append(strict, err)...); err != nil {
		t.Fatalf("%s %s: %v", m.Kind, m.Metadata.Name, err)
	}
}

// k8sBase is the rendered deploy/k8s, decoded.
type k8sBase struct {
	serviceAccount corev1.ServiceAccount
	configMaps     map[string]corev1.ConfigMap
	secrets        map[string]corev1.Secret
	service        corev1.Service
	deployment     appsv1.Deployment
	pdb            policyv1.PodDisruptionBudget
	hpa            autoscalingv2.HorizontalPodAutoscaler
	networkPolicy  networkingv1.NetworkPolicy
}

func loadBase(t *testing.T) *k8sBase {
	t.Helper()
	b := &k8sBase{configMaps: map[string]corev1.ConfigMap{}, secrets: map[string]corev1.Secret{}}
	// Each kind the base holds, its API version, and where it goes; the
	// singletons must appear exactly once.
	type kind struct {
		apiVersion string
		decode     func(manifest)
		singleton  bool
	}
	kinds := map[string]*kind{
		"ServiceAccount": {"v1", func(m manifest) { decodeStrict(t, m, &b.serviceAccount) }, true},
		"ConfigMap": {"v1", func(m manifest) {
			var cm corev1.ConfigMap
			decodeStrict(t, m, &cm)
			b.configMaps[cm.Name] = cm
		}, false},
		"Secret": {"v1", func(m manifest) {
			var s corev1.Secret
			decodeStrict(t, m, &s)
			b.secrets[s.Name] = s
		}, false},
		"Service":                 {"v1", func(m manifest) { decodeStrict(t, m, &b.service) }, true},
		"Deployment":              {"apps/v1", func(m manifest) { decodeStrict(t, m, &b.deployment) }, true},
		"PodDisruptionBudget":     {"policy/v1", func(m manifest) { decodeStrict(t, m, &b.pdb) }, true},
		"HorizontalPodAutoscaler": {"autoscaling/v2", func(m manifest) { decodeStrict(t, m, &b.hpa) }, true},
		"NetworkPolicy":           {"networking.k8s.io/v1", func(m manifest) { decodeStrict(t, m, &b.networkPolicy) }, true},
	}
	seen := map[string]int{}
	for _, m := range kustomize(t, filepath.Join(deployDir, "k8s")) {
		k, ok := kinds[m.Kind]
		if !ok {
			t.Fatalf("unexpected kind %s (%s) in the base; add it to this test", m.Kind, m.Metadata.Name)
		}
		if m.APIVersion != k.apiVersion {
			t.Errorf("%s %s: apiVersion %s, want %s", m.Kind, m.Metadata.Name, m.APIVersion, k.apiVersion)
		}
		k.decode(m)
		seen[m.Kind]++
	}
	for name, k := range kinds {
		if k.singleton && seen[name] != 1 {
			t.Errorf("the base has %d %s objects, want 1", seen[name], name)
		}
	}
	return b
}

// container returns the pod's only container.
func (b *k8sBase) container(t *testing.T) corev1.Container {
	t.Helper()
	cs := b.deployment.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		t.Fatalf("the pod has %d containers, want 1", len(cs))
	}
	return cs[0]
}

// env is the container's environment as the kubelet builds it: the envFrom
// sources in order, then env, each later one winning.
func (b *k8sBase) env(t *testing.T, c corev1.Container) map[string]string {
	t.Helper()
	env := map[string]string{}
	configMap := func(name string) map[string]string {
		cm, ok := b.configMaps[name]
		if !ok {
			t.Fatalf("container refers to ConfigMap %q, which the base does not define", name)
		}
		return cm.Data
	}
	secret := func(name string) map[string]string {
		s, ok := b.secrets[name]
		if !ok {
			t.Fatalf("container refers to Secret %q, which the base does not define", name)
		}
		data := map[string]string{}
		for k, v := range s.Data {
			data[k] = string(v)
		}
		for k, v := range s.StringData { // the API server merges stringData over data
			data[k] = v
		}
		return data
	}
	for _, from := range c.EnvFrom {
		var data map[string]string
		switch {
		case from.ConfigMapRef != nil:
			data = configMap(from.ConfigMapRef.Name)
		case from.SecretRef != nil:
			data = secret(from.SecretRef.Name)
		default:
			t.Fatalf("envFrom source %+v is not handled by this test", from)
		}
		for k, v := range data {
			env[from.Prefix+k] = v
		}
	}
	for _, e := range c.Env {
		v := e.Value
		switch {
		case e.ValueFrom == nil:
		case e.ValueFrom.ConfigMapKeyRef != nil:
			v = configMap(e.ValueFrom.ConfigMapKeyRef.Name)[e.ValueFrom.ConfigMapKeyRef.Key]
		case e.ValueFrom.SecretKeyRef != nil:
			v = secret(e.ValueFrom.SecretKeyRef.Name)[e.ValueFrom.SecretKeyRef.Key]
		default:
			t.Fatalf("env %s: valueFrom %+v is not handled by this test", e.Name, e.ValueFrom)
		}
		env[e.Name] = v
	}
	return env
}

// podConfig is the configuration `userapi serve` ends up with in the pod:
// the container's arguments and environment through the service's own flag
// set and parser, defaults included. Every USERAPI_* variable must name a
// flag: the service ignores one that does not, so a misspelt name would
// silently leave the default.
func podConfig(t *testing.T, args []string, env map[string]string) config {
	t.Helper()
	if len(args) == 0 || args[0] != "serve" {
		t.Fatalf("container args %q, want serve first (the image's entrypoint is the userapi binary)", args)
	}
	var c config
	fs := newFlagSet("serve", io.Discard)
	c.serveFlags(fs)
	if err := parseArgs(fs, args[1:], func(k string) string { return env[k] }); err != nil {
		t.Fatalf("the pod's configuration does not parse: %v", err)
	}
	for k := range env {
		name, ok := strings.CutPrefix(k, envPrefix)
		if !ok {
			continue
		}
		if fs.Lookup(strings.ToLower(strings.ReplaceAll(name, "_", "-"))) == nil {
			t.Errorf("%s names no flag of userapi serve", k)
		}
	}
	return c
}

func addrPort(t *testing.T, flag, addr string) int32 {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("--%s %q: %v", flag, addr, err)
	}
	n, err := strconv.ParseInt(port, 10, 32)
	if err != nil || n == 0 {
		t.Fatalf("--%s %q: a pod needs a fixed port", flag, addr)
	}
	return int32(n)
}

// containerPort resolves a port given by name or number against the
// container's declared ports.
func containerPort(t *testing.T, c corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
			return cp.ContainerPort
		}
	}
	t.Fatalf("port %s is not a port of container %s", p.String(), c.Name)
	return 0
}

func selects(t *testing.T, sel *metav1.LabelSelector, podLabels map[string]string) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Fatal(err)
	}
	return !s.Empty() && s.Matches(labels.Set(podLabels))
}

// TestKubernetesBase renders deploy/k8s and checks it against the service:
// the pod's configuration parses, probes and ports point at the listeners the
// configuration opens, the shutdown timing and the memory figures fit the
// service's own values, and the objects refer to each other correctly. Then it
// runs the service with the pod's environment and asks it the probes' paths.
func TestKubernetesBase(t *testing.T) {
	b := loadBase(t)
	ctr := b.container(t)
	env := b.env(t, ctr)
	c := podConfig(t, ctr.Args, env)
	pod := b.deployment.Spec.Template.Spec
	podLabels := b.deployment.Spec.Template.Labels
	apiPort := addrPort(t, "addr", c.Addr)
	if c.DebugAddr == "" {
		t.Fatal("--debug-addr is off in the pod: Prometheus has nothing to scrape")
	}
	metricsPort := addrPort(t, "debug-addr", c.DebugAddr)
	if got := containerPort(t, ctr, intstr.FromString("http")); got != apiPort {
		t.Errorf("container port http = %d, but --addr listens on %d", got, apiPort)
	}
	if got := containerPort(t, ctr, intstr.FromString("metrics")); got != metricsPort {
		t.Errorf("container port metrics = %d, but --debug-addr listens on %d", got, metricsPort)
	}

	t.Run("workload", func(t *testing.T) {
		d := b.deployment
		if d.Spec.Replicas != nil {
			t.Errorf("Deployment sets replicas %d; the HorizontalPodAutoscaler owns the count", *d.Spec.Replicas)
		}
		if !selects(t, d.Spec.Selector, podLabels) {
			t.Errorf("Deployment selector %v does not select its pods %v", d.Spec.Selector, podLabels)
		}
		if ru := d.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
			t.Errorf("rolling update %+v: want maxUnavailable 0, so a rollout never drops below the running count", ru)
		}
		if pod.ServiceAccountName != b.serviceAccount.Name {
			t.Errorf("pod runs as %q, the base's ServiceAccount is %q", pod.ServiceAccountName, b.serviceAccount.Name)
		}
		if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
			t.Error("pod mounts a service account token; the service never calls the Kubernetes API")
		}
		psc := pod.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
			t.Errorf("pod security context %+v: want runAsNonRoot and a non-zero runAsUser", psc)
		}
		if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Error("pod seccomp profile is not RuntimeDefault")
		}
		sc := ctr.SecurityContext
		switch {
		case sc == nil:
			t.Fatal("container has no security context")
		case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
			t.Error("container allows privilege escalation")
		case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
			t.Error("container root file system is writable")
		case sc.Privileged != nil && *sc.Privileged:
			t.Error("container is privileged")
		case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0:
			t.Errorf("container capabilities %+v: want drop ALL and none added", sc.Capabilities)
		}
		if ctr.Image == "" {
			t.Error("container has no image")
		}
	})

	t.Run("probes", func(t *testing.T) {
		probes := map[string]*corev1.Probe{"startup": ctr.StartupProbe, "readiness": ctr.ReadinessProbe, "liveness": ctr.LivenessProbe}
		for name, p := range probes {
			if p == nil || p.HTTPGet == nil {
				t.Fatalf("%s probe %+v: want an HTTP GET", name, p)
			}
			if got := containerPort(t, ctr, p.HTTPGet.Port); got != apiPort {
				t.Errorf("%s probe asks port %d; the health routes are on --addr, port %d", name, got, apiPort)
			}
		}
		// /readyz is a database round trip bounded by --db-timeout: a probe
		// timeout below it would turn a slow answer into a failure.
		for _, name := range []string{"startup", "readiness"} {
			if timeout := time.Duration(probes[name].TimeoutSeconds) * time.Second; timeout <= c.DBTimeout {
				t.Errorf("%s probe timeout %v is not above --db-timeout %v", name, timeout, c.DBTimeout)
			}
		}
		// Start-up may wait --db-wait for the database, then the service exits
		// by itself; the kubelet must not kill it sooner.
		sp := probes["startup"]
		if budget := time.Duration(sp.InitialDelaySeconds+sp.PeriodSeconds*sp.FailureThreshold) * time.Second; budget < c.DBWait {
			t.Errorf("startup probe gives up after %v, before --db-wait %v", budget, c.DBWait)
		}
	})

	t.Run("shutdown", func(t *testing.T) {
		// After SIGTERM the service is gone within --shutdown-timeout (the
		// drain delay runs inside that budget, see http.Server.Shutdown) plus
		// closing the cache and the pool, for which closeSlack is left. The
		// preStop hook runs before SIGTERM, inside the grace period.
		const closeSlack = 5 * time.Second
		ps := ctr.Lifecycle
		if ps == nil || ps.PreStop == nil || ps.PreStop.Sleep == nil {
			t.Fatal("no preStop sleep: without it SIGTERM can arrive before the endpoint has left every proxy (and the image has no shell for an exec hook)")
		}
		preStop := time.Duration(ps.PreStop.Sleep.Seconds) * time.Second
		if preStop <= 0 {
			t.Errorf("preStop sleep %v", preStop)
		}
		if pod.TerminationGracePeriodSeconds == nil {
			t.Fatal("no terminationGracePeriodSeconds")
		}
		grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
		if need := preStop + c.ShutdownTimeout + closeSlack; grace < need {
			t.Errorf("terminationGracePeriodSeconds %v < preStop %v + --shutdown-timeout %v + %v: the kubelet would SIGKILL a draining replica",
				grace, preStop, c.ShutdownTimeout, closeSlack)
		}
		if c.DrainDelay+c.RequestTimeout > c.ShutdownTimeout {
			t.Errorf("--drain-delay %v + --request-timeout %v > --shutdown-timeout %v: a request started as the drain ends could be cut off",
				c.DrainDelay, c.RequestTimeout, c.ShutdownTimeout)
		}
	})

	t.Run("memory", func(t *testing.T) {
		const specHeadroom = 64 << 20 // SPEC.md: resident within the cache budget plus 64 MiB
		limit := ctr.Resources.Limits.Memory().Value()
		if limit < c.CacheBytes+specHeadroom {
			t.Errorf("memory limit %d < --cache-bytes %d + 64 MiB", limit, c.CacheBytes)
		}
		if req := ctr.Resources.Requests.Memory().Value(); req < c.CacheBytes+specHeadroom {
			t.Errorf("memory request %d < --cache-bytes %d + 64 MiB: the scheduler would place a replica where it cannot grow to its bound", req, c.CacheBytes)
		}
		if ctr.Resources.Limits.Cpu().IsZero() {
			t.Error("no CPU limit: GOMAXPROCS, and with it the pool size and the loaders, would follow the node's cores")
		}
		s, ok := env["GOMEMLIMIT"]
		if !ok {
			t.Fatal("GOMEMLIMIT is not set in the pod")
		}
		soft, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("GOMEMLIMIT=%q: write it in plain bytes: %v", s, err)
		}
		if soft <= c.CacheBytes || soft > c.CacheBytes+specHeadroom {
			t.Errorf("GOMEMLIMIT %d is not above --cache-bytes %d and within its 64 MiB headroom", soft, c.CacheBytes)
		}
		if soft >= limit {
			t.Errorf("GOMEMLIMIT %d is not below the memory limit %d", soft, limit)
		}
	})

	t.Run("autoscaling", func(t *testing.T) {
		h := b.hpa.Spec
		if h.ScaleTargetRef.Kind != "Deployment" || h.ScaleTargetRef.Name != b.deployment.Name {
			t.Errorf("HPA scales %s %s, not the Deployment %s", h.ScaleTargetRef.Kind, h.ScaleTargetRef.Name, b.deployment.Name)
		}
		if h.MinReplicas == nil || *h.MinReplicas < 2 {
			t.Fatalf("HPA minReplicas %v: want at least 2, so one replica serves while the other is disrupted", h.MinReplicas)
		}
		if !selects(t, b.pdb.Spec.Selector, podLabels) {
			t.Errorf("PodDisruptionBudget selector %v does not select the pods", b.pdb.Spec.Selector)
		}
		mu := b.pdb.Spec.MaxUnavailable
		if mu == nil || mu.Type != intstr.Int || mu.IntVal < 1 || *h.MinReplicas-mu.IntVal < 1 {
			t.Errorf("PodDisruptionBudget maxUnavailable %v: want a count that leaves one of %d replicas serving", mu, *h.MinReplicas)
		}
		// Every replica holds up to --pool-size connections; during a rollout
		// maxSurge more run. PostgreSQL allows 100 by default; 10 stay for
		// migrations, the change stream's replication connection and
		// administration.
		if c.PoolSize <= 0 {
			t.Fatal("--pool-size is not set in the pod: it would follow GOMAXPROCS, and the connection budget could not be checked")
		}
		surge, err := intstr.GetScaledValueFromIntOrPercent(b.deployment.Spec.Strategy.RollingUpdate.MaxSurge, int(h.MaxReplicas), true)
		if err != nil {
			t.Fatal(err)
		}
		if conns := (int(h.MaxReplicas) + surge) * c.PoolSize; conns > 90 {
			t.Errorf("(maxReplicas %d + surge %d) x --pool-size %d = %d database connections, above 90 of PostgreSQL's default 100",
				h.MaxReplicas, surge, c.PoolSize, conns)
		}
	})

	t.Run("network", func(t *testing.T) {
		s := b.service.Spec
		if len(s.Selector) == 0 || !labels.SelectorFromSet(s.Selector).Matches(labels.Set(podLabels)) {
			t.Errorf("Service selector %v does not select the pods %v", s.Selector, podLabels)
		}
		for _, p := range s.Ports {
			if got := containerPort(t, ctr, p.TargetPort); got != apiPort {
				t.Errorf("Service port %s targets %d; only the API (%d) belongs on the Service", p.Name, got, apiPort)
			}
		}
		if len(s.Ports) == 0 {
			t.Error("Service has no port")
		}

		np := b.networkPolicy.Spec
		if !selects(t, &np.PodSelector, podLabels) {
			t.Errorf("NetworkPolicy selector %v does not select the pods", np.PodSelector)
		}
		if !slices.Contains(np.PolicyTypes, networkingv1.PolicyTypeIngress) || !slices.Contains(np.PolicyTypes, networkingv1.PolicyTypeEgress) {
			t.Errorf("NetworkPolicy types %v: want Ingress and Egress", np.PolicyTypes)
		}
		admits := func(ports []networkingv1.NetworkPolicyPort, port int32, proto corev1.Protocol) bool {
			if len(ports) == 0 {
				return true
			}
			for _, p := range ports {
				pp := corev1.ProtocolTCP
				if p.Protocol != nil {
					pp = *p.Protocol
				}
				if pp != proto || p.Port == nil {
					continue
				}
				if (p.Port.Type == intstr.String && containerPort(t, ctr, *p.Port) == port) || (p.Port.Type == intstr.Int && p.Port.IntVal == port) {
					return true
				}
			}
			return false
		}
		var apiOpen, metricsOpen, metricsRestricted bool
		for _, r := range np.Ingress {
			if admits(r.Ports, apiPort, corev1.ProtocolTCP) && len(r.From) == 0 {
				apiOpen = true
			}
			if admits(r.Ports, metricsPort, corev1.ProtocolTCP) {
				if len(r.From) == 0 {
					metricsOpen = true
				} else {
					metricsRestricted = true
				}
			}
		}
		if !apiOpen {
			t.Errorf("NetworkPolicy does not admit the API port %d", apiPort)
		}
		if metricsOpen || !metricsRestricted {
			t.Errorf("NetworkPolicy must admit the metrics port %d (pprof too) from named peers only", metricsPort)
		}
		egress := func(port int32, proto corev1.Protocol) bool {
			for _, r := range np.Egress {
				if admits(r.Ports, port, proto) {
					return true
				}
			}
			return false
		}
		if !egress(53, corev1.ProtocolUDP) {
			t.Error("NetworkPolicy blocks DNS")
		}
		defaults := map[string]int32{"postgres": 5432, "postgresql": 5432, "mysql": 3306, "redis": 6379, "rediss": 6379}
		for _, flag := range []string{c.DB, c.Redis} {
			u, err := url.Parse(flag)
			if err != nil || defaults[u.Scheme] == 0 {
				t.Errorf("pod URL %q is not a postgres, mysql or redis URL", flag)
				continue
			}
			port := defaults[u.Scheme]
			if p := u.Port(); p != "" {
				n, _ := strconv.Atoi(p)
				port = int32(n)
			}
			if !egress(port, corev1.ProtocolTCP) {
				t.Errorf("NetworkPolicy blocks %s port %d, which the pod's configuration uses", u.Scheme, port)
			}
		}
	})

	// The service itself, with the pod's environment (addresses and the
	// database overridden by flags, which win): the probes' paths answer as
	// their roles need, on a running and on a database-less service.
	annotations := b.deployment.Spec.Template.Annotations
	t.Run("live", func(t *testing.T) {
		if annotations["prometheus.io/scrape"] != "true" || annotations["prometheus.io/port"] != strconv.Itoa(int(metricsPort)) {
			t.Errorf("scrape annotations %v: want scrape true on the metrics port %d", annotations, metricsPort)
		}
		deadRedis := "redis://" + testenv.FreeAddr(t) + "/0"
		debug := testenv.FreeAddr(t)
		base, _, _ := startService(t, env, "--db", "sqlite:"+filepath.Join(t.TempDir(), "k8s.db"),
			"--redis", deadRedis, "--debug-addr", debug)
		for name, p := range map[string]*corev1.Probe{"startup": ctr.StartupProbe, "readiness": ctr.ReadinessProbe, "liveness": ctr.LivenessProbe} {
			if got := httpStatus(t, base+p.HTTPGet.Path); got != 200 {
				t.Errorf("%s probe GET %s on a ready service = %d, want 200", name, p.HTTPGet.Path, got)
			}
		}
		path := annotations["prometheus.io/path"]
		if body := httpBody(t, "http://"+debug+path); !strings.Contains(body, "userapi_http_requests_total") {
			t.Errorf("GET %s on the debug listener has no userapi_http_requests_total", path)
		}

		// Without its database the service must be live (a restart would not
		// help) and neither ready nor started.
		base = startWithoutDatabase(t, env, deadRedis, ctr.LivenessProbe.HTTPGet.Path)
		want := map[string]int{"startup": 503, "readiness": 503, "liveness": 200}
		for name, p := range map[string]*corev1.Probe{"startup": ctr.StartupProbe, "readiness": ctr.ReadinessProbe, "liveness": ctr.LivenessProbe} {
			if got := httpStatus(t, base+p.HTTPGet.Path); got != want[name] {
				t.Errorf("%s probe GET %s while the database is unreachable = %d, want %d", name, p.HTTPGet.Path, got, want[name])
			}
		}
	})
}

// TestKubernetesPodMonitor renders the base with the optional PodMonitor
// component and checks that it scrapes the pods' metrics port and path.
func TestKubernetesPodMonitor(t *testing.T) {
	var podMonitor struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ObjectMeta `json:"metadata"`
		Spec       struct {
			Selector            metav1.LabelSelector `json:"selector"`
			PodMetricsEndpoints []struct {
				Port     string `json:"port"`
				Path     string `json:"path"`
				Interval string `json:"interval"`
			} `json:"podMetricsEndpoints"`
		} `json:"spec"`
	}
	var dep appsv1.Deployment
	found := 0
	for _, m := range kustomize(t, "testdata/k8s-podmonitor") {
		switch m.Kind {
		case "PodMonitor":
			// Strict against the fields used here only: the operator's types
			// are not a dependency of this module.
			decodeStrict(t, m, &podMonitor)
			found++
		case "Deployment":
			decodeStrict(t, m, &dep)
		}
	}
	if found != 1 {
		t.Fatalf("%d PodMonitors rendered, want 1", found)
	}
	if podMonitor.APIVersion != "monitoring.coreos.com/v1" {
		t.Errorf("PodMonitor apiVersion %s", podMonitor.APIVersion)
	}
	if !selects(t, &podMonitor.Spec.Selector, dep.Spec.Template.Labels) {
		t.Errorf("PodMonitor selector %v does not select the pods", podMonitor.Spec.Selector)
	}
	ctr := dep.Spec.Template.Spec.Containers[0]
	annotations := dep.Spec.Template.Annotations
	for _, e := range podMonitor.Spec.PodMetricsEndpoints {
		if got := containerPort(t, ctr, intstr.FromString(e.Port)); strconv.Itoa(int(got)) != annotations["prometheus.io/port"] {
			t.Errorf("PodMonitor scrapes port %s (%d), the pods' metrics are on %s", e.Port, got, annotations["prometheus.io/port"])
		}
		if e.Path != annotations["prometheus.io/path"] {
			t.Errorf("PodMonitor scrapes %s, the pods serve metrics on %s", e.Path, annotations["prometheus.io/path"])
		}
	}
}

// startWithoutDatabase runs the service with env and an unreachable database
// (it keeps waiting for it) and returns its base URL once it answers HTTP on
// path.
func startWithoutDatabase(t *testing.T, env map[string]string, redis, path string) string {
	t.Helper()
	addr := testenv.FreeAddr(t)
	db := "postgres://postgres@" + testenv.FreeAddr(t) + "/x?sslmode=disable" // nothing listens there
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	logs := &testenv.Buffer{}
	go func() {
		done <- run(ctx, []string{"serve", "--addr", addr, "--db", db, "--redis", redis, "--debug-addr", "",
			"--db-wait", "1m", "--db-timeout", "200ms"}, func(k string) string { return env[k] }, logs, logs)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("service stopped with %v while waiting for its database", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("service did not stop while waiting for its database")
		}
	})
	base := "http://" + addr
	for range 250 {
		if resp, err := http.Get(base + path); err == nil {
			resp.Body.Close()
			return base
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("service without a database does not answer %s\n%s", path, logs)
	return ""
}

func httpStatus(t *testing.T, u string) int {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func httpBody(t *testing.T, u string) string {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s = %d %v", u, resp.StatusCode, err)
	}
	return string(b)
}

// ruleFile is deploy/prometheus/alerts.yml.
type ruleFile struct {
	Groups []struct {
		Name     string `json:"name"`
		Interval string `json:"interval,omitempty"`
		Rules    []struct {
			Record      string            `json:"record,omitempty"`
			Alert       string            `json:"alert,omitempty"`
			Expr        string            `json:"expr"`
			For         string            `json:"for,omitempty"`
			Labels      map[string]string `json:"labels,omitempty"`
			Annotations map[string]string `json:"annotations,omitempty"`
		} `json:"rules"`
	} `json:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "prometheus", "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.UnmarshalStrict(b, &rf); err != nil {
		t.Fatalf("alerts.yml: %v", err)
	}
	return rf
}

// dashboard is the part of deploy/grafana/userapi.json these tests read.
type dashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Datasource *grafanaDS      `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		ID         int        `json:"id"`
		Type       string     `json:"type"`
		Title      string     `json:"title"`
		Datasource *grafanaDS `json:"datasource"`
		GridPos    struct {
			H, W, X, Y int
		} `json:"gridPos"`
		Targets []struct {
			RefID      string     `json:"refId"`
			Expr       string     `json:"expr"`
			Datasource *grafanaDS `json:"datasource"`
		} `json:"targets"`
	} `json:"panels"`
}

type grafanaDS struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "grafana", "userapi.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("userapi.json: %v", err)
	}
	return d
}

// queries returns every PromQL expression of the dashboard, by where it is,
// with Grafana's variables replaced by values Prometheus accepts.
func (d dashboard) queries(t *testing.T) map[string]string {
	t.Helper()
	vars := strings.NewReplacer("$__rate_interval", "5m", "$job", ".*", "$instance", ".*")
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*\w+\)$`)
	qs := map[string]string{}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			t.Fatalf("variable %s: %v", v.Name, err)
		}
		m := labelValues.FindStringSubmatch(q.Query)
		if m == nil {
			t.Fatalf("variable %s: query %q is not label_values(selector, label)", v.Name, q.Query)
		}
		qs["variable_"+v.Name] = vars.Replace(m[1])
	}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			qs[fmt.Sprintf("panel_%d_%s", p.ID, tg.RefID)] = vars.Replace(tg.Expr)
		}
	}
	return qs
}

// TestGrafanaDashboard checks what makes the dashboard importable anywhere:
// every query goes through the data source variable, and the layout fits.
func TestGrafanaDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Error("dashboard needs a uid and a title")
	}
	var hasDS bool
	for _, v := range d.Templating.List {
		if v.Type == "datasource" && string(v.Query) == `"prometheus"` && v.Name == "datasource" {
			hasDS = true
		}
		if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != "${datasource}") {
			t.Errorf("variable %s does not query through ${datasource}", v.Name)
		}
	}
	if !hasDS {
		t.Fatal("no Prometheus data source variable named datasource")
	}
	ids := map[int]bool{}
	targets := 0
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.W < 1 || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.H < 1 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" || p.Datasource.Type != "prometheus" {
			t.Errorf("panel %q: data source %+v, want the ${datasource} variable", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			targets++
			if strings.TrimSpace(tg.Expr) == "" || tg.RefID == "" {
				t.Errorf("panel %q: query %q without expression or refId", p.Title, tg.RefID)
			}
			if tg.Datasource != nil && tg.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q query %s: data source %+v", p.Title, tg.RefID, tg.Datasource)
			}
		}
	}
	if targets == 0 {
		t.Fatal("dashboard has no queries")
	}
}

// TestPrometheusRules runs promtool over the rules, their unit tests, and every
// dashboard query (as recording rules, so promtool parses them too).
func TestPrometheusRules(t *testing.T) {
	promtool := externalTool(t, "USERAPI_TEST_PROMTOOL", "promtool")
	dir := filepath.Join(deployDir, "prometheus")
	runTool(t, dir, promtool, "check", "rules", "alerts.yml")
	out := runTool(t, dir, promtool, "test", "rules", "alerts_test.yml")
	if !bytes.Contains(out, []byte("SUCCESS")) {
		t.Errorf("promtool test rules:\n%s", out)
	}

	// Every alert has a unit test case.
	tests, err := os.ReadFile(filepath.Join(dir, "alerts_test.yml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			if r.Alert != "" && !bytes.Contains(tests, []byte("alertname: "+r.Alert+"\n")) {
				t.Errorf("alert %s has no case in alerts_test.yml", r.Alert)
			}
		}
	}

	type rule struct {
		Record string `json:"record"`
		Expr   string `json:"expr"`
	}
	var rules []rule
	for where, q := range loadDashboard(t).queries(t) {
		rules = append(rules, rule{Record: "dashboard:" + where, Expr: q})
	}
	b, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "dashboard.yml")
	if err := os.WriteFile(f, b, 0o644); err != nil {
		t.Fatal(err)
	}
	runTool(t, ".", promtool, "check", "rules", f)
}

// TestMonitoringUsesRegisteredMetrics checks that every metric the rules and
// the dashboard name is one the service exports, and every recording rule
// they use is defined, so a renamed metric cannot leave an alert that never
// fires. The exported names come from /metrics of the real service: SQLite
// with the tiered cache (Redis unreachable: the cache's gauges are registered
// all the same), and PostgreSQL when USERAPI_TEST_POSTGRES_URL is set, for
// the pool, replication-slot and read-replica metrics only its store has.
func TestMonitoringUsesRegisteredMetrics(t *testing.T) {
	metricName := regexp.MustCompile(`\b(?:userapi|go|process)_[a-zA-Z0-9_]+\b`)
	recordingName := regexp.MustCompile(`\buserapi(?::[a-zA-Z0-9_]+)+`)
	used := map[string][]string{}    // metric → where
	usedRec := map[string][]string{} // recording rule → where
	note := func(where, expr string) {
		for _, n := range metricName.FindAllString(expr, -1) {
			used[n] = append(used[n], where)
		}
		for _, n := range recordingName.FindAllString(expr, -1) {
			usedRec[n] = append(usedRec[n], where)
		}
	}
	recorded := map[string]bool{}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				recorded[r.Record] = true
			}
			note("alerts.yml "+r.Record+r.Alert, r.Expr)
		}
	}
	for where, q := range loadDashboard(t).queries(t) {
		note("userapi.json "+where, q)
	}
	if len(used) < 10 {
		t.Fatalf("found only %d metric names in the rules and the dashboard: %v", len(used), used)
	}
	for n, where := range usedRec {
		if !recorded[n] {
			t.Errorf("recording rule %s, used by %v, is not defined in alerts.yml", n, where)
		}
	}

	exported := map[string]bool{}
	scrape := func(args ...string) {
		debug := testenv.FreeAddr(t)
		base, _, stop := startService(t, nil, append(args, "--debug-addr", debug)...)
		// The HTTP series appear with the first request of a route.
		httpStatus(t, base+"/users/1")
		httpStatus(t, base+"/readyz")
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := p.TextToMetricFamilies(strings.NewReader(httpBody(t, "http://"+debug+"/metrics")))
		if err != nil {
			t.Fatal(err)
		}
		for name, f := range fams {
			exported[name] = true
			switch f.GetType() {
			case dto.MetricType_HISTOGRAM:
				exported[name+"_bucket"], exported[name+"_sum"], exported[name+"_count"] = true, true, true
			case dto.MetricType_SUMMARY:
				exported[name+"_sum"], exported[name+"_count"] = true, true
			}
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	}
	scrape("--db", "sqlite:"+filepath.Join(t.TempDir(), "m.db"), "--cache", "tiered", "--redis", "redis://"+testenv.FreeAddr(t)+"/0")
	pg := os.Getenv("USERAPI_TEST_POSTGRES_URL")
	if pg != "" {
		// The service's own database named as a replica too: it is not
		// in recovery, so it serves nothing, but the replica metrics
		// are registered.
		scrape("--db", pg, "--migrate", "--cache", "off", "--db-replica", pg)
	}

	var missing []string
	for n, where := range used {
		if !exported[n] {
			missing = append(missing, fmt.Sprintf("%s (in %s)", n, strings.Join(where, ", ")))
		}
	}
	slices.Sort(missing)
	switch {
	case len(missing) == 0:
	case pg == "":
		t.Skipf("not exported with SQLite, not checked without USERAPI_TEST_POSTGRES_URL:\n%s", strings.Join(missing, "\n"))
	default:
		t.Errorf("the service exports no such metric:\n%s", strings.Join(missing, "\n"))
	}
}
