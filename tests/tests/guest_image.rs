//! The guest image built by `make guest-image`: its files, its kernel configuration, and caching.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::fs;
use std::process::Command;

use husk_shim::guest_image::GuestImage;
use husk_tests::{cpio, describe, elf, guest_dir, run, workspace_root};

#[test]
fn the_image_verifies_and_init_is_a_static_executable() {
    let dir = guest_dir();
    let image = GuestImage::open(&dir).expect("the manifest matches the files");
    assert!(elf::is_elf64(&fs::read(image.kernel()).unwrap()), "vmlinux is not an ELF64 file");

    let entries = cpio::parse(&fs::read(image.initramfs()).unwrap()).expect("a valid newc archive");
    let init = entries.iter().find(|e| e.name == "init").expect("the initramfs has /init");
    assert_eq!(init.mode & 0o170000, 0o100000, "/init is a regular file");
    assert_ne!(init.mode & 0o111, 0, "/init is executable");
    assert_eq!(elf::is_static(&init.data), Some(true), "/init must not need a dynamic loader");
    // What a user would check: ldd on the agent that became /init (libseccomp linked in too).
    let work = tempfile::tempdir().unwrap();
    let agent = work.path().join("husk-agent");
    fs::write(&agent, &init.data).unwrap();
    let ldd = run(Command::new("ldd").arg(&agent));
    let text = String::from_utf8_lossy(&ldd.stdout).into_owned() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "ldd husk-agent: {text}"
    );
    let console = entries.iter().find(|e| e.name == "dev/console").expect("the initramfs has /dev/console");
    assert_eq!(console.mode & 0o170000, 0o020000, "/dev/console is a character device");
}

#[test]
fn the_kernel_config_has_what_husk_guests_need() {
    let config = fs::read_to_string(guest_dir().join("kernel.config")).unwrap();
    let lines: Vec<&str> = config.lines().collect();
    for option in [
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VSOCKETS=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_FUSE_FS=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_NAMESPACES=y",
        "CONFIG_PID_NS=y",
        "CONFIG_NET_NS=y",
        "CONFIG_USER_NS=y",
        "CONFIG_CGROUPS=y",
        "CONFIG_MEMCG=y",
        "CONFIG_CGROUP_PIDS=y",
        "CONFIG_SECCOMP_FILTER=y",
        "CONFIG_HW_RANDOM_VIRTIO=y",
        "# CONFIG_MODULES is not set",
    ] {
        assert!(lines.contains(&option), "kernel.config lacks {option}");
    }
}

#[test]
fn a_rebuild_with_unchanged_inputs_is_a_cache_hit_and_byte_identical() {
    let out = tempfile::tempdir().unwrap();
    let build = || run(Command::new(workspace_root().join("guest-image/build")).arg(out.path()));

    let first = build();
    assert!(first.status.success(), "{}", describe(&first));
    let first_log = String::from_utf8_lossy(&first.stderr);
    assert!(first_log.contains("cache hit"), "the kernel was rebuilt: {}", describe(&first));

    let second = build();
    assert!(second.status.success(), "{}", describe(&second));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("initramfs up to date"),
        "{}",
        describe(&second)
    );

    // Same inputs, same bytes: the image is reproducible.
    for file in ["vmlinux", "initramfs.cpio"] {
        let ours = fs::read(out.path().join(file)).unwrap();
        let made = fs::read(guest_dir().join(file)).unwrap();
        assert!(ours == made, "{file} differs from build/guest/{file}");
    }
}
