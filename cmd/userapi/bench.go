package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"userapi/bench"
)

func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := bench.Main(ctx, args, stdout, stderr)
	if errors.Is(err, bench.ErrUsage) {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	return err
}
