#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::testing::{assign, completed, hello};
use crate::{ConnectionError, HandshakeError, Violation};

/// A coordinator (initiator) and a worker (acceptor) wired back to back.
struct Pair {
    c: Connection,
    w: Connection,
    now: Instant,
}

impl Pair {
    fn new(worker_capacity: u32) -> Self {
        let now = Instant::now();
        let c = Connection::new(
            Role::Initiator,
            hello("default", &[], 1),
            Config::default(),
            now,
        );
        let w = Connection::new(
            Role::Acceptor,
            hello("default", &["a"], worker_capacity),
            Config::default(),
            now,
        );
        Pair { c, w, now }
    }

    /// Delivers queued messages both ways until both are quiet.
    fn drive(&mut self) -> Result<(), Error> {
        loop {
            let mut moved = false;
            while let Some(m) = self.c.poll_transmit() {
                moved = true;
                self.w.handle_message(m, self.now)?;
            }
            while let Some(m) = self.w.poll_transmit() {
                moved = true;
                self.c.handle_message(m, self.now)?;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn events(conn: &mut Connection) -> Vec<Event> {
        std::iter::from_fn(|| conn.poll_event()).collect()
    }
}

#[test]
fn handshake_establishes_both_sides() {
    let mut p = Pair::new(2);
    p.drive().unwrap();
    assert!(p.c.is_open() && p.w.is_open());
    let ce = Pair::events(&mut p.c);
    assert!(matches!(&ce[..], [Event::Established(h)] if h.types == vec!["a".to_string()]));
    let we = Pair::events(&mut p.w);
    assert!(matches!(&we[..], [Event::Established(h)] if h.capacity == 1));
}

#[test]
fn a_hello_over_a_bound_or_with_a_bad_type_gets_reject_invalid() {
    let now = Instant::now();
    let mut w = Connection::new(
        Role::Acceptor,
        hello("c", &["a"], 1),
        Config::default(),
        now,
    );
    let bound = Error::Handshake(HandshakeError::Bound {
        what: "number of types",
        len: 65,
        max: 64,
    });
    let err = w.handle_invalid(bound);
    assert!(matches!(
        err,
        Error::Handshake(HandshakeError::Bound { len: 65, .. })
    ));
    match w.poll_transmit() {
        Some(Message::Reject(r)) => {
            assert_eq!(r.reason, RejectReason::Invalid);
            assert!(r.message.contains("number of types is 65"), "{r:?}");
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    // Other decoding errors are closed without an answer.
    let mut w = Connection::new(
        Role::Acceptor,
        hello("c", &["a"], 1),
        Config::default(),
        now,
    );
    let _ = w.handle_invalid(Error::Connection(ConnectionError::Decode("x".into())));
    assert_eq!(w.poll_transmit(), None);
    // A type that is not lower-case letters.
    let mut w = Connection::new(
        Role::Acceptor,
        hello("c", &["a"], 1),
        Config::default(),
        now,
    );
    let err = w
        .handle_message(Message::Hello(hello("c", &["\u{1b}[2J"], 1)), now)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Handshake(HandshakeError::Refused {
                reason: RejectReason::Invalid,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(matches!(w.poll_transmit(), Some(Message::Reject(_))));
}

#[test]
fn cluster_mismatch_is_rejected_with_a_reason() {
    let now = Instant::now();
    let mut c = Connection::new(
        Role::Initiator,
        hello("blue", &[], 1),
        Config::default(),
        now,
    );
    let mut w = Connection::new(
        Role::Acceptor,
        hello("green", &["a"], 1),
        Config::default(),
        now,
    );
    let h = c.poll_transmit().unwrap();
    let err = w.handle_message(h, now).unwrap_err();
    assert!(matches!(
        err,
        Error::Handshake(HandshakeError::Refused {
            reason: RejectReason::Cluster,
            ..
        })
    ));
    let reject = w.poll_transmit().unwrap();
    let err = c.handle_message(reject, now).unwrap_err();
    assert!(matches!(
        err,
        Error::Handshake(HandshakeError::Rejected {
            reason: RejectReason::Cluster,
            ..
        })
    ));
}

#[test]
fn version_mismatch_is_rejected() {
    let now = Instant::now();
    let mut w = Connection::new(
        Role::Acceptor,
        hello("default", &["a"], 1),
        Config::default(),
        now,
    );
    let mut h = hello("default", &[], 1);
    h.version = PROTOCOL_VERSION + 1;
    let err = w.handle_message(Message::Hello(h), now).unwrap_err();
    assert!(matches!(
        err,
        Error::Handshake(HandshakeError::Refused {
            reason: RejectReason::Version,
            ..
        })
    ));
    assert!(matches!(w.poll_transmit(), Some(Message::Reject(_))));
}

#[test]
fn nothing_but_hello_is_accepted_before_the_handshake() {
    let now = Instant::now();
    let mut w = Connection::new(
        Role::Acceptor,
        hello("default", &["a"], 1),
        Config::default(),
        now,
    );
    let err = w
        .handle_message(Message::Assign(assign(1)), now)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Connection(ConnectionError::Violation(Violation::Unexpected {
            got: "Assign",
            ..
        }))
    ));
}

#[test]
fn handshake_times_out() {
    let now = Instant::now();
    let cfg = Config::default();
    let mut w = Connection::new(
        Role::Acceptor,
        hello("default", &["a"], 1),
        cfg.clone(),
        now,
    );
    assert_eq!(w.poll_timeout(), Some(now + cfg.handshake_timeout));
    w.handle_timeout(now + cfg.handshake_timeout / 2).unwrap();
    let err = w.handle_timeout(now + cfg.handshake_timeout).unwrap_err();
    assert!(matches!(err, Error::Handshake(HandshakeError::Timeout(_))));
}

#[test]
fn heartbeats_are_sent_and_silence_kills() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    let cfg = Config::default();
    let t1 = p.now + cfg.heartbeat_interval;
    p.c.handle_timeout(t1).unwrap();
    assert!(matches!(p.c.poll_transmit(), Some(Message::Ping { .. })));
    // The worker answers a ping with a pong, which counts as life.
    p.w.handle_message(Message::Ping { nonce: 5 }, t1).unwrap();
    assert_eq!(p.w.poll_transmit(), Some(Message::Pong { nonce: 5 }));
    p.c.handle_message(Message::Pong { nonce: 5 }, t1).unwrap();
    p.c.handle_timeout(t1 + cfg.idle_timeout - Duration::from_millis(1))
        .unwrap();
    let err = p.c.handle_timeout(t1 + cfg.idle_timeout).unwrap_err();
    assert!(matches!(
        err,
        Error::Connection(ConnectionError::PeerTimeout(_))
    ));
}

#[test]
fn assignments_respect_capacity_both_ways() {
    let mut p = Pair::new(2);
    p.drive().unwrap();
    p.c.assign(assign(1)).unwrap();
    p.c.assign(assign(2)).unwrap();
    assert!(p.c.assign(assign(3)).is_err(), "peer capacity is 2");
    p.drive().unwrap();
    assert_eq!(p.w.inbound_in_flight(), 2);
    // A misbehaving peer that ignores our capacity is a protocol violation.
    let err =
        p.w.handle_message(Message::Assign(assign(9)), p.now)
            .unwrap_err();
    assert!(matches!(
        err,
        Error::Connection(ConnectionError::Violation(Violation::OverCapacity {
            capacity: 2
        }))
    ));
}

#[test]
fn duplicate_seq_is_a_violation() {
    let mut p = Pair::new(4);
    p.drive().unwrap();
    p.w.handle_message(Message::Assign(assign(1)), p.now)
        .unwrap();
    let err =
        p.w.handle_message(Message::Assign(assign(1)), p.now)
            .unwrap_err();
    assert!(matches!(
        err,
        Error::Connection(ConnectionError::Violation(Violation::DuplicateSeq(1)))
    ));
}

#[test]
fn an_assignment_after_goodbye_and_a_second_goodbye_are_typed_violations() {
    let mut p = Pair::new(4);
    p.drive().unwrap();
    // A task in flight keeps the connection open through the goodbye.
    p.c.assign(assign(1)).unwrap();
    p.drive().unwrap();
    p.c.goodbye();
    p.drive().unwrap();
    // The coordinator said goodbye: it may not assign any more.
    let err =
        p.w.handle_message(Message::Assign(assign(5)), p.now)
            .unwrap_err();
    match err {
        Error::Connection(ConnectionError::Violation(Violation::AssignAfterGoodbye { task })) => {
            assert_eq!(task, assign(5).task)
        }
        other => panic!("{other:?}"),
    }

    let mut p = Pair::new(4);
    p.drive().unwrap();
    p.c.assign(assign(1)).unwrap();
    p.drive().unwrap();
    p.w.handle_message(Message::Goodbye, p.now).unwrap();
    let err = p.w.handle_message(Message::Goodbye, p.now).unwrap_err();
    assert!(matches!(
        err,
        Error::Connection(ConnectionError::Violation(Violation::SecondGoodbye))
    ));
}

#[test]
fn task_round_trip_and_goodbye_from_the_coordinator() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    Pair::events(&mut p.c);
    Pair::events(&mut p.w);
    p.c.assign(assign(7)).unwrap();
    p.drive().unwrap();
    assert_eq!(Pair::events(&mut p.w), vec![Event::Assigned(assign(7))]);
    // Goodbye while the task runs: no ack until the result went back.
    p.c.goodbye();
    p.drive().unwrap();
    assert_eq!(Pair::events(&mut p.w), vec![Event::PeerGoodbye]);
    assert!(!p.w.is_finished() && !p.c.is_finished());
    p.w.complete(completed(7)).unwrap();
    p.drive().unwrap();
    assert!(p.w.is_finished() && p.c.is_finished());
    assert_eq!(
        Pair::events(&mut p.c),
        vec![Event::Completed(completed(7)), Event::Finished]
    );
    assert_eq!(Pair::events(&mut p.w), vec![Event::Finished]);
    assert!(p.c.handle_eof().is_ok(), "EOF after goodbye is clean");
}

#[test]
fn worker_goodbye_drains_then_finishes_and_blocks_new_work() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.c.assign(assign(1)).unwrap();
    p.drive().unwrap();
    p.w.goodbye();
    p.drive().unwrap();
    assert!(!p.c.can_assign());
    assert!(p.c.assign(assign(2)).is_err());
    p.w.complete(completed(1)).unwrap();
    p.drive().unwrap();
    assert!(p.c.is_finished() && p.w.is_finished());
}

#[test]
fn simultaneous_goodbyes_finish_cleanly() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.c.goodbye();
    p.w.goodbye();
    p.drive().unwrap();
    assert!(p.c.is_finished() && p.w.is_finished());
}

#[test]
fn eof_without_goodbye_is_a_lost_connection() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    assert!(matches!(
        p.c.handle_eof(),
        Err(Error::Connection(ConnectionError::Lost))
    ));
}

#[test]
fn started_reaches_the_assigner_only_for_tasks_in_flight() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    Pair::events(&mut p.c);
    p.w.started(1);
    assert!(
        p.w.poll_transmit().is_none(),
        "no Started for a seq not assigned"
    );
    p.c.assign(assign(1)).unwrap();
    p.drive().unwrap();
    p.w.started(1);
    p.drive().unwrap();
    assert_eq!(Pair::events(&mut p.c), vec![Event::Started { seq: 1 }]);
    // A Started for a seq the assigner no longer tracks is ignored.
    p.w.complete(completed(1)).unwrap();
    p.drive().unwrap();
    Pair::events(&mut p.c);
    p.c.handle_message(Message::Started { seq: 1 }, p.now)
        .unwrap();
    p.c.handle_message(Message::Started { seq: 99 }, p.now)
        .unwrap();
    assert!(Pair::events(&mut p.c).is_empty());
    assert!(p.c.is_open());
}

#[test]
fn cancel_reaches_the_worker_only_for_tasks_in_flight() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    Pair::events(&mut p.w);
    assert!(p.c.cancel(1).is_err());
    p.c.assign(assign(1)).unwrap();
    p.c.cancel(1).unwrap();
    p.drive().unwrap();
    assert_eq!(
        Pair::events(&mut p.w),
        vec![Event::Assigned(assign(1)), Event::Cancelled { seq: 1 }]
    );
}

#[test]
fn a_refused_assignment_comes_back_whole() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.c.try_assign(assign(1)).unwrap();
    let (back, why) = p.c.try_assign(assign(2)).unwrap_err();
    assert_eq!(back, assign(2));
    assert!(why.contains("capacity"), "{why}");
    let (back, why) = p.c.try_assign(assign(1)).unwrap_err();
    assert_eq!(back, assign(1));
    assert!(!why.is_empty());
}

#[test]
fn seq_hash_spreads_sequential_and_crafted_seqs() {
    use std::collections::HashSet;
    use std::hash::BuildHasher;
    let h = SeqHash::default();
    // Low bits of sequential seqs, and of seqs that differ only in high bits, all differ.
    let low: HashSet<u64> = (0..4096u64).map(|x| h.hash_one(x) & 0xfff).collect();
    assert!(low.len() > 2500, "{}", low.len());
    let high: HashSet<u64> = (0..4096u64).map(|x| h.hash_one(x << 40) & 0xfff).collect();
    assert!(high.len() > 2500, "{}", high.len());
    // Two builders have different keys.
    assert_ne!(h.hash_one(7u64), SeqHash::default().hash_one(7u64));
}

fn report(tasks: usize) -> StatusReport {
    StatusReport {
        version: "0.1.0".into(),
        uptime_s: 3,
        running_total: tasks as u64,
        running: (0..tasks)
            .map(|i| crate::message::RunningTask {
                task: format!("a{i}"),
                kind: "a".into(),
                running_ms: 10,
                coordinator: "c".into(),
            })
            .collect(),
        ..StatusReport::default()
    }
}

#[test]
fn a_status_request_is_answered_once_and_goodbye_still_closes() {
    let mut p = Pair::new(1);
    p.drive().unwrap();
    Pair::events(&mut p.c);
    Pair::events(&mut p.w);
    p.c.request_status().unwrap();
    // One request at a time.
    assert!(p.c.request_status().is_err());
    p.drive().unwrap();
    assert_eq!(Pair::events(&mut p.w), vec![Event::StatusRequested]);
    // More tasks than the protocol lists: the answer is cut to the bound, the total kept.
    let big = report(crate::message::MAX_STATUS_TASKS + 10);
    p.w.answer_status(big.clone()).unwrap();
    // Answered: nothing more to answer.
    assert!(p.w.answer_status(report(0)).is_err());
    p.drive().unwrap();
    let got = Pair::events(&mut p.c);
    let [Event::Status(r)] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(r.running.len(), crate::message::MAX_STATUS_TASKS);
    assert_eq!(r.running_total, big.running_total);
    // And again, then goodbye as usual.
    p.c.request_status().unwrap();
    p.drive().unwrap();
    p.w.answer_status(report(1)).unwrap();
    p.drive().unwrap();
    assert!(matches!(&Pair::events(&mut p.c)[..], [Event::Status(r)] if r.running.len() == 1));
    p.c.goodbye();
    p.drive().unwrap();
    assert!(p.c.is_finished() && p.w.is_finished());
}

#[test]
fn status_out_of_turn_is_a_violation() {
    // A Status nobody asked for.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    let err =
        p.c.handle_message(Message::Status(Box::new(report(0))), p.now)
            .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connection(ConnectionError::Violation(Violation::UnaskedStatus))
        ),
        "{err}"
    );
    // Two requests before an answer.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.w.handle_message(Message::StatusRequest, p.now).unwrap();
    let err =
        p.w.handle_message(Message::StatusRequest, p.now)
            .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connection(ConnectionError::Violation(Violation::SecondStatusRequest))
        ),
        "{err}"
    );
    // An answer over the bounds.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.c.request_status().unwrap();
    let over = report(crate::message::MAX_STATUS_TASKS + 1);
    let err =
        p.c.handle_message(Message::Status(Box::new(over)), p.now)
            .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connection(ConnectionError::Violation(Violation::StatusOverBounds))
        ),
        "{err}"
    );
    // Before the handshake, a request is refused like anything else.
    let mut p = Pair::new(1);
    assert!(p.w.handle_message(Message::StatusRequest, p.now).is_err());
}

#[test]
fn a_status_report_is_cut_on_character_boundaries() {
    let mut r = report(1);
    r.running[0].task = "é".repeat(crate::message::MAX_STATUS_STRING);
    let r = r.bounded();
    assert!(r.is_bounded());
    assert!(r.running[0].task.len() <= crate::message::MAX_STATUS_STRING);
    assert!(r.running[0].task.chars().all(|c| c == 'é'));
}

fn load(capacity: u32) -> LoadReport {
    LoadReport {
        capacity,
        running: 1,
        waiting: 0,
        cores: 2,
        load_milli: Some(500),
        mem_available_kib: Some(1024),
        busy_ms: 10,
        tasks: 3,
    }
}

#[test]
fn a_load_report_changes_the_capacity_up_to_the_handshakes() {
    let mut p = Pair::new(2);
    p.drive().unwrap();
    Pair::events(&mut p.c);
    // The worker shrinks to 1: the coordinator learns it, and a second assignment waits.
    p.w.report_load(load(1));
    p.drive().unwrap();
    assert_eq!(Pair::events(&mut p.c), vec![Event::Load(load(1))]);
    assert_eq!(p.c.peer_capacity(), 1);
    p.c.assign(assign(1)).unwrap();
    assert!(p.c.assign(assign(2)).is_err(), "over the shrunk capacity");
    // Growing back is honoured, beyond the handshake's capacity not (sent or received).
    p.w.report_load(load(5));
    p.drive().unwrap();
    assert_eq!(Pair::events(&mut p.c), vec![Event::Load(load(2))]);
    p.c.handle_message(Message::Load(load(9)), p.now).unwrap();
    assert_eq!(Pair::events(&mut p.c), vec![Event::Load(load(2))]);
    assert_eq!(p.c.peer_capacity(), 2);
    p.c.assign(assign(2)).unwrap();
    assert!(p.c.assign(assign(3)).is_err());
    // The worker still accepts what was sent under its handshake's capacity (a shrink
    // races with assignments already on their way).
    p.w.report_load(load(1));
    p.drive().unwrap();
    assert!(p.w.is_open() && p.c.is_open());
    // A coordinator serves nothing: it has no load to report.
    p.c.report_load(load(1));
    assert!(p.c.poll_transmit().is_none());
}

#[test]
fn a_load_report_before_the_handshake_is_a_violation() {
    let now = Instant::now();
    let mut w = Connection::new(
        Role::Acceptor,
        hello("default", &["a"], 1),
        Config::default(),
        now,
    );
    assert!(w.handle_message(Message::Load(load(1)), now).is_err());
}

fn chunk(offset: u64) -> Transfer {
    Transfer::Chunk {
        id: 1,
        offset,
        data: vec![0; 100].into(),
    }
}

#[test]
fn transfer_messages_flow_after_the_handshake_and_chunks_yield_to_control_frames() {
    let mut p = Pair::new(4);
    assert!(
        p.c.transfer(Transfer::Have { id: 1 }).is_err(),
        "not open yet"
    );
    p.drive().unwrap();
    // The worker asks for transfer 1 (the credit its chunks need).
    p.w.transfer(Transfer::Want {
        id: 1,
        window: 1 << 20,
    })
    .unwrap();
    p.drive().unwrap();
    while p.c.poll_event().is_some() {}
    while p.w.poll_event().is_some() {}
    // Four chunks, then an assignment and a ping: the control frames go first, and a chunk
    // is held back while the writer is still full.
    for i in 0..4 {
        assert!(p.c.has_chunk_room());
        p.c.transfer(chunk(i * 100)).unwrap();
    }
    assert!(!p.c.has_chunk_room());
    p.c.assign(assign(1)).unwrap();
    p.c.transfer(Transfer::Have { id: 9 }).unwrap();
    assert!(matches!(p.c.poll_transmit(), Some(Message::Assign(_))));
    assert!(matches!(
        p.c.poll_transmit(),
        Some(Message::Transfer(t)) if matches!(*t, Transfer::Have { id: 9 })
    ));
    assert_eq!(
        p.c.poll_transmit_with(crate::transfer::WRITE_LOW_WATER),
        None
    );
    assert!(p.c.has_transmit());
    let first = p.c.poll_transmit_with(0).unwrap();
    assert!(crate::transfer::is_chunk(&first));
    p.w.handle_message(first, p.now).unwrap();
    p.w.handle_message(Message::Assign(assign(1)), p.now)
        .unwrap();
    assert!(
        matches!(p.w.poll_event(), Some(Event::Transfer(t)) if matches!(*t, Transfer::Chunk { offset: 0, .. }))
    );
    assert!(matches!(p.w.poll_event(), Some(Event::Assigned(_))));
    p.drive().unwrap();
    let rest: Vec<Event> = std::iter::from_fn(|| p.w.poll_event()).collect();
    assert_eq!(rest.len(), 3, "{rest:?}");
}

#[test]
fn a_transfer_message_before_the_handshake_is_a_violation() {
    let now = Instant::now();
    let mut w = Connection::new(
        Role::Acceptor,
        hello("default", &["a"], 1),
        Config::default(),
        now,
    );
    let err = w
        .handle_message(Message::Transfer(Box::new(chunk(0))), now)
        .unwrap_err();
    assert!(
        matches!(err, Error::Connection(ConnectionError::Violation(_))),
        "{err}"
    );
}

fn violation(e: &Error) -> Option<&Violation> {
    match e {
        Error::Connection(ConnectionError::Violation(v)) => Some(v),
        _ => None,
    }
}

/// The transfer id of a chunk-over-credit violation, if that is what `e` is.
fn over_credit(e: &Error) -> Option<u64> {
    match violation(e) {
        Some(Violation::ChunkOverCredit { id, .. }) => Some(*id),
        _ => None,
    }
}

#[test]
fn a_hosted_request_gets_answers_until_a_final_one_then_another_may_follow() {
    use crate::hosted::{Hosted, RunEnd, RunState};
    let mut p = Pair::new(1);
    p.drive().unwrap();
    Pair::events(&mut p.c);
    Pair::events(&mut p.w);
    let attach = Hosted::Attach { run: "r1".into() };
    p.c.send_hosted(attach.clone()).unwrap();
    // One request at a time; and a side with nothing to answer cannot answer.
    assert!(p.c.send_hosted(Hosted::List).is_err());
    assert!(p
        .w
        .send_hosted(Hosted::Event { json: "{}".into() })
        .is_err());
    p.drive().unwrap();
    assert_eq!(
        Pair::events(&mut p.w),
        vec![Event::HostedRequest(Box::new(attach))]
    );
    assert!(p.w.hosted_owed());
    p.w.send_hosted(Hosted::Event { json: "{}".into() })
        .unwrap();
    let end = Hosted::Ended(RunEnd {
        run: "r1".into(),
        state: RunState::Succeeded,
        exit: 0,
    });
    p.w.send_hosted(end.clone()).unwrap();
    assert!(!p.w.hosted_owed());
    // Answered for good: nothing more may be sent for it.
    assert!(p
        .w
        .send_hosted(Hosted::Event { json: "{}".into() })
        .is_err());
    p.drive().unwrap();
    assert_eq!(
        Pair::events(&mut p.c),
        vec![
            Event::HostedAnswer(Box::new(Hosted::Event { json: "{}".into() })),
            Event::HostedAnswer(Box::new(end)),
        ]
    );
    p.c.send_hosted(Hosted::List).unwrap();
    p.drive().unwrap();
    assert_eq!(
        Pair::events(&mut p.w),
        vec![Event::HostedRequest(Box::new(Hosted::List))]
    );
    p.w.send_hosted(Hosted::Runs(Vec::new())).unwrap();
    p.drive().unwrap();
    p.c.goodbye();
    p.drive().unwrap();
    assert!(p.c.is_finished() && p.w.is_finished());
}

#[test]
fn hosted_messages_out_of_turn_or_over_bounds_are_violations() {
    use crate::hosted::Hosted;
    let msg = |h: Hosted| Message::Hosted(Box::new(h));
    // An answer nobody asked for.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    let err =
        p.c.handle_message(msg(Hosted::Submitted { run: "r".into() }), p.now)
            .unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedHosted), "{err}");
    // A second request before the first was answered.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.w.handle_message(msg(Hosted::List), p.now).unwrap();
    let err = p.w.handle_message(msg(Hosted::List), p.now).unwrap_err();
    assert_eq!(
        violation(&err),
        Some(&Violation::SecondHostedRequest),
        "{err}"
    );
    // A run id over its bound.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    let long = "x".repeat(crate::hosted::MAX_RUN_ID + 1);
    let err =
        p.w.handle_message(msg(Hosted::Attach { run: long }), p.now)
            .unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::HostedOverBounds), "{err}");
    // Before the handshake, like anything else.
    let mut p = Pair::new(1);
    assert!(p.w.handle_message(msg(Hosted::List), p.now).is_err());
}

#[test]
fn replica_messages_flow_both_ways_and_over_bounds_are_violations() {
    use crate::replica::Replica;
    let msg = |run: &str| Message::Replica(Box::new(Replica::Cancel { run: run.into() }));
    // Either side sends them, owing no answer.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.c.send_replica(Replica::Cancel { run: "r".into() })
        .unwrap();
    p.w.send_replica(Replica::Cancel { run: "s".into() })
        .unwrap();
    p.drive().unwrap();
    assert!(p.c.is_open() && p.w.is_open());
    let cancel = |run: &str| Event::Replica(Box::new(Replica::Cancel { run: run.into() }));
    assert!(Pair::events(&mut p.w).contains(&cancel("r")));
    assert!(Pair::events(&mut p.c).contains(&cancel("s")));
    // A run id over its bound closes the connection.
    let mut p = Pair::new(1);
    p.drive().unwrap();
    let long = "x".repeat(crate::hosted::MAX_RUN_ID + 1);
    let err = p.w.handle_message(msg(&long), p.now).unwrap_err();
    assert_eq!(
        violation(&err),
        Some(&Violation::ReplicaOverBounds),
        "{err}"
    );
    // Before the handshake, like anything else.
    let mut p = Pair::new(1);
    assert!(p.w.handle_message(msg("r"), p.now).is_err());
    assert!(p
        .c
        .send_replica(Replica::Cancel { run: "r".into() })
        .is_err());
}

#[test]
fn a_goodbye_waits_for_the_final_answer_to_a_hosted_request() {
    use crate::hosted::{Hosted, RunEnd, RunState};
    let mut p = Pair::new(1);
    p.drive().unwrap();
    p.c.send_hosted(Hosted::Attach { run: "r".into() }).unwrap();
    p.drive().unwrap();
    // The host shuts down: it says goodbye while the client waits for the run's end.
    p.w.goodbye();
    p.drive().unwrap();
    assert!(
        !p.c.is_finished() && !p.w.is_finished(),
        "closed before the end was sent"
    );
    let end = Hosted::Ended(RunEnd {
        run: "r".into(),
        state: RunState::Interrupted,
        exit: 143,
    });
    p.w.send_hosted(end.clone()).unwrap();
    p.drive().unwrap();
    let got = Pair::events(&mut p.c);
    assert!(got.contains(&Event::HostedAnswer(Box::new(end))), "{got:?}");
    assert!(p.c.is_finished() && p.w.is_finished());
}

// File chunks against the credit this side gave (see "File chunks" in the module).

/// An open pair, its handshake's events taken.
fn open_pair() -> Pair {
    let mut p = Pair::new(4);
    p.drive().unwrap();
    Pair::events(&mut p.c);
    Pair::events(&mut p.w);
    p
}

const W: u32 = 4 * 64 * 1024;

fn want(id: u64, window: u32) -> Transfer {
    Transfer::Want { id, window }
}

fn ack(id: u64, received: u64) -> Transfer {
    Transfer::Ack { id, received }
}

fn abort(id: u64) -> Transfer {
    Transfer::Abort {
        id,
        reason: crate::message::AbortReason::Cancelled,
        message: String::new(),
    }
}

/// A chunk of `len` bytes of transfer `id` at `offset`, received by `conn`.
fn chunk_in(conn: &mut Connection, id: u64, offset: u64, len: usize) -> Result<(), Error> {
    let msg = Message::Transfer(Box::new(Transfer::Chunk {
        id,
        offset,
        data: vec![7; len].into(),
    }));
    conn.handle_message(msg, Instant::now())
}

/// How many chunks `conn` delivered to its owner (its events taken).
fn chunks_delivered(conn: &mut Connection) -> usize {
    Pair::events(conn)
        .iter()
        .filter(|e| matches!(e, Event::Transfer(t) if matches!(**t, Transfer::Chunk { .. })))
        .count()
}

/// Sends `total` bytes of transfer `id` from offset `from` in 64 KiB chunks (the last one
/// shorter) into `conn`.
fn stream_in(conn: &mut Connection, id: u64, from: u64, total: u64) -> Result<(), Error> {
    let mut off = from;
    while off < from + total {
        let len = (from + total - off).min(64 * 1024);
        chunk_in(conn, id, off, len as usize)?;
        off += len;
    }
    Ok(())
}

#[test]
fn a_chunk_of_a_transfer_this_side_never_asked_for_closes_the_connection() {
    let mut p = open_pair();
    let err = chunk_in(&mut p.w, 7, 0, 100).unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedChunk { id: 7 }));
    assert!(err.to_string().contains("did not ask for"), "{err}");
    assert!(!p.w.is_open());
    assert_eq!(chunks_delivered(&mut p.w), 0);
}

#[test]
fn chunks_up_to_the_credit_are_delivered_and_one_byte_beyond_closes_the_connection() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    stream_in(&mut p.w, 1, 0, u64::from(W)).unwrap();
    assert_eq!(chunks_delivered(&mut p.w), 4);
    let err = chunk_in(&mut p.w, 1, u64::from(W), 1).unwrap_err();
    assert_eq!(
        violation(&err),
        Some(&Violation::ChunkOverCredit {
            id: 1,
            end: u64::from(W) + 1,
            credit: u64::from(W),
        })
    );
    assert!(err.to_string().contains("beyond the credit"), "{err}");
    assert!(!p.w.is_open());
}

#[test]
fn each_ack_moves_the_credit_on_by_what_it_acknowledges() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    let quarter = u64::from(W / 4);
    stream_in(&mut p.w, 1, 0, u64::from(W)).unwrap();
    // An ack of a quarter gives a quarter more, not a window more.
    p.w.transfer(ack(1, quarter)).unwrap();
    stream_in(&mut p.w, 1, u64::from(W), quarter).unwrap();
    // An older ack gives nothing back.
    p.w.transfer(ack(1, 0)).unwrap();
    let err = chunk_in(&mut p.w, 1, u64::from(W) + quarter, 1).unwrap_err();
    assert!(
        matches!(
            violation(&err),
            Some(Violation::ChunkOverCredit { credit, .. }) if *credit == u64::from(W) + quarter
        ),
        "{err}"
    );
}

#[test]
fn a_chunk_repeated_within_the_credit_is_still_counted() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    // The same 64 KiB at offset 0, over and over: its offsets stay inside the credit, its
    // bytes do not (the offsets' order is the transfer's rule, the bytes the connection's).
    for _ in 0..4 {
        chunk_in(&mut p.w, 1, 0, 64 * 1024).unwrap();
    }
    let err = chunk_in(&mut p.w, 1, 0, 64 * 1024).unwrap_err();
    assert!(
        matches!(violation(&err), Some(Violation::ChunkOverCredit { id: 1, end, .. }) if *end == 5 * 64 * 1024),
        "{err}"
    );
}

#[test]
fn a_huge_offset_is_beyond_the_credit() {
    for offset in [u64::from(W), u64::MAX - 10, u64::MAX] {
        let mut p = open_pair();
        p.w.transfer(want(1, W)).unwrap();
        let err = chunk_in(&mut p.w, 1, offset, 100).unwrap_err();
        assert_eq!(over_credit(&err), Some(1), "{offset}: {err}");
    }
}

#[test]
fn an_empty_chunk_is_only_the_whole_of_an_empty_file() {
    // An empty file: its one empty chunk, then Done.
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    chunk_in(&mut p.w, 1, 0, 0).unwrap();
    assert_eq!(chunks_delivered(&mut p.w), 1);
    // A second one, or one after bytes, or at an offset: a flood of nothing is refused.
    let err = chunk_in(&mut p.w, 1, 0, 0).unwrap_err();
    assert_eq!(
        violation(&err),
        Some(&Violation::EmptyChunk { id: 1, offset: 0 })
    );
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    chunk_in(&mut p.w, 1, 0, 10).unwrap();
    let err = chunk_in(&mut p.w, 1, 10, 0).unwrap_err();
    assert_eq!(
        violation(&err),
        Some(&Violation::EmptyChunk { id: 1, offset: 10 })
    );
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    let err = chunk_in(&mut p.w, 1, 5, 0).unwrap_err();
    assert_eq!(
        violation(&err),
        Some(&Violation::EmptyChunk { id: 1, offset: 5 })
    );
}

#[test]
fn after_this_sides_done_a_chunk_is_a_violation() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    chunk_in(&mut p.w, 1, 0, 100).unwrap();
    p.w.transfer(Transfer::Done { id: 1 }).unwrap();
    let err = chunk_in(&mut p.w, 1, 100, 100).unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedChunk { id: 1 }));
}

#[test]
fn after_the_senders_abort_a_chunk_is_a_violation() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    chunk_in(&mut p.w, 1, 0, 100).unwrap();
    p.w.handle_message(Message::Transfer(Box::new(abort(1))), p.now)
        .unwrap();
    let err = chunk_in(&mut p.w, 1, 100, 100).unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedChunk { id: 1 }));
}

#[test]
fn chunks_in_flight_after_this_sides_abort_drain_up_to_the_credit_then_are_violations() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    stream_in(&mut p.w, 1, 0, 64 * 1024).unwrap();
    p.w.transfer(ack(1, 64 * 1024)).unwrap();
    assert_eq!(chunks_delivered(&mut p.w), 1);
    // This side gives up; the sender had sent the rest of its credit before it read that:
    // taken, and dropped (its owner no longer wants them).
    p.w.transfer(abort(1)).unwrap();
    stream_in(&mut p.w, 1, 64 * 1024, u64::from(W)).unwrap();
    assert!(p.w.is_open());
    assert_eq!(chunks_delivered(&mut p.w), 0, "dropped, not delivered");
    // The credit is used up: the transfer is forgotten.
    let err = chunk_in(&mut p.w, 1, u64::from(W) + 64 * 1024, 1).unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedChunk { id: 1 }));
    assert_eq!(p.w.credits.len(), 0);
    // And while draining, the credit still holds.
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    p.w.transfer(abort(1)).unwrap();
    let err = chunk_in(&mut p.w, 1, u64::from(W), 1).unwrap_err();
    assert_eq!(over_credit(&err), Some(1), "{err}");
}

#[test]
fn an_abort_after_the_last_byte_leaves_nothing_to_drain() {
    // A file whose hash did not match: every byte came, then this side's Abort.
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    stream_in(&mut p.w, 1, 0, u64::from(W)).unwrap();
    p.w.transfer(abort(1)).unwrap();
    assert_eq!(p.w.credits.len(), 0);
}

#[test]
fn an_id_asked_for_again_after_an_abort_takes_the_old_chunks_still_coming_and_the_new_ones() {
    let mut p = open_pair();
    p.w.transfer(want(1, W)).unwrap();
    stream_in(&mut p.w, 1, 0, 64 * 1024).unwrap();
    p.w.transfer(abort(1)).unwrap();
    // The sender offered again under the same id (its new Offer overtook the chunks it had
    // queued before it read the Abort), and this side wants it again.
    p.w.transfer(want(1, W)).unwrap();
    stream_in(&mut p.w, 1, 64 * 1024, 2 * 64 * 1024).unwrap();
    stream_in(&mut p.w, 1, 0, u64::from(W)).unwrap();
    stream_in(&mut p.w, 1, 3 * 64 * 1024, 64 * 1024).unwrap();
    assert!(p.w.is_open());
    // Both credits used up: one byte more is over.
    let err = chunk_in(&mut p.w, 1, 0, 1).unwrap_err();
    assert_eq!(over_credit(&err), Some(1), "{err}");
}

#[test]
fn transfers_given_up_are_remembered_at_most_max_draining_at_a_time() {
    let mut p = open_pair();
    let n = 10 * MAX_DRAINING as u64;
    for id in 1..=n {
        p.w.transfer(want(id, W)).unwrap();
        chunk_in(&mut p.w, id, 0, 100).unwrap();
        p.w.transfer(abort(id)).unwrap();
        assert!(p.w.credits.len() <= MAX_DRAINING, "{}", p.w.credits.len());
    }
    // The last ones still drain; the oldest is forgotten.
    chunk_in(&mut p.w, n, 100, 100).unwrap();
    chunk_in(&mut p.w, n + 1 - MAX_DRAINING as u64, 100, 100).unwrap();
    let err = chunk_in(&mut p.w, n - MAX_DRAINING as u64, 100, 100).unwrap_err();
    assert!(
        matches!(violation(&err), Some(Violation::UnaskedChunk { .. })),
        "{err}"
    );
}

#[test]
fn a_peers_own_wants_fetches_acks_and_offers_give_it_no_credit_and_no_table_entry() {
    let mut p = open_pair();
    let hash = crate::transfer::hash_bytes(b"x");
    for id in 0..10_000u64 {
        let msgs = [
            abort(id),
            Transfer::Done { id },
            want(id, u32::MAX),
            Transfer::Fetch {
                id,
                hash,
                window: u32::MAX,
            },
            ack(id, u64::MAX),
            Transfer::Offer { id, hash, size: 1 },
        ];
        for t in msgs {
            p.w.handle_message(Message::Transfer(Box::new(t)), p.now)
                .unwrap();
        }
    }
    assert_eq!(p.w.credits.len(), 0);
    Pair::events(&mut p.w);
    let err = chunk_in(&mut p.w, 5, 0, 100).unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedChunk { id: 5 }));
}

#[test]
fn many_transfers_open_at_once_each_keep_their_own_credit() {
    let mut p = open_pair();
    for id in 1..=8 {
        p.w.transfer(want(id, W)).unwrap();
    }
    // Interleaved, each up to its own credit.
    for k in 0..4u64 {
        for id in 1..=8 {
            chunk_in(&mut p.w, id, k * 64 * 1024, 64 * 1024).unwrap();
        }
    }
    assert_eq!(chunks_delivered(&mut p.w), 32);
    // One's credit is not another's: transfer 3 is full even though 9 was never asked for.
    let err = chunk_in(&mut p.w, 3, u64::from(W), 1).unwrap_err();
    assert_eq!(over_credit(&err), Some(3), "{err}");
}

#[test]
fn a_coordinator_fetching_an_output_keeps_the_node_to_its_credit_too() {
    // The other direction: the initiator fetches, the acceptor sends.
    let mut p = open_pair();
    p.c.transfer(Transfer::Fetch {
        id: 3,
        hash: crate::transfer::hash_bytes(b"x"),
        window: W,
    })
    .unwrap();
    p.drive().unwrap();
    stream_in(&mut p.c, 3, 0, u64::from(W)).unwrap();
    assert_eq!(chunks_delivered(&mut p.c), 4);
    let err = chunk_in(&mut p.c, 3, u64::from(W), 64 * 1024).unwrap_err();
    assert_eq!(over_credit(&err), Some(3), "{err}");
}

#[test]
fn a_whole_transfer_between_the_state_machines_keeps_to_the_credit() {
    // The Sender and Receiver of p2p_core::transfer through two connections: a file of
    // several windows, acked as the receiver says, ends with Done and leaves no entry.
    use crate::transfer::{Received, Receiver, Sender};
    let mut p = open_pair();
    let file: Vec<u8> = (0..(3 * W as usize + 12_345)).map(|i| i as u8).collect();
    let hash = crate::transfer::hash_bytes(&file);
    let mut s = Sender::offered(9, file.len() as u64, crate::transfer::SEND_CHUNK);
    let mut r = Receiver::new(9, hash, file.len() as u64, W, u64::MAX).unwrap();
    let Message::Transfer(want) = r.want() else {
        unreachable!()
    };
    p.w.transfer(*want).unwrap();
    p.drive().unwrap();
    Pair::events(&mut p.c);
    s.on_want(W).unwrap();
    let mut got = Vec::new();
    let mut rounds = 0;
    while !r.is_complete() {
        rounds += 1;
        assert!(rounds < 10_000);
        while let Some((off, len)) = s.poll_read() {
            let Message::Transfer(c) = s
                .chunk(off, file[off as usize..off as usize + len].to_vec())
                .unwrap()
            else {
                unreachable!()
            };
            p.c.transfer(*c).unwrap();
        }
        p.drive().unwrap();
        for e in Pair::events(&mut p.w) {
            let Event::Transfer(t) = e else { continue };
            let Transfer::Chunk { offset, data, .. } = *t else {
                continue;
            };
            match r.on_chunk(offset, &data).unwrap() {
                Received::Write(b) | Received::Complete(b) => got.extend_from_slice(b),
            }
            if let Some(Message::Transfer(a)) = r.poll_ack() {
                p.w.transfer(*a).unwrap();
            }
        }
        p.drive().unwrap();
        for e in Pair::events(&mut p.c) {
            if let Event::Transfer(t) = e {
                if let Transfer::Ack { received, .. } = *t {
                    s.on_ack(received).unwrap();
                }
            }
        }
    }
    assert_eq!(got, file);
    let Message::Transfer(done) = r.done() else {
        unreachable!()
    };
    p.w.transfer(*done).unwrap();
    assert_eq!(p.w.credits.len(), 0);
    assert!(p.w.is_open() && p.c.is_open());
}

#[test]
fn two_connections_keep_their_credits_apart() {
    let mut a = open_pair();
    let mut b = open_pair();
    a.w.transfer(want(5, W)).unwrap();
    let err = chunk_in(&mut b.w, 5, 0, 100).unwrap_err();
    assert_eq!(violation(&err), Some(&Violation::UnaskedChunk { id: 5 }));
    chunk_in(&mut a.w, 5, 0, 100).unwrap();
}
