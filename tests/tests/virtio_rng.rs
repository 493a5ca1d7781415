//! virtio-mmio and virtio-rng through the real VM path: the guest binds the device, reads random
//! bytes from /dev/hwrng, and the debug console takes commands from husk-vmm's stdin.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::{combined, describe, guest_dir, run, target_bin, VmHost};

#[test]
fn the_guest_reads_random_bytes_from_the_virtio_rng() {
    let (vmm, guest) = (target_bin("husk-vmm"), guest_dir());
    // Commands go to the guest's debug shell once it has started; `kill -TERM 1` asks the agent to
    // power off.
    let script = format!(
        "log=$(mktemp); \
         {{ i=0; until grep -q 'debug console started' $log; do sleep 0.2; i=$((i+1)); [ $i -lt 600 ] || exit 90; done; \
            printf 'cat /sys/class/misc/hw_random/rng_current; head -c 32 /dev/hwrng | od -A n -t x1; kill -TERM 1\\n'; }} \
         | {vmm} --kernel {kernel} --initrd {initrd} --console $log --console - --console-input \
           --append husk.debug_console; echo \"vmm-status=$?\"; rm -f $log",
        vmm = vmm.display(),
        kernel = guest.join("vmlinux").display(),
        initrd = guest.join("initramfs.cpio").display(),
    );
    let output = run(&mut VmHost::detect().command(Duration::from_secs(300), &["sh", "-c", &script]));
    let text = combined(&output);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(text.contains("vmm-status=0") && text.contains("guest powered off"), "{}", describe(&output));
    assert!(text.lines().any(|l| l.trim() == "virtio_rng.0"), "the hwrng is the virtio device: {text}");
    // od prints the 32 bytes as two lines of 16 hex pairs.
    let bytes: Vec<u8> = text
        .lines()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.len() == 16 && words.iter().all(|w| w.len() == 2 && u8::from_str_radix(w, 16).is_ok())
        })
        .flat_map(|l| l.split_whitespace().map(|w| u8::from_str_radix(w, 16).unwrap()).collect::<Vec<_>>())
        .collect();
    assert_eq!(bytes.len(), 32, "32 bytes read from /dev/hwrng: {text}");
    assert!(bytes.iter().any(|b| *b != 0), "the bytes are not all zero: {text}");
}
