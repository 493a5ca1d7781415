//! Reader for the "newc" cpio archives the kernel unpacks as initramfs (enough to inspect our images).

/// One archive member.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub name: String,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    /// File contents (symlink target for links).
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer; `Err` names the offset of the first malformed header.
pub fn parse(archive: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut offset = 0;
    loop {
        let header = archive.get(offset..offset + 110).ok_or(format!("truncated header at {offset}"))?;
        if &header[..6] != b"070701" {
            return Err(format!("bad magic at {offset}"));
        }
        let field = |i: usize| -> Result<usize, String> {
            let hex = std::str::from_utf8(&header[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            usize::from_str_radix(hex, 16).map_err(|e| format!("bad field {i} at {offset}: {e}"))
        };
        let (mode, file_size, name_size) = (field(1)?, field(6)?, field(11)?);
        let name_start = offset + 110;
        let name =
            archive.get(name_start..name_start + name_size).ok_or(format!("truncated name at {offset}"))?;
        let name = String::from_utf8_lossy(name.strip_suffix(b"\0").unwrap_or(name)).into_owned();
        let data_start = align4(name_start + name_size);
        let data =
            archive.get(data_start..data_start + file_size).ok_or(format!("truncated data at {offset}"))?;
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(Entry { name, mode: mode as u32, data: data.to_vec() });
        offset = align4(data_start + file_size);
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}
