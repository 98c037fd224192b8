//! Child processes: `p2p-node serve` and `run` under hang guards, the lines they print,
//! and short setup commands.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::safety::check_safe;
use crate::{bin, data_dir, isolate, json_lines};

/// The hang guard of a whole `p2p-node run` (or any other command run to its end).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `serve` process may take to print its `listening on ADDR` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The default deadline of the polling helpers (log lines, sockets): a hang guard only.
pub const WAIT: Duration = Duration::from_secs(20);

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

fn command(args: &[&str], dir: Option<&Path>) -> Command {
    command_of(bin(), args, dir)
}

fn command_of(bin: &Path, args: &[&str], dir: Option<&Path>) -> Command {
    check_safe(args);
    let mut cmd = Command::new(bin);
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

    /// Collects `r`'s lines, as they come, on a thread of its own.
    pub(crate) fn collect(&self, r: impl Read + Send + 'static) -> JoinHandle<()> {
        let lines = self.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                lines.push(l);
            }
        })
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

    /// A node that hosts runs (the hosted-run suites): type `a`, listening on `listen` (a
    /// loopback address), no discovery, its own data directory `data` (its runs are its
    /// own), plus `extra` arguments.
    pub fn hosting(listen: &str, data: &Path, extra: &[&str]) -> Serve {
        let data = data.to_str().expect("a UTF-8 path");
        let mut args = vec![
            "--types",
            "a",
            "--listen",
            listen,
            "--discovery",
            "none",
            "--data-dir",
            data,
        ];
        args.extend_from_slice(extra);
        Serve::start(&args)
    }

    /// [`Serve::start`] with these environment variables set (e.g. `P2P_KEY_FILE`, which
    /// is otherwise removed).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_env_in(None, args, env)
    }

    /// [`Serve::start`] with `dir` as its working directory.
    pub fn start_in(dir: &Path, args: &[&str]) -> Serve {
        Serve::start_env_in(Some(dir), args, &[])
    }

    /// [`Serve::start_env`] with another `p2p-node` binary than the one under test (a
    /// benchmark's earlier build).
    pub fn start_bin(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_with(bin, None, args, env)
    }

    fn start_env_in(dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_with(bin(), dir, args, env)
    }

    fn start_with(bin: &Path, dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut full = vec!["serve"];
        full.extend_from_slice(args);
        let mut cmd = command_of(bin, &full, dir);
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
        // An IPv4-mapped loopback listen (`[::ffff:127.0.0.1]`, which the node counts as not
        // loopback) is reached through its IPv4 address.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
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

/// [`spawn_in`] with these environment variables set (e.g. `P2P_KEY_FILE`, which is
/// otherwise removed).
pub fn spawn_env_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
    spawn_env_cmd(args, Some(dir), env)
}

fn spawn_cmd(args: &[&str], dir: Option<&Path>) -> Running {
    spawn_env_cmd(args, dir, &[])
}

fn spawn_env_cmd(args: &[&str], dir: Option<&Path>, env: &[(&str, &str)]) -> Running {
    let mut cmd = command(args, dir);
    cmd.envs(env.iter().copied());
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
    pub fn finish(self) -> RunOutput {
        self.finish_within(RUN_TIMEOUT)
    }

    /// [`Running::finish`] with a hang guard of `limit`.
    pub fn finish_within(mut self, limit: Duration) -> RunOutput {
        let status = self.guard.wait_timeout(limit);
        let Some(status) = status else {
            self.guard.kill();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "p2p-node {:?} still ran after {limit:?} and was killed\n--- stdout ---\n\
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
