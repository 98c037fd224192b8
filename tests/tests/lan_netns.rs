//! The network-namespace LAN harness itself: hosts reach each other over the bridge, and
//! nothing is left behind, also when a test panics. Skipped (with a printed reason) where
//! namespaces cannot be created.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tests::netns::{self, Lan};

const LIMIT: Duration = Duration::from_secs(30);

/// The in-namespace TCP peer used below; a no-op in a normal test run.
#[test]
fn netns_helper() {
    netns::helper();
}

fn existing(names: &[String]) -> Vec<String> {
    let now = netns::list_namespaces();
    names.iter().filter(|n| now.contains(n)).cloned().collect()
}

#[test]
fn hosts_reach_each_other_over_the_bridge_and_are_deleted_after() {
    let Some(lan) = Lan::new(3) else { return };
    let names = lan.namespaces();
    assert_eq!(names.len(), 4, "a bridge namespace and 3 hosts");
    assert_eq!(existing(&names), names, "the namespaces exist");
    let (a, b) = (lan.host(0), lan.host(2));
    assert_ne!(a.addr(), b.addr());

    // Each host has its address on eth0, and lo up.
    let out = a.output(a.command("ip").args(["-o", "-4", "addr", "show"]), LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}/24", a.addr())), "{text}");
    assert!(text.contains("127.0.0.1/8"), "{text}");

    // TCP from host 2 to host 0, through the test binary itself in both namespaces.
    let target = format!("{}:7999", a.addr());
    let mut server = a.spawn(&mut a.helper("netns_helper", &format!("listen:{target}")));
    let stdout = server.child_mut().stdout.take().expect("stdout");
    // Read every line until EOF (a closed pipe would fail the helper's later prints); libtest
    // prints `test netns_helper ... ` before the helper's own line.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if l.ends_with("listening") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(LIMIT).is_ok();
    assert!(ready, "the listener did not start");
    let out = b.output(
        &mut b.helper("netns_helper", &format!("connect:{target}")),
        LIMIT,
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "connect failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let status = server.wait_timeout(LIMIT).expect("the listener ends");
    assert!(status.success(), "listener: {status}");

    // ping too, where it is installed.
    if std::process::Command::new("ping")
        .arg("-V")
        .output()
        .is_ok()
    {
        let out = b.output(
            b.command("ping")
                .args(["-c", "1", "-W", "2"])
                .arg(a.addr().to_string()),
            LIMIT,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // The host's namespace is not the machine's: no LAN address outside it.
    let here = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip addr");
    assert!(
        !String::from_utf8_lossy(&here.stdout).contains(&a.addr().to_string()),
        "a LAN address leaked into the machine's namespace"
    );

    drop(server);
    let _ = reader.join();
    drop(lan);
    assert!(
        existing(&names).is_empty(),
        "left behind: {:?}",
        existing(&names)
    );
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = names.clone();
    let result = std::thread::spawn(move || {
        let Some(lan) = Lan::new(2) else { return };
        *seen.lock().unwrap() = lan.namespaces();
        let h = lan.host(1);
        // A child still running when the panic unwinds is killed before the LAN goes.
        let _child = h.spawn(h.command("sleep").arg("30"));
        panic!("on purpose");
    })
    .join();
    let names = names.lock().unwrap().clone();
    if names.is_empty() {
        // Lan::new's panic under P2P_REQUIRE_NETNS stayed in the thread: say it here.
        netns::skip("no namespace was made");
        return;
    }
    assert!(result.is_err(), "the thread panicked");
    assert!(
        existing(&names).is_empty(),
        "left behind: {:?}",
        existing(&names)
    );
}

/// Without namespaces and with P2P_REQUIRE_NETNS=1, the namespace tests fail, also the one
/// whose LAN is made on another thread (it passed before, the harness's panic staying there).
#[test]
fn without_namespaces_the_tests_fail_under_require_netns() {
    for name in [
        "a_panicking_test_leaves_nothing_behind",
        "hosts_reach_each_other_over_the_bridge_and_are_deleted_after",
    ] {
        netns::assert_fails_without_namespaces(name);
    }
}
