//! Key rotation and persistent node identities against real `p2p-node` processes on
//! loopback:
//!
//! - a node that accepts an old and a new cluster key (`--key-file OLD --key-file NEW`)
//!   serves a coordinator with only the old key and one with only the new key; a coordinator
//!   with a third key gets a clear error naming the fingerprint and nothing executed;
//! - `P2P_KEY_FILE` may list several key files separated by `:`, as repeated `--key-file`;
//! - `serve --identity F` keeps its node id across restarts, creates F with mode 0600, and
//!   the id is the one a keyed coordinator sees; a file another live node holds is refused;
//! - without `--identity`, a node keeps its id in the data directory: the same id after a
//!   restart, and nodes running at the same time get different ones;
//! - the lock is on the identity file itself: a symbolic or a hard link to a file a live
//!   node holds is refused too;
//! - two nodes sharing one identity file are reported by the coordinator, not merged silently.
//!
//! Every process is started here and killed by its own handle (PID); every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tests::{events_named, run_in, RunOutput, Serve, TestDir, WAIT};

fn keygen(dir: &TestDir, name: &str) -> PathBuf {
    run_in(dir.path(), &["keygen", name]).assert_code(0);
    dir.join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A node serving `a` with `keys` (in order), whose handler appends `{id}` to `log`.
fn keyed_serve(keys: &[&Path], log: &Path, extra: &[&str]) -> Serve {
    keyed_serve_with(
        keys,
        &format!("a=echo {{id}} >> '{}'", log.display()),
        extra,
    )
}

/// A node serving `a` with `keys` (in order) and this `--handler`.
fn keyed_serve_with(keys: &[&Path], handler: &str, extra: &[&str]) -> Serve {
    let mut args: Vec<&str> = vec!["--handler", handler];
    for k in keys {
        args.extend(["--key-file", s(k)]);
    }
    args.extend_from_slice(extra);
    Serve::types("a", &args)
}

/// `run tasks.txt --json --peer PEER...` with `keys` (in order) and `extra` flags.
fn keyed_run(dir: &TestDir, peers: &[String], keys: &[&Path], extra: &[&str]) -> RunOutput {
    let mut args: Vec<&str> = vec!["run", "tasks.txt", "--json", "--discovery-timeout", "2s"];
    for p in peers {
        args.extend(["--peer", p]);
    }
    for k in keys {
        args.extend(["--key-file", s(k)]);
    }
    args.extend_from_slice(extra);
    run_in(dir.path(), &args)
}

/// `serve --identity PATH` that is expected to refuse to start: its output.
fn serve_refused(dir: &TestDir, identity: &str) -> RunOutput {
    let args = [
        "serve",
        "--types",
        "a",
        "--listen",
        "127.0.0.1:0",
        "--discovery",
        "none",
        "--identity",
        identity,
    ];
    run_in(dir.path(), &args)
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_node_accepting_old_and_new_keys_serves_either_and_refuses_a_third_clearly() {
    let dir = TestDir::new();
    let old = keygen(&dir, "old.key");
    let new = keygen(&dir, "new.key");
    let third = keygen(&dir, "third.key");
    dir.write("tasks.txt", "a1 a2");
    let log = dir.join("handled");
    // Step 1 of a rotation: dials with old, accepts old and new.
    let node = keyed_serve(&[&old, &new], &log, &[]);
    let loaded = node
        .stderr
        .wait_for(WAIT, |l| l.contains("cluster key loaded"))
        .unwrap_or_else(|| panic!("no key log line:\n{}", node.stderr.text()));
    // It logs the fingerprints it accepts (two of them).
    let accepted = loaded
        .split("accepted=")
        .nth(1)
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_default();
    assert_eq!(accepted.split(',').count(), 2, "{loaded}");

    for (name, key) in [("old", &old), ("new", &new)] {
        let out = keyed_run(&dir, &[node.peer()], &[key], &[]);
        out.assert_code(0);
        let done = out.json();
        assert_eq!(
            events_named(&done, "task_completed").len(),
            2,
            "coordinator with only the {name} key:\n{}",
            out.describe()
        );
    }
    // Step 2 of a rotation on the coordinator's side: dials with new, still accepts old.
    keyed_run(&dir, &[node.peer()], &[&new, &old], &[]).assert_code(0);
    assert_eq!(log_lines(&log).len(), 6, "{:?}", log_lines(&log));

    // A third key: nothing executed, a clear error on both sides.
    let out = keyed_run(&dir, &[node.peer()], &[&third], &[]);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("cluster key") && out.stderr.contains("fingerprint"),
        "the coordinator should say its key is not the node's:\n{}",
        out.describe()
    );
    let refused = node
        .stderr
        .wait_for(WAIT, |l| {
            l.contains("the peer uses a key this node does not have: fingerprint")
        })
        .unwrap_or_else(|| panic!("no refusal in the node's log:\n{}", node.stderr.text()));
    // The fingerprint named is the third key's (the one the coordinator printed), not one of
    // the node's own.
    for fp in accepted.split(',') {
        assert!(
            !refused.contains(&format!("does not have: fingerprint {fp}")),
            "{refused}"
        );
    }
    assert!(
        out.stderr.contains(
            refused
                .split("does not have: fingerprint ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("?")
        ),
        "the coordinator names the same fingerprint as the node:\n{}\n{refused}",
        out.describe()
    );
    assert_eq!(log_lines(&log).len(), 6, "a task ran under the third key");
}

#[cfg(unix)]
#[test]
fn serve_with_identity_keeps_its_node_id_across_restarts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    let key = keygen(&dir, "cluster.key");
    let id_file = dir.join("node.identity");
    dir.write("tasks.txt", "a1");
    let log = dir.join("handled");

    let mut first = keyed_serve(&[&key], &log, &["--identity", s(&id_file)]);
    let id1 = first.node_id.clone().expect("serve prints `node ID ...`");
    assert_eq!(id1.len(), 32, "{id1}");
    let mode = std::fs::metadata(&id_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the identity file is private");
    // The id a keyed coordinator sees is the one the node printed (its identity proves it).
    let out = keyed_run(&dir, &[first.peer()], &[&key], &[]);
    out.assert_code(0);
    let events = out.json();
    let connected = events_named(&events, "connected");
    assert_eq!(connected.len(), 1, "{}", out.describe());
    assert_eq!(connected[0]["node"], id1.as_str(), "{}", out.describe());
    first.terminate();
    assert!(
        first.wait_exit(WAIT).is_some(),
        "serve did not stop on SIGTERM"
    );

    let second = keyed_serve(&[&key], &log, &["--identity", s(&id_file)]);
    assert_eq!(
        second.node_id.as_deref(),
        Some(id1.as_str()),
        "same id after a restart"
    );
    // Without --identity: the data directory's identity, not this one.
    let fresh = keyed_serve(&[&key], &log, &[]);
    let fresh_id = fresh.node_id.clone().expect("node id line");
    assert_ne!(fresh_id, id1);
    drop((second, fresh));

    // An identity file others can read is refused with the fix in the message.
    std::fs::set_permissions(&id_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = serve_refused(&dir, s(&id_file));
    out.assert_code(2);
    assert!(
        out.stderr.contains("--identity") && out.stderr.contains("chmod 600"),
        "{}",
        out.describe()
    );
}

#[test]
fn p2p_key_file_lists_several_keys_like_repeated_key_files() {
    let dir = TestDir::new();
    let old = keygen(&dir, "old.key");
    let new = keygen(&dir, "new.key");
    let third = keygen(&dir, "third.key");
    dir.write("tasks.txt", "a1 a2");
    let log = dir.join("handled");
    let list = format!("{}:{}", s(&new), s(&old));
    let handler = format!("a=echo {{id}} >> '{}'", log.display());
    let node = Serve::start_env(
        &[
            "--types",
            "a",
            "--listen",
            "127.0.0.1:0",
            "--discovery",
            "none",
            "--handler",
            &handler,
        ],
        &[("P2P_KEY_FILE", &list)],
    );
    // The second key of the list is accepted too.
    keyed_run(&dir, &[node.peer()], &[&old], &[]).assert_code(0);
    keyed_run(&dir, &[node.peer()], &[&new], &[]).assert_code(0);
    assert_eq!(log_lines(&log).len(), 4, "{:?}", log_lines(&log));
    let out = keyed_run(&dir, &[node.peer()], &[&third], &[]);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        log_lines(&log).len(),
        4,
        "a task ran under a key not in the list"
    );
}

#[test]
fn without_identity_a_node_keeps_its_id_in_the_data_directory() {
    let dir = TestDir::new();
    let data = dir.join("data");
    let data_args = ["--data-dir", s(&data)];
    let mut first = Serve::types("a", &data_args);
    let id1 = first.node_id.clone().expect("node id line");
    // Running at the same time: another identity slot, another id.
    let second = Serve::types("a", &data_args);
    let id2 = second.node_id.clone().expect("node id line");
    assert_ne!(id1, id2, "two live nodes never share an id");
    assert!(data.join("identity").exists() && data.join("identity-2").exists());
    // After a restart the first slot is free again: the same id comes back.
    first.terminate();
    assert!(first.wait_exit(WAIT).is_some(), "serve did not stop");
    let again = Serve::types("a", &data_args);
    assert_eq!(
        again.node_id.as_deref(),
        Some(id1.as_str()),
        "same id after a restart"
    );
    // An explicit identity file a live node holds is refused, saying so.
    let out = serve_refused(&dir, s(&data.join("identity")));
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("another running p2p-node holds this identity"),
        "{}",
        out.describe()
    );
    drop((second, again));
}

#[cfg(unix)]
#[test]
fn a_symbolic_or_hard_link_to_a_held_identity_is_refused_too() {
    let dir = TestDir::new();
    let id_file = dir.join("node.identity");
    let first = Serve::types("a", &["--identity", s(&id_file)]);
    let sym = dir.join("sym.identity");
    std::os::unix::fs::symlink(&id_file, &sym).unwrap();
    let hard = dir.join("hard.identity");
    std::fs::hard_link(&id_file, &hard).unwrap();
    let other = dir.join("sub");
    std::fs::create_dir(&other).unwrap();
    let relative = "../node.identity";
    for (what, path) in [("symbolic link", s(&sym)), ("hard link", s(&hard))] {
        let out = serve_refused(&dir, path);
        out.assert_code(2);
        assert!(
            out.stderr
                .contains("another running p2p-node holds this identity"),
            "a {what} to a held identity was not refused\n{}",
            out.describe()
        );
    }
    // Another spelling of the same path, from another directory.
    let out = run_in(
        &other,
        &[
            "serve",
            "--types",
            "a",
            "--listen",
            "127.0.0.1:0",
            "--discovery",
            "none",
            "--identity",
            relative,
        ],
    );
    out.assert_code(2);
    drop(first);
    // Once the node is gone, the link names a free identity: the same id.
    let again = Serve::types("a", &["--identity", s(&sym)]);
    assert!(again.node_id.is_some());
}

#[test]
fn two_nodes_sharing_an_identity_file_are_reported_not_merged() {
    let dir = TestDir::new();
    let key = keygen(&dir, "cluster.key");
    let id_file = dir.join("shared.identity");
    // Long enough (20 tasks of 50 ms, two at a time: 0.5 s) for the second connection to be
    // made while the run goes on: a run starts as soon as one node of its type is there.
    let ids: Vec<String> = (1..=20).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &ids.join(" "));
    let log = dir.join("handled");
    let handler = format!("a=sleep 0.05; echo {{id}} >> '{}'", log.display());
    let a = keyed_serve_with(&[&key], &handler, &["--identity", s(&id_file)]);
    // A copy of the same file (as an operator cloning a machine would make).
    let copy = dir.join("copy.identity");
    std::fs::copy(&id_file, &copy).unwrap();
    let b = keyed_serve_with(&[&key], &handler, &["--identity", s(&copy)]);
    assert_eq!(a.node_id, b.node_id, "a copied identity gives the same id");
    let id = a.node_id.clone().expect("node id line");

    let out = keyed_run(&dir, &[a.peer(), b.peer()], &[&key], &[]);
    out.assert_code(0);
    let notice = out
        .stderr
        .lines()
        .find(|l| l.contains(&format!("node id {id} is connected at")))
        .unwrap_or_else(|| panic!("no duplicate-id notice:\n{}", out.describe()));
    assert!(
        notice.contains(&a.peer()) && notice.contains(&b.peer()),
        "the notice names both addresses: {notice}"
    );
    let events = out.json();
    assert_eq!(
        events_named(&events, "connected").len(),
        1,
        "{}",
        out.describe()
    );
    assert_eq!(events_named(&events, "task_completed").len(), 20);
}
