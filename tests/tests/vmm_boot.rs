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
        BatchCommand::new("oversized-initrd", &["sh", "-c", &oversized]),
    ]
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
