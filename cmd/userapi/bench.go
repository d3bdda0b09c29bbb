package main

import (
	"context"
	"io"

	"userapi/bench"
)

func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return bench.Main(ctx, args, stdout, stderr)
}
