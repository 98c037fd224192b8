//! `run --report FILE.html`: the page a real run writes, rendered by headless Chromium
//! (`--dump-dom`), has one bar per attempt with its outcome, one lane per node, the order
//! constraints when asked, and shows what a handler printed as text, never as markup.
//!
//! Chromium runs in a network namespace of its own (`unshare -n`) where that can be made,
//! so it cannot reach any network whatever the page says. Without Chromium the page is still
//! checked as text and the rendering is skipped with a line on stderr, unless
//! `P2P_REQUIRE_CHROMIUM=1` (set by `.ci/run`), where the test fails. `P2P_CHROMIUM` names
//! the browser to use instead of looking for `chromium`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{events_named, run_bounded, run_in, shell_quote, TestDir};

/// Set to 1 to fail instead of skipping the rendering when Chromium is missing.
const REQUIRE_CHROMIUM: &str = "P2P_REQUIRE_CHROMIUM";

/// What the failing handler prints on stdout and stderr: markup that would set
/// `data-pwned` on the page if it were ever parsed as HTML.
const HOSTILE: &str = "<script>document.body.setAttribute('data-pwned','1')</script>\
                       <img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">\
                       </title></rect></svg><b id=pwned>bold</b>";

/// The browser to use: `$P2P_CHROMIUM` if set (only that), else the first of the usual
/// names that runs.
fn chromium() -> Option<String> {
    let names = match std::env::var("P2P_CHROMIUM") {
        Ok(b) => vec![b],
        Err(_) => ["chromium", "chromium-browser", "google-chrome"]
            .map(String::from)
            .to_vec(),
    };
    names.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The DOM Chromium builds from `page`, or `None` (a skip) when there is no Chromium.
fn render(page: &Path, profile: &Path) -> Option<String> {
    let Some(browser) = chromium() else {
        if std::env::var(REQUIRE_CHROMIUM).is_ok_and(|v| v == "1") {
            panic!("{REQUIRE_CHROMIUM}=1 and no chromium is installed (apt-get install chromium)");
        }
        eprintln!("skipping the rendering: no chromium (apt-get install chromium)");
        return None;
    };
    let isolated = Command::new("unshare")
        .args(["-n", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if isolated {
        let mut c = Command::new("unshare");
        c.args(["-n", browser.as_str()]);
        c
    } else {
        Command::new(browser)
    };
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg("--dump-dom")
    .arg(format!("file://{}", page.display()));
    Some(run_bounded(cmd, Duration::from_secs(120)).expect("chromium --dump-dom"))
}

/// The value of attribute `name` in the tag text `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// Every start tag `<NAME ...>` of `html` whose class attribute starts with `class`.
fn tags<'a>(html: &'a str, name: &str, class: &str) -> Vec<&'a str> {
    let open = format!("<{name} ");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        let tail = &rest[i..];
        let end = tail.find('>').map_or(tail.len(), |e| e + 1);
        let tag = &tail[..end];
        if attr(tag, "class").is_some_and(|c| c == class || c.starts_with(&format!("{class} "))) {
            out.push(tag);
        }
        rest = &tail[end..];
    }
    out
}

/// (task, attempt) to the bar's outcome class, from the page or its DOM.
fn bars(html: &str) -> BTreeMap<(String, u32), String> {
    tags(html, "rect", "bar")
        .into_iter()
        .map(|t| {
            let class = attr(t, "class").unwrap();
            (
                (
                    attr(t, "data-task").unwrap().to_owned(),
                    attr(t, "data-attempt").unwrap().parse().unwrap(),
                ),
                class.trim_start_matches("bar ").to_owned(),
            )
        })
        .collect()
}

/// What each attempt's bar must say, from the run's `--json` events.
fn expected_bars(events: &[serde_json::Value]) -> BTreeMap<(String, u32), String> {
    let key = |e: &serde_json::Value| {
        (
            e["task"].as_str().unwrap().to_owned(),
            u32::try_from(e["attempt"].as_u64().unwrap()).unwrap(),
        )
    };
    let mut want = BTreeMap::new();
    for (event, class) in [
        ("task_completed", "ok"),
        ("task_retry", "retried"),
        ("task_failed", "failed"),
    ] {
        for e in events_named(events, event) {
            want.insert(key(e), class.to_owned());
        }
    }
    let assigned: Vec<_> = events_named(events, "task_assigned")
        .into_iter()
        .map(key)
        .collect();
    let mut keys: Vec<_> = want.keys().cloned().collect();
    let mut assigned_sorted = assigned.clone();
    keys.sort();
    assigned_sorted.sort();
    assert_eq!(keys, assigned_sorted, "every attempt ends in one event");
    want
}

fn check_inert(html: &str, what: &str) {
    assert!(
        !html.contains("data-pwned=\""),
        "{what}: a handler's script ran"
    );
    assert!(!html.contains("<script"), "{what}: a <script> element");
    assert!(!html.contains("<img"), "{what}: an <img> element");
    assert!(
        !html.contains("id=\"pwned\"") && !html.contains("<b id"),
        "{what}: markup from output"
    );
    assert!(
        html.contains("&lt;script&gt;document.body.setAttribute"),
        "{what}: the handler's output is not shown as text"
    );
}

#[test]
fn the_report_has_a_bar_per_attempt_and_renders_in_chromium() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3\nb1\nb2 after a1\n");
    let hostile = dir.write("hostile.txt", HOSTILE);
    let marker = dir.join("a2-failed-once");
    // a2 fails once (then succeeds on its retry); a3 fails both attempts, printing markup.
    let handler = format!(
        "a=sleep 0.1; if [ {{id}} = a2 ] && [ ! -e {m} ]; then touch {m}; exit 4; fi; \
         if [ {{id}} = a3 ]; then cat {h}; cat {h} >&2; exit 3; fi; echo ok {{id}}",
        m = shell_quote(marker.to_str().unwrap()),
        h = shell_quote(hostile.to_str().unwrap()),
    );
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "2",
            "--order",
            "type",
            "--retries",
            "1",
            "--retry-backoff",
            "10ms",
            "--keep-going",
            "--handler",
            &handler,
            "--handler",
            "b=sleep 0.1; echo ok {id}",
            "--json",
            "--report",
            "report.html",
            "--report-edges",
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let want = expected_bars(&events);
    assert_eq!(want.len(), 7, "{}", out.describe());
    assert_eq!(want[&("a2".to_owned(), 1)], "retried");
    assert_eq!(want[&("a3".to_owned(), 2)], "failed");
    let nodes = events_named(&events, "connected").len();
    assert_eq!(
        nodes,
        4,
        "two in-process nodes per type\n{}",
        out.describe()
    );

    let page_path = dir.join("report.html");
    let page = std::fs::read_to_string(&page_path).unwrap();
    assert_eq!(bars(&page), want);
    check_inert(&page, "the page");

    let Some(dom) = render(&page_path, &dir.join("chromium-profile")) else {
        return;
    };
    // The browser built the page: one bar per attempt with its outcome, a lane per node,
    // one retry line per retried attempt, one arrow per constraint (a1<a2<a3 and b1<b2 in
    // type order, a1<b2 as a dependency).
    assert!(dom.contains("<svg id=\"timeline\""), "{dom}");
    assert_eq!(bars(&dom), want, "{dom}");
    assert_eq!(tags(&dom, "rect", "lane").len(), nodes, "{dom}");
    assert_eq!(tags(&dom, "path", "retry").len(), 2, "{dom}");
    let edges: Vec<(String, String)> = tags(&dom, "path", "edge")
        .iter()
        .map(|t| {
            (
                attr(t, "class").unwrap().to_owned(),
                format!(
                    "{}<{}",
                    attr(t, "data-from").unwrap(),
                    attr(t, "data-to").unwrap()
                ),
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            ("edge dep".to_owned(), "a1<b2".to_owned()),
            ("edge type".to_owned(), "a1<a2".to_owned()),
            ("edge type".to_owned(), "a2<a3".to_owned()),
            ("edge type".to_owned(), "b1<b2".to_owned()),
        ],
        "{dom}"
    );
    // The summary table is there, and a handler's markup is text.
    assert!(dom.contains("<table id=\"summary\""), "{dom}");
    check_inert(&dom, "the rendered DOM");
}

#[test]
fn without_report_edges_no_arrows_and_a_missing_directory_is_refused_at_once() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--local", "--report", "r.html"],
    );
    out.assert_code(0);
    let page = std::fs::read_to_string(dir.join("r.html")).unwrap();
    assert_eq!(tags(&page, "rect", "bar").len(), 2);
    assert!(tags(&page, "path", "edge").is_empty());

    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--report",
            "no/such/dir/r.html",
        ],
    );
    out.assert_code(2);
    assert!(out.stderr.contains("--report"), "{}", out.describe());
    assert!(
        !out.stdout.contains("Executing") && !out.stderr.contains("Executing"),
        "the run started: {}",
        out.describe()
    );
}
