package bench

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel send SIGTERM to the server if the bench
// process dies first, so an interrupted ladder leaves no server behind.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
