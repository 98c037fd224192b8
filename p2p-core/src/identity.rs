//! A node's identity: an X25519 static keypair whose public key names the node.
//!
//! With a cluster key, the [secure handshake](crate::secure) uses the identity's private key
//! as the Noise static key, so the handshake proves which keypair the peer holds; the node
//! id a peer claims in `Hello`/`Welcome` must be the one derived from that keypair's public
//! key ([`node_id_of`]), or the connection is refused. A node id therefore cannot be claimed
//! by anyone who does not hold the identity's private key.
//!
//! # Node id
//!
//! The first 16 bytes of BLAKE2s-256 over the label `p2p-node node id v1` and the 32-byte
//! public key, shown as 32 lower-case hex digits ([`NodeId`]'s `Display`).
//!
//! # File format
//!
//! An identity file holds the 32-byte private key as 64 lower-case hexadecimal characters
//! on one line. Lines starting with `#` are comments ([`Identity::write_new`] writes one
//! that names the node id); the first non-comment line must be the key and nothing else may
//! follow it but whitespace. Upper-case digits and surrounding whitespace are accepted.
//!
//! ```text
//! # p2p-node identity of node 5f0c...; this file is a secret (mode 0600)
//! 3f1c0e7a...(64 hex characters in all)...9b
//! ```
//!
//! # Holding an identity
//!
//! Two live nodes must never share an identity. [`Identity::hold`] takes an exclusive lock
//! (`flock`) on the identity file itself, so the lock is the same whatever path names the
//! file (a symbolic link, a hard link); it lasts until the [`HeldIdentity`] is dropped or
//! the process ends. The path must name a regular file: a FIFO, a directory or a device is
//! refused at once ([`crate::file`]).
//!
//! # Permissions
//!
//! The private key is a secret: [`Identity::write_new`] creates the file with mode `0600`
//! and never overwrites. On Unix, [`Identity::load`] refuses a file that the group or others
//! may read or write (any bit of `0o077`), as [`ClusterKey::load`](crate::ClusterKey::load)
//! does.

use std::fmt;
use std::fs::{self, File, TryLockError};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};
use curve25519_dalek::montgomery::MontgomeryPoint;

use crate::key::{hex_value, to_hex};
use crate::NodeId;

/// Length of an X25519 private or public key in bytes.
pub const IDENTITY_KEY_LEN: usize = 32;

const NODE_ID_LABEL: &[u8] = b"p2p-node node id v1";

/// What can go wrong reading or writing an identity file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The identity file does not exist (only from [`Identity::load`];
    /// [`Identity::load_or_create`] creates it).
    #[error("identity file {path} does not exist")]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// A new identity file would replace an existing file.
    #[error("{path} already exists; refusing to overwrite it")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// The file's content is not a private key in the format.
    #[error(
        "identity file {path}: {why} (expected one line of 64 hexadecimal characters, \
         the node's private key; remove the file to create a new identity)"
    )]
    Format {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The group or others may read or write the identity file.
    #[error(
        "identity file {path} is accessible by group or others (mode {mode:04o}); \
         it holds this node's private key: run `chmod 600 {path}`"
    )]
    Permissions {
        /// The path.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// Another I/O failure (e.g. the directory does not exist or is not writable).
    #[error("identity file {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A node's identity: an X25519 keypair; the node id derives from its public key.
///
/// Its `Debug` output shows only the node id, never the private key.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    private: [u8; IDENTITY_KEY_LEN],
    public: [u8; IDENTITY_KEY_LEN],
    id: NodeId,
}

/// The node id of the node whose identity public key is `public` (see the module
/// documentation). This is how a peer's id is checked after the secure handshake.
pub fn node_id_of(public: &[u8]) -> NodeId {
    let mut h = Blake2s256::new();
    h.update(NODE_ID_LABEL);
    h.update(public);
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    NodeId(id)
}

impl Identity {
    /// A new random identity (from the operating system's generator via `rand`).
    pub fn generate() -> Self {
        Identity::from_private_bytes(rand::random())
    }

    /// The identity with this X25519 private key (for embedding programs that keep the key
    /// elsewhere). Any 32 bytes are a valid private key (they are clamped when used).
    pub fn from_private_bytes(private: [u8; IDENTITY_KEY_LEN]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(private).to_bytes();
        Identity {
            private,
            public,
            id: node_id_of(&public),
        }
    }

    /// The private key (the Noise static key). A secret.
    pub fn private_key(&self) -> &[u8; IDENTITY_KEY_LEN] {
        &self.private
    }

    /// The public key, which peers learn during the secure handshake.
    pub fn public_key(&self) -> &[u8; IDENTITY_KEY_LEN] {
        &self.public
    }

    /// The node id derived from the public key.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// Parses the file format's text (see the module documentation). `path` is only used in
    /// error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, IdentityError> {
        let format = |why: String| IdentityError::Format {
            path: path.to_path_buf(),
            why,
        };
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let Some(line) = lines.next() else {
            return Err(format("the file holds no key".into()));
        };
        if lines.next().is_some() {
            return Err(format("more than one line besides comments".into()));
        }
        let found = line.chars().count();
        if found != 2 * IDENTITY_KEY_LEN {
            return Err(format(format!("found {found} characters")));
        }
        let digits = line.as_bytes();
        let mut private = [0u8; IDENTITY_KEY_LEN];
        for (i, out) in private.iter_mut().enumerate() {
            match (hex_value(digits[2 * i]), hex_value(digits[2 * i + 1])) {
                (Some(h), Some(l)) => *out = (h << 4) | l,
                (None, _) => return Err(format(not_hex(2 * i))),
                (Some(_), None) => return Err(format(not_hex(2 * i + 1))),
            }
        }
        Ok(Identity::from_private_bytes(private))
    }

    /// Reads an identity file (see the module documentation for the format and the
    /// permission rule).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let path = path.as_ref();
        let io_err = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => IdentityError::Missing {
                path: path.to_path_buf(),
            },
            _ => IdentityError::Io {
                path: path.to_path_buf(),
                source,
            },
        };
        let file = open_identity(path)?;
        let meta = file.metadata().map_err(io_err)?;
        check_permissions(path, &meta)?;
        read_identity(path, &file, &meta)
    }

    /// Holds the identity file at `path`, creating it (mode `0600`) if nothing exists there:
    /// takes an exclusive lock on the file itself (`flock`), kept until the returned
    /// [`HeldIdentity`] is dropped or the process ends, however it ends. `Ok(None)`: another
    /// live process holds this file, under this path or any other that names it (a
    /// symbolic or hard link); two live nodes never share an identity file.
    ///
    /// A file is locked before it holds a key: an empty identity file (its creator stopped,
    /// or lost the lock to this process, before it wrote the key) is filled by whoever holds
    /// it.
    pub fn hold(path: impl AsRef<Path>) -> Result<Option<HeldIdentity>, IdentityError> {
        let path = path.as_ref();
        let io_err = |source: io::Error| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Bounded: each round either holds an existing file, or creates one, or finds that
        // another process created it between our two calls.
        for _ in 0..8 {
            match open_identity(path) {
                Ok(file) => return hold_open(path, file),
                Err(IdentityError::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
            let file = match new_private_file(path) {
                Ok(f) => f,
                Err(IdentityError::Exists { .. }) if dangling(path) => {
                    return Err(io_err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "a symbolic link to a file that does not exist (create the identity \
                         where it points, or remove the link)",
                    )))
                }
                Err(IdentityError::Exists { .. }) => continue,
                Err(e) => return Err(e),
            };
            if !try_lock(&file).map_err(io_err)? {
                // Taken in the instant between our create and our lock; the holder writes it.
                return Ok(None);
            }
            let identity = Identity::generate();
            identity.write_into(path, &file)?;
            return Ok(Some(HeldIdentity {
                identity,
                created: true,
                _file: file,
            }));
        }
        Err(io_err(io::Error::other(
            "the file keeps appearing and disappearing; is another program removing it?",
        )))
    }

    /// Creates `path` holding a new random identity, with mode `0600`, and returns it.
    /// Fails with [`IdentityError::Exists`] if anything exists at `path`.
    pub fn write_new(path: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let identity = Identity::generate();
        identity.write_to(path.as_ref())?;
        Ok(identity)
    }

    /// Loads the identity at `path`, or creates it there (mode `0600`) if nothing exists at
    /// `path` yet. The directory must exist. Returns the identity and whether it was created.
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<(Self, bool), IdentityError> {
        let path = path.as_ref();
        match Identity::load(path) {
            Err(IdentityError::Missing { .. }) => match Identity::write_new(path) {
                Ok(identity) => Ok((identity, true)),
                // Another process created it in the meantime: use theirs.
                Err(IdentityError::Exists { .. }) => Identity::load(path).map(|i| (i, false)),
                Err(e) => Err(e),
            },
            other => other.map(|i| (i, false)),
        }
    }

    /// Writes this identity to a new file at `path` (mode `0600`, never overwriting).
    pub fn write_to(&self, path: &Path) -> Result<(), IdentityError> {
        let file = new_private_file(path)?;
        self.write_into(path, &file)
    }

    /// Writes the file format into `file` (empty, open for writing) and syncs it.
    fn write_into(&self, path: &Path, mut file: &File) -> Result<(), IdentityError> {
        let text = format!(
            "# p2p-node identity of node {}; this file is a secret (mode 0600)\n{}\n",
            self.id,
            to_hex(&self.private)
        );
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| IdentityError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

/// An identity file held by this process (see [`Identity::hold`]): the lock lasts as long
/// as this value.
#[derive(Debug)]
pub struct HeldIdentity {
    /// The identity.
    pub identity: Identity,
    /// Whether the key was written now (a new identity).
    pub created: bool,
    _file: File,
}

/// Opens an identity file for reading without blocking: anything but a regular file (a
/// symbolic link to one is fine) is refused at once.
fn open_identity(path: &Path) -> Result<File, IdentityError> {
    crate::file::open_regular_read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => IdentityError::Missing {
            path: path.to_path_buf(),
        },
        _ => IdentityError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Whether `path` is a symbolic link whose target does not exist.
fn dangling(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
        && fs::metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// Creates `path` for writing, mode `0600`, failing if anything exists there.
fn new_private_file(path: &Path) -> Result<File, IdentityError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => IdentityError::Exists {
            path: path.to_path_buf(),
        },
        _ => IdentityError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Takes the exclusive lock on `file` without waiting: `false` if another holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Holds the opened identity file: locks it, then reads it (or fills it when empty).
fn hold_open(path: &Path, file: File) -> Result<Option<HeldIdentity>, IdentityError> {
    let io_err = |source: io::Error| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    check_permissions(path, &file.metadata().map_err(io_err)?)?;
    if !try_lock(&file).map_err(io_err)? {
        return Ok(None);
    }
    // Looked at again under the lock: a creator may have written it in the meantime.
    let meta = file.metadata().map_err(io_err)?;
    if meta.len() > 0 {
        let identity = read_identity(path, &file, &meta)?;
        return Ok(Some(HeldIdentity {
            identity,
            created: false,
            _file: file,
        }));
    }
    // Empty: its creator never wrote the key. Fill this very file (the one we locked, even
    // if the path was changed since).
    let writer =
        crate::file::open_regular(path, fs::OpenOptions::new().write(true)).map_err(io_err)?;
    if !same_file(&writer.metadata().map_err(io_err)?, &meta) {
        return Err(io_err(io::Error::other(
            "the file was replaced while being opened; try again",
        )));
    }
    let identity = Identity::generate();
    identity.write_into(path, &writer)?;
    Ok(Some(HeldIdentity {
        identity,
        created: true,
        _file: file,
    }))
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.len() == b.len()
}

/// Reads and parses an opened identity file of `meta.len()` bytes.
fn read_identity(path: &Path, file: &File, meta: &fs::Metadata) -> Result<Identity, IdentityError> {
    // An identity file is about 140 bytes; refuse to read a large file into memory.
    if meta.len() > 4096 {
        return Err(IdentityError::Format {
            path: path.to_path_buf(),
            why: format!("{} bytes is far too long", meta.len()),
        });
    }
    let mut bytes = Vec::new();
    file.take(4097)
        .read_to_end(&mut bytes)
        .map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Identity::parse(&String::from_utf8_lossy(&bytes), path)
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity(node {})", self.id)
    }
}

fn not_hex(index: usize) -> String {
    format!(
        "character {} of the key is not a hexadecimal digit",
        index + 1
    )
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_public_key_is_x25519_of_the_private_key() {
        // RFC 7748, section 6.1: Alice's keys.
        let private: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public: [u8; 32] = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        let id = Identity::from_private_bytes(private);
        assert_eq!(id.public_key(), &public);
        assert_eq!(id.node_id(), node_id_of(&public));
        // And it agrees with snow's own key derivation.
        let params: snow::params::NoiseParams = crate::secure::NOISE_PARAMS.parse().unwrap();
        let kp = snow::Builder::new(params).generate_keypair().unwrap();
        let mine = Identity::from_private_bytes(kp.private.as_slice().try_into().unwrap());
        assert_eq!(&mine.public_key()[..], &kp.public[..]);
    }

    #[test]
    fn ids_differ_and_debug_hides_the_private_key() {
        let a = Identity::generate();
        let b = Identity::generate();
        assert_ne!(a.node_id(), b.node_id());
        let dbg = format!("{a:?}");
        assert!(dbg.contains(&a.node_id().to_string()), "{dbg}");
        assert!(!dbg.contains(&to_hex(a.private_key())), "{dbg}");
    }

    #[test]
    fn load_or_create_creates_once_with_mode_0600_then_loads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.id");
        let (first, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(&first.node_id().to_string()), "{text}");
        let (again, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, first);
        assert_eq!(Identity::load(&path).unwrap().node_id(), first.node_id());
        assert!(matches!(
            Identity::write_new(&path),
            Err(IdentityError::Exists { .. })
        ));
    }

    #[test]
    fn load_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let e = Identity::load(dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, IdentityError::Missing { .. }), "{e}");
        let e = Identity::load_or_create(dir.path().join("no-such-dir").join("id")).unwrap_err();
        assert!(matches!(e, IdentityError::Io { .. }), "{e}");
        assert!(e.to_string().contains("no-such-dir"), "{e}");

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
        let e = Identity::load(write("short", "# comment\nabcd\n")).unwrap_err();
        assert!(e.to_string().contains("found 4 characters"), "{e}");
        let e = Identity::load(write("empty", "# only a comment\n")).unwrap_err();
        assert!(e.to_string().contains("no key"), "{e}");
        let mut bad = "0".repeat(64);
        bad.replace_range(10..11, "g");
        let e = Identity::load(write("bad", &bad)).unwrap_err();
        assert!(e.to_string().contains("character 11"), "{e}");
        let two = format!("{}\n{}\n", "ab".repeat(32), "cd".repeat(32));
        assert!(matches!(
            Identity::load(write("two", &two)),
            Err(IdentityError::Format { .. })
        ));
        // Upper case, CRLF and no comment are accepted.
        let upper = write("upper", &format!("{}\r\n", "AB".repeat(32)));
        assert_eq!(
            Identity::load(&upper).unwrap(),
            Identity::from_private_bytes([0xab; 32])
        );
        // A directory is not an identity file (and load_or_create does not replace it).
        let e = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, IdentityError::Io { .. }), "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn an_identity_is_held_once_whatever_path_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        let held = Identity::hold(&path).unwrap().expect("free");
        assert!(held.created);
        let hard = dir.path().join("hard");
        fs::hard_link(&path, &hard).unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&path, &sym).unwrap();
        for p in [&path, &hard, &sym] {
            assert!(
                Identity::hold(p).unwrap().is_none(),
                "{} is held",
                p.display()
            );
        }
        let id = held.identity.node_id();
        drop(held);
        let again = Identity::hold(&sym).unwrap().expect("free again");
        assert!(!again.created);
        assert_eq!(again.identity.node_id(), id);
    }

    #[test]
    fn an_empty_identity_file_is_filled_by_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        // What a creator that died between creating and writing the file leaves.
        Identity::write_new(&path).unwrap();
        fs::write(&path, "").unwrap();
        let held = Identity::hold(&path).unwrap().expect("free");
        assert!(held.created);
        drop(held);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            Identity::parse(&text, &path).unwrap().node_id(),
            Identity::load(&path).unwrap().node_id()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_or_a_device_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for e in [
            Identity::load(&fifo).unwrap_err(),
            Identity::hold(&fifo).unwrap_err(),
            Identity::load_or_create(&fifo).unwrap_err(),
            Identity::hold(Path::new("/dev/null")).unwrap_err(),
            Identity::hold(dir.path()).unwrap_err(),
        ] {
            assert!(matches!(e, IdentityError::Io { .. }), "{e}");
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        // A symbolic link to nothing is said to be one.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let e = Identity::hold(&link).unwrap_err();
        assert!(
            e.to_string()
                .contains("symbolic link to a file that does not exist"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn load_refuses_an_identity_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        Identity::write_new(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        for e in [
            Identity::load(&path).unwrap_err(),
            Identity::load_or_create(&path).unwrap_err(),
        ] {
            assert!(
                matches!(e, IdentityError::Permissions { mode: 0o640, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }
}
