//! How a run looks: lines for a person (with a progress bar on a terminal), a quiet
//! summary, or one JSON object per line.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use p2p_core::text::escape;
use p2p_tasks::{Phase, RunEvent, RunReport, Status};

/// Rows of the final task table shown in full; beyond them only tasks that did not succeed.
pub const TABLE_ROWS: usize = 200;

/// Lines of a task's output (or error) shown in text mode; the rest is counted in a note.
pub const OUTPUT_LINES: usize = 20;

/// Characters of one line of a task's output (or error) shown in text mode.
pub const LINE_CHARS: usize = 300;

/// How a block of task output is indented under its task's line.
const INDENT: &str = "      ";

/// Where a run's events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The seed's phases, one line per result, a progress bar on a terminal, final tables.
    Human,
    /// Only failures and the final summary (`--quiet`).
    Quiet,
    /// One JSON object per line on stdout (`--json`).
    Json,
}

/// The progress bar currently on screen, so log lines can be printed around it: made once
/// by the binary and given to the log writer ([`LogWriter`]) and the run's [`Printer`].
#[derive(Debug, Clone, Default)]
pub struct ActiveBar(Arc<Mutex<Option<ProgressBar>>>);

impl ActiveBar {
    /// Writes `buf` to stderr without tearing the progress bar (if one is on screen).
    /// The binary routes its log lines through this.
    pub fn write_log(&self, buf: &[u8]) -> std::io::Result<()> {
        let bar = self.0.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        }
    }

    fn set(&self, bar: Option<ProgressBar>) {
        if let Ok(mut active) = self.0.lock() {
            *active = bar;
        }
    }
}

/// A `tracing_subscriber` writer that goes through [`ActiveBar::write_log`].
#[derive(Debug, Clone, Default)]
pub struct LogWriter(pub ActiveBar);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A log line that cannot be written (stderr closed, e.g. `2>&1 | head`) is dropped:
        // reporting the error would make the logging layer print to stderr (and panic there).
        let _ = self.0.write_log(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The text log's field formatter (`fmt().fmt_fields(...)`): each field as `name=value`
/// (the message as it is), separated by spaces, with every value escaped
/// ([`p2p_core::text::escape`]), since fields carry what peers sent (addresses, types,
/// errors, task ids). A peer cannot color, retitle or forge lines of the operator's log.
pub fn log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Clone {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(escaped_field).delimited(" ")
}

fn escaped_field(
    w: &mut tracing_subscriber::fmt::format::Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn std::fmt::Debug,
) -> std::fmt::Result {
    use std::fmt::Write as _;
    if field.name() != "message" {
        write!(w, "{}=", field.name())?;
    }
    write!(p2p_core::text::EscapingWriter(w), "{value:?}")
}

/// Stdout bytes buffered before they are written even if the run is busy.
const OUT_BUFFER: usize = 64 * 1024;

/// Appends `ev` to `out` as one JSON line with its time, `ts` (RFC 3339, UTC,
/// microseconds), as the last field: `{"event":"...",...,"ts":"2026-12-01T09:30:00.123456Z"}`.
/// An event that cannot be serialized leaves `out` as it was. The two events of every task
/// are written without serde (the same bytes: a unit test compares them), and the time's
/// date and second are formatted once a second (`stamp`).
fn json_line(out: &mut Vec<u8>, ev: &RunEvent, at: std::time::SystemTime, stamp: &mut Stamp) {
    let start = out.len();
    if !task_json(out, ev) {
        if serde_json::to_writer(&mut *out, ev).is_err() || out.last() != Some(&b'}') {
            out.truncate(start);
            return;
        }
        // Every event is a non-empty object (its `event` tag at least): `ts` goes before
        // the `}`.
        out.pop();
    }
    out.extend_from_slice(b",\"ts\":\"");
    stamp.write(out, at);
    out.extend_from_slice(b"\"}\n");
}

/// Writes a task's `task_assigned` or `task_completed` event as serde would, without its
/// closing brace; false (and nothing written) for any other event. Every field is named, so
/// a field added to either event does not compile here until it is written.
fn task_json(out: &mut Vec<u8>, ev: &RunEvent) -> bool {
    match ev {
        RunEvent::TaskAssigned {
            task,
            kind,
            node,
            attempt,
        } => {
            task_head(out, "task_assigned", task, kind, node, *attempt);
            true
        }
        RunEvent::TaskCompleted {
            task,
            kind,
            node,
            attempt,
            ok,
            output,
            duration_ms,
        } => {
            task_head(out, "task_completed", task, kind, node, *attempt);
            out.extend_from_slice(if *ok {
                b",\"ok\":true"
            } else {
                b",\"ok\":false"
            });
            out.extend_from_slice(b",\"output\":");
            json_str(out, output);
            out.extend_from_slice(b",\"duration_ms\":");
            // serde_json's own number format (and `null` for a value that is not finite).
            let _ = serde_json::to_writer(&mut *out, duration_ms);
            true
        }
        _ => false,
    }
}

/// The fields both task events start with: `{"event":EVENT,"task":..,"type":..,"node":..,
/// "attempt":..`.
fn task_head(out: &mut Vec<u8>, event: &str, task: &str, kind: &str, node: &str, attempt: u32) {
    out.extend_from_slice(b"{\"event\":\"");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\",\"task\":");
    json_str(out, task);
    out.extend_from_slice(b",\"type\":");
    json_str(out, kind);
    out.extend_from_slice(b",\"node\":");
    json_str(out, node);
    out.extend_from_slice(b",\"attempt\":");
    json_u32(out, attempt);
}

/// `s` as a JSON string: copied as it is when nothing in it needs escaping (one pass over
/// its bytes), else through serde_json (which escapes `"`, `\\` and control characters).
fn json_str(out: &mut Vec<u8>, s: &str) {
    // No early exit, so the check runs over whole words.
    let escape = s
        .bytes()
        .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if escape {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn json_u32(out: &mut Vec<u8>, n: u32) {
    let _ = serde_json::to_writer(&mut *out, &n);
}

/// The `ts` of JSON lines, with its date and second formatted once a second.
#[derive(Debug, Default)]
struct Stamp {
    /// The second `prefix` is of (since the epoch).
    second: Option<u64>,
    /// `2026-12-01T09:30:00`.
    prefix: String,
}

impl Stamp {
    /// Appends `at` as humantime's `format_rfc3339_micros` does: `2026-12-01T09:30:00.123456Z`.
    fn write(&mut self, out: &mut Vec<u8>, at: std::time::SystemTime) {
        let Ok(since) = at.duration_since(std::time::UNIX_EPOCH) else {
            let _ = write!(out, "{}", humantime::format_rfc3339_micros(at));
            return;
        };
        let second = since.as_secs();
        if self.second != Some(second) {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            self.prefix = text.trim_end_matches('Z').to_string();
            self.second = Some(second);
        }
        out.extend_from_slice(self.prefix.as_bytes());
        let micros = since.subsec_micros();
        let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
        let mut m = micros;
        for d in digits[1..7].iter_mut().rev() {
            *d = b'0' + (m % 10) as u8;
            m /= 10;
        }
        out.extend_from_slice(&digits);
    }
}

/// Per node or per type: how many tasks, failures, and their durations.
///
/// The durations are kept exactly while a row has few ([`EXACT`]), then in a histogram of
/// [`PER_OCTAVE`] buckets a doubling (p99 within about 2 %), so that a million tasks do not
/// keep a number each (4-8 MB a table) and a plan of many small types stays small.
#[derive(Debug, Default)]
struct Tally {
    tasks: usize,
    failures: usize,
    /// The sum of the durations, in milliseconds (the mean is exact).
    sum_ms: f64,
    /// Milliseconds, as `f32` (plenty for a table), while there are at most [`EXACT`].
    exact: Vec<f32>,
    /// Counts per bucket ([`bucket_of`]) once there were more.
    hist: Option<Box<[u32]>>,
}

/// Durations a row keeps one by one before it keeps a histogram.
const EXACT: usize = 1024;
/// Histogram buckets per doubling of a duration (each about 2.2 % wide).
const PER_OCTAVE: f64 = 32.0;
/// Buckets: below 1 µs, then 48 doublings of microseconds (up to about 9 years).
const BUCKETS: usize = 1 + 48 * PER_OCTAVE as usize;

/// The histogram bucket of a duration of `ms` milliseconds.
fn bucket_of(ms: f64) -> usize {
    let us = ms * 1000.0;
    if us.is_nan() || us < 1.0 {
        return 0;
    }
    ((us.log2() * PER_OCTAVE) as usize + 1).min(BUCKETS - 1)
}

/// A duration in bucket `b`, in milliseconds: the geometric middle of its range.
fn ms_of_bucket(b: usize) -> f64 {
    if b == 0 {
        return 0.0;
    }
    ((b as f64 - 0.5) / PER_OCTAVE).exp2() / 1000.0
}

impl Tally {
    /// Counts one task (inlined: the report tallies every counted success twice, by node
    /// and by type; the histogram's making is out of line).
    #[inline]
    fn add(&mut self, ok: bool, ms: f64) {
        self.tasks += 1;
        if !ok {
            self.failures += 1;
        }
        self.sum_ms += ms;
        match &mut self.hist {
            Some(h) => h[bucket_of(ms)] += 1,
            None if self.exact.len() < EXACT => self.exact.push(ms as f32),
            None => self.start_hist(ms),
        }
    }

    /// The durations kept one by one, and `ms`, become a histogram.
    #[cold]
    #[inline(never)]
    fn start_hist(&mut self, ms: f64) {
        let mut h = vec![0u32; BUCKETS].into_boxed_slice();
        for &d in &self.exact {
            h[bucket_of(f64::from(d))] += 1;
        }
        h[bucket_of(ms)] += 1;
        self.exact = Vec::new();
        self.hist = Some(h);
    }

    fn mean_p99(&mut self) -> (f64, f64) {
        let n = self.exact.len()
            + self
                .hist
                .as_ref()
                .map_or(0, |h| h.iter().map(|&c| c as usize).sum());
        if n == 0 {
            return (0.0, 0.0);
        }
        let mean = self.sum_ms / n as f64;
        // Nearest-rank p99.
        let rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
        if let Some(h) = &self.hist {
            let mut seen = 0;
            for (b, &c) in h.iter().enumerate() {
                seen += c as usize;
                if seen >= rank {
                    return (mean, ms_of_bucket(b));
                }
            }
            return (mean, ms_of_bucket(BUCKETS - 1));
        }
        self.exact.sort_by(f32::total_cmp);
        (mean, f64::from(self.exact[rank - 1]))
    }
}

/// The first 20 of `names`, joined, and how many more there are (a plan may have a hundred
/// thousand types; `--json`'s summary lists them all).
fn first_names(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Adds a result to `key`'s tally, allocating the key only the first time it is seen.
fn bump(rows: &mut Rows, key: &str, ok: bool, ms: f64) {
    rows.get_mut(key).add(ok, ms);
}

/// Rows of the node or type table that [`Rows`] searches one by one.
const FEW_ROWS: usize = 8;

/// A table's rows by key, in order of first appearance: searched one by one while there are
/// at most [`FEW_ROWS`] (the usual handful of nodes and types: a comparison or two a result,
/// where a B-tree of string keys took about 160 instructions), through an index beyond;
/// sorted when shown.
#[derive(Debug, Default)]
struct Rows {
    rows: Vec<(String, Tally)>,
    index: std::collections::HashMap<String, usize>,
}

impl Rows {
    /// `key`'s tally, made empty the first time.
    fn get_mut(&mut self, key: &str) -> &mut Tally {
        let i = self.index(key);
        &mut self.rows[i].1
    }

    /// `key`'s place in `rows`, made the first time.
    fn index(&mut self, key: &str) -> usize {
        let found = if self.rows.len() <= FEW_ROWS {
            self.rows.iter().position(|(k, _)| k == key)
        } else {
            self.index.get(key).copied()
        };
        let i = match found {
            Some(i) => i,
            None => {
                let i = self.rows.len();
                self.rows.push((key.to_string(), Tally::default()));
                if i == FEW_ROWS {
                    self.index = (self.rows.iter().enumerate())
                        .map(|(i, (k, _))| (k.clone(), i))
                        .collect();
                } else if i > FEW_ROWS {
                    self.index.insert(key.to_string(), i);
                }
                i
            }
        };
        i
    }

    /// The row of a shared `key` (a result's node or type), found by the string's address
    /// among the few `seen` so far (the results of a run share a handful of `Arc<str>`s,
    /// alive while the report is) and by its text the first time.
    fn shared(
        &mut self,
        seen: &mut Vec<(*const u8, usize)>,
        key: &Arc<str>,
        text: fn(&str) -> &str,
    ) -> &mut Tally {
        let at = key.as_ptr();
        let i = match seen.iter().find(|(p, _)| *p == at) {
            Some(&(_, i)) => i,
            None => {
                let i = self.index(text(key));
                if seen.len() < FEW_ROWS {
                    seen.push((at, i));
                }
                i
            }
        };
        &mut self.rows[i].1
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows in key order.
    fn sorted(&mut self) -> Vec<(&str, &mut Tally)> {
        let mut rows: Vec<(&str, &mut Tally)> =
            self.rows.iter_mut().map(|(k, t)| (k.as_str(), t)).collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows
    }
}

/// Prints run events to stdout (notices to stderr).
///
/// Lines are buffered and written when the run waits for the network
/// ([`RunEvent::Flush`]), when 64 KiB are pending, before a notice, and at the end, so a
/// busy run makes one write per batch of events instead of one per line, while a quiet one
/// still shows each line at once.
#[derive(Debug)]
pub struct Printer {
    format: Format,
    /// Stdout bytes not written yet.
    out: Vec<u8>,
    total: usize,
    done: usize,
    bar: Option<ProgressBar>,
    /// Where the bar on screen is shown to the log writer.
    active: ActiveBar,
    allow_bar: bool,
    by_node: Rows,
    by_type: Rows,
    /// Successes came counted ([`RunEvent::TasksSucceeded`]), not one by one: the tables
    /// take them from the report.
    counted: bool,
    /// The time of `--json` lines.
    stamp: Stamp,
    taps: Taps,
    /// The addresses of the run's in-process nodes (shown as "in process", not as the
    /// address nothing listens on).
    in_process: std::collections::HashSet<String>,
}

/// What else sees each event (`run --report`, `run --metrics-listen`).
#[derive(Default)]
struct Taps(Vec<Tap>);

/// One of [`Taps`].
type Tap = Box<dyn FnMut(&RunEvent) + Send>;

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Taps({})", self.0.len())
    }
}

fn short(node: &str) -> &str {
    node.get(..8).unwrap_or(node)
}

impl Printer {
    /// A printer for a run of `total` tasks. A progress bar is shown only in
    /// [`Format::Human`] when stderr is a terminal; it draws there, so stdout (the results)
    /// stays clean when redirected to a file.
    pub fn new(format: Format, total: usize) -> Self {
        Printer {
            format,
            out: Vec::new(),
            total,
            done: 0,
            bar: None,
            active: ActiveBar::default(),
            allow_bar: format == Format::Human && std::io::stderr().is_terminal(),
            by_node: Rows::default(),
            by_type: Rows::default(),
            counted: false,
            stamp: Stamp::default(),
            taps: Taps::default(),
            in_process: Default::default(),
        }
    }

    /// Names `addrs` as the run's in-process nodes: their `connected` lines say "in
    /// process" instead of the address (`--json` keeps the address).
    pub fn in_process(mut self, addrs: impl IntoIterator<Item = std::net::SocketAddr>) -> Self {
        self.in_process = addrs.into_iter().map(|a| a.to_string()).collect();
        self
    }

    /// Shows its progress bar to `active` (the log writer's), so log lines step around it.
    pub fn active_bar(mut self, active: ActiveBar) -> Self {
        self.active = active;
        self
    }

    /// Hands every later event to `tap` as well, before it is shown.
    pub fn tap(&mut self, tap: impl FnMut(&RunEvent) + Send + 'static) {
        self.taps.0.push(Box::new(tap));
    }

    /// Shows one event.
    pub fn event(&mut self, ev: &RunEvent) {
        for tap in &mut self.taps.0 {
            tap(ev);
        }
        match ev {
            RunEvent::TaskCompleted {
                kind,
                node,
                duration_ms,
                ..
            } => self.tally(node, kind, true, *duration_ms),
            RunEvent::TaskFailed {
                kind,
                node,
                duration_ms,
                attempt,
                ..
            } if *attempt > 0 => self.tally(node, kind, false, *duration_ms),
            RunEvent::TaskRetry { kind, node, .. } => self.tally(node, kind, false, 0.0),
            _ => {}
        }
        if matches!(
            ev,
            RunEvent::TaskCompleted { .. }
                | RunEvent::TaskFailed { .. }
                | RunEvent::TaskCancelled { .. }
        ) {
            // Counted whatever is printed, so `[k/N]` is the task's place in the run.
            self.done += 1;
        }
        match ev {
            RunEvent::TasksSucceeded { count } => {
                // Nothing to show: counted for `[k/N]`, tallied from the report.
                self.done += count;
                self.counted = true;
                return;
            }
            RunEvent::Notice(n) => {
                self.line_err(&escape(n));
                return;
            }
            RunEvent::Flush => {
                self.flush();
                return;
            }
            RunEvent::PeerUnreachable { addr, error } => {
                // For people in every format (stderr); `--json` also gets the event.
                self.line_err(&format!("cannot reach {addr}: {error}"));
                if self.format != Format::Json {
                    return;
                }
            }
            _ => {}
        }
        match self.format {
            Format::Json => {
                if !matches!(ev, RunEvent::Phase(_)) {
                    json_line(
                        &mut self.out,
                        ev,
                        std::time::SystemTime::now(),
                        &mut self.stamp,
                    );
                    self.maybe_flush();
                }
            }
            Format::Quiet => {
                let text = match ev {
                    RunEvent::TaskFailed { .. }
                    | RunEvent::TaskCancelled { .. }
                    | RunEvent::Summary { .. } => self.human(ev),
                    _ => None,
                };
                if let Some(text) = text {
                    self.line(&text);
                }
            }
            Format::Human => {
                if let RunEvent::Phase(Phase::Terminating) = ev {
                    self.finish_bar();
                }
                if let Some(text) = self.human(ev) {
                    self.line(&text);
                }
                if matches!(
                    ev,
                    RunEvent::TaskCompleted { .. }
                        | RunEvent::TaskFailed { .. }
                        | RunEvent::TaskCancelled { .. }
                ) {
                    if let Some(bar) = &self.bar {
                        bar.inc(1);
                    }
                }
                if let RunEvent::Phase(Phase::Assigning) = ev {
                    self.start_bar();
                }
            }
        }
    }

    fn tally(&mut self, node: &str, kind: &str, ok: bool, ms: f64) {
        if self.format == Format::Json {
            return;
        }
        bump(&mut self.by_node, short(node), ok, ms);
        bump(&mut self.by_type, kind, ok, ms);
    }

    /// Writes out the buffered lines. A closed stdout (e.g. `| head`) must not kill the
    /// run, so write errors are ignored.
    pub fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&self.out);
        let _ = stdout.flush();
        self.out.clear();
    }

    fn maybe_flush(&mut self) {
        if self.out.len() >= OUT_BUFFER {
            self.flush();
        }
    }

    fn start_bar(&mut self) {
        if !self.allow_bar || self.bar.is_some() {
            return;
        }
        let bar = ProgressBar::with_draw_target(
            Some(self.total as u64),
            ProgressDrawTarget::stderr_with_hz(10),
        );
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {pos}/{len} tasks  {per_sec}  ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        self.active.set(Some(bar.clone()));
        self.bar = Some(bar);
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            self.active.set(None);
        }
    }

    /// Prints a line to stdout (buffered), above the progress bar if there is one.
    fn line(&mut self, text: &str) {
        match &self.bar {
            // The bar is on stderr: it steps aside while the line goes to stdout.
            Some(bar) => bar.suspend(|| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }),
            None => {
                self.out.extend_from_slice(text.as_bytes());
                self.out.push(b'\n');
                self.maybe_flush();
            }
        }
    }

    fn line_err(&mut self, text: &str) {
        // Keep stdout and stderr in the order the events happened.
        self.flush();
        let _ = self.active.write_log(format!("{text}\n").as_bytes());
    }

    /// Ends the output of a run whose results this printer never saw whole (`attach`):
    /// the node and type tables of the events it printed, without the task table.
    pub fn tables(&mut self) {
        self.flush();
        self.finish_bar();
        if self.format == Format::Json {
            return;
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let _ = tally_table(&mut out, "NODE", &mut self.by_node, None);
        let _ = tally_table(&mut out, "TYPE", &mut self.by_type, None);
    }

    /// Shows the final tables (people only; `--json` consumers have the events): every task
    /// in file order with its node, attempts, duration and status (long runs list the first
    /// [`TABLE_ROWS`] rows and every task that did not succeed), then per node and per type:
    /// tasks, failures, mean and p99 duration.
    pub fn report(&mut self, report: &RunReport) {
        self.flush();
        self.finish_bar();
        if self.format == Format::Json {
            return;
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if self.format == Format::Human {
            let _ = task_table(&mut out, report);
        }
        self.tally_counted(report);
        let speeds = speed_column(report);
        let _ = tally_table(&mut out, "NODE", &mut self.by_node, Some(&speeds));
        let _ = tally_table(&mut out, "TYPE", &mut self.by_type, None);
    }

    /// Tallies the successes that came as a count ([`RunEvent::TasksSucceeded`]) from their
    /// results, which say what their events would have (the last attempt's node and time;
    /// earlier failed attempts were tallied from their own events).
    fn tally_counted(&mut self, report: &RunReport) {
        if !std::mem::take(&mut self.counted) || self.format == Format::Json {
            return;
        }
        let (mut nodes, mut kinds) = (Vec::new(), Vec::new());
        for r in &report.results {
            if let (Status::Succeeded, false, Some(node)) = (r.status, r.resumed, &r.node) {
                (self.by_node.shared(&mut nodes, node, short)).add(true, r.duration_ms);
                (self.by_type.shared(&mut kinds, &r.kind, |k| k)).add(true, r.duration_ms);
            }
        }
    }

    fn human(&mut self, ev: &RunEvent) -> Option<String> {
        let w = self.total.to_string().len();
        Some(match ev {
            RunEvent::Phase(p) => match p {
                Phase::Discovering => "Discovering peers...",
                Phase::Connecting => "Initiating connections...",
                Phase::Assigning => "Assigning tasks...",
                Phase::Terminating => "Terminating connections...",
                Phase::Disconnected => "Disconnected from all nodes.",
                // A phase newer than this printer is not shown.
                _ => return None,
            }
            .to_string(),
            RunEvent::Notice(n) => escape(n).into_owned(),
            RunEvent::RunStarted { .. }
            | RunEvent::PeerDiscovered { .. }
            | RunEvent::PeerUnreachable { .. }
            | RunEvent::TaskAssigned { .. }
            | RunEvent::Flush => return None,
            RunEvent::Connected {
                node,
                addr,
                types,
                capacity,
            } => format!(
                "  connected to node {} {} (types: {}, capacity {capacity})",
                short(node),
                if self.in_process.contains(addr) {
                    "in process".into()
                } else {
                    format!("at {}", escape(addr))
                },
                one_line(&types.join(", "))
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
                let retry = if *attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                };
                let (inline, block) = shown(output, ": ", false);
                format!(
                    "  [{:>w$}/{}] {task} ok on node {} (type {kind}{retry}) in {}{inline}{block}",
                    self.done,
                    self.total,
                    short(node),
                    human_ms(*duration_ms),
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
                let on = if node.is_empty() {
                    String::new()
                } else {
                    format!(" on node {} (type {kind}, attempt {attempt})", short(node))
                };
                let (error, error_rest) = shown(error, ": ", true);
                // After a multi-line error, the output goes on a line of its own.
                let (output, output_block) = if error_rest.is_empty() {
                    shown(output, "; output: ", false)
                } else {
                    let (inline, block) = shown(output, "output: ", false);
                    if inline.is_empty() {
                        (inline, block)
                    } else {
                        (format!("\n{INDENT}{inline}"), block)
                    }
                };
                format!(
                    "  [{:>w$}/{}] {task} FAILED{on}{error}{error_rest}{output}{output_block}",
                    self.done, self.total
                )
            }
            RunEvent::TaskCancelled {
                task,
                kind,
                node,
                attempt,
                output,
                duration_ms,
            } => {
                let (output, block) = shown(output, "; output: ", false);
                format!(
                    "  [{:>w$}/{}] {task} cancelled on node {} (type {kind}, attempt {attempt}) after {}{output}{block}",
                    self.done,
                    self.total,
                    short(node),
                    human_ms(*duration_ms),
                )
            }
            RunEvent::TaskRetry {
                task,
                node,
                attempt,
                error,
                delay_ms,
                ..
            } => format!(
                "  {task} attempt {attempt} failed on node {}: {}; retrying in {delay_ms} ms",
                short(node),
                one_line(error)
            ),
            RunEvent::Disconnected {
                node, clean, error, ..
            } => {
                if *clean {
                    format!("  disconnected from node {} (goodbye)", short(node))
                } else {
                    format!(
                        "  lost node {}: {}",
                        short(node),
                        one_line(error.as_deref().unwrap_or("connection closed"))
                    )
                }
            }
            RunEvent::Summary {
                total,
                succeeded,
                failed,
                cancelled,
                not_run,
                resumed,
                missing_types,
                elapsed_ms,
                interrupted,
            } => {
                if !missing_types.is_empty() {
                    self.line_err(&format!(
                        "error: no node serves type{} {}",
                        if missing_types.len() == 1 { "" } else { "s" },
                        escape(&first_names(missing_types))
                    ));
                }
                let resumed = if *resumed > 0 {
                    format!(" ({resumed} from the journal)")
                } else {
                    String::new()
                };
                let cancelled = if *cancelled > 0 || *interrupted {
                    format!(", {cancelled} cancelled")
                } else {
                    String::new()
                };
                let interrupted = if *interrupted { " (interrupted)" } else { "" };
                format!(
                    "{total} tasks: {succeeded} succeeded{resumed}, {failed} failed{cancelled}, {not_run} not run in {}{interrupted}",
                    human_ms(*elapsed_ms)
                )
            }
            // An event newer than this printer is not shown.
            _ => return None,
        })
    }
}

impl Drop for Printer {
    fn drop(&mut self) {
        self.flush();
        // A run stopped at once (a second signal) leaves no bar on the terminal.
        self.finish_bar();
    }
}

fn task_table(out: &mut impl Write, report: &RunReport) -> std::io::Result<()> {
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
            (Status::Failed, _) => {
                format!("FAILED: {}", one_line(r.error.as_deref().unwrap_or("")))
            }
            (Status::Cancelled, _) => "cancelled".to_string(),
            (Status::NotRun, _) => match &r.error {
                Some(e) => format!("not run ({})", one_line(e)),
                None => "not run".to_string(),
            },
            (other, _) => format!("{other:?}"),
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

/// Per short node id, the speed the run learned of it: time per unit of cost, per type
/// (`12.0 ms` with one type, `a 12.0 ms, b 3.00 s` with several).
fn speed_column(report: &RunReport) -> BTreeMap<String, String> {
    let mut by_node: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for s in &report.speeds {
        by_node
            .entry(short(&s.node).to_string())
            .or_default()
            .push((s.kind.clone(), s.ms_per_cost));
    }
    by_node
        .into_iter()
        .map(|(node, v)| {
            let text = match v.as_slice() {
                [(_, ms)] => human_ms(*ms),
                _ => v
                    .iter()
                    .map(|(k, ms)| format!("{} {}", p2p_core::text::escape(k), human_ms(*ms)))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            (node, text)
        })
        .collect()
}

/// Per node or per type: tasks, failures, mean and p99 duration; with `speeds` (the node
/// table), a last column with the learned time per unit of cost.
fn tally_table(
    out: &mut impl Write,
    what: &str,
    rows: &mut Rows,
    speeds: Option<&BTreeMap<String, String>>,
) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    write!(
        out,
        "{what:<8}  {:>8}  {:>8}  {:>10}  {:>10}",
        "TASKS", "FAILURES", "MEAN", "P99"
    )?;
    if speeds.is_some() {
        write!(out, "  {:>10}", "PER COST")?;
    }
    writeln!(out)?;
    for (key, t) in rows.sorted() {
        let (mean, p99) = t.mean_p99();
        write!(
            out,
            "{key:<8}  {:>8}  {:>8}  {:>10}  {:>10}",
            t.tasks,
            t.failures,
            human_ms(mean),
            human_ms(p99)
        )?;
        if let Some(s) = speeds {
            write!(out, "  {:>10}", s.get(key).map_or("-", String::as_str))?;
        }
        writeln!(out)?;
    }
    Ok(())
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

/// `s` (a line of peer text) escaped and cut to [`LINE_CHARS`] characters.
fn capped_line(s: &str) -> String {
    let s = s.strip_suffix('\r').unwrap_or(s);
    let mut out = String::new();
    let mut chars = s.chars();
    for c in chars.by_ref().take(LINE_CHARS) {
        let mut buf = [0u8; 4];
        out.push_str(&escape(c.encode_utf8(&mut buf)));
    }
    let more = chars.count();
    if more > 0 {
        out.push_str(&format!(" [... {more} more characters]"));
    }
    out
}

/// The first line of peer text, escaped and capped, with a note when there is more.
fn one_line(s: &str) -> String {
    let mut lines = s.split('\n');
    let first = capped_line(lines.next().unwrap_or(""));
    let rest = lines.count();
    if rest > 0 {
        format!(
            "{first} [+{rest} more line{}]",
            if rest == 1 { "" } else { "s" }
        )
    } else {
        first
    }
}

/// How a task's output (or error) shows in text mode: `(inline, block)`. Empty text shows
/// as nothing. One line shows inline after `sep`. More lines show as a block of indented
/// lines below (with `inline_first`, the first line stays inline): at most [`OUTPUT_LINES`]
/// lines of at most [`LINE_CHARS`] characters, then a note of what was cut. Every line is
/// escaped ([`p2p_core::text::escape`]): it comes from a peer.
fn shown(text: &str, sep: &str, inline_first: bool) -> (String, String) {
    if text.is_empty() {
        return (String::new(), String::new());
    }
    let mut lines = text.split('\n').peekable();
    let mut inline = String::new();
    if inline_first || !text.contains('\n') {
        inline = format!("{sep}{}", capped_line(lines.next().unwrap_or("")));
    } else {
        inline.push_str(sep.trim_end());
    }
    let mut block = String::new();
    let mut shown_lines = 0;
    let mut cut_lines = 0usize;
    let mut cut_bytes = 0usize;
    for line in lines {
        if shown_lines < OUTPUT_LINES {
            block.push('\n');
            block.push_str(INDENT);
            block.push_str(&capped_line(line));
            shown_lines += 1;
        } else {
            cut_lines += 1;
            cut_bytes += line.len() + 1;
        }
    }
    if cut_lines > 0 {
        block.push_str(&format!(
            "\n{INDENT}[... {cut_lines} more line{} ({}) not shown; --json has all of it]",
            if cut_lines == 1 { "" } else { "s" },
            human_bytes(cut_bytes)
        ));
    }
    (inline, block)
}

/// `512` as `512 B`, `2048` as `2.0 KiB`, `3145728` as `3.0 MiB`.
fn human_bytes(n: usize) -> String {
    let f = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{:.1} MiB", f / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use p2p_tasks::TaskResult;

    #[test]
    fn p99_is_nearest_rank_and_mean_is_exact() {
        let mut t = Tally::default();
        for i in 1..=200 {
            t.add(i != 7, f64::from(i));
        }
        let (mean, p99) = t.mean_p99();
        assert_eq!(mean, 100.5);
        assert_eq!(p99, 198.0);
        assert_eq!((t.tasks, t.failures), (200, 1));
    }

    #[test]
    fn output_shows_inline_or_as_an_indented_escaped_block_with_a_cap() {
        assert_eq!(shown("", ": ", false), (String::new(), String::new()));
        assert_eq!(
            shown("one \x1b[2J", ": ", false),
            (": one \\x1b[2J".to_string(), String::new())
        );
        let (inline, block) = shown("a\r\nb\x07\nc", ": ", false);
        assert_eq!(inline, ":");
        assert_eq!(block, "\n      a\n      b\\x07\n      c");
        // An error keeps its first line inline.
        let (inline, block) = shown("exit status 1: x\ny", ": ", true);
        assert_eq!(
            (inline.as_str(), block.as_str()),
            (": exit status 1: x", "\n      y")
        );
        // The cap: OUTPUT_LINES lines, then a note of what was cut.
        let many: String = (0..OUTPUT_LINES + 5).map(|i| format!("{i}\n")).collect();
        let (_, block) = shown(many.trim_end(), ": ", false);
        let lines: Vec<&str> = block.lines().skip(1).collect();
        assert_eq!(lines.len(), OUTPUT_LINES + 1);
        assert_eq!(
            lines[OUTPUT_LINES - 1].trim(),
            (OUTPUT_LINES - 1).to_string()
        );
        assert!(lines[OUTPUT_LINES].contains("[... 5 more lines (15 B) not shown"));
        // And LINE_CHARS characters per line.
        let long = "é".repeat(LINE_CHARS + 7);
        let (inline, _) = shown(&long, ": ", false);
        assert_eq!(
            inline,
            format!(": {} [... 7 more characters]", "é".repeat(LINE_CHARS))
        );
    }

    #[test]
    fn one_line_escapes_and_counts_the_rest() {
        assert_eq!(one_line("boom"), "boom");
        assert_eq!(
            one_line("a\x1b]0;t\x07\nb\nc"),
            "a\\x1b]0;t\\x07 [+2 more lines]"
        );
        assert_eq!(one_line("a\nb"), "a [+1 more line]");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(short("0123456789"), "01234567");
        assert_eq!(short("é"), "é");
    }

    #[test]
    fn json_events_carry_their_time_last_in_rfc3339_micros() {
        let at = std::time::UNIX_EPOCH + Duration::from_micros(1_796_117_400_123_456);
        let mut out = Vec::new();
        let ev = RunEvent::RunStarted {
            schema: p2p_tasks::EVENT_SCHEMA,
            run: "ab".repeat(16),
            tasks: 3,
            order: "strict".into(),
        };
        json_line(&mut out, &ev, at, &mut Stamp::default());
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.starts_with(r#"{"event":"run_started","schema":1,"run":"#),
            "{line}"
        );
        assert!(
            line.ends_with(",\"ts\":\"2026-12-01T09:30:00.123456Z\"}\n"),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["tasks"], 3);
    }

    /// An in-process node is shown as such, not at the address nothing listens on; any
    /// other node (also one at a `0.0.0.0` address the printer was not told of) at its
    /// address.
    #[test]
    fn in_process_nodes_connect_in_process_and_others_at_their_address() {
        let local = crate::node::in_process_addr(0);
        let mut p = Printer::new(Format::Human, 1).in_process([local]);
        let connected = |addr: &str| RunEvent::Connected {
            node: "0123456789abcdef".into(),
            addr: addr.into(),
            types: vec!["a".into()],
            capacity: 2,
        };
        assert_eq!(
            p.human(&connected(&local.to_string())).as_deref(),
            Some("  connected to node 01234567 in process (types: a, capacity 2)")
        );
        for other in ["0.0.0.0:2", "127.0.0.1:7401"] {
            assert_eq!(
                p.human(&connected(other)),
                Some(format!(
                    "  connected to node 01234567 at {other} (types: a, capacity 2)"
                ))
            );
        }
    }

    /// A task's two events, written without serde, are the bytes serde writes, also for
    /// texts that need escaping; their `ts` is humantime's, across second boundaries.
    #[test]
    fn task_events_are_written_as_serde_writes_them() {
        let texts = [
            "",
            "a1",
            "say \"hi\"",
            "back\\slash",
            "tab\there",
            "line\n",
            "\u{1}ctl",
            "é ünï 日本",
            "\u{7f}del",
            "</script>",
        ];
        let durations = [0.001, 12.5, 1e-7, f64::NAN, 3.0, 1e21];
        let base = std::time::UNIX_EPOCH + Duration::from_micros(1_796_117_400_999_990);
        let mut stamp = Stamp::default();
        let mut n: u32 = 0;
        for t in texts {
            for o in texts {
                n += 1;
                let at = base + Duration::from_micros(u64::from(n) * 7);
                let events = [
                    RunEvent::TaskAssigned {
                        task: t.into(),
                        kind: Arc::from(o),
                        node: Arc::from(t),
                        attempt: n,
                    },
                    RunEvent::TaskCompleted {
                        task: o.into(),
                        kind: Arc::from(t),
                        node: Arc::from(o),
                        attempt: n,
                        ok: n.is_multiple_of(2),
                        output: t.into(),
                        duration_ms: durations[n as usize % durations.len()],
                    },
                ];
                for ev in events {
                    let mut fast = Vec::new();
                    json_line(&mut fast, &ev, at, &mut stamp);
                    let mut slow = serde_json::to_vec(&ev).unwrap();
                    slow.pop();
                    writeln!(
                        slow,
                        ",\"ts\":\"{}\"}}",
                        humantime::format_rfc3339_micros(at)
                    )
                    .unwrap();
                    assert_eq!(
                        String::from_utf8(fast).unwrap(),
                        String::from_utf8(slow).unwrap()
                    );
                }
            }
        }
    }

    /// Successes that came as a count are tallied from the report's results into the same
    /// rows their events would have made (failed attempts still come as events; a success
    /// of an earlier run is not this run's), and `[k/N]` counts them.
    #[test]
    fn counted_successes_make_the_tables_their_events_would() {
        let nodes: Vec<Arc<str>> = ["node-one-0000", "node-two-0000", "node-six-0000"]
            .iter()
            .map(|&n| Arc::from(n))
            .collect();
        let kinds: Vec<Arc<str>> = ["a", "b"].iter().map(|&k| Arc::from(k)).collect();
        let mut results = Vec::new();
        let mut completed = Vec::new();
        for i in 0..40usize {
            // Every third result with a type of its own allocation (found by its text).
            let kind = if i % 3 == 0 {
                Arc::from(&*kinds[i % 2])
            } else {
                kinds[i % 2].clone()
            };
            let node = nodes[i % 3].clone();
            let mut r = TaskResult::new(format!("t{i}"), &*kind, Status::Succeeded);
            r.kind = kind.clone();
            r.node = Some(node.clone());
            r.attempts = 1;
            r.duration_ms = 0.5 + i as f64;
            completed.push(RunEvent::TaskCompleted {
                task: r.task.clone(),
                kind,
                node,
                attempt: 1,
                ok: true,
                output: "".into(),
                duration_ms: r.duration_ms,
            });
            results.push(r);
        }
        let retry = RunEvent::TaskRetry {
            task: "t1".into(),
            kind: kinds[1].clone(),
            node: nodes[2].clone(),
            attempt: 1,
            error: "no".into(),
            delay_ms: 5,
        };
        let failed = RunEvent::TaskFailed {
            task: "f".into(),
            kind: kinds[0].clone(),
            node: nodes[0].clone(),
            attempt: 1,
            ok: false,
            output: "".into(),
            duration_ms: 7.0,
            exit_code: Some(1),
            error: "no".into(),
        };
        let mut f = TaskResult::new("f", "a", Status::Failed);
        f.node = Some(nodes[0].clone());
        results.push(f);
        let mut resumed = TaskResult::new("old", "a", Status::Succeeded);
        resumed.resumed = true;
        resumed.node = Some(nodes[0].clone());
        results.push(resumed);
        let report = RunReport::new(results);

        let mut by_events = Printer::new(Format::Quiet, 42);
        by_events.event(&retry);
        for ev in &completed[..10] {
            by_events.event(ev);
        }
        by_events.event(&failed);
        for ev in &completed[10..] {
            by_events.event(ev);
        }
        by_events.tally_counted(&report);
        let mut by_count = Printer::new(Format::Quiet, 42);
        by_count.event(&retry);
        by_count.event(&RunEvent::TasksSucceeded { count: 10 });
        by_count.event(&failed);
        by_count.event(&RunEvent::TasksSucceeded { count: 30 });
        by_count.tally_counted(&report);
        assert_eq!(by_count.done, by_events.done);
        assert_eq!(by_count.done, 41);
        // The failure's line, `[11/42]` in both, is the only one (not written out here).
        assert_eq!(
            String::from_utf8_lossy(&by_count.out),
            String::from_utf8_lossy(&by_events.out)
        );
        assert!(
            String::from_utf8_lossy(&by_count.out).starts_with("  [11/42] f FAILED"),
            "{:?}",
            String::from_utf8_lossy(&by_count.out)
        );
        by_count.out.clear();
        by_events.out.clear();
        let rows = |r: &mut Rows| -> Vec<(String, usize, usize, f64)> {
            r.sorted()
                .into_iter()
                .map(|(k, t)| (k.to_string(), t.tasks, t.failures, t.sum_ms))
                .collect()
        };
        let want = rows(&mut by_events.by_node);
        assert_eq!(want.len(), 3);
        assert_eq!(want.iter().map(|r| r.1).sum::<usize>(), 42);
        assert_eq!(rows(&mut by_count.by_node), want);
        assert_eq!(rows(&mut by_count.by_type), rows(&mut by_events.by_type));
    }

    /// Past the few rows searched one by one, the index finds the same rows: every key
    /// counted once per result, shown in key order.
    #[test]
    fn table_rows_beyond_the_few_are_counted_and_shown_in_order() {
        let mut rows = Rows::default();
        for round in 0..3 {
            for i in (0..3 * FEW_ROWS).rev() {
                bump(&mut rows, &format!("k{i:02}"), round != 1, 1.0);
            }
        }
        let shown: Vec<(String, usize, usize)> = rows
            .sorted()
            .into_iter()
            .map(|(k, t)| (k.to_string(), t.tasks, t.failures))
            .collect();
        let want: Vec<(String, usize, usize)> = (0..3 * FEW_ROWS)
            .map(|i| (format!("k{i:02}"), 3, 1))
            .collect();
        assert_eq!(shown, want);
    }

    #[test]
    fn the_node_table_shows_the_learned_speed_per_unit_of_cost() {
        let mut rows = Rows::default();
        bump(&mut rows, "aaaaaaaa", true, 20.0);
        bump(&mut rows, "bbbbbbbb", true, 100.0);
        let mut report = RunReport::new(Vec::new());
        report.speeds = vec![
            p2p_tasks::event::NodeSpeed {
                node: "aaaaaaaa0000".into(),
                kind: "a".into(),
                ms_per_cost: 20.0,
            },
            p2p_tasks::event::NodeSpeed {
                node: "cccccccc0000".into(),
                kind: "a".into(),
                ms_per_cost: 5.0,
            },
        ];
        let mut out = Vec::new();
        tally_table(&mut out, "NODE", &mut rows, Some(&speed_column(&report))).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with("PER COST"), "{text}");
        assert!(
            lines[2].starts_with("aaaaaaaa") && lines[2].ends_with("20.0 ms"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("bbbbbbbb") && lines[3].ends_with("-"),
            "{text}"
        );
    }

    #[test]
    fn a_large_rows_p99_comes_from_its_histogram_within_a_few_percent() {
        // 100,000 durations of 1 µs to 100 ms: kept in a histogram past the first 1,024.
        let mut t = Tally::default();
        let n = 100_000;
        for i in 1..=n {
            t.add(i % 10 != 0, i as f64 / 1000.0);
        }
        assert!(t.exact.is_empty() && t.hist.is_some());
        assert_eq!((t.tasks, t.failures), (n, n / 10));
        let (mean, p99) = t.mean_p99();
        assert!((mean - 50.0005).abs() < 1e-6, "{mean}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.025, "{p99}");
        // A small row is exact.
        let mut s = Tally::default();
        for ms in [3.0, 1.0, 2.0] {
            s.add(true, ms);
        }
        assert_eq!(s.mean_p99(), (2.0, 3.0));
        assert_eq!(Tally::default().mean_p99(), (0.0, 0.0));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ms(0.042), "42 µs");
        assert_eq!(human_ms(12.54), "12.5 ms");
        assert_eq!(human_ms(3400.0), "3.40 s");
    }
}
