//! Checks that a plan can run under an order mode: the order's implied waits plus the
//! declared dependencies must not form a cycle.

use crate::sched::Order;
use crate::Task;

/// A plan that cannot run under the chosen order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The waits of `order` and the declared dependencies form a cycle.
    #[error(
        "the plan cannot run in {order} order: {} waits for {} ({}), which waits for it",
        cycle.first().map_or("", String::as_str),
        cycle.last().map_or("", String::as_str),
        cycle.join(" -> ")
    )]
    Cycle {
        /// The order the plan was checked under.
        order: Order,
        /// The ids of the tasks of the cycle, each waiting for the next (the last waits for
        /// the first).
        cycle: Vec<String>,
    },
}

/// For each task, the tasks it waits for: its dependencies plus what `order` implies
/// (strict: the previous task; type: the previous task of its type).
pub fn waits(tasks: &[Task], order: Order) -> Vec<Vec<usize>> {
    let index = crate::task::IdIndex::build(tasks);
    let mut last_of_kind: std::collections::HashMap<&str, usize> = Default::default();
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut w: Vec<usize> = t
                .deps()
                .iter()
                .filter_map(|d| index.get(tasks, d))
                .collect();
            match order {
                Order::Strict if i > 0 => w.push(i - 1),
                Order::Type => {
                    if let Some(&p) = last_of_kind.get(t.kind()) {
                        w.push(p);
                    }
                    last_of_kind.insert(t.kind(), i);
                }
                _ => {}
            }
            w
        })
        .collect()
}

/// Fails when the plan's waits under `order` form a cycle (e.g. in strict order, a task that
/// depends on a later one), naming the tasks involved.
pub fn check(tasks: &[Task], order: Order) -> Result<(), PlanError> {
    if tasks.iter().all(|t| t.deps().is_empty()) {
        // What an order implies points back in the file only: no cycle without `after`.
        return Ok(());
    }
    let edges = waits(tasks, order);
    match find_cycle(&edges) {
        None => Ok(()),
        Some(cycle) => {
            let cycle = cycle.iter().map(|&i| tasks[i].id().to_owned()).collect();
            Err(PlanError::Cycle { order, cycle })
        }
    }
}

/// A cycle in the graph `edges[i]` = nodes `i` points to, as the list of its nodes, or `None`.
/// Iterative, so deep chains cannot overflow the stack.
pub fn find_cycle(edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    const NEW: u8 = 0;
    const ACTIVE: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![NEW; edges.len()];
    for root in 0..edges.len() {
        if state[root] != NEW {
            continue;
        }
        // Stack of (node, next edge index); `path` mirrors it.
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = ACTIVE;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&to) = edges[node].get(*next) {
                *next += 1;
                match state.get(to).copied() {
                    Some(NEW) => {
                        state[to] = ACTIVE;
                        stack.push((to, 0));
                    }
                    Some(ACTIVE) => {
                        let from = stack.iter().position(|&(n, _)| n == to).unwrap_or(0);
                        return Some(stack[from..].iter().map(|&(n, _)| n).collect());
                    }
                    _ => {}
                }
            } else {
                state[node] = DONE;
                stack.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::parse::parse;

    #[test]
    fn finds_cycles_and_accepts_dags() {
        assert_eq!(find_cycle(&[vec![1], vec![2], vec![]]), None);
        let c = find_cycle(&[vec![1], vec![2], vec![0]]).unwrap();
        assert_eq!(c.len(), 3);
        // A long chain does not overflow.
        let chain: Vec<Vec<usize>> = (0..200_000)
            .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
            .collect();
        assert_eq!(find_cycle(&chain), None);
    }

    #[test]
    fn strict_order_refuses_a_dependency_on_a_later_task() {
        let tasks = parse("t", "a1 after b1\nb1").unwrap();
        let PlanError::Cycle { order, cycle } = check(&tasks, Order::Strict).unwrap_err();
        assert_eq!(order, Order::Strict);
        assert_eq!(cycle, ["a1", "b1"]);
        check(&tasks, Order::None).unwrap();
    }

    #[test]
    fn type_order_detects_cross_type_cycles() {
        // a1 < a2 and b1 < b2 by type order; a1 after b2 and b1 after a2 close a cycle.
        let tasks = parse("t", "a1 after b2\nb1 after a2\na2 b2").unwrap();
        assert!(check(&tasks, Order::Type).is_err());
        check(&tasks, Order::None).unwrap();
    }
}
