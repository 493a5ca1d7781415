//! A VM test written as a shell scenario: boot the guest image with its debug console on
//! husk-vmm's stdin, run commands in the guest, wait for markers in the console log, run steps on
//! the host in between, then power the guest off and report husk-vmm's exit status.

use crate::{guest_dir, target_bin};

/// A scenario's pieces. Host steps are shell run on the host (inside the test host where needed)
/// with `$work` (a scratch directory), `$log` (the console log) and `$sock` (the vsock socket
/// path, when `vsock` is set) defined, plus `wait_for MARKER` (waits up to 300 s for MARKER in the
/// console log), `guest CMD...` (types a command line into the guest's shell and waits until it has
/// run: one line at a time, never a burst of typed input) and `sync_guest NAME`
/// (waits until the guest's shell has run everything typed so far: it echoes a marker whose typed
/// form differs from its output, so the console's echo of the command line does not match).
#[derive(Debug, Clone, Default)]
pub struct ConsoleScenario {
    /// Shell run on the host before the VM starts (e.g. to fill a directory to share).
    pub host_setup: String,
    /// Extra husk-vmm arguments (shell words, may use `$work`).
    pub vmm_args: String,
    /// Give the VM a vsock device at `$sock`.
    pub vsock: bool,
    /// Shell run on the host while the guest runs: drives the guest with `guest` and `wait_for`.
    pub steps: String,
    /// Shell run on the host after the VM ended (checks on what the guest left).
    pub host_checks: String,
}

impl ConsoleScenario {
    /// The whole scenario as one `sh -c` script. It prints `vmm-status=<code>` after the VM ends
    /// and the last console lines under `--- console`.
    pub fn script(&self) -> String {
        let (vmm, guest) = (target_bin("husk-vmm"), guest_dir());
        let vsock = if self.vsock { "--vsock $sock" } else { "" };
        format!(
            "work=$(mktemp -d); log=$work/console.log; sock=$work/vsock.sock; : > $log
wait_for() {{ i=0; until grep -q -- \"$1\" $log; do sleep 0.2; i=$((i+1)); [ $i -lt 1500 ] || return 1; done; }}
sync_guest() {{ printf 'echo %s-$((6*7))\\n' \"$1\"; wait_for \"$1-42\" || echo \"guest never reached $1\" >&2; }}
n=0; guest() {{ printf '%s\\n' \"$*\"; n=$((n+1)); sync_guest \"line$n\"; }}
{host_setup}
{{ wait_for 'debug console started' || exit 90
  {steps}
  printf 'kill -TERM 1\\n'; }} | {vmm} --kernel {kernel} --initrd {initrd} --mem 512 --console $log \
     --console-input {vsock} {vmm_args} --append husk.debug_console
echo \"vmm-status=$?\"
{host_checks}
echo '--- console'; tail -40 $log
rm -rf $work",
            host_setup = self.host_setup,
            steps = self.steps,
            vmm_args = self.vmm_args,
            host_checks = self.host_checks,
            vmm = vmm.display(),
            kernel = guest.join("vmlinux").display(),
            initrd = guest.join("initramfs.cpio").display(),
        )
    }
}
