//! Hybrid vsock through the real VM path: host-to-guest streams with data checked end to end and
//! EOF seen on both sides, and a guest connection reaching a host listener at `<socket>_<port>`.
//! The guest side is `husk-vsock-test` (in the initramfs), driven through the debug console.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::{combined, describe, guest_dir, run, target_bin, VmHost};

const BUDGET: Duration = Duration::from_secs(600);
/// Concurrent host-to-guest streams, and bytes each sends and gets back (checksummed on the fly:
/// the test host's /tmp is in its RAM).
const STREAMS: usize = 64;
/// (64 x 2 MiB: a gigabyte each way took three minutes of the emulated test host and showed no
/// more than this; `make bench`'s vsock figures move the volume.)
const STREAM_BYTES: usize = 2 << 20;

/// A shell script that boots the guest with a vsock socket and a debug console, runs `guest_setup`
/// in the guest, waits for `ready_marker` on the console, runs `host_steps` on the host (with
/// `$sock`, `$log` and `$work` set), then powers the guest off.
fn scenario(guest_setup: &str, ready_marker: &str, host_steps: &str) -> String {
    let (vmm, guest) = (target_bin("husk-vmm"), guest_dir());
    format!(
        "work=$(mktemp -d); log=$work/console.log; sock=$work/vsock.sock; : > $log
wait_for() {{ i=0; until grep -q \"$1\" $log; do sleep 0.2; i=$((i+1)); [ $i -lt 900 ] || return 1; done; }}
{{ wait_for 'debug console started' || exit 90
  printf '%s\\n' {guest_setup:?}
  wait_for {ready_marker:?} || echo 'guest side never got ready' >&2
  {host_steps}
  printf 'kill -TERM 1\\n'; }} | {vmm} --kernel {kernel} --initrd {initrd} --mem 512 --console $log \
     --console-input --vsock $sock --append husk.debug_console
echo \"vmm-status=$?\"
echo '--- console'; tail -20 $log
rm -rf $work",
        vmm = vmm.display(),
        kernel = guest.join("vmlinux").display(),
        initrd = guest.join("initramfs.cpio").display(),
    )
}

#[test]
fn concurrent_host_streams_to_a_guest_listener_round_trip_with_matching_checksums() {
    let client = target_bin("husk-vsock-client");
    let host_steps = format!(
        "head -c {STREAM_BYTES} /dev/urandom > $work/data; want=$(sha256sum < $work/data | cut -d' ' -f1)
  n=0; while [ $n -lt {STREAMS} ]; do
    ( {client} $sock 1234 < $work/data 2>>$work/client-errors | sha256sum | cut -d' ' -f1 > $work/sum.$n ) &
    n=$((n+1)); done; wait
  grep -v '^husk-vsock-client: OK' $work/client-errors >&2
  ok=0; for f in $work/sum.*; do [ \"$(cat $f)\" = \"$want\" ] && ok=$((ok+1)); done
  echo \"streams-ok=$ok\" >&2",
        client = client.display()
    );
    let script = scenario("husk-vsock-test listen 1234 &", "listening on port 1234", &host_steps);
    let output = run(&mut VmHost::detect().command(BUDGET, &["sh", "-c", &script]));
    let text = combined(&output);
    assert!(text.contains("vmm-status=0"), "{}", describe(&output));
    assert!(
        text.contains(&format!("streams-ok={STREAMS}")),
        "{STREAMS} concurrent streams of {STREAM_BYTES} bytes echoed back intact: {}",
        describe(&output)
    );
}

#[test]
fn a_guest_connection_reaches_the_host_listener_for_its_port() {
    let client = target_bin("husk-vsock-client");
    let host_steps = format!(
        "echo hello-from-the-host | {client} --listen ${{sock}}_5000 > $work/got 2>&1 &
  i=0; until [ -S ${{sock}}_5000 ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
  [ -S ${{sock}}_5000 ] || echo 'the host listener never made its socket' >&2
  printf 'echo hello-from-the-guest | husk-vsock-test connect 5000; echo guest-done\\n'
  wait_for guest-done; wait; echo \"host-got=$(cat $work/got)\" >&2",
        client = client.display()
    );
    let script = scenario("true", "", &host_steps);
    let output = run(&mut VmHost::detect().command(BUDGET, &["sh", "-c", &script]));
    let text = combined(&output);
    assert!(text.contains("vmm-status=0"), "{}", describe(&output));
    assert!(
        text.contains("host-got=hello-from-the-guest"),
        "the host listener got the guest's bytes: {text}"
    );
    assert!(text.contains("hello-from-the-host"), "the guest printed the host's reply: {text}");
}
