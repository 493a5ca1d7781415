//! The virtio-net device (ID 1): one RX and one TX queue, the MAC and MTU in configuration space,
//! and the worker that moves packets between the queues and the [`FrameBackend`] (the tap).
//!
//! RX is driven by the backend becoming readable (edge-triggered: it is drained until it would
//! block) and by the driver adding buffers after RX ran dry; a packet read while the guest had no
//! buffer waits for one instead of being dropped. Both directions are bounded per wake-up so one
//! busy direction cannot starve the other.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net as vn;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::header::{self, TxOffloads, HEADER_LEN, MAX_PACKET_LEN};
use super::tap::{FrameBackend, TapOffloads};
use super::NetConfig;
use crate::devices::virtio::queue::{Chain, RequestQueue};
use crate::devices::virtio::worker::{QueueHandler, Served, Worker};
use crate::devices::virtio::{ActivateError, DeviceContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::seccomp::ThreadRole;
use crate::threads::DeviceThread;

const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
const QUEUE_SIZES: &[u16] = &[256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// Worker sources besides the queues: the backend, and the device's own "go on" kick.
const SOURCE_BACKEND: usize = 0;
const SOURCE_KICK: usize = 1;
/// Packets moved per direction before the worker looks at its other events again.
const BUDGET: usize = 256;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Offloads offered both ways: partial checksums and TCP segmentation (with ECN), the ones the
/// tap can carry. UFO is not offered (Linux dropped it), nor mergeable RX buffers (the guest then
/// posts 64 KiB chains).
const OFFLOAD_FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN);

/// The network device of one VM.
#[derive(Debug)]
pub struct NetDevice {
    config: NetConfig,
    /// Made with the VM; serves the device once activated.
    thread: Option<DeviceThread>,
    worker: Option<Worker>,
    /// What the worker has moved, published for [`VirtioDevice::debug_state`].
    published: Arc<PublishedCounters>,
}

impl NetDevice {
    /// A device with the MAC, MTU and backend of `config`, served by `thread`.
    pub fn new(config: NetConfig, thread: DeviceThread) -> NetDevice {
        NetDevice { config, thread: Some(thread), worker: None, published: Arc::default() }
    }

    /// `struct virtio_net_config`: mac[6], status, max_virtqueue_pairs, mtu (little endian).
    fn config_space(&self) -> [u8; 12] {
        let mut space = [0u8; 12];
        space[..6].copy_from_slice(&self.config.mac.octets());
        space[8..10].copy_from_slice(&1u16.to_le_bytes());
        space[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        space
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | bit(vn::VIRTIO_NET_F_MAC) | bit(vn::VIRTIO_NET_F_MTU) | OFFLOAD_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i as u64).and_then(|at| space.get(at as usize)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, context: DeviceContext) -> Result<(), ActivateError> {
        let DeviceContext { mem, queues, queue_events, interrupt, acked_features, seccomp } = context;
        let [rx, tx]: [Queue; 2] = queues
            .try_into()
            .map_err(|q: Vec<Queue>| ActivateError::QueueCount { expected: 2, found: q.len() })?;
        let acked = |feature| acked_features & bit(feature) != 0;
        let to_guest = TapOffloads {
            csum: acked(vn::VIRTIO_NET_F_GUEST_CSUM),
            tso4: acked(vn::VIRTIO_NET_F_GUEST_TSO4),
            tso6: acked(vn::VIRTIO_NET_F_GUEST_TSO6),
            ecn: acked(vn::VIRTIO_NET_F_GUEST_ECN),
        };
        let from_guest = TxOffloads {
            csum: acked(vn::VIRTIO_NET_F_CSUM),
            tso4: acked(vn::VIRTIO_NET_F_HOST_TSO4),
            tso6: acked(vn::VIRTIO_NET_F_HOST_TSO6),
            ecn: acked(vn::VIRTIO_NET_F_HOST_ECN),
        };
        let backend = Arc::clone(&self.config.backend);
        let published = Arc::clone(&self.published);
        let thread = self.thread.take().ok_or(ActivateError::AlreadyServed)?;
        let worker = Worker::start(thread, seccomp.then_some(ThreadRole::Net), move || {
            backend.set_offloads(to_guest)?;
            let tap = backend.as_raw_fd();
            let mut handler = NetQueues::new(mem, rx, tx, interrupt, backend, from_guest, to_guest.csum)?;
            handler.published = published;
            // Both fds live as long as the handler does (it holds the backend and the kick).
            let sources = vec![
                (tap, EventSet::IN | EventSet::EDGE_TRIGGERED),
                (handler.kick.as_raw_fd(), EventSet::IN),
            ];
            Ok(Served { handler, queue_events, sources })
        });
        self.worker = Some(worker.map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn debug_state(&self) -> Option<String> {
        Some(self.published.to_string())
    }
}

/// [`NetCounters`] and the worker's liveness as the worker last published them (after every pass).
#[derive(Debug, Default)]
pub struct PublishedCounters {
    rx_packets: AtomicU64,
    rx_dropped: AtomicU64,
    tx_packets: AtomicU64,
    tx_dropped: AtomicU64,
    /// 1 while a packet read from the tap waits for a guest RX buffer.
    rx_pending: AtomicU64,
    /// RX and TX passes run: a count that does not move between two reports is a worker that
    /// is not being woken (or is stuck).
    rx_passes: AtomicU64,
    tx_passes: AtomicU64,
}

impl PublishedCounters {
    fn publish(&self, counters: &NetCounters, rx_pending: bool) {
        let relaxed = Ordering::Relaxed;
        self.rx_packets.store(counters.rx_packets, relaxed);
        self.rx_dropped.store(counters.rx_dropped, relaxed);
        self.tx_packets.store(counters.tx_packets, relaxed);
        self.tx_dropped.store(counters.tx_dropped, relaxed);
        self.rx_pending.store(rx_pending.into(), relaxed);
    }
}

impl std::fmt::Display for PublishedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |value: &AtomicU64| value.load(Ordering::Relaxed);
        write!(
            f,
            "net rx_packets={} rx_dropped={} rx_pending={} rx_passes={} tx_packets={} tx_dropped={} tx_passes={}",
            get(&self.rx_packets),
            get(&self.rx_dropped),
            get(&self.rx_pending),
            get(&self.rx_passes),
            get(&self.tx_packets),
            get(&self.tx_dropped),
            get(&self.tx_passes)
        )
    }
}

/// Packets moved and dropped, per direction (logged when the device stops).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// The two queues and what serving them needs (lives on the worker thread).
#[derive(Debug)]
pub struct NetQueues {
    mem: GuestMemoryMmap,
    rx: RequestQueue,
    tx: RequestQueue,
    interrupt: Arc<Interrupt>,
    backend: Arc<dyn FrameBackend>,
    offloads: TxOffloads,
    /// The driver takes checksum flags on received packets (`VIRTIO_NET_F_GUEST_CSUM`).
    guest_csum: bool,
    /// Written when a direction ran out of budget, so the worker comes back to it.
    kick: EventFd,
    rx_packet: Vec<u8>,
    /// Length of a packet read from the backend that no guest buffer has taken yet.
    rx_pending: Option<usize>,
    tx_packet: Vec<u8>,
    counters: NetCounters,
    published: Arc<PublishedCounters>,
}

impl NetQueues {
    /// Serves `rx` and `tx` against `backend`, accepting from the guest what `offloads` allows and
    /// giving it checksum flags only with `guest_csum`.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<Interrupt>,
        backend: Arc<dyn FrameBackend>,
        offloads: TxOffloads,
        guest_csum: bool,
    ) -> std::io::Result<NetQueues> {
        Ok(NetQueues {
            mem,
            rx: RequestQueue::new("virtio-net rx", rx),
            tx: RequestQueue::new("virtio-net tx", tx),
            interrupt,
            backend,
            offloads,
            guest_csum,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            rx_packet: vec![0u8; MAX_PACKET_LEN],
            rx_pending: None,
            tx_packet: vec![0u8; MAX_PACKET_LEN],
            counters: NetCounters::default(),
            published: Arc::default(),
        })
    }

    /// What was moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Moves packets from the backend into the guest's RX buffers until the backend is empty,
    /// the guest has no buffer (the packet waits), or the budget is spent.
    pub fn process_rx(&mut self) {
        let NetQueues { mem, rx, backend, rx_packet, rx_pending, counters, guest_csum, .. } = self;
        let mut moved = 0;
        rx.begin_pass(mem);
        while moved < BUDGET {
            let len = match rx_pending.take() {
                Some(len) => len,
                None => match backend.recv(rx_packet) {
                    // A read that fills the buffer may have been cut short: never half a packet.
                    Ok(len) if (HEADER_LEN..rx_packet.len()).contains(&len) => len,
                    Ok(_) => {
                        counters.rx_dropped += 1;
                        moved += 1;
                        continue;
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        if err.kind() != std::io::ErrorKind::WouldBlock {
                            crate::guest_log!(warn, %err, "virtio-net: reading from the tap failed");
                        }
                        break;
                    }
                },
            };
            header::prepare_rx(&mut rx_packet[..len], *guest_csum);
            let Some(chain) = rx.next_chain(mem) else {
                *rx_pending = Some(len); // delivered when the driver adds buffers
                break;
            };
            let head = chain.head_index();
            let written = match write_packet(mem, chain, &rx_packet[..len]) {
                Some(written) => {
                    counters.rx_packets += 1;
                    written
                }
                None => {
                    log_first_drop(counters.rx_dropped, "a guest RX buffer is too small or unwritable");
                    counters.rx_dropped += 1;
                    0
                }
            };
            rx.complete(mem, head, written);
            moved += 1;
        }
        rx.end_pass(mem, &self.interrupt);
        self.published.rx_passes.fetch_add(1, Ordering::Relaxed);
        self.published.publish(&self.counters, self.rx_pending.is_some());
        if moved == BUDGET {
            let _ = self.kick.write(1);
        }
    }

    /// Sends every packet the guest put on TX (up to the budget); malformed ones are dropped.
    pub fn process_tx(&mut self) {
        let NetQueues { mem, tx, backend, tx_packet, offloads, counters, interrupt, .. } = self;
        let served = tx.serve_at_most(mem, interrupt, BUDGET, |chain| {
            let sent = read_packet(mem, chain, tx_packet).and_then(|len| {
                let packet = &tx_packet[..len];
                header::check_tx(packet, *offloads)?;
                backend.send(packet).map_err(TxDrop::Tap)
            });
            match sent {
                Ok(_) => counters.tx_packets += 1,
                Err(why) => {
                    log_first_drop(counters.tx_dropped, &why.to_string());
                    counters.tx_dropped += 1;
                }
            }
            0
        });
        self.published.tx_passes.fetch_add(1, Ordering::Relaxed);
        self.published.publish(&self.counters, self.rx_pending.is_some());
        if served == BUDGET {
            let _ = self.kick.write(1);
        }
    }
}

/// Why a packet from the guest was not sent.
#[derive(Debug, thiserror::Error)]
enum TxDrop {
    #[error("unreadable TX chain: {0}")]
    Chain(virtio_queue::Error),
    #[error("reading a TX chain: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Header(#[from] header::TxError),
    #[error("the tap refused it: {0}")]
    Tap(std::io::Error),
}

/// Logs the first drop of a kind at warn (the guest controls how often this happens).
fn log_first_drop(dropped_so_far: u64, why: &str) {
    if dropped_so_far == 0 {
        tracing::warn!(why, "virtio-net: dropping a packet (later drops are only counted)");
    } else {
        crate::guest_log!(debug, why, "virtio-net: dropping a packet");
    }
}

/// Copies a TX chain's readable bytes into `buffer`; the packet's length.
fn read_packet(mem: &GuestMemoryMmap, chain: Chain<'_>, buffer: &mut [u8]) -> Result<usize, TxDrop> {
    let mut reader = chain.reader(mem).map_err(TxDrop::Chain)?;
    let len = reader.available_bytes();
    if len > buffer.len() {
        return Err(header::TxError::TooLong { len }.into());
    }
    reader.read_exact(&mut buffer[..len]).map_err(TxDrop::Read)?;
    Ok(len)
}

/// Writes `packet` into an RX chain's writable buffers; `None` if it does not fit or cannot be
/// written (the chain is then completed empty).
fn write_packet(mem: &GuestMemoryMmap, chain: Chain<'_>, packet: &[u8]) -> Option<u32> {
    let mut writer = chain.writer(mem).ok()?;
    if writer.available_bytes() < packet.len() {
        return None;
    }
    writer.write_all(packet).ok()?;
    u32::try_from(packet.len()).ok()
}

impl QueueHandler for NetQueues {
    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn process_source(&mut self, index: usize) {
        match index {
            SOURCE_BACKEND => self.process_rx(),
            SOURCE_KICK => {
                let _ = self.kick.read();
                self.process_tx();
                self.process_rx();
            }
            _ => {}
        }
    }

    fn interrupt(&self) -> Option<&Interrupt> {
        Some(&self.interrupt)
    }
}

impl Drop for NetQueues {
    fn drop(&mut self) {
        tracing::debug!(counters = ?self.counters, "virtio-net: device stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::test_utils::{NetHarness, BUFFERS_START};
    use crate::devices::virtio::net::MacAddr;
    use crate::devices::virtio::test_utils::Buffer;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    const ALL: TxOffloads = TxOffloads { csum: true, tso4: true, tso6: true, ecn: true };

    /// A header (no offloads) and an Ethernet frame of `len` bytes filled with `fill`.
    fn packet(len: usize, fill: u8) -> Vec<u8> {
        let mut bytes = vec![fill; HEADER_LEN + len];
        bytes[..HEADER_LEN].fill(0);
        bytes
    }

    /// Puts `packet` in guest memory at `addr` as one read-only TX chain split in two buffers.
    fn post_tx(h: &mut NetHarness, addr: u64, packet: &[u8]) {
        let split = HEADER_LEN.min(packet.len());
        h.mem.write_slice(packet, GuestAddress(addr)).unwrap();
        let buffers = [
            Buffer { addr, len: split as u32, writable: false },
            Buffer { addr: addr + split as u64, len: (packet.len() - split) as u32, writable: false },
        ];
        h.tx.add_chain(&h.mem, &buffers).unwrap();
    }

    fn post_rx(h: &mut NetHarness, addr: u64, len: u32) -> u16 {
        h.rx.add_chain(&h.mem, &[Buffer { addr, len, writable: true }]).unwrap()
    }

    fn peer_recv(h: &NetHarness) -> Option<Vec<u8>> {
        let mut buffer = vec![0u8; MAX_PACKET_LEN];
        let len = h.peer.recv(&mut buffer).ok()?;
        buffer.truncate(len);
        Some(buffer)
    }

    #[test]
    fn a_guest_packet_reaches_the_tap_whole_and_its_chain_is_completed() {
        let mut h = NetHarness::new(ALL).unwrap();
        let sent = packet(100, 0xab);
        post_tx(&mut h, BUFFERS_START, &sent);
        h.device.process_tx();
        assert_eq!(peer_recv(&h).as_deref(), Some(&sent[..]));
        assert_eq!(h.tx.take_used(&h.mem).map(|(_, len)| len), Some(0));
        assert_eq!(h.irq.read().unwrap(), 1, "the driver is told");
        assert_eq!(h.device.counters().tx_packets, 1);
    }

    #[test]
    fn malformed_guest_packets_are_dropped_and_the_queue_keeps_serving() {
        let mut h = NetHarness::new(TxOffloads::default()).unwrap();
        let mut tso = packet(1000, 1);
        tso[1] = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8; // segmentation the driver never negotiated
        post_tx(&mut h, BUFFERS_START, &tso);
        post_tx(&mut h, BUFFERS_START + 0x1000, &[0u8; 8]); // shorter than a header
        h.tx.add_chain(&h.mem, &[Buffer { addr: 0xffff_0000, len: 64, writable: false }]).unwrap();
        let good = packet(60, 7);
        post_tx(&mut h, BUFFERS_START + 0x2000, &good);
        h.device.process_tx();
        assert_eq!(peer_recv(&h).as_deref(), Some(&good[..]), "only the good packet went out");
        assert_eq!(peer_recv(&h), None);
        assert_eq!(h.tx.in_flight(), 4, "all four are still to be taken by the driver");
        for _ in 0..4 {
            assert_eq!(h.tx.take_used(&h.mem).map(|(_, len)| len), Some(0));
        }
        assert_eq!(
            h.device.counters(),
            NetCounters { tx_packets: 1, tx_dropped: 3, ..NetCounters::default() }
        );
    }

    #[test]
    fn a_tap_packet_fills_a_guest_buffer_with_one_buffer_in_its_header() {
        let mut h = NetHarness::new(ALL).unwrap();
        let head = post_rx(&mut h, BUFFERS_START, 4096);
        let mut arrived = packet(200, 0x5a);
        arrived[10] = 0xee; // the tap leaves num_buffers as it finds it
        h.peer.send(&arrived).unwrap();
        h.device.process_rx();
        assert_eq!(h.rx.take_used(&h.mem), Some((head, arrived.len() as u32)));
        let mut seen = vec![0u8; arrived.len()];
        h.mem.read_slice(&mut seen, GuestAddress(BUFFERS_START)).unwrap();
        assert_eq!(&seen[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&seen[HEADER_LEN..], &arrived[HEADER_LEN..]);
    }

    #[test]
    fn a_packet_that_finds_no_buffer_waits_for_one_instead_of_being_lost() {
        let mut h = NetHarness::new(ALL).unwrap();
        let first = packet(60, 1);
        let second = packet(70, 2);
        h.peer.send(&first).unwrap();
        h.peer.send(&second).unwrap();
        h.device.process_rx(); // no buffers yet
        assert_eq!(h.rx.take_used(&h.mem), None);
        let used_flags: u16 = h.mem.read_obj(GuestAddress(h.device.rx.queue().used_ring())).unwrap();
        assert_eq!(used_flags & 1, 0, "VRING_USED_F_NO_NOTIFY is off: the driver's next buffer notifies");
        post_rx(&mut h, BUFFERS_START, 4096);
        post_rx(&mut h, BUFFERS_START + 0x1000, 4096);
        h.device.process_rx(); // what the driver's notification leads to
        assert_eq!(h.rx.take_used(&h.mem).map(|(_, len)| len), Some(first.len() as u32));
        assert_eq!(h.rx.take_used(&h.mem).map(|(_, len)| len), Some(second.len() as u32));
        assert_eq!(h.device.counters().rx_dropped, 0);
    }

    #[test]
    fn a_buffer_too_small_for_the_packet_is_completed_empty_and_the_next_one_used() {
        let mut h = NetHarness::new(ALL).unwrap();
        post_rx(&mut h, BUFFERS_START, 32);
        post_rx(&mut h, BUFFERS_START + 0x1000, 0xffff_0000); // longer than guest memory
        post_rx(&mut h, BUFFERS_START + 0x2000, 4096);
        for fill in 1..=3 {
            h.peer.send(&packet(100, fill)).unwrap();
        }
        h.device.process_rx();
        let lens: Vec<_> = std::iter::from_fn(|| h.rx.take_used(&h.mem)).map(|(_, len)| len).collect();
        assert_eq!(lens, [0, 0, 112]);
        let mut byte = [0u8];
        h.mem.read_slice(&mut byte, GuestAddress(BUFFERS_START + 0x2000 + 20)).unwrap();
        assert_eq!(byte[0], 3, "the third packet landed in the good buffer");
        assert_eq!(h.device.counters().rx_dropped, 2);
    }

    #[test]
    fn configuration_space_holds_the_mac_and_mtu() {
        let (backend, _peer) = crate::devices::virtio::net::test_utils::SocketBackend::pair().unwrap();
        let mac = MacAddr::new([0x0a, 0x58, 0x0a, 0xf4, 0, 5]);
        let thread = DeviceThread::spawn("test-net").unwrap();
        let device = NetDevice::new(NetConfig { backend, mac, mtu: 1450 }, thread);
        let mut space = [0u8; 12];
        device.read_config(0, &mut space);
        assert_eq!(&space[..6], &mac.octets());
        assert_eq!(u16::from_le_bytes([space[10], space[11]]), 1450);
        let mut past_end = [0xffu8; 4];
        device.read_config(10, &mut past_end);
        assert_eq!(past_end, [0xaa, 0x05, 0, 0], "the MTU, then zeros past the end");
        assert_eq!(device.device_features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    }
}
