//! `husk-vmm` boots the guest image on KVM (directly, or inside the nested test host): the agent
//! comes up on every vCPU, and the guest's poweroff, reboot and panic end the VM as they should.
//! Every VM run of this file happens in one boot of the test host ([`RUNS`]).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use husk_protocols::ReadyLine;
use husk_tests::batch::{run_batch, BatchCommand, BatchOutput};
use husk_tests::{combined, describe, guest_dir, run, target_bin};

/// Every VM run below, one after another (each boots a guest of its own).
const BUDGET: Duration = Duration::from_secs(900);

static RUNS: OnceLock<BatchOutput> = OnceLock::new();

/// The output of the VM run `name` (all of them run on first use).
fn vm_run(name: &str) -> &'static Output {
    RUNS.get_or_init(|| run_batch(BUDGET, &[debian_bzimage()], &vm_runs())).get(name)
}

fn debian_bzimage() -> &'static Path {
    static KERNEL: OnceLock<std::path::PathBuf> = OnceLock::new();
    KERNEL.get_or_init(husk_tests::debian_bzimage)
}

fn vm_runs() -> Vec<BatchCommand> {
    let vmm = target_bin("husk-vmm");
    let vmm = vmm.to_str().unwrap();
    let guest = guest_dir();
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initramfs.cpio"));
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let boot = |name, vcpus, extra_cmdline| {
        BatchCommand::new(
            name,
            &[
                vmm,
                "--kernel",
                kernel,
                "--initrd",
                initrd,
                "--vcpus",
                vcpus,
                "--mem",
                "256",
                "--append",
                extra_cmdline,
            ],
        )
    };
    let sigterm = format!(
        "log=$(mktemp); {vmm} --kernel {kernel} --initrd {initrd} --console $log & pid=$!; \
         i=0; until grep -q '{ready}' $log; do sleep 0.2; i=$((i+1)); [ $i -lt 600 ] || exit 90; done; \
         kill -TERM $pid; wait $pid; echo \"vmm-status=$?\"; rm -f $log",
        ready = husk_protocols::READY_PREFIX,
    );
    // An initrd that cannot fit between the kernel (loaded at 16 MiB) and the end of 32 MiB.
    let oversized = format!(
        "initrd=$(mktemp); head -c $((24 << 20)) /dev/zero >$initrd; \
         {vmm} --kernel {kernel} --initrd $initrd --mem 32; status=$?; rm -f $initrd; exit $status"
    );
    vec![
        boot("poweroff", "1", "husk.after_ready=poweroff"),
        boot("two-vcpus", "2", "husk.after_ready=poweroff"),
        boot("reboot", "1", "husk.after_ready=reboot"),
        boot("panic", "1", "husk.after_ready=exit"),
        BatchCommand::new("sigterm", &["sh", "-c", &sigterm]),
        // Debian's cloud kernel: a bzImage with its own decompressor, modules and ACPI, none of
        // which we provide; it still reaches our /init through the 64-bit boot protocol.
        BatchCommand::new(
            "bzimage",
            &[
                vmm,
                "--kernel",
                debian_bzimage().to_str().unwrap(),
                "--initrd",
                initrd,
                "--mem",
                "512",
                "--append",
                "husk.after_ready=poweroff",
            ],
        ),
        BatchCommand::new("too-many-vcpus", &[vmm, "--kernel", kernel, "--vcpus", "200"]),
        BatchCommand::new("snapshot", &["sh", "-c", &snapshot_and_restore_twice(vmm, kernel, initrd)]),
        BatchCommand::new("oversized-initrd", &["sh", "-c", &oversized]),
    ]
}

/// Boots a 2-vCPU guest with its debug console, saves it when its agent is ready, then restores
/// it twice, one after the other, and drives each restored guest on its console: both CPUs'
/// timers, its uptime, a file it leaves in its RAM (the other must not see it), its virtio-rng.
fn snapshot_and_restore_twice(vmm: &str, kernel: &str, initrd: &str) -> String {
    format!(
        r#"work=$(mktemp -d)
wait_for() {{ i=0; until grep -q -- "$2" "$1"; do sleep 0.2; i=$((i+1)); [ $i -lt 1500 ] || return 1; done; }}
{vmm} --kernel {kernel} --initrd {initrd} --vcpus 2 --mem 256 --append husk.debug_console \
  --console $work/boot.log --snapshot-on-ready $work/snap </dev/null 2>&1; echo "snapshot-status=$?"
echo "snapshot-modes=$(stat -c %a $work/snap $work/snap/memory $work/snap/state.json | tr '\n' ' ')"
before=$(md5sum < $work/snap/memory)
for r in 1 2; do
  log=$work/restore$r.log; : > $log
  echo "restore$r-host-start=$(cut -d' ' -f1 /proc/uptime)"
  {{ i=0; until grep -q restored-42 $log; do echo 'echo restored-$((6*7))'; i=$((i+1)); [ $i -lt 120 ] || break; sleep 1; done
    echo 'u=$(cut -d" " -f1 /proc/uptime); echo "cpus=$(cat /sys/devices/system/cpu/online) uptime=$u"'
    echo 'a=$(grep LOC /proc/interrupts); sleep 1; b=$(grep LOC /proc/interrupts)'
    echo 'echo "loc-before=$a"; echo "loc-after=$b"'
    echo '[ -e /tmp/mark ] && echo seen-mark=yes; echo r > /tmp/mark'
    echo 'echo "rng=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d " \n")"'
    echo 'echo done-$((6*7))'
    wait_for $log done-42 || echo "restore $r: the guest never answered" >&2
    echo 'kill -TERM 1'; }} | {vmm} --restore $work/snap --console $log --console-input 2>&1
  echo "restore$r-status=$?"
  tr -d '\r' < $log | grep -E '^(cpus|loc-before|loc-after|seen-mark|rng)=' | sed "s/^/restore$r-/"
done
echo "memory-unchanged=$([ "$(md5sum < $work/snap/memory)" = "$before" ] && echo yes)"
{vmm} --kernel {kernel} --initrd {initrd} --mem 256 --console $work/virtio.log --vsock $work/v.sock \
  --snapshot-on-ready $work/virtio </dev/null 2>&1; echo "virtio-snapshot-status=$? state=$(ls $work/virtio/state.json 2>/dev/null | wc -l)"
echo "--- boot console"; tail -5 $work/boot.log; echo "--- restore 2 console"; tail -30 $work/restore2.log
rm -rf $work"#
    )
}

fn ready_line(output: &Output) -> ReadyLine {
    ReadyLine::find_in(&String::from_utf8_lossy(&output.stdout))
        .unwrap_or_else(|| panic!("no agent ready line on the console: {}", describe(output)))
}

/// The value of `name=<number>` in husk-vmm's summary line.
fn figure(output: &Output, name: &str) -> f64 {
    let text = combined(output);
    let value = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in the summary: {}", describe(output)));
    value.parse().unwrap_or_else(|_| panic!("{name}={value} is not a number: {}", describe(output)))
}

#[test]
fn the_guest_boots_to_the_agent_and_poweroff_ends_the_vmm_with_success() {
    let output = vm_run("poweroff");
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    let ready = ready_line(output);
    assert_eq!(ready.api, husk_protocols::AGENT_API_VERSION);
    assert_eq!(ready.cpus_online, "0");
    assert!(combined(output).contains("guest powered off"), "{}", describe(output));
    assert!(figure(output, "boot_to_init_ms") > 0.0);
    assert!(figure(output, "vmm_setup_ms") > 0.0);
}

#[test]
fn with_two_vcpus_the_guest_has_two_cpus_online() {
    let output = vm_run("two-vcpus");
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    assert_eq!(ready_line(output).cpus_online, "0-1", "{}", describe(output));
}

#[test]
fn a_guest_reboot_is_reported_as_a_reboot() {
    let output = vm_run("reboot");
    assert_eq!(output.status.code(), Some(3), "{}", describe(output));
    assert!(combined(output).contains("guest requested a reboot"), "{}", describe(output));
}

#[test]
fn a_guest_kernel_panic_fails_with_the_console_tail() {
    let output = vm_run("panic");
    assert_eq!(output.status.code(), Some(1), "{}", describe(output));
    let text = combined(output);
    assert!(text.contains("the VM ended: guest kernel panicked"), "{}", describe(output));
    let tail = text.split("--- guest console (last lines) ---").nth(1).unwrap_or_default();
    assert!(
        tail.contains("Kernel panic - not syncing"),
        "the console tail is in the error: {}",
        describe(output)
    );
}

#[test]
fn sigterm_stops_a_running_vm_cleanly() {
    let output = vm_run("sigterm");
    let text = combined(output);
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    assert!(text.contains("stopped by the host"), "{}", describe(output));
    assert!(text.contains("vmm-status=0"), "{}", describe(output));
}

#[test]
fn a_compressed_bzimage_kernel_boots_too() {
    let output = vm_run("bzimage");
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    // Its vsock transport is a module (not loaded), so our /init cannot serve the agent API: it
    // says so and powers off, which proves the kernel booted into it.
    let text = combined(output);
    assert!(
        text.contains("husk-agent: fatal: starting the agent API")
            && text.contains("Address family not supported"),
        "{}",
        describe(output)
    );
}

#[test]
fn bad_arguments_name_what_is_wrong() {
    let vmm = target_bin("husk-vmm");
    let kernel = guest_dir().join("vmlinux");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("not-a-kernel");
    std::fs::write(&junk, "#!/bin/sh\necho hi\n").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux"),
        (&["--kernel", junk.to_str().unwrap()], "neither an ELF vmlinux"),
        (&["--kernel", kernel.to_str().unwrap(), "--mem", "16"], "memory: 16 MiB is too small"),
        (
            &["--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent/initrd"],
            "initrd /nonexistent/initrd",
        ),
    ];
    for (args, expected) in cases {
        let output = run(Command::new(&vmm).args(args));
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The kernel-format check needs KVM; on a host whose KVM cannot run guests that is the error.
        let kvm_refused = stderr.contains("cannot run Husk guests");
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", describe(&output));
        assert!(stderr.contains(expected) || (kvm_refused && expected.contains("ELF")), "{args:?}: {stderr}");
    }
}

#[test]
fn too_many_vcpus_or_memory_too_small_for_the_image_are_clear_errors() {
    let output = vm_run("too-many-vcpus");
    assert_eq!(output.status.code(), Some(1), "{}", describe(output));
    assert!(combined(output).contains("vcpus: 200 requested"), "{}", describe(output));
    let output = vm_run("oversized-initrd");
    assert_eq!(output.status.code(), Some(1), "{}", describe(output));
    assert!(combined(output).contains("guest memory too small"), "{}", describe(output));
}

/// Issue 22's templates, in the VMM: a guest saved when its agent is ready comes back twice from
/// the one snapshot, each time running on both vCPUs with working timers, with its clock going on
/// from the snapshot's, and with RAM of its own (copy-on-write over the snapshot's memory file,
/// which stays as it was).
#[test]
fn a_guest_saved_at_ready_restores_twice_into_independent_running_vms() {
    let output = vm_run("snapshot");
    let text = combined(output);
    let field = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}: {}", describe(output)))
            .trim()
            .to_owned()
    };
    assert_eq!(field("snapshot-status="), "0", "{}", describe(output));
    assert!(text.contains("snapshot_ms="), "{}", describe(output));
    assert_eq!(field("snapshot-modes="), "700 600 600", "owner-only snapshot: {}", describe(output));
    for r in ["restore1", "restore2"] {
        assert_eq!(field(&format!("{r}-status=")), "0", "{r} powered off cleanly: {}", describe(output));
        assert!(text.contains("restore_ms="), "{}", describe(output));
        assert!(field(&format!("{r}-cpus=")).starts_with("0-1 "), "{r}: {}", describe(output));
        let timer_counts = |key: &str| -> Vec<u64> {
            let line = field(&format!("{r}-{key}="));
            let counts = line.split_once("LOC:").map_or("", |(_, rest)| rest);
            counts.split_whitespace().take(2).filter_map(|n| n.parse().ok()).collect()
        };
        let (before, after) = (timer_counts("loc-before"), timer_counts("loc-after"));
        assert!(
            before.len() == 2 && after.len() == 2 && after[0] > before[0] && after[1] > before[1],
            "{r}: both vCPUs' local timers tick after the restore ({before:?} -> {after:?}): {}",
            describe(output)
        );
    }
    assert!(!text.contains("restore2-seen-mark=yes"), "restore 2 saw restore 1's RAM: {}", describe(output));
    // The guest's clock goes on from the snapshot: the second restore's uptime is about the
    // first's, not later by the host time between them.
    let uptime = |r: &str| -> f64 {
        field(&format!("{r}-cpus=")).split("uptime=").nth(1).and_then(|u| u.parse().ok()).unwrap()
    };
    let host = |r: &str| -> f64 { field(&format!("{r}-host-start=")).parse().unwrap() };
    let host_gap = host("restore2") - host("restore1");
    assert!(
        uptime("restore2") < uptime("restore1") + host_gap.max(4.0) / 2.0 + 2.0,
        "uptimes {} then {}, {host_gap} s apart on the host: {}",
        uptime("restore1"),
        uptime("restore2"),
        describe(output)
    );
    assert_eq!(field("memory-unchanged="), "yes", "{}", describe(output));
    // virtio-rng came back with each restore and serves fresh host entropy to each.
    let rng = |r: &str| field(&format!("{r}-rng="));
    assert_eq!(rng("restore1").len(), 32, "16 bytes from /dev/hwrng: {}", describe(output));
    assert_ne!(rng("restore1"), rng("restore2"), "{}", describe(output));
    // Not yet: a VM with a vsock device is refused, saving nothing.
    assert_eq!(field("virtio-snapshot-status="), "1 state=0", "{}", describe(output));
    assert!(text.contains("virtio device 19: its state cannot be saved yet"), "{}", describe(output));
}
