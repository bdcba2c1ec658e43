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

/// The key under which a file's progress is stored: its content hash, so a renamed copy
/// resumes and an edited file starts over.
fn source_key(bytes: &[u8]) -> String {
    format!("file:{:016x}:{}", stable_hash(bytes, 0), bytes.len())
}

/// Where a replay's time went, in seconds (logged at the end; the README's cost model and the
/// benchmarks read it).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayPhases {
    /// Reading, decoding and sorting the file, and restoring the state dir.
    pub load: f64,
    /// Applying events, periodic refreshes excluded.
    pub apply: f64,
    /// Periodic model refreshes.
    pub refresh: f64,
    /// State commits (write and fsync).
    pub commit: f64,
    /// Building and storing the final snapshot.
    pub snapshot: f64,
}

pub fn replay(config: &Config, options: &ReplayOptions) -> anyhow::Result<ReplayOutcome> {
    let started = std::time::Instant::now();
    let mut phases = ReplayPhases::default();
    let store = config.state.open()?;
    let mut engine = store.load_engine(config.engine_params())?;
    let mut source_ids = crate::engine::SourceIds::default();
    let mut catalogue_bad_lines = 0;
    if let Some(items) = &options.items {
        let (titles, bad) = decode::read_catalogue_file(items)?;
        store.put_titles(&titles)?;
        catalogue_bad_lines = bad;
    }
    let bytes = std::fs::read(&options.ratings)
        .with_context(|| format!("cannot read ratings file {}", options.ratings.display()))?;
    let mut decoded = CompactEvents::default();
    let mut rejected = decode::decode_ratings_into(
        &bytes,
        options.format,
        &config.events.fields,
        &config.engine_params().policy(),
        |event| decoded.push(event),
    );
    let key = source_key(&bytes);
    drop(bytes);
    // Stable: events with equal timestamps keep their file order.
    decoded.rows.sort_by_key(|r| r.ts);
    let mut offsets: BTreeMap<String, i64> = store.offsets()?;
    let done = offsets.get(&key).copied().unwrap_or(0).max(0) as usize;
    let skipped = done.min(decoded.rows.len());
    if skipped > 0 {
        tracing::info!(
            skipped,
            "resuming replay: events already applied from this file are skipped"
        );
    }
    let remaining = &decoded.rows[skipped..];
    let bar = if options.progress {
        ProgressBar::new(remaining.len() as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    } else {
        ProgressBar::hidden()
    };
    let mut applied = 0u64;
    let mut position = skipped;
    phases.load = started.elapsed().as_secs_f64();
    for rows in remaining.chunks(config.replay.batch_size) {
        let batch = decoded.events(rows);
        let batch = batch.as_slice();
        let applying = std::time::Instant::now();
        let outcome = engine.apply_with_source_ids(batch, &mut source_ids);
        let refreshing: f64 = outcome.refreshes.iter().map(|r| r.seconds).sum();
        phases.refresh += refreshing;
        phases.apply += applying.elapsed().as_secs_f64() - refreshing;
        applied += outcome.applied;
        for &(i, reason) in &outcome.rejected {
            let rejection = match reason {
                RejectReason::CatalogueFull => {
                    crate::engine::catalogue_full(batch[i].item, config.model.max_items)
                }
                other => Rejection::new(other, other.label()),
            };
            // Numbered by position in time order (the file is replayed sorted by timestamp).
            rejected.record((position + i + 1) as u64, &rejection);
        }
        for r in &outcome.refreshes {
            tracing::debug!(
                iterations = r.eigen_iterations,
                converged = r.eigen_converged,
                inertia = r.inertia,
                "model refreshed"
            );
        }
        position += batch.len();
        offsets.insert(key.clone(), position as i64);
        let committing = std::time::Instant::now();
        store.commit(&mut engine, Some(&offsets))?;
        phases.commit += committing.elapsed().as_secs_f64();
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    // The decoded events are all applied: free them before the snapshot's own allocations.
    drop(decoded);

    let titles = store.titles()?;
    let snapshotting = std::time::Instant::now();
    let built = build_and_store_snapshot(
        config,
        &store,
        &engine.view(),
        &titles,
        BTreeMap::new(),
        false,
    )?
    .map(|b| (b.snapshot, b.assignments));
    phases.snapshot = snapshotting.elapsed().as_secs_f64();
    tracing::info!(
        events = applied,
        refreshes = engine.counters().refreshes,
        load_seconds = phases.load,
        apply_seconds = phases.apply,
        refresh_seconds = phases.refresh,
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
        rejected,
        catalogue_bad_lines,
        snapshot: built,
    })
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
