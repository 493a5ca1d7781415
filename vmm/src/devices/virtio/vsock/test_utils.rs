//! [`VsockHarness`]: the vsock device's event loop over real guest memory, real split queues
//! (driven by [`GuestQueue`]) and real host unix sockets in a private directory, without KVM and
//! without the worker thread: tests and fuzz targets play the guest's driver and step the loop.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::EventLoop;
use super::packet::{Op, PacketHeader, HEADER_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};
use super::HostPorts;
use crate::devices::virtio::test_utils::{Buffer, GuestQueue};
use crate::devices::virtio::Interrupt;

/// The guest's CID in the harness.
pub const GUEST_CID: u64 = 3;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 64;
/// RX buffers the harness keeps posted (each fits a whole packet).
const RX_BUFFERS: u16 = 16;
const RX_BUFFER_LEN: u32 = HEADER_LEN as u32 + MAX_PAYLOAD;
const RX_QUEUE_BASE: u64 = 0;
const TX_QUEUE_BASE: u64 = 0x4000;
const RX_AREA: u64 = 0x1_0000;
const TX_AREA: u64 = RX_AREA + RX_BUFFERS as u64 * 0x1_1000;
const TX_AREA_LEN: u64 = 0x20_0000;
/// Guest memory size; addresses at or above it are outside guest memory.
pub const MEM_SIZE: u64 = 0x40_0000;

/// Guest side of one vsock device plus its host sockets.
#[derive(Debug)]
pub struct VsockHarness {
    pub mem: GuestMemoryMmap,
    pub rx: GuestQueue,
    pub tx: GuestQueue,
    lp: EventLoop,
    dir: PathBuf,
    pub irq: EventFd,
    /// Head index -> guest address of posted RX buffers.
    rx_buffers: Vec<(u16, u64)>,
    /// Completed RX chains that are not the harness's buffers (posted by a test directly).
    foreign_used: Vec<(u16, u32)>,
    tx_cursor: u64,
}

/// A packet the guest received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub header: PacketHeader,
    pub payload: Vec<u8>,
}

impl VsockHarness {
    /// A device for guest CID [`GUEST_CID`] with [`RX_BUFFERS`] RX buffers posted; its host socket
    /// is [`VsockHarness::socket_path`] in a fresh directory removed on drop.
    pub fn new() -> std::io::Result<VsockHarness> {
        let mut harness = VsockHarness::without_rx_buffers()?;
        harness.post_rx_buffers().map_err(io_error)?;
        Ok(harness)
    }

    /// A harness whose RX queue is empty: a test posts its own buffers first, then
    /// [`VsockHarness::post_rx_buffers`].
    pub fn without_rx_buffers() -> std::io::Result<VsockHarness> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "husk-vsock-harness-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .map_err(std::io::Error::other)?;
        let (rx, rx_queue) = GuestQueue::new(&mem, RX_QUEUE_BASE, QUEUE_SIZE).map_err(io_error)?;
        let (tx, tx_queue) = GuestQueue::new(&mem, TX_QUEUE_BASE, QUEUE_SIZE).map_err(io_error)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let interrupt = Arc::new(Interrupt::new(irq.try_clone()?));
        let lp =
            EventLoop::new(mem.clone(), rx_queue, tx_queue, interrupt, &dir.join("vsock.sock"), GUEST_CID)?;
        let (rx_buffers, foreign_used) = (Vec::new(), Vec::new());
        Ok(VsockHarness { mem, rx, tx, lp, dir, irq, rx_buffers, foreign_used, tx_cursor: TX_AREA })
    }

    /// Posts the harness's [`RX_BUFFERS`] RX buffers, each large enough for any packet.
    pub fn post_rx_buffers(&mut self) -> Result<(), GuestMemoryError> {
        for i in 0..RX_BUFFERS {
            self.post_rx_buffer(RX_AREA + u64::from(i) * 0x1_1000)?;
        }
        Ok(())
    }

    /// The VM's vsock socket (host clients connect here).
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// Listens where a guest connection to host port `port` arrives (`<socket>_<port>`).
    pub fn listen(&self, port: u32) -> std::io::Result<UnixListener> {
        UnixListener::bind(format!("{}_{port}", self.socket_path().display()))
    }

    /// Connects to the VM's socket as a host client and sends `CONNECT <port>`; the loop sees it
    /// on the next [`VsockHarness::step`].
    pub fn host_connect(&self, port: u32) -> std::io::Result<UnixStream> {
        use std::io::Write;
        let mut stream = UnixStream::connect(self.socket_path())?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        Ok(stream)
    }

    fn post_rx_buffer(&mut self, addr: u64) -> Result<(), GuestMemoryError> {
        let head = self.rx.add_chain(&self.mem, &[Buffer { addr, len: RX_BUFFER_LEN, writable: true }])?;
        self.rx_buffers.retain(|(h, _)| *h != head);
        self.rx_buffers.push((head, addr));
        Ok(())
    }

    /// The guest sends `header` with `payload` (header and payload in separate descriptors, as
    /// Linux does) and notifies the TX queue; the loop processes it at once.
    pub fn guest_send(&mut self, header: &PacketHeader, payload: &[u8]) -> Result<(), GuestMemoryError> {
        let header_at = self.tx_alloc(HEADER_LEN as u64);
        self.mem.write_slice(&header.encode(), GuestAddress(header_at))?;
        let mut buffers = vec![Buffer { addr: header_at, len: HEADER_LEN as u32, writable: false }];
        if !payload.is_empty() {
            let payload_at = self.tx_alloc(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(payload_at))?;
            buffers.push(Buffer { addr: payload_at, len: payload.len() as u32, writable: false });
        }
        self.tx.add_chain(&self.mem, &buffers)?;
        self.run_tx();
        while self.tx.take_used(&self.mem).is_some() {}
        Ok(())
    }

    /// Room for `len` bytes in the TX area (reused round-robin: the loop copies packets out
    /// before the next is written).
    fn tx_alloc(&mut self, len: u64) -> u64 {
        if self.tx_cursor + len > TX_AREA + TX_AREA_LEN {
            self.tx_cursor = TX_AREA;
        }
        let at = self.tx_cursor;
        self.tx_cursor += len.next_multiple_of(64);
        at
    }

    /// Processes whatever the guest put on the TX queue (as after a queue notification).
    pub fn run_tx(&mut self) {
        self.lp.process_tx();
    }

    /// One pass of the loop without blocking: host socket events, expiries, RX.
    pub fn step(&mut self) {
        self.lp.poll_once(Some(Duration::ZERO));
    }

    /// How many of the loop's sockets epoll reports ready right now (a socket reported ready
    /// whatever the loop does would spin its thread).
    pub fn ready_sockets(&self) -> usize {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 64];
        self.lp.epoll.wait(0, &mut events).unwrap_or(0)
    }

    /// Expires what would be overdue at `now` (handshakes, unanswered requests), then RX.
    pub fn expire_at(&mut self, now: Instant) {
        self.lp.muxer.expire(&self.lp.epoll, now);
        let room = self.lp.process_rx();
        self.lp.muxer.update(&self.lp.epoll, room);
    }

    /// The next packet the guest received, stepping the loop a few times if none is there yet.
    /// Its RX buffer is posted again.
    pub fn guest_recv(&mut self) -> Option<Received> {
        for _ in 0..50 {
            if let Some(packet) = self.guest_recv_now() {
                return Some(packet);
            }
            self.step();
            if self.rx.in_flight() as usize == self.rx_buffers.len() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        None
    }

    /// The next packet already in the used ring, without stepping the loop.
    pub fn guest_recv_now(&mut self) -> Option<Received> {
        while let Some((head, len)) = self.rx.take_used(&self.mem) {
            if self.rx_buffers.iter().any(|(h, _)| *h == head) {
                return self.read_rx(head, len);
            }
            self.foreign_used.push((head, len));
        }
        None
    }

    /// Completed RX chains that were not the harness's buffers: `(head, bytes written)`.
    pub fn foreign_used(&self) -> &[(u16, u32)] {
        &self.foreign_used
    }

    fn read_rx(&mut self, head: u16, len: u32) -> Option<Received> {
        let addr = self.rx_buffers.iter().find(|(h, _)| *h == head)?.1;
        let mut bytes = vec![0u8; len.min(RX_BUFFER_LEN) as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).ok()?;
        self.post_rx_buffer(addr).ok()?;
        let header = PacketHeader::decode(&bytes).ok()?;
        Some(Received { header, payload: bytes.get(HEADER_LEN..).unwrap_or_default().to_vec() })
    }

    /// Limits the host ports the guest may connect to.
    pub fn set_host_ports(&mut self, ports: HostPorts) {
        self.lp.muxer.set_host_ports(ports);
    }

    /// Open connections in the muxer.
    pub fn connection_count(&self) -> usize {
        self.lp.muxer.connection_count()
    }

    /// The directory holding the host sockets.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for VsockHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A packet from the guest's `src_port` to host port `dst_port` advertising `buf_alloc` bytes of
/// receive buffer, of which `fwd_cnt` were consumed.
pub fn guest_packet(op: Op, src_port: u32, dst_port: u32, buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn io_error(err: GuestMemoryError) -> std::io::Error {
    std::io::Error::other(err)
}
