//! Which processes belong to which shell-handler attempt, and ending them with the attempt.
//!
//! A handler's command may start processes that leave its process group (`setsid cmd &`,
//! a double fork); a process group kill misses those. So:
//!
//! - The serving process becomes a **child subreaper** (`PR_SET_CHILD_SUBREAPER`) the first
//!   time a shell handler runs: a process whose parent dies is re-parented to it instead of
//!   to init, so nothing a handler starts can leave the node's process tree.
//! - Every attempt's shell gets [`SCOPE_VAR`]`=TOKEN.N` in its environment (the node's
//!   random token and the attempt's number), which its descendants inherit.
//! - When an attempt ends (its shell exits, or it is cancelled or times out), its process
//!   group gets `SIGTERM`, and a **sweep** looks at the node's process tree: every process
//!   outside the live attempts' shells (re-parented orphans and their descendants) whose
//!   environment names an attempt that has ended, or whose process group is an ended
//!   attempt's, gets `SIGTERM`, and `SIGKILL` once the attempt's kill grace has passed. The
//!   sweep also reaps the orphans that exited (they are the node's children now); while
//!   attempts run, a sweep runs at least every [`LIVE_SWEEP`] for that.
//! - [`stop_all`], when the node stops, ends every descendant the same way.
//!
//! Not covered: a process that removes the variable from its environment *and* leaves the
//! process group survives its attempt (it still cannot leave the node's tree, so
//! [`stop_all`] ends it with the node). A sweep runs at most every [`SWEEP_INTERVAL`] and
//! reads `/proc/*/stat` (and the environment of orphans only), so the common case (a task
//! that leaves nothing behind) costs one `kill(pgid, 0)` and a wake-up of the sweeper.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// The environment variable that marks a process as started by an attempt.
pub const SCOPE_VAR: &str = "P2P_TASK_SCOPE";

/// The shortest time between two sweeps.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// While attempts run, the longest time between two sweeps (which reap exited orphans).
pub const LIVE_SWEEP: Duration = Duration::from_secs(5);

/// How long an ended attempt's process group is remembered (for processes without the mark).
const ENDED_MEMORY: Duration = Duration::from_secs(60);

/// One process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    zombie: bool,
    /// Start time in clock ticks since boot: with the pid, it names one process.
    start: u64,
}

/// An attempt that has ended.
#[derive(Debug, Clone, Copy)]
struct Ended {
    pgid: i32,
    grace: Duration,
    at: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    /// Running attempts: number -> the shell's pid.
    live: HashMap<u64, i32>,
    /// Shells whose exit status the async runtime will collect: never reaped here.
    owned: HashSet<i32>,
    ended: HashMap<u64, Ended>,
    /// Processes sent SIGTERM: (pid, start) -> when SIGKILL is due.
    doomed: HashMap<(i32, u64), Instant>,
    /// Children that are not handlers' (e.g. the node's guard process).
    exempt: HashSet<i32>,
    subreaper: bool,
    sweeper: bool,
    /// A sweep is wanted.
    requested: bool,
}

struct Shared {
    token: String,
    reg: Mutex<Registry>,
    wake: Condvar,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        token: format!("{:x}{:016x}", std::process::id(), rand_u64()),
        reg: Mutex::new(Registry::default()),
        wake: Condvar::new(),
    })
}

fn lock() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    shared().reg.lock().unwrap_or_else(|e| e.into_inner())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// This process's token: the value of [`SCOPE_VAR`] of every attempt starts with it and a dot.
pub fn token() -> &'static str {
    &shared().token
}

/// Makes this process a child subreaper (once). Returns whether it is one.
pub fn become_subreaper() -> bool {
    let mut reg = lock();
    if !reg.subreaper {
        match nix::sys::prctl::set_child_subreaper(true) {
            Ok(()) => reg.subreaper = true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot become a child subreaper: processes a handler detaches may outlive their task")
            }
        }
    }
    reg.subreaper
}

/// Never signals or reaps `pid` (a child that is not a handler's, such as a guard process).
pub fn exempt(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        lock().exempt.insert(pid);
    }
}

/// A running attempt's registration; see [`spawn`].
#[derive(Debug)]
pub(crate) struct Scope {
    pub(crate) id: u64,
    pub(crate) pgid: i32,
    grace: Duration,
    ended: bool,
}

/// Spawns `cmd` (already set up with its own process group) as a new attempt: sets
/// [`SCOPE_VAR`] and registers the shell, atomically with respect to sweeps.
pub(crate) fn spawn(
    cmd: &mut tokio::process::Command,
    grace: Duration,
) -> std::io::Result<(tokio::process::Child, Scope)> {
    become_subreaper();
    ensure_sweeper();
    let mut reg = lock();
    reg.next += 1;
    let id = reg.next;
    cmd.env(SCOPE_VAR, format!("{}.{id}", token()));
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| std::io::Error::other("the process has no id"))?;
    reg.live.insert(id, pid);
    reg.owned.insert(pid);
    Ok((
        child,
        Scope {
            id,
            pgid: pid,
            grace,
            ended: false,
        },
    ))
}

impl Scope {
    /// The attempt is over (its shell exited and was reaped when `reaped`): its group gets
    /// `SIGTERM` now and what is left of it is swept. Idempotent.
    pub(crate) fn end(&mut self, reaped: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        {
            let mut reg = lock();
            reg.live.remove(&self.id);
            if reaped {
                reg.owned.remove(&self.pgid);
            }
            reg.ended.insert(
                self.id,
                Ended {
                    pgid: self.pgid,
                    grace: self.grace,
                    at: Instant::now(),
                },
            );
            // While the registry is locked no new shell can take this group id; a group
            // that is already empty is left alone.
            let owned_by_other = reg.live.values().any(|&p| p == self.pgid);
            if !owned_by_other && killpg(Pid::from_raw(self.pgid), None).is_ok() {
                let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGTERM);
            }
            reg.requested = true;
        }
        shared().wake.notify_one();
    }

    /// The shell of an attempt that ended before it was reaped has now been reaped.
    pub(crate) fn reaped(pid: i32) {
        lock().owned.remove(&pid);
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.end(false);
    }
}

/// Starts the sweeper thread (once). A thread of its own, not a task, so that it works
/// whatever runtime (or none) runs the handlers, and its reads of `/proc` never hold up one.
fn ensure_sweeper() {
    {
        let mut reg = lock();
        if reg.sweeper {
            return;
        }
        reg.sweeper = true;
    }
    let started = std::thread::Builder::new()
        .name("p2p-sweeper".into())
        .spawn(sweeper);
    if let Err(e) = started {
        lock().sweeper = false;
        tracing::warn!(error = %e, "cannot start the process sweeper: processes a handler detaches may outlive their task");
    }
}

fn sweeper() {
    let mut last: Option<Instant> = None;
    loop {
        {
            let mut reg = lock();
            loop {
                let now = Instant::now();
                if reg.requested {
                    break;
                }
                // While attempts run, a sweep at least every LIVE_SWEEP reaps the orphans
                // that exited meanwhile.
                let idle = (!reg.live.is_empty()).then(|| now + LIVE_SWEEP);
                let next = reg.doomed.values().copied().chain(idle).min();
                match next {
                    Some(at) if at <= now => break,
                    Some(at) => {
                        let (r, timeout) = shared()
                            .wake
                            .wait_timeout(reg, at - now)
                            .unwrap_or_else(|e| e.into_inner());
                        reg = r;
                        if timeout.timed_out() && idle == Some(at) {
                            break;
                        }
                    }
                    None => {
                        reg = shared().wake.wait(reg).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            reg.requested = false;
        }
        if let Some(since) = last.map(|l| l.elapsed()) {
            if since < SWEEP_INTERVAL {
                std::thread::sleep(SWEEP_INTERVAL - since);
            }
        }
        last = Some(Instant::now());
        sweep(Instant::now());
    }
}

/// Every process, from `/proc`.
fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(p) = read_stat(pid) {
            out.push(p);
        }
    }
    out
}

fn read_stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

/// Parses `/proc/PID/stat`: the name in parentheses may hold spaces and parentheses.
fn parse_stat(pid: i32, text: &str) -> Option<Proc> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name: state(0) ppid(1) pgrp(2) ... starttime(19).
    Some(Proc {
        pid,
        zombie: matches!(f.first()?.as_bytes().first(), Some(b'Z' | b'X')),
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// The attempt number in `pid`'s [`SCOPE_VAR`], when it names an attempt of this process.
fn scope_of(pid: i32) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    parse_scope(&env, token())
}

fn parse_scope(environ: &[u8], token: &str) -> Option<u64> {
    let prefix = format!("{SCOPE_VAR}={token}.");
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
}

/// Whether a process, seen now, is past its end: what to do with it.
fn doom(reg: &mut Registry, p: &Proc, grace: Duration, now: Instant) -> Option<Instant> {
    let key = (p.pid, p.start);
    let pid = Pid::from_raw(p.pid);
    match reg.doomed.get(&key) {
        None => {
            let _ = kill(pid, Signal::SIGTERM);
            let due = after(now, grace);
            reg.doomed.insert(key, due);
            Some(due)
        }
        Some(&due) if now >= due => {
            let _ = kill(pid, Signal::SIGKILL);
            Some(due)
        }
        Some(&due) => Some(due),
    }
}

/// One sweep (see the module docs).
fn sweep(now: Instant) {
    let procs = scan();
    let me = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
    }
    let mut reg = lock();
    reg.ended
        .retain(|_, e| now.duration_since(e.at) < ENDED_MEMORY);
    let live_shells: HashSet<i32> = reg.live.values().copied().collect();
    let ended_groups: HashMap<i32, Duration> = reg
        .ended
        .values()
        .filter(|e| !live_shells.contains(&e.pgid))
        .map(|e| (e.pgid, e.grace))
        .collect();
    let mut seen = HashSet::new();
    let mut stack: Vec<usize> = Vec::new();
    for &i in children.get(&me).map_or(&[][..], Vec::as_slice) {
        let root = procs[i];
        if live_shells.contains(&root.pid) || reg.exempt.contains(&root.pid) {
            continue;
        }
        if root.zombie && !reg.owned.contains(&root.pid) {
            let _ = waitpid(Pid::from_raw(root.pid), Some(WaitPidFlag::WNOHANG));
            continue;
        }
        stack.push(i);
    }
    while let Some(i) = stack.pop() {
        let p = procs[i];
        if let Some(kids) = children.get(&p.pid) {
            stack.extend(kids.iter().copied());
        }
        if p.zombie {
            continue;
        }
        let grace = match scope_of(p.pid) {
            Some(n) if reg.live.contains_key(&n) => continue,
            Some(n) => reg.ended.get(&n).map_or(Duration::ZERO, |e| e.grace),
            None => match ended_groups.get(&p.pgrp) {
                Some(&g) => g,
                None => continue,
            },
        };
        seen.insert((p.pid, p.start));
        doom(&mut reg, &p, grace, now);
    }
    reg.doomed.retain(|k, _| seen.contains(k));
}

/// Ends every descendant of this process (but the [exempt] ones): `SIGTERM`, then
/// `SIGKILL` to what is left after `grace`. For a node that stops. Returns how many
/// processes it signalled.
pub async fn stop_all(grace: Duration) -> usize {
    let deadline = after(Instant::now(), grace);
    let mut signalled: HashSet<(i32, u64)> = HashSet::new();
    loop {
        let left = descendants();
        let now = Instant::now();
        if left.is_empty() {
            break;
        }
        let sig = if now >= deadline {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        for p in &left {
            if sig == Signal::SIGKILL || signalled.insert((p.pid, p.start)) {
                let _ = kill(Pid::from_raw(p.pid), sig);
            }
        }
        signalled.extend(left.iter().map(|p| (p.pid, p.start)));
        if sig == Signal::SIGKILL && now >= after(deadline, Duration::from_secs(2)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signalled.len()
}

/// The live (not zombie) descendants of this process, but the exempt ones and theirs;
/// reaps zombie children that nobody else waits for.
fn descendants() -> Vec<Proc> {
    let procs = scan();
    let me = std::process::id() as i32;
    let reg = lock();
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
    }
    let mut out = Vec::new();
    let mut stack: Vec<usize> = children.get(&me).cloned().unwrap_or_default();
    while let Some(i) = stack.pop() {
        let p = procs[i];
        if reg.exempt.contains(&p.pid) {
            continue;
        }
        if let Some(kids) = children.get(&p.pid) {
            stack.extend(kids.iter().copied());
        }
        if p.zombie {
            if p.ppid == me && !reg.owned.contains(&p.pid) {
                let _ = waitpid(Pid::from_raw(p.pid), Some(WaitPidFlag::WNOHANG));
            }
            continue;
        }
        out.push(p);
    }
    out
}

/// The processes anywhere on the machine marked with `token` (see [`SCOPE_VAR`]): what a
/// guard process ends when its node is gone. Processes it cannot read are skipped.
pub fn marked_by(token: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    scan()
        .into_iter()
        .filter(|p| !p.zombie && p.pid != me)
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .ok()
                .and_then(|env| parse_scope(&env, token))
                .is_some()
        })
        .map(|p| p.pid)
        .collect()
}

/// `at + d`, or a year after `at` when that is not representable (a huge grace).
pub fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(at)
}

/// Whether `pid` exists and has not exited (a zombie has).
pub fn alive(pid: i32) -> bool {
    match read_stat(pid) {
        Some(p) => !p.zombie,
        None => !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn stat_with_a_hostile_name() {
        let line = "4242 (a) b) (Z)) R 17 4242 4242 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 \
                    777 0 0";
        let p = parse_stat(4242, line).unwrap();
        assert_eq!((p.ppid, p.pgrp, p.start, p.zombie), (17, 4242, 777, false));
        let z = parse_stat(5, "5 (sh) Z 1 5 5 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0").unwrap();
        assert!(z.zombie);
        assert!(parse_stat(5, "5 (sh").is_none());
    }

    #[test]
    fn scope_names_only_this_token() {
        let env = b"HOME=/root\0P2P_TASK_SCOPE=abc.17\0X=1\0";
        assert_eq!(parse_scope(env, "abc"), Some(17));
        assert_eq!(parse_scope(env, "ab"), None);
        assert_eq!(parse_scope(b"P2P_TASK_SCOPE=abc.\0", "abc"), None);
        assert_eq!(parse_scope(b"XP2P_TASK_SCOPE=abc.1\0", "abc"), None);
        assert_eq!(parse_scope(b"", "abc"), None);
    }

    #[test]
    fn a_huge_grace_does_not_overflow() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now);
        assert_eq!(
            after(now, Duration::from_secs(2)),
            now + Duration::from_secs(2)
        );
    }

    #[test]
    fn this_process_reads_its_own_stat() {
        let me = read_stat(std::process::id() as i32).unwrap();
        assert!(!me.zombie);
        assert!(alive(me.pid));
    }
}
