#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn tasks(ids: &str) -> Vec<Task> {
    ids.split_whitespace()
        .enumerate()
        .map(|(i, id)| Task {
            id: id.to_string(),
            kind: id
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .to_string(),
            args: String::new(),
            deps: Vec::new(),
            line: 1,
            col: i as u32 + 1,
            cost: 1,
            timeout: None,
            retries: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
        })
        .collect()
}

const SEED: &str = "a1 a2 c1 b1 c2 a3 b2 b3 a4 c3 b4";

fn sched(order: Order) -> Scheduler {
    let mut s = Scheduler::new(
        &tasks(SEED),
        Policy {
            order,
            ..Policy::default()
        },
    );
    s.add_node(1, &["a".into()], 4);
    s.add_node(2, &["b".into()], 4);
    s.add_node(3, &["c".into()], 4);
    s
}

fn drain(s: &mut Scheduler, now: Instant) -> Vec<Dispatch> {
    std::iter::from_fn(|| s.next(now)).collect()
}

#[test]
fn strict_runs_one_at_a_time_in_file_order() {
    let mut s = sched(Order::Strict);
    let now = Instant::now();
    let mut order = Vec::new();
    while !s.is_finished() {
        let ds = drain(&mut s, now);
        assert_eq!(ds.len(), 1, "strict never has two tasks in flight");
        order.push(ds[0].task);
        assert_eq!(s.complete(ds[0].task, true, now), Outcome::Succeeded);
    }
    assert_eq!(order, (0..11).collect::<Vec<_>>());
}

#[test]
fn type_order_runs_one_per_type_in_file_order() {
    let mut s = sched(Order::Type);
    let now = Instant::now();
    let first: Vec<usize> = drain(&mut s, now).iter().map(|d| d.task).collect();
    assert_eq!(first, vec![0, 2, 3], "a1, c1, b1 start together");
    s.complete(2, true, now);
    let next: Vec<usize> = drain(&mut s, now).iter().map(|d| d.task).collect();
    assert_eq!(next, vec![4], "c2 follows c1; a2 waits for a1");
}

#[test]
fn none_fills_capacity() {
    let mut s = sched(Order::None);
    let now = Instant::now();
    let ds = drain(&mut s, now);
    // a has 4 tasks, b 4, c 3; each node has capacity 4.
    assert_eq!(ds.len(), 11);
}

#[test]
fn least_loaded_node_within_capacity() {
    let mut s = Scheduler::new(
        &tasks("a1 a2 a3 a4 a5 a6"),
        Policy {
            order: Order::None,
            ..Policy::default()
        },
    );
    s.add_node(1, &["a".into()], 2);
    s.add_node(2, &["a".into()], 2);
    let ds = drain(&mut s, Instant::now());
    let on1 = ds.iter().filter(|d| d.node == 1).count();
    let on2 = ds.iter().filter(|d| d.node == 2).count();
    assert_eq!((on1, on2), (2, 2));
}

#[test]
fn failure_retries_with_backoff_then_fails_and_stops() {
    let mut s = Scheduler::new(
        &tasks("a1 a2"),
        Policy {
            retries: 2,
            backoff: Backoff {
                jitter: 0.0,
                ..Backoff::default()
            },
            ..Policy::default()
        },
    );
    s.add_node(1, &["a".into()], 1);
    let t0 = Instant::now();
    let d = s.next(t0).unwrap();
    assert_eq!(d.attempt, 1);
    let Outcome::Retry { delay } = s.complete(0, false, t0) else {
        panic!("expected a retry")
    };
    assert_eq!(delay, Duration::from_millis(100));
    assert_eq!(s.next(t0), None, "not before the back-off");
    assert_eq!(s.next_wakeup(), Some(t0 + delay));
    let d = s.next(t0 + delay).unwrap();
    assert_eq!((d.task, d.attempt), (0, 2));
    let Outcome::Retry { delay } = s.complete(0, false, t0) else {
        panic!("expected a retry")
    };
    assert_eq!(delay, Duration::from_millis(200), "exponential");
    let d = s.next(t0 + delay).unwrap();
    assert_eq!(s.complete(d.task, false, t0), Outcome::Failed);
    assert_eq!(s.next(t0 + delay), None, "the run stops at the failure");
    assert!(s.is_finished());
    assert_eq!(s.status(1), Some(TaskStatus::Pending), "a2 never ran");
}

#[test]
fn lost_node_requeues_its_tasks_without_using_retries() {
    let mut s = Scheduler::new(
        &tasks("a1 a2"),
        Policy {
            order: Order::None,
            ..Policy::default()
        },
    );
    s.add_node(1, &["a".into()], 2);
    let now = Instant::now();
    assert_eq!(drain(&mut s, now).len(), 2);
    assert_eq!(s.remove_node(1), vec![0, 1]);
    assert_eq!(s.missing_kinds(), vec!["a".to_string()]);
    s.add_node(2, &["a".into()], 2);
    let ds = drain(&mut s, now);
    assert!(ds.iter().all(|d| d.node == 2 && d.attempt == 2));
    s.complete(0, true, now);
    s.complete(1, true, now);
    assert!(s.is_finished());
}

#[test]
fn draining_node_gets_no_new_work() {
    let mut s = sched(Order::Strict);
    s.drain_node(1);
    assert_eq!(s.next(Instant::now()), None);
    assert_eq!(s.missing_kinds(), vec!["a".to_string()]);
}

#[test]
fn fail_kind_fails_its_pending_tasks() {
    let mut s = Scheduler::new(&tasks("a1 z1 z2"), Policy::default());
    s.add_node(1, &["a".into()], 1);
    assert_eq!(s.missing_kinds(), vec!["z".to_string()]);
    assert_eq!(s.fail_kind("z"), vec![1, 2]);
    assert_eq!(s.status(2), Some(TaskStatus::Failed));
    assert!(s.is_finished(), "stopped by the failure, nothing running");
}

fn parsed(text: &str, order: Order, keep_going: bool) -> Scheduler {
    let tasks = crate::parse::parse("t", text).unwrap();
    let mut s = Scheduler::new(
        &tasks,
        Policy {
            order,
            keep_going,
            ..Policy::default()
        },
    );
    s.add_node(1, &["a".into(), "b".into(), "c".into()], 8);
    s
}

#[test]
fn dependencies_hold_back_their_dependents() {
    let mut s = parsed("a1 a2\nb1 after a2\nc1 after a1 b1", Order::None, false);
    let now = Instant::now();
    let first: Vec<usize> = drain(&mut s, now).iter().map(|d| d.task).collect();
    assert_eq!(first, vec![0, 1], "b1 and c1 wait");
    s.complete(1, true, now);
    assert_eq!(
        drain(&mut s, now)
            .iter()
            .map(|d| d.task)
            .collect::<Vec<_>>(),
        vec![2]
    );
    s.complete(2, true, now);
    assert!(drain(&mut s, now).is_empty(), "c1 still waits for a1");
    s.complete(0, true, now);
    assert_eq!(
        drain(&mut s, now)
            .iter()
            .map(|d| d.task)
            .collect::<Vec<_>>(),
        vec![3]
    );
}

#[test]
fn keep_going_skips_only_the_dependents_of_a_failure() {
    let mut s = parsed("a1 a2\nb1 after a1\nc1 after b1\nc2", Order::None, true);
    let now = Instant::now();
    assert_eq!(drain(&mut s, now).len(), 3, "a1 a2 c2");
    assert_eq!(s.complete(0, false, now), Outcome::Failed);
    assert_eq!(
        s.drain_skipped(),
        vec![(2, 0), (3, 2)],
        "b1 (a1 failed), then c1 through b1"
    );
    assert_eq!(s.status(3), Some(TaskStatus::Skipped));
    assert!(!s.is_finished(), "keep going: a2 and c2 still run");
    s.complete(1, true, now);
    s.complete(4, true, now);
    assert!(s.is_finished());
}

#[test]
fn strict_with_keep_going_continues_after_a_failure() {
    let mut s = parsed("a1 a2 a3", Order::Strict, true);
    let now = Instant::now();
    let d = s.next(now).unwrap();
    s.complete(d.task, false, now);
    assert_eq!(s.next(now).map(|d| d.task), Some(1));
}

#[test]
fn mark_done_releases_dependents() {
    let mut s = parsed("a1\nb1 after a1", Order::None, false);
    s.mark_done(0);
    let ds = drain(&mut s, Instant::now());
    assert_eq!(ds.iter().map(|d| d.task).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn a_retry_goes_to_another_node_when_there_is_one() {
    let mut s = Scheduler::new(
        &tasks("a1"),
        Policy {
            retries: 3,
            ..Policy::default()
        },
    );
    s.add_node(1, &["a".into()], 1);
    s.add_node(2, &["a".into()], 1);
    let t0 = Instant::now();
    let first = s.next(t0).unwrap().node;
    let Outcome::Retry { delay } = s.complete(0, false, t0) else {
        panic!("expected a retry")
    };
    assert!(
        delay >= Duration::from_millis(100) && delay <= Duration::from_millis(120),
        "{delay:?}"
    );
    let second = s.next(t0 + delay).unwrap().node;
    assert_ne!(first, second);
    // With the other node gone, the retry goes back to the first one.
    s.complete(0, false, t0);
    s.remove_node(second);
    let third = s.next(t0 + Duration::from_secs(10)).unwrap().node;
    assert_eq!(third, first);
}

#[test]
fn nodes_of_about_one_speed_share_work_by_load_and_a_faster_one_takes_it() {
    let run = |fast: u64| {
        let mut s = Scheduler::new(
            &tasks("a1 a2 a3 a4"),
            Policy {
                order: Order::None,
                ..Policy::default()
            },
        );
        s.add_node(1, &["a".into()], 4);
        s.add_node(2, &["a".into()], 4);
        s.observe(0, 1, Duration::from_millis(50));
        s.observe(0, 2, Duration::from_millis(fast));
        let now = Instant::now();
        drain(&mut s, now)
            .iter()
            .map(|d| d.node)
            .collect::<Vec<_>>()
    };
    // 50 ms and about 50.6 ms rank the same: by load, as before.
    assert_eq!(run(52), [1, 2, 1, 2]);
    // 20 ms per unit is faster: node 2 gets every task it has room for.
    assert_eq!(run(20), [2, 2, 2, 2]);
}

#[test]
fn speed_ranks_are_ordered_and_never_overflow() {
    assert_eq!(speed_rank(None), 0);
    let ranks: Vec<u32> = [1e-9, 1e-3, 0.1, 10.0, 1e12, f64::MAX]
        .iter()
        .map(|&s| speed_rank(Some(s)))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
    assert!(ranks.iter().all(|&r| r >= 1), "{ranks:?}");
    assert_eq!(speed_rank(Some(0.010)), speed_rank(Some(0.0101)));
}
