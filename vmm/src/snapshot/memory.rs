//! Guest RAM in a snapshot: the regions of [`crate::layout::ram_regions`] back to back in one
//! file, read back by mapping it privately ([`crate::vm::Vm::from_memory_file`]).

use std::fs::File;
use std::io::Write;

use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::SnapshotError;

/// Writes all of `memory` to `file` (created empty by the caller), then flushes it to disk: a
/// VM mapping a file that a crash left short would fault on the missing pages.
pub fn save(memory: &GuestMemoryMmap, file: &mut File) -> Result<u64, SnapshotError> {
    let mut written = 0u64;
    for region in memory.iter() {
        let len = usize::try_from(region.len()).map_err(|_| SnapshotError::Invalid("region size"))?;
        memory.write_all_volatile_to(region.start_addr(), file, len).map_err(|e| SnapshotError::Io {
            what: "writing guest memory",
            cause: std::io::Error::other(e),
        })?;
        written += region.len();
    }
    file.flush().map_err(|cause| SnapshotError::Io { what: "writing guest memory", cause })?;
    file.sync_all().map_err(|cause| SnapshotError::Io { what: "syncing guest memory", cause })?;
    Ok(written)
}
