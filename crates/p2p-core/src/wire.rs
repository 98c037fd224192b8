//! The payload encoding: bincode 2 (serde), kept behind this module so that the encoding can
//! be swapped in one place.
//!
//! Decoding is bounded twice: the frame is at most the configured maximum before it is read
//! (see [`crate::codec`]), and bincode's own limit stops a length field inside the payload
//! from claiming more memory than a frame of that size could justify (at most four times
//! the payload's size bucket: 64 KiB, 1 MiB or 16 MiB).

use bincode::config::{self, Config};
use bytes::{BufMut, BytesMut};

use crate::{Error, Message};

/// The largest frame any configuration may allow (and the default maximum): 16 MiB.
pub const MAX_FRAME_CEILING: usize = 16 * 1024 * 1024;

fn cfg<const LIMIT: usize>() -> impl Config {
    // Encoding uses the same limit type; it never binds there (frames are checked after).
    config::standard().with_limit::<LIMIT>()
}

/// Appends the encoding of `msg` to `dst`.
pub fn encode_into(msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
    let writer = BufWriter(dst);
    bincode::serde::encode_into_writer(msg, writer, cfg::<MAX_FRAME_CEILING>())
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes one message from a whole payload.
///
/// Bytes after a complete message are ignored (see [`crate::message`] for why).
pub fn decode(payload: &[u8]) -> Result<Message, Error> {
    // bincode's limit bounds the sum of the sizes claimed while decoding (container lengths,
    // and the in-memory size of each integer, which can exceed its varint encoding). Four
    // times the payload's bucket leaves room for that, while a small frame still cannot make
    // the decoder allocate more than 256 KiB (or 4 MiB for frames up to 1 MiB).
    let res = match payload.len() {
        0..=65_536 => bincode::serde::decode_from_slice(payload, cfg::<{ 4 * 65_536 }>()),
        65_537..=1_048_576 => {
            bincode::serde::decode_from_slice(payload, cfg::<{ 4 * 1_048_576 }>())
        }
        _ => bincode::serde::decode_from_slice(payload, cfg::<{ 4 * MAX_FRAME_CEILING }>()),
    };
    res.map(|(msg, _)| msg)
        .map_err(|e| Error::Decode(e.to_string()))
}

struct BufWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BufWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.put_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::Completed;

    #[test]
    fn payloads_at_every_bucket_edge_decode() {
        for output_len in [65_500, 65_520, 65_530, 1_048_540, 1_048_570, 1_048_600] {
            let msg = Message::Completed(Completed {
                seq: 1,
                ok: true,
                exit_code: Some(0),
                output: "x".repeat(output_len),
                error: None,
                duration_us: 5,
            });
            let mut buf = BytesMut::new();
            encode_into(&msg, &mut buf).unwrap();
            assert_eq!(decode(&buf).unwrap(), msg, "output of {output_len} bytes");
        }
    }
}
