//! The virtio-vsock device (ID 19): its three queues (RX, TX, events), its configuration space
//! (the guest's CID) and the thread that moves packets between the queues and the [`Muxer`].

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, FD_TOKEN_BASE, LISTENER_TOKEN};
use super::packet::{PacketHeader, HEADER_LEN, MAX_PAYLOAD};
use super::HostPorts;
use crate::devices::virtio::worker::epoll_timeout_ms;
use crate::devices::virtio::{
    ActivateError, DeviceContext, Interrupt, VirtioDevice, INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1,
};
use crate::jail;
use crate::seccomp::{self, ThreadRole};
use crate::threads::{DeviceThread, RunningDevice};

const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
/// Queue indices: 0 is RX (served after every event), 1 TX, 2 events (unused by this device).
const TX: usize = 1;
const STOP_TOKEN: u64 = 8;

/// The vsock device of one VM.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    path: PathBuf,
    host_ports: HostPorts,
    /// Made with the VM; serves the device once activated.
    thread: Option<DeviceThread>,
    worker: Option<RunningDevice>,
}

impl VsockDevice {
    /// A device giving the guest CID `guest_cid`, with its host side at the unix socket `path`;
    /// the guest may connect to `host_ports` there; `thread` serves it.
    pub fn new(guest_cid: u64, path: PathBuf, host_ports: HostPorts, thread: DeviceThread) -> VsockDevice {
        VsockDevice { guest_cid, path, host_ports, thread: Some(thread), worker: None }
    }

    fn stop(&mut self) {
        self.worker = None; // stops and joins the thread
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop();
        // The socket path is ours: leave nothing behind. (Not on a reset: the vCPU thread that
        // resets may not unlink files.) The VM's owner drops the devices, after the vCPU threads.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i as u64).and_then(|at| config.get(at as usize)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, context: DeviceContext) -> Result<(), ActivateError> {
        let DeviceContext { mem, queues, queue_events, interrupt, seccomp, .. } = context;
        if queues.len() != QUEUE_SIZES.len() || queue_events.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { expected: QUEUE_SIZES.len(), found: queues.len() });
        }
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: QUEUE_SIZES.len(), found: 0 });
        };
        let thread = self.thread.take().ok_or(ActivateError::AlreadyServed)?;
        let (path, guest_cid, host_ports) = (self.path.clone(), self.guest_cid, self.host_ports.clone());
        // Set up on the device's own thread: binding the host socket is nothing a vCPU may do.
        let setup = move |stop_seen: EventFd| -> std::io::Result<(EventLoop, EventFd)> {
            // A stale socket left at the path (by an earlier VM that did not end cleanly) goes.
            let _ = std::fs::remove_file(&path);
            let role = if host_ports.any_allowed() { ThreadRole::Vsock } else { ThreadRole::VsockNoConnect };
            let mut lp = EventLoop::new(mem, rx, tx, interrupt, &path, guest_cid)?;
            lp.muxer.set_host_ports(host_ports);
            lp.watch(stop_seen.as_raw_fd(), STOP_TOKEN)?;
            for (index, event) in queue_events.iter().enumerate() {
                lp.watch(event.as_raw_fd(), index as u64)?;
            }
            lp.queue_events = queue_events;
            confine(&mut lp.muxer, &path)?;
            if seccomp {
                seccomp::apply(role).map_err(std::io::Error::other)?;
            }
            Ok((lp, stop_seen))
        };
        // The stop eventfd's copy stays with the loop it is watched by.
        let running = thread.start(setup, |(mut lp, _stop_seen)| lp.run()).map_err(ActivateError::Worker)?;
        self.worker = Some(running);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

/// Done with host paths once the socket is bound: the device's thread makes the socket's
/// directory its root (a guest connection can then reach only listeners beside the device's own
/// socket, `<socket>_<port>`, whatever the muxer is made to connect to) and keeps no capability
/// (the sockets it accepts and connects to are its owner's: root's, in the shim).
fn confine(muxer: &mut Muxer, socket: &Path) -> std::io::Result<()> {
    let socket = std::path::absolute(socket)?;
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return Err(std::io::Error::other(format!(
            "vsock socket {}: no directory and name",
            socket.display()
        )));
    };
    jail::own_fs_context()?;
    jail::enter_root(dir)?;
    muxer.set_listeners(Path::new("/").join(name));
    jail::keep_capabilities(&[]).map_err(std::io::Error::other)
}

/// The device's worker: moves packets between the queues and the muxer's host sockets.
#[derive(Debug)]
pub(super) struct EventLoop {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    pub(super) muxer: Muxer,
    pub(super) epoll: Epoll,
    /// Indexed by queue; read when their token fires.
    queue_events: Vec<EventFd>,
    guest_cid: u64,
    /// One packet's payload, allocated once (TX and RX take turns on the loop thread).
    payload: Vec<u8>,
}

impl EventLoop {
    /// A loop serving `rx` and `tx` for the guest `guest_cid`, its host side listening at `path`.
    /// Queue notifications and the stop event are added with [`EventLoop::watch`].
    pub(super) fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<Interrupt>,
        path: &Path,
        guest_cid: u64,
    ) -> std::io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        let muxer = Muxer::new(path, guest_cid, &epoll)?;
        let payload = vec![0u8; MAX_PAYLOAD as usize];
        Ok(EventLoop { mem, rx, tx, interrupt, muxer, epoll, queue_events: Vec::new(), guest_cid, payload })
    }

    /// Adds `fd` to the loop's epoll set; its readiness is reported as `token`.
    fn watch(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
    }

    fn run(&mut self) {
        while self.poll_once(None) {}
    }

    /// Waits for events (at most until `limit`, or the muxer's next deadline, whichever is first)
    /// and serves them; false once the device is told to stop or cannot go on.
    pub(super) fn poll_once(&mut self, limit: Option<Duration>) -> bool {
        let mut events = [EpollEvent::default(); 64];
        let now = Instant::now();
        let until_deadline = self.muxer.next_deadline().map(|at| at.saturating_duration_since(now));
        // The earliest of the muxer's deadline, the caller's limit and the interrupt's recheck.
        let timeout = [until_deadline, limit, self.interrupt.recheck_in()].into_iter().flatten().min();
        let count = match self.epoll.wait(epoll_timeout_ms(timeout), &mut events) {
            Ok(count) => count,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(err) => {
                tracing::error!(%err, "virtio-vsock: epoll_wait failed; the device stops");
                return false;
            }
        };
        for event in &events[..count] {
            match event.data() {
                STOP_TOKEN => return false,
                token if token < QUEUE_SIZES.len() as u64 => {
                    if let Some(event) = self.queue_events.get(token as usize) {
                        let _ = event.read();
                    }
                    if token == TX as u64 {
                        self.process_tx();
                    }
                }
                LISTENER_TOKEN => self.muxer.accept(&self.epoll),
                token if token >= FD_TOKEN_BASE => {
                    self.muxer.stream_ready((token - FD_TOKEN_BASE) as i32, event.event_set(), &self.epoll)
                }
                _ => {}
            }
        }
        self.muxer.expire(&self.epoll, Instant::now());
        let rx_room = self.process_rx();
        self.muxer.update(&self.epoll, rx_room);
        self.interrupt.raise_again_if_unacknowledged();
        true
    }

    /// Takes every packet the guest queued on TX and hands it to the muxer.
    pub(super) fn process_tx(&mut self) {
        let mut used = false;
        let mut header_bytes = [0u8; HEADER_LEN];
        let mut payload = std::mem::take(&mut self.payload);
        while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(&self.mem) {
                if reader.read_exact(&mut header_bytes).is_ok() {
                    match PacketHeader::parse_tx(&header_bytes, self.guest_cid) {
                        Ok((header, op)) => {
                            let len = header.len as usize; // <= MAX_PAYLOAD, checked by parse_tx
                            if reader.read_exact(&mut payload[..len]).is_ok() {
                                self.muxer.guest_packet(&header, op, &payload[..len], &self.epoll);
                            }
                        }
                        Err(err) => crate::guest_log!(debug, %err, "virtio-vsock: guest packet dropped"),
                    }
                }
            }
            if self.tx.add_used(&self.mem, head, 0).is_err() {
                crate::guest_log!(warn, "virtio-vsock: bad TX used ring");
                self.payload = payload;
                return;
            }
            used = true;
        }
        self.payload = payload;
        if used && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(INTERRUPT_USED_BUFFER);
        }
    }

    /// Fills the guest's RX buffers with whatever the connections have; returns whether buffers
    /// remain (if not, the streams are not polled for reading until the guest adds some).
    pub(super) fn process_rx(&mut self) -> bool {
        let mut used = false;
        let mut payload = std::mem::take(&mut self.payload);
        let room = loop {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else { break false };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(&self.mem) else {
                let _ = self.rx.add_used(&self.mem, head, 0);
                used = true;
                continue;
            };
            let capacity = writer.available_bytes().saturating_sub(HEADER_LEN).min(MAX_PAYLOAD as usize);
            if writer.available_bytes() < HEADER_LEN {
                let _ = self.rx.add_used(&self.mem, head, 0); // unusable buffer
                used = true;
                continue;
            }
            let Some(header) = self.muxer.next_rx(&mut payload[..capacity]) else {
                self.rx.go_to_previous_position(); // keep the buffer for later
                break true;
            };
            let len = header.len as usize;
            let written = writer.write_all(&header.encode()).and_then(|_| writer.write_all(&payload[..len]));
            let total = if written.is_ok() { (HEADER_LEN + len) as u32 } else { 0 };
            if self.rx.add_used(&self.mem, head, total).is_err() {
                break false;
            }
            used = true;
        };
        self.payload = payload;
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(INTERRUPT_USED_BUFFER);
        }
        room
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::super::csm::{CLOSE_TIMEOUT, CONNECT_TIMEOUT, TX_BUF_SIZE};
    use super::super::muxer::HANDSHAKE_TIMEOUT;
    use super::super::packet::{Op, PacketHeader, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
    use super::super::test_utils::{guest_packet, Received, VsockHarness, GUEST_CID, MEM_SIZE};
    use super::*;
    use crate::devices::virtio::test_utils::{Buffer, RawDesc};
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_PORT: u32 = 49152;
    const CREDIT: u32 = 64 * 1024;

    fn op(received: &Received) -> Op {
        Op::try_from(received.header.op).unwrap()
    }

    fn send(h: &mut VsockHarness, op: Op, host_port: u32) {
        h.guest_send(&guest_packet(op, GUEST_PORT, host_port, CREDIT, 0), &[]).unwrap();
    }

    fn send_rw(h: &mut VsockHarness, host_port: u32, data: &[u8]) {
        let header =
            PacketHeader { len: data.len() as u32, ..guest_packet(Op::Rw, GUEST_PORT, host_port, CREDIT, 0) };
        h.guest_send(&header, data).unwrap();
    }

    fn read_host(stream: &mut UnixStream, len: usize) -> Vec<u8> {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; len];
        stream.read_exact(&mut got).unwrap();
        got
    }

    fn assert_host_eof(stream: &mut UnixStream) {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(stream.read(&mut [0u8; 16]).unwrap(), 0, "the host side sees EOF");
    }

    /// A guest connection to host port 5000, accepted by the host listener and answered.
    fn guest_connected(h: &mut VsockHarness) -> UnixStream {
        let listener = h.listen(5000).unwrap();
        send(h, Op::Request, 5000);
        let response = h.guest_recv().unwrap();
        assert_eq!(op(&response), Op::Response);
        listener.accept().unwrap().0
    }

    /// A host connection to guest port GUEST_PORT through the handshake, answered by the guest.
    fn host_connected(h: &mut VsockHarness) -> (UnixStream, u32) {
        let mut host = h.host_connect(GUEST_PORT).unwrap();
        let request = h.guest_recv().expect("the guest gets a REQUEST");
        assert_eq!(op(&request), Op::Request);
        assert_eq!(request.header.dst_port, GUEST_PORT);
        let local = request.header.src_port;
        send_from(h, Op::Response, local);
        h.step();
        let reply = read_host(&mut host, format!("OK {local}\n").len());
        assert_eq!(reply, format!("OK {local}\n").as_bytes());
        (host, local)
    }

    /// Like `send`, for connections the host opened (the guest's port is fixed, the host's varies).
    fn send_from(h: &mut VsockHarness, op: Op, host_port: u32) {
        send(h, op, host_port);
    }

    #[test]
    fn config_space_holds_the_guest_cid() {
        let thread = DeviceThread::spawn("test-vsock").unwrap();
        let device = VsockDevice::new(0x1_0000_0007, PathBuf::from("/nonexistent"), HostPorts::Any, thread);
        let mut cid = [0u8; 8];
        device.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 0x1_0000_0007);
        let mut beyond = [0xffu8; 4];
        device.read_config(6, &mut beyond);
        assert_eq!(beyond, [0, 0, 0, 0], "bytes past the CID read as zero");
        assert_eq!(device.queue_max_sizes().len(), 3, "rx, tx and event queues");
    }

    #[test]
    fn a_guest_connection_exchanges_data_and_ends_with_shutdown_then_rst() {
        let mut h = VsockHarness::new().unwrap();
        let listener = h.listen(5000).unwrap();
        send(&mut h, Op::Request, 5000);
        let response = h.guest_recv().unwrap();
        assert_eq!(op(&response), Op::Response);
        let expected =
            PacketHeader::reply(&guest_packet(Op::Request, GUEST_PORT, 5000, 0, 0), Op::Response, 0, 0);
        assert_eq!((response.header.src_cid, response.header.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(
            (response.header.src_port, response.header.dst_port),
            (expected.src_port, expected.dst_port)
        );
        assert_eq!(response.header.buf_alloc, TX_BUF_SIZE, "our receive buffer is advertised");
        let mut host = listener.accept().unwrap().0;

        send_rw(&mut h, 5000, b"ping");
        assert_eq!(read_host(&mut host, 4), b"ping");
        host.write_all(b"pong").unwrap();
        let data = h.guest_recv().unwrap();
        assert_eq!((op(&data), data.payload.as_slice()), (Op::Rw, &b"pong"[..]));
        assert_eq!(data.header.len, 4);

        let mut shutdown = guest_packet(Op::Shutdown, GUEST_PORT, 5000, CREDIT, 4);
        shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        h.guest_send(&shutdown, &[]).unwrap();
        assert_host_eof(&mut host);
        assert_eq!(op(&h.guest_recv().unwrap()), Op::Rst, "both directions done: the host resets");
        h.step();
        assert_eq!(h.connection_count(), 0);
    }

    #[test]
    fn a_guest_connection_to_a_port_nobody_listens_on_is_reset() {
        let mut h = VsockHarness::new().unwrap();
        send(&mut h, Op::Request, 6000);
        let rst = h.guest_recv().unwrap();
        assert_eq!(op(&rst), Op::Rst);
        assert_eq!((rst.header.src_port, rst.header.dst_port), (6000, GUEST_PORT));
        assert_eq!(h.connection_count(), 0);
    }

    #[test]
    fn a_host_connection_is_requested_answered_and_half_closed_from_the_host() {
        let mut h = VsockHarness::new().unwrap();
        let (mut host, local) = host_connected(&mut h);
        host.write_all(b"to the guest").unwrap();
        let data = h.guest_recv().unwrap();
        assert_eq!(data.payload, b"to the guest");
        assert_eq!((data.header.src_port, data.header.dst_port), (local, GUEST_PORT));

        host.shutdown(Shutdown::Write).unwrap();
        let shutdown = h.guest_recv().unwrap();
        assert_eq!((op(&shutdown), shutdown.header.flags), (Op::Shutdown, SHUTDOWN_SEND));
        send_rw(&mut h, local, b"still open the other way");
        assert_eq!(read_host(&mut host, 24), b"still open the other way");

        let mut done = guest_packet(Op::Shutdown, GUEST_PORT, local, CREDIT, 12);
        done.flags = SHUTDOWN_SEND;
        h.guest_send(&done, &[]).unwrap();
        assert_host_eof(&mut host);
        assert_eq!(op(&h.guest_recv().unwrap()), Op::Rst);
    }

    #[test]
    fn a_host_that_hangs_up_has_its_last_bytes_delivered_and_a_silent_guest_is_reset_without_spinning() {
        let mut h = VsockHarness::new().unwrap();
        let (mut host, local) = host_connected(&mut h);
        host.write_all(b"last words").unwrap();
        drop(host);
        assert_eq!(h.guest_recv().unwrap().payload, b"last words", "what the host sent still arrives");
        let shutdown = h.guest_recv().unwrap();
        assert_eq!((op(&shutdown), shutdown.header.flags), (Op::Shutdown, SHUTDOWN_SEND | SHUTDOWN_RCV));
        // The guest never answers. The hung-up socket is out of the epoll set: nothing wakes
        // the device thread for it.
        h.step();
        assert_eq!(h.ready_sockets(), 0, "a hung-up stream does not keep the loop awake");
        assert_eq!(h.connection_count(), 1, "the guest has its close timeout");
        // A guest still talking keeps it; one silent for the timeout is reset.
        send_rw(&mut h, local, b"into the void");
        h.expire_at(Instant::now() + CLOSE_TIMEOUT / 2);
        assert_eq!(h.connection_count(), 1);
        h.expire_at(Instant::now() + CLOSE_TIMEOUT);
        let rst = h.guest_recv().unwrap();
        assert_eq!((op(&rst), rst.header.src_port), (Op::Rst, local));
        h.step();
        assert_eq!(h.connection_count(), 0, "the connection and its host fd are gone");
    }

    #[test]
    fn a_host_that_hangs_up_before_the_guest_answers_is_reset() {
        let mut h = VsockHarness::new().unwrap();
        let host = h.host_connect(GUEST_PORT).unwrap();
        assert_eq!(op(&h.guest_recv().unwrap()), Op::Request);
        drop(host);
        assert_eq!(op(&h.guest_recv().unwrap()), Op::Rst);
        h.step();
        assert_eq!(h.connection_count(), 0);
    }

    #[test]
    fn host_data_waits_for_the_guests_credit() {
        let mut h = VsockHarness::new().unwrap();
        let mut host = guest_connected(&mut h);
        // The guest advertises 8 bytes of buffer.
        h.guest_send(&guest_packet(Op::CreditUpdate, GUEST_PORT, 5000, 8, 0), &[]).unwrap();
        host.write_all(b"0123456789abcdef").unwrap();
        assert_eq!(h.guest_recv().unwrap().payload, b"01234567");
        assert_eq!(h.guest_recv(), None, "no credit left");
        // The guest consumed 8: eight more may come.
        h.guest_send(&guest_packet(Op::CreditUpdate, GUEST_PORT, 5000, 8, 8), &[]).unwrap();
        assert_eq!(h.guest_recv().unwrap().payload, b"89abcdef");
    }

    #[test]
    fn a_credit_request_is_answered_with_our_credit() {
        let mut h = VsockHarness::new().unwrap();
        let mut host = guest_connected(&mut h);
        send_rw(&mut h, 5000, &[7u8; 100]);
        assert_eq!(read_host(&mut host, 100), [7u8; 100]);
        send(&mut h, Op::CreditRequest, 5000);
        let update = h.guest_recv().unwrap();
        assert_eq!(op(&update), Op::CreditUpdate);
        assert_eq!((update.header.buf_alloc, update.header.fwd_cnt), (TX_BUF_SIZE, 100));
    }

    #[test]
    fn a_guest_rst_closes_the_host_stream() {
        let mut h = VsockHarness::new().unwrap();
        let mut host = guest_connected(&mut h);
        send(&mut h, Op::Rst, 5000);
        h.step();
        assert_eq!(h.connection_count(), 0);
        assert_host_eof(&mut host);
        assert_eq!(h.guest_recv(), None, "an RST is not answered");
    }

    #[test]
    fn packets_for_unknown_connections_are_reset_and_stray_rsts_ignored() {
        let mut h = VsockHarness::new().unwrap();
        for op_ in [Op::Rw, Op::Response, Op::Shutdown, Op::CreditUpdate, Op::CreditRequest] {
            send(&mut h, op_, 7000);
            let rst = h.guest_recv().unwrap();
            assert_eq!(op(&rst), Op::Rst, "{op_:?}");
        }
        send(&mut h, Op::Rst, 7000);
        assert_eq!(h.guest_recv(), None);
    }

    #[test]
    fn a_guest_that_ignores_credit_is_reset_and_buffering_stays_bounded() {
        let mut h = VsockHarness::new().unwrap();
        let _host = guest_connected(&mut h); // never reads
        let chunk = vec![1u8; MAX_PAYLOAD as usize];
        let mut reset = false;
        // 8 MiB: far more than the socket buffer plus our TX_BUF_SIZE.
        for _ in 0..128 {
            send_rw(&mut h, 5000, &chunk);
            h.step();
            while let Some(packet) = h.guest_recv_now() {
                // Credit updates while the host socket's buffer still takes bytes, then the reset.
                assert!(matches!(op(&packet), Op::CreditUpdate | Op::Rst), "{packet:?}");
                reset |= op(&packet) == Op::Rst;
            }
            if reset {
                break;
            }
        }
        assert!(reset, "the connection was reset once the guest exceeded its credit");
    }

    #[test]
    fn a_host_client_that_never_sends_connect_is_closed_after_the_timeout() {
        let mut h = VsockHarness::new().unwrap();
        let mut silent = UnixStream::connect(h.socket_path()).unwrap();
        h.step();
        h.expire_at(Instant::now() + HANDSHAKE_TIMEOUT / 2);
        silent.set_nonblocking(true).unwrap();
        assert!(silent.read(&mut [0u8; 1]).is_err(), "still open before the timeout");
        h.expire_at(Instant::now() + HANDSHAKE_TIMEOUT);
        assert_host_eof(&mut silent);
    }

    #[test]
    fn a_request_the_guest_never_answers_is_reset_after_the_timeout() {
        let mut h = VsockHarness::new().unwrap();
        let mut host = h.host_connect(GUEST_PORT).unwrap();
        let request = h.guest_recv().unwrap();
        assert_eq!(op(&request), Op::Request);
        h.expire_at(Instant::now() + CONNECT_TIMEOUT);
        let rst = h.guest_recv().unwrap();
        assert_eq!((op(&rst), rst.header.src_port), (Op::Rst, request.header.src_port));
        h.step();
        assert_host_eof(&mut host); // closed without an OK line
        assert_eq!(h.connection_count(), 0);
    }

    #[test]
    fn malformed_tx_chains_are_completed_and_dropped_without_a_reply() {
        let mut h = VsockHarness::new().unwrap();
        let ro = |addr, len| Buffer { addr, len, writable: false };
        let header = guest_packet(Op::Request, GUEST_PORT, 6000, CREDIT, 0);
        h.mem.write_slice(&header.encode(), GuestAddress(0x30_0000)).unwrap();
        let bad_cid = PacketHeader { src_cid: 9, ..header };
        h.mem.write_slice(&bad_cid.encode(), GuestAddress(0x30_1000)).unwrap();
        let long = PacketHeader { op: Op::Rw as u16, len: 4096, ..header };
        h.mem.write_slice(&long.encode(), GuestAddress(0x30_2000)).unwrap();
        let chains: [&[Buffer]; 6] = [
            &[ro(0x30_0000, 20)],                                   // header truncated
            &[ro(MEM_SIZE + 0x1000, 44)],                           // outside guest memory
            &[ro(MEM_SIZE - 20, 44)],                               // straddles the end of memory
            &[Buffer { addr: 0x30_0000, len: 44, writable: true }], // device-writable on TX
            &[ro(0x30_1000, 44)],                                   // someone else's CID
            &[ro(0x30_2000, 44), ro(0x30_3000, 100)],               // payload shorter than its length
        ];
        for chain in chains {
            h.tx.add_chain(&h.mem, chain).unwrap();
        }
        h.run_tx();
        let mut completed = 0;
        while h.tx.take_used(&h.mem).is_some() {
            completed += 1;
        }
        assert_eq!(completed, chains.len(), "every chain is given back");
        assert_eq!(h.guest_recv().map(|r| op(&r)), None, "nothing was acted on");
        assert_eq!(h.connection_count(), 0);
    }

    #[test]
    fn looping_and_out_of_range_descriptors_do_not_hang_the_device() {
        let mut h = VsockHarness::new().unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        // A chain that points at itself, and one whose next index is beyond the table.
        h.tx.write_desc(&h.mem, 10, RawDesc { addr: 0x30_0000, len: 8, flags: next, next: 10 }).unwrap();
        h.tx.publish(&h.mem, 10).unwrap();
        h.tx.write_desc(&h.mem, 11, RawDesc { addr: 0x30_0000, len: 8, flags: next, next: 999 }).unwrap();
        h.tx.publish(&h.mem, 11).unwrap();
        h.tx.publish(&h.mem, 4000).unwrap(); // head index beyond the table
        h.run_tx();
        // A hostile available index (more entries than the queue has) stops nothing else.
        h.tx.set_avail_idx(&h.mem, 60_000).unwrap();
        h.run_tx();
        // The RX side still works for host traffic.
        let _ = h.host_connect(GUEST_PORT).unwrap();
        assert_eq!(h.guest_recv().map(|r| op(&r)), Some(Op::Request));
    }

    #[test]
    fn rx_buffers_unfit_for_a_packet_are_returned_unused() {
        let mut h = VsockHarness::without_rx_buffers().unwrap();
        let tiny = h.rx.add_chain(&h.mem, &[Buffer { addr: 0x30_0000, len: 8, writable: true }]).unwrap();
        let read_only =
            h.rx.add_chain(&h.mem, &[Buffer { addr: 0x30_1000, len: 4096, writable: false }]).unwrap();
        let outside =
            h.rx.add_chain(&h.mem, &[Buffer { addr: MEM_SIZE, len: 4096, writable: true }]).unwrap();
        h.post_rx_buffers().unwrap();
        let _host = h.host_connect(GUEST_PORT).unwrap();
        assert_eq!(h.guest_recv().map(|r| op(&r)), Some(Op::Request), "the next good buffer is used");
        assert_eq!(h.foreign_used(), [(tiny, 0), (read_only, 0), (outside, 0)]);
    }
}
