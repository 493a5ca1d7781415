//! Reading a container's cgroup: the figures of StatsContainer and the OOM-kill counter the OOM
//! watcher follows, on cgroup v2 (the guest) and v1 (host mode on a legacy or hybrid host). Only
//! files every kernel that has the controller provides are read; one that is missing (a
//! controller the kernel lacks, such as io without CONFIG_BLK_CGROUP) reads as zero.

use std::path::{Path, PathBuf};

/// Where the cgroup hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// The unified hierarchy: one directory.
    V2(PathBuf),
    /// Per-controller hierarchies: `<root>/<controller>/<path>`.
    V1 { root: PathBuf, path: PathBuf },
}

/// What StatsContainer reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_usage_bytes: u64,
    /// 0 when there is no limit.
    pub memory_limit_bytes: u64,
    pub memory_max_usage_bytes: u64,
    pub pids_current: u64,
    /// 0 when there is no limit.
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_kills: u64,
}

impl Cgroup {
    /// The cgroup at `cgroups_path` (the OCI `linux.cgroupsPath`) on this machine's hierarchy.
    pub fn locate(cgroups_path: &Path) -> Cgroup {
        Cgroup::locate_under(Path::new(CGROUP_ROOT), cgroups_path)
    }

    fn locate_under(root: &Path, cgroups_path: &Path) -> Cgroup {
        let relative = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path).to_path_buf();
        if root.join("cgroup.controllers").exists() {
            Cgroup::V2(root.join(relative))
        } else {
            Cgroup::V1 { root: root.to_path_buf(), path: relative }
        }
    }

    fn file(&self, controller: &str, name: &str) -> PathBuf {
        match self {
            Cgroup::V2(dir) => dir.join(name),
            Cgroup::V1 { root, path } => root.join(controller).join(path).join(name),
        }
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_kills(&self) -> u64 {
        match self {
            Cgroup::V2(_) => keyed(&self.file("memory", "memory.events"), "oom_kill"),
            Cgroup::V1 { .. } => keyed(&self.file("memory", "memory.oom_control"), "oom_kill"),
        }
    }

    pub fn stats(&self) -> CgroupStats {
        match self {
            Cgroup::V2(_) => self.stats_v2(),
            Cgroup::V1 { .. } => self.stats_v1(),
        }
    }

    fn stats_v2(&self) -> CgroupStats {
        let cpu = self.file("cpu", "cpu.stat");
        let (io_read_bytes, io_write_bytes) = io_stat_v2(&read(&self.file("io", "io.stat")));
        CgroupStats {
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            memory_usage_bytes: value(&self.file("memory", "memory.current")),
            memory_limit_bytes: value(&self.file("memory", "memory.max")),
            memory_max_usage_bytes: value(&self.file("memory", "memory.peak")),
            pids_current: value(&self.file("pids", "pids.current")),
            pids_limit: value(&self.file("pids", "pids.max")),
            io_read_bytes,
            io_write_bytes,
            oom_kills: self.oom_kills(),
        }
    }

    fn stats_v1(&self) -> CgroupStats {
        // cpuacct.stat counts USER_HZ ticks (100 per second on Linux).
        let ticks = self.file("cpuacct", "cpuacct.stat");
        let limit = value(&self.file("memory", "memory.limit_in_bytes"));
        let (io_read_bytes, io_write_bytes) =
            io_stat_v1(&read(&self.file("blkio", "blkio.throttle.io_service_bytes")));
        CgroupStats {
            cpu_usage_usec: value(&self.file("cpuacct", "cpuacct.usage")) / 1000,
            cpu_user_usec: keyed(&ticks, "user") * 10_000,
            cpu_system_usec: keyed(&ticks, "system") * 10_000,
            memory_usage_bytes: value(&self.file("memory", "memory.usage_in_bytes")),
            // v1 says "no limit" with the largest page-aligned value.
            memory_limit_bytes: if limit >= i64::MAX as u64 / 2 { 0 } else { limit },
            memory_max_usage_bytes: value(&self.file("memory", "memory.max_usage_in_bytes")),
            pids_current: value(&self.file("pids", "pids.current")),
            pids_limit: value(&self.file("pids", "pids.max")),
            io_read_bytes,
            io_write_bytes,
            oom_kills: self.oom_kills(),
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A single-value file; "max" (no limit) and anything unreadable are 0.
fn value(path: &Path) -> u64 {
    read(path).trim().parse().unwrap_or(0)
}

/// The value of `key` in a flat keyed file (`key value` lines).
fn keyed(path: &Path, key: &str) -> u64 {
    read(path)
        .lines()
        .find_map(|line| {
            line.split_once(' ').filter(|(k, _)| *k == key).and_then(|(_, v)| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Read and written bytes summed over the devices of a v2 `io.stat`
/// (`8:0 rbytes=1 wbytes=2 rios=...` lines).
fn io_stat_v2(text: &str) -> (u64, u64) {
    let field =
        |word: &str, name: &str| word.strip_prefix(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    text.split_whitespace()
        .fold((0, 0), |(r, w), word| (r + field(word, "rbytes="), w + field(word, "wbytes=")))
}

/// Read and written bytes summed over the devices of v1's `blkio.throttle.io_service_bytes`
/// (`8:0 Read 4096` lines).
fn io_stat_v1(text: &str) -> (u64, u64) {
    text.lines().fold((0, 0), |(r, w), line| {
        let mut words = line.split_whitespace().skip(1);
        match (words.next(), words.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("Read"), Some(bytes)) => (r + bytes, w),
            (Some("Write"), Some(bytes)) => (r, w + bytes),
            _ => (r, w),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_files_are_read_and_missing_ones_are_zero() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let dir = root.path().join("husk/c1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n").unwrap();
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n").unwrap();
        std::fs::write(dir.join("pids.current"), "3\n").unwrap();
        std::fs::write(dir.join("pids.max"), "20\n").unwrap();
        std::fs::write(dir.join("io.stat"), "8:0 rbytes=100 wbytes=10 rios=1\n8:16 rbytes=5 wbytes=1\n")
            .unwrap();
        let cgroup = Cgroup::locate_under(root.path(), Path::new("/husk/c1"));
        assert_eq!(cgroup, Cgroup::V2(dir));
        let stats = cgroup.stats();
        assert_eq!((stats.cpu_usage_usec, stats.cpu_user_usec, stats.cpu_system_usec), (1500, 1000, 500));
        assert_eq!(
            (stats.memory_usage_bytes, stats.memory_limit_bytes, stats.memory_max_usage_bytes),
            (4096, 0, 0)
        );
        assert_eq!((stats.pids_current, stats.pids_limit, stats.oom_kills), (3, 20, 1));
        assert_eq!((stats.io_read_bytes, stats.io_write_bytes), (105, 11));
    }

    #[test]
    fn v1_files_are_read_per_controller() {
        let root = tempfile::tempdir().unwrap();
        let file = |controller: &str, name: &str, text: &str| {
            let dir = root.path().join(controller).join("husk/c1");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), text).unwrap();
        };
        file("cpuacct", "cpuacct.usage", "2000000\n");
        file("cpuacct", "cpuacct.stat", "user 10\nsystem 5\n");
        file("memory", "memory.usage_in_bytes", "8192\n");
        file("memory", "memory.limit_in_bytes", "9223372036854771712\n");
        file("memory", "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n");
        file("pids", "pids.current", "1\n");
        file("blkio", "blkio.throttle.io_service_bytes", "8:0 Read 4096\n8:0 Write 512\nTotal 4608\n");
        let cgroup = Cgroup::locate_under(root.path(), Path::new("husk/c1"));
        let stats = cgroup.stats();
        assert_eq!(
            (stats.cpu_usage_usec, stats.cpu_user_usec, stats.cpu_system_usec),
            (2000, 100_000, 50_000)
        );
        assert_eq!((stats.memory_usage_bytes, stats.memory_limit_bytes), (8192, 0), "no limit reads as 0");
        assert_eq!((stats.oom_kills, stats.pids_current, stats.pids_limit), (2, 1, 0));
        assert_eq!((stats.io_read_bytes, stats.io_write_bytes), (4096, 512));
    }
}
