//! File replay: a ratings file decoded (on every core), put in timestamp order and handed to
//! the pipeline in batches with the file's position, exactly as the Kafka source hands its
//! batches; then the final snapshot is built, stored and written. Re-running on the same file
//! resumes where it stopped.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::decode::{self, FileFormat, RejectTally};
use crate::engine::IdMap;
use crate::event::{RatingRef, RejectReason, Rejection};
use crate::pipeline::{Pipeline, Positions, Shared, SnapshotPolicy, log_snapshot_built};
use crate::snapshot::validation::stable_hash;
use crate::snapshot::{Assignments, Snapshot};

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub ratings: PathBuf,
    pub items: Option<PathBuf>,
    pub format: FileFormat,
    pub snapshot_out: Option<PathBuf>,
    pub assignments_out: Option<PathBuf>,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Compute the snapshot's diagnostics (the explained-variance curve, the inertia by k).
    pub diagnostics: bool,
}

impl ReplayOptions {
    /// A CSV ratings file alone: no catalogue, no outputs, no progress bar.
    pub fn csv(ratings: &std::path::Path) -> ReplayOptions {
        ReplayOptions {
            ratings: ratings.to_path_buf(),
            items: None,
            format: FileFormat::Csv,
            snapshot_out: None,
            assignments_out: None,
            progress: false,
            diagnostics: true,
        }
    }
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
                ts: r.ts,
                keys: Some((r.user, r.item)),
            })
            .collect()
    }
}

/// The key under which a file's progress is stored: its content hash and length, so a renamed
/// copy resumes and an edited file starts over. Also the key earlier versions used
/// (`file:<fnv>:<len>`) when `positions` holds it, so the resume still skips what was applied.
fn source_key(bytes: &[u8], positions: &Positions) -> (String, Option<String>) {
    let key = format!("file:v2:{:016x}:{}", content_hash(bytes), bytes.len());
    let length = format!(":{}", bytes.len());
    let legacy_candidate =
        |k: &String| k.starts_with("file:") && !k.starts_with("file:v2:") && k.ends_with(&length);
    // The legacy hash reads a byte at a time (a third of a second per 100 MB): only computed
    // when a legacy entry for a file of this length exists.
    let legacy = (!positions.contains_key(&key) && positions.keys().any(legacy_candidate))
        .then(|| format!("file:{:016x}:{}", stable_hash(bytes, 0), bytes.len()))
        .filter(|legacy| positions.contains_key(legacy));
    (key, legacy)
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
    let (mut pipeline, catalogue_bad_lines) = open_pipeline(config, options)?;
    let mut file = load_file(config, options, pipeline.positions())?;
    if let Some(legacy) = &file.legacy_key {
        pipeline.move_position(legacy, &file.key);
    }
    let done = pipeline.positions().get(&file.key).copied().unwrap_or(0);
    let skipped = (done.max(0) as usize).min(file.events.rows.len());
    if skipped > 0 {
        tracing::info!(
            skipped,
            "resuming replay: events already applied from this file are skipped"
        );
    }
    phases.load = started.elapsed().as_secs_f64();
    let applied = apply_file(
        &mut pipeline,
        config,
        options,
        &mut file,
        skipped,
        &mut phases,
    )?;
    // The decoded events are all applied: free them before the snapshot's own allocations.
    drop(file.events);
    let snapshotting = std::time::Instant::now();
    let built = pipeline.final_snapshot()?;
    phases.snapshot = snapshotting.elapsed().as_secs_f64();
    let committing = std::time::Instant::now();
    pipeline.finish(false)?;
    phases.commit += committing.elapsed().as_secs_f64();
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

/// The state dir opened into a pipeline, with the catalogue file's titles stored. No online
/// model during a replay: nobody observes a file's intermediate models, so keeping one up to
/// date (periodic refreshes, per-event projections) would be pure cost, and without it the
/// final snapshot is computed from the data alone, however the file was split or the state dir
/// came to be. The final snapshot's model becomes the online one.
fn open_pipeline(config: &Config, options: &ReplayOptions) -> anyhow::Result<(Pipeline, u64)> {
    let policy = SnapshotPolicy::replay(options.diagnostics);
    let stores = config.state.open()?;
    let mut params = config.engine_params();
    if !policy.online_model {
        params.refresh_every_events = u64::MAX;
    }
    let mut loaded = stores.state.load_engine(params)?;
    if !policy.online_model {
        loaded.engine.forget_model(&mut loaded.changes);
    }
    let mut catalogue_bad_lines = 0;
    if let Some(items) = &options.items {
        let (titles, bad) = decode::read_catalogue_file(items)?;
        stores.catalogue.put_titles(&titles)?;
        catalogue_bad_lines = bad;
    }
    let pipeline = Pipeline::new(config, policy, stores, loaded, Shared::default(), None)?;
    Ok((pipeline, catalogue_bad_lines))
}

/// A ratings file decoded, in time order, with what was rejected while decoding.
struct LoadedFile {
    events: CompactEvents,
    rejected: RejectTally,
    /// Its progress key in the state dir (see [`source_key`]).
    key: String,
    /// The key earlier versions stored its progress under, when the state dir holds it.
    legacy_key: Option<String>,
}

fn load_file(
    config: &Config,
    options: &ReplayOptions,
    positions: &Positions,
) -> anyhow::Result<LoadedFile> {
    let bytes = std::fs::read(&options.ratings)
        .with_context(|| format!("cannot read ratings file {}", options.ratings.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (pieces, rejected) = decode::decode_ratings_in_parts(
        &bytes,
        options.format,
        &config.events.fields,
        &config.engine_params().policy().for_source(),
        threads,
        CompactEvents::default,
        CompactEvents::push,
    );
    let (key, legacy_key) = source_key(&bytes, positions);
    // The bytes are decoded: free them before the pieces are joined (the largest moment).
    drop(bytes);
    let total: usize = pieces.iter().map(|p| p.rows.len()).sum();
    let mut pieces = pieces.into_iter();
    let mut events = pieces.next().unwrap_or_default();
    events.rows.reserve_exact(total - events.rows.len());
    for piece in pieces {
        events.append(piece);
    }
    // Stable: events with equal timestamps keep their file order.
    events.rows.sort_by_key(|r| r.ts);
    Ok(LoadedFile {
        events,
        rejected,
        key,
        legacy_key,
    })
}

/// Hands the file's events from `skipped` on to the pipeline, in batches, each committed with
/// the file's position. Returns the events applied.
fn apply_file(
    pipeline: &mut Pipeline,
    config: &Config,
    options: &ReplayOptions,
    file: &mut LoadedFile,
    skipped: usize,
    phases: &mut ReplayPhases,
) -> anyhow::Result<u64> {
    let remaining = &file.events.rows[skipped..];
    let bar = progress_bar(options.progress, remaining.len() as u64);
    let mut applied = 0u64;
    let mut position = skipped;
    for rows in remaining.chunks(config.replay.batch_size) {
        let batch = file.events.events(rows);
        let applying = std::time::Instant::now();
        position += batch.len();
        let outcome = pipeline.apply(
            &batch,
            Positions::from([(file.key.clone(), position as i64)]),
        )?;
        phases.apply += applying.elapsed().as_secs_f64();
        applied += outcome.applied;
        let first = position - batch.len();
        for &(i, reason) in &outcome.rejected {
            let rejection = match reason {
                RejectReason::CatalogueFull => {
                    crate::engine::catalogue_full(batch[i].item, config.model.max_items)
                }
                RejectReason::PopulationFull => {
                    crate::engine::population_full(batch[i].user, config.model.max_users)
                }
                other => Rejection::new(other, other.label()),
            };
            // Numbered by position in time order (the file is replayed sorted by timestamp).
            file.rejected.record((first + i + 1) as u64, &rejection);
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(applied)
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
    fn a_legacy_file_key_is_found_beside_the_new_one() {
        let bytes = b"user,item,rating\nu1,i1,4\n".repeat(100);
        let legacy = format!("file:{:016x}:{}", stable_hash(&bytes, 0), bytes.len());
        let other = format!("file:{:016x}:{}", 7, bytes.len());
        let positions = Positions::from([(legacy.clone(), 42), (other.clone(), 9)]);
        let (key, found) = source_key(&bytes, &positions);
        assert!(key.starts_with("file:v2:"));
        assert_eq!(found, Some(legacy));
        let (again, none) = source_key(&bytes, &Positions::from([(other, 9)]));
        assert_eq!(
            (again, none),
            (key.clone(), None),
            "the same bytes, the same key"
        );
        let (_, none) = source_key(&bytes, &Positions::from([(key, 5)]));
        assert_eq!(none, None, "the new key present: nothing to move");
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
