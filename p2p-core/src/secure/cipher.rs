//! The transport ciphers: the keys of a finished handshake (Noise's `Split()`) used with
//! ChaCha20-Poly1305 or AES-256-GCM, each with Noise's nonce for that cipher, by ring.
//!
//! Both are byte for byte what a Noise `TransportState` of the same cipher sends (tested
//! against snow's in `secure/tests.rs`): ChaCha20-Poly1305 is the transport of every
//! earlier version, AES-256-GCM is negotiated in the handshake (`negotiate`).

use bytes::{BufMut, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};

use super::{MAX_NOISE_MESSAGE, TAG_LEN};
use crate::{ConnectionError, Error};

/// The AEAD a secure channel's transport messages use after the handshake. The handshake
/// itself is always [`NOISE_PARAMS`](super::NOISE_PARAMS) (ChaCha20-Poly1305); only the
/// transport keys (Noise's `Split()`) may be used with another cipher, when both sides
/// agreed on it in the handshake (docs/SECURITY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportCipher {
    /// ChaCha20-Poly1305, nonce = 4 zero bytes and the 64-bit counter little-endian
    /// (Noise's `ChaChaPoly`): what every version speaks, and the choice when a peer
    /// names none.
    ChaChaPoly,
    /// AES-256-GCM, nonce = 4 zero bytes and the 64-bit counter big-endian (Noise's
    /// `AESGCM`): chosen when both sides offer it (a node offers it when its CPU has AES
    /// instructions).
    AesGcm,
}

impl TransportCipher {
    /// Every cipher this version knows, in its order of preference when the CPU has AES
    /// instructions.
    pub const ALL: [TransportCipher; 2] = [TransportCipher::AesGcm, TransportCipher::ChaChaPoly];

    /// Its id in the handshake's payloads.
    pub fn id(self) -> u8 {
        match self {
            TransportCipher::ChaChaPoly => 1,
            TransportCipher::AesGcm => 2,
        }
    }

    /// The cipher with handshake id `id`, if this version knows it.
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }

    /// The name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            TransportCipher::ChaChaPoly => "ChaCha20-Poly1305",
            TransportCipher::AesGcm => "AES-256-GCM",
        }
    }

    /// The ciphers this node offers and prefers, best first: AES-256-GCM first where the CPU
    /// has AES and carry-less multiply instructions (there ring's AES-256-GCM costs under a
    /// third of its ChaCha20-Poly1305), ChaCha20-Poly1305 alone elsewhere (AES without
    /// those instructions is slower than ChaCha20-Poly1305).
    pub fn preferred() -> &'static [TransportCipher] {
        if aes_in_hardware() {
            &Self::ALL
        } else {
            &[TransportCipher::ChaChaPoly]
        }
    }

    fn algorithm(self) -> &'static ring::aead::Algorithm {
        match self {
            TransportCipher::ChaChaPoly => &CHACHA20_POLY1305,
            TransportCipher::AesGcm => &AES_256_GCM,
        }
    }

    /// Noise's nonce for counter `n`: 4 zero bytes, then `n` in this cipher's byte order.
    fn nonce(self, n: u64) -> Nonce {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&match self {
            TransportCipher::ChaChaPoly => n.to_le_bytes(),
            TransportCipher::AesGcm => n.to_be_bytes(),
        });
        Nonce::assume_unique_for_key(bytes)
    }
}

impl std::fmt::Display for TransportCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this CPU has the instructions that make AES-GCM fast (AES rounds and carry-less
/// multiplication).
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// One direction of a secure channel: a key and Noise's message counter. The counter
/// never wraps: at 2^64-1 (reserved by Noise) every further message is an error.
pub(super) struct CipherState {
    cipher: TransportCipher,
    key: LessSafeKey,
    n: u64,
}

impl std::fmt::Debug for CipherState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CipherState")
            .field("cipher", &self.cipher)
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl CipherState {
    /// A direction keyed with `key` (32 bytes of Noise's `Split()`), counter 0.
    pub(super) fn new(cipher: TransportCipher, key: &[u8; 32]) -> Result<Self, Error> {
        let key = UnboundKey::new(cipher.algorithm(), key)
            .map_err(|_| Error::Connection(ConnectionError::Encode("bad cipher key".into())))?;
        Ok(CipherState {
            cipher,
            key: LessSafeKey::new(key),
            n: 0,
        })
    }

    /// The cipher.
    pub(super) fn cipher(&self) -> TransportCipher {
        self.cipher
    }

    /// The next counter value, or an error when the counter is spent.
    fn next(&mut self) -> Option<Nonce> {
        // 2^64-1 is reserved (Noise, section 5.1): never used, never wrapped past.
        if self.n == u64::MAX {
            return None;
        }
        let nonce = self.cipher.nonce(self.n);
        self.n += 1;
        Some(nonce)
    }

    /// Appends `plain` (at most [`MAX_NOISE_MESSAGE`] - [`TAG_LEN`] bytes) to `dst` as one
    /// transport message: `[u16 BE length][ciphertext][tag]`, empty associated data.
    pub(super) fn seal(&mut self, plain: &[u8], dst: &mut BytesMut) -> Result<(), Error> {
        let start = dst.len();
        dst.reserve(2 + plain.len() + TAG_LEN);
        dst.put_u16(0);
        dst.extend_from_slice(plain);
        self.seal_in_place(dst, start)
    }

    /// Seals the plaintext at `dst[start + 2..]` (at most [`MAX_NOISE_MESSAGE`] -
    /// [`TAG_LEN`] bytes, after two bytes kept for the length) in place as one transport
    /// message: writes the length, encrypts, appends the tag. On an error `dst` is cut
    /// back to `start`.
    pub(super) fn seal_in_place(&mut self, dst: &mut BytesMut, start: usize) -> Result<(), Error> {
        let fail = |dst: &mut BytesMut, why: &str| {
            dst.truncate(start);
            Err(Error::Connection(ConnectionError::Encode(why.into())))
        };
        let len = dst.len().saturating_sub(start + 2) + TAG_LEN;
        let Some(len16) = u16::try_from(len).ok().filter(|_| len <= MAX_NOISE_MESSAGE) else {
            return fail(dst, "chunk too large");
        };
        let Some(nonce) = self.next() else {
            return fail(
                dst,
                "the secure channel's message counter is spent (2^64-1 messages): reconnect",
            );
        };
        dst[start..start + 2].copy_from_slice(&len16.to_be_bytes());
        match self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut dst[start + 2..])
        {
            Ok(tag) => {
                dst.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => fail(dst, "encryption failed"),
        }
    }

    /// Decrypts one transport message's ciphertext and tag in place; returns the length
    /// of the plaintext, which starts `in_out`. A message that does not authenticate (or a
    /// spent counter) is [`ConnectionError::Tampered`]; the counter advances only on
    /// success.
    pub(super) fn open(&mut self, in_out: &mut [u8]) -> Result<usize, Error> {
        let tampered = || Error::Connection(ConnectionError::Tampered);
        if in_out.len() < TAG_LEN || self.n == u64::MAX {
            return Err(tampered());
        }
        let nonce = self.cipher.nonce(self.n);
        let n = self
            .key
            .open_in_place(nonce, Aad::empty(), in_out)
            .map_err(|_| tampered())?
            .len();
        self.n += 1;
        Ok(n)
    }

    /// Sets the counter (tests of exhaustion).
    #[cfg(test)]
    pub(super) fn set_counter(&mut self, n: u64) {
        self.n = n;
    }
}

/// Both directions of a secure channel.
#[derive(Debug)]
pub(super) struct Transport {
    /// What this side sends with.
    pub(super) send: CipherState,
    /// What this side receives with.
    pub(super) recv: CipherState,
}

impl Transport {
    /// The transport of one side, from the two keys of Noise's `Split()` (`split.0`:
    /// initiator to responder, `split.1`: responder to initiator).
    pub(super) fn new(
        cipher: TransportCipher,
        split: &([u8; 32], [u8; 32]),
        initiator: bool,
    ) -> Result<Self, Error> {
        let (send, recv) = if initiator {
            (&split.0, &split.1)
        } else {
            (&split.1, &split.0)
        };
        Ok(Transport {
            send: CipherState::new(cipher, send)?,
            recv: CipherState::new(cipher, recv)?,
        })
    }
}
