//! The containerd benchmarks run `ctr run` (and CRI pods) with Husk and with runc on one private
//! containerd and print each named figure beside its runc baseline (one run each, debug
//! binaries: this checks the benchmarks work, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use husk_tests::batch::{batch_script, BatchCommand, BatchOutput};
use husk_tests::containerd::{import_command, run_beside_containerd, ImageTar};
use husk_tests::{
    assert_figure_beside_baseline, assert_figure_beside_noisy_baseline, assert_figure_records, describe,
    target_bin,
};

const BUDGET: Duration = Duration::from_secs(900);
/// The three CRI benchmarks together.
const CRI_BUDGET: Duration = Duration::from_secs(1500);

#[test]
fn the_containerd_benchmark_prints_each_figure_beside_runc() {
    let image = ImageTar::busybox("bench");
    let bench = target_bin("husk-bench-ctr");
    let args = [bench.to_str().unwrap(), "--runs", "1", image.path().to_str().unwrap()];
    let output = run_beside_containerd(false, BUDGET, &args);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{text}");
    for (figure, baseline) in [
        ("ctr_run_ms", "runc_ctr_run_ms"),
        ("shim_rss_mib", "runc_shim_rss_mib"),
        ("pod_overhead_mib", "runc_pod_overhead_mib"),
    ] {
        assert_figure_beside_baseline(&text, figure, baseline);
    }
    assert_figure_records(&text, &["ctr_run_ms", "shim_rss_mib", "pod_overhead_mib"]);
    assert_phases_chain_through_the_run(&text);
}

/// Husk's `ctr run` phase by phase: the boot's phases the VMM and the guest observed and the
/// shim's own, no interval negative (the phases happened in their order), and the chain
/// from `ctr run` invoked to its exit adding up to `ctr_run_ms`.
fn assert_phases_chain_through_the_run(text: &str) {
    let figures = husk_tests::bench::Figure::parse_all(text);
    let phases: Vec<_> = figures.iter().filter(|f| f.name.starts_with("ctr_run_phase_")).collect();
    for phase in [
        "shim_serving",
        "task_create",
        "guest_image_checked",
        "vm_created",
        "kernel_entered",
        "agent_started",
        "agent_ready",
        "agent_connected",
        "sandbox_created",
        "container_shared",
        "container_created",
        "container_started",
        "exit_seen",
        "vm_gone",
        "container_deleted",
        "exited",
    ] {
        let name = format!("ctr_run_phase_{phase}_ms");
        let figure = phases.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no {name}: {text}"));
        // The start's reply and the exit (of `true`, at once) reach the shim on different tasks:
        // their marks may swap by a few milliseconds.
        assert!(figure.samples.iter().all(|&ms| ms >= -20.0), "{name} went back in time: {figure:?}");
    }
    let total: f64 = phases.iter().map(|f| f.samples[0]).sum();
    let run = figures.iter().find(|f| f.name == "ctr_run_ms").map(|f| f.samples[0]).unwrap_or_default();
    assert!((total - run).abs() < 50.0, "the phases add up to {total:.1} ms, the run took {run:.1}: {text}");
}

/// The CRI benchmarks, run one after another beside one containerd in one boot of the test host
/// (on first use); each test reads its own.
static CRI_BENCHES: OnceLock<BatchOutput> = OnceLock::new();

fn cri_bench(name: &str) -> &'static Output {
    CRI_BENCHES.get_or_init(run_cri_benches).get(name)
}

fn run_cri_benches() -> BatchOutput {
    let (busybox, pause) = (ImageTar::busybox("cribench"), ImageTar::pause("cribench"));
    // Each probe takes its options, containerd's address, a log directory and a size.
    let bench = |name: &'static str, probe: &str, options: &str, size: &str| {
        let script = format!(
            "logs=$(mktemp -d); {} {options} \"$CONTAINERD_ADDRESS\" $logs {size}; status=$?; rm -rf $logs; exit $status",
            target_bin(probe).display()
        );
        BatchCommand::new(name, &["sh", "-c", &script])
    };
    let benches = [
        bench("pod", "husk-cri-pod", "--bench 1", ""),
        // 4 MiB per transfer (make bench moves 32): the figures' shape is what this checks, and
        // the emulated test host is slow and fault-prone under long transfers (docs/performance.md).
        bench("net", "husk-cri-net", "--bench", "4"),
        bench("density", "husk-cri-density", "--rounds 1", "2"),
    ];
    let script = format!(
        "{imports} || exit 1\n{}",
        batch_script(&benches),
        imports = import_command(&[&busybox, &pause], true)
    );
    BatchOutput::split(run_beside_containerd(true, CRI_BUDGET, &["sh", "-c", &script]))
}

#[test]
fn the_cri_pod_benchmark_prints_pod_start_beside_runc() {
    let output = cri_bench("pod");
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    assert_figure_beside_baseline(
        &String::from_utf8_lossy(&output.stdout),
        "pod_start_ms",
        "runc_pod_start_ms",
    );
    assert_figure_records(&String::from_utf8_lossy(&output.stdout), &["pod_start_ms"]);
}

#[test]
fn the_pod_network_benchmark_prints_throughput_and_round_trip_beside_runc() {
    let output = cri_bench("net");
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert_figure_beside_baseline(&text, "net_mb_per_s", "runc_net_mb_per_s");
    assert_figure_beside_baseline(&text, "net_rtt_us", "runc_net_rtt_us");
    assert_figure_records(&text, &["net_mb_per_s", "net_rtt_us"]);
}

#[test]
fn the_density_benchmark_prints_all_running_memory_and_per_pod_start_beside_runc() {
    let output = cri_bench("density");
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
    let text = String::from_utf8_lossy(&output.stdout);
    let figures = ["density_2_start_ms", "density_2_mem_mib", "density_2_pod_start_ms"];
    for figure in ["density_2_start_ms", "density_2_pod_start_ms"] {
        assert_figure_beside_baseline(&text, figure, &format!("runc_{figure}"));
    }
    // Two runc pods take a few MiB of the node's memory, within its noise (it read -2 once in
    // `make flaky`): the baseline must be measured, not positive.
    assert_figure_beside_noisy_baseline(&text, "density_2_mem_mib", "runc_density_2_mem_mib");
    assert_figure_records(&text, &figures);
}
