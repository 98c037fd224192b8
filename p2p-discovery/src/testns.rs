//! Runs one unit test inside a fresh network namespace of its own (tests only).
//!
//! The `mdns` backend's daemon joins the mDNS group on every interface when it starts (see
//! [`crate::mdns`]), so its tests never run in the machine's own namespace: a test calls
//! [`inside`] with its own name; in a normal run that makes a namespace `p2pd-PID-N` with only
//! `lo` (up), runs this test binary inside it (`ip netns exec`) with just that test, waits for
//! it (bounded; killed by PID after [`LIMIT`]), deletes the namespace (also when this panics)
//! and returns `false`; inside the namespace it returns `true` and the test does its work.
//! Where namespaces cannot be made (not root, no `ip`), it prints why and returns `false`:
//! the test is skipped (with `P2P_REQUIRE_NETNS=1`, as `.ci/run` sets, it fails). A namespace left by a killed test run (its PID is gone) is deleted by
//! the next [`inside`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Set (to the test's name) in the re-executed test binary.
const ENV: &str = "P2P_DISCOVERY_NETNS_TEST";

/// The longest a test may run inside its namespace.
pub(crate) const LIMIT: Duration = Duration::from_secs(120);

/// The prefix of the namespaces made here (`p2pd-PID-N`).
const PREFIX: &str = "p2pd-";

/// Deletes namespaces of this module whose test process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let pid = ns
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("testns: deleting stale namespace {ns} (process {pid} is gone)");
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
}

/// Deletes the namespace on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.0]) {
            eprintln!("testns: cannot delete namespace {}: {e}", self.0);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the caller (the test `name`, its full path without the crate, e.g.
/// `mdns::tests::finds_a_peer`) runs inside its namespace now. See the module docs.
pub(crate) fn inside(name: &str) -> bool {
    if std::env::var(ENV).is_ok_and(|n| n == name) {
        return true;
    }
    sweep_stale();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ns = format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    if let Err(why) = ip(&["netns", "add", &ns]) {
        let why =
            format!("cannot create a network namespace (root and iproute2 are needed): {why}");
        // `.ci/run` sets P2P_REQUIRE_NETNS=1 so that CI never passes on tests that did not run.
        if std::env::var("P2P_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
            panic!("P2P_REQUIRE_NETNS=1 and {name} cannot run: {why}");
        }
        eprintln!("skipping {name}: {why}");
        return false;
    }
    let guard = Netns(ns);
    ip(&["-n", &guard.0, "link", "set", "lo", "up"]).expect("set lo up in the namespace");
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &guard.0])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(ENV, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the test inside its namespace");
    let read = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the test") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            // `ip netns exec` execs the test binary: this PID is the test's.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let Some(status) = status else {
        panic!("{name} still ran in its namespace after {LIMIT:?}\n{out}\n{err}");
    };
    assert!(
        status.success() && out.contains("1 passed"),
        "{name} failed in its namespace ({status})\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    drop(guard);
    false
}
