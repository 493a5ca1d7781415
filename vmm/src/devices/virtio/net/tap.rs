//! The host side of the network device: a tap interface, opened with a virtio-net header in front
//! of every frame (`IFF_VNET_HDR`, 12 bytes), non-blocking, and told which offloads the guest can
//! take. The tap is not persistent: it disappears with its last file descriptor, so a VMM that
//! dies leaves no interface behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use super::header::HEADER_LEN;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, ::std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// Interface names are at most 15 bytes (`IFNAMSIZ` with its NUL).
pub const MAX_NAME_LEN: usize = 15;

/// Offloads the tap may hand the guest (`TUN_F_*`): partial checksums and TCP segments it would
/// otherwise have to split and checksum on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

impl TapOffloads {
    fn flags(self) -> libc::c_ulong {
        const TUN_F_CSUM: libc::c_ulong = 0x01;
        const TUN_F_TSO4: libc::c_ulong = 0x02;
        const TUN_F_TSO6: libc::c_ulong = 0x04;
        const TUN_F_TSO_ECN: libc::c_ulong = 0x08;
        // Segments without checksum offload make no sense to the kernel: it refuses them.
        if !self.csum {
            return 0;
        }
        let mut flags = TUN_F_CSUM;
        if self.tso4 {
            flags |= TUN_F_TSO4;
        }
        if self.tso6 {
            flags |= TUN_F_TSO6;
        }
        if self.ecn && (self.tso4 || self.tso6) {
            flags |= TUN_F_TSO_ECN;
        }
        flags
    }
}

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?}: must be 1 to {MAX_NAME_LEN} bytes without '/', NUL or spaces")]
    Name(String),
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("creating tap {name:?} (TUNSETIFF; needs CAP_NET_ADMIN in the network namespace): {cause}")]
    Create { name: String, cause: io::Error },
    #[error("tap {name:?}: {what}: {cause}")]
    Configure { name: String, what: &'static str, cause: io::Error },
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union.
#[repr(C)]
#[derive(Debug, Default)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// What the network device reads frames from and writes frames to. A tap in production; tests use
/// a datagram socket pair (see `test_utils`).
pub trait FrameBackend: AsRawFd + Send + Sync + std::fmt::Debug {
    /// Reads one packet (header and frame); `WouldBlock` when none is queued.
    fn recv(&self, packet: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet (header and frame).
    fn send(&self, packet: &[u8]) -> io::Result<usize>;
    /// Which offloads the guest accepted, so the backend hands it only frames it can take.
    fn set_offloads(&self, offloads: TapOffloads) -> io::Result<()>;
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the tap `name` in the calling thread's network namespace, creating it if it does not
    /// exist (a non-persistent tap lives as long as this handle).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(TapError::Name(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut request = IfReq { flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, ..IfReq::default() };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its size (40 bytes) and
        // the layout of the members the call uses, and lives across the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut request) };
        if ret < 0 {
            return Err(TapError::Create { name: name.to_owned(), cause: io::Error::last_os_error() });
        }
        let tap = Tap { file, name: name.to_owned() };
        let header_len = HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives across the call.
        let ret = unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ(), &header_len) };
        tap.check(ret, "setting the virtio-net header size")?;
        tap.set_offloads(TapOffloads::default())
            .map_err(|cause| tap.configure_error("clearing offloads", cause))?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's flags as the kernel reports them (`TUNGETIFF`).
    pub fn flags(&self) -> Result<i16, TapError> {
        let mut request = IfReq::default();
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `request`, which is large enough.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNGETIFF(), &mut request) };
        self.check(ret, "reading its flags")?;
        Ok(request.flags)
    }

    fn check(&self, ret: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            return Err(self.configure_error(what, io::Error::last_os_error()));
        }
        Ok(())
    }

    fn configure_error(&self, what: &'static str, cause: io::Error) -> TapError {
        TapError::Configure { name: self.name.clone(), what, cause }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameBackend for Tap {
    fn recv(&self, packet: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(packet)
    }

    fn send(&self, packet: &[u8]) -> io::Result<usize> {
        (&self.file).write(packet)
    }

    fn set_offloads(&self, offloads: TapOffloads) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), offloads.flags()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "a/b", "has space", "sixteen-bytes-xx"] {
            assert!(matches!(Tap::open(name), Err(TapError::Name(_))), "{name:?}");
        }
    }

    #[test]
    fn offload_flags_follow_the_kernel_rules() {
        assert_eq!(TapOffloads { tso4: true, ..TapOffloads::default() }.flags(), 0, "TSO needs csum");
        let all = TapOffloads { csum: true, tso4: true, tso6: true, ecn: true };
        assert_eq!(all.flags(), 0x0f);
        assert_eq!(TapOffloads { csum: true, ecn: true, ..TapOffloads::default() }.flags(), 0x01);
    }

    #[test]
    fn a_tap_is_created_with_a_vnet_header_when_the_host_allows() {
        // Needs CAP_NET_ADMIN and /dev/net/tun; the VM tests cover the tap on every CI run.
        let tap = match Tap::open("husk-unit0") {
            Ok(tap) => tap,
            Err(err) => return eprintln!("skipped: {err}"),
        };
        assert_eq!(tap.name(), "husk-unit0");
        let flags = tap.flags().unwrap();
        assert_eq!(flags & (IFF_TAP | IFF_VNET_HDR | IFF_NO_PI), IFF_TAP | IFF_VNET_HDR | IFF_NO_PI);
        tap.set_offloads(TapOffloads { csum: true, tso4: true, tso6: true, ecn: false }).unwrap();
        let mut buffer = [0u8; 64];
        let err = tap.recv(&mut buffer).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "down and empty: nothing to read");
    }
}
