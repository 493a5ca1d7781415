//! The contract between the Husk host side (shim, VMM) and `husk-agent` inside the guest.
//!
//! Everything both sides must agree on lives here, so a change to it is one change in one place: the
//! agent's announcement on the console, the guest event port, the vsock ports and the API version,
//! and the agent API itself ([`agent`] messages and the [`agent_ttrpc`] service, generated at build
//! time from `protos/agent.proto`; `README.md` documents each call).

/// Messages of the agent API (generated from `protos/agent.proto`).
#[allow(
    unused,
    nonstandard_style,
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::undocumented_unsafe_blocks)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/generated/agent.rs"));
}

/// The agent API's ttrpc client and server (generated from `protos/agent.proto`).
#[allow(
    unused,
    nonstandard_style,
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::undocumented_unsafe_blocks)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/generated/agent_ttrpc.rs"));
}

/// Version of the host/agent contract. The guest image manifest records the agent's value and
/// `husk check` refuses an image whose agent speaks another version.
pub const AGENT_API_VERSION: u32 = 1;

/// Guest vsock port on which the agent serves its API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Guest vsock port that takes the standard streams of containers and exec'd processes: the host
/// opens one stream per stdin/stdout/stderr and names it with a [`StdioHello`] line.
pub const STDIO_VSOCK_PORT: u32 = 1025;

/// Guest vsock port of the agent's port forwarding (`kubectl port-forward`): the host opens one
/// stream per forwarded TCP connection and names its target with a [`ForwardRequest`] line; the
/// stream then carries that connection's bytes both ways.
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// The mount options of a container's spec (`mounts[].options`) that the agent's runtime applies
/// in the guest: what the shim reports to containerd as the runtime's `mountOptions` feature
/// (containerd offers recursive read-only volumes only to a runtime that lists `rro`). The
/// agent's tests check every one against its runtime's parser.
pub const GUEST_MOUNT_OPTIONS: &[&str] = &[
    // mount(2) flags and propagation
    "defaults",
    "ro",
    "rw",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "sync",
    "async",
    "dirsync",
    "remount",
    "mand",
    "nomand",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "bind",
    "rbind",
    "unbindable",
    "runbindable",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    // mount_setattr(2) over the whole tree: recursive read-only and its kin
    "rro",
    "rrw",
    "rnosuid",
    "rsuid",
    "rnodev",
    "rdev",
    "rnoexec",
    "rexec",
    "rnodiratime",
    "rdiratime",
    "rrelatime",
    "rnorelatime",
    "rnoatime",
    "ratime",
    "rstrictatime",
    "rnostrictatime",
    "rnosymfollow",
    "rsymfollow",
];

/// The guest loopback port a forwarded connection goes to: `tcp4 PORT` (127.0.0.1) or
/// `tcp6 PORT` (::1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardRequest {
    pub ipv6: bool,
    pub port: u16,
}

impl ForwardRequest {
    /// The longest request line, newline included.
    pub const MAX_LEN: usize = "tcp6 65535\n".len();

    /// The line as sent, newline included.
    pub fn render(&self) -> String {
        format!("{} {}\n", if self.ipv6 { "tcp6" } else { "tcp4" }, self.port)
    }

    /// Parses a line (without its newline); port 0 is refused.
    pub fn parse(line: &str) -> Option<ForwardRequest> {
        let (family, text) = line.split_once(' ')?;
        let ipv6 = match family {
            "tcp4" => false,
            "tcp6" => true,
            _ => return None,
        };
        // Digits only, as rendered (u16's parser also takes a sign).
        let port = text.parse::<u16>().ok().filter(|port| *port != 0 && port.to_string() == text)?;
        Some(ForwardRequest { ipv6, port })
    }

    /// The guest address the connection is made to.
    pub fn target(&self) -> std::net::SocketAddr {
        let ip: std::net::IpAddr = if self.ipv6 {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        std::net::SocketAddr::new(ip, self.port)
    }
}

/// Where the agent mounts the pod's shared file system in the guest (CreateSandbox): the host
/// names shared rootfs and volumes below it in the specs it sends.
pub const GUEST_SHARED_DIR: &str = "/run/husk/shared";

/// I/O port on which the guest reports events to the VMM with one-byte writes of a
/// [`GuestEvent`] (the agent uses it; the VMM's boot timer and poweroff detection listen).
pub const GUEST_EVENT_PORT: u16 = 0x440;

/// Values written to [`GUEST_EVENT_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GuestEvent {
    /// The agent is up: the end point of the boot time the VMM measures.
    Ready = 1,
    /// The guest is powering off (file systems are synced): the VMM ends the VM.
    Poweroff = 2,
}

impl GuestEvent {
    /// Decodes a byte written by the guest (any value may arrive).
    pub fn from_byte(value: u8) -> Option<GuestEvent> {
        match value {
            1 => Some(GuestEvent::Ready),
            2 => Some(GuestEvent::Poweroff),
            _ => None,
        }
    }
}

/// One of a process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

impl StdioStream {
    /// The stream's name in a [`StdioHello`] line.
    pub fn name(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        }
    }
}

/// The line (`<token> <stream>\n`) the host writes first on each stream it opens to
/// [`STDIO_VSOCK_PORT`]; `token` is the one given in the request that created the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioHello {
    pub token: String,
    pub stream: StdioStream,
}

impl StdioHello {
    /// The longest hello line, newline included: a peer that sends more without a newline is cut off.
    pub const MAX_LEN: usize = MAX_STDIO_TOKEN_LEN + " stdout\n".len();

    /// The line as sent, newline included.
    pub fn render(&self) -> String {
        format!("{} {}\n", self.token, self.stream.name())
    }

    /// Parses a line (without its newline). Tokens are 1 to [`MAX_STDIO_TOKEN_LEN`] characters of
    /// `[A-Za-z0-9_.-]`.
    pub fn parse(line: &str) -> Option<StdioHello> {
        let (token, stream) = line.split_once(' ')?;
        if !valid_stdio_token(token) {
            return None;
        }
        let stream = match stream {
            "stdin" => StdioStream::Stdin,
            "stdout" => StdioStream::Stdout,
            "stderr" => StdioStream::Stderr,
            _ => return None,
        };
        Some(StdioHello { token: token.to_owned(), stream })
    }
}

/// Longest stdio token.
pub const MAX_STDIO_TOKEN_LEN: usize = 64;

/// Whether `token` may name a process's stdio streams.
pub fn valid_stdio_token(token: &str) -> bool {
    (1..=MAX_STDIO_TOKEN_LEN).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

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
    fn guest_events_decode_only_known_values() {
        assert_eq!(GuestEvent::from_byte(GuestEvent::Ready as u8), Some(GuestEvent::Ready));
        assert_eq!(GuestEvent::from_byte(GuestEvent::Poweroff as u8), Some(GuestEvent::Poweroff));
        assert_eq!(GuestEvent::from_byte(0), None);
        assert_eq!(GuestEvent::from_byte(0xff), None);
    }

    #[test]
    fn forward_requests_round_trip_and_others_are_refused() {
        for request in
            [ForwardRequest { ipv6: false, port: 8080 }, ForwardRequest { ipv6: true, port: 65535 }]
        {
            let line = request.render();
            assert!(line.len() <= ForwardRequest::MAX_LEN);
            assert_eq!(ForwardRequest::parse(line.trim_end()), Some(request));
        }
        assert_eq!(ForwardRequest { ipv6: true, port: 80 }.target().to_string(), "[::1]:80");
        for bad in ["", "tcp4", "tcp4 0", "tcp4 65536", "tcp4 +80", "tcp4 080", "udp 53", "tcp4 80 x"] {
            assert_eq!(ForwardRequest::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn stdio_hello_lines_round_trip_and_hostile_ones_are_refused() {
        let hello = StdioHello { token: "c1.exec-2_x".into(), stream: StdioStream::Stderr };
        let line = hello.render();
        assert!(line.len() <= StdioHello::MAX_LEN);
        assert_eq!(StdioHello::parse(line.trim_end()), Some(hello));
        for bad in ["", "tok", "tok stdio", " stdout", "a/b stdout", "tok stdout extra", &"x".repeat(65)] {
            assert_eq!(StdioHello::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn malformed_ready_lines_are_rejected() {
        assert_eq!(ReadyLine::find_in("husk-agent: ready version=1 api=x cpus_online=0 uptime_ms=1"), None);
        assert_eq!(ReadyLine::find_in("husk-agent: ready version=1"), None);
        assert_eq!(ReadyLine::find_in("husk-agent: ready garbage"), None);
        assert_eq!(ReadyLine::find_in(""), None);
    }
}
