//! Prometheus metrics: one registry, typed handles, and the updates the service and the demo
//! make. Names follow Prometheus conventions (`_total` counters, base units, `_seconds`); no
//! label ever carries a user or item id (labels: rejection reason, partition, cluster id,
//! component index — all bounded).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::event::RejectReason;
use crate::snapshot::Snapshot;

pub struct Metrics {
    registry: Registry,
    pub events_consumed: IntCounter,
    pub events_applied: IntCounter,
    pub events_rejected: IntCounterVec,
    pub events_duplicate: IntCounter,
    pub dead_letters_refused: IntCounter,
    pub consumer_lag: IntGaugeVec,
    pub batch_size: Histogram,
    pub batch_apply_seconds: Histogram,
    pub refresh_seconds: Histogram,
    pub snapshot_build_seconds: Histogram,
    pub users: IntGauge,
    pub items: IntGauge,
    pub ratings: IntGauge,
    pub snapshot_version: IntGauge,
    /// Events applied that the latest snapshot covers (`counts.events_applied`).
    pub snapshot_events_applied: IntGauge,
    pub snapshot_age_seconds: Gauge,
    pub cluster_size: IntGaugeVec,
    pub inertia: Gauge,
    pub explained_variance_ratio: GaugeVec,
    pub nb_train_agreement: Gauge,
    pub nb_holdout_agreement: Gauge,
    pub users_moved: IntGauge,
    /// User ids the engine holds now (what `[model] max_users` caps), updated per batch.
    pub user_ids: IntGauge,
    /// Age of the oldest applied event no served or building snapshot covers (0: none).
    pub snapshot_staleness_seconds: Gauge,
    /// From the first applied event a snapshot covers that the previous one did not, to that
    /// snapshot being served.
    pub snapshot_freshness_seconds: Histogram,
    pub ready: IntGauge,
    /// The change feed: the last snapshot version published, and the records it took.
    pub feed_version: IntGauge,
    pub feed_records: IntCounter,
    pub feed_errors: IntCounter,
    /// Stored snapshot versions the change feed has not published yet.
    pub feed_unpublished: IntGauge,
    /// 1 once the change feed stopped for good (fenced, or its record lost or foreign).
    pub feed_stopped: IntGauge,
    /// State dirs found holding fewer snapshot versions than had left the process.
    pub state_rollbacks: IntCounter,
    /// The changelog: records written (rows and offset records), users restored from it, and
    /// how long taking a partition over took.
    pub changelog_records: IntCounter,
    pub changelog_restored_users: IntCounter,
    pub changelog_restore_seconds: Histogram,
    pub changelog_standby_cells: IntGauge,
    pub changelog_standby_takeovers: IntCounter,
    /// The group model: the latest version read, and (on the coordinator) how long each took
    /// and the rounds it ran.
    pub group_model_version: IntGauge,
    pub group_model_seconds: Histogram,
    pub group_rounds: IntCounter,
    /// Creation time of the latest snapshot (unix seconds), for the age gauge at scrape time.
    snapshot_created_unix: AtomicU64,
    /// Every registered metric family name (labelled families export nothing until their
    /// first series, so the list comes from the descriptors).
    names: Vec<String>,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("valid metric")
}

fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Source-side families: what was read, applied, rejected or skipped, and how far behind.
struct IngestMetrics {
    events_consumed: IntCounter,
    events_applied: IntCounter,
    events_rejected: IntCounterVec,
    events_duplicate: IntCounter,
    dead_letters_refused: IntCounter,
    consumer_lag: IntGaugeVec,
}

impl IngestMetrics {
    fn new() -> Self {
        IngestMetrics {
            events_consumed: counter(
                "segmenter_events_consumed_total",
                "Events read from the source (Kafka messages or generated events), duplicates included.",
            ),
            events_applied: counter(
                "segmenter_events_applied_total",
                "Valid events applied to the engine and persisted.",
            ),
            events_rejected: IntCounterVec::new(
                Opts::new(
                    "segmenter_events_rejected_total",
                    "Events rejected (and dead-lettered), by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            events_duplicate: counter(
                "segmenter_events_duplicate_total",
                "Messages skipped because the state dir already holds their effect (redelivery).",
            ),
            dead_letters_refused: counter(
                "segmenter_dead_letters_refused_total",
                "Dead-letter deliveries the dead-letter topic refused (each is retried; consumption waits).",
            ),
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "segmenter_consumer_lag_messages",
                    "Messages in the partition not yet persisted in the state dir.",
                ),
                &["partition"],
            )
            .expect("valid metric"),
        }
    }
}

/// Batch sizes and the durations of the service's periodic work.
struct TimingMetrics {
    batch_size: Histogram,
    batch_apply_seconds: Histogram,
    refresh_seconds: Histogram,
    snapshot_build_seconds: Histogram,
}

impl TimingMetrics {
    fn new() -> Self {
        let seconds = prometheus::exponential_buckets(0.0005, 2.0, 18).expect("buckets");
        TimingMetrics {
            batch_size: histogram(
                "segmenter_batch_size_events",
                "Events per applied batch.",
                prometheus::exponential_buckets(1.0, 2.0, 18).expect("buckets"),
            ),
            batch_apply_seconds: histogram(
                "segmenter_batch_apply_duration_seconds",
                "Time to apply a batch and persist it (atomic commit and flush).",
                seconds.clone(),
            ),
            refresh_seconds: histogram(
                "segmenter_model_refresh_duration_seconds",
                "Time of a periodic model refresh (PCA re-solve, re-projection, Lloyd polish).",
                seconds.clone(),
            ),
            snapshot_build_seconds: histogram(
                "segmenter_snapshot_build_duration_seconds",
                "Time to build and store a snapshot.",
                seconds,
            ),
        }
    }
}

/// Data volume and age of the latest snapshot.
struct DataMetrics {
    users: IntGauge,
    items: IntGauge,
    ratings: IntGauge,
    snapshot_version: IntGauge,
    snapshot_events_applied: IntGauge,
    snapshot_age_seconds: Gauge,
}

impl DataMetrics {
    fn new() -> Self {
        DataMetrics {
            users: int_gauge(
                "segmenter_users",
                "Users with at least one rating, at the latest snapshot.",
            ),
            items: int_gauge(
                "segmenter_items",
                "Items with at least one rating, at the latest snapshot.",
            ),
            ratings: int_gauge(
                "segmenter_ratings",
                "Non-zero (user, item) ratings, at the latest snapshot.",
            ),
            snapshot_version: int_gauge(
                "segmenter_snapshot_version",
                "Version of the latest snapshot.",
            ),
            snapshot_events_applied: int_gauge(
                "segmenter_snapshot_events_applied",
                "Events applied that the latest snapshot covers (its counts.events_applied): \
                 segmenter_events_applied_total minus this is what the next snapshot will add.",
            ),
            snapshot_age_seconds: gauge(
                "segmenter_snapshot_age_seconds",
                "Seconds since the latest snapshot was built.",
            ),
        }
    }
}

/// Model quality at the latest snapshot: clusters, PCA, validation and drift.
struct ModelMetrics {
    cluster_size: IntGaugeVec,
    inertia: Gauge,
    explained_variance_ratio: GaugeVec,
    nb_train_agreement: Gauge,
    nb_holdout_agreement: Gauge,
    users_moved: IntGauge,
}

impl ModelMetrics {
    fn new() -> Self {
        ModelMetrics {
            cluster_size: IntGaugeVec::new(
                Opts::new(
                    "segmenter_cluster_size_users",
                    "Users per cluster at the latest snapshot.",
                ),
                &["cluster"],
            )
            .expect("valid metric"),
            inertia: gauge(
                "segmenter_kmeans_inertia",
                "K-Means inertia at the latest snapshot.",
            ),
            explained_variance_ratio: GaugeVec::new(
                Opts::new(
                    "segmenter_pca_explained_variance_ratio",
                    "Explained-variance ratio of each kept PCA component at the latest snapshot.",
                ),
                &["component"],
            )
            .expect("valid metric"),
            nb_train_agreement: gauge(
                "segmenter_naive_bayes_train_agreement_ratio",
                "Share of users Naive Bayes (trained on all) assigns to their own cluster.",
            ),
            nb_holdout_agreement: gauge(
                "segmenter_naive_bayes_holdout_agreement_ratio",
                "Share of held-out users Naive Bayes assigns to their own cluster.",
            ),
            users_moved: int_gauge(
                "segmenter_drift_users_moved",
                "Users whose cluster changed between the two latest snapshots.",
            ),
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let IngestMetrics {
            events_consumed,
            events_applied,
            events_rejected,
            events_duplicate,
            dead_letters_refused,
            consumer_lag,
        } = IngestMetrics::new();
        let TimingMetrics {
            batch_size,
            batch_apply_seconds,
            refresh_seconds,
            snapshot_build_seconds,
        } = TimingMetrics::new();
        let DataMetrics {
            users,
            items,
            ratings,
            snapshot_version,
            snapshot_events_applied,
            snapshot_age_seconds,
        } = DataMetrics::new();
        let ModelMetrics {
            cluster_size,
            inertia,
            explained_variance_ratio,
            nb_train_agreement,
            nb_holdout_agreement,
            users_moved,
        } = ModelMetrics::new();
        let mut m = Metrics {
            registry: Registry::new(),
            events_consumed,
            events_applied,
            events_rejected,
            events_duplicate,
            dead_letters_refused,
            consumer_lag,
            batch_size,
            batch_apply_seconds,
            refresh_seconds,
            snapshot_build_seconds,
            users,
            items,
            ratings,
            snapshot_version,
            snapshot_events_applied,
            snapshot_age_seconds,
            cluster_size,
            inertia,
            explained_variance_ratio,
            nb_train_agreement,
            nb_holdout_agreement,
            users_moved,
            snapshot_staleness_seconds: gauge(
                "segmenter_snapshot_staleness_seconds",
                "Age of the oldest applied event that no served or building snapshot covers (0 when every applied event is covered); bounded by [snapshot] max_staleness_ms plus a build.",
            ),
            snapshot_freshness_seconds: histogram(
                "segmenter_snapshot_freshness_seconds",
                "For each snapshot served: time from the first applied event it covers that the previous one did not, to its being served.",
                prometheus::exponential_buckets(0.01, 2.0, 14).expect("buckets"),
            ),
            user_ids: int_gauge(
                "segmenter_user_ids",
                "User ids the engine holds now (capped by [model] max_users; a user whose ratings were all retracted keeps its id).",
            ),
            ready: int_gauge(
                "segmenter_ready",
                "1 when the service is ready (state open, consuming assigned partitions, broker reachable, dead letters and change feed keeping up).",
            ),
            feed_version: int_gauge(
                "segmenter_feed_published_version",
                "Last snapshot version whose segment changes the change feed published (0: none).",
            ),
            changelog_records: counter(
                "segmenter_changelog_records_total",
                "Records written to the changelog: changed users' rows plus one offset record per partition and transaction.",
            ),
            changelog_restored_users: counter(
                "segmenter_changelog_restored_users_total",
                "Users restored from the changelog when a partition moved to this instance.",
            ),
            changelog_restore_seconds: histogram(
                "segmenter_changelog_restore_duration_seconds",
                "Time to take over a partition whose state this instance did not hold: fencing its previous owner and reading its changelog.",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            changelog_standby_cells: int_gauge(
                "segmenter_changelog_standby_cells",
                "Cells held in standby copies of the changelog partitions this instance does not own ([kafka] standby).",
            ),
            changelog_standby_takeovers: counter(
                "segmenter_changelog_standby_takeovers_total",
                "Partitions taken over from a standby copy, reading only the changelog written after it.",
            ),
            group_model_version: int_gauge(
                "segmenter_group_model_version",
                "Latest version of the whole group's model this instance has read (0: none).",
            ),
            group_model_seconds: histogram(
                "segmenter_group_model_duration_seconds",
                "On the coordinator: time to build one group model (the cut and every round).",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            group_rounds: counter(
                "segmenter_group_rounds_total",
                "On the coordinator: rounds run for group models (statistics, eigensolver, sample, Lloyd).",
            ),
            feed_records: counter(
                "segmenter_feed_records_total",
                "Users' segment changes published by the change feed (one per changed user and version).",
            ),
            feed_errors: counter(
                "segmenter_feed_errors_total",
                "Change feed sessions that failed (each is retried with backoff; nothing is published twice).",
            ),
            feed_unpublished: int_gauge(
                "segmenter_feed_unpublished_versions",
                "Stored snapshot versions the change feed has not published yet (bounded by [snapshot] retention + 2).",
            ),
            feed_stopped: int_gauge(
                "segmenter_feed_stopped",
                "1 once the change feed stopped for good and needs an operator (fenced by another producer, or its record of what it published lost or written from another state dir).",
            ),
            state_rollbacks: counter(
                "segmenter_state_rollbacks_total",
                "Times the state dir was found rolled back (its database holds fewer snapshot versions than were served or published; new versions continue above them).",
            ),
            snapshot_created_unix: AtomicU64::new(0),
            names: vec![],
        };
        m.register_all();
        // Every reason exists from the start (at 0), so rates and alerts work before the first.
        for reason in RejectReason::ALL {
            m.events_rejected.with_label_values(&[reason.label()]);
        }
        m
    }

    /// Registers every family (in declaration order) and records its name.
    fn register_all(&mut self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.events_consumed.clone()),
            Box::new(self.events_applied.clone()),
            Box::new(self.events_rejected.clone()),
            Box::new(self.events_duplicate.clone()),
            Box::new(self.dead_letters_refused.clone()),
            Box::new(self.consumer_lag.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.batch_apply_seconds.clone()),
            Box::new(self.refresh_seconds.clone()),
            Box::new(self.snapshot_build_seconds.clone()),
            Box::new(self.users.clone()),
            Box::new(self.items.clone()),
            Box::new(self.ratings.clone()),
            Box::new(self.snapshot_version.clone()),
            Box::new(self.snapshot_events_applied.clone()),
            Box::new(self.snapshot_age_seconds.clone()),
            Box::new(self.cluster_size.clone()),
            Box::new(self.inertia.clone()),
            Box::new(self.explained_variance_ratio.clone()),
            Box::new(self.nb_train_agreement.clone()),
            Box::new(self.nb_holdout_agreement.clone()),
            Box::new(self.users_moved.clone()),
            Box::new(self.user_ids.clone()),
            Box::new(self.snapshot_staleness_seconds.clone()),
            Box::new(self.snapshot_freshness_seconds.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.feed_version.clone()),
            Box::new(self.feed_records.clone()),
            Box::new(self.feed_errors.clone()),
            Box::new(self.feed_unpublished.clone()),
            Box::new(self.feed_stopped.clone()),
            Box::new(self.state_rollbacks.clone()),
            Box::new(self.changelog_records.clone()),
            Box::new(self.changelog_restored_users.clone()),
            Box::new(self.changelog_restore_seconds.clone()),
            Box::new(self.changelog_standby_cells.clone()),
            Box::new(self.changelog_standby_takeovers.clone()),
            Box::new(self.group_model_version.clone()),
            Box::new(self.group_model_seconds.clone()),
            Box::new(self.group_rounds.clone()),
        ];
        for c in collectors {
            self.names
                .extend(c.desc().iter().map(|d| d.fq_name.clone()));
            self.registry.register(c).expect("unique metric names");
        }
    }

    pub fn rejected(&self, reason: RejectReason, n: u64) {
        self.events_rejected
            .with_label_values(&[reason.label()])
            .inc_by(n);
    }

    /// Publishes the figures of a newly built snapshot.
    pub fn on_snapshot(&self, snapshot: &Snapshot) {
        self.users.set(snapshot.counts.users as i64);
        self.items.set(snapshot.counts.items as i64);
        self.ratings.set(snapshot.counts.ratings as i64);
        self.snapshot_version.set(snapshot.version as i64);
        self.snapshot_events_applied
            .set(snapshot.counts.events_applied as i64);
        self.inertia.set(snapshot.kmeans.inertia);
        self.cluster_size.reset();
        for (c, size) in snapshot.kmeans.sizes.iter().enumerate() {
            self.cluster_size
                .with_label_values(&[&c.to_string()])
                .set(*size as i64);
        }
        self.explained_variance_ratio.reset();
        for (i, r) in snapshot.pca.explained_variance_ratio.iter().enumerate() {
            self.explained_variance_ratio
                .with_label_values(&[&i.to_string()])
                .set(*r);
        }
        let nb = &snapshot.validation.naive_bayes;
        self.nb_train_agreement.set(nb.train_agreement);
        self.nb_holdout_agreement
            .set(nb.holdout_agreement.unwrap_or(f64::NAN));
        self.users_moved
            .set(snapshot.drift.as_ref().map_or(0, |d| d.users_moved as i64));
        let created = humantime::parse_rfc3339(&snapshot.created_at)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        self.snapshot_created_unix.store(created, Ordering::Relaxed);
    }

    /// The text exposition format, with the snapshot age computed now.
    pub fn render(&self) -> String {
        let created = self.snapshot_created_unix.load(Ordering::Relaxed);
        if created > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.snapshot_age_seconds
                .set((now - created as f64).max(0.0));
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Every metric family name this service exports, labelled families included before their
    /// first series (the contract dashboards and alerts rely on).
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_include_labelled_families_before_their_first_series() {
        let m = Metrics::new();
        let names = m.names();
        for name in [
            "segmenter_events_consumed_total",
            "segmenter_consumer_lag_messages",
            "segmenter_cluster_size_users",
            "segmenter_pca_explained_variance_ratio",
            "segmenter_batch_apply_duration_seconds",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        assert!(
            m.render()
                .contains("segmenter_events_rejected_total{reason=\"malformed\"} 0")
        );
    }
}
