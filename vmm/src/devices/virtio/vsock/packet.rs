//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its validation.
//!
//! Every header the guest puts on the TX queue is untrusted: [`PacketHeader::parse_tx`] accepts only
//! stream packets from the guest's own CID to the host, with a known operation and a payload length
//! within bounds; anything else is an error the device answers with RST or drops.

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HEADER_LEN: usize = 44;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Largest payload one packet may carry (the Linux driver uses 64 KiB buffers at most).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type served.
pub const TYPE_STREAM: u16 = 1;
/// Shutdown flag: the peer will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the peer will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = PacketError;

    fn try_from(value: u16) -> Result<Op, PacketError> {
        Ok(match value {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            other => return Err(PacketError::UnknownOp(other)),
        })
    }
}

/// Why a guest packet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("header truncated: {0} of {HEADER_LEN} bytes")]
    Truncated(usize),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("socket type {0} is not stream")]
    UnsupportedType(u16),
    #[error("source CID {found} is not the guest's CID {expected}")]
    WrongSourceCid { found: u64, expected: u64 },
    #[error("destination CID {0} is not the host")]
    WrongDestinationCid(u64),
    #[error("payload length {0} exceeds {MAX_PAYLOAD}")]
    PayloadTooLong(u32),
    #[error("{op:?} carries a {len}-byte payload; only RW may")]
    UnexpectedPayload { op: Op, len: u32 },
}

/// A decoded packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes the little-endian wire format; only the length is checked.
    pub fn decode(bytes: &[u8]) -> Result<PacketHeader, PacketError> {
        let bytes: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(PacketError::Truncated(bytes.len()))?;
        let u64_at = |at: usize| u64::from_le_bytes(array(&bytes[at..at + 8]));
        let u32_at = |at: usize| u32::from_le_bytes(array(&bytes[at..at + 4]));
        let u16_at = |at: usize| u16::from_le_bytes(array(&bytes[at..at + 2]));
        Ok(PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// The wire format.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.type_.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    /// Decodes and validates a header the guest (CID `guest_cid`) put on the TX queue; returns it
    /// with its operation.
    pub fn parse_tx(bytes: &[u8], guest_cid: u64) -> Result<(PacketHeader, Op), PacketError> {
        let header = PacketHeader::decode(bytes)?;
        let op = Op::try_from(header.op)?;
        if header.type_ != TYPE_STREAM {
            return Err(PacketError::UnsupportedType(header.type_));
        }
        if header.src_cid != guest_cid {
            return Err(PacketError::WrongSourceCid { found: header.src_cid, expected: guest_cid });
        }
        if header.dst_cid != HOST_CID {
            return Err(PacketError::WrongDestinationCid(header.dst_cid));
        }
        if header.len > MAX_PAYLOAD {
            return Err(PacketError::PayloadTooLong(header.len));
        }
        if header.len > 0 && op != Op::Rw {
            return Err(PacketError::UnexpectedPayload { op, len: header.len });
        }
        Ok((header, op))
    }

    /// A reply from the host to the guest's packet `to`, with the given operation and credit state.
    pub fn reply(to: &PacketHeader, op: Op, buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader {
            src_cid: to.dst_cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }
}

/// Copies a slice of known length into an array (the callers slice exactly N bytes).
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_CID: u64 = 3;

    fn header(op: Op, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn headers_round_trip_through_the_wire_format() {
        let h = header(Op::Rw, 512);
        assert_eq!(PacketHeader::decode(&h.encode()).unwrap(), h);
        // Field offsets as the spec lays them out.
        let wire = h.encode();
        assert_eq!(&wire[24..28], &512u32.to_le_bytes());
        assert_eq!(&wire[30..32], &(Op::Rw as u16).to_le_bytes());
    }

    #[test]
    fn every_operation_is_accepted_from_the_guest_to_the_host() {
        for op in [Op::Request, Op::Response, Op::Rst, Op::Shutdown, Op::CreditUpdate, Op::CreditRequest] {
            assert_eq!(PacketHeader::parse_tx(&header(op, 0).encode(), GUEST_CID).unwrap().1, op);
        }
        assert_eq!(
            PacketHeader::parse_tx(&header(Op::Rw, MAX_PAYLOAD).encode(), GUEST_CID).unwrap().1,
            Op::Rw
        );
    }

    #[test]
    fn malformed_headers_are_refused_with_the_reason() {
        let ok = header(Op::Rw, 16);
        let refuse = |h: PacketHeader| PacketHeader::parse_tx(&h.encode(), GUEST_CID).unwrap_err();
        assert_eq!(
            PacketHeader::parse_tx(&ok.encode()[..43], GUEST_CID).unwrap_err(),
            PacketError::Truncated(43)
        );
        assert_eq!(refuse(PacketHeader { op: 0, ..ok }), PacketError::UnknownOp(0));
        assert_eq!(refuse(PacketHeader { op: 99, ..ok }), PacketError::UnknownOp(99));
        assert_eq!(refuse(PacketHeader { type_: 2, ..ok }), PacketError::UnsupportedType(2));
        assert!(matches!(refuse(PacketHeader { src_cid: 9, ..ok }), PacketError::WrongSourceCid { .. }));
        assert_eq!(refuse(PacketHeader { dst_cid: 7, ..ok }), PacketError::WrongDestinationCid(7));
        assert_eq!(
            refuse(PacketHeader { len: MAX_PAYLOAD + 1, ..ok }),
            PacketError::PayloadTooLong(MAX_PAYLOAD + 1)
        );
        assert!(matches!(
            refuse(header(Op::Request, 4)),
            PacketError::UnexpectedPayload { op: Op::Request, len: 4 }
        ));
    }

    #[test]
    fn replies_swap_the_addresses_and_carry_credit() {
        let request = header(Op::Request, 0);
        let response = PacketHeader::reply(&request, Op::Response, 4096, 10);
        assert_eq!((response.src_cid, response.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!((response.src_port, response.dst_port), (1024, 1025));
        assert_eq!((response.op, response.buf_alloc, response.fwd_cnt), (Op::Response as u16, 4096, 10));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep over random headers and truncations.
        let mut state = 0x1234_5678u32;
        for _ in 0..10_000 {
            let mut bytes = [0u8; HEADER_LEN];
            for b in bytes.iter_mut() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = state as u8;
            }
            let _ = PacketHeader::parse_tx(&bytes, GUEST_CID);
            let _ = PacketHeader::parse_tx(&bytes[..(state as usize % HEADER_LEN)], GUEST_CID);
        }
    }
}
