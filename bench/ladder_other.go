//go:build !linux

package bench

import "os/exec"

// setDeathSignal does nothing where the kernel has no parent-death signal;
// the ladder still stops every server it started on its normal paths.
func setDeathSignal(*exec.Cmd) {}
