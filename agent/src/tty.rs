//! Processes with a terminal. The container runtime creates the pty inside the container and
//! sends its master over a console socket (runc's protocol: one `SCM_RIGHTS` message); the agent
//! then copies between the master and the host's stdin and stdout streams and sets the window size.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::sync::watch;

/// How long the runtime's init has to send the pty master once the step that created it ended.
const MASTER_TIMEOUT: Duration = Duration::from_secs(10);
/// VEOF: what a terminal reader sees as end of input when the host closes stdin.
const END_OF_TRANSMISSION: u8 = 0x04;

/// Why a terminal could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    #[error("console socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("the runtime sent no pty master within {MASTER_TIMEOUT:?}")]
    NoMaster,
    #[error("window size: {0}")]
    Resize(std::io::Error),
}

/// The socket the runtime sends the pty master to; removed on drop.
#[derive(Debug)]
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> Result<ConsoleSocket, TtyError> {
        let socket_error = |source| TtyError::Socket { path: path.to_path_buf(), source };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(socket_error)?;
        listener.set_nonblocking(true).map_err(socket_error)?;
        Ok(ConsoleSocket { path: path.to_path_buf(), listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the pty master the runtime sent (it connected before the step returned).
    pub fn receive_master(&self) -> Result<OwnedFd, TtyError> {
        let deadline = Instant::now() + MASTER_TIMEOUT;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return Err(TtyError::NoMaster),
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(MASTER_TIMEOUT));
        let mut name = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let message =
            recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(|_| TtyError::NoMaster)?;
        for control in message.cmsgs().map_err(|_| TtyError::NoMaster)? {
            if let ControlMessageOwned::ScmRights(fds) = control {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(TtyError::NoMaster)
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A running terminal: the master and the copies to and from the host's streams.
#[derive(Debug)]
pub struct Tty {
    master: Arc<OwnedFd>,
    /// True once everything the process wrote reached the host's stdout stream.
    drained: watch::Receiver<bool>,
}

impl Tty {
    /// Copies host `stdin` into the master (then an end-of-transmission) and the master into host
    /// `stdout` (until the last holder of the pty closes it).
    pub fn start(master: OwnedFd, stdin: Option<OwnedFd>, stdout: Option<OwnedFd>) -> std::io::Result<Tty> {
        let master = Arc::new(master);
        let (done, drained) = watch::channel(false);
        let reader = std::fs::File::from(master.try_clone()?);
        std::thread::Builder::new().name("agent-tty-out".into()).spawn(move || {
            copy_output(reader, stdout.map(std::fs::File::from));
            let _ = done.send(true);
        })?;
        if let Some(stdin) = stdin {
            let writer = std::fs::File::from(master.try_clone()?);
            std::thread::Builder::new()
                .name("agent-tty-in".into())
                .spawn(move || copy_input(std::fs::File::from(stdin), writer))?;
        }
        Ok(Tty { master, drained })
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, columns: u16, rows: u16) -> Result<(), TtyError> {
        let size = libc::winsize { ws_row: rows, ws_col: columns, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call; the fd
        // is the pty master this Tty owns.
        let result = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if result < 0 {
            return Err(TtyError::Resize(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Becomes true once the process's output reached the host.
    pub fn drained(&self) -> watch::Receiver<bool> {
        self.drained.clone()
    }
}

fn copy_output(mut master: std::fs::File, mut stdout: Option<std::fs::File>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // EIO once the last slave closed: the process and its children are gone.
        let read = match master.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if let Some(out) = stdout.as_mut() {
            if out.write_all(&buffer[..read]).is_err() {
                // The host stopped reading; keep draining so the process does not block.
                stdout = None;
            }
        }
    }
}

fn copy_input(mut stdin: std::fs::File, mut master: std::fs::File) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match stdin.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                if master.write_all(&buffer[..read]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = master.write_all(&[END_OF_TRANSMISSION]);
}
