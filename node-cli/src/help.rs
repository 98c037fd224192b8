//! What the command line says about itself: `--version`, the option headings of `--help`,
//! the man page (`p2p-node man`), and the value lists that help and shell completions show.
//!
//! [`command`] is the command line as parsed: the one derived from [`Cli`] plus what is
//! only known at run time (the long version) or applied across commands (headings, serve
//! without `--peer`). Everything that parses or describes the command line uses it.

use std::ffi::OsString;
use std::io::Write;
use std::sync::LazyLock;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{ArgMatches, FromArgMatches};
use p2p_discovery::Kind;
use p2p_tasks::Order;

use crate::cli::Cli;

/// The git commit the binary was built from (`build.rs`), when built from a checkout.
pub const GIT_COMMIT: Option<&str> = option_env!("P2P_NODE_GIT_COMMIT");

/// `--version`: the version, the protocol version, the journal format version and, when
/// built from a git checkout, the commit.
pub fn long_version() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "{}\nprotocol {}\njournal format {}\ncommit {}",
            env!("CARGO_PKG_VERSION"),
            p2p_core::PROTOCOL_VERSION,
            p2p_tasks::journal::VERSION,
            GIT_COMMIT.unwrap_or("unknown (not built from a git checkout)")
        )
    });
    TEXT.as_str()
}

/// Option headings of `--help` and the man page, by argument id. Options not listed stay
/// under "Options".
const HEADINGS: &[(&str, &str)] = &[
    ("cluster", "Discovery"),
    ("discovery", "Discovery"),
    ("peers", "Discovery"),
    ("discovery_interface", "Discovery"),
    ("discovery_timeout", "Discovery"),
    ("key_files", "Security"),
    ("identity", "Security"),
    ("data_dir", "Security"),
    ("insecure", "Security"),
    ("max_frame", "Limits"),
    ("max_connections", "Limits"),
    ("max_handshakes", "Limits"),
    ("max_output", "Limits"),
    ("max_tasks", "Limits"),
    ("max_file", "Limits"),
    ("cache_size", "Limits"),
    ("max_result_size", "Limits"),
    ("handshake_timeout", "Limits"),
    ("task_timeout", "Limits"),
    ("max_runs", "Limits"),
    ("max_plan", "Limits"),
    ("keep_runs", "Limits"),
    ("json", "Output"),
    ("quiet", "Output"),
    ("verbose", "Output"),
    ("log_format", "Output"),
    ("report", "Output"),
    ("report_edges", "Output"),
];

/// The heading of the argument with this id, if it has one.
pub fn heading_of(id: &str) -> Option<&'static str> {
    HEADINGS.iter().find(|(a, _)| *a == id).map(|(_, h)| *h)
}

fn with_headings(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| match heading_of(a.get_id().as_str()) {
        Some(h) => a.help_heading(h),
        None => a,
    })
}

/// The command line as parsed (see the module documentation).
pub fn command() -> clap::Command {
    let mut cmd =
        with_headings(<Cli as clap::CommandFactory>::command()).long_version(long_version());
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, with_headings);
    }
    // `serve` dials nobody for itself: its --peer and --peers-file name the nodes the runs
    // it hosts dial (cli.rs), and P2P_PEER / P2P_PEERS_FILE (meant for run and peers) do
    // not reach it.
    cmd.mut_subcommand("serve", |s| {
        s.mut_arg("peers", |a| {
            a.env(None).help(
                "A node that the runs this node hosts (submit) dial, besides their \
                 discovery, HOST:PORT (repeatable; this node itself dials nobody)",
            )
        })
        .mut_arg("peers_file", |a| {
            a.env(None)
                .help("A file of such nodes (see --peer), one or more a line, # comments")
        })
    })
}

/// Parses `args` with [`command`]; exits (status 2, or 0 for `--help`/`--version`) as clap
/// does when they do not parse.
pub fn parse_from(args: Vec<OsString>) -> Cli {
    let matches: ArgMatches = command().get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Writes the man page: `p2p-node(1)` and then one page for each subcommand
/// (`p2p-node-serve(1)`, ...), each with every option of that command.
pub fn write_man(out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    let mut subs: Vec<&clap::Command> = cmd.get_subcommands().collect();
    subs.sort_by_key(|s| s.get_display_order());
    for sub in subs {
        clap_mangen::Man::new(sub.clone())
            .title(format!("p2p-node-{}", sub.get_name()))
            .source(format!("p2p-node {}", env!("CARGO_PKG_VERSION")))
            .render(out)?;
    }
    Ok(())
}

/// The value parser of `--order`: strict, type or none (listed for help and completions).
pub fn order_parser() -> impl TypedValueParser<Value = Order> {
    clap::builder::PossibleValuesParser::new([
        PossibleValue::new("strict").help("one task after another"),
        PossibleValue::new("type").help("in order within each type"),
        PossibleValue::new("none").help("no order"),
    ])
    .try_map(|s| s.parse::<Order>())
}

/// The value parser of `--discovery`: none, static, udp, mdns (listed for help and
/// completions), and `dns:NAME[:PORT]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiscoveryParser;

impl TypedValueParser for DiscoveryParser {
    type Value = Kind;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Kind, clap::Error> {
        let text = value.to_string_lossy();
        text.parse::<Kind>().map_err(|e| {
            let flag = arg
                .and_then(clap::Arg::get_long)
                .map_or_else(|| "--discovery".to_string(), |l| format!("--{l}"));
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value {text:?} for {flag}: {e}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            [
                PossibleValue::new("none").help("no discovery"),
                PossibleValue::new("static").help("the --peer list"),
                PossibleValue::new("udp").help("UDP beacons on the local network"),
                PossibleValue::new("mdns").help("DNS-SD over multicast DNS"),
                PossibleValue::new("dns:").help("dns:NAME[:PORT]: every address of a DNS name"),
            ]
            .into_iter(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn every_heading_names_an_option_and_every_limit_has_one() {
        let mut cmd = command();
        cmd.build();
        let mut ids = Vec::new();
        for sub in cmd.get_subcommands() {
            for a in sub.get_arguments() {
                ids.push(a.get_id().to_string());
                if let Some(h) = heading_of(a.get_id().as_str()) {
                    assert_eq!(a.get_help_heading(), Some(h), "{}", a.get_id());
                }
                if a.get_long().is_some_and(|l| l.starts_with("max-")) {
                    assert_eq!(a.get_help_heading(), Some("Limits"), "{}", a.get_id());
                }
            }
        }
        for (id, _) in HEADINGS {
            assert!(ids.iter().any(|i| i == id), "no option has the id {id}");
        }
    }

    #[test]
    fn order_and_discovery_list_their_values_and_dns_still_parses() {
        let cmd = command();
        let run = cmd.find_subcommand("run").unwrap();
        let order: Vec<String> = run
            .get_arguments()
            .find(|a| a.get_id() == "order")
            .unwrap()
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        assert_eq!(order, ["strict", "type", "none"]);
        let cli = parse_from(
            [
                "p2p-node",
                "peers",
                "--discovery",
                "dns:nodes.example:7401",
                "--discovery",
                "udp",
            ]
            .map(OsString::from)
            .to_vec(),
        );
        let crate::cli::Command::Peers(p) = cli.command else {
            panic!("not peers");
        };
        assert_eq!(
            p.common.discovery,
            [
                Kind::Dns {
                    name: "nodes.example".into(),
                    port: 7401
                },
                Kind::Udp
            ]
        );
        let err = command()
            .try_get_matches_from(["p2p-node", "peers", "--discovery", "carrier-pigeon"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = command()
            .try_get_matches_from(["p2p-node", "run", "--order", "random"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn the_long_version_names_protocol_and_journal_format() {
        let v = long_version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(
            v.contains(&format!("\nprotocol {}\n", p2p_core::PROTOCOL_VERSION)),
            "{v}"
        );
        assert!(
            v.contains(&format!(
                "\njournal format {}\n",
                p2p_tasks::journal::VERSION
            )),
            "{v}"
        );
        assert!(v.contains("\ncommit "), "{v}");
    }

    #[test]
    fn the_man_page_covers_every_subcommand() {
        let mut out = Vec::new();
        write_man(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for sub in command().get_subcommands() {
            assert!(
                text.contains(&format!(".TH p2p-node-{} ", sub.get_name())),
                "no page for {}",
                sub.get_name()
            );
        }
        for flag in ["types", "order", "key\\-file", "discovery\\-timeout"] {
            assert!(text.contains(&format!("\\-\\-{flag}")), "no --{flag}");
        }
    }
}
