//! Where the guest console goes: a log file, optionally the VMM's stdout, and an in-memory tail
//! kept for error messages (a VM that fails to come up is reported with its last console lines).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::sync::{Arc, Mutex};

/// Bytes of console output kept in memory.
pub const TAIL_BYTES: usize = 16 * 1024;

#[derive(Debug, Default)]
struct Inner {
    // Line-buffered: the guest writes one byte per exit, and a syscall per byte would dominate.
    log: Option<LineWriter<File>>,
    stdout: bool,
    tail: VecDeque<u8>,
}

/// The guest console sink; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Console(Arc<Mutex<Inner>>);

impl Console {
    /// A console writing to `log` (if any) and, if `stdout`, to this process's stdout.
    pub fn new(log: Option<File>, stdout: bool) -> Console {
        Console(Arc::new(Mutex::new(Inner {
            log: log.map(LineWriter::new),
            stdout,
            tail: VecDeque::with_capacity(TAIL_BYTES),
        })))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The last `lines` lines of output (lossily decoded: the guest writes arbitrary bytes).
    pub fn tail_lines(&self, lines: usize) -> String {
        let inner = self.inner();
        let bytes: Vec<u8> = inner.tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).replace('\r', "");
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whole tail as text.
    pub fn tail_text(&self) -> String {
        self.tail_lines(usize::MAX)
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.inner();
        if let Some(log) = inner.log.as_mut() {
            // A full disk must not stop the guest: the tail still records the output.
            let _ = log.write_all(buf);
        }
        if inner.stdout {
            let _ = io::stdout().write_all(buf);
        }
        let overflow = (inner.tail.len() + buf.len()).saturating_sub(TAIL_BYTES);
        let drop = overflow.min(inner.tail.len());
        inner.tail.drain(..drop);
        inner.tail.extend(&buf[buf.len().saturating_sub(TAIL_BYTES)..]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut inner = self.inner();
        if let Some(log) = inner.log.as_mut() {
            let _ = log.flush();
        }
        if inner.stdout {
            let _ = io::stdout().flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_and_drops_carriage_returns() {
        let mut console = Console::new(None, false);
        console.write_all(b"one\r\ntwo\r\nthree\r\n").unwrap();
        assert_eq!(console.tail_lines(2), "two\nthree");
    }

    #[test]
    fn the_tail_is_bounded() {
        let mut console = Console::new(None, false);
        for _ in 0..100 {
            console.write_all(&[b'x'; 1000]).unwrap();
        }
        console.write_all(b"\nlast line\n").unwrap();
        assert!(console.tail_text().len() <= TAIL_BYTES);
        assert_eq!(console.tail_lines(1), "last line");
    }

    #[test]
    fn the_log_file_gets_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut console = Console::new(Some(File::create(&path).unwrap()), false);
        console.write_all(b"hello\n").unwrap();
        console.flush().unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "hello\n");
    }
}
