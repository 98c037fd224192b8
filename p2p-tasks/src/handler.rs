//! The worker side's handler abstraction: what a node does with a task it is given.
//!
//! - [`Handler`]: the trait; one call per task attempt, returning a future of the outcome.
//! - [`Builtin`]: the built-in handler, used for a type served with no `--handler`; its output
//!   is `Executing task: {id}`.
//! - [`Shell`]: runs a shell command (`--handler TYPE=COMMAND`).
//! - [`handler_fn`]: a handler written as an async closure, for programs that embed a node.
//! - [`procs`]: which processes belong to which shell attempt, and ending them with it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use compact_str::CompactString;

pub mod procs;
mod shell;
mod workdir;
pub(crate) use workdir::read_only_link;

pub use shell::{
    ArgvError, Rendered, Shell, DEFAULT_KILL_GRACE, DEFAULT_OUTPUT_LIMIT, STDERR_TAIL,
};
pub use workdir::WorkDirs;

/// A boxed, sendable future, as returned by [`Handler::call`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a handler is asked to do.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TaskRequest {
    /// The task's id, e.g. `a1`.
    pub id: String,
    /// The task's type, e.g. `a`.
    pub kind: String,
    /// The task's arguments (may be empty). They come from the network: never trust them.
    pub args: String,
    /// Which attempt this is, starting at 1.
    pub attempt: u32,
    /// Files shipped with the task and outputs to collect (shell handlers only; others
    /// ignore them). `None` (the usual case, no allocation): none.
    pub files: Option<Box<TaskFiles>>,
}

/// A task to answer at once, borrowed from its assignment (see
/// [`Handler::call_instant`]): what an instant handler needs, with nothing copied.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct InstantRequest<'a> {
    /// The task's id.
    pub id: &'a str,
    /// The task's type.
    pub kind: &'a str,
    /// The task's arguments (may be empty). They come from the network: never trust them.
    pub args: &'a str,
    /// Which attempt this is, starting at 1.
    pub attempt: u32,
}

impl InstantRequest<'_> {
    /// The same request, owned (no files).
    pub fn to_request(&self) -> TaskRequest {
        TaskRequest {
            id: self.id.to_owned(),
            kind: self.kind.to_owned(),
            args: self.args.to_owned(),
            attempt: self.attempt,
            files: None,
        }
    }
}

/// The files of one attempt (see [`TaskRequest::files`]).
#[derive(Debug, Clone, Default)]
pub struct TaskFiles {
    /// Copied into the working directory before the command starts: (file name, source).
    /// A name that is not one plain path component fails the attempt.
    pub inputs: Vec<(String, std::path::PathBuf)>,
    /// Declared outputs (plain relative paths). After a successful run each must be a
    /// regular file, reached through no symbolic link; it is moved to `collect/INDEX`
    /// (its position here), else the attempt fails.
    pub outputs: Vec<String>,
    /// Where the outputs are moved (required when `outputs` is not empty).
    pub collect: Option<std::path::PathBuf>,
    /// Where the whole standard output and standard error are written as they come, as
    /// `streams/stdout` and `streams/stderr` (shell handlers), each cut at `stream_limit`
    /// bytes and then ending with a marker line; a failure to write them fails the attempt.
    /// `None`: they are not kept (only the capped output and the end of stderr).
    pub streams: Option<std::path::PathBuf>,
    /// The most bytes of each stream kept under `streams` (`serve --max-result-size`).
    pub stream_limit: u64,
    /// Place each input as a hard link to its source, made read-only, where the file
    /// system allows (else a copy, as without it): `serve --link-inputs`. The task must not
    /// write its inputs; the node checks after the attempt that it did not.
    pub link_inputs: bool,
}

/// What came of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOutcome {
    /// Whether the task succeeded.
    pub ok: bool,
    /// The process's exit code, when the task ran a process that exited normally.
    pub exit_code: Option<i32>,
    /// The task's output (for a process: its standard output, capped in size).
    pub output: String,
    /// A short description of the failure, when there was one.
    pub error: Option<String>,
}

impl TaskOutcome {
    /// A successful outcome with this output, no exit code and no error.
    pub fn success(output: impl Into<String>) -> Self {
        TaskOutcome {
            ok: true,
            exit_code: None,
            output: output.into(),
            error: None,
        }
    }

    /// A failed outcome with this error, no exit code and no output.
    pub fn failure(error: impl Into<String>) -> Self {
        TaskOutcome {
            ok: false,
            exit_code: None,
            output: String::new(),
            error: Some(error.into()),
        }
    }

    /// This outcome with its output cut to at most `output_limit` bytes and its error to
    /// at most [`ERROR_LIMIT`] bytes (on character boundaries), each followed by
    /// `\n[output truncated at N bytes]` (`error` for the error) when it was cut. The worker
    /// applies it to every handler's outcome, so a result always fits in one frame.
    pub fn capped(mut self, output_limit: usize) -> Self {
        if cut_at_char(&mut self.output, output_limit) {
            self.output
                .push_str(&format!("\n[output truncated at {output_limit} bytes]"));
        }
        if let Some(e) = &mut self.error {
            if cut_at_char(e, ERROR_LIMIT) {
                e.push_str(&format!("\n[error truncated at {ERROR_LIMIT} bytes]"));
            }
        }
        self
    }
}

/// What came of a task answered at once ([`Handler::call_instant_compact`]): a
/// [`TaskOutcome`] whose output is a [`CompactString`], which holds an output of up to 24
/// bytes (the built-in handler's, for an id of up to 8) without allocating, and moves into
/// the result as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstantOutcome {
    /// Whether the task succeeded.
    pub ok: bool,
    /// The process's exit code, when the task ran a process that exited normally.
    pub exit_code: Option<i32>,
    /// The task's output.
    pub output: CompactString,
    /// A short description of the failure, when there was one.
    pub error: Option<String>,
}

impl From<TaskOutcome> for InstantOutcome {
    fn from(o: TaskOutcome) -> Self {
        InstantOutcome {
            ok: o.ok,
            exit_code: o.exit_code,
            output: o.output.into(),
            error: o.error,
        }
    }
}

impl InstantOutcome {
    /// This outcome cut as [`TaskOutcome::capped`] cuts one: the same texts and markers.
    pub fn capped(mut self, output_limit: usize) -> Self {
        self.cap(output_limit);
        self
    }

    /// [`InstantOutcome::capped`] in place.
    #[inline]
    pub fn cap(&mut self, output_limit: usize) {
        if self.output.len() > output_limit || self.error.is_some() {
            self.cap_slow(output_limit);
        }
    }

    fn cap_slow(&mut self, output_limit: usize) {
        if self.output.len() > output_limit {
            let mut end = output_limit;
            while !self.output.is_char_boundary(end) {
                end -= 1;
            }
            self.output.truncate(end);
            self.output
                .push_str(&format!("\n[output truncated at {output_limit} bytes]"));
        }
        if let Some(e) = &mut self.error {
            if cut_at_char(e, ERROR_LIMIT) {
                e.push_str(&format!("\n[error truncated at {ERROR_LIMIT} bytes]"));
            }
        }
    }
}

/// Most bytes of a task's error text sent back (see [`TaskOutcome::capped`]).
pub const ERROR_LIMIT: usize = 8 * 1024;

/// Cuts `text` to at most `limit` bytes, on a character boundary; whether it was cut.
pub(crate) fn cut_at_char(text: &mut String, limit: usize) -> bool {
    if text.len() <= limit {
        return false;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

/// Executes tasks on a worker node.
pub trait Handler: Send + Sync + 'static {
    /// Runs one task. Dropping the returned future must stop the work (kill processes).
    fn call(&self, req: TaskRequest) -> BoxFuture<TaskOutcome>;

    /// Runs one task at once, on the caller's thread, when the handler can do it without
    /// waiting for anything (no process, no IO, a few microseconds of work), as the built-in
    /// handler can; `None` (the default) means "use [`Handler::call`]". The worker then
    /// skips spawning a task for it.
    fn call_now(&self, req: &TaskRequest) -> Option<TaskOutcome> {
        let _ = req;
        None
    }

    /// Whether [`Handler::call_now`] always answers (the built-in handler): a node whose
    /// handlers all do can take a deep window of tasks in flight, since none of them waits.
    /// A serving node answers such a handler's tasks inside the connection's driver, with
    /// [`Handler::call_instant`]. Default false.
    fn is_instant(&self) -> bool {
        false
    }

    /// [`Handler::call_now`] on a task borrowed from its assignment, for a handler that
    /// [`Handler::is_instant`]: the default makes the owned [`TaskRequest`] and calls
    /// `call_now`; a handler that needs less (the built-in one reads only the id) overrides
    /// it to copy nothing.
    fn call_instant(&self, req: &InstantRequest<'_>) -> Option<TaskOutcome> {
        self.call_now(&req.to_request())
    }

    /// [`Handler::call_instant`] with the output as a [`CompactString`]: what a serving node
    /// calls for an instant handler's task (the result carries its output so). The default
    /// converts `call_instant`'s outcome; the built-in handler overrides it to make its
    /// short output without allocating.
    fn call_instant_compact(&self, req: &InstantRequest<'_>) -> Option<InstantOutcome> {
        self.call_instant(req).map(InstantOutcome::from)
    }
}

impl<H: Handler + ?Sized> Handler for Arc<H> {
    fn call(&self, req: TaskRequest) -> BoxFuture<TaskOutcome> {
        (**self).call(req)
    }

    fn call_now(&self, req: &TaskRequest) -> Option<TaskOutcome> {
        (**self).call_now(req)
    }

    fn is_instant(&self) -> bool {
        (**self).is_instant()
    }

    fn call_instant(&self, req: &InstantRequest<'_>) -> Option<TaskOutcome> {
        (**self).call_instant(req)
    }

    fn call_instant_compact(&self, req: &InstantRequest<'_>) -> Option<InstantOutcome> {
        (**self).call_instant_compact(req)
    }
}

impl<H: Handler + ?Sized> Handler for Box<H> {
    fn call(&self, req: TaskRequest) -> BoxFuture<TaskOutcome> {
        (**self).call(req)
    }

    fn call_now(&self, req: &TaskRequest) -> Option<TaskOutcome> {
        (**self).call_now(req)
    }

    fn is_instant(&self) -> bool {
        (**self).is_instant()
    }

    fn call_instant(&self, req: &InstantRequest<'_>) -> Option<TaskOutcome> {
        (**self).call_instant(req)
    }

    fn call_instant_compact(&self, req: &InstantRequest<'_>) -> Option<InstantOutcome> {
        (**self).call_instant_compact(req)
    }
}

/// The built-in handler: its output is exactly `Executing task: {id}`, it succeeds with exit
/// code 0, and it spawns nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

/// The start of the built-in handler's output.
const BUILTIN_PREFIX: &str = "Executing task: ";

impl Builtin {
    fn outcome(id: &str) -> TaskOutcome {
        const PREFIX: &str = BUILTIN_PREFIX;
        let mut output = String::with_capacity(PREFIX.len() + id.len());
        output.push_str(PREFIX);
        output.push_str(id);
        TaskOutcome {
            ok: true,
            exit_code: Some(0),
            output,
            error: None,
        }
    }
}

impl Handler for Builtin {
    fn call(&self, req: TaskRequest) -> BoxFuture<TaskOutcome> {
        Box::pin(std::future::ready(Builtin::outcome(&req.id)))
    }

    fn call_now(&self, req: &TaskRequest) -> Option<TaskOutcome> {
        Some(Builtin::outcome(&req.id))
    }

    fn is_instant(&self) -> bool {
        true
    }

    fn call_instant(&self, req: &InstantRequest<'_>) -> Option<TaskOutcome> {
        Some(Builtin::outcome(req.id))
    }

    fn call_instant_compact(&self, req: &InstantRequest<'_>) -> Option<InstantOutcome> {
        Some(InstantOutcome {
            ok: true,
            exit_code: Some(0),
            output: builtin_output(req.id),
            error: None,
        })
    }
}

/// `Executing task: {id}` as a [`CompactString`]: put together on the stack and copied in
/// once when it fits inline (an id of up to 8 bytes), else allocated once.
fn builtin_output(id: &str) -> CompactString {
    const INLINE: usize = std::mem::size_of::<String>();
    let n = BUILTIN_PREFIX.len() + id.len();
    if n <= INLINE {
        let mut buf = [0u8; INLINE];
        buf[..BUILTIN_PREFIX.len()].copy_from_slice(BUILTIN_PREFIX.as_bytes());
        buf[BUILTIN_PREFIX.len()..n].copy_from_slice(id.as_bytes());
        // Two whole strings put end to end are one: this never fails.
        if let Ok(text) = std::str::from_utf8(&buf[..n]) {
            return CompactString::new(text);
        }
    }
    let mut output = CompactString::with_capacity(n);
    output.push_str(BUILTIN_PREFIX);
    output.push_str(id);
    output
}

/// A handler made from an async closure; see [`handler_fn`].
#[derive(Clone)]
pub struct FnHandler<F> {
    f: F,
}

impl<F> std::fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnHandler")
    }
}

/// Makes a handler from an async closure, e.g.
///
/// ```
/// use p2p_tasks::handler::{handler_fn, Handler, TaskOutcome};
///
/// let h = handler_fn(|req| async move { TaskOutcome::success(format!("did {}", req.id)) });
/// # let _: &dyn Handler = &h;
/// ```
///
/// Dropping the future returned by [`Handler::call`] drops the closure's future.
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskOutcome> + Send + 'static,
{
    FnHandler { f }
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskOutcome> + Send + 'static,
{
    fn call(&self, req: TaskRequest) -> BoxFuture<TaskOutcome> {
        Box::pin((self.f)(req))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn req(id: &str) -> TaskRequest {
        TaskRequest {
            id: id.to_owned(),
            kind: "a".to_owned(),
            args: String::new(),
            attempt: 1,
            files: None,
        }
    }

    #[test]
    fn capped_cuts_output_and_error_on_character_boundaries_with_a_marker() {
        // "é" is two bytes: a cut at 5 bytes of "aaaéé" must not split one.
        let mut out = TaskOutcome::success("aaaéé");
        out.error = Some("e".repeat(ERROR_LIMIT + 10));
        let c = out.clone().capped(6);
        assert_eq!(c.output, "aaaé\n[output truncated at 6 bytes]");
        let c = out.clone().capped(4);
        assert_eq!(c.output, "aaa\n[output truncated at 4 bytes]");
        let e = c.error.unwrap();
        assert!(e.starts_with(&"e".repeat(ERROR_LIMIT)), "{}", e.len());
        assert!(e.ends_with(&format!("\n[error truncated at {ERROR_LIMIT} bytes]")));
        // Within the limits nothing changes.
        let small = TaskOutcome::failure("short");
        assert_eq!(small.clone().capped(0), small);
        assert_eq!(out.clone().capped(100).output, "aaaéé");
    }

    #[tokio::test]
    async fn builtin_prints_executing_task() {
        let out = Builtin.call(req("a1")).await;
        assert_eq!(
            out,
            TaskOutcome {
                ok: true,
                exit_code: Some(0),
                output: "Executing task: a1".to_owned(),
                error: None,
            }
        );
    }

    #[test]
    fn builtin_runs_at_once_and_others_do_not() {
        let out = Builtin.call_now(&req("a9")).unwrap();
        assert_eq!(out.output, "Executing task: a9");
        assert_eq!(out.exit_code, Some(0));
        let h: Arc<dyn Handler> = Arc::new(Builtin);
        assert!(h.call_now(&req("a9")).is_some(), "Arc delegates");
        assert!(h.is_instant() && Builtin.is_instant());
        let f = handler_fn(|r: TaskRequest| async move { TaskOutcome::success(r.id) });
        assert!(f.call_now(&req("a9")).is_none());
        assert!(!f.is_instant());
    }

    #[tokio::test]
    async fn fn_handler_runs_the_closure() {
        let h = handler_fn(|r: TaskRequest| async move {
            if r.args == "fail" {
                TaskOutcome::failure(format!("{} failed on attempt {}", r.id, r.attempt))
            } else {
                TaskOutcome::success(format!("{}:{}:{}", r.id, r.kind, r.args))
            }
        });
        let mut r = req("a7");
        r.args = "x y".to_owned();
        assert_eq!(h.call(r.clone()).await, TaskOutcome::success("a7:a:x y"));
        r.args = "fail".to_owned();
        r.attempt = 2;
        let out = h.call(r).await;
        assert!(!out.ok);
        assert_eq!(out.error.as_deref(), Some("a7 failed on attempt 2"));
    }

    #[tokio::test]
    async fn arc_and_boxed_dyn_handlers_delegate() {
        let h: Arc<dyn Handler> = Arc::new(Builtin);
        assert_eq!(h.call(req("b2")).await.output, "Executing task: b2");
        let b: Box<dyn Handler> = Box::new(handler_fn(|r: TaskRequest| async move {
            TaskOutcome::success(r.id)
        }));
        assert_eq!(b.call(req("c3")).await.output, "c3");
    }

    #[test]
    fn outcome_constructors() {
        let s = TaskOutcome::success("out");
        assert!(s.ok && s.error.is_none() && s.exit_code.is_none());
        assert_eq!(s.output, "out");
        let f = TaskOutcome::failure("bad");
        assert!(!f.ok && f.output.is_empty() && f.exit_code.is_none());
        assert_eq!(f.error.as_deref(), Some("bad"));
    }
}
