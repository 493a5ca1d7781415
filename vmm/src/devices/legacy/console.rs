//! Where the guest console goes: a log file, optionally the VMM's stdout, and an in-memory tail
//! kept for error messages (a VM that fails to come up is reported with its last console lines).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of console output kept in memory.
pub const TAIL_BYTES: usize = 16 * 1024;
/// Bytes of console output written to the log file, at most: the guest writes the console, and a
/// guest that floods it must not fill the node's tmpfs. Past it, a marker line ends the file and
/// later output reaches only the in-memory tail (and the stream).
pub const LOG_LIMIT_BYTES: u64 = 1 << 20;
const LOG_LIMIT_MARKER: &[u8] =
    b"\n[husk: console log truncated at its limit; later output is not kept here]\n";
/// Chunks of output waiting for the stdout thread; beyond this, output is dropped, not waited for.
const STDOUT_QUEUE_CHUNKS: usize = 256;
/// A chunk is handed to the stdout thread at a newline or at this size.
const STDOUT_CHUNK_BYTES: usize = 4096;
/// How long [`Console::finish`] waits for the stdout thread to write what it has.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

enum StdoutMessage {
    Data(Vec<u8>),
    Flush(SyncSender<()>),
}

/// Output to a stream that may block (a pipe nobody reads): written by a thread of its own, so a
/// stuck reader can never stall a vCPU; when the queue is full, output is dropped and counted.
#[derive(Debug)]
struct StreamSink {
    pending: Vec<u8>,
    queue: SyncSender<StdoutMessage>,
    dropped_bytes: u64,
}

impl StreamSink {
    fn spawn(mut out: Box<dyn Write + Send>) -> io::Result<StreamSink> {
        let (queue, messages) = sync_channel(STDOUT_QUEUE_CHUNKS);
        std::thread::Builder::new().name("console-out".into()).spawn(move || {
            let messages: Receiver<StdoutMessage> = messages;
            // Ends when every Console clone (and so the sender) is gone.
            for message in messages {
                match message {
                    StdoutMessage::Data(bytes) => {
                        let _ = out.write_all(&bytes);
                    }
                    StdoutMessage::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.send(());
                    }
                }
            }
        })?;
        Ok(StreamSink { pending: Vec::new(), queue, dropped_bytes: 0 })
    }

    fn write(&mut self, buf: &[u8]) {
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= STDOUT_CHUNK_BYTES {
            self.send_pending();
        }
    }

    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let chunk = std::mem::take(&mut self.pending);
        let len = chunk.len() as u64;
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(StdoutMessage::Data(chunk))
        {
            self.dropped_bytes += len;
        }
    }

    /// Hands over what is pending and waits (boundedly) until it has been written.
    fn finish(&mut self) {
        self.send_pending();
        let (done, written) = sync_channel(1);
        let deadline = Instant::now() + FINISH_TIMEOUT;
        let mut message = StdoutMessage::Flush(done);
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[derive(Debug, Default)]
struct Inner {
    // Line-buffered: the guest writes one byte per exit, and a syscall per byte would dominate.
    log: Option<LineWriter<File>>,
    /// Bytes written to `log` (it stops at [`LOG_LIMIT_BYTES`]).
    log_written: u64,
    stream: Option<StreamSink>,
    tail: VecDeque<u8>,
}

impl Inner {
    /// Appends to the log file up to [`LOG_LIMIT_BYTES`], then the marker once. A full disk must
    /// not stop the guest: the tail still records the output.
    fn write_log(&mut self, buf: &[u8]) {
        let Some(log) = self.log.as_mut() else { return };
        let room = LOG_LIMIT_BYTES.saturating_sub(self.log_written);
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let _ = log.write_all(&buf[..take]);
        self.log_written += take as u64;
        if take < buf.len() {
            let _ = log.write_all(LOG_LIMIT_MARKER);
            let _ = log.flush();
            self.log = None;
        }
    }
}

/// The guest console sink; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Console(Arc<Mutex<Inner>>);

impl Console {
    /// A console writing to `log` (if any) and, if `stdout`, to this process's stdout.
    pub fn new(log: Option<File>, stdout: bool) -> Console {
        let stream = if stdout { Some(Box::new(io::stdout()) as Box<dyn Write + Send>) } else { None };
        Console::with_stream(log, stream)
    }

    /// A console writing to `log` (if any) and to `stream` (if any) through its own thread.
    pub fn with_stream(log: Option<File>, stream: Option<Box<dyn Write + Send>>) -> Console {
        // If the thread cannot start, the log and the tail still get everything.
        let stream = stream.and_then(|out| StreamSink::spawn(out).ok());
        Console(Arc::new(Mutex::new(Inner {
            log: log.map(LineWriter::new),
            log_written: 0,
            stream,
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

    /// Bytes dropped because the stream's reader did not keep up.
    pub fn dropped_bytes(&self) -> u64 {
        self.inner().stream.as_ref().map_or(0, |s| s.dropped_bytes)
    }

    /// Writes out everything buffered (log and stream); call when the VM has ended.
    pub fn finish(&self) {
        let mut inner = self.inner();
        if let Some(log) = inner.log.as_mut() {
            let _ = log.flush();
        }
        if let Some(stream) = inner.stream.as_mut() {
            stream.finish();
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.inner();
        inner.write_log(buf);
        if let Some(stream) = inner.stream.as_mut() {
            stream.write(buf);
        }
        let overflow = (inner.tail.len() + buf.len()).saturating_sub(TAIL_BYTES);
        let drop = overflow.min(inner.tail.len());
        inner.tail.drain(..drop);
        inner.tail.extend(&buf[buf.len().saturating_sub(TAIL_BYTES)..]);
        Ok(buf.len())
    }

    /// Does nothing: the UART model flushes after every byte, and buffering is the point. Output
    /// goes out at newlines and in [`Console::finish`].
    fn flush(&mut self) -> io::Result<()> {
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
    fn a_flooding_guest_fills_the_log_file_up_to_its_limit_and_no_further() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut console = Console::new(Some(file.reopen().unwrap()), false);
        let line = [b'y'; 1023];
        for _ in 0..(2 * LOG_LIMIT_BYTES / 1024) {
            console.write_all(&line).unwrap();
            console.write_all(b"\n").unwrap();
        }
        console.write_all(b"the last line\n").unwrap();
        console.finish();
        let len = std::fs::metadata(file.path()).unwrap().len();
        assert_eq!(len, LOG_LIMIT_BYTES + LOG_LIMIT_MARKER.len() as u64);
        assert!(std::fs::read(file.path()).unwrap().ends_with(LOG_LIMIT_MARKER));
        assert!(console.tail_text().ends_with("the last line"), "the tail still has it");
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

    /// A reader that never reads: writes to it block until the test ends.
    struct StuckPipe(std::sync::mpsc::Receiver<()>);

    impl Write for StuckPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Err(io::Error::other("closed"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_stdout_drops_output_instead_of_stalling_the_guest() {
        let (_release, stuck) = std::sync::mpsc::channel();
        let mut console = Console::with_stream(None, Some(Box::new(StuckPipe(stuck))));
        let started = Instant::now();
        for _ in 0..10_000 {
            console.write_all(b"a line of guest output\n").unwrap();
        }
        console.finish();
        assert!(started.elapsed() < Duration::from_secs(10), "writes did not block");
        assert!(console.dropped_bytes() > 0);
        assert_eq!(console.tail_lines(1), "a line of guest output");
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_stream_gets_everything_including_a_partial_last_line_after_finish() {
        let out = Shared::default();
        let mut console = Console::with_stream(None, Some(Box::new(out.clone())));
        console.write_all(b"ready\nno newline").unwrap();
        console.finish();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ready\nno newline");
    }

    #[test]
    fn the_log_file_gets_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut console = Console::new(Some(File::create(&path).unwrap()), false);
        console.write_all(b"hello\n").unwrap();
        console.finish();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "hello\n");
    }
}
