//! `husk-bench-ctr [--runs N] IMAGE_TAR`: containerd with Husk beside containerd with runc, in the
//! same run, on the same containerd (run it inside `tests/containerd-env`, on the VM host).
//!
//! - `ctr_run_ms`: from invoking `ctr run --rm IMAGE id true` to its exit (shim start, VM boot,
//!   container create/start/exit, delete, shim exit); the image is imported and unpacked by a
//!   warm-up run first. Median of N.
//! - `shim_rss_mib`: resident memory of the pod's shim with one idle container (`sleep`) running;
//!   Husk's shim holds the VMM and the guest's touched memory, runc's shim only itself (its
//!   container's process is counted in the overhead below).
//! - `pod_overhead_mib`: resident memory of every host process the idle pod added: the shim and
//!   its descendants (runc: the container's own processes; Husk: none, they live in the guest).
//! - `mem_available_drop_mib` (shown, not compared): how much the host's `MemAvailable` fell when
//!   the pod started (kernel memory and page cache included; noisy).
//! - `ctr_run_phase_<phase>_ms`: Husk's `ctr run` phase by phase, from the shim's phase lines in
//!   containerd's log (`$CONTAINERD_LOG`): from `ctr run` invoked to the shim's first phase,
//!   between consecutive phases, and from the last to the exit (runc's shim has no such phases:
//!   no baseline).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_tests::bench::{mem_available_kib, spread, vm_host_description, Figure};
use husk_tests::pod_phases::{intervals, Interval};

const IMAGE: &str = "docker.io/library/busybox:husk";
const HUSK: &str = "io.containerd.husk.v2";
const RUNC: &str = "io.containerd.runc.v2";

#[derive(Parser, Debug)]
struct Args {
    /// Timed runs per runtime.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The offline busybox image (scripts/busybox-oci-image).
    image_tar: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ctr(&["images", "import", &args.image_tar]).context("importing the image")?;
    println!("husk-bench-ctr: {}", vm_host_description());
    println!("start: `ctr run --rm` invoked; end: it exited (image unpacked by a warm-up run)");
    let husk_timed = time_runs(HUSK, args.runs)?;
    let runc_runs: Vec<f64> = time_runs(RUNC, args.runs)?.iter().map(|run| run.ms).collect();
    let husk_runs: Vec<f64> = husk_timed.iter().map(|run| run.ms).collect();
    report_phases(&husk_timed)?;
    report("ctr_run_ms", &husk_runs, "runc_ctr_run_ms", &runc_runs);
    let husk = idle_pod(HUSK, "containerd-shim-husk-v2")?;
    let runc = idle_pod(RUNC, "containerd-shim-runc-v2")?;
    report("shim_rss_mib", &[husk.shim_rss], "runc_shim_rss_mib", &[runc.shim_rss]);
    report("pod_overhead_mib", &[husk.tree_rss], "runc_pod_overhead_mib", &[runc.tree_rss]);
    println!(
        "mem_available_drop_mib={:.1} runc_mem_available_drop_mib={:.1}",
        husk.available_drop, runc.available_drop
    );
    let idle = "one idle container (`ctr run -d ... sleep 1000`) running, 3 s after its start";
    let figures = [
        (
            "ctr_run_ms",
            "ms",
            "`ctr run --rm IMAGE id true` invoked (image unpacked by a warm-up run)",
            "it exited (shim start, VM boot, container create/start/exit, delete, shim exit)",
            husk_runs,
            "runc_ctr_run_ms",
            runc_runs,
        ),
        (
            "shim_rss_mib",
            "MiB",
            idle,
            "VmRSS of the pod's shim (Husk's holds the VMM and the guest's touched memory)",
            vec![husk.shim_rss],
            "runc_shim_rss_mib",
            vec![runc.shim_rss],
        ),
        (
            "pod_overhead_mib",
            "MiB",
            idle,
            "VmRSS summed over the shim and its descendants (runc: the container's processes too)",
            vec![husk.tree_rss],
            "runc_pod_overhead_mib",
            vec![runc.tree_rss],
        ),
    ];
    for (name, unit, start, end, samples, baseline, baseline_samples) in figures {
        Figure::new(name, unit, start, end)
            .samples(&samples)
            .beside(baseline, "runc", &baseline_samples)
            .emit();
    }
    Ok(())
}

/// One timed `ctr run`.
struct TimedRun {
    id: String,
    invoked: SystemTime,
    exited: SystemTime,
    ms: f64,
}

/// `runs` timed `ctr run --rm ... true`, after one warm-up run.
fn time_runs(runtime: &str, runs: usize) -> Result<Vec<TimedRun>> {
    let mut times = Vec::with_capacity(runs);
    for run in 0..=runs {
        let id = format!("bench-{}-{run}", runtime.rsplit('.').nth(1).unwrap_or("rt"));
        let (invoked, started) = (SystemTime::now(), Instant::now());
        ctr(&["run", "--rm", "--runtime", runtime, IMAGE, &id, "true"])?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if run > 0 {
            times.push(TimedRun { id, invoked, exited: SystemTime::now(), ms });
        }
    }
    Ok(times)
}

/// Prints and emits Husk's `ctr run` phase by phase: each interval every run reached, with its
/// median. A run without phase lines (a shim that logs none) is an error: the figures would lie.
fn report_phases(runs: &[TimedRun]) -> Result<()> {
    let log_path =
        std::env::var("CONTAINERD_LOG").context("CONTAINERD_LOG (run inside tests/containerd-env)")?;
    let log = std::fs::read_to_string(&log_path).with_context(|| format!("reading {log_path}"))?;
    let namespace = std::env::var("CONTAINERD_NAMESPACE").unwrap_or_else(|_| "default".into());
    let mut by_name: BTreeMap<String, (Interval, Vec<f64>)> = BTreeMap::new();
    let mut order = Vec::new();
    for run in runs {
        let found = intervals(&log, &format!("{namespace}-{}", run.id), run.invoked, run.exited);
        if found.is_empty() {
            bail!("no phase lines of {} in {log_path}", run.id);
        }
        for interval in found {
            if !order.contains(&interval.name) {
                order.push(interval.name.clone());
            }
            let entry =
                by_name.entry(interval.name.clone()).or_insert_with(|| (interval.clone(), Vec::new()));
            entry.1.push(interval.ms);
        }
    }
    println!("ctr run, phase by phase (Husk; median of the runs that reached each phase):");
    for name in order {
        let Some((interval, samples)) = by_name.remove(&name) else { continue };
        println!("  {name}={:.1} ({} -> {})", spread(&samples).0, interval.start, interval.end);
        Figure::new(&name, "ms", &interval.start, &interval.end).samples(&samples).emit();
    }
    Ok(())
}

/// Memory of one idle pod, MiB.
struct IdlePod {
    shim_rss: f64,
    tree_rss: f64,
    available_drop: f64,
}

fn idle_pod(runtime: &str, shim: &str) -> Result<IdlePod> {
    let id = format!("idle-{}", runtime.rsplit('.').nth(1).unwrap_or("rt"));
    settle();
    let before = mem_available_kib()?;
    ctr(&["run", "-d", "--runtime", runtime, IMAGE, &id, "sleep", "1000"])?;
    settle();
    let after = mem_available_kib()?;
    let processes = processes()?;
    let shim_pid = processes.iter().find(|p| p.comm == shim[..shim.len().min(15)]).map(|p| p.pid);
    let shim_pid = shim_pid.with_context(|| format!("no {shim} process"))?;
    let shim_rss = processes.iter().find(|p| p.pid == shim_pid).map_or(0, |p| p.rss_kib);
    let tree_rss: u64 =
        processes.iter().filter(|p| descends_from(&processes, p.pid, shim_pid)).map(|p| p.rss_kib).sum();
    ctr(&["task", "kill", "-s", "SIGKILL", &id])?;
    for _ in 0..100 {
        if ctr(&["task", "delete", &id]).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ctr(&["container", "rm", &id])?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(IdlePod {
        shim_rss: mib(shim_rss),
        tree_rss: mib(tree_rss),
        available_drop: mib(before.saturating_sub(after)),
    })
}

fn settle() {
    std::thread::sleep(Duration::from_secs(3));
}

fn report(figure: &str, values: &[f64], baseline: &str, baseline_values: &[f64]) {
    let (value, min, max) = spread(values);
    let (base, base_min, base_max) = spread(baseline_values);
    println!(
        "{figure}={value:.1} (min {min:.1} max {max:.1}) {baseline}={base:.1} (min {base_min:.1} max {base_max:.1}) ratio={:.2}",
        value / base
    );
}

fn ctr(args: &[&str]) -> Result<()> {
    let output = Command::new("ctr").args(args).output().context("running ctr")?;
    if !output.status.success() {
        bail!("ctr {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

struct ProcessInfo {
    pid: u32,
    ppid: u32,
    comm: String,
    rss_kib: u64,
}

/// Every process's pid, parent, name (cut to 15 characters by the kernel) and VmRSS.
fn processes() -> Result<Vec<ProcessInfo>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field =
            |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default();
        all.push(ProcessInfo {
            pid,
            ppid: field("PPid:").parse().unwrap_or(0),
            comm: field("Name:").to_owned(),
            rss_kib: field("VmRSS:").split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0),
        });
    }
    Ok(all)
}

/// Whether `pid` is `ancestor` or one of its descendants.
fn descends_from(all: &[ProcessInfo], mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        match all.iter().find(|p| p.pid == pid) {
            Some(process) if process.ppid != 0 => pid = process.ppid,
            _ => return false,
        }
    }
    false
}
