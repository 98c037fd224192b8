//! Packet loss, delay and reordering without `sch_netem`: a small netem in userspace.
//!
//! Where the kernel has no netem qdisc, [`NetFault::start`] puts a thread into a test
//! namespace (`setns`), binds a netfilter queue there, and `iptables-legacy` rules send the
//! namespace's TCP packets (both directions) to it while an [`Impairment`] is set. Each
//! packet then gets a verdict: dropped with the loss probability, or held for the delay
//! (± jitter) and accepted when due, except the share sent at once ahead of the held ones
//! (reordering, as netem's `reorder`). Without an impairment the rules are removed and
//! traffic passes untouched. The rules use `--queue-bypass`, so if the thread is gone
//! packets pass; the held-packet queue is bounded. Everything happens inside the test's own
//! namespace, which the test deletes afterwards.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most packets held for delay at once; past it the oldest is released early.
const MAX_HELD: usize = 4096;

/// The netfilter queue number used in each namespace (queues are per namespace).
const QUEUE: u16 = 0;

/// What to do to the packets of an impaired namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Percent of packets dropped.
    pub loss_pct: u32,
    /// Delay of the packets not dropped.
    pub delay: Duration,
    /// The delay varies by up to this much either way.
    pub jitter: Duration,
    /// Percent of packets sent at once, overtaking those held.
    pub reorder_pct: u32,
}

/// What a [`NetFault`] did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets that reached the queue.
    pub seen: AtomicU64,
    /// Packets dropped.
    pub dropped: AtomicU64,
    /// Packets held for a delay.
    pub delayed: AtomicU64,
    /// Packets sent ahead of held ones.
    pub reordered: AtomicU64,
}

impl Counters {
    /// `(seen, dropped, delayed, reordered)`.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.seen.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.delayed.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed),
        )
    }
}

/// A userspace packet impairer for one network namespace (see the module docs).
pub struct NetFault {
    ns: String,
    spec: Arc<Mutex<Option<Impairment>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    ruled: bool,
}

impl NetFault {
    /// Starts the queue thread in namespace `ns` (made by `ip netns add`), with `seed` for
    /// its random choices. No packet is touched until [`NetFault::impair`]. An error says
    /// why this machine cannot do it (no netfilter queue, no `iptables-legacy`).
    pub fn start(ns: &str, seed: u64) -> Result<NetFault, String> {
        iptables(ns, &["-L", "OUTPUT", "-n"])?;
        let spec: Arc<Mutex<Option<Impairment>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{ns}");
        let thread = {
            let (spec, stop, counters) = (spec.clone(), stop.clone(), counters.clone());
            std::thread::spawn(move || {
                let queue = open_queue_in(&path);
                let mut queue = match queue {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        q
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(&mut queue, &spec, &stop, &counters, seed | 1);
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err("the netfilter queue thread did not start".into()),
        }
        Ok(NetFault {
            ns: ns.to_string(),
            spec,
            stop,
            thread: Some(thread),
            counters,
            ruled: false,
        })
    }

    /// Impairs the namespace's TCP traffic (`Some`) or stops doing so (`None`; held
    /// packets are released at once).
    pub fn impair(&mut self, imp: Option<Impairment>) -> Result<(), String> {
        if let Ok(mut s) = self.spec.lock() {
            *s = imp;
        }
        match (imp.is_some(), self.ruled) {
            (true, false) => {
                for chain in ["OUTPUT", "INPUT"] {
                    iptables(&self.ns, &rule("-I", chain))?;
                }
                self.ruled = true;
            }
            (false, true) => {
                for chain in ["OUTPUT", "INPUT"] {
                    iptables(&self.ns, &rule("-D", chain))?;
                }
                self.ruled = false;
            }
            _ => {}
        }
        Ok(())
    }

    /// What it did so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Drop for NetFault {
    fn drop(&mut self) {
        let _ = self.impair(None);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rule(op: &str, chain: &str) -> Vec<String> {
    [
        op,
        chain,
        "-p",
        "tcp",
        "-j",
        "NFQUEUE",
        "--queue-num",
        &QUEUE.to_string(),
        "--queue-bypass",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `iptables-legacy ARGS` in `ns`, bounded; its error text if it failed.
fn iptables<S: AsRef<str>>(ns: &str, args: &[S]) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "iptables-legacy", "-w", "5"])
        .args(args.iter().map(AsRef::as_ref));
    crate::run_bounded(cmd, Duration::from_secs(15)).map(drop)
}

/// Moves this thread into the namespace at `path` and binds the queue there.
fn open_queue_in(path: &str) -> Result<nfq::Queue, String> {
    let ns = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&ns),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| format!("setns {path}: {e}"))?;
    let mut q = nfq::Queue::open().map_err(|e| format!("netfilter queue: {e}"))?;
    q.bind(QUEUE)
        .map_err(|e| format!("bind netfilter queue {QUEUE}: {e}"))?;
    // Metadata only: the verdict needs the packet id, not the bytes.
    q.set_copy_range(QUEUE, 0)
        .map_err(|e| format!("netfilter queue copy range: {e}"))?;
    q.set_fail_open(QUEUE, true)
        .map_err(|e| format!("netfilter queue fail-open: {e}"))?;
    q.set_nonblocking(true);
    Ok(q)
}

/// The queue loop: verdicts until `stop`.
fn run(
    q: &mut nfq::Queue,
    spec: &Mutex<Option<Impairment>>,
    stop: &AtomicBool,
    counters: &Counters,
    mut rng: u64,
) {
    let mut random = move |n: u64| {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    };
    let mut held: BTreeMap<(Instant, u64), nfq::Message> = BTreeMap::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let imp = spec.lock().map(|s| *s).unwrap_or(None);
        // Release what is due (everything when not impaired).
        loop {
            let over = held.len() > MAX_HELD;
            let Some(entry) = held.first_entry() else {
                break;
            };
            if imp.is_some() && entry.key().0 > now && !over {
                break;
            }
            let mut msg = entry.remove();
            msg.set_verdict(nfq::Verdict::Accept);
            let _ = q.verdict(msg);
        }
        let mut msg = match q.recv() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        counters.seen.fetch_add(1, Ordering::Relaxed);
        let Some(imp) = imp else {
            msg.set_verdict(nfq::Verdict::Accept);
            let _ = q.verdict(msg);
            continue;
        };
        if random(100) < u64::from(imp.loss_pct) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            msg.set_verdict(nfq::Verdict::Drop);
            let _ = q.verdict(msg);
            continue;
        }
        if random(100) < u64::from(imp.reorder_pct) {
            if !held.is_empty() {
                counters.reordered.fetch_add(1, Ordering::Relaxed);
            }
            msg.set_verdict(nfq::Verdict::Accept);
            let _ = q.verdict(msg);
            continue;
        }
        let jitter = imp.jitter.as_micros() as u64;
        let span = random(2 * jitter + 1);
        let delay = (imp.delay + Duration::from_micros(span)).saturating_sub(imp.jitter);
        counters.delayed.fetch_add(1, Ordering::Relaxed);
        n += 1;
        held.insert((now + delay, n), msg);
    }
    for (_, mut msg) in held {
        msg.set_verdict(nfq::Verdict::Accept);
        let _ = q.verdict(msg);
    }
}
