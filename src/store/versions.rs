//! The high-water mark of snapshot versions: the highest version that ever left the process
//! (stored, served, published), kept in a small file beside sled's own so that a sled that
//! reopens at an earlier commit (after corruption, it drops what it cannot read) cannot take it
//! back with the data. The next version is always above it, so a version number that readers
//! have seen is never given to other content.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::StoreError;

/// The mark's file name in the state dir.
pub const VERSION_MARK_FILE: &str = "snapshot-versions";

/// A state dir that holds fewer snapshot versions than had left the process: sled reopened at
/// an earlier commit (or the dir was restored from an older copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollback {
    /// The highest version the database holds.
    pub stored: u64,
    /// The highest version that had left the process (the mark, or a floor raised later).
    pub marked: u64,
}

/// The mark file and its value.
pub(super) struct VersionMark {
    path: PathBuf,
    /// The highest version known to have left the process; the lock also orders file writes.
    highest: Mutex<u64>,
}

impl VersionMark {
    /// Reads the mark of the state dir `dir` (0 when there is none: a new dir, or one written
    /// before the mark existed).
    pub(super) fn open(dir: &Path) -> Result<VersionMark, StoreError> {
        let path = dir.join(VERSION_MARK_FILE);
        let highest = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|detail| StoreError::CorruptVersionMark {
                path: path.clone(),
                detail,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(StoreError::VersionMarkIo {
                    path: path.clone(),
                    source,
                });
            }
        };
        Ok(VersionMark {
            path,
            highest: Mutex::new(highest),
        })
    }

    pub(super) fn highest(&self) -> u64 {
        *self.highest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the mark to `version` (durably, before returning) if it is higher; returns the
    /// mark as it was.
    pub(super) fn raise(&self, version: u64) -> Result<u64, StoreError> {
        let mut highest = self.highest.lock().unwrap_or_else(|e| e.into_inner());
        let before = *highest;
        if version > before {
            write_atomically(&self.path, &encode(version)).map_err(|source| {
                StoreError::VersionMarkIo {
                    path: self.path.clone(),
                    source,
                }
            })?;
            *highest = version;
        }
        Ok(before)
    }
}

/// `version <n>` and a check line, so that a flipped byte is found rather than read as a lower
/// version (which would let versions repeat).
fn encode(version: u64) -> Vec<u8> {
    let line = format!("version {version}");
    format!("{line}\ncheck {:016x}\n", fnv1a(line.as_bytes())).into_bytes()
}

fn decode(bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
    let mut lines = text.split('\n');
    let (Some(line), Some(check), Some(""), None) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Err("expected two lines: `version <n>` and `check <hex>`".into());
    };
    let version = line
        .strip_prefix("version ")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| format!("bad version line {line:?}"))?;
    let expected = format!("check {:016x}", fnv1a(line.as_bytes()));
    if check != expected {
        return Err(format!(
            "the check line {check:?} does not match {line:?} (expected {expected:?})"
        ));
    }
    Ok(version)
}

/// 64-bit FNV-1a: a check against flipped bytes, not against tampering.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Replaces `path` with `contents` so that a crash leaves the old file or the new one, never a
/// mix: a temporary file written and synced, renamed over it, then the directory synced (the
/// rename itself must survive a power loss).
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temporary = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_round_trips_and_a_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mark = VersionMark::open(dir.path()).unwrap();
        assert_eq!(mark.highest(), 0, "no file: no mark");
        assert_eq!(mark.raise(29).unwrap(), 0);
        assert_eq!(mark.raise(12).unwrap(), 29, "never lowered");
        assert_eq!(VersionMark::open(dir.path()).unwrap().highest(), 29);
        assert!(!dir.path().join("snapshot-versions.tmp").exists());

        let path = dir.path().join(VERSION_MARK_FILE);
        let good = std::fs::read(&path).unwrap();
        // Every single-byte change of the digits is caught, e.g. 29 read as 19.
        for at in 0..good.len() {
            let mut flipped = good.clone();
            flipped[at] ^= 0x01;
            std::fs::write(&path, &flipped).unwrap();
            let error = VersionMark::open(dir.path()).err();
            assert!(
                matches!(error, Some(StoreError::CorruptVersionMark { .. })),
                "byte {at} flipped: {error:?}"
            );
        }
        std::fs::write(&path, [good.as_slice(), b"x"].concat()).unwrap();
        assert!(VersionMark::open(dir.path()).is_err(), "trailing bytes");
    }

    fn small_snapshot(version: u64) -> crate::snapshot::Snapshot {
        crate::snapshot::test_support::small_snapshot(version, false)
    }

    /// Copies sled's files of `from` (not the version mark) over `to`.
    fn copy_database(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if name == VERSION_MARK_FILE {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(to.join(&name)).unwrap();
                copy_database(&entry.path(), &to.join(&name));
            } else {
                std::fs::copy(entry.path(), to.join(&name)).unwrap();
            }
        }
    }

    #[test]
    fn a_database_rolled_back_to_an_earlier_copy_continues_above_the_versions_that_left() {
        let dir = tempfile::tempdir().unwrap();
        let (state, earlier) = (dir.path().join("state"), dir.path().join("earlier"));
        let put = |versions: std::ops::RangeInclusive<u64>| {
            let snapshots = super::super::open(&state).unwrap().snapshots;
            for v in versions {
                assert_eq!(snapshots.next_snapshot_version().unwrap(), v);
                snapshots
                    .put_snapshot(&small_snapshot(v), &[0; 20], 10)
                    .unwrap();
            }
        };
        put(1..=3);
        std::fs::create_dir_all(&earlier).unwrap();
        copy_database(&state, &earlier);
        put(4..=5);
        // sled reopens at the earlier commit: versions 4 and 5 are gone from the database, but
        // they were served and published; the mark beside it stays.
        let mark = std::fs::read(state.join(VERSION_MARK_FILE)).unwrap();
        std::fs::remove_dir_all(&state).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        copy_database(&earlier, &state);
        std::fs::write(state.join(VERSION_MARK_FILE), mark).unwrap();

        let snapshots = super::super::open(&state).unwrap().snapshots;
        assert_eq!(snapshots.snapshot_versions().unwrap(), vec![1, 2, 3]);
        assert_eq!(
            snapshots.rollback(),
            Some(Rollback {
                stored: 3,
                marked: 5
            })
        );
        assert_eq!(
            snapshots.next_snapshot_version().unwrap(),
            6,
            "4 and 5 left"
        );
        snapshots
            .put_snapshot(&small_snapshot(6), &[0; 20], 10)
            .unwrap();
        drop(snapshots);
        let snapshots = super::super::open(&state).unwrap().snapshots;
        assert_eq!(snapshots.rollback(), None, "caught up");
        assert_eq!(snapshots.next_snapshot_version().unwrap(), 7);
    }

    #[test]
    fn a_raised_floor_moves_the_next_version_and_reports_versions_the_database_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = super::super::open(dir.path()).unwrap().snapshots;
        for v in 1..=2 {
            snapshots
                .put_snapshot(&small_snapshot(v), &[0; 20], 10)
                .unwrap();
        }
        assert_eq!(snapshots.raise_version_floor(2).unwrap(), None, "held");
        assert_eq!(
            snapshots.raise_version_floor(9).unwrap(),
            Some(Rollback {
                stored: 2,
                marked: 9
            })
        );
        assert_eq!(snapshots.raise_version_floor(4).unwrap(), None, "below");
        assert_eq!(snapshots.next_snapshot_version().unwrap(), 10);
        drop(snapshots);
        let reopened = super::super::open(dir.path()).unwrap().snapshots;
        assert_eq!(reopened.next_snapshot_version().unwrap(), 10, "durable");
    }
}
