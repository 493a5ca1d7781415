//! The agent's one reaper. Every child of the agent (and, as PID 1 or a subreaper, every orphan
//! handed to it, such as a container's init once its runtime helper exits) is collected here with
//! `waitpid(-1)` on SIGCHLD, and its exit status goes to whoever watches that pid.
//!
//! Nothing else in the agent may wait for a child: a second waiter would steal statuses. std's
//! `Command::spawn` itself waits for a child whose `exec` failed, so spawning goes through
//! [`Reaper::spawn`], which keeps reaping off while it runs.

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::SystemTime;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// Exits of pids nobody watched yet, kept for a later [`Reaper::watch`] (a container's init can
/// end before its creator learns its pid). Bounded: orphans nobody asks about are forgotten.
const UNCLAIMED_LIMIT: usize = 1024;

/// How and when a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// As a shell reports it: the exit code, or 128 + the signal number.
    pub status: i32,
    pub at: SystemTime,
}

/// Receives a process's [`Exit`] once it ended (`None` until then).
pub type ExitWatch = watch::Receiver<Option<Exit>>;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Reaper {
    /// Held shared while a child is spawned, exclusively while reaping.
    spawning: RwLock<()>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    watched: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: VecDeque<(i32, Exit)>,
}

impl Reaper {
    /// The agent's reaper.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(Reaper::default)
    }

    /// Spawns `command` and watches the child.
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<(Child, ExitWatch)> {
        let _spawning = self.spawning.read().unwrap_or_else(PoisonError::into_inner);
        let child = command.spawn()?;
        let watch = self.watch(child.id() as i32);
        Ok((child, watch))
    }

    /// Watches `pid`, a process that will be (or already was) reaped here.
    pub fn watch(&self, pid: i32) -> ExitWatch {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = state.watched.get(&pid) {
            return sender.subscribe();
        }
        let exited = state.unclaimed.iter().position(|(p, _)| *p == pid);
        let exit = exited.and_then(|index| state.unclaimed.remove(index)).map(|(_, exit)| exit);
        let (sender, receiver) = watch::channel(exit);
        if exit.is_none() {
            state.watched.insert(pid, sender);
        }
        receiver
    }

    /// Collects every child that ended (call on SIGCHLD).
    pub fn reap(&self) {
        let _reaping = self.spawning.write().unwrap_or_else(PoisonError::into_inner);
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, 128 + signal as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            self.record(pid.as_raw(), Exit { status, at: SystemTime::now() });
        }
    }

    fn record(&self, pid: i32, exit: Exit) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.watched.remove(&pid) {
            Some(sender) => {
                let _ = sender.send(Some(exit));
            }
            None => {
                if state.unclaimed.len() == UNCLAIMED_LIMIT {
                    state.unclaimed.pop_front();
                }
                state.unclaimed.push_back((pid, exit));
            }
        }
    }
}

/// Waits until the watched process ended.
pub async fn exited(mut watch: ExitWatch) -> Option<Exit> {
    let exit = watch.wait_for(Option::is_some).await.ok()?;
    *exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_reaches_a_watcher_registered_before_or_after_it() {
        let reaper = Reaper::default();
        let early = reaper.watch(100);
        reaper.record(100, Exit { status: 3, at: SystemTime::UNIX_EPOCH });
        assert_eq!(early.borrow().map(|e| e.status), Some(3));
        reaper.record(200, Exit { status: 137, at: SystemTime::UNIX_EPOCH });
        assert_eq!(reaper.watch(200).borrow().map(|e| e.status), Some(137));
        assert!(reaper.watch(300).borrow().is_none(), "a live pid has no exit yet");
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let reaper = Reaper::default();
        for pid in 0..(UNCLAIMED_LIMIT as i32 + 10) {
            reaper.record(pid, Exit { status: 0, at: SystemTime::UNIX_EPOCH });
        }
        assert!(reaper.watch(0).borrow().is_none(), "the oldest was forgotten");
        assert!(reaper.watch(UNCLAIMED_LIMIT as i32 + 9).borrow().is_some());
    }
}
