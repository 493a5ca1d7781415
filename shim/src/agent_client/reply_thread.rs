//! The thread on which an [`super::AgentClient`] reads and decodes what the agent sends: the
//! hybrid vsock handshake's answer, every ttrpc frame and every protobuf message in it. The agent
//! runs in the guest, so these bytes are the guest's, and a bug in their parsing must gain an
//! attacker no more than a device thread's bug would: the thread keeps no capability and runs
//! under the seccomp filter of [`ThreadRole::AgentReplies`] (reading and writing the connections
//! it was handed; no `socket`, `connect`, `open`, `exec` or new threads). It blocks the process's
//! signals, as the VMM's threads do. The rest of the shim sees only decoded messages.
//!
//! It runs a single-threaded tokio runtime, built before the filter goes on; futures reach it
//! through [`ReplyThread::run`]. It ends when its last client is dropped.

use std::future::Future;
use std::io;

use husk_vmm::seccomp::{self, ThreadRole};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

/// The name of every reply thread (as `ps -T` shows it).
pub const REPLY_THREAD_NAME: &str = "husk-agent-rpc";

pub(super) struct ReplyThread {
    runtime: Handle,
    /// Dropped with the thread's last user: its runtime then stops, closing the connections.
    _stop: oneshot::Sender<()>,
}

impl ReplyThread {
    /// Starts a reply thread and waits until it is confined.
    pub(super) async fn start() -> io::Result<ReplyThread> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(REPLY_THREAD_NAME.to_owned())
            .spawn(move || serve(ready_tx, stop_rx))?;
        let runtime = ready_rx.await.map_err(|_| io::Error::other("it ended before it was ready"))??;
        Ok(ReplyThread { runtime, _stop: stop_tx })
    }

    /// Runs `work` on the reply thread and returns its result here; fails if the thread has
    /// ended or `work` panicked. Dropping the returned future (a deadline passed) cancels `work`.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        let task = self.runtime.spawn(work);
        let _cancel = CancelOnDrop(task.abort_handle());
        task.await.map_err(|err| io::Error::other(format!("its task ended: {err}")))
    }
}

struct CancelOnDrop(AbortHandle);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.abort(); // nothing if the task has finished
    }
}

/// The thread's body: its runtime, its confinement, then serving until told to stop.
fn serve(ready: oneshot::Sender<io::Result<Handle>>, stop: oneshot::Receiver<()>) {
    husk_vmm::threads::mask_process_signals();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build();
    let confined = runtime.and_then(|runtime| confine().map(|()| runtime));
    let runtime = match confined {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready.send(Err(err)); // the starter may have given up waiting
            return;
        }
    };
    if ready.send(Ok(runtime.handle().clone())).is_ok() {
        runtime.block_on(async {
            let _ = stop.await; // a dropped sender stops the thread too
        });
    }
}

/// Drops every capability of this thread (capabilities are per thread) and applies its filter.
fn confine() -> io::Result<()> {
    husk_vmm::jail::keep_capabilities(&[])
        .map_err(|err| io::Error::other(format!("dropping capabilities: {err}")))?;
    seccomp::apply(ThreadRole::AgentReplies).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A line of `/proc/self/task/<tid>/status`, as `Field:\tvalue`.
    fn status_field(tid: i32, field: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{status}"));
        line[field.len()..].trim().to_owned()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn work_runs_on_a_named_thread_with_a_filter_and_no_capability() {
        let replies = ReplyThread::start().await.unwrap();
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = replies.run(async { unsafe { libc::gettid() } }).await.unwrap();
        // SAFETY: as above.
        assert_ne!(tid, unsafe { libc::gettid() }, "not the caller's thread");
        assert_eq!(
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap().trim(),
            REPLY_THREAD_NAME
        );
        assert_eq!(status_field(tid, "Seccomp:"), "2", "filter mode");
        for set in ["CapEff:", "CapPrm:", "CapInh:"] {
            assert_eq!(status_field(tid, set), "0000000000000000", "{set}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_thread_ends_when_its_last_user_drops_it_even_with_work_abandoned_there() {
        let replies = ReplyThread::start().await.unwrap();
        // SAFETY: as above.
        let tid = replies.run(async { unsafe { libc::gettid() } }).await.unwrap();
        let never = replies.run(std::future::pending::<()>());
        assert!(tokio::time::timeout(Duration::from_millis(50), never).await.is_err(), "pending work waits");
        drop(replies);
        let task = format!("/proc/self/task/{tid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&task).exists() {
            assert!(std::time::Instant::now() < deadline, "the reply thread did not end within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
