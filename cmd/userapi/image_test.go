package main

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// TestContainerImage checks deploy/Dockerfile where no Docker engine runs:
// the build stage's Go is the one go.mod asks for; its build command, run
// here with the same environment and flags, gives a statically linked
// binary (no ELF interpreter, no shared libraries); the final stage copies
// that binary and runs it as a non-root user, with the API on every
// interface of the container.
func TestContainerImage(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the image's binary is built for Linux; this test reads it as ELF")
	}
	df := readFile(t, filepath.Join(deployDir, "Dockerfile"))
	// Join continued lines, drop comments.
	var lines []string
	for _, l := range strings.Split(strings.ReplaceAll(df, "\\\n", " "), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}

	goMod := readFile(t, "../../go.mod")
	want := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(goMod)
	from := regexp.MustCompile(`^FROM golang:(\d+\.\d+)\S* AS build$`)
	var build, final []string // the stages' lines
	stage := &build
	for _, l := range lines {
		if m := from.FindStringSubmatch(l); m != nil {
			if want == nil || m[1] != want[1] {
				t.Errorf("build stage %q: want golang:%v, go.mod's go", l, want)
			}
			continue
		}
		if strings.HasPrefix(l, "FROM ") {
			stage = &final
		}
		*stage = append(*stage, l)
	}
	if len(final) == 0 {
		t.Fatalf("no final stage after the golang build stage in:\n%s", df)
	}

	// The build command: RUN [--mount...] ENV=... go build ARGS.
	var env, args []string
	for _, l := range build {
		if !strings.HasPrefix(l, "RUN ") || !strings.Contains(l, " go build ") {
			continue
		}
		words := shellWords(t, strings.TrimPrefix(l, "RUN "))
		for i, w := range words {
			if w == "go" && i+1 < len(words) && words[i+1] == "build" {
				args = words[i+2:]
				break
			}
			if strings.Contains(w, "=") && !strings.HasPrefix(w, "--") {
				env = append(env, w)
			}
		}
	}
	if args == nil {
		t.Fatalf("no `go build` in the build stage:\n%s", strings.Join(build, "\n"))
	}
	if !slices.Contains(env, "CGO_ENABLED=0") {
		t.Errorf("build environment %v: want CGO_ENABLED=0 (a static binary)", env)
	}
	out := ""
	for i, a := range args {
		if a == "-o" && i+1 < len(args) {
			out = args[i+1]
			args[i+1] = filepath.Join(t.TempDir(), "userapi")
		}
	}
	if out == "" {
		t.Fatalf("go build %v names no -o output", args)
	}
	cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), append([]string{"build"}, args...)...)
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %v with %v: %v\n%s", args, env, err, b)
	}
	bin := args[slices.Index(args, "-o")+1]
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s has an ELF interpreter: it is dynamically linked", out)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("%s needs shared libraries %v", out, libs)
	}

	// The final stage.
	joined := strings.Join(final, "\n")
	if !regexp.MustCompile(`(?m)^COPY --from=build ` + regexp.QuoteMeta(out) + ` /userapi$`).MatchString(joined) {
		t.Errorf("final stage does not copy the built %s to /userapi:\n%s", out, joined)
	}
	user := regexp.MustCompile(`(?m)^USER (\S+)$`).FindStringSubmatch(joined)
	if user == nil || user[1] == "0" || strings.HasPrefix(user[1], "0:") || strings.HasPrefix(user[1], "root") {
		t.Errorf("final stage USER %v: want a non-root user", user)
	}
	if !strings.Contains(joined, `ENTRYPOINT ["/userapi"]`) {
		t.Errorf("final stage has no ENTRYPOINT [\"/userapi\"]:\n%s", joined)
	}
	addr := regexp.MustCompile(`(?m)^ENV USERAPI_ADDR=:(\d+)$`).FindStringSubmatch(joined)
	if addr == nil || !regexp.MustCompile(`(?m)^EXPOSE .*\b`+addr[1]+`\b`).MatchString(joined) {
		t.Errorf("final stage: want ENV USERAPI_ADDR=:<port> (every interface) and that port EXPOSEd:\n%s", joined)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// shellWords splits a Dockerfile RUN line into words, honouring single
// quotes (all the Dockerfile uses).
func shellWords(t *testing.T, s string) []string {
	t.Helper()
	var words []string
	var w strings.Builder
	in, quoted := false, false
	for _, r := range s {
		switch {
		case r == '\'':
			quoted, in = !quoted, true
		case (r == ' ' || r == '\t') && !quoted:
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		default:
			w.WriteRune(r)
			in = true
		}
	}
	if quoted {
		t.Fatalf("unbalanced quote in %q", s)
	}
	if in {
		words = append(words, w.String())
	}
	return words
}
