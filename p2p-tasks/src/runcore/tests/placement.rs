//! Placement rules of the core: task costs (longest first) and per-task limits.

use super::*;
use crate::sched::{PROBE_EVERY, SPEED_ALPHA};

fn assigned(s: &Sim) -> Vec<String> {
    s.events
        .iter()
        .filter_map(|e| match e {
            RunEvent::TaskAssigned { task, .. } => Some(task.to_string()),
            _ => None,
        })
        .collect()
}

/// Runs every assignment to success, oldest first, until nothing is in flight.
fn run_out(s: &mut Sim) {
    while let Some((_, a)) = s.sent.first().cloned() {
        s.answer(&a.task, true, Duration::from_millis(1));
    }
}

#[test]
fn order_none_starts_the_costliest_ready_task_first_ties_in_file_order() {
    let text = "a1\nb1 cost 3\na2 cost 5\nb2\na3 cost 3\nb3 cost 5";
    let mut s = Sim::new(text, opts(Order::None, 0, false));
    s.connect(1, &hello(1, &["a", "b"], 1));
    run_out(&mut s);
    assert_eq!(assigned(&s), ["a2", "b3", "b1", "a3", "a1", "b2"]);
}

#[test]
fn order_type_starts_the_costliest_next_task_of_the_idle_types() {
    // Within a type, file order; between types, the costlier next task first.
    let text = "a1\na2 cost 9\nb1 cost 2\nb2";
    let mut s = Sim::new(text, opts(Order::Type, 0, false));
    s.connect(1, &hello(1, &["a", "b"], 1));
    run_out(&mut s);
    // b1 (2) before a1 (1); then a1 (b2 costs the same 1: file order); then a2, b2.
    assert_eq!(assigned(&s), ["b1", "a1", "a2", "b2"]);
}

#[test]
fn strict_order_ignores_costs() {
    let mut s = Sim::new("a1\nb1 cost 9\na2 cost 4", opts(Order::Strict, 0, false));
    s.connect(1, &hello(1, &["a", "b"], 4));
    run_out(&mut s);
    assert_eq!(assigned(&s), ["a1", "b1", "a2"]);
}

#[test]
fn a_costly_task_released_by_its_dependency_goes_before_cheaper_ready_ones() {
    let text = "a1\na2\na3\na9 after a1 cost 7";
    let mut s = Sim::new(text, opts(Order::None, 0, false));
    s.connect(1, &hello(1, &["a"], 1));
    run_out(&mut s);
    assert_eq!(assigned(&s), ["a1", "a9", "a2", "a3"]);
}

#[test]
fn a_task_timeout_of_its_own_overrides_the_runs() {
    // The run's timeout is 1 s; a1 has 10 s, a2 the run's. a1 is assigned first, so its
    // later deadline must not hide a2's (deadlines were kept in assignment order).
    let mut s = Sim::new("a1 timeout 10s\na2", opts(Order::None, 0, true));
    s.connect(1, &hello(1, &["a"], 2));
    let sent: Vec<(String, u64)> = s
        .sent
        .iter()
        .map(|(_, a)| (a.task.to_string(), a.timeout_ms))
        .collect();
    assert_eq!(sent, [("a1".into(), 10_000), ("a2".into(), 1_000)]);
    assert_eq!(
        s.core.poll_timeout(),
        Some(s.now + Duration::from_secs(3)),
        "a2's deadline (1 s + grace) comes first"
    );
    s.advance(Duration::from_millis(3001));
    assert_eq!(s.status(1), Status::Failed, "a2 timed out");
    assert_eq!(s.status(0), Status::NotRun, "a1 still runs");
    s.advance(Duration::from_secs(9));
    assert_eq!(s.status(0), Status::Failed, "a1 timed out at 12 s");
    let failed = s.events.iter().find_map(|e| match e {
        RunEvent::TaskFailed { task, error, .. } if task == "a1" => Some(error.clone()),
        _ => None,
    });
    assert!(failed.is_some_and(|e| e.contains("12s")), "{:?}", s.events);
}

#[test]
fn a_zero_timeout_of_its_own_means_no_limit_under_a_run_timeout() {
    let mut s = Sim::new("a1 timeout 0", opts(Order::None, 0, false));
    s.connect(1, &hello(1, &["a"], 1));
    assert_eq!(s.sent[0].1.timeout_ms, 0);
    assert_eq!(s.core.poll_timeout(), None);
}

#[test]
fn task_retries_of_their_own_override_the_runs() {
    // The run retries nothing; a1 may retry twice.
    let mut s = Sim::new("a1 retries 2", opts(Order::None, 0, false));
    s.connect(1, &hello(1, &["a"], 1));
    s.answer("a1", false, Duration::from_millis(1));
    s.wake();
    s.answer("a1", false, Duration::from_millis(1));
    s.wake();
    s.answer("a1", true, Duration::from_millis(1));
    assert_eq!(s.status(0), Status::Succeeded);
    assert_eq!(s.core.result(0).unwrap().attempts, 3);

    // The run retries three times; b1 not at all.
    let mut s = Sim::new("b1 retries 0", opts(Order::None, 3, false));
    s.connect(1, &hello(1, &["b"], 1));
    s.answer("b1", false, Duration::from_millis(1));
    assert_eq!(s.status(0), Status::Failed);
    assert_eq!(s.core.result(0).unwrap().attempts, 1);
}

/// Answers every assignment in turn, each taking what `speed(link, round)` says, and
/// returns the links the tasks ran on, in order.
fn run_with_speeds(s: &mut Sim, speed: impl Fn(LinkId, usize) -> Duration) -> Vec<LinkId> {
    let mut ran = Vec::new();
    while let Some((link, a)) = s.sent.first().cloned() {
        s.answer(&a.task, true, speed(link, ran.len()));
        ran.push(link);
    }
    ran
}

fn many(n: usize) -> String {
    (1..=n).map(|i| format!("a{i} ")).collect()
}

#[test]
fn strict_order_learns_the_faster_node_and_still_probes_the_other() {
    // The issue: in strict order every task went to one node whatever the speeds. Node 2
    // is 5 times faster than node 1.
    let mut s = Sim::new(&many(40), opts(Order::Strict, 0, false));
    s.connect(1, &hello(1, &["a"], 1));
    s.connect(2, &hello(2, &["a"], 1));
    let ran = run_with_speeds(&mut s, |link, _| {
        Duration::from_millis(if link == 2 { 20 } else { 100 })
    });
    assert_eq!(ran.len(), 40);
    assert_eq!(
        &ran[..2],
        [1, 2],
        "each node is measured once first: {ran:?}"
    );
    let slow = ran.iter().filter(|&&l| l == 1).count();
    assert!(
        (2..=4).contains(&slow),
        "the slow node gets its first task and a probe every {PROBE_EVERY}: {ran:?}"
    );
    assert!(s.report().is_success());
}

#[test]
fn a_node_that_became_fast_again_is_noticed_by_the_probes() {
    let mut s = Sim::new(&many(300), opts(Order::Strict, 0, false));
    s.connect(1, &hello(1, &["a"], 1));
    s.connect(2, &hello(2, &["a"], 1));
    // Node 1 is slow for the first 40 tasks, then 10 times faster than node 2.
    let ran = run_with_speeds(&mut s, |link, round| {
        let ms = match (link, round < 40) {
            (1, true) => 100,
            (1, false) => 2,
            _ => 20,
        };
        Duration::from_millis(ms)
    });
    let early = ran[2..40].iter().filter(|&&l| l == 2).count();
    assert!(early >= 34, "node 2 is faster at first: {ran:?}");
    let late = ran[260..].iter().filter(|&&l| l == 1).count();
    assert!(
        late >= 36,
        "node 1 took over once the probes saw it fast: {ran:?}"
    );
}

#[test]
fn speed_is_per_unit_of_cost_and_starts_from_the_types_mean() {
    let mut s = Sim::new("a1\na2 cost 10\na3", opts(Order::Strict, 0, false));
    s.connect(1, &hello(1, &["a"], 1));
    s.connect(2, &hello(2, &["a"], 1));
    // a1 on node 1: 30 ms; a2 (cost 10) on node 2, never measured: 100 ms, 10 ms per unit.
    s.answer("a1", true, Duration::from_millis(30));
    assert_eq!(s.sent[0].0, 2, "the unmeasured node is tried");
    s.answer("a2", true, Duration::from_millis(100));
    let est = |link| s.core.sched.speed(link, "a").unwrap();
    assert!((est(1) - 0.030).abs() < 1e-9, "{}", est(1));
    // Node 2's estimate starts from the type's mean (30 ms) and moves 30% towards 10 ms.
    let expected = 0.030 + SPEED_ALPHA * (0.010 - 0.030);
    assert!((est(2) - expected).abs() < 1e-9, "{} != {expected}", est(2));
    assert_eq!(s.sent[0].0, 2, "a3 goes to the faster node");
}

#[test]
fn a_timeout_beyond_what_the_clock_can_hold_means_no_deadline() {
    // `timeout 500000000000y` parses (about 1.6e19 s), and the result deadline used to be
    // `now + timeout`, which panicked ("overflow when adding duration to instant") when the
    // node said the attempt started. The same held for `--task-timeout`.
    for (text, run) in [
        ("a1 timeout 500000000000y", Duration::from_secs(1)),
        ("a1", Duration::from_secs(u64::MAX)),
    ] {
        let mut o = opts(Order::None, 0, false);
        o.task_timeout = run;
        let mut s = Sim::new(text, o);
        s.connect(1, &hello(1, &["a"], 1));
        assert_eq!(s.in_flight_on(1), 1, "{text}");
        assert_eq!(s.core.poll_timeout(), None, "{text}: no deadline");
        s.answer("a1", true, Duration::from_millis(1));
        assert_eq!(s.status(0), Status::Succeeded, "{text}");
    }
}

#[test]
fn a_node_that_fails_at_once_does_not_rank_as_never_measured() {
    // Node 2 fails every task at once and is never measured by a success: it must not stay
    // first in line ("not measured yet") and draw every new task.
    let mut s = Sim::new(&many(20), opts(Order::Strict, 0, true));
    s.connect(1, &hello(1, &["a"], 1));
    s.connect(2, &hello(2, &["a"], 1));
    let mut on_2 = 0;
    while let Some((link, a)) = s.sent.first().cloned() {
        on_2 += usize::from(link == 2);
        s.answer(&a.task, link == 1, Duration::from_millis(20));
    }
    assert!(on_2 <= 3, "{on_2} of 20 tasks went to the failing node");
}
