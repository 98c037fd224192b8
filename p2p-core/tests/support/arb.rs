//! proptest strategies for protocol messages.
//!
//! Values are biased towards the ones that matter to the protocol (the current version, the
//! local cluster name, a few small seqs that collide) so that random sessions get past the
//! handshake and reuse seqs, while every other value still shows up.

#![allow(dead_code)]

use p2p_core::{Assign, Completed, Hello, Message, NodeId, Reject, RejectReason, PROTOCOL_VERSION};
use proptest::collection::vec;
use proptest::prelude::*;

/// The cluster name of the local side in the suites.
pub const CLUSTER: &str = "default";

/// Short text: any characters, including multibyte ones.
pub fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

/// A seq from a small range, so that duplicates and unknown seqs both happen.
pub fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..6, 1 => any::<u64>()]
}

/// A `Hello`, usually of this version and cluster.
pub fn hello() -> impl Strategy<Value = Hello> {
    (
        prop_oneof![6 => Just(PROTOCOL_VERSION), 1 => any::<u16>()],
        prop_oneof![6 => Just(CLUSTER.to_string()), 1 => text()],
        any::<[u8; 16]>(),
        vec("[a-z]{1,3}", 0..4),
        prop_oneof![0u32..5, any::<u32>()],
    )
        .prop_map(|(version, cluster, id, types, capacity)| Hello {
            version,
            cluster,
            node_id: NodeId(id),
            types,
            capacity,
        })
}

/// A `Hello` that the local side accepts.
pub fn good_hello() -> impl Strategy<Value = Hello> {
    hello().prop_map(|mut h| {
        h.version = PROTOCOL_VERSION;
        h.cluster = CLUSTER.to_string();
        h
    })
}

/// Any reject reason.
pub fn reason() -> impl Strategy<Value = RejectReason> {
    prop_oneof![
        Just(RejectReason::Version),
        Just(RejectReason::Cluster),
        Just(RejectReason::Key),
        Just(RejectReason::Busy),
        Just(RejectReason::Invalid),
    ]
}

/// An `Assign`.
pub fn assign() -> impl Strategy<Value = Assign> {
    (seq(), text(), text(), text(), any::<u32>(), any::<u64>()).prop_map(
        |(seq, task, kind, args, attempt, timeout_ms)| Assign {
            seq,
            task: task.into(),
            kind: kind.into(),
            args,
            attempt,
            timeout_ms,
        },
    )
}

/// A `Completed`.
pub fn completed() -> impl Strategy<Value = Completed> {
    (
        seq(),
        any::<bool>(),
        any::<Option<i32>>(),
        text(),
        proptest::option::of(text()),
        any::<u64>(),
    )
        .prop_map(
            |(seq, ok, exit_code, output, error, duration_us)| Completed {
                seq,
                ok,
                exit_code,
                output: output.into(),
                error,
                duration_us,
            },
        )
}

/// A load report with any fields.
pub fn load() -> impl Strategy<Value = p2p_core::LoadReport> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<Option<u32>>(),
        any::<Option<u64>>(),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                capacity,
                running,
                waiting,
                cores,
                load_milli,
                mem_available_kib,
                (busy_ms, tasks),
            )| {
                p2p_core::LoadReport {
                    capacity,
                    running,
                    waiting,
                    cores,
                    load_milli,
                    mem_available_kib,
                    busy_ms,
                    tasks,
                }
            },
        )
}

/// Any message of protocol v3.
pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        hello().prop_map(Message::Welcome),
        (reason(), text())
            .prop_map(|(reason, message)| Message::Reject(Reject { reason, message })),
        assign().prop_map(Message::Assign),
        completed().prop_map(Message::Completed),
        seq().prop_map(|seq| Message::Cancel { seq }),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        Just(Message::Goodbye),
        Just(Message::GoodbyeAck),
        seq().prop_map(|seq| Message::Started { seq }),
        Just(Message::StatusRequest),
        (text(), any::<u64>(), any::<Option<[u32; 3]>>()).prop_map(
            |(version, uptime_s, load_milli)| {
                Message::Status(Box::new(p2p_core::message::StatusReport {
                    version,
                    uptime_s,
                    load_milli,
                    ..Default::default()
                }))
            }
        ),
        load().prop_map(Message::Load),
    ]
}

/// A message that is legal on an open connection (mostly), so that random sessions run
/// for a while before a violation ends them.
pub fn open_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        3 => assign().prop_map(Message::Assign),
        3 => completed().prop_map(Message::Completed),
        1 => seq().prop_map(|seq| Message::Cancel { seq }),
        1 => seq().prop_map(|seq| Message::Started { seq }),
        2 => any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        1 => any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        1 => Just(Message::Goodbye),
        1 => load().prop_map(Message::Load),
    ]
}
