//! Starts device threads on behalf of threads that may not: a thread under a seccomp filter
//! cannot `clone`, and a thread it started would inherit its filter (see [`crate::seccomp`]).
//! vCPU threads activate devices when the driver says so; the device's thread is then started
//! here, by a long-lived launcher thread that has no filter, and installs its own.

use std::io;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::OnceLock;
use std::thread::JoinHandle;

type Body = Box<dyn FnOnce() + Send + 'static>;

struct Request {
    name: String,
    body: Body,
    started: SyncSender<io::Result<JoinHandle<()>>>,
}

/// The process's launcher, once [`start`] ran.
static LAUNCHER: OnceLock<Sender<Request>> = OnceLock::new();

/// Starts the launcher thread if it is not running; call before any thread is filtered (the VM's
/// start does).
pub fn start() -> io::Result<()> {
    if LAUNCHER.get().is_some() {
        return Ok(());
    }
    let (requests, incoming) = channel::<Request>();
    std::thread::Builder::new().name("vmm-launcher".into()).spawn(move || {
        mask_process_signals();
        for Request { name, body, started } in incoming {
            let _ = started.send(std::thread::Builder::new().name(name).spawn(body));
        }
    })?;
    // A racing second start leaves its idle thread behind; the first one's serves everybody.
    let _ = LAUNCHER.set(requests);
    Ok(())
}

/// Starts a thread named `name` running `body`: through the launcher when it runs, directly
/// otherwise (unit tests, which filter nothing).
pub fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    let body = move || {
        mask_process_signals();
        body()
    };
    let Some(launcher) = LAUNCHER.get() else {
        return std::thread::Builder::new().name(name.to_owned()).spawn(body);
    };
    let (started, handle) = sync_channel(1);
    let request = Request { name: name.to_owned(), body: Box::new(body), started };
    let sent = launcher.send(request);
    if sent.is_err() {
        return Err(io::Error::other("the VMM's thread launcher has stopped"));
    }
    handle.recv().map_err(|_| io::Error::other("the VMM's thread launcher has stopped"))?
}

/// Blocks, on the calling thread, every signal but the vCPU kick and the faults the kernel sends
/// to the thread that caused them (`SIGSYS` from a filter, `SIGSEGV`...). Every thread the VMM
/// starts calls it first: a process-directed signal (the embedding shim's SIGUSR1, SIGTERM,
/// SIGCHLD) then goes to one of the process's own threads, never runs its handler on a thread
/// whose seccomp filter forbids what the handler does, and never interrupts a device mid-request.
pub fn mask_process_signals() {
    // SAFETY: sigset_t is plain data that sigfillset initialises; the calls only write to `set`
    // and to this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for kept in [
            crate::vcpu::kick_signal(),
            libc::SIGSYS,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
        ] {
            libc::sigdelset(&mut set, kept);
        }
        // The whole mask, not an addition to the inherited one (a creator that blocked the kick
        // signal must not pass that on). Cannot fail with SIG_SETMASK and a valid set.
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// [`spawn`] a thread that runs `setup` first and then `run` with what it made; returns once
/// `setup` is done, with its error if it failed (the thread has then ended). Device threads set up
/// this way open their files and sockets before their seccomp filter goes on, and a failure still
/// reaches the driver's activation.
pub fn spawn_set_up<T: 'static>(
    name: &str,
    setup: impl FnOnce() -> io::Result<T> + Send + 'static,
    run: impl FnOnce(T) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let (ready, set_up) = sync_channel::<io::Result<()>>(1);
    let thread = spawn(name, move || match setup() {
        Ok(made) => {
            let _ = ready.send(Ok(()));
            run(made);
        }
        Err(err) => {
            let _ = ready.send(Err(err));
        }
    })?;
    let outcome =
        set_up.recv().unwrap_or_else(|_| Err(io::Error::other("the thread ended during its setup")));
    match outcome {
        Ok(()) => Ok(thread),
        Err(err) => {
            let _ = thread.join();
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_start_through_the_launcher_with_their_names() {
        start().unwrap();
        let (tx, rx) = channel();
        let thread = spawn("named-by-test", move || {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        })
        .unwrap();
        thread.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("named-by-test"));
    }

    #[test]
    fn a_failed_setup_is_returned_and_run_never_starts() {
        let (tx, rx) = channel();
        let failed = spawn_set_up(
            "setup-fails",
            || Err::<(), _>(io::Error::other("no")),
            move |()| {
                let _ = tx.send(());
            },
        );
        assert_eq!(failed.err().map(|e| e.to_string()).as_deref(), Some("no"));
        assert!(rx.recv().is_err(), "run was dropped unstarted");
    }
}
