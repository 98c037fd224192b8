//! Nodes joining and leaving during a run, with the real `p2p-node` binary and udp discovery
//! on a LAN of network namespaces (see `tests::netns`). Skipped, with a printed reason,
//! where namespaces cannot be created.
//!
//! No timing assumption: the handlers wait on files of the test's directory (the hosts share
//! the file system), so the order of what matters is forced, and every wait is bounded.
//!
//! - join: a node started mid-run, while the first node is held busy, receives tasks (its
//!   node id appears in `task_completed` events);
//! - leave: a node killed with SIGKILL while it runs a task is reported `disconnected`, and
//!   its task completes on the other node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::netns::{Host, Lan, NsProcess};

/// A hang guard only: nothing asserts on timing.
const WAIT: Duration = Duration::from_secs(30);

/// The longest a gated handler waits for its file (then it goes on: bounded).
const GATE_TENTHS: u32 = 600;

/// `while [ ! -e FILE ]` for at most [`GATE_TENTHS`] tenths of a second.
fn wait_for_file(file: &Path) -> String {
    format!(
        "i=0; while [ ! -e {f} ] && [ $i -lt {GATE_TENTHS} ]; do sleep 0.1; i=$((i+1)); done",
        f = tests::shell_quote(&file.to_string_lossy())
    )
}

/// Creates its file on drop, so gated handlers end also when the test fails.
struct Gate(PathBuf);

impl Gate {
    fn open(&self) {
        std::fs::write(&self.0, b"").unwrap();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
    }
}

/// `p2p-node serve --types a --capacity 1` with udp discovery at the host's address, with
/// `handler` for type a (the built-in one when `None`).
fn serve<'a>(host: &'a Host, handler: Option<&str>) -> NsProcess<'a> {
    let listen = format!("{}:7400", host.addr());
    let mut args = vec![
        "--types",
        "a",
        "--capacity",
        "1",
        "--cluster",
        "lan",
        "--listen",
        &listen,
        "--discovery",
        "udp",
        "--insecure",
    ];
    let h;
    if let Some(cmd) = handler {
        h = format!("a={cmd}");
        args.extend(["--handler", &h]);
    }
    host.serve(&args)
}

/// `p2p-node run TASKS --order none --json` with udp discovery, started in `host`.
fn start_run<'a>(host: &'a Host, tasks: &Path) -> NsProcess<'a> {
    let mut cmd = host.p2p_node();
    cmd.arg("run")
        .arg(tasks)
        .args(["--cluster", "lan", "--json", "--order", "none"])
        .args(["--discovery", "udp"])
        .args(["--discovery-interface", &host.addr().to_string()])
        .args(["--discovery-timeout", "20s"]);
    host.start(&mut cmd)
}

fn events(p: &NsProcess) -> Vec<Value> {
    p.stdout
        .snapshot()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Polls the run's events until `pick` returns something, at most [`WAIT`].
fn wait_event<T>(run: &NsProcess, what: &str, pick: impl Fn(&[Value]) -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = pick(&events(run)) {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within {WAIT:?}\n{}",
            run.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node id of the node the run connected to at `host`:7400.
fn node_at(run: &NsProcess, host: &Host) -> String {
    let addr = format!("{}:7400", host.addr());
    wait_event(run, &format!("a connection to {addr}"), |evs| {
        evs.iter()
            .find(|e| e["event"] == "connected" && e["addr"] == addr.as_str())
            .and_then(|e| e["node"].as_str().map(str::to_string))
    })
}

fn named<'a>(evs: &'a [Value], name: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["event"] == name).collect()
}

/// Waits for the run to end and checks it succeeded with `n` completed tasks; its events.
fn finish(run: &mut NsProcess, n: usize) -> Vec<Value> {
    let status = run.wait_exit(tests::RUN_TIMEOUT);
    let Some(status) = status else {
        panic!("the run did not end\n{}", run.describe());
    };
    // The collector threads may still be reading the last lines: the summary is last.
    let evs = wait_event(run, "the summary", |evs| {
        evs.iter()
            .any(|e| e["event"] == "summary")
            .then(|| evs.to_vec())
    });
    assert_eq!(status.code(), Some(0), "{}", run.describe());
    assert_eq!(named(&evs, "task_completed").len(), n, "{}", run.describe());
    evs
}

#[test]
fn a_node_started_mid_run_receives_tasks() {
    let Some(lan) = Lan::new(3) else { return };
    let h = lan.hosts();
    let dir = tests::TestDir::new();
    let tasks = dir.join("tasks.txt");
    let n = 12;
    let ids: Vec<String> = (1..=n).map(|i| format!("a{i}")).collect();
    std::fs::write(&tasks, ids.join(" ") + "\n").unwrap();
    let marks = dir.join("started");
    std::fs::create_dir(&marks).unwrap();
    let release = Gate(dir.join("release"));

    // The first node runs three tasks, then holds the fourth until the test releases it:
    // whatever is left can only go to the node that joins.
    let first = format!(
        "touch {m}/\"$P2P_TASK_ID\"; if [ \"$(ls {m} | wc -l)\" -gt 3 ]; then {gate}; fi; echo first",
        m = tests::shell_quote(&marks.to_string_lossy()),
        gate = wait_for_file(&release.0),
    );
    let _first = serve(&h[0], Some(&first));
    let mut run = start_run(&h[2], &tasks);
    let first_id = node_at(&run, &h[0]);
    wait_event(&run, "three completed tasks", |evs| {
        (named(evs, "task_completed").len() >= 3).then_some(())
    });

    let _second = serve(&h[1], None);
    let second_id = node_at(&run, &h[1]);
    assert_ne!(first_id, second_id);
    wait_event(&run, "a task completed by the node that joined", |evs| {
        named(evs, "task_completed")
            .iter()
            .any(|e| e["node"] == second_id.as_str())
            .then_some(())
    });
    release.open();

    let evs = finish(&mut run, n);
    let by_second = named(&evs, "task_completed")
        .iter()
        .filter(|e| e["node"] == second_id.as_str())
        .count();
    assert!(by_second >= 1, "{}", run.describe());
    let mut done: Vec<String> = named(&evs, "task_completed")
        .iter()
        .map(|e| e["task"].as_str().unwrap_or_default().to_string())
        .collect();
    done.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(done, want, "each task reported once: {}", run.describe());
}

#[test]
fn a_node_killed_during_a_run_is_lost_and_its_task_completes_elsewhere() {
    let Some(lan) = Lan::new(3) else { return };
    let h = lan.hosts();
    let dir = tests::TestDir::new();
    let tasks = dir.join("tasks.txt");
    let n = 8;
    let ids: Vec<String> = (1..=n).map(|i| format!("a{i}")).collect();
    std::fs::write(&tasks, ids.join(" ") + "\n").unwrap();
    let victim_running = Gate(dir.join("victim-running"));
    let release = Gate(dir.join("release"));

    // The survivor waits until the victim holds a task, so the victim surely gets one; the
    // victim holds its task until it is killed (and its orphaned handler until released).
    let survivor = format!("{}; echo survivor", wait_for_file(&victim_running.0));
    let victim = format!(
        "touch {r}; {gate}; echo victim",
        r = tests::shell_quote(&victim_running.0.to_string_lossy()),
        gate = wait_for_file(&release.0),
    );
    let _survivor = serve(&h[0], Some(&survivor));
    let mut victim_node = serve(&h[1], Some(&victim));
    let mut run = start_run(&h[2], &tasks);
    let survivor_id = node_at(&run, &h[0]);
    let victim_id = node_at(&run, &h[1]);
    let held = wait_event(&run, "a task assigned to the victim", |evs| {
        named(evs, "task_assigned")
            .iter()
            .find(|e| e["node"] == victim_id.as_str())
            .and_then(|e| e["task"].as_str().map(str::to_string))
    });
    let deadline = std::time::Instant::now() + WAIT;
    while !victim_running.0.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the victim's handler did not start\n{}",
            victim_node.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    victim_node.signal("KILL");
    victim_node
        .wait_exit(WAIT)
        .expect("the killed node is reaped");
    // Its handler (its own process group) is orphaned: let it end.
    release.open();

    let evs = finish(&mut run, n);
    let lost = named(&evs, "disconnected")
        .into_iter()
        .find(|e| e["node"] == victim_id.as_str())
        .unwrap_or_else(|| panic!("no disconnected event for the victim\n{}", run.describe()));
    assert_eq!(lost["clean"], false, "{lost}");
    let held_done = named(&evs, "task_completed")
        .into_iter()
        .find(|e| e["task"] == held.as_str())
        .unwrap_or_else(|| panic!("{held} never completed\n{}", run.describe()));
    assert_eq!(held_done["node"], survivor_id.as_str(), "{held_done}");
    assert!(
        !named(&evs, "task_completed")
            .iter()
            .any(|e| e["node"] == victim_id.as_str()),
        "{}",
        run.describe()
    );
}
