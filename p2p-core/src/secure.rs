//! The secure channel: a Noise handshake under the cluster key, then encrypted frames.
//!
//! With a [`ClusterKey`](crate::ClusterKey), a connection starts with the Noise handshake
//! [`NOISE_PARAMS`] (`Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s`, the cluster key as the
//! pre-shared key, the node's [`Identity`](crate::Identity) as the static key) before `Hello`. After it, the
//! plaintext byte stream of the protocol (the frames of [`crate::codec`], unchanged) is
//! carried in Noise transport messages, in the [`TransportCipher`] the handshake
//! negotiated. docs/SECURITY.md states the format byte by byte; in short:
//!
//! ```text
//! initiator -> responder   PREAMBLE (FF 70 32 70, "\xFFp2p"), then
//!                          [u16 BE len][Noise msg 1: e, payload = 8-byte key fingerprint]
//! responder -> initiator   [u16 BE len][Noise msg 2: e, ee, s, es, payload = cipher offer]
//! initiator -> responder   [u16 BE len][Noise msg 3: s, se, psk, payload = cipher choice]
//! responder -> initiator   [u16 BE len][transport message with an empty payload]  (confirmation)
//! then, both ways          [u16 BE len][transport message] ...
//! ```
//!
//! - The transport cipher: the responder offers the ciphers it accepts in message 2 and the
//!   initiator names its choice in message 3 ([`negotiate`]: fields `[tag][len][value]`,
//!   unknown ones skipped). Both payloads are encrypted and bound into the handshake hash,
//!   so changing either fails the handshake. Nodes of earlier versions send both empty and
//!   ignore them, which means ChaCha20-Poly1305; AES-256-GCM is chosen when both sides'
//!   CPUs have AES instructions ([`TransportCipher::preferred`]). The handshake is always
//!   [`NOISE_PARAMS`]; its split keys are used with the chosen AEAD from ring and Noise's
//!   nonce for that cipher, so a ChaCha20-Poly1305 channel is byte for byte what snow's
//!   transport sends. A message counter that reaches 2^64-1 is an error, never a wrap.
//!
//! - The preamble makes a node without a key fail at once and clearly (as a length prefix it
//!   claims ~4 GiB, over any maximum frame) and lets a keyed node tell a plaintext peer
//!   from one with another key.
//! - A node may hold several keys (during a key rotation): the initiator dials with its
//!   first key and names it in message 1 by its [fingerprint](crate::ClusterKey::fingerprint_bytes)
//!   (not secret); the responder picks its key with that fingerprint as the pre-shared key
//!   before message 3, or refuses clearly when it has none ("the peer uses a key this node
//!   does not have: fingerprint X"). The payload is bound into the handshake hash, so a
//!   changed fingerprint fails the handshake.
//! - The pre-shared key enters at message 3, so the responder finds a wrong key when it
//!   reads message 3; the confirmation tells the initiator that the responder accepted it.
//! - Each side's static key is its [`Identity`](crate::Identity); after the handshake
//!   [`SecureCodec::peer_id`] is the node id derived from the peer's static key, and
//!   [`crate::net`] refuses a peer whose `Hello`/`Welcome` claims another id.
//! - Each transport message carries either one or more whole frames, together at most
//!   [`BATCH_PLAINTEXT`] (16 KiB) of plaintext (the frames the driver sends in one burst
//!   share one message, so a burst of small frames costs one encryption and one tag), or
//!   one piece of a frame that does not fit: such a frame is cut into chunks of at most
//!   [`MAX_CHUNK_PLAINTEXT`] bytes (65,535 minus the 16-byte tag), one transport message
//!   each. A chunk never spans two frames. Decrypted bytes go to a plaintext buffer that
//!   [`FrameCodec`](crate::codec::FrameCodec) decodes, so the maximum-frame rule applies before anything is allocated
//!   for a frame, and the plaintext buffer never holds more than the maximum frame plus its
//!   4-byte header, or [`BATCH_PLAINTEXT`] if that is more.
//! - Noise's nonces count messages, so a tampered, replayed, reordered or dropped message
//!   fails to decrypt, which closes that connection ([`ConnectionError::Tampered`](crate::ConnectionError::Tampered)).
//!
//! The module is split by job: `handshake` ([`Handshake`], the IO-free state machine, and
//! [`handshake`], the loop that runs it on a socket), [`negotiate`] (the payloads of
//! messages 2 and 3), `cipher` ([`TransportCipher`] and the message counters) and `codec`
//! ([`SecureCodec`] and [`WireCodec`], what the driver runs after it).

mod cipher;
mod codec;
mod handshake;
pub mod negotiate;
#[cfg(test)]
mod tests;

pub use cipher::TransportCipher;
pub use codec::{SecureCodec, WireCodec};
pub use handshake::{handshake, Handshake};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";

/// The four bytes the initiator sends before the handshake.
pub const PREAMBLE: [u8; 4] = [0xff, b'p', b'2', b'p'];

/// Bound into the handshake hash: both sides must speak this version of the secure layer.
pub(crate) const PROLOGUE: &[u8] = b"p2p-node secure channel v1";

/// Largest Noise message (the Noise specification's limit).
pub const MAX_NOISE_MESSAGE: usize = 65_535;

/// Size of the authentication tag of every transport message.
pub const TAG_LEN: usize = 16;

/// Largest plaintext chunk carried by one transport message.
pub const MAX_CHUNK_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;

/// Most plaintext one transport message carries when it holds whole frames (a batch).
pub const BATCH_PLAINTEXT: usize = 16 * 1024;

/// Largest handshake message accepted (the real ones are 40, 100 and 67 bytes; 40, 96 and
/// 64 from a node of an earlier version).
pub(crate) const MAX_HANDSHAKE_MESSAGE: usize = 256;
