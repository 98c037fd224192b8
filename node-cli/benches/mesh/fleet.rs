//! The `fleet` section of the mesh bench (#20): many serving processes in one run.
//!
//! `--fleet N` (default 1,000; 200 with `--quick`) processes of `p2p-node serve --types a
//! --listen 127.0.0.1:0 --discovery none --capacity 1`, each with its own identity file,
//! then two runs of `--order none --json` with five tasks a node, over the first 100 nodes
//! (a peers file, `--peers-file`) and over all of them. Reported:
//!
//! - each `serve`'s memory, idle and after the runs: `VmRSS` (mean and max), and what is
//!   its own (`RssAnon`; `Pss` of `smaps_rollup`, the binary's pages shared out);
//! - the coordinator's peak RSS and connect time (spawn to the last `connected` event) for
//!   100 and for N nodes, and their cost per node as the ratio;
//! - how many nodes connected and were used (from the run's `task_completed` events), and
//!   the run's time.
//!
//! With `--before PATH`, the same with that build (its serving processes and its `run`,
//! which gets `--peer` flags), in the same bench run.

use super::*;

/// How long one fleet run may take.
const FLEET_RUN_DEADLINE: Duration = Duration::from_secs(180);

/// Tasks per node in a fleet run.
const TASKS_PER_NODE: usize = 5;

/// Serving processes, their pids and addresses.
struct Fleet {
    procs: Vec<Proc>,
    addrs: Vec<String>,
    boot: Duration,
}

impl Fleet {
    /// Starts `n` serving processes of `bin` (stdout and stderr to files under `dir`, no
    /// pipe held open here) and waits for each one's `listening on ADDR`.
    fn start(bin: &Path, n: usize, dir: &Path) -> Result<Fleet> {
        let ids = dir.join("ids");
        std::fs::create_dir_all(&ids)?;
        let started = Instant::now();
        let mut procs = Vec::with_capacity(n);
        let mut outs = Vec::with_capacity(n);
        for i in 0..n {
            let out = dir.join(format!("serve-{i}.out"));
            let err = dir.join(format!("serve-{i}.err"));
            let identity = ids.join(format!("node-{i}"));
            let mut cmd = Command::new(bin);
            cmd.args(["serve", "--types", "a", "--listen", "127.0.0.1:0"])
                .args(["--discovery", "none", "--capacity", "1"])
                .arg("--identity")
                .arg(&identity)
                .env("RUST_LOG", "warn")
                .env_remove("P2P_KEY_FILE")
                .stdin(Stdio::null())
                .stdout(Stdio::from(std::fs::File::create(&out)?))
                .stderr(Stdio::from(std::fs::File::create(&err)?));
            tests::isolate(&mut cmd);
            let child = cmd
                .spawn()
                .with_context(|| format!("spawn serving process {i} of {n}"))?;
            procs.push(ChildGuard::new(child));
            outs.push(out);
        }
        let deadline = started + START_DEADLINE + Duration::from_millis(50) * n as u32;
        let mut addrs = vec![String::new(); n];
        let mut left: Vec<usize> = (0..n).collect();
        while !left.is_empty() {
            left.retain(|&i| {
                let text = std::fs::read_to_string(&outs[i]).unwrap_or_default();
                match text
                    .lines()
                    .next()
                    .and_then(|l| l.strip_prefix("listening on "))
                {
                    Some(a) if text.contains('\n') => {
                        addrs[i] = a.trim().to_string();
                        false
                    }
                    _ => true,
                }
            });
            if left.is_empty() {
                break;
            }
            if let Some(&i) = left.iter().find(|&&i| procs[i].try_wait().is_some()) {
                let err = std::fs::read_to_string(dir.join(format!("serve-{i}.err")))?;
                bail!("serving process {i} exited before listening: {err}");
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {n} serving processes did not listen in time",
                    left.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for a in &addrs {
            let addr: std::net::SocketAddr = a.parse().with_context(|| format!("address {a}"))?;
            if !addr.ip().is_loopback() {
                bail!("a serving process listens on {addr}, not loopback");
            }
        }
        Ok(Fleet {
            procs,
            addrs,
            boot: started.elapsed(),
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(ChildGuard::id).collect()
    }
}

/// Memory of a set of processes, in KiB.
struct Mem {
    rss_mean: f64,
    rss_max: u64,
    anon_mean: f64,
    anon_max: u64,
    pss_mean: f64,
    threads_max: u64,
}

fn status_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn memory(pids: &[u32]) -> Result<Mem> {
    let (mut rss, mut anon, mut pss) = (Vec::new(), Vec::new(), Vec::new());
    let mut threads_max = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("serving process {pid} is gone"))?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        rss.push(status_kb(&status, "VmRSS:").unwrap_or(0));
        anon.push(status_kb(&status, "RssAnon:").unwrap_or(0));
        pss.push(status_kb(&rollup, "Pss:").unwrap_or(0));
        threads_max = threads_max.max(status_kb(&status, "Threads:").unwrap_or(0));
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    Ok(Mem {
        rss_mean: mean(&rss),
        rss_max: rss.iter().copied().max().unwrap_or(0),
        anon_mean: mean(&anon),
        anon_max: anon.iter().copied().max().unwrap_or(0),
        pss_mean: mean(&pss),
        threads_max,
    })
}

/// What one fleet run measured.
struct FleetRun {
    wall: Duration,
    /// From spawning `run` to its last `connected` event.
    connect: Duration,
    peak_rss_kb: u64,
    connected: usize,
    used: usize,
    completed: usize,
}

/// `p2p-node run FILE --order none --json` over `addrs` (a peers file, or `--peer` flags
/// for a build without `--peers-file`), read as it runs.
fn fleet_run(bin: &Path, addrs: &[String], dir: &Path, with_file: bool) -> Result<FleetRun> {
    let n = addrs.len();
    let file = task_file_of(dir, "fleet", TASKS_PER_NODE * n, &["a"])?;
    let mut args: Vec<String> = vec![
        "run".into(),
        file.display().to_string(),
        "--order".into(),
        "none".into(),
        "--json".into(),
    ];
    if with_file {
        let peers = dir.join(format!("peers-{n}.txt"));
        std::fs::write(&peers, addrs.join("\n") + "\n")?;
        args.extend(["--peers-file".into(), peers.display().to_string()]);
    } else {
        for a in addrs {
            args.extend(["--peer".into(), a.clone()]);
        }
    }
    let started = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .env_remove("P2P_KEY_FILE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(
            dir.join("fleet-run.err"),
        )?));
    tests::isolate(&mut cmd);
    let mut child = cmd.spawn().context("spawn p2p-node run")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut proc = ChildGuard::new(child);
    let pid = proc.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut connected = 0usize;
        let mut last_connect = Duration::ZERO;
        let mut used = HashSet::new();
        let mut completed = 0usize;
        let mut r = BufReader::with_capacity(1 << 16, stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.contains("\"event\":\"connected\"") {
                connected += 1;
                last_connect = started.elapsed();
            } else if line.contains("\"event\":\"task_completed\"") {
                completed += 1;
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(node) = v["node"].as_str() {
                        used.insert(node.to_string());
                    }
                }
            }
        }
        let _ = tx.send((connected, last_connect, used.len(), completed));
    });
    let deadline = started + FLEET_RUN_DEADLINE;
    let mut peak = 0;
    let status = loop {
        if let Some(s) = proc.try_wait() {
            break s;
        }
        peak = peak.max(peak_rss_kb(pid).unwrap_or(0));
        if Instant::now() > deadline {
            bail!("fleet run over {n} nodes did not finish within {FLEET_RUN_DEADLINE:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = started.elapsed();
    let (connected, connect, used, completed) = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow!("the fleet run's output did not end"))?;
    if !status.success() {
        let err = std::fs::read_to_string(dir.join("fleet-run.err")).unwrap_or_default();
        bail!("fleet run over {n} nodes exited with {status}: {err}");
    }
    Ok(FleetRun {
        wall,
        connect,
        peak_rss_kb: peak,
        connected,
        used,
        completed,
    })
}

/// One build's figures: serving processes' memory, runs over 100 and `n` nodes.
fn one_build(
    bin: &Path,
    label: &str,
    n: usize,
    dir: &Path,
    new: bool,
    rep: &mut Report,
) -> Result<()> {
    let dir = dir.join(format!("fleet-{label}"));
    std::fs::create_dir_all(&dir)?;
    let fleet = Fleet::start(bin, n, &dir)?;
    // Let each finish starting (its first blocking work, its first load reading).
    std::thread::sleep(Duration::from_secs(3));
    let pids = fleet.pids();
    let idle = memory(&pids)?;
    let mem_row = |rep: &mut Report, when: &str, m: &Mem| {
        rep.add(
            format!("fleet {label}: serve {when}, VmRSS mean / max"),
            format!(
                "{:.1} / {:.1} MB",
                m.rss_mean / 1024.0,
                m.rss_max as f64 / 1024.0
            ),
            format!(
                "own (RssAnon) {:.2} / {:.2} MB, Pss {:.2} MB, threads <= {}",
                m.anon_mean / 1024.0,
                m.anon_max as f64 / 1024.0,
                m.pss_mean / 1024.0,
                m.threads_max
            ),
        );
    };
    mem_row(rep, "idle", &idle);
    let small = n.min(100);
    let a = fleet_run(bin, &fleet.addrs[..small], &dir, new)?;
    let b = fleet_run(bin, &fleet.addrs, &dir, new)?;
    let after = memory(&pids)?;
    mem_row(rep, "after the runs", &after);
    for (k, r) in [(small, &a), (n, &b)] {
        rep.add(
            format!("fleet {label}: {k} nodes: connected / used"),
            format!("{} / {} of {k}", r.connected, r.used),
            format!(
                "{} tasks, run took {:.2} s",
                r.completed,
                r.wall.as_secs_f64()
            ),
        );
        rep.add(
            format!("fleet {label}: {k} nodes: coordinator peak RSS, connect time"),
            format!(
                "{:.1} MB, {:.3} s",
                r.peak_rss_kb as f64 / 1024.0,
                r.connect.as_secs_f64()
            ),
            format!(
                "{:.1} kB and {:.3} ms a node",
                r.peak_rss_kb as f64 / k as f64,
                r.connect.as_secs_f64() * 1e3 / k as f64
            ),
        );
    }
    if n > small {
        let extra = (n - small) as f64;
        let mem_per = (b.peak_rss_kb as f64 - a.peak_rss_kb as f64) / extra;
        let small_per = a.connect.as_secs_f64() / small as f64;
        let big_per = b.connect.as_secs_f64() / n as f64;
        rep.add(
            format!("fleet {label}: cost per node, {n} against {small}"),
            format!("{mem_per:.1} kB"),
            format!(
                "connect {:.3} ms a node at {n}, {:.2}x that at {small}; started {n} in {:.2} s",
                big_per * 1e3,
                big_per / small_per.max(1e-9),
                fleet.boot.as_secs_f64()
            ),
        );
    }
    drop(fleet);
    Ok(())
}

pub(super) fn fleet(o: &Opts, d: &Path, rep: &mut Report) -> Result<()> {
    // The runs and this process hold a descriptor per node.
    let limit = node_cli::fdlimit::raise();
    let n = o.fleet;
    if limit.connections() < n {
        bail!("fleet of {n}: {limit}, too low for the runs (raise it with ulimit -n)");
    }
    if let Some(before) = &o.before {
        one_build(before, "before", n, d, false, rep)?;
    }
    one_build(&o.bin, "now", n, d, true, rep)?;
    Ok(())
}
