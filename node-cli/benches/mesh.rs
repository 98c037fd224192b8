//! `cargo bench -p node-cli --bench mesh`: how fast p2p-node is, next to what the machine
//! allows, measured in one run on loopback (127.0.0.1) only.
//!
//! # What it measures
//!
//! - **raw**: the ceiling. A tokio TCP round trip (`TCP_NODELAY`, multi-thread runtime, as
//!   p2p-node uses) between this process and a copy of itself started as an echo peer, with
//!   frames of the size of our `Assign` and `Completed`; and the same frames pipelined.
//! - **strict**: `p2p-node run --order strict` over three `p2p-node serve` processes (types
//!   a, b, c; built-in handler): mean and p99 per-task round trip, and the ratio to raw.
//! - **none**: `--order none` over three serving processes, with their default capacity and
//!   with `--capacity 1024` (a window deep enough to pipeline); tasks/s over the whole process
//!   and over the run phase, and the ratio to raw pipelined frames/s.
//! - **local**: the same with `--local` (in-process nodes).
//! - **scale**: 1,000,000 tasks in one run (tasks/s, the coordinator's peak RSS, and its
//!   growth per task against a run of a tenth of the size).
//! - **nodes**: 100 serving processes, all used in one run.
//! - **key**: with a cluster key (`p2p-node keygen`, `--key-file`) against without.
//! - **json**: `--json` into a file against `--quiet`, for the 1,000,000-task run.
//! - **placement**: shell handlers that sleep, each case a ratio within the same run: two
//!   nodes, one 5x slower, 40 tasks in strict order, against the fast node alone; one task
//!   of cost 10 after ten of cost 1 on two nodes of capacity 1 (`--order none`), against
//!   the longest-first makespan (1.0 s); six nodes of speeds 1x..6x and 2,000 tasks of
//!   random cost, against the lower bound (total work / total speed), and with `--before
//!   PATH` (an earlier `p2p-node`) against that build's placement; two runs on one node of
//!   capacity 2, 1,000 tasks and 10 started a second later, the small one against its time
//!   alone.
//! - **files**: a large input shipped to a node against a raw TCP copy, with and without a
//!   key; an input shared by many tasks over 3 nodes; a pipeline passing artifacts against
//!   a shared directory (see `mesh/files.rs`).
//! - **fleet**: 1,000 serving processes of capacity 1 (`--fleet N`): each one's memory idle
//!   and after, the coordinator's peak RSS and connect time for 100 nodes and for all, every
//!   node connected and used (see `mesh/fleet.rs`).
//!
//! # Options
//!
//! `--quick` (smaller counts), `--only raw,strict,none,local,scale,nodes,key,json,placement,files,fleet`,
//! `--fleet N` (the fleet section's serving processes, default 1,000), `--file-mib N` (the files section's large input, default 256), `--large` (1 GiB),
//! `--drop-caches` (the files section syncs and frees the page cache before each timed
//! copy, then reads the input back in: root only),
//! `--tasks N` (the large runs), `--strict-tasks N`, `--nodes N`, `--capacity N` (of the
//! serving processes in the large runs; 0 skips those runs), `--bin PATH` (or env
//! `P2P_NODE_BIN`; default: the `p2p-node` cargo built for this bench), `--before PATH` (an
//! earlier build, for the placement and fleet sections' comparison).
//!
//! Every process it starts is killed by PID when it is done (or when the bench fails), every
//! wait has a deadline, and nothing listens on or connects to anything but 127.0.0.1.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use p2p_core::{testing, Assign, Completed, Message};
use tests::{peak_rss_kb, ChildGuard, Serve as Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "mesh/files.rs"]
mod files;
#[path = "mesh/fleet.rs"]
mod fleet;

/// The longest any single measured command may take before it is killed.
const RUN_DEADLINE: Duration = Duration::from_secs(600);
/// How long a serving process may take to print `listening on ADDR`.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// The echo peer exits on its own after this long, whatever happens to the bench.
const ECHO_LIFETIME: Duration = Duration::from_secs(900);
/// Largest frame the echo peer accepts.
const ECHO_MAX_FRAME: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--echo-peer") {
        if let Err(e) = echo_peer() {
            eprintln!("echo peer: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    match Opts::parse(&args).and_then(|o| bench(&o)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("mesh bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Command-line options of the bench.
struct Opts {
    bin: PathBuf,
    only: Option<HashSet<String>>,
    /// Tasks in the large runs (`--order none`, scale, json, key).
    tasks: usize,
    /// Tasks of the strict runs.
    strict_tasks: usize,
    /// Serving processes of the many-nodes run.
    nodes: usize,
    /// `--capacity` of the serving processes in the large runs.
    window: u32,
    /// Round trips of the raw ping-pong.
    pings: usize,
    /// Frames of the raw pipelined run.
    frames: usize,
    /// An earlier build, for the placement comparison.
    before: Option<PathBuf>,
    /// The files section's large input, in MiB.
    file_mib: u64,
    /// Rounds of the files section's large input (each: a raw copy, then a node's transfer
    /// without and with a key, in turn).
    file_rounds: usize,
    /// Serving processes of the fleet section.
    fleet: usize,
    /// The files section frees the page cache before each timed copy (root only).
    drop_caches: bool,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut o = Opts {
            bin: std::env::var_os("P2P_NODE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_p2p-node"))),
            only: None,
            tasks: 1_000_000,
            strict_tasks: 20_000,
            nodes: 100,
            window: 1024,
            pings: 20_000,
            frames: 2_000_000,
            before: None,
            file_mib: 256,
            file_rounds: 5,
            fleet: 1000,
            drop_caches: false,
        };
        let mut it = args.iter();
        let num = |v: Option<&String>, flag: &str| -> Result<usize> {
            v.ok_or_else(|| anyhow!("{flag} needs a number"))?
                .replace('_', "")
                .parse::<usize>()
                .with_context(|| format!("{flag}: not a number"))
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "--quick" => {
                    o.tasks = 100_000;
                    o.strict_tasks = 3_000;
                    o.nodes = 20;
                    o.pings = 5_000;
                    o.frames = 500_000;
                    o.fleet = 200;
                }
                "--only" => {
                    let v = it.next().ok_or_else(|| anyhow!("--only needs a list"))?;
                    o.only = Some(v.split(',').map(str::to_string).collect());
                }
                "--bin" => {
                    o.bin = PathBuf::from(it.next().ok_or_else(|| anyhow!("--bin needs a path"))?)
                }
                "--before" => {
                    o.before = Some(PathBuf::from(
                        it.next().ok_or_else(|| anyhow!("--before needs a path"))?,
                    ))
                }
                "--large" => o.file_mib = 1024,
                "--drop-caches" => o.drop_caches = true,
                "--file-mib" => o.file_mib = num(it.next(), "--file-mib")?.clamp(1, 16384) as u64,
                "--file-rounds" => o.file_rounds = num(it.next(), "--file-rounds")?.clamp(1, 20),
                "--tasks" => o.tasks = num(it.next(), "--tasks")?.max(1000),
                "--strict-tasks" => o.strict_tasks = num(it.next(), "--strict-tasks")?.max(100),
                "--fleet" => o.fleet = num(it.next(), "--fleet")?.clamp(2, 4000),
                "--nodes" => o.nodes = num(it.next(), "--nodes")?.clamp(1, 200),
                "--capacity" => {
                    o.window = u32::try_from(num(it.next(), "--capacity")?.min(65_536))?
                }
                other => bail!(
                    "unknown argument {other:?}; options: --quick, --only LIST, --tasks N, \
                     --strict-tasks N, --nodes N, --capacity N, --bin PATH, --before PATH, \
                     --file-mib N, --file-rounds N, --large, --drop-caches, --fleet N"
                ),
            }
        }
        Ok(o)
    }

    fn wants(&self, section: &str) -> bool {
        self.only.as_ref().is_none_or(|s| s.contains(section))
    }
}

/// One row of the results table.
struct Row {
    what: String,
    value: String,
    ratio: String,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>, ratio: impl Into<String>) {
        let row = Row {
            what: what.into(),
            value: value.into(),
            ratio: ratio.into(),
        };
        eprintln!("  {:<58} {:>16}  {}", row.what, row.value, row.ratio);
        self.rows.push(row);
    }

    fn print(&self) {
        println!();
        println!("{:<58} {:>16}  RATIO", "MEASURE", "VALUE");
        for r in &self.rows {
            println!("{:<58} {:>16}  {}", r.what, r.value, r.ratio);
        }
    }
}

/// The ceiling measured in this run, for ratios.
#[derive(Default)]
struct Baseline {
    rtt_us: Option<f64>,
    /// The raw round trip taken in turn with three echo processes, as strict order does.
    rtt3_us: Option<f64>,
    /// The p99 of that round trip in turn with three.
    rtt3_p99_us: Option<f64>,
    frames_per_s: Option<f64>,
}

fn bench(o: &Opts) -> Result<()> {
    if !o.bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p node-cli` or pass --bin",
            o.bin.display()
        );
    }
    // The harness's processes (`serve`) run this binary.
    tests::use_bin(o.bin.clone());
    eprintln!("p2p-node: {}", o.bin.display());
    eprintln!("machine: {}", machine());
    let dir = tempfile::tempdir().context("temporary directory")?;
    let d = dir.path();
    // The nodes keep their identities here, not in the home directory.
    std::env::set_var("P2P_DATA_DIR", d.join("data"));
    let mut rep = Report { rows: Vec::new() };
    let mut base = Baseline::default();
    let window = o.window.to_string();
    let windowed: [&str; 2] = ["--capacity", &window];
    let three = |key: Option<&Path>, extra: &[&str]| -> Result<Vec<Server>> {
        ["a", "b", "c"]
            .iter()
            .map(|t| serve(t, key, extra))
            .collect()
    };
    if o.wants("raw") {
        raw(o, &mut rep, &mut base)?;
    }
    if o.wants("strict") {
        let servers = three(None, &[])?;
        strict(o, d, &servers, Variant::default(), &mut rep, &base)?;
        // Without `--json` (no line written per task): the protocol's own round trip.
        let n = o.strict_tasks;
        let file = task_file(d, "strict", n)?;
        let r = run(&o.bin, &file, "strict", &servers, None, Output::Quiet, d)?;
        if let Some(took) = r.run {
            let per = took.as_secs_f64() * 1e6 / n as f64;
            rep.add(
                format!("strict, --quiet: whole run / {} tasks", count(n)),
                format!("{per:.1} µs"),
                ratio_str(per, base.rtt_us, "raw RTT"),
            );
        }
        drop(servers);
        // The same on runtimes with one thread per core (the default is one thread).
        let per_core = ["--threads", "0"];
        let servers = three(None, &per_core)?;
        let v = Variant {
            run_args: &per_core,
            label: " with --threads 0",
            ..Variant::default()
        };
        strict(o, d, &servers, v, &mut rep, &base)?;
    }
    // Smaller runs for the configurations that are slower by design.
    let some = (o.tasks / 5).max(1000);
    if o.wants("none") {
        let servers = three(None, &[])?;
        let file = task_file(d, "tasks", some)?;
        let r = run(&o.bin, &file, "none", &servers, None, Output::Quiet, d)?;
        rate_rows(
            &mut rep,
            &format!(
                "none, 3 serving processes (default capacity), {}",
                count(some)
            ),
            some,
            &r,
            &base,
        );
    }
    // `--capacity 0`: skip the runs that need a deep window (e.g. against an old build).
    let deep = o.window > 0;
    if deep && (o.wants("none") || o.wants("scale") || o.wants("json") || o.wants("key")) {
        let servers = three(None, &windowed)?;
        let file = task_file(d, "tasks", o.tasks)?;
        let label = format!("--capacity {}", o.window);
        let mut quiet: Option<RunResult> = None;
        if o.wants("none") || o.wants("scale") || o.wants("json") {
            let r = run(&o.bin, &file, "none", &servers, None, Output::Quiet, d)?;
            rate_rows(
                &mut rep,
                &format!("none, 3 serving processes ({label}), {}", count(o.tasks)),
                o.tasks,
                &r,
                &base,
            );
            rep.add(
                format!("  coordinator peak RSS, {} tasks", count(o.tasks)),
                format!("{:.1} MB", r.peak_rss_kb as f64 / 1024.0),
                format!(
                    "{:.0} B/task",
                    r.peak_rss_kb as f64 * 1024.0 / o.tasks as f64
                ),
            );
            quiet = Some(r);
        }
        if o.wants("scale") {
            let small = (o.tasks / 10).max(1000);
            let sfile = task_file(d, "tasks", small)?;
            let s = run(&o.bin, &sfile, "none", &servers, None, Output::Quiet, d)?;
            let growth = quiet.as_ref().map_or(0.0, |q| {
                (q.peak_rss_kb as f64 - s.peak_rss_kb as f64) * 1024.0
                    / (o.tasks.saturating_sub(small)).max(1) as f64
            });
            rep.add(
                format!("  coordinator peak RSS, {} tasks", count(small)),
                format!("{:.1} MB", s.peak_rss_kb as f64 / 1024.0),
                format!("growth {growth:.0} B/task"),
            );
        }
        if o.wants("json") {
            let r = run(&o.bin, &file, "none", &servers, None, Output::JsonFile, d)?;
            let ratio = quiet.as_ref().map_or(String::new(), |q| {
                format!(
                    "{:.2}x the --quiet time",
                    r.wall.as_secs_f64() / q.wall.as_secs_f64()
                )
            });
            rep.add(
                format!(
                    "none ({label}), {} tasks, --json into a file",
                    count(o.tasks)
                ),
                rate_str(o.tasks as f64 / r.wall.as_secs_f64(), "tasks/s"),
                ratio,
            );
        }
        if o.wants("key") {
            let key = d.join("cluster.key");
            let status = Command::new(&o.bin)
                .arg("keygen")
                .arg(&key)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .status()
                .context("p2p-node keygen")?;
            if !status.success() {
                bail!("p2p-node keygen failed: {status}");
            }
            let kfile = task_file(d, "tasks", some)?;
            let plain = run(&o.bin, &kfile, "none", &servers, None, Output::Quiet, d)?;
            drop(servers);
            let keyed = three(Some(&key), &windowed)?;
            let k = run(&o.bin, &kfile, "none", &keyed, Some(&key), Output::Quiet, d)?;
            rep.add(
                format!("none ({label}), {}, without a key", count(some)),
                rate_str(some as f64 / plain.wall.as_secs_f64(), "tasks/s"),
                "",
            );
            rep.add(
                format!("none ({label}), {}, with a cluster key", count(some)),
                rate_str(some as f64 / k.wall.as_secs_f64(), "tasks/s"),
                format!(
                    "{:.2}x the time without a key",
                    k.wall.as_secs_f64() / plain.wall.as_secs_f64()
                ),
            );
            drop(keyed);
            let servers = three(Some(&key), &[])?;
            let v = Variant {
                key: Some(&key),
                label: " with a cluster key",
                ..Variant::default()
            };
            strict(o, d, &servers, v, &mut rep, &base)?;
        }
    }
    if o.wants("local") || o.wants("none") {
        let file = task_file(d, "tasks", some)?;
        let r = run_local(&o.bin, &file, d)?;
        rate_rows(
            &mut rep,
            &format!("none, --local (3 in-process nodes), {}", count(some)),
            some,
            &r,
            &base,
        );
    }
    if o.wants("nodes") {
        nodes(o, d, &mut rep)?;
    }
    if o.wants("placement") {
        placement(o, d, &mut rep)?;
    }
    if o.wants("files") {
        files::files(o, d, &mut rep)?;
    }
    if o.wants("fleet") {
        fleet::fleet(o, d, &mut rep)?;
    }
    rep.print();
    Ok(())
}

/// Rows for a run's rate: over the whole process (parsing the file included) and over the
/// run itself (the summary's elapsed time), with the ratio to raw pipelined frames.
fn rate_rows(rep: &mut Report, what: &str, n: usize, r: &RunResult, base: &Baseline) {
    let whole = n as f64 / r.wall.as_secs_f64();
    rep.add(
        format!("{what}: whole process"),
        rate_str(whole, "tasks/s"),
        ratio_str(whole, base.frames_per_s, "raw pipelined"),
    );
    if let Some(run) = r.run {
        let rate = n as f64 / run.as_secs_f64();
        rep.add(
            format!("{what}: run phase"),
            rate_str(rate, "tasks/s"),
            ratio_str(rate, base.frames_per_s, "raw pipelined"),
        );
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}, Linux {kernel}")
}

fn count(n: usize) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn rate_str(rate: f64, unit: &str) -> String {
    if rate >= 1e6 {
        format!("{:.2}M {unit}", rate / 1e6)
    } else {
        format!("{:.1}k {unit}", rate / 1e3)
    }
}

fn ratio_str(x: f64, base: Option<f64>, what: &str) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.3}x {what}", x / b),
        _ => String::new(),
    }
}

/// The seconds into its day of a `--json` line's `"ts":"YYYY-MM-DDTHH:MM:SS.ffffffZ"`.
fn ts_seconds(line: &str) -> Option<f64> {
    let (_, rest) = line.split_once("\"ts\":\"")?;
    let (_, time) = rest.split_once('T')?;
    let time = time.split('Z').next()?;
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Mean, p50 and p99 (nearest rank) of samples, in their unit.
fn stats(samples: &mut [f64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let mean = samples.iter().sum::<f64>() / n as f64;
    let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    (mean, rank(0.50), rank(0.99))
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process, killed by PID and reaped when dropped (the workspace test harness's).
type Proc = ChildGuard;

/// Starts `p2p-node serve --types TYPES --listen 127.0.0.1:0 --discovery none` through the
/// workspace test harness (its loopback guard; the binary of [`tests::use_bin`]) and waits
/// for its `listening on ADDR` line.
fn serve(types: &str, key: Option<&Path>, extra: &[&str]) -> Result<Server> {
    serve_of(None, types, key, extra)
}

/// [`serve`] with another binary (`--before`'s build) when `bin` is given.
fn serve_of(bin: Option<&Path>, types: &str, key: Option<&Path>, extra: &[&str]) -> Result<Server> {
    let key = key.map(|k| k.display().to_string());
    let mut args = vec![
        "--types",
        types,
        "--listen",
        "127.0.0.1:0",
        "--discovery",
        "none",
    ];
    args.extend_from_slice(extra);
    if let Some(k) = &key {
        args.extend(["--key-file", k.as_str()]);
    }
    let env = [("RUST_LOG", "warn")];
    Ok(match bin {
        Some(bin) => Server::start_bin(bin, &args, &env),
        None => Server::start_env(&args, &env),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Quiet,
    JsonFile,
}

/// What a finished `p2p-node run` measured.
struct RunResult {
    /// From spawning the process to its exit.
    wall: Duration,
    /// The run's own elapsed time, from its summary (discovery to goodbye).
    run: Option<Duration>,
    peak_rss_kb: u64,
}

fn task_file(dir: &Path, name: &str, n: usize) -> Result<PathBuf> {
    task_file_of(dir, name, n, &["a", "b", "c"])
}

fn task_file_of(dir: &Path, name: &str, n: usize, types: &[&str]) -> Result<PathBuf> {
    let path = dir.join(format!("{name}-{n}.txt"));
    if path.exists() {
        return Ok(path);
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..n {
        let sep = if i % 20 == 19 { '\n' } else { ' ' };
        write!(f, "{}{}{}", types[i % types.len()], i + 1, sep)?;
    }
    writeln!(f)?;
    f.flush()?;
    Ok(path)
}

/// Runs `p2p-node run FILE --order ORDER --peer ...` to its end; polls the coordinator's
/// peak RSS (`VmHWM`) while it runs.
fn run(
    bin: &Path,
    file: &Path,
    order: &str,
    servers: &[Server],
    key: Option<&Path>,
    out: Output,
    dir: &Path,
) -> Result<RunResult> {
    let mut args: Vec<String> = vec!["run".into(), file.display().to_string()];
    args.extend(["--order".into(), order.into()]);
    for s in servers {
        args.push("--peer".into());
        args.push(s.peer());
    }
    run_args(bin, args, key, out, dir)
}

fn run_local(bin: &Path, file: &Path, dir: &Path) -> Result<RunResult> {
    let args: Vec<String> = vec![
        "run".into(),
        file.display().to_string(),
        "--order".into(),
        "none".into(),
        "--local".into(),
    ];
    run_args(bin, args, None, Output::Quiet, dir)
}

fn run_args(
    bin: &Path,
    mut args: Vec<String>,
    key: Option<&Path>,
    out: Output,
    dir: &Path,
) -> Result<RunResult> {
    if let Some(k) = key {
        args.push("--key-file".into());
        args.push(k.display().to_string());
    }
    let out_path = match out {
        Output::Quiet => {
            args.push("--quiet".into());
            dir.join("quiet.txt")
        }
        Output::JsonFile => {
            args.push("--json".into());
            dir.join("events.jsonl")
        }
    };
    let stdout = Stdio::from(std::fs::File::create(&out_path)?);
    let started = Instant::now();
    let child = Command::new(bin)
        .args(&args)
        .env_remove("P2P_KEY_FILE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {} {}", bin.display(), args.join(" ")))?;
    let mut proc = ChildGuard::new(child);
    let pid = proc.id();
    let mut peak = 0;
    let deadline = started + RUN_DEADLINE;
    loop {
        if let Some(status) = proc.try_wait() {
            let wall = started.elapsed();
            if !status.success() {
                bail!("p2p-node {} exited with {status}", args.join(" "));
            }
            return Ok(RunResult {
                wall,
                run: summary_elapsed(&out_path, out),
                peak_rss_kb: peak,
            });
        }
        peak = peak.max(peak_rss_kb(pid).unwrap_or(0));
        if Instant::now() > deadline {
            bail!("p2p-node run did not finish within {RUN_DEADLINE:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The elapsed time a run's summary reports: `elapsed_ms` of the JSON `summary`, or the
/// `in 1.23 s` of the `--quiet` summary line.
fn summary_elapsed(path: &Path, out: Output) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    match out {
        Output::JsonFile => {
            let line = text
                .lines()
                .rev()
                .find(|l| l.contains("\"event\":\"summary\""))?;
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            Some(Duration::from_secs_f64(v["elapsed_ms"].as_f64()? / 1000.0))
        }
        Output::Quiet => {
            let line = text.lines().find(|l| l.contains(" tasks: "))?;
            let (_, t) = line.rsplit_once(" in ")?;
            let (num, unit) = t.trim().split_once(' ')?;
            let x: f64 = num.parse().ok()?;
            let secs = match unit {
                "s" => x,
                "ms" => x / 1e3,
                "µs" => x / 1e6,
                _ => return None,
            };
            Some(Duration::from_secs_f64(secs))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Strict order

/// What differs between the strict runs: a cluster key, extra `run` flags, the row label.
#[derive(Default)]
struct Variant<'a> {
    key: Option<&'a Path>,
    run_args: &'a [&'a str],
    label: &'a str,
}

fn strict(
    o: &Opts,
    dir: &Path,
    servers: &[Server],
    v: Variant<'_>,
    rep: &mut Report,
    base: &Baseline,
) -> Result<()> {
    let Variant {
        key,
        run_args,
        label,
    } = v;
    let n = o.strict_tasks;
    let file = task_file(dir, "strict", n)?;
    // Per task: the time between consecutive `task_completed` lines of `--json`, read as
    // they arrive. In strict order that is one whole assign -> run -> result cycle.
    let mut args: Vec<String> = vec![
        "run".into(),
        file.display().to_string(),
        "--order".into(),
        "strict".into(),
        "--json".into(),
    ];
    args.extend(run_args.iter().map(|a| a.to_string()));
    for s in servers {
        args.push("--peer".into());
        args.push(s.peer());
    }
    if let Some(k) = key {
        args.push("--key-file".into());
        args.push(k.display().to_string());
    }
    let started = Instant::now();
    let mut child = Command::new(&o.bin)
        .args(&args)
        .env_remove("P2P_KEY_FILE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn p2p-node run")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut proc = ChildGuard::new(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut times = Vec::with_capacity(n);
        let mut stamps = Vec::with_capacity(n);
        let mut summary = None;
        let mut r = BufReader::with_capacity(1 << 16, stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.contains("\"event\":\"task_completed\"") {
                times.push(Instant::now());
                stamps.push(ts_seconds(&line));
            } else if line.contains("\"event\":\"summary\"") {
                summary = Some(line.clone());
            }
        }
        let _ = tx.send((times, stamps, summary));
    });
    let (times, stamps, summary) = rx
        .recv_timeout(RUN_DEADLINE)
        .map_err(|_| anyhow!("strict run did not finish in time"))?;
    let wall = started.elapsed();
    let status = wait_deadline(&mut proc, Duration::from_secs(30))?;
    if !status.success() || times.len() != n {
        bail!(
            "strict run: exit {status}, {} of {n} tasks completed",
            times.len()
        );
    }
    let mut deltas: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e6)
        .collect();
    let (mean, _p50, p99) = stats(&mut deltas);
    let ratio = |x: f64| ratio_str(x, base.rtt_us, "raw RTT");
    rep.add(
        format!("strict{label}, 3 serving processes: mean per task"),
        format!("{mean:.1} µs"),
        ratio(mean),
    );
    rep.add(
        format!("strict{label}: mean per task, against raw in turn with 3"),
        "",
        ratio_str(mean, base.rtt3_us, "raw RTT with 3"),
    );
    rep.add(
        format!("strict{label}: p99 per task"),
        format!("{p99:.1} µs"),
        ratio(p99),
    );
    rep.add(
        format!("strict{label}: p99 per task, against raw in turn with 3"),
        "",
        format!(
            "{} (raw's own p99 with 3: {})",
            ratio_str(p99, base.rtt3_us, "raw RTT with 3"),
            ratio_str(base.rtt3_p99_us.unwrap_or(0.0), base.rtt3_us, "its mean")
        ),
    );
    // The same intervals from the coordinator's own `ts` stamps: as the raw ping-pong is
    // timed by its own sender, without the wake-up of this bench's reader of the pipe.
    let mut stamped: Vec<f64> = stamps
        .windows(2)
        .filter_map(|w| Some((w[1]? - w[0]?) * 1e6))
        .map(|d| if d < 0.0 { d + 86_400e6 } else { d })
        .collect();
    if stamped.len() + 1 == n {
        let (smean, _, sp99) = stats(&mut stamped);
        rep.add(
            format!("strict{label}: mean / p99 per task by the run's own `ts`"),
            format!("{smean:.1} / {sp99:.1} µs"),
            format!(
                "{} / {}",
                ratio_str(smean, base.rtt3_us, "raw RTT with 3"),
                ratio_str(sp99, base.rtt3_us, "raw RTT with 3")
            ),
        );
    }
    if let Some(s) = summary {
        let v: serde_json::Value = serde_json::from_str(&s)?;
        let ms = v["elapsed_ms"].as_f64().unwrap_or(0.0);
        let whole = ms * 1000.0 / n as f64;
        rep.add(
            format!("strict{label}: whole run / {} tasks", count(n)),
            format!("{whole:.1} µs"),
            ratio(whole),
        );
    }
    let _ = wall;
    Ok(())
}

fn wait_deadline(p: &mut Proc, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = p.try_wait() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("process {} did not exit in {limit:?}", p.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// Many nodes

fn nodes(o: &Opts, dir: &Path, rep: &mut Report) -> Result<()> {
    let n = o.nodes;
    let started = Instant::now();
    let mut servers = Vec::with_capacity(n);
    // A window of 4 tasks each, as nodes with shell handlers on a few cores have: with the
    // built-in handler's default of 1,024, the first ten nodes to connect could take all
    // the tasks before the others are dialled.
    for _ in 0..n {
        servers.push(serve("a", None, &["--capacity", "4"])?);
    }
    let boot = started.elapsed();
    let tasks = 100 * n;
    let file = task_file_of(dir, "nodes", tasks, &["a"])?;
    let r = run(&o.bin, &file, "none", &servers, None, Output::JsonFile, dir)?;
    let events = std::fs::read_to_string(dir.join("events.jsonl"))?;
    let mut used = HashSet::new();
    let mut connected = HashSet::new();
    let mut completed = 0;
    for line in events.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["event"] == "connected" {
            if let Some(node) = v["node"].as_str() {
                connected.insert(node.to_string());
            }
        }
        if v["event"] == "task_completed" {
            completed += 1;
            if let Some(node) = v["node"].as_str() {
                used.insert(node.to_string());
            }
        }
    }
    drop(servers);
    rep.add(
        format!("{n} serving processes (capacity 4): nodes connected / used"),
        format!("{} / {} of {n}", connected.len(), used.len()),
        format!("{completed} tasks, started in {:.2} s", boot.as_secs_f64()),
    );
    rep.add(
        format!(
            "{n} serving processes: {} tasks --order none --json",
            count(tasks)
        ),
        rate_str(tasks as f64 / r.wall.as_secs_f64(), "tasks/s"),
        format!("run took {:.2} s", r.wall.as_secs_f64()),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Raw TCP: the ceiling

/// An `Assign` and a `Completed` as p2p-node sends them for a task of the large runs.
fn frames() -> Result<(Vec<u8>, Vec<u8>)> {
    let a = Message::Assign(Assign {
        timeout_ms: 3_600_000,
        ..testing::assign(1_000_000)
    });
    let c = Message::Completed(Completed {
        output: "Executing task: a1000000".into(),
        ..testing::completed(1_000_000)
    });
    Ok((testing::frame(&a), testing::frame(&c)))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // The same runtime p2p-node runs on: one thread unless P2P_THREADS (`--threads`) says
    // otherwise, so `P2P_THREADS=0 cargo bench ...` compares both sides on many threads.
    let threads = std::env::var("P2P_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1);
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    };
    Ok(built?)
}

/// The echo peer: answers every frame with a `Completed`-sized frame, flushing when no more
/// input is buffered. Listens on 127.0.0.1 only; exits when its stdin closes or after
/// [`ECHO_LIFETIME`].
fn echo_peer() -> Result<()> {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        // The bench holds our stdin; when it goes away (closed or killed), so do we.
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::sleep(ECHO_LIFETIME);
        std::process::exit(0);
    });
    let (_, reply) = frames()?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("port {}", listener.local_addr()?.port());
        std::io::stdout().flush()?;
        loop {
            let (stream, _) = listener.accept().await?;
            let reply = reply.clone();
            tokio::spawn(async move {
                let _ = echo_conn(stream, &reply).await;
            });
        }
    })
}

async fn echo_conn(stream: tokio::net::TcpStream, reply: &[u8]) -> Result<()> {
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, w);
    let mut payload = vec![0u8; 256];
    loop {
        let len = match r.read_u32().await {
            Ok(n) => n as usize,
            Err(_) => return Ok(()),
        };
        if len > ECHO_MAX_FRAME {
            bail!("frame of {len} bytes");
        }
        payload.resize(len, 0);
        r.read_exact(&mut payload).await?;
        w.write_all(reply).await?;
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}

fn raw(o: &Opts, rep: &mut Report, base: &mut Baseline) -> Result<()> {
    let (_echo, port) = start_echo()?;
    let (_echo2, port2) = start_echo()?;
    let (_echo3, port3) = start_echo()?;
    let (assign, reply) = frames()?;
    eprintln!(
        "frames: Assign {} bytes, Completed {} bytes (with the 4-byte length)",
        assign.len(),
        reply.len()
    );
    let rt = runtime()?;
    let pings = o.pings;
    let frames_n = o.frames;
    let reply_len = reply.len();
    let (mut rtts, mut rtts3, rate) = rt.block_on(async move {
        // Measured from a spawned task, as p2p-node's connection drivers run.
        tokio::spawn(async move {
            let at = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
            let rtts = ping_pong(&[at(port)], &assign, reply_len, pings).await?;
            let three = [at(port), at(port2), at(port3)];
            let rtts3 = ping_pong(&three, &assign, reply_len, pings).await?;
            let rate = pipelined(at(port), &assign, reply_len, frames_n).await?;
            Ok::<_, anyhow::Error>((rtts, rtts3, rate))
        })
        .await?
    })?;
    let (mean, p50, p99) = stats(&mut rtts);
    base.rtt_us = Some(mean);
    base.frames_per_s = Some(rate);
    rep.add(
        "raw TCP round trip between two processes: mean",
        format!("{mean:.1} µs"),
        "1.000 (baseline)",
    );
    rep.add(
        "raw TCP round trip: p50 / p99",
        format!("{p50:.1} / {p99:.1} µs"),
        "",
    );
    let (mean3, _, p99_3) = stats(&mut rtts3);
    base.rtt3_us = Some(mean3);
    base.rtt3_p99_us = Some(p99_3);
    rep.add(
        "raw round trip, in turn with 3 echo processes: mean",
        format!("{mean3:.1} µs"),
        ratio_str(mean3, Some(mean), "raw RTT"),
    );
    rep.add(
        "raw round trip, in turn with 3: p99",
        format!("{p99_3:.1} µs"),
        "",
    );
    rep.add(
        "raw pipelined frames (Assign out, Completed back)",
        rate_str(rate, "frames/s"),
        "1.000 (baseline)",
    );
    Ok(())
}

/// Starts a copy of this bench as an echo peer; returns it and its port.
fn start_echo() -> Result<(Proc, u16)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--echo-peer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the echo peer")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let echo = ChildGuard::new(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(START_DEADLINE)
        .map_err(|_| anyhow!("the echo peer did not start"))?;
    let port: u16 = line
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("echo peer said {line:?}"))?;
    Ok((echo, port))
}

/// Round trips one at a time, taking the peers in turn (one peer: a plain ping-pong).
async fn ping_pong(
    addrs: &[std::net::SocketAddr],
    assign: &[u8],
    reply_len: usize,
    n: usize,
) -> Result<Vec<f64>> {
    let mut conns = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let mut buf = vec![0u8; reply_len];
    let warmup = 1000.min(n);
    let mut rtts = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..warmup + n {
        let k = i % conns.len();
        let s = &mut conns[k];
        let t = Instant::now();
        s.write_all(assign).await?;
        s.read_exact(&mut buf).await?;
        if i >= warmup {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        if Instant::now() > deadline {
            break;
        }
    }
    Ok(rtts)
}

async fn pipelined(
    addr: std::net::SocketAddr,
    assign: &[u8],
    reply_len: usize,
    n: usize,
) -> Result<f64> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    let assign = assign.to_vec();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, w);
        for _ in 0..n {
            w.write_all(&assign).await?;
        }
        w.flush().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    let mut buf = vec![0u8; reply_len];
    let deadline = started + Duration::from_secs(120);
    for i in 0..n {
        r.read_exact(&mut buf).await?;
        if i % 65_536 == 0 && Instant::now() > deadline {
            bail!("pipelined run did not finish in time");
        }
    }
    let elapsed = started.elapsed();
    let _w = writer.await??;
    Ok(n as f64 / elapsed.as_secs_f64())
}

// ---------------------------------------------------------------------------------------
// Placement

/// A run's own elapsed time (its summary's), or the process's when there is none.
fn run_time(r: &RunResult) -> f64 {
    r.run.unwrap_or(r.wall).as_secs_f64()
}

/// Writes a task file of `(id, cost, args)` lines.
fn costed_file(dir: &Path, name: &str, tasks: &[(String, u32, String)]) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.txt"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for (id, cost, args) in tasks {
        if *cost == 1 {
            writeln!(f, "{id} -- {args}")?;
        } else {
            writeln!(f, "{id} cost {cost} -- {args}")?;
        }
    }
    f.flush()?;
    Ok(path)
}

/// `n` tasks `a1..an` of cost 1 with `args`.
fn plain_tasks(n: usize, args: &str) -> Vec<(String, u32, String)> {
    (1..=n)
        .map(|i| (format!("a{i}"), 1, args.to_string()))
        .collect()
}

/// splitmix64, for the reproducible random costs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Six nodes of speeds 1x..6x and `n` tasks of cost 1 to 10 (seconds at 1x: cost x `unit`):
/// a node of speed k sleeps `60 / k` times the task's argument (GNU `sleep` adds up its
/// arguments), the argument being cost x unit / 60. Returns the run's time and the lower
/// bound (total work over total speed, or the longest task on the fastest node).
fn heterogeneous(bin: &Path, dir: &Path, n: usize, unit: f64) -> Result<(f64, f64)> {
    let servers: Vec<Server> = (1..=6u32)
        .map(|k| {
            let repeats = vec!["{args}"; (60 / k) as usize].join(" ");
            let handler = format!("a=sleep {repeats}");
            serve_of(
                Some(bin),
                "a",
                None,
                &["--capacity", "1", "--handler", &handler],
            )
        })
        .collect::<Result<_>>()?;
    let tasks: Vec<(String, u32, String)> = (0..n as u64)
        .map(|i| {
            let cost = 1 + (mix(i) % 10) as u32;
            let arg = f64::from(cost) * unit / 60.0;
            (format!("a{}", i + 1), cost, format!("{arg:.6}"))
        })
        .collect();
    let work: f64 = tasks.iter().map(|t| f64::from(t.1) * unit).sum();
    let longest = tasks.iter().map(|t| t.1).max().unwrap_or(1);
    let bound = (work / 21.0).max(f64::from(longest) * unit / 6.0);
    let file = costed_file(dir, "heterogeneous", &tasks)?;
    let r = run(bin, &file, "none", &servers, None, Output::Quiet, dir)?;
    Ok((run_time(&r), bound))
}

fn placement(o: &Opts, d: &Path, rep: &mut Report) -> Result<()> {
    let bin = &o.bin;
    let capacity_1 = |handler: &str| -> Result<Server> {
        serve("a", None, &["--capacity", "1", "--handler", handler])
    };
    // Two nodes, one 5x slower, 40 tasks in strict order; against the fast node alone.
    let fast = capacity_1("a=sleep 0.02")?;
    let slow = capacity_1("a=sleep 0.1")?;
    let file = costed_file(d, "two-speeds", &plain_tasks(40, ""))?;
    let alone = run(
        bin,
        &file,
        "strict",
        std::slice::from_ref(&fast),
        None,
        Output::Quiet,
        d,
    )?;
    let both = run(bin, &file, "strict", &[fast, slow], None, Output::Quiet, d)?;
    let (alone, both) = (run_time(&alone), run_time(&both));
    rep.add(
        "placement: 40 strict, nodes 0.02 s + 0.1 s (fast alone)",
        format!("{both:.2} s ({alone:.2} s)"),
        format!("{:.2}x the fast node alone (goal 1.5x)", both / alone),
    );
    // One task of cost 10 after ten of cost 1, two nodes of capacity 1, order none.
    let servers = vec![capacity_1("a=sleep {args}")?, capacity_1("a=sleep {args}")?];
    let mut tasks = plain_tasks(10, "0.1");
    tasks.push(("a11".into(), 10, "1".into()));
    let file = costed_file(d, "long-last", &tasks)?;
    let r = run_time(&run(bin, &file, "none", &servers, None, Output::Quiet, d)?);
    drop(servers);
    rep.add(
        "placement: 10 x 0.1 s then 1 x 1 s (cost 10), 2 nodes",
        format!("{r:.2} s"),
        format!("{:.2}x the longest-first 1.0 s (goal 1.2x)", r / 1.0),
    );
    // Six nodes of speeds 1x..6x, 2,000 tasks of random cost.
    let n = if o.tasks < 1_000_000 { 1000 } else { 2000 };
    let unit = 0.04;
    let (t, bound) = heterogeneous(bin, d, n, unit)?;
    rep.add(
        format!("placement: 6 nodes 1x..6x, {} tasks cost 1-10", count(n)),
        format!("{t:.2} s"),
        format!(
            "{:.2}x the lower bound {bound:.2} s (goal 1.15x)",
            t / bound
        ),
    );
    if let Some(before) = &o.before {
        let (tb, _) = heterogeneous(before, d, n, unit)?;
        rep.add(
            format!("placement: the same with {}", before.display()),
            format!("{tb:.2} s"),
            format!(
                "{:.2}x the lower bound; this build {:.2}x its time",
                tb / bound,
                t / tb
            ),
        );
    }
    // Two runs on one node of capacity 2: 1,000 tasks, and 10 started a second later.
    let node = serve("a", None, &["--capacity", "2", "--handler", "a=sleep 0.02"])?;
    let small = costed_file(d, "small", &plain_tasks(10, ""))?;
    let big_tasks: Vec<(String, u32, String)> = (1..=1000)
        .map(|i| (format!("a{}", 1000 + i), 1, String::new()))
        .collect();
    let big = costed_file(d, "big", &big_tasks)?;
    let nodes = std::slice::from_ref(&node);
    let alone = run_time(&run(bin, &small, "none", nodes, None, Output::Quiet, d)?);
    let mut large = Proc::new(
        Command::new(bin)
            .args([
                "run",
                &big.display().to_string(),
                "--order",
                "none",
                "--quiet",
            ])
            .args(["--peer", &node.addr.to_string()])
            .env_remove("P2P_KEY_FILE")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn the large run")?,
    );
    std::thread::sleep(Duration::from_secs(1));
    let shared = run_time(&run(bin, &small, "none", nodes, None, Output::Quiet, d)?);
    let still = large.try_wait().is_none();
    let status = wait_deadline(&mut large, Duration::from_secs(120))?;
    if !status.success() {
        bail!("the large run exited with {status}");
    }
    rep.add(
        "placement: 10 tasks beside a 1,000-task run, capacity 2",
        format!("{shared:.2} s ({alone:.2} s alone)"),
        format!(
            "{:.2}x its time alone (goal 3x){}",
            shared / alone,
            if still {
                ""
            } else {
                "; the large run had ended"
            }
        ),
    );
    Ok(())
}
