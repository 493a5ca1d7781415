//! `ctr task metrics` and the CRI stats: the agent's cgroup figures of a container, as the
//! cgroup v2 `Metrics` message containerd decodes (by its type URL).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use husk_protocols::agent::ContainerStats;

use super::error::ShimError;

/// The type URL containerd registers for cgroup v2 metrics.
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// `stats` as containerd's cgroup v2 metrics.
pub fn to_metrics(stats: &ContainerStats) -> Metrics {
    Metrics {
        pids: Some(PidsStat { current: stats.pids_current, limit: stats.pids_limit, ..Default::default() })
            .into(),
        cpu: Some(CPUStat {
            usage_usec: stats.cpu_usage_usec,
            user_usec: stats.cpu_user_usec,
            system_usec: stats.cpu_system_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            usage: stats.memory_usage_bytes,
            usage_limit: stats.memory_limit_bytes,
            max_usage: stats.memory_max_usage_bytes,
            ..Default::default()
        })
        .into(),
        io: Some(IOStat {
            usage: vec![IOEntry {
                rbytes: stats.io_read_bytes,
                wbytes: stats.io_write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents { oom_kill: stats.oom_kills, ..Default::default() }).into(),
        ..Default::default()
    }
}

/// `stats` packed for a StatsResponse.
pub fn to_any(stats: &ContainerStats) -> Result<Any, ShimError> {
    let value = to_metrics(stats)
        .write_to_bytes()
        .map_err(|err| ShimError::InvalidArgument(format!("encoding metrics: {err}")))?;
    Ok(Any { type_url: METRICS_V2_TYPE_URL.to_owned(), value, ..Default::default() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn guest_figures_land_in_the_fields_ctr_prints() {
        let stats = ContainerStats {
            cpu_usage_usec: 1500,
            memory_usage_bytes: 4 << 20,
            memory_limit_bytes: 64 << 20,
            pids_current: 2,
            pids_limit: 32,
            oom_kills: 1,
            ..Default::default()
        };
        let any = to_any(&stats).unwrap();
        assert_eq!(any.type_url, METRICS_V2_TYPE_URL);
        let metrics = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(metrics.cpu.usage_usec, 1500);
        assert_eq!((metrics.memory.usage, metrics.memory.usage_limit), (4 << 20, 64 << 20));
        assert_eq!((metrics.pids.current, metrics.pids.limit), (2, 32));
        assert_eq!(metrics.memory_events.oom_kill, 1);
    }
}
