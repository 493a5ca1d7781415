//! The thread that serves one device: it waits on the device's queue eventfds (written by KVM's
//! ioeventfds when the driver notifies a queue), on the device's own sources (a tap, say) and on a
//! stop eventfd, and hands each event to the device's [`QueueHandler`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::Interrupt;
use crate::seccomp::{self, ThreadRole};
use crate::threads::{DeviceThread, RunningDevice};

/// Device logic run on the worker thread.
pub trait QueueHandler: Send + 'static {
    /// Runs first on the worker thread, before any queue is served and before its seccomp
    /// filter (per-thread setup such as dropping capabilities the device must not have).
    fn on_start(&mut self) {}
    /// Queue `index` was notified by the driver.
    fn process_queue(&mut self, index: usize);
    /// Source `index` of [`Worker::spawn_with_sources`] is ready.
    fn process_source(&mut self, _index: usize) {}
    /// The device's interrupt, raised again by the worker while the driver leaves it
    /// unacknowledged (see [`Interrupt`]).
    fn interrupt(&self) -> Option<&Interrupt> {
        None
    }
}

/// A running worker; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Worker {
    /// Held for its drop (which stops the thread): nothing else to do with it.
    _running: RunningDevice,
}

/// epoll data value of the stop eventfd (queue indices are small).
const STOP_TOKEN: u64 = u64::MAX;
/// epoll data value of the first extra source (queue indices stay below it).
const SOURCE_TOKEN_BASE: u64 = 1 << 32;

/// What a worker serves: the device logic, its queues' eventfds and its other sources (file
/// descriptors with the events to wait for; they must outlive the worker). A ready source goes
/// to [`QueueHandler::process_source`] with its index in `sources`.
#[derive(Debug)]
pub struct Served<H> {
    pub handler: H,
    pub queue_events: Vec<EventFd>,
    pub sources: Vec<(RawFd, EventSet)>,
}

impl Worker {
    /// Starts a thread named `name` serving `queue_events` with `handler` (no seccomp filter; for
    /// tests).
    pub fn spawn<H: QueueHandler>(name: &str, handler: H, queue_events: Vec<EventFd>) -> io::Result<Worker> {
        Worker::spawn_with_sources(name, handler, queue_events, Vec::new())
    }

    /// [`Worker::spawn`], also watching `sources` (see [`Served`]).
    pub fn spawn_with_sources<H: QueueHandler>(
        name: &str,
        handler: H,
        queue_events: Vec<EventFd>,
        sources: Vec<(RawFd, EventSet)>,
    ) -> io::Result<Worker> {
        let thread = DeviceThread::spawn(name)?;
        Worker::start(thread, None, move || Ok(Served { handler, queue_events, sources }))
    }

    /// Gives the device's `thread` (made with the VM) its job: `setup` runs on it first (opening
    /// files and sockets, dropping capabilities), then [`QueueHandler::on_start`], then the thread
    /// installs the seccomp filter of `filter`, if any, and serves. Returns once the thread is
    /// serving, or with the error that stopped it before.
    pub fn start<H, F>(thread: DeviceThread, filter: Option<ThreadRole>, setup: F) -> io::Result<Worker>
    where
        H: QueueHandler,
        F: FnOnce() -> io::Result<Served<H>> + Send + 'static,
    {
        let running = thread.start(
            move |stop_seen| {
                setup().and_then(|served| prepare(served, &stop_seen, filter).map(|p| (p, stop_seen)))
            },
            // The stop eventfd's copy lives as long as the epoll set that watches it.
            |((mut handler, queue_events, epoll), _stop_seen)| serve(&mut handler, &queue_events, &epoll),
        )?;
        Ok(Worker { _running: running })
    }
}

/// On the worker thread, before serving: the epoll set, the handler's own start, the filter.
fn prepare<H: QueueHandler>(
    served: Served<H>,
    stop: &EventFd,
    filter: Option<ThreadRole>,
) -> io::Result<(H, Vec<EventFd>, Epoll)> {
    let Served { mut handler, queue_events, sources } = served;
    let epoll = Epoll::new()?;
    epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
    for (index, event) in queue_events.iter().enumerate() {
        epoll.ctl(ControlOperation::Add, event.as_raw_fd(), EpollEvent::new(EventSet::IN, index as u64))?;
    }
    for (index, (fd, events)) in sources.iter().enumerate() {
        epoll.ctl(ControlOperation::Add, *fd, EpollEvent::new(*events, SOURCE_TOKEN_BASE + index as u64))?;
    }
    handler.on_start();
    if let Some(role) = filter {
        seccomp::apply(role).map_err(io::Error::other)?;
    }
    Ok((handler, queue_events, epoll))
}

/// The worker's loop: hands each ready event to the handler until the stop event, and raises the
/// device's interrupt again while the driver leaves it unacknowledged.
fn serve<H: QueueHandler>(handler: &mut H, queue_events: &[EventFd], epoll: &Epoll) {
    let mut ready = [EpollEvent::default(); 8];
    loop {
        let recheck = handler.interrupt().and_then(Interrupt::recheck_in);
        let count = match epoll.wait(epoll_timeout_ms(recheck), &mut ready) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::error!(%err, "device worker: epoll_wait failed; the device stops");
                return;
            }
        };
        for event in &ready[..count] {
            let token = event.data();
            if token == STOP_TOKEN {
                return;
            }
            if token >= SOURCE_TOKEN_BASE {
                handler.process_source((token - SOURCE_TOKEN_BASE) as usize);
            } else if let Some(queue_event) = queue_events.get(token as usize) {
                // Consume the notification count; the handler drains the whole queue.
                let _ = queue_event.read();
                handler.process_queue(token as usize);
            }
        }
        if let Some(interrupt) = handler.interrupt() {
            interrupt.raise_again_if_unacknowledged();
        }
    }
}

/// `epoll_wait`'s timeout for waiting at most `limit` (-1: no limit), rounded up to whole
/// milliseconds so that a wait less than one away does not spin with timeout 0.
pub fn epoll_timeout_ms(limit: Option<std::time::Duration>) -> i32 {
    limit.map_or(-1, |t| t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};
    use std::sync::Arc;
    use std::time::Duration;

    struct Recorder(Sender<usize>);

    impl QueueHandler for Recorder {
        fn process_queue(&mut self, index: usize) {
            let _ = self.0.send(index);
        }
    }

    /// Raises its interrupt for every notification and never sees it acknowledged.
    struct Raiser(Arc<Interrupt>);

    impl QueueHandler for Raiser {
        fn process_queue(&mut self, _index: usize) {
            self.0.trigger(super::super::INTERRUPT_USED_BUFFER);
        }

        fn interrupt(&self) -> Option<&Interrupt> {
            Some(&self.0)
        }
    }

    #[test]
    fn the_worker_raises_an_interrupt_again_while_the_driver_leaves_it_unacknowledged() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::raised_again_after(irq, Duration::from_millis(20)));
        let events = vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()];
        let notify = events[0].try_clone().unwrap();
        let worker = Worker::spawn("test-raiser", Raiser(interrupt.clone()), events).unwrap();
        notify.write(1).unwrap();
        // With no further event, the worker wakes on its own to raise the line again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while interrupt.raised_again() < 2 {
            assert!(std::time::Instant::now() < deadline, "raised {} times in all", interrupt.raised());
            std::thread::sleep(Duration::from_millis(5));
        }
        interrupt.acknowledge(u32::MAX);
        drop(worker);
        assert_eq!(interrupt.recheck_in(), None);
    }

    #[test]
    fn notifications_reach_the_handler_and_drop_stops_the_thread() {
        let (tx, rx) = channel();
        let events =
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()];
        let second = events[1].try_clone().unwrap();
        let worker = Worker::spawn("test-worker", Recorder(tx), events).unwrap();
        second.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        drop(worker); // joins; would hang here if the stop event were not seen
        assert!(rx.recv_timeout(Duration::from_millis(10)).is_err());
    }
}
