//! The connection state machine: handshake, heartbeats, task bookkeeping and goodbye,
//! with no IO in it.
//!
//! Feed it what arrives ([`Connection::handle_message`], [`Connection::handle_eof`],
//! [`Connection::handle_timeout`]) and what the owner wants ([`Connection::assign`],
//! [`Connection::complete`], [`Connection::cancel`], [`Connection::goodbye`]); take out
//! what must be sent ([`Connection::poll_transmit`]), what happened
//! ([`Connection::poll_event`]) and when to wake it next ([`Connection::poll_timeout`]).
//! Time is passed in, so every rule can be tested without sockets or real clocks.
//!
//! # Goodbye
//!
//! `Goodbye` means "I will neither send nor accept new assignments". Tasks already in flight
//! in either direction run to completion (or are cancelled) and their `Completed` still flow.
//! The receiver of a `Goodbye` answers `GoodbyeAck` once nothing is in flight either way;
//! a connection is finished when one side has sent `GoodbyeAck` or received it.
//!
//! # File chunks
//!
//! The connection sees every transfer message both ways, so it keeps the credit this side
//! gave each file coming in (its `Want` or `Fetch`, then its `Ack`s) and counts the chunk
//! bytes that arrive: a chunk of a transfer this side never asked for (or no longer
//! expects: after its `Done`, or after the sender's `Abort`), or one beyond the credit, is
//! a [`Violation`] and closes the connection, so a peer can never make a node hold more
//! chunk data than the credit it gave. Chunks of a transfer this side gave up (its
//! `Abort`) that the sender had sent before it read the `Abort` are dropped here, up to the
//! credit. The offsets' order, the announced size and the hash are the transfer's own
//! rules ([`crate::transfer::Receiver`]).

use std::collections::VecDeque;

use crate::transfer::Outbox;
use credit::{Credits, Take};
use seqs::SeqSet;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::hosted::Hosted;
use crate::message::{
    Assign, Completed, Hello, LoadReport, Message, Reject, RejectReason, StatusReport, Transfer,
    PROTOCOL_VERSION,
};
use crate::{ConnectionError, Error, HandshakeError, Violation};

/// Timing rules of a connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long the handshake may take, from the connection's start. Default 5 s.
    pub handshake_timeout: Duration,
    /// A `Ping` is sent this often. Default 2 s.
    pub heartbeat_interval: Duration,
    /// The peer is declared dead after this long without any frame. Default 10 s.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// A fast keyed hash for sets and maps of `u64` numbers (task seqs, link ids), which are
/// hashed once or twice per task on the hot path: one multiplication instead of SipHash.
///
/// Each value gets a random key, so a peer that picks its own seqs cannot aim them at one
/// bucket. Not a general-purpose or cryptographic hash.
#[derive(Debug, Clone, Copy)]
pub struct SeqHash {
    key: u64,
}

impl Default for SeqHash {
    fn default() -> Self {
        SeqHash {
            key: rand::random::<u64>() | 1,
        }
    }
}

impl BuildHasher for SeqHash {
    type Hasher = SeqHasher;

    fn build_hasher(&self) -> SeqHasher {
        SeqHasher {
            key: self.key,
            state: 0,
        }
    }
}

/// The hasher of [`SeqHash`].
#[derive(Debug, Clone)]
pub struct SeqHasher {
    key: u64,
    state: u64,
}

impl SeqHasher {
    fn mix(&mut self, x: u64) {
        // Two folded 128-bit multiplies (as in foldhash): both halves of each product feed
        // the result, so every input bit reaches every output bit.
        let fold = |a: u64, b: u64| {
            let p = u128::from(a) * u128::from(b);
            (p as u64) ^ ((p >> 64) as u64)
        };
        let h = fold(x ^ self.state ^ self.key, 0x9e37_79b9_7f4a_7c15);
        self.state = fold(h ^ self.key.rotate_left(32), 0xbf58_476d_1ce4_e5b9);
    }
}

impl Hasher for SeqHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// Which side opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We dialled: we send `Hello` and expect `Welcome`.
    Initiator,
    /// We accepted: we expect `Hello` and answer `Welcome` or `Reject`.
    Acceptor,
}

/// What happened on the connection, for its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake succeeded; this is the peer's description.
    Established(Hello),
    /// The peer asks us to run a task.
    Assigned(Assign),
    /// A task we assigned started running at the peer (it had a free slot).
    Started {
        /// The assignment's seq.
        seq: u64,
    },
    /// A task we assigned has a result.
    Completed(Completed),
    /// The peer cancels a task it assigned to us; answer with `complete`.
    Cancelled {
        /// The assignment's seq.
        seq: u64,
    },
    /// The peer said goodbye: assign nothing more; finish what is in flight.
    PeerGoodbye,
    /// The goodbye exchange is complete; the connection can be closed.
    Finished,
    /// The peer asks how this node is: answer with [`Connection::answer_status`].
    StatusRequested,
    /// The answer to our [`Connection::request_status`].
    Status(Box<StatusReport>),
    /// The peer reported its load (its capacity here is what this connection honours: at
    /// most the one its handshake advertised).
    Load(LoadReport),
    /// A file-transfer message from the peer (protocol v3), for the owner's transfers.
    Transfer(Box<Transfer>),
    /// The peer sends a hosted-run request: answer it with [`Connection::send_hosted`],
    /// ending with a final answer ([`Hosted::is_final`]).
    HostedRequest(Box<Hosted>),
    /// An answer to our hosted-run request.
    HostedAnswer(Box<Hosted>),
    /// A replicated-run message of the peer (see [`crate::replica`]); no answer is owed.
    Replica(Box<crate::replica::Replica>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking,
    Open,
    Finished,
    Failed,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    state: State,
    config: Config,
    local: Hello,
    peer: Option<Hello>,
    started: Instant,
    last_recv: Instant,
    next_ping: Instant,
    ping_nonce: u64,
    /// Seqs we assigned to the peer that have no result yet.
    outbound: SeqSet,
    /// Seqs the peer assigned to us that we have not answered yet.
    inbound: SeqSet,
    we_said_goodbye: bool,
    peer_said_goodbye: bool,
    ack_sent: bool,
    /// We sent a `StatusRequest` that has no answer yet.
    status_asked: bool,
    /// The peer sent a `StatusRequest` we have not answered yet.
    status_owed: bool,
    /// The peer's capacity as its last `Load` reported it (at most its handshake's); none
    /// before the first.
    peer_capacity: Option<u32>,
    /// We sent a hosted-run request that has no final answer yet.
    hosted_asked: bool,
    /// The peer sent a hosted-run request we have not finally answered yet.
    hosted_owed: bool,
    /// Control frames first, file chunks between them ([`Outbox`]).
    transmit: Outbox,
    /// The credit given to each file coming in (see "File chunks" above).
    credits: Credits,
    events: VecDeque<Event>,
}

impl Connection {
    /// A connection in the handshake phase. An initiator queues its `Hello` at once.
    pub fn new(role: Role, local: Hello, config: Config, now: Instant) -> Self {
        let mut conn = Connection {
            role,
            state: State::Handshaking,
            next_ping: now + config.heartbeat_interval,
            config,
            local,
            peer: None,
            started: now,
            last_recv: now,
            ping_nonce: 0,
            outbound: SeqSet::default(),
            inbound: SeqSet::default(),
            we_said_goodbye: false,
            peer_said_goodbye: false,
            ack_sent: false,
            status_asked: false,
            status_owed: false,
            peer_capacity: None,
            hosted_asked: false,
            hosted_owed: false,
            transmit: Outbox::new(),
            credits: Credits::default(),
            events: VecDeque::new(),
        };
        if role == Role::Initiator {
            conn.transmit.push(Message::Hello(conn.local.clone()));
        }
        conn
    }

    /// The peer's description, once the handshake succeeded.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Whether the handshake is done and the connection not finished.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the goodbye exchange is complete (the socket may be closed now).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Whether new assignments may be sent to the peer.
    pub fn can_assign(&self) -> bool {
        self.state == State::Open && !self.we_said_goodbye && !self.peer_said_goodbye
    }

    /// How many of our assignments the peer is running.
    pub fn outbound_in_flight(&self) -> usize {
        self.outbound.len()
    }

    /// How many of the peer's assignments we are running.
    pub fn inbound_in_flight(&self) -> usize {
        self.inbound.len()
    }

    /// The next message to send, if any: every control frame before any file chunk.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmit.pop(0)
    }

    /// The next message to send, given that the writer still holds `buffered` bytes: control
    /// frames always, a file chunk only when the writer is nearly empty (see
    /// [`Outbox::pop`]), so a control frame queued later waits behind at most about one
    /// chunk.
    pub fn poll_transmit_with(&mut self, buffered: usize) -> Option<Message> {
        self.transmit.pop(buffered)
    }

    /// [`Connection::poll_transmit_with`], asking `buffered` only when a file chunk is
    /// next: a control frame goes whatever the writer holds, so the question is not asked
    /// for it (the driver's answer looks at its socket).
    pub fn poll_transmit_by(&mut self, buffered: impl FnOnce() -> usize) -> Option<Message> {
        // Under any `buffered` at or over the low water mark, only control frames come.
        if let Some(msg) = self.transmit.pop(usize::MAX) {
            return Some(msg);
        }
        if self.transmit.is_empty() {
            return None;
        }
        self.transmit.pop(buffered())
    }

    /// Whether something is queued to send (a chunk held back by
    /// [`Connection::poll_transmit_with`] included).
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Whether another file chunk may be queued ([`crate::transfer::OUTBOX_CHUNKS`]).
    pub fn has_chunk_room(&self) -> bool {
        self.transmit.has_chunk_room()
    }

    /// Sends a file-transfer message (protocol v3). A chunk goes behind every control frame
    /// queued before or after it; the caller queues one only when
    /// [`Connection::has_chunk_room`]. Fails when the connection is not open. A `Want` or
    /// `Fetch` gives the peer credit for chunks, each `Ack` moves it on, and a `Done` or
    /// `Abort` ends it (see "File chunks" above).
    pub fn transfer(&mut self, t: Transfer) -> Result<(), Error> {
        if self.state != State::Open {
            return Err(Error::InvalidState {
                action: "send a transfer message",
                why: "the connection is not open",
            });
        }
        match &t {
            Transfer::Want { id, window } | Transfer::Fetch { id, window, .. } => {
                self.credits.ask(*id, *window);
            }
            Transfer::Ack { id, received } => self.credits.ack(*id, *received),
            Transfer::Done { id } => self.credits.done(*id),
            Transfer::Abort { id, .. } => self.credits.abort(*id),
            _ => {}
        }
        self.transmit.push(Message::Transfer(Box::new(t)));
        Ok(())
    }

    /// The next event for the owner, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshaking => Some(self.started + self.config.handshake_timeout),
            State::Open => Some(
                self.next_ping
                    .min(self.last_recv + self.config.idle_timeout),
            ),
            State::Finished | State::Failed => None,
        }
    }

    /// Applies the timing rules. An error means the connection must be closed.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        match self.state {
            State::Handshaking if now >= self.started + self.config.handshake_timeout => self.fail(
                Error::Handshake(HandshakeError::Timeout(self.config.handshake_timeout)),
            ),
            State::Open => {
                if now >= self.last_recv + self.config.idle_timeout {
                    return self.fail(Error::Connection(ConnectionError::PeerTimeout(
                        self.config.idle_timeout,
                    )));
                }
                if now >= self.next_ping {
                    self.ping_nonce = self.ping_nonce.wrapping_add(1);
                    self.transmit.push(Message::Ping {
                        nonce: self.ping_nonce,
                    });
                    self.next_ping = now + self.config.heartbeat_interval;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The peer closed its side of the stream.
    pub fn handle_eof(&mut self) -> Result<(), Error> {
        match self.state {
            State::Finished => Ok(()),
            _ => self.fail(Error::Connection(ConnectionError::Lost)),
        }
    }

    /// Processes one received message. An error means the connection must be closed (after
    /// sending what [`Connection::poll_transmit`] still yields, such as a `Reject`).
    pub fn handle_message(&mut self, msg: Message, now: Instant) -> Result<(), Error> {
        self.last_recv = now;
        // Every frame of an open connection (the task path) straight there.
        if self.state == State::Open {
            return self.handle_open(msg);
        }
        match (self.state, msg) {
            (State::Handshaking, Message::Hello(hello)) if self.role == Role::Acceptor => {
                if let Some((reason, message)) = self.check_peer(&hello) {
                    self.transmit.push(Message::Reject(Reject {
                        reason,
                        message: message.clone(),
                    }));
                    return self.fail(Error::Handshake(HandshakeError::Refused {
                        reason,
                        message,
                    }));
                }
                self.transmit.push(Message::Welcome(self.local.clone()));
                self.establish(hello, now);
                Ok(())
            }
            (State::Handshaking, Message::Welcome(hello)) if self.role == Role::Initiator => {
                if let Some((reason, message)) = self.check_peer(&hello) {
                    return self.fail(Error::Handshake(HandshakeError::Refused {
                        reason,
                        message,
                    }));
                }
                self.establish(hello, now);
                Ok(())
            }
            (State::Handshaking, Message::Reject(r)) if self.role == Role::Initiator => {
                self.fail(Error::Handshake(HandshakeError::Rejected {
                    reason: r.reason,
                    message: r.message,
                }))
            }
            (State::Handshaking, other) => self.fail(
                Violation::Unexpected {
                    got: other.kind(),
                    state: "waiting for the handshake",
                }
                .into(),
            ),
            (State::Open, msg) => self.handle_open(msg),
            (
                State::Finished,
                Message::Ping { .. }
                | Message::Pong { .. }
                | Message::GoodbyeAck
                | Message::Load(_),
            ) => Ok(()),
            (State::Finished | State::Failed, other) => self.fail(
                Violation::Unexpected {
                    got: other.kind(),
                    state: "closing",
                }
                .into(),
            ),
        }
    }

    fn handle_open(&mut self, msg: Message) -> Result<(), Error> {
        match msg {
            Message::Assign(a) => {
                if self.we_said_goodbye || self.peer_said_goodbye {
                    return self.fail(
                        Violation::AssignAfterGoodbye {
                            task: a.task.into(),
                        }
                        .into(),
                    );
                }
                if self.inbound.len() >= self.local.capacity as usize {
                    return self.fail(
                        Violation::OverCapacity {
                            capacity: self.local.capacity,
                        }
                        .into(),
                    );
                }
                if !self.inbound.insert(a.seq) {
                    return self.fail(Violation::DuplicateSeq(a.seq).into());
                }
                self.events.push_back(Event::Assigned(a));
                Ok(())
            }
            Message::Completed(c) => {
                // A result for an unknown seq (e.g. one we gave up on) is ignored: execution
                // is at-least-once and the scheduler owns deduplication.
                if self.outbound.remove(c.seq) {
                    self.events.push_back(Event::Completed(c));
                    self.maybe_ack();
                }
                Ok(())
            }
            Message::Started { seq } => {
                // Like a result, a start for a seq we no longer track is ignored.
                if self.outbound.contains(seq) {
                    self.events.push_back(Event::Started { seq });
                }
                Ok(())
            }
            Message::Cancel { seq } => {
                if self.inbound.contains(seq) {
                    self.events.push_back(Event::Cancelled { seq });
                }
                Ok(())
            }
            Message::Ping { nonce } => {
                self.transmit.push(Message::Pong { nonce });
                Ok(())
            }
            Message::Pong { .. } => Ok(()),
            Message::Goodbye => {
                if self.peer_said_goodbye {
                    return self.fail(Violation::SecondGoodbye.into());
                }
                self.peer_said_goodbye = true;
                self.events.push_back(Event::PeerGoodbye);
                self.maybe_ack();
                Ok(())
            }
            Message::GoodbyeAck if self.we_said_goodbye => {
                self.finish();
                Ok(())
            }
            Message::StatusRequest => {
                if self.status_owed {
                    return self.fail(Violation::SecondStatusRequest.into());
                }
                self.status_owed = true;
                self.events.push_back(Event::StatusRequested);
                Ok(())
            }
            Message::Load(mut report) => {
                let ceiling = self.peer.as_ref().map_or(0, |p| p.capacity);
                report.capacity = report.capacity.min(ceiling);
                self.peer_capacity = Some(report.capacity);
                self.events.push_back(Event::Load(report));
                Ok(())
            }
            Message::Status(report) => {
                if !self.status_asked {
                    return self.fail(Violation::UnaskedStatus.into());
                }
                if !report.is_bounded() {
                    return self.fail(Violation::StatusOverBounds.into());
                }
                self.status_asked = false;
                self.events.push_back(Event::Status(report));
                Ok(())
            }
            Message::Transfer(t) => {
                // A chunk keeps to the credit this side gave; the rest of a transfer's rules
                // are its own (p2p_core::transfer); the decoder bounded every length.
                match &*t {
                    Transfer::Chunk { id, offset, data } => {
                        match self.credits.chunk(*id, *offset, data.len()) {
                            Ok(Take::Deliver) => {}
                            Ok(Take::Drop) => return Ok(()),
                            Err(v) => return self.fail(v.into()),
                        }
                    }
                    Transfer::Abort { id, .. } => self.credits.peer_abort(*id),
                    _ => {}
                }
                self.events.push_back(Event::Transfer(t));
                Ok(())
            }
            Message::Replica(r) => {
                if !r.is_bounded() {
                    return self.fail(Violation::ReplicaOverBounds.into());
                }
                self.events.push_back(Event::Replica(r));
                Ok(())
            }
            Message::Hosted(h) => {
                if !h.is_bounded() {
                    return self.fail(Violation::HostedOverBounds.into());
                }
                if h.is_request() {
                    if self.hosted_owed {
                        return self.fail(Violation::SecondHostedRequest.into());
                    }
                    self.hosted_owed = true;
                    self.events.push_back(Event::HostedRequest(h));
                } else {
                    if !self.hosted_asked {
                        return self.fail(Violation::UnaskedHosted.into());
                    }
                    let last = h.is_final();
                    self.events.push_back(Event::HostedAnswer(h));
                    if last {
                        self.hosted_asked = false;
                        self.maybe_ack();
                    }
                }
                Ok(())
            }
            other => self.fail(
                Violation::Unexpected {
                    got: other.kind(),
                    state: "open",
                }
                .into(),
            ),
        }
    }

    /// Sends an assignment to the peer. Fails (without harming the connection) when the
    /// connection is not open, is saying goodbye, or the peer is at its capacity.
    pub fn assign(&mut self, a: Assign) -> Result<(), Error> {
        self.try_assign(a).map_err(|(_, why)| Error::InvalidState {
            action: "assign",
            why,
        })
    }

    /// [`Connection::assign`], giving the assignment back with the reason when it cannot be
    /// sent (so the caller can re-queue it without having kept a copy).
    pub fn try_assign(&mut self, a: Assign) -> Result<(), (Assign, &'static str)> {
        if !self.can_assign() {
            return Err((a, "the connection is not open for new work"));
        }
        let capacity = self.peer_capacity() as usize;
        if self.outbound.len() >= capacity {
            return Err((a, "the peer is at its advertised capacity"));
        }
        if !self.outbound.insert(a.seq) {
            return Err((a, "seq already in flight"));
        }
        self.transmit.push(Message::Assign(a));
        Ok(())
    }

    /// Sends the result of a task the peer assigned to us.
    pub fn complete(&mut self, c: Completed) -> Result<(), Error> {
        if self.state != State::Open {
            return Err(Error::InvalidState {
                action: "complete",
                why: "the connection is not open",
            });
        }
        if !self.inbound.remove(c.seq) {
            return Err(Error::InvalidState {
                action: "complete",
                why: "no such assignment in flight",
            });
        }
        self.transmit.push(Message::Completed(c));
        self.maybe_ack();
        Ok(())
    }

    /// Tells the peer that a task it assigned to us started running (see
    /// [`Message::Started`]). Does nothing for a seq that is not in flight.
    pub fn started(&mut self, seq: u64) {
        if self.state == State::Open && self.inbound.contains(seq) {
            self.transmit.push(Message::Started { seq });
        }
    }

    /// The peer's capacity as this connection honours it: its last [`Message::Load`]'s, at
    /// most its handshake's (0 before the handshake).
    pub fn peer_capacity(&self) -> u32 {
        let ceiling = self.peer.as_ref().map_or(0, |p| p.capacity);
        self.peer_capacity.map_or(ceiling, |c| c.min(ceiling))
    }

    /// Reports this node's load to the peer ([`Message::Load`]), its capacity cut to the
    /// one this connection's handshake advertised. Does nothing unless the connection is
    /// open and this node serves types (a coordinator has no load to report).
    pub fn report_load(&mut self, mut report: LoadReport) {
        if self.state != State::Open || self.local.types.is_empty() {
            return;
        }
        report.capacity = report.capacity.min(self.local.capacity);
        self.transmit.push(Message::Load(report));
    }

    /// Asks the peer how it is; its answer comes as [`Event::Status`]. Fails when the
    /// connection is not open or a request is still unanswered.
    pub fn request_status(&mut self) -> Result<(), Error> {
        if self.state != State::Open || self.status_asked {
            return Err(Error::InvalidState {
                action: "request status",
                why: "the connection is not open, or a status request is unanswered",
            });
        }
        self.status_asked = true;
        self.transmit.push(Message::StatusRequest);
        Ok(())
    }

    /// Answers the peer's [`Event::StatusRequested`] (the report is cut to the protocol's
    /// bounds). Fails when nothing is asked or the connection is not open.
    pub fn answer_status(&mut self, report: StatusReport) -> Result<(), Error> {
        if self.state != State::Open || !self.status_owed {
            return Err(Error::InvalidState {
                action: "answer status",
                why: "no status request to answer",
            });
        }
        self.status_owed = false;
        self.transmit
            .push(Message::Status(Box::new(report.bounded())));
        Ok(())
    }

    /// Sends a hosted-run message: a request (when none of ours is unanswered) or an answer
    /// to the peer's request (a final one ends it). Fails, without harm to the connection,
    /// when the connection is not open or the message is out of turn.
    pub fn send_hosted(&mut self, h: Hosted) -> Result<(), Error> {
        let in_turn = if h.is_request() {
            !self.hosted_asked
        } else {
            self.hosted_owed
        };
        if self.state != State::Open || !in_turn {
            return Err(Error::InvalidState {
                action: "send a hosted-run message",
                why: "the connection is not open, or the message is out of turn",
            });
        }
        if h.is_request() {
            self.hosted_asked = true;
        } else if h.is_final() {
            self.hosted_owed = false;
        }
        self.transmit.push(Message::Hosted(Box::new(h)));
        Ok(())
    }

    /// Sends a replicated-run message (no answer is owed). Fails, without harm to the
    /// connection, when the connection is not open.
    pub fn send_replica(&mut self, r: crate::replica::Replica) -> Result<(), Error> {
        if self.state != State::Open {
            return Err(Error::InvalidState {
                action: "send a replicated-run message",
                why: "the connection is not open",
            });
        }
        self.transmit.push(Message::Replica(Box::new(r)));
        Ok(())
    }

    /// Whether the peer's hosted-run request still waits for its final answer.
    pub fn hosted_owed(&self) -> bool {
        self.hosted_owed
    }

    /// Asks the peer to stop a task we assigned. Its `Completed` still follows.
    pub fn cancel(&mut self, seq: u64) -> Result<(), Error> {
        if self.state != State::Open || !self.outbound.contains(seq) {
            return Err(Error::InvalidState {
                action: "cancel",
                why: "no such assignment in flight",
            });
        }
        self.transmit.push(Message::Cancel { seq });
        Ok(())
    }

    /// Starts the goodbye: no new work either way; in-flight tasks finish.
    /// Does nothing when goodbye was already said.
    pub fn goodbye(&mut self) {
        if self.state == State::Open && !self.we_said_goodbye {
            self.we_said_goodbye = true;
            self.transmit.push(Message::Goodbye);
            self.maybe_ack();
        }
    }

    /// The peer's handshake broke a bound of the protocol (`e`, from the decoder): an
    /// acceptor still in the handshake answers `Reject(Invalid)` saying which
    /// ([`Connection::poll_transmit`]). Returns `e`; the connection must be closed.
    pub fn handle_invalid(&mut self, e: Error) -> Error {
        if self.state == State::Handshaking
            && self.role == Role::Acceptor
            && matches!(e, Error::Handshake(HandshakeError::Bound { .. }))
        {
            self.transmit.push(Message::Reject(Reject {
                reason: RejectReason::Invalid,
                message: e.to_string(),
            }));
        }
        self.state = State::Failed;
        e
    }

    fn check_peer(&self, peer: &Hello) -> Option<(RejectReason, String)> {
        if peer.version != PROTOCOL_VERSION {
            return Some((
                RejectReason::Version,
                format!(
                    "protocol version {} is not supported (this node speaks {})",
                    peer.version, PROTOCOL_VERSION
                ),
            ));
        }
        if peer.cluster != self.local.cluster {
            return Some((
                RejectReason::Cluster,
                format!(
                    "cluster {:?} does not match this node's cluster {:?}",
                    peer.cluster, self.local.cluster
                ),
            ));
        }
        // Types are ASCII letters (lower case), as the task file's grammar makes them.
        if let Some(bad) = peer
            .types
            .iter()
            .find(|t| t.is_empty() || !t.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Some((
                RejectReason::Invalid,
                format!("type {bad:?} is not a task type (lower-case ASCII letters only)"),
            ));
        }
        None
    }

    fn establish(&mut self, peer: Hello, now: Instant) {
        self.state = State::Open;
        self.next_ping = now + self.config.heartbeat_interval;
        self.events.push_back(Event::Established(peer.clone()));
        self.peer = Some(peer);
    }

    fn maybe_ack(&mut self) {
        // A hosted-run request of ours still waits for its final answer (e.g. the end of an
        // attached run the host interrupts as it shuts down): it is in flight too.
        if self.peer_said_goodbye
            && !self.ack_sent
            && self.inbound.is_empty()
            && self.outbound.is_empty()
            && !self.hosted_asked
        {
            self.ack_sent = true;
            self.transmit.push(Message::GoodbyeAck);
            self.finish();
        }
    }

    fn finish(&mut self) {
        if self.state != State::Finished {
            self.state = State::Finished;
            self.events.push_back(Event::Finished);
        }
    }

    fn fail(&mut self, e: Error) -> Result<(), Error> {
        self.state = State::Failed;
        Err(e)
    }
}

mod credit;
pub use credit::MAX_DRAINING;
mod seqs;

#[cfg(test)]
mod tests;
