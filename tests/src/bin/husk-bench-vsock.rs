//! Vsock benchmark: byte streams and connection set-up through `husk-vmm`'s hybrid vsock, side by
//! side with a host-local unix-socket baseline measured in the same run. Run it where guests can
//! run (`make bench` uses `tests/vm-host-run`).
//!
//! The guest side is `husk-vsock-test sink|source` (in the initramfs), started through the guest's
//! debug console. The baseline is a unix listener in this process that speaks the same protocol
//! (`CONNECT <port>\n` / `OK <n>\n`, then the same sink and source behaviour), so both columns run
//! the very same client code below; only the path between the sockets differs.
//!
//! Figures, each the median over the runs with its spread (min..max), vsock and baseline
//! interleaved run by run after one warm-up round that is not counted (MB = 10^6 bytes):
//! - `vsock_mb_per_s.host_to_guest`: bytes / time, from the host's first write of the stream (after
//!   the handshake) to its reading the guest's byte count, which the guest sends after it has read
//!   every byte and seen EOF (the host half-closes after its last write).
//! - `vsock_mb_per_s.guest_to_host`: bytes / time, from the host's write of the request line
//!   (`<n>\n`, after the handshake) to its reading EOF after the n-th byte the guest wrote.
//! - `vsock_connect_us`: from the host's `connect()` on the VM's vsock socket to its reading the
//!   whole `OK <n>` line (the VMM forwards the request, the guest kernel answers it for the
//!   listening socket, the VMM replies). The baseline: `connect()` on the local listener, the same
//!   line exchange with the peer thread, which serves one connection at a time.
//!
//! Each figure is printed on one line: `name=median unit (min..max) unix=median unit (min..max)
//! ratio=vsock/unix`; `--verbose` prints every sample as it is taken. A socket operation that
//! stalls fails after `--timeout-s` with the tails of the guest console and of husk-vmm's stderr
//! (husk-vmm inherits `RUST_LOG`, e.g. `RUST_LOG=husk_vmm=debug`).

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use husk_tests::bench::{spread, vm_host_description, Figure};
use husk_tests::debug_console_vm::{DebugConsoleVm, VmSpec};

/// Guest ports of `husk-vsock-test sink` and `husk-vsock-test source`.
const SINK_PORT: u32 = 5001;
const SOURCE_PORT: u32 = 5002;
/// Read and write size on both sides (the largest vsock packet payload).
const CHUNK: usize = 64 * 1024;
/// Upper bound of a warm-up transfer.
const WARM_UP_BYTES: u64 = 4 << 20;

#[derive(Debug, Parser)]
#[command(about = "Husk vsock benchmark, side by side with a host-local unix-socket copy")]
struct Cli {
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// MiB moved by each transfer, in each direction.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Transfers per direction (and per column).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Connections timed for `vsock_connect_us` (and for the baseline).
    #[arg(long, default_value_t = 50)]
    connects: usize,
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Print every sample on stderr as it is taken.
    #[arg(long)]
    verbose: bool,
    /// Give up when the guest is not ready, or one socket operation stalls, this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0 && cli.connects > 0 && cli.mib > 0, "--runs, --connects and --mib must be positive");
    let work = tempfile::tempdir()?;
    let timeout = Duration::from_secs(cli.timeout_s);

    let local = work.path().join("local.sock");
    start_local_peer(&local)?;

    let vsock = work.path().join("vsock.sock");
    let spec = VmSpec {
        vmm: cli.vmm.clone(),
        kernel: cli.kernel.clone(),
        initrd: cli.initrd.clone(),
        vcpus: cli.vcpus,
        mem_mib: cli.mem_mib,
        extra_args: vec!["--vsock".into(), vsock.display().to_string()],
    };
    let mut vm = DebugConsoleVm::boot(&spec, work.path(), timeout)?;
    let results = start_guest_side(&mut vm, timeout)
        .and_then(|()| measure(&cli, &vsock, &local, timeout))
        .map_err(|err| anyhow!("{err:#}\n{}", vm.diagnostics()));
    // Stop the VM whatever happened; a measurement error is the one to report.
    let stopped = vm.stop(timeout);
    let results = results?;
    stopped?;
    report(&cli, &results);
    Ok(())
}

/// Starts the guest tools from the debug console and waits until both listen.
fn start_guest_side(vm: &mut DebugConsoleVm, timeout: Duration) -> Result<()> {
    vm.type_line(&format!("husk-vsock-test sink {SINK_PORT} &"))?;
    vm.type_line(&format!("husk-vsock-test source {SOURCE_PORT} &"))?;
    for port in [SINK_PORT, SOURCE_PORT] {
        vm.wait_for(&format!("listening on port {port}"), timeout)?;
    }
    Ok(())
}

/// One figure's samples, vsock and baseline.
#[derive(Debug, Default)]
struct Samples {
    vsock: Vec<f64>,
    unix: Vec<f64>,
}

impl Samples {
    fn column(&mut self, column: Column) -> &mut Vec<f64> {
        match column {
            Column::Vsock => &mut self.vsock,
            Column::Unix => &mut self.unix,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Column {
    Vsock,
    Unix,
}

#[derive(Debug, Default)]
struct Results {
    host_to_guest: Samples,
    guest_to_host: Samples,
    connect: Samples,
}

fn measure(cli: &Cli, vsock: &Path, local: &Path, timeout: Duration) -> Result<Results> {
    let bytes = cli.mib << 20;
    let mb_per_s = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let columns = [(Column::Vsock, vsock), (Column::Unix, local)];
    let record = |samples: &mut Samples, figure: &str, column: Column, run: usize, value: f64| {
        if cli.verbose {
            eprintln!("husk-bench-vsock: sample {figure} {column:?} run {run}: {value:.2}");
        }
        samples.column(column).push(value);
    };
    for (column, socket) in columns {
        connect_once(socket, timeout).with_context(|| format!("{column:?} warm-up connect"))?;
        send(socket, bytes.min(WARM_UP_BYTES), timeout)
            .with_context(|| format!("{column:?} warm-up send"))?;
        receive(socket, bytes.min(WARM_UP_BYTES), timeout)
            .with_context(|| format!("{column:?} warm-up receive"))?;
    }
    let mut results = Results::default();
    for run in 0..cli.runs {
        for (column, socket) in columns {
            let d =
                send(socket, bytes, timeout).with_context(|| format!("{column:?} host->guest, run {run}"))?;
            record(&mut results.host_to_guest, "host_to_guest", column, run, mb_per_s(d));
        }
        for (column, socket) in columns {
            let d = receive(socket, bytes, timeout)
                .with_context(|| format!("{column:?} guest->host, run {run}"))?;
            record(&mut results.guest_to_host, "guest_to_host", column, run, mb_per_s(d));
        }
    }
    for run in 0..cli.connects {
        for (column, socket) in columns {
            let d = connect_once(socket, timeout).with_context(|| format!("{column:?} connect {run}"))?;
            record(&mut results.connect, "connect", column, run, us(d));
        }
    }
    Ok(results)
}

/// Connects to `socket` and completes the hybrid handshake for `port`; returns the stream.
fn open(socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&mut stream).context("reading the handshake reply")?;
    ensure!(line.starts_with("OK "), "handshake refused: {line:?}");
    Ok(stream)
}

/// Reads one short line. The peer sends nothing after it until we write again, so a plain read
/// never takes stream data along.
fn read_line(stream: &mut UnixStream) -> Result<String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    while !line.ends_with(b"\n") {
        ensure!(line.len() < 64, "line too long: {:?}", String::from_utf8_lossy(&line));
        match stream.read(&mut buf) {
            Ok(0) => bail!("closed after {:?}", String::from_utf8_lossy(&line)),
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    ensure!(line.iter().filter(|&&b| b == b'\n').count() == 1, "more than one line: {line:?}");
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// Times one connection set-up (connect to OK), then closes it in order (the sink's `0` reply).
fn connect_once(socket: &Path, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = open(socket, SINK_PORT, timeout)?;
    let elapsed = started.elapsed();
    stream.shutdown(Shutdown::Write)?;
    let reply = read_line(&mut stream)?;
    ensure!(reply == "0", "the sink counted {reply:?} bytes, not 0");
    Ok(elapsed)
}

/// Sends `bytes` to the sink; times first write to the sink's count.
fn send(socket: &Path, bytes: u64, timeout: Duration) -> Result<Duration> {
    let mut stream = open(socket, SINK_PORT, timeout)?;
    let buf = vec![0xa5u8; CHUNK];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("writing, {} of {bytes} bytes sent", bytes - left))?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let reply = read_line(&mut stream).context("reading the sink's count")?;
    let elapsed = started.elapsed();
    ensure!(reply == bytes.to_string(), "sent {bytes} bytes, the sink counted {reply:?}");
    Ok(elapsed)
}

/// Asks the source for `bytes`; times the request to EOF.
fn receive(socket: &Path, bytes: u64, timeout: Duration) -> Result<Duration> {
    let mut stream = open(socket, SOURCE_PORT, timeout)?;
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    stream.write_all(format!("{bytes}\n").as_bytes())?;
    let mut got: u64 = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err).with_context(|| format!("reading, {got} of {bytes} bytes received")),
        }
    }
    let elapsed = started.elapsed();
    ensure!(got == bytes, "asked for {bytes} bytes, got {got}");
    Ok(elapsed)
}

/// The baseline peer: a unix listener at `path` speaking the hybrid handshake, then behaving as
/// `husk-vsock-test sink` (port [`SINK_PORT`]) or `source` (port [`SOURCE_PORT`]).
fn start_local_peer(path: &Path) -> Result<()> {
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    // One connection at a time, on this one thread: the client opens them one after the other,
    // and a thread per connection would add its start-up to every sample.
    std::thread::Builder::new().name("local-peer".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            if let Err(err) = serve_local(conn) {
                eprintln!("husk-bench-vsock: local peer: {err:#}");
            }
        }
    })?;
    Ok(())
}

fn serve_local(mut conn: UnixStream) -> Result<()> {
    let line = read_line(&mut conn)?;
    let port: u32 = line.strip_prefix("CONNECT ").and_then(|p| p.parse().ok()).context("bad CONNECT line")?;
    conn.write_all(b"OK 1\n")?;
    let mut buf = vec![0u8; CHUNK];
    match port {
        SINK_PORT => {
            let mut total: u64 = 0;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(err) if err.kind() == ErrorKind::Interrupted => {}
                    Err(err) => return Err(err.into()),
                }
            }
            conn.write_all(format!("{total}\n").as_bytes())?;
        }
        SOURCE_PORT => {
            let mut left: u64 = read_line(&mut conn)?.parse().context("bad request")?;
            buf.fill(0x5a);
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                conn.write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
        other => bail!("no listener on port {other}"),
    }
    conn.shutdown(Shutdown::Write)?;
    Ok(())
}

fn report(cli: &Cli, results: &Results) {
    let host = vm_host_description();
    println!(
        "vsock benchmark: {} MiB per transfer, {} runs per direction, {} connects, {} vCPUs, {} MiB guest; \
         median (min..max); ratio = vsock / host-local unix socket; VM host: {host}",
        cli.mib, cli.runs, cli.connects, cli.vcpus, cli.mem_mib
    );
    let rows = [
        ("vsock_mb_per_s.host_to_guest", "MB/s", &results.host_to_guest),
        ("vsock_mb_per_s.guest_to_host", "MB/s", &results.guest_to_host),
        ("vsock_connect_us", "us", &results.connect),
    ];
    for (name, unit, samples) in rows {
        let (v, v_min, v_max) = spread(&samples.vsock);
        let (u, u_min, u_max) = spread(&samples.unix);
        println!(
            "{name}={v:.2} {unit} ({v_min:.2}..{v_max:.2}) unix={u:.2} {unit} ({u_min:.2}..{u_max:.2}) ratio={:.4}",
            v / u
        );
    }
    emit_figures(cli, results);
}

/// Emits each figure's record ([`Figure`]) with every sample of vsock and of the unix socket.
fn emit_figures(cli: &Cli, results: &Results) {
    let mib = cli.mib;
    let rows = [
        (
            "vsock_mb_per_s.host_to_guest",
            "unix_mb_per_s.host_to_guest",
            "MB/s",
            format!("the host's first write of a {mib} MiB stream to the guest's sink (after the handshake)"),
            "the host reads the sink's byte count, sent after it read every byte and EOF (MB = 10^6 bytes)"
                .to_owned(),
            &results.host_to_guest,
        ),
        (
            "vsock_mb_per_s.guest_to_host",
            "unix_mb_per_s.guest_to_host",
            "MB/s",
            format!(
                "the host writes the request line for {mib} MiB to the guest's source (after the handshake)"
            ),
            "the host reads EOF after the last byte the source wrote (MB = 10^6 bytes)".to_owned(),
            &results.guest_to_host,
        ),
        (
            "vsock_connect_us",
            "unix_connect_us",
            "us",
            "the host's connect() on the VM's vsock socket".to_owned(),
            "the host has read the whole `OK <n>` line of the hybrid handshake".to_owned(),
            &results.connect,
        ),
    ];
    for (name, baseline, unit, start, end, samples) in rows {
        Figure::new(name, unit, &start, &end)
            .samples(&samples.vsock)
            .beside(baseline, "host unix socket", &samples.unix)
            .emit();
    }
}
