//! A pod start and teardown, phase by phase, from the shim's phase lines in containerd's log
//! (`husk_shim::phases`): the intervals between consecutive phases of one `ctr run`, each with its
//! named start and end points, for the benchmarks' figures.

use std::time::{SystemTime, UNIX_EPOCH};

use husk_shim::phases::{Phase, PhaseLine};

/// One interval of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    /// `ctr_run_phase_<end>_ms`.
    pub name: String,
    pub start: String,
    pub end: String,
    pub ms: f64,
}

/// The intervals of the run whose pod is `sandbox` (containerd's namespace, a dash, the pod's id),
/// invoked and exited at those wall-clock moments: from the invocation to the first phase the run
/// reached, between consecutive phases (in [`Phase::ALL`]'s order, skipping those it did not
/// reach), and from the last to the exit.
pub fn intervals(log: &str, sandbox: &str, invoked: SystemTime, exited: SystemTime) -> Vec<Interval> {
    let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let lines: Vec<PhaseLine> =
        log.lines().filter_map(PhaseLine::parse).filter(|line| line.sandbox == sandbox).collect();
    let reached = Phase::ALL.into_iter().filter_map(|phase| {
        // The first time the run reached it (a pod's phases are marked once per container).
        let at = lines.iter().filter(|line| line.phase == phase).map(|line| line.at).min()?;
        Some((format!("phase {}", phase.name()), format!("ctr_run_phase_{}_ms", phase.name()), at))
    });
    let mut points: Vec<(String, String, std::time::Duration)> =
        vec![("`ctr run` invoked".into(), String::new(), since_epoch(invoked))];
    points.extend(reached);
    if points.len() == 1 {
        return Vec::new();
    }
    points.push(("`ctr run` exited".into(), "ctr_run_phase_exited_ms".into(), since_epoch(exited)));
    points
        .windows(2)
        .map(|pair| Interval {
            name: pair[1].1.clone(),
            start: pair[0].0.clone(),
            end: pair[1].0.clone(),
            ms: (pair[1].2.as_secs_f64() - pair[0].2.as_secs_f64()) * 1000.0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(sandbox: &str, container: &str, phase: &str, unix_ms: u64) -> String {
        format!(
            "2026-12-07T20:00:00Z  INFO husk::phases: pod phase sandbox={sandbox} container={container} phase={phase} unix_us={}\n",
            unix_ms * 1000
        )
    }

    /// Intervals run from the invocation through the phases the run reached, in the phases'
    /// order, to the exit; another pod's lines and a phase marked twice do not count.
    #[test]
    fn a_runs_intervals_chain_its_phases_between_invocation_and_exit() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let log = [
            line("default-b1", "b1", "task_create", 1_100),
            line("default-other", "x", "vm_created", 1_150),
            line("default-b1", "", "vm_created", 1_300),
            line("default-b1", "", "agent_ready", 2_000),
            line("default-b1", "b1", "container_started", 2_500),
            line("default-b1", "b1", "container_started", 2_900),
        ]
        .concat();
        let found = intervals(&log, "default-b1", at(1_000), at(3_000));
        let named: Vec<(&str, f64)> = found.iter().map(|i| (i.name.as_str(), i.ms.round())).collect();
        assert_eq!(
            named,
            [
                ("ctr_run_phase_task_create_ms", 100.0),
                ("ctr_run_phase_vm_created_ms", 200.0),
                ("ctr_run_phase_agent_ready_ms", 700.0),
                ("ctr_run_phase_container_started_ms", 500.0),
                ("ctr_run_phase_exited_ms", 500.0),
            ]
        );
        assert_eq!(
            (found[0].start.as_str(), found[0].end.as_str()),
            ("`ctr run` invoked", "phase task_create")
        );
        assert!(intervals(&log, "default-none", at(1_000), at(3_000)).is_empty());
    }
}
