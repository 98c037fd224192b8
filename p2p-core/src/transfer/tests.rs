#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn unbox(m: Message) -> Transfer {
    match m {
        Message::Transfer(t) => *t,
        other => panic!("not a transfer message: {other:?}"),
    }
}

/// Runs a whole transfer of `file` between a sender and a receiver, the receiver writing
/// into a Vec (the "disk"); returns what was written, and the most bytes ever in flight.
fn transfer(file: &[u8], chunk: usize, window: u32) -> Result<(Vec<u8>, u64), TransferError> {
    let hash = hash_bytes(file);
    let mut s = Sender::offered(7, file.len() as u64, chunk);
    let mut r = Receiver::new(7, hash, file.len() as u64, window, u64::MAX)?;
    let Transfer::Want { window, .. } = unbox(r.want()) else {
        panic!()
    };
    s.on_want(window)?;
    let mut disk = Vec::new();
    let mut in_flight: VecDeque<Message> = VecDeque::new();
    let mut most = 0u64;
    for _ in 0..1_000_000 {
        while let Some((off, len)) = s.poll_read() {
            let bytes = file[off as usize..off as usize + len].to_vec();
            in_flight.push_back(s.chunk(off, bytes)?);
        }
        let flying: u64 = in_flight
            .iter()
            .map(|m| match m {
                Message::Transfer(t) => match &**t {
                    Transfer::Chunk { data, .. } => data.len() as u64,
                    _ => 0,
                },
                _ => 0,
            })
            .sum();
        most = most.max(flying);
        let Some(m) = in_flight.pop_front() else {
            break;
        };
        let Transfer::Chunk { offset, data, .. } = unbox(m) else {
            panic!()
        };
        match r.on_chunk(offset, &data)? {
            Received::Write(b) => disk.extend_from_slice(b),
            Received::Complete(b) => {
                disk.extend_from_slice(b);
                let Transfer::Done { id } = unbox(r.done()) else {
                    panic!()
                };
                assert_eq!(id, 7);
                s.on_done()?;
                assert_eq!(s.state(), SendState::Delivered);
                return Ok((disk, most));
            }
        }
        if let Some(ack) = r.poll_ack() {
            let Transfer::Ack { received, .. } = unbox(ack) else {
                panic!()
            };
            s.on_ack(received)?;
        }
    }
    panic!(
        "the transfer stalled at {} of {} bytes",
        r.received(),
        file.len()
    );
}

#[test]
fn files_of_every_size_arrive_whole_within_the_window() {
    for n in [
        0,
        1,
        100,
        MAX_CHUNK - 1,
        MAX_CHUNK,
        MAX_CHUNK + 1,
        5 * MAX_CHUNK + 17,
    ] {
        let file = data(n, 3);
        let (got, most) = transfer(&file, MAX_CHUNK, DEFAULT_WINDOW).unwrap();
        assert_eq!(got, file, "{n} bytes");
        assert!(most <= u64::from(DEFAULT_WINDOW), "{most} in flight");
    }
    // A small frame limit: smaller chunks; the smallest window is one chunk.
    let file = data(300_000, 9);
    let (got, most) = transfer(&file, chunk_len(32_768), 1).unwrap();
    assert_eq!(got, file);
    assert!(most <= MAX_CHUNK as u64, "{most}");
    assert_eq!(chunk_len(32_768), 32_768 - CHUNK_OVERHEAD);
    assert_eq!(chunk_len(65_536), SEND_CHUNK);
    assert_eq!(chunk_len(16 << 20), SEND_CHUNK);
}

#[test]
fn a_corrupted_byte_is_a_hash_mismatch_at_the_last_chunk() {
    let file = data(3 * MAX_CHUNK, 1);
    let mut r = Receiver::new(
        1,
        hash_bytes(&file),
        file.len() as u64,
        DEFAULT_WINDOW,
        u64::MAX,
    )
    .unwrap();
    let mut bad = file.clone();
    bad[MAX_CHUNK + 5] ^= 1;
    assert!(matches!(
        r.on_chunk(0, &bad[..MAX_CHUNK]),
        Ok(Received::Write(_))
    ));
    assert!(matches!(
        r.on_chunk(MAX_CHUNK as u64, &bad[MAX_CHUNK..2 * MAX_CHUNK]),
        Ok(Received::Write(_))
    ));
    let err = r
        .on_chunk(2 * MAX_CHUNK as u64, &bad[2 * MAX_CHUNK..])
        .unwrap_err();
    assert!(matches!(err, TransferError::HashMismatch { .. }), "{err}");
    assert!(!err.is_violation());
    assert!(matches!(
        err.abort_message().map(unbox),
        Some(Transfer::Abort {
            reason: AbortReason::HashMismatch,
            ..
        })
    ));
}

#[test]
fn max_file_refuses_a_larger_offer() {
    let err = Receiver::new(1, hash_bytes(b""), 1001, DEFAULT_WINDOW, 1000).unwrap_err();
    assert!(matches!(
        err,
        TransferError::TooLarge {
            size: 1001,
            max: 1000,
            ..
        }
    ));
    assert!(Receiver::new(1, hash_bytes(b""), 1000, DEFAULT_WINDOW, 1000).is_ok());
}

#[test]
fn a_sender_keeps_to_the_credit_and_refuses_bad_acks() {
    let mut s = Sender::offered(1, 10 * MAX_CHUNK as u64, MAX_CHUNK);
    assert_eq!(s.poll_read(), None, "nothing before Want");
    assert!(s.on_ack(0).is_err(), "Ack before Want");
    assert!(s.on_want(100).is_err(), "a window under one chunk");
    s.on_want(2 * MAX_CHUNK as u32).unwrap();
    assert!(s.on_want(2 * MAX_CHUNK as u32).is_err(), "a second Want");
    for i in 0..2u64 {
        let (off, len) = s.poll_read().unwrap();
        assert_eq!((off, len), (i * MAX_CHUNK as u64, MAX_CHUNK));
        s.chunk(off, vec![0; len]).unwrap();
    }
    assert_eq!(s.poll_read(), None, "the window is full");
    assert!(
        s.on_ack(3 * MAX_CHUNK as u64).is_err(),
        "an Ack of bytes never sent"
    );
    s.on_ack(MAX_CHUNK as u64).unwrap();
    assert!(s.on_ack(0).is_err(), "an Ack going back");
    assert_eq!(s.poll_read(), Some((2 * MAX_CHUNK as u64, MAX_CHUNK)));
    assert!(s.chunk(0, vec![0; 5]).is_err(), "not what was asked for");
    assert!(s.on_done().is_err(), "Done before the end");
    assert!(s.on_have().is_err(), "Have after Want");
    let mut h = Sender::offered(2, 5, MAX_CHUNK);
    h.on_have().unwrap();
    assert_eq!(h.state(), SendState::Delivered);
    assert_eq!(h.poll_read(), None);
}

#[test]
fn a_receiver_refuses_chunks_out_of_order_too_big_or_beyond_credit() {
    let file = data(4 * MAX_CHUNK, 2);
    let hash = hash_bytes(&file);
    let new = || Receiver::new(1, hash, file.len() as u64, 2 * MAX_CHUNK as u32, u64::MAX).unwrap();
    let chunk = |i: usize| &file[i * MAX_CHUNK..(i + 1) * MAX_CHUNK];
    // A gap.
    let err = new().on_chunk(MAX_CHUNK as u64, chunk(1)).unwrap_err();
    assert!(err.is_violation(), "{err}");
    // A duplicate, and an overlap.
    let mut r = new();
    r.on_chunk(0, chunk(0)).unwrap();
    assert!(r.on_chunk(0, chunk(0)).unwrap_err().is_violation());
    let mut r = new();
    r.on_chunk(0, chunk(0)).unwrap();
    assert!(r.on_chunk(10, &file[10..100]).unwrap_err().is_violation());
    // Beyond the credit (two chunks, no Ack).
    let mut r = new();
    r.on_chunk(0, chunk(0)).unwrap();
    r.on_chunk(MAX_CHUNK as u64, chunk(1)).unwrap();
    assert!(r
        .on_chunk(
            2 * MAX_CHUNK as u64,
            &file[2 * MAX_CHUNK..2 * MAX_CHUNK + 1]
        )
        .unwrap_err()
        .is_violation());
    // Over 64 KiB, empty, beyond the announced size.
    let big = vec![0u8; MAX_CHUNK + 1];
    assert!(new().on_chunk(0, &big).unwrap_err().is_violation());
    assert!(new().on_chunk(0, &[]).unwrap_err().is_violation());
    let mut small = Receiver::new(1, hash_bytes(b"ab"), 2, DEFAULT_WINDOW, u64::MAX).unwrap();
    assert!(small.on_chunk(0, b"abc").unwrap_err().is_violation());
    // A chunk after the end.
    let mut r = Receiver::new(1, hash_bytes(b"ab"), 2, DEFAULT_WINDOW, u64::MAX).unwrap();
    assert_eq!(r.on_chunk(0, b"ab").unwrap(), Received::Complete(b"ab"));
    assert!(r.is_complete() && r.on_end().is_ok());
    assert!(r.on_chunk(2, b"").unwrap_err().is_violation());
}

/// A receiver whose caller hashes (on the thread that writes) checks the same rules, and
/// the file is complete only once the caller's hash matches the announced one.
#[test]
fn a_receiver_hashed_by_its_caller_checks_the_same_rules_and_the_hash_at_the_end() {
    let file = data(3 * MAX_CHUNK + 10, 9);
    let hash = hash_bytes(&file);
    let new = || Receiver::new(1, hash, file.len() as u64, u32::MAX, u64::MAX).unwrap();
    let pieces: Vec<(u64, &[u8])> = file
        .chunks(MAX_CHUNK)
        .enumerate()
        .map(|(i, c)| ((i * MAX_CHUNK) as u64, c))
        .collect();
    // In order: the last chunk says so; no Ack, no Done until the hash is checked.
    let mut r = new();
    let mut disk = Vec::new();
    for (i, (off, c)) in pieces.iter().enumerate() {
        assert_eq!(r.on_chunk_unhashed(*off, c).unwrap(), i == pieces.len() - 1);
        disk.extend_from_slice(c);
    }
    assert!(!r.is_complete(), "complete before its hash was checked");
    assert!(r.poll_ack().is_none());
    assert!(r
        .on_chunk_unhashed(file.len() as u64, b"x")
        .unwrap_err()
        .is_violation());
    r.check_hash(hash_bytes(&disk)).unwrap();
    assert!(r.is_complete() && r.on_end().is_ok());
    // The caller's hash of other bytes: a mismatch, and nothing more is taken.
    let mut r = new();
    for (off, c) in &pieces {
        r.on_chunk_unhashed(*off, c).unwrap();
    }
    let err = r.check_hash(hash_bytes(b"something else")).unwrap_err();
    assert!(matches!(err, TransferError::HashMismatch { .. }), "{err}");
    assert!(
        r.check_hash(hash).unwrap_err().is_violation(),
        "a second check"
    );
    // A hash before the end, a chunk out of order, mixing the two ways: violations.
    let mut r = new();
    r.on_chunk_unhashed(0, pieces[0].1).unwrap();
    assert!(r.check_hash(hash).unwrap_err().is_violation());
    assert!(r
        .on_chunk_unhashed(0, pieces[0].1)
        .unwrap_err()
        .is_violation());
    assert!(r
        .on_chunk(pieces[1].0, pieces[1].1)
        .unwrap_err()
        .is_violation());
    let mut r = new();
    r.on_chunk(0, pieces[0].1).unwrap();
    assert!(r
        .on_chunk_unhashed(pieces[1].0, pieces[1].1)
        .unwrap_err()
        .is_violation());
    // An empty file is one empty chunk.
    let mut r = Receiver::new(2, hash_bytes(b""), 0, DEFAULT_WINDOW, u64::MAX).unwrap();
    assert!(r.on_chunk_unhashed(0, b"").unwrap());
    r.check_hash(hash_bytes(b"")).unwrap();
    assert!(r.is_complete());
}

#[test]
fn an_ack_goes_out_every_quarter_window() {
    let file = data(8 * MAX_CHUNK, 4);
    let mut r = Receiver::new(
        1,
        hash_bytes(&file),
        file.len() as u64,
        4 * MAX_CHUNK as u32,
        u64::MAX,
    )
    .unwrap();
    r.on_chunk(0, &file[..MAX_CHUNK / 2]).unwrap();
    assert!(r.poll_ack().is_none());
    r.on_chunk((MAX_CHUNK / 2) as u64, &file[MAX_CHUNK / 2..MAX_CHUNK])
        .unwrap();
    let Some(Transfer::Ack { received, .. }) = r.poll_ack().map(unbox) else {
        panic!()
    };
    assert_eq!(received, MAX_CHUNK as u64);
    assert!(r.poll_ack().is_none());
}

#[test]
fn the_outbox_sends_control_first_and_a_chunk_only_into_an_emptied_writer() {
    let mut o = Outbox::new();
    let chunk = |i: u64| {
        Message::Transfer(Box::new(Transfer::Chunk {
            id: 1,
            offset: i,
            data: vec![0; 10].into(),
        }))
    };
    for i in 0..OUTBOX_CHUNKS as u64 {
        assert!(o.has_chunk_room());
        o.push(chunk(i));
    }
    assert!(!o.has_chunk_room());
    o.push(Message::Ping { nonce: 1 });
    // The control frame queued after four chunks goes first.
    assert_eq!(o.pop(0), Some(Message::Ping { nonce: 1 }));
    // A chunk waits while the writer still holds bytes.
    assert_eq!(o.pop(WRITE_LOW_WATER), None);
    assert_eq!(o.pop(0), Some(chunk(0)));
    o.push(Message::Goodbye);
    // A control frame queued between chunks overtakes the rest.
    assert_eq!(o.pop(0), Some(Message::Goodbye));
    assert_eq!(o.pop(0), Some(chunk(1)));
    assert!(!o.is_empty());
}

/// A sender's chunks by file range keep the same bookkeeping as chunks of bytes (the
/// credit, the order, the end), carry the range and the file, and end the transfer once
/// the file was found cut (an earlier chunk's bytes were zeros).
#[test]
fn file_chunks_keep_the_senders_bookkeeping_and_stop_once_the_file_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let bytes = data(300_000, 9);
    std::fs::write(&path, &bytes).unwrap();
    let file = crate::file::ChunkFile::open(&path).unwrap();
    let size = bytes.len() as u64;
    let mut s = Sender::offered(3, size, SEND_CHUNK);
    // Nothing before the Want.
    assert!(s.file_chunk(0, SEND_CHUNK, &file).is_err());
    s.on_want(2 * SEND_CHUNK as u32).unwrap();
    // Only the range poll_read asks for.
    assert!(s.file_chunk(1, SEND_CHUNK, &file).is_err());
    assert!(s.file_chunk(0, SEND_CHUNK - 1, &file).is_err());
    let mut wire = Vec::new();
    for _ in 0..2 {
        let (offset, len) = s.poll_read().unwrap();
        let m = s.file_chunk(offset, len, &file).unwrap();
        assert!(is_chunk(&m));
        let Transfer::FileChunk {
            id,
            offset: o,
            len: l,
            file: f,
        } = unbox(m.clone())
        else {
            panic!("{m:?}")
        };
        assert_eq!((id, o, l), (3, offset, len));
        assert_eq!(f, file);
        // What a wire of messages sends: the Chunk of those bytes.
        let Transfer::Chunk { data, .. } = unbox(to_wire(m)) else {
            panic!()
        };
        wire.extend_from_slice(&data);
    }
    // The credit is used up: nothing until an Ack.
    assert_eq!(s.poll_read(), None);
    s.on_ack(2 * SEND_CHUNK as u64).unwrap();
    let (offset, len) = s.poll_read().unwrap();
    assert_eq!(offset, 2 * SEND_CHUNK as u64);
    assert_eq!(&wire[..], &bytes[..2 * SEND_CHUNK]);
    // The file ends early (truncated under us): the chunk's bytes are zeros past the end,
    // the cut is recorded, and the next chunk is refused.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(offset + 1000)
        .unwrap();
    let m = s.file_chunk(offset, len, &file).unwrap();
    let Transfer::Chunk { data, .. } = unbox(to_wire(m)) else {
        panic!()
    };
    assert_eq!(data.len(), len);
    assert_eq!(
        &data[..1000],
        &bytes[offset as usize..offset as usize + 1000]
    );
    assert!(data[1000..].iter().all(|b| *b == 0));
    let why = file.cut().unwrap().to_owned();
    assert!(why.contains("truncated"), "{why}");
    s.on_ack(offset + len as u64).unwrap();
    let (offset, len) = s.poll_read().unwrap();
    let e = s.file_chunk(offset, len, &file).unwrap_err();
    assert!(e.to_string().contains("the file changed"), "{e}");
}

/// An `Abort` takes its transfer's queued chunks out of the outbox (it overtakes them, and
/// the receiver closes the connection at a chunk after it), and only that transfer's.
#[test]
fn an_abort_takes_its_transfers_queued_chunks_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, data(1000, 1)).unwrap();
    let file = crate::file::ChunkFile::open(&path).unwrap();
    let mut o = Outbox::new();
    let bytes = |id: u64, offset: u64| {
        Message::Transfer(Box::new(Transfer::Chunk {
            id,
            offset,
            data: vec![1; 10].into(),
        }))
    };
    let ranged = |id: u64, offset: u64| {
        Message::Transfer(Box::new(Transfer::FileChunk {
            id,
            offset,
            len: 10,
            file: file.clone(),
        }))
    };
    o.push(ranged(1, 0));
    o.push(bytes(2, 0));
    o.push(ranged(1, 10));
    o.push(bytes(1, 20));
    o.push(ranged(2, 10));
    let abort = Message::Transfer(Box::new(Transfer::Abort {
        id: 1,
        reason: AbortReason::Io,
        message: String::new(),
    }));
    o.push(abort.clone());
    assert_eq!(o.pop(0), Some(abort));
    assert_eq!(o.pop(0), Some(bytes(2, 0)));
    assert_eq!(o.pop(0), Some(ranged(2, 10)));
    assert_eq!(o.pop(0), None);
    assert!(o.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any split of any file into chunks (of any sizes, within 64 KiB) reassembles to the
    /// file, with its hash checked, when it comes in order.
    #[test]
    fn any_split_reassembles(
        file in vec(any::<u8>(), 0..300_000),
        cuts in vec(1usize..=MAX_CHUNK, 0..64),
    ) {
        let mut r = Receiver::new(1, hash_bytes(&file), file.len() as u64, u32::MAX, u64::MAX).unwrap();
        let mut disk = Vec::new();
        let mut off = 0usize;
        let mut sizes = cuts.iter().cycle();
        let mut done = false;
        if file.is_empty() {
            prop_assert_eq!(r.on_chunk(0, &[]).unwrap(), Received::Complete(&[]));
            done = true;
        }
        while off < file.len() {
            let len = (*sizes.next().unwrap_or(&MAX_CHUNK)).min(file.len() - off);
            match r.on_chunk(off as u64, &file[off..off + len]).unwrap() {
                Received::Write(b) => disk.extend_from_slice(b),
                Received::Complete(b) => {
                    disk.extend_from_slice(b);
                    done = true;
                }
            }
            off += len;
        }
        prop_assert!(done && r.is_complete());
        prop_assert_eq!(disk, file);
    }

    /// Delivering chunks in any other order than the file's, or any chunk twice, is refused
    /// as a violation at the first chunk out of place; nothing out of place is ever written.
    #[test]
    fn reordered_or_duplicated_chunks_are_violations(
        file in vec(any::<u8>(), 2..200_000),
        size in 1usize..=MAX_CHUNK,
        swap in any::<prop::sample::Index>(),
        dup in any::<bool>(),
    ) {
        let offsets: Vec<usize> = (0..file.len()).step_by(size).collect();
        prop_assume!(offsets.len() >= 2);
        let mut order: Vec<usize> = (0..offsets.len()).collect();
        let k = swap.index(offsets.len() - 1);
        if dup {
            order.insert(k + 1, k);
        } else {
            order.swap(k, k + 1);
        }
        let mut r = Receiver::new(1, hash_bytes(&file), file.len() as u64, u32::MAX, u64::MAX).unwrap();
        let mut written = 0usize;
        let mut refused = false;
        for &i in &order {
            let off = offsets[i];
            let end = (off + size).min(file.len());
            match r.on_chunk(off as u64, &file[off..end]) {
                Ok(Received::Write(b)) | Ok(Received::Complete(b)) => {
                    prop_assert_eq!(off, written, "wrote a chunk out of place");
                    written += b.len();
                }
                Err(e) => {
                    prop_assert!(e.is_violation(), "{}", e);
                    refused = true;
                    break;
                }
            }
        }
        prop_assert!(refused, "{:?} was accepted", order);
        prop_assert!(!r.is_complete());
    }

    /// A stream cut anywhere before its end is truncated, naming how much arrived.
    #[test]
    fn a_truncated_stream_is_reported(
        file in vec(any::<u8>(), 1..200_000),
        size in 1usize..=MAX_CHUNK,
        keep in any::<prop::sample::Index>(),
    ) {
        let mut r = Receiver::new(1, hash_bytes(&file), file.len() as u64, u32::MAX, u64::MAX).unwrap();
        let chunks: Vec<usize> = (0..file.len()).step_by(size).collect();
        let n = keep.index(chunks.len());
        for &off in &chunks[..n] {
            let end = (off + size).min(file.len());
            r.on_chunk(off as u64, &file[off..end]).unwrap();
        }
        let err = r.on_end().unwrap_err();
        let got = (n * size).min(file.len()) as u64;
        prop_assert_eq!(err, TransferError::Truncated { id: 1, received: got, size: file.len() as u64 });
    }

    /// A whole exchange with any window keeps to the credit and delivers the file.
    #[test]
    fn sender_and_receiver_with_any_window(
        n in 0usize..400_000,
        window in (MAX_CHUNK as u32)..(8 * MAX_CHUNK as u32),
        chunk in 1usize..=MAX_CHUNK,
    ) {
        let file = data(n, 5);
        let (got, most) = transfer(&file, chunk, window).unwrap();
        prop_assert_eq!(got, file);
        prop_assert!(most <= u64::from(window));
    }
}
