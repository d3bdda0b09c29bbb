// Command userapi serves the users API, applies migrations, seeds users and
// runs the benchmark:
//
//	userapi serve   [flags]   the service (SQLite and the local cache by default)
//	userapi migrate [flags]   apply pending migrations
//	userapi seed    [flags]   bulk-load generated users
//	userapi keys    create|list|revoke   manage API keys
//	userapi bench   URL …     the load generator and report; `bench ladder` for the optimization ladder
//
// Every flag can also be set with a USERAPI_* environment variable
// (--pool-size is USERAPI_POOL_SIZE); flags win.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errUsage):
		if err != errUsage { // the bare error follows a usage text already printed
			fmt.Fprintln(os.Stderr, "userapi:", err)
		}
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "userapi:", err)
		os.Exit(1)
	}
}

// errUsage marks a command-line mistake (exit status 2).
var errUsage = errors.New("usage error")

const usage = `usage: userapi <command> [flags]

commands:
  serve     run the service
  migrate   apply pending database migrations
  seed      bulk-load generated users (--users N)
  keys      manage API keys: create, list, revoke
  bench     load-generate against a URL; "bench ladder" compares optimization steps

"userapi <command> -h" lists a command's flags; each flag can also be set
as USERAPI_<FLAG> in the environment (flags win).
`

// run is the whole program; main only adds signals and exit codes, so tests
// can run the real service in-process.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "serve":
		return serve(ctx, args, getenv, stdout, stderr)
	case "migrate":
		return migrate(ctx, args, getenv, stderr)
	case "seed":
		return seed(ctx, args, getenv, stderr)
	case "keys":
		return keysCmd(ctx, args, getenv, stdout, stderr)
	case "bench":
		return benchCmd(ctx, args, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprintf(stderr, "userapi: unknown command %q\n%s", cmd, usage)
		return errUsage
	}
}

// newFlagSet returns a flag set that reports mistakes as errUsage.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("userapi "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func parseArgs(fs *flag.FlagSet, args []string, getenv func(string) string) error {
	if err := parse(fs, args, getenv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	return nil
}
