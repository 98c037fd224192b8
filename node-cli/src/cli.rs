//! The command line of `p2p-node` (README.md, "Command line") and what each command does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use p2p_core::text::escape;
use p2p_core::{ClusterKey, Identity};
use p2p_discovery::{Discovery, Kind};
use p2p_tasks::handler::{Builtin, Handler, Shell, WorkDirs};
use p2p_tasks::{Order, Policy, RunOptions};
use tokio_util::sync::CancellationToken;

use crate::datadir::{self, HeldIdentity};
use crate::output::{Format, Printer};
use crate::{Node, NodeBuilder};

/// `println!` that never panics: a closed stdout (`| head`) must not take the node down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that never panics.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

// After the output macros, which it uses.
mod hosted;
mod peerlist;

/// Exit status: every task succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: a task failed, or a needed type has no node.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;

/// Exit status of a run interrupted by SIGINT (Ctrl-C): 128 + 2, as shells report it.
pub const EXIT_SIGINT: u8 = 130;

/// Exit status of a run interrupted by SIGTERM: 128 + 15.
#[allow(dead_code)] // `interrupted_status` computes it from the signal's number
pub const EXIT_SIGTERM: u8 = 143;

/// The number of the first stop signal received (0: none yet), for the exit status.
static FIRST_SIGNAL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The exit status of an interrupted run: 128 + the first signal's number (130 when the
/// signal is not known, e.g. a Ctrl-C on a system without Unix signals).
fn interrupted_status() -> u8 {
    match FIRST_SIGNAL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => EXIT_SIGINT,
        n => 128u8.saturating_add(n),
    }
}

/// Run ordered, typed tasks across many machines: `serve` task types on each node, then `run`
/// a task file across the nodes that serve them.
///
/// Nodes find each other by discovery (udp beacons, mDNS, DNS names or a --peer list),
/// authenticate with a shared cluster key (`keygen`), and run each task with the handler
/// of its type. Settings come from flags, then P2P_* environment variables, then a config
/// file (--config, $P2P_CONFIG, $XDG_CONFIG_HOME/p2p-node/config.toml or
/// /etc/p2p-node/config.toml), then defaults.
#[derive(Debug, Parser)]
#[command(name = "p2p-node", version, propagate_version = true)]
pub struct Cli {
    /// More logging from p2p-node itself (-v: debug, -vv: trace); other crates stay at
    /// warn. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Settings file (TOML; keys are the long flags). Default: $P2P_CONFIG if set, else
    /// $XDG_CONFIG_HOME/p2p-node/config.toml (or ~/.config/...), else
    /// /etc/p2p-node/config.toml, if present.
    // P2P_CONFIG is read by the config module (an empty one counts as unset), not by clap.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Threads of the async runtime. 1 (the default) runs the node on one thread, which
    /// gives the lowest per-task latency and, measured, no less throughput on a small
    /// machine; 0 means one per CPU core. Shell handlers' tasks are processes of their own
    /// either way. A run's in-process nodes (--local, --types) with --order type or none
    /// run on one more thread of their own. At most 256.
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 1,
        env = "P2P_THREADS",
        value_parser = clap::value_parser!(u16).range(0..=256)
    )]
    pub threads: u16,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve task types: accept connections and run the tasks peers assign.
    #[command(
        after_help = "Example:\n  p2p-node serve --types a --listen 127.0.0.1:7401 --discovery none\n  \
        p2p-node serve --types a,b --handler 'a=echo {id} >> /tmp/done.txt' --capacity 4"
    )]
    Serve(ServeArgs),
    /// Run a task file across the nodes that serve its types.
    #[command(after_help = "Examples:\n  p2p-node run tasks.txt --local\n  \
        p2p-node run tasks.txt --peer 127.0.0.1:7401 --peer 127.0.0.1:7402 --peer 127.0.0.1:7403\n  \
        p2p-node run tasks.txt --local 2 --order none --json")]
    Run(RunArgs),
    /// List the nodes that discovery finds.
    #[command(after_help = "Example:\n  p2p-node peers --peer 127.0.0.1:7401 --json")]
    Peers(PeersArgs),
    /// Ask live nodes how they are: version, types, running tasks, counts, uptime, load.
    #[command(
        after_help = "Example:\n  p2p-node status --peer 127.0.0.1:7401 --peer 127.0.0.1:7402\n  \
        p2p-node status --discovery udp --json"
    )]
    Status(StatusArgs),
    /// Give a task file to a serving node, which runs it (journaled, resumed after a restart);
    /// prints the run's id and exits at once.
    #[command(
        after_help = "Example:\n  RUN=$(p2p-node submit tasks.txt --peer 127.0.0.1:7401)\n  \
        p2p-node attach $RUN --peer 127.0.0.1:7401"
    )]
    Submit(hosted::SubmitArgs),
    /// List the runs a node hosts: id, state, counts, started.
    #[command(after_help = "Example:\n  p2p-node runs --peer 127.0.0.1:7401 --json")]
    Runs(hosted::RunsArgs),
    /// Stream a hosted run's events from where it is, then its summary; exits with the
    /// run's exit status (as `run` would).
    #[command(after_help = "Example:\n  p2p-node attach RUN_ID --peer 127.0.0.1:7401 --json")]
    Attach(hosted::AttachArgs),
    /// Take a hosted run's results: every task's stdout, stderr, meta.json and outputs.
    Results(hosted::ResultsArgs),
    /// Cancel a hosted run.
    #[command(after_help = "Example:\n  p2p-node cancel RUN_ID --peer 127.0.0.1:7401")]
    Cancel(hosted::CancelArgs),
    /// Write a new cluster key to PATH (mode 0600); pass it to every node with --key-file.
    #[command(after_help = "Example:\n  p2p-node keygen cluster.key\n  \
        p2p-node serve --types a --key-file cluster.key\n  \
        p2p-node run tasks.txt --peer HOST:7400 --key-file cluster.key")]
    Keygen(KeygenArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  p2p-node completions bash > /etc/bash_completion.d/p2p-node"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (every subcommand's page follows the main one).
    #[command(after_help = "Example:\n  p2p-node man > p2p-node.1 && man -l p2p-node.1")]
    Man,
}

impl Command {
    /// The options every command shares, for the commands that have them.
    fn common_mut(&mut self) -> Option<&mut Common> {
        match self {
            Command::Serve(a) => Some(&mut a.common),
            Command::Run(a) => Some(&mut a.common),
            Command::Peers(a) => Some(&mut a.common),
            Command::Status(a) => Some(&mut a.common),
            Command::Submit(a) => Some(&mut a.client.common),
            Command::Runs(a) => Some(&mut a.client.common),
            Command::Attach(a) => Some(&mut a.client.common),
            Command::Cancel(a) => Some(&mut a.client.common),
            Command::Results(a) => Some(&mut a.client.common),
            Command::Keygen(_) | Command::Completions { .. } | Command::Man => None,
        }
    }

    /// Joins `--peers-file`'s entries to `--peer`'s, each address once, so that every
    /// command sees one list.
    fn read_peers_file(&mut self) -> Result<(), String> {
        let Some(c) = self.common_mut() else {
            return Ok(());
        };
        let Some(path) = c.peers_file.clone() else {
            peerlist::merge(&mut c.peers, Vec::new());
            return Ok(());
        };
        let more =
            peerlist::read(&path).map_err(|e| format!("--peers-file {}: {e}", path.display()))?;
        if more.is_empty() {
            return Err(format!("--peers-file {}: no peers in it", path.display()));
        }
        peerlist::merge(&mut c.peers, more);
        Ok(())
    }
}

/// Options every command shares.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Cluster name; nodes of different clusters never work together.
    #[arg(long, default_value = crate::node::DEFAULT_CLUSTER, env = "P2P_CLUSTER")]
    pub cluster: String,
    /// Discovery backends (repeatable; see `--help`).
    #[arg(
        long = "discovery",
        value_name = "KIND",
        value_parser = crate::help::DiscoveryParser,
        hide_possible_values = true,
        help = "Discovery backend: none, static, udp, mdns, dns:NAME[:PORT] (repeatable) [default: udp without --peer]"
    )]
    pub discovery: Vec<Kind>,
    /// A peer to connect to, HOST:PORT (repeatable; implies static discovery). P2P_PEER may
    /// list several, separated by `,`.
    #[arg(
        long = "peer",
        value_name = "ADDR",
        env = "P2P_PEER",
        value_delimiter = ','
    )]
    pub peers: Vec<String>,
    /// A file of peers, HOST:PORT separated by newlines, spaces or commas (`#` comments): for
    /// lists too long for --peer. Joins the --peer list (each address once).
    #[arg(long, value_name = "FILE", env = "P2P_PEERS_FILE")]
    pub peers_file: Option<PathBuf>,
    /// Where udp discovery beacons and queries (and mdns) go: an interface name (eth0), one of
    /// its IPv4 addresses, or `all`. Default: where the node listens (serve), all (run, peers).
    #[arg(long, value_name = "IFACE")]
    pub discovery_interface: Option<String>,
    /// Cluster key file (encrypted, authenticated connections). Repeatable, to rotate keys:
    /// the node dials with the first and accepts peers with any of them. P2P_KEY_FILE may
    /// list several, separated by `:`. Default: $CREDENTIALS_DIRECTORY/cluster.key when that
    /// file exists (systemd's LoadCredential=), else no key.
    #[arg(
        long = "key-file",
        value_name = "PATH",
        env = "P2P_KEY_FILE",
        value_delimiter = ':'
    )]
    pub key_files: Vec<PathBuf>,
    /// Largest frame sent or accepted (e.g. 64KiB, 4MiB); a peer that sends a larger one is
    /// disconnected. From 64 KiB to 16 MiB; give every node of a cluster the same.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame: usize,
    /// This node's identity file (its private key; the node id derives from it), created
    /// with mode 0600 if missing and held (locked) while the node runs. Default: serve and
    /// run use the first free identity slot of --data-dir; peers a new identity.
    #[arg(long, value_name = "PATH")]
    pub identity: Option<PathBuf>,
    /// Where nodes keep their identities between starts [default: $STATE_DIRECTORY (systemd's
    /// StateDirectory=), else $XDG_DATA_HOME/p2p-node or ~/.local/share/p2p-node].
    #[arg(long, value_name = "DIR", env = "P2P_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `p2p-node serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Task types to serve, comma-separated (e.g. a,b).
    #[arg(long, value_delimiter = ',', required = true, env = "P2P_TYPES")]
    pub types: Vec<String>,
    /// Address to accept connections on (see `--help` for the default).
    #[arg(
        long,
        env = "P2P_LISTEN",
        help = "Address to accept connections on [default: 127.0.0.1:7400, or 0.0.0.0:7400 with --key-file]"
    )]
    pub listen: Option<SocketAddr>,
    /// Run TYPE's tasks with `sh -c COMMAND`; {id}, {type}, {args}, {argv} are replaced (repeatable).
    #[arg(long = "handler", value_name = "TYPE=COMMAND")]
    pub handlers: Vec<String>,
    /// Tasks run at once (default: the number of CPU cores), or `auto`: the cores less the
    /// load of other work, adjusted every 2 s. SIGUSR1 grows it by one, SIGUSR2 shrinks it
    /// by one (down to 1) while serving.
    #[arg(long, value_name = "N|auto", value_parser = parse_capacity)]
    pub capacity: Option<Capacity>,
    /// Allow listening on a non-loopback address without a cluster key.
    #[arg(long)]
    pub insecure: bool,
    /// A connection that has not completed its handshake after this long is closed.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,
    /// Most connections at once (handshaking ones included); more are closed at accept.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most connections still in their handshake; when full, a new one evicts the oldest.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,
    /// Most bytes of a task's output sent back; the rest is cut and marked `[output
    /// truncated at N bytes]`. Must fit, plus 16 KiB, in --max-frame.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_output: usize,
    /// After SIGTERM (or SIGINT, SIGHUP), how long running tasks may take to finish; then
    /// they are stopped. A second signal stops them at once.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// When a task ends (done, cancelled, timed out), the processes it leaves get SIGTERM,
    /// then SIGKILL after this long.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
    pub kill_grace: Duration,
    /// Serve GET /metrics (Prometheus text) and GET /healthz (503 while draining) over
    /// HTTP on ADDR; loopback only unless a cluster key (or --insecure) is given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Keep the working directory of a failed attempt (under DATA_DIR/work) for debugging;
    /// the others are always removed when their attempt ends.
    #[arg(long)]
    pub keep_work: bool,
    /// Place the tasks' inputs as hard links to the node's cached files, made read-only,
    /// instead of copies (no copy per task, whatever the file's size; a copy where the file
    /// system cannot link). Handlers must not write their inputs: one that does fails its
    /// attempt and the cached file is dropped.
    #[arg(long)]
    pub link_inputs: bool,
    /// Most bytes of files this node keeps for tasks (DATA_DIR/cache/SLOT, least recently
    /// used first out).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size_u64)]
    pub cache_size: u64,
    /// Largest input file this node accepts (default: the cache size).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_u64)]
    pub max_file: Option<u64>,
    /// Most hosted runs (`submit`) not finished at once; more are refused. 0: host none.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_runs: u32,
    /// Largest task file a `submit` may give.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub max_plan: usize,
    /// How long a finished hosted run is kept (listed, attachable) before its files go.
    #[arg(long, value_name = "DUR", default_value = "24h", value_parser = parse_duration)]
    pub keep_runs: Duration,
    /// A serving node this node may replicate the runs it hosts to (repeatable): with two
    /// of them connected, a submitted run is kept by a group of three and survives the
    /// loss of its host (README, "Hosted runs").
    #[arg(long = "replica", value_name = "ADDR")]
    pub replicas: Vec<SocketAddr>,
    /// Most bytes of a task's standard output, and of its standard error, kept whole for a
    /// coordinator that collects results (run --results, or a task with files): streamed
    /// to DATA_DIR as they come, cut beyond with a marker line. The capped output in the
    /// result (--max-output) is apart.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size_u64)]
    pub max_result_size: u64,
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
}

/// `p2p-node run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The task file.
    #[arg(default_value = "tasks.txt")]
    pub tasks_file: PathBuf,
    /// Start N in-process nodes (default 1) for each type the list needs, on loopback.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "1")]
    pub local: Option<u32>,
    /// Also serve these types from this process during the run (in-process, loopback).
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// Handlers for in-process nodes (--local, --types), as for serve.
    #[arg(long = "handler", value_name = "TYPE=COMMAND")]
    pub handlers: Vec<String>,
    /// Most bytes of a task's output the in-process nodes send back, as for serve.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_output: usize,
    /// For the in-process nodes' handlers, as for serve.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
    pub kill_grace: Duration,
    /// How long to wait for nodes of every needed type.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub discovery_timeout: Duration,
    /// Refuse a task file of more than N tasks (exit 2) before it takes the memory. Default:
    /// what half of the machine's available memory holds at 250 bytes a task.
    #[arg(long, value_name = "N")]
    pub max_tasks: Option<usize>,
    /// strict: one task after another; type: in order within each type; none: no order.
    #[arg(long, default_value = "strict", value_parser = crate::help::order_parser())]
    pub order: Order,
    /// Retries of a failed task (with exponential back-off).
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Delay before the first retry of a failed task; doubles with each retry.
    #[arg(long, value_name = "DUR", default_value = "100ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// Longest delay between retries (before up to 20% jitter).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub retry_backoff_max: Duration,
    /// Longest a task attempt may run (0: no limit).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub task_timeout: Duration,
    /// After a task finally fails, keep running everything that does not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// Keep every task's result in DIR/ID/ (stdout, meta.json, and its declared outputs);
    /// without it, declared outputs go to ./results/ID/.
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
    /// Largest file this run fetches from a node (a declared output, or a task's whole
    /// stdout or stderr): a node announcing a larger one fails the attempt before any byte
    /// of it moves.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size_u64)]
    pub max_file: u64,
    /// Append each final result to PATH (synced to disk).
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// With --journal: skip the tasks the journal records as succeeded.
    #[arg(long, requires = "journal")]
    pub resume: bool,
    /// One JSON object per line on stdout.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Print only failures and the summary (no progress bar, no per-task lines).
    #[arg(short, long, conflicts_with = "json")]
    pub quiet: bool,
    /// At the end, write a self-contained HTML page of the run to FILE: a timeline with one
    /// lane per node and one bar per attempt, and the summary tables.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// With --report: draw the order constraints (dependencies, strict or type order).
    #[arg(long, requires = "report")]
    pub report_edges: bool,
    /// Serve GET /metrics (Prometheus text) and GET /healthz for this run over HTTP on ADDR
    /// while it lasts; loopback only unless a cluster key is given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
}

/// `p2p-node peers`.
#[derive(Debug, Args)]
pub struct PeersArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// How long to look.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub discovery_timeout: Duration,
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
}

/// `p2p-node status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object per node and line (nodes that did not answer: `addr` and `error`).
    #[arg(long)]
    pub json: bool,
    /// How long to look for nodes.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub discovery_timeout: Duration,
    /// How long a node has to answer, once connected.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_positive_duration)]
    pub answer_timeout: Duration,
    /// The status of this hosted run (progress, each task's state and node) instead, from
    /// the node that hosts it (the first --peer, or the first node discovery finds).
    #[arg(long, value_name = "ID")]
    pub run: Option<String>,
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
}

/// `p2p-node keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key; the file must not exist.
    pub path: PathBuf,
}

/// A size in bytes: a number with an optional unit, B, KB, MB (powers of 1000) or KiB, MiB
/// (powers of 1024); K and M mean KiB and MiB.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 65536, 64KiB, 4MiB, 1MB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "k" | "kib" => 1024,
        "mb" => 1_000_000,
        "m" | "mib" => 1024 * 1024,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KB, KiB, MB or MiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size of files: as [`parse_size`], plus `GB`, `GiB` (`G`), `TB` and `TiB` (`T`).
pub fn parse_size_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 500MiB, 1GiB, 10GB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "k" | "kib" => 1 << 10,
        "mb" => 1_000_000,
        "m" | "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "g" | "gib" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "t" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 3s, 2m, 1h)"))
}

/// A duration that must not be zero (a zero timeout would end everything at once).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0 (examples: 500ms, 3s, 2m, 1h)".into()),
        d => Ok(d),
    }
}

/// A usage or input error: printed, exit status 2.
#[derive(Debug)]
struct Usage(String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

impl From<Usage> for anyhow::Error {
    fn from(u: Usage) -> Self {
        usage(u.0)
    }
}

/// Runs a parsed command line to its exit status.
pub async fn execute(mut cli: Cli, active: crate::output::ActiveBar) -> ExitCode {
    if let Err(e) = cli.command.read_peers_file() {
        say_err!("error: {}", escape(&e));
        return ExitCode::from(EXIT_USAGE);
    }
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let serving = matches!(cli.command, Command::Serve(_));
    spawn_signal_handler(shutdown.clone(), force.clone(), serving);
    let result = match cli.command {
        Command::Serve(a) => serve(a, shutdown, force).await,
        // A second signal stops a run at once: no waiting for results or goodbyes (the
        // guard ends the handler processes it leaves).
        Command::Run(a) => tokio::select! {
            r = run(a, shutdown, active) => r,
            () = force.cancelled() => {
                say_err!("stopped at once (second signal): no more waiting for results or goodbyes");
                Ok(interrupted_status())
            }
        },
        Command::Peers(a) => peers(a).await,
        Command::Status(a) => status(a).await,
        Command::Submit(a) => hosted::submit(a).await,
        Command::Runs(a) => hosted::runs(a).await,
        Command::Attach(a) => hosted::attach(a).await,
        Command::Cancel(a) => hosted::cancel(a).await,
        Command::Results(a) => hosted::results(a).await,
        Command::Keygen(a) => keygen(a),
        Command::Completions { shell } => {
            let mut cmd = crate::help::command();
            clap_complete::generate(shell, &mut cmd, "p2p-node", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
        Command::Man => match crate::help::write_man(&mut std::io::stdout().lock()) {
            Ok(()) => Ok(EXIT_OK),
            // A closed stdout (`| head`) is not an error of ours.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(EXIT_OK),
            Err(e) => Err(anyhow::anyhow!("cannot write the man page: {e}")),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Errors may quote what a peer sent: escaped, line by line.
            let text = format!("{e:#}");
            let lines: Vec<_> = text.split('\n').map(escape).collect();
            say_err!("error: {}", lines.join("\n"));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
    }
}

/// `serve --capacity`: a number of tasks, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// This many tasks at once.
    Fixed(u32),
    /// Follow the machine's load.
    Auto,
}

fn parse_capacity(s: &str) -> Result<Capacity, String> {
    if s == "auto" {
        return Ok(Capacity::Auto);
    }
    s.parse::<u32>()
        .map(Capacity::Fixed)
        .map_err(|_| format!("{s:?} is neither a number of tasks nor auto"))
}

/// While serving: SIGUSR1 grows the capacity by one, SIGUSR2 shrinks it by one (down to 1).
/// Every connection reports the change at once; a shrink stops no running task.
fn spawn_capacity_signals(cap: crate::CapacityHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before the node says it listens, so a signal sent after that never
        // meets the default action (which would end the process).
        let (Ok(mut up), Ok(mut down)) = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) else {
            return;
        };
        tokio::spawn(async move {
            loop {
                let (c, how) = tokio::select! {
                    Some(()) = up.recv() => (cap.grow(), "grown"),
                    Some(()) = down.recv() => (cap.shrink(), "shrunk"),
                    else => return,
                };
                tracing::info!(capacity = c, "capacity {how} by one (signal)");
                say!("capacity {c}");
            }
        });
    }
    #[cfg(not(unix))]
    let _ = cap;
}

/// The first SIGINT or SIGTERM (and SIGHUP with `hangup`, i.e. for serve) cancels `first`
/// (graceful); a second one cancels `second` (at once).
fn spawn_signal_handler(first: CancellationToken, second: CancellationToken, hangup: bool) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            let mut hup = if hangup {
                signal(SignalKind::hangup()).ok()
            } else {
                None
            };
            for n in 0..2 {
                let (name, number) = tokio::select! {
                    _ = int.recv() => ("SIGINT", 2),
                    _ = term.recv() => ("SIGTERM", 15),
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => ("SIGHUP", 1),
                };
                if n == 0 {
                    FIRST_SIGNAL.store(number, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        signal = name,
                        "signal received: shutting down gracefully (a second signal stops at once)"
                    );
                    first.cancel();
                } else {
                    tracing::warn!(signal = name, "second signal: stopping at once");
                    second.cancel();
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("signal received: shutting down gracefully");
            first.cancel();
            let _ = tokio::signal::ctrl_c().await;
            second.cancel();
        }
    });
}

/// What a command does with discovery.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Announces itself where it listens.
    Serve(SocketAddr),
    /// Only looks.
    Client,
}

/// The discovery backends a command line asks for. With no `--discovery` and no `--peer`,
/// `udp` (unless `default_udp` is false, e.g. `run --local`). With a cluster key, udp
/// beacons are sealed with a MAC under it.
fn backends(
    c: &Common,
    role: Role,
    default_udp: bool,
    keys: &[ClusterKey],
) -> anyhow::Result<Vec<Box<dyn Discovery>>> {
    let mut kinds = c.discovery.clone();
    if kinds.is_empty() && c.peers.is_empty() && default_udp {
        kinds.push(Kind::default());
    }
    // Checked here, before a command takes an identity or a journal (a static backend
    // would only find out when the run starts); the interface is parsed after.
    p2p_discovery::check(&kinds, &c.peers, c.discovery_interface.is_some())
        .map_err(discovery_usage)?;
    let mut common = p2p_discovery::Common::new(c.cluster.clone())
        .keys(keys.to_vec())
        .peers(c.peers.clone());
    if let Some(iface) = &c.discovery_interface {
        let parsed: p2p_discovery::Interfaces = iface
            .parse()
            .map_err(|e| usage(format!("--discovery-interface {iface:?}: {e}")))?;
        common = common.interfaces(parsed);
    }
    let role = match role {
        Role::Serve(listen) => p2p_discovery::Role::Serve(listen),
        Role::Client => p2p_discovery::Role::Client,
    };
    p2p_discovery::build_all(&kinds, &common, role).map_err(discovery_usage)
}

/// A discovery settings error in this CLI's words (its flags).
fn discovery_usage(e: p2p_discovery::Error) -> anyhow::Error {
    match e {
        p2p_discovery::Error::PeerAddress(p) => usage(format!("--peer {p:?}: expected HOST:PORT")),
        p2p_discovery::Error::NoPeers => {
            usage("--discovery static needs at least one --peer HOST:PORT")
        }
        p2p_discovery::Error::InterfacesUnused => {
            usage("--discovery-interface applies to udp and mdns discovery only")
        }
        other => node_error(crate::Error::Discovery(other)),
    }
}

/// The discovery settings `run --local` uses: its own loopback nodes, plus `--peer`s;
/// never a network backend (udp, mdns, dns).
fn local_only(c: &Common) -> Common {
    let mut c = c.clone();
    c.discovery.retain(|k| !k.uses_network());
    c.discovery_interface = None;
    c
}

/// A node error is a usage error (exit 2) when it comes from wrong settings: the node's own
/// (limits, names) or a discovery backend's.
fn node_error(e: crate::Error) -> anyhow::Error {
    match e {
        crate::Error::Config(m) => usage(m),
        crate::Error::Unprotected { addr, endpoint } => usage(format!(
            "refusing to {} on {addr} without a cluster key: anyone who can reach it \
             {}. Make a key with `p2p-node keygen KEYFILE`, copy it \
             to every node and pass `--key-file KEYFILE` to each (serve, run, peers); \
             or listen on a loopback address; or pass --insecure",
            endpoint.verb(),
            endpoint.risk()
        )),
        crate::Error::Plan(p) => usage(tasks_error(&p)),
        crate::Error::Discovery(
            d @ (p2p_discovery::Error::Interface(_)
            | p2p_discovery::Error::Config(_)
            | p2p_discovery::Error::MdnsConfig(_)
            | p2p_discovery::Error::Resolve { .. }
            | p2p_discovery::Error::UnknownKind(_)),
        ) => usage(d.to_string()),
        crate::Error::Bind { addr, source } => anyhow::anyhow!("{}", bind_message(addr, &source)),
        other => anyhow::Error::new(other),
    }
}

/// A plan or task error as the CLI says it: an unrunnable order names the flag to change.
fn tasks_error(e: &p2p_tasks::Error) -> String {
    match e {
        p2p_tasks::Error::Plan(p2p_tasks::PlanError::Cycle { order, cycle }) => format!(
            "the plan cannot run in --order {order}: {} waits for {} ({}), which waits for it; \
             use --order none, or reorder the file",
            cycle.first().map_or("", String::as_str),
            cycle.last().map_or("", String::as_str),
            cycle.join(" -> ")
        ),
        other => other.to_string(),
    }
}

/// A journal error as the CLI says it: what to do names the flags (the library's text
/// names none).
fn journal_error(e: &p2p_tasks::journal::JournalError) -> String {
    match e {
        p2p_tasks::journal::JournalError::Exists(path) => format!(
            "journal {} already exists: pass --resume to continue that run, or remove the file \
             to start over",
            path.display()
        ),
        p2p_tasks::journal::JournalError::Locked(path) => format!(
            "journal {} is in use by another running p2p-node (two runs must not share a \
             journal: wait for that run to end, or give this one its own --journal)",
            path.display()
        ),
        other => other.to_string(),
    }
}

/// Why the node cannot listen on `addr`, said once, with what to do.
fn bind_message(addr: SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "cannot listen on {addr}: the address is already in use (another p2p-node or \
             another program listens on port {}): stop it, or give this node another address \
             with --listen (port 0 picks a free one)",
            addr.port()
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "cannot listen on {addr}: no interface of this machine has the address {} \
             (choose one of its addresses with --listen)",
            addr.ip()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot listen on {addr}: permission denied (ports below 1024 need privileges; \
             choose another port with --listen)"
        ),
        _ => format!("cannot listen on {addr}: {e}"),
    }
}

fn parse_types(raw: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = BTreeSet::new();
    for t in raw {
        let t = t.trim().to_ascii_lowercase();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(usage(format!(
                "invalid task type {t:?}: a type is ASCII letters only (e.g. a, b, render)"
            )));
        }
        out.insert(t);
    }
    Ok(out.into_iter().collect())
}

fn parse_handlers(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|h| {
            let (t, cmd) = h
                .split_once('=')
                .ok_or_else(|| usage(format!("--handler {h:?}: expected TYPE=COMMAND")))?;
            let t = parse_types(&[t.to_string()])?.remove(0);
            if cmd.trim().is_empty() {
                return Err(usage(format!("--handler {h:?}: the command is empty")));
            }
            Ok((t, cmd.to_string()))
        })
        .collect()
}

/// Builds and starts a node on the runtime this runs on.
async fn start_node(builder: NodeBuilder) -> Result<Node, crate::Error> {
    let mut node = builder.build().await?;
    node.start()?;
    Ok(node)
}

/// The thread the in-process nodes of a run work on: a single-threaded runtime of their
/// own, so that on a machine with two cores they work beside the coordinator (each task's
/// result is made there while the coordinator takes the next). It stops when dropped:
/// its tasks then end with it (the nodes have drained by then).
struct NodeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl NodeThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("in-process".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // What is left (nothing, after the nodes drained) gets a moment, no more.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(NodeThread {
            handle,
            stop: Some(stop),
        })
    }

    /// Builds and starts a node on this thread.
    async fn start_node(&self, builder: NodeBuilder) -> anyhow::Result<Node> {
        self.handle
            .spawn(start_node(builder))
            .await
            .map_err(|e| anyhow::anyhow!("an in-process node did not start: {e}"))?
            .map_err(node_error)
    }
}

impl Drop for NodeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn handler_for(
    kind: &str,
    handlers: &[(String, String)],
    max_output: usize,
    kill_grace: Duration,
    work: &WorkDirs,
) -> Box<dyn Handler> {
    match handlers.iter().find(|(t, _)| t == kind) {
        Some((_, cmd)) => Box::new(
            Shell::new(cmd.clone())
                .output_limit(max_output)
                .kill_grace(kill_grace)
                .work_dirs(work.clone()),
        ),
        None => Box::new(Builtin),
    }
}

/// Where shell handlers' attempts get their working directories: `DATA_DIR/work` (the
/// data directory as for identities; the system's temporary directory when there is none).
fn work_dirs(c: &Common, keep_failed: bool) -> WorkDirs {
    WorkDirs {
        root: Some(data_dir_of(c).join("work")),
        keep_failed,
    }
}

/// The data directory: `--data-dir`, else the default one, else `TMPDIR/p2p-node`.
fn data_dir_of(c: &Common) -> std::path::PathBuf {
    c.data_dir
        .clone()
        .or_else(datadir::default_dir)
        .unwrap_or_else(|| std::env::temp_dir().join("p2p-node"))
}

/// With shell handlers: this process becomes a child subreaper and starts its guard
/// (see [`crate::guard`]), so nothing a handler starts outlives its task or this process.
fn own_handler_processes(
    handlers: &[(String, String)],
    kill_grace: Duration,
) -> Option<crate::guard::Guard> {
    if handlers.is_empty() {
        return None;
    }
    p2p_tasks::handler::procs::become_subreaper();
    crate::guard::start(kill_grace)
}

fn keygen(a: KeygenArgs) -> anyhow::Result<u8> {
    let key = ClusterKey::write_new(&a.path).map_err(|e| usage(e.to_string()))?;
    say!(
        "wrote a new cluster key to {} (file mode 0600, fingerprint {})",
        a.path.display(),
        key.fingerprint()
    );
    say!(
        "copy it to every node of the cluster (keep it secret) and pass --key-file {} \
         (or set P2P_KEY_FILE) to serve, run and peers",
        a.path.display()
    );
    Ok(EXIT_OK)
}

/// The cluster keys of `--key-file` (or P2P_KEY_FILE), in order (the first is the one the
/// node dials with); without either, `$CREDENTIALS_DIRECTORY/cluster.key` if it exists;
/// else empty.
fn load_key(c: &Common) -> anyhow::Result<Vec<ClusterKey>> {
    let files = match (c.key_files.is_empty(), crate::datadir::credentials_key()) {
        (true, Some(p)) => {
            tracing::debug!(path = %p.display(), "cluster key from $CREDENTIALS_DIRECTORY");
            vec![p]
        }
        _ => c.key_files.clone(),
    };
    files
        .iter()
        .map(|p| ClusterKey::load(p).map_err(|e| usage(format!("--key-file: {}", key_error(&e)))))
        .collect()
}

/// A key file error as the CLI says it: the library's message, and how to make a key when
/// there is none.
fn key_error(e: &p2p_core::KeyError) -> String {
    match e {
        p2p_core::KeyError::Missing { path } => {
            format!("{e} (create one with `p2p-node keygen {}`)", path.display())
        }
        _ => e.to_string(),
    }
}

/// A connection error as the CLI says it: the library's message (which names no flag),
/// and this CLI's hint where a missing or extra `--key-file` is the likely cause.
fn core_error(e: &p2p_core::Error) -> String {
    use p2p_core::{HandshakeError, Stage};
    let hint = match e.handshake() {
        Some(HandshakeError::PeerHasKey) => " (pass --key-file)",
        Some(HandshakeError::Plaintext) => " (every node of the cluster needs --key-file)",
        Some(HandshakeError::PeerClosed {
            stage: Stage::Hello { keyed: false },
        }) => " (a node with a cluster key drops peers without it: is --key-file missing?)",
        _ => "",
    };
    if let p2p_core::Error::Io(io) = e {
        if io.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) {
            return format!(
                "{e} ({}; raise it with ulimit -n)",
                crate::fdlimit::Limit::current()
            );
        }
    }
    format!("{e}{hint}")
}

fn with_key(b: NodeBuilder, keys: &[ClusterKey]) -> NodeBuilder {
    b.keys(keys.to_vec()).describe_errors(core_error)
}

/// The identity this process runs with, held until the returned value is dropped:
/// `--identity PATH`, else the first free `slot` of the data directory (see
/// [`crate::datadir`]), else (no slot, or no usable default data directory) none, which
/// means a new identity.
fn load_identity(c: &Common, slot: Option<&str>) -> anyhow::Result<Option<HeldIdentity>> {
    let held = if let Some(path) = &c.identity {
        match datadir::hold(path) {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Err(usage(format!(
                    "--identity {}: another running p2p-node holds this identity; two live \
                     nodes must not share one (give each its own --identity, or none to use \
                     --data-dir)",
                    path.display()
                )))
            }
            // The identity error names the file already.
            Err(crate::Error::Identity { message, .. }) => {
                return Err(usage(format!("--identity: {message}")))
            }
            Err(e) => return Err(usage(format!("--identity: {e}"))),
        }
    } else if let Some(name) = slot {
        let dir = match (&c.data_dir, datadir::default_dir()) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => d,
            (None, None) => {
                tracing::warn!(
                    "no data directory (neither --data-dir, STATE_DIRECTORY, XDG_DATA_HOME nor HOME is \
                     set): \
                     this node gets a new identity"
                );
                return Ok(None);
            }
        };
        match datadir::hold_slot(&dir, name) {
            Ok(h) => h,
            Err(e) if c.data_dir.is_some() => return Err(usage(format!("--data-dir: {e}"))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the default data directory: this node gets a new identity");
                return Ok(None);
            }
        }
    } else {
        return Ok(None);
    };
    Ok(Some(held))
}

/// Logs the identity a command runs with, once it is sure to run.
fn log_identity(identity: &Option<HeldIdentity>) {
    if let Some(held) = identity {
        tracing::info!(
            node = %held.identity.node_id(),
            path = %held.path.display(),
            "{}",
            if held.created { "created a new identity" } else { "identity loaded" }
        );
    }
}

/// Gives up an identity taken for a command that fails to start (see
/// [`HeldIdentity::discard`]).
fn discard(identity: Option<HeldIdentity>) {
    if let Some(held) = identity {
        held.discard();
    }
}

fn with_identity(b: NodeBuilder, identity: &Option<HeldIdentity>) -> NodeBuilder {
    match identity {
        Some(h) => b.identity(h.identity.clone()),
        None => b,
    }
}

async fn serve(
    a: ServeArgs,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> anyhow::Result<u8> {
    // Every argument is checked before the identity is taken (which may create a file).
    // A serving node dials nobody for itself: its --peers are the nodes the runs it hosts
    // dial (besides their discovery); its own discovery announces it as without them.
    if a.common.discovery.contains(&Kind::Static) {
        return Err(usage(
            "serve does not take --discovery static: a serving node dials nobody, it is found \
             (by discovery, or by the --peer of run and peers); its own --peer names the nodes \
             the runs it hosts dial",
        ));
    }
    let own = Common {
        peers: Vec::new(),
        ..a.common.clone()
    };
    if !a.common.peers.is_empty() {
        p2p_discovery::check(&[Kind::Static], &a.common.peers, false).map_err(discovery_usage)?;
    }
    let types = parse_types(&a.types)?;
    let handlers = parse_handlers(&a.handlers)?;
    if let Some((t, _)) = handlers.iter().find(|(t, _)| !types.contains(t)) {
        return Err(usage(format!(
            "--handler for type {t:?}, which is not in --types"
        )));
    }
    let key = load_key(&a.common)?;
    let listen = a.listen.unwrap_or_else(|| {
        let ip = if !key.is_empty() {
            [0, 0, 0, 0]
        } else {
            [127, 0, 0, 1]
        };
        SocketAddr::from((ip, 7400))
    });
    let discoveries = backends(&own, Role::Serve(listen), true, &key)?;
    // Every connection is a descriptor: the soft limit goes up to the hard one, and a limit
    // below --max-connections is said (connections beyond fail at accept, and are retried).
    let limit = crate::fdlimit::raise();
    if limit.connections() < a.max_connections as usize {
        tracing::warn!(
            "{limit}: about {} connections fit, fewer than --max-connections {} (raise it with \
             ulimit -n, or LimitNOFILE= in a systemd unit)",
            limit.connections(),
            a.max_connections
        );
    }
    let mut b = with_key(Node::builder(), &key)
        .cluster(a.common.cluster.clone())
        .discoveries(discoveries)
        .listen(listen)
        .insecure(a.insecure)
        .max_connections(a.max_connections as usize)
        .max_handshakes(a.max_handshakes as usize)
        .max_frame(a.common.max_frame)
        .max_output(a.max_output)
        .drain_timeout(a.drain_timeout)
        .handshake_timeout(a.handshake_timeout);
    match a.capacity {
        Some(Capacity::Fixed(c)) => b = b.capacity(c),
        Some(Capacity::Auto) => b = b.capacity_auto(true),
        None => {}
    }
    if let Some(m) = a.metrics_listen {
        b = b.metrics_listen(m);
    }
    let identity = load_identity(&a.common, Some("identity"))?;
    // The node's file cache: DATA_DIR/cache/SLOT (its identity's file name), so nodes
    // sharing a data directory keep their own accounts.
    let slot = identity
        .as_ref()
        .and_then(|h| h.path.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("default")
        .to_owned();
    // Working directories: DATA_DIR/work/SLOT, this node's alone while it holds the slot,
    // so what is there now was left by an earlier process of the slot killed before it
    // could remove it (kill -9): swept, unless failed attempts are kept (--keep-work). Not
    // with --identity (its file name is no held slot of this data directory: two nodes
    // with files of the same name would share it), nor without an identity held.
    let mut work = work_dirs(&a.common, a.keep_work);
    work.root = work.root.map(|r| r.join(&slot));
    let own_slot = identity.is_some() && a.common.identity.is_none();
    if own_slot && !a.keep_work {
        match work.sweep() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                dir = %work.root.as_deref().unwrap_or(std::path::Path::new("")).display(),
                "removed working directories left by an earlier process"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot remove old working directories"),
        }
    }
    for t in &types {
        b = b.handler(
            t,
            handler_for(t, &handlers, a.max_output, a.kill_grace, &work),
        );
    }
    let cache_dir = p2p_tasks::node_files::cache_dir(&data_dir_of(&a.common), &slot);
    // Made now, it goes again if the node is refused (as the identity does).
    let made = [cache_dir.clone(), data_dir_of(&a.common).join("cache")]
        .into_iter()
        .filter(|d| !d.exists())
        .collect::<Vec<_>>();
    let unmake = || {
        for d in &made {
            let _ = std::fs::remove_dir_all(d);
        }
    };
    let cache = match p2p_tasks::cache::Cache::open(&cache_dir, a.cache_size) {
        Ok(c) => c,
        Err(e) => {
            discard(identity);
            return Err(usage(format!(
                "cannot open the file cache {}: {e}",
                cache_dir.display()
            )));
        }
    };
    let node_files = std::sync::Arc::new(
        p2p_tasks::node_files::NodeFiles::new(
            cache,
            a.max_file.unwrap_or(a.cache_size),
            a.common.max_frame,
        )
        .with_max_result(a.max_result_size)
        .with_link_inputs(a.link_inputs),
    );
    let b = b.files(node_files.clone());
    let mut node = match with_identity(b, &identity).build().await {
        Ok(node) => node,
        Err(e) => {
            discard(identity);
            unmake();
            return Err(node_error(e));
        }
    };
    log_identity(&identity);
    let _guard = own_handler_processes(&handlers, a.kill_grace);
    match key.first() {
        Some(k) => tracing::info!(
            fingerprint = %k.fingerprint(),
            accepted = %key.iter().map(ClusterKey::fingerprint).collect::<Vec<_>>().join(","),
            "cluster key loaded: connections are authenticated and encrypted"
        ),
        None if !listen.ip().is_loopback() => tracing::warn!(
            "--insecure: listening on {listen} without a cluster key: anyone who can reach it \
             can run tasks here and read task traffic (make a key: p2p-node keygen KEYFILE)"
        ),
        None => {}
    }
    let addr = node
        .local_addr()
        .ok_or_else(|| anyhow::anyhow!("the node has no listen address"))?;
    spawn_capacity_signals(node.capacity_handle());
    // Hosted runs live in the data directory; without one, `submit` is refused.
    let host = match a.common.data_dir.clone().or_else(datadir::default_dir) {
        Some(dir) if a.max_runs > 0 => {
            let limits = crate::hosted::registry::Limits {
                max_runs: a.max_runs as usize,
                max_plan: a.max_plan,
                keep: a.keep_runs,
                ..Default::default()
            };
            let replicas_dir = dir.join("replicas").join(node.id().to_string());
            let mut config = hosted::host_config(&a.common, &key, dir, node.id(), addr, limits);
            config.files = Some(node_files);
            let host = crate::hosted::Host::new(config).map_err(node_error)?;
            node.host_runs(host.service());
            // Every hosting node takes part in other hosts' groups; with --replica it also
            // replicates its own runs.
            let (hello, settings) = node.dial_settings();
            let reach: SocketAddr = if addr.ip().is_unspecified() {
                let lo: std::net::IpAddr = if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                (lo, addr.port()).into()
            } else {
                addr
            };
            let replicas = crate::hosted::replica_io::ReplicaConfig {
                dir: replicas_dir,
                me: p2p_core::replica::Member {
                    node: node.id(),
                    addr: SocketAddr::to_string(&reach),
                },
                candidates: a.replicas.clone(),
                hello,
                settings,
                max_groups: 4 * a.max_runs as usize,
            };
            let replicas = crate::hosted::replica_io::Replicas::new(replicas, host.clone());
            node.replicate_runs(replicas.service());
            host.replicate(replicas);
            Some(host)
        }
        _ => None,
    };
    say!("listening on {addr}");
    say!(
        "node {} cluster {} types {} capacity {} discovery {}",
        node.id(),
        node.cluster(),
        node.types().join(","),
        node.capacity(),
        discovery_names(&a.common)
    );
    if let Some(m) = node.metrics_addr() {
        say!("metrics on http://{m}/metrics");
    }
    let token = node.shutdown_token();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        token.cancel();
    });
    let stop = node.stop_handle();
    tokio::spawn(async move {
        force.cancelled().await;
        stop.stop_now();
    });
    if let Some(host) = &host {
        let resumed = host.resume().map_err(node_error)?;
        if resumed > 0 {
            tracing::info!(runs = resumed, "resuming the unfinished hosted runs");
        }
        // Shutting down interrupts the hosted runs (they resume at the next start).
        let (host, token) = (host.clone(), node.shutdown_token());
        tokio::spawn(async move {
            token.cancelled().await;
            host.stop(STOP_HOSTED).await;
        });
    }
    node.serve().await.map_err(node_error)?;
    if let Some(host) = &host {
        host.stop(STOP_HOSTED).await;
    }
    // Whatever a handler left running (the tasks themselves are over) ends with the node.
    p2p_tasks::handler::procs::stop_all(a.kill_grace).await;
    say!("stopped");
    Ok(EXIT_OK)
}

/// How long hosted runs have to record where they are when the node stops.
const STOP_HOSTED: Duration = Duration::from_secs(10);

fn discovery_names(c: &Common) -> String {
    let mut names: Vec<String> = c.discovery.iter().map(|k| k.to_string()).collect();
    if !c.peers.is_empty() && !c.discovery.contains(&Kind::Static) {
        names.push("static".into());
    }
    if names.is_empty() {
        names.push("udp".into());
    }
    names.join(",")
}

/// What a run's coordinator takes per task at its peak, rounded up (docs/PERFORMANCE.md:
/// 196 bytes at 1,000,000 tasks and 190 at 10,000,000, compact tasks and results).
const BYTES_PER_TASK: u64 = 250;

/// The default `--max-tasks`: what half of the available memory (`MemAvailable`) holds at
/// [`BYTES_PER_TASK`]; no limit where the available memory is not known.
fn default_max_tasks() -> usize {
    let avail_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match avail_kb {
        Some(kb) => {
            usize::try_from(kb.saturating_mul(1024) / 2 / BYTES_PER_TASK).unwrap_or(usize::MAX)
        }
        None => usize::MAX,
    }
}

async fn run(
    a: RunArgs,
    shutdown: CancellationToken,
    active: crate::output::ActiveBar,
) -> anyhow::Result<u8> {
    let key = load_key(&a.common)?;
    let max_tasks = a.max_tasks.unwrap_or_else(default_max_tasks);
    let tasks = p2p_tasks::parse::load_at_most(&a.tasks_file, max_tasks).map_err(|e| {
        if e.kind == p2p_tasks::parse::ParseErrorKind::TooManyTasks {
            usage(format!(
                "{e} (--max-tasks {max_tasks}{}); give a larger --max-tasks to run it anyway",
                if a.max_tasks.is_none() {
                    ": the default, what half of the available memory holds at \
                     250 bytes a task"
                } else {
                    ""
                }
            ))
        } else {
            usage(e.to_string())
        }
    })?;
    if a.retry_backoff_max < a.retry_backoff {
        return Err(usage(format!(
            "--retry-backoff-max {:?} is shorter than --retry-backoff {:?}",
            a.retry_backoff_max, a.retry_backoff
        )));
    }
    let backoff = p2p_tasks::Backoff::default();
    let opts = RunOptions::default()
        .policy(
            Policy::default()
                .order(a.order)
                .retries(a.retries)
                .keep_going(a.keep_going)
                .backoff(p2p_tasks::Backoff::new(
                    a.retry_backoff,
                    a.retry_backoff_max,
                    backoff.jitter,
                )),
        )
        .task_timeout(a.task_timeout)
        .discovery_timeout(a.discovery_timeout)
        // An out-of-range frame limit is refused with its own message when the node is
        // built; the plan is checked against the limit the node will have.
        .max_frame(
            a.common
                .max_frame
                .clamp(crate::node::MIN_MAX_FRAME, crate::node::MAX_MAX_FRAME),
        )
        .results(a.results.clone())
        .max_file(a.max_file)
        // Only `--json`, `--report` and `--metrics-listen` read assignments (the human and
        // quiet output show none): without them the run does not make an event a task for
        // them.
        .assignment_events(a.json || a.report.is_some() || a.metrics_listen.is_some())
        // `--quiet` shows no success (its tables take them from the report): without the
        // readers above the run counts them instead of making an event a task.
        .success_events(!a.quiet || a.report.is_some() || a.metrics_listen.is_some());
    p2p_tasks::runcore::validate(&tasks, &opts).map_err(|e| match e {
        p2p_tasks::RunError::Unsendable {
            task,
            line,
            col,
            why,
        } => usage(format!(
            "{}:{line}:{col}: task {task} cannot be sent: {why}",
            a.tasks_file.display()
        )),
        e => usage(tasks_error(&e)),
    })?;
    let handlers = parse_handlers(&a.handlers)?;
    let own_types = parse_types(&a.types)?;
    // `--local` runs on its own loopback nodes and never uses network discovery, whatever
    // the command line or a config file says; otherwise the default is udp discovery.
    let discovery = match a.local {
        Some(_) => backends(&local_only(&a.common), Role::Client, false, &key)?,
        None => backends(&a.common, Role::Client, true, &key)?,
    };
    tracing::debug!(
        discovery = %discovery.iter().map(|d| d.name()).collect::<Vec<_>>().join(","),
        "discovery backends of this run"
    );
    // In-process nodes: N per needed type with --local, one per --types entry.
    let mut local_types: Vec<(String, u32)> = own_types.iter().map(|t| (t.clone(), 1)).collect();
    if let Some(n) = a.local {
        if n == 0 {
            return Err(usage("--local N: N must be at least 1"));
        }
        let mut needed: Vec<String> = tasks.iter().map(|t| t.kind().to_owned()).collect();
        needed.sort();
        needed.dedup();
        local_types = needed.into_iter().map(|t| (t, n)).collect();
    }
    // Every peer is a descriptor: the soft limit goes up to the hard one, and a --peer list
    // it cannot hold is refused now rather than failing peer by peer. An in-process node
    // takes a peer's place in the run but holds no descriptor (no listener, no socket: its
    // link is in memory).
    let limit = crate::fdlimit::raise();
    let in_process: u64 = local_types.iter().map(|(_, n)| u64::from(*n)).sum();
    let peers = a.common.peers.len().saturating_add(in_process as usize);
    crate::fdlimit::check_peers(peers, 0, limit).map_err(usage)?;
    let _guard = own_handler_processes(&handlers, a.kill_grace);
    let work = work_dirs(&a.common, false);
    // In-process nodes share one file cache for the run, removed after it (only when a
    // task has files).
    let local_cache = if !local_types.is_empty() && tasks.iter().any(|t| t.has_files()) {
        let parent = data_dir_of(&a.common).join("cache");
        let dir = std::fs::create_dir_all(&parent)
            .and_then(|()| {
                tempfile::Builder::new()
                    .prefix("local-")
                    .tempdir_in(&parent)
            })
            .map_err(|e| {
                usage(format!(
                    "cannot make a file cache in {}: {e}",
                    parent.display()
                ))
            })?;
        let cache = p2p_tasks::cache::Cache::open(dir.path(), p2p_tasks::cache::DEFAULT_CACHE_SIZE)
            .map_err(|e| usage(format!("cannot open a file cache: {e}")))?;
        let files = std::sync::Arc::new(p2p_tasks::node_files::NodeFiles::new(
            cache,
            p2p_tasks::cache::DEFAULT_CACHE_SIZE,
            a.common.max_frame,
        ));
        Some((dir, files))
    } else {
        None
    };
    // In-process nodes listen nowhere: the run reaches them over the in-memory transport
    // (`Message` values over bounded channels, no socket and no codec). When tasks run side
    // by side (`--order type` or `none`) the nodes run on a thread of their own, beside the
    // coordinator's; in strict order one task is in flight at a time, and crossing threads
    // would only add two wake-ups (system calls) to each round trip.
    let node_thread = if local_types.is_empty() || a.order == p2p_tasks::Order::Strict {
        None
    } else {
        Some(
            NodeThread::start()
                .map_err(|e| anyhow::anyhow!("cannot start the in-process nodes' thread: {e}"))?,
        )
    };
    let mut local_nodes = Vec::new();
    let mut doors = Vec::new();
    for (t, n) in &local_types {
        for _ in 0..*n {
            let mut builder = with_key(Node::builder(), &key).in_process(true);
            if let Some((_, files)) = &local_cache {
                builder = builder.files(files.clone());
            }
            let builder = builder
                .cluster(a.common.cluster.clone())
                .handler(
                    t,
                    handler_for(t, &handlers, a.max_output, a.kill_grace, &work),
                )
                .max_frame(a.common.max_frame)
                .max_output(a.max_output);
            let node = match &node_thread {
                Some(thread) => thread.start_node(builder).await?,
                None => start_node(builder).await.map_err(node_error)?,
            };
            doors.extend(node.in_process());
            local_nodes.push(node);
        }
    }
    let identity = load_identity(&a.common, Some("coordinator"))?;
    let built = with_identity(with_key(Node::builder(), &key), &identity)
        .cluster(a.common.cluster.clone())
        .discoveries(discovery)
        .max_frame(a.common.max_frame)
        .build()
        .await;
    let mut coordinator = match built {
        Ok(c) => c,
        Err(e) => {
            discard(identity);
            return Err(node_error(e));
        }
    };
    // Held (locked) from here to the end of the run: a second run on it is refused.
    let journal = match &a.journal {
        Some(path) => match p2p_tasks::Journal::open(path, &tasks, a.resume) {
            Ok(j) => Some(j),
            Err(e) => {
                discard(identity);
                return Err(usage(journal_error(&e)));
            }
        },
        None => None,
    };
    log_identity(&identity);
    let token = coordinator.shutdown_token();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        token.cancel();
    });
    let format = if a.json {
        Format::Json
    } else if a.quiet {
        Format::Quiet
    } else {
        Format::Human
    };
    let mut printer = Printer::new(format, tasks.len())
        .active_bar(active)
        .in_process((0..doors.len()).map(crate::node::in_process_addr));
    let report_file = match &a.report {
        Some(p) => Some(
            crate::report::ReportFile::new(p, &tasks, a.order, a.report_edges)
                .map_err(|e| usage(format!("--report {}: {e}", p.display())))?,
        ),
        None => None,
    };
    if let Some(r) = &report_file {
        printer.tap(r.tap());
    }
    let run_metrics = match a.metrics_listen {
        Some(addr) => {
            let m = crate::metrics::RunMetrics::start(addr, !key.is_empty(), tasks.len())
                .await
                .map_err(|e| usage(e.to_string()))?;
            say_err!("metrics on http://{}/metrics", m.addr());
            printer.tap(m.tap());
            Some(m)
        }
        None => None,
    };
    printer.event(&p2p_tasks::RunEvent::RunStarted {
        schema: p2p_tasks::EVENT_SCHEMA,
        run: p2p_core::NodeId::random().to_string(),
        tasks: tasks.len(),
        order: a.order.to_string(),
    });
    let mut run = coordinator
        .run(tasks)
        .options(opts)
        .on_event(|ev| printer.event(ev));
    for door in doors {
        run = run.in_process(door);
    }
    if let Some(journal) = journal {
        run = run.journal(journal);
    }
    let report = run.await.map_err(node_error)?;
    printer.report(&report);
    drop(run_metrics);
    for n in &local_nodes {
        n.shutdown();
    }
    for n in &local_nodes {
        n.drain().await;
    }
    if !handlers.is_empty() {
        p2p_tasks::handler::procs::stop_all(a.kill_grace).await;
    }
    if let Some(r) = &report_file {
        r.write(&report)
            .map_err(|e| anyhow::anyhow!("cannot write --report {}: {e}", r.path().display()))?;
    }
    Ok(if report.interrupted {
        interrupted_status()
    } else if report.is_success() {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

async fn peers(a: PeersArgs) -> anyhow::Result<u8> {
    let key = load_key(&a.common)?;
    let discovery = backends(&a.common, Role::Client, true, &key)?;
    let held = load_identity(&a.common, None)?;
    log_identity(&held);
    let identity = held
        .as_ref()
        .map_or_else(Identity::generate, |h| h.identity.clone());
    let (found, unreachable) = crate::peers::probe(
        &a.common.cluster,
        discovery,
        a.discovery_timeout,
        key,
        identity,
        core_error,
    )
    .await?;
    for line in &unreachable {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
    for p in &found {
        if a.json {
            say!("{}", serde_json::to_string(p)?);
        }
    }
    if !a.json {
        say!(
            "{:<34} {:<22} {:<12} {:>8} {:>7} {:>10}  {:<7} LAST SEEN",
            "NODE",
            "ADDRESS",
            "TYPES",
            "CAPACITY",
            "TASKS",
            "MEAN TASK",
            "SOURCE"
        );
        for p in &found {
            let tasks = p.tasks.map_or_else(|| "-".to_string(), |t| t.to_string());
            let mean = p
                .mean_task_ms
                .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"));
            say!(
                "{:<34} {:<22} {:<12} {:>8} {:>7} {:>10}  {:<7} {:.1}s after start",
                escape(&p.node),
                escape(&p.addr),
                escape(&p.types.join(",")),
                p.capacity,
                tasks,
                mean,
                escape(&p.source),
                p.seen_ms as f64 / 1000.0
            );
        }
    }
    Ok(if found.is_empty() {
        EXIT_FAILED
    } else {
        EXIT_OK
    })
}

async fn status(a: StatusArgs) -> anyhow::Result<u8> {
    if let Some(run) = a.run {
        let client = hosted::HostClient {
            discovery_timeout: a.discovery_timeout,
            answer_timeout: a.answer_timeout,
            common: a.common,
        };
        return hosted::run_status(run, a.json, client).await;
    }
    let key = load_key(&a.common)?;
    let discovery = backends(&a.common, Role::Client, true, &key)?;
    let held = load_identity(&a.common, None)?;
    let identity = held
        .as_ref()
        .map_or_else(Identity::generate, |h| h.identity.clone());
    let answers = crate::status::probe(
        &a.common.cluster,
        discovery,
        a.discovery_timeout,
        a.answer_timeout,
        key,
        identity,
        core_error,
    )
    .await
    .map_err(node_error)?;
    let mut failed = answers.is_empty();
    for answer in &answers {
        match answer {
            Ok(n) if a.json => say!("{}", serde_json::to_string(n)?),
            Ok(n) => say!("{}", crate::status::describe(n)),
            Err(u) => {
                failed = true;
                if a.json {
                    say!("{}", serde_json::to_string(u)?);
                } else {
                    say_err!("{}: {}", escape(&u.addr), escape(&u.error));
                }
            }
        }
    }
    if answers.is_empty() && !a.json {
        say_err!("no node found (give --peer ADDR or a --discovery backend)");
    }
    Ok(if failed { EXIT_FAILED } else { EXIT_OK })
}
