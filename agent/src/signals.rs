//! Signals: the agent blocks the ones it handles in every thread and takes them synchronously in
//! its main thread (reaping on SIGCHLD, stopping on SIGTERM, SIGINT and SIGPWR). Children must not
//! inherit that mask: see [`with_no_signals_blocked`].

use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};

use crate::reaper::Reaper;

/// The signals the main thread waits for.
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR] {
        set.add(signal);
    }
    set
}

/// Blocks the handled signals in the calling thread and the threads it starts afterwards. Call
/// first, before any thread or child exists.
pub fn block() -> Result<()> {
    handled().thread_block().context("blocking signals")
}

/// Serves signals in the calling thread: reaps on SIGCHLD, calls `stop` on the others (it is
/// expected not to return).
pub fn serve(stop: impl Fn(Signal)) -> Result<Infallible> {
    let signals = handled();
    loop {
        match signals.wait().context("waiting for signals")? {
            Signal::SIGCHLD => Reaper::global().reap(),
            other => stop(other),
        }
    }
}

/// Makes `command`'s process start with an empty signal mask. A blocked mask survives fork and
/// exec: a child would never see SIGCHLD or SIGTERM (a shell's `wait` then sleeps forever next to
/// its exited child).
pub fn with_no_signals_blocked(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only calls sigprocmask, which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(std::io::Error::from)
        })
    }
}
