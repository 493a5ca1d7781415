//! `husk-cri-density [--rounds R] CONTAINERD_SOCKET LOG_DIR N...`: pod density through
//! containerd's CRI plugin. For each N, R rounds (default 1) start N pods at once (each:
//! RunPodSandbox, then CreateContainer and StartContainer of one idle busybox container), with the
//! handler `husk` then with `runc`, and the figures are printed side by side:
//! - `density_N_start_ms`: from the first RunPodSandbox sent to the last StartContainer returned
//!   (one sample per round);
//! - `density_N_mem_mib`: the node's MemAvailable before the first pod minus once all N run (one
//!   sample per round);
//! - `density_N_pod_start_ms`: each pod's own RunPodSandbox sent to its StartContainer returned
//!   (N samples per round: how evenly the node serves pods started together).
//!
//! Pods are removed (concurrently) after each round. A count the node's memory cannot hold
//! (judged from the largest per-pod use seen so far) is skipped and said so. Exits non-zero when
//! a pod fails to start.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_tests::bench::{mem_available_kib, spread, Figure};
use husk_tests::cri::{connect, remove_pods, start_pods_at_once, Cri, HANDLER};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

const USAGE: &str = "usage: husk-cri-density [--rounds R] CONTAINERD_SOCKET LOG_DIR N...";

/// What one round of N pods measured.
#[derive(Debug, Default)]
struct Round {
    /// First RunPodSandbox sent to the last StartContainer returned.
    all_ms: f64,
    /// Node memory the running pods took.
    mem_mib: f64,
    /// Each pod's own start.
    pod_ms: Vec<f64>,
}

/// Per handler, every round's samples.
#[derive(Debug, Default)]
struct Samples {
    all_ms: Vec<f64>,
    mem_mib: Vec<f64>,
    pod_ms: Vec<f64>,
}

impl Samples {
    fn add(&mut self, round: Round) {
        self.all_ms.push(round.all_ms);
        self.mem_mib.push(round.mem_mib);
        self.pod_ms.extend(round.pod_ms);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match args.first().map(String::as_str) {
        Some("--rounds") if args.len() > 1 => {
            let rounds = args[1].parse::<usize>().ok().filter(|r| *r > 0);
            let rounds =
                rounds.with_context(|| format!("--rounds {:?}: expected a count above 0", args[1]))?;
            args.drain(..2);
            rounds
        }
        _ => 1,
    };
    let [socket, logs, counts @ ..] = args.as_slice() else { bail!(USAGE) };
    let counts: Vec<usize> =
        counts.iter().map(|n| n.parse().with_context(|| format!("N {n:?}"))).collect::<Result<_>>()?;
    if counts.is_empty() {
        bail!(USAGE);
    }
    let cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    println!("husk-cri-density: {}", husk_tests::bench::vm_host_description());
    println!(
        "start: the first RunPodSandbox sent; end: the last pod's StartContainer returned ({rounds} rounds)"
    );
    println!("memory: MemAvailable of the node before the first pod minus with all pods running");
    println!("pod start: each pod's RunPodSandbox sent to its StartContainer returned");
    // MiB a pod takes, for deciding which counts fit (refined after each round).
    let mut per_pod_mib = 80.0_f64;
    for n in counts {
        let (need, available) = (n as f64 * per_pod_mib * 1.3, mem_available_mib()?);
        if need > available * 0.9 {
            println!("density_{n}: skipped: about {need:.0} MiB needed, {available:.0} MiB available");
            continue;
        }
        let (mut husk, mut runc) = (Samples::default(), Samples::default());
        for _ in 0..rounds {
            for (handler, samples) in [(HANDLER, &mut husk), ("runc", &mut runc)] {
                let measured = round(&cri, logs, handler, n).await;
                let measured = measured.with_context(|| format!("{n} {handler} pods"))?;
                per_pod_mib = per_pod_mib.max(measured.mem_mib / n as f64);
                samples.add(measured);
            }
        }
        print_figures(n, &husk, &runc);
    }
    Ok(())
}

fn print_figures(n: usize, husk: &Samples, runc: &Samples) {
    let figures = [
        (
            "start_ms",
            "ms",
            "the first RunPodSandbox sent",
            format!("the last of {n} pods started"),
            &husk.all_ms,
            &runc.all_ms,
        ),
        ("mem_mib", "MiB", "MemAvailable before", format!("{n} pods running"), &husk.mem_mib, &runc.mem_mib),
        (
            "pod_start_ms",
            "ms",
            "the pod's RunPodSandbox sent",
            format!("its StartContainer returned ({n} at once)"),
            &husk.pod_ms,
            &runc.pod_ms,
        ),
    ];
    for (suffix, unit, start, end, husk, runc) in figures {
        let (name, baseline) = (format!("density_{n}_{suffix}"), format!("runc_density_{n}_{suffix}"));
        let ((h, h_min, h_max), (r, r_min, r_max)) = (spread(husk), spread(runc));
        println!(
            "{name}={h:.0} (min {h_min:.0} max {h_max:.0}) {baseline}={r:.0} (min {r_min:.0} max {r_max:.0}) ratio={:.2}",
            h / r
        );
        Figure::new(&name, unit, start, &end).samples(husk).beside(&baseline, "runc", runc).emit();
    }
}

/// Starts `n` pods with `handler` at once and removes them again.
async fn round(cri: &Cri, logs: &str, handler: &str, n: usize) -> Result<Round> {
    settle().await;
    let before = mem_available_mib()?;
    let started = Instant::now();
    let batch = start_pods_at_once(cri, logs, handler, &format!("density-{handler}-{n}"), n).await?;
    let all_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mem_mib = before - mem_available_mib()?;
    remove_pods(cri, batch.pods).await?;
    match batch.failure {
        Some(err) => Err(err),
        None => Ok(Round { all_ms, mem_mib, pod_ms: batch.start_ms }),
    }
}

/// Lets the previous round's memory come back before measuring.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn mem_available_mib() -> Result<f64> {
    Ok(mem_available_kib()? as f64 / 1024.0)
}
