//! What the benchmarks share: summary statistics, how to name where they ran, and [`Figure`], the
//! record every benchmark emits for the report (`husk-bench-report`, `make bench`).
//!
//! A benchmark prints its human-readable lines as before and, per figure, one line
//! `BENCH {json}` ([`Figure::emit`]): the samples of Husk and of the baseline measured in the same
//! run, the unit, and the start and end points, so the report can show distributions, not only
//! medians.

use serde::{Deserialize, Serialize};

/// The prefix of a figure's machine-readable line.
pub const RECORD_PREFIX: &str = "BENCH ";

/// A spread wider than this fraction of the median (max - min over median, with at least three
/// samples) is reported as too wide to trust.
pub const TRUSTWORTHY_SPREAD: f64 = 0.5;

/// One named figure of a run, beside its baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// e.g. `ctr_run_ms`.
    pub name: String,
    /// e.g. `ms`, `MiB`, `MB/s`.
    pub unit: String,
    /// Where the measurement starts and ends, as Firecracker states its figures.
    pub start: String,
    pub end: String,
    /// Whether a larger value is better (throughput) or worse (latency, memory).
    pub higher_is_better: bool,
    pub samples: Vec<f64>,
    pub baseline: Option<Baseline>,
    /// Where the VM ran ([`vm_host_description`]).
    pub vm_host: String,
}

/// The same measurement of the baseline (runc, QEMU microvm, the host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// e.g. `runc_ctr_run_ms`.
    pub name: String,
    /// e.g. `runc`.
    pub what: String,
    pub samples: Vec<f64>,
}

impl Figure {
    /// A figure with no samples yet, measured from `start` to `end`.
    pub fn new(name: &str, unit: &str, start: &str, end: &str) -> Figure {
        Figure {
            name: name.into(),
            unit: unit.into(),
            start: start.into(),
            end: end.into(),
            higher_is_better: unit.ends_with("/s"),
            samples: Vec::new(),
            baseline: None,
            vm_host: vm_host_description().into(),
        }
    }

    /// The figure with these Husk samples.
    pub fn samples(mut self, samples: &[f64]) -> Figure {
        self.samples = samples.iter().copied().filter(|v| v.is_finite()).collect();
        self
    }

    /// The figure beside `what`'s samples, named `baseline`.
    pub fn beside(mut self, baseline: &str, what: &str, samples: &[f64]) -> Figure {
        let samples = samples.iter().copied().filter(|v| v.is_finite()).collect();
        self.baseline = Some(Baseline { name: baseline.into(), what: what.into(), samples });
        self
    }

    /// Median of the Husk samples over the baseline's.
    pub fn ratio(&self) -> Option<f64> {
        let baseline = spread(&self.baseline.as_ref()?.samples).0;
        let ratio = spread(&self.samples).0 / baseline;
        ratio.is_finite().then_some(ratio)
    }

    /// Whether both sample sets are tight enough to compare (see [`TRUSTWORTHY_SPREAD`]).
    pub fn trustworthy(&self) -> bool {
        let tight = |samples: &[f64]| {
            let (median, min, max) = spread(samples);
            samples.len() >= 3 && median > 0.0 && (max - min) / median <= TRUSTWORTHY_SPREAD
        };
        tight(&self.samples) && self.baseline.as_ref().is_none_or(|b| tight(&b.samples))
    }

    /// Prints the figure's `BENCH {json}` line.
    pub fn emit(&self) {
        match serde_json::to_string(self) {
            Ok(json) => println!("{RECORD_PREFIX}{json}"),
            Err(err) => eprintln!("{}: cannot encode the figure: {err}", self.name),
        }
    }

    /// The figures in `text` (lines starting with [`RECORD_PREFIX`]; others are skipped).
    pub fn parse_all(text: &str) -> Vec<Figure> {
        text.lines()
            .filter_map(|line| line.strip_prefix(RECORD_PREFIX))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect()
    }
}

/// Median, min and max of `values` (`NaN`s when it is empty).
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    (median, sorted[0], sorted[n - 1])
}

/// Where the VM ran, for a report's heading: absolute figures from the nested test host are
/// emulated and only their ratios mean something.
pub fn vm_host_description() -> &'static str {
    if std::env::var_os("HUSK_IN_TESTHOST").is_some() {
        "nested test host (QEMU TCG + kvm-amd): compare ratios, not absolute figures"
    } else {
        "this machine's KVM"
    }
}

/// The node's `MemAvailable` in KiB (what the memory benchmarks compare before and after).
pub fn mem_available_kib() -> anyhow::Result<u64> {
    meminfo_kib("MemAvailable")
}

/// One figure of /proc/meminfo (`key` as `MemTotal`), in KiB.
pub fn meminfo_kib(key: &str) -> anyhow::Result<u64> {
    use anyhow::Context;
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_round_trips_through_its_line_and_judges_its_spread() {
        let figure = Figure::new("ctr_run_ms", "ms", "ctr run invoked", "ctr exited")
            .samples(&[10.0, 11.0, 12.0])
            .beside("runc_ctr_run_ms", "runc", &[5.0, 5.0, 6.0]);
        assert!(!figure.higher_is_better);
        assert_eq!(figure.ratio(), Some(11.0 / 5.0));
        assert!(figure.trustworthy());
        let text = format!("noise\n{RECORD_PREFIX}{}\nmore", serde_json::to_string(&figure).unwrap());
        assert_eq!(Figure::parse_all(&text), vec![figure.clone()]);
        let wide = figure.samples(&[1.0, 10.0, 20.0]);
        assert!(!wide.trustworthy(), "max-min is 1.9x the median");
        assert!(!Figure::new("x", "MB/s", "a", "b").samples(&[1.0]).trustworthy(), "one sample");
        assert!(Figure::new("x", "MB/s", "a", "b").higher_is_better);
    }

    #[test]
    fn spread_takes_the_middle_of_odd_and_even_samples() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(spread(&[]).0.is_nan());
    }
}
