//! Feeds host input (e.g. husk-vmm's stdin) into the serial port's receive FIFO, for the guest's
//! debug console. The thread polls so that it notices the VM stopping without new input.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Serial;

/// How often the input thread checks whether the VM has stopped.
const POLL_INTERVAL_MS: i32 = 100;

/// Starts the thread copying `input` into `serial` until end of input or `stop`.
pub fn spawn(
    input: OwnedFd,
    serial: Arc<Mutex<Serial>>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("console-input".into()).spawn(move || {
        let mut input = File::from(input);
        let mut chunk = [0u8; 256];
        while !stop.load(Ordering::Acquire) {
            if !readable(&input) {
                continue;
            }
            let len = match input.read(&mut chunk) {
                Ok(0) => return, // end of input
                Ok(len) => len,
                Err(err) if matches!(err.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {
                    continue
                }
                Err(err) => {
                    tracing::warn!(%err, "console input: read failed; no more input reaches the guest");
                    return;
                }
            };
            let mut pending = &chunk[..len];
            while !pending.is_empty() && !stop.load(Ordering::Acquire) {
                let taken = serial.lock().map(|mut s| s.enqueue_input(pending)).unwrap_or(0);
                pending = &pending[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(1)); // the guest has not read yet
                }
            }
        }
    })
}

/// Waits up to [`POLL_INTERVAL_MS`] for `file` to be readable (or at end of input).
fn readable(file: &File) -> bool {
    let mut fds = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `fds` is one valid pollfd for an open descriptor, and poll only writes `revents`.
    let ready = unsafe { libc::poll(&mut fds, 1, POLL_INTERVAL_MS) };
    ready > 0
}
