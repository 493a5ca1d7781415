//! The host side of hybrid vsock: one unix listener for host-initiated connections (after the
//! `CONNECT <port>` handshake) and `<path>_<port>` sockets for guest-initiated ones; routes packets
//! between the device queues and the connections' unix streams.
//!
//! The muxer owns the epoll set of its sockets. Interest is recomputed after every pass so a stream
//! is polled for reading only while the guest has credit and RX buffers (otherwise level-triggered
//! epoll would spin), and for writing only while guest bytes wait for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::ops::Bound::{Excluded, Unbounded};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::csm::{Connection, State};
use super::handshake::{ok_reply, ConnectLine};
use super::packet::{Op, PacketHeader};
use super::HostPorts;

/// epoll data for the listener; stream fds use `FD_TOKEN_BASE + fd`.
pub const LISTENER_TOKEN: u64 = 16;
/// Base of the tokens of stream fds.
pub const FD_TOKEN_BASE: u64 = 1 << 32;
/// Host-side ports for host-initiated connections start here (the guest sees them as source).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Connections open at once; more are refused (bounded memory per VM).
pub const MAX_CONNECTIONS: usize = 1024;
/// Resets waiting for guest RX buffers, at most: a guest that sends packets for connections that
/// do not exist while posting no RX buffers must not grow host memory. Past it, resets are dropped
/// (they answer the guest's own mistakes; only the guest misses them).
pub const MAX_PENDING_RSTS: usize = 256;
/// How long a new host connection may take to send its `CONNECT` line before it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// (host-side port, guest-side port).
type Key = (u32, u32);

/// All of one VM's vsock connections and the host sockets behind them.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    /// Guest connections to host port P go to the listener at `<listeners>_<P>`: the device's
    /// socket path, or that path as seen from a jailed thread ([`Muxer::set_listeners`]).
    listeners: PathBuf,
    listener: UnixListener,
    /// Host connections still sending their `CONNECT` line, with the time they must be done by.
    handshakes: HashMap<RawFd, Handshake>,
    // Ordered, so RX can go round-robin from a cursor.
    conns: BTreeMap<Key, Connection<UnixStream>>,
    /// The connection whose data went to the guest last.
    rx_cursor: Option<Key>,
    by_fd: HashMap<RawFd, Key>,
    interest: HashMap<RawFd, EventSet>,
    /// Resets for guest packets that match no connection.
    rsts: VecDeque<PacketHeader>,
    next_local_port: u32,
    /// Where guest-initiated connections may go.
    host_ports: HostPorts,
}

impl Muxer {
    /// Listens on `path` (which must not exist) for host connections to the guest `guest_cid`.
    pub fn new(path: &Path, guest_cid: u64, epoll: &Epoll) -> std::io::Result<Muxer> {
        let listener = UnixListener::bind(path)?;
        // Only the VMM's user may connect: the mode must not depend on the process umask (which
        // virtio-fs sets to 0 so it can apply the guest's own).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            listeners: path.to_path_buf(),
            listener,
            handshakes: HashMap::new(),
            conns: BTreeMap::new(),
            rx_cursor: None,
            by_fd: HashMap::new(),
            interest: HashMap::new(),
            rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            host_ports: HostPorts::Any,
        })
    }

    /// Guest connections to host port P go to `<prefix>_<P>` from now on (the socket's own path
    /// until called).
    pub fn set_listeners(&mut self, prefix: PathBuf) {
        self.listeners = prefix;
    }

    /// Limits guest-initiated connections to `ports` (every port until called).
    pub fn set_host_ports(&mut self, ports: HostPorts) {
        self.host_ports = ports;
    }

    /// Accepts every pending host connection (their handshake follows).
    pub fn accept(&mut self, epoll: &Epoll) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.handshakes.len() + self.conns.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                continue; // dropped: the client sees the socket close
            }
            let fd = stream.as_raw_fd();
            if epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, FD_TOKEN_BASE + fd as u64))
                .is_ok()
            {
                self.interest.insert(fd, EventSet::IN);
                let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                self.handshakes.insert(fd, Handshake { stream, line: ConnectLine::default(), deadline });
            }
        }
    }

    /// A stream fd is ready (`events`): advance its handshake, or move its connection's data.
    /// A stream that hung up is taken out of the epoll set at once: epoll reports HUP whatever
    /// the interest, so a connection waiting for the guest to close would otherwise wake the
    /// device thread in a loop.
    pub fn stream_ready(&mut self, fd: RawFd, events: EventSet, epoll: &Epoll) {
        if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd, epoll);
        } else if let Some(conn) = self.by_fd.get(&fd).and_then(|key| self.conns.get_mut(key)) {
            if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                conn.host_hung_up(Instant::now());
                self.forget_fd(fd, epoll);
            } else {
                conn.flush_tx();
            }
        }
    }

    fn continue_handshake(&mut self, fd: RawFd, epoll: &Epoll) {
        let Some(Handshake { stream, line, .. }) = self.handshakes.get_mut(&fd) else { return };
        // One byte at a time: nothing after the newline may be consumed (it is stream data).
        let mut byte = [0u8; 1];
        let outcome = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) => match line.push(&byte) {
                    Ok(Some(connect)) => break Ok(connect.port),
                    Ok(None) => continue,
                    Err(_) => break Err(()),
                },
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Err(()),
            }
        };
        let Some(Handshake { stream, .. }) = self.handshakes.remove(&fd) else { return };
        match outcome {
            Ok(port) => {
                let local_port = self.allocate_local_port();
                let conn = Connection::local_init(stream, self.guest_cid, local_port, port);
                self.by_fd.insert(fd, (local_port, port));
                self.conns.insert((local_port, port), conn);
            }
            Err(()) => self.forget_fd(fd, epoll),
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// Handles one validated packet from the guest.
    pub fn guest_packet(&mut self, header: &PacketHeader, op: Op, payload: &[u8], epoll: &Epoll) {
        let key = (header.dst_port, header.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            let was = conn.state();
            let _ = conn.send_pkt(header, op, payload); // a protocol error resets the connection
            if was == State::LocalInit && conn.state() == State::Established {
                let reply = ok_reply(key.0);
                // A fresh socket's buffer takes a short line; if not, the client is gone.
                if conn_stream_write(conn, reply.as_bytes()).is_err() {
                    let _ = conn.send_pkt(header, Op::Rst, &[]);
                }
            }
            return;
        }
        match op {
            Op::Request => self.guest_connect(header, epoll),
            Op::Rst => {}
            _ => self.reset(header),
        }
    }

    /// A guest connection to an allowed host port P reaches a listener at `<listeners>_<P>`.
    fn guest_connect(&mut self, header: &PacketHeader, epoll: &Epoll) {
        let target = PathBuf::from(format!("{}_{}", self.listeners.display(), header.dst_port));
        let allowed = self.host_ports.allows(header.dst_port) && self.conns.len() < MAX_CONNECTIONS;
        let connected = allowed.then(|| connect_nonblocking(&target).ok()).flatten();
        let Some(stream) = connected else {
            self.reset(header);
            return;
        };
        let fd = stream.as_raw_fd();
        if epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::empty(), FD_TOKEN_BASE + fd as u64))
            .is_err()
        {
            self.reset(header);
            return;
        }
        self.interest.insert(fd, EventSet::empty());
        let key = (header.dst_port, header.src_port);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, Connection::peer_init(stream, self.guest_cid, key.0, key.1, header));
    }

    /// Queues a reset answering `header` (bounded by [`MAX_PENDING_RSTS`]).
    fn reset(&mut self, header: &PacketHeader) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            self.rsts.push_back(PacketHeader::reply(header, Op::Rst, 0, 0));
        }
    }

    /// The next packet for the guest, written as header + payload into `payload` (the returned
    /// header's `len` bytes of it). `None` when nobody has anything to send.
    pub fn next_rx(&mut self, payload: &mut [u8]) -> Option<PacketHeader> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some(rst);
        }
        // Control packets first: they need no credit and unblock the guest.
        if let Some(conn) = self.conns.values_mut().find(|c| c.has_pending_control()) {
            return conn.recv_pkt(payload);
        }
        // Then data, round-robin from the connection served last, so no stream starves the others.
        for _ in 0..self.conns.len() {
            let key = self.next_key_after(self.rx_cursor)?;
            self.rx_cursor = Some(key);
            if let Some(header) = self.conns.get_mut(&key).and_then(|c| c.recv_pkt(payload)) {
                return Some(header);
            }
        }
        None
    }

    /// The connection after `cursor` in key order, wrapping around.
    fn next_key_after(&self, cursor: Option<Key>) -> Option<Key> {
        let after = cursor.and_then(|c| self.conns.range((Excluded(c), Unbounded)).next().map(|(k, _)| *k));
        after.or_else(|| self.conns.keys().next().copied())
    }

    /// Expires what is overdue at `now`: host connections that sent no `CONNECT` line are closed,
    /// connection requests the guest did not answer are reset, and so are connections the host
    /// hung up on that the guest did not finish.
    pub fn expire(&mut self, epoll: &Epoll, now: Instant) {
        let overdue: Vec<RawFd> =
            self.handshakes.iter().filter(|(_, h)| now >= h.deadline).map(|(fd, _)| *fd).collect();
        for fd in overdue {
            tracing::debug!(fd, "vsock: host connection sent no CONNECT line in time; closed");
            self.handshakes.remove(&fd);
            self.forget_fd(fd, epoll);
        }
        for conn in self.conns.values_mut() {
            conn.expire_connect(now);
            conn.expire_close(now);
        }
    }

    /// Drops finished connections and sets each stream's epoll interest; `rx_room` says whether
    /// the guest has RX buffers (without them no stream is polled for reading).
    pub fn update(&mut self, epoll: &Epoll, rx_room: bool) {
        let finished: Vec<Key> =
            self.conns.iter().filter(|(_, c)| c.is_finished()).map(|(k, _)| *k).collect();
        for key in finished {
            if let Some(conn) = self.conns.remove(&key) {
                let fd = conn.stream().as_raw_fd();
                self.by_fd.remove(&fd);
                self.forget_fd(fd, epoll);
            }
        }
        for conn in self.conns.values().filter(|conn| !conn.is_host_gone()) {
            let fd = conn.stream().as_raw_fd();
            let mut wanted = EventSet::empty();
            if rx_room && conn.can_read_stream() && conn.peer_credit() > 0 {
                wanted |= EventSet::IN;
            }
            if conn.tx_buffered() > 0 {
                wanted |= EventSet::OUT;
            }
            if self.interest.get(&fd) != Some(&wanted) {
                let event = EpollEvent::new(wanted, FD_TOKEN_BASE + fd as u64);
                if epoll.ctl(ControlOperation::Modify, fd, event).is_ok() {
                    self.interest.insert(fd, wanted);
                }
            }
        }
    }

    /// The earliest time [`Muxer::update`] has something to expire, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let handshakes = self.handshakes.values().map(|h| h.deadline);
        let connects = self.conns.values().filter_map(Connection::connect_deadline);
        let closes = self.conns.values().filter_map(Connection::close_deadline);
        handshakes.chain(connects).chain(closes).min()
    }

    /// True when some connection has a control packet queued (worth an RX pass without events).
    pub fn has_pending_control(&self) -> bool {
        !self.rsts.is_empty() || self.conns.values().any(Connection::has_pending_control)
    }

    fn forget_fd(&mut self, fd: RawFd, epoll: &Epoll) {
        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.interest.remove(&fd);
    }

    /// Open connections (for tests and diagnostics).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

/// Connects to the unix listener at `path` without blocking: a listener whose backlog is full
/// (it does not accept fast enough) fails the connection with `WouldBlock` instead of stalling the
/// device thread, and the guest gets an RST.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns; the stream closes it on every path below.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un of `len` bytes that outlives the call.
    if unsafe { libc::connect(fd, (&raw const addr).cast::<libc::sockaddr>(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// A host connection before its `CONNECT` line is complete.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: ConnectLine,
    deadline: Instant,
}

fn conn_stream_write(conn: &mut Connection<UnixStream>, bytes: &[u8]) -> std::io::Result<()> {
    let mut stream = conn.stream();
    stream.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::packet::{Op, PacketHeader};
    use super::super::test_utils::{guest_packet, VsockHarness};
    use super::super::HostPorts;

    const CREDIT: u32 = 1 << 20;

    fn connect_guest_port(h: &mut VsockHarness, guest_port: u32, host_port: u32) {
        h.guest_send(&guest_packet(Op::Request, guest_port, host_port, CREDIT, 0), &[]).unwrap();
        assert_eq!(h.guest_recv().unwrap().header.op, Op::Response as u16);
    }

    #[test]
    fn a_guest_flooding_unknown_connections_without_rx_buffers_queues_a_bounded_number_of_resets() {
        let dir = tempfile::tempdir().unwrap();
        let epoll = vmm_sys_util::epoll::Epoll::new().unwrap();
        let mut muxer = super::Muxer::new(&dir.path().join("v.sock"), 3, &epoll).unwrap();
        for port in 0..10_000 {
            muxer.guest_packet(&guest_packet(Op::Rw, port, 7000, CREDIT, 0), Op::Rw, &[1], &epoll);
        }
        assert_eq!(muxer.rsts.len(), super::MAX_PENDING_RSTS);
        assert!(muxer.has_pending_control());
    }

    #[test]
    fn busy_connections_take_turns_on_the_rx_queue() {
        let mut h = VsockHarness::new().unwrap();
        let listener = h.listen(5000).unwrap();
        let mut hosts = Vec::new();
        for guest_port in [100, 200, 300] {
            connect_guest_port(&mut h, guest_port, 5000);
            hosts.push(listener.accept().unwrap().0);
        }
        // Each host stream has far more than one packet's worth queued.
        let chunk = vec![9u8; 200 * 1024];
        for host in &mut hosts {
            host.write_all(&chunk).unwrap();
        }
        let order: Vec<u32> = (0..6).map(|_| h.guest_recv().unwrap().header.dst_port).collect();
        // Round-robin (from wherever the cursor stood): each stream once per round, same order.
        let mut first_round = order[..3].to_vec();
        assert_eq!(order[3..], first_round[..], "{order:?}");
        first_round.sort_unstable();
        assert_eq!(first_round, [100, 200, 300], "no stream starves the others: {order:?}");
    }

    #[test]
    fn the_guest_reaches_only_the_host_ports_it_is_allowed() {
        let mut h = VsockHarness::new().unwrap();
        h.set_host_ports(HostPorts::Only(vec![5000]));
        let (allowed, other) = (h.listen(5000).unwrap(), h.listen(6000).unwrap());
        other.set_nonblocking(true).unwrap();
        connect_guest_port(&mut h, 100, 5000);
        assert!(allowed.accept().is_ok(), "an allowed port connects");
        h.guest_send(&guest_packet(Op::Request, 101, 6000, CREDIT, 0), &[]).unwrap();
        let reply = h.guest_recv().unwrap().header;
        assert_eq!((reply.op, reply.src_port, reply.dst_port), (Op::Rst as u16, 6000, 101));
        h.step();
        assert!(other.accept().is_err(), "the listener of a port not allowed never sees the guest");
        assert_eq!(h.connection_count(), 1);
    }

    #[test]
    fn a_host_listener_with_a_full_backlog_refuses_instead_of_stalling_the_device() {
        let mut h = VsockHarness::new().unwrap();
        let listener = h.listen(5000).unwrap(); // never accepts
                                                // SAFETY: lowers the backlog of a listening socket this test owns.
        assert_eq!(unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 2) }, 0);
        let mut refused = false;
        for guest_port in 0..64 {
            h.guest_send(&guest_packet(Op::Request, guest_port, 5000, CREDIT, 0), &[]).unwrap();
            while let Some(reply) = h.guest_recv_now() {
                refused |= reply.header.op == Op::Rst as u16;
            }
            if refused {
                break;
            }
            h.step();
        }
        assert!(refused, "requests beyond the listener's backlog are reset");
    }

    #[test]
    fn host_connections_get_distinct_host_ports_the_guest_can_tell_apart() {
        let mut h = VsockHarness::new().unwrap();
        let _clients: Vec<_> = (0..4).map(|_| h.host_connect(1234).unwrap()).collect();
        let mut ports = Vec::new();
        while let Some(request) = h.guest_recv() {
            let PacketHeader { op, src_port, dst_port, .. } = request.header;
            assert_eq!((op, dst_port), (Op::Request as u16, 1234));
            ports.push(src_port);
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4, "four connections, four host-side ports: {ports:?}");
        assert!(ports.iter().all(|p| *p >= super::FIRST_LOCAL_PORT));
        assert_eq!(h.connection_count(), 4);
    }
}
