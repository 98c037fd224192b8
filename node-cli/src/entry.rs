//! The `p2p-node` binary's `main`: read the config file, parse flags, set up logging, and
//! run the command. Behind the `cli` feature; `src/main.rs` only calls [`main`].

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::cli::{self, LogFormat};
use crate::logging;

/// The whole program: what `src/main.rs` runs.
pub fn main() -> ExitCode {
    // The guard process (crate::guard) is this binary too; it reads no config file.
    let mut argv = std::env::args_os().skip(1);
    if argv.next().as_deref() == Some(std::ffi::OsStr::new(crate::guard::SUBCOMMAND)) {
        let rest: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
        return ExitCode::from(crate::guard::main(&rest));
    }
    let applied = match crate::config::apply(std::env::args_os().collect()) {
        Ok(applied) => applied,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let cli = crate::help::parse_from(applied.args);
    let serve = matches!(cli.command, cli::Command::Serve(_));
    // The progress bar on screen, for the log writer and the run's printer.
    let active = crate::output::ActiveBar::default();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(logging::default_filter(serve, cli.verbose)));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer({
            let active = active.clone();
            move || crate::output::LogWriter(active.clone())
        })
        // Never eprintln! from inside the logger: with stderr gone that panics the task.
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .fmt_fields(crate::output::log_fields())
            .with_ansi(logging::colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .init(),
    }
    if let Some(path) = &applied.file {
        tracing::info!(path = %path.display(), "config file loaded");
    }
    for w in &applied.warnings {
        tracing::warn!("{w}");
    }
    // One thread by default: a task's round trip then never waits for a wakeup on
    // another thread (docs/PERFORMANCE.md measures both).
    let built = match cli.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(usize::from(n));
            }
            b.enable_all().build()
        }
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    // The command runs as a spawned task rather than as `block_on`'s own future: on the
    // single-threaded runtime, waking the `block_on` future costs an extra poll of the IO
    // driver (an `epoll_wait` system call) each time, i.e. once per task round trip.
    runtime.block_on(async {
        match tokio::spawn(cli::execute(cli, active)).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(cli::EXIT_FAILED)
            }
        }
    })
}
