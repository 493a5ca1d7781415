//! Snapshots of a running VM, and VMs restored from them (issue 22's templates).
//!
//! A snapshot is a directory holding two files:
//! - `memory`: guest RAM, its regions back to back ([`memory`]); a restored VM maps it
//!   `MAP_PRIVATE`, so the pages it only reads stay shared with every VM restored from the same
//!   snapshot, and what it writes is its own;
//! - `state.json`: everything else, a plain versioned struct ([`SnapshotState`]): each vCPU's
//!   registers, FPU/XSAVE, MSRs, LAPIC and events ([`vcpu`]), the interrupt controllers, PIT and
//!   clock ([`machine`]), and the devices' state. It is written last: a directory without it is
//!   no snapshot.
//!
//! Both are readable by their owner alone (the memory of a guest is the guest's secrets); the
//! directory is the caller's to keep from others.
//!
//! Devices: the serial port, and each virtio device's transport with its queues' positions
//! ([`crate::devices::virtio::mmio::TransportSnapshot`]) for devices that keep nothing else
//! (virtio-rng so far); a VM with any other virtio device is refused.

pub mod machine;
pub mod memory;
pub mod vcpu;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::SerialState;
use machine::MachineState;
use vcpu::VcpuState;

/// The state file's format; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// Guest RAM in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Everything else.
pub const STATE_FILE: &str = "state.json";
/// The largest state file read (a few vCPUs' state is tens of KiB).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what}: {cause}")]
    Kvm { what: &'static str, cause: kvm_ioctls::Error },
    #[error("{what}: {cause}")]
    Io { what: &'static str, cause: std::io::Error },
    #[error("{path}: {cause}")]
    File { path: PathBuf, cause: std::io::Error },
    #[error("{path}: not a snapshot state file: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path}: snapshot format {found}, this VMM reads format {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: {found} bytes of guest memory, the snapshot's VM has {expected}")]
    MemorySize { path: PathBuf, found: u64, expected: u64 },
    #[error("the snapshot's {0} do not fit this VMM")]
    Invalid(&'static str),
    #[error("KVM refused MSR {index:#x} of the snapshot")]
    MsrRefused { index: u32 },
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::mmio::TransportSnapshotError),
    #[error("the VM ended before it could be snapshotted")]
    Ended,
}

/// What a snapshot holds besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Guest RAM in bytes (the size of [`MEMORY_FILE`]).
    pub mem_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub machine: MachineState,
    pub serial: SerialState,
    /// The virtio devices in MMIO slot order.
    pub virtio: Vec<crate::devices::virtio::mmio::TransportSnapshot>,
}

/// Writes a snapshot of `state` and `guest_memory` into `dir` (created, mode 0700, if missing).
/// Each file is written beside its final name and renamed into place: VMs restored from a
/// snapshot being replaced keep mapping the old memory file, and a half-written snapshot never
/// passes for one (its state, written last, is missing).
pub fn write(
    dir: &Path,
    state: &SnapshotState,
    guest_memory: &vm_memory::GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(file_error(dir))?;
    let state_path = dir.join(STATE_FILE);
    remove_if_present(&state_path)?;
    let memory_path = dir.join(MEMORY_FILE);
    write_replacing(&memory_path, |file| {
        let written = memory::save(guest_memory, file)?;
        if written != state.mem_bytes {
            return Err(SnapshotError::MemorySize {
                path: memory_path.clone(),
                found: written,
                expected: state.mem_bytes,
            });
        }
        Ok(())
    })?;
    let json = serde_json::to_vec(state)
        .map_err(|e| SnapshotError::Parse { path: state_path.clone(), detail: e.to_string() })?;
    write_replacing(&state_path, |file| {
        file.write_all(&json).and_then(|()| file.sync_all()).map_err(file_error(&state_path))
    })
}

/// Fills a new file (mode 0600) with `fill`, then renames it to `path`.
fn write_replacing(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    remove_if_present(&partial)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(file_error(&partial))?;
    let filled = fill(&mut file);
    if filled.is_err() {
        let _ = fs::remove_file(&partial);
    }
    filled?;
    fs::rename(&partial, path).map_err(file_error(path))
}

fn remove_if_present(path: &Path) -> Result<(), SnapshotError> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(file_error(path)(err)),
        _ => Ok(()),
    }
}

/// The error of a KVM call named `what`, for `map_err`.
fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |cause| SnapshotError::Kvm { what, cause }
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |cause| SnapshotError::File { path, cause }
}

/// Reads the snapshot in `dir`: its state, checked against this VMM's format, and its memory
/// file, checked to hold all of the guest's RAM (mapping a short one would fault on the rest).
pub fn read(dir: &Path) -> Result<(SnapshotState, File), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let state_file = File::open(&state_path).map_err(file_error(&state_path))?;
    let size = state_file.metadata().map_err(file_error(&state_path))?.len();
    if size > MAX_STATE_BYTES {
        return Err(SnapshotError::Parse {
            path: state_path,
            detail: format!("{size} bytes, at most {MAX_STATE_BYTES}"),
        });
    }
    let value: serde_json::Value = serde_json::from_reader(std::io::BufReader::new(state_file))
        .map_err(|e| SnapshotError::Parse { path: state_path.clone(), detail: e.to_string() })?;
    let found = value.get("version").and_then(serde_json::Value::as_u64).unwrap_or(0);
    if found != u64::from(FORMAT_VERSION) {
        return Err(SnapshotError::Version { path: state_path, found: found.try_into().unwrap_or(u32::MAX) });
    }
    let state: SnapshotState = serde_json::from_value(value)
        .map_err(|e| SnapshotError::Parse { path: state_path.clone(), detail: e.to_string() })?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory = File::open(&memory_path).map_err(file_error(&memory_path))?;
    let found = memory.metadata().map_err(file_error(&memory_path))?.len();
    if found != state.mem_bytes {
        return Err(SnapshotError::MemorySize { path: memory_path, found, expected: state.mem_bytes });
    }
    Ok((state, memory))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    const MEM: usize = 1 << 20;

    fn saved(dir: &Path) -> GuestMemoryMmap {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM / 2), (GuestAddress(1 << 30), MEM / 2)])
                .unwrap();
        memory.write_slice(b"low", GuestAddress(0x1000)).unwrap();
        memory.write_slice(b"high", GuestAddress((1 << 30) + 8)).unwrap();
        let state = SnapshotState {
            version: FORMAT_VERSION,
            mem_bytes: MEM as u64,
            vcpus: Vec::new(),
            machine: MachineState {
                irqchips: Vec::new(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial: SerialState { scratch: 7, ..Default::default() },
            virtio: Vec::new(),
        };
        write(dir, &state, &memory).unwrap();
        memory
    }

    #[test]
    fn a_snapshot_reads_back_whole_and_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        saved(&dir);
        let (state, memory) = read(&dir).unwrap();
        assert_eq!((state.mem_bytes, state.serial.scratch), (MEM as u64, 7));
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &memory, &mut bytes).unwrap();
        assert_eq!(&bytes[0x1000..0x1003], b"low");
        assert_eq!(&bytes[MEM / 2 + 8..MEM / 2 + 12], b"high", "regions back to back");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode(&dir), mode(&dir.join(MEMORY_FILE)), mode(&dir.join(STATE_FILE))),
            (0o700, 0o600, 0o600)
        );
        assert!(!dir.join("memory.partial").exists() && !dir.join("state.json.partial").exists());
    }

    #[test]
    fn a_short_memory_file_another_format_or_a_bad_state_file_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        saved(&dir);
        let state_path = dir.join(STATE_FILE);
        let good = fs::read_to_string(&state_path).unwrap();

        OpenOptions::new().write(true).open(dir.join(MEMORY_FILE)).unwrap().set_len(MEM as u64 / 2).unwrap();
        let err = read(&dir).unwrap_err().to_string();
        assert!(err.contains("memory") && err.contains(&format!("{} bytes", MEM / 2)), "{err}");

        fs::write(&state_path, good.replacen("\"version\":1", "\"version\":2", 1)).unwrap();
        let err = read(&dir).unwrap_err().to_string();
        assert!(err.contains("snapshot format 2") && err.contains(STATE_FILE), "{err}");

        fs::write(&state_path, "{\"version\":1,\"mem_bytes\":").unwrap();
        let err = read(&dir).unwrap_err().to_string();
        assert!(err.contains("not a snapshot state file"), "{err}");

        fs::remove_file(&state_path).unwrap();
        let err = read(&dir).unwrap_err().to_string();
        assert!(err.contains(STATE_FILE), "a directory without its state is no snapshot: {err}");
    }
}
