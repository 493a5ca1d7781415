//! OOM events: a thread follows the OOM-kill counter of every container's cgroup and queues the
//! container's id each time it grows; GetOOMEvent takes them one at a time.

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
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

impl OomWatcher {
    /// Starts the watching thread.
    pub fn start() -> std::io::Result<OomWatcher> {
        let watched: Watched = Arc::default();
        let (sender, events) = mpsc::unbounded_channel();
        let shared = Arc::clone(&watched);
        std::thread::Builder::new().name("agent-oom".into()).spawn(move || loop {
            std::thread::sleep(POLL_INTERVAL);
            let mut watched = shared.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, (cgroup, seen)) in watched.iter_mut() {
                let kills = cgroup.oom_kills();
                if kills > *seen {
                    *seen = kills;
                    if sender.send(id.clone()).is_err() {
                        return;
                    }
                }
            }
        })?;
        Ok(OomWatcher { watched, events: tokio::sync::Mutex::new(events) })
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Cgroup, u64)>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows container `id`'s cgroup from its current count on.
    pub fn watch(&self, id: &str, cgroup: Cgroup) {
        let seen = cgroup.oom_kills();
        self.watched().insert(id.to_owned(), (cgroup, seen));
    }

    /// Stops following container `id` (it was removed).
    pub fn forget(&self, id: &str) {
        self.watched().remove(id);
    }

    /// The next container that had a process OOM-killed.
    pub async fn next(&self) -> Option<String> {
        self.events.lock().await.recv().await
    }
}
