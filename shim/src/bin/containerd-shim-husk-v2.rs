//! `containerd-shim-husk-v2`: containerd's runtime `io.containerd.husk.v2`. containerd runs it
//! with `start`, `delete` or `-info`; the process `start` spawns serves the pod's tasks. See
//! `husk_shim::containerd`.

use husk_shim::containerd::{shim_config, HuskShim, RUNTIME_ID};

fn main() {
    // SIGUSR1 asks a serving shim for its VM's virtio state (`husk_shim::containerd`); until that
    // listener is up (and in `start` and `delete`), it must not end the process.
    // SAFETY: setting a signal's disposition to ignore, before any thread exists.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    // Before any thread: the VMM's filtered threads share this process's allocator.
    husk_vmm::seccomp::prepare_allocator();
    // The share holds one descriptor per file the guest has looked up (process-wide, so set here,
    // not in the library); their kernel memory is charged to the pod's cgroup.
    if let Err(err) = husk_vmm::host::raise_fd_limit() {
        eprintln!("containerd-shim-husk-v2: cannot raise the open-file limit ({err}); big shares may fail");
    }
    serve();
}

#[tokio::main]
async fn serve() {
    let version = std::env::args().skip(1).any(|arg| matches!(arg.as_str(), "-v" | "-version" | "--version"));
    if version {
        println!("containerd-shim-husk-v2:");
        println!("  Version:  {}", env!("CARGO_PKG_VERSION"));
        println!("  Runtime:  {RUNTIME_ID} (task API v{})", containerd_shim_protos::TASK_API_VERSION);
        println!("  Agent API: {}", husk_protocols::AGENT_API_VERSION);
        return;
    }
    containerd_shim::asynchronous::run::<HuskShim>(RUNTIME_ID, Some(shim_config())).await;
}
