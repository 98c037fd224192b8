//! The messages of replicated hosted runs (protocol v3, message index 16): the Raft traffic
//! of each run's group (its host and the replicas that may take it over), and a cancel
//! forwarded to the group's leader. All of them travel in one [`crate::Message::Replica`]
//! variant.
//!
//! A node sends them after the handshake, in either direction, with no answer owed: Raft
//! retries what is lost. The consensus itself is not this crate's business (node-cli's
//! `hosted::replica` drives it); this crate only carries a Raft message field by field, so
//! the wire format stays ours and documented (docs/PROTOCOL.md), and bounds it
//! ([`Replica::is_bounded`]); a message over the bounds closes the connection.

use serde::{Deserialize, Serialize};

use crate::hosted::MAX_RUN_ID;
use crate::NodeId;

/// The most members of a run's group.
pub const MAX_MEMBERS: usize = 7;

/// The longest member address (`HOST:PORT`), in bytes.
pub const MAX_MEMBER_ADDR: usize = 256;

/// The most log entries in one message.
pub const MAX_RAFT_ENTRIES: usize = 4096;

/// The longest context of a message or an entry, in bytes (Raft puts a few bytes there).
pub const MAX_RAFT_CONTEXT: usize = 256;

/// The highest Raft message type (`MsgRequestPreVoteResponse`).
pub const MAX_RAFT_MSG_TYPE: u8 = 18;

/// The highest Raft entry type (`EntryConfChangeV2`).
pub const MAX_RAFT_ENTRY_TYPE: u8 = 2;

/// One message of replicated runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Replica {
    /// A Raft message of one run's group (variant 0).
    Raft(Box<RaftMessage>),
    /// A client asked a member that does not lead the group to cancel the run: the member
    /// forwards it to the leader it knows (variant 1).
    Cancel {
        /// The run's id.
        run: String,
    },
}

/// A member of a run's group: who it is and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id.
    pub node: NodeId,
    /// Its listen address, `HOST:PORT`.
    pub addr: String,
}

/// A Raft message of the group of `run`: the fields of Raft's own message (raft-rs's
/// `eraftpb::Message`) that the group uses, plus the run and its members, so that a member
/// that does not know the run yet (a replica chosen by the host) creates its group from the
/// first message it gets. Raft's ids are the members' positions in `members`, from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftMessage {
    /// The run's id.
    pub run: String,
    /// The group, in order (the host first).
    pub members: Vec<Member>,
    /// Raft's message type (0 to [`MAX_RAFT_MSG_TYPE`]).
    pub msg_type: u8,
    /// To (Raft id).
    pub to: u64,
    /// From (Raft id).
    pub from: u64,
    /// The sender's term.
    pub term: u64,
    /// The term of the entry before `entries` (appends), or of the last entry (votes).
    pub log_term: u64,
    /// The index of the entry before `entries`, or of the last entry.
    pub index: u64,
    /// The sender's commit index.
    pub commit: u64,
    /// The term of the commit index, when the sender knows it.
    pub commit_term: u64,
    /// Whether the receiver refused (answers).
    pub reject: bool,
    /// Where the refusing follower's log ends (answers).
    pub reject_hint: u64,
    /// The index a follower asks a snapshot for (unused: a group never compacts its log).
    pub request_snapshot: u64,
    /// Raft's context bytes (at most [`MAX_RAFT_CONTEXT`]).
    pub context: Vec<u8>,
    /// Log entries (at most [`MAX_RAFT_ENTRIES`]).
    pub entries: Vec<RaftEntry>,
}

/// One Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftEntry {
    /// Raft's entry type (0 normal, 1 membership change, 2 its second form).
    pub entry_type: u8,
    /// The term it was appended in.
    pub term: u64,
    /// Its index in the log.
    pub index: u64,
    /// What it records (the run's record, see node-cli's `hosted::replica`); bounded by
    /// the frame.
    pub data: Vec<u8>,
    /// Raft's context bytes (at most [`MAX_RAFT_CONTEXT`]).
    pub context: Vec<u8>,
}

impl Replica {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Replica::Raft(_) => "Raft",
            Replica::Cancel { .. } => "ReplicaCancel",
        }
    }

    /// The run it is about.
    pub fn run(&self) -> &str {
        match self {
            Replica::Raft(m) => &m.run,
            Replica::Cancel { run } => run,
        }
    }

    /// Whether every field is within the bounds of the protocol: a run id of at most
    /// [`MAX_RUN_ID`] bytes, 1 to [`MAX_MEMBERS`] members with addresses of at most
    /// [`MAX_MEMBER_ADDR`] bytes, ids naming members, known message and entry types, at
    /// most [`MAX_RAFT_ENTRIES`] entries and contexts of at most [`MAX_RAFT_CONTEXT`].
    pub fn is_bounded(&self) -> bool {
        match self {
            Replica::Cancel { run } => run.len() <= MAX_RUN_ID,
            Replica::Raft(m) => {
                let n = m.members.len() as u64;
                m.run.len() <= MAX_RUN_ID
                    && (1..=MAX_MEMBERS).contains(&m.members.len())
                    && m.members.iter().all(|p| p.addr.len() <= MAX_MEMBER_ADDR)
                    && (1..=n).contains(&m.to)
                    && (1..=n).contains(&m.from)
                    && m.msg_type <= MAX_RAFT_MSG_TYPE
                    && m.context.len() <= MAX_RAFT_CONTEXT
                    && m.entries.len() <= MAX_RAFT_ENTRIES
                    && m.entries.iter().all(|e| {
                        e.entry_type <= MAX_RAFT_ENTRY_TYPE && e.context.len() <= MAX_RAFT_CONTEXT
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raft() -> RaftMessage {
        RaftMessage {
            run: "r".into(),
            members: vec![
                Member {
                    node: NodeId([1; 16]),
                    addr: "127.0.0.1:1".into(),
                },
                Member {
                    node: NodeId([2; 16]),
                    addr: "127.0.0.1:2".into(),
                },
            ],
            msg_type: 3,
            to: 2,
            from: 1,
            term: 1,
            log_term: 0,
            index: 0,
            commit: 0,
            commit_term: 0,
            reject: false,
            reject_hint: 0,
            request_snapshot: 0,
            context: Vec::new(),
            entries: Vec::new(),
        }
    }

    #[test]
    fn bounds() {
        assert!(Replica::Raft(Box::new(raft())).is_bounded());
        let over = |f: &dyn Fn(&mut RaftMessage)| {
            let mut m = raft();
            f(&mut m);
            !Replica::Raft(Box::new(m)).is_bounded()
        };
        assert!(over(&|m| m.to = 3));
        assert!(over(&|m| m.from = 0));
        assert!(over(&|m| m.msg_type = 19));
        assert!(over(&|m| m.run = "r".repeat(65)));
        assert!(over(&|m| m.members.clear()));
        assert!(over(&|m| m.context = vec![0; 257]));
        assert!(over(&|m| m.members[0].addr = "a".repeat(257)));
        assert!(over(&|m| m.entries.push(RaftEntry {
            entry_type: 3,
            term: 1,
            index: 1,
            data: Vec::new(),
            context: Vec::new(),
        })));
        assert!(!Replica::Cancel {
            run: "r".repeat(65)
        }
        .is_bounded());
    }
}
