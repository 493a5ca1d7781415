//! The contract between the Husk host side (shim, VMM) and `husk-agent` inside the guest.
//!
//! Everything both sides must agree on lives here, so a change to it is one change in one place: the
//! agent's announcement on the console, the vsock port of the agent API and the API version. The ttrpc
//! service definitions join this crate with the agent API.

/// Version of the host/agent contract. The guest image manifest records the agent's value and
/// `husk check` refuses an image whose agent speaks another version.
pub const AGENT_API_VERSION: u32 = 1;

/// Guest vsock port on which the agent serves its API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The agent prints one line starting with this prefix on the console once it is ready, followed by
/// `key=value` fields (see [`ReadyLine`]).
pub const READY_PREFIX: &str = "husk-agent: ready";

/// What the agent announces on the console once the guest is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// The agent's crate version.
    pub version: String,
    /// [`AGENT_API_VERSION`] as compiled into the agent.
    pub api: u32,
    /// Online CPUs as the guest kernel lists them (`/sys/devices/system/cpu/online`, e.g. `0-1`).
    pub cpus_online: String,
    /// Guest uptime when the line was printed, in milliseconds.
    pub uptime_ms: u64,
}

impl ReadyLine {
    /// Formats the line the agent prints.
    pub fn render(&self) -> String {
        format!(
            "{READY_PREFIX} version={} api={} cpus_online={} uptime_ms={}",
            self.version, self.api, self.cpus_online, self.uptime_ms
        )
    }

    /// Finds and parses a ready line in console output (the host reads the guest console, which
    /// is guest-controlled text: anything malformed yields `None`).
    pub fn find_in(console: &str) -> Option<ReadyLine> {
        console.lines().find_map(|line| {
            let rest = line.trim_end_matches('\r').split_once(READY_PREFIX)?.1;
            Self::parse_fields(rest)
        })
    }

    fn parse_fields(fields: &str) -> Option<ReadyLine> {
        let (mut version, mut api, mut cpus, mut uptime) = (None, None, None, None);
        for field in fields.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            match key {
                "version" => version = Some(value.to_owned()),
                "api" => api = value.parse().ok(),
                "cpus_online" => cpus = Some(value.to_owned()),
                "uptime_ms" => uptime = value.parse().ok(),
                _ => {}
            }
        }
        Some(ReadyLine { version: version?, api: api?, cpus_online: cpus?, uptime_ms: uptime? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips_through_console_noise() {
        let line = ReadyLine { version: "0.1.0".into(), api: 1, cpus_online: "0-1".into(), uptime_ms: 812 };
        let console = format!("[    0.81] random: crng init done\r\n{}\r\nmore\n", line.render());
        assert_eq!(ReadyLine::find_in(&console), Some(line));
    }

    #[test]
    fn malformed_ready_lines_are_rejected() {
        assert_eq!(ReadyLine::find_in("husk-agent: ready version=1 api=x cpus_online=0 uptime_ms=1"), None);
        assert_eq!(ReadyLine::find_in("husk-agent: ready version=1"), None);
        assert_eq!(ReadyLine::find_in("husk-agent: ready garbage"), None);
        assert_eq!(ReadyLine::find_in(""), None);
    }
}
