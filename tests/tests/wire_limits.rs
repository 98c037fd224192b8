//! Unauthenticated peers against a real `serve` process: what a connection can make the node
//! allocate, keep, log and echo before the handshake. Loopback only.
//!
//! Before the fixes: the length codec reserved the whole claimed frame (up to 16 MiB) as
//! soon as a 4-byte header arrived, so 64 connections that announced 16 MiB and sent it cost
//! about 1 GiB, and under `ulimit -v 1G` 64 connections sending only a header aborted the
//! node; a `Hello` with 7,000,000 types was welcomed (789 MiB per connection); a 3 MB
//! cluster name of control characters came back in a 15 MB `Reject` and a 15 MB log line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use p2p_core::testing::frame;
use p2p_core::{Message, RejectReason};
use tests::{hello, run_in, Received, Serve, TestDir, WireClient, WAIT};

const MIB: u64 = 1024 * 1024;

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`, `VmSize`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The node's resident memory after it settled: the lowest of a few samples.
fn settled_rss(pid: u32) -> u64 {
    (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            status_kib(pid, "VmRSS")
        })
        .min()
        .unwrap_or(0)
}

fn assert_real_run_succeeds(s: &mut Serve, when: &str) {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &s.peer()],
    );
    out.assert_code(0);
    assert!(s.is_alive(), "{when}: the node died");
}

/// A connection that sends a header claiming `claim` bytes, then (if `send`) that many
/// bytes, as fast as the node takes them; it stops at the first write error (the node
/// closed it) or after `limit`. Returns the bytes the node took.
fn announce(addr: SocketAddr, claim: u32, send: bool, limit: Duration) -> (TcpStream, u64) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(&claim.to_be_bytes());
    let mut sent = 0u64;
    if send {
        let chunk = vec![0x41u8; 64 * 1024];
        let deadline = Instant::now() + limit;
        while sent < u64::from(claim) && Instant::now() < deadline {
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(_) => break,
            }
        }
    }
    (s, sent)
}

/// 64 connections announcing 16 MiB and sending it, and 64 sending only the header, raise
/// the node's RSS by less than 16 MiB in total (the figures are printed: run with
/// `--nocapture`).
#[test]
fn connections_announcing_16_mib_before_the_handshake_cost_less_than_16_mib_in_all() {
    let mut s = Serve::types("a", &[]);
    let pid = s.pid();
    assert_real_run_succeeds(&mut s, "before");
    let before = settled_rss(pid);
    let claim = 16 * 1024 * 1024u32;
    let addr = s.addr;
    let senders: Vec<_> = (0..64)
        .map(|_| std::thread::spawn(move || announce(addr, claim, true, Duration::from_secs(60))))
        .collect();
    let headers: Vec<_> = (0..64)
        .map(|_| announce(addr, claim, false, Duration::ZERO))
        .collect();
    // Sample while the senders run.
    let mut peak = before;
    let mut taken = 0u64;
    let mut conns = Vec::new();
    for t in senders {
        while !t.is_finished() {
            peak = peak.max(status_kib(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(20));
        }
        let (c, n) = t.join().unwrap();
        taken += n;
        conns.push(c);
    }
    peak = peak.max(status_kib(pid, "VmRSS"));
    let after = settled_rss(pid);
    println!(
        "wire_limits: RSS before {before} KiB, peak {peak} KiB (+{} KiB), after {after} KiB \
         (+{} KiB); the node took {} KiB from the 64 senders",
        peak.saturating_sub(before),
        after.saturating_sub(before),
        taken / 1024
    );
    assert!(
        (peak.saturating_sub(before)) * 1024 < 16 * MIB,
        "RSS rose from {before} KiB to {peak} KiB"
    );
    drop((conns, headers));
    assert_real_run_succeeds(&mut s, "after");
}

/// Under `ulimit -v 1G` (set on the running node with `prlimit`), 256 connections that each
/// announce 16 MiB (4 GiB claimed in all) and send only the header, then 64 that send it, do
/// not make the node abort; it serves a run afterwards.
#[test]
fn under_ulimit_v_1g_the_node_survives_256_connections_announcing_16_mib() {
    let mut s = Serve::types("a", &["--handshake-timeout", "20s"]);
    let pid = s.pid();
    assert_real_run_succeeds(&mut s, "before");
    let vm = status_kib(pid, "VmSize");
    // The limit must leave room above what the node already maps.
    let limit_kib = (1024 * 1024).max(vm + 256 * 1024);
    let set = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--as={}", limit_kib * 1024),
        ])
        .status();
    let Ok(set) = set else {
        eprintln!("skipping: prlimit (util-linux) cannot run");
        return;
    };
    assert!(set.success(), "prlimit failed");
    println!("wire_limits: VmSize {vm} KiB, address-space limit {limit_kib} KiB");
    let claim = 16 * 1024 * 1024u32;
    let addr = s.addr;
    let headers: Vec<_> = (0..256)
        .map(|_| announce(addr, claim, false, Duration::ZERO))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.is_alive(),
        "the node died with 256 headers open\n{}",
        s.stderr.text()
    );
    let senders: Vec<_> = (0..64)
        .map(|_| std::thread::spawn(move || announce(addr, claim, true, Duration::from_secs(60))))
        .collect();
    for t in senders {
        let _ = t.join();
    }
    assert!(s.is_alive(), "the node died\n{}", s.stderr.text());
    println!(
        "wire_limits: under the limit, VmSize {} KiB, VmRSS {} KiB",
        status_kib(pid, "VmSize"),
        status_kib(pid, "VmRSS")
    );
    drop(headers);
    assert_real_run_succeeds(&mut s, "after");
}

/// The frame of a `Hello` listing 7,000,000 one-byte types, written by hand (as bincode
/// would) so the test does not build 7,000,000 strings.
fn seven_million_types() -> Vec<u8> {
    let mut payload = vec![0u8, 1, 7];
    payload.extend_from_slice(b"default");
    payload.extend_from_slice(&[7; 16]);
    payload.push(252);
    payload.extend_from_slice(&7_000_000u32.to_le_bytes());
    for _ in 0..7_000_000 {
        payload.extend_from_slice(&[1, b'a']);
    }
    payload.push(1);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// The longest line of the node's log so far.
fn longest_log_line(s: &Serve) -> usize {
    s.stderr
        .snapshot()
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
}

/// A `Hello` whose fields break the bounds gets a short `Reject(Invalid)` naming the bound;
/// nothing long is logged or echoed, and no control character reaches the log.
#[test]
fn a_hello_over_the_bounds_gets_a_short_reject_and_a_short_log_line() {
    let mut s = Serve::types("a", &[]);
    let cases: Vec<(&str, Message)> = vec![
        ("65 types", {
            let mut h = hello("default");
            h.types = (0..65).map(|_| "a".to_string()).collect();
            Message::Hello(h)
        }),
        ("a type of 33 letters", {
            let mut h = hello("default");
            h.types = vec!["a".repeat(33)];
            Message::Hello(h)
        }),
        (
            "a cluster name of 65 bytes",
            Message::Hello(hello(&"c".repeat(65))),
        ),
        ("a type that is not letters", {
            let mut h = hello("default");
            h.types = vec!["\u{1b}[2J".into()];
            Message::Hello(h)
        }),
    ];
    for (what, msg) in cases {
        let mut c = WireClient::connect(s.addr);
        let _ = c.send_raw(&frame(&msg));
        match c.recv(WAIT) {
            Received::Msg(Message::Reject(r)) => {
                assert_eq!(r.reason, RejectReason::Invalid, "{what}: {r:?}");
                assert!(
                    r.message.len() < 300,
                    "{what}: a long reject: {}",
                    r.message.len()
                );
                assert!(!r.message.contains('\u{1b}'), "{what}: {r:?}");
            }
            other => panic!(
                "{what}: expected a Reject, got {other:?}\n{}",
                s.stderr.text()
            ),
        }
    }
    // A 3 MB cluster name of control characters: its frame is refused on its header alone
    // (over the 4 KiB of a handshake frame), nothing echoed.
    let mut c = WireClient::connect(s.addr);
    let _ = c.send_raw(&frame(&Message::Hello(hello(
        &"\u{1b}]0;x\u{7}".repeat(500_000),
    ))));
    let mut seen = Vec::new();
    assert!(
        matches!(
            c.wait_closed(WAIT, &mut seen),
            Received::Eof | Received::Error(_)
        ),
        "the 3 MB Hello was not refused"
    );
    assert!(
        seen.iter().all(|m| !matches!(m, Message::Welcome(_))),
        "{seen:?}"
    );
    // 7,000,000 one-byte types (a 14 MB frame): refused on its header alone.
    let mut c = WireClient::connect(s.addr);
    let _ = c.send_raw(&seven_million_types());
    let mut seen = Vec::new();
    assert!(
        matches!(
            c.wait_closed(WAIT, &mut seen),
            Received::Eof | Received::Error(_)
        ),
        "the 14 MB Hello was not refused"
    );
    assert!(
        seen.iter().all(|m| !matches!(m, Message::Welcome(_))),
        "{seen:?}"
    );
    assert_real_run_succeeds(&mut s, "after the bad Hellos");
    let longest = longest_log_line(&s);
    assert!(
        longest < 2048,
        "a log line of {longest} bytes:\n{}",
        s.stderr.text()
    );
    assert!(
        !s.stderr.text().contains('\u{1b}'),
        "a control character reached the log"
    );
}

/// A flood of connections that fail their handshake logs a few lines and a count, not one
/// line per connection.
#[test]
fn a_connection_flood_logs_a_few_lines_and_a_count() {
    let mut s = Serve::types("a", &["--max-handshakes", "4"]);
    for _ in 0..2000 {
        if let Ok(mut c) = TcpStream::connect(s.addr) {
            let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
        }
    }
    assert_real_run_succeeds(&mut s, "after the flood");
    let lines = s.stderr.snapshot();
    let failed = lines
        .iter()
        .filter(|l| {
            l.contains("handshake failed") || l.contains("too many connections in handshake")
        })
        .count();
    println!("wire_limits: {failed} warning lines for 2,000 bad connections");
    // A few lines per kind and interval (10 s), however long the flood takes here.
    assert!(
        failed < 200,
        "{failed} lines for 2,000 connections:\n{}",
        lines.join("\n")
    );
}
