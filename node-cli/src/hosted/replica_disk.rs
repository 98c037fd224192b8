//! Where a member keeps a replicated run's group: `DIR/RUN_ID/` (`serve` uses
//! `DATA/replicas/NODE_ID` as `DIR`) holds `members.json` (the group, written once),
//! `vote` (term, vote and commit index, replaced whole) and `log` (the Raft log).
//!
//! `vote` is replaced (and synced) when the term or vote changes, and replaced without a
//! sync when only the commit index advances (an older one is safe).
//!
//! `log` is a sequence of records, each a 4-byte little-endian length and the bincode of
//! one entry (type, term, index, data, context). An entry whose index is at most the last
//! one's replaces the entries from its index on (Raft overwrote a conflicting suffix). A
//! record cut short by a crash ends the log and is cut off at the next open. Every write
//! is synced before the call returns, as the journal of stage 1 is.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use p2p_core::replica::Member;
use raft::eraftpb::{Entry, EntryType, HardState};
use serde::{Deserialize, Serialize};

use super::replica::{Log, Saved};

/// The longest record of the log (an entry of a 4 MiB plan fits, with room).
const MAX_RECORD: usize = 64 << 20;

#[derive(Serialize, Deserialize)]
struct DiskEntry {
    entry_type: u8,
    term: u64,
    index: u64,
    data: Vec<u8>,
    context: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Vote {
    term: u64,
    vote: u64,
    commit: u64,
}

/// The files of one member of one group.
#[derive(Debug)]
pub struct DiskLog {
    dir: PathBuf,
    log: File,
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn write_replace(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// [`write_replace`] without waiting for the disk (what it keeps may be lost, never torn).
fn write_replace_unsynced(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD>()
}

impl DiskLog {
    /// Makes the files of a new group in `dir` (which must not exist), synced.
    pub fn create(dir: &Path, members: &[Member]) -> std::io::Result<DiskLog> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        let json = serde_json::to_vec(members).map_err(std::io::Error::other)?;
        write_replace(dir, "members.json", &json)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))?;
        log.sync_all()?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(DiskLog {
            dir: dir.to_path_buf(),
            log,
        })
    }

    /// Opens the files of a group kept in `dir`: its members, and what the member kept.
    pub fn open(dir: &Path) -> std::io::Result<(DiskLog, Vec<Member>, Saved)> {
        let members: Vec<Member> =
            serde_json::from_slice(&std::fs::read(dir.join("members.json"))?)
                .map_err(std::io::Error::other)?;
        let mut saved = Saved::default();
        match std::fs::read(dir.join("vote")) {
            Ok(bytes) => {
                let v: Vote = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
                saved.hard_state.term = v.term;
                saved.hard_state.vote = v.vote;
                saved.hard_state.commit = v.commit;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut bytes = Vec::new();
        File::open(dir.join("log"))?.read_to_end(&mut bytes)?;
        let mut at = 0usize;
        while bytes.len() - at >= 4 {
            let mut len = [0u8; 4];
            len.copy_from_slice(&bytes[at..at + 4]);
            let len = u32::from_le_bytes(len) as usize;
            if len > MAX_RECORD || bytes.len() - at - 4 < len {
                break;
            }
            let Ok((d, _)) = bincode::serde::decode_from_slice::<DiskEntry, _>(
                &bytes[at + 4..at + 4 + len],
                bincode_cfg(),
            ) else {
                break;
            };
            let e = Entry {
                entry_type: match d.entry_type {
                    1 => EntryType::EntryConfChange,
                    2 => EntryType::EntryConfChangeV2,
                    _ => EntryType::EntryNormal,
                },
                term: d.term,
                index: d.index,
                data: d.data.into(),
                context: d.context.into(),
                ..Default::default()
            };
            // A replaced suffix: keep the entries before this one's index.
            let keep = e.index.saturating_sub(1) as usize;
            if keep > saved.entries.len() {
                // A gap cannot be written by Raft: the log ends before it.
                break;
            }
            saved.entries.truncate(keep);
            saved.entries.push(e);
            at += 4 + len;
        }
        let log = OpenOptions::new().append(true).open(dir.join("log"))?;
        if at < bytes.len() {
            // A record cut short: cut it off, so the next one follows the last whole one.
            log.set_len(at as u64)?;
            log.sync_all()?;
        }
        Ok((
            DiskLog {
                dir: dir.to_path_buf(),
                log,
            },
            members,
            saved,
        ))
    }
}

impl Log for DiskLog {
    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for e in entries {
            let d = DiskEntry {
                entry_type: e.entry_type as u8,
                term: e.term,
                index: e.index,
                data: e.data.to_vec(),
                context: e.context.to_vec(),
            };
            let bytes =
                bincode::serde::encode_to_vec(&d, bincode_cfg()).map_err(std::io::Error::other)?;
            let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&bytes);
        }
        self.log.write_all(&buf)?;
        self.log.sync_data()
    }

    fn save_hard_state(&mut self, hs: &HardState) -> std::io::Result<()> {
        let v = Vote {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        };
        let json = serde_json::to_vec(&v).map_err(std::io::Error::other)?;
        write_replace(&self.dir, "vote", &json)
    }

    fn save_commit(&mut self, hs: &HardState) -> std::io::Result<()> {
        let v = Vote {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        };
        let json = serde_json::to_vec(&v).map_err(std::io::Error::other)?;
        write_replace_unsynced(&self.dir, "vote", &json)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(term: u64, index: u64, data: &[u8]) -> Entry {
        Entry {
            term,
            index,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_log_reopens_as_written_with_replaced_suffixes_and_a_torn_end() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("replicas").join("run");
        let members = vec![Member {
            node: p2p_core::NodeId([1; 16]),
            addr: "127.0.0.1:1".into(),
        }];
        let mut log = DiskLog::create(&dir, &members).unwrap();
        log.append(&[entry(1, 1, b"a"), entry(1, 2, b"b"), entry(1, 3, b"c")])
            .unwrap();
        // Term 2 overwrote index 3 on.
        log.append(&[entry(2, 3, b"C"), entry(2, 4, b"D")]).unwrap();
        let hs = HardState {
            term: 2,
            vote: 1,
            ..Default::default()
        };
        log.save_hard_state(&hs).unwrap();
        drop(log);
        // A record cut short by a crash.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join("log"))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut log, m, saved) = DiskLog::open(&dir).unwrap();
        assert_eq!(m, members);
        assert_eq!(saved.hard_state.term, 2);
        assert_eq!(saved.hard_state.vote, 1);
        let got: Vec<(u64, u64, Vec<u8>)> = saved
            .entries
            .iter()
            .map(|e| (e.term, e.index, e.data.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, b"a".to_vec()),
                (1, 2, b"b".to_vec()),
                (2, 3, b"C".to_vec()),
                (2, 4, b"D".to_vec())
            ]
        );
        // The torn record was cut off: the next append follows the whole ones.
        log.append(&[entry(2, 5, b"E")]).unwrap();
        let (_, _, saved) = DiskLog::open(&dir).unwrap();
        assert_eq!(saved.entries.len(), 5);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
