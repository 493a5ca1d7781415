//! The virtio-vsock device (ID 19): its three queues (RX, TX, events), its configuration space
//! (the guest's CID) and the thread that moves packets between the queues and the [`Muxer`].

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, FD_TOKEN_BASE, LISTENER_TOKEN};
use super::packet::{PacketHeader, HEADER_LEN, MAX_PAYLOAD};
use crate::devices::virtio::{
    ActivateError, DeviceContext, Interrupt, VirtioDevice, INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1,
};

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
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl VsockDevice {
    /// A device giving the guest CID `guest_cid`, with its host side at the unix socket `path`.
    pub fn new(guest_cid: u64, path: PathBuf) -> VsockDevice {
        VsockDevice { guest_cid, path, worker: None }
    }

    fn stop(&mut self) {
        if let Some((stop, thread)) = self.worker.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop();
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
        let DeviceContext { mem, queues, queue_events, interrupt, .. } = context;
        if queues.len() != QUEUE_SIZES.len() || queue_events.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { expected: QUEUE_SIZES.len(), found: queues.len() });
        }
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        epoll
            .ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))
            .map_err(ActivateError::Worker)?;
        for (index, event) in queue_events.iter().enumerate() {
            epoll
                .ctl(ControlOperation::Add, event.as_raw_fd(), EpollEvent::new(EventSet::IN, index as u64))
                .map_err(ActivateError::Worker)?;
        }
        // A previous activation (before a driver reset) may have left the socket.
        let _ = std::fs::remove_file(&self.path);
        let muxer = Muxer::new(&self.path, self.guest_cid, &epoll).map_err(ActivateError::Worker)?;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: QUEUE_SIZES.len(), found: 0 });
        };
        let mut lp = EventLoop {
            mem,
            rx,
            tx,
            interrupt,
            muxer,
            epoll,
            queue_events,
            guest_cid: self.guest_cid,
            payload: vec![0u8; MAX_PAYLOAD as usize],
        };
        let thread = std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || lp.run())
            .map_err(ActivateError::Worker)?;
        self.worker = Some((stop, thread));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

struct EventLoop {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    epoll: Epoll,
    queue_events: Vec<EventFd>,
    guest_cid: u64,
    /// One packet's payload, allocated once (TX and RX take turns on the loop thread).
    payload: Vec<u8>,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::error!(%err, "virtio-vsock: epoll_wait failed; the device stops");
                    return;
                }
            };
            for event in &events[..count] {
                match event.data() {
                    STOP_TOKEN => return,
                    token if token < QUEUE_SIZES.len() as u64 => {
                        let _ = self.queue_events[token as usize].read();
                        if token == TX as u64 {
                            self.process_tx();
                        }
                    }
                    LISTENER_TOKEN => self.muxer.accept(&self.epoll),
                    token if token >= FD_TOKEN_BASE => {
                        self.muxer.stream_ready((token - FD_TOKEN_BASE) as i32, &self.epoll)
                    }
                    _ => {}
                }
            }
            let rx_room = self.process_rx();
            self.muxer.update(&self.epoll, rx_room);
        }
    }

    /// Takes every packet the guest queued on TX and hands it to the muxer.
    fn process_tx(&mut self) {
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
                        Err(err) => tracing::debug!(%err, "virtio-vsock: guest packet dropped"),
                    }
                }
            }
            if self.tx.add_used(&self.mem, head, 0).is_err() {
                tracing::warn!("virtio-vsock: bad TX used ring");
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
    fn process_rx(&mut self) -> bool {
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
