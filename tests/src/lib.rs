//! Shared harness of the workspace integration suites: it runs the real `p2p-node` binary as
//! child processes that talk over loopback only.
//!
//! - [`bin`] finds (and, when missing, builds once) `target/debug/p2p-node`.
//! - [`Serve`] starts `p2p-node serve`, reads the real address from its `listening on ADDR`
//!   line and collects its stdout and stderr; dropping it kills and reaps the process.
//! - [`run`] / [`run_in`] run a command to its end under a hang guard.
//! - [`TestDir`] is a temporary directory per test; [`json_lines`] parses `--json` output;
//!   [`open_tcp_on_port`] reads `/proc/net/tcp{,6}`.
//!
//! Safety: every helper refuses a command line that could send traffic off the machine (a
//! `serve` without a loopback `--listen`, a command without `--local`, `--peer` or
//! `--discovery none`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod netfault;
pub mod netns;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The hang guard of a whole `p2p-node run` (or any other command run to its end).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `serve` process may take to print its `listening on ADDR` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The default deadline of the polling helpers (log lines, sockets): a hang guard only.
pub const WAIT: Duration = Duration::from_secs(20);

/// The seed's task order (the repository's `tasks.txt`).
pub const SEED_ORDER: [&str; 11] = [
    "a1", "a2", "c1", "b1", "c2", "a3", "b2", "b3", "a4", "c3", "b4",
];

/// The event names `--json` may print (README.md's `--json` events).
pub const EVENT_NAMES: [&str; 11] = [
    "run_started",
    "peer_discovered",
    "peer_unreachable",
    "connected",
    "task_assigned",
    "task_completed",
    "task_failed",
    "task_cancelled",
    "task_retry",
    "disconnected",
    "summary",
];

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives inside the workspace")
        .to_path_buf()
}

/// Runs `cmd` to its end, at most `limit` (then kills it); its stdout, or what went wrong
/// (with its stderr). For the short setup commands of the suites (`ip`, `tc`, `iptables`).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} hung"));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The data directory (`P2P_DATA_DIR`) of every node this test process starts, so the
/// suites never touch the real home directory: `p2p-node-tests-PID` in the system's
/// temporary directory. Nodes running at the same time get different identity slots of
/// it, as on a real machine; a node restarted later may get its old identity back. Roots
/// left by test processes that have ended are removed when the first one is made.
pub fn data_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("p2p-node-tests-"))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("p2p-node-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test data directory");
        dir
    })
}

/// The `p2p-node` binary under test.
///
/// `P2P_NODE_BIN` overrides it; otherwise it is `target/debug/p2p-node` next to the test
/// executable's `deps` directory, (re)built once per test process with
/// `cargo build -p node-cli --bin p2p-node` so the suites never test a stale binary (a no-op
/// taking a fraction of a second when it is up to date).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("P2P_NODE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/debug/deps/<test> -> target/debug
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps");
        let path = dir.join(format!("p2p-node{}", std::env::consts::EXE_SUFFIX));
        build_binary(dir.ends_with("release"));
        assert!(
            path.exists(),
            "{} does not exist, even after `cargo build -p node-cli --bin p2p-node`",
            path.display()
        );
        path
    })
}

fn build_binary(release: bool) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "-q", "-p", "node-cli", "--bin", "p2p-node"];
    if release {
        args.push("--release");
    }
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn cargo build");
    let guard_deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().expect("wait for cargo build") {
            assert!(status.success(), "cargo build -p node-cli failed: {status}");
            return;
        }
        if Instant::now() > guard_deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cargo build -p node-cli did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), which log lines may carry.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Quotes `s` for `sh`: a single-quoted word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Panics unless the command line keeps its traffic on loopback (see the crate docs).
fn check_safe(args: &[&str]) {
    let has = |flag: &str| {
        args.iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
    };
    let value_of = |flag: &str| -> Vec<String> {
        let mut v = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if *a == flag {
                if let Some(next) = args.get(i + 1) {
                    v.push((*next).to_string());
                }
            } else if let Some(rest) = a.strip_prefix(&format!("{flag}=")) {
                v.push(rest.to_string());
            }
        }
        v
    };
    for d in value_of("--discovery") {
        assert!(
            d == "none" || d == "static",
            "test safety: --discovery {d} could leave loopback"
        );
    }
    for p in value_of("--peer") {
        let ok = p.starts_with("127.") || p.starts_with("[::1]") || p.starts_with("localhost:");
        assert!(ok, "test safety: --peer {p} is not a loopback address");
    }
    match args.first().copied() {
        Some("serve") => {
            let listen = value_of("--listen");
            assert!(
                listen.len() == 1 && listen[0].starts_with("127."),
                "test safety: serve needs an explicit loopback --listen, got {listen:?}"
            );
            assert!(
                has("--discovery") || has("--peer"),
                "test safety: serve needs --discovery none or --peer"
            );
        }
        Some("run") | Some("peers") => assert!(
            has("--local") || has("--peer") || has("--discovery"),
            "test safety: {args:?} needs --local, --peer or --discovery none"
        ),
        _ => {}
    }
}

fn command(args: &[&str], dir: Option<&Path>) -> Command {
    check_safe(args);
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Deterministic defaults: the binary's own log levels, no key from the environment.
        .env_remove("RUST_LOG")
        .env_remove("P2P_KEY_FILE")
        .env("P2P_DATA_DIR", data_dir())
        .env("NO_COLOR", "1");
    isolate(&mut cmd);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd
}

/// The settings p2p-node reads from the environment besides its flags' own variables.
pub const SETTING_VARS: [&str; 8] = [
    "P2P_CONFIG",
    "P2P_CLUSTER",
    "P2P_LISTEN",
    "P2P_TYPES",
    "P2P_PEER",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "XDG_DATA_HOME",
];

/// Keeps a spawned `p2p-node` away from the real home's config: `HOME` and
/// `XDG_CONFIG_HOME` point into an empty directory under [`data_dir`], and the setting
/// variables of [`SETTING_VARS`] are removed (a test sets the ones it means to).
pub fn isolate(cmd: &mut Command) {
    let home = data_dir().join("home");
    let _ = std::fs::create_dir_all(home.join(".config"));
    cmd.env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"));
    for v in SETTING_VARS {
        cmd.env_remove(v);
    }
}

/// A child process that is killed (by its PID, via [`Child::kill`]) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Takes ownership of `child`.
    pub fn new(child: Child) -> Self {
        ChildGuard { child }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for it to exit, at most `limit`; `None` if it is still running then.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills and reaps it (nothing happens if it already exited and was reaped).
    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines a reader thread collects from a child's stdout or stderr (ANSI codes removed).
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    /// A copy of the lines collected so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All lines so far joined with newlines (for assertion messages).
    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// Polls until some line satisfies `pred`, at most `limit`; returns that line.
    pub fn wait_for(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.snapshot().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

/// Reads `r` line by line into `lines`; each line also goes to `first` (until it hangs up).
fn spawn_reader(
    r: impl Read + Send + 'static,
    lines: Lines,
    first: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let raw = String::from_utf8_lossy(&buf);
                    let line = strip_ansi(raw.trim_end_matches(['\n', '\r']));
                    if let Some(tx) = &first {
                        let _ = tx.send(line.clone());
                    }
                    lines.push(line);
                }
            }
        }
    })
}

/// A running `p2p-node serve`; killed and reaped on drop.
#[derive(Debug)]
pub struct Serve {
    guard: ChildGuard,
    /// The address it listens on (from its `listening on ADDR` line).
    pub addr: SocketAddr,
    /// Its node id (from its second stdout line, `node ID cluster ...`), when printed.
    pub node_id: Option<String>,
    /// Its stdout lines.
    pub stdout: Lines,
    /// Its stderr lines (the log).
    pub stderr: Lines,
}

impl Serve {
    /// Starts `p2p-node serve ARGS...` (`args` are what follows `serve`; they must include a
    /// loopback `--listen` and `--discovery none` or `--peer`) and waits for its
    /// `listening on ADDR` line.
    pub fn start(args: &[&str]) -> Serve {
        Serve::start_env(args, &[])
    }

    /// [`Serve::start`] with these environment variables set (e.g. `P2P_KEY_FILE`, which
    /// is otherwise removed).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut full = vec!["serve"];
        full.extend_from_slice(args);
        let mut cmd = command(&full, None);
        cmd.envs(env.iter().copied());
        let mut guard = ChildGuard::new(cmd.spawn().expect("spawn p2p-node serve"));
        let stdout = Lines::default();
        let stderr = Lines::default();
        let (tx, rx) = mpsc::channel();
        let out = guard.child_mut().stdout.take().expect("stdout pipe");
        let err = guard.child_mut().stderr.take().expect("stderr pipe");
        spawn_reader(out, stdout.clone(), Some(tx));
        spawn_reader(err, stderr.clone(), None);
        let first = match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) => l,
            Err(e) => {
                guard.kill();
                // Give the reader a moment to collect what the process wrote before dying.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "p2p-node {full:?} printed no first line ({e:?}); stderr:\n{}",
                    stderr.text()
                );
            }
        };
        let addr: SocketAddr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!("first stdout line of serve is not `listening on ADDR`: {first:?}")
            });
        assert!(addr.ip().is_loopback(), "serve listens on {addr}");
        assert_ne!(
            addr.port(),
            0,
            "serve printed port 0 instead of the real port"
        );
        let node_id = rx
            .recv_timeout(Duration::from_secs(5))
            .ok()
            .and_then(|l| l.strip_prefix("node ").map(str::to_string))
            .and_then(|rest| rest.split_whitespace().next().map(str::to_string));
        Serve {
            guard,
            addr,
            node_id,
            stdout,
            stderr,
        }
    }

    /// Starts a node serving `types` (e.g. `"a"` or `"a,b"`) on `127.0.0.1:0` with
    /// `--discovery none`, plus `extra` arguments.
    pub fn types(types: &str, extra: &[&str]) -> Serve {
        let mut args = vec![
            "--types",
            types,
            "--listen",
            "127.0.0.1:0",
            "--discovery",
            "none",
        ];
        args.extend_from_slice(extra);
        Serve::start(&args)
    }

    /// `addr` as a string, for `--peer`.
    pub fn peer(&self) -> String {
        self.addr.to_string()
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.guard.try_wait().is_none()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Sends it SIGTERM (by its PID, with `kill -TERM PID`): a graceful shutdown request.
    pub fn terminate(&mut self) {
        send_signal("TERM", self.pid());
    }

    /// Waits for it to exit, at most `limit`; `None` if it is still running then.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.guard.wait_timeout(limit)
    }
}

/// Sends signal `sig` (e.g. `TERM`) to the process `pid` with `kill -SIG PID`.
fn send_signal(sig: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Whether process `pid` is gone or a zombie (it has stopped running), from `/proc/PID/stat`.
pub fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses: `PID (comm) S ...`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct RunOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl RunOutput {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout and stderr, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Panics (showing the output) unless the exit code is `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "expected exit code {code}\n{}",
            self.describe()
        );
        self
    }

    /// Stdout parsed as one JSON value per line (panics on a line that is not JSON).
    pub fn json(&self) -> Vec<serde_json::Value> {
        json_lines(&self.stdout)
    }
}

/// Runs `p2p-node ARGS...` in the current directory to its end; see [`run_in`].
pub fn run(args: &[&str]) -> RunOutput {
    run_cmd(args, None)
}

/// Runs `p2p-node ARGS...` in `dir` to its end, with a hang guard of [`RUN_TIMEOUT`]: a
/// command still running then is killed and the test fails.
pub fn run_in(dir: &Path, args: &[&str]) -> RunOutput {
    run_cmd(args, Some(dir))
}

fn run_cmd(args: &[&str], dir: Option<&Path>) -> RunOutput {
    spawn_cmd(args, dir).finish()
}

/// Starts `p2p-node ARGS...` in `dir` without waiting for it; see [`Running::finish`].
pub fn spawn_in(dir: &Path, args: &[&str]) -> Running {
    spawn_cmd(args, Some(dir))
}

fn spawn_cmd(args: &[&str], dir: Option<&Path>) -> Running {
    let mut cmd = command(args, dir);
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn p2p-node"));
    let out = guard.child_mut().stdout.take().expect("stdout pipe");
    let err = guard.child_mut().stderr.take().expect("stderr pipe");
    let stdout = Lines::default();
    let stderr = Lines::default();
    let readers = vec![
        spawn_reader(out, stdout.clone(), None),
        spawn_reader(err, stderr.clone(), None),
    ];
    Running {
        guard,
        args: args.iter().map(|a| a.to_string()).collect(),
        stdout,
        stderr,
        readers,
    }
}

/// A `p2p-node` command running in the background; killed and reaped on drop.
#[derive(Debug)]
pub struct Running {
    guard: ChildGuard,
    args: Vec<String>,
    /// Its stdout lines so far.
    pub stdout: Lines,
    /// Its stderr lines so far.
    pub stderr: Lines,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Sends it SIGINT (by its PID, with `kill -INT PID`), as Ctrl-C would.
    pub fn interrupt(&self) {
        send_signal("INT", self.pid());
    }

    /// Sends it SIGTERM (by its PID, with `kill -TERM PID`), as a service manager would.
    pub fn terminate(&self) {
        send_signal("TERM", self.pid());
    }

    /// Waits for it to end, with a hang guard of [`RUN_TIMEOUT`]: still running then, it is
    /// killed and the test fails.
    pub fn finish(mut self) -> RunOutput {
        let status = self.guard.wait_timeout(RUN_TIMEOUT);
        let Some(status) = status else {
            self.guard.kill();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "p2p-node {:?} still ran after {RUN_TIMEOUT:?} and was killed\n--- stdout ---\n\
                 {}\n--- stderr ---\n{}",
                self.args,
                self.stdout.text(),
                self.stderr.text()
            );
        };
        // The pipes close when the process (and any handler it left behind) is gone; a
        // handler left running must not hang the test, so the wait for the readers is bounded.
        let readers: Vec<JoinHandle<()>> = self.readers.drain(..).collect();
        poll_until(Duration::from_secs(10), || {
            readers.iter().all(|r| r.is_finished())
        });
        let text = |l: &Lines| {
            let mut t = l.text();
            if !t.is_empty() {
                t.push('\n');
            }
            t
        };
        RunOutput {
            status,
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        }
    }
}

/// Parses every non-empty line of `s` as JSON; panics naming the first line that is not.
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// The events of `events` whose `event` field is `name`.
pub fn events_named<'a>(events: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

/// A temporary directory for one test, deleted on drop.
#[derive(Debug)]
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    /// A fresh empty directory.
    pub fn new() -> Self {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("p2p-node-test-")
                .tempdir()
                .expect("create a temp dir"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `contents` to `name` inside it; returns the path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, contents).expect("write a file in the temp dir");
        p
    }

    /// Copies the repository's seed `tasks.txt` into it; returns the copy's path.
    pub fn copy_seed(&self) -> PathBuf {
        let p = self.join("tasks.txt");
        std::fs::copy(workspace_root().join("tasks.txt"), &p).expect("copy the seed tasks.txt");
        p
    }

    /// The lines of `name` inside it (empty when it does not exist).
    pub fn read_lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

/// A TCP socket from `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// Kernel state, as the two hex digits of the file (`01` ESTABLISHED, `08` CLOSE_WAIT...).
    pub state: String,
    /// The raw line.
    pub line: String,
}

/// Every TCP socket of this network namespace (IPv4 and IPv6).
pub fn tcp_table() -> Vec<TcpEntry> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let (Some(local_port), Some(remote_port)) = (port(cols[1]), port(cols[2])) else {
                continue;
            };
            out.push(TcpEntry {
                local_port,
                remote_port,
                state: cols[3].to_string(),
                line: line.trim().to_string(),
            });
        }
    }
    out
}

/// Sockets whose local or remote port is `port` and that are still open: ESTABLISHED (`01`)
/// or CLOSE_WAIT (`08`, the peer closed but this side did not).
pub fn open_tcp_on_port(port: u16) -> Vec<TcpEntry> {
    tcp_table()
        .into_iter()
        .filter(|e| e.local_port == port || e.remote_port == port)
        .filter(|e| e.state == "01" || e.state == "08")
        .collect()
}

/// Polls `cond` every 20 ms until it is true or `limit` passed; returns its last value.
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What reading from a raw connection gave.
#[derive(Debug)]
pub enum Received {
    /// A whole protocol message.
    Msg(p2p_core::Message),
    /// The peer closed the connection (read returned 0).
    Eof,
    /// The connection failed (reset, or a frame the codec refused).
    Error(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// A raw TCP client speaking the real wire protocol (`p2p_core::codec::FrameCodec`), for
/// tests that play a misbehaving or hand-driven peer.
#[derive(Debug)]
pub struct WireClient {
    /// The socket.
    pub stream: std::net::TcpStream,
    codec: p2p_core::codec::FrameCodec,
    buf: bytes::BytesMut,
}

impl WireClient {
    /// Connects to `addr` (loopback only).
    pub fn connect(addr: SocketAddr) -> WireClient {
        assert!(
            addr.ip().is_loopback(),
            "test safety: {addr} is not loopback"
        );
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .expect("connect to the node");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("set_write_timeout");
        WireClient {
            stream,
            codec: p2p_core::codec::FrameCodec::default(),
            buf: bytes::BytesMut::new(),
        }
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Encodes and writes one message.
    pub fn send(&mut self, msg: &p2p_core::Message) -> std::io::Result<()> {
        use tokio_util::codec::Encoder;
        let mut out = bytes::BytesMut::new();
        self.codec.encode(msg, &mut out).expect("encode a message");
        self.send_raw(&out)
    }

    /// Reads until one message, EOF or an error arrives, at most `limit`.
    pub fn recv(&mut self, limit: Duration) -> Received {
        use tokio_util::codec::Decoder;
        let deadline = Instant::now() + limit;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(m)) => return Received::Msg(m),
                Ok(None) => {}
                Err(e) => return Received::Error(format!("undecodable frame: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Received::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left.min(Duration::from_millis(250))))
                .expect("set_read_timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Received::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Received::Error(e.to_string()),
            }
        }
    }

    /// Reads messages (answering `Ping`s) until one that `want` accepts, at most `limit`;
    /// returns it, or panics with what arrived instead.
    pub fn expect_msg(
        &mut self,
        limit: Duration,
        what: &str,
        want: impl Fn(&p2p_core::Message) -> bool,
    ) -> p2p_core::Message {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Received::Msg(m) if want(&m) => return m,
                Received::Msg(p2p_core::Message::Ping { nonce }) => {
                    seen.push(format!("Ping {nonce}"));
                    let _ = self.send(&p2p_core::Message::Pong { nonce });
                }
                Received::Msg(m) => seen.push(format!("{m:?}")),
                other => panic!("expected {what}; got {other:?} after {seen:?}"),
            }
        }
    }

    /// Reads (and discards messages) until the node closes the connection, at most `limit`.
    /// Returns how it ended (`Eof` or `Error`), or `Timeout` if the connection stayed open;
    /// `seen` collects the messages that arrived first.
    pub fn wait_closed(&mut self, limit: Duration, seen: &mut Vec<p2p_core::Message>) -> Received {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Received::Msg(m) => seen.push(m),
                other => return other,
            }
        }
    }
}

/// A `Hello` as a coordinator (serving no type) would send it, in `cluster`.
pub fn hello(cluster: &str) -> p2p_core::Hello {
    p2p_core::Hello {
        version: p2p_core::PROTOCOL_VERSION,
        cluster: cluster.to_string(),
        node_id: p2p_core::NodeId::random(),
        types: Vec::new(),
        capacity: 1,
    }
}
