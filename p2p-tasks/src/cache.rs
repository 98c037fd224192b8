//! The content-addressed file cache of a node (`serve --cache-size`, default 1 GiB).
//!
//! Files are named by their content hash ([`ContentHash`], 64 hex digits) in one directory
//! (`DATA_DIR/cache`); a file being received is written under `DATA_DIR/cache/partial/` and
//! moved to its name only once its hash has been checked, so a name always holds the bytes
//! it names. The [`Index`] is the rule, with no IO: which files there are, their sizes, the
//! total against the capacity, least recently used first, and pins (a file placed for a
//! running task, or an output not fetched yet, is never evicted). [`Cache`] is the thin
//! layer that applies it to the directory.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use p2p_core::ContentHash;

/// The default capacity of a node's cache: 1 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;

/// Why a file cannot enter the cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file is larger than the room the pinned files leave.
    #[error(
        "a file of {size} bytes does not fit in the cache ({capacity} bytes, {pinned} of them \
         in use by running tasks; see --cache-size)"
    )]
    NoRoom {
        /// The file's size.
        size: u64,
        /// The cache's capacity.
        capacity: u64,
        /// Bytes held by pinned files.
        pinned: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    /// When it was last used, in the index's own ticks (a key of `order`).
    used: u64,
    pins: u32,
}

/// The cache's bookkeeping: no IO, every operation O(log n).
#[derive(Debug, Clone)]
pub struct Index {
    capacity: u64,
    total: u64,
    pinned: u64,
    tick: u64,
    entries: HashMap<ContentHash, Entry>,
    /// Use order: tick -> hash, oldest first.
    order: BTreeMap<u64, ContentHash>,
}

impl Index {
    /// An empty index of `capacity` bytes.
    pub fn new(capacity: u64) -> Index {
        Index {
            capacity,
            total: 0,
            pinned: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Bytes held.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many files it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no file.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether it holds `hash`.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.entries.contains_key(hash)
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `hash` used now (most recently used); whether it is there.
    pub fn touch(&mut self, hash: &ContentHash) -> bool {
        let tick = self.next_tick();
        let Some(e) = self.entries.get_mut(hash) else {
            return false;
        };
        self.order.remove(&e.used);
        e.used = tick;
        self.order.insert(tick, *hash);
        true
    }

    /// Makes room for a file of `size` bytes: the least recently used unpinned files that
    /// must go, oldest first (removed from the index; the caller deletes them). Nothing is
    /// evicted when the file cannot fit even then.
    pub fn make_room(&mut self, size: u64) -> Result<Vec<ContentHash>, CacheError> {
        if size > self.capacity.saturating_sub(self.pinned) {
            return Err(CacheError::NoRoom {
                size,
                capacity: self.capacity,
                pinned: self.pinned,
            });
        }
        let mut evicted = Vec::new();
        let mut over = (self.total + size).saturating_sub(self.capacity);
        let mut victims = Vec::new();
        for (&tick, hash) in &self.order {
            if over == 0 {
                break;
            }
            let Some(e) = self.entries.get(hash) else {
                continue;
            };
            if e.pins > 0 {
                continue;
            }
            victims.push((tick, *hash));
            over = over.saturating_sub(e.size);
        }
        for (tick, hash) in victims {
            self.order.remove(&tick);
            if let Some(e) = self.entries.remove(&hash) {
                self.total -= e.size;
            }
            evicted.push(hash);
        }
        Ok(evicted)
    }

    /// Records a file of `size` bytes (after [`Index::make_room`]), most recently used.
    /// Adding one that is there already only touches it.
    pub fn insert(&mut self, hash: ContentHash, size: u64) {
        if self.touch(&hash) {
            return;
        }
        let tick = self.next_tick();
        self.entries.insert(
            hash,
            Entry {
                size,
                used: tick,
                pins: 0,
            },
        );
        self.order.insert(tick, hash);
        self.total += size;
    }

    /// Keeps `hash` from eviction until as many [`Index::unpin`]; whether it is there.
    pub fn pin(&mut self, hash: &ContentHash) -> bool {
        let Some(e) = self.entries.get_mut(hash) else {
            return false;
        };
        if e.pins == 0 {
            self.pinned += e.size;
        }
        e.pins += 1;
        true
    }

    /// Undoes one [`Index::pin`].
    pub fn unpin(&mut self, hash: &ContentHash) {
        if let Some(e) = self.entries.get_mut(hash) {
            if e.pins == 1 {
                self.pinned -= e.size;
            }
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// The size of `hash`'s file, if it is there.
    pub fn size_of(&self, hash: &ContentHash) -> Option<u64> {
        self.entries.get(hash).map(|e| e.size)
    }

    /// The least recently used file that is not pinned, if any.
    pub fn oldest_unpinned(&self) -> Option<ContentHash> {
        self.order
            .values()
            .find(|h| self.entries.get(h).is_some_and(|e| e.pins == 0))
            .copied()
    }

    /// Forgets `hash` (its file is gone); whether it was there.
    pub fn remove(&mut self, hash: &ContentHash) -> bool {
        let Some(e) = self.entries.remove(hash) else {
            return false;
        };
        self.order.remove(&e.used);
        self.total -= e.size;
        if e.pins > 0 {
            self.pinned -= e.size;
        }
        true
    }
}

/// The cache directory, kept by an [`Index`].
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    index: Index,
    /// The size and modification time of each file when it was first placed as a link
    /// (`serve --link-inputs`), to tell a file a task wrote from the one received.
    stamps: HashMap<ContentHash, Stamp>,
}

impl Cache {
    /// Opens (creating it, mode 0700) the cache in `dir` with `capacity` bytes: the files
    /// already there whose names are hashes are indexed, oldest modification first (a file
    /// that is not a hash's name is left alone), and partial files left by a crash are
    /// removed. When what is there exceeds the capacity, the oldest files are deleted.
    pub fn open(dir: &Path, capacity: u64) -> io::Result<Cache> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("partial"))?;
        // Files on their way in, and the collection directories of attempts (outputs and
        // whole streams), left by a process killed before it could remove them.
        for e in std::fs::read_dir(dir.join("partial"))?.flatten() {
            let _ = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(e.path()),
                _ => std::fs::remove_file(e.path()),
            };
        }
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let Some(hash) = e.file_name().to_str().and_then(ContentHash::from_hex) else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            found.push((meta.modified().ok(), hash, meta.len()));
        }
        found.sort();
        let mut cache = Cache {
            dir: dir.to_path_buf(),
            index: Index::new(capacity),
            stamps: Default::default(),
        };
        for (_, hash, size) in found {
            match cache.index.make_room(size) {
                Ok(evicted) => {
                    cache.delete(&evicted);
                    cache.index.insert(hash, size);
                }
                Err(_) => {
                    let _ = std::fs::remove_file(cache.path(&hash));
                }
            }
        }
        Ok(cache)
    }

    /// The bookkeeping.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Where the file of `hash` is (whether or not it is there).
    pub fn path(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    /// Whether the cache has `hash`, marking it used. A file deleted behind the cache's back
    /// is forgotten.
    pub fn has(&mut self, hash: &ContentHash) -> bool {
        if !self.index.contains(hash) {
            return false;
        }
        if !self.path(hash).is_file() {
            self.index.remove(hash);
            self.stamps.remove(hash);
            return false;
        }
        self.index.touch(hash)
    }

    /// A new partial file to receive into (`partial/RANDOM`), created exclusively.
    pub fn partial(&self) -> io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix("in-")
            .tempfile_in(self.dir.join("partial"))
    }

    /// Moves a received file, whose hash the receiver has checked, to its name, evicting
    /// what must go; the file is then pinned once (unpin it when its task is over).
    pub fn commit(
        &mut self,
        partial: tempfile::NamedTempFile,
        hash: ContentHash,
        size: u64,
    ) -> Result<PathBuf, CommitError> {
        let evicted = self.index.make_room(size)?;
        self.delete(&evicted);
        self.stamps.remove(&hash);
        let path = self.path(&hash);
        partial
            .persist(&path)
            .map_err(|e| CommitError::Io(e.error.to_string()))?;
        self.index.insert(hash, size);
        self.index.pin(&hash);
        Ok(path)
    }

    /// Moves a file already hashed (`hash`, `size`; a task's collected output) into the
    /// cache under its name, evicting what must go (a copy when it cannot be moved).
    pub fn commit_path(
        &mut self,
        path: &Path,
        hash: ContentHash,
        size: u64,
    ) -> Result<PathBuf, CommitError> {
        let dest = self.path(&hash);
        if self.has(&hash) {
            let _ = std::fs::remove_file(path);
            return Ok(dest);
        }
        let evicted = self.index.make_room(size)?;
        self.delete(&evicted);
        self.stamps.remove(&hash);
        if std::fs::rename(path, &dest).is_err() {
            std::fs::copy(path, &dest).map_err(|e| CommitError::Io(e.to_string()))?;
        }
        self.index.insert(hash, size);
        Ok(dest)
    }

    /// The directory for files on their way in (`partial/`).
    pub fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    /// Pins `hash` (see [`Index::pin`]).
    pub fn pin(&mut self, hash: &ContentHash) -> bool {
        self.index.pin(hash)
    }

    /// Unpins `hash` (see [`Index::unpin`]).
    pub fn unpin(&mut self, hash: &ContentHash) {
        self.index.unpin(hash);
    }

    /// Copies the file of `hash` to `dest` (a task's working directory; a copy, so the task
    /// cannot change the cached bytes). Uses the kernel's copy (`copy_file_range`, a
    /// reflink where the file system has them).
    pub fn place(&mut self, hash: &ContentHash, dest: &Path) -> io::Result<u64> {
        self.index.touch(hash);
        std::fs::copy(self.path(hash), dest)
    }

    /// Drops `hash` from the cache because its bytes changed: forgotten, and its file
    /// deleted when it is still the one open as `file` (not one received again since).
    pub fn forget_file(&mut self, hash: &ContentHash, file: &std::fs::File) {
        use std::os::unix::fs::MetadataExt;
        let path = self.path(hash);
        let same = match (std::fs::metadata(&path), file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&path);
            self.index.remove(hash);
            self.stamps.remove(hash);
        }
    }

    /// Whether the file of `hash`, now of `len` bytes modified at `modified`, is as it was
    /// the first time this was asked since it came into the cache (recorded then).
    pub fn unchanged(
        &mut self,
        hash: &ContentHash,
        len: u64,
        modified: Option<SystemTime>,
    ) -> bool {
        let now = Stamp { len, modified };
        *self.stamps.entry(*hash).or_insert(now) == now
    }

    /// Deletes the least recently used files no task uses while the disk under the cache has
    /// less than [`disk_reserve`] bytes free (plus `extra`, the size of a file about to be
    /// written), so that a full disk (`--cache-size` larger than what the disk has left)
    /// costs cached copies, sent again when wanted, rather than every later attempt. Does
    /// nothing when even an empty disk would not have the room. Returns how many files went
    /// and their bytes; an error reading the disk's figures deletes nothing.
    pub fn relieve_disk(&mut self, extra: u64) -> io::Result<(usize, u64)> {
        let dir = self.dir.clone();
        self.relieve_with(extra, || disk_space(&dir))
    }

    /// [`Cache::relieve_disk`] with the disk's `(free, size)` in bytes from `space`, asked
    /// again after each file deleted (a file still linked elsewhere frees nothing).
    fn relieve_with(
        &mut self,
        extra: u64,
        mut space: impl FnMut() -> io::Result<(u64, u64)>,
    ) -> io::Result<(usize, u64)> {
        let (mut free, size) = space()?;
        let want = disk_reserve(size).saturating_add(extra);
        if want > size {
            return Ok((0, 0));
        }
        let (mut files, mut bytes) = (0, 0);
        while free < want {
            let Some(hash) = self.index.oldest_unpinned() else {
                break;
            };
            let len = self.index.size_of(&hash).unwrap_or(0);
            self.index.remove(&hash);
            self.delete(&[hash]);
            files += 1;
            bytes += len;
            free = space()?.0;
        }
        Ok((files, bytes))
    }

    fn delete(&mut self, hashes: &[ContentHash]) {
        for h in hashes {
            self.stamps.remove(h);
            let _ = std::fs::remove_file(self.path(h));
        }
    }
}

/// The bytes [`Cache::relieve_disk`] keeps free on a disk of `size` bytes: an eighth of it,
/// at most 64 MiB (room for a task's streams and small outputs).
pub fn disk_reserve(size: u64) -> u64 {
    (size / 8).min(64 << 20)
}

/// `(free, size)` in bytes of the filesystem holding `dir`, as an unprivileged process may
/// use it.
fn disk_space(dir: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    let unit = st.f_frsize.max(1);
    Ok((
        st.f_bavail.saturating_mul(unit),
        st.f_blocks.saturating_mul(unit),
    ))
}

/// A cached file's size and modification time (see [`Cache::unchanged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

/// Why a received file could not be committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// No room.
    #[error(transparent)]
    NoRoom(#[from] CacheError),
    /// Moving it in place failed.
    #[error("cannot store a received file: {0}")]
    Io(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::test_links::put;

    fn h(n: u8) -> ContentHash {
        ContentHash([n; 32])
    }

    /// Files go oldest first, pinned ones never, until the disk has its reserve (and the
    /// file about to come) free; nothing goes for a file the disk could never hold.
    #[test]
    fn a_full_disk_drops_unpinned_files_oldest_first_until_its_reserve_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path(), 1 << 30).unwrap();
        let (a, pa) = put(&mut c, &[1; 300]);
        let (b, pb) = put(&mut c, &[2; 300]);
        let (d, pd) = put(&mut c, &[3; 300]);
        assert!(c.has(&a)); // a is now the most recently used: b is the oldest
        assert!(c.pin(&b));
        // A disk of 8,000 bytes (reserve 1,000) with 500 free, plus 300 per file deleted.
        let free = std::cell::Cell::new(500u64);
        let space = || Ok((free.get(), 8_000));
        let deleted = |c: &mut Cache, extra| {
            c.relieve_with(extra, || {
                let n = [&pa, &pb, &pd].iter().filter(|p| !p.exists()).count() as u64;
                Ok((free.get() + 300 * n, 8_000))
            })
            .unwrap()
        };
        // 1,000 wanted: d (the oldest unpinned) and then a go; b stays, pinned.
        assert_eq!(deleted(&mut c, 0), (2, 600));
        assert!(!pd.exists() && !pa.exists() && pb.exists());
        assert!(!c.index().contains(&d) && !c.index().contains(&a));
        assert!(c.index().contains(&b));
        // Nothing more to drop: the pinned file stays whatever is wanted.
        assert_eq!(deleted(&mut c, 5_000), (0, 0));
        assert!(pb.exists());
        // Enough free: nothing goes.
        free.set(7_000);
        c.unpin(&b);
        assert_eq!(c.relieve_with(0, space).unwrap(), (0, 0));
        // A file larger than the disk less its reserve: nothing goes for it.
        free.set(0);
        assert_eq!(c.relieve_with(7_001, space).unwrap(), (0, 0));
        assert!(pb.exists());
        assert_eq!(c.relieve_with(0, space).unwrap(), (1, 300));
        assert!(!pb.exists() && c.index().is_empty());
    }

    #[test]
    fn least_recently_used_files_go_first_and_pinned_ones_never() {
        let mut ix = Index::new(100);
        for n in 1..=4 {
            assert_eq!(ix.make_room(25).unwrap(), []);
            ix.insert(h(n), 25);
        }
        assert_eq!(ix.total(), 100);
        // Using 1 makes 2 the oldest.
        assert!(ix.touch(&h(1)));
        assert_eq!(ix.make_room(30).unwrap(), [h(2), h(3)]);
        ix.insert(h(5), 30);
        assert_eq!(ix.total(), 80);
        // A pinned file is skipped.
        assert!(ix.pin(&h(4)));
        assert_eq!(ix.make_room(40).unwrap(), [h(1)]);
        ix.insert(h(6), 40);
        assert!(ix.contains(&h(4)) && !ix.contains(&h(1)));
        // 55 pinned bytes of 100: nothing is evicted for a file of 46.
        assert!(ix.pin(&h(5)));
        assert!(ix.pin(&h(5)));
        let err = ix.make_room(46).unwrap_err();
        assert_eq!(
            err,
            CacheError::NoRoom {
                size: 46,
                capacity: 100,
                pinned: 55
            }
        );
        assert_eq!(ix.len(), 3);
        // Pins count: two pins need two unpins.
        ix.unpin(&h(5));
        ix.unpin(&h(4));
        assert_eq!(ix.make_room(60).unwrap(), [h(4), h(6)]);
        ix.unpin(&h(5));
        assert_eq!(ix.make_room(100).unwrap(), [h(5)]);
        assert!(ix.is_empty() && ix.total() == 0);
        // Inserting a file that is there only touches it.
        ix.insert(h(7), 10);
        ix.insert(h(7), 10);
        assert_eq!(ix.total(), 10);
        assert!(ix.remove(&h(7)) && !ix.remove(&h(7)));
        assert!(ix
            .make_room(101)
            .unwrap_err()
            .to_string()
            .contains("--cache-size"));
    }

    proptest::proptest! {
        /// Any sequence of inserts, uses, pins and unpins: the total is the sum of the sizes
        /// held and never over the capacity, a pinned file is never evicted, and eviction
        /// takes the least recently used first.
        #[test]
        fn the_index_keeps_its_invariants(
            ops in proptest::collection::vec((0u8..4, 0u8..12, 1u64..40), 0..200),
        ) {
            let mut ix = Index::new(100);
            let mut pins: HashMap<ContentHash, u32> = HashMap::new();
            let mut model: Vec<(ContentHash, u64)> = Vec::new(); // least recently used first
            for (op, n, size) in ops {
                let hash = h(n);
                match op {
                    0 => {
                        if let Ok(evicted) = ix.make_room(size) {
                            for e in &evicted {
                                proptest::prop_assert_eq!(pins.get(e).copied().unwrap_or(0), 0);
                                let oldest = model
                                    .iter()
                                    .find(|(x, _)| pins.get(x).copied().unwrap_or(0) == 0)
                                    .map(|(x, _)| *x);
                                proptest::prop_assert_eq!(Some(*e), oldest);
                                model.retain(|(x, _)| x != e);
                            }
                            if !model.iter().any(|(x, _)| *x == hash) {
                                model.push((hash, size));
                            } else {
                                let i = model.iter().position(|(x, _)| *x == hash).unwrap_or(0);
                                let item = model.remove(i);
                                model.push(item);
                            }
                            ix.insert(hash, model.last().map_or(size, |m| m.1));
                        }
                    }
                    1 => {
                        if ix.touch(&hash) {
                            let i = model.iter().position(|(x, _)| *x == hash).unwrap_or(0);
                            let item = model.remove(i);
                            model.push(item);
                        }
                    }
                    2 => {
                        if ix.pin(&hash) {
                            *pins.entry(hash).or_default() += 1;
                        }
                    }
                    _ => {
                        ix.unpin(&hash);
                        if let Some(p) = pins.get_mut(&hash) {
                            *p = p.saturating_sub(1);
                        }
                    }
                }
                let sum: u64 = model.iter().map(|(_, s)| s).sum();
                proptest::prop_assert_eq!(ix.total(), sum);
                proptest::prop_assert!(ix.total() <= 100);
                proptest::prop_assert_eq!(ix.len(), model.len());
            }
        }
    }

    #[test]
    fn a_cache_directory_keeps_files_by_hash_across_opens_within_its_size() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let mut c = Cache::open(&dir, 10).unwrap();
        let (a, pa) = put(&mut c, b"aaaa");
        let (b, _) = put(&mut c, b"bbbb");
        assert_eq!(std::fs::read(&pa).unwrap(), b"aaaa");
        assert_eq!(pa.file_name().unwrap().to_str().unwrap(), a.to_hex());
        assert!(c.has(&a));
        // a was used last: b goes for c.
        let (cc, _) = put(&mut c, b"cccc");
        assert!(!c.has(&b) && !c.path(&b).exists());
        // Placing copies.
        let dest = root.path().join("placed");
        c.place(&a, &dest).unwrap();
        std::fs::write(&dest, "changed").unwrap();
        assert_eq!(std::fs::read(c.path(&a)).unwrap(), b"aaaa");
        // A file deleted behind its back is forgotten.
        std::fs::remove_file(c.path(&cc)).unwrap();
        assert!(!c.has(&cc));
        // Reopened: what is there is indexed, partial files and over-capacity files go,
        // other names are left alone.
        std::fs::write(dir.join("partial/in-left"), "x").unwrap();
        std::fs::create_dir_all(dir.join("partial/collect-left/sub")).unwrap();
        std::fs::write(dir.join("partial/collect-left/sub/stdout"), "x").unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        drop(c);
        let mut c = Cache::open(&dir, 10).unwrap();
        assert!(c.has(&a));
        assert_eq!(c.index().total(), 4);
        assert!(!dir.join("partial/in-left").exists());
        assert!(!dir.join("partial/collect-left").exists());
        assert!(dir.join("notes.txt").exists());
        let small = Cache::open(&dir, 3).unwrap();
        assert!(small.index().is_empty());
        assert!(!c.path(&a).exists());
        // A file larger than the whole cache is refused.
        let mut c = Cache::open(&dir, 3).unwrap();
        let p = c.partial().unwrap();
        assert!(matches!(c.commit(p, h(1), 4), Err(CommitError::NoRoom(_))));
        let _ = c.has(&a);
    }

    #[test]
    fn a_file_written_after_its_first_link_is_told_apart_and_dropped() {
        let root = tempfile::tempdir().unwrap();
        let mut c = Cache::open(&root.path().join("cache"), 100).unwrap();
        let stamp = |path: &Path| {
            let m = std::fs::metadata(path).unwrap();
            (m.len(), m.modified().ok())
        };
        let (a, pa) = put(&mut c, b"aaaa");
        let (len, modified) = stamp(&pa);
        assert!(c.unchanged(&a, len, modified));
        assert!(c.unchanged(&a, len, modified));
        // Written through a link (a later modification time, or another size).
        let later = modified.map(|t| t + std::time::Duration::from_secs(1));
        assert!(!c.unchanged(&a, len, later));
        assert!(!c.unchanged(&a, len + 1, modified));
        // Dropped only while its name is still the file that was open.
        let open = std::fs::File::open(&pa).unwrap();
        let other = std::fs::File::open(root.path()).unwrap();
        c.forget_file(&a, &other);
        assert!(c.has(&a) && pa.exists());
        c.forget_file(&a, &open);
        assert!(!c.has(&a) && !pa.exists());
        // Received again: a new file, whose first stamp is its own.
        let (a2, pa2) = put(&mut c, b"aaaa");
        assert_eq!(a2, a);
        std::fs::write(&pa2, "aaaa").unwrap();
        let (len, modified) = stamp(&pa2);
        assert!(c.unchanged(&a, len, modified));
    }
}
