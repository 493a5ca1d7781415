//! Fuzz target: the network device's TX and RX paths as a hostile guest drives them (raw
//! descriptors, chains, available-ring indices, virtio-net headers with any flags, segmentation
//! type and checksum fields) interleaved with the tap side delivering packets of any length. The
//! device must never panic, hang or touch memory outside the guest's.

#![no_main]

use husk_vmm::devices::virtio::net::header::{TxOffloads, HEADER_LEN, MAX_PACKET_LEN};
use husk_vmm::devices::virtio::net::test_utils::{NetHarness, BUFFERS_START, MEMORY_SIZE};
use husk_vmm::devices::virtio::test_utils::{Buffer, RawDesc};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MAX_ACTIONS: usize = 64;

#[derive(Debug, Arbitrary)]
enum Action {
    /// A packet from the guest: a header with these fields and a frame of `len` bytes, split
    /// into `pieces` read-only buffers.
    Send { flags: u8, gso_type: u8, csum_start: u16, csum_offset: u16, len: u16, pieces: u8, at: u16 },
    /// An RX buffer of `len` writable bytes.
    Post { len: u32, at: u16 },
    /// Writes a descriptor verbatim into the TX or RX table.
    Desc { rx: bool, index: u16, addr: u32, len: u32, flags: u16, next: u16 },
    /// Publishes a head index (any value) on TX or RX.
    Publish { rx: bool, head: u16 },
    /// Sets an available index to anything.
    AvailIdx { rx: bool, idx: u16 },
    /// Writes bytes anywhere in guest memory.
    Poke { addr: u32, bytes: Vec<u8> },
    /// The tap delivers a packet of `len` bytes.
    Arrive { len: u32, fill: u8 },
    RunTx,
    RunRx,
    /// The guest takes what the device completed.
    Reap,
}

#[derive(Debug, Arbitrary)]
struct Input {
    offloads: (bool, bool, bool, bool),
    actions: Vec<Action>,
}

fuzz_target!(|input: Input| {
    let (csum, tso4, tso6, ecn) = input.offloads;
    let Ok(mut h) = NetHarness::new(TxOffloads { csum, tso4, tso6, ecn }) else { return };
    let buffer_space = MEMORY_SIZE - BUFFERS_START;
    for action in input.actions.into_iter().take(MAX_ACTIONS) {
        match action {
            Action::Send { flags, gso_type, csum_start, csum_offset, len, pieces, at } => {
                let mut packet = vec![0x5au8; HEADER_LEN + usize::from(len)];
                packet[0] = flags;
                packet[1] = gso_type;
                packet[6..8].copy_from_slice(&csum_start.to_le_bytes());
                packet[8..10].copy_from_slice(&csum_offset.to_le_bytes());
                let addr = BUFFERS_START + (u64::from(at) * 64) % (buffer_space - packet.len() as u64);
                if h.mem.write_slice(&packet, GuestAddress(addr)).is_err() {
                    continue;
                }
                let pieces = usize::from(pieces % 4) + 1;
                let step = packet.len().div_ceil(pieces);
                let buffers: Vec<Buffer> = (0..packet.len())
                    .step_by(step)
                    .map(|start| Buffer {
                        addr: addr + start as u64,
                        len: step.min(packet.len() - start) as u32,
                        writable: false,
                    })
                    .collect();
                let _ = h.tx.add_chain(&h.mem, &buffers);
            }
            Action::Post { len, at } => {
                let addr = BUFFERS_START + (u64::from(at) * 64) % buffer_space;
                let _ = h.rx.add_chain(&h.mem, &[Buffer { addr, len: len % (2 * MAX_PACKET_LEN as u32), writable: true }]);
            }
            Action::Desc { rx, index, addr, len, flags, next } => {
                let queue = if rx { &h.rx } else { &h.tx };
                let desc = RawDesc { addr: u64::from(addr), len, flags, next };
                let _ = queue.write_desc(&h.mem, index, desc);
            }
            Action::Publish { rx, head } => {
                let queue = if rx { &mut h.rx } else { &mut h.tx };
                let _ = queue.publish(&h.mem, head);
            }
            Action::AvailIdx { rx, idx } => {
                let queue = if rx { &h.rx } else { &h.tx };
                let _ = queue.set_avail_idx(&h.mem, idx);
            }
            Action::Poke { addr, bytes } => {
                let _ = h.mem.write_slice(&bytes, GuestAddress(u64::from(addr) % MEMORY_SIZE));
            }
            Action::Arrive { len, fill } => {
                let len = (len as usize) % (MAX_PACKET_LEN + 64);
                let _ = h.peer.send(&vec![fill; len]);
            }
            Action::RunTx => h.device.process_tx(),
            Action::RunRx => h.device.process_rx(),
            Action::Reap => {
                while h.rx.take_used(&h.mem).is_some() || h.tx.take_used(&h.mem).is_some() {}
                let mut sink = vec![0u8; MAX_PACKET_LEN + 64];
                while h.peer.recv(&mut sink).is_ok() {}
            }
        }
    }
    // A last pass over whatever state the guest left the rings in.
    h.device.process_tx();
    h.device.process_rx();
});
