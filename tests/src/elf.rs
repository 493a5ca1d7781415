//! Minimal ELF inspection for the image tests.

const PT_INTERP: u32 = 3;

/// True when `bytes` is a 64-bit little-endian ELF executable.
pub fn is_elf64(bytes: &[u8]) -> bool {
    bytes.len() > 0x40 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1
}

/// True when the ELF file names no program interpreter, i.e. the kernel can start it without a
/// dynamic loader (a static or static-pie executable). `None` when it is not a valid ELF64 file.
pub fn is_static(bytes: &[u8]) -> Option<bool> {
    if !is_elf64(bytes) {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(bytes.get(0x20..0x28)?.try_into().ok()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}
