//! Harness for Husk's integration tests: where the workspace and its build outputs are, and how to
//! run a command where Husk guests can run (directly on a KVM that can run them, otherwise inside the
//! nested test host, `tests/testhost/run`).
//!
//! The tests expect `make build guest-image testhost` to have run (`make test` does that first).

pub mod batch;
pub mod bench;
pub mod conformance;
pub mod console_scenario;
pub mod containerd;
pub mod cpio;
pub mod cri;
pub mod debug_console_vm;
pub mod diagnostics;
pub mod elf;
pub mod host_agent;
pub mod pod_cgroup;
pub mod pod_phases;

pub use console_scenario::ConsoleScenario;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A host binary built by `make build` (`target/debug/<name>`).
///
/// # Panics
/// When the binary is missing, with the command that builds it.
pub fn target_bin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/debug").join(name);
    assert!(path.is_file(), "{} is missing: run `make build` first", path.display());
    path
}

/// The guest image directory built by `make guest-image`.
///
/// # Panics
/// When the image has not been built.
pub fn guest_dir() -> PathBuf {
    let dir = workspace_root().join("build/guest");
    assert!(
        dir.join("manifest.json").is_file(),
        "{} has no guest image: run `make guest-image`",
        dir.display()
    );
    dir
}

/// Where VM tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmHost {
    /// This machine's KVM runs Husk guests.
    Direct,
    /// This machine's KVM cannot (e.g. PVM): use the nested test host.
    TestHost,
}

impl VmHost {
    /// `HUSK_VM_HOST=direct|testhost` when set, otherwise what `husk check --only kvm` would decide.
    ///
    /// # Panics
    /// On an unknown `HUSK_VM_HOST` value.
    pub fn detect() -> VmHost {
        match std::env::var("HUSK_VM_HOST").as_deref() {
            Ok("direct") => VmHost::Direct,
            Ok("testhost") => VmHost::TestHost,
            Ok(other) => panic!("HUSK_VM_HOST must be `direct` or `testhost`, not {other:?}"),
            Err(_) => match husk_vmm::host::KvmReport::probe() {
                Ok(report) if report.usable().is_ok() => VmHost::Direct,
                _ => VmHost::TestHost,
            },
        }
    }

    /// A command running `args` on this VM host, killed after `timeout` when it goes through the
    /// test host.
    pub fn command(self, timeout: Duration, args: &[&str]) -> Command {
        self.command_with(timeout, &[], args)
    }

    /// Like [`VmHost::command`], with host files outside the workspace that the command needs
    /// (`--with` of the test host; on a direct host they are already where they are).
    pub fn command_with(self, timeout: Duration, files: &[&Path], args: &[&str]) -> Command {
        match self {
            VmHost::Direct => {
                let mut command = Command::new(args[0]);
                command.args(&args[1..]);
                command
            }
            VmHost::TestHost => {
                let mut command = testhost_command(timeout, &[]);
                for file in files {
                    command.arg("--with").arg(file);
                }
                command.arg("--").args(args);
                command
            }
        }
    }
}

/// `tests/testhost/run --timeout <timeout> -- <args>` (without `--` and the command when `args`
/// is empty, for callers that add options first).
pub fn testhost_command(timeout: Duration, args: &[&str]) -> Command {
    let mut command = Command::new(workspace_root().join("tests/testhost/run"));
    command.arg("--timeout").arg(timeout.as_secs().max(1).to_string());
    if !args.is_empty() {
        command.arg("--").args(args);
    }
    command
}

/// Debian's cloud kernel (a compressed bzImage) that the test host boots; built or taken from the
/// cache by `tests/testhost/build-base`.
pub fn debian_bzimage() -> PathBuf {
    let output = run(&mut Command::new(workspace_root().join("tests/testhost/build-base")));
    assert!(output.status.success(), "build-base failed: {}", describe(&output));
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    PathBuf::from(dir).join("vmlinuz")
}

/// Runs `command`, returning its output; panics with the command line if it cannot start.
pub fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"))
}

/// Stdout followed by stderr. Through the test host both arrive on stdout (one serial line carries
/// them), so assertions about a message should look here rather than at one stream.
pub fn combined(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Stdout and stderr of `output` as one string, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the benchmark binary `bench` (from `target/debug`) with `--vmm`, `--kernel` and `--initrd`
/// of this workspace's build plus `extra`, on the VM host (`files` are host files it needs there);
/// asserts it exits 0 and returns its combined output.
///
/// # Panics
/// When the benchmark fails, with its output.
pub fn run_benchmark(bench: &str, extra: &[&str], files: &[&Path], timeout: Duration) -> String {
    let (bench, vmm, guest) = (target_bin(bench), target_bin("husk-vmm"), guest_dir());
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initramfs.cpio"));
    let path = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let mut args = vec![path(&bench), "--vmm".into(), path(&vmm), "--kernel".into(), path(&kernel)];
    args.extend(["--initrd".into(), path(&initrd)]);
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run(&mut VmHost::detect().command_with(timeout, files, &args));
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    combined(&output)
}

/// Asserts that `text` has a `figure=<v> ... <baseline>=<v> ... ratio=<v>` line (as the vsock
/// and virtio-fs benchmarks print) with all three values positive.
///
/// # Panics
/// When the line is missing or a value is not positive.
pub fn assert_figure_beside_baseline(text: &str, figure: &str, baseline: &str) {
    let value = |line: &str, name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{figure}=")))
        .unwrap_or_else(|| panic!("no {figure} line: {text}"));
    for name in [figure, baseline, "ratio"] {
        assert!(value(line, name) > 0.0, "{figure}: no positive {name} value: {line}");
    }
}

/// Like [`assert_figure_beside_baseline`], for a figure whose baseline may lie within the
/// measurement's noise (the node memory two runc pods take): the figure must be positive, the
/// baseline only measured (a finite number, possibly not above zero).
///
/// # Panics
/// When the line is missing, the figure is not positive or the baseline is not a number.
pub fn assert_figure_beside_noisy_baseline(text: &str, figure: &str, baseline: &str) {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{figure}=")))
        .unwrap_or_else(|| panic!("no {figure} line: {text}"));
    let value = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    assert!(value(figure) > 0.0, "{figure}: not positive: {line}");
    assert!(value(baseline).is_finite(), "{figure}: no {baseline} value: {line}");
}

/// Asserts that `text` has a `BENCH` record ([`bench::Figure::parse_all`]) for each of `names`,
/// with at least one sample and a baseline with at least one sample.
///
/// # Panics
/// When a figure is missing, has no samples, or has no baseline samples.
pub fn assert_figure_records(text: &str, names: &[&str]) {
    let figures = bench::Figure::parse_all(text);
    for name in names {
        let figure = figures
            .iter()
            .rev()
            .find(|f| f.name == *name)
            .unwrap_or_else(|| panic!("no BENCH record of {name}: {text}"));
        assert!(!figure.samples.is_empty(), "{name}: no samples: {figure:?}");
        let baseline = figure.baseline.as_ref().unwrap_or_else(|| panic!("{name}: no baseline: {figure:?}"));
        assert!(!baseline.samples.is_empty(), "{name}: no baseline samples: {figure:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::assert_figure_records;
    use crate::bench::{Figure, RECORD_PREFIX};

    fn line(figure: &Figure) -> String {
        format!("{RECORD_PREFIX}{}\n", serde_json::to_string(figure).unwrap_or_default())
    }

    #[test]
    fn figure_records_need_samples_and_baseline_samples() {
        let good = Figure::new("a_ms", "ms", "x", "y").samples(&[1.0]).beside("runc_a_ms", "runc", &[2.0]);
        let text = format!("a_ms=1 runc_a_ms=2 ratio=0.5\n{}", line(&good));
        assert_figure_records(&text, &["a_ms"]);
        let bare = Figure::new("b_ms", "ms", "x", "y").samples(&[1.0]);
        let empty = good.clone().beside("runc_a_ms", "runc", &[]);
        for (text, name) in [(text.clone(), "missing_ms"), (line(&bare), "b_ms"), (line(&empty), "a_ms")] {
            let failed = std::panic::catch_unwind(|| assert_figure_records(&text, &[name])).is_err();
            assert!(failed, "{name} passed: {text}");
        }
    }
}
