//! `serve --metrics-listen`: a real node scraped over HTTP (README, "Watching a mesh").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use tests::{poll_until, run, run_in, shell_quote, spawn_in, Serve, TestDir, WAIT};

/// The metrics address a serve printed (`metrics on http://ADDR/metrics`).
fn metrics_addr(s: &Serve) -> SocketAddr {
    let line = s
        .stdout
        .wait_for(WAIT, |l| l.starts_with("metrics on "))
        .unwrap_or_else(|| panic!("no `metrics on` line:\n{}", s.stdout.text()));
    line.trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// `GET path` over a fresh connection: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics port");
    c.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    c.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    (code, body.to_string())
}

/// The samples of a Prometheus text page: `name{labels}` to value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            )
        })
        .collect()
}

fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    samples(&body)
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have:\n{:#?}", m.keys()))
}

#[test]
fn metrics_count_what_ran() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3 b1 b2\n");
    let s = Serve::types(
        "a,b",
        &["--handler", "b=exit 3", "--metrics-listen", "127.0.0.1:0"],
    );
    let m = metrics_addr(&s);
    assert!(m.ip().is_loopback() && m.port() != 0, "{m}");
    let before = scrape(m);
    assert_eq!(
        value(&before, r#"p2p_node_tasks_assigned_total{type="a"}"#),
        0.0
    );
    assert_eq!(
        value(
            &before,
            &format!(
                r#"p2p_node_build_info{{version="{}",protocol="{}"}}"#,
                env!("CARGO_PKG_VERSION"),
                p2p_core::PROTOCOL_VERSION
            )
        ),
        1.0
    );
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--keep-going",
            "--json",
            "--peer",
            &s.peer(),
        ],
    );
    out.assert_code(1);
    let after = scrape(m);
    for (t, ok, failed) in [("a", 3.0, 0.0), ("b", 0.0, 2.0)] {
        let key = |name: &str| format!(r#"p2p_node_{name}{{type="{t}"}}"#);
        assert_eq!(value(&after, &key("tasks_assigned_total")), ok + failed);
        assert_eq!(value(&after, &key("tasks_completed_total")), ok);
        assert_eq!(value(&after, &key("tasks_failed_total")), failed);
        assert_eq!(value(&after, &key("tasks_running")), 0.0);
        assert_eq!(
            value(&after, &key("task_duration_seconds_count")),
            ok + failed
        );
        assert_eq!(
            value(
                &after,
                &format!(r#"p2p_node_task_duration_seconds_bucket{{type="{t}",le="+Inf"}}"#)
            ),
            ok + failed
        );
    }
    assert!(value(&after, "p2p_node_connections_accepted_total") >= 1.0);
    assert!(value(&after, "p2p_node_connections_established_total") >= 1.0);
    assert_eq!(value(&after, "p2p_node_draining"), 0.0);
    assert!(value(&after, "p2p_node_received_bytes_total") > 0.0);
    assert!(value(&after, "p2p_node_sent_bytes_total") > 0.0);
    // A connection that is not the protocol is counted as refused.
    let refused = r#"p2p_node_connections_refused_total{reason="protocol"}"#;
    assert_eq!(value(&after, refused), 0.0);
    let mut junk = TcpStream::connect(s.addr).unwrap();
    junk.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    assert!(
        poll_until(WAIT, || value(&scrape(m), refused) == 1.0),
        "{}",
        s.stderr.text()
    );
    let (code, _) = get(m, "/healthz");
    assert_eq!(code, 200);
    let (code, _) = get(m, "/nothing");
    assert_eq!(code, 404);
}

#[test]
fn healthz_says_503_while_the_node_drains() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "s1\n");
    let started = dir.join("started");
    let handler = format!(
        "s=touch {}; sleep 30",
        shell_quote(started.to_str().unwrap())
    );
    let mut s = Serve::types(
        "s",
        &[
            "--handler",
            &handler,
            "--metrics-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "40s",
        ],
    );
    let m = metrics_addr(&s);
    let running = spawn_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]);
    assert!(poll_until(WAIT, || started.exists()), "{}", s.stderr.text());
    assert!(poll_until(WAIT, || value(
        &scrape(m),
        r#"p2p_node_tasks_running{type="s"}"#
    ) == 1.0));
    assert_eq!(get(m, "/healthz").0, 200);
    s.terminate();
    assert!(
        poll_until(WAIT, || get(m, "/healthz").0 == 503),
        "/healthz never said 503 during the drain:\n{}",
        s.stderr.text()
    );
    // Still scraped while it drains, and the task is still running.
    let during = scrape(m);
    assert_eq!(value(&during, "p2p_node_draining"), 1.0);
    assert_eq!(value(&during, r#"p2p_node_tasks_running{type="s"}"#), 1.0);
    assert!(s.is_alive());
    drop(running);
}

#[test]
fn metrics_on_a_public_address_need_a_key() {
    let out = run(&[
        "serve",
        "--types",
        "a",
        "--listen",
        "127.0.0.1:0",
        "--discovery",
        "none",
        "--metrics-listen",
        "0.0.0.0:0",
    ]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("refusing to serve metrics on 0.0.0.0:0"),
        "{}",
        out.describe()
    );
}

/// The metrics address a run printed on stderr (`metrics on http://ADDR/metrics`).
fn run_metrics_addr(r: &tests::Running) -> SocketAddr {
    let line = r
        .stderr
        .wait_for(WAIT, |l| l.starts_with("metrics on "))
        .unwrap_or_else(|| panic!("no `metrics on` line:\n{}", r.stderr.text()));
    line.trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn a_run_serves_its_own_metrics_while_it_lasts() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3\n");
    let go = dir.join("go");
    // a2's first attempt fails (it is retried); a3 waits for `go` (at most 60 s).
    let handler = format!(
        "a=if [ {{id}} = a2 ] && [ $P2P_TASK_ATTEMPT = 1 ]; then exit 3; fi; \
         if [ {{id}} = a3 ]; then i=0; while [ ! -e {g} ] && [ $i -lt 1200 ]; do sleep 0.05; \
         i=$((i+1)); done; fi; echo ok",
        g = shell_quote(go.to_str().unwrap())
    );
    let running = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--handler",
            &handler,
            "--retries",
            "1",
            "--retry-backoff",
            "10ms",
            "--json",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let m = run_metrics_addr(&running);
    assert!(m.ip().is_loopback() && m.port() != 0, "{m}");
    let running_a = r#"p2p_node_run_tasks_running{type="a"}"#;
    let completed_a = r#"p2p_node_run_tasks_completed_total{type="a"}"#;
    assert!(
        poll_until(WAIT, || {
            let s = scrape(m);
            s.get(running_a) == Some(&1.0) && s.get(completed_a) == Some(&2.0)
        }),
        "a3 never ran with a1 and a2 done:\n{}",
        running.stderr.text()
    );
    let during = scrape(m);
    assert_eq!(value(&during, "p2p_node_run_tasks"), 3.0);
    assert_eq!(value(&during, "p2p_node_run_nodes_connected"), 1.0);
    assert_eq!(
        value(&during, r#"p2p_node_run_tasks_assigned_total{type="a"}"#),
        4.0
    );
    assert_eq!(
        value(&during, r#"p2p_node_run_tasks_retried_total{type="a"}"#),
        1.0
    );
    assert_eq!(
        value(&during, r#"p2p_node_run_tasks_failed_total{type="a"}"#),
        0.0
    );
    // The two successes have a run time (the retried attempt's is not reported).
    assert_eq!(
        value(
            &during,
            r#"p2p_node_run_task_duration_seconds_count{type="a"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &during,
            r#"p2p_node_run_task_duration_seconds_bucket{type="a",le="+Inf"}"#
        ),
        2.0
    );
    assert_eq!(get(m, "/healthz").0, 200);

    std::fs::write(&go, "").unwrap();
    let out = running.finish();
    out.assert_code(0);
    // The endpoint ends with the run.
    assert!(
        TcpStream::connect(m).is_err(),
        "the metrics port still answers after the run"
    );
}

#[test]
fn run_metrics_on_a_public_address_need_a_key() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--metrics-listen",
            "0.0.0.0:0",
        ],
    );
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("refusing to serve run metrics on 0.0.0.0:0"),
        "{}",
        out.describe()
    );
    assert!(!out.stdout.contains("Executing"), "{}", out.describe());
}
