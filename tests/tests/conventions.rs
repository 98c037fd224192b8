//! A Unix CLI's conventions (issue 16): `NO_COLOR`, the progress bar on stderr (a real
//! pseudo-terminal) with clean results on a redirected stdout, `-v` for p2p-node's own
//! crates only, `--version`, `man`, completions listing values, help headings and wrapping,
//! config precedence (flags > environment > file > defaults) and where files are looked
//! for, the new environment variables, systemd's `$STATE_DIRECTORY` and
//! `$CREDENTIALS_DIRECTORY`, `peers` returning once every asked node answered, and `serve
//! --peer` refused.
//!
//! Runs use `--local`, `--discovery none` or loopback `--peer`s only. Every spawned process
//! gets `HOME` and `XDG_CONFIG_HOME` in a temporary directory ([`tests::isolate`]); no
//! config file written here holds a discovery setting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tests::{events_named, json_lines, poll_until, ChildGuard, Serve, TestDir, RUN_TIMEOUT};

/// Handlers for the seed's types that take a moment, so a progress bar has time to show.
const SLOW: [&str; 6] = [
    "--handler",
    "a=sleep 0.1; echo {id}",
    "--handler",
    "b=sleep 0.1; echo {id}",
    "--handler",
    "c=sleep 0.1; echo {id}",
];

/// A `p2p-node` command in `dir`, isolated from the real home and environment.
fn p2p(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(tests::bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("P2P_KEY_FILE")
        .env_remove("NO_COLOR")
        .env("P2P_DATA_DIR", tests::data_dir())
        .env("TERM", "xterm-256color");
    tests::isolate(&mut cmd);
    cmd
}

/// What a finished command printed.
struct Out {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Out {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.out().escape_debug(),
            self.err().escape_debug()
        )
    }
}

fn collect(
    mut r: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let h = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, h)
}

/// Where a command's stdout goes.
enum Stdout<'a> {
    Pipe,
    File(&'a Path),
}

/// Runs `cmd` to its end with stdout as said and stderr on a pipe, or on a pseudo-terminal
/// (120x40) when `stderr_tty`; killed (by PID) and the test failed past [`RUN_TIMEOUT`].
fn finish(mut cmd: Command, stdout: Stdout<'_>, stderr_tty: bool) -> Out {
    match stdout {
        Stdout::Pipe => cmd.stdout(Stdio::piped()),
        Stdout::File(p) => cmd.stdout(Stdio::from(std::fs::File::create(p).unwrap())),
    };
    let master = if stderr_tty {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let size = rustix::termios::Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, size).expect("set the terminal size");
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(name.to_str().expect("utf-8 pty name"))
            .expect("open the pty slave");
        cmd.stderr(Stdio::from(slave));
        Some(std::fs::File::from(master))
    } else {
        cmd.stderr(Stdio::piped());
        None
    };
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn p2p-node"));
    // The parent's copy of the slave must close, or the master never sees the end.
    drop(cmd);
    let (out, out_reader) = match guard.child_mut().stdout.take() {
        Some(p) => collect(p),
        None => collect(std::io::empty()),
    };
    let (err, err_reader) = match master {
        Some(m) => collect(m),
        None => collect(guard.child_mut().stderr.take().expect("stderr pipe")),
    };
    let Some(status) = guard.wait_timeout(RUN_TIMEOUT) else {
        guard.kill();
        panic!("p2p-node still ran after {RUN_TIMEOUT:?} and was killed");
    };
    poll_until(Duration::from_secs(10), || {
        out_reader.is_finished() && err_reader.is_finished()
    });
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Out {
        status,
        stdout,
        stderr,
    }
}

fn run(cmd: Command) -> Out {
    finish(cmd, Stdout::Pipe, false)
}

#[test]
fn the_progress_bar_draws_on_stderr_and_a_redirected_stdout_stays_clean() {
    let dir = TestDir::new();
    dir.copy_seed();
    let results = dir.join("results.txt");
    let mut args = vec!["run", "tasks.txt", "--local"];
    args.extend_from_slice(&SLOW);
    let out = finish(p2p(dir.path(), &args), Stdout::File(&results), true);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let screen = tests::strip_ansi(&out.err());
    assert!(
        screen.contains("/11 tasks") && screen.contains("ETA"),
        "no progress bar on the terminal (stderr)\n{}",
        out.describe()
    );
    let file = std::fs::read_to_string(&results).unwrap();
    assert!(
        !file.contains('\u{1b}') && !file.contains("ETA") && !file.contains("/11 tasks"),
        "the results file has terminal output in it:\n{}",
        file.escape_debug()
    );
    for id in tests::SEED_ORDER {
        assert!(
            file.lines()
                .any(|l| l.contains(&format!("] {id} ok on node"))),
            "no result line for {id} in the file:\n{file}"
        );
    }
}

#[test]
fn no_color_turns_colour_off_and_only_a_terminal_gets_colour() {
    let dir = TestDir::new();
    dir.copy_seed();
    let args = ["run", "tasks.txt", "--local", "--quiet", "-v"];
    // On a terminal, without NO_COLOR: coloured log lines.
    let out = finish(p2p(dir.path(), &args), Stdout::Pipe, true);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains(&0x1b) && out.err().contains("DEBUG"),
        "no colour on a terminal\n{}",
        out.describe()
    );
    // NO_COLOR=1 on the same terminal: none.
    let mut cmd = p2p(dir.path(), &args);
    cmd.env("NO_COLOR", "1");
    let out = finish(cmd, Stdout::Pipe, true);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(out.err().contains("DEBUG"), "{}", out.describe());
    assert!(
        !out.stderr.contains(&0x1b),
        "NO_COLOR=1 still wrote escape sequences\n{}",
        out.describe()
    );
    // A pipe: none.
    let out = run(p2p(dir.path(), &args));
    assert!(out.err().contains("DEBUG"), "{}", out.describe());
    assert!(!out.stderr.contains(&0x1b), "{}", out.describe());
}

/// The targets (`TRACE mio::poll: ...` gives `mio`) of the log lines in `log`.
fn log_targets(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(w))?;
            let target = words.next()?;
            Some(target.split("::").next()?.trim_end_matches(':').to_string())
        })
        .collect()
}

#[test]
fn verbose_raises_only_p2p_nodes_own_crates_and_rust_log_overrides() {
    let dir = TestDir::new();
    dir.copy_seed();
    let mut cmd = p2p(
        dir.path(),
        &["run", "tasks.txt", "--local", "--quiet", "-vv"],
    );
    cmd.env("NO_COLOR", "1");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let targets = log_targets(&out.err());
    assert!(
        targets
            .iter()
            .any(|t| t.starts_with("p2p_") || t == "node_cli"),
        "-vv logged nothing of p2p-node's own\n{}",
        out.describe()
    );
    let foreign: Vec<&String> = targets
        .iter()
        .filter(|t| !(t.starts_with("p2p_") || *t == "node_cli"))
        .collect();
    assert!(
        foreign.is_empty(),
        "-vv logged other crates' debug lines: {foreign:?}"
    );
    // RUST_LOG still decides when given.
    let mut cmd = p2p(
        dir.path(),
        &["run", "tasks.txt", "--local", "--quiet", "-vv"],
    );
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "mio=trace");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let targets = log_targets(&out.err());
    assert!(
        targets.iter().any(|t| t == "mio"),
        "RUST_LOG=mio=trace gave no mio lines\n{}",
        out.describe()
    );
    assert!(
        !targets.iter().any(|t| t.starts_with("p2p_")),
        "RUST_LOG=mio=trace still gave p2p-node's lines\n{}",
        out.describe()
    );
}

#[test]
fn version_names_protocol_journal_format_and_commit() {
    let dir = TestDir::new();
    let out = run(p2p(dir.path(), &["--version"]));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let text = out.out();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("p2p-node {}", env!("CARGO_PKG_VERSION")));
    assert!(
        lines.contains(&format!("protocol {}", p2p_core::PROTOCOL_VERSION).as_str()),
        "{text}"
    );
    assert!(
        lines.contains(&format!("journal format {}", p2p_tasks::journal::VERSION).as_str()),
        "{text}"
    );
    let commit = lines
        .iter()
        .find_map(|l| l.strip_prefix("commit "))
        .unwrap_or_else(|| panic!("no commit line\n{text}"));
    // Built from this checkout: the commit is HEAD's (when git is here to say).
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(tests::workspace_root())
        .output()
        .ok()
        .filter(|h| h.status.success());
    if let Some(h) = head {
        assert_eq!(commit, String::from_utf8_lossy(&h.stdout).trim(), "{text}");
    }
}

#[test]
fn man_prints_a_page_for_every_subcommand_that_groff_accepts() {
    let dir = TestDir::new();
    let out = run(p2p(dir.path(), &["man"]));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let page = out.out();
    for sub in ["serve", "run", "peers", "keygen", "completions", "man"] {
        assert!(
            page.contains(&format!(".TH p2p-node-{sub} 1")),
            "no page for {sub}"
        );
    }
    // groff (when installed) formats it without a warning.
    let man = dir.write("p2p-node.1", &page);
    if let Ok(g) = Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .arg(&man)
        .output()
    {
        assert!(g.status.success(), "{g:?}");
        assert!(
            g.stderr.is_empty(),
            "groff: {}",
            String::from_utf8_lossy(&g.stderr)
        );
    }
}

#[test]
fn completions_list_the_values_of_order_discovery_and_log_format() {
    let dir = TestDir::new();
    let out = run(p2p(dir.path(), &["completions", "bash"]));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let script = out.out();
    for values in ["strict type none", "none static udp mdns dns:", "text json"] {
        assert!(
            script.contains(values),
            "the bash script does not offer {values:?}"
        );
    }
}

#[test]
fn help_says_what_the_tool_does_wraps_to_the_terminal_and_groups_options() {
    let dir = TestDir::new();
    let out = run(p2p(dir.path(), &["-h"]));
    let first = out.out().lines().next().unwrap_or_default().to_string();
    assert!(
        first.starts_with("Run ordered, typed tasks across many machines"),
        "{first:?}"
    );
    for sub in ["serve", "run", "peers"] {
        let mut cmd = p2p(dir.path(), &[sub, "--help"]);
        cmd.env("COLUMNS", "60").env("LINES", "40");
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(0), "{}", out.describe());
        let help = out.out();
        for heading in ["Discovery:", "Security:", "Limits:", "Output:"] {
            assert!(
                help.lines().any(|l| l == heading),
                "{sub} --help has no {heading} heading\n{help}"
            );
        }
        let long: Vec<&str> = help.lines().filter(|l| l.chars().count() > 60).collect();
        assert!(
            long.is_empty(),
            "{sub} --help at 60 columns has longer lines: {long:#?}"
        );
    }
}

/// A config file in a directory of its own: `[run] json = true` (no discovery setting).
fn json_config(dir: &TestDir, rel: &str) -> std::path::PathBuf {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "[run]\njson = true\n").unwrap();
    path
}

/// Whether the run printed JSON events (so the config file was read).
fn read_the_file(out: &Out) -> bool {
    let text = out.out();
    text.lines().next().is_some_and(|l| l.starts_with('{'))
        && !events_named(&json_lines(&text), "summary").is_empty()
}

#[test]
fn config_files_are_found_at_config_p2p_config_and_xdg_and_the_one_read_is_logged() {
    let dir = TestDir::new();
    dir.copy_seed();
    let home = dir.join("home");
    let xdg = json_config(&dir, "xdg/p2p-node/config.toml");
    let dotconfig = json_config(&dir, "home/.config/p2p-node/config.toml");
    let named = json_config(&dir, "named.toml");
    let plain = dir.write("plain.toml", "[run]\nretries = 0\n");
    let args = ["run", "tasks.txt", "--local", "-v"];
    let with = |vars: &[(&str, &Path)]| {
        let mut cmd = p2p(dir.path(), &args);
        cmd.env("NO_COLOR", "1").env("HOME", &home);
        cmd.env_remove("XDG_CONFIG_HOME");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        run(cmd)
    };
    let logged = |out: &Out, path: &Path| {
        out.err()
            .lines()
            .any(|l| l.contains("config file loaded") && l.contains(&path.display().to_string()))
    };
    // $XDG_CONFIG_HOME/p2p-node/config.toml.
    let out = with(&[("XDG_CONFIG_HOME", &dir.join("xdg"))]);
    assert!(
        read_the_file(&out) && logged(&out, &xdg),
        "{}",
        out.describe()
    );
    // Without XDG_CONFIG_HOME: ~/.config/p2p-node/config.toml.
    let out = with(&[]);
    assert!(
        read_the_file(&out) && logged(&out, &dotconfig),
        "{}",
        out.describe()
    );
    // An empty $P2P_CONFIG counts as unset.
    let out = with(&[("P2P_CONFIG", Path::new(""))]);
    assert!(
        read_the_file(&out) && logged(&out, &dotconfig),
        "{}",
        out.describe()
    );
    // $P2P_CONFIG comes first, and only one file is read.
    let out = with(&[("P2P_CONFIG", &plain)]);
    assert!(
        !read_the_file(&out) && logged(&out, &plain),
        "{}",
        out.describe()
    );
    // --config comes before $P2P_CONFIG.
    let mut cmd = p2p(dir.path(), &args);
    cmd.env("NO_COLOR", "1")
        .env("P2P_CONFIG", &plain)
        .arg("--config")
        .arg(&named);
    let out = run(cmd);
    assert!(
        read_the_file(&out) && logged(&out, &named),
        "{}",
        out.describe()
    );
    // A $P2P_CONFIG that names no file is an error, like --config.
    let out = with(&[("P2P_CONFIG", &dir.join("missing.toml"))]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.err().contains("missing.toml"), "{}", out.describe());
}

#[test]
fn the_environment_beats_the_config_file_and_flags_beat_both() {
    let dir = TestDir::new();
    dir.copy_seed();
    let from_file = dir.join("file-data");
    let from_env = dir.join("env-data");
    let from_flag = dir.join("flag-data");
    let config = dir.write(
        "c.toml",
        &format!("data-dir = {:?}\n", from_file.display().to_string()),
    );
    let base = ["run", "tasks.txt", "--local", "--config"];
    let mut args: Vec<&str> = base.to_vec();
    args.push(config.to_str().unwrap());
    // File only: its data directory.
    let mut cmd = p2p(dir.path(), &args);
    cmd.env_remove("P2P_DATA_DIR");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(from_file.join("coordinator").exists(), "{}", out.describe());
    // P2P_DATA_DIR beats the file.
    let mut cmd = p2p(dir.path(), &args);
    cmd.env("P2P_DATA_DIR", &from_env);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(
        from_env.join("coordinator").exists(),
        "P2P_DATA_DIR lost to the file\n{}",
        out.describe()
    );
    // --data-dir beats both.
    let mut cmd = p2p(dir.path(), &args);
    cmd.env("P2P_DATA_DIR", &from_env)
        .arg("--data-dir")
        .arg(&from_flag);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(from_flag.join("coordinator").exists(), "{}", out.describe());
}

/// Starts `p2p-node serve` with `args` and `env` (loopback, `--discovery none` in `args`)
/// and returns it with its first two stdout lines.
fn serve_with_env(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> (ChildGuard, Vec<String>, Arc<Mutex<Vec<u8>>>) {
    assert!(args.contains(&"none"), "test safety: --discovery none");
    let mut cmd = p2p(dir, &["serve"]);
    cmd.args(args).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn serve"));
    let stdout = guard.child_mut().stdout.take().unwrap();
    let (err, _) = collect(guard.child_mut().stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    for _ in 0..2 {
        match rx.recv_timeout(tests::START_TIMEOUT) {
            Ok(l) => lines.push(l),
            Err(_) => {
                guard.kill();
                panic!(
                    "serve printed {lines:?}; stderr:\n{}",
                    String::from_utf8_lossy(&err.lock().unwrap())
                );
            }
        }
    }
    (guard, lines, err)
}

#[test]
fn p2p_types_listen_and_cluster_configure_serve_and_p2p_peer_configures_peers() {
    let dir = TestDir::new();
    let (mut guard, lines, _) = serve_with_env(
        dir.path(),
        &["--discovery", "none"],
        &[
            ("P2P_TYPES", "a,b".as_ref()),
            ("P2P_LISTEN", "127.0.0.1:0".as_ref()),
            ("P2P_CLUSTER", "blue".as_ref()),
            // Meant for run and peers: serve ignores it.
            ("P2P_PEER", "127.0.0.1:9".as_ref()),
        ],
    );
    let addr = lines[0]
        .strip_prefix("listening on 127.0.0.1:")
        .map(|port| format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        lines[1].contains("cluster blue") && lines[1].contains("types a,b"),
        "{lines:?}"
    );
    // peers with P2P_PEER (and P2P_CLUSTER) finds it.
    let mut cmd = p2p(dir.path(), &["peers", "--json"]);
    cmd.env("P2P_PEER", &addr).env("P2P_CLUSTER", "blue");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let found = json_lines(&out.out());
    assert_eq!(found.len(), 1, "{}", out.describe());
    assert_eq!(found[0]["addr"], addr.as_str());
    guard.kill();
}

#[test]
fn serve_refuses_a_malformed_peer_with_exit_2() {
    // serve's --peer names the nodes its hosted runs dial (tests/tests/hosted_files.rs);
    // one that is no HOST:PORT is refused before the node starts.
    let dir = TestDir::new();
    let out = run(p2p(
        dir.path(),
        &[
            "serve",
            "--types",
            "a",
            "--listen",
            "127.0.0.1:0",
            "--discovery",
            "none",
            "--peer",
            "nowhere",
        ],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.err().contains("--peer \"nowhere\": expected HOST:PORT"),
        "{}",
        out.describe()
    );
}

#[test]
fn peers_returns_once_every_static_peer_answered() {
    let a = Serve::types("a", &[]);
    let b = Serve::types("b", &[]);
    let dir = TestDir::new();
    // A discovery timeout of an hour: only answers can end it before the hang guard.
    let out = run(p2p(
        dir.path(),
        &[
            "peers",
            "--json",
            "--discovery-timeout",
            "1h",
            "--peer",
            &a.peer(),
            "--peer",
            &b.peer(),
        ],
    ));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_eq!(json_lines(&out.out()).len(), 2, "{}", out.describe());
}

#[test]
fn systemd_state_and_credentials_directories_are_the_defaults() {
    let dir = TestDir::new();
    dir.copy_seed();
    // $STATE_DIRECTORY is the data directory when none is given.
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let mut cmd = p2p(dir.path(), &["run", "tasks.txt", "--local"]);
    cmd.env_remove("P2P_DATA_DIR")
        .env("STATE_DIRECTORY", &state);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(state.join("coordinator").exists(), "{}", out.describe());
    // $CREDENTIALS_DIRECTORY/cluster.key is the key when none is given.
    let creds = dir.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let key = p2p_core::ClusterKey::write_new(creds.join("cluster.key")).unwrap();
    let (mut guard, _, err) = serve_with_env(
        dir.path(),
        &[
            "--types",
            "a",
            "--listen",
            "127.0.0.1:0",
            "--discovery",
            "none",
        ],
        &[("CREDENTIALS_DIRECTORY", creds.as_os_str())],
    );
    let loaded = poll_until(Duration::from_secs(30), || {
        let log = String::from_utf8_lossy(&err.lock().unwrap()).into_owned();
        log.contains("cluster key loaded") && log.contains(&key.fingerprint())
    });
    guard.kill();
    assert!(
        loaded,
        "no key from $CREDENTIALS_DIRECTORY:\n{}",
        String::from_utf8_lossy(&err.lock().unwrap())
    );
}

/// Whether the other end of `s` has closed it (its data, if any, is read and dropped).
fn closed_by_peer(s: &mut std::net::TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn peers_asks_every_node_at_once_so_silent_ones_hide_no_other() {
    // Three "nodes" that accept connections and never answer. Each accept checks whether
    // `peers` gave up on an earlier one already: asked one after another, it would have.
    let silent: Vec<std::net::TcpListener> = (2..=4)
        .map(|i| std::net::TcpListener::bind(format!("127.0.0.{i}:0")).unwrap())
        .collect();
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let gave_up_first = Arc::new(Mutex::new(0usize));
    for l in &silent {
        let l = l.try_clone().unwrap();
        let (held, gave_up_first) = (held.clone(), gave_up_first.clone());
        std::thread::spawn(move || {
            // Ends with the test process; one connection is expected.
            if let Some(Ok(c)) = l.incoming().next() {
                let mut held = held.lock().unwrap();
                if held.iter_mut().any(closed_by_peer) {
                    *gave_up_first.lock().unwrap() += 1;
                }
                held.push(c);
            }
        });
    }
    // ...listed before a real one, with the default discovery timeout.
    let good = Serve::types("a", &[]);
    let dir = TestDir::new();
    let mut args = vec!["peers".to_string(), "--json".to_string()];
    for l in &silent {
        args.extend(["--peer".to_string(), l.local_addr().unwrap().to_string()]);
    }
    args.extend(["--peer".to_string(), good.peer()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(p2p(dir.path(), &args));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let found = json_lines(&out.out());
    assert_eq!(found.len(), 1, "{}", out.describe());
    assert_eq!(found[0]["addr"], good.peer().as_str(), "{}", out.describe());
    assert_eq!(
        held.lock().unwrap().len(),
        3,
        "not every silent node was asked"
    );
    assert_eq!(
        *gave_up_first.lock().unwrap(),
        0,
        "silent nodes were asked one after another"
    );
    assert_eq!(
        out.err().matches("cannot reach").count(),
        3,
        "{}",
        out.describe()
    );
}
