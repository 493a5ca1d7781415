//! The agent's health check. A hung agent (deadlocked, frozen, starved of CPU) answers nothing,
//! and the calls that have no deadline of their own (a process's wait, OOM events) would wait
//! for it forever, so the pod's tasks would never exit. As Kata's sandbox monitor does, the shim
//! asks the agent for a Check at a steady interval; one that is not answered within the timeout
//! ends the VM, and the pod's tasks exit with that reason (the console's last lines are logged).

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Sandbox;
use crate::agent_client::AgentError;

/// Checks per timeout: a hung agent is noticed between one and 1 + 1/CHECKS timeouts after it
/// stopped answering.
const CHECKS_PER_TIMEOUT: u32 = 3;
/// A broken agent connection comes a moment before the VM's end is recorded.
const END_GRACE: Duration = Duration::from_secs(2);

impl Sandbox {
    /// Checks the agent every `timeout / 3` until the VM ends or the sandbox is dropped; stops
    /// the VM when a check gets no answer within `timeout`. Must run inside a tokio runtime.
    pub fn watch_health(self: &Arc<Self>, timeout: Duration) {
        let sandbox = Arc::downgrade(self);
        tokio::spawn(async move { watch(sandbox, timeout).await });
    }
}

async fn watch(sandbox: Weak<Sandbox>, timeout: Duration) {
    let interval = (timeout / CHECKS_PER_TIMEOUT).max(Duration::from_millis(100));
    let failure = loop {
        tokio::time::sleep(interval).await;
        // No strong reference is held while waiting: a pod being deleted must not wait for this.
        let Some(client) = running(&sandbox).map(|s| s.client().clone()) else { return };
        match tokio::time::timeout(timeout, client.check()).await {
            // A refusal is an answer too.
            Ok(Ok(_) | Err(AgentError::Refused { .. } | AgentError::ApiMismatch { .. })) => {}
            Ok(Err(err)) => break format!("the agent's health check failed: {err}"),
            Err(_) => break format!("the agent answered no health check within {timeout:?}"),
        }
    };
    let Some(sandbox) = running(&sandbox) else { return };
    // A VM that is ending on its own is reported by its own path.
    if !sandbox.ended_within(END_GRACE).await {
        sandbox.end_unresponsive(&failure);
    }
}

fn running(sandbox: &Weak<Sandbox>) -> Option<Arc<Sandbox>> {
    sandbox.upgrade().filter(|sandbox| !sandbox.has_ended())
}
