//! The commands of hosted runs: `submit`, `runs`, `attach`, `cancel` and `status --run`
//! (see [`crate::hosted`]), and what `serve` needs to host runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use p2p_core::hosted::{Hosted, RunInfo, Submit, SubmitFiles, SubmitOptions};
use p2p_core::text::escape;
use p2p_core::Identity;
use p2p_discovery::Event;
use p2p_tasks::Order;

use super::{
    backends, core_error, load_key, parse_duration, parse_positive_duration, tasks_error, usage,
    with_key, Common, Role, EXIT_FAILED, EXIT_OK,
};
use crate::hosted::{CoordinatorFactory, HostConfig};
use crate::Node;

/// Options of every command that asks one node about its hosted runs.
#[derive(Debug, Args)]
pub struct HostClient {
    /// How long to look for the node (the first --peer, or the first node discovery finds).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub discovery_timeout: Duration,
    /// How long the node has to answer, once connected.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_positive_duration)]
    pub answer_timeout: Duration,
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
}

/// `p2p-node submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The task file.
    pub tasks_file: PathBuf,
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
    /// How the node reaches (and the run waits for) nodes of every needed type.
    #[command(flatten)]
    pub client: HostClient,
}

/// `p2p-node runs`.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// One JSON object per run and line.
    #[arg(long)]
    pub json: bool,
    /// The node to ask.
    #[command(flatten)]
    pub client: HostClient,
}

/// `p2p-node attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The run's id (as `submit` printed it).
    pub run: String,
    /// The run's events as `run --json` prints them, one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// The node that hosts the run.
    #[command(flatten)]
    pub client: HostClient,
}

/// `p2p-node results`.
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// The run's id.
    pub run: String,
    /// Where the files go: DIR/TASK_ID/stdout, stderr, meta.json and the task's outputs.
    #[arg(long, value_name = "DIR", default_value = "results")]
    pub to: PathBuf,
    /// The node that hosts the run.
    #[command(flatten)]
    pub client: HostClient,
}

/// `p2p-node cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run's id.
    pub run: String,
    /// The node that hosts the run.
    #[command(flatten)]
    pub client: HostClient,
}

/// The address of the node to ask: the first `--peer`, else the first node discovery finds.
async fn find_node(c: &HostClient, keys: &[p2p_core::ClusterKey]) -> anyhow::Result<SocketAddr> {
    if let Some(p) = c.common.peers.first() {
        let mut addrs = tokio::net::lookup_host(p.as_str())
            .await
            .map_err(|e| usage(format!("--peer {p:?}: {e}")))?;
        return addrs
            .next()
            .ok_or_else(|| usage(format!("--peer {p:?}: no address")));
    }
    let found = backends(&c.common, Role::Client, true, keys)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut rx = p2p_discovery::start_all(found, None, stop.clone())
        .map_err(|e| super::node_error(crate::Error::Discovery(e)))?;
    let first = tokio::time::timeout(c.discovery_timeout, async {
        while let Some(ev) = rx.recv().await {
            if let Event::Discovered(p) = ev {
                return Some(p.addr);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    stop.cancel();
    first
        .ok_or_else(|| anyhow::anyhow!("no node found (give --peer ADDR or a --discovery backend)"))
}

/// Sends one request to the node `c` names; answers before the final one go to `each`.
async fn ask(
    c: &HostClient,
    req: Hosted,
    bounded: bool,
    each: impl FnMut(&Hosted),
) -> anyhow::Result<Hosted> {
    ask_with(c, &[], req, bounded, each).await
}

/// [`ask`], after shipping `inputs` to the node on the same connection.
async fn ask_with(
    c: &HostClient,
    inputs: &[crate::hosted::files::LocalInput],
    req: Hosted,
    bounded: bool,
    each: impl FnMut(&Hosted),
) -> anyhow::Result<Hosted> {
    let key = load_key(&c.common)?;
    let addr = find_node(c, &key).await?;
    let (hello, settings) = crate::peers::client(&c.common.cluster, &key, Identity::generate());
    let limit = bounded.then_some(c.answer_timeout);
    crate::hosted::request_with_inputs(addr, hello, &settings, inputs, req, limit, each)
        .await
        .map_err(|e| anyhow::anyhow!("{addr}: {}", core_error(&e)))
}

/// A refusal: its reason on stderr, exit status 1.
fn refused(reason: &str) -> u8 {
    say_err!("refused: {}", escape(reason));
    EXIT_FAILED
}

fn unexpected(h: &Hosted) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer {} from the node", h.kind())
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&a.tasks_file)
        .map_err(|e| usage(format!("{}: {e}", a.tasks_file.display())))?;
    let name = a.tasks_file.display().to_string();
    let tasks = p2p_tasks::parse::parse(&name, &text).map_err(|e| usage(e.to_string()))?;
    // The plan's input files are shipped with it: checked and hashed here, against the
    // task file's directory, as `run` would read them.
    let inputs = if crate::hosted::files::has_path_inputs(&tasks) {
        let base = a
            .tasks_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let resolved = p2p_tasks::parse::parse_with_base(&name, &text, base)
            .map_err(|e| usage(e.to_string()))?;
        crate::hosted::files::local_inputs(&tasks, &resolved)
            .map_err(|e| usage(format!("cannot read an input: {e}")))?
    } else {
        Vec::new()
    };
    let options = SubmitOptions {
        order: crate::hosted::order_code(a.order),
        retries: a.retries,
        keep_going: a.keep_going,
        retry_backoff_ms: millis(a.retry_backoff),
        retry_backoff_max_ms: millis(a.retry_backoff_max),
        task_timeout_ms: millis(a.task_timeout),
        discovery_timeout_ms: millis(a.client.discovery_timeout),
    };
    let opts = crate::hosted::run_options(&options, a.client.common.max_frame);
    p2p_tasks::runcore::validate(&tasks, &opts).map_err(|e| usage(tasks_error(&e)))?;
    let submit = Submit {
        name,
        text,
        options,
    };
    let req = if inputs.is_empty() {
        Hosted::Submit(Box::new(submit))
    } else {
        Hosted::SubmitFiles(Box::new(SubmitFiles {
            submit,
            inputs: inputs.iter().map(|i| i.submitted.clone()).collect(),
        }))
    };
    match ask_with(&a.client, &inputs, req, true, |_| {}).await? {
        Hosted::Submitted { run } => {
            say!("{}", escape(&run));
            Ok(EXIT_OK)
        }
        Hosted::Refused { reason } => Ok(refused(&reason)),
        other => Err(unexpected(&other)),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn info_line(i: &RunInfo) -> String {
    format!(
        "{:<32} {:<11} {:>6} {:>6} {:>6} {:>7}  {}  {}",
        escape(&i.run),
        i.state.as_str(),
        i.total,
        i.succeeded,
        i.failed,
        i.running,
        when(i.started_ms),
        escape(&i.name)
    )
}

const HEADER: &str = "RUN                              STATE        TOTAL     OK FAILED RUNNING  STARTED               FILE";

pub async fn runs(a: RunsArgs) -> anyhow::Result<u8> {
    match ask(&a.client, Hosted::List, true, |_| {}).await? {
        Hosted::Runs(runs) => {
            if a.json {
                for r in &runs {
                    say!("{}", serde_json::to_string(r)?);
                }
            } else {
                say!("{HEADER}");
                for r in &runs {
                    say!("{}", info_line(r));
                }
            }
            Ok(EXIT_OK)
        }
        Hosted::Refused { reason } => Ok(refused(&reason)),
        other => Err(unexpected(&other)),
    }
}

/// `status --run ID`.
pub async fn run_status(run: String, json: bool, client: HostClient) -> anyhow::Result<u8> {
    match ask(&client, Hosted::Status { run }, true, |_| {}).await? {
        Hosted::RunStatus(d) => {
            if json {
                say!("{}", serde_json::to_string(&*d)?);
            } else {
                say!("{HEADER}");
                say!("{}", info_line(&d.info));
                for t in &d.tasks {
                    let node: String = t.node.chars().take(12).collect();
                    let on = if node.is_empty() {
                        String::new()
                    } else {
                        format!(" on {}", escape(&node))
                    };
                    say!("  {} {}{on}", escape(&t.task), escape(&t.state));
                }
            }
            Ok(EXIT_OK)
        }
        Hosted::Refused { reason } => Ok(refused(&reason)),
        other => Err(unexpected(&other)),
    }
}

/// An attached run's event as `run` shows it: each event read back from its JSON line and
/// given to `run`'s printer (made at the first event, `run_started`, which names the
/// number of tasks); an event this version does not know is skipped.
struct Shown {
    printer: Option<crate::output::Printer>,
}

impl Shown {
    fn event(&mut self, json: &str) {
        let Ok(ev) = serde_json::from_str::<p2p_tasks::RunEvent>(json) else {
            return;
        };
        let printer = self.printer.get_or_insert_with(|| {
            let total = match &ev {
                p2p_tasks::RunEvent::RunStarted { tasks, .. } => *tasks,
                _ => 0,
            };
            crate::output::Printer::new(crate::output::Format::Human, total)
        });
        printer.event(&ev);
        // `run` writes out at its Flush events, which are not sent to attached clients:
        // each event goes out as it comes.
        printer.flush();
    }
}

pub async fn attach(a: AttachArgs) -> anyhow::Result<u8> {
    let json = a.json;
    let mut shown = Shown { printer: None };
    let each = |h: &Hosted| {
        if let Hosted::Event { json: line } = h {
            if json {
                // Re-serialized: what is printed is JSON whatever the node sent.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    say!("{v}");
                }
            } else {
                shown.event(line);
            }
        }
    };
    let last = ask(&a.client, Hosted::Attach { run: a.run }, false, each).await?;
    if let Some(mut p) = shown.printer.take() {
        p.tables();
    }
    match last {
        Hosted::Ended(end) => {
            if !json {
                say!("Run {} {}", escape(&end.run), end.state.as_str());
            }
            Ok(end.exit)
        }
        Hosted::Refused { reason } => Ok(refused(&reason)),
        other => Err(unexpected(&other)),
    }
}

pub async fn results(a: ResultsArgs) -> anyhow::Result<u8> {
    let mut writer = crate::hosted::files::ResultsWriter::new(a.to.clone());
    let mut failed: Option<String> = None;
    // Each answer is bounded by --answer-timeout; the whole transfer is not.
    let each = |h: &Hosted| {
        if failed.is_none() {
            if let Err(e) = writer.take(h) {
                failed = Some(e);
            }
        }
    };
    let last = ask(
        &a.client,
        Hosted::Results { run: a.run.clone() },
        true,
        each,
    )
    .await?;
    if let Some(e) = failed {
        say_err!("error: {}", escape(&e));
        return Ok(EXIT_FAILED);
    }
    match last {
        Hosted::ResultsDone { .. } => {
            if let Err(e) = writer.take(&last) {
                say_err!("error: {}", escape(&e));
                return Ok(EXIT_FAILED);
            }
            let (files, bytes) = writer.written();
            say!(
                "{files} files ({bytes} bytes) of run {} in {}",
                escape(&a.run),
                escape(&a.to.display().to_string())
            );
            Ok(EXIT_OK)
        }
        Hosted::Refused { reason } => Ok(refused(&reason)),
        other => Err(unexpected(&other)),
    }
}

pub async fn cancel(a: CancelArgs) -> anyhow::Result<u8> {
    match ask(&a.client, Hosted::Cancel { run: a.run }, true, |_| {}).await? {
        Hosted::Cancelled { run } => {
            say!("cancelling {}", escape(&run));
            Ok(EXIT_OK)
        }
        Hosted::Refused { reason } => Ok(refused(&reason)),
        other => Err(unexpected(&other)),
    }
}

/// Where this process reaches its own listener: a wildcard address (`0.0.0.0`, `[::]`)
/// through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// How `serve` hosts runs: in `DATA/runs/NODE_ID` (nodes that share a data directory
/// keep their runs apart, and a node restarted with its identity finds its own), each run
/// through a coordinator with the node's cluster, key and discovery, and the node itself
/// as a peer.
pub fn host_config(
    common: &Common,
    keys: &[p2p_core::ClusterKey],
    data_dir: PathBuf,
    node: p2p_core::NodeId,
    addr: SocketAddr,
    limits: crate::hosted::registry::Limits,
) -> HostConfig {
    let (common, keys) = (common.clone(), keys.to_vec());
    let max_frame = common.max_frame;
    let coordinator: CoordinatorFactory = Arc::new(move || {
        let (common, keys) = (common.clone(), keys.clone());
        Box::pin(async move {
            let discovery = backends(&common, Role::Client, true, &keys)
                .map_err(|e| crate::Error::Config(e.to_string()))?;
            with_key(Node::builder(), &keys)
                .cluster(common.cluster.clone())
                .discoveries(discovery)
                .max_frame(common.max_frame)
                .build()
                .await
        })
    });
    HostConfig {
        dir: data_dir.join("runs").join(node.to_string()),
        limits,
        coordinator,
        peers: vec![reachable(addr)],
        max_frame,
        files: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_through_loopback() {
        let r = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(r("0.0.0.0:7400"), "127.0.0.1:7400");
        assert_eq!(r("[::]:7400"), "[::1]:7400");
        assert_eq!(r("127.0.0.2:7400"), "127.0.0.2:7400");
    }
}
