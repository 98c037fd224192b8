//! What ships beside the binary (issue 16, "Packaging"): the systemd unit (checked with
//! `systemd-analyze verify` where that command exists), the Kubernetes manifests (parsed,
//! and their node's arguments checked by the real binary), the Dockerfile (read: no
//! container engine here to build it) and `[profile.dist]`.
//!
//! Nothing here starts a node: command lines from the files are only parsed (`--help` after
//! them makes the binary check every argument and exit without running).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_norway::Value;

fn root_file(rel: &str) -> PathBuf {
    tests::workspace_root().join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Checks that `p2p-node ARGS --help` parses (every flag exists, every value is valid) and
/// returns the help text; a config file from the environment cannot interfere.
fn args_parse(args: &[String]) -> String {
    let mut cmd = Command::new(tests::bin());
    cmd.args(args)
        .arg("--help")
        .stdin(Stdio::null())
        .env_remove("P2P_KEY_FILE")
        .env_remove("RUST_LOG");
    tests::isolate(&mut cmd);
    let out = cmd.output().expect("run p2p-node");
    assert!(
        out.status.success(),
        "p2p-node {args:?} does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The unit's `KEY=value` settings (comments and sections left out).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_systemd_unit_serves_drains_on_sigterm_and_is_sandboxed() {
    let text = read("contrib/systemd/p2p-node.service");
    let settings = unit_settings(&text);
    let get = |k: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    let words: Vec<String> = exec[0].split_whitespace().map(str::to_string).collect();
    assert!(
        words[0].ends_with("/p2p-node") && words[1] == "serve",
        "{words:?}"
    );
    assert_eq!(get("KillSignal"), ["SIGTERM"]);
    assert_eq!(get("KillMode"), ["mixed"]);
    let stop = get("TimeoutStopSec");
    let secs: u64 = stop[0].trim_end_matches('s').parse().unwrap();
    assert!(
        secs > 30,
        "TimeoutStopSec {secs} is not above the 30 s drain timeout"
    );
    assert_eq!(get("StateDirectory"), ["p2p-node"]);
    assert_eq!(get("DynamicUser"), ["yes"]);
    assert_eq!(
        get("LoadCredential"),
        ["cluster.key:/etc/p2p-node/cluster.key"]
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(get(k), [v], "{k}");
    }
    // The command line parses (the environment's P2P_TYPES stands in for the config file).
    let mut args = words[1..].to_vec();
    args.extend(["--types".to_string(), "a".to_string()]);
    args_parse(&args);

    // systemd's own check, on a copy whose ExecStart is the binary under test (verify
    // refuses a command that does not exist, and /usr/local/bin/p2p-node need not).
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    assert!(probe.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("p2p-node.service");
    let bin = tests::bin().display().to_string();
    std::fs::write(&unit, text.replace("/usr/local/bin/p2p-node", &bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys are only warnings: none may be printed.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

/// The documents of a YAML file with several (`---`).
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = match p.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[*p],
        };
    }
    cur
}

#[test]
fn the_kubernetes_manifests_parse_and_their_nodes_find_each_other_by_dns() {
    let docs = yaml_docs("contrib/k8s/p2p-node.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let svc = kind("Service");
    let sts = kind("StatefulSet");
    let svc_name = s(svc, &["metadata", "name"]).as_str().unwrap();
    assert_eq!(s(svc, &["spec", "clusterIP"]).as_str(), Some("None"));
    assert_eq!(s(sts, &["spec", "serviceName"]).as_str(), Some(svc_name));
    // The Service selects the StatefulSet's pods.
    let selector = s(svc, &["spec", "selector"]).as_mapping().unwrap();
    let labels = s(sts, &["spec", "template", "metadata", "labels"]);
    for (k, v) in selector {
        assert_eq!(&labels[k.as_str().unwrap()], v, "selector {k:?}");
    }
    let pod = s(sts, &["spec", "template", "spec"]);
    let grace = s(pod, &["terminationGracePeriodSeconds"]).as_u64().unwrap();
    assert!(grace > 30, "grace {grace} s is not above the drain timeout");
    assert_eq!(
        s(pod, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    let fs_group = s(pod, &["securityContext", "fsGroup"]).as_u64().unwrap();
    let run_as_group = s(pod, &["securityContext", "runAsGroup"]).as_u64().unwrap();
    assert_eq!(
        fs_group, run_as_group,
        "the Secret's group must be the node's"
    );
    let c = s(pod, &["containers", "0"]);
    let args: Vec<String> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let value = |flag: &str| {
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag}"));
        args[at + 1].clone()
    };
    assert_eq!(args[0], "serve");
    // Discovery by the headless Service's name, on the port the nodes listen on.
    let listen_port = value("--listen").rsplit(':').next().unwrap().to_string();
    assert_eq!(
        value("--discovery"),
        format!("dns:{svc_name}:{listen_port}")
    );
    let container_port = |name: &str| {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
            .as_u64()
            .unwrap()
            .to_string()
    };
    // Ready while /healthz says so (503 while draining), on the port --metrics-listen binds.
    let metrics_port = value("--metrics-listen")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let ready = s(c, &["readinessProbe", "httpGet"]);
    assert_eq!(ready["path"].as_str(), Some("/healthz"), "{ready:?}");
    assert_eq!(
        container_port(ready["port"].as_str().unwrap()),
        metrics_port
    );
    assert!(
        c["readinessProbe"]["tcpSocket"].is_null(),
        "readiness is a TCP probe"
    );
    // Alive while it accepts connections on the listen port (a draining node is alive).
    let alive = s(c, &["livenessProbe", "tcpSocket", "port"])
        .as_str()
        .unwrap();
    assert_eq!(container_port(alive), listen_port);
    // The scrape annotations name the metrics port.
    assert_eq!(
        s(
            sts,
            &[
                "spec",
                "template",
                "metadata",
                "annotations",
                "prometheus.io/port"
            ]
        )
        .as_str(),
        Some(metrics_port.as_str())
    );
    // The key file is in the Secret's mount.
    let key = value("--key-file");
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| key.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{key} is in no volume mount"));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let mode = volume["secret"]["defaultMode"].as_u64().unwrap();
    assert_eq!(mode, 0o440, "the Secret's mode is {mode:o}, not 0440");
    // And the real binary takes these arguments.
    let help = args_parse(&args);
    assert!(help.contains("--types"), "{help}");
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_as_a_non_root_user() {
    let text = read("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "not a multi-stage build");
    assert!(
        lines.iter().any(|l| l.contains("--profile dist")),
        "the image does not use the dist profile"
    );
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let user = lines[last_from..]
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the final stage sets no USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "runs as {user}");
    let cmd = lines
        .iter()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("no CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    let mut args = cmd.clone();
    args.extend(["--types".to_string(), "a".to_string()]);
    args_parse(&args);
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
}

#[test]
fn the_dist_profile_inherits_release_strips_and_uses_thin_lto() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let dist = &manifest["profile"]["dist"];
    assert_eq!(dist["inherits"].as_str(), Some("release"));
    assert_eq!(dist["strip"].as_bool(), Some(true));
    assert_eq!(dist["lto"].as_str(), Some("thin"));
}
