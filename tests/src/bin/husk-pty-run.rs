//! `husk-pty-run COLUMNS ROWS -- CMD [ARG]...`: runs CMD on a fresh pseudo-terminal of that size
//! (its session's controlling terminal) and copies what it writes there to stdout, so tests can
//! drive programs that insist on a terminal (`ctr run -t`) where no terminal exists (the test
//! host's console is a serial file). Exits with CMD's status.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (size, command) = match args.iter().position(|a| a == "--") {
        Some(split) => (&args[..split], &args[split + 1..]),
        None => bail!("usage: husk-pty-run COLUMNS ROWS -- CMD [ARG]..."),
    };
    let [columns, rows] = size else { bail!("usage: husk-pty-run COLUMNS ROWS -- CMD [ARG]...") };
    let (Some(program), arguments) = (command.first(), command.get(1..).unwrap_or_default()) else {
        bail!("no command given");
    };
    let window = nix::pty::Winsize {
        ws_col: columns.parse().context("COLUMNS")?,
        ws_row: rows.parse().context("ROWS")?,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&window), None).context("openpty")?;
    let terminal = |fd: &OwnedFd| -> Result<Stdio> { Ok(Stdio::from(fd.try_clone()?)) };
    let mut command = Command::new(program);
    command
        .args(arguments)
        .stdin(terminal(&pty.slave)?)
        .stdout(terminal(&pty.slave)?)
        .stderr(terminal(&pty.slave)?);
    // SAFETY: between fork and exec the closure only makes async-signal-safe calls (setsid and
    // an ioctl on the inherited stdin) and touches no memory of the parent's threads.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().with_context(|| format!("starting {program}"))?;
    // Only the child may hold the terminal now, so reading ends when it (and its children) exit.
    drop(command);
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let mut buffer = [0u8; 4096];
    let mut stdout = std::io::stdout().lock();
    // Read until the terminal hangs up (EIO once the last holder of the slave side is gone).
    loop {
        match master.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                stdout.write_all(&buffer[..read])?;
                stdout.flush()?;
            }
        }
    }
    let status = child.wait()?;
    Ok(ExitCode::from(status.code().map_or(128, |code| code as u8)))
}
