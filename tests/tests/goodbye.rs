//! Graceful termination (the seed's "Terminating connections"): a run says goodbye to every
//! node, both sides log it, and no TCP connection stays open afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use p2p_core::Message;
use tests::{
    events_named, hello, open_tcp_on_port, poll_until, run_in, shell_quote, spawn_in, Received,
    Serve, TestDir, WireClient, WAIT,
};

/// The value of `key=` in a log line (`peer=ab12cd34`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
}

/// Whether `line` is the log line of a new connection (not of a disconnection).
fn is_connect_line(line: &str) -> bool {
    line.split_whitespace().any(|w| w == "connected") && !line.contains("disconnected")
}

/// Polls `/proc/net/tcp{,6}` until no connection to or from `port` is open; panics naming
/// the ones that stay.
fn assert_no_open_connection(port: u16, s: &Serve) {
    let mut left = Vec::new();
    let closed = poll_until(Duration::from_secs(10), || {
        left = open_tcp_on_port(port);
        left.is_empty()
    });
    assert!(
        closed,
        "connections on port {port} still open (01 ESTABLISHED / 08 CLOSE_WAIT):\n{}\n\
         server log:\n{}",
        left.iter()
            .map(|e| e.line.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        s.stderr.text()
    );
}

#[test]
fn proc_net_tcp_sees_an_open_connection() {
    // The check the other tests rely on must be able to see a connection at all.
    let s = Serve::types("a", &[]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let mine = c.stream.local_addr().unwrap().port();
    let open = open_tcp_on_port(s.addr.port());
    assert!(
        open.iter()
            .any(|e| e.state == "01" && (e.local_port == mine || e.remote_port == mine)),
        "our ESTABLISHED connection {mine} -> {} is not in /proc/net/tcp: {open:?}",
        s.addr
    );
    c.send(&Message::Goodbye).unwrap();
    c.expect_msg(WAIT, "GoodbyeAck", |m| matches!(m, Message::GoodbyeAck));
    drop(c);
    assert_no_open_connection(s.addr.port(), &s);
}

#[test]
fn run_says_goodbye_and_leaves_no_connection_open() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3\n");
    let s = Serve::types("a", &[]);
    let id = s.node_id.clone().expect("serve printed its node id");
    let out = run_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]);
    out.assert_code(0);

    // The run's side: a goodbye from this very node.
    let short = &id[..8];
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("disconnected from node")
                && l.contains(short)
                && l.contains("(goodbye)")),
        "no `disconnected from node {short} ... (goodbye)` line\n{}",
        out.describe()
    );

    // The server's side: it logged the connection, then a goodbye for the same peer.
    let connect = s
        .stderr
        .wait_for(WAIT, is_connect_line)
        .unwrap_or_else(|| panic!("server never logged a connection:\n{}", s.stderr.text()));
    let peer = field(&connect, "peer")
        .unwrap_or_else(|| panic!("connect line names no peer: {connect}"))
        .to_string();
    let bye = s
        .stderr
        .wait_for(WAIT, |l| {
            l.contains("disconnected (goodbye)") && field(l, "peer") == Some(&peer)
        })
        .unwrap_or_else(|| {
            panic!(
                "server never logged `disconnected (goodbye)` for peer {peer}:\n{}",
                s.stderr.text()
            )
        });
    let lines = s.stderr.snapshot();
    let at = |x: &str| lines.iter().position(|l| l == x).unwrap();
    assert!(at(&connect) < at(&bye), "goodbye logged before the connect");
    assert!(
        !lines.iter().any(|l| l.contains("connection lost")),
        "the server saw a lost connection:\n{}",
        s.stderr.text()
    );

    assert_no_open_connection(s.addr.port(), &s);
}

#[test]
fn json_disconnected_events_are_clean_for_every_node() {
    let dir = TestDir::new();
    dir.copy_seed();
    let nodes: Vec<Serve> = ["a", "b", "c"]
        .into_iter()
        .map(|t| Serve::types(t, &[]))
        .collect();
    let mut args = vec!["run", "tasks.txt", "--json"];
    let peers: Vec<String> = nodes.iter().map(Serve::peer).collect();
    for p in &peers {
        args.extend(["--peer", p.as_str()]);
    }
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    let events = out.json();
    let disconnected = events_named(&events, "disconnected");
    for n in &nodes {
        let id = n.node_id.clone().unwrap();
        let d: Vec<_> = disconnected
            .iter()
            .filter(|e| e["node"] == id.as_str())
            .collect();
        assert_eq!(
            d.len(),
            1,
            "one disconnected event for {id}\n{}",
            out.describe()
        );
        assert_eq!(d[0]["clean"], true, "{}", d[0]);
        assert_eq!(d[0]["addr"], n.peer().as_str(), "{}", d[0]);
    }
    // Every disconnection comes after the last task and before the summary.
    let last_task = events
        .iter()
        .rposition(|e| e["event"] == "task_completed")
        .unwrap();
    let first_disc = events
        .iter()
        .position(|e| e["event"] == "disconnected")
        .unwrap();
    assert!(last_task < first_disc, "{}", out.describe());
    for n in &nodes {
        assert_no_open_connection(n.addr.port(), n);
    }
}

#[test]
fn sigterm_on_serve_says_goodbye_to_connected_peers() {
    let mut s = Serve::types("a", &[]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    s.terminate();
    c.expect_msg(WAIT, "Goodbye", |m| matches!(m, Message::Goodbye));
    c.send(&Message::GoodbyeAck).unwrap();
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof),
        "expected a clean close after the goodbye: {end:?} {seen:?}"
    );
    let status = s
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("serve still runs after SIGTERM:\n{}", s.stderr.text()));
    assert!(status.success(), "serve exited with {status} after SIGTERM");
    assert!(
        s.stderr
            .wait_for(WAIT, |l| l.contains("disconnected (goodbye)"))
            .is_some(),
        "{}",
        s.stderr.text()
    );
}

#[test]
fn sigterm_on_serve_lets_a_running_task_finish() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let started = dir.join("started");
    // The task marks that it started, then runs for a while.
    let handler = format!(
        "a=touch {}; sleep 2; echo finished {{id}}",
        shell_quote(started.to_str().unwrap())
    );
    let mut s = Serve::types("a", &["--handler", &handler]);
    let running = spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &s.peer()],
    );
    assert!(
        poll_until(WAIT, || started.exists()),
        "the task never started:\n{}",
        s.stderr.text()
    );
    // Graceful shutdown while a1 runs: the node drains it before leaving.
    s.terminate();
    let out = running.finish();
    out.assert_code(0);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 1, "{}", out.describe());
    assert_eq!(done[0]["output"].as_str().unwrap().trim(), "finished a1");
    let status = s
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("serve still runs after SIGTERM:\n{}", s.stderr.text()));
    assert!(status.success(), "serve exited with {status} after SIGTERM");
}

#[test]
fn interrupting_a_run_cancels_its_task_and_still_says_goodbye() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let pid_file = dir.join("handler.pid");
    // The handler records its pid, then becomes a long sleep.
    let handler = format!(
        "a=echo $$ > {}; exec sleep 300",
        shell_quote(pid_file.to_str().unwrap())
    );
    let s = Serve::types("a", &["--handler", &handler]);
    let running = spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &s.peer()],
    );
    let mut pid = None;
    assert!(
        poll_until(WAIT, || {
            pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
            pid.is_some()
        }),
        "the task never started:\n{}",
        s.stderr.text()
    );
    let pid = pid.unwrap();
    running.interrupt();
    let out = running.finish();
    out.assert_code(130);
    let events = out.json();
    assert!(events_named(&events, "task_completed").is_empty());
    assert!(
        !events
            .iter()
            .any(|e| e["task"] == "a2" && e["event"] == "task_assigned"),
        "nothing new starts after the interrupt\n{}",
        out.describe()
    );
    let s_ev = events_named(&events, "summary");
    assert_eq!(
        s_ev.len(),
        1,
        "a summary even when interrupted\n{}",
        out.describe()
    );
    assert_eq!(s_ev[0]["succeeded"], 0);
    let d = events_named(&events, "disconnected");
    assert_eq!(d.len(), 1, "{}", out.describe());
    assert_eq!(d[0]["clean"], true, "{}", d[0]);
    // The node stopped the cancelled task's process...
    assert!(
        poll_until(WAIT, || tests::process_ended(pid)),
        "the cancelled task's process {pid} still runs"
    );
    // ...logged a goodbye, not a lost connection, and keeps no connection open.
    assert!(
        s.stderr
            .wait_for(WAIT, |l| l.contains("disconnected (goodbye)"))
            .is_some(),
        "{}",
        s.stderr.text()
    );
    assert_no_open_connection(s.addr.port(), &s);
}
