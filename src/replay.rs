//! File replay: streams a ratings file through the engine in timestamp order, in batches
//! committed to the state dir exactly as the Kafka service commits its batches, then builds,
//! stores and writes the final snapshot. Re-running on the same file resumes where it stopped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rustc_hash::FxHashMap;

use crate::config::Config;
use crate::decode::{self, FileFormat, RejectTally};
use crate::engine::{EngineView, IdMap};
use crate::event::{RatingRef, RejectReason, Rejection};
use crate::snapshot::validation::stable_hash;
use crate::snapshot::{self, Assignments, BuildInput, Built, Snapshot};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub ratings: PathBuf,
    pub items: Option<PathBuf>,
    pub format: FileFormat,
    pub snapshot_out: Option<PathBuf>,
    pub assignments_out: Option<PathBuf>,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// Events applied in this run (after any resume skip).
    pub applied: u64,
    /// Events skipped because an earlier run of the same file already applied them.
    pub skipped: u64,
    pub rejected: RejectTally,
    pub catalogue_bad_lines: u64,
    pub snapshot: Option<(Snapshot, Assignments)>,
}

/// A decoded file held compactly until it is replayed: ids interned once, 24 bytes an event
/// (the `String`s of 5M events would take most of the memory of a replay otherwise).
#[derive(Default)]
struct CompactEvents {
    ids: IdMap,
    rows: Vec<CompactEvent>,
}

#[derive(Clone, Copy)]
struct CompactEvent {
    user: u32,
    item: u32,
    /// NaN for a retraction (a decoded value is always finite).
    value: f64,
    ts: i64,
}

impl CompactEvents {
    /// Adds the events of a later piece of the same file, re-interning its ids.
    fn append(&mut self, later: CompactEvents) {
        let index: Vec<u32> = (0..later.ids.len() as u32)
            .map(|i| self.ids.intern(later.ids.id(i)).0)
            .collect();
        self.rows.extend(later.rows.iter().map(|r| CompactEvent {
            user: index[r.user as usize],
            item: index[r.item as usize],
            ..*r
        }));
    }

    fn push(&mut self, event: crate::event::DecodedRef<'_>) {
        let (user, _) = self.ids.intern(event.user);
        let (item, _) = self.ids.intern(event.item);
        self.rows.push(CompactEvent {
            user,
            item,
            value: event.value.unwrap_or(f64::NAN),
            ts: event.ts,
        });
    }

    /// The rows as events again (borrowing the ids), one batch at a time.
    fn events<'a>(&'a self, rows: &[CompactEvent]) -> Vec<RatingRef<'a>> {
        rows.iter()
            .map(|r| RatingRef {
                user: self.ids.id(r.user),
                item: self.ids.id(r.item),
                value: (!r.value.is_nan()).then_some(r.value),
                keys: Some((r.user, r.item)),
            })
            .collect()
    }
}

/// The key under which a file's progress is stored: its content hash and length, so a renamed
/// copy resumes and an edited file starts over. A state dir that replayed the file under the
/// key of earlier versions (`file:<fnv>:<len>`) has that entry moved to this key, so the
/// resume still skips what was applied.
fn source_key(bytes: &[u8], offsets: &mut BTreeMap<String, i64>) -> String {
    let key = format!("file:v2:{:016x}:{}", content_hash(bytes), bytes.len());
    let length = format!(":{}", bytes.len());
    let legacy_candidate =
        |k: &String| k.starts_with("file:") && !k.starts_with("file:v2:") && k.ends_with(&length);
    // The legacy hash reads a byte at a time (a third of a second per 100 MB): only computed
    // when a legacy entry for a file of this length exists.
    if !offsets.contains_key(&key) && offsets.keys().any(legacy_candidate) {
        let legacy = format!("file:{:016x}:{}", stable_hash(bytes, 0), bytes.len());
        if let Some(position) = offsets.remove(&legacy) {
            offsets.insert(key.clone(), position);
        }
    }
    key
}

/// A 64-bit hash of a file's bytes, eight bytes a step (a 100 MB file in about 15 ms).
/// Persisted in state dirs: never change it.
fn content_hash(bytes: &[u8]) -> u64 {
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
    let step = |h: u64, word: u64| (h ^ word).wrapping_mul(MULTIPLIER).rotate_left(29);
    let (words, tail) = bytes.as_chunks::<8>();
    let mut h = words.iter().fold(0xcbf2_9ce4_8422_2325, |h, w| {
        step(h, u64::from_le_bytes(*w))
    });
    h = tail.iter().fold(h, |h, &b| step(h, u64::from(b)));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Where a replay's time went, in seconds (logged at the end; the README's cost model and the
/// benchmarks read it).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayPhases {
    /// Reading, decoding and sorting the file, and restoring the state dir.
    pub load: f64,
    /// Applying events.
    pub apply: f64,
    /// State commits (write and fsync).
    pub commit: f64,
    /// Building and storing the final snapshot.
    pub snapshot: f64,
}

pub fn replay(config: &Config, options: &ReplayOptions) -> anyhow::Result<ReplayOutcome> {
    let started = std::time::Instant::now();
    let mut phases = ReplayPhases::default();
    let store = config.state.open()?;
    // No online model during a replay: nobody observes a file's intermediate models, so
    // keeping one up to date (periodic refreshes, per-event projections) would be pure cost,
    // and without it the final snapshot is computed from the data alone, however the file was
    // split or the state dir came to be. The snapshot's model becomes the online one at the end.
    let mut params = config.engine_params();
    params.refresh_every_events = u64::MAX;
    let mut engine = store.load_engine(params)?;
    engine.forget_model();
    let mut catalogue_bad_lines = 0;
    if let Some(items) = &options.items {
        let (titles, bad) = decode::read_catalogue_file(items)?;
        store.put_titles(&titles)?;
        catalogue_bad_lines = bad;
    }
    let mut offsets: BTreeMap<String, i64> = store.offsets()?;
    let mut file = load_file(config, options, &mut offsets)?;
    let done = offsets.get(&file.key).copied().unwrap_or(0).max(0) as usize;
    let skipped = done.min(file.events.rows.len());
    if skipped > 0 {
        tracing::info!(
            skipped,
            "resuming replay: events already applied from this file are skipped"
        );
    }
    phases.load = started.elapsed().as_secs_f64();
    let applied = apply_file(
        config,
        options,
        &store,
        &mut engine,
        &mut file,
        skipped,
        &mut offsets,
        &mut phases,
    )?;
    // The decoded events are all applied: free them before the snapshot's own allocations.
    drop(file.events);

    let titles = store.titles()?;
    let snapshotting = std::time::Instant::now();
    let built = build_and_store_snapshot(
        config,
        &store,
        &engine.view(),
        &titles,
        BTreeMap::new(),
        false,
    )?;
    phases.snapshot = snapshotting.elapsed().as_secs_f64();
    let built = match built {
        Some(built) => {
            let committing = std::time::Instant::now();
            engine.adopt_model(built.model);
            store.commit(&mut engine, Some(&offsets))?;
            phases.commit += committing.elapsed().as_secs_f64();
            Some((built.snapshot, built.assignments))
        }
        None => None,
    };
    tracing::info!(
        events = applied,
        load_seconds = phases.load,
        apply_seconds = phases.apply,
        commit_seconds = phases.commit,
        snapshot_seconds = phases.snapshot,
        "replay finished"
    );
    if let Some((snap, assignments)) = &built {
        log_snapshot_built(snap);
        if let Some(path) = &options.snapshot_out {
            write_snapshot_json(path, snap)?;
        }
        if let Some(path) = &options.assignments_out {
            write_assignments_csv(path, assignments)?;
        }
    }
    Ok(ReplayOutcome {
        applied,
        skipped: skipped as u64,
        rejected: file.rejected,
        catalogue_bad_lines,
        snapshot: built,
    })
}

/// A ratings file decoded, in time order, with what was rejected while decoding.
struct LoadedFile {
    events: CompactEvents,
    rejected: RejectTally,
    /// Its progress key in the state dir (see [`source_key`]).
    key: String,
}

fn load_file(
    config: &Config,
    options: &ReplayOptions,
    offsets: &mut BTreeMap<String, i64>,
) -> anyhow::Result<LoadedFile> {
    let bytes = std::fs::read(&options.ratings)
        .with_context(|| format!("cannot read ratings file {}", options.ratings.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (pieces, rejected) = decode::decode_ratings_in_parts(
        &bytes,
        options.format,
        &config.events.fields,
        &config.engine_params().policy(),
        threads,
        CompactEvents::default,
        CompactEvents::push,
    );
    let mut pieces = pieces.into_iter();
    let mut events = pieces.next().unwrap_or_default();
    for piece in pieces {
        events.append(piece);
    }
    // Stable: events with equal timestamps keep their file order.
    events.rows.sort_by_key(|r| r.ts);
    Ok(LoadedFile {
        events,
        rejected,
        key: source_key(&bytes, offsets),
    })
}

/// Applies the file's events from `skipped` on, in batches, each committed with the file's
/// position. Commits are encoded here and written by a second thread (in order, one waiting at
/// most), so the disk works while the next batch is applied. Returns the events applied.
#[allow(clippy::too_many_arguments)]
fn apply_file(
    config: &Config,
    options: &ReplayOptions,
    store: &Store,
    engine: &mut crate::engine::Engine,
    file: &mut LoadedFile,
    skipped: usize,
    offsets: &mut BTreeMap<String, i64>,
    phases: &mut ReplayPhases,
) -> anyhow::Result<u64> {
    let remaining = &file.events.rows[skipped..];
    let bar = progress_bar(options.progress, remaining.len() as u64);
    let mut source_ids = crate::engine::SourceIds::default();
    let mut applied = 0u64;
    let mut position = skipped;
    std::thread::scope(|scope| {
        let (to_writer, commits) = std::sync::mpsc::sync_channel(1);
        let writer = scope.spawn(move || {
            commits
                .into_iter()
                .try_for_each(|commit| store.write_commit(commit))
        });
        for rows in remaining.chunks(config.replay.batch_size) {
            let batch = file.events.events(rows);
            let applying = std::time::Instant::now();
            let outcome = engine.apply_with_source_ids(&batch, &mut source_ids);
            phases.apply += applying.elapsed().as_secs_f64();
            applied += outcome.applied;
            for &(i, reason) in &outcome.rejected {
                let rejection = match reason {
                    RejectReason::CatalogueFull => {
                        crate::engine::catalogue_full(batch[i].item, config.model.max_items)
                    }
                    other => Rejection::new(other, other.label()),
                };
                // Numbered by position in time order (the file is replayed sorted by timestamp).
                file.rejected.record((position + i + 1) as u64, &rejection);
            }
            position += batch.len();
            offsets.insert(file.key.clone(), position as i64);
            let committing = std::time::Instant::now();
            let (_, commit) = store.prepare_commit(engine, Some(offsets))?;
            // A closed channel means the writer failed: its error is returned below.
            let sent = to_writer.send(commit);
            phases.commit += committing.elapsed().as_secs_f64();
            bar.inc(batch.len() as u64);
            if sent.is_err() {
                break;
            }
        }
        drop(to_writer);
        let committing = std::time::Instant::now();
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the state writer thread panicked"))?;
        phases.commit += committing.elapsed().as_secs_f64();
        bar.finish_and_clear();
        written?;
        Ok(applied)
    })
}

fn progress_bar(enabled: bool, events: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    ProgressBar::new(events).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// Builds a snapshot of the engine (the next version, drift against the latest stored one),
/// stores it with the configured retention and returns it. `None` while there is too little data.
/// A `periodic` snapshot (the service's) continues the previous snapshot's segments and carries
/// diagnostics every `diagnostics_every` versions; a replay's final one takes the lowest inertia
/// found and always carries diagnostics.
pub fn build_and_store_snapshot(
    config: &Config,
    store: &Store,
    engine: &EngineView,
    titles: &FxHashMap<String, String>,
    offsets: BTreeMap<String, i64>,
    periodic: bool,
) -> anyhow::Result<Option<Built>> {
    let version = store.next_snapshot_version()?;
    let previous_version = store.snapshot_versions()?.last().copied();
    let previous = match previous_version {
        Some(v) => store.assignment_labels(v)?.map(|a| (v, a)),
        None => None,
    };
    let with_diagnostics =
        !periodic || (version - 1) % config.snapshot.diagnostics_every.max(1) == 0;
    let built = snapshot::build_with_model(
        engine,
        &config.snapshot_params(),
        BuildInput {
            version,
            created_at: snapshot::now_rfc3339(),
            titles,
            offsets,
            previous: previous.as_ref().map(|(v, a)| (*v, a.as_slice())),
            continue_previous: periodic,
            with_diagnostics,
        },
    );
    if let Some(Built {
        snapshot: snap,
        model,
        ..
    }) = &built
    {
        store.put_snapshot(snap, model.labels(), config.snapshot.retention)?;
    }
    Ok(built)
}

/// The `snapshot built` log line: emitted once the snapshot is stored and, in the service, also
/// published to readers (tests and operators wait for it).
pub fn log_snapshot_built(snap: &Snapshot) {
    tracing::info!(
        version = snap.version,
        users = snap.counts.users,
        items = snap.counts.items,
        ratings = snap.counts.ratings,
        events_applied = snap.counts.events_applied,
        inertia = snap.kmeans.inertia,
        explained = snap.pca.explained_variance_ratio.iter().sum::<f64>(),
        nb_train = snap.validation.naive_bayes.train_agreement,
        moved = snap.drift.as_ref().map_or(0, |d| d.users_moved),
        "snapshot built"
    );
}

pub fn write_snapshot_json(path: &Path, snapshot: &Snapshot) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(snapshot)?;
    std::fs::write(path, json)
        .with_context(|| format!("cannot write snapshot to {}", path.display()))
}

pub fn write_assignments_csv(path: &Path, assignments: &Assignments) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("cannot write assignments to {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    writeln!(w, "user,cluster")?;
    let mut wtr = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(&mut w);
    for (user, cluster) in assignments {
        wtr.write_record([user.as_str(), &cluster.to_string()])?;
    }
    wtr.flush()?;
    drop(wtr);
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_file_key_is_moved_to_the_new_one_and_keeps_its_position() {
        let bytes = b"user,item,rating\nu1,i1,4\n".repeat(100);
        let legacy = format!("file:{:016x}:{}", stable_hash(&bytes, 0), bytes.len());
        let other = format!("file:{:016x}:{}", 7, bytes.len());
        let mut offsets = BTreeMap::from([(legacy.clone(), 42), (other.clone(), 9)]);
        let key = source_key(&bytes, &mut offsets);
        assert!(key.starts_with("file:v2:"));
        assert_eq!(offsets.get(&key), Some(&42));
        assert!(!offsets.contains_key(&legacy));
        assert_eq!(offsets.get(&other), Some(&9), "another file's entry stays");
        assert_eq!(
            source_key(&bytes, &mut offsets),
            key,
            "the same bytes, the same key"
        );
    }

    #[test]
    fn the_content_hash_sees_every_byte_and_never_changes() {
        let bytes: Vec<u8> = (0..1001u32).map(|i| (i * 7) as u8).collect();
        let base = content_hash(&bytes);
        for at in [0, 7, 8, 500, 999, 1000] {
            let mut edited = bytes.clone();
            edited[at] ^= 1;
            assert_ne!(content_hash(&edited), base, "byte {at}");
        }
        // Persisted in state dirs: a changed function would restart every resumed replay.
        // The value was computed independently (Python, from the definition above).
        assert_eq!(content_hash(b"segmenter"), 0x81f9_af0c_f4cc_0f6d);
    }
}
