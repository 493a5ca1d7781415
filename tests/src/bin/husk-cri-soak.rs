//! `husk-cri-soak CONTAINERD_SOCKET LOG_DIR CONCURRENT TOTAL`: the soak test. Pods (CRI, handler
//! `husk`, each with one idle container on the CNI network) are started CONCURRENT at a time and
//! removed again, until TOTAL have run. The node is counted after the first round (the warm-up:
//! containerd's caches and thread pool are then as big as this load makes them) and after the
//! last, and the growth of each count is printed:
//! - `fds`: open files of every user-space process (summed over /proc/PID/fd: the kernel's
//!   file-nr is a per-CPU counter, off by up to its batch size), and of containerd;
//! - `threads`, `processes`: of every user-space process but containerd; `containerd_threads`
//!   (reported, not held to zero: Go's runtime keeps the OS threads a busier moment started);
//! - `mounts`: the node's mount table;
//! - `links`: network interfaces of the node (veths, taps); `netns`: /var/run/netns;
//! - `sandboxes`: Husk's sandbox directories; `shim_sockets`: /run/containerd/s;
//! - `used_mib`: MemTotal - MemAvailable, after dropping the page cache.
//!
//! Every count must come back to where it was (growth 0; the last count is retaken for up to
//! [`SETTLE`] while any looks grown, as the kernel frees closed files late); memory may move by
//! at most [`MEMORY_SLACK_MIB`] (allocator and page-table noise). Exits non-zero otherwise, or
//! when a pod fails to start or be removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_tests::bench::{mem_available_kib, meminfo_kib};
use husk_tests::cri::{connect, remove_pods, start_pods_at_once, Cri, HANDLER};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

const USAGE: &str = "usage: husk-cri-soak CONTAINERD_SOCKET LOG_DIR CONCURRENT TOTAL";
/// Memory growth accepted after the warm-up, in MiB.
const MEMORY_SLACK_MIB: i64 = 32;
/// How long the node may take to let go of a round's shims and VMs.
const SETTLE: Duration = Duration::from_secs(30);

/// What the node holds at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Census {
    fds: i64,
    containerd_fds: i64,
    threads: i64,
    containerd_threads: i64,
    processes: i64,
    mounts: i64,
    links: i64,
    netns: i64,
    sandboxes: i64,
    shim_sockets: i64,
    used_mib: i64,
}

impl Census {
    fn take(containerd_config: &Path) -> Result<Census> {
        let (all_threads, processes, fds, containerd) = user_processes(containerd_config)?;
        let containerd = containerd.context("no containerd process with the configuration of this socket")?;
        let containerd_threads = entries(&format!("/proc/{containerd}/task"));
        let used_kib = meminfo_kib("MemTotal")?.saturating_sub(mem_available_kib()?);
        Ok(Census {
            fds,
            containerd_fds: entries(&format!("/proc/{containerd}/fd")),
            threads: all_threads - containerd_threads,
            containerd_threads,
            processes: processes - 1,
            mounts: std::fs::read_to_string("/proc/self/mountinfo").context("mountinfo")?.lines().count()
                as i64,
            links: entries("/sys/class/net"),
            netns: entries("/var/run/netns"),
            sandboxes: entries("/run/husk/sandboxes"),
            shim_sockets: entries("/run/containerd/s"),
            used_mib: i64::try_from(used_kib / 1024).unwrap_or(i64::MAX),
        })
    }

    fn figures(&self) -> [(&'static str, i64); 11] {
        [
            ("fds", self.fds),
            ("containerd_fds", self.containerd_fds),
            ("threads", self.threads),
            ("containerd_threads", self.containerd_threads),
            ("processes", self.processes),
            ("mounts", self.mounts),
            ("links", self.links),
            ("netns", self.netns),
            ("sandboxes", self.sandboxes),
            ("shim_sockets", self.shim_sockets),
            ("used_mib", self.used_mib),
        ]
    }
}

/// How much a count may grow: memory by [`MEMORY_SLACK_MIB`], containerd's threads without
/// bound (reported only), every other count not at all.
fn slack(name: &str) -> i64 {
    match name {
        "used_mib" => MEMORY_SLACK_MIB,
        "containerd_threads" => i64::MAX,
        _ => 0,
    }
}

/// Whether any count of `after` exceeds `before` by more than its slack.
fn grown(before: &Census, after: &Census) -> bool {
    before.figures().into_iter().zip(after.figures()).any(|((name, was), (_, is))| is - was > slack(name))
}

/// Entries of a directory (0 when it does not exist).
fn entries(dir: &str) -> i64 {
    std::fs::read_dir(dir).map_or(0, |d| d.count() as i64)
}

/// Threads, processes and open files of user space (a kernel thread has an empty cmdline), and
/// the pid of the containerd started with `config`.
fn user_processes(config: &Path) -> Result<(i64, i64, i64, Option<u32>)> {
    let (mut threads, mut processes, mut fds, mut containerd) = (0, 0, 0, None);
    for entry in std::fs::read_dir("/proc").context("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.is_empty() {
            continue;
        }
        processes += 1;
        threads += entries(&format!("/proc/{pid}/task"));
        fds += entries(&format!("/proc/{pid}/fd"));
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"containerd"))
            && args.contains(&config.as_os_str().as_encoded_bytes())
        {
            containerd = Some(pid);
        }
    }
    Ok((threads, processes, fds, containerd))
}

/// Waits until no Husk shim runs and the page cache is dropped, then counts.
async fn settled_census(containerd_config: &Path) -> Result<Census> {
    let deadline = Instant::now() + SETTLE;
    while shims_running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if shims_running() {
        bail!("Husk shims still run {SETTLE:?} after their pods were removed");
    }
    // Reclaimable memory (page cache, dentries) is not a leak.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    tokio::time::sleep(Duration::from_secs(1)).await;
    Census::take(containerd_config)
}

fn shims_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.flatten().any(|entry| {
        // By the executable: a process name (`comm`) keeps only 15 bytes, `containerd-shim`.
        std::fs::read_link(entry.path().join("exe"))
            .is_ok_and(|exe| exe.file_name().is_some_and(|name| name == "containerd-shim-husk-v2"))
    })
}

/// One round: `n` pods up at once, then all removed.
async fn round(cri: &Cri, logs: &str, number: usize, n: usize) -> Result<()> {
    let batch = start_pods_at_once(cri, logs, HANDLER, &format!("soak-{number}"), n).await?;
    let removed = remove_pods(cri, batch.pods).await;
    if let Some(err) = batch.failure {
        return Err(err.context(format!("round {number}: a pod did not start")));
    }
    removed.with_context(|| format!("round {number}: removing its pods"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, logs, concurrent, total] = args.as_slice() else { bail!(USAGE) };
    let concurrent: usize =
        concurrent.parse().ok().filter(|n| *n > 0).context("CONCURRENT: a count above 0")?;
    let total: usize =
        total.parse().ok().filter(|n| *n >= 2 * concurrent).context("TOTAL: at least 2 x CONCURRENT")?;
    let containerd_config = PathBuf::from(socket).with_file_name("config.toml");
    let cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let rounds = total.div_ceil(concurrent);
    println!("husk-cri-soak: {rounds} rounds of {concurrent} pods at once ({total} pods), counted after the first and the last");
    let started = Instant::now();
    round(&cri, logs, 0, concurrent).await?;
    let before = settled_census(&containerd_config).await?;
    for number in 1..rounds {
        round(&cri, logs, number, concurrent.min(total - number * concurrent)).await?;
    }
    let mut after = settled_census(&containerd_config).await?;
    // The kernel frees a closed file's structure late (deferred fput), so the node's file count
    // lags its processes by a moment: count again while anything looks grown, for a while.
    let deadline = Instant::now() + SETTLE;
    while grown(&before, &after) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        after = Census::take(&containerd_config)?;
    }
    println!("soak: {total} pods in {:.0} s", started.elapsed().as_secs_f64());
    let mut leaks = Vec::new();
    for ((name, was), (_, is)) in before.figures().into_iter().zip(after.figures()) {
        let growth = is - was;
        println!("soak_growth {name}={growth} (after the warm-up {was}, at the end {is})");
        if growth > slack(name) {
            leaks.push(format!("{name} +{growth}"));
        }
    }
    if !leaks.is_empty() {
        bail!("the node did not come back to where it was after the warm-up: {}", leaks.join(", "));
    }
    println!("soak: no growth");
    Ok(())
}
