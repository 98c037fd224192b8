//! The safety guard: nothing a suite starts may send traffic off the machine, or read the
//! real home's configuration.

use std::process::Command;

use crate::data_dir;

/// Panics unless the command line keeps its traffic on loopback (see the crate docs).
pub(crate) fn check_safe(args: &[&str]) {
    let has = |flag: &str| {
        args.iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
    };
    let value_of = |flag: &str| -> Vec<String> {
        let mut v = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if *a == flag {
                if let Some(next) = args.get(i + 1) {
                    v.push((*next).to_string());
                }
            } else if let Some(rest) = a.strip_prefix(&format!("{flag}=")) {
                v.push(rest.to_string());
            }
        }
        v
    };
    for d in value_of("--discovery") {
        assert!(
            d == "none" || d == "static",
            "test safety: --discovery {d} could leave loopback"
        );
    }
    for p in value_of("--peer") {
        let ok = p.starts_with("127.") || p.starts_with("[::1]") || p.starts_with("localhost:");
        assert!(ok, "test safety: --peer {p} is not a loopback address");
    }
    match args.first().copied() {
        Some("serve") => {
            let listen = value_of("--listen");
            assert!(
                listen.len() == 1
                    && (listen[0].starts_with("127.") || listen[0].starts_with("[::ffff:127.")),
                "test safety: serve needs an explicit loopback --listen, got {listen:?}"
            );
            assert!(
                has("--discovery") || has("--peer"),
                "test safety: serve needs --discovery none or --peer"
            );
        }
        Some("run") | Some("peers") => assert!(
            has("--local") || has("--peer") || has("--discovery"),
            "test safety: {args:?} needs --local, --peer or --discovery none"
        ),
        _ => {}
    }
}

/// The settings p2p-node reads from the environment besides its flags' own variables.
pub const SETTING_VARS: [&str; 9] = [
    "P2P_CONFIG",
    "P2P_CLUSTER",
    "P2P_LISTEN",
    "P2P_TYPES",
    "P2P_PEER",
    "P2P_PEERS_FILE",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "XDG_DATA_HOME",
];

/// Keeps a spawned `p2p-node` away from the real home's config: `HOME` and
/// `XDG_CONFIG_HOME` point into an empty directory under [`data_dir`], and the setting
/// variables of [`SETTING_VARS`] are removed (a test sets the ones it means to).
pub fn isolate(cmd: &mut Command) {
    let home = data_dir().join("home");
    let _ = std::fs::create_dir_all(home.join(".config"));
    cmd.env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"));
    for v in SETTING_VARS {
        cmd.env_remove(v);
    }
}
