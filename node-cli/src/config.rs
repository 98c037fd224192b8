//! The config file: TOML whose keys are the long flags of the commands.
//!
//! One file is read, the first of ([`locate`]): `--config PATH`, `$P2P_CONFIG` (either must
//! exist), `$XDG_CONFIG_HOME/p2p-node/config.toml` (`~/.config/...` without the variable),
//! `/etc/p2p-node/config.toml`. The binary logs which. `./p2p-node.toml` is not read unless
//! named (a file in the working directory could set handlers); when it exists and is not
//! the file read, a warning says so. Top-level keys apply to every command that has that
//! flag; a `[serve]`, `[run]`, `[peers]` or `[status]` table applies to that command only
//! and wins over the top level. Precedence: flags on the
//! command line, then their environment variables (`P2P_DATA_DIR`, ...), then the file, then
//! the defaults: a setting whose flag or variable is given is not taken from the file.
//! Values: a string or number is the flag's value, `true` sets a switch
//! (`false` leaves it off), a number gives a counted flag that many times (`verbose = 2` is
//! `-vv`), an array repeats the flag. A value of the wrong shape (`json = 1`,
//! `retries = true`) is an error. Keys may use `-` or `_`.
//!
//! ```toml
//! cluster = "render-farm"
//! peer = ["10.0.0.5:7400", "10.0.0.6:7400"]
//!
//! [run]
//! order = "none"
//! retries = 2
//! ```
//!
//! A key that is no flag of any command is an error, so a typo is not silently ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The file in the working directory that older versions read silently; now only named.
pub const OLD_DEFAULT_FILE: &str = "p2p-node.toml";

/// The system-wide config file.
pub const SYSTEM_FILE: &str = "/etc/p2p-node/config.toml";

/// A place a config file is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The path.
    pub path: PathBuf,
    /// Where the path came from (`--config`, `$P2P_CONFIG`, ...).
    pub source: &'static str,
    /// Whether it must exist (it was asked for by name).
    pub required: bool,
}

/// Where the config file is looked for, in order: `explicit` (`--config`) alone if given,
/// else `$P2P_CONFIG` alone if set, else `$XDG_CONFIG_HOME/p2p-node/config.toml` (or
/// `$HOME/.config/p2p-node/config.toml`) and then [`SYSTEM_FILE`]. `env` looks a variable
/// up.
pub fn locate(
    explicit: Option<&str>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Vec<Candidate> {
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = explicit {
        return vec![Candidate {
            path: PathBuf::from(p),
            source: "--config",
            required: true,
        }];
    }
    if let Some(p) = non_empty("P2P_CONFIG") {
        return vec![Candidate {
            path: PathBuf::from(p),
            source: "$P2P_CONFIG",
            required: true,
        }];
    }
    let mut out = Vec::new();
    if let Some(x) = non_empty("XDG_CONFIG_HOME") {
        out.push(Candidate {
            path: PathBuf::from(x).join("p2p-node/config.toml"),
            source: "$XDG_CONFIG_HOME",
            required: false,
        });
    } else if let Some(h) = non_empty("HOME") {
        out.push(Candidate {
            path: PathBuf::from(h).join(".config/p2p-node/config.toml"),
            source: "~/.config",
            required: false,
        });
    }
    out.push(Candidate {
        path: PathBuf::from(SYSTEM_FILE),
        source: "/etc",
        required: false,
    });
    out
}

/// The command line with the config file applied, and what to log about it once logging
/// is set up.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The command line.
    pub args: Vec<OsString>,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Warnings (e.g. a `./p2p-node.toml` that is no longer read).
    pub warnings: Vec<String>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The path.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The file can be changed by users other than its reader and root: a config file can
    /// set handlers (shell commands), so it is refused, as ssh refuses such key files.
    #[error("config file {path}: {why}; refusing it, as it can set the commands this node runs")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// Who else can change it.
        why: String,
    },
    /// A key is not a flag, or a value has the wrong shape.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

const COMMANDS: [&str; 9] = [
    "serve", "run", "peers", "status", "submit", "runs", "attach", "cancel", "results",
];

/// Top-level settings that do not reach `serve`: the peers of `run` and `peers` (a serving
/// node's own `--peer`, the nodes its hosted runs dial, is set in its `[serve]` table).
const NOT_FOR_SERVE: [&str; 2] = ["peer", "peers-file"];

/// Returns the command line with the config file's settings inserted after the subcommand,
/// for every setting not already given as a flag or by its environment variable, with the
/// file found as [`locate`] says in this process's environment.
pub fn apply(args: Vec<OsString>) -> Result<Applied, ConfigError> {
    let strings: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(sub_at) = strings.iter().position(|a| COMMANDS.contains(&a.as_str())) else {
        return Ok(Applied {
            args,
            ..Applied::default()
        });
    };
    let explicit = config_arg(&strings);
    let mut path = None;
    for c in locate(explicit.as_deref(), |k| std::env::var_os(k)) {
        if c.required || c.path.is_file() {
            path = Some(c.path);
            break;
        }
    }
    let mut warnings = Vec::new();
    let old = Path::new(OLD_DEFAULT_FILE);
    if old.is_file() && path.as_deref() != Some(old) {
        warnings.push(format!(
            "./{OLD_DEFAULT_FILE} is not read any more (a file in the working directory could \
             set handlers): pass --config {OLD_DEFAULT_FILE} to use it"
        ));
    }
    let Some(path) = path else {
        return Ok(Applied {
            args,
            file: None,
            warnings,
        });
    };
    let args = apply_file(args, &strings, sub_at, &path)?;
    Ok(Applied {
        args,
        file: Some(path),
        warnings,
    })
}

fn apply_file(
    args: Vec<OsString>,
    strings: &[String],
    sub_at: usize,
    path: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    let path = path.to_path_buf();
    let sub = strings[sub_at].as_str();
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(&path) {
        use std::os::unix::fs::MetadataExt;
        if let Some(why) = unsafe_owner(meta.mode(), meta.uid(), nix::unistd::geteuid().as_raw()) {
            return Err(ConfigError::Unsafe { path, why });
        }
    }
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };

    let mut cmd = crate::help::command();
    cmd.build();
    // A hidden flag is not a setting of that command.
    let flags_of = |name: &str| -> Vec<String> {
        cmd.find_subcommand(name)
            .map(|c| {
                c.get_arguments()
                    .filter(|a| !a.is_hide_set())
                    .filter_map(|a| a.get_long().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mine = flags_of(sub);
    let any: Vec<String> = COMMANDS.iter().flat_map(|c| flags_of(c)).collect();

    // Top level first, then this command's table overriding it.
    let mut settings: Vec<(String, toml::Value)> = Vec::new();
    for (key, value) in &table {
        if COMMANDS.contains(&key.as_str()) {
            continue;
        }
        let flag = key.replace('_', "-");
        if flag == "config" || !any.contains(&flag) {
            return Err(invalid(format!("unknown setting {key:?}")));
        }
        if mine.contains(&flag) && !(sub == "serve" && NOT_FOR_SERVE.contains(&flag.as_str())) {
            settings.push((flag, value.clone()));
        }
    }
    for name in COMMANDS {
        let Some(section) = table.get(name) else {
            continue;
        };
        let Some(section) = section.as_table() else {
            return Err(invalid(format!("[{name}] must be a table")));
        };
        let allowed = flags_of(name);
        for (key, value) in section {
            let flag = key.replace('_', "-");
            if !allowed.contains(&flag) {
                return Err(invalid(format!("unknown setting {key:?} in [{name}]")));
            }
            if name == sub {
                settings.retain(|(f, _)| *f != flag);
                settings.push((flag, value.clone()));
            }
        }
    }

    let mut extra: Vec<OsString> = Vec::new();
    for (flag, value) in settings {
        // The flag counts as given in any of its spellings, and so does a flag that
        // conflicts with it (`--json` on the command line beats `quiet = true` in the file).
        let given = spellings(&cmd, sub, &flag)
            .iter()
            .any(|s| on_command_line(strings, s));
        // Its environment variable (set, even empty, as clap sees it) beats the file too.
        if given || env_of(&cmd, sub, &flag).is_some_and(|v| std::env::var_os(v).is_some()) {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items,
            other => vec![other],
        };
        let shape = shape_of(&cmd, sub, &flag);
        for v in values {
            match (shape, v) {
                (Shape::Count, toml::Value::Integer(n)) => {
                    let n = u8::try_from(n).map_err(|_| {
                        invalid(format!("{flag}: expected a count from 0 to 255, got {n}"))
                    })?;
                    extra.extend((0..n).map(|_| OsString::from(format!("--{flag}"))));
                }
                (Shape::Switch | Shape::Count | Shape::OptionalValue, toml::Value::Boolean(b)) => {
                    if b {
                        extra.push(format!("--{flag}").into());
                    }
                }
                (Shape::Switch, other) => {
                    return Err(invalid(format!(
                        "{flag}: expected true or false, got {}",
                        describe(&other)
                    )))
                }
                (Shape::Count, other) => {
                    return Err(invalid(format!(
                        "{flag}: expected a count (e.g. 1) or true, got {}",
                        describe(&other)
                    )))
                }
                (Shape::Value, toml::Value::Boolean(_)) => {
                    return Err(invalid(format!(
                        "{flag}: expected a value (a string or a number), got a boolean"
                    )))
                }
                // `--flag=VALUE` in one argument: a value that starts with `-` stays a value.
                (_, toml::Value::String(s)) => extra.push(format!("--{flag}={s}").into()),
                (_, toml::Value::Integer(i)) => extra.push(format!("--{flag}={i}").into()),
                (_, toml::Value::Float(f)) => extra.push(format!("--{flag}={f}").into()),
                (_, other) => {
                    return Err(invalid(format!(
                        "{flag}: expected a string, number, boolean or array of them, got {}",
                        other.type_str()
                    )))
                }
            }
        }
    }
    let mut out = args;
    let tail = out.split_off(sub_at + 1);
    out.extend(extra);
    out.extend(tail);
    Ok(out)
}

/// What a flag takes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A switch (`--json`): `true` or `false`.
    Switch,
    /// A counted flag (`--verbose`, repeatable): a count, or `true` for one.
    Count,
    /// A value that may be left out (`--local [N]`): a value, or `true` for none.
    OptionalValue,
    /// A value (`--retries N`).
    Value,
}

fn shape_of(cmd: &clap::Command, sub: &str, flag: &str) -> Shape {
    let arg = cmd
        .find_subcommand(sub)
        .and_then(|sc| sc.get_arguments().find(|a| a.get_long() == Some(flag)));
    let Some(arg) = arg else {
        return Shape::Value;
    };
    match arg.get_action() {
        clap::ArgAction::SetTrue | clap::ArgAction::SetFalse => Shape::Switch,
        clap::ArgAction::Count => Shape::Count,
        _ if arg.get_num_args().is_some_and(|r| r.min_values() == 0) => Shape::OptionalValue,
        _ => Shape::Value,
    }
}

/// The environment variable of `flag` in `sub`, if it has one.
fn env_of(cmd: &clap::Command, sub: &str, flag: &str) -> Option<OsString> {
    cmd.find_subcommand(sub)?
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))?
        .get_env()
        .map(|e| e.to_os_string())
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the number {i}"),
        other => format!("a {}", other.type_str()),
    }
}

/// Every way the command line can say `flag` or a flag that conflicts with it:
/// `--long` and `-s` spellings.
fn spellings(cmd: &clap::Command, sub: &str, flag: &str) -> Vec<String> {
    let Some(sc) = cmd.find_subcommand(sub) else {
        return vec![format!("--{flag}")];
    };
    let Some(arg) = sc.get_arguments().find(|a| a.get_long() == Some(flag)) else {
        return vec![format!("--{flag}")];
    };
    let mut out = Vec::new();
    for a in std::iter::once(arg).chain(sc.get_arg_conflicts_with(arg)) {
        if let Some(l) = a.get_long() {
            out.push(format!("--{l}"));
        }
        if let Some(c) = a.get_short() {
            out.push(format!("-{c}"));
        }
    }
    out
}

/// Whether `spelling` (`--long` or `-s`) appears among `args`, also as `--long=VALUE` or
/// inside a group of short flags (`-qv`).
fn on_command_line(args: &[String], spelling: &str) -> bool {
    args.iter().any(|a| {
        if let Some(long) = spelling.strip_prefix("--") {
            a == spelling
                || a.strip_prefix("--")
                    .is_some_and(|x| x.starts_with(&format!("{long}=")))
        } else {
            let c = spelling.trim_start_matches('-');
            a.starts_with('-') && !a.starts_with("--") && a[1..].contains(c)
        }
    })
}

/// The value of `--config PATH` / `--config=PATH`, if given.
fn config_arg(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.to_string());
        }
    }
    None
}

/// Why a config file with this mode and owner could be changed by someone other than the
/// reader (`euid`) or root, if it could: writable by every user, or owned by another user
/// (who could rewrite it). Group-writable files are accepted (user private groups and
/// Kubernetes' `fsGroup` mounts make them common); a FIFO or `<(...)` has no such owner.
fn unsafe_owner(mode: u32, uid: u32, euid: u32) -> Option<String> {
    const S_IFMT: u32 = 0o170_000;
    const S_IFREG: u32 = 0o100_000;
    if mode & S_IFMT != S_IFREG {
        return None;
    }
    if mode & 0o002 != 0 {
        return Some(format!(
            "it is writable by every user (mode {:o}; fix with chmod o-w)",
            mode & 0o7777
        ));
    }
    if uid != 0 && uid != euid {
        return Some(format!(
            "it is owned by another user (uid {uid}, this process runs as uid {euid}; \
             fix with chown)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn config_files_others_can_change_are_refused() {
        let regular = 0o100_000;
        assert!(
            unsafe_owner(regular | 0o644, 0, 0).is_none(),
            "root's own file"
        );
        assert!(
            unsafe_owner(regular | 0o644, 0, 1000).is_none(),
            "root-owned, read by a user"
        );
        assert!(
            unsafe_owner(regular | 0o640, 1000, 1000).is_none(),
            "the reader's own file"
        );
        assert!(
            unsafe_owner(regular | 0o664, 1000, 1000).is_none(),
            "group-writable is accepted"
        );
        let world = unsafe_owner(regular | 0o666, 1000, 1000).unwrap();
        assert!(
            world.contains("every user") && world.contains("666"),
            "{world}"
        );
        let other = unsafe_owner(regular | 0o644, 1001, 1000).unwrap();
        assert!(other.contains("uid 1001"), "{other}");
        assert!(
            unsafe_owner(0o010_000 | 0o666, 1001, 0).is_none(),
            "a pipe has no file to rewrite"
        );
    }

    #[test]
    fn a_world_writable_config_file_is_refused_before_it_is_applied() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[serve]\nhandler = [\"a=true\"]\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let argv: Vec<OsString> = ["p2p-node", "serve", "--config"]
            .iter()
            .map(OsString::from)
            .chain([path.as_os_str().to_owned()])
            .collect();
        match apply(argv) {
            Err(ConfigError::Unsafe { why, .. }) => assert!(why.contains("every user"), "{why}"),
            other => panic!("expected Unsafe, got {other:?}"),
        }
    }

    fn with_file(toml: &str, args: &[&str]) -> Result<Vec<String>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let mut argv: Vec<OsString> = vec!["p2p-node".into()];
        argv.extend(args.iter().map(OsString::from));
        argv.push("--config".into());
        argv.push(path.as_os_str().to_owned());
        apply(argv).map(|v| {
            v.args
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .take_while(|a| a != "--config")
                .collect()
        })
    }

    #[test]
    fn settings_become_flags_and_command_line_flags_win() {
        let toml = "cluster = \"blue\"\npeer = [\"h:1\", \"h:2\"]\nlisten = \"x\"\n\n[run]\norder = \"none\"\nretries = 2\nkeep_going = true\njson = false\n";
        let args = with_file(toml, &["run", "--retries", "5", "t.txt"]).unwrap();
        assert_eq!(
            args,
            vec![
                "p2p-node",
                "run",
                "--cluster=blue",
                "--peer=h:1",
                "--peer=h:2",
                "--keep-going",
                "--order=none",
                "--retries",
                "5",
                "t.txt"
            ]
        );
    }

    #[test]
    fn status_reads_the_file_like_the_other_commands() {
        let toml = "cluster = \"blue\"\n[status]\njson = true\n";
        let args = with_file(toml, &["status"]).unwrap();
        assert!(args.contains(&"--cluster=blue".to_string()), "{args:?}");
        assert!(args.contains(&"--json".to_string()), "{args:?}");
    }

    #[test]
    fn a_conflicting_or_short_flag_on_the_command_line_wins() {
        let args = with_file("[run]\nquiet = true\n", &["run", "--json"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--json"]);
        let args = with_file("[run]\njson = true\nretries = 1\n", &["run", "-q"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--retries=1", "-q"]);
    }

    #[test]
    fn a_count_gives_a_counted_flag_that_many_times() {
        let args = with_file("verbose = 1\n", &["run", "t.txt"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--verbose", "t.txt"]);
        let args = with_file("verbose = 2\n", &["serve"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "serve", "--verbose", "--verbose"]);
        let args = with_file("verbose = true\n[run]\nlocal = true\n", &["run"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--verbose", "--local"]);
        let args = with_file("verbose = 0\n[run]\nlocal = 3\n", &["run"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--local=3"]);
        // And the result parses: the count is not taken for the task file.
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(
            with_file("verbose = 2\n", &["run", "t.txt"]).unwrap(),
        )
        .unwrap();
        assert_eq!(cli.verbose, 2);
        match cli.command {
            crate::cli::Command::Run(r) => assert_eq!(r.tasks_file, Path::new("t.txt")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_value_of_the_wrong_shape_is_an_error_naming_the_key() {
        for (toml, expected) in [
            (
                "verbose = -1\n",
                "verbose: expected a count from 0 to 255, got -1",
            ),
            ("verbose = 300\n", "verbose: expected a count from 0 to 255"),
            ("verbose = \"2\"\n", "verbose: expected a count"),
            (
                "[run]\njson = 1\n",
                "json: expected true or false, got the number 1",
            ),
            ("[run]\nquiet = \"yes\"\n", "quiet: expected true or false"),
            ("[run]\nretries = true\n", "retries: expected a value"),
        ] {
            let err = with_file(toml, &["run"]).unwrap_err().to_string();
            assert!(err.contains(expected), "{toml:?}: {err}");
        }
        // A value that looks like a flag stays the flag's value.
        let args = with_file("cluster = \"--json\"\n", &["run"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--cluster=--json"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let err = with_file("retry = 2\n", &["run"]).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting \"retry\""),
            "{err}"
        );
        let err = with_file("[serve]\norder = \"none\"\n", &["run"]).unwrap_err();
        assert!(err.to_string().contains("in [serve]"), "{err}");
        let err = with_file("[run]\norder = { a = 1 }\n", &["run"]).unwrap_err();
        assert!(err.to_string().contains("expected a string"), "{err}");
        let err = with_file("[run\n", &["run"]).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn files_are_looked_for_at_config_then_p2p_config_then_xdg_or_home_then_etc() {
        let env = |vars: &[(&'static str, &'static str)]| {
            let vars = vars.to_vec();
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let paths = |c: Vec<Candidate>| -> Vec<(String, bool)> {
            c.into_iter()
                .map(|c| (c.path.display().to_string(), c.required))
                .collect()
        };
        let all = [
            ("P2P_CONFIG", "/p.toml"),
            ("XDG_CONFIG_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            paths(locate(Some("c.toml"), env(&all))),
            [("c.toml".to_string(), true)]
        );
        assert_eq!(
            paths(locate(None, env(&all))),
            [("/p.toml".to_string(), true)]
        );
        assert_eq!(
            paths(locate(None, env(&all[1..]))),
            [
                ("/x/p2p-node/config.toml".to_string(), false),
                (SYSTEM_FILE.to_string(), false)
            ]
        );
        assert_eq!(
            paths(locate(
                None,
                env(&[("XDG_CONFIG_HOME", ""), ("HOME", "/h")])
            )),
            [
                ("/h/.config/p2p-node/config.toml".to_string(), false),
                (SYSTEM_FILE.to_string(), false)
            ]
        );
        assert_eq!(
            paths(locate(None, env(&[]))),
            [(SYSTEM_FILE.to_string(), false)]
        );
    }

    #[test]
    fn a_top_level_peer_does_not_reach_serve_but_its_own_table_may_set_it() {
        let args = with_file(
            "peer = [\"127.0.0.1:1\"]\npeers_file = \"p\"\ncluster = \"c\"\n",
            &["serve"],
        )
        .unwrap();
        assert_eq!(args, vec!["p2p-node", "serve", "--cluster=c"]);
        // A serving node's --peer: the nodes its hosted runs dial.
        let args = with_file("[serve]\npeer = \"127.0.0.1:1\"\n", &["serve"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "serve", "--peer=127.0.0.1:1"]);
        let args = with_file("peer = [\"127.0.0.1:1\"]\n", &["run"]).unwrap();
        assert_eq!(args, vec!["p2p-node", "run", "--peer=127.0.0.1:1"]);
    }
}
