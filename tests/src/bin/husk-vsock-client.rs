//! The host side of hybrid vsock, for VM tests and by hand.
//!
//!   husk-vsock-client SOCKET PORT      connect to the VM's vsock socket, `CONNECT PORT` / `OK <n>`,
//!                                      send stdin to the guest (then half-close), print its bytes
//!   husk-vsock-client --listen PATH    accept one guest connection at PATH (`<socket>_<port>`),
//!                                      send stdin to it (then half-close), print its bytes

use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, path] = args.as_slice() {
        if flag == "--listen" {
            let listener =
                std::os::unix::net::UnixListener::bind(path).with_context(|| format!("bind {path}"))?;
            let (stream, _) = listener.accept()?;
            let _ = std::fs::remove_file(path);
            return exchange(stream.try_clone()?, BufReader::new(stream));
        }
    }
    let [socket, port] = args.as_slice() else {
        bail!("usage: husk-vsock-client SOCKET PORT | husk-vsock-client --listen PATH")
    };
    let port: u32 = port.parse().context("PORT")?;
    // The VMM creates the socket when the guest's driver comes up: wait for it a little.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(err) => return Err(err).with_context(|| format!("connect {socket}")),
        }
    };
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        bail!("handshake refused: {line:?}");
    }
    eprintln!("husk-vsock-client: {}", line.trim_end());
    exchange(writer, reader)
}

/// Sends stdin to the peer then half-closes; copies the peer's bytes to stdout until it closes.
fn exchange(mut writer: UnixStream, mut reader: BufReader<UnixStream>) -> Result<()> {
    let sender = std::thread::spawn(move || -> io::Result<()> {
        io::copy(&mut io::stdin(), &mut writer)?;
        writer.shutdown(Shutdown::Write)
    });
    io::copy(&mut reader, &mut io::stdout())?;
    match sender.join() {
        Ok(result) => result.context("sending stdin"),
        Err(_) => bail!("the sender thread panicked"),
    }
}
