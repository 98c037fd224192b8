//! A deterministic simulation of the takeover rules of replicated hosted runs (#19 stage
//! 2): the three members of one run's group (`node_cli::hosted::replica::Group`, raft-rs
//! underneath) on simulated hosts (turmoil: simulated time, and datagrams carrying the real
//! wire encoding of `Message::Replica`), each member's log on a simulated disk that
//! survives its crash. The member that acts coordinates a simulated run of 40 tasks: it
//! starts at most two at a time and, a few ticks later, proposes each one's result; once
//! all are committed it proposes the run's end.
//!
//! Faults from the seed: every member's clock runs at its own rate (a tick every 70 to
//! 130 ms: up to 1.86 times apart), message latency, and one scenario of: the host crashed
//! for good; the acting member partitioned from the others, then healed; a member crashed
//! and restarted from its disk; the host cut from one replica, then crashed for good.
//!
//! Checked at every step of the simulation: never two members acting on the run at once;
//! every result a member reports is at the same position of every member's reports (so no
//! result reported anywhere is lost, and none is reported twice). At the end: every member
//! alive reported all 40 results and the run's end. A failure names its seed:
//! `SIM_SEED=N cargo test -p tests --test replica_simulation` replays it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use node_cli::hosted::replica::{
    Applied, Entry, Group, HardState, Log, Mark, Output, Plan, Record, Saved, MARK_RUNNING,
    MARK_SUCCEEDED,
};
use p2p_core::hosted::{RunState, SubmitOptions};
use p2p_core::replica::{Member, Replica};
use p2p_core::{Message, NodeId};

const PORT: u16 = 7100;
const HOSTS: [&str; 3] = ["n1", "n2", "n3"];
const TASKS: usize = 40;
const SEEDS: u64 = 60;
/// Simulated time a seed may take before it counts as not finishing.
const LIMIT: Duration = Duration::from_secs(240);

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// A member's disk: what its `Log` wrote, kept across its crash.
#[derive(Default)]
struct Disk {
    hard_state: HardState,
    entries: Vec<Entry>,
}

struct SimLog(Arc<Mutex<Disk>>);

impl Log for SimLog {
    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        if let Some(first) = entries.first() {
            d.entries.truncate(first.index.saturating_sub(1) as usize);
        }
        d.entries.extend_from_slice(entries);
        Ok(())
    }
    fn save_hard_state(&mut self, hs: &HardState) -> std::io::Result<()> {
        self.0.lock().unwrap().hard_state = hs.clone();
        Ok(())
    }
}

/// What the members did, as the checks see it.
#[derive(Default)]
struct World {
    /// Whether each member acts now.
    acting: HashMap<&'static str, bool>,
    /// Each member's incarnation (it restarts with a new one).
    incarnation: HashMap<&'static str, u32>,
    /// The results each incarnation reported, in order.
    reported: HashMap<(&'static str, u32), Vec<String>>,
    /// The results in the order the first member to report each position did.
    order: Vec<String>,
    /// Whether each member applied the run's end (current incarnation).
    ended: HashMap<&'static str, bool>,
    /// The terms that acted, and the tasks each started.
    started: HashMap<u64, Vec<String>>,
    violations: Vec<String>,
}

fn members() -> Vec<Member> {
    HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| Member {
            node: NodeId([i as u8 + 1; 16]),
            addr: format!("{h}:{PORT}"),
        })
        .collect()
}

fn plan() -> Plan {
    let text: String = (1..=TASKS).map(|i| format!("a{i}\n")).collect();
    Plan {
        name: "sim".into(),
        text,
        options: SubmitOptions {
            order: 2,
            retries: 0,
            keep_going: false,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 100,
            task_timeout_ms: 0,
            discovery_timeout_ms: 1000,
        },
        started_ms: 0,
        inputs: Vec::new(),
    }
}

/// One member: its group, its simulated coordinator, the network.
async fn member(
    name: &'static str,
    id: u64,
    period: Duration,
    work: u64,
    disk: Arc<Mutex<Disk>>,
    world: Rc<RefCell<World>>,
) -> turmoil::Result {
    let sock = turmoil::net::UdpSocket::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let saved = {
        let d = disk.lock().unwrap();
        Saved {
            hard_state: d.hard_state.clone(),
            entries: d.entries.clone(),
        }
    };
    let fresh = saved.entries.is_empty() && saved.hard_state.term == 0;
    let mut g = Group::new("run", members(), id, saved, Box::new(SimLog(disk.clone())))?;
    let incarnation = {
        let mut w = world.borrow_mut();
        let n = w.incarnation.entry(name).or_insert(0);
        *n += 1;
        let n = *n;
        w.reported.insert((name, n), Vec::new());
        w.ended.insert(name, false);
        n
    };
    let mut tick = tokio::time::interval(period);
    let mut buf = vec![0u8; 1 << 16];
    // The simulated coordinator: tasks in flight, ticks left for each.
    let mut flight: HashMap<String, u64> = HashMap::new();
    let mut acting_term = 0u64;
    let mut out = if id == 1 && fresh {
        g.campaign()?
    } else {
        Output::default()
    };
    let mut ticks = 0u64;
    loop {
        send(&sock, &out).await;
        for a in std::mem::take(&mut out.applied) {
            report(&world, name, incarnation, a);
        }
        {
            let acting = g.acting();
            world.borrow_mut().acting.insert(name, acting);
            if !acting {
                flight.clear();
                acting_term = 0;
            } else if acting_term != g.term() {
                acting_term = g.term();
                flight.clear();
            }
        }
        tokio::select! {
            _ = tick.tick() => {
                ticks += 1;
                out = g.tick()?;
                if id == 1 && g.machine().plan.is_none() && ticks.is_multiple_of(10) {
                    // The host proposes its plan until it is committed (forwarded to a
                    // leader that is not the host).
                    if let Ok(more) = g.propose_plan(&plan()) {
                        out.send.extend(more.send);
                        out.applied.extend(more.applied);
                    }
                }
                if g.acting() {
                    let records = coordinate(&g, &mut flight, work, &world);
                    if !records.is_empty() {
                        let more = g.propose_all(&records)?;
                        out.send.extend(more.send);
                        out.applied.extend(more.applied);
                    }
                }
            }
            got = sock.recv_from(&mut buf) => {
                let (n, _) = got?;
                out = match p2p_core::wire::decode(&buf[..n]) {
                    Ok(Message::Replica(r)) if r.is_bounded() => match *r {
                        Replica::Raft(m) => g.step(*m).unwrap_or_default(),
                        Replica::Cancel { .. } => Output::default(),
                    },
                    _ => Output::default(),
                };
            }
        }
    }
}

/// One tick of the acting member's simulated run: results of tasks done, new tasks
/// started (two at most in flight), the end once every result is committed.
fn coordinate(
    g: &Group,
    flight: &mut HashMap<String, u64>,
    work: u64,
    world: &Rc<RefCell<World>>,
) -> Vec<Record> {
    let m = g.machine();
    let term = g.term();
    let mut records = Vec::new();
    if m.finals.len() == TASKS {
        if m.ended.is_none() {
            records.push(Record::End {
                term,
                state: RunState::Succeeded,
                exit: 0,
            });
        }
        return records;
    }
    let mut done = Vec::new();
    for (task, left) in flight.iter_mut() {
        *left = left.saturating_sub(1);
        if *left == 0 {
            done.push(task.clone());
        }
    }
    for task in done {
        flight.remove(&task);
        records.push(Record::Event {
            term,
            json: format!("{{\"event\":\"task_completed\",\"task\":\"{task}\"}}"),
            mark: Some(Mark {
                task,
                state: MARK_SUCCEEDED,
                node: String::new(),
            }),
        });
    }
    let proposed: HashSet<&str> = records
        .iter()
        .filter_map(|r| match r {
            Record::Event { mark: Some(m), .. } => Some(m.task.as_str()),
            _ => None,
        })
        .collect();
    let proposed: HashSet<String> = proposed.into_iter().map(str::to_owned).collect();
    for i in 1..=TASKS {
        if flight.len() >= 2 {
            break;
        }
        let task = format!("a{i}");
        if m.finals.contains_key(&task) || flight.contains_key(&task) || proposed.contains(&task) {
            continue;
        }
        flight.insert(task.clone(), work);
        world
            .borrow_mut()
            .started
            .entry(term)
            .or_default()
            .push(task.clone());
        records.push(Record::Event {
            term,
            json: format!("{{\"event\":\"task_assigned\",\"task\":\"{task}\"}}"),
            mark: Some(Mark {
                task,
                state: MARK_RUNNING,
                node: String::new(),
            }),
        });
    }
    records
}

async fn send(sock: &turmoil::net::UdpSocket, out: &Output) {
    for m in &out.send {
        let to = HOSTS[(m.to - 1) as usize];
        let mut buf = BytesMut::new();
        let msg = Message::Replica(Box::new(Replica::Raft(Box::new(m.clone()))));
        p2p_core::wire::encode_into(&msg, &mut buf).unwrap();
        let _ = sock.send_to(&buf, (turmoil::lookup(to), PORT)).await;
    }
}

fn report(world: &Rc<RefCell<World>>, name: &'static str, inc: u32, a: Applied) {
    let mut w = world.borrow_mut();
    match a {
        Applied::Event { mark: Some(m), .. } if m.is_final() => {
            let list = w.reported.get_mut(&(name, inc)).unwrap();
            if list.contains(&m.task) {
                let v = format!("{name}#{inc} reported {} twice", m.task);
                w.violations.push(v);
                return;
            }
            list.push(m.task.clone());
            let at = list.len() - 1;
            match w.order.get(at) {
                Some(t) if *t != m.task => {
                    let v = format!(
                        "{name}#{inc} reported {} at {at}, where another member reported {t}",
                        m.task
                    );
                    w.violations.push(v);
                }
                Some(_) => {}
                None => w.order.push(m.task),
            }
        }
        Applied::End { .. } => {
            w.ended.insert(name, true);
        }
        _ => {}
    }
}

#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// The host crashes at this time, for good.
    HostCrash(Duration),
    /// The member acting at `at` is cut from both others for `for_`.
    PartitionActing { at: Duration, for_: Duration },
    /// A member crashes at `at` and restarts from its disk after `down`.
    Restart {
        host: usize,
        at: Duration,
        down: Duration,
    },
    /// The host is cut from n2 at `at`, then crashes for good at `crash`.
    CutThenCrash { at: Duration, crash: Duration },
}

/// How a seed went: its line, and whether its fault came while the run was not over.
type Outcome = (String, bool, usize);

fn simulate(seed: u64) -> Result<Outcome, String> {
    let mut r = Rng(seed);
    let periods: Vec<Duration> = (0..3)
        .map(|_| Duration::from_millis(r.range(70, 131)))
        .collect();
    let latency = Duration::from_millis(r.range(1, 21));
    let work = r.range(2, 6);
    let secs = |r: &mut Rng, lo: u64, hi: u64| Duration::from_millis(r.range(lo * 1000, hi * 1000));
    let scenario = match seed % 4 {
        0 => Scenario::HostCrash(secs(&mut r, 1, 6)),
        1 => Scenario::PartitionActing {
            at: secs(&mut r, 1, 6),
            for_: secs(&mut r, 2, 15),
        },
        2 => Scenario::Restart {
            host: r.range(0, 3) as usize,
            at: secs(&mut r, 1, 6),
            down: secs(&mut r, 1, 10),
        },
        _ => Scenario::CutThenCrash {
            at: secs(&mut r, 1, 4),
            crash: secs(&mut r, 5, 9),
        },
    };
    let world: Rc<RefCell<World>> = Rc::default();
    let disks: Vec<Arc<Mutex<Disk>>> = (0..3).map(|_| Arc::default()).collect();
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(LIMIT + Duration::from_secs(10))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(latency)
        .build();
    for (i, &name) in HOSTS.iter().enumerate() {
        let (period, disk, world) = (periods[i], disks[i].clone(), world.clone());
        sim.host(name, move || {
            member(
                name,
                i as u64 + 1,
                period,
                work,
                disk.clone(),
                world.clone(),
            )
        });
    }
    let mut down: HashSet<&str> = HashSet::new();
    let mut gone: HashSet<&str> = HashSet::new();
    let mut cut: Option<(&str, Duration)> = None;
    let mut done_fault = false;
    let mut restart_at: Option<(usize, Duration)> = None;
    let mut cut_n2 = false;
    // Whether the fault came while the run was not over everywhere.
    let mut mid_run = false;
    let describe = format!("seed {seed}: {scenario:?}, tick periods {periods:?}, latency up to {latency:?}, {work} ticks a task");
    loop {
        let now = sim.elapsed();
        let over = {
            let w = world.borrow();
            HOSTS
                .iter()
                .all(|h| w.ended.get(h).copied().unwrap_or(false))
        };
        let before = done_fault;
        match scenario {
            Scenario::HostCrash(at) if !done_fault && now >= at => {
                done_fault = true;
                sim.crash("n1");
                down.insert("n1");
                gone.insert("n1");
            }
            Scenario::PartitionActing { at, for_ } if !done_fault && now >= at => {
                let acting = world
                    .borrow()
                    .acting
                    .iter()
                    .find(|(_, &a)| a)
                    .map(|(n, _)| *n);
                if over {
                    done_fault = true;
                } else if let Some(n) = acting {
                    done_fault = true;
                    for other in HOSTS.iter().filter(|h| **h != n) {
                        sim.partition(n, *other);
                    }
                    cut = Some((n, now + for_));
                }
            }
            Scenario::Restart { host, at, down: d } if !done_fault && now >= at => {
                done_fault = true;
                sim.crash(HOSTS[host]);
                down.insert(HOSTS[host]);
                restart_at = Some((host, now + d));
            }
            Scenario::CutThenCrash { at, crash } => {
                if !cut_n2 && now >= at {
                    cut_n2 = true;
                    sim.partition("n1", "n2");
                }
                if !done_fault && now >= crash {
                    done_fault = true;
                    sim.crash("n1");
                    down.insert("n1");
                    gone.insert("n1");
                }
            }
            _ => {}
        }
        if done_fault && !before && !over {
            mid_run = true;
        }
        if let Some((n, until)) = cut {
            if now >= until {
                for other in HOSTS.iter().filter(|h| **h != n) {
                    sim.repair(n, *other);
                }
                cut = None;
            }
        }
        if let Some((h, at)) = restart_at {
            if now >= at {
                sim.bounce(HOSTS[h]);
                down.remove(HOSTS[h]);
                restart_at = None;
            }
        }
        {
            let mut w = world.borrow_mut();
            for n in &down {
                w.acting.insert(n, false);
            }
            let actors: Vec<&str> = w
                .acting
                .iter()
                .filter(|(_, &a)| a)
                .map(|(n, _)| *n)
                .collect();
            if actors.len() > 1 {
                let v = format!("{actors:?} act at once at {now:?}");
                w.violations.push(v);
            }
            if !w.violations.is_empty() {
                return Err(format!("{describe}: {}", w.violations.join("; ")));
            }
            let alive: Vec<&str> = HOSTS
                .iter()
                .copied()
                .filter(|h| !down.contains(h))
                .collect();
            let finished = alive.iter().all(|h| {
                let inc = w.incarnation.get(h).copied().unwrap_or(0);
                w.ended.get(h).copied().unwrap_or(false)
                    && w.reported.get(&(*h, inc)).map_or(0, Vec::len) == TASKS
            });
            if finished && done_fault && cut.is_none() && restart_at.is_none() {
                let terms: Vec<u64> = {
                    let mut t: Vec<u64> = w.started.keys().copied().collect();
                    t.sort();
                    t
                };
                let starts: usize = w.started.values().map(Vec::len).sum();
                let _ = &gone;
                return Ok((
                    format!(
                        "{describe}: finished at {now:?}, coordinated in terms {terms:?}, \
                         {starts} task starts for {TASKS} tasks, fault mid-run: {mid_run}"
                    ),
                    mid_run,
                    terms.len(),
                ));
            }
        }
        if now > LIMIT {
            let w = world.borrow();
            return Err(format!(
                "{describe}: did not finish by {LIMIT:?}: reported {:?}, ended {:?}",
                w.reported
                    .iter()
                    .map(|(k, v)| (k, v.len()))
                    .collect::<Vec<_>>(),
                w.ended
            ));
        }
        if let Err(e) = sim.step() {
            return Err(format!("{describe}: the simulation failed: {e}"));
        }
    }
}

#[test]
fn never_two_coordinators_and_never_a_lost_or_repeated_result() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => (0..SEEDS).collect(),
    };
    let mut failures = Vec::new();
    let (mut mid, mut takeovers) = (0, 0);
    let n = seeds.len();
    for seed in seeds {
        match simulate(seed) {
            Ok((line, mid_run, terms)) => {
                mid += usize::from(mid_run);
                takeovers += usize::from(terms > 1);
                if std::env::var_os("SIM_VERBOSE").is_some() {
                    eprintln!("{line}");
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{n} seeds: the fault came mid-run in {mid}; {takeovers} coordinated in more than one term"
    );
    // The faults must hit runs that are not over, or the checks above check little.
    assert!(
        mid * 10 >= n * 8,
        "the fault came mid-run in only {mid} of {n} seeds"
    );
}
