//! Framing: a 4-byte big-endian length, then a [`wire`]-encoded [`Message`].
//!
//! Decoding runs on tokio-util's `LengthDelimitedCodec`, which checks the length header
//! against the maximum before it reserves a byte; encoding refuses a frame over the maximum
//! too, so a node never sends what its peer must reject.

use bytes::{BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::wire::{self, MAX_FRAME_CEILING};
use crate::{Error, Message};

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum payload length of one frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = MAX_FRAME_CEILING;

/// Encodes and decodes whole messages on a byte stream.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max_frame: usize,
    /// True while the inner codec has consumed a header and waits for the payload.
    in_frame: bool,
}

impl FrameCodec {
    /// A codec that accepts and sends payloads of at most `max_frame` bytes.
    ///
    /// `max_frame` is clamped to at most [`MAX_FRAME_CEILING`] (16 MiB) and at least 1 KiB.
    pub fn new(max_frame: usize) -> Self {
        let max_frame = max_frame.clamp(1024, MAX_FRAME_CEILING);
        let inner = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(LENGTH_PREFIX)
            .max_frame_length(max_frame)
            .new_codec();
        FrameCodec {
            inner,
            max_frame,
            in_frame: false,
        }
    }

    /// The maximum payload length this codec accepts and sends.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        // Report an oversized header ourselves, with the claimed size; the inner codec would
        // refuse it too, but with a less helpful error.
        let at_head = !self.in_frame && src.len() >= LENGTH_PREFIX;
        if at_head {
            let claimed = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            if claimed > self.max_frame {
                return Err(Error::FrameTooLarge {
                    len: claimed,
                    max: self.max_frame,
                });
            }
        }
        match self.inner.decode(src)? {
            Some(frame) => {
                self.in_frame = false;
                wire::decode(&frame).map(Some)
            }
            None => {
                self.in_frame |= at_head;
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() && !self.in_frame => Ok(None),
            None => Err(Error::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        let start = dst.len();
        dst.put_u32(0);
        if let Err(e) = wire::encode_into(msg, dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start - LENGTH_PREFIX;
        if len > self.max_frame {
            dst.truncate(start);
            return Err(Error::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        // `len <= max_frame <= 16 MiB`, so it fits in a u32.
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::message::*;
    use crate::NodeId;

    fn all_messages() -> Vec<Message> {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            cluster: "default".into(),
            node_id: NodeId([7; 16]),
            types: vec!["a".into(), "b".into()],
            capacity: 4,
        };
        vec![
            Message::Hello(hello.clone()),
            Message::Welcome(hello),
            Message::Reject(Reject {
                reason: RejectReason::Cluster,
                message: "cluster mismatch".into(),
            }),
            Message::Assign(Assign {
                seq: 42,
                task: "a1".into(),
                kind: "a".into(),
                args: "x y".into(),
                attempt: 1,
                timeout_ms: 3_600_000,
            }),
            Message::Completed(Completed {
                seq: 42,
                ok: false,
                exit_code: Some(3),
                output: "Executing task: a1 ✓".into(),
                error: Some("exit status 3".into()),
                duration_us: 1234,
            }),
            Message::Cancel { seq: 9 },
            Message::Ping { nonce: u64::MAX },
            Message::Pong { nonce: 0 },
            Message::Goodbye,
            Message::GoodbyeAck,
        ]
    }

    #[test]
    fn every_message_round_trips_whole_and_byte_by_byte() {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for m in all_messages() {
            codec.encode(&m, &mut wire).unwrap();
        }
        // Whole buffer at once.
        let mut src = wire.clone();
        let mut got = Vec::new();
        while let Some(m) = codec.decode(&mut src).unwrap() {
            got.push(m);
        }
        assert_eq!(got, all_messages());
        assert!(src.is_empty());
        // One byte at a time: frames split anywhere still decode.
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            src.put_u8(*b);
            while let Some(m) = codec.decode(&mut src).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all_messages());
        assert_eq!(codec.decode_eof(&mut src).unwrap(), None);
    }

    #[test]
    fn oversized_length_prefix_is_an_error_before_any_allocation() {
        let mut codec = FrameCodec::new(4096);
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0, 1, 2][..]);
        let cap_before = src.capacity();
        match codec.decode(&mut src) {
            Err(Error::FrameTooLarge { len, max }) => {
                assert_eq!(len, 0xffff_fff0);
                assert_eq!(max, 4096);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(src.capacity(), cap_before, "no buffer was reserved");
    }

    #[test]
    fn encoding_over_the_maximum_is_refused_and_leaves_dst_clean() {
        let mut codec = FrameCodec::new(1024);
        let mut dst = BytesMut::new();
        let big = Message::Completed(Completed {
            seq: 1,
            ok: true,
            exit_code: Some(0),
            output: "x".repeat(5000),
            error: None,
            duration_us: 1,
        });
        assert!(matches!(
            codec.encode(&big, &mut dst),
            Err(Error::FrameTooLarge { max: 1024, .. })
        ));
        assert!(dst.is_empty());
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        codec.encode(&Message::Goodbye, &mut wire).unwrap();
        codec.encode(&all_messages()[3], &mut wire).unwrap();
        wire.truncate(wire.len() - 3);
        assert_eq!(codec.decode(&mut wire).unwrap(), Some(Message::Goodbye));
        assert_eq!(codec.decode(&mut wire).unwrap(), None);
        assert!(matches!(
            codec.decode_eof(&mut wire),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn inner_length_claims_cannot_allocate_beyond_the_limit() {
        // An Assign whose `task` string claims 2^40 bytes inside a tiny frame.
        let mut payload = vec![3u8, 1]; // variant 3 (Assign), seq = 1
        payload.push(253); // bincode varint: u64 follows
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut src = BytesMut::new();
        src.put_u32(payload.len() as u32);
        src.put_slice(&payload);
        let err = FrameCodec::default().decode(&mut src).unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err:?}");
    }

    #[test]
    fn ping_frame_matches_the_documented_bytes() {
        let mut wire = BytesMut::new();
        FrameCodec::default()
            .encode(&Message::Ping { nonce: 7 }, &mut wire)
            .unwrap();
        assert_eq!(&wire[..], &[0, 0, 0, 2, 6, 7]);
    }

    #[test]
    fn a_hello_with_fields_appended_by_a_later_version_still_decodes() {
        let mut codec = FrameCodec::default();
        let mut hello = all_messages()[0].clone();
        if let Message::Hello(h) = &mut hello {
            h.version = PROTOCOL_VERSION + 1;
        }
        let mut payload = BytesMut::new();
        crate::wire::encode_into(&hello, &mut payload).unwrap();
        payload.put_slice(b"\x05future-field");
        let mut src = BytesMut::new();
        src.put_u32(payload.len() as u32);
        src.put_slice(&payload);
        assert_eq!(codec.decode(&mut src).unwrap(), Some(hello));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A deterministic xorshift keeps this reproducible without extra crates.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut errors = 0;
        for _ in 0..20_000 {
            let mut codec = FrameCodec::new(64 * 1024);
            let mut buf = BytesMut::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            // A plausible small length prefix so the payload decoder is exercised too.
            buf.put_u32(len as u32);
            for i in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.put_u8((x >> (i % 8)) as u8);
            }
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        assert!(errors > 0, "random payloads should mostly be rejected");
    }
}
