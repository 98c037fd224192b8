//! Files that travel with tasks (#18) across hosts of a LAN of network namespaces (see
//! `tests::netns`): a pipeline whose stages run on different hosts, each with its own data
//! directory (and so its own file cache and working directories), the artifacts passing
//! between hosts over the network only. Skipped, with a printed reason, where namespaces
//! cannot be created (unless `P2P_REQUIRE_NETNS=1`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;
use tests::netns::{Host, Lan, NsProcess};
use tests::TestDir;

/// A hang guard only: nothing asserts on timing.
const WAIT: Duration = Duration::from_secs(60);

/// `p2p-node serve` at `host`:7400, with a data directory of its own, serving `types` with
/// `handlers`.
fn serve<'a>(host: &'a Host, data: &TestDir, types: &str, handlers: &[&str]) -> NsProcess<'a> {
    let listen = format!("{}:7400", host.addr());
    let data = data.path().to_str().unwrap().to_owned();
    let mut args = vec![
        "--types",
        types,
        "--cluster",
        "lan",
        "--listen",
        &listen,
        "--discovery",
        "none",
        "--insecure",
        "--data-dir",
        &data,
    ];
    for h in handlers {
        args.extend(["--handler", h]);
    }
    host.serve(&args)
}

#[test]
fn a_pipeline_passes_artifacts_between_hosts_that_share_no_files() {
    let Some(lan) = Lan::new(3) else { return };
    let (coord, first, second) = (lan.host(0), lan.host(1), lan.host(2));
    let (d1, d2) = (TestDir::new(), TestDir::new());
    // Stage s (host 1) upper-cases its input; stage t (host 2) counts the bytes of s's
    // output; stage u (host 1 again) reads t's output. Handlers name only files of their
    // working directory.
    let n1 = serve(
        first,
        &d1,
        "s,u",
        &[
            "s=tr a-z A-Z < in.txt > up.txt",
            "u=echo \"count $(cat n.txt) in $P2P_TASK_DIR\"",
        ],
    );
    let n2 = serve(
        second,
        &d2,
        "t",
        &["t=mkdir -p sub; wc -c < up.txt | tr -d ' ' > sub/n.txt; cat up.txt | head -c 5"],
    );
    let dir = TestDir::new();
    let input = "across hosts\n".repeat(10_000); // 130,000 bytes: several chunks
    dir.write("in.txt", &input);
    dir.write(
        "tasks.txt",
        "s1 < in.txt > up.txt\nt1 < @s1/up.txt > sub/n.txt\nu1 < @t1/sub/n.txt\n",
    );
    let results = dir.join("results");
    let coord_data = TestDir::new();
    let mut cmd = coord.p2p_node();
    cmd.current_dir(dir.path())
        .arg("run")
        .arg(dir.join("tasks.txt"))
        .args(["--cluster", "lan", "--json"])
        .args(["--discovery", "none"])
        .args(["--peer", &format!("{}:7400", first.addr())])
        .args(["--peer", &format!("{}:7400", second.addr())])
        .arg("--results")
        .arg(&results)
        .arg("--data-dir")
        .arg(coord_data.path());
    let out = coord.output(&mut cmd, WAIT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let describe = || {
        format!(
            "run: {:?}\n{stdout}\n{}\n--- node 1 ---\n{}\n--- node 2 ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            n1.describe(),
            n2.describe()
        )
    };
    assert!(out.status.success(), "{}", describe());
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let node_of = |task: &str| -> String {
        events
            .iter()
            .find(|e| e["event"] == "task_completed" && e["task"] == task)
            .and_then(|e| e["node"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no task_completed for {task}\n{}", describe()))
    };
    // The stages ran on different hosts: the artifacts crossed the LAN both ways.
    assert_ne!(node_of("s1"), node_of("t1"));
    assert_eq!(node_of("s1"), node_of("u1"));
    assert_eq!(
        std::fs::read_to_string(results.join("s1/up.txt")).unwrap(),
        input.to_uppercase()
    );
    assert_eq!(
        std::fs::read_to_string(results.join("t1/sub/n.txt"))
            .unwrap()
            .trim(),
        input.len().to_string()
    );
    assert_eq!(
        std::fs::read_to_string(results.join("t1/stdout")).unwrap(),
        "ACROS"
    );
    let u = std::fs::read_to_string(results.join("u1/stdout")).unwrap();
    assert!(u.starts_with(&format!("count {} in ", input.len())), "{u}");
    // u1 ran in a working directory under host 1's own data directory.
    let work = u.trim().rsplit(' ').next().unwrap();
    assert!(work.starts_with(d1.path().to_str().unwrap()), "{u}");
    // Each node received its inputs into its own cache: host 2 got up.txt, host 1 n.txt.
    let cached = |d: &TestDir| {
        walk(&d.path().join("cache"))
            .into_iter()
            .filter(|p| p.is_file())
            .filter_map(|p| std::fs::read(p).ok())
            .collect::<Vec<_>>()
    };
    let upper = input.to_uppercase().into_bytes();
    assert!(cached(&d2).contains(&upper), "host 2 holds s1's artifact");
    assert!(
        cached(&d1).contains(&format!("{}\n", input.len()).into_bytes()),
        "host 1 holds t1's artifact"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
