//! Test doubles for the network device: [`SocketBackend`] stands in for the tap (a datagram socket
//! pair keeps packet boundaries as a tap does), and [`NetHarness`] plays the guest driver of both
//! queues in guest memory. Used by unit tests and the fuzz targets (feature `fuzzing`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::NetQueues;
use super::header::TxOffloads;
use super::tap::{FrameBackend, TapOffloads};
use crate::devices::virtio::test_utils::GuestQueue;
use crate::devices::virtio::Interrupt;

/// The device's end of a datagram socket pair; the test holds the other end (`peer`).
#[derive(Debug)]
pub struct SocketBackend {
    socket: UnixDatagram,
    /// The offloads the device last set.
    pub offloads: Mutex<Option<TapOffloads>>,
}

impl SocketBackend {
    /// A backend and the peer socket that sees what the device sends (both non-blocking).
    pub fn pair() -> io::Result<(Arc<SocketBackend>, UnixDatagram)> {
        let (device, peer) = UnixDatagram::pair()?;
        device.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        Ok((Arc::new(SocketBackend { socket: device, offloads: Mutex::new(None) }), peer))
    }
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl FrameBackend for SocketBackend {
    fn recv(&self, packet: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(packet)
    }

    fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.socket.send(packet)
    }

    fn set_offloads(&self, offloads: TapOffloads) -> io::Result<()> {
        if let Ok(mut slot) = self.offloads.lock() {
            *slot = Some(offloads);
        }
        Ok(())
    }
}

/// Guest memory with an RX and a TX queue, the device's [`NetQueues`] on them, and the peer end of
/// its backend.
#[derive(Debug)]
pub struct NetHarness {
    pub mem: GuestMemoryMmap,
    pub rx: GuestQueue,
    pub tx: GuestQueue,
    pub device: NetQueues,
    pub peer: UnixDatagram,
    pub irq: EventFd,
}

/// Where buffers may go in the harness's memory (the queues sit below).
pub const BUFFERS_START: u64 = 0x1_0000;
/// Size of the harness's guest memory.
pub const MEMORY_SIZE: u64 = 0x40_0000;
const QUEUE_SIZE: u16 = 64;

impl NetHarness {
    /// A harness whose device accepts the TX offloads `offloads`.
    pub fn new(offloads: TxOffloads) -> io::Result<NetHarness> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)])
            .map_err(io::Error::other)?;
        let (rx, rx_queue) = GuestQueue::new(&mem, 0x1000, QUEUE_SIZE).map_err(io::Error::other)?;
        let (tx, tx_queue) = GuestQueue::new(&mem, 0x8000, QUEUE_SIZE).map_err(io::Error::other)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let interrupt = Arc::new(Interrupt::new(irq.try_clone()?));
        let (backend, peer) = SocketBackend::pair()?;
        let device = NetQueues::new(mem.clone(), rx_queue, tx_queue, interrupt, backend, offloads, true)?;
        Ok(NetHarness { mem, rx, tx, device, peer, irq })
    }
}
