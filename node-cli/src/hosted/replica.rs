//! Replicated hosted runs (#19 stage 2), the rules with no IO: one run's group (its host and
//! the replicas that may take it over) agrees on the run's log with Raft (raft-rs's
//! [`RawNode`], itself IO-free), and the log's records, applied in order, are the run as
//! every member reports it.
//!
//! # The rules
//!
//! - **The log is the run.** Its first record is the plan and its options; then the events
//!   of the run as `attach` shows them (each task's result among them), a cancel, and the
//!   run's end. A member reports (to its attached clients, `runs`, `status --run`) only
//!   what is committed, so what one member reported no member loses, and a result is
//!   reported once: the [`Machine`] drops a result of a task that already has one (a
//!   re-run after a takeover), and anything made by a coordinator that was not the leader
//!   of the term its record was committed in.
//! - **One coordinator at a time.** Only the group's leader coordinates the run, and only
//!   once it [`acts`](Group::acting): it has applied everything committed before its term,
//!   and, from the second term on, has led for [`GUARD_TICKS`] of its own ticks. A leader
//!   that no longer hears a majority steps down within two election timeouts (Raft's
//!   check-quorum), and a member does not vote while it heard a leader within one; the
//!   guard covers the difference, with room for clocks whose rates differ up to twofold.
//!   So a partitioned, deposed leader has stopped acting before its successor starts.
//! - **Takeover.** The new coordinator runs the plan again with the results committed so
//!   far as its journal: succeeded tasks never run again, tasks that were in flight run
//!   again (at-least-once execution, as a restart of stage 1).
//! - **A majority is needed.** With three members one may be lost for good; with two, none
//!   (the survivor cannot be elected). A host that cannot find two replicas runs the plan
//!   unreplicated, as stage 1 does.
//! - **Every member holds the inputs.** A plan's input files are given to every member
//!   before the plan is proposed, and the plan record names them ([`Plan::inputs`]): the
//!   member that coordinates runs the tasks from its own copies, and keeps the results of
//!   the tasks it runs. A task that declares outputs and succeeded under an earlier
//!   coordinator runs again (its files are that coordinator's), so its dependents have
//!   them; its second result is not reported.
//!
//! The IO (disk, connections, the coordinator) is [`super::replica_io`]'s.

use std::collections::HashMap;

use p2p_core::hosted::{RunState, SubmitOptions, SubmittedInput};
use p2p_core::replica::{Member, RaftEntry, RaftMessage};
use raft::eraftpb::{ConfState, EntryType, Message, MessageType};
/// Raft's log entry and hard state (term, vote, commit), as a [`Log`] keeps them.
pub use raft::eraftpb::{Entry, HardState};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};
use serde::{Deserialize, Serialize};

/// A tick of the group's clock, in the node (the simulation picks its own).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Ticks without a leader before a member stands for election (Raft's election timeout;
/// a member waits a random number of ticks between one and two of these).
pub const ELECTION_TICKS: usize = 10;

/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;

/// Ticks a new leader waits before it coordinates, from the second term on: a deposed
/// leader steps down at most two election timeouts after it last heard a majority, and
/// this member was elected at least one election timeout after that majority last heard
/// it; three timeouts leave room for clocks whose rates differ up to twofold.
pub const GUARD_TICKS: u64 = 3 * ELECTION_TICKS as u64;

/// The most bytes of entries in one append message.
const MAX_APPEND: u64 = 1 << 20;

/// Append messages in flight to one follower.
const MAX_INFLIGHT: usize = 64;

/// A record of a run's log (an entry's data, bincode-encoded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The plan: first record of the log.
    Plan(Plan),
    /// One event of the run, made by the coordinator of `term`.
    Event {
        /// The coordinator's term.
        term: u64,
        /// The event as `run --json` prints it.
        json: String,
        /// The task state it sets, if any.
        mark: Option<Mark>,
    },
    /// A client cancelled the run.
    Cancel,
    /// The run ended, as the coordinator of `term` saw it.
    End {
        /// The coordinator's term.
        term: u64,
        /// Its state.
        state: RunState,
        /// Its exit status.
        exit: u8,
    },
}

/// A replicated run's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The task file's name.
    pub name: String,
    /// The task file's text.
    pub text: String,
    /// How to run it.
    pub options: SubmitOptions,
    /// When it was submitted (Unix milliseconds).
    pub started_ms: u64,
    /// The input files (`< PATH`) the client shipped with it: each path as the plan
    /// writes it, with its hash and size. Every member was given them before the plan was
    /// proposed and keeps them in its own run directory (`RUN/inputs/HASH/NAME`); a member
    /// that coordinates rewrites the plan's paths to its own copies.
    pub inputs: Vec<SubmittedInput>,
}

/// The task state an event sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Task id.
    pub task: String,
    /// One of the `MARK_*` constants.
    pub state: u8,
    /// The node it runs on (empty: unchanged).
    pub node: String,
}

/// The task waits (a retry).
pub const MARK_PENDING: u8 = 0;
/// The task runs.
pub const MARK_RUNNING: u8 = 1;
/// The task succeeded (final).
pub const MARK_SUCCEEDED: u8 = 2;
/// The task failed for good (final).
pub const MARK_FAILED: u8 = 3;
/// The task was cancelled (final).
pub const MARK_CANCELLED: u8 = 4;

impl Mark {
    /// Whether it is a task's final result.
    pub fn is_final(&self) -> bool {
        self.state >= MARK_SUCCEEDED
    }
}

/// What a member reports once a record is committed and applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The run's plan.
    Plan(Plan),
    /// One event, to report (never a second result of one task).
    Event {
        /// Its JSON.
        json: String,
        /// The task state it sets.
        mark: Option<Mark>,
    },
    /// The run is cancelled.
    Cancel,
    /// The run ended.
    End {
        /// Its state.
        state: RunState,
        /// Its exit status.
        exit: u8,
    },
}

/// The run as the applied records make it: the same on every member that applied the same
/// prefix of the log.
#[derive(Debug, Default, Clone)]
pub struct Machine {
    /// The plan, once applied.
    pub plan: Option<Plan>,
    /// Each task's final mark state.
    pub finals: HashMap<String, u8>,
    /// The tasks that succeeded, in the order their results were committed.
    pub succeeded: Vec<String>,
    /// Whether a client cancelled the run.
    pub cancelled: bool,
    /// Events applied (reported).
    pub events: u64,
    /// How it ended, if it did.
    pub ended: Option<(RunState, u8)>,
}

impl Machine {
    /// Applies the record `data` of an entry of `term`; what to report, if anything.
    pub fn apply(&mut self, term: u64, data: &[u8]) -> Option<Applied> {
        if data.is_empty() {
            // A new leader's empty entry.
            return None;
        }
        let record = decode_record(data)?;
        if self.ended.is_some() {
            return None;
        }
        match record {
            Record::Plan(p) => {
                if self.plan.is_some() {
                    return None;
                }
                self.plan = Some(p.clone());
                Some(Applied::Plan(p))
            }
            Record::Event {
                term: t,
                json,
                mark,
            } => {
                if t != term || self.plan.is_none() {
                    return None;
                }
                if let Some(m) = &mark {
                    if self.finals.contains_key(&m.task) {
                        return None;
                    }
                    if m.is_final() {
                        self.finals.insert(m.task.clone(), m.state);
                        if m.state == MARK_SUCCEEDED {
                            self.succeeded.push(m.task.clone());
                        }
                    }
                }
                self.events += 1;
                Some(Applied::Event { json, mark })
            }
            Record::Cancel => {
                if self.cancelled {
                    return None;
                }
                self.cancelled = true;
                Some(Applied::Cancel)
            }
            Record::End {
                term: t,
                state,
                exit,
            } => {
                if t != term {
                    return None;
                }
                self.ended = Some((state, exit));
                Some(Applied::End { state, exit })
            }
        }
    }
}

/// A record as an entry's data.
pub fn encode_record(r: &Record) -> Vec<u8> {
    bincode::serde::encode_to_vec(r, bincode::config::standard()).unwrap_or_default()
}

/// An entry's data as a record (`None` if it is none: such an entry is skipped).
pub fn decode_record(data: &[u8]) -> Option<Record> {
    let cfg = bincode::config::standard().with_limit::<{ 64 << 20 }>();
    bincode::serde::decode_from_slice(data, cfg)
        .ok()
        .map(|(r, _)| r)
}

/// Where a member keeps its group's log and vote, durably: each call returns once the
/// bytes are on disk.
pub trait Log: Send {
    /// Appends `entries` (contiguous); any kept entry at or after the first one's index is
    /// replaced.
    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()>;
    /// Keeps the term, vote and commit index.
    fn save_hard_state(&mut self, hs: &HardState) -> std::io::Result<()>;
    /// Keeps a commit index that advanced, without waiting for the disk: an older one read
    /// back after a crash is safe (Raft learns the commit again from the leader), it only
    /// lets a restarted member report less until then.
    fn save_commit(&mut self, _hs: &HardState) -> std::io::Result<()> {
        Ok(())
    }
}

/// A log that keeps nothing (tests that do not restart members).
#[derive(Debug, Default)]
pub struct NoLog;

impl Log for NoLog {
    fn append(&mut self, _: &[Entry]) -> std::io::Result<()> {
        Ok(())
    }
    fn save_hard_state(&mut self, _: &HardState) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a member kept of its group: its vote and term, and its log.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    /// Term, vote, commit index.
    pub hard_state: HardState,
    /// The log, from index 1.
    pub entries: Vec<Entry>,
}

/// What a step of the group produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send to other members.
    pub send: Vec<RaftMessage>,
    /// Records newly applied, in log order.
    pub applied: Vec<Applied>,
}

/// Why a group cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// Its log could not be kept (the member leaves the group: it cannot vote safely).
    #[error("cannot keep the run's log: {0}")]
    Disk(#[from] std::io::Error),
    /// Raft refused.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A message of another group, or naming members that are not this group's.
    #[error("{0}")]
    Foreign(String),
}

/// One member's part in one run's group.
pub struct Group {
    run: String,
    members: Vec<Member>,
    me: u64,
    node: RawNode<MemStorage>,
    log: Box<dyn Log>,
    ticks: u64,
    /// The term this member leads, the tick it saw itself leader in it, and the index of
    /// its term's first entry.
    lead: Option<(u64, u64, u64)>,
    applied: u64,
    machine: Machine,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("run", &self.run)
            .field("me", &self.me)
            .field("term", &self.node.raft.term)
            .field("role", &self.node.raft.state)
            .finish_non_exhaustive()
    }
}

const MESSAGE_TYPES: [MessageType; 19] = [
    MessageType::MsgHup,
    MessageType::MsgBeat,
    MessageType::MsgPropose,
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgUnreachable,
    MessageType::MsgSnapStatus,
    MessageType::MsgCheckQuorum,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
];

const ENTRY_TYPES: [EntryType; 3] = [
    EntryType::EntryNormal,
    EntryType::EntryConfChange,
    EntryType::EntryConfChangeV2,
];

fn entry_to_wire(e: &Entry) -> RaftEntry {
    RaftEntry {
        entry_type: e.entry_type as u8,
        term: e.term,
        index: e.index,
        data: e.data.to_vec(),
        context: e.context.to_vec(),
    }
}

fn entry_from_wire(e: RaftEntry) -> Option<Entry> {
    Some(Entry {
        entry_type: *ENTRY_TYPES.get(usize::from(e.entry_type))?,
        term: e.term,
        index: e.index,
        data: e.data.into(),
        context: e.context.into(),
        ..Default::default()
    })
}

impl Group {
    /// Member `me` (1-based position in `members`) of the group of `run`, from what it
    /// kept (`saved`, empty for a new group), keeping what comes in `log`.
    pub fn new(
        run: &str,
        members: Vec<Member>,
        me: u64,
        saved: Saved,
        log: Box<dyn Log>,
    ) -> Result<Group, GroupError> {
        let n = members.len() as u64;
        if !(1..=n).contains(&me) {
            return Err(GroupError::Foreign(format!(
                "member {me} of a group of {n}"
            )));
        }
        let voters: Vec<u64> = (1..=n).collect();
        let storage = MemStorage::new_with_conf_state(ConfState::from((voters, vec![])));
        {
            let mut core = storage.wl();
            core.append(&saved.entries)?;
            let mut hs = saved.hard_state.clone();
            let last = saved.entries.last().map_or(0, |e| e.index);
            hs.commit = hs.commit.min(last);
            core.set_hardstate(hs);
        }
        let config = Config {
            id: me,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            max_size_per_msg: MAX_APPEND,
            max_inflight_msgs: MAX_INFLIGHT,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&config, storage, &logger)?;
        Ok(Group {
            run: run.to_string(),
            members,
            me,
            node,
            log,
            ticks: 0,
            lead: None,
            applied: 0,
            machine: Machine::default(),
        })
    }

    /// The run's id.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The group's members (the host first).
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// This member's Raft id.
    pub fn me(&self) -> u64 {
        self.me
    }

    /// The run as applied here.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// Whether this member leads the group (it may not act yet).
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The leader this member knows of, if any.
    pub fn leader(&self) -> Option<&Member> {
        let id = self.node.raft.leader_id;
        (id >= 1)
            .then(|| self.members.get((id - 1) as usize))
            .flatten()
    }

    /// Whether this member coordinates the run now (see the module's rules).
    pub fn acting(&self) -> bool {
        let Some((term, since, first)) = self.lead else {
            return false;
        };
        self.is_leader()
            && term == self.node.raft.term
            && (term <= 1 || self.ticks.saturating_sub(since) >= GUARD_TICKS)
            && self.applied >= first
            && self.machine.plan.is_some()
            && self.machine.ended.is_none()
    }

    /// Stands for election now (the host, when it makes the group).
    pub fn campaign(&mut self) -> Result<Output, GroupError> {
        self.node.campaign()?;
        self.drain()
    }

    /// What Raft has ready without a tick or a message (a member just loaded from disk
    /// applies what it kept as committed).
    pub fn poll(&mut self) -> Result<Output, GroupError> {
        self.drain()
    }

    /// One tick of this member's clock.
    pub fn tick(&mut self) -> Result<Output, GroupError> {
        self.ticks += 1;
        self.node.tick();
        self.drain()
    }

    /// A message of another member.
    pub fn step(&mut self, m: RaftMessage) -> Result<Output, GroupError> {
        if m.run != self.run || m.members != self.members || m.to != self.me {
            return Err(GroupError::Foreign(format!(
                "a message for another group of run {}",
                m.run
            )));
        }
        let Some(&msg_type) = MESSAGE_TYPES.get(usize::from(m.msg_type)) else {
            return Err(GroupError::Foreign("an unknown Raft message type".into()));
        };
        if matches!(
            msg_type,
            MessageType::MsgSnapshot
                | MessageType::MsgHup
                | MessageType::MsgBeat
                | MessageType::MsgCheckQuorum
                | MessageType::MsgUnreachable
                | MessageType::MsgSnapStatus
        ) {
            // Snapshots are never used; the others are a member's own, never a peer's.
            return Ok(Output::default());
        }
        let mut msg = Message {
            msg_type,
            to: m.to,
            from: m.from,
            term: m.term,
            log_term: m.log_term,
            index: m.index,
            commit: m.commit,
            commit_term: m.commit_term,
            reject: m.reject,
            reject_hint: m.reject_hint,
            request_snapshot: m.request_snapshot,
            context: m.context.into(),
            ..Default::default()
        };
        let entries: Option<Vec<Entry>> = m.entries.into_iter().map(entry_from_wire).collect();
        let Some(entries) = entries else {
            return Err(GroupError::Foreign("an unknown Raft entry type".into()));
        };
        msg.entries = entries.into();
        // A message Raft refuses (from an unknown peer, a stale term) changes nothing.
        let _ = self.node.step(msg);
        self.drain()
    }

    /// Proposes `record` as the leader (the coordinator's events, a cancel, the end).
    /// Refused when this member does not lead: nothing is forwarded, so a deposed leader's
    /// records never reach the log.
    pub fn propose(&mut self, record: &Record) -> Result<Output, GroupError> {
        self.propose_all(std::slice::from_ref(record))
    }

    /// [`Group::propose`] of several records, written to disk together (one sync).
    pub fn propose_all(&mut self, records: &[Record]) -> Result<Output, GroupError> {
        if !self.is_leader() {
            return Err(GroupError::Foreign(
                "this member does not lead the group".into(),
            ));
        }
        for r in records {
            self.node.propose(Vec::new(), encode_record(r))?;
        }
        self.drain()
    }

    /// Proposes the plan from the host, whoever leads: a follower forwards it to the leader
    /// it knows (Raft drops it when none is known: propose it again later). The machine
    /// keeps the first plan only, so proposing it twice is harmless.
    pub fn propose_plan(&mut self, plan: &Plan) -> Result<Output, GroupError> {
        self.node
            .propose(Vec::new(), encode_record(&Record::Plan(plan.clone())))?;
        self.drain()
    }

    /// A member could not be reached (its connection is down).
    pub fn unreachable(&mut self, id: u64) {
        self.node.report_unreachable(id);
    }

    fn wire(&self, m: Message) -> Option<RaftMessage> {
        if m.msg_type == MessageType::MsgSnapshot || m.to == self.me {
            return None;
        }
        Some(RaftMessage {
            run: self.run.clone(),
            members: self.members.clone(),
            msg_type: m.msg_type as u8,
            to: m.to,
            from: m.from,
            term: m.term,
            log_term: m.log_term,
            index: m.index,
            commit: m.commit,
            commit_term: m.commit_term,
            reject: m.reject,
            reject_hint: m.reject_hint,
            request_snapshot: m.request_snapshot,
            context: m.context.to_vec(),
            entries: m.entries.iter().map(entry_to_wire).collect(),
        })
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) {
        for e in entries {
            self.applied = self.applied.max(e.index);
            if e.entry_type != EntryType::EntryNormal {
                continue;
            }
            if let Some(a) = self.machine.apply(e.term, &e.data) {
                out.applied.push(a);
            }
        }
    }

    /// Persists, sends and applies what Raft has ready, until it has nothing more.
    fn drain(&mut self) -> Result<Output, GroupError> {
        let mut out = Output::default();
        while self.node.has_ready() {
            let mut rd = self.node.ready();
            let early: Vec<Message> = rd.take_messages();
            out.send
                .extend(early.into_iter().filter_map(|m| self.wire(m)));
            let committed = rd.take_committed_entries();
            self.apply(committed, &mut out);
            if !rd.entries().is_empty() {
                self.log.append(rd.entries())?;
                self.node.mut_store().wl().append(rd.entries())?;
            }
            if let Some(hs) = rd.hs() {
                let old = self.node.store().rl().hard_state().clone();
                if old.term != hs.term || old.vote != hs.vote {
                    self.log.save_hard_state(hs)?;
                } else if old.commit != hs.commit {
                    self.log.save_commit(hs)?;
                }
                self.node.mut_store().wl().set_hardstate(hs.clone());
            }
            let persisted: Vec<Message> = rd.take_persisted_messages();
            out.send
                .extend(persisted.into_iter().filter_map(|m| self.wire(m)));
            let mut light = self.node.advance(rd);
            if let Some(c) = light.commit_index() {
                self.node.mut_store().wl().mut_hard_state().commit = c;
                let hs = self.node.store().rl().hard_state().clone();
                self.log.save_commit(&hs)?;
            }
            let more: Vec<Message> = light.take_messages();
            out.send
                .extend(more.into_iter().filter_map(|m| self.wire(m)));
            let committed = light.take_committed_entries();
            self.apply(committed, &mut out);
            self.node.advance_apply();
        }
        let raft = &self.node.raft;
        if raft.state == StateRole::Leader {
            if self.lead.map(|l| l.0) != Some(raft.term) {
                // The empty entry of the new term is the last one now.
                self.lead = Some((raft.term, self.ticks, raft.raft_log.last_index()));
            }
        } else {
            self.lead = None;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                node: p2p_core::NodeId([i as u8 + 1; 16]),
                addr: format!("127.0.0.1:{}", 7400 + i),
            })
            .collect()
    }

    fn plan() -> Plan {
        Plan {
            name: "t".into(),
            text: "a1 a2".into(),
            options: SubmitOptions {
                order: 0,
                retries: 0,
                keep_going: false,
                retry_backoff_ms: 100,
                retry_backoff_max_ms: 100,
                task_timeout_ms: 0,
                discovery_timeout_ms: 1000,
            },
            started_ms: 1,
            inputs: Vec::new(),
        }
    }

    fn event(term: u64, task: &str, state: u8) -> Record {
        Record::Event {
            term,
            json: format!("{{\"task\":\"{task}\",\"state\":{state}}}"),
            mark: Some(Mark {
                task: task.into(),
                state,
                node: "n".into(),
            }),
        }
    }

    #[test]
    fn a_plan_record_carries_its_inputs_as_docs_protocol_says() {
        let mut p = plan();
        p.inputs = vec![SubmittedInput {
            path: "i".into(),
            hash: p2p_core::ContentHash([5; 32]),
            size: 3,
        }];
        let bytes = encode_record(&Record::Plan(p.clone()));
        // `0 Plan`, then name "t", text "a1 a2", the options, started_ms 1 ...
        assert_eq!(
            bytes[..10],
            [0, 1, b't', 5, b'a', b'1', b' ', b'a', b'2', 0]
        );
        // ... and last the inputs: one, path "i", its 32-byte hash, size 3.
        let mut tail = vec![1, 1, b'i'];
        tail.extend([5; 32]);
        tail.push(3);
        assert_eq!(bytes[bytes.len() - tail.len()..], tail[..]);
        assert_eq!(decode_record(&bytes), Some(Record::Plan(p)));
    }

    #[test]
    fn a_second_result_of_a_task_and_a_stale_coordinators_records_are_not_reported() {
        let mut m = Machine::default();
        let data = |r: &Record| encode_record(r);
        // Before the plan, nothing of the run counts.
        assert_eq!(m.apply(1, &data(&event(1, "a1", MARK_SUCCEEDED))), None);
        assert!(matches!(
            m.apply(1, &data(&Record::Plan(plan()))),
            Some(Applied::Plan(_))
        ));
        assert!(m.apply(1, &data(&event(1, "a1", MARK_RUNNING))).is_some());
        assert!(m.apply(1, &data(&event(1, "a1", MARK_SUCCEEDED))).is_some());
        // A new coordinator (term 2) ran a1 again: its result is not reported again.
        assert_eq!(m.apply(2, &data(&event(2, "a1", MARK_SUCCEEDED))), None);
        assert_eq!(m.apply(2, &data(&event(2, "a1", MARK_RUNNING))), None);
        // A record of term 1's coordinator committed in term 2 was made by a deposed one.
        assert_eq!(m.apply(2, &data(&event(1, "a2", MARK_SUCCEEDED))), None);
        assert!(m.apply(2, &data(&event(2, "a2", MARK_SUCCEEDED))).is_some());
        assert_eq!(m.succeeded, vec!["a1".to_string(), "a2".to_string()]);
        assert_eq!(
            m.apply(
                2,
                &data(&Record::End {
                    term: 1,
                    state: RunState::Interrupted,
                    exit: 143
                })
            ),
            None
        );
        assert!(m
            .apply(
                2,
                &data(&Record::End {
                    term: 2,
                    state: RunState::Succeeded,
                    exit: 0
                })
            )
            .is_some());
        // Nothing after the end.
        assert_eq!(m.apply(2, &data(&Record::Cancel)), None);
        // Garbage is skipped.
        assert_eq!(m.apply(2, &[0xff, 0xff, 0xff]), None);
    }

    /// Delivers every message until none is left; returns what each member applied.
    fn settle(groups: &mut [Group], mut queue: Vec<RaftMessage>, applied: &mut [Vec<Applied>]) {
        while let Some(m) = queue.pop() {
            let to = (m.to - 1) as usize;
            let out = groups[to].step(m).unwrap();
            queue.extend(out.send);
            applied[to].extend(out.applied);
        }
    }

    #[test]
    fn the_host_leads_at_once_and_a_replica_takes_over_after_the_guard() {
        let ms = members(3);
        let mut g: Vec<Group> = (1..=3)
            .map(|i| Group::new("r", ms.clone(), i, Saved::default(), Box::new(NoLog)).unwrap())
            .collect();
        let mut applied = vec![Vec::new(), Vec::new(), Vec::new()];
        let out = g[0].campaign().unwrap();
        settle(&mut g, out.send, &mut applied);
        assert!(g[0].is_leader());
        let out = g[0].propose(&Record::Plan(plan())).unwrap();
        applied[0].extend(out.applied);
        settle(&mut g, out.send, &mut applied);
        // Term 1 acts at once: nobody led before.
        assert!(g[0].acting(), "{:?}", g[0]);
        let out = g[0].propose(&event(1, "a1", MARK_SUCCEEDED)).unwrap();
        applied[0].extend(out.applied);
        settle(&mut g, out.send, &mut applied);
        // A follower refuses to propose (nothing is forwarded).
        assert!(g[1].propose(&Record::Cancel).is_err());
        // The host is gone for good: the others tick until one leads, then acts after
        // the guard only.
        let mut led_at = None;
        for t in 0..200u64 {
            let mut queue = Vec::new();
            for member in g.iter_mut().skip(1) {
                queue.extend(member.tick().unwrap().send);
            }
            queue.retain(|m| m.to != 1);
            while let Some(m) = queue.pop() {
                let to = (m.to - 1) as usize;
                let out = g[to].step(m).unwrap();
                queue.extend(out.send.into_iter().filter(|m| m.to != 1));
                applied[to].extend(out.applied);
            }
            let leader = (1..3).find(|&i| g[i].is_leader());
            if let (Some(i), None) = (leader, led_at) {
                led_at = Some((i, t));
            }
            if let Some((i, at)) = led_at {
                assert_eq!(g[i].acting(), t - at >= GUARD_TICKS, "tick {t}");
            }
        }
        let (i, _) = led_at.expect("a replica leads");
        assert!(g[i].acting());
        // It reports a1 once, and takes a2 over.
        assert_eq!(g[i].machine().succeeded, vec!["a1".to_string()]);
        let term = g[i].term();
        let out = g[i].propose(&event(term, "a1", MARK_SUCCEEDED)).unwrap();
        assert!(out.applied.is_empty());
        let mut queue = out.send;
        queue.retain(|m| m.to != 1);
        while let Some(m) = queue.pop() {
            let to = (m.to - 1) as usize;
            let out = g[to].step(m).unwrap();
            applied[to].extend(out.applied);
            queue.extend(out.send.into_iter().filter(|m| m.to != 1));
        }
        let results = |a: &[Applied]| {
            a.iter()
                .filter(|a| matches!(a, Applied::Event { mark: Some(m), .. } if m.is_final()))
                .count()
        };
        for a in &applied {
            assert_eq!(results(a), 1, "{a:?}");
        }
    }
}
