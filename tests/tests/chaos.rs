//! Chaos on the namespace LAN (see `tests::netns`): 6 serving hosts and a coordinator host;
//! 1,000 tasks `--order none --journal J --retries 3` while serving nodes are killed with
//! SIGKILL and restarted, links are cut at the bridge and healed (some longer than the
//! heartbeat idle timeout), and links are impaired with packet loss, delay and reordering:
//! `tc netem` where the kernel has `sch_netem`, otherwise the same done in userspace on a
//! netfilter queue (`tests::netfault`; `iptables-legacy`), otherwise a `tbf` rate limit, which
//! queues and drops. Skipped, with a printed reason, where namespaces cannot be created.
//!
//! The run must end with every task reported exactly once (one `task_completed` or
//! `task_failed`), none lost, the journal holding exactly those final results, and the exit
//! status matching them. Executions are at-least-once: the handlers log every execution, and
//! the figures show how many ran again after a fault.
//!
//! Bounded: every wait has a hang guard, faults stop when the run ends. Knobs for longer runs
//! (scripts/soak.sh): `P2P_CHAOS_TASKS` (default 1000), `P2P_CHAOS_SEED` (a fixed default, so
//! a failure can be replayed), `P2P_CHAOS_TASK_MS` (handler sleep, default 300).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// The fault schedule's generator: p2p-core's deterministic one, so a seed replays the same
// schedule (the timing of the system under test still varies).
use p2p_core::testing::Rng;
use serde_json::Value;
use tests::netfault::{Impairment, NetFault};
use tests::netns::{Host, Lan, NsProcess, HOST_IF};

/// Serving hosts (the coordinator is one more).
const NODES: usize = 6;

/// Tasks each node runs at once.
const CAPACITY: &str = "4";

/// At most this many serving nodes are down (killed or cut off) at the same time.
const MAX_DOWN: usize = 2;

/// Hang guard of the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A duration of `lo..=hi` milliseconds drawn from `rng`.
fn ms(rng: &mut Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rng.below(hi - lo + 1))
}

/// Runs `program args` in the namespace `ns` (bounded); its error text if it failed.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]).args(args);
    tests::run_bounded(cmd, Duration::from_secs(20)).map(drop)
}

/// Which link impairment the machine supports.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shaping {
    /// `tc qdisc ... netem`: loss, delay, jitter, reordering.
    Netem,
    /// No netem: loss, delay, jitter and reordering in userspace ([`NetFault`]).
    Userspace,
    /// No netem: a `tbf` rate limit (queueing delay, and drops when its queue is full).
    Tbf,
    /// No usable `tc`.
    None,
}

/// The link impairment this machine supports; with [`Shaping::Userspace`], one started
/// [`NetFault`] per serving host.
fn probe_shaping(lan: &Lan, seed: u64) -> (Shaping, Vec<NetFault>) {
    let host = lan.host(1);
    let ns = host.ns();
    let netem = [
        "qdisc", "replace", "dev", HOST_IF, "root", "netem", "delay", "1ms",
    ];
    match in_ns(ns, "tc", &netem) {
        Ok(()) => {
            let _ = in_ns(ns, "tc", &["qdisc", "del", "dev", HOST_IF, "root"]);
            return (Shaping::Netem, Vec::new());
        }
        Err(why) => eprintln!("chaos: no netem ({why}); trying a netfilter queue"),
    }
    let started: Result<Vec<NetFault>, String> = (0..NODES)
        .map(|i| NetFault::start(lan.host(i + 1).ns(), seed.wrapping_add(i as u64)))
        .collect();
    match started {
        Ok(faults) => {
            eprintln!("chaos: loss, delay and reordering done in userspace (netfilter queue)");
            return (Shaping::Userspace, faults);
        }
        Err(why) => {
            eprintln!("chaos: no netfilter queue ({why}); loss/delay/reorder are not injected")
        }
    }
    let tbf = [
        "qdisc", "replace", "dev", HOST_IF, "root", "tbf", "rate", "1mbit", "burst", "16kb",
        "latency", "50ms",
    ];
    match in_ns(ns, "tc", &tbf) {
        Ok(()) => {
            let _ = in_ns(ns, "tc", &["qdisc", "del", "dev", HOST_IF, "root"]);
            eprintln!("chaos: using a tbf rate limit as the link impairment instead");
            (Shaping::Tbf, Vec::new())
        }
        Err(why) => {
            eprintln!("chaos: no usable tc ({why}); no link impairment");
            (Shaping::None, Vec::new())
        }
    }
}

/// What the fault injector did, for the figures.
#[derive(Debug, Default)]
struct Faults {
    kills: usize,
    restarts: usize,
    cuts: usize,
    long_cuts: usize,
    impairments: usize,
    errors: Vec<String>,
}

/// Something to undo later.
#[derive(Debug)]
enum Undo {
    Restart(usize),
    Heal(usize),
    Unshape(usize),
}

struct Chaos<'a> {
    lan: &'a Lan,
    bridge: String,
    shaping: Shaping,
    /// With [`Shaping::Userspace`]: serving node `i`'s impairer.
    netfaults: Vec<NetFault>,
    rng: Rng,
    args: Vec<Vec<String>>,
    nodes: Vec<Option<NsProcess<'a>>>,
    cut: Vec<bool>,
    shaped: Vec<bool>,
    pending: Vec<(Instant, Undo)>,
    faults: Faults,
}

impl<'a> Chaos<'a> {
    /// Host index of serving node `i` (host 0 is the coordinator).
    fn host(&self, i: usize) -> &'a Host {
        self.lan.host(i + 1)
    }

    fn down(&self) -> usize {
        (0..NODES)
            .filter(|&i| self.nodes[i].is_none() || self.cut[i])
            .count()
    }

    fn start_node(&mut self, i: usize) {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        self.nodes[i] = Some(self.host(i).serve(&args));
    }

    fn link(&mut self, i: usize, up: bool) {
        let port = format!("v{}", i + 1);
        let state = if up { "up" } else { "down" };
        if let Err(e) = in_ns(&self.bridge, "ip", &["link", "set", &port, state]) {
            self.faults.errors.push(e);
        }
    }

    /// Impairs node `i`'s link in both directions (its eth0 and its bridge port).
    fn shape(&mut self, i: usize) {
        let delay = format!("{}ms", 5 + self.rng.below(40));
        let jitter = format!("{}ms", 1 + self.rng.below(10));
        let loss = format!("{}%", 1 + self.rng.below(8));
        let reorder = format!("{}%", self.rng.below(25));
        let netem: Vec<&str> = vec![
            "netem", "delay", &delay, &jitter, "loss", &loss, "reorder", &reorder,
        ];
        let tbf: Vec<&str> = vec!["tbf", "rate", "256kbit", "burst", "4kb", "latency", "100ms"];
        let spec = match self.shaping {
            Shaping::Netem => netem,
            Shaping::Tbf => tbf,
            Shaping::Userspace => {
                let imp = Impairment {
                    loss_pct: 1 + self.rng.below(8) as u32,
                    delay: ms(&mut self.rng, 5, 45),
                    jitter: ms(&mut self.rng, 1, 10),
                    reorder_pct: 5 + self.rng.below(20) as u32,
                };
                if let Err(e) = self.netfaults[i].impair(Some(imp)) {
                    self.faults.errors.push(e);
                }
                return;
            }
            Shaping::None => return,
        };
        let port = format!("v{}", i + 1);
        let host_ns = self.host(i).ns().to_string();
        for (ns, dev) in [
            (host_ns.as_str(), HOST_IF),
            (self.bridge.as_str(), port.as_str()),
        ] {
            let mut args = vec!["qdisc", "replace", "dev", dev, "root"];
            args.extend(&spec);
            if let Err(e) = in_ns(ns, "tc", &args) {
                self.faults.errors.push(e);
            }
        }
    }

    fn unshape(&mut self, i: usize) {
        if self.shaping == Shaping::Userspace {
            if let Err(e) = self.netfaults[i].impair(None) {
                self.faults.errors.push(e);
            }
            return;
        }
        let port = format!("v{}", i + 1);
        let host_ns = self.host(i).ns().to_string();
        for (ns, dev) in [
            (host_ns.as_str(), HOST_IF),
            (self.bridge.as_str(), port.as_str()),
        ] {
            let _ = in_ns(ns, "tc", &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    /// Injects one random fault.
    fn strike(&mut self, now: Instant) {
        let i = self.rng.below(NODES as u64) as usize;
        let busy = self.pending.iter().any(|(_, u)| match u {
            Undo::Restart(j) | Undo::Heal(j) | Undo::Unshape(j) => *j == i,
        });
        if busy {
            return;
        }
        match self.rng.below(10) {
            // SIGKILL, restart later on the same address.
            0..=3 if self.down() < MAX_DOWN => {
                if let Some(mut p) = self.nodes[i].take() {
                    p.signal("KILL");
                    let _ = p.wait_exit(Duration::from_secs(10));
                    self.faults.kills += 1;
                    let back = now + ms(&mut self.rng, 300, 3_000);
                    self.pending.push((back, Undo::Restart(i)));
                }
            }
            // Cut the link at the bridge; now and then past the idle timeout (10 s).
            4..=6 if self.down() < MAX_DOWN => {
                let long = self.rng.below(4) == 0;
                self.cut_link(i, now, long);
            }
            7..=9 if self.shaping != Shaping::None && !self.shaped[i] => {
                self.shape(i);
                self.shaped[i] = true;
                self.faults.impairments += 1;
                let back = now + ms(&mut self.rng, 1_000, 6_000);
                self.pending.push((back, Undo::Unshape(i)));
            }
            _ => {}
        }
    }

    /// Cuts node `i`'s link at the bridge, healing it after a few seconds, or (`long`)
    /// after more than the heartbeat idle timeout (10 s), so both sides declare it dead.
    fn cut_link(&mut self, i: usize, now: Instant, long: bool) {
        self.link(i, false);
        self.cut[i] = true;
        self.faults.cuts += 1;
        let back = if long {
            self.faults.long_cuts += 1;
            now + ms(&mut self.rng, 11_000, 13_000)
        } else {
            now + ms(&mut self.rng, 200, 4_000)
        };
        self.pending.push((back, Undo::Heal(i)));
    }

    /// Undoes what is due (all of it when `all`).
    fn undo_due(&mut self, now: Instant, all: bool) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| all || *t <= now);
        self.pending = later;
        for (_, u) in due {
            match u {
                Undo::Restart(i) => {
                    self.start_node(i);
                    self.faults.restarts += 1;
                }
                Undo::Heal(i) => {
                    self.link(i, true);
                    self.cut[i] = false;
                }
                Undo::Unshape(i) => {
                    self.unshape(i);
                    self.shaped[i] = false;
                }
            }
        }
    }
}

fn events(p: &NsProcess) -> Vec<Value> {
    p.stdout
        .snapshot()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The journal's records: task -> statuses (one per line that names it).
fn journal(path: &Path) -> (Value, BTreeMap<String, Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Value = serde_json::from_str(lines.next().expect("a journal header")).unwrap();
    let mut records: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l:?}: {e}"));
        records
            .entry(v["task"].as_str().unwrap().to_string())
            .or_default()
            .push(v["status"].as_str().unwrap().to_string());
    }
    (header, records)
}

#[test]
fn a_thousand_tasks_survive_kills_restarts_cut_links_and_bad_links() {
    let Some(lan) = Lan::new(NODES + 1) else {
        return;
    };
    let n_tasks: usize = env_or("P2P_CHAOS_TASKS", 1000);
    let seed: u64 = env_or("P2P_CHAOS_SEED", 0x5eed_c4a0_5000_0001);
    let task_ms: u64 = env_or("P2P_CHAOS_TASK_MS", 300);
    eprintln!("chaos: seed {seed:#x}, {n_tasks} tasks of {task_ms} ms, {NODES} nodes");
    let dir = tests::TestDir::new();
    let ids: Vec<String> = (1..=n_tasks).map(|i| format!("a{i}")).collect();
    let tasks = dir.write("tasks.txt", &(ids.join(" ") + "\n"));
    let exec_log = dir.join("executions.log");
    let journal_path = dir.join("run.journal");
    let handler = format!(
        "a=echo {{id}} >> {}; sleep {}",
        tests::shell_quote(exec_log.to_str().unwrap()),
        task_ms as f64 / 1000.0
    );

    let coordinator = lan.host(0);
    let (shaping, netfaults) = probe_shaping(&lan, seed);
    let mut chaos = Chaos {
        lan: &lan,
        bridge: lan.namespaces()[0].clone(),
        shaping,
        netfaults,
        rng: Rng(seed | 1),
        args: Vec::new(),
        nodes: Vec::new(),
        cut: vec![false; NODES],
        shaped: vec![false; NODES],
        pending: Vec::new(),
        faults: Faults::default(),
    };
    let mut peers = Vec::new();
    for i in 0..NODES {
        let listen = format!("{}:7400", lan.host(i + 1).addr());
        peers.push(listen.clone());
        chaos.args.push(
            [
                "--types",
                "a",
                "--capacity",
                CAPACITY,
                "--listen",
                &listen,
                "--discovery",
                "none",
                "--insecure",
                "--handler",
                &handler,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
        chaos.nodes.push(None);
        chaos.start_node(i);
    }

    let mut cmd = coordinator.p2p_node();
    cmd.arg("run")
        .arg(&tasks)
        .args(["--json", "--order", "none", "--retries", "3"])
        .arg("--journal")
        .arg(&journal_path)
        // A dialler retries a node that is down this long before giving up on it.
        .args(["--discovery-timeout", "60s"]);
    for p in &peers {
        cmd.args(["--peer", p]);
    }
    let started = Instant::now();
    let mut run = coordinator.start(&mut cmd);
    let mut next_strike = started + Duration::from_millis(500);
    let mut first_strike = true;
    let status = loop {
        if let Some(status) = run.wait_exit(Duration::ZERO) {
            break status;
        }
        let now = Instant::now();
        if now > started + RUN_LIMIT {
            chaos.undo_due(now, true);
            panic!(
                "the run did not end within {RUN_LIMIT:?}; faults {:?}\n{}",
                chaos.faults,
                run.describe()
            );
        }
        chaos.undo_due(now, false);
        if now >= next_strike {
            if first_strike {
                // One cut past the idle timeout in every run, the rest at random.
                chaos.cut_link(0, now, true);
                first_strike = false;
            } else {
                chaos.strike(now);
            }
            next_strike = now + ms(&mut chaos.rng, 200, 700);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    chaos.undo_due(Instant::now(), true);
    // Packets the userspace impairment saw, dropped, delayed and sent out of order.
    let packets = chaos.netfaults.iter().fold((0, 0, 0, 0), |acc, f| {
        let (a, b, c, d) = f.counters().snapshot();
        (acc.0 + a, acc.1 + b, acc.2 + c, acc.3 + d)
    });

    // The collector threads may still be reading the last lines: the summary is last.
    let deadline = Instant::now() + Duration::from_secs(10);
    let evs = loop {
        let evs = events(&run);
        if evs.iter().any(|e| e["event"] == "summary") || Instant::now() > deadline {
            break evs;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let named = |name: &str| {
        evs.iter()
            .filter(|e| e["event"] == name)
            .collect::<Vec<_>>()
    };
    let summary = *named("summary")
        .first()
        .unwrap_or_else(|| panic!("no summary; status {status}\n{}", run.describe()));

    // Exactly one final result per task, none lost.
    let mut finals: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in evs
        .iter()
        .filter(|e| e["event"] == "task_completed" || e["event"] == "task_failed")
    {
        finals
            .entry(e["task"].as_str().unwrap())
            .or_default()
            .push(e["event"].as_str().unwrap());
    }
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !finals.contains_key(id.as_str()))
        .collect();
    let duplicated: Vec<(&&str, &Vec<&str>)> = finals.iter().filter(|(_, v)| v.len() > 1).collect();
    let unknown: Vec<&&str> = finals
        .keys()
        .filter(|k| !ids.iter().any(|id| id == **k))
        .collect();
    let succeeded = finals
        .values()
        .filter(|v| v.first() == Some(&"task_completed"))
        .count();
    let failed = finals.len() - succeeded;

    // Executions (at-least-once): how many ran more than once.
    let executions = std::fs::read_to_string(&exec_log).unwrap_or_default();
    let mut runs_of: HashMap<&str, usize> = HashMap::new();
    for l in executions.lines() {
        *runs_of.entry(l.trim()).or_default() += 1;
    }
    let executed: usize = runs_of.values().sum();
    let re_executed = runs_of.values().filter(|&&n| n > 1).count();

    eprintln!(
        "chaos figures: {} tasks in {:.1} s; faults: {} SIGKILLs, {} restarts, {} link cuts \
         ({} past the idle timeout), {} link impairments ({:?}); results: {} succeeded, {} \
         failed, {} lost, {} duplicate final results; executions: {} ({} tasks ran more than \
         once); retries: {}; disconnections: {} ({} unclean); exit status {}; packets through \
         the userspace impairment: {} seen, {} dropped, {} delayed, {} reordered",
        n_tasks,
        elapsed.as_secs_f64(),
        chaos.faults.kills,
        chaos.faults.restarts,
        chaos.faults.cuts,
        chaos.faults.long_cuts,
        chaos.faults.impairments,
        chaos.shaping,
        succeeded,
        failed,
        lost.len(),
        duplicated.len(),
        executed,
        re_executed,
        named("task_retry").len(),
        named("disconnected").len(),
        named("disconnected")
            .iter()
            .filter(|e| e["clean"] == false)
            .count(),
        status,
        packets.0,
        packets.1,
        packets.2,
        packets.3
    );
    assert!(
        chaos.faults.errors.is_empty(),
        "fault injection failed: {:?}",
        chaos.faults.errors
    );
    assert!(
        lost.is_empty(),
        "{} tasks lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        duplicated.is_empty(),
        "duplicate final results: {duplicated:?}"
    );
    assert!(unknown.is_empty(), "results for unknown tasks: {unknown:?}");

    // The summary and the exit status agree with the results.
    assert_eq!(summary["total"], n_tasks, "{summary}");
    assert_eq!(summary["succeeded"], succeeded, "{summary}");
    assert_eq!(summary["failed"], failed, "{summary}");
    let expected_code = if succeeded == n_tasks { 0 } else { 1 };
    assert_eq!(
        status.code(),
        Some(expected_code),
        "exit status {status} for {succeeded}/{n_tasks} succeeded\n{}",
        run.stderr.text()
    );

    // The journal holds exactly the final results: one line per task, same status.
    let (header, records) = journal(&journal_path);
    assert_eq!(header["tasks"], n_tasks, "{header}");
    assert_eq!(
        records.len(),
        n_tasks,
        "journal records {} tasks",
        records.len()
    );
    for (task, statuses) in &records {
        assert_eq!(
            statuses.len(),
            1,
            "{task} is in the journal {} times",
            statuses.len()
        );
        let expected = match finals.get(task.as_str()).and_then(|v| v.first()) {
            Some(&"task_completed") => "succeeded",
            Some(_) => "failed",
            None => panic!("{task} is in the journal but was never reported"),
        };
        assert_eq!(statuses[0], expected, "{task}: journal and events disagree");
    }

    // Every task that succeeded ran at least once (nothing reported without running).
    for (task, v) in &finals {
        if v[0] == "task_completed" {
            assert!(
                runs_of.contains_key(task),
                "{task} succeeded without running"
            );
        }
    }

    // The cluster served through it all: every node is running (or restarted) at the end.
    for (i, node) in chaos.nodes.iter_mut().enumerate() {
        let node = node.as_mut().expect("restarted");
        assert!(
            node.wait_exit(Duration::ZERO).is_none(),
            "node {i} died on its own\n{}",
            node.describe()
        );
    }
    // Every fault kind the machine supports was injected at least once.
    assert!(
        chaos.faults.kills > 0 && chaos.faults.cuts > 0,
        "{:?}",
        chaos.faults
    );
    if chaos.shaping == Shaping::Userspace {
        assert!(chaos.faults.impairments > 0, "{:?}", chaos.faults);
        let (_, dropped, delayed, reordered) = packets;
        assert!(
            dropped > 0 && delayed > 0 && reordered > 0,
            "the impairment did nothing: {packets:?}"
        );
    }
}
