//! `husk-cri-density CONTAINERD_SOCKET LOG_DIR N...`: pod density through containerd's CRI plugin.
//! For each N, N pods are started at once (each: RunPodSandbox, then CreateContainer and
//! StartContainer of one idle busybox container), first with the handler `husk`, then with `runc`,
//! and the figures are printed side by side:
//! - `density_N_start_ms`: from the first RunPodSandbox sent to the last StartContainer returned;
//! - `density_N_mem_mib`: the node's MemAvailable before the first pod minus once all N run.
//!
//! Pods are removed (concurrently) before the next round. A count the node's memory cannot hold
//! (judged from the largest per-pod use seen so far) is skipped and said so. Exits non-zero when
//! a pod fails to start.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_tests::bench::{mem_available_kib, Figure};
use husk_tests::cri::{connect, pod_config, remove_pod, run_pod, start, Cri, HANDLER};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, logs, counts @ ..] = args.as_slice() else {
        bail!("usage: husk-cri-density CONTAINERD_SOCKET LOG_DIR N...");
    };
    let counts: Vec<usize> = counts.iter().map(|n| n.parse().context("N")).collect::<Result<_>>()?;
    if counts.is_empty() {
        bail!("usage: husk-cri-density CONTAINERD_SOCKET LOG_DIR N...");
    }
    let cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    println!("husk-cri-density: {}", husk_tests::bench::vm_host_description());
    println!("start: the first RunPodSandbox sent; end: the last pod's StartContainer returned");
    println!("memory: MemAvailable of the node before the first pod minus with all pods running");
    // MiB a pod takes, for deciding which counts fit (refined after each round).
    let mut per_pod_mib = 80.0_f64;
    for n in counts {
        let (need, available) = (n as f64 * per_pod_mib * 1.3, mem_available_mib()?);
        if need > available * 0.9 {
            println!("density_{n}: skipped: about {need:.0} MiB needed, {available:.0} MiB available");
            continue;
        }
        let mut rounds = Vec::new();
        for handler in [HANDLER, "runc"] {
            rounds.push(round(&cri, logs, handler, n).await.with_context(|| format!("{n} {handler} pods"))?);
        }
        let [(husk_ms, husk_mib), (runc_ms, runc_mib)] = [rounds[0], rounds[1]];
        per_pod_mib = per_pod_mib.max(husk_mib.max(runc_mib) / n as f64);
        println!(
            "density_{n}_start_ms={husk_ms:.0} runc_density_{n}_start_ms={runc_ms:.0} ratio={:.2}",
            husk_ms / runc_ms
        );
        println!(
            "density_{n}_mem_mib={husk_mib:.0} runc_density_{n}_mem_mib={runc_mib:.0} ratio={:.2}",
            husk_mib / runc_mib
        );
        let start = "the first RunPodSandbox sent";
        Figure::new(&format!("density_{n}_start_ms"), "ms", start, &format!("the last of {n} pods started"))
            .samples(&[husk_ms])
            .beside(&format!("runc_density_{n}_start_ms"), "runc", &[runc_ms])
            .emit();
        Figure::new(
            &format!("density_{n}_mem_mib"),
            "MiB",
            "MemAvailable before",
            &format!("{n} pods running"),
        )
        .samples(&[husk_mib])
        .beside(&format!("runc_density_{n}_mem_mib"), "runc", &[runc_mib])
        .emit();
    }
    Ok(())
}

/// Starts `n` pods with `handler` at once; (time to all running in ms, node memory used in MiB).
async fn round(cri: &Cri, logs: &str, handler: &str, n: usize) -> Result<(f64, f64)> {
    settle().await;
    let before = mem_available_mib()?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut cri = cri.clone();
            let config = pod_config(&format!("density-{handler}-{n}-{i}"), logs);
            let handler = handler.to_owned();
            tokio::spawn(async move {
                let pod = run_pod(&mut cri, &config, &handler).await?;
                let started = start(&mut cri, &pod, &config, "main", None, "exec sleep 100000").await;
                Ok::<_, anyhow::Error>((pod, started))
            })
        })
        .collect();
    let mut pods = Vec::new();
    let mut failure = None;
    for task in tasks {
        match task.await.context("a pod task")? {
            Ok((pod, Ok(_))) => pods.push(pod),
            Ok((pod, Err(err))) => {
                pods.push(pod);
                failure.get_or_insert(err);
            }
            Err(err) => {
                failure.get_or_insert(err);
            }
        }
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let used = before - mem_available_mib()?;
    let removals: Vec<_> = pods
        .into_iter()
        .map(|pod| {
            let mut cri = cri.clone();
            tokio::spawn(async move { remove_pod(&mut cri, pod).await })
        })
        .collect();
    for removal in removals {
        removal.await.context("a removal task")??;
    }
    match failure {
        Some(err) => Err(err),
        None => Ok((elapsed_ms, used)),
    }
}

/// Lets the previous round's memory come back before measuring.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn mem_available_mib() -> Result<f64> {
    Ok(mem_available_kib()? as f64 / 1024.0)
}
