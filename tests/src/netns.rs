//! A LAN of hosts in network namespaces, for tests whose traffic must not touch a real
//! network (UDP multicast and broadcast discovery).
//!
//! # Layout
//!
//! [`Lan::new`]`(n)` builds, with `ip` (iproute2), as root:
//!
//! - a namespace `p2pt-PID-K-br` holding a bridge `br0` (multicast snooping off, so the bridge
//!   floods multicast like a plain switch);
//! - `n` host namespaces `p2pt-PID-K-hI`, each with `lo` up and `eth0`, one end of a veth
//!   pair whose other end (`vI`) is a port of the bridge; host `I` has the address
//!   `10.77.K.(I+1)/24` (broadcast `10.77.K.255`) on `eth0` and a route for `224.0.0.0/4`
//!   there.
//!
//! Every interface and address lives inside these namespaces: the veth pairs are created in
//! the bridge's namespace with their peer placed directly in the host's, so nothing appears
//! in the machine's own namespace, and no traffic can reach a real interface. Dropping the
//! [`Lan`], also while a test panics, deletes all its namespaces (which destroys the veth
//! pairs and the bridge). A namespace left by a killed test run (its PID is gone) is deleted by
//! the next [`Lan::new`].
//!
//! Processes run in a host with [`Host::command`] (`ip netns exec NAME PROGRAM ...`) and
//! [`Host::spawn`], whose [`NsChild`] guard kills the process by its PID and reaps it on drop;
//! [`Host::start`] also collects its output lines ([`NsProcess`]), and [`Host::output`] runs
//! a command to its end under a hang guard. [`Host::p2p_node`] and [`Host::serve`] run the
//! `p2p-node` binary under test.
//!
//! Per-host files under `/etc`: [`Host::etc_file`] writes `/etc/netns/NS/NAME`, which
//! `ip netns exec` bind-mounts over `/etc/NAME` for the host's processes only (e.g. a `hosts`
//! file giving a name several addresses). The directory `/etc/netns/NS` is deleted with the
//! [`Lan`] (also on panic), and by the next [`Lan::new`] when a killed run left it.
//! An [`NsChild`] borrows its [`Host`], so the compiler makes every child end before its
//! [`Lan`] is deleted.
//!
//! Where namespaces cannot be made (not root, no `ip`), [`Lan::new`] prints why and returns
//! `None`: the test then returns early (it is skipped, not failed), unless
//! `P2P_REQUIRE_NETNS=1` (set by `.ci/run`), where it fails.
//!
//! [`helper`]: a test binary can run itself inside a host as a tiny TCP peer (see
//! [`Host::helper`]), for checks that need no other program than the test itself.
//!
//! [`inside`]: a test that needs no LAN, only a namespace of its own with `lo` (p2p-discovery's
//! mDNS tests, whose daemon joins the mDNS group on every interface it sees), runs itself
//! there. One harness serves both: the same names, sweep of stale namespaces and
//! [`REQUIRE_NETNS`] rule.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::ChildGuard;

/// The prefix of every namespace this harness makes.
pub const PREFIX: &str = "p2pt-";

/// The name of the interface of each host.
pub const HOST_IF: &str = "eth0";

/// Most hosts on one LAN (one /24).
pub const MAX_HOSTS: usize = 250;

/// How long the LAN's links may take to come up (a hang guard only).
const LINK_WAIT: Duration = Duration::from_secs(10);

/// The environment variable that turns a test binary into a [`helper`].
pub const HELPER_ENV: &str = "P2P_NETNS_HELPER";

/// Set (to the test's name) in a test binary that [`inside`] re-runs in its namespace.
const INSIDE_ENV: &str = "P2P_NETNS_TEST";

/// The longest a test may run inside its [`inside`] namespace.
pub const INSIDE_LIMIT: Duration = Duration::from_secs(120);

/// One host of a [`Lan`].
#[derive(Debug)]
pub struct Host {
    ns: String,
    addr: Ipv4Addr,
    index: usize,
}

impl Host {
    /// Its network namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Its address on the LAN (on [`HOST_IF`]).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Its position in [`Lan::hosts`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// `ip netns exec NS PROGRAM`: add arguments, then [`Host::spawn`] or [`Host::output`] it.
    /// Standard input is closed; standard output and error are piped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .arg(program)
            .env("P2P_DATA_DIR", crate::data_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Starts `cmd` (made by [`Host::command`]); the guard kills it by PID on drop.
    /// `ip netns exec` replaces itself with the program, so the PID is the program's.
    pub fn spawn(&self, cmd: &mut Command) -> NsChild<'_> {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in {}: {e}", self.ns));
        NsChild {
            guard: ChildGuard::new(child),
            _host: PhantomData,
        }
    }

    /// Starts `cmd` (made by [`Host::command`]) and collects its output lines.
    pub fn start(&self, cmd: &mut Command) -> NsProcess<'_> {
        let mut child = self.spawn(cmd);
        let stdout = Collected::default();
        let stderr = Collected::default();
        let mut readers = Vec::new();
        if let Some(out) = child.child_mut().stdout.take() {
            readers.push(stdout.collect(out));
        }
        if let Some(err) = child.child_mut().stderr.take() {
            readers.push(stderr.collect(err));
        }
        NsProcess {
            readers,
            child,
            stdout,
            stderr,
        }
    }

    /// Runs `cmd` (made by [`Host::command`]) to its end, at most `limit` (then it is killed
    /// and this panics).
    pub fn output(&self, cmd: &mut Command, limit: Duration) -> Output {
        let mut child = self.spawn(cmd);
        let out = child.child_mut().stdout.take();
        let err = child.child_mut().stderr.take();
        // Read the pipes on threads so a chatty child cannot block on a full pipe.
        let read = |p: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = p {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out_t = read(out.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err_t = read(err.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let Some(status) = child.wait_timeout(limit) else {
            child.kill();
            panic!("{cmd:?} in {} still ran after {limit:?}", self.ns);
        };
        Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        }
    }

    /// `p2p-node` (the binary under test, [`crate::bin`]) in this host, with `RUST_LOG`
    /// removed and `NO_COLOR=1`: add the subcommand and its arguments.
    pub fn p2p_node(&self) -> Command {
        let mut c = self.command(crate::bin());
        c.env_remove("RUST_LOG").env("NO_COLOR", "1");
        c
    }

    /// Starts `p2p-node serve ARGS` in this host and waits (at most
    /// [`crate::START_TIMEOUT`]) until it prints `listening on ADDR`; panics, showing its
    /// output, if it does not. Give it a `--listen` and a `--discovery` of this LAN.
    pub fn serve(&self, args: &[&str]) -> NsProcess<'_> {
        let mut cmd = self.p2p_node();
        cmd.arg("serve").args(args);
        let mut p = self.start(&mut cmd);
        let started = p
            .stdout
            .wait_for(crate::START_TIMEOUT, |l| l.contains("listening on"))
            .is_some();
        if !started {
            p.signal("KILL");
            panic!(
                "p2p-node serve {args:?} did not start in {}\n{}",
                self.ns,
                p.describe()
            );
        }
        p
    }

    /// Writes `contents` to `/etc/netns/NS/name`, which `ip netns exec` bind-mounts over
    /// `/etc/name` for the processes started in this host afterwards (e.g. `hosts`). Deleted
    /// with the [`Lan`]. `name` is a plain file name (no `/`).
    pub fn etc_file(&self, name: &str, contents: &str) {
        assert!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "etc_file: {name:?} is not a plain file name"
        );
        let dir = etc_dir(&self.ns);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// A command running this test binary inside the host as a [`helper`] with `role`
    /// (`listen:ADDR` or `connect:ADDR`). The binary must have a test named `test_name` that
    /// calls [`helper`].
    pub fn helper(&self, test_name: &str, role: &str) -> Command {
        let exe = std::env::current_exe().expect("current_exe");
        let mut c = self.command(exe);
        c.args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
            .env(HELPER_ENV, role);
        c
    }
}

/// The lines a process printed on one stream, collected by a thread as they come (the
/// harness's [`Lines`](crate::Lines)).
pub type Collected = crate::process::Lines;

/// A process started with [`Host::start`]: its output is collected line by line; killed (by
/// PID) and reaped on drop.
#[derive(Debug)]
pub struct NsProcess<'a> {
    child: NsChild<'a>,
    /// Its standard output.
    pub stdout: Collected,
    /// Its standard error.
    pub stderr: Collected,
    /// The threads collecting them.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl NsProcess<'_> {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends it signal `sig` (`TERM`, `KILL`...) with `kill -SIG PID`, if it still runs.
    pub fn signal(&mut self, sig: &str) {
        if self.child.try_wait().is_some() {
            return;
        }
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .stdin(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits for it to exit, at most `limit`.
    /// Once it exited, what it wrote before is collected too (its readers reach the end of
    /// the pipes; at most 5 s more, in case a process it started holds them open).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = self.child.wait_timeout(limit)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(status)
    }

    /// Its stdout and stderr, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

/// A process running in a [`Host`]; killed (by PID) and reaped on drop.
#[derive(Debug)]
pub struct NsChild<'a> {
    guard: ChildGuard,
    _host: PhantomData<&'a Host>,
}

impl Deref for NsChild<'_> {
    type Target = ChildGuard;

    fn deref(&self) -> &ChildGuard {
        &self.guard
    }
}

impl DerefMut for NsChild<'_> {
    fn deref_mut(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}

/// A LAN of hosts in network namespaces; deleted on drop. See the module docs.
#[derive(Debug)]
pub struct Lan {
    bridge: String,
    hosts: Vec<Host>,
    /// Namespaces created so far (deleted on drop, in reverse).
    created: Vec<String>,
}

/// The variable under which a namespace test that cannot build its hosts fails instead of
/// skipping (`.ci/run` sets it, so CI never passes on tests that did not run).
pub const REQUIRE_NETNS: &str = "P2P_REQUIRE_NETNS";

/// Reports why a namespace test cannot run: a skip (a line on stderr) normally, a panic when
/// [`REQUIRE_NETNS`] is `1`. [`Lan::new`] and [`inside`] call it; a test that makes its
/// [`Lan`] where a panic does not reach the test (another thread, `catch_unwind`) calls it
/// too when it finds no LAN was made, before it returns.
pub fn skip(why: &str) {
    if std::env::var(REQUIRE_NETNS).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_NETNS}=1 and this namespace test cannot run: {why}");
    }
    eprintln!("skipping: {why}");
}

impl Lan {
    /// Builds a LAN of `n` hosts (1 to [`MAX_HOSTS`]). Returns `None`, after printing why,
    /// only where network namespaces cannot be created (not root, no `ip`); any later
    /// failure panics (and what was built is deleted).
    pub fn new(n: usize) -> Option<Lan> {
        assert!(
            (1..=MAX_HOSTS).contains(&n),
            "a LAN has 1 to {MAX_HOSTS} hosts"
        );
        if let Err(why) = ip(&["-V"]) {
            skip(&format!(
                "network namespaces unavailable: `ip` (iproute2) cannot run: {why}"
            ));
            return None;
        }
        sweep_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{k}", std::process::id());
        let mut lan = Lan {
            bridge: format!("{base}-br"),
            hosts: Vec::new(),
            created: Vec::new(),
        };
        if let Err(why) = ip(&["netns", "add", &lan.bridge]) {
            skip(&format!(
                "cannot create a network namespace (root and iproute2 are needed): {why}"
            ));
            return None;
        }
        lan.created.push(lan.bridge.clone());
        let br = lan.bridge.clone();
        must(&["-n", &br, "link", "set", "lo", "up"]);
        must(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        must(&["-n", &br, "link", "set", "br0", "up"]);
        let subnet = k % 250;
        for i in 0..n {
            let ns = format!("{base}-h{i}");
            must(&["netns", "add", &ns]);
            lan.created.push(ns.clone());
            let port = format!("v{i}");
            let addr = Ipv4Addr::new(10, 77, subnet as u8, (i + 1) as u8);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            must(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", HOST_IF, "netns",
                &ns,
            ]);
            must(&["-n", &br, "link", "set", &port, "master", "br0"]);
            must(&["-n", &br, "link", "set", &port, "up"]);
            must(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "brd",
                "+",
                "dev",
                HOST_IF,
            ]);
            must(&["-n", &ns, "link", "set", HOST_IF, "up"]);
            must(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", HOST_IF]);
            lan.hosts.push(Host { ns, addr, index: i });
        }
        lan.wait_links_up();
        Some(lan)
    }

    fn wait_links_up(&self) {
        let deadline = Instant::now() + LINK_WAIT;
        for h in &self.hosts {
            loop {
                let out = ip(&["-n", &h.ns, "-o", "link", "show", HOST_IF]).unwrap_or_default();
                if out.contains("state UP") || out.contains("LOWER_UP") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{HOST_IF} of {} did not come up within {LINK_WAIT:?}: {out}",
                    h.ns
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Its hosts.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The namespaces it made (bridge first), e.g. to check they are gone after drop.
    pub fn namespaces(&self) -> Vec<String> {
        self.created.clone()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            remove_etc_dir(&ns);
            if let Err(why) = ip(&["netns", "del", &ns]) {
                eprintln!("netns: cannot delete namespace {ns}: {why}");
            }
        }
    }
}

/// Deletes a namespace on drop (the one of [`inside`]).
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(why) = ip(&["netns", "del", &self.0]) {
            eprintln!("netns: cannot delete namespace {}: {why}", self.0);
        }
    }
}

/// Whether the calling test, `name` (its path in its test binary, as `--exact` takes it,
/// e.g. `mdns::tests::finds_a_peer`), runs inside a network namespace of its own now.
///
/// In a normal run this makes a namespace `p2pt-PID-K-solo` with only `lo` (up), runs this
/// test binary inside it (`ip netns exec`) with just that test, waits for it (killed by PID
/// after [`INSIDE_LIMIT`]), panics if it failed, deletes the namespace (also when it panics)
/// and returns `false`; the re-run test, inside the namespace, gets `true` and does its work.
/// Where namespaces cannot be made (not root, no `ip`), it prints why and returns `false`:
/// the test is skipped, unless [`REQUIRE_NETNS`] is `1`, where it fails.
///
/// ```ignore
/// if !tests::netns::inside("mdns::tests::finds_a_peer") {
///     return;
/// }
/// ```
pub fn inside(name: &str) -> bool {
    if std::env::var(INSIDE_ENV).is_ok_and(|n| n == name) {
        return true;
    }
    if let Err(why) = ip(&["-V"]) {
        skip(&format!(
            "{name}: network namespaces unavailable: `ip` (iproute2) cannot run: {why}"
        ));
        return false;
    }
    sweep_stale();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ns = format!(
        "{PREFIX}{}-{}-solo",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    if let Err(why) = ip(&["netns", "add", &ns]) {
        skip(&format!(
            "{name}: cannot create a network namespace (root and iproute2 are needed): {why}"
        ));
        return false;
    }
    let ns = Namespace(ns);
    must(&["-n", &ns.0, "link", "set", "lo", "up"]);
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(INSIDE_ENV, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // `ip netns exec` execs the test binary: the guard's PID is the test's.
    let mut child = ChildGuard::new(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {name} in {}: {e}", ns.0)),
    );
    let out = Collected::default();
    let err = Collected::default();
    let readers = [
        child.child_mut().stdout.take().map(|p| out.collect(p)),
        child.child_mut().stderr.take().map(|p| err.collect(p)),
    ];
    let status = child.wait_timeout(INSIDE_LIMIT);
    child.kill();
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    let (out, err) = (out.text(), err.text());
    let Some(status) = status else {
        panic!("{name} still ran in its namespace after {INSIDE_LIMIT:?}\n{out}\n{err}");
    };
    assert!(
        status.success() && out.contains("1 passed"),
        "{name} failed in its namespace ({status})\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    drop(ns);
    false
}

/// `/etc/netns/NS`: the files `ip netns exec NS` bind-mounts over `/etc`.
fn etc_dir(ns: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns").join(ns)
}

/// Deletes `/etc/netns/NS` if a test made it ([`Host::etc_file`]).
fn remove_etc_dir(ns: &str) {
    let dir = etc_dir(ns);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("netns: cannot delete {}: {e}", dir.display()),
    }
}

/// Runs the test `name` of this test binary as namespaces cannot be made (no `ip` on its
/// `PATH`) under [`REQUIRE_NETNS`]`=1`, and panics unless it fails saying so: the check that
/// a namespace test never passes without running. Bounded (30 s, then killed by PID).
pub fn assert_fails_without_namespaces(name: &str) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env("PATH", "/nonexistent")
        .env(REQUIRE_NETNS, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::new(cmd.spawn().expect("spawn the test binary"));
    let out = Collected::default();
    let err = Collected::default();
    let readers = [
        child.child_mut().stdout.take().map(|p| out.collect(p)),
        child.child_mut().stderr.take().map(|p| err.collect(p)),
    ];
    let status = child.wait_timeout(Duration::from_secs(30));
    child.kill();
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    let (out, err) = (out.text(), err.text());
    let status = status.unwrap_or_else(|| panic!("{name} still ran after 30 s\n{out}\n{err}"));
    assert!(
        !status.success() && out.contains("1 failed"),
        "{name} did not fail without namespaces under {REQUIRE_NETNS}=1 ({status})\n\
         --- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    assert!(
        err.contains(&format!("{REQUIRE_NETNS}=1")),
        "{name} failed for another reason\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
}

/// The network namespaces that exist now (names only).
pub fn list_namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Deletes namespaces of this harness whose test process is gone (a run killed before its
/// `Drop` could run), and their `/etc/netns` directories.
fn sweep_stale() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(dirs) = std::fs::read_dir("/etc/netns") {
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                eprintln!("netns: deleting stale /etc/netns/{name}");
                remove_etc_dir(&name);
            }
        }
    }
    for ns in list_namespaces() {
        let Some(rest) = ns.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("netns: deleting stale namespace {ns} (process {pid} is gone)");
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// Runs `ip ARGS`, at most 30 s; its stdout, or why it failed.
fn ip(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    crate::run_bounded(cmd, Duration::from_secs(30))
}

fn must(args: &[&str]) {
    if let Err(why) = ip(args) {
        panic!("netns setup: {why}");
    }
}

/// The body of a test binary's helper test. Does nothing unless [`HELPER_ENV`] is set (a
/// normal test run); with it (see [`Host::helper`]), plays a tiny TCP peer and exits:
///
/// - `listen:ADDR`: accepts one connection on ADDR (at most 20 s), answers `pong` to `ping`;
///   prints `listening` once bound.
/// - `connect:ADDR`: connects (at most 10 s), sends `ping`, expects `pong`, prints `ok`.
pub fn helper() {
    let Ok(role) = std::env::var(HELPER_ENV) else {
        return;
    };
    let limit = Duration::from_secs(20);
    if let Some(addr) = role.strip_prefix("listen:") {
        let addr: SocketAddr = addr.parse().expect("listen:ADDR");
        let l = TcpListener::bind(addr).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        println!("listening");
        let deadline = Instant::now() + limit;
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection within {limit:?}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(limit)).expect("timeout");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("read ping");
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").expect("write pong");
    } else if let Some(addr) = role.strip_prefix("connect:") {
        let addr: SocketAddr = addr.parse().expect("connect:ADDR");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(limit)).expect("timeout");
        s.write_all(b"ping").expect("write ping");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("read pong");
        assert_eq!(&buf, b"pong");
        println!("ok");
    } else {
        panic!("unknown {HELPER_ENV} role {role:?}");
    }
}
