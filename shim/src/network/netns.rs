//! Work inside a pod's network namespace. `setns` moves only the calling thread, so the work runs
//! on a thread of its own that enters the namespace first, with a current-thread runtime for its
//! netlink connection (sockets and taps belong to the namespace they were created in); the shim's
//! own threads never leave the host's namespace.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use rtnetlink::Handle;

use super::NetworkError;

/// Runs `work` with a netlink handle inside the network namespace at `netns` and returns its
/// result.
pub async fn run_in<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let path = netns.to_owned();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || {
            let _ = done.send(enter_and_run(path, work));
        })
        .map_err(|source| NetworkError::Thread { source })?;
    result.await.map_err(|_| NetworkError::ThreadDied { netns: netns.to_owned() })?
}

fn enter_and_run<T, F, Fut>(netns: PathBuf, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let file =
        File::open(&netns).map_err(|source| NetworkError::OpenNetns { netns: netns.clone(), source })?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|errno| NetworkError::EnterNetns { netns: netns.clone(), source: errno.into() })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetworkError::Thread { source })?;
    runtime.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|source| NetworkError::Io { what: "opening a netlink socket", source })?;
        tokio::spawn(connection);
        work(handle).await
    })
}
