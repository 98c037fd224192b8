//! The shell-command handler (`--handler TYPE=COMMAND`).

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::procs::{self, Scope};
use super::workdir::{WorkDir, WorkDirs};
use super::{BoxFuture, Handler, TaskOutcome, TaskRequest};

/// The default cap on a task's captured standard output: 1 MiB (1,048,576 bytes).
pub const DEFAULT_OUTPUT_LIMIT: usize = 1_048_576;

/// How much of the end of a failed command's standard error goes into its error: 4 KiB.
pub const STDERR_TAIL: usize = 4096;

/// The default kill grace: how long a process of an ended attempt has between `SIGTERM`
/// and `SIGKILL` (2 s).
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// After the command has exited, how much longer than the kill grace to keep reading pipes
/// that a leftover process still holds open.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// A handler that runs a shell command with `sh -c`.
///
/// # The command
///
/// Before running, the placeholders in the command are expanded: `{id}`, `{type}` and
/// `{args}` to the task's id, type and whole argument string, each as one word, and
/// `{argv}` to the task's arguments split with shell word rules (quotes and backslashes
/// honoured, `#` starting a comment, as [`shlex::split`]), one word each: with arguments
/// `--size 10 "in put.csv"`, `./job.sh {argv}` gives the program three arguments. No
/// arguments give no words; arguments that do not split (an unclosed quote) fail the task
/// before anything runs.
///
/// A value is written as it is when it needs no quoting (non-empty, only ASCII letters,
/// digits and `+-./:@]_`: such a value means nothing to the shell anywhere), so
/// `echo "x {id}"` prints `x a1`. Any other value never enters the script: the placeholder
/// becomes a reference to an environment variable holding it, quoted for where it stands
/// (`"${P2P_TASK_ID}"` outside quotes, `${P2P_TASK_ID}` inside `"..."`, `'"${P2P_TASK_ID}"'`
/// inside `'...'`; inside `$(...)`, backquotes and `${...}` the shell reads outside quotes
/// again). The shell expands a variable after it has parsed the command, so a value from
/// the network can never inject shell syntax, and a placeholder inside quotes in the command
/// is safe too. The variables are `P2P_TASK_ID`, `P2P_TASK_TYPE`, `P2P_TASK_ARGS`, and for
/// `{argv}` `P2P_TASK_ARGV_1`, `P2P_TASK_ARGV_2`, ... with their count in `P2P_TASK_ARGC`;
/// the attempt number (from 1) is in `P2P_TASK_ATTEMPT`. Where a value is parsed again
/// (`eval`, `sh -c "... {id}"`, `ssh host "... {id}"`, bash's `$((...))`), quoting is the
/// command's business, as for any variable; in a here-document the reference's quotes show
/// (write `$P2P_TASK_ID` there). The expanded command is one argument of `sh -c`, at most
/// 128 KiB on Linux: a reference costs about 25 bytes, so arguments of more than about
/// 5,000 words that need quoting make `{argv}` fail the task (`Argument list too long`).
///
/// # The outcome
///
/// # Where it runs
///
/// Every attempt runs in a fresh, empty directory of its own (mode 0700), its current
/// directory and `P2P_TASK_DIR` in its environment: `ROOT/ID.ATTEMPT.RANDOM` under the
/// [work root](Shell::work_dirs) (`serve`: `DATA_DIR/work`), the id reduced to ASCII letters,
/// digits, `_` and `-` (at most 64), so no id names a path outside the root. It is removed
/// when the attempt ends (success, failure, cancellation, timeout), after the shell has
/// exited; a failed attempt's is kept when [`WorkDirs::keep_failed`] is set. A directory
/// that cannot be made fails the attempt. The environment is the node's, plus the
/// variables above.
///
/// Standard input is `/dev/null`. Standard output is the task's output: captured up to the
/// [output limit](Shell::output_limit) (the rest is read and discarded, and the output then
/// ends with `\n[output truncated at N bytes]`), decoded as UTF-8 (invalid bytes become
/// U+FFFD), with one trailing newline removed. Exit status 0 is success; a non-zero exit status
/// is a failure with that `exit_code` and an error such as `exit status 3: <end of stderr>`
/// (at most the last 4 KiB of standard error); a command killed by a signal fails with no exit
/// code and an error naming the signal. A command that cannot be started is a failure too.
///
/// # Processes
///
/// Nothing the command starts outlives its attempt. The command runs in its own process
/// group, with `P2P_TASK_SCOPE` set (leave it in the environment), and the serving process
/// becomes a child subreaper, so processes that leave the group (`setsid cmd &`, double
/// forks) stay in its process tree (see the `procs` module). When the attempt ends (the
/// shell exits, or the future returned by [`Handler::call`] is dropped on cancellation or
/// a timeout), every process left of it gets `SIGTERM`, then `SIGKILL` after the
/// [kill grace](Shell::kill_grace) (default 2 s), like GNU parallel's `--termseq`. The
/// outcome is reported as soon as the shell has exited and its output pipes are closed
/// (at most the kill grace plus 1 s when a leftover process holds them open).
///
/// A process that embeds a node and runs shell handlers becomes a child subreaper, and its
/// sweeps reap exited child processes that no handler owns: do not rely on waiting for
/// other children of your own in such a process.
#[derive(Debug, Clone)]
pub struct Shell {
    command: String,
    output_limit: usize,
    kill_grace: Duration,
    work: WorkDirs,
}

impl Shell {
    /// A handler running `command` with `sh -c`, with the default output limit of 1 MiB
    /// ([`DEFAULT_OUTPUT_LIMIT`]).
    pub fn new(command: impl Into<String>) -> Shell {
        Shell {
            command: command.into(),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            kill_grace: DEFAULT_KILL_GRACE,
            work: WorkDirs::default(),
        }
    }

    /// Sets where the attempts' working directories are made, and whether a failed
    /// attempt's is kept (default: the system's temporary directory, none kept).
    pub fn work_dirs(mut self, work: WorkDirs) -> Self {
        self.work = work;
        self
    }

    /// Sets how long the processes of an ended attempt have between `SIGTERM` and
    /// `SIGKILL` (default 2 s, [`DEFAULT_KILL_GRACE`]).
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// Sets the cap on captured standard output, in bytes (default 1 MiB, 1,048,576 bytes).
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// The command as given, with its placeholders.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// The command that runs for `req`: the placeholders expanded (see [`Shell`]), with the
    /// environment variables the expansion refers to.
    ///
    /// # Errors
    ///
    /// [`ArgvError`] when the command uses `{argv}` and the task's arguments do not split
    /// into shell words (an unclosed quote, or a backslash at the end).
    pub fn render(&self, req: &TaskRequest) -> Result<Rendered, ArgvError> {
        let argv = if self.command.contains("{argv}") {
            shlex::split(&req.args).ok_or(ArgvError)?
        } else {
            Vec::new()
        };
        let mut env = Vec::new();
        let script = expand(&self.command, |name, ctx, out| match name {
            Placeholder::Id => word(out, ctx, &req.id, ID_VAR),
            Placeholder::Type => word(out, ctx, &req.kind, TYPE_VAR),
            Placeholder::Args => word(out, ctx, &req.args, ARGS_VAR),
            Placeholder::Argv => {
                for (i, w) in argv.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    let var = format!("{ARGV_VAR}{}", i.saturating_add(1));
                    word(out, ctx, w, &var);
                }
            }
        });
        if !argv.is_empty() {
            env.push((ARGC_VAR.to_owned(), argv.len().to_string()));
            for (i, w) in argv.into_iter().enumerate() {
                env.push((format!("{ARGV_VAR}{}", i.saturating_add(1)), w));
            }
        }
        Ok(Rendered { script, env })
    }
}

/// A command ready to run: the script for `sh -c` and the environment variables, besides
/// `P2P_TASK_ID`, `P2P_TASK_TYPE`, `P2P_TASK_ARGS` and `P2P_TASK_ATTEMPT`, that it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The script: the command with its placeholders expanded.
    pub script: String,
    /// `P2P_TASK_ARGC` and `P2P_TASK_ARGV_1`... when the command uses `{argv}`.
    pub env: Vec<(String, String)>,
}

/// The task's arguments cannot be split into shell words for `{argv}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the task's arguments are not shell words for {{argv}}: a quote is not closed or a backslash ends them")]
pub struct ArgvError;

impl Handler for Shell {
    fn call(&self, mut req: TaskRequest) -> BoxFuture<TaskOutcome> {
        let rendered = match self.render(&req) {
            Ok(r) => r,
            Err(e) => return Box::pin(std::future::ready(TaskOutcome::failure(e.to_string()))),
        };
        let (work, limit, grace) = (self.work.clone(), self.output_limit, self.kill_grace);
        let files = req.files.take().map(|f| *f).unwrap_or_default();
        Box::pin(async move {
            let dir = match WorkDir::create(&work, &req.id, req.attempt) {
                Ok(d) => d,
                Err(e) => {
                    return TaskOutcome::failure(format!("cannot make a working directory: {e}"))
                }
            };
            if let Err(e) = super::workdir::place_inputs_off_thread(
                dir.path(),
                &files.inputs,
                files.link_inputs,
            )
            .await
            {
                dir.finish(false).await;
                return TaskOutcome::failure(e);
            }
            run(rendered, req, limit, grace, dir, files).await
        })
    }
}

const ID_VAR: &str = "P2P_TASK_ID";
const TYPE_VAR: &str = "P2P_TASK_TYPE";
const ARGS_VAR: &str = "P2P_TASK_ARGS";
const ARGC_VAR: &str = "P2P_TASK_ARGC";
const ARGV_VAR: &str = "P2P_TASK_ARGV_";

/// The placeholders of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Id,
    Type,
    Args,
    Argv,
}

impl Placeholder {
    /// The placeholder at the start of `s` and its length.
    fn at(s: &str) -> Option<(Placeholder, usize)> {
        [
            ("{id}", Placeholder::Id),
            ("{type}", Placeholder::Type),
            ("{args}", Placeholder::Args),
            ("{argv}", Placeholder::Argv),
        ]
        .into_iter()
        .find(|(text, _)| s.starts_with(text))
        .map(|(text, p)| (p, text.len()))
    }
}

/// How `sh` reads the text at a placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Outside quotes (also inside `$(...)`, backquotes and `${...}`).
    Plain,
    /// Inside `"..."`.
    Double,
    /// Inside `'...'`.
    Single,
}

/// What the scanner is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Plain,
    Double,
    Single,
    /// `$(...)` (or `$((...))`), with its open parentheses.
    Sub(usize),
    Backquote,
    /// `${...}`.
    Brace,
}

impl Frame {
    fn ctx(self) -> Ctx {
        match self {
            Frame::Double => Ctx::Double,
            Frame::Single => Ctx::Single,
            Frame::Plain | Frame::Sub(_) | Frame::Backquote | Frame::Brace => Ctx::Plain,
        }
    }
}

/// Copies `command` with each placeholder replaced by what `fill` writes for it, telling
/// `fill` how `sh` reads the place (a small scan of quotes, `$(`, backquotes, `${` and
/// comments). Whatever the scan concludes, the value itself never enters the script unless it
/// is made only of characters that mean nothing to the shell in any context (see [`word`]),
/// so a wrong guess can only garble a value, never run it.
fn expand(command: &str, mut fill: impl FnMut(Placeholder, Ctx, &mut String)) -> String {
    let bytes = command.as_bytes();
    let mut out = String::with_capacity(command.len());
    let mut stack = vec![Frame::Plain];
    let mut i = 0;
    while i < bytes.len() {
        let top = stack.last().copied().unwrap_or(Frame::Plain);
        if bytes[i] == b'{' {
            if let Some((p, len)) = Placeholder::at(&command[i..]) {
                fill(p, top.ctx(), &mut out);
                i += len;
                continue;
            }
        }
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        // How many bytes to copy as they are.
        let mut take = 1;
        match top {
            Frame::Single => {
                if c == b'\'' {
                    stack.pop();
                }
            }
            Frame::Double => match c {
                b'\\' if next.is_some_and(|n| n != b'{') => take = 2,
                b'"' => {
                    stack.pop();
                }
                b'$' if next == Some(b'(') => {
                    stack.push(Frame::Sub(1));
                    take = 2;
                }
                b'$' if next == Some(b'{') => {
                    stack.push(Frame::Brace);
                    take = 2;
                }
                b'`' => stack.push(Frame::Backquote),
                _ => {}
            },
            Frame::Plain | Frame::Sub(_) | Frame::Backquote | Frame::Brace => match c {
                b'\\' if next.is_some_and(|n| n != b'{') => take = 2,
                b'\'' => stack.push(Frame::Single),
                b'"' => stack.push(Frame::Double),
                b'$' if next == Some(b'(') => {
                    stack.push(Frame::Sub(1));
                    take = 2;
                }
                b'$' if next == Some(b'{') => {
                    stack.push(Frame::Brace);
                    take = 2;
                }
                b'`' if top == Frame::Backquote => {
                    stack.pop();
                }
                b'`' => stack.push(Frame::Backquote),
                b'(' => {
                    if let Some(Frame::Sub(n)) = stack.last_mut() {
                        *n = n.saturating_add(1);
                    }
                }
                b')' => {
                    if let Some(Frame::Sub(n)) = stack.last_mut() {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            stack.pop();
                        }
                    }
                }
                b'}' if top == Frame::Brace => {
                    stack.pop();
                }
                b'#' if i == 0
                    || matches!(
                        bytes[i - 1],
                        b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b'(' | b')'
                    ) =>
                {
                    // A comment, to the end of the line.
                    take = bytes[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .unwrap_or(bytes.len() - i);
                }
                _ => {}
            },
        }
        if stack.is_empty() {
            stack.push(Frame::Plain);
        }
        // Every byte the scan acts on is ASCII, so `i` and `i + take` are char boundaries
        // unless `take` covers a multi-byte character after a backslash: widen to its end.
        let mut end = (i + take).min(bytes.len());
        while !command.is_char_boundary(end) {
            end += 1;
        }
        out.push_str(&command[i..end]);
        i = end;
    }
    out
}

/// Writes one value for a placeholder read in `ctx`: the value itself when it needs no
/// quoting (non-empty, and only ASCII letters, digits and `+-./:@]_`, which mean nothing to
/// the shell outside quotes, inside `"..."`, inside `'...'`, in a here-document or a
/// comment: [`shlex::try_quote`] leaves it as it is), and otherwise a reference to the
/// environment variable `var` that holds it, quoted for the context: `"${var}"` outside
/// quotes, `${var}` inside `"..."`, `'"${var}"'` inside `'...'`. The shell expands the
/// reference when it runs, after parsing, so the value is never read as shell syntax.
fn word(out: &mut String, ctx: Ctx, value: &str, var: &str) {
    let plain = !value.is_empty()
        && matches!(shlex::try_quote(value), Ok(std::borrow::Cow::Borrowed(q)) if q == value);
    if plain {
        out.push_str(value);
        return;
    }
    match ctx {
        Ctx::Plain => out.push_str(&format!("\"${{{var}}}\"")),
        Ctx::Double => out.push_str(&format!("${{{var}}}")),
        Ctx::Single => out.push_str(&format!("'\"${{{var}}}\"'")),
    }
}

/// A running attempt: its shell and its registration. Dropped before the shell was
/// reaped (cancellation), it ends the attempt (`SIGTERM` to its group, then the sweep) and
/// leaves the shell to a task that reaps it.
struct Running {
    child: Option<Child>,
    scope: Scope,
    /// The attempt's working directory; on cancellation, removed once the shell is reaped.
    work: Option<WorkDir>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.scope.end(false);
        let work = self.work.take();
        if let Some(mut child) = self.child.take() {
            let pid = self.scope.pgid;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = child.wait().await;
                    Scope::reaped(pid);
                    if let Some(w) = work {
                        w.finish(false).await;
                    }
                });
                return;
            }
        }
        drop(work);
    }
}

/// Where a pipe's bytes go.
trait ByteSink {
    fn push(&mut self, bytes: &[u8]);
}

/// Keeps the first `limit` bytes and counts the rest.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
    total: u64,
}

impl ByteSink for Capped {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.total = self
            .total
            .saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    }
}

/// Keeps the last `max` bytes.
struct Tail {
    buf: Vec<u8>,
    max: usize,
    cut: bool,
}

impl ByteSink for Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.max.saturating_mul(2) {
            self.shrink();
        }
    }
}

impl Tail {
    fn shrink(&mut self) {
        if self.buf.len() > self.max {
            let excess = self.buf.len() - self.max;
            self.buf.drain(..excess);
            self.cut = true;
        }
    }
}

/// A stream written whole to a file as it comes, up to a limit (then a marker line, and
/// the rest is read and discarded).
struct Kept {
    file: tokio::io::BufWriter<tokio::fs::File>,
    written: u64,
    limit: u64,
    cut: bool,
    error: Option<std::io::Error>,
}

impl Kept {
    async fn create(path: &std::path::Path, limit: u64) -> std::io::Result<Kept> {
        Ok(Kept {
            file: tokio::io::BufWriter::with_capacity(
                64 * 1024,
                tokio::fs::File::create(path).await?,
            ),
            written: 0,
            limit,
            cut: false,
            error: None,
        })
    }

    async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        if self.error.is_some() || self.cut {
            return;
        }
        let room = self.limit.saturating_sub(self.written);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        if let Err(e) = self.file.write_all(&bytes[..take]).await {
            self.error = Some(e);
            return;
        }
        self.written += take as u64;
        if take < bytes.len() {
            self.cut = true;
            let marker = format!(
                "\n[truncated at {} bytes by --max-result-size]\n",
                self.limit
            );
            if let Err(e) = self.file.write_all(marker.as_bytes()).await {
                self.error = Some(e);
            }
        }
    }

    /// Flushed to the disk; the first write error, if any.
    async fn close(mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.file.flush().await?;
        self.file.into_inner().sync_all().await
    }
}

/// Reads `reader` to its end (or a read error) into `sink`, and into `kept` when given.
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    sink: &mut impl ByteSink,
    mut kept: Option<&mut Kept>,
) {
    let Some(reader) = reader else { return };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                sink.push(&chunk[..n]);
                if let Some(k) = kept.as_deref_mut() {
                    k.write(&chunk[..n]).await;
                }
            }
        }
    }
}

async fn run(
    rendered: Rendered,
    req: TaskRequest,
    limit: usize,
    grace: Duration,
    work: WorkDir,
    files: super::TaskFiles,
) -> TaskOutcome {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&rendered.script)
        .envs(rendered.env)
        .current_dir(work.path())
        .env("P2P_TASK_DIR", work.path())
        .env(ID_VAR, &req.id)
        .env(TYPE_VAR, &req.kind)
        .env(ARGS_VAR, &req.args)
        .env("P2P_TASK_ATTEMPT", req.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut kept_out, mut kept_err) = match &files.streams {
        Some(dir) => {
            let made = async {
                Ok::<_, std::io::Error>((
                    Kept::create(&dir.join("stdout"), files.stream_limit).await?,
                    Kept::create(&dir.join("stderr"), files.stream_limit).await?,
                ))
            }
            .await;
            match made {
                Ok((o, e)) => (Some(o), Some(e)),
                Err(e) => {
                    work.finish(false).await;
                    return TaskOutcome::failure(format!(
                        "cannot keep the task's output on this node: {e}"
                    ));
                }
            }
        }
        None => (None, None),
    };
    let (child, scope) = match procs::spawn(&mut cmd, grace) {
        Ok(x) => x,
        Err(e) => {
            work.finish(false).await;
            return TaskOutcome::failure(format!("cannot start `sh -c`: {e}"));
        }
    };
    let mut running = Running {
        child: Some(child),
        scope,
        work: Some(work),
    };
    let (mut stdout, mut stderr) = match running.child.as_mut() {
        Some(c) => (c.stdout.take(), c.stderr.take()),
        None => (None, None),
    };
    let mut out = Capped {
        buf: Vec::new(),
        limit,
        total: 0,
    };
    let mut err = Tail {
        buf: Vec::new(),
        max: STDERR_TAIL,
        cut: false,
    };

    let status = {
        let pumps = async {
            tokio::join!(
                pump(stdout.as_mut(), &mut out, kept_out.as_mut()),
                pump(stderr.as_mut(), &mut err, kept_err.as_mut())
            );
        };
        tokio::pin!(pumps);
        let Some(child) = running.child.as_mut() else {
            return TaskOutcome::failure("the shell is gone");
        };
        let (status, pumped) = tokio::select! {
            status = child.wait() => (status, false),
            () = &mut pumps => (child.wait().await, true),
        };
        // The shell has exited and is reaped: end the attempt. What it left running gets
        // SIGTERM now and SIGKILL after the grace, so nothing holds the pipes for long.
        running.child = None;
        running.scope.end(true);
        if !pumped {
            let _ = tokio::time::timeout(grace.saturating_add(DRAIN_MARGIN), &mut pumps).await;
        }
        status
    };
    let work = running.work.take();
    drop(running);

    let output = output_text(out);
    let outcome = match status {
        Err(e) => TaskOutcome {
            ok: false,
            exit_code: None,
            output,
            error: Some(format!("waiting for `sh -c` failed: {e}")),
        },
        Ok(status) => outcome_of(status, output, &stderr_text(err)),
    };
    let mut outcome = outcome;
    for (name, kept) in [("stdout", kept_out), ("stderr", kept_err)] {
        let Some(k) = kept else { continue };
        if let (Err(e), true) = (k.close().await, outcome.ok) {
            // A full disk among others: the attempt fails (and may be retried elsewhere).
            outcome.ok = false;
            outcome.error = Some(format!("cannot keep the task's {name} on this node: {e}"));
        }
    }
    if let (true, Some(w)) = (outcome.ok, &work) {
        if let Err(e) = super::workdir::collect_outputs(w.path(), &files) {
            outcome.ok = false;
            outcome.error = Some(e);
        }
    }
    if let Some(w) = work {
        w.finish(outcome.ok).await;
    }
    outcome
}

fn outcome_of(status: ExitStatus, output: String, stderr: &str) -> TaskOutcome {
    let with_stderr = |what: String| {
        if stderr.is_empty() {
            what
        } else {
            format!("{what}: {stderr}")
        }
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => TaskOutcome {
            ok: true,
            exit_code: Some(0),
            output,
            error: None,
        },
        (Some(code), _) => TaskOutcome {
            ok: false,
            exit_code: Some(code),
            output,
            error: Some(with_stderr(format!("exit status {code}"))),
        },
        (None, Some(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {sig}"));
            TaskOutcome {
                ok: false,
                exit_code: None,
                output,
                error: Some(with_stderr(format!("killed by signal {name}"))),
            }
        }
        (None, None) => TaskOutcome {
            ok: false,
            exit_code: None,
            output,
            error: Some(with_stderr(format!("ended abnormally ({status})"))),
        },
    }
}

/// The captured standard output as text: capped at the limit (on a character boundary), one
/// trailing newline removed, and a marker appended when it was truncated.
fn output_text(out: Capped) -> String {
    let limit = out.limit;
    let mut truncated = out.total > u64::try_from(limit).unwrap_or(u64::MAX);
    let mut bytes = out.buf;
    if truncated {
        // Do not end on half a character.
        if let Err(e) = std::str::from_utf8(&bytes) {
            if e.error_len().is_none() {
                bytes.truncate(e.valid_up_to());
            }
        }
    }
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    // Replacement characters can make the text longer than the bytes it came from.
    truncated |= super::cut_at_char(&mut text, limit);
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if truncated {
        text.push_str(&format!("\n[output truncated at {limit} bytes]"));
    }
    text
}

/// The end of standard error as trimmed text.
fn stderr_text(mut err: Tail) -> String {
    err.shrink();
    let mut bytes = err.buf.as_slice();
    if err.cut {
        // Skip the rest of a character cut at the start.
        let skip = bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count();
        bytes = &bytes[skip..];
    }
    String::from_utf8_lossy(bytes).trim().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::path::Path;
    use std::time::Instant;

    fn req(id: &str, kind: &str, args: &str) -> TaskRequest {
        TaskRequest {
            id: id.to_owned(),
            kind: kind.to_owned(),
            args: args.to_owned(),
            attempt: 1,
            files: None,
        }
    }

    /// Runs a shell handler call, failing the test if it takes longer than `secs`.
    async fn run_within(secs: u64, shell: &Shell, r: TaskRequest) -> TaskOutcome {
        tokio::time::timeout(Duration::from_secs(secs), shell.call(r))
            .await
            .expect("the shell handler did not finish in time")
    }

    /// Whether process `pid` exists and is not a zombie.
    fn alive(pid: i32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next());
        !matches!(state, Some('Z' | 'X') | None)
    }

    /// Waits (at most 5 s) for `pid` to be gone.
    async fn assert_gone_soon(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "process {pid} is still alive after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn read_pid(path: &Path) -> Option<i32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn script(shell: &Shell, r: &TaskRequest) -> String {
        shell.render(r).unwrap().script
    }

    #[test]
    fn render_replaces_placeholders_once() {
        let shell = Shell::new("run {id} {type} {args} {other} {id");
        let r = req("a1", "a", "{id} it's");
        assert_eq!(
            script(&shell, &r),
            "run a1 a \"${P2P_TASK_ARGS}\" {other} {id"
        );
        assert_eq!(shell.command(), "run {id} {type} {args} {other} {id");
    }

    #[test]
    fn values_are_quoted_only_when_they_need_it() {
        let r = req("a1", "a", "x y");
        // Plain words go in as they are, in every context.
        assert_eq!(script(&Shell::new("echo \"x {id}\""), &r), "echo \"x a1\"");
        assert_eq!(script(&Shell::new("echo 'x {id}'"), &r), "echo 'x a1'");
        // Anything else is a reference to its variable, quoted for where it stands.
        assert_eq!(
            script(&Shell::new("e {args} \"{args}\" '{args}'"), &r),
            "e \"${P2P_TASK_ARGS}\" \"${P2P_TASK_ARGS}\" ''\"${P2P_TASK_ARGS}\"''"
        );
        // Inside $(...), backquotes and ${...} within double quotes, the shell reads
        // outside quotes again.
        assert_eq!(
            script(
                &Shell::new("e \"$(f {args})\" \"`f {args}`\" \"${x:-{args}}\" {args}"),
                &r
            ),
            "e \"$(f \"${P2P_TASK_ARGS}\")\" \"`f \"${P2P_TASK_ARGS}\"`\" \
             \"${x:-\"${P2P_TASK_ARGS}\"}\" \"${P2P_TASK_ARGS}\""
        );
        // An escaped quote opens nothing; a quote in a comment opens nothing.
        assert_eq!(
            script(&Shell::new("e \\' {args} # it's\ne {args}"), &r),
            "e \\' \"${P2P_TASK_ARGS}\" # it's\ne \"${P2P_TASK_ARGS}\""
        );
        // The empty value is a reference too (one empty word outside quotes).
        assert_eq!(
            script(&Shell::new("e {args}"), &req("a1", "a", "")),
            "e \"${P2P_TASK_ARGS}\""
        );
    }

    #[test]
    fn argv_splits_with_shell_rules() {
        let shell = Shell::new("./job.sh {argv}");
        let r = req("c3", "c", "--size 10 \"in put.csv\"");
        let rendered = shell.render(&r).unwrap();
        assert_eq!(rendered.script, "./job.sh --size 10 \"${P2P_TASK_ARGV_3}\"");
        assert_eq!(
            rendered.env,
            [
                ("P2P_TASK_ARGC".to_owned(), "3".to_owned()),
                ("P2P_TASK_ARGV_1".to_owned(), "--size".to_owned()),
                ("P2P_TASK_ARGV_2".to_owned(), "10".to_owned()),
                ("P2P_TASK_ARGV_3".to_owned(), "in put.csv".to_owned()),
            ]
        );
        // No arguments: no words.
        assert_eq!(script(&shell, &req("c3", "c", "  ")), "./job.sh ");
        // Not shell words: an error, not a guess.
        assert_eq!(shell.render(&req("c3", "c", "a \"b")), Err(ArgvError));
        assert_eq!(shell.render(&req("c3", "c", "a\\")), Err(ArgvError));
        // Without {argv} the arguments need not split.
        assert!(Shell::new("e {args}")
            .render(&req("c3", "c", "a \"b"))
            .is_ok());
    }

    /// Values that would run `touch VICTIM` if they were read as shell syntax anywhere.
    fn hostile(victim: &str) -> Vec<String> {
        vec![
            format!("$(touch {victim})"),
            format!("`touch {victim}`"),
            format!("x; touch {victim}"),
            format!("x\ntouch {victim}"),
            format!("\"; touch {victim}; \""),
            format!("'; touch {victim}; '"),
            format!("'\"$(touch {victim})\"'"),
            format!("\\\"; touch {victim} #"),
            format!("${{x:-$(touch {victim})}}"),
            format!("a}}; touch {victim}; {{"),
            format!("a) touch {victim} ("),
            "*".to_owned(),
            String::new(),
        ]
    }

    /// Every context a placeholder can stand in, and what `printf '[%s]'` must print there
    /// for value `v`.
    type Expect = fn(&str) -> String;

    fn contexts() -> Vec<(&'static str, Expect)> {
        vec![
            ("printf '[%s]' {P}", |v| format!("[{v}]")),
            ("printf '[%s]' \"x {P} y\"", |v| format!("[x {v} y]")),
            ("printf '[%s]' 'x {P} y'", |v| format!("[x {v} y]")),
            ("printf '[%s]' x{P}y", |v| format!("[x{v}y]")),
            ("printf '[%s]' \"$(printf '%s' {P})\"", |v| format!("[{v}]")),
            ("printf '[%s]' \"`printf '%s' {P}`\"", |v| format!("[{v}]")),
            ("printf '[%s]' \"${UNSET_VAR_X:-{P}}\"", |v| {
                format!("[{v}]")
            }),
            ("printf '[%s]' \"a\\\"{P}\"", |v| format!("[a\"{v}]")),
            ("printf '[%s]' \"$(printf '%s' \"{P}\")\"", |v| {
                format!("[{v}]")
            }),
            ("f() { printf '[%s]' {P}; }; f", |v| format!("[{v}]")),
        ]
    }

    #[tokio::test]
    async fn placeholders_never_inject_in_any_context() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("pwned");
        let v = victim.display().to_string();
        for (template, expect) in contexts() {
            for value in hostile(&v) {
                for p in ["{id}", "{type}", "{args}"] {
                    let command = template.replace("{P}", p);
                    let r = match p {
                        "{id}" => req(&value, "a", ""),
                        "{type}" => req("a1", &value, ""),
                        _ => req("a1", "a", &value),
                    };
                    let out = run_within(10, &Shell::new(command.as_str()), r).await;
                    assert!(!victim.exists(), "{command} with {value:?} ran a command");
                    assert!(out.ok, "{command} with {value:?}: {out:?}");
                    assert_eq!(out.output, expect(&value), "{command} with {value:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn argv_words_never_inject() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("pwned");
        let v = victim.display().to_string();
        let args = format!(
            "'$(touch {v})' \"`touch {v}`\" 'x; touch {v}' \"a'b\" 'c\"d' 'e\nf' \\$HOME \"\""
        );
        let words = shlex::split(&args).unwrap();
        assert_eq!(words.len(), 8);
        let expect: String = words.iter().map(|w| format!("[{w}]")).collect();
        for template in [
            "printf '[%s]' {argv}",
            "f() { printf '[%s]' {argv}; }; f",
            "printf '[%s]' \"$(printf '%s' {argv})\"",
        ] {
            let out = run_within(10, &Shell::new(template), req("a1", "a", &args)).await;
            assert!(!victim.exists(), "{template} ran a command");
            assert!(out.ok, "{template}: {out:?}");
            if !template.contains("$(") {
                assert_eq!(out.output, expect, "{template}");
            }
        }
        // Inside quotes the words are one string, joined by spaces, as "$*".
        let out = run_within(
            10,
            &Shell::new("printf '[%s]' \"{argv}\""),
            req("a1", "a", &args),
        )
        .await;
        assert_eq!(out.output, format!("[{}]", words.join(" ")));
        assert!(!victim.exists());
    }

    #[tokio::test]
    async fn argv_gives_the_program_separate_arguments() {
        let shell = Shell::new("printf '<%s>' {argv}; echo \" $P2P_TASK_ARGC\"");
        let out = run_within(10, &shell, req("c3", "c", "--size 10 \"in put.csv\"")).await;
        assert_eq!(out.output, "<--size><10><in put.csv> 3");
        let out = run_within(10, &Shell::new("./job.sh {argv}"), req("c3", "c", "'a")).await;
        assert!(!out.ok);
        assert!(out.error.unwrap().contains("not shell words"));
    }

    #[tokio::test]
    async fn a_plain_id_prints_without_quotes() {
        let out = run_within(10, &Shell::new("echo \"x {id}\""), req("a1", "a", "")).await;
        assert_eq!(out.output, "x a1");
    }

    #[tokio::test]
    async fn success_with_placeholders_and_env() {
        let shell = Shell::new("echo {id} {type} {args}");
        let out = run_within(10, &shell, req("a1", "a", "hello world")).await;
        assert_eq!(
            out,
            TaskOutcome {
                ok: true,
                exit_code: Some(0),
                output: "a1 a hello world".to_owned(),
                error: None,
            }
        );

        let shell = Shell::new(
            r#"printf '%s|%s|%s|%s\n' "$P2P_TASK_ID" "$P2P_TASK_TYPE" "$P2P_TASK_ARGS" "$P2P_TASK_ATTEMPT""#,
        );
        let mut r = req("Bx7", "bx", "$HOME; 'q' \"d\"");
        r.attempt = 3;
        let out = run_within(10, &shell, r).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.output, "Bx7|bx|$HOME; 'q' \"d\"|3");

        let out = run_within(10, &Shell::new("echo $P2P_TASK_ID"), req("c9", "c", "")).await;
        assert_eq!(out.output, "c9");
    }

    #[tokio::test]
    async fn arguments_cannot_inject_shell_syntax() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("pwned");
        let v = victim.display();
        let evil = format!("x; touch {v}; $(touch {v}) `touch {v}` it's \"{v}\" | touch {v}");
        let shell = Shell::new("printf '%s' {args}");
        let out = run_within(10, &shell, req("a1", "a", &evil)).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.output, evil);
        assert!(!victim.exists(), "the arguments ran a command");

        let shell = Shell::new("echo {args}");
        let args = format!("x; touch {v}");
        let out = run_within(10, &shell, req("a1", "a", &args)).await;
        assert_eq!(out.output, args);
        assert!(!victim.exists(), "the arguments ran a command");
    }

    #[tokio::test]
    async fn empty_value_is_one_empty_word() {
        let shell = Shell::new("printf '[%s]' {args} {id}");
        let out = run_within(10, &shell, req("a1", "a", "")).await;
        assert_eq!(out.output, "[][a1]");
    }

    #[tokio::test]
    async fn non_zero_exit_fails_with_code_and_stderr() {
        let shell = Shell::new("echo out; echo oops >&2; exit 3");
        let out = run_within(10, &shell, req("a1", "a", "")).await;
        assert!(!out.ok);
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.output, "out");
        assert_eq!(out.error.as_deref(), Some("exit status 3: oops"));

        let out = run_within(10, &Shell::new("exit 1"), req("a1", "a", "")).await;
        assert_eq!(out.error.as_deref(), Some("exit status 1"));
    }

    #[tokio::test]
    async fn stderr_keeps_only_its_tail() {
        let shell = Shell::new(
            "i=0; while [ $i -lt 2000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 1",
        );
        let out = run_within(20, &shell, req("a1", "a", "")).await;
        let error = out.error.unwrap();
        assert!(error.starts_with("exit status 1: "), "{error}");
        assert!(error.ends_with("line 1999"), "{error}");
        assert!(!error.contains("line 0\n"), "{error}");
        assert!(error.len() <= STDERR_TAIL + 20, "{}", error.len());
    }

    #[tokio::test]
    async fn killed_by_signal_names_it() {
        let out = run_within(10, &Shell::new("kill -9 $$"), req("a1", "a", "")).await;
        assert!(!out.ok);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.error.as_deref(), Some("killed by signal SIGKILL"));
    }

    #[tokio::test]
    async fn each_attempt_runs_in_a_fresh_directory_of_its_own_removed_afterwards() {
        let root = tempfile::tempdir().unwrap();
        let work = WorkDirs {
            root: Some(root.path().join("work")),
            keep_failed: false,
        };
        // Prints its directory twice (cwd and env), leaves a file, and sees nothing else.
        let shell =
            Shell::new("pwd; echo \"$P2P_TASK_DIR\"; ls -A; echo x > f").work_dirs(work.clone());
        let a = run_within(10, &shell, req("a1", "a", "")).await;
        let b = run_within(10, &shell, req("a1", "a", "")).await;
        for out in [&a, &b] {
            assert!(out.ok, "{out:?}");
            let lines: Vec<&str> = out.output.lines().collect();
            assert_eq!(lines.len(), 2, "cwd, env, and an empty listing: {lines:?}");
            assert_eq!(lines[0], lines[1]);
            let dir = Path::new(lines[0]);
            assert_eq!(dir.parent(), Some(root.path().join("work").as_path()));
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        assert_ne!(a.output, b.output);
        // A failure keeps its directory only with keep_failed.
        let fail = Shell::new("echo x > f; pwd; exit 3").work_dirs(work.clone());
        let out = run_within(10, &fail, req("a1", "a", "")).await;
        assert!(!Path::new(&out.output).exists());
        let keep = Shell::new("echo x > f; pwd; exit 3").work_dirs(WorkDirs {
            keep_failed: true,
            ..work.clone()
        });
        let out = run_within(10, &keep, req("a1", "a", "")).await;
        assert_eq!(out.exit_code, Some(3));
        assert!(Path::new(&out.output).join("f").is_file());
        // A cancelled attempt's directory goes too, once its shell is reaped.
        let slow = Shell::new("pwd > ../../seen; sleep 30").work_dirs(work);
        let fut = slow.call(req("a2", "a", ""));
        let seen = root.path().join("seen");
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    _ = &mut fut => break,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {
                        if std::fs::read_to_string(&seen).is_ok_and(|s| s.ends_with('\n')) {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        let dir = std::fs::read_to_string(&seen).unwrap();
        let dir = Path::new(dir.trim());
        let deadline = Instant::now() + Duration::from_secs(10);
        while dir.exists() {
            assert!(Instant::now() < deadline, "{} is left", dir.display());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    #[tokio::test]
    async fn inputs_are_placed_and_outputs_collected_through_no_symbolic_link() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src.txt");
        std::fs::write(&src, "hello\n").unwrap();
        let collect = root.path().join("collect");
        std::fs::create_dir(&collect).unwrap();
        let work = WorkDirs {
            root: Some(root.path().join("work")),
            keep_failed: false,
        };
        let with = |cmd: &str, outputs: &[&str], input: &str| {
            let shell = Shell::new(cmd).work_dirs(work.clone());
            let mut r = req("a1", "a", "");
            r.files = Some(Box::new(crate::handler::TaskFiles {
                inputs: vec![(input.to_owned(), src.clone())],
                outputs: outputs.iter().map(|o| o.to_string()).collect(),
                collect: Some(collect.clone()),
                ..Default::default()
            }));
            (shell, r)
        };
        let (shell, r) = with(
            "mkdir d; tr a-z A-Z < in.txt > d/out.txt",
            &["d/out.txt"],
            "in.txt",
        );
        let out = run_within(10, &shell, r).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(
            std::fs::read_to_string(collect.join("0")).unwrap(),
            "HELLO\n"
        );
        // The handler cannot change the source through its copy.
        let (shell, r) = with("echo x >> in.txt", &[], "in.txt");
        assert!(run_within(10, &shell, r).await.ok);
        assert_eq!(std::fs::read_to_string(&src).unwrap(), "hello\n");
        // A missing output, a symbolic link (to a file outside, or as a directory), a
        // directory: the attempt fails.
        let outside = root.path().join("secret");
        std::fs::write(&outside, "s").unwrap();
        for (cmd, name, why) in [
            ("true", "o", "was not written"),
            (
                &*format!("ln -s {} o", outside.display()),
                "o",
                "not a regular file",
            ),
            (
                &*format!("ln -s {} d; touch x", root.path().display()),
                "d/secret",
                "not a regular file",
            ),
            ("mkdir o", "o", "not a regular file"),
        ] {
            let (shell, r) = with(cmd, &[name], "in.txt");
            let out = run_within(10, &shell, r).await;
            assert!(!out.ok, "{cmd}: {out:?}");
            assert!(
                out.error.as_deref().unwrap().contains(why),
                "{cmd}: {out:?}"
            );
        }
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "s");
        // An input name that is not a plain file name.
        for bad in ["../x", "a/b", "..", ""] {
            let (shell, r) = with("true", &[], bad);
            let out = run_within(10, &shell, r).await;
            assert!(
                !out.ok
                    && out
                        .error
                        .as_deref()
                        .unwrap()
                        .contains("not a plain file name"),
                "{bad}: {out:?}"
            );
        }
        assert!(!root.path().join("x").exists());
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_made_fails_the_attempt() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("file"), "x").unwrap();
        let shell = Shell::new("echo ran").work_dirs(WorkDirs {
            root: Some(root.path().join("file")),
            keep_failed: false,
        });
        let out = run_within(10, &shell, req("a1", "a", "")).await;
        assert!(!out.ok);
        assert!(
            out.error
                .as_deref()
                .unwrap()
                .starts_with("cannot make a working directory"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn standard_input_is_empty() {
        let out = run_within(10, &Shell::new("cat; echo end"), req("a1", "a", "")).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.output, "end");
    }

    #[tokio::test]
    async fn spawn_failure_is_a_failed_outcome() {
        // A NUL byte cannot be passed to a process (argument or environment).
        let out = run_within(10, &Shell::new("echo {args}"), req("a1", "a", "x\0y")).await;
        assert!(!out.ok);
        assert_eq!(out.exit_code, None);
        let error = out.error.unwrap();
        assert!(error.starts_with("cannot start `sh -c`"), "{error}");
    }

    #[tokio::test]
    async fn output_is_capped_and_the_rest_drained() {
        let shell = Shell::new(r"head -c 3000000 /dev/zero | tr '\000' x").output_limit(1000);
        let out = run_within(30, &shell, req("a1", "a", "")).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(
            out.output,
            format!("{}\n[output truncated at 1000 bytes]", "x".repeat(1000))
        );
    }

    #[tokio::test]
    async fn output_at_the_limit_is_not_marked_and_trailing_newline_is_trimmed_once() {
        let shell = Shell::new("printf 'ab\\n\\n'").output_limit(4);
        let out = run_within(10, &shell, req("a1", "a", "")).await;
        assert_eq!(out.output, "ab\n");
        assert_eq!(Shell::new("x").output_limit, DEFAULT_OUTPUT_LIMIT);
    }

    #[tokio::test]
    async fn truncation_does_not_split_a_character() {
        // "é" is two bytes; a limit of 3 would cut the second one in half.
        let shell = Shell::new("printf 'éé'").output_limit(3);
        let out = run_within(10, &shell, req("a1", "a", "")).await;
        assert_eq!(out.output, "é\n[output truncated at 3 bytes]");
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let shell = Shell::new("sleep 30 & echo $! > {args}; wait");
        let mut fut = shell.call(req("a1", "a", &pidfile.display().to_string()));
        let pid = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    out = &mut fut => panic!("the command ended early: {out:?}"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                if let Some(pid) = read_pid(&pidfile) {
                    return pid;
                }
            }
        })
        .await
        .expect("the pid file did not appear within 10 s");
        assert!(alive(pid), "the grandchild {pid} should be running");
        drop(fut);
        assert_gone_soon(pid).await;
    }

    #[tokio::test]
    async fn leftover_background_process_is_killed_and_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The background `sleep` keeps stdout open after the shell exits.
        let shell = Shell::new("sleep 30 & echo $! > {args}; echo done");
        let out = run_within(10, &shell, req("a1", "a", &pidfile.display().to_string())).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.output, "done");
        let pid = read_pid(&pidfile).expect("pid file");
        assert_gone_soon(pid).await;
    }

    /// Waits (at most 10 s) for the pid file to hold a pid.
    async fn pid_from(path: &Path) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = read_pid(path) {
                return pid;
            }
            assert!(Instant::now() < deadline, "no pid in {}", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_setsid_escapee_holding_stdout_is_killed_with_its_task() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // `setsid` leaves the process group, so a group kill misses it; it keeps stdout
        // open. The shell waits until the escapee has left the group (it writes its pid
        // after `setsid`) and then exits.
        let shell = Shell::new(
            "setsid sh -c 'echo $$ > \"$1\"; exec sleep 30' sh {args} & \
             i=0; while [ ! -s {args} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; \
             echo done",
        );
        let started = Instant::now();
        let out = run_within(10, &shell, req("a1", "a", &pidfile.display().to_string())).await;
        let elapsed = started.elapsed();
        let pid = read_pid(&pidfile).expect("pid file");
        assert!(out.ok, "{out:?}");
        assert_eq!(out.output, "done");
        assert_gone_soon(pid).await;
        // SIGTERM ended it (and so closed the pipe) well before the drain limit.
        assert!(elapsed < DEFAULT_KILL_GRACE, "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_double_forked_daemon_is_killed_with_its_task() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The classic daemon: fork, setsid, fork again, the middle process exits; stdio
        // closed, so nothing holds the task's pipes.
        let shell = Shell::new(
            "( setsid sh -c 'sleep 30 >/dev/null 2>&1 </dev/null & echo $! > \"$1\"' sh {args} & ) ; \
             i=0; while [ ! -s {args} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; echo ok",
        );
        let out = run_within(10, &shell, req("a1", "a", &pidfile.display().to_string())).await;
        assert!(out.ok, "{out:?}");
        let pid = read_pid(&pidfile).expect("pid file");
        assert_gone_soon(pid).await;
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_gets_sigkill_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let termfile = dir.path().join("term");
        // The detached child notes the SIGTERM it gets, ignores it, and keeps running.
        let script = format!(
            "setsid sh -c 'trap \"echo TERM >> {t}\" TERM; echo $$ > {p}; while :; do sleep 0.05; done' \
             >/dev/null 2>&1 & i=0; while [ ! -s {p} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done",
            t = termfile.display(),
            p = pidfile.display()
        );
        let grace = Duration::from_millis(700);
        let shell = Shell::new(script).kill_grace(grace);
        let out = run_within(10, &shell, req("a1", "a", "")).await;
        assert!(out.ok, "{out:?}");
        let pid = read_pid(&pidfile).expect("pid file");
        let ended = Instant::now();
        assert_gone_soon(pid).await;
        let took = ended.elapsed();
        let term = std::fs::read_to_string(&termfile).unwrap_or_default();
        assert!(term.contains("TERM"), "no SIGTERM came first: {term:?}");
        // SIGKILL came after the grace, not before.
        assert!(took + SWEEP_SLACK >= grace, "{took:?}");
    }

    /// How much earlier than the grace a sweep may first see an orphan (the attempt ends a
    /// little before the handler's outcome is back).
    const SWEEP_SLACK: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn cancelling_sends_sigterm_then_sigkill_to_every_process() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let termfile = dir.path().join("term");
        // The shell itself ignores SIGTERM (it notes it) and so does its detached child.
        // (Its stderr goes to /dev/null: the pipe is closed once the future is dropped, and
        // the shell's "Terminated" note about its `sleep` would end it with SIGPIPE.)
        let script = format!(
            "exec 2>/dev/null; trap 'echo sh >> {t}' TERM; \
             setsid sh -c 'trap \"\" TERM; echo $$ > {p}; while :; do sleep 0.05; done' >/dev/null 2>&1 & \
             while :; do sleep 0.05; done",
            t = termfile.display(),
            p = pidfile.display()
        );
        let shell = Shell::new(script).kill_grace(Duration::from_millis(500));
        let mut fut = shell.call(req("a1", "a", ""));
        let pid = tokio::select! {
            out = &mut fut => panic!("the command ended early: {out:?}"),
            pid = pid_from(&pidfile) => pid,
        };
        let shell_pid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_ppid(&s));
        drop(fut);
        assert_gone_soon(pid).await;
        if let Some(sh) = shell_pid.filter(|&p| p > 1) {
            assert_gone_soon(sh).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&termfile)
            .unwrap_or_default()
            .contains("sh")
        {
            assert!(Instant::now() < deadline, "the shell never got SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn parse_ppid(stat: &str) -> Option<i32> {
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}
