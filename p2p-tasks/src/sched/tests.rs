#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn tasks(ids: &str) -> Vec<Task> {
    ids.split_whitespace()
        .enumerate()
        .map(|(i, id)| {
            let kind = id.trim_end_matches(|c: char| c.is_ascii_digit());
            let mut t = Task::new(id, kind).unwrap();
            t.set_position(1, i as u32 + 1);
            t
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
    // a1 had started at the node, a2 not yet: their losses count apart.
    assert_eq!(s.remove_node(1, &[1, 0], |t| t == 0), vec![0, 1]);
    assert_eq!((s.losses(0), s.losses(1)), ((1, 0), (0, 1)));
    assert_eq!(s.missing_kinds(), vec!["a".to_string()]);
    s.add_node(2, &["a".into()], 2);
    let ds = drain(&mut s, now);
    assert!(ds.iter().all(|d| d.node == 2 && d.attempt == 2));
    s.complete(0, true, now);
    s.complete(1, true, now);
    assert!(s.is_finished());
}

/// A lost node's tasks are found from the list its caller gives, whatever that list holds:
/// the same tasks come back with the full list, with one missing or empty (then every task
/// is looked at), with tasks of another node and duplicates in it, and beside a slot held
/// without a task.
#[test]
fn a_lost_nodes_tasks_are_the_same_whatever_the_callers_list() {
    let lists: [&[usize]; 5] = [
        &[0, 1, 2],
        &[2, 0],
        &[],
        &[2, 2, 1, 0, 3, 4, 99],
        &[0, 1, 2],
    ];
    for (case, list) in lists.into_iter().enumerate() {
        let mut s = Scheduler::new(
            &tasks("a1 a2 a3 a4 a5"),
            Policy {
                order: Order::None,
                ..Policy::default()
            },
        );
        s.add_node(1, &["a".into()], 4);
        let now = Instant::now();
        let ds = drain(&mut s, now);
        assert_eq!(ds.len(), 4);
        // Task 3 ends; in the last case its slot stays held (an attempt given up on).
        s.complete(3, true, now);
        if case == 4 {
            s.hold(1);
        }
        s.add_node(2, &["a".into()], 4);
        let on_two = drain(&mut s, now);
        assert_eq!(on_two.iter().map(|d| d.task).collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            s.remove_node(1, list, |_| false),
            vec![0, 1, 2],
            "case {case}"
        );
        assert_eq!(s.status(4), Some(TaskStatus::Running(2)), "case {case}");
        assert!(
            s.is_ready(0) && s.is_ready(1) && s.is_ready(2),
            "case {case}"
        );
        // Only a list that misses one of the node's tasks costs a look at every task.
        assert_eq!(
            s.full_scans,
            u32::from(case == 1 || case == 2),
            "case {case}"
        );
    }
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
    s.remove_node(second, &[0], |_| true);
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
    // Below the saturation bit of a free-set key.
    assert!(ranks.iter().all(|&r| r < 1 << 15), "{ranks:?}");
    assert!(speed_rank(Some(f64::NAN)) < 1 << 15);
    assert_eq!(speed_rank(Some(0.010)), speed_rank(Some(0.0101)));
}

/// Runs `s` to its end on a virtual clock: node `key` (from 1) of `nodes` takes
/// `secs[key - 1] x cost` per task and has `cap` slots. Every result is observed as a
/// coordinator would. Returns the makespan and the tasks each node ran.
fn simulate(s: &mut Scheduler, costs: &[u32], nodes: &[(f64, u32)]) -> (Duration, Vec<usize>) {
    for (i, &(_, cap)) in nodes.iter().enumerate() {
        s.add_node(i as u64 + 1, &["a".into()], cap);
    }
    let t0 = Instant::now();
    let mut now = t0;
    let mut running: Vec<(Instant, usize, NodeKey)> = Vec::new();
    let mut ran = vec![0; nodes.len()];
    for _ in 0..10 * costs.len() + 10 {
        while let Some(d) = s.next(now) {
            let secs = nodes[d.node as usize - 1].0 * f64::from(costs[d.task]);
            running.push((now + Duration::from_secs_f64(secs), d.task, d.node));
            ran[d.node as usize - 1] += 1;
        }
        let Some(i) = (0..running.len()).min_by_key(|&i| running[i].0) else {
            break;
        };
        let (end, task, node) = running.swap_remove(i);
        let started =
            end - Duration::from_secs_f64(nodes[node as usize - 1].0 * f64::from(costs[task]));
        now = end;
        s.observe(task, node, end - started);
        s.complete(task, true, now);
    }
    assert!(s.is_finished(), "the simulation ended before the run");
    (now - t0, ran)
}

fn costed(costs: &[u32], order: Order) -> Scheduler {
    let mut ts = tasks(
        &(0..costs.len())
            .map(|i| format!("a{i}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    for (t, &c) in ts.iter_mut().zip(costs) {
        t.extra_mut().cost = c;
    }
    Scheduler::new(
        &ts,
        Policy {
            order,
            ..Policy::default()
        },
    )
}

#[test]
fn a_free_slow_node_waits_when_the_fast_one_would_finish_the_queue_sooner() {
    let setup = |n: usize| {
        let mut s = costed(&vec![1; n], Order::None);
        s.add_node(1, &["a".into()], 1);
        s.add_node(2, &["a".into()], 1);
        // Node 1 takes 20 ms per task, node 2 100 ms (measured often enough to be known).
        for _ in 0..20 {
            s.observe(0, 1, Duration::from_millis(20));
            s.observe(0, 2, Duration::from_millis(100));
        }
        s
    };
    let now = Instant::now();
    // Three tasks: the fast node runs the first, and finishes the other two (40 ms, plus
    // half of the one it runs) before the slow node could finish one (100 ms).
    let mut s = setup(3);
    let nodes: Vec<NodeKey> = drain(&mut s, now).iter().map(|d| d.node).collect();
    assert_eq!(nodes, [1]);
    // The same when both machines are saturated (a loaded host): speeds still decide.
    let mut s = setup(3);
    s.set_saturated(1, true);
    s.set_saturated(2, true);
    let nodes: Vec<NodeKey> = drain(&mut s, now).iter().map(|d| d.node).collect();
    assert_eq!(nodes, [1]);
    // Forty tasks: 39 queued are 0.8 s of the fast node's time; the slow node helps.
    let mut s = setup(40);
    let nodes: Vec<NodeKey> = drain(&mut s, now).iter().map(|d| d.node).collect();
    assert_eq!(nodes, [1, 2]);
}

#[test]
fn in_strict_order_the_fast_node_gets_the_tasks_with_probes() {
    let mut s = costed(&[1; 40], Order::Strict);
    let (took, ran) = simulate(&mut s, &[1; 40], &[(0.02, 1), (0.1, 1)]);
    // One probe of the slow node per PROBE_EVERY starts, and its first measurement.
    assert!(ran[1] <= 1 + 40 / PROBE_EVERY as usize, "{ran:?}");
    assert!(ran[0] >= 36, "{ran:?}");
    // Within 1.5x of the fast node alone (0.8 s).
    assert!(took.as_secs_f64() < 1.2, "{took:?}");
}

#[test]
fn longest_first_on_two_equal_nodes_ends_with_the_long_task() {
    let mut costs = vec![1u32; 10];
    costs.push(10);
    let mut s = costed(&costs, Order::None);
    let (took, _) = simulate(&mut s, &costs, &[(0.1, 1), (0.1, 1)]);
    assert!((took.as_secs_f64() - 1.0).abs() < 1e-6, "{took:?}");
}

#[test]
fn a_heterogeneous_mesh_ends_near_its_lower_bound() {
    // Six nodes of speeds 1x..6x, 2,000 tasks of costs 1 to 10 (deterministic).
    let costs: Vec<u32> = (0..2000u64)
        .map(|i| 1 + (mix_for_test(i) % 10) as u32)
        .collect();
    let nodes: Vec<(f64, u32)> = (1..=6).map(|k| (0.01 / f64::from(k), 1)).collect();
    let speed: f64 = (1..=6).map(|k| f64::from(k) / 0.01).sum();
    let work: f64 = costs.iter().map(|&c| f64::from(c)).sum();
    let bound = (work / speed).max(10.0 * 0.01 / 6.0);
    let mut s = costed(&costs, Order::None);
    let (took, ran) = simulate(&mut s, &costs, &nodes);
    let ratio = took.as_secs_f64() / bound;
    eprintln!("heterogeneous mesh: {ratio:.3}x the lower bound, {ran:?}");
    assert!(
        ratio < 1.15,
        "makespan {took:?}, bound {bound:.3} s: {ratio:.3}x, {ran:?}"
    );
    // Faster nodes ran more tasks.
    assert!(ran.windows(2).all(|w| w[0] < w[1]), "{ran:?}");
}

fn mix_for_test(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn a_saturated_node_gets_work_only_when_the_others_are_full() {
    let mut s = costed(&[1; 4], Order::None);
    s.add_node(1, &["a".into()], 2);
    s.add_node(2, &["a".into()], 2);
    s.set_saturated(1, true);
    let nodes: Vec<NodeKey> = drain(&mut s, Instant::now())
        .iter()
        .map(|d| d.node)
        .collect();
    assert_eq!(nodes, [2, 2, 1, 1]);
    // No longer saturated: by load again.
    let mut s = costed(&[1; 4], Order::None);
    s.add_node(1, &["a".into()], 2);
    s.add_node(2, &["a".into()], 2);
    s.set_saturated(1, true);
    s.set_saturated(1, false);
    let nodes: Vec<NodeKey> = drain(&mut s, Instant::now())
        .iter()
        .map(|d| d.node)
        .collect();
    assert_eq!(nodes, [1, 2, 1, 2]);
}

#[test]
fn a_shrink_cancels_nothing_and_a_grow_starts_more() {
    let mut s = costed(&[1; 6], Order::None);
    s.add_node(1, &["a".into()], 3);
    let now = Instant::now();
    assert_eq!(drain(&mut s, now).len(), 3);
    s.set_capacity(1, 1);
    assert_eq!(s.running(), 3, "running work is not cancelled");
    // Two results leave one running: still at the new capacity, nothing starts.
    s.complete(0, true, now);
    s.complete(1, true, now);
    assert!(drain(&mut s, now).is_empty());
    s.complete(2, true, now);
    assert_eq!(drain(&mut s, now).len(), 1);
    s.set_capacity(1, 3);
    assert_eq!(drain(&mut s, now).len(), 2);
    // Capacity 0: the type has no node that can take work.
    s.set_capacity(1, 0);
    assert_eq!(s.missing_kinds(), ["a".to_string()]);
}

#[test]
fn the_builder_numbers_tasks_and_types_in_file_order() {
    // Built last task first (as a run takes its plan apart): types still come in order of
    // first appearance, each type's tasks in file order, and costs, retries and
    // dependencies stay with their task.
    let mut plan = tasks("b1 a1 b2 c1 a2");
    plan[3].extra_mut().cost = 5;
    plan[1].extra_mut().retries = Some(7);
    plan[4].extra_mut().deps = vec!["c1".into()];
    let s = Scheduler::new(&plan, Policy::default());
    assert_eq!(s.kinds(), ["b", "a", "c"]);
    assert_eq!(s.kind_tasks, vec![vec![0, 2], vec![1, 4], vec![3]]);
    let kinds: Vec<usize> = s.slots.iter().map(|x| x.kind()).collect();
    assert_eq!(kinds, [0, 1, 0, 2, 1]);
    assert_eq!(s.slots[3].cost, 5);
    assert_eq!(s.slots[1].retries, 7);
    assert_eq!(s.slots[0].retries, Policy::default().retries);
    assert_eq!(s.waiting, [0, 0, 0, 0, 1]);
    assert_eq!(s.dependents[3], vec![4]);
    assert!(!s.uniform_cost);
}

#[test]
fn built_last_task_first_or_in_file_order_the_scheduler_is_the_same() {
    let mut plan = tasks("b1 a1 b2 c1 a2 d1 c2");
    plan[3].extra_mut().cost = 5;
    plan[1].extra_mut().retries = Some(7);
    plan[4].extra_mut().deps = vec!["c1".into()];
    let from_end = {
        let mut b = Builder::new(Policy::default(), plan.len());
        for t in plan.iter().rev() {
            b.push_front(t.kind(), t.cost(), t.retries());
        }
        b.finish(dependents_of(&plan))
    };
    let mut b = Builder::new(Policy::default(), plan.len());
    let numbers: Vec<usize> = plan
        .iter()
        .map(|t| b.push_back(t.kind(), t.cost(), t.retries()))
        .collect();
    let in_order = b.finish(dependents_of(&plan));
    // In file order, the number a push returns is the type's for good.
    assert_eq!(numbers, [0, 1, 0, 2, 1, 3, 2]);
    for s in [&from_end, &in_order] {
        assert_eq!(s.kinds(), ["b", "a", "c", "d"]);
        assert_eq!(
            s.kind_tasks,
            vec![vec![0, 2], vec![1, 4], vec![3, 6], vec![5]]
        );
        let slots: Vec<(usize, u32, u32)> = s
            .slots
            .iter()
            .map(|x| (x.kind(), x.cost, x.retries))
            .collect();
        assert_eq!(
            slots,
            [
                (0, 1, 0),
                (1, 1, 7),
                (0, 1, 0),
                (2, 5, 0),
                (1, 1, 0),
                (3, 1, 0),
                (2, 1, 0)
            ]
        );
        assert_eq!(s.waiting, [0, 0, 0, 0, 1, 0, 0]);
        assert!(!s.uniform_cost);
    }
}

#[test]
fn a_tasks_slot_stays_small() {
    // One per task of the plan: a million tasks pay 40 MB for it (it was 64 bytes with the
    // avoided node in every slot, 48 with a word for its type and its dependency count).
    assert!(
        std::mem::size_of::<Slot>() <= 40,
        "{}",
        std::mem::size_of::<Slot>()
    );
}

/// Every kind's free set, as the scheduler keeps it, against one built from scratch from the
/// nodes' state (a straightforward model: every free node serving the kind, keyed by its
/// saturation, the speed rank of its estimate computed afresh, its exact load and its key),
/// and the node a task of each kind would be offered against the model's first.
///
/// Between looks, a set may hold entries keyed as the node last was (on the kind's dirty
/// list); each node has one entry at most, keyed as [`NodeSlot::keyed`] says, and a node
/// not on the dirty list is keyed exactly. The kinds `k` with `look + k` a multiple of 3 are
/// looked at (settled) and must then equal the model exactly: not every kind after every
/// event, so that entries stay out of date over several events.
fn check_free_sets(s: &mut Scheduler, look: u32) -> Result<(), String> {
    type Model = (u32, u32, u32, NodeKey);
    for k in 0..s.kinds.len() {
        let looked = (look + k as u32).is_multiple_of(3);
        let offered = if looked {
            s.peek_node(k, None).map(|(_, n)| n)
        } else {
            None
        };
        let mut model: Vec<Model> = Vec::new();
        for (&node, n) in s.nodes.iter() {
            if n.ranks.len() != n.est.len() || n.keyed.len() != n.est.len() {
                return Err(format!("node {node}: per-kind vectors differ in length"));
            }
            for (j, &e) in n.est.iter().enumerate() {
                if n.ranks[j] != speed_rank(e) {
                    return Err(format!("node {node}: kept rank {} of {e:?}", n.ranks[j]));
                }
            }
            let Some(j) = n.kinds.iter().position(|&x| x == k) else {
                continue;
            };
            let word = (u32::from(n.saturated) << 31) | speed_rank(n.est[j]);
            let entries: Vec<&FreeKey> = s.free[k].iter().filter(|e| e.node == node).collect();
            let (keyed, dirty) = n.keyed[j];
            match entries[..] {
                [] if keyed == UNKEYED => {}
                [e] if keyed == e.running && e.word == word && e.capacity == n.capacity => {}
                _ => return Err(format!("kind {k}: node {node} ({n:?}) has {entries:?}")),
            }
            if dirty && !s.dirty[k].iter().any(|&i| s.nodes.at(i) == Some(node)) {
                return Err(format!("kind {k}: node {node} dirty but not listed"));
            }
            if !dirty && keyed != n.due() {
                return Err(format!(
                    "kind {k}: node {node} ({n:?}) out of date, not dirty"
                ));
            }
            if n.is_listed() && n.is_free() {
                model.push((word, n.running, n.capacity, node));
            }
        }
        if s.free[k].iter().any(|e| !s.nodes.contains_key(&e.node)) {
            return Err(format!("kind {k}: an entry of a node that is gone"));
        }
        if !looked {
            continue;
        }
        // Loads compared as fractions in 128 bits: no overflow to reason about.
        model.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then((u128::from(a.1) * u128::from(b.2)).cmp(&(u128::from(b.1) * u128::from(a.2))))
                .then(a.3.cmp(&b.3))
        });
        let kept: Vec<Model> = s.free[k]
            .iter()
            .map(|f| (f.word, f.running, f.capacity, f.node))
            .collect();
        if kept != model {
            return Err(format!(
                "kind {k}: settled free set {kept:?}, model {model:?}"
            ));
        }
        let first = model.first().map(|m| m.3);
        if offered != first {
            return Err(format!("kind {k}: offered {offered:?}, model {model:?}"));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Event {
    Next,
    Complete(usize, bool),
    Observe(usize, u16),
    ObserveFailure(usize),
    Saturated(u8, bool),
    Capacity(u8, u8),
    Drain(u8),
    Remove(u8),
    Add(u8, u8, u8),
    Hold(u8),
    Release(u8),
    Requeue(usize),
}

fn event() -> impl proptest::strategy::Strategy<Value = Event> {
    use proptest::prelude::*;
    prop_oneof![
        8 => Just(Event::Next),
        6 => (any::<usize>(), proptest::bool::weighted(0.9)).prop_map(|(t, ok)| Event::Complete(t, ok)),
        3 => (any::<usize>(), 1u16..2000).prop_map(|(t, ms)| Event::Observe(t, ms)),
        1 => any::<usize>().prop_map(Event::ObserveFailure),
        1 => (0u8..6, any::<bool>()).prop_map(|(n, b)| Event::Saturated(n, b)),
        1 => (0u8..6, 0u8..5).prop_map(|(n, c)| Event::Capacity(n, c)),
        1 => (0u8..6).prop_map(Event::Drain),
        1 => (0u8..6).prop_map(Event::Remove),
        1 => (0u8..6, 1u8..8, 0u8..5).prop_map(|(n, m, c)| Event::Add(n, m, c)),
        1 => (0u8..6).prop_map(Event::Hold),
        1 => (0u8..6).prop_map(Event::Release),
        1 => any::<usize>().prop_map(Event::Requeue),
    ]
}

/// Node keys that do not sort as the nodes were added (ties in the free sets go by key).
const MODEL_KEYS: [NodeKey; 6] = [40, 7, 1 << 40, 13, 2, 900];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Over random sequences of starts, results, speed measurements, saturation and
    /// capacity changes, drains, losses and rejoins, holds and requeues (up to 48 x 300
    /// events), every kind's free set is exactly what the nodes' state says, in order, and
    /// the node offered first is the model's: the kept ranks and the moves of a node by one
    /// step of load choose no other node than a full sort would.
    #[test]
    fn free_sets_match_a_model_built_from_scratch(
        order in proptest::prop_oneof![proptest::strategy::Just(Order::None), proptest::strategy::Just(Order::Strict)],
        costs in proptest::collection::vec(1u32..4, 30..60),
        retries in 0u32..3,
        events in proptest::collection::vec(event(), 1..300),
    ) {
        let kinds = ["a", "b", "c"];
        let mut ts = tasks(
            &(0..costs.len())
                .map(|i| format!("{}{i}", kinds[i % 3]))
                .collect::<Vec<_>>()
                .join(" "),
        );
        for (t, &c) in ts.iter_mut().zip(&costs) {
            t.extra_mut().cost = c;
        }
        let mut s = Scheduler::new(&ts, Policy { order, retries, keep_going: true, ..Policy::default() });
        let types = |mask: u8| -> Vec<String> {
            (0..3).filter(|b| mask & (1 << b) != 0).map(|b| kinds[b].to_string()).collect()
        };
        for (i, &key) in MODEL_KEYS.iter().enumerate() {
            s.add_node(key, &types(7 - (i as u8 % 3)), 1 + i as u32 % 3);
        }
        let t0 = Instant::now();
        let mut now = t0;
        let mut running: Vec<usize> = Vec::new();
        let mut checked = 0u32;
        for ev in events {
            now += Duration::from_millis(50);
            let pick = |i: usize| (!running.is_empty()).then(|| running[i % running.len()]);
            match ev {
                Event::Next => {
                    if let Some(d) = s.next(now) {
                        proptest::prop_assert_eq!(s.status(d.task), Some(TaskStatus::Running(d.node)));
                        running.push(d.task);
                    }
                }
                Event::Complete(i, ok) => {
                    if let Some(t) = pick(i) {
                        s.complete(t, ok, now);
                    }
                }
                Event::Observe(i, ms) => {
                    if let Some(t) = pick(i) {
                        if let Some(TaskStatus::Running(node)) = s.status(t) {
                            s.observe(t, node, Duration::from_millis(u64::from(ms)));
                        }
                    }
                }
                Event::ObserveFailure(i) => {
                    if let Some(t) = pick(i) {
                        if let Some(TaskStatus::Running(node)) = s.status(t) {
                            s.observe_failure(t, node);
                        }
                    }
                }
                Event::Saturated(n, b) => s.set_saturated(MODEL_KEYS[n as usize], b),
                Event::Capacity(n, c) => s.set_capacity(MODEL_KEYS[n as usize], u32::from(c)),
                Event::Drain(n) => s.drain_node(MODEL_KEYS[n as usize]),
                Event::Remove(n) => {
                    s.remove_node(MODEL_KEYS[n as usize], &running, |_| true);
                }
                Event::Add(n, mask, c) => {
                    let key = MODEL_KEYS[n as usize];
                    if !s.nodes.contains_key(&key) {
                        s.add_node(key, &types(mask), u32::from(c));
                    }
                }
                Event::Hold(n) => s.hold(MODEL_KEYS[n as usize]),
                Event::Release(n) => s.release(MODEL_KEYS[n as usize]),
                Event::Requeue(i) => {
                    if let Some(t) = pick(i) {
                        s.requeue(t);
                    }
                }
            }
            running.retain(|&t| matches!(s.status(t), Some(TaskStatus::Running(_))));
            checked += 1;
            if let Err(e) = check_free_sets(&mut s, checked) {
                return Err(proptest::test_runner::TestCaseError::fail(format!("after {ev:?}: {e}")));
            }
        }
    }
}

#[test]
fn a_kind_nobody_asks_for_keeps_a_bounded_dirty_list_while_nodes_come_and_go() {
    // Only type a has work; nodes serving a and b join, run a task and leave, many times:
    // b's free set is never looked at, and its dirty list must not grow with every visit.
    let mut s = Scheduler::new(
        &tasks("a1 b1"),
        Policy {
            order: Order::None,
            ..Policy::default()
        },
    );
    s.mark_done(1);
    let now = Instant::now();
    for round in 0..1_000u64 {
        let node = 100 + round;
        s.add_node(node, &["a".into(), "b".into()], 2);
        let d = s.next(now).expect("a1 starts");
        s.requeue(d.task);
        s.remove_node(node, &[], |_| false);
        // One node at a time: the bound kept at each join is 2 x 1 + 16, and one start
        // after it adds a slot.
        assert!(
            s.dirty[1].len() <= 19,
            "round {round}: {}",
            s.dirty[1].len()
        );
    }
    assert!(check_free_sets(&mut s, 0).is_ok());
}
