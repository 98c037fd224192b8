//! The secure handshake: an IO-free state machine ([`Handshake`]) and the loop that runs
//! it on a socket ([`handshake`]).

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::cipher::{Transport, TransportCipher};
use super::{
    negotiate, SecureCodec, MAX_HANDSHAKE_MESSAGE, NOISE_PARAMS, PREAMBLE, PROLOGUE, TAG_LEN,
};
use crate::conn::Role;
use crate::identity::{node_id_of, Identity};
use crate::key::{to_hex, ClusterKey, FINGERPRINT_LEN};
use crate::{Error, HandshakeError, NodeId, Stage};

/// Where a [`Handshake`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Acceptor: waiting for the [`PREAMBLE`].
    Preamble,
    /// Waiting for Noise message `n` (1 and 3 as acceptor, 2 as initiator).
    Message(u8),
    /// Initiator: waiting for the responder's confirmation.
    Confirmation,
    /// Done: [`Handshake::finish`] gives the codec.
    Done,
    /// Failed: nothing more is read or sent.
    Failed,
}

/// The Noise state: handshake messages until message 3, then the transport keys (in the
/// negotiated cipher) and the node id the peer's static key proves.
enum Noise {
    Handshake(Box<snow::HandshakeState>),
    Transport(Box<Transport>, NodeId),
    Gone,
}

/// The secure handshake (see the module documentation) as a state machine without IO, like
/// [`crate::conn::Connection`]: feed it what arrives ([`Handshake::handle_bytes`], in any
/// pieces), send what [`Handshake::poll_transmit`] gives, and once
/// [`Handshake::is_done`], [`Handshake::finish`] turns it into the [`SecureCodec`] of the
/// rest of the connection. [`handshake`] runs one on a socket.
///
/// It never holds more than one handshake message it has not processed (a length prefix
/// is checked before the message is buffered), and [`Handshake::wants`] says how many bytes
/// its next step needs, so a driver that reads no more than that never reads past the
/// handshake.
pub struct Handshake {
    role: Role,
    keys: Vec<ClusterKey>,
    /// The transport ciphers this side offers (responder) or may choose (initiator), best
    /// first.
    ciphers: Vec<TransportCipher>,
    noise: Noise,
    step: Step,
    /// Bytes received and not processed yet.
    input: BytesMut,
    /// Bytes to send.
    output: BytesMut,
    max_frame: usize,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("step", &self.step)
            .field("buffered", &self.input.len())
            .field("to_send", &self.output.len())
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake as `role`. `keys` are this node's cluster keys: an initiator dials
    /// with the first one (and names it by its fingerprint in message 1); an acceptor
    /// accepts any of them. `identity`'s private key is the Noise static key. An initiator
    /// has its first message ready in [`Handshake::poll_transmit`] at once.
    pub fn new(
        role: Role,
        keys: &[ClusterKey],
        identity: &Identity,
        max_frame: usize,
    ) -> Result<Self, HandshakeError> {
        let Some(dial_key) = keys.first() else {
            return Err(HandshakeError::NoKey);
        };
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
        // The acceptor replaces this pre-shared key by the one the initiator names.
        let builder = snow::Builder::new(params)
            .local_private_key(identity.private_key())
            .psk(3, dial_key.as_bytes())
            .prologue(PROLOGUE);
        let mut hs = Handshake {
            role,
            keys: keys.to_vec(),
            ciphers: TransportCipher::preferred().to_vec(),
            noise: Noise::Gone,
            step: Step::Failed,
            input: BytesMut::new(),
            output: BytesMut::new(),
            max_frame,
        };
        match role {
            Role::Initiator => {
                let mut noise = builder.build_initiator()?;
                // -> e, with the fingerprint of the key we use as the (cleartext) payload.
                let mut out = [0u8; MAX_HANDSHAKE_MESSAGE];
                let n = noise.write_message(&dial_key.fingerprint_bytes(), &mut out)?;
                hs.output.extend_from_slice(&PREAMBLE);
                put_message(&mut hs.output, &out[..n]);
                hs.noise = Noise::Handshake(Box::new(noise));
                hs.step = Step::Message(2);
            }
            Role::Acceptor => {
                hs.noise = Noise::Handshake(Box::new(builder.build_responder()?));
                hs.step = Step::Preamble;
            }
        }
        Ok(hs)
    }

    /// The same handshake offering (responder) or choosing from (initiator) only
    /// `ciphers` (best first); ChaCha20-Poly1305 is the fallback either way.
    #[cfg(test)]
    pub(super) fn with_ciphers(mut self, ciphers: &[TransportCipher]) -> Self {
        self.ciphers = ciphers.to_vec();
        self
    }

    /// Takes bytes received from the peer and runs every step they complete. An error ends
    /// the handshake (nothing is sent to the peer: the connection is to be closed). Bytes
    /// after the end of the handshake are kept for [`Handshake::finish`].
    pub fn handle_bytes(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if self.step == Step::Failed {
            return Err(self.closed());
        }
        self.input.extend_from_slice(data);
        let r = self.advance();
        if r.is_err() {
            self.step = Step::Failed;
            self.input.clear();
            self.output.clear();
        }
        r
    }

    /// The peer closed the connection (or reset it) before the handshake completed: the
    /// error to report. The handshake is over.
    pub fn handle_eof(&mut self) -> HandshakeError {
        self.step = Step::Failed;
        self.closed()
    }

    /// Bytes to send to the peer, if any (each call takes them).
    pub fn poll_transmit(&mut self) -> Option<BytesMut> {
        (!self.output.is_empty()).then(|| self.output.split())
    }

    /// How many more bytes the next step needs: a driver that reads at most this many at a
    /// time never reads past the handshake. 0 when done or failed.
    pub fn wants(&self) -> usize {
        let need = match self.step {
            Step::Done | Step::Failed => return 0,
            Step::Preamble => PREAMBLE.len(),
            Step::Message(_) | Step::Confirmation => match self.input.get(..2) {
                Some(len) => 2 + usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => 2,
            },
        };
        need.saturating_sub(self.input.len()).max(1)
    }

    /// Whether the handshake is complete ([`Handshake::finish`] then gives the codec; an
    /// acceptor's confirmation may still be in [`Handshake::poll_transmit`]).
    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// The codec of the rest of the connection (with [`SecureCodec::peer_id`], the node id
    /// the peer's identity proves) and the bytes received after the handshake, which are
    /// the codec's to decode. Fails unless [`Handshake::is_done`].
    pub fn finish(self) -> Result<(SecureCodec, BytesMut), HandshakeError> {
        let not_done = self.closed();
        let Noise::Transport(transport, peer_id) = self.noise else {
            return Err(not_done);
        };
        if self.step != Step::Done {
            return Err(not_done);
        }
        Ok((
            SecureCodec::new(*transport, self.max_frame, peer_id),
            self.input,
        ))
    }

    fn stage(&self) -> Stage {
        Stage::Secure {
            dialled_with: match self.role {
                Role::Initiator => self.keys.first().map(ClusterKey::fingerprint),
                Role::Acceptor => None,
            },
        }
    }

    fn closed(&self) -> HandshakeError {
        HandshakeError::PeerClosed {
            stage: self.stage(),
        }
    }

    /// Runs steps while the input holds what they need.
    fn advance(&mut self) -> Result<(), HandshakeError> {
        loop {
            match self.step {
                Step::Done | Step::Failed => return Ok(()),
                Step::Preamble => {
                    if self.input.len() < PREAMBLE.len() {
                        return Ok(());
                    }
                    let pre = self.input.split_to(PREAMBLE.len());
                    if pre[..] != PREAMBLE {
                        return Err(if pre[0] == 0 {
                            // A plaintext frame's length prefix: a node without a key.
                            HandshakeError::Plaintext
                        } else {
                            HandshakeError::NotSecureChannel
                        });
                    }
                    self.step = Step::Message(1);
                }
                Step::Message(_) | Step::Confirmation => {
                    let max = if self.step == Step::Confirmation {
                        TAG_LEN
                    } else {
                        MAX_HANDSHAKE_MESSAGE
                    };
                    let Some(msg) = take_message(&mut self.input, max)? else {
                        return Ok(());
                    };
                    self.step = self.on_message(&msg)?;
                }
            }
        }
    }

    /// Processes one handshake message; returns the next step.
    fn on_message(&mut self, msg: &[u8]) -> Result<Step, HandshakeError> {
        let mut out = [0u8; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        let noise = std::mem::replace(&mut self.noise, Noise::Gone);
        match (self.step, noise) {
            // Acceptor: -> e, fingerprint; <- e, ee, s, es.
            (Step::Message(1), Noise::Handshake(mut hs)) => {
                let n = hs
                    .read_message(msg, &mut payload)
                    .map_err(|_| HandshakeError::Invalid { step: 1 })?;
                let key = choose_key(&payload[..n], &self.keys)?;
                hs.set_psk(3, key.as_bytes())?;
                // <- the transport ciphers this node accepts (encrypted, and bound into the
                // handshake hash that message 3 authenticates).
                let n = hs.write_message(&negotiate::offer(&self.ciphers), &mut out)?;
                put_message(&mut self.output, &out[..n]);
                self.noise = Noise::Handshake(hs);
                // The chosen key first: message 3 is checked against it.
                if let Some(at) = self.keys.iter().position(|k| k == key) {
                    self.keys.swap(0, at);
                }
                Ok(Step::Message(3))
            }
            // Initiator: <- e, ee, s, es; -> s, se, psk.
            (Step::Message(2), Noise::Handshake(mut hs)) => {
                let n = hs
                    .read_message(msg, &mut payload)
                    .map_err(|_| HandshakeError::Invalid { step: 2 })?;
                // -> the cipher chosen from the responder's offer (none: an earlier
                // version, ChaCha20-Poly1305 and an empty payload as before).
                let (cipher, choice) = negotiate::choose(&payload[..n], &self.ciphers);
                let n = hs.write_message(&choice, &mut out)?;
                put_message(&mut self.output, &out[..n]);
                self.noise = transport(&mut hs, cipher, true)?;
                Ok(Step::Confirmation)
            }
            // Acceptor: -> s, se, psk (where a wrong key shows); <- confirmation.
            (Step::Message(3), Noise::Handshake(mut hs)) => {
                let n = hs.read_message(msg, &mut payload).map_err(|_| {
                    HandshakeError::KeyMismatch {
                        fingerprint: self.keys.first().map(ClusterKey::fingerprint),
                    }
                })?;
                let cipher = negotiate::accept(&payload[..n], &self.ciphers)?;
                let mut noise = transport(&mut hs, cipher, false)?;
                // The confirmation, already in the chosen cipher.
                if let Noise::Transport(t, _) = &mut noise {
                    t.send
                        .seal(&[], &mut self.output)
                        .map_err(|_| HandshakeError::Invalid { step: 3 })?;
                }
                self.noise = noise;
                Ok(Step::Done)
            }
            // Initiator: <- confirmation: the responder accepted our key.
            (Step::Confirmation, Noise::Transport(mut transport, peer_id)) => {
                let mut msg = msg.to_vec();
                transport
                    .recv
                    .open(&mut msg)
                    .map_err(|_| HandshakeError::KeyMismatch { fingerprint: None })?;
                self.noise = Noise::Transport(transport, peer_id);
                Ok(Step::Done)
            }
            // Not reachable: each step keeps the Noise state it needs.
            _ => Err(self.closed()),
        }
    }
}

/// The transport of a finished Noise handshake in `cipher`: the keys of Noise's `Split()`
/// (the same that snow's transport mode would use), and the node id of the peer's static key.
fn transport(
    hs: &mut snow::HandshakeState,
    cipher: TransportCipher,
    initiator: bool,
) -> Result<Noise, HandshakeError> {
    if !hs.is_handshake_finished() {
        return Err(HandshakeError::Noise(snow::Error::State(
            snow::error::StateProblem::HandshakeNotFinished,
        )));
    }
    let peer_id = match hs.get_remote_static() {
        Some(public) => node_id_of(public),
        None => return Err(HandshakeError::NoStaticKey),
    };
    let split = hs.dangerously_get_raw_split();
    let transport = Transport::new(cipher, &split, initiator)
        .map_err(|_| HandshakeError::Invalid { step: 3 })?;
    Ok(Noise::Transport(Box::new(transport), peer_id))
}

/// The acceptor's key for the fingerprint in message 1. An empty payload (a node of an
/// earlier version, which names no key) means this node's first key.
fn choose_key<'k>(
    fingerprint: &[u8],
    keys: &'k [ClusterKey],
) -> Result<&'k ClusterKey, HandshakeError> {
    if fingerprint.is_empty() {
        return keys.first().ok_or(HandshakeError::NoKey);
    }
    if fingerprint.len() != FINGERPRINT_LEN {
        return Err(HandshakeError::FingerprintLength {
            len: fingerprint.len(),
            expected: FINGERPRINT_LEN,
        });
    }
    keys.iter()
        .find(|k| k.fingerprint_bytes()[..] == *fingerprint)
        .ok_or_else(|| HandshakeError::UnknownKey {
            offered: to_hex(fingerprint),
            accepted: keys.iter().map(ClusterKey::fingerprint).collect(),
        })
}

/// Appends `msg` with its u16 length prefix (handshake messages are at most
/// [`MAX_HANDSHAKE_MESSAGE`] bytes, so the length fits).
pub(super) fn put_message(dst: &mut BytesMut, msg: &[u8]) {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    dst.put_u16(len);
    dst.extend_from_slice(msg);
}

/// One length-prefixed handshake message from `src`, if whole; its length is checked
/// against `max` before anything is buffered for it.
pub(super) fn take_message(
    src: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, HandshakeError> {
    let Some(len) = src.get(..2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len > max {
        return Err(HandshakeError::Oversized { len, max });
    }
    if src.len() < 2 + len {
        return Ok(None);
    }
    src.advance(2);
    Ok(Some(src.split_to(len)))
}

/// Runs the secure handshake on `io` (see the module documentation and [`Handshake`]) and
/// returns the codec for the rest of the connection; [`SecureCodec::peer_id`] is the node
/// id the peer's identity proves. The caller bounds it in time. It reads nothing past the
/// handshake.
///
/// Errors: [`HandshakeError`] when the peer has no key or a key this node does not have, or
/// does not speak the secure layer, or closes the connection, or when `keys` is empty;
/// [`Error::Io`] when the socket fails.
pub async fn handshake<S>(
    io: &mut S,
    role: Role,
    keys: &[ClusterKey],
    identity: &Identity,
    max_frame: usize,
) -> Result<SecureCodec, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = Handshake::new(role, keys, identity, max_frame)?;
    let mut buf = [0u8; 2 + MAX_HANDSHAKE_MESSAGE];
    loop {
        if let Some(out) = hs.poll_transmit() {
            io.write_all(&out).await?;
            io.flush().await?;
        }
        if hs.is_done() {
            // Nothing was read past the handshake (`wants`), so nothing is left over.
            let (codec, _rest) = hs.finish()?;
            return Ok(codec);
        }
        let want = hs.wants().min(buf.len());
        let n = match io.read(&mut buf[..want]).await {
            Ok(0) => return Err(hs.handle_eof().into()),
            Ok(n) => n,
            Err(e) if closed(e.kind()) => return Err(hs.handle_eof().into()),
            Err(e) => return Err(Error::Io(e)),
        };
        hs.handle_bytes(&buf[..n])?;
    }
}

/// Whether a read error means the peer closed the connection.
fn closed(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(kind, UnexpectedEof | ConnectionReset)
}
