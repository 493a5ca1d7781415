//! OOM events: a thread follows the OOM-kill counter of every container's cgroup and queues the
//! container's id each time it grows; GetOOMEvent takes them one at a time.
//!
//! The poll alone would race the exit: an OOM-killed init is reaped, its exit reported and its
//! container removed (`ctr run --rm`) well inside one poll interval. So a process's exit and a
//! container's removal read the counter first ([`OomWatcher::check`], [`OomWatcher::forget`]):
//! the event is queued before the exit it caused is reported.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use super::cgroup::Cgroup;

/// How often the counters are read: cheap (one small file per container) and well inside the
/// time a shim takes to report the exit that usually follows.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

type Watched = Arc<Mutex<HashMap<String, (Cgroup, u64)>>>;

/// See the module documentation.
#[derive(Debug)]
pub struct OomWatcher {
    watched: Watched,
    sender: mpsc::UnboundedSender<String>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

impl OomWatcher {
    /// Starts the watching thread.
    pub fn start() -> std::io::Result<OomWatcher> {
        let watched: Watched = Arc::default();
        let (sender, events) = mpsc::unbounded_channel();
        let shared = Arc::clone(&watched);
        let poller = sender.clone();
        std::thread::Builder::new().name("agent-oom".into()).spawn(move || loop {
            std::thread::sleep(POLL_INTERVAL);
            let mut watched = shared.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, entry) in watched.iter_mut() {
                if !queue_new_kills(&poller, id, entry) {
                    return;
                }
            }
        })?;
        Ok(OomWatcher { watched, sender, events: tokio::sync::Mutex::new(events) })
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Cgroup, u64)>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows container `id`'s cgroup from its current count on.
    pub fn watch(&self, id: &str, cgroup: Cgroup) {
        let seen = cgroup.oom_kills();
        self.watched().insert(id.to_owned(), (cgroup, seen));
    }

    /// Queues container `id`'s OOM kills not yet reported (before its process's exit is).
    pub fn check(&self, id: &str) {
        if let Some(entry) = self.watched().get_mut(id) {
            queue_new_kills(&self.sender, id, entry);
        }
    }

    /// Stops following container `id` (it was removed), after queueing its last kills.
    pub fn forget(&self, id: &str) {
        if let Some(mut entry) = self.watched().remove(id) {
            queue_new_kills(&self.sender, id, &mut entry);
        }
    }

    /// The next container that had a process OOM-killed.
    pub async fn next(&self) -> Option<String> {
        self.events.lock().await.recv().await
    }
}

/// Queues `id` once if its cgroup's kill counter grew past `seen` (and records the new count);
/// false once nobody takes events any more.
fn queue_new_kills(
    sender: &mpsc::UnboundedSender<String>,
    id: &str,
    (cgroup, seen): &mut (Cgroup, u64),
) -> bool {
    let kills = cgroup.oom_kills();
    if kills <= *seen {
        return true;
    }
    *seen = kills;
    sender.send(id.to_owned()).is_ok()
}
