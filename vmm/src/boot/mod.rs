//! Booting Linux: load the kernel (ELF `vmlinux` or bzImage), the initrd and the command line into
//! guest memory, fill `boot_params` with the e820 map, and describe the CPUs (MP table, CPUID).

pub mod cpuid;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point in a loaded bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

/// Errors loading the guest's kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {cause}")]
    KernelOpen { path: PathBuf, cause: std::io::Error },
    #[error("kernel {path}: neither an ELF vmlinux ({elf}) nor a bzImage ({bzimage})")]
    KernelFormat { path: PathBuf, elf: linux_loader::loader::Error, bzimage: linux_loader::loader::Error },
    #[error("initrd {path}: {cause}")]
    Initrd { path: PathBuf, cause: std::io::Error },
    #[error(
        "guest memory too small: the kernel ends at {kernel_end:#x} and the initrd needs {initrd_size} bytes \
         below {low_ram_end:#x}; give the VM more memory"
    )]
    MemoryTooSmall { kernel_end: u64, initrd_size: u64, low_ram_end: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing {what} to guest memory: {detail}")]
    Write { what: &'static str, detail: String },
}

/// Where the loaded kernel starts executing.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry(pub u64);

/// Fails early, with the path, when the kernel or initrd cannot be opened.
pub fn check_readable(kernel: &Path, initrd: Option<&Path>) -> Result<(), BootError> {
    File::open(kernel).map_err(|cause| BootError::KernelOpen { path: kernel.into(), cause })?;
    if let Some(initrd) = initrd {
        File::open(initrd).map_err(|cause| BootError::Initrd { path: initrd.into(), cause })?;
    }
    Ok(())
}

/// Loads everything the kernel needs into `mem` (of `mem_bytes`) and returns its entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<KernelEntry, BootError> {
    let mut file =
        File::open(kernel).map_err(|cause| BootError::KernelOpen { path: kernel.into(), cause })?;
    let (entry, kernel_end, setup_header) = load_kernel(mem, kernel, &mut file)?;

    let mut params = boot_params::default();
    if let Some(header) = setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    if let Some(initrd) = initrd {
        let (start, size) = load_initrd(mem, mem_bytes, kernel_end, initrd)?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Write { what: "command line", detail: e.to_string() })?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.as_cstring().map(|c| c.as_bytes().len() as u32 + 1).unwrap_or(1);

    let e820 = e820_map(mem_bytes);
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry { addr: *addr, size: *size, type_: E820_RAM };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Write { what: "boot parameters", detail: e.to_string() })?;
    Ok(entry)
}

/// Loads `file` as ELF, or failing that as bzImage. Returns entry point, end of the loaded image
/// and, for bzImage, its setup header.
fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
) -> Result<(KernelEntry, u64, Option<linux_loader::loader::bootparam::setup_header>), BootError> {
    let highmem = Some(GuestAddress(HIMEM_START));
    let elf = match Elf::load(mem, None, file, highmem) {
        Ok(loaded) => return Ok((KernelEntry(loaded.kernel_load.0), loaded.kernel_end, None)),
        Err(err) => err,
    };
    file.seek(SeekFrom::Start(0)).map_err(|cause| BootError::KernelOpen { path: path.into(), cause })?;
    match BzImage::load(mem, None, file, highmem) {
        Ok(loaded) => Ok((
            KernelEntry(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            loaded.kernel_end,
            loaded.setup_header,
        )),
        Err(bzimage) => Err(BootError::KernelFormat { path: path.into(), elf, bzimage }),
    }
}

/// Places the initrd page-aligned at the top of RAM below the MMIO gap, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let io_err = |cause| BootError::Initrd { path: path.into(), cause };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let low_ram_end = mem_bytes.min(MMIO_GAP_START);
    let start = low_ram_end
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|start| *start >= kernel_end)
        .ok_or(BootError::MemoryTooSmall { kernel_end, initrd_size: size, low_ram_end })?;
    // Straight from the file into guest memory: no intermediate copy.
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| BootError::Write { what: "initrd", detail: e.to_string() })?;
    Ok((start, size))
}

/// The guest's RAM map: base memory below the EBDA, then everything from 1 MiB, split around the
/// 32-bit MMIO gap.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    if mem_bytes <= MMIO_GAP_START {
        map.push((HIMEM_START, mem_bytes - HIMEM_START));
    } else {
        map.push((HIMEM_START, MMIO_GAP_START - HIMEM_START));
        map.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_leaves_the_ebda_bios_area_and_mmio_gap_out() {
        assert_eq!(e820_map(256 << 20), vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]);
        let big = e820_map(5 << 30);
        assert_eq!(big[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(big[2], (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START));
        let ram: u64 = big.iter().map(|(_, size)| size).sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START), "all RAM but the BIOS hole is usable");
    }

    fn memory(bytes: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_ram() {
        let mem = memory(64 << 20);
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0xab; 5000]).unwrap();
        let (start, size) = load_initrd(&mem, 64 << 20, 16 << 20, &initrd).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(start % PAGE_SIZE, 0);
        assert!(start + size <= 64 << 20 && start + size > (64 << 20) - 2 * PAGE_SIZE);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(start + 4999)).unwrap(), 0xab);
    }

    #[test]
    fn an_initrd_that_would_overlap_the_kernel_is_a_memory_error() {
        let mem = memory(32 << 20);
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0; 20 << 20]).unwrap();
        let err = load_initrd(&mem, 32 << 20, 16 << 20, &initrd).unwrap_err();
        assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
        assert!(err.to_string().contains("more memory"));
    }

    #[test]
    fn a_file_that_is_no_kernel_is_named_in_the_error() {
        let mem = memory(32 << 20);
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("not-a-kernel");
        std::fs::write(&kernel, b"#!/bin/sh\necho hello\n").unwrap();
        let err = load_linux(&mem, 32 << 20, &kernel, None, "console=ttyS0").unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        assert!(err.to_string().contains("not-a-kernel"));
    }

    #[test]
    fn boot_params_carry_the_cmdline_and_e820() {
        // A minimal ELF64 kernel: one PT_LOAD segment of 16 bytes at 1 MiB.
        let mut elf = vec![0u8; 0x80];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1; // version
        elf[16] = 2; // ET_EXEC
        elf[18] = 62; // x86_64
        elf[20] = 1;
        elf[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        elf[ph + 16..ph + 24].copy_from_slice(&HIMEM_START.to_le_bytes()); // vaddr
        elf[ph + 24..ph + 32].copy_from_slice(&HIMEM_START.to_le_bytes()); // paddr
        elf[ph + 32..ph + 40].copy_from_slice(&8u64.to_le_bytes()); // filesz
        elf[ph + 40..ph + 48].copy_from_slice(&8u64.to_le_bytes()); // memsz
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, &elf).unwrap();

        let mem = memory(64 << 20);
        let entry = load_linux(&mem, 64 << 20, &kernel, None, "console=ttyS0 quiet").unwrap();
        assert_eq!(entry.0, HIMEM_START);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr } as u64, CMDLINE_START);
        assert_eq!(params.e820_entries, 2);
        let mut cmdline = vec![0u8; 19];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 quiet");
    }
}
