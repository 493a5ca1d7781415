//! Fuzz target: the vsock device's TX and RX paths as a hostile guest drives them (raw
//! descriptors, chains, available-ring indices, packet headers with any operation, length,
//! credit and ports) interleaved with host clients connecting, writing and closing. The device
//! must never panic, hang or touch memory outside the guest's.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use husk_vmm::devices::virtio::test_utils::RawDesc;
use husk_vmm::devices::virtio::vsock::packet::{PacketHeader, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};
use husk_vmm::devices::virtio::vsock::test_utils::{VsockHarness, GUEST_CID};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// Host ports with a listener behind them (`<socket>_<port>`); guest connections to others fail.
const LISTENING: [u32; 2] = [5000, 5001];
/// Bounds per input, so one input stays fast.
const MAX_HOST_CLIENTS: usize = 8;
const MAX_ACTIONS: usize = 64;

#[derive(Debug, Arbitrary)]
enum Action {
    /// A packet from the guest; fields picked so most are near-valid and reach the state machine.
    Packet {
        op: u8,
        ports: u8,
        flags: u8,
        buf_alloc: u32,
        fwd_cnt: u32,
        payload_len: u16,
        /// Overrides the header's length field (lying about the payload).
        claimed_len: Option<u32>,
        /// Breaks CID, type or destination.
        mangle: u8,
    },
    /// Writes a descriptor verbatim into the TX or RX table.
    Desc { rx: bool, index: u16, addr: u32, len: u32, flags: u16, next: u16 },
    /// Publishes a head index (any value) on TX or RX.
    Publish { rx: bool, head: u16 },
    /// Sets the available index to anything.
    AvailIdx { rx: bool, idx: u16 },
    /// Writes bytes anywhere in guest memory (the guest may scribble over its own rings).
    Poke { addr: u32, bytes: Vec<u8> },
    RunTx,
    Step,
    /// The guest consumes what it received.
    Receive,
    HostConnect { port: u8 },
    HostWrite { client: u8, len: u16 },
    HostShutdown { client: u8 },
    HostDrop { client: u8 },
    /// Time passes: handshakes and connection requests expire.
    Expire,
}

struct Host {
    listeners: Vec<UnixListener>,
    clients: Vec<UnixStream>,
}

impl Host {
    /// Accepts guest connections and drains every client without blocking.
    fn service(&mut self) {
        for listener in &self.listeners {
            while let Ok((stream, _)) = listener.accept() {
                if self.clients.len() < 2 * MAX_HOST_CLIENTS && stream.set_nonblocking(true).is_ok() {
                    self.clients.push(stream);
                }
            }
        }
        let mut buf = [0u8; 4096];
        for client in &mut self.clients {
            while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
        }
    }

    fn client(&mut self, index: u8) -> Option<&mut UnixStream> {
        let len = self.clients.len();
        (len > 0).then(|| &mut self.clients[index as usize % len])
    }
}

fn packet_header(op: u8, ports: u8, flags: u8, buf_alloc: u32, fwd_cnt: u32, len: u32, mangle: u8) -> PacketHeader {
    // Guest ports 0..4, host ports: the listeners, an unused port, or a host-initiated one.
    let src_port = u32::from(ports & 0x3);
    let dst_port = match (ports >> 2) & 0x3 {
        0 => LISTENING[0],
        1 => LISTENING[1],
        2 => 6000,
        _ => (1 << 30) + u32::from(ports >> 4),
    };
    let mut header = PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op: u16::from(op % 9), // 0 and 8 are invalid
        flags: u32::from(flags & 0x7),
        buf_alloc,
        fwd_cnt,
    };
    match mangle {
        1 => header.src_cid = 7,
        2 => header.dst_cid = 9,
        3 => header.type_ = 2,
        _ => {}
    }
    header
}

fn run(actions: Vec<Action>) {
    let Ok(mut h) = VsockHarness::new() else { return };
    let mut host = Host { listeners: Vec::new(), clients: Vec::new() };
    for port in LISTENING {
        if let Ok(listener) = h.listen(port) {
            let _ = listener.set_nonblocking(true);
            host.listeners.push(listener);
        }
    }
    let mut host_connects = 0;
    let payload = vec![0x5au8; MAX_PAYLOAD as usize];
    for action in actions.into_iter().take(MAX_ACTIONS) {
        match action {
            Action::Packet { op, ports, flags, buf_alloc, fwd_cnt, payload_len, claimed_len, mangle } => {
                let len = usize::from(payload_len).min(payload.len());
                let header = packet_header(
                    op,
                    ports,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                    claimed_len.unwrap_or(len as u32),
                    mangle,
                );
                let _ = h.guest_send(&header, &payload[..len]);
            }
            Action::Desc { rx, index, addr, len, flags, next } => {
                let queue = if rx { &h.rx } else { &h.tx };
                let _ = queue.write_desc(&h.mem, index, RawDesc { addr: u64::from(addr), len, flags, next });
            }
            Action::Publish { rx, head } => {
                let mem = h.mem.clone();
                let queue = if rx { &mut h.rx } else { &mut h.tx };
                let _ = queue.publish(&mem, head);
            }
            Action::AvailIdx { rx, idx } => {
                let queue = if rx { &h.rx } else { &h.tx };
                let _ = queue.set_avail_idx(&h.mem, idx);
            }
            Action::Poke { addr, bytes } => {
                use vm_memory::{Bytes, GuestAddress};
                let _ = h.mem.write_slice(&bytes, GuestAddress(u64::from(addr)));
            }
            Action::RunTx => h.run_tx(),
            Action::Step => h.step(),
            Action::Receive => while h.guest_recv_now().is_some() {},
            Action::HostConnect { port } => {
                if host_connects < MAX_HOST_CLIENTS {
                    host_connects += 1;
                    if let Ok(stream) = h.host_connect(u32::from(port % 4)) {
                        let _ = stream.set_nonblocking(true);
                        host.clients.push(stream);
                    }
                }
            }
            Action::HostWrite { client, len } => {
                if let Some(stream) = host.client(client) {
                    let _ = stream.write(&payload[..usize::from(len)]);
                }
            }
            Action::HostShutdown { client } => {
                if let Some(stream) = host.client(client) {
                    let _ = stream.shutdown(Shutdown::Write);
                }
            }
            Action::HostDrop { client } => {
                if !host.clients.is_empty() {
                    let index = usize::from(client) % host.clients.len();
                    host.clients.swap_remove(index);
                }
            }
            Action::Expire => h.expire_at(Instant::now() + Duration::from_secs(10)),
        }
        host.service();
    }
    h.step();
}

fuzz_target!(|actions: Vec<Action>| run(actions));
