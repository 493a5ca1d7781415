//! virtio-net on a tap: the guest's NIC.
//!
//! - [`device`]: the virtio plumbing (features, configuration space, the RX/TX worker).
//! - [`header`]: the virtio-net header in front of every frame, and the checks on the guest's.
//! - [`tap`]: the host backend, a tap opened in the caller's network namespace.
//!
//! Who puts the tap where (the pod's network namespace, tc redirection to the CNI veth) is the
//! shim's business; this module only moves frames.

pub mod device;
pub mod header;
pub mod tap;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use device::NetDevice;
pub use tap::{FrameBackend, Tap, TapError, TapOffloads};

/// The guest NIC: its backend, MAC address and MTU.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub backend: Arc<dyn FrameBackend>,
    pub mac: MacAddr,
    /// Offered to the guest driver (`VIRTIO_NET_F_MTU`); the pod's MTU.
    pub mtu: u16,
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The address from its six octets.
    pub const fn new(octets: [u8; 6]) -> MacAddr {
        MacAddr(octets)
    }

    /// Its six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

/// A MAC address that is not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MAC address {0:?}: expected six hex octets separated by ':' (e.g. 02:00:00:00:00:01)")]
pub struct MacAddrError(String);

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(text: &str) -> Result<MacAddr, MacAddrError> {
        let error = || MacAddrError(text.to_owned());
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(error)?;
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddr(octets))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print_in_lower_case() {
        let mac: MacAddr = "0A:58:0a:f4:00:05".parse().unwrap();
        assert_eq!(mac.octets(), [0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x05]);
        assert_eq!(mac.to_string(), "0a:58:0a:f4:00:05");
        for bad in ["", "0a:58:0a:f4:00", "0a:58:0a:f4:00:05:06", "0a:58:0a:f4:00:5", "zz:58:0a:f4:00:05"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
    }
}
