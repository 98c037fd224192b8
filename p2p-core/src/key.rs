//! The cluster key: a 32-byte secret shared by every node of a cluster.
//!
//! With a key, every connection runs a Noise handshake that proves both sides hold it, and
//! every frame after it is encrypted and authenticated (see [`crate::secure`]).
//!
//! # File format
//!
//! A key file holds one line: the 32 key bytes as 64 lower-case hexadecimal characters,
//! followed by a newline. [`ClusterKey::load`] ignores surrounding whitespace (so a missing or
//! CRLF line ending is fine) and accepts upper-case digits too; anything else is an error.
//!
//! ```text
//! 3f1c0e7a...(64 hex characters in all)...9b
//! ```
//!
//! # Permissions
//!
//! The path must name a regular file (a symbolic link to one is fine): a FIFO, a directory
//! or a device is refused at once ([`crate::file`]).
//!
//! A key file is a secret: [`ClusterKey::write_new`] creates it with mode `0600` and never
//! overwrites an existing file. On Unix, [`ClusterKey::load`] applies [`permitted`] to the
//! file's mode, owner and group and this process's effective user and groups:
//!
//! - others may have no access at all (no bit of `0o007`), ever;
//! - the group may not write or execute it (no bit of `0o030`);
//! - a file the group may read (`0o040`, as Kubernetes mounts a Secret: mode `0440`, group
//!   `fsGroup`) is accepted only when its owner is root or this process's user *and* its
//!   group is one of this process's groups (its effective group or a supplementary one), so
//!   the only other readers are members of a group this node runs in;
//! - a file only its owner may access (`0600`, `0400`) is accepted whoever owns it.
//!
//! Anything else is refused with an error saying to run `chmod 600 PATH`.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};

/// Length of a cluster key in bytes.
pub const KEY_LEN: usize = 32;

/// Length of a key fingerprint in bytes (shown as twice as many hex digits).
pub const FINGERPRINT_LEN: usize = 8;

/// What can go wrong reading or writing a key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file does not exist.
    #[error("key file {path} does not exist")]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// A new key file would replace an existing file.
    #[error(
        "{path} already exists; refusing to overwrite it (choose another path, or remove it first)"
    )]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// The file's content is not 64 characters long.
    #[error(
        "key file {path}: expected 64 hexadecimal characters (32 bytes), found {found} characters"
    )]
    Length {
        /// The path.
        path: PathBuf,
        /// How many characters the trimmed content has.
        found: usize,
    },
    /// The file's content has a character that is not a hexadecimal digit.
    #[error("key file {path}: character {position} is not a hexadecimal digit")]
    NotHex {
        /// The path.
        path: PathBuf,
        /// 1-based position of the first bad character.
        position: usize,
    },
    /// The key file's mode, owner or group let others read or change it (see the module
    /// documentation for what is accepted).
    #[error(
        "key file {path} is accessible by group or others (mode {mode:04o}; a group may only \
         read it when the file is owned by root or by this user and its group is one of this \
         process's groups); a cluster key is a secret: run `chmod 600 {path}`"
    )]
    Permissions {
        /// The path.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// Another I/O failure.
    #[error("key file {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A cluster key: 32 secret bytes that every node of a cluster shares.
///
/// Its `Debug` output shows only the [fingerprint](ClusterKey::fingerprint), never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_LEN]);

impl ClusterKey {
    /// A new random key (from the operating system's generator via `rand`).
    pub fn generate() -> Self {
        ClusterKey(rand::random())
    }

    /// A key from raw bytes (for embedding programs that keep the key elsewhere).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        ClusterKey(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses the file format's text: 64 hex digits, surrounding whitespace ignored.
    /// `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeyError> {
        let text = text.trim();
        let found = text.chars().count();
        if found != 2 * KEY_LEN {
            return Err(KeyError::Length {
                path: path.to_path_buf(),
                found,
            });
        }
        let digits = text.as_bytes();
        let mut key = [0u8; KEY_LEN];
        for (i, out) in key.iter_mut().enumerate() {
            let hi = hex_value(digits[2 * i]);
            let lo = hex_value(digits[2 * i + 1]);
            match (hi, lo) {
                (Some(h), Some(l)) => *out = (h << 4) | l,
                (None, _) => return Err(not_hex(path, 2 * i)),
                (Some(_), None) => return Err(not_hex(path, 2 * i + 1)),
            }
        }
        Ok(ClusterKey(key))
    }

    /// Reads a key file (see the module documentation for the format and the permission
    /// rule).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let io_err = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => KeyError::Missing {
                path: path.to_path_buf(),
            },
            _ => KeyError::Io {
                path: path.to_path_buf(),
                source,
            },
        };
        // Opened without blocking and checked on the open file: a FIFO, a directory or a
        // device is refused at once (a FIFO would otherwise block startup forever).
        let file = crate::file::open_regular_read(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        check_permissions(path, &meta)?;
        // A key file is 65 bytes; refuse to read a large file into memory.
        if meta.len() > 4096 {
            return Err(KeyError::Length {
                path: path.to_path_buf(),
                found: usize::try_from(meta.len()).unwrap_or(usize::MAX),
            });
        }
        let mut bytes = Vec::new();
        file.take(4097).read_to_end(&mut bytes).map_err(io_err)?;
        let text = String::from_utf8_lossy(&bytes);
        Self::parse(&text, path)
    }

    /// Creates `path` holding a new random key, with mode `0600`, and returns the key.
    /// Fails with [`KeyError::Exists`] if anything exists at `path`.
    pub fn write_new(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let key = ClusterKey::generate();
        key.write_to(path.as_ref())?;
        Ok(key)
    }

    /// Writes this key to a new file at `path` (mode `0600`, never overwriting).
    pub fn write_to(&self, path: &Path) -> Result<(), KeyError> {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let mut line = self.hex();
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    /// A 16-byte message authentication code of `data` under this key, for `context`
    /// (a label that keeps MACs of different uses apart): BLAKE2s-256 over the context, the
    /// key and the data, truncated. BLAKE2 has no length-extension weakness, so this
    /// prefix construction is a sound MAC.
    pub fn mac(&self, context: &[u8], data: &[u8]) -> [u8; 16] {
        let mut h = Blake2s256::new();
        h.update((context.len() as u64).to_be_bytes());
        h.update(context);
        h.update(self.0);
        h.update(data);
        let digest = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out
    }

    /// A short public name for the key: 16 hex digits of a hash of it. Two nodes show the
    /// same fingerprint exactly when they hold the same key; the key cannot be derived from
    /// it. Useful in logs and when rotating keys.
    pub fn fingerprint(&self) -> String {
        to_hex(&self.fingerprint_bytes())
    }

    /// The [fingerprint](ClusterKey::fingerprint) as bytes: the first
    /// [`FINGERPRINT_LEN`] bytes of BLAKE2s-256 over the label
    /// `p2p-node cluster key fingerprint v1` and the key. Not secret: a dialler sends it in
    /// the clear so the acceptor knows which of its keys to use (see [`crate::secure`]).
    pub fn fingerprint_bytes(&self) -> [u8; FINGERPRINT_LEN] {
        let mut h = Blake2s256::new();
        h.update(b"p2p-node cluster key fingerprint v1");
        h.update(self.0);
        let digest = h.finalize();
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        out
    }

    fn hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(fingerprint {})", self.fingerprint())
    }
}

/// Lower-case hex digits of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// The value of one hex digit (either case).
pub(crate) fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn not_hex(path: &Path, index: usize) -> KeyError {
    KeyError::NotHex {
        path: path.to_path_buf(),
        position: index + 1,
    }
}

/// A key file's owner, group and mode, and the process that wants to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access<'a> {
    /// The file's permission bits.
    pub mode: u32,
    /// The file's owner.
    pub file_uid: u32,
    /// The file's group.
    pub file_gid: u32,
    /// This process's effective user id.
    pub uid: u32,
    /// This process's effective group id and supplementary groups.
    pub groups: &'a [u32],
}

/// Whether a key file may be used: no access for others, and read access for the group
/// only when the file is owned by root or by this process's user and its group is one of
/// this process's groups (see the module documentation).
pub fn permitted(a: Access<'_>) -> bool {
    let mode = a.mode & 0o777;
    if mode & 0o007 != 0 || mode & 0o030 != 0 {
        return false;
    }
    if mode & 0o040 == 0 {
        return true;
    }
    (a.file_uid == 0 || a.file_uid == a.uid) && a.groups.contains(&a.file_gid)
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = meta.permissions().mode() & 0o7777;
    let mut groups: Vec<u32> = vec![rustix::process::getegid().as_raw()];
    // Without the supplementary groups only the effective one counts (stricter, not looser).
    if let Ok(more) = rustix::process::getgroups() {
        groups.extend(more.into_iter().map(|g| g.as_raw()));
    }
    let access = Access {
        mode,
        file_uid: meta.uid(),
        file_gid: meta.gid(),
        uid: rustix::process::geteuid().as_raw(),
        groups: &groups,
    };
    if !permitted(access) {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn write_new_then_load_round_trips_with_mode_0600() {
        let dir = tmp();
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::write_new(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert!(text[..64]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
    }

    #[test]
    fn write_new_refuses_an_existing_file() {
        let dir = tmp();
        let path = dir.path().join("k");
        fs::write(&path, "keep me").unwrap();
        assert!(matches!(
            ClusterKey::write_new(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn load_errors_are_clear() {
        let dir = tmp();
        let missing = dir.path().join("nope");
        let e = ClusterKey::load(&missing).unwrap_err();
        assert!(
            matches!(e, KeyError::Missing { ref path } if *path == missing),
            "{e}"
        );

        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            }
            p
        };
        let short = write("short", "abcd\n");
        assert!(matches!(
            ClusterKey::load(&short),
            Err(KeyError::Length { found: 4, .. })
        ));
        let mut bad = "0".repeat(64);
        bad.replace_range(10..11, "g");
        let bad = write("bad", &bad);
        assert!(matches!(
            ClusterKey::load(&bad),
            Err(KeyError::NotHex { position: 11, .. })
        ));
        // Upper case and CRLF are accepted.
        let upper = write("upper", &format!("{}\r\n", "AB".repeat(32)));
        assert_eq!(
            ClusterKey::load(&upper).unwrap(),
            ClusterKey::from_bytes([0xab; 32])
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_a_directory_or_a_device_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (p, what) in [
            (fifo.as_path(), "a FIFO"),
            (dir.path(), "a directory"),
            (Path::new("/dev/zero"), "a character device"),
        ] {
            let e = ClusterKey::load(p).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn load_refuses_a_key_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp();
        let path = dir.path().join("k");
        ClusterKey::write_new(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&path).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn the_group_may_read_a_key_only_when_it_is_the_nodes_own_group() {
        let me = 1000;
        let groups = [1000, 2000];
        let ok = |mode, file_uid, file_gid| {
            permitted(Access {
                mode,
                file_uid,
                file_gid,
                uid: me,
                groups: &groups,
            })
        };
        // Owner only: as before, whoever owns it.
        assert!(ok(0o600, me, 1000));
        assert!(ok(0o400, 0, 0));
        assert!(ok(0o600, 4242, 4242));
        // Kubernetes: a Secret mounted 0440, owned by root, group fsGroup (one of ours).
        assert!(ok(0o440, 0, 2000));
        assert!(ok(0o640, me, 1000));
        // Group-readable, but the group is not ours, or the owner is someone else.
        assert!(!ok(0o440, 0, 3000));
        assert!(!ok(0o640, 4242, 2000));
        // The group may never write or execute it; others may never touch it.
        assert!(!ok(0o660, 0, 2000));
        assert!(!ok(0o620, me, 1000));
        assert!(!ok(0o610, me, 1000));
        for other in [0o604, 0o602, 0o601, 0o444, 0o644] {
            assert!(!ok(other, me, 1000), "{other:o}");
            assert!(!ok(other, 0, 2000), "{other:o}");
        }
        // Bits above 0o777 (setgid, sticky) do not change the answer.
        assert!(ok(0o2440, 0, 2000));
    }

    #[cfg(unix)]
    #[test]
    fn load_accepts_a_key_readable_by_the_nodes_own_group() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp();
        let path = dir.path().join("k");
        let written = ClusterKey::write_new(&path).unwrap();
        // Owned by this process's user, group one of its groups (the directory's).
        fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap(), written);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o460)).unwrap();
        assert!(matches!(
            ClusterKey::load(&path),
            Err(KeyError::Permissions { mode: 0o460, .. })
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ClusterKey::from_bytes([0x5a; 32]);
        let dbg = format!("{key:?}");
        assert!(!dbg.contains("5a5a"), "{dbg}");
        assert!(dbg.contains(&key.fingerprint()));
        assert_eq!(key.fingerprint().len(), 16);
        assert_ne!(
            key.fingerprint(),
            ClusterKey::from_bytes([0; 32]).fingerprint()
        );
    }
}
