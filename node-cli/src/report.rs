//! `run --report FILE.html`: one self-contained HTML page of a run, to look at rather than
//! read.
//!
//! # Layout
//!
//! - [`Recorder`]: an IO-free record of a run, fed the run's events with the time each was
//!   seen ([`Recorder::event`]); it keeps one [`Attempt`] per assignment (at most
//!   [`MAX_ATTEMPTS`], the rest counted) with the first lines of its output.
//! - [`render`]: the page: a timeline (inline SVG) with one lane per node and one bar per
//!   attempt, coloured by outcome, each with a `<title>` (shown on hover) naming the task,
//!   type, attempt, duration, exit code and the first lines of its output or error; the
//!   order constraints as arrows when asked (`--report-edges`); the summary tables. No
//!   script, no external resource (a Content-Security-Policy forbids both), so it opens
//!   from disk anywhere; every string that comes from a task or a peer is HTML-escaped.
//! - [`ReportFile`]: the recorder shared with the run's event sink, and the atomic write
//!   (temporary file in the same directory, then rename) at the end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use p2p_tasks::{Order, RunEvent, RunReport, Status, Task};

/// The most attempts the page draws; later ones are counted, not drawn.
pub const MAX_ATTEMPTS: usize = 50_000;

/// The most order-constraint arrows the page draws.
pub const MAX_EDGES: usize = 20_000;

/// Lines of an attempt's output (or error) kept for its hover text.
pub const HEAD_LINES: usize = 5;

/// Characters of an attempt's output (or error) kept for its hover text.
pub const HEAD_CHARS: usize = 600;

/// Rows of the table of tasks that did not succeed.
pub const PROBLEM_ROWS: usize = 500;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed and the task ran again.
    Retried,
    /// It failed and the task failed.
    Failed,
    /// It was stopped when the run was interrupted.
    Cancelled,
    /// Its node's connection was lost before its result came (the task ran again).
    Lost,
    /// The run ended before its result came.
    Unfinished,
}

impl Outcome {
    /// The CSS class and the word shown for it.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Lost => "lost",
            Outcome::Unfinished => "unfinished",
        }
    }
}

/// One attempt of a task on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Task id.
    pub task: String,
    /// Task type.
    pub kind: String,
    /// Node id.
    pub node: String,
    /// Attempt number (from 1).
    pub attempt: u32,
    /// When it was assigned, in milliseconds since the run started.
    pub start_ms: f64,
    /// When its result came, in milliseconds since the run started.
    pub end_ms: Option<f64>,
    /// How it ended.
    pub outcome: Outcome,
    /// How long the handler ran, as the node measured it.
    pub duration_ms: Option<f64>,
    /// The handler's exit code, when known.
    pub exit_code: Option<i32>,
    /// The first lines of its output.
    pub output: String,
    /// The first lines of its error.
    pub error: String,
}

/// A node as the run saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Its address.
    pub addr: String,
    /// The types it serves.
    pub types: Vec<String>,
    /// Tasks it runs at once.
    pub capacity: u32,
}

/// A task of the plan, as the page needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlanTask {
    id: String,
    kind: String,
    deps: Vec<String>,
}

/// The IO-free record of a run (see the module documentation).
#[derive(Debug)]
pub struct Recorder {
    order: Order,
    edges: bool,
    plan: Vec<PlanTask>,
    run_id: String,
    nodes: Vec<NodeInfo>,
    attempts: Vec<Attempt>,
    /// Open attempts: (task, attempt) to an index in `attempts`.
    open: HashMap<(String, u32), usize>,
    /// Attempts beyond [`MAX_ATTEMPTS`].
    dropped: usize,
    end_ms: f64,
}

/// The first [`HEAD_LINES`] lines and [`HEAD_CHARS`] characters of `s`, marked when cut.
fn head(s: &str) -> String {
    let mut out = String::new();
    let mut cut = false;
    for (i, line) in s.lines().enumerate() {
        if i >= HEAD_LINES {
            cut = true;
            break;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(line);
    }
    if out.chars().count() > HEAD_CHARS {
        out = out.chars().take(HEAD_CHARS).collect();
        cut = true;
    }
    if cut {
        out.push_str("\n[...]");
    }
    out
}

impl Recorder {
    /// A record of a run of `tasks` in `order`; `edges` draws the order constraints.
    pub fn new(tasks: &[Task], order: Order, edges: bool) -> Recorder {
        Recorder {
            order,
            edges,
            plan: tasks
                .iter()
                .map(|t| PlanTask {
                    id: t.id().to_owned(),
                    kind: t.kind().to_owned(),
                    deps: t.deps().to_vec(),
                })
                .collect(),
            run_id: String::new(),
            nodes: Vec::new(),
            attempts: Vec::new(),
            open: HashMap::new(),
            dropped: 0,
            end_ms: 0.0,
        }
    }

    /// The attempts recorded so far.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    fn node(&mut self, id: &str) {
        if !id.is_empty() && !self.nodes.iter().any(|n| n.id == id) {
            self.nodes.push(NodeInfo {
                id: id.to_owned(),
                addr: String::new(),
                types: Vec::new(),
                capacity: 0,
            });
        }
    }

    fn close(&mut self, task: &str, attempt: u32, at_ms: f64, fill: impl FnOnce(&mut Attempt)) {
        if let Some(i) = self.open.remove(&(task.to_owned(), attempt)) {
            if let Some(a) = self.attempts.get_mut(i) {
                a.end_ms = Some(at_ms);
                fill(a);
            }
        }
    }

    /// Records `ev`, seen `at_ms` milliseconds after the run started.
    pub fn event(&mut self, ev: &RunEvent, at_ms: f64) {
        self.end_ms = self.end_ms.max(at_ms);
        match ev {
            RunEvent::RunStarted { run, .. } => self.run_id = run.clone(),
            RunEvent::Connected {
                node,
                addr,
                types,
                capacity,
            } => {
                self.node(node);
                if let Some(n) = self.nodes.iter_mut().find(|n| n.id == *node) {
                    n.addr = addr.clone();
                    n.types = types.clone();
                    n.capacity = *capacity;
                }
            }
            RunEvent::TaskAssigned {
                task,
                kind,
                node,
                attempt,
            } => {
                // The same attempt again: the first was lost with its node.
                self.close(task, *attempt, at_ms, |a| a.outcome = Outcome::Lost);
                if self.attempts.len() >= MAX_ATTEMPTS {
                    self.dropped = self.dropped.saturating_add(1);
                    return;
                }
                self.node(node);
                self.open
                    .insert((task.to_string(), *attempt), self.attempts.len());
                self.attempts.push(Attempt {
                    task: task.to_string(),
                    kind: kind.to_string(),
                    node: node.to_string(),
                    attempt: *attempt,
                    start_ms: at_ms,
                    end_ms: None,
                    outcome: Outcome::Unfinished,
                    duration_ms: None,
                    exit_code: None,
                    output: String::new(),
                    error: String::new(),
                });
            }
            RunEvent::TaskCompleted {
                task,
                attempt,
                output,
                duration_ms,
                ..
            } => self.close(task, *attempt, at_ms, |a| {
                a.outcome = Outcome::Ok;
                a.duration_ms = Some(*duration_ms);
                a.output = head(output);
                a.exit_code = Some(0);
            }),
            RunEvent::TaskFailed {
                task,
                attempt,
                output,
                duration_ms,
                exit_code,
                error,
                ..
            } => self.close(task, *attempt, at_ms, |a| {
                a.outcome = Outcome::Failed;
                a.duration_ms = Some(*duration_ms);
                a.output = head(output);
                a.exit_code = *exit_code;
                a.error = head(error);
            }),
            RunEvent::TaskCancelled {
                task,
                attempt,
                output,
                duration_ms,
                ..
            } => self.close(task, *attempt, at_ms, |a| {
                a.outcome = Outcome::Cancelled;
                a.duration_ms = Some(*duration_ms);
                a.output = head(output);
            }),
            RunEvent::Disconnected { node, .. } => {
                let lost: Vec<(String, u32)> = self
                    .open
                    .iter()
                    .filter(|(_, &i)| self.attempts.get(i).is_some_and(|a| a.node == *node))
                    .map(|(k, _)| k.clone())
                    .collect();
                for (task, attempt) in lost {
                    self.close(&task, attempt, at_ms, |a| a.outcome = Outcome::Lost);
                }
            }
            RunEvent::TaskRetry {
                task,
                attempt,
                error,
                ..
            } => self.close(task, *attempt, at_ms, |a| {
                a.outcome = Outcome::Retried;
                a.error = head(error);
            }),
            _ => {}
        }
    }
}

/// HTML-escapes `s` for text and attribute values (`&`, `<`, `>`, `"`, `'`); control
/// characters other than newline and tab become U+FFFD.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn short(node: &str) -> &str {
    node.get(..8).unwrap_or(node)
}

fn ms_text(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

/// Width of the time axis in the SVG, in pixels.
const AXIS_W: f64 = 1000.0;
/// Width of the node labels left of the timeline.
const LABEL_W: f64 = 150.0;
/// Height of one row of bars.
const ROW_H: f64 = 16.0;
/// Gap between lanes.
const LANE_GAP: f64 = 8.0;
/// Height of the time axis.
const AXIS_H: f64 = 24.0;

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;max-width:60em}
.timeline{overflow-x:auto;border:1px solid #ddd}
svg text{font:11px system-ui,sans-serif;fill:#333}
.lane{fill:#f7f7f7}.lane.odd{fill:#eef0f3}
.bar{stroke:#0003;stroke-width:.5}
.bar.ok{fill:#2e9e5b}.bar.retried{fill:#f0a020}.bar.failed{fill:#d64541}
.bar.cancelled{fill:#8e8e8e}.bar.lost{fill:#5a5a5a}.bar.unfinished{fill:#5b8bd6}
.retry{stroke:#f0a020;stroke-width:1;stroke-dasharray:3 2;fill:none}
.edge{stroke-width:1;fill:none;opacity:.7}.edge.dep{stroke:#6a3d9a}.edge.strict{stroke:#555}.edge.type{stroke:#1f78b4}
.tick{stroke:#ccc}
.key span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:-.1em}
";

/// The page for the run `rec` recorded, with its final `report`.
pub fn render(rec: &Recorder, report: &RunReport) -> String {
    let mut h = String::with_capacity(64 * 1024 + rec.attempts().len() * 400);
    let end_ms = rec
        .attempts()
        .iter()
        .filter_map(|a| a.end_ms)
        .fold(rec.end_ms.max(report.elapsed_ms), f64::max)
        .max(1.0);
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>p2p-node run {}</title><style>{STYLE}</style></head><body>",
        esc(&rec.run_id)
    );
    let _ = writeln!(
        h,
        "<h1>p2p-node run</h1><p>run <code>{}</code>, {} tasks, order {}, {}{}</p>",
        esc(&rec.run_id),
        rec.plan.len(),
        rec.order,
        ms_text(report.elapsed_ms),
        if report.interrupted {
            ", <strong>interrupted</strong>"
        } else {
            ""
        }
    );
    summary_table(&mut h, report);
    timeline(&mut h, rec, end_ms);
    node_table(&mut h, rec);
    type_table(&mut h, rec, report);
    problem_table(&mut h, report);
    h.push_str("</body></html>\n");
    h
}

fn summary_table(h: &mut String, r: &RunReport) {
    let _ = writeln!(
        h,
        "<h2>Summary</h2><table id=\"summary\"><tr><th>tasks</th><th>succeeded</th>\
         <th>failed</th><th>cancelled</th><th>not run</th><th>resumed</th><th>elapsed</th></tr>\
         <tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr></table>",
        r.results.len(),
        r.succeeded(),
        r.failed(),
        r.cancelled(),
        r.not_run(),
        r.resumed(),
        ms_text(r.elapsed_ms)
    );
    if !r.missing_types.is_empty() {
        let _ = writeln!(
            h,
            "<p>No node served: {}</p>",
            esc(&r.missing_types.join(", "))
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(h, "<p>The run stopped: {}</p>", esc(e));
    }
}

/// Lanes (node id, rows) and where each attempt's bar goes (lane, row).
type Layout = (Vec<(String, usize)>, Vec<(usize, usize)>);

/// Lanes: one per node, each with as many rows as it ran attempts at once.
fn layout(rec: &Recorder) -> Layout {
    let mut lanes: Vec<(String, usize)> = rec.nodes.iter().map(|n| (n.id.clone(), 0)).collect();
    // Per lane, when each row is free again.
    let mut free: Vec<Vec<f64>> = vec![Vec::new(); lanes.len()];
    let mut order: Vec<usize> = (0..rec.attempts.len()).collect();
    order.sort_by(|&a, &b| {
        rec.attempts[a]
            .start_ms
            .total_cmp(&rec.attempts[b].start_ms)
    });
    let mut place = vec![(0usize, 0usize); rec.attempts.len()];
    for i in order {
        let a = &rec.attempts[i];
        let lane = lanes.iter().position(|l| l.0 == a.node).unwrap_or_else(|| {
            lanes.push((a.node.clone(), 0));
            free.push(Vec::new());
            lanes.len() - 1
        });
        let end = a.end_ms.unwrap_or(rec.end_ms);
        let rows = &mut free[lane];
        let row = match rows.iter().position(|&f| f <= a.start_ms) {
            Some(r) => {
                rows[r] = end;
                r
            }
            None => {
                rows.push(end);
                rows.len() - 1
            }
        };
        lanes[lane].1 = lanes[lane].1.max(row + 1);
        place[i] = (lane, row);
    }
    (lanes, place)
}

fn timeline(h: &mut String, rec: &Recorder, end_ms: f64) {
    let (lanes, place) = layout(rec);
    let x_of = |ms: f64| LABEL_W + (ms / end_ms).clamp(0.0, 1.0) * AXIS_W;
    let mut lane_y = Vec::with_capacity(lanes.len());
    let mut y = AXIS_H;
    for (_, rows) in &lanes {
        lane_y.push(y);
        y += (*rows).max(1) as f64 * ROW_H + LANE_GAP;
    }
    let height = y;
    let width = LABEL_W + AXIS_W + 10.0;
    let _ = writeln!(
        h,
        "<h2>Timeline</h2><p class=\"key\">one lane per node, one bar per attempt (hover for \
         details):<span style=\"background:#2e9e5b\"></span>ok\
         <span style=\"background:#f0a020\"></span>failed, retried\
         <span style=\"background:#d64541\"></span>failed\
         <span style=\"background:#8e8e8e\"></span>cancelled\
         <span style=\"background:#5a5a5a\"></span>lost with its node\
         <span style=\"background:#5b8bd6\"></span>no result</p>"
    );
    if rec.dropped > 0 {
        let _ = writeln!(
            h,
            "<p>{} more attempts are not drawn (the page draws at most {MAX_ATTEMPTS}).</p>",
            rec.dropped
        );
    }
    let _ = writeln!(
        h,
        "<div class=\"timeline\"><svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 6 6\" refX=\"6\" refY=\"3\" markerWidth=\"6\" \
         markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0L6,3L0,6z\" fill=\"#555\"/></marker></defs>"
    );
    // Time axis.
    for i in 0..=10 {
        let ms = end_ms * f64::from(i) / 10.0;
        let x = x_of(ms);
        let anchor = if i == 10 { "end" } else { "middle" };
        let _ = writeln!(
            h,
            "<line class=\"tick\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{height:.1}\"/>\
             <text x=\"{x:.1}\" y=\"14\" text-anchor=\"{anchor}\">{}</text>",
            AXIS_H - 4.0,
            ms_text(ms)
        );
    }
    for (i, (node, rows)) in lanes.iter().enumerate() {
        let info = rec.nodes.iter().find(|n| n.id == *node);
        let lh = (*rows).max(1) as f64 * ROW_H;
        let odd = if i % 2 == 1 { " odd" } else { "" };
        let mut title = format!("node {node}");
        if let Some(n) = info {
            if !n.addr.is_empty() {
                let _ = write!(
                    title,
                    "\n{}\ntypes {}\ncapacity {}",
                    n.addr,
                    n.types.join(","),
                    n.capacity
                );
            }
        }
        let _ = writeln!(
            h,
            "<g class=\"lane-group\"><rect class=\"lane{odd}\" data-node=\"{}\" x=\"0\" y=\"{:.1}\" \
             width=\"{width:.0}\" height=\"{lh:.1}\"><title>{}</title></rect>\
             <text x=\"4\" y=\"{:.1}\">{}</text></g>",
            esc(node),
            lane_y[i],
            esc(&title),
            lane_y[i] + 12.0,
            esc(short(node))
        );
    }
    let bar_y = |i: usize| {
        let (lane, row) = place[i];
        lane_y[lane] + row as f64 * ROW_H + 2.0
    };
    // Where each task's first attempt starts and last attempt ends, for retries and edges.
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, a) in rec.attempts.iter().enumerate() {
        first.entry(a.task.as_str()).or_insert(i);
        last.insert(a.task.as_str(), i);
    }
    for (i, a) in rec.attempts.iter().enumerate() {
        let x = x_of(a.start_ms);
        let end = a.end_ms.unwrap_or(end_ms);
        let w = (x_of(end) - x).max(1.5);
        let mut title = format!(
            "{} (type {}), attempt {}, {}\nnode {}",
            a.task,
            a.kind,
            a.attempt,
            a.outcome.name(),
            short(&a.node)
        );
        let _ = write!(title, "\nfrom {} to {}", ms_text(a.start_ms), ms_text(end));
        if let Some(d) = a.duration_ms {
            let _ = write!(title, "\nran {}", ms_text(d));
        }
        if let Some(c) = a.exit_code {
            let _ = write!(title, "\nexit code {c}");
        }
        if !a.output.is_empty() {
            let _ = write!(title, "\noutput:\n{}", a.output);
        }
        if !a.error.is_empty() {
            let _ = write!(title, "\nerror:\n{}", a.error);
        }
        let _ = writeln!(
            h,
            "<rect class=\"bar {}\" data-task=\"{}\" data-attempt=\"{}\" data-node=\"{}\" \
             x=\"{x:.2}\" y=\"{:.1}\" width=\"{w:.2}\" height=\"{:.1}\"><title>{}</title></rect>",
            a.outcome.name(),
            esc(&a.task),
            a.attempt,
            esc(&a.node),
            bar_y(i),
            ROW_H - 4.0,
            esc(&title)
        );
    }
    // A retry: a dashed line from the failed attempt to the next one.
    let by_key: HashMap<(&str, u32), usize> = rec
        .attempts
        .iter()
        .enumerate()
        .map(|(i, a)| ((a.task.as_str(), a.attempt), i))
        .collect();
    for (i, a) in rec.attempts.iter().enumerate() {
        if a.outcome != Outcome::Retried {
            continue;
        }
        if let Some(&j) = by_key.get(&(a.task.as_str(), a.attempt.saturating_add(1))) {
            let _ = writeln!(
                h,
                "<path class=\"retry\" data-task=\"{}\" d=\"M{:.1},{:.1}L{:.1},{:.1}\"/>",
                esc(&a.task),
                x_of(a.end_ms.unwrap_or(end_ms)),
                bar_y(i) + (ROW_H - 4.0) / 2.0,
                x_of(rec.attempts[j].start_ms),
                bar_y(j) + (ROW_H - 4.0) / 2.0
            );
        }
    }
    if rec.edges {
        let mut drawn = 0usize;
        for (from, to, class) in constraints(rec) {
            if drawn >= MAX_EDGES {
                break;
            }
            let (Some(&i), Some(&j)) = (last.get(from), first.get(to)) else {
                continue;
            };
            let x1 = x_of(rec.attempts[i].end_ms.unwrap_or(end_ms));
            let y1 = bar_y(i) + (ROW_H - 4.0) / 2.0;
            let x2 = x_of(rec.attempts[j].start_ms);
            let y2 = bar_y(j) + (ROW_H - 4.0) / 2.0;
            let _ = writeln!(
                h,
                "<path class=\"edge {class}\" data-from=\"{}\" data-to=\"{}\" \
                 d=\"M{x1:.1},{y1:.1}C{:.1},{y1:.1} {:.1},{y2:.1} {x2:.1},{y2:.1}\" \
                 marker-end=\"url(#arrow)\"><title>{} before {} ({class})</title></path>",
                esc(from),
                esc(to),
                x1 + 12.0,
                x2 - 12.0,
                esc(from),
                esc(to)
            );
            drawn += 1;
        }
    }
    h.push_str("</svg></div>\n");
    if rec.edges {
        h.push_str(
            "<p class=\"key\">arrows: what had to end before a task started \
             <span style=\"background:#6a3d9a\"></span>dependency\
             <span style=\"background:#555\"></span>strict order\
             <span style=\"background:#1f78b4\"></span>order within a type</p>\n",
        );
    }
}

/// The plan's order constraints: (before, after, kind), kind `dep`, `strict` or `type`.
fn constraints(rec: &Recorder) -> Vec<(&str, &str, &'static str)> {
    let mut out = Vec::new();
    for t in &rec.plan {
        for d in &t.deps {
            out.push((d.as_str(), t.id.as_str(), "dep"));
        }
    }
    match rec.order {
        Order::Strict => {
            for w in rec.plan.windows(2) {
                out.push((w[0].id.as_str(), w[1].id.as_str(), "strict"));
            }
        }
        Order::Type => {
            let mut prev: HashMap<&str, &str> = HashMap::new();
            for t in &rec.plan {
                if let Some(p) = prev.insert(t.kind.as_str(), t.id.as_str()) {
                    out.push((p, t.id.as_str(), "type"));
                }
            }
        }
        _ => {}
    }
    out
}

#[derive(Default)]
struct Tally {
    attempts: usize,
    ok: usize,
    failed: usize,
    retried: usize,
    cancelled: usize,
    busy_ms: f64,
    durations: Vec<f64>,
}

impl Tally {
    fn add(&mut self, a: &Attempt) {
        self.attempts += 1;
        match a.outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Retried => self.retried += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Lost | Outcome::Unfinished => {}
        }
        if let Some(d) = a.duration_ms {
            self.busy_ms += d;
            self.durations.push(d);
        }
    }

    fn cells(&mut self) -> String {
        self.durations.sort_by(f64::total_cmp);
        let mean = if self.durations.is_empty() {
            0.0
        } else {
            self.busy_ms / self.durations.len() as f64
        };
        let max = self.durations.last().copied().unwrap_or(0.0);
        format!(
            "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td>",
            self.attempts,
            self.ok,
            self.retried,
            self.failed,
            self.cancelled,
            ms_text(self.busy_ms),
            ms_text(mean),
            ms_text(max)
        )
    }
}

const TALLY_HEAD: &str = "<th>attempts</th><th>ok</th><th>retried</th><th>failed</th>\
                          <th>cancelled</th><th>busy</th><th>mean</th><th>max</th>";

fn node_table(h: &mut String, rec: &Recorder) {
    let mut rows: Vec<(&NodeInfo, Tally)> =
        rec.nodes.iter().map(|n| (n, Tally::default())).collect();
    for a in &rec.attempts {
        if let Some(r) = rows.iter_mut().find(|r| r.0.id == a.node) {
            r.1.add(a);
        }
    }
    let _ = writeln!(
        h,
        "<h2>Nodes</h2><table id=\"nodes\"><tr><th>node</th><th>address</th><th>types</th>\
         <th>capacity</th>{TALLY_HEAD}</tr>"
    );
    for (n, t) in &mut rows {
        let _ = writeln!(
            h,
            "<tr><td><code title=\"{}\">{}</code></td><td>{}</td><td>{}</td><td class=\"n\">{}</td>{}</tr>",
            esc(&n.id),
            esc(short(&n.id)),
            esc(&n.addr),
            esc(&n.types.join(", ")),
            n.capacity,
            t.cells()
        );
    }
    h.push_str("</table>\n");
}

fn type_table(h: &mut String, rec: &Recorder, report: &RunReport) {
    let mut rows: Vec<(String, usize, Tally)> = Vec::new();
    for r in &report.results {
        match rows.iter_mut().find(|x| *x.0 == *r.kind) {
            Some(x) => x.1 += 1,
            None => rows.push((r.kind.to_string(), 1, Tally::default())),
        }
    }
    for a in &rec.attempts {
        if let Some(x) = rows.iter_mut().find(|x| x.0 == a.kind) {
            x.2.add(a);
        }
    }
    let _ = writeln!(
        h,
        "<h2>Types</h2><table id=\"types\"><tr><th>type</th><th>tasks</th>{TALLY_HEAD}</tr>"
    );
    for (kind, n, t) in &mut rows {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\">{n}</td>{}</tr>",
            esc(kind),
            t.cells()
        );
    }
    h.push_str("</table>\n");
}

fn problem_table(h: &mut String, report: &RunReport) {
    let problems: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.status != Status::Succeeded)
        .collect();
    if problems.is_empty() {
        return;
    }
    let _ = writeln!(
        h,
        "<h2>Tasks that did not succeed</h2><table id=\"problems\"><tr><th>task</th><th>type</th>\
         <th>status</th><th>attempts</th><th>node</th><th>why</th></tr>"
    );
    for r in problems.iter().take(PROBLEM_ROWS) {
        let status = match r.status {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::NotRun => "not run",
            _ => "unknown",
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{status}</td><td class=\"n\">{}</td><td><code>{}</code></td>\
             <td><pre>{}</pre></td></tr>",
            esc(&r.task),
            esc(&r.kind),
            r.attempts,
            esc(r.node.as_deref().map(short).unwrap_or("")),
            esc(&head(r.error.as_deref().unwrap_or("")))
        );
    }
    h.push_str("</table>\n");
    if problems.len() > PROBLEM_ROWS {
        let _ = writeln!(
            h,
            "<p>{} more tasks did not succeed.</p>",
            problems.len() - PROBLEM_ROWS
        );
    }
}

/// `run --report FILE`: the [`Recorder`] shared with the run's event sink, and the file.
#[derive(Debug, Clone)]
pub struct ReportFile {
    path: PathBuf,
    started: Instant,
    rec: Arc<Mutex<Recorder>>,
}

impl ReportFile {
    /// A report of `tasks` to be written to `path`. Fails at once when `path`'s directory
    /// does not exist, so a run does not end without the report it was asked for.
    pub fn new(path: &Path, tasks: &[Task], order: Order, edges: bool) -> std::io::Result<Self> {
        if path.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        let dir = dir_of(path);
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no directory {}", dir.display()),
            ));
        }
        Ok(ReportFile {
            path: path.to_owned(),
            started: Instant::now(),
            rec: Arc::new(Mutex::new(Recorder::new(tasks, order, edges))),
        })
    }

    /// Where the page goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The event sink's tap: records each event with the time it is seen.
    pub fn tap(&self) -> impl FnMut(&RunEvent) + Send + 'static {
        let rec = self.rec.clone();
        let started = self.started;
        move |ev| {
            let at = started.elapsed().as_secs_f64() * 1000.0;
            if let Ok(mut r) = rec.lock() {
                r.event(ev, at);
            }
        }
    }

    /// Writes the page for the run's `report`: to a temporary file next to the target,
    /// synced, then renamed over it, so a reader never sees half a page.
    pub fn write(&self, report: &RunReport) -> std::io::Result<()> {
        let page = match self.rec.lock() {
            Ok(r) => render(&r, report),
            Err(p) => render(&p.into_inner(), report),
        };
        let dir = dir_of(&self.path);
        let mut tmp = tempfile::Builder::new()
            .prefix(".p2p-report-")
            .suffix(".tmp")
            .tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, page.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use p2p_tasks::TaskResult;

    fn assigned(task: &str, node: &str, attempt: u32) -> RunEvent {
        RunEvent::TaskAssigned {
            task: task.into(),
            kind: "a".into(),
            node: node.into(),
            attempt,
        }
    }

    fn completed(task: &str, node: &str, attempt: u32, output: &str) -> RunEvent {
        RunEvent::TaskCompleted {
            task: task.into(),
            kind: "a".into(),
            node: node.into(),
            attempt,
            ok: true,
            output: output.into(),
            duration_ms: 5.0,
        }
    }

    fn report_of(ids: &[&str]) -> RunReport {
        let mut report = RunReport::new(
            ids.iter()
                .map(|id| {
                    let mut r = TaskResult::new(*id, "a", Status::Succeeded);
                    r.attempts = 1;
                    r.duration_ms = 5.0;
                    r
                })
                .collect(),
        );
        report.elapsed_ms = 100.0;
        report
    }

    fn tasks(ids: &[&str]) -> Vec<Task> {
        ids.iter().map(|id| Task::from_id(id).unwrap()).collect()
    }

    #[test]
    fn one_bar_per_attempt_with_retries_and_outcomes() {
        let mut r = Recorder::new(&tasks(&["a1", "a2"]), Order::None, false);
        r.event(&assigned("a1", "n1", 1), 0.0);
        r.event(&assigned("a2", "n1", 1), 1.0);
        r.event(
            &RunEvent::TaskRetry {
                task: "a2".into(),
                kind: "a".into(),
                node: "n1".into(),
                attempt: 1,
                error: "exit status 3: boom".into(),
                delay_ms: 100,
            },
            10.0,
        );
        r.event(&completed("a1", "n1", 1, "x"), 20.0);
        r.event(&assigned("a2", "n2", 2), 30.0);
        r.event(&completed("a2", "n2", 2, "y"), 40.0);
        let outcomes: Vec<_> = r
            .attempts()
            .iter()
            .map(|a| (a.task.as_str(), a.attempt, a.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("a1", 1, Outcome::Ok),
                ("a2", 1, Outcome::Retried),
                ("a2", 2, Outcome::Ok)
            ]
        );
        let page = render(&r, &report_of(&["a1", "a2"]));
        assert_eq!(page.matches("<rect class=\"bar ").count(), 3);
        assert_eq!(page.matches("class=\"retry\"").count(), 1);
        // a1 and a2 overlapped on n1: its lane has two rows.
        let (lanes, place) = layout(&r);
        assert_eq!(lanes, [("n1".to_owned(), 2), ("n2".to_owned(), 1)]);
        assert_eq!(place, [(0, 0), (0, 1), (1, 0)]);
        // No edges unless asked.
        assert!(!page.contains("class=\"edge"));
    }

    #[test]
    fn an_attempt_lost_with_its_node_ends_there() {
        let mut r = Recorder::new(&tasks(&["a1", "a2"]), Order::None, false);
        r.event(&assigned("a1", "n1", 1), 0.0);
        r.event(&assigned("a2", "n1", 1), 0.0);
        r.event(
            &RunEvent::Disconnected {
                node: "n1".into(),
                addr: "x".into(),
                clean: false,
                error: Some("reset".into()),
            },
            10.0,
        );
        r.event(&assigned("a1", "n2", 1), 20.0);
        r.event(&completed("a1", "n2", 1, "x"), 30.0);
        // Assigned again without a Disconnected first: the first one was lost too.
        r.event(&assigned("a2", "n2", 1), 40.0);
        r.event(&assigned("a2", "n3", 1), 50.0);
        let got: Vec<_> = r
            .attempts()
            .iter()
            .map(|a| (a.task.as_str(), a.node.as_str(), a.outcome, a.end_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("a1", "n1", Outcome::Lost, Some(10.0)),
                ("a2", "n1", Outcome::Lost, Some(10.0)),
                ("a1", "n2", Outcome::Ok, Some(30.0)),
                ("a2", "n2", Outcome::Lost, Some(50.0)),
                ("a2", "n3", Outcome::Unfinished, None),
            ]
        );
    }

    #[test]
    fn edges_follow_the_order() {
        let mut plan = tasks(&["a1", "a2", "b1", "b2"]);
        plan[3].extra_mut().deps = vec!["a1".into()];
        for (order, want) in [
            (
                Order::Strict,
                vec![
                    ("a1", "b2", "dep"),
                    ("a1", "a2", "strict"),
                    ("a2", "b1", "strict"),
                    ("b1", "b2", "strict"),
                ],
            ),
            (
                Order::Type,
                vec![
                    ("a1", "b2", "dep"),
                    ("a1", "a2", "type"),
                    ("b1", "b2", "type"),
                ],
            ),
            (Order::None, vec![("a1", "b2", "dep")]),
        ] {
            let r = Recorder::new(&plan, order, true);
            assert_eq!(constraints(&r), want, "{order}");
        }
    }

    #[test]
    fn every_peer_string_is_escaped() {
        let evil = "<script>alert(1)</script>\"'&<img src=x onerror=alert(2)>";
        let mut r = Recorder::new(&tasks(&["a1"]), Order::Strict, true);
        r.event(
            &RunEvent::Connected {
                node: evil.into(),
                addr: evil.into(),
                types: vec![evil.into()],
                capacity: 1,
            },
            0.0,
        );
        r.event(
            &RunEvent::TaskAssigned {
                task: evil.into(),
                kind: evil.into(),
                node: evil.into(),
                attempt: 1,
            },
            0.0,
        );
        r.event(
            &RunEvent::TaskFailed {
                task: evil.into(),
                kind: evil.into(),
                node: evil.into(),
                attempt: 1,
                ok: false,
                output: evil.into(),
                duration_ms: 1.0,
                exit_code: Some(1),
                error: evil.into(),
            },
            1.0,
        );
        let mut rep = report_of(&[evil]);
        rep.results[0].status = Status::Failed;
        rep.results[0].error = Some(evil.into());
        rep.missing_types = vec![evil.into()];
        rep.error = Some(evil.into());
        let page = render(&r, &rep);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
        // Nothing is fetched: no URL but the SVG namespace ("http" is also in http-equiv),
        // no src or href.
        assert_eq!(page.matches("http").count(), 2, "{page}");
        assert!(!page.contains("src=\"") && !page.contains("href="));
    }

    #[test]
    fn head_keeps_the_first_lines() {
        assert_eq!(head("a\nb"), "a\nb");
        let long: String = (0..20).map(|i| format!("line {i}\n")).collect();
        assert_eq!(head(&long), "line 0\nline 1\nline 2\nline 3\nline 4\n[...]");
        assert!(head(&"x".repeat(10_000)).chars().count() <= HEAD_CHARS + 6);
    }

    #[test]
    fn attempts_are_bounded() {
        let mut r = Recorder::new(&[], Order::None, false);
        for i in 0..MAX_ATTEMPTS + 10 {
            r.event(&assigned(&format!("a{i}"), "n", 1), 0.0);
        }
        assert_eq!(r.attempts().len(), MAX_ATTEMPTS);
        assert_eq!(r.dropped, 10);
    }

    #[test]
    fn the_file_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.html");
        let f = ReportFile::new(&path, &tasks(&["a1"]), Order::Strict, false).unwrap();
        let mut tap = f.tap();
        tap(&assigned("a1", "n1", 1));
        tap(&completed("a1", "n1", 1, "hi"));
        f.write(&report_of(&["a1"])).unwrap();
        let page = std::fs::read_to_string(&path).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>") && page.ends_with("</html>\n"));
        // Only the report is left in the directory (the temporary file was renamed).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(ReportFile::new(
            &dir.path().join("no/such/r.html"),
            &[],
            Order::Strict,
            false
        )
        .is_err());
    }
}
