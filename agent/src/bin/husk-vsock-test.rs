//! `husk-vsock-test`: a guest-side vsock peer for Husk's VM tests and for debugging from the guest's
//! debug console (busybox has no vsock support).
//!
//!   husk-vsock-test listen PORT    accept connections on PORT; echo each one's bytes back until EOF
//!   husk-vsock-test connect PORT   connect to the host's PORT; stdin goes to it, its bytes to stdout
//!   husk-vsock-test sink PORT      accept connections on PORT; read and discard each one's bytes
//!                                  until EOF, then reply with the byte count (`<n>\n`) and close
//!   husk-vsock-test source PORT    accept connections on PORT; read a request line `<n>\n`, write
//!                                  n bytes, then close
//!   husk-vsock-test probe CID PORT connect to CID:PORT and say whether the listener closed the
//!                                  connection within 3 s (`closed-by-peer`) or kept it
//!                                  (`kept-open`); `connect-failed` if it could not connect
//!
//! `sink` and `source` are the guest side of the vsock benchmark (`husk-bench-vsock`): no pipe through
//! busybox, no copy to a console, one 64 KiB buffer per connection.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

const VMADDR_CID_ANY: u32 = u32::MAX;
const VMADDR_CID_HOST: u32 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["listen", port] => port.parse().context("PORT").and_then(listen_and_echo),
        ["connect", port] => port.parse().context("PORT").and_then(connect_to_host),
        ["sink", port] => port.parse().context("PORT").and_then(|port| serve(port, sink)),
        ["source", port] => port.parse().context("PORT").and_then(|port| serve(port, source)),
        ["probe", cid, port] => cid
            .parse()
            .context("CID")
            .and_then(|cid| port.parse().context("PORT").and_then(|port| probe(cid, port))),
        _ => Err(anyhow::anyhow!(
            "usage: husk-vsock-test listen PORT | connect PORT | sink PORT | source PORT | probe CID PORT"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("husk-vsock-test: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn vsock_socket() -> Result<OwnedFd> {
    socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket(AF_VSOCK)")
}

/// A connected vsock fd as a std stream (both are plain connected stream sockets to std's I/O).
fn stream(fd: OwnedFd) -> UnixStream {
    // SAFETY: `fd` is an owned, connected stream socket; UnixStream only reads, writes and shuts it
    // down, which AF_VSOCK stream sockets support the same way.
    unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) }
}

fn listen_and_echo(port: u32) -> Result<()> {
    serve(port, echo)
}

/// Listens on `port` and runs `handle` for each connection on a thread of its own.
fn serve(port: u32, handle: fn(UnixStream) -> io::Result<()>) -> Result<()> {
    let listener = vsock_socket()?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
        .with_context(|| format!("bind port {port}"))?;
    listen(&listener, Backlog::new(128).context("backlog")?).context("listen")?;
    println!("husk-vsock-test: listening on port {port}");
    loop {
        let raw = accept(listener.as_raw_fd()).context("accept")?;
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = stream(unsafe { OwnedFd::from_raw_fd(raw) });
        std::thread::spawn(move || {
            if let Err(err) = handle(conn) {
                eprintln!("husk-vsock-test: connection: {err}");
            }
        });
    }
}

fn echo(mut conn: UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

/// Reads and discards until EOF, then replies with the byte count and closes.
fn sink(mut conn: UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    conn.write_all(format!("{total}\n").as_bytes())?;
    conn.shutdown(Shutdown::Write)
}

/// Reads a request line `<n>\n`, writes n bytes, then closes.
fn source(mut conn: UnixStream) -> io::Result<()> {
    // Byte by byte: the request is short, and nothing after it is read.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        if conn.read(&mut byte)? == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let mut left: u64 = std::str::from_utf8(&line)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad request {line:?}")))?;
    let buf = vec![0x5au8; 64 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    conn.shutdown(Shutdown::Write)
}

/// How long `probe` waits for the listener to close the connection.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn probe(cid: u32, port: u32) -> Result<()> {
    let fd = vsock_socket()?;
    if let Err(err) = connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        println!("connect-failed: {err}");
        return Ok(());
    }
    let mut conn = stream(fd);
    conn.set_read_timeout(Some(PROBE_WAIT))?;
    let mut byte = [0u8; 1];
    let verdict = match conn.read(&mut byte) {
        Ok(0) => "closed-by-peer",
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset => "closed-by-peer",
        Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => "kept-open",
        Ok(_) => "kept-open", // it even spoke first
        Err(err) => return Err(err).context("reading"),
    };
    println!("{verdict}");
    Ok(())
}

fn connect_to_host(port: u32) -> Result<()> {
    let fd = vsock_socket()?;
    connect(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_HOST, port))
        .with_context(|| format!("connect host:{port}"))?;
    let mut conn = stream(fd);
    let mut reader = conn.try_clone()?;
    let copier = std::thread::spawn(move || io::copy(&mut reader, &mut io::stdout()));
    io::copy(&mut io::stdin(), &mut conn)?;
    conn.shutdown(Shutdown::Write)?;
    match copier.join() {
        Ok(result) => {
            result?;
            Ok(())
        }
        Err(_) => bail!("the reader thread panicked"),
    }
}
