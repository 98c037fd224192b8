//! The guard: a small process that ends a node's handler processes when the node dies
//! without cleaning up (`kill -9`, a crash, the OOM killer).
//!
//! `serve` (and `run` with shell handlers) starts `p2p-node __guard TOKEN GRACE_MS` with a
//! pipe as its standard input and keeps the pipe's other end, which no handler inherits
//! (close-on-exec). The guard waits for the pipe to close, which happens however the node
//! ends. Then every process on the machine whose environment carries the node's mark
//! (`P2P_TASK_SCOPE=TOKEN.N`, see [`p2p_tasks::handler::procs`]) gets `SIGTERM`, and
//! `SIGKILL` after the grace; then the guard exits. After a clean stop there is nothing
//! left to end. The guard has its own process group and ignores SIGINT, SIGTERM and
//! SIGHUP, so the signals that stop the node (a terminal's Ctrl-C included) do not stop it.
//!
//! What it cannot do: end a process that removed the mark from its environment, or one it
//! may not read (another user's, a non-dumpable one); and nothing ends the handlers when
//! the guard is killed together with the node (e.g. `kill -9` of both).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use p2p_tasks::handler::procs;

/// The hidden subcommand that runs the guard.
pub const SUBCOMMAND: &str = "__guard";

/// A started guard: keep it for as long as the node runs.
#[derive(Debug)]
pub struct Guard {
    _child: Child,
    _pipe: ChildStdin,
}

/// Starts the guard of this process's handlers, with `grace` between SIGTERM and SIGKILL.
/// `None` (with a warning in the log) when it cannot be started.
pub fn start(grace: Duration) -> Option<Guard> {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the guard process: if this node is killed, its handlers' processes may outlive it");
            return None;
        }
    };
    let spawned = Command::new(exe)
        .arg(SUBCOMMAND)
        .arg(procs::token())
        .arg(
            u64::try_from(grace.as_millis())
                .unwrap_or(u64::MAX)
                .to_string(),
        )
        .env_remove(procs::SCOPE_VAR)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        Ok(mut child) => {
            procs::exempt(child.id());
            let pipe = child.stdin.take()?;
            Some(Guard {
                _child: child,
                _pipe: pipe,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the guard process: if this node is killed, its handlers' processes may outlive it");
            None
        }
    }
}

/// The guard process itself (`p2p-node __guard TOKEN GRACE_MS`): returns its exit status.
pub fn main(args: &[String]) -> u8 {
    let (Some(token), Some(grace)) = (args.first(), args.get(1)) else {
        return 2;
    };
    let Ok(grace_ms) = grace.parse::<u64>() else {
        return 2;
    };
    if token.is_empty() {
        return 2;
    }
    // The signals that stop the node do not stop the guard: they stay blocked (pending).
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        set.add(sig);
    }
    let _ = set.thread_block();
    // Wait for the node to end: its end of the pipe closes however it exits.
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    end_marked(token, Duration::from_millis(grace_ms));
    0
}

/// SIGTERM to every process marked with `token`, SIGKILL after `grace` to those left.
fn end_marked(token: &str, grace: Duration) {
    let deadline = procs::after(Instant::now(), grace);
    let mut termed = std::collections::HashSet::new();
    // Bounded: the grace, then a few rounds of SIGKILL for processes still forking.
    let mut kill_rounds = 0;
    loop {
        let left = procs::marked_by(token);
        if left.is_empty() || kill_rounds >= 20 {
            return;
        }
        let now = Instant::now();
        for pid in left {
            let p = Pid::from_raw(pid);
            if now >= deadline {
                let _ = kill(p, Signal::SIGKILL);
            } else if termed.insert(pid) {
                let _ = kill(p, Signal::SIGTERM);
            }
        }
        if now >= deadline {
            kill_rounds += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
