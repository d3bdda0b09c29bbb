package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"userapi"
	"userapi/auth"
)

const keysUsage = `usage: userapi keys <create|list|revoke> [flags]

  create --name NAME --scopes users:read,users:write,admin [--expires 720h]
         [--rate-limit R --rate-burst B]   print a new key once on stdout
  list                                     list every key (no secrets)
  revoke ID                                revoke a key; every instance
                                           refuses it within a second

Every subcommand takes --db (or USERAPI_DB) like serve.
`

// keysCmd manages API keys in the database directly, for operators and
// scripts; running instances see a revoke at their next revision check.
func keysCmd(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysUsage)
		return errUsage
	}
	var c config
	fs := newFlagSet("keys "+args[0], stderr)
	var (
		name      = fs.String("name", "", "what the key is for (create)")
		scopes    = fs.String("scopes", "", "comma-separated scopes: users:read, users:write, admin (create)")
		expires   = fs.Duration("expires", 0, "lifetime of the key; 0 never expires (create)")
		rateLimit = fs.Float64("rate-limit", 0, "the key's own requests per second; 0 the configured default (create)")
		rateBurst = fs.Int("rate-burst", 0, "the key's own burst; 0 the configured default (create)")
	)
	// The key's own properties come from the command line only: in a
	// serve's environment USERAPI_RATE_LIMIT is the service's setting (it
	// may be "off"), not the new key's.
	own := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) { own[envName(f.Name)] = true })
	c.dbFlags(fs)
	dbEnv := func(name string) string {
		if own[name] {
			return ""
		}
		return getenv(name)
	}
	sub := args[0]
	if err := parse(fs, args[1:], dbEnv); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	var in userapi.KeyCreate
	var revokeID int64
	switch sub {
	case "create":
		sc, err := userapi.ParseScopes(*scopes)
		if err != nil {
			return fmt.Errorf("%w: --scopes: %v", errUsage, err)
		}
		in = userapi.KeyCreate{Name: *name, Scopes: sc, RateLimit: *rateLimit, RateBurst: *rateBurst}
		if *expires > 0 {
			in.ExpiresAt = userapi.Now().Add(*expires)
		}
		if err := in.Validate(userapi.Now()); err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
	case "revoke":
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: keys revoke takes one key id", errUsage)
		}
		id, err := strconv.ParseInt(fs.Arg(0), 10, 64)
		if err != nil || id <= 0 {
			return fmt.Errorf("%w: %q is not a key id", errUsage, fs.Arg(0))
		}
		revokeID = id
	case "list":
	default:
		fmt.Fprintf(stderr, "userapi keys: unknown subcommand %q\n%s", sub, keysUsage)
		return errUsage
	}
	if sub != "revoke" && fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}

	s, err := openStore(ctx, &c, false)
	if err != nil {
		return fmt.Errorf("keys: %w", err)
	}
	defer s.Close()
	ks, ok := s.(userapi.KeyStore)
	if !ok {
		return fmt.Errorf("keys: the %s store has no api keys", kindOf(&c))
	}
	switch sub {
	case "create":
		secret, k, err := auth.CreateKey(ctx, ks, in)
		if err != nil {
			return err
		}
		// The key alone on stdout, so scripts can capture it; the note on
		// stderr.
		fmt.Fprintln(stdout, secret)
		fmt.Fprintf(stderr, "created api key %d %q (%s); it is shown only this once\n", k.ID, k.Name, k.Scopes)
	case "revoke":
		k, err := ks.RevokeKey(ctx, revokeID, userapi.Now())
		if err != nil {
			return fmt.Errorf("keys revoke: %w", err)
		}
		fmt.Fprintf(stderr, "revoked api key %d %q at %s\n", k.ID, k.Name, k.RevokedAt.Format(time.RFC3339))
	case "list":
		keys, err := ks.ListKeys(ctx)
		if err != nil {
			return fmt.Errorf("keys list: %w", err)
		}
		writeKeys(stdout, keys)
	}
	return nil
}

// writeKeys prints keys as a table.
func writeKeys(w io.Writer, keys []*userapi.APIKey) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSCOPES\tCREATED\tLAST USED\tEXPIRES\tREVOKED\tRATE")
	when := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.UTC().Format(time.RFC3339)
	}
	for _, k := range keys {
		rate := "default"
		if k.RateLimit > 0 || k.RateBurst > 0 {
			rate = fmt.Sprintf("%g/s burst %d", k.RateLimit, k.RateBurst)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, strconv.Quote(k.Name), k.Scopes,
			when(k.CreatedAt), when(k.LastUsedAt), when(k.ExpiresAt), when(k.RevokedAt), rate)
	}
	tw.Flush()
}
