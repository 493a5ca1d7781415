//! `husk-vmm` running the guest image with the agent's debug console on its stdin: benchmarks and
//! tests type shell lines into the guest and wait for markers in the console log.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// What to boot: the VMM, the guest image, the size, and extra `husk-vmm` arguments (devices).
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub extra_args: Vec<String>,
}

/// A running guest whose debug console is driven through `husk-vmm`'s stdin.
#[derive(Debug)]
pub struct DebugConsoleVm {
    child: Child,
    stdin: Option<ChildStdin>,
    console: PathBuf,
    stderr: PathBuf,
}

impl DebugConsoleVm {
    /// Boots `spec`, keeping the console log and husk-vmm's stderr in `work`; returns once the
    /// debug console has started (or fails after `timeout` with the console tail).
    pub fn boot(spec: &VmSpec, work: &Path, timeout: Duration) -> Result<DebugConsoleVm> {
        let console = work.join("console.log");
        let stderr = work.join("vmm.stderr");
        fs::write(&console, "")?;
        let mut command = Command::new(&spec.vmm);
        command
            .arg("--kernel")
            .arg(&spec.kernel)
            .arg("--initrd")
            .arg(&spec.initrd)
            .args(["--vcpus", &spec.vcpus.to_string(), "--mem", &spec.mem_mib.to_string()])
            .arg("--console")
            .arg(&console)
            .arg("--console-input")
            .args(&spec.extra_args)
            .args(["--append", "husk.debug_console"]);
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("{command:?}"))?;
        let stdin = child.stdin.take();
        let mut vm = DebugConsoleVm { child, stdin, console, stderr };
        if let Err(err) = vm.wait_for("debug console started", timeout) {
            let diagnostics = vm.diagnostics();
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            bail!("{err:#}\n{diagnostics}");
        }
        Ok(vm)
    }

    /// Waits until the console log contains `marker`.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if fs::read_to_string(&self.console).is_ok_and(|text| text.contains(marker)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("husk-vmm exited with {status} before the console said {marker:?}");
            }
            ensure!(Instant::now() < deadline, "the console did not say {marker:?} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Types `line` into the guest's shell.
    pub fn type_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("husk-vmm's stdin is closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).context("writing to the debug console")?;
        Ok(stdin.flush()?)
    }

    /// Types `command` followed by an echo of a fresh marker, and waits for the marker: returns the
    /// time from typing to the marker's appearance. The marker's typed form differs from its
    /// output (`$((…))` is expanded), so the console's echo of the line does not match early.
    pub fn run_timed(&mut self, command: &str, timeout: Duration) -> Result<Duration> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        self.type_line(&format!("{command}; echo done-{id}-$((6*7))"))?;
        self.wait_for(&format!("done-{id}-42"), timeout).with_context(|| format!("running {command:?}"))?;
        Ok(started.elapsed())
    }

    /// Asks the guest to power off (`kill -TERM 1`); husk-vmm must exit with status 0 in time.
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        // The guest may be gone already; the exit status below says how it ended.
        let _ = self.type_line("kill -TERM 1");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("husk-vmm did not exit within {timeout:?} of `kill -TERM 1`\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(status.success(), "husk-vmm exited with {status}\n{}", self.diagnostics());
        Ok(())
    }

    /// The tails of the guest console and of husk-vmm's stderr.
    pub fn diagnostics(&self) -> String {
        let tail = |path: &Path, lines: usize| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        format!(
            "--- guest console (last lines) ---\n{}\n--- husk-vmm stderr (last lines) ---\n{}",
            tail(&self.console, 20),
            tail(&self.stderr, 40)
        )
    }
}

impl Drop for DebugConsoleVm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
