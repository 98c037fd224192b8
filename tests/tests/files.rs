//! Paths a careless user (or an attacker who can write the directory) hands to the node:
//! FIFOs, directories and devices as `--key-file`, `P2P_KEY_FILE`, `--identity` and
//! `--journal`, and commands that fail their arguments. Each is refused at once with exit 2
//! and a message naming the path, and a command that does not run leaves nothing behind.
//! Real `p2p-node` processes, each bounded in time; nothing listens beyond loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{ChildGuard, TestDir};

/// How long a refusal may take: startup is milliseconds, a hang is forever.
const REFUSAL: Duration = Duration::from_secs(20);

/// `p2p-node ARGS` in `dir` with `env` set, stdin closed: (exit code, stderr). Panics when
/// it is still running after [`REFUSAL`] (the FIFO hang), after killing it.
fn bounded(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(tests::bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env_remove("P2P_KEY_FILE")
        .env("P2P_DATA_DIR", dir.join("data"))
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn p2p-node"));
    let start = Instant::now();
    let status = guard.wait_timeout(REFUSAL);
    let Some(status) = status else {
        guard.kill();
        panic!(
            "p2p-node {args:?} {env:?} still ran after {:?}",
            start.elapsed()
        );
    };
    let mut err = String::new();
    if let Some(mut e) = guard.child_mut().stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status.code(), err)
}

fn mkfifo(path: &Path) {
    // Private (0600), so that no permission check refuses it first: the type must.
    let ok = Command::new("mkfifo")
        .args(["-m", "600"])
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success(), "mkfifo {}", path.display());
}

const SERVE: [&str; 7] = [
    "serve",
    "--types",
    "a",
    "--listen",
    "127.0.0.1:0",
    "--discovery",
    "none",
];

#[cfg(unix)]
#[test]
fn a_fifo_directory_or_device_as_any_path_flag_is_refused_at_once_with_exit_2() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap().to_string();
    let sub = dir.join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let sub = sub.to_str().unwrap().to_string();
    let mut refused = 0;
    for bad in [fifo.as_str(), sub.as_str(), "/dev/zero"] {
        let with = |flag: &'static str, cmd: &[&'static str]| -> Vec<String> {
            let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
            v.push(flag.into());
            v.push(bad.into());
            v
        };
        let run_local = ["run", "tasks.txt", "--local"];
        type Env<'a> = Vec<(&'a str, &'a str)>;
        let cases: Vec<(Vec<String>, Env)> = vec![
            (with("--key-file", &SERVE), vec![]),
            (with("--identity", &SERVE), vec![]),
            (with("--key-file", &run_local), vec![]),
            (with("--identity", &run_local), vec![]),
            (with("--journal", &run_local), vec![]),
            (
                SERVE.iter().map(|s| s.to_string()).collect(),
                vec![("P2P_KEY_FILE", bad)],
            ),
        ];
        for (args, env) in cases {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, err) = bounded(dir.path(), &a, &env);
            assert_eq!(code, Some(2), "{a:?} {env:?}: {err}");
            assert!(
                err.contains(bad) && err.contains("not a regular file"),
                "{a:?} {env:?}: the refusal does not name {bad} and say why: {err}"
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 18);
}

#[test]
fn a_command_refused_for_its_arguments_takes_and_leaves_no_identity() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let data = dir.join("data");
    // The data directory exists, so that an --identity in it could be created.
    std::fs::create_dir(&data).unwrap();
    let serve = "serve --types a --listen 127.0.0.1:0 --discovery none";
    let cases = [
        "serve --types a1 --listen 127.0.0.1:0 --discovery none".to_string(),
        format!("{serve} --handler b=true"),
        "serve --types a --listen 127.0.0.1:0 --discovery static".to_string(),
        format!("{serve} --capacity 0"),
        format!("{serve} --max-output 16MiB"),
        format!("{serve} --handshake-timeout 0s"),
        "run tasks.txt --local --max-output 16MiB --journal j".to_string(),
        "run tasks.txt --local --peer 127.0.0.1 --journal j".to_string(),
        "run tasks.txt --local --retry-backoff 2s --retry-backoff-max 1s --journal j".to_string(),
        "peers --discovery static --identity data/peers.id".to_string(),
    ];
    for case in &cases {
        let args: Vec<&str> = case.split_whitespace().collect();
        let (code, err) = bounded(dir.path(), &args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            !err.contains("identity loaded") && !err.contains("created a new identity"),
            "{args:?} took an identity before refusing: {err}"
        );
        let left: Vec<String> = std::fs::read_dir(&data)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{args:?} left identities behind: {left:?}");
    }
    assert!(
        !dir.join("j").exists(),
        "a run that did not start left a journal"
    );
}
