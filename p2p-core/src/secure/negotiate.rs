//! The payloads of handshake messages 2 and 3: the responder offers its transport ciphers,
//! the initiator names the one it chose (docs/SECURITY.md gives the bytes).
//!
//! A payload is a sequence of fields `[tag: u8][len: u8][value: len bytes]`. A decoder
//! skips fields whose tag it does not know, so a later version can add fields; a known tag
//! twice or a field that runs past the end makes the payload malformed.
//!
//! | tag | message | value |
//! |---|---|---|
//! | `01` | 2 (responder) | the ids of the ciphers it accepts, best first; unknown ids are ignored |
//! | `02` | 3 (initiator) | exactly one id: the cipher chosen |
//!
//! Cipher ids: `01` ChaCha20-Poly1305, `02` AES-256-GCM ([`TransportCipher::id`]).
//!
//! Nodes of earlier versions send empty payloads and ignore these (they read messages 2
//! and 3 into a buffer and drop the payload), so: no offer (or one that does not parse) in
//! message 2 means ChaCha20-Poly1305, and the initiator then sends an empty payload in
//! message 3; no choice in message 3 means ChaCha20-Poly1305.

use super::cipher::TransportCipher;
use crate::HandshakeError;

/// Tag of the responder's offer (message 2).
pub const TAG_OFFER: u8 = 0x01;
/// Tag of the initiator's choice (message 3).
pub const TAG_CHOICE: u8 = 0x02;

/// Most ciphers an offer lists (this version sends two; a longer list is cut when decoded:
/// the rest is ignored).
const MAX_OFFER: usize = 16;

/// What a handshake payload of messages 2 or 3 says, as far as this version knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    /// The responder's offer (tag `01`): the ciphers it accepts that this version knows,
    /// in its order, without repeats. `None` without the field.
    pub offer: Option<Vec<TransportCipher>>,
    /// The initiator's choice (tag `02`): the id as sent (it may be one this version does
    /// not know). `None` without the field.
    pub choice: Option<u8>,
}

impl Payload {
    /// Decodes a payload (see the module documentation). `Err` names what is malformed.
    pub fn decode(mut bytes: &[u8]) -> Result<Payload, &'static str> {
        let mut out = Payload::default();
        while let [tag, len, rest @ ..] = bytes {
            let len = usize::from(*len);
            let Some(value) = rest.get(..len) else {
                return Err("a field runs past the end of the payload");
            };
            bytes = &rest[len..];
            match *tag {
                TAG_OFFER => {
                    if out.offer.is_some() {
                        return Err("two cipher offers");
                    }
                    let mut offer = Vec::new();
                    for c in value.iter().filter_map(|&id| TransportCipher::from_id(id)) {
                        if !offer.contains(&c) && offer.len() < MAX_OFFER {
                            offer.push(c);
                        }
                    }
                    out.offer = Some(offer);
                }
                TAG_CHOICE => {
                    if out.choice.is_some() {
                        return Err("two cipher choices");
                    }
                    let [id] = value else {
                        return Err("a cipher choice is not one byte");
                    };
                    out.choice = Some(*id);
                }
                // A field of a later version.
                _ => {}
            }
        }
        if !bytes.is_empty() {
            return Err("a field header is cut short");
        }
        Ok(out)
    }

    /// Encodes the fields that are set (offer first).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(offer) = &self.offer {
            out.push(TAG_OFFER);
            let ids: Vec<u8> = offer.iter().take(MAX_OFFER).map(|c| c.id()).collect();
            // At most MAX_OFFER (16) ids: the length fits.
            out.push(u8::try_from(ids.len()).unwrap_or(0));
            out.extend_from_slice(&ids);
        }
        if let Some(id) = self.choice {
            out.extend_from_slice(&[TAG_CHOICE, 1, id]);
        }
        out
    }
}

/// The responder's message 2 payload: an offer of `ciphers`.
pub(super) fn offer(ciphers: &[TransportCipher]) -> Vec<u8> {
    Payload {
        offer: Some(ciphers.to_vec()),
        choice: None,
    }
    .encode()
}

/// The initiator's choice from the responder's message 2 `payload`, with `mine` its own
/// ciphers, best first: the first of `mine` that the responder offers, ChaCha20-Poly1305
/// when none is or the responder offers nothing (a node of an earlier version), and the
/// message 3 payload that names it (empty when the responder offered nothing: an earlier
/// version expects no payload).
pub(super) fn choose(payload: &[u8], mine: &[TransportCipher]) -> (TransportCipher, Vec<u8>) {
    let Some(offered) = Payload::decode(payload).ok().and_then(|p| p.offer) else {
        return (TransportCipher::ChaChaPoly, Vec::new());
    };
    let chosen = mine
        .iter()
        .copied()
        .find(|c| offered.contains(c))
        .unwrap_or(TransportCipher::ChaChaPoly);
    let payload = Payload {
        offer: None,
        choice: Some(chosen.id()),
    }
    .encode();
    (chosen, payload)
}

/// The cipher the initiator chose in its message 3 `payload`, checked against what this
/// responder `offered`: none named (a node of an earlier version) is ChaCha20-Poly1305,
/// which is always accepted; any other must be one offered. A malformed payload or a
/// cipher not offered fails the handshake.
pub(super) fn accept(
    payload: &[u8],
    offered: &[TransportCipher],
) -> Result<TransportCipher, HandshakeError> {
    let p = Payload::decode(payload).map_err(|why| HandshakeError::Payload { step: 3, why })?;
    let Some(id) = p.choice else {
        return Ok(TransportCipher::ChaChaPoly);
    };
    match TransportCipher::from_id(id) {
        Some(TransportCipher::ChaChaPoly) => Ok(TransportCipher::ChaChaPoly),
        Some(c) if offered.contains(&c) => Ok(c),
        _ => Err(HandshakeError::CipherNotOffered { id }),
    }
}
