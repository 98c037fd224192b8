//! How a run looks: lines for a person, or one JSON object per line.

use std::io::Write;

use p2p_tasks::{Phase, RunEvent, RunReport, Status};

/// Rows of the final table shown in full; beyond them only tasks that did not succeed.
pub const TABLE_ROWS: usize = 200;

/// Where a run's events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The seed's phases and one line per result.
    Human,
    /// One JSON object per line on stdout (`--json`).
    Json,
}

/// Prints run events to stdout (and notices to stderr).
#[derive(Debug)]
pub struct Printer {
    format: Format,
    total: usize,
    done: usize,
}

fn short(node: &str) -> &str {
    &node[..node.len().min(8)]
}

impl Printer {
    /// A printer for a run of `total` tasks.
    pub fn new(format: Format, total: usize) -> Self {
        Printer {
            format,
            total,
            done: 0,
        }
    }

    /// Shows one event.
    pub fn event(&mut self, ev: &RunEvent) {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        // A closed stdout (e.g. `| head`) must not kill the run: ignore write errors.
        let _ = match self.format {
            Format::Json => match ev {
                RunEvent::Phase(_) => Ok(()),
                RunEvent::Notice(n) => writeln!(std::io::stderr(), "{n}"),
                _ => match serde_json::to_string(ev) {
                    Ok(line) => writeln!(out, "{line}"),
                    Err(_) => Ok(()),
                },
            },
            Format::Human => self.human(&mut out, ev),
        };
    }

    /// Shows the final table: every task in file order with its node, attempts, duration
    /// and status (people only; `--json` consumers have the events). Long runs list the
    /// first [`TABLE_ROWS`] rows and every task that did not succeed.
    pub fn report(&self, report: &RunReport) {
        if self.format != Format::Human {
            return;
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let _ = self.table(&mut out, report);
    }

    fn table(&self, out: &mut impl Write, report: &RunReport) -> std::io::Result<()> {
        let w = report
            .results
            .iter()
            .map(|r| r.task.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(out)?;
        writeln!(
            out,
            "{:<w$}  {:<8}  {:>8}  {:>10}  STATUS",
            "TASK", "NODE", "ATTEMPTS", "DURATION"
        )?;
        let mut hidden = 0;
        for (i, r) in report.results.iter().enumerate() {
            if i >= TABLE_ROWS && r.status == Status::Succeeded {
                hidden += 1;
                continue;
            }
            let status = match (r.status, r.resumed) {
                (Status::Succeeded, true) => "ok (journal)".to_string(),
                (Status::Succeeded, false) => "ok".to_string(),
                (Status::Failed, _) => format!("FAILED: {}", r.error.as_deref().unwrap_or("")),
                (Status::NotRun, _) => match &r.error {
                    Some(e) => format!("not run ({e})"),
                    None => "not run".to_string(),
                },
            };
            let duration = if r.attempts == 0 {
                "-".to_string()
            } else {
                human_ms(r.duration_ms)
            };
            writeln!(
                out,
                "{:<w$}  {:<8}  {:>8}  {:>10}  {status}",
                r.task,
                r.node.as_deref().map_or("-", short),
                r.attempts,
                duration
            )?;
        }
        if hidden > 0 {
            writeln!(
                out,
                "... and {hidden} more that succeeded (use --json for every task)"
            )?;
        }
        Ok(())
    }

    fn human(&mut self, out: &mut impl Write, ev: &RunEvent) -> std::io::Result<()> {
        match ev {
            RunEvent::Phase(p) => writeln!(
                out,
                "{}",
                match p {
                    Phase::Discovering => "Discovering peers...",
                    Phase::Connecting => "Initiating connections...",
                    Phase::Assigning => "Assigning tasks...",
                    Phase::Terminating => "Terminating connections...",
                    Phase::Disconnected => "Disconnected from all nodes.",
                }
            ),
            RunEvent::Notice(n) => writeln!(std::io::stderr(), "{n}"),
            RunEvent::PeerDiscovered { .. } | RunEvent::TaskAssigned { .. } => Ok(()),
            RunEvent::Connected {
                node,
                addr,
                types,
                capacity,
            } => writeln!(
                out,
                "  connected to node {} at {addr} (types: {}, capacity {capacity})",
                short(node),
                types.join(", ")
            ),
            RunEvent::TaskCompleted {
                task,
                kind,
                node,
                attempt,
                output,
                duration_ms,
                ..
            } => {
                self.done += 1;
                let retry = if *attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                };
                writeln!(
                    out,
                    "  [{:>w$}/{}] {task} ok on node {} (type {kind}{retry}) in {}{}",
                    self.done,
                    self.total,
                    short(node),
                    human_ms(*duration_ms),
                    if output.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", first_line(output))
                    },
                    w = self.total.to_string().len()
                )
            }
            RunEvent::TaskFailed {
                task,
                kind,
                node,
                attempt,
                error,
                output,
                ..
            } => {
                self.done += 1;
                let on = if node.is_empty() {
                    String::new()
                } else {
                    format!(" on node {} (type {kind}, attempt {attempt})", short(node))
                };
                writeln!(
                    out,
                    "  [{:>w$}/{}] {task} FAILED{on}: {error}{}",
                    self.done,
                    self.total,
                    if output.is_empty() {
                        String::new()
                    } else {
                        format!("; output: {}", first_line(output))
                    },
                    w = self.total.to_string().len()
                )
            }
            RunEvent::TaskRetry {
                task,
                node,
                attempt,
                error,
                delay_ms,
                ..
            } => writeln!(
                out,
                "  {task} attempt {attempt} failed on node {}: {error}; retrying in {delay_ms} ms",
                short(node)
            ),
            RunEvent::Disconnected {
                node, clean, error, ..
            } => {
                if *clean {
                    writeln!(out, "  disconnected from node {} (goodbye)", short(node))
                } else {
                    writeln!(
                        out,
                        "  lost node {}: {}",
                        short(node),
                        error.as_deref().unwrap_or("connection closed")
                    )
                }
            }
            RunEvent::Summary {
                total,
                succeeded,
                failed,
                not_run,
                resumed,
                missing_types,
                elapsed_ms,
            } => {
                if !missing_types.is_empty() {
                    writeln!(
                        std::io::stderr(),
                        "error: no node serves type{} {}",
                        if missing_types.len() == 1 { "" } else { "s" },
                        missing_types.join(", ")
                    )?;
                }
                let resumed = if *resumed > 0 {
                    format!(" ({resumed} from the journal)")
                } else {
                    String::new()
                };
                writeln!(
                    out,
                    "{total} tasks: {succeeded} succeeded{resumed}, {failed} failed, {not_run} not run in {}",
                    human_ms(*elapsed_ms)
                )
            }
        }
    }
}

/// `0.042` ms as `42 µs`, `12.5` as `12.5 ms`, `3400` as `3.40 s`.
fn human_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0} µs", ms * 1000.0)
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}
