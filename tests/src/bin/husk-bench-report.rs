//! `husk-bench-report --out DIR [--expect NAME,...] LOG...`: collects the figures the benchmarks
//! printed (`BENCH {json}` lines, `husk_tests::bench::Figure`) from their logs and writes
//! `DIR/report.json` (one record per figure: median, spread, samples, unit, start and end points,
//! the baseline beside it, where the VM ran, the machine) and `DIR/report.md` (a table, and one SVG
//! strip plot per figure in `DIR/plots/` with every sample of Husk and of its baseline). Exits
//! non-zero when a figure named in `--expect` is missing or has no baseline, or one named in
//! `--expect-alone` (figures with nothing to compare against) is missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_shim::phases::Phase;
use husk_tests::bench::{spread, Figure, TRUSTWORTHY_SPREAD};
use serde_json::json;

#[derive(Debug, Parser)]
struct Cli {
    /// Where report.json, report.md and plots/ go.
    #[arg(long)]
    out: PathBuf,
    /// Figures that must be present, each with its baseline (comma separated).
    #[arg(long, value_delimiter = ',')]
    expect: Vec<String>,
    /// Figures that must be present, with no baseline to compare (comma separated).
    #[arg(long, value_delimiter = ',')]
    expect_alone: Vec<String>,
    /// Benchmark logs.
    logs: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Later runs of a figure replace earlier ones; the report is ordered by name.
    let mut figures = BTreeMap::new();
    for log in &cli.logs {
        let text = std::fs::read_to_string(log).with_context(|| format!("{}", log.display()))?;
        for figure in Figure::parse_all(&text) {
            figures.insert(figure.name.clone(), figure);
        }
    }
    if figures.is_empty() {
        bail!("no figures (BENCH lines) in {:?}", cli.logs);
    }
    std::fs::create_dir_all(cli.out.join("plots")).with_context(|| format!("{}", cli.out.display()))?;
    let machine = machine();
    let records: Vec<_> = figures.values().map(|figure| record(figure, &machine)).collect();
    let report = json!({ "machine": machine, "figures": records });
    write(&cli.out.join("report.json"), &serde_json::to_string_pretty(&report)?)?;
    for figure in figures.values() {
        write(&cli.out.join("plots").join(format!("{}.svg", figure.name)), &strip_plot(figure))?;
    }
    let phases = phase_bars(&figures);
    if let Some(svg) = &phases {
        write(&cli.out.join("plots").join(PHASE_PLOT), svg)?;
    }
    write(&cli.out.join("report.md"), &markdown(&figures, &machine, phases.is_some()))?;
    println!("report: {} figures in {}", figures.len(), cli.out.join("report.md").display());
    let missing: Vec<&String> = cli
        .expect
        .iter()
        .filter(|name| figures.get(*name).is_none_or(|f| f.baseline.is_none() || f.samples.is_empty()))
        .chain(cli.expect_alone.iter().filter(|name| figures.get(*name).is_none_or(|f| f.samples.is_empty())))
        .collect();
    if !missing.is_empty() {
        bail!("figures missing or without a baseline: {missing:?}");
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1)).unwrap_or("?");
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({ "cpu": cpu.trim(), "cores": cores, "mem_mib": mem_kib / 1024, "kernel": kernel.trim() })
}

fn stats(samples: &[f64]) -> serde_json::Value {
    let (median, min, max) = spread(samples);
    json!({ "value": median, "min": min, "max": max, "n": samples.len(), "samples": samples })
}

fn record(figure: &Figure, machine: &serde_json::Value) -> serde_json::Value {
    let mut record = stats(&figure.samples);
    record["name"] = json!(figure.name);
    record["unit"] = json!(figure.unit);
    record["start"] = json!(figure.start);
    record["end"] = json!(figure.end);
    record["higher_is_better"] = json!(figure.higher_is_better);
    record["vm_host"] = json!(figure.vm_host);
    record["hardware_kvm"] = json!(!figure.vm_host.contains("test host"));
    record["machine"] = machine.clone();
    record["trustworthy"] = json!(figure.trustworthy());
    record["ratio"] = json!(figure.ratio());
    if let Some(baseline) = &figure.baseline {
        let mut b = stats(&baseline.samples);
        b["name"] = json!(baseline.name);
        b["what"] = json!(baseline.what);
        record["baseline"] = b;
    }
    record
}

fn markdown(figures: &BTreeMap<String, Figure>, machine: &serde_json::Value, phase_plot: bool) -> String {
    let mut md = String::from("# Husk benchmark report\n\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} MiB, kernel {}). VM host: {}.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["mem_mib"],
        machine["kernel"].as_str().unwrap_or("?"),
        figures.values().next().map_or("?", |f| f.vm_host.as_str()),
    );
    let _ = writeln!(
        md,
        "Medians with min-max and sample count; the ratio is Husk over its baseline from the same run. \
         A figure is marked *wide* when max-min exceeds {:.0}% of its median or it has fewer than 3 \
         samples: do not trust its ratio.\n",
        TRUSTWORTHY_SPREAD * 100.0
    );
    md.push_str("| figure | Husk | baseline | ratio | from → to |\n|---|---|---|---|---|\n");
    for figure in figures.values() {
        let cell = |samples: &[f64]| {
            let (median, min, max) = spread(samples);
            format!("{median:.2} {} ({min:.2}–{max:.2}, n={})", figure.unit, samples.len())
        };
        let baseline =
            figure.baseline.as_ref().map_or("-".into(), |b| format!("{}: {}", b.what, cell(&b.samples)));
        let ratio = figure.ratio().map_or("-".into(), |r| format!("{r:.2}"));
        let trust = if figure.trustworthy() { "" } else { " *wide*" };
        let _ = writeln!(
            md,
            "| `{}` | {}{trust} | {baseline} | {ratio} | {} → {} |",
            figure.name,
            cell(&figure.samples),
            figure.start,
            figure.end
        );
    }
    if phase_plot {
        let _ = writeln!(
            md,
            "\n## `ctr run`, phase by phase\n\nMedians of `ctr_run_phase_*_ms`, stacked in their order, \
             beside runc's whole `ctr run` (its shim has no phases).\n\n![phases](plots/{PHASE_PLOT})"
        );
    }
    md.push_str("\n## Distributions\n\n");
    for figure in figures.values() {
        let better = if figure.higher_is_better { "higher is better" } else { "lower is better" };
        let _ = writeln!(md, "### `{}` ({better})\n\n![{0}](plots/{0}.svg)\n", figure.name);
    }
    md
}

/// The stacked phase bars' file in `plots/`.
const PHASE_PLOT: &str = "ctr_run_phases.svg";

/// One bar per configuration of `ctr run` on one axis from 0: Husk's phases (the medians of its
/// `ctr_run_phase_*_ms` figures, stacked in the phases' order, each labelled below) and runc's
/// whole run. None without phase figures.
fn phase_bars(figures: &BTreeMap<String, Figure>) -> Option<String> {
    let names = Phase::ALL.iter().map(|p| p.name()).chain(std::iter::once("exited"));
    let segments: Vec<(&str, f64)> = names
        .filter_map(|phase| {
            let figure = figures.get(&format!("ctr_run_phase_{phase}_ms"))?;
            Some((phase, spread(&figure.samples).0.max(0.0)))
        })
        .collect();
    if segments.is_empty() {
        return None;
    }
    let runc = figures.get("ctr_run_ms").and_then(|f| f.baseline.as_ref()).map(|b| spread(&b.samples).0);
    let husk_total: f64 = segments.iter().map(|(_, ms)| ms).sum();
    let max = husk_total.max(runc.unwrap_or(0.0)).max(f64::MIN_POSITIVE);
    let (width, left, right) = (760.0, 70.0, 20.0);
    let scale = |ms: f64| ms / (max * 1.05) * (width - left - right);
    let colors = ["#c0392b", "#2980b9", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#f39c12"];
    let height = 120.0 + 16.0 * segments.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">ctr run, phase by phase (ms, medians)</text>\n\
         <text x=\"10\" y=\"49\">husk</text>\n"
    );
    let mut x = left;
    for (i, (phase, ms)) in segments.iter().enumerate() {
        let color = colors[i % colors.len()];
        let w = scale(*ms);
        let _ =
            writeln!(svg, "<rect x=\"{x:.1}\" y=\"35\" width=\"{w:.1}\" height=\"20\" fill=\"{color}\"/>");
        let y = 110.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{left}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/>",
            y - 9.0
        );
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{y}\">{phase}: {ms:.1}</text>", left + 16.0);
        x += w;
    }
    let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"49\">{husk_total:.0}</text>", x + 4.0);
    if let Some(runc) = runc {
        let w = scale(runc);
        let _ = writeln!(svg, "<text x=\"10\" y=\"79\">runc</text>");
        let _ =
            writeln!(svg, "<rect x=\"{left}\" y=\"65\" width=\"{w:.1}\" height=\"20\" fill=\"#2c3e50\"/>");
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"79\">{runc:.0}</text>", left + w + 4.0);
    }
    svg.push_str("</svg>\n");
    Some(svg)
}

/// Every sample of Husk (top row) and of the baseline (bottom row) on one axis from 0, with each
/// median marked.
fn strip_plot(figure: &Figure) -> String {
    let (width, left, right, row) = (640.0, 110.0, 20.0, 40.0);
    let baseline = figure.baseline.as_ref();
    let rows: Vec<(&str, &[f64], &str)> = std::iter::once(("husk", figure.samples.as_slice(), "#c0392b"))
        .chain(baseline.map(|b| (b.what.as_str(), b.samples.as_slice(), "#2c3e50")))
        .collect();
    let max =
        rows.iter().flat_map(|(_, s, _)| s.iter()).copied().fold(0.0_f64, f64::max).max(f64::MIN_POSITIVE);
    let scale = |v: f64| left + (v / (max * 1.05)) * (width - left - right);
    let height = 40.0 + row * rows.len() as f64 + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">{} ({})</text>\n",
        figure.name, figure.unit
    );
    for (i, (label, samples, color)) in rows.iter().enumerate() {
        let y = 50.0 + row * i as f64;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">{label}</text>", y + 4.0);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>",
            width - right
        );
        for value in samples.iter() {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{y}\" r=\"4\" fill=\"{color}\" fill-opacity=\"0.6\"/>",
                scale(*value)
            );
        }
        let median = spread(samples).0;
        if median.is_finite() {
            let x = scale(median);
            let _ = writeln!(svg, "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\"/>", y - 10.0, y + 10.0);
            let _ = writeln!(
                svg,
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"{color}\">{median:.2}</text>",
                y - 13.0
            );
        }
    }
    let axis = height - 25.0;
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{axis}\" x2=\"{}\" y2=\"{axis}\" stroke=\"black\"/>",
        width - right
    );
    for tick in 0..=4 {
        let value = max * 1.05 * f64::from(tick) / 4.0;
        let x = scale(value);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{axis}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"black\"/>",
            axis + 4.0
        );
        // The last label ends at its tick, inside the picture.
        let anchor = if tick == 4 { "end" } else { "middle" };
        let _ = writeln!(
            svg,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{value:.1}</text>",
            axis + 17.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
