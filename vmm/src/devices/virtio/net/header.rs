//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2, 5.1.6) in front of every frame,
//! and the checks applied to the untrusted ones the guest sends.
//!
//! With `VIRTIO_F_VERSION_1` the header is always 12 bytes (it includes `num_buffers`), and the
//! tap is told the same size (`TUNSETVNETHDRSZ`), so frames pass between the queues and the tap
//! without being copied into another layout.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Bytes of the header before every frame.
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest Ethernet frame carried: a 64 KiB TSO segment plus its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_535 + 14 + 4;
/// The largest header plus frame that crosses the device either way.
pub const MAX_PACKET_LEN: usize = HEADER_LEN + MAX_FRAME_LEN;
/// The smallest frame worth sending: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;

/// Why a packet from the guest was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("{len} bytes: shorter than the virtio-net header and an Ethernet header")]
    TooShort { len: usize },
    #[error("{len} bytes: longer than the largest packet ({MAX_PACKET_LEN})")]
    TooLong { len: usize },
    #[error("unknown header flags {0:#x}")]
    Flags(u8),
    #[error("segmentation type {0:#x} was not negotiated")]
    GsoType(u8),
    #[error("checksum start {start} + offset {offset} is outside the {frame_len}-byte frame")]
    Checksum { start: u16, offset: u16, frame_len: usize },
    #[error("a partial checksum, but checksum offload (VIRTIO_NET_F_CSUM) was not negotiated")]
    ChecksumNotNegotiated,
}

/// Offloads the driver accepted, which bound what its headers may ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// `VIRTIO_NET_F_CSUM`: partial checksums.
    pub csum: bool,
    /// `VIRTIO_NET_F_HOST_TSO4`.
    pub tso4: bool,
    /// `VIRTIO_NET_F_HOST_TSO6`.
    pub tso6: bool,
    /// `VIRTIO_NET_F_HOST_ECN`.
    pub ecn: bool,
}

/// Checks the header of `packet` (header and frame, as read from a TX chain) against what was
/// negotiated. The tap's kernel side validates again; this keeps what the guest was never allowed
/// to ask for from reaching it at all.
pub fn check_tx(packet: &[u8], offloads: TxOffloads) -> Result<(), TxError> {
    let len = packet.len();
    if len < HEADER_LEN + MIN_FRAME_LEN {
        return Err(TxError::TooShort { len });
    }
    if len > MAX_PACKET_LEN {
        return Err(TxError::TooLong { len });
    }
    let flags = packet[0];
    let gso_type = packet[1];
    let known_flags = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
    if flags & !known_flags != 0 {
        return Err(TxError::Flags(flags));
    }
    let gso_allowed = match u32::from(gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6,
        _ => false,
    };
    let ecn_allowed = gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 == 0 || offloads.ecn;
    if !gso_allowed || !ecn_allowed {
        return Err(TxError::GsoType(gso_type));
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
        let start = u16::from_le_bytes([packet[6], packet[7]]);
        let offset = u16::from_le_bytes([packet[8], packet[9]]);
        let frame_len = len - HEADER_LEN;
        if !offloads.csum {
            return Err(TxError::ChecksumNotNegotiated);
        }
        // The checksum field (2 bytes) must lie inside the frame.
        if usize::from(start) + usize::from(offset) + 2 > frame_len {
            return Err(TxError::Checksum { start, offset, frame_len });
        }
    }
    Ok(())
}

/// Readies the header of a packet going to the guest: `num_buffers` is 1, as the spec asks when
/// mergeable RX buffers are not negotiated (the tap leaves those bytes untouched), and `flags` are
/// cleared unless the driver accepted checksum offload (the tap may still mark a checksum valid).
pub fn prepare_rx(packet: &mut [u8], guest_csum: bool) {
    if let Some(field) = packet.get_mut(NUM_BUFFERS_OFFSET..HEADER_LEN) {
        field.copy_from_slice(&1u16.to_le_bytes());
    }
    if !guest_csum {
        if let Some(flags) = packet.first_mut() {
            *flags = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(flags: u8, gso_type: u8, csum: (u16, u16), frame_len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LEN + frame_len];
        bytes[0] = flags;
        bytes[1] = gso_type;
        bytes[6..8].copy_from_slice(&csum.0.to_le_bytes());
        bytes[8..10].copy_from_slice(&csum.1.to_le_bytes());
        bytes
    }

    const ALL: TxOffloads = TxOffloads { csum: true, tso4: true, tso6: true, ecn: true };

    #[test]
    fn a_plain_frame_passes_and_sizes_are_bounded() {
        assert_eq!(check_tx(&packet(0, 0, (0, 0), 60), TxOffloads::default()), Ok(()));
        assert_eq!(check_tx(&[0u8; 20], ALL), Err(TxError::TooShort { len: 20 }));
        let huge = packet(0, 0, (0, 0), MAX_FRAME_LEN + 1);
        assert_eq!(check_tx(&huge, ALL), Err(TxError::TooLong { len: MAX_PACKET_LEN + 1 }));
    }

    #[test]
    fn segmentation_and_checksums_need_their_features() {
        let tso4 = packet(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, (34, 16), 1514);
        assert_eq!(check_tx(&tso4, ALL), Ok(()));
        let only_csum = TxOffloads { csum: true, ..TxOffloads::default() };
        assert_eq!(check_tx(&tso4, only_csum), Err(TxError::GsoType(1)));
        let udp = packet(0, 3, (0, 0), 100);
        assert_eq!(check_tx(&udp, ALL), Err(TxError::GsoType(3)), "UFO is never offered");
        let ecn = packet(0, (VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN) as u8, (0, 0), 100);
        assert_eq!(check_tx(&ecn, TxOffloads { ecn: false, ..ALL }), Err(TxError::GsoType(0x84)));
        assert_eq!(check_tx(&packet(0x80, 0, (0, 0), 60), ALL), Err(TxError::Flags(0x80)));
    }

    #[test]
    fn a_checksum_outside_the_frame_is_refused() {
        let bad = packet(1, 0, (60, 0xffff), 100);
        assert!(matches!(check_tx(&bad, ALL), Err(TxError::Checksum { .. })));
        let edge = packet(1, 0, (90, 8), 100);
        assert_eq!(check_tx(&edge, ALL), Ok(()), "the field's last byte is the frame's last byte");
        assert_eq!(check_tx(&edge, TxOffloads::default()), Err(TxError::ChecksumNotNegotiated));
    }

    #[test]
    fn received_headers_carry_one_buffer_and_no_flags_the_driver_did_not_accept() {
        let mut bytes = [0xffu8; HEADER_LEN];
        prepare_rx(&mut bytes, true);
        assert_eq!((bytes[0], &bytes[10..12]), (0xff, &[1u8, 0][..]));
        prepare_rx(&mut bytes, false);
        assert_eq!(bytes[0], 0, "no checksum flags without VIRTIO_NET_F_GUEST_CSUM");
        prepare_rx(&mut [0u8; 4], true); // too short: no panic
    }
}
