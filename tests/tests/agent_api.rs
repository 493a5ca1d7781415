//! The agent API end to end: husk-agent serves ttrpc in host mode (unix socket) and as PID 1 of a
//! real guest (vsock port 1024 through husk-vmm's hybrid vsock), and the host's `AgentClient`
//! talks to both.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_protocols::agent::{CheckRequest, Route, Routes, UpdateRoutesRequest};
use husk_protocols::{agent_ttrpc, AGENT_API_VERSION};
use husk_shim::agent_client::{AgentAddress, AgentClient};
use husk_tests::host_agent::HostAgent;
use husk_tests::{combined, describe, guest_dir, run, target_bin, VmHost};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn a_host_mode_agent_answers_check_and_guest_details() {
    let agent = HostAgent::start().unwrap();
    runtime().block_on(async {
        let client = AgentClient::connect(AgentAddress::Unix(agent.socket.clone()), Duration::from_secs(5))
            .await
            .unwrap();
        let check = client.check().await.unwrap();
        assert_eq!(check.api_version, AGENT_API_VERSION);
        assert_eq!(check.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(check.uptime_ms > 0);
        let details = client.guest_details().await.unwrap();
        assert!(details.mem_total_kib > 0 && !details.kernel_release.is_empty(), "{details:?}");
    });
}

#[test]
fn a_host_of_another_api_version_and_a_bad_request_get_named_errors() {
    let agent = HostAgent::start().unwrap();
    runtime().block_on(async {
        let address = format!("unix://{}", agent.socket.display());
        let rpc = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap());
        let context = || ttrpc::context::with_timeout(5_000_000_000);
        let request = CheckRequest { api_version: AGENT_API_VERSION + 1, ..Default::default() };
        let err = rpc.check(context(), &request).await.unwrap_err().to_string();
        assert!(err.contains("api_version") && err.contains("FAILED_PRECONDITION"), "{err}");
        let route = Route { destination: "10.0.0.0/33".into(), device: "eth0".into(), ..Default::default() };
        let request = UpdateRoutesRequest {
            routes: Some(Routes { routes: vec![route], ..Default::default() }).into(),
            ..Default::default()
        };
        let err = rpc.update_routes(context(), &request).await.unwrap_err().to_string();
        assert!(err.contains("INVALID_ARGUMENT") && err.contains("routes[0].destination"), "{err}");
        // The agent keeps serving after refusing.
        let ok = CheckRequest { api_version: AGENT_API_VERSION, ..Default::default() };
        assert_eq!(rpc.check(context(), &ok).await.unwrap().api_version, AGENT_API_VERSION);
    });
}

#[test]
fn the_guest_agent_serves_its_api_over_vsock_before_it_reports_ready() {
    let (vmm, probe, guest) = (target_bin("husk-vmm"), target_bin("husk-agent-probe"), guest_dir());
    let script = format!(
        "work=$(mktemp -d); sock=$work/vsock.sock
{vmm} --kernel {kernel} --initrd {initrd} --mem 256 --vcpus 2 --vsock $sock --console $work/console.log & vmm=$!
{probe} --vsock $sock --wait-s 120; probe=$?
kill -TERM $vmm; wait $vmm; echo \"vmm-status=$? probe-status=$probe\"
echo '--- console'; cat $work/console.log; rm -rf $work",
        vmm = vmm.display(),
        probe = probe.display(),
        kernel = guest.join("vmlinux").display(),
        initrd = guest.join("initramfs.cpio").display(),
    );
    let output = run(&mut VmHost::detect().command(Duration::from_secs(300), &["sh", "-c", &script]));
    let text = combined(&output);
    assert!(text.contains("vmm-status=0 probe-status=0"), "{}", describe(&output));
    assert!(text.contains(&format!("api_version={AGENT_API_VERSION}")), "{text}");
    assert!(text.contains("cpus_online=0-1"), "the guest's details, not the host's: {text}");
    assert!(text.contains("kernel_release=6.1."), "{text}");
    let serving = text.find("serving the agent API on Vsock(1024)").expect("serving line");
    let ready = text.find("husk-agent: ready").expect("ready line");
    assert!(serving < ready, "ready is announced only once the API listens: {text}");
}
