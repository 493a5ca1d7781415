//! `husk-cri-net CONTAINERD_SOCKET LOG_DIR`: pod networking through containerd's CRI plugin and
//! its CNI bridge network (`tests/containerd-env --cri`). A Husk pod and a runc pod each serve a
//! random 1 MiB file with busybox `httpd`; a second Husk pod fetches both with `wget` and checks
//! their SHA-256, and the runc pod fetches the Husk pod's. Prints the guest's `eth0` address beside
//! the pod IP CRI reports, `<from>-to-<to>=intact|...` per transfer, and after removing the pods
//! what is left of their networks (`netns-left=`, `veths-left=`).
//!
//! `husk-cri-net --bench CONTAINERD_SOCKET LOG_DIR [MIB]`: `net_mb_per_s` (one HTTP transfer of
//! MIB MiB, default 32, from a CGI `dd` behind httpd, timed inside the client pod from before
//! `wget` starts to after `wc -c` counted the last byte, each transfer's size checked, median of
//! 3) and `net_rtt_us` (busybox `ping` average of 10) between two Husk pods, beside the same
//! between two runc pods; their `BENCH` records carry every transfer's rate and every echo's
//! round trip.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use husk_tests::bench::Figure;
use husk_tests::cri::{
    connect, exec, exec_within, pod_config, pod_ip, remove_pod, run_pod, start, Cri, HANDLER,
};
use husk_tests::diagnostics;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

/// Serves /www on port 8080 with a random file and its digest.
const WEB: &str = "mkdir -p /www && head -c 1048576 /dev/urandom >/www/blob \
    && sha256sum /www/blob | cut -d' ' -f1 >/www/blob.sha256 && exec httpd -f -p 8080 -h /www";
/// The bulk server: serves `mib` MiB from the pod's /dev/shm (memory) on port 8080, written to the
/// socket in 64 KiB write(2)s by a CGI `dd` (httpd would sendfile(2) a file; see `Writer::Sendfile`
/// in husk-bench-stdio for why the benchmarks keep sendfile out of the guest). /dev/shm is noexec:
/// the CGI lives in the root filesystem.
fn bulk_server(mib: u64) -> String {
    format!(
        "mkdir -p /dev/shm/www /www/cgi-bin \
         && dd if=/dev/zero of=/dev/shm/www/bulk bs=65536 count={} 2>/dev/null \
         && printf '#!/bin/sh\\necho Content-Type: application/octet-stream\\necho\\nexec dd if=/dev/shm/www/bulk bs=65536 2>/dev/null\\n' >/www/cgi-bin/bulk \
         && chmod +x /www/cgi-bin/bulk && echo ok >/www/ready && exec httpd -f -p 8080 -h /www",
        mib * 16
    )
}
/// MiB one bulk transfer moves unless the command line says otherwise.
const BULK_MIB: u64 = 32;
/// The most one bulk transfer may move: CRI sizes the server pod's /dev/shm 64 MiB.
const MAX_BULK_MIB: u64 = 48;
const IDLE: &str = "exec sleep 100000";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (bench, socket, logs, mib) = match args.as_slice() {
        [flag, socket, logs] if flag == "--bench" => (true, socket, logs, BULK_MIB),
        [flag, socket, logs, mib] if flag == "--bench" => match mib.parse() {
            Ok(mib @ 1..=MAX_BULK_MIB) => (true, socket, logs, mib),
            _ => bail!("MIB {mib:?}: expected 1 to {MAX_BULK_MIB} (the server pod's /dev/shm holds 64 MiB)"),
        },
        [socket, logs] => (false, socket, logs, BULK_MIB),
        _ => bail!("usage: husk-cri-net [--bench] CONTAINERD_SOCKET LOG_DIR [MIB]"),
    };
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let mut pods = Vec::new();
    let result = if bench {
        benchmark(&mut cri, logs, &mut pods, mib).await
    } else {
        reach(&mut cri, logs, &mut pods).await
    };
    for pod in pods {
        remove_pod(&mut cri, pod).await?;
    }
    println!("pods-removed");
    if !bench {
        println!("netns-left={}", count_lines("ls /var/run/netns 2>/dev/null"));
        println!("veths-left={}", count_lines("/usr/bin/ip -o link show type veth"));
    }
    result
}

/// A pod running `script` in a container named `main`: (pod id, container id, pod IP).
async fn pod(
    cri: &mut Cri,
    logs: &str,
    pods: &mut Vec<String>,
    name: &str,
    handler: &str,
    script: &str,
) -> Result<(String, String, String)> {
    let config = pod_config(name, logs);
    let pod = run_pod(cri, &config, handler).await.with_context(|| format!("pod {name}"))?;
    pods.push(pod.clone());
    let container = start(cri, &pod, &config, "main", None, script).await?;
    let ip = pod_ip(cri, &pod).await?;
    println!("{name}-ip={ip}");
    Ok((pod, container, ip))
}

async fn reach(cri: &mut Cri, logs: &str, pods: &mut Vec<String>) -> Result<()> {
    let (_, husk_web, husk_ip) = pod(cri, logs, pods, "web-husk", HANDLER, WEB).await?;
    let (_, runc_web, runc_ip) = pod(cri, logs, pods, "web-runc", "runc", WEB).await?;
    let (_, client, _) = pod(cri, logs, pods, "client-husk", HANDLER, IDLE).await?;
    let eth0 = exec(cri, &husk_web, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).await?;
    println!("web-husk-guest-eth0={}", eth0.split_whitespace().nth(3).unwrap_or("none"));
    for (from, from_id, to, ip) in [
        ("husk", &client, "husk", &husk_ip),
        ("husk", &client, "runc", &runc_ip),
        ("runc", &runc_web, "husk", &husk_ip),
    ] {
        let outcome = fetch_checked(cri, from_id, ip).await;
        if !matches!(&outcome, Ok(text) if text == "intact") {
            diagnose(cri, &[&husk_web, &client]).await;
        }
        println!("{from}-to-{to}={}", outcome?);
    }
    // What a stalled transfer's report starts with: each Husk shim's dump of its VM's rings.
    if let Some(log) = std::env::var_os("CONTAINERD_LOG") {
        let dump = diagnostics::shim_virtio_state(std::path::Path::new(&log), DUMP_DEADLINE);
        println!("virtio-dump-nics-moving={}", nics_moving(&dump));
    }
    Ok(())
}

/// The virtio-net devices of a virtio state dump that have both received and sent packets.
fn nics_moving(dump: &str) -> usize {
    let counter = |line: &str, name: &str| -> u64 {
        let key = format!(" {name}=");
        line.split(key.as_str())
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    dump.lines()
        .filter(|line| line.contains("net rx_packets="))
        .filter(|line| counter(line, "rx_packets") > 0 && counter(line, "tx_packets") > 0)
        .count()
}

/// What the VMs, the guests and the node say about the pod network, for a failed transfer: each
/// shim's virtio rings and counters, each Husk guest's interfaces, interrupts and TCP sockets, the
/// node's links and tc statistics, then the shims' dumps again (what moved in between).
async fn diagnose(cri: &mut Cri, husk_containers: &[&str]) {
    let log = std::env::var_os("CONTAINERD_LOG").map(PathBuf::from);
    let dump = |when: &str| match &log {
        Some(log) => {
            println!("--- virtio state ({when}): {}", diagnostics::shim_virtio_state(log, DUMP_DEADLINE))
        }
        None => println!("--- virtio state ({when}): CONTAINERD_LOG is not set"),
    };
    dump("first");
    for id in husk_containers {
        let script = "ip addr; ip route; ip neigh; cat /proc/net/dev; cat /proc/interrupts;             netstat -tn; grep -A1 '^Tcp:' /proc/net/snmp; grep -A1 '^TcpExt:' /proc/net/netstat";
        match exec_within(cri, id, &["sh", "-c", script], DIAGNOSE_EXEC_S).await {
            Ok(text) => println!("--- guest of {}:\n{text}", &id[..12]),
            Err(err) => println!("--- guest of {}: {err:#}", &id[..12]),
        }
    }
    println!("--- node:\n{}", diagnostics::node_network_state());
    dump("again");
}

/// How long a shim may take to dump its virtio state after SIGUSR1.
const DUMP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one diagnostic command in a guest may run.
const DIAGNOSE_EXEC_S: u64 = 20;

/// How long a server pod may take from its container starting to answering HTTP: it writes its
/// files first (up to [`MAX_BULK_MIB`] for the bulk server), which an emulated test host under CI
/// load does slowly. Below the 60 s that `cri::exec` gives one ExecSync.
const SERVING_DEADLINE_S: u32 = 50;

/// Waits, from inside container `from`, until the server at `ip` serves `path`. Refused
/// connections are retried until [`SERVING_DEADLINE_S`] of guest time have passed.
/// (busybox 1.35's `wget -T` crashes: `timeout` bounds each attempt instead.)
async fn wait_until_serving(cri: &mut Cri, from: &str, ip: &str, path: &str) -> Result<()> {
    let script = format!(
        "end=$(( $(cut -d. -f1 /proc/uptime) + {SERVING_DEADLINE_S} )); \
         until timeout 3 wget -q -O /dev/null http://{ip}:8080/{path}; do \
         [ $(cut -d. -f1 /proc/uptime) -ge $end ] && exit 1; sleep 0.2; done"
    );
    exec(cri, from, &["sh", "-c", &script]).await.with_context(|| {
        format!("the server at {ip}:8080 did not serve /{path} within {SERVING_DEADLINE_S} s")
    })?;
    Ok(())
}

/// Fetches the web pod's file and digest at `ip` from inside container `from`: "intact" when the
/// file's SHA-256 is the digest the server computed.
async fn fetch_checked(cri: &mut Cri, from: &str, ip: &str) -> Result<String> {
    wait_until_serving(cri, from, ip, "blob.sha256").await?;
    let script = format!(
        "timeout 30 wget -q -O /tmp/blob.sha256 http://{ip}:8080/blob.sha256 && \
         timeout 30 wget -q -O /tmp/blob http://{ip}:8080/blob && sha256sum /tmp/blob | cut -d' ' -f1; cat /tmp/blob.sha256"
    );
    let output = exec(cri, from, &["sh", "-c", &script]).await?;
    let lines: Vec<&str> = output.lines().collect();
    Ok(match lines.as_slice() {
        [got, want] if got == want && got.len() == 64 => "intact".into(),
        _ => format!("mismatch:{}", output.replace('\n', "|")),
    })
}

async fn benchmark(cri: &mut Cri, logs: &str, pods: &mut Vec<String>, mib: u64) -> Result<()> {
    println!("husk-cri-net: {}", husk_tests::bench::vm_host_description());
    println!("net_mb_per_s: start: the client's wget starts; end: wc -c counted the last of the {mib} MiB wget received (guest clock, 10 ms steps)");
    println!("net_rtt_us: busybox ping average of 10 echoes, client pod to server pod");
    let mut figures = Vec::new();
    // Per handler: every transfer's rate and every echo's round trip.
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    for handler in [HANDLER, "runc"] {
        let (_, server, server_ip) =
            pod(cri, logs, pods, &format!("bulk-server-{handler}"), handler, &bulk_server(mib)).await?;
        let (_, client, _) = pod(cri, logs, pods, &format!("bulk-client-{handler}"), handler, IDLE).await?;
        if handler == HANDLER {
            println!("guest NIC features: {}", guest_nic_features(cri, &client).await?);
        }
        let measured = match transfer_rates(cri, &client, &server_ip, mib << 20).await {
            Ok(rates) => rtt_us(cri, &client, &server_ip).await.map(|rtt| (rates, rtt)),
            Err(err) => Err(err),
        };
        let (rates, (rtt, rtts)) = match measured {
            Ok(measured) => measured,
            Err(err) => {
                let guests: &[&str] = if handler == HANDLER { &[&server, &client] } else { &[] };
                diagnose(cri, guests).await;
                return Err(err);
            }
        };
        figures.push((husk_tests::bench::spread(&rates), rtt));
        samples.push((rates, rtts));
    }
    let (((husk, husk_min, husk_max), husk_rtt), ((runc, runc_min, runc_max), runc_rtt)) =
        (figures[0], figures[1]);
    println!(
        "net_mb_per_s={husk:.1} (min {husk_min:.1} max {husk_max:.1}) runc_net_mb_per_s={runc:.1} (min {runc_min:.1} max {runc_max:.1}) ratio={:.2}",
        husk / runc
    );
    println!("net_rtt_us={husk_rtt:.0} runc_net_rtt_us={runc_rtt:.0} ratio={:.2}", husk_rtt / runc_rtt);
    let ((husk_rates, husk_rtts), (runc_rates, runc_rtts)) = (&samples[0], &samples[1]);
    Figure::new(
        "net_mb_per_s",
        "MB/s",
        &format!("the client pod's wget starts (HTTP GET of {mib} MiB that a CGI dd in the server pod writes; guest clock, 10 ms steps)"),
        &format!("wc -c counted the last of the {mib} MiB wget received (MB = 10^6 bytes)"),
    )
    .samples(husk_rates)
    .beside("runc_net_mb_per_s", "runc", runc_rates)
    .emit();
    Figure::new(
        "net_rtt_us",
        "us",
        "busybox ping sends an echo request, client pod to server pod (10 echoes, 0.2 s apart)",
        "the echo reply arrived (each reply's `time=` as ping reports it)",
    )
    .samples(husk_rtts)
    .beside("runc_net_rtt_us", "runc", runc_rtts)
    .emit();
    Ok(())
}

/// Once the bulk server at `ip` serves, 1 warm-up and 3 counted transfers of `bytes` to `client`;
/// the counted ones' rates in MB/s.
async fn transfer_rates(cri: &mut Cri, client: &str, ip: &str, bytes: u64) -> Result<Vec<f64>> {
    wait_until_serving(cri, client, ip, "ready").await?;
    transfer_mb_per_s(cri, client, ip, bytes).await?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        rates.push(transfer_mb_per_s(cri, client, ip, bytes).await?);
    }
    Ok(rates)
}

/// How long one transfer of `mib` MiB may take in the guest: generous for an emulated test host
/// under CI load (a stop, not slowness, is what it catches).
fn transfer_deadline_s(mib: u64) -> u64 {
    30 + 2 * mib
}

/// One transfer of `bytes` from the bulk server at `ip` (already serving), timed inside `client`.
/// wget is stopped at [`transfer_deadline_s`] (then `wc` counts what had arrived).
async fn transfer_mb_per_s(cri: &mut Cri, client: &str, ip: &str, bytes: u64) -> Result<f64> {
    let deadline = transfer_deadline_s(bytes >> 20);
    let script = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); n=$(timeout {deadline} wget -q -O - http://{ip}:8080/cgi-bin/bulk | wc -c); \
         b=$(cut -d' ' -f1 /proc/uptime); echo $a $b $n"
    );
    let output = exec_within(cri, client, &["sh", "-c", &script], deadline + 10).await?;
    let fields: Vec<f64> = output.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let [start, end, received] = fields.as_slice() else { bail!("transfer timing: {output:?}") };
    if *received as u64 != bytes {
        bail!(
            "the client received {received} of {bytes} bytes from {ip} in {:.1} s (wget is stopped after {deadline} s)",
            end - start
        );
    }
    let seconds = (end - start).max(0.01);
    Ok(bytes as f64 / 1e6 / seconds)
}

/// The offloads the guest's virtio-net driver negotiated (from the feature bits in sysfs).
async fn guest_nic_features(cri: &mut Cri, client: &str) -> Result<String> {
    let script =
        "for d in /sys/bus/virtio/devices/*; do [ \"$(cat $d/device)\" = 0x0001 ] && cat $d/features; done";
    let bits = exec(cri, client, &["sh", "-c", script]).await?;
    let bits = bits.trim();
    let named = [
        (0, "csum"),
        (1, "guest_csum"),
        (7, "guest_tso4"),
        (8, "guest_tso6"),
        (11, "host_tso4"),
        (12, "host_tso6"),
    ];
    let on: Vec<&str> = named
        .iter()
        .filter(|(bit, _)| bits.as_bytes().get(*bit) == Some(&b'1'))
        .map(|(_, name)| *name)
        .collect();
    Ok(if on.is_empty() { format!("none ({bits})") } else { on.join(" ") })
}

/// busybox ping's average round trip to `ip` from `client`, and each echo's (the average alone
/// when no reply line parses), in microseconds.
async fn rtt_us(cri: &mut Cri, client: &str, ip: &str) -> Result<(f64, Vec<f64>)> {
    let output = exec(cri, client, &["ping", "-c", "10", "-i", "0.2", ip]).await?;
    // "round-trip min/avg/max = 0.101/0.152/0.301 ms"
    let averages = output.lines().find(|line| line.contains("min/avg/max")).and_then(|line| {
        let values = line.split('=').nth(1)?.split_whitespace().next()?;
        values.split('/').nth(1)?.parse::<f64>().ok()
    });
    let average = averages.map(|ms| ms * 1000.0).with_context(|| format!("ping output: {output:?}"))?;
    let each = echo_times_us(&output);
    Ok((average, if each.is_empty() { vec![average] } else { each }))
}

/// The round trips of busybox ping's reply lines (`64 bytes from 10.88.0.5: seq=0 ttl=64
/// time=0.123 ms`), in microseconds.
fn echo_times_us(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter(|line| line.contains(" bytes from "))
        .filter_map(|line| {
            let time = line.split_whitespace().find_map(|word| word.strip_prefix("time="))?;
            time.parse::<f64>().ok().map(|ms| ms * 1000.0)
        })
        .collect()
}

/// Lines of `command`'s output on the node (0 when it fails).
fn count_lines(command: &str) -> usize {
    std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).lines().count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{echo_times_us, nics_moving};

    #[test]
    fn a_nic_moves_when_its_dump_line_counts_packets_both_ways() {
        let dump = "INFO virtio state sandbox=a slot=3 state=virtio device 1 status=0xf; q0: size=256; \
            net rx_packets=12 rx_dropped=0 rx_pending=0 rx_passes=9 tx_packets=7 tx_dropped=0 tx_passes=5\n\
            INFO virtio state sandbox=b slot=3 state=virtio device 1; net rx_packets=3 rx_dropped=0 tx_packets=0\n\
            INFO virtio state sandbox=b slot=0 state=virtio device 4 status=0xf";
        assert_eq!(nics_moving(dump), 1);
    }

    #[test]
    fn each_reply_line_of_busybox_ping_gives_its_round_trip() {
        let output = "PING 10.88.0.5 (10.88.0.5): 56 data bytes\n\
            64 bytes from 10.88.0.5: seq=0 ttl=64 time=0.123 ms\n\
            64 bytes from 10.88.0.5: seq=1 ttl=64 time=1.5 ms\n\n\
            --- 10.88.0.5 ping statistics ---\n\
            2 packets transmitted, 2 packets received, 0% packet loss\n\
            round-trip min/avg/max = 0.123/0.811/1.500 ms\n";
        let times = echo_times_us(output);
        assert_eq!(times.len(), 2);
        assert!((times[0] - 123.0).abs() < 1e-6 && (times[1] - 1500.0).abs() < 1e-6, "{times:?}");
    }
}
