//! `husk-vsock-client SOCKET PORT`: the host side of a hybrid-vsock connection, for VM tests and by
//! hand. It connects to the VM's vsock unix socket, performs `CONNECT PORT` / `OK <n>`, sends its
//! stdin to the guest (then half-closes) and copies what the guest sends to stdout.

use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, port] = args.as_slice() else { bail!("usage: husk-vsock-client SOCKET PORT") };
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
