//! What a [`Connection`] may do, checked after every input it is fed.
//!
//! Shared, file for file, by the property suite (`tests/proptest_conn.rs`) and the fuzz
//! target `fuzz/fuzz_targets/handshake.rs` (which includes it with `#[path]`), so both check
//! the same rules. It depends on nothing but `p2p_core`.
//!
//! The rules:
//!
//! - nothing but `Established` comes out before the handshake: no task, result, cancel or
//!   goodbye is accepted first, and `Established` happens at most once;
//! - before the handshake an initiator sends only `Hello`, an acceptor only `Welcome` or
//!   `Reject`;
//! - once an input failed (the owner closes the connection then), nothing more comes out;
//! - the peer never has more tasks in flight on us than our capacity, never reuses a seq in
//!   flight, never assigns after a goodbye; a result is reported once, and only for a task we
//!   assigned; a cancel only for a task in flight;
//! - `GoodbyeAck` is sent only when nothing is in flight either way;
//! - the connection's own in-flight counts always equal this model's.

#![allow(dead_code)]

use std::collections::HashSet;

use p2p_core::conn::{Connection, Event, Role};
use p2p_core::Message;

/// The model of one connection; see the module docs.
#[derive(Debug)]
pub struct Checker {
    role: Role,
    capacity: usize,
    established: bool,
    dead: bool,
    inbound: HashSet<u64>,
    outbound: HashSet<u64>,
    peer_said_goodbye: bool,
    we_said_goodbye: bool,
    /// Every event seen, in order (for assertion messages and callers' own checks).
    pub events: Vec<Event>,
    /// Every message the connection sent, in order.
    pub sent: Vec<Message>,
}

impl Checker {
    /// A model of a fresh connection with `role` whose local capacity is `capacity`.
    pub fn new(role: Role, capacity: u32) -> Self {
        Checker {
            role,
            capacity: capacity as usize,
            established: false,
            dead: false,
            inbound: HashSet::new(),
            outbound: HashSet::new(),
            peer_said_goodbye: false,
            we_said_goodbye: false,
            events: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// Whether the handshake succeeded.
    pub fn established(&self) -> bool {
        self.established
    }

    /// Whether an input failed (the connection must be closed).
    pub fn dead(&self) -> bool {
        self.dead
    }

    /// Records that `conn.assign` accepted an assignment with `seq`.
    pub fn assigned(&mut self, seq: u64) {
        assert!(
            self.established && !self.dead,
            "assign accepted outside an open connection"
        );
        assert!(
            !self.we_said_goodbye && !self.peer_said_goodbye,
            "assign accepted after goodbye"
        );
        assert!(self.outbound.insert(seq), "assign accepted a seq in flight");
    }

    /// Records that `conn.complete` accepted the result of the peer's task `seq`.
    pub fn completed(&mut self, seq: u64) {
        assert!(
            self.inbound.remove(&seq),
            "complete accepted a seq not in flight"
        );
    }

    /// Drains what `conn` produced after one input described by `input`, and checks it.
    /// `failed`: the input returned an error (the owner closes the connection).
    pub fn check(&mut self, conn: &mut Connection, input: &str, failed: bool) {
        let was_dead = self.dead;
        let mut events = Vec::new();
        while let Some(e) = conn.poll_event() {
            events.push(e);
        }
        let mut sent = Vec::new();
        while let Some(m) = conn.poll_transmit() {
            sent.push(m);
        }
        if was_dead {
            assert!(
                events.is_empty() && sent.is_empty(),
                "{input}: a failed connection still produced {events:?} / {sent:?}"
            );
        }
        for e in &events {
            match e {
                Event::Established(_) => {
                    assert!(!self.established, "{input}: established twice");
                    self.established = true;
                }
                other => assert!(
                    self.established,
                    "{input}: {other:?} accepted before the handshake"
                ),
            }
            match e {
                Event::Assigned(a) => {
                    assert!(
                        !self.we_said_goodbye && !self.peer_said_goodbye,
                        "{input}: assignment accepted after goodbye"
                    );
                    assert!(
                        self.inbound.insert(a.seq),
                        "{input}: duplicate seq {} accepted",
                        a.seq
                    );
                    assert!(
                        self.inbound.len() <= self.capacity,
                        "{input}: {} tasks in flight over capacity {}",
                        self.inbound.len(),
                        self.capacity
                    );
                }
                Event::Completed(c) => assert!(
                    self.outbound.remove(&c.seq),
                    "{input}: result for seq {} that was not in flight",
                    c.seq
                ),
                Event::Started { seq } => assert!(
                    self.outbound.contains(seq),
                    "{input}: start of seq {seq} that is not in flight"
                ),
                Event::Cancelled { seq } => assert!(
                    self.inbound.contains(seq),
                    "{input}: cancel of seq {seq} that is not in flight"
                ),
                Event::PeerGoodbye => {
                    assert!(!self.peer_said_goodbye, "{input}: second PeerGoodbye");
                    self.peer_said_goodbye = true;
                }
                Event::Established(_)
                | Event::Finished
                | Event::StatusRequested
                | Event::Status(_)
                | Event::Transfer(_)
                | Event::HostedRequest(_)
                | Event::HostedAnswer(_)
                | Event::Replica(_) => {}
                Event::Load(r) => {
                    let ceiling = conn.peer().map_or(0, |p| p.capacity);
                    assert!(
                        r.capacity <= ceiling,
                        "{input}: a load report raised the capacity to {} over the handshake's {ceiling}",
                        r.capacity
                    );
                    assert_eq!(conn.peer_capacity(), r.capacity, "{input}");
                }
            }
        }
        for m in &sent {
            if !self.established {
                let allowed = match self.role {
                    Role::Initiator => matches!(m, Message::Hello(_)),
                    Role::Acceptor => matches!(m, Message::Welcome(_) | Message::Reject(_)),
                };
                assert!(
                    allowed,
                    "{input}: {:?} sent {} before the handshake",
                    self.role,
                    m.kind()
                );
            }
            match m {
                Message::Goodbye => self.we_said_goodbye = true,
                Message::GoodbyeAck => assert!(
                    self.inbound.is_empty() && self.outbound.is_empty(),
                    "{input}: GoodbyeAck with tasks in flight ({:?} in, {:?} out)",
                    self.inbound,
                    self.outbound
                ),
                _ => {}
            }
        }
        assert_eq!(
            conn.inbound_in_flight(),
            self.inbound.len(),
            "{input}: inbound count"
        );
        assert_eq!(
            conn.outbound_in_flight(),
            self.outbound.len(),
            "{input}: outbound count"
        );
        if failed {
            self.dead = true;
            assert!(
                !conn.is_open(),
                "{input}: the input failed but the connection is still open"
            );
        }
        self.events.extend(events);
        self.sent.extend(sent);
    }
}
