//! `husk-cri-conformance CONTAINERD_SOCKET WORK_DIR HANDLER...`: runs every CRI conformance check
//! (`husk_tests::conformance`) with each runtime handler in turn, on the containerd at
//! CONTAINERD_SOCKET, its files under WORK_DIR. Prints one `check NAME HANDLER pass|fail MS
//! DETAIL` line per check and handler as it goes, then a table of both side by side; exits
//! non-zero only when a handler's pod could not be run or removed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use husk_tests::conformance::{run_all, Outcome, CHECKS};
use husk_tests::cri::connect;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, work, handlers @ ..] = args.as_slice() else {
        bail!("usage: husk-cri-conformance CONTAINERD_SOCKET WORK_DIR HANDLER...");
    };
    if handlers.is_empty() {
        bail!("usage: husk-cri-conformance CONTAINERD_SOCKET WORK_DIR HANDLER... (no handler named)");
    }
    let cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let mut all = Vec::new();
    for handler in handlers {
        all.push(run_all(&cri, handler, Path::new(work)).await?);
    }
    print_table(handlers, &all);
    Ok(())
}

/// One row per check, one column per handler.
fn print_table(handlers: &[String], all: &[Vec<Outcome>]) {
    println!("| check | {} |", handlers.join(" | "));
    println!("|---|{}", "---|".repeat(handlers.len()));
    for (row, check) in CHECKS.iter().enumerate() {
        let cells: Vec<String> = all
            .iter()
            .map(|outcomes| match outcomes.get(row) {
                Some(o) if o.passed => format!("pass ({} ms)", o.millis),
                Some(o) => format!("**fail** ({} ms)", o.millis),
                None => "-".into(),
            })
            .collect();
        println!("| {check} | {} |", cells.join(" | "));
    }
    for (handler, outcomes) in handlers.iter().zip(all) {
        let passed = outcomes.iter().filter(|o| o.passed).count();
        println!("passed-{handler}={passed}/{}", outcomes.len());
    }
}
