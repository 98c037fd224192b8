//! The payload encoding: bincode 2 (serde), kept behind this module so that the encoding can
//! be swapped in one place.
//!
//! Decoding is bounded twice: the frame is at most the configured maximum before it is read
//! (see [`crate::codec`]), and bincode's own limit stops a length field inside the payload
//! from claiming more memory than a frame of that size could justify.

use bincode::config::{self, Config};
use bytes::{BufMut, BytesMut};

use crate::{Error, Message};

/// The largest frame any configuration may allow (and the default maximum): 16 MiB.
pub const MAX_FRAME_CEILING: usize = 16 * 1024 * 1024;

fn cfg<const LIMIT: usize>() -> impl Config {
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
    // The limit bounds the sum of all lengths claimed inside the payload, so a small frame
    // cannot make the decoder allocate more than 64 KiB (or 1 MiB for frames up to 1 MiB).
    let res = match payload.len() {
        0..=65_536 => bincode::serde::decode_from_slice(payload, cfg::<65_536>()),
        65_537..=1_048_576 => bincode::serde::decode_from_slice(payload, cfg::<1_048_576>()),
        _ => bincode::serde::decode_from_slice(payload, cfg::<MAX_FRAME_CEILING>()),
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
