//! The VMM's threads: each device's thread, started with the VM before any vCPU runs, and the
//! signal mask every VMM thread takes.
//!
//! A thread under a seccomp filter cannot start threads (a thread it started would inherit its
//! filter, see [`crate::seccomp`]). So each device's thread is made while the VM is built, by the
//! VM's (unfiltered) owner, and parks until the guest's driver activates the device: its job
//! then runs on it (the device's setup, then its filter, then serving). A device serves once: a
//! driver's reset ends its thread, and the device cannot be activated again (as in Firecracker;
//! Linux resets an activated virtio device only when its driver goes, which Husk guests never do).

use std::io;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

/// What a device's thread runs once activated; it gets the eventfd that tells it to stop.
type Job = Box<dyn FnOnce(EventFd) + Send + 'static>;

/// A device's thread, parked until [`DeviceThread::start`] gives it its job. Dropped unstarted, it
/// ends (its job channel closes first, fields drop in order) and is joined.
#[derive(Debug)]
pub struct DeviceThread {
    jobs: SyncSender<Job>,
    /// Its stop eventfd (made here, so the vCPU that activates the device makes no fd) and handle.
    running: RunningDevice,
}

impl DeviceThread {
    /// Starts the thread named `name` (its `comm`), parked.
    pub fn spawn(name: &str) -> io::Result<DeviceThread> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_seen = stop.try_clone()?;
        let (jobs, job) = sync_channel::<Job>(1);
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            mask_process_signals();
            if let Ok(job) = job.recv() {
                job(stop_seen);
            }
        })?;
        Ok(DeviceThread { jobs, running: RunningDevice { stop, thread: Some(thread) } })
    }

    /// Runs `setup` on the thread (given the stop eventfd, to watch), then `run` with what it
    /// made; returns once `setup` is done, with its error if it failed (the thread has then ended).
    /// Device threads open their files and sockets this way before their seccomp filter goes on,
    /// and a failure still reaches the driver's activation.
    pub fn start<T: 'static>(
        self,
        setup: impl FnOnce(EventFd) -> io::Result<T> + Send + 'static,
        run: impl FnOnce(T) + Send + 'static,
    ) -> io::Result<RunningDevice> {
        let gone = || io::Error::other("the device's thread has ended");
        let DeviceThread { jobs, running } = self;
        let (ready, set_up) = sync_channel::<io::Result<()>>(1);
        let job: Job = Box::new(move |stop_seen| match setup(stop_seen) {
            Ok(made) => {
                let _ = ready.send(Ok(()));
                run(made);
            }
            Err(err) => {
                let _ = ready.send(Err(err));
            }
        });
        let outcome = match jobs.send(job) {
            Ok(()) => set_up.recv().unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(gone()),
        };
        outcome.map(|()| running) // a failed setup's thread is joined as `running` drops
    }
}

/// A device's thread serving its job; dropping it tells the job to stop and joins the thread.
#[derive(Debug)]
pub struct RunningDevice {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RunningDevice {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc::channel;

    #[test]
    fn a_started_thread_runs_setup_then_its_job_under_its_own_name_until_told_to_stop() {
        let thread = DeviceThread::spawn("named-by-test").unwrap();
        let (tx, rx) = channel();
        let running = thread
            .start(
                |stop: EventFd| Ok((std::thread::current().name().map(str::to_owned), stop)),
                move |(name, stop)| {
                    let _ = tx.send(name);
                    // Serves until stopped: waits on its stop eventfd.
                    let mut poll = libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    unsafe { libc::poll(&mut poll, 1, 10_000) };
                },
            )
            .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("named-by-test"));
        drop(running); // stops and joins; would wait 10 s if the stop were not seen
    }

    #[test]
    fn a_failed_setup_is_returned_and_run_never_starts() {
        let (tx, rx) = channel();
        let failed = DeviceThread::spawn("setup-fails").unwrap().start(
            |_| Err::<(), _>(io::Error::other("no")),
            move |()| {
                let _ = tx.send(());
            },
        );
        assert_eq!(failed.err().map(|e| e.to_string()).as_deref(), Some("no"));
        assert!(rx.recv().is_err(), "run was dropped unstarted");
    }

    #[test]
    fn a_thread_never_started_ends_when_dropped() {
        drop(DeviceThread::spawn("never-started").unwrap()); // joins: would hang if it stayed parked
    }
}
