//! `husk-bench-report` turns the benchmarks' `BENCH` lines into report.json, report.md and one SVG
//! plot per figure, and fails when an expected figure or its baseline is missing (host only: the
//! benchmarks themselves are tested in bench_*.rs).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use husk_tests::bench::Figure;
use husk_tests::target_bin;

fn log_with_figures() -> String {
    let tight = Figure::new("ctr_run_ms", "ms", "ctr run invoked", "ctr run exited")
        .samples(&[100.0, 110.0, 105.0])
        .beside("runc_ctr_run_ms", "runc", &[50.0, 52.0, 51.0]);
    let wide = Figure::new("net_mb_per_s", "MB/s", "wget starts", "wget done").samples(&[1.0, 9.0]);
    let line = |f: &Figure| format!("BENCH {}", serde_json::to_string(f).unwrap());
    format!("ctr_run_ms=105 runc_ctr_run_ms=51 ratio=2.06\n{}\nnoise\n{}\n", line(&tight), line(&wide))
}

#[test]
fn the_report_has_every_figure_with_its_baseline_ratio_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ctr.log");
    std::fs::write(&log, log_with_figures()).unwrap();
    let out = dir.path().join("bench");
    let status = Command::new(target_bin("husk-bench-report"))
        .args(["--out", out.to_str().unwrap(), "--expect", "ctr_run_ms", log.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let figures = report["figures"].as_array().unwrap();
    let ctr = figures.iter().find(|f| f["name"] == "ctr_run_ms").unwrap();
    assert_eq!((ctr["value"].as_f64(), ctr["n"].as_u64()), (Some(105.0), Some(3)));
    assert_eq!(ctr["baseline"]["what"], "runc");
    assert_eq!(ctr["baseline"]["value"].as_f64(), Some(51.0));
    assert!((ctr["ratio"].as_f64().unwrap() - 105.0 / 51.0).abs() < 1e-9);
    assert_eq!((ctr["start"].as_str(), ctr["trustworthy"].as_bool()), (Some("ctr run invoked"), Some(true)));
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| `ctr_run_ms` |") && md.contains("runc: 51.00 ms"), "{md}");
    assert!(md.contains("*wide*"), "two spread-out samples are flagged: {md}");
    assert!(md.contains("![ctr_run_ms](plots/ctr_run_ms.svg)"), "{md}");
    let svg = std::fs::read_to_string(out.join("plots/ctr_run_ms.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<circle").count(), 6, "every sample of Husk and runc is a dot");
}

#[test]
fn a_missing_figure_or_baseline_fails_the_report_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("net.log");
    std::fs::write(&log, log_with_figures()).unwrap();
    let output = Command::new(target_bin("husk-bench-report"))
        .args(["--out", dir.path().join("bench").to_str().unwrap()])
        .args(["--expect", "net_mb_per_s,pod_start_ms", log.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("net_mb_per_s") && stderr.contains("pod_start_ms"), "{stderr}");
}

#[test]
fn a_figure_with_nothing_to_compare_against_is_expected_alone() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("boot.log");
    std::fs::write(&log, log_with_figures()).unwrap();
    let status = Command::new(target_bin("husk-bench-report"))
        .args(["--out", dir.path().join("bench").to_str().unwrap()])
        .args(["--expect", "ctr_run_ms", "--expect-alone", "net_mb_per_s", log.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Phase figures of `ctr run` are drawn as one stacked bar per configuration: Husk's phases in
/// their order (not the figures' alphabetical one), runc's whole run beside it.
#[test]
fn ctr_runs_phases_are_stacked_in_their_order_beside_runcs_run() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ctr.log");
    let line = |name: &str, ms: f64| {
        let figure = Figure::new(name, "ms", "the phase before", "this phase").samples(&[ms]);
        format!("BENCH {}\n", serde_json::to_string(&figure).unwrap())
    };
    let phases = [("ctr_run_phase_vm_created_ms", 30.0), ("ctr_run_phase_agent_ready_ms", 50.0)];
    let text: String = phases.iter().map(|(name, ms)| line(name, *ms)).collect();
    std::fs::write(&log, format!("{}{text}", log_with_figures())).unwrap();
    let out = dir.path().join("bench");
    let status = Command::new(target_bin("husk-bench-report"))
        .args(["--out", out.to_str().unwrap(), log.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("![phases](plots/ctr_run_phases.svg)"), "{md}");
    let svg = std::fs::read_to_string(out.join("plots/ctr_run_phases.svg")).unwrap();
    let (vm, agent) = (svg.find("vm_created: 30.0").unwrap(), svg.find("agent_ready: 50.0").unwrap());
    assert!(vm < agent, "vm_created comes first: {svg}");
    assert!(svg.contains(">runc<") && svg.contains(">51<"), "runc's run beside: {svg}");
    assert!(svg.contains(">80<"), "Husk's phases add up: {svg}");
}
