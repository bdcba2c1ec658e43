//! Configuration: `config/segmenter.toml` (every field documented there), unknown fields
//! rejected, environment overrides `SEGMENTER_<SECTION>__<KEY>`, and checks whose errors name
//! the field and the fix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decode::JsonFields;
use crate::engine::{EngineParams, ValueTransform};
use crate::event::Mode;
use crate::snapshot::SnapshotParams;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error(
        "config field [kafka.client] {key}: the service sets this property itself (offsets \
         live in the state dir, group membership comes from [kafka]); remove it from \
         [kafka.client] and use the [kafka] fields brokers, group_id and instance_id instead"
    )]
    ServiceOwnedClientKey { key: String },
    #[error("config field {field}: {problem}; {fix}")]
    Invalid {
        field: &'static str,
        problem: String,
        fix: &'static str,
    },
}

/// librdkafka properties the service sets itself because offsets, group membership and
/// exactly-once state depend on them; `[kafka.client]` may not set them.
pub const SERVICE_OWNED_CLIENT_KEYS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "partition.assignment.strategy",
    "enable.idempotence",
    "transactional.id",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub events: EventsConfig,
    /// `[model]`: the engine's own parameter struct (see [`EngineParams`]).
    pub model: EngineParams,
    pub snapshot: SnapshotConfig,
    pub state: StateConfig,
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub catalogue: CatalogueConfig,
    pub replay: ReplayConfig,
    pub demo: DemoConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    pub mode: Mode,
    pub min_value: f64,
    pub max_value: f64,
    /// Forgetting: a rating's weight halves every `half_life` of event time (`"30d"`; units
    /// s, m, h, d, w). Unset: ratings never fade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_life: Option<String>,
    /// What the recipe segments, computed from the summed values: a per-cell transform
    /// (`binary`, `sqrt`, `log1p`) and/or unit-l2 user rows (`"sqrt+l2"`). Unset: the mode's
    /// default (`none` for explicit ratings; for implicit counts `binary+l2`, or `sqrt+l2`
    /// with a half-life).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<ValueTransform>,
    pub fields: JsonFields,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            mode: Mode::Explicit,
            min_value: 0.0,
            max_value: 5.0,
            half_life: None,
            transform: None,
            fields: JsonFields::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Least time between the starts of two snapshots: bounds their cost under constant load.
    pub interval_ms: u64,
    /// A snapshot is served at most about this long after the first applied event that the
    /// served snapshot does not cover (when builds take less than `interval_ms`).
    pub max_staleness_ms: u64,
    pub retention: usize,
    pub profile_items: usize,
    pub holdout_percent: u64,
    pub diagnostics_every: u64,
    pub diagnostics_k: Vec<usize>,
    pub diagnostics_max_users: usize,
    pub diagnostics_starts: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        let s = SnapshotParams::default();
        SnapshotConfig {
            interval_ms: 1_000,
            max_staleness_ms: 1_000,
            retention: 50,
            profile_items: s.profile_items,
            holdout_percent: s.holdout_percent,
            diagnostics_every: 10,
            diagnostics_k: s.diagnostics_k,
            diagnostics_max_users: s.diagnostics_max_users,
            diagnostics_starts: s.diagnostics_starts,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub dir: PathBuf,
    pub checkpoint_cells: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("data/state"),
            checkpoint_cells: crate::store::DEFAULT_CHECKPOINT_CELLS,
        }
    }
}

impl StateConfig {
    /// Opens the state dir with this section's settings.
    pub fn open(&self) -> Result<crate::store::Stores, crate::store::StoreError> {
        let stores = crate::store::open(&self.dir)?;
        stores.state.set_checkpoint_cells(self.checkpoint_cells);
        Ok(stores)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub instance_id: String,
    pub dead_letter_topic: String,
    pub items_topic: String,
    /// Where each snapshot is published under its version ("" = nowhere).
    pub snapshots_topic: String,
    /// The change feed: one record per user whose segment changed, per snapshot ("" = off).
    pub changes_topic: String,
    /// The assignments table: each changed user's current segment, compacted ("" = off).
    pub assignments_topic: String,
    /// How often the instance owning partition 0 builds one model of the whole group from every
    /// instance's partial sums (0 = never). Needs `changelog_topic`.
    pub group_model_interval_ms: u64,
    /// Largest share of floats one message of the group model's rounds carries: a larger
    /// broadcast or partial (an eigensolver block, the segments' sums over many items) goes out
    /// in parts of at most this many bytes, put together on arrival.
    pub group_part_bytes: usize,
    /// Each owned partition's user rows and next offset, compacted, so a partition that moves
    /// to another instance is restored there ("" = off: a moved partition is rebuilt from the
    /// ratings topic's history).
    pub changelog_topic: String,
    /// Keep a warm copy of every changelog partition this instance does not own (in memory,
    /// following the changelog as it is written), so taking one over reads only what came
    /// after the copy instead of the whole partition. Needs `changelog_topic`. Every instance
    /// then holds the whole group's rows: for small groups.
    pub standby: bool,
    /// Where the feed records, in the same transactions, which snapshot version it published
    /// last (compacted; "" = `<group_id>-publications`).
    pub publications_topic: String,
    /// The feed producer's `transactional.id` ("" = `segmenter-<group_id>-<instance_id>`): a
    /// restarted instance with the same id fences off and aborts what its predecessor left open.
    pub transactional_id: String,
    /// When the change feed's last published version is gone (its record lost from Kafka, or
    /// the version from the state dir), publish the next version whole (every assigned user
    /// as new) instead of stopping. Set for one start, then unset.
    pub feed_resync: bool,
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    pub max_message_bytes: usize,
    pub drain_timeout_ms: u64,
    pub retry_backoff_ms: u64,
    /// Replication factor of the topics segmenter creates (the ratings topic by `segmenter
    /// produce`, the snapshots topic, the change feed's); -1 = the brokers'
    /// `default.replication.factor`.
    pub topic_replication_factor: i32,
    pub client: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "ratings".into(),
            group_id: "segmenter".into(),
            instance_id: String::new(),
            dead_letter_topic: "ratings-dead-letter".into(),
            items_topic: String::new(),
            snapshots_topic: String::new(),
            changes_topic: String::new(),
            assignments_topic: String::new(),
            changelog_topic: String::new(),
            standby: false,
            group_model_interval_ms: 0,
            group_part_bytes: 8 << 20,
            publications_topic: String::new(),
            transactional_id: String::new(),
            feed_resync: false,
            batch_size: 5_000,
            batch_linger_ms: 100,
            max_message_bytes: 65_536,
            drain_timeout_ms: 10_000,
            retry_backoff_ms: 500,
            topic_replication_factor: -1,
            client: Default::default(),
        }
    }
}

impl KafkaConfig {
    /// One model and snapshot for the whole consumer group (see `kafka::rounds`).
    pub fn group_model_on(&self) -> bool {
        self.group_model_interval_ms > 0
    }

    /// Whether the change feed runs (either of its topics is set).
    pub fn change_feed_on(&self) -> bool {
        !self.changes_topic.is_empty() || !self.assignments_topic.is_empty()
    }

    /// `publications_topic`, by default one per transactional id: the feed reads it back with
    /// `read_committed`, which another producer's open transaction would hold back.
    pub fn publications_topic_name(&self) -> String {
        if self.publications_topic.is_empty() {
            format!("{}-publications", self.transactional_id_name())
        } else {
            self.publications_topic.clone()
        }
    }

    /// `transactional_id`, by default one per instance (`segmenter-<group_id>`, then
    /// `-<instance_id>` when set): two instances sharing one would fence each other off.
    pub fn transactional_id_name(&self) -> String {
        match (
            self.transactional_id.is_empty(),
            self.instance_id.is_empty(),
        ) {
            (false, _) => self.transactional_id.clone(),
            (true, true) => format!("segmenter-{}", self.group_id),
            (true, false) => format!("segmenter-{}-{}", self.group_id, self.instance_id),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
    pub token: String,
    /// How long one request that reads stored snapshots may hold its turn, whole request
    /// included (a streamed assignments download is cut off, the connection aborted, at this
    /// deadline), in milliseconds.
    pub stored_read_deadline_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
            token: String::new(),
            stored_read_deadline_ms: DEFAULT_STORED_READ_DEADLINE_MS,
        }
    }
}

/// Default of `[http] stored_read_deadline_ms`: 30 s.
pub const DEFAULT_STORED_READ_DEADLINE_MS: u64 = 30_000;
/// Bounds of `[http] stored_read_deadline_ms`: 100 ms to one hour.
const STORED_READ_DEADLINE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

impl HttpConfig {
    /// `[http] stored_read_deadline_ms` as a duration.
    pub fn stored_read_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.stored_read_deadline_ms)
    }

    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| ConfigError::Invalid {
            field: "[http] listen",
            problem: format!("`{}` is not an address", self.listen),
            fix: "use IP:PORT, e.g. 127.0.0.1:9464 (0.0.0.0:9464 to listen on every interface)",
        })
    }

    pub fn token(&self) -> Option<String> {
        (!self.token.is_empty()).then(|| self.token.clone())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogueConfig {
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    pub batch_size: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig { batch_size: 10_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    pub users: usize,
    pub items: usize,
    pub segments: usize,
    pub events_per_second: u64,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            users: 943,
            items: 1682,
            segments: 12,
            events_per_second: 20_000,
            batch_size: 2_000,
            seed: 42,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

const ENV_PREFIX: &str = "SEGMENTER_";

impl Config {
    /// Loads `path` (or the built-in defaults when `None`), applies `SEGMENTER_*` overrides
    /// from the process environment, and checks the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: name.clone(),
            message: e.to_string(),
        })?;
        let mut overridden = vec![];
        // An environment value takes the type of the field it sets (`SEGMENTER_KAFKA__TOPIC=2024`
        // is the topic "2024", not an integer): the defaults say which fields are not strings.
        let defaults = toml::Value::try_from(Config::default()).ok();
        for (var, raw) in env {
            if apply_env_override(&mut table, defaults.as_ref(), &var, &raw)? {
                overridden.push(var);
            }
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    let source = if overridden.is_empty() {
                        name.clone()
                    } else {
                        format!("{name} with overrides {}", overridden.join(", "))
                    };
                    ConfigError::Parse {
                        path: source,
                        message: e.to_string(),
                    }
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: ranges and consistency. Each error names the field and fix.
    /// Sections are checked in file order and the first problem is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_events(&self.events)?;
        validate_model(&self.model)?;
        validate_snapshot(&self.snapshot)?;
        validate_kafka(&self.kafka)?;
        validate_http(&self.http)?;
        invalid_if(
            !self.kafka.changelog_topic.is_empty() && self.events.half_life.is_some(),
            "[kafka] changelog_topic/[events] half_life",
            "a changelog with a half-life is not supported yet: decayed values are stored \
             against each instance's own event clock, so a row moved to another instance would \
             not mean the same there",
            "remove changelog_topic (a moved partition is then rebuilt from the ratings topic), \
             or remove half_life",
        )?;
        invalid_if(
            self.replay.batch_size == 0 || self.demo.batch_size == 0,
            "[replay]/[demo] batch_size",
            "must be at least 1",
            "use e.g. 10000",
        )?;
        invalid_if(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err(),
            "[log] level",
            format!("`{}` is not a log filter", self.log.level),
            "use error, warn, info, debug or trace (or an EnvFilter directive)",
        )
    }

    /// What only the demo stream needs (checked by `run --demo`, not by other commands).
    pub fn validate_demo(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        if self.demo.users < m.clusters || self.demo.items < m.components {
            return Err(ConfigError::Invalid {
                field: "[demo] users/items",
                problem: format!(
                    "{} users x {} items cannot hold {} clusters of {} components",
                    self.demo.users, self.demo.items, m.clusters, m.components
                ),
                fix: "raise [demo] users/items or lower [model] clusters/components",
            });
        }
        Ok(())
    }

    /// The engine's parameters: `[model]` with the value rules of `[events]`.
    pub fn engine_params(&self) -> EngineParams {
        EngineParams {
            mode: self.events.mode,
            min_value: self.events.min_value,
            max_value: self.events.max_value,
            // Checked by `validate`: a config that loaded has a valid half-life or none.
            half_life_seconds: self.events.half_life_seconds().ok().flatten(),
            transform: self.events.transform(),
            ..self.model.clone()
        }
    }

    pub fn snapshot_params(&self) -> SnapshotParams {
        let s = &self.snapshot;
        SnapshotParams {
            profile_items: s.profile_items,
            holdout_percent: s.holdout_percent,
            diagnostics_k: s.diagnostics_k.clone(),
            diagnostics_max_users: s.diagnostics_max_users,
            diagnostics_starts: s.diagnostics_starts,
        }
    }
}

/// The error for `field` when `failed`: what is wrong with it and how to fix it.
fn invalid_if(
    failed: bool,
    field: &'static str,
    problem: impl Into<String>,
    fix: &'static str,
) -> Result<(), ConfigError> {
    if failed {
        return Err(ConfigError::Invalid {
            field,
            problem: problem.into(),
            fix,
        });
    }
    Ok(())
}

impl EventsConfig {
    /// `transform`, or the mode's default when unset.
    pub fn transform(&self) -> ValueTransform {
        self.transform
            .unwrap_or_else(|| ValueTransform::default_for(self.mode, self.half_life.is_some()))
    }

    /// `half_life` in seconds (`None` when unset), or the error naming the field and the fix.
    pub fn half_life_seconds(&self) -> Result<Option<u64>, ConfigError> {
        self.half_life
            .as_deref()
            .map(|text| {
                crate::engine::decay::parse_half_life(text).map_err(|problem| {
                    ConfigError::Invalid {
                        field: "[events] half_life",
                        problem,
                        fix: "set half_life to a positive whole number with a unit s, m, h, d or w \
                              (e.g. half_life = \"30d\"), or remove it to keep every rating at full weight",
                    }
                })
            })
            .transpose()?
            .map(|seconds| {
                if seconds < crate::engine::decay::MIN_HALF_LIFE_SECONDS {
                    return Err(ConfigError::Invalid {
                        field: "[events] half_life",
                        problem: format!(
                            "{} is shorter than the {} minimum",
                            crate::engine::decay::format_half_life(seconds),
                            crate::engine::decay::format_half_life(
                                crate::engine::decay::MIN_HALF_LIFE_SECONDS
                            )
                        ),
                        fix: "set half_life = \"5m\" or longer (e.g. half_life = \"30d\"): events may \
                              lead the clock by up to one half-life, so a shorter one would refuse \
                              events from producers whose clocks run a little ahead, and every \
                              64 half-lives all stored values are rescaled",
                    });
                }
                Ok(seconds)
            })
            .transpose()
    }
}

fn validate_events(e: &EventsConfig) -> Result<(), ConfigError> {
    e.half_life_seconds()?;
    invalid_if(
        !e.min_value.is_finite() || !e.max_value.is_finite() || e.min_value > e.max_value,
        "[events] min_value/max_value",
        format!(
            "range [{}, {}] is empty or not finite",
            e.min_value, e.max_value
        ),
        "set finite bounds with min_value <= max_value, e.g. 0 and 5",
    )?;
    invalid_if(
        e.min_value < 0.0,
        "[events] min_value",
        format!("{} is negative", e.min_value),
        "Naive Bayes and TF-IDF need non-negative values: set min_value = 0 or more",
    )?;
    let transform = e.transform();
    invalid_if(
        e.half_life.is_some() && transform.degree().is_none(),
        "[events] transform/half_life",
        format!(
            "transform = \"{transform}\" with a half_life: a half-life scales every stored value \
             by one factor, and log1p does not turn that into one factor of the transformed \
             values, so the model could not stay exact"
        ),
        "use transform = \"sqrt+l2\" (or binary, sqrt, l2, binary+l2), which compose with a \
         half-life, or remove half_life to keep log1p",
    )
}

fn validate_model(m: &EngineParams) -> Result<(), ConfigError> {
    invalid_if(
        m.components == 0,
        "[model] components",
        "must be at least 1",
        "set components = 10 (the seed's choice)",
    )?;
    invalid_if(
        m.clusters < 2,
        "[model] clusters",
        format!("{} is too few", m.clusters),
        "set clusters = 2 or more (the seed used 25)",
    )?;
    invalid_if(
        m.curve_components < m.components,
        "[model] curve_components",
        format!(
            "{} is less than components = {}",
            m.curve_components, m.components
        ),
        "set curve_components >= components (default 30)",
    )?;
    invalid_if(
        m.refresh_every_events == 0,
        "[model] refresh_every_events",
        "must be at least 1",
        "set it to e.g. 20000",
    )?;
    invalid_if(
        !(m.refresh_changed_share >= 0.0 && m.refresh_changed_share <= 10.0),
        "[model] refresh_changed_share",
        format!("{} is out of range", m.refresh_changed_share),
        "use a value in [0, 10], default 0.25 (0 = refresh by event count only)",
    )?;
    invalid_if(
        !(m.eigen_tolerance > 0.0 && m.eigen_tolerance < 1e-2),
        "[model] eigen_tolerance",
        format!("{} is out of range", m.eigen_tolerance),
        "use a value in (0, 0.01), default 1e-9",
    )?;
    invalid_if(
        !(m.continued_eigen_tolerance > 0.0 && m.continued_eigen_tolerance < 1e-2),
        "[model] continued_eigen_tolerance",
        format!("{} is out of range", m.continued_eigen_tolerance),
        "use a value in (0, 0.01), default 1e-6",
    )?;
    invalid_if(
        !(m.refresh_eigen_tolerance > 0.0 && m.refresh_eigen_tolerance < 1e-2),
        "[model] refresh_eigen_tolerance",
        format!("{} is out of range", m.refresh_eigen_tolerance),
        "use a value in (0, 0.01), default 1e-4",
    )?;
    invalid_if(
        m.eigen_max_iterations == 0 || m.snapshot_kmeans_starts == 0 || m.snapshot_max_passes == 0,
        "[model] eigen_max_iterations/snapshot_kmeans_starts/snapshot_max_passes",
        "must be at least 1",
        "use the defaults 500, 25 and 300",
    )?;
    invalid_if(
        !(0.0..0.5).contains(&m.snapshot_stability_margin),
        "[model] snapshot_stability_margin",
        format!("{} is out of range", m.snapshot_stability_margin),
        "use a share in [0, 0.5), default 0.01 (0 = always the lowest inertia found)",
    )?;
    invalid_if(
        !(0.0..0.9).contains(&m.snapshot_stickiness),
        "[model] snapshot_stickiness",
        format!("{} is out of range", m.snapshot_stickiness),
        "use a share in [0, 0.9), default 0.75 (0 = users always join the nearest centroid)",
    )?;
    invalid_if(
        !(0.0..0.1).contains(&m.snapshot_stickiness_budget),
        "[model] snapshot_stickiness_budget",
        format!("{} is out of range", m.snapshot_stickiness_budget),
        "use a share in [0, 0.1), default 0.01 (0 = stickiness only where it costs nothing)",
    )?;
    invalid_if(
        m.max_items < m.components,
        "[model] max_items",
        format!("{} is less than components", m.max_items),
        "raise max_items (default 100000)",
    )?;
    invalid_if(
        m.max_users == 0,
        "[model] max_users",
        "0 would refuse every event",
        "raise max_users (default 10000000)",
    )?;
    // User indices are u32 and u32::MAX marks "none".
    invalid_if(
        m.max_users >= u32::MAX as usize,
        "[model] max_users",
        format!("{} does not fit a user index", m.max_users),
        "use at most 4294967294 (default 10000000)",
    )
}

fn validate_snapshot(s: &SnapshotConfig) -> Result<(), ConfigError> {
    invalid_if(
        s.max_staleness_ms == 0,
        "[snapshot] max_staleness_ms",
        "must be at least 1",
        "set max_staleness_ms = 1000 (a snapshot at most about 1 s after the first event it lacks)",
    )?;
    invalid_if(
        s.retention == 0,
        "[snapshot] retention",
        "must keep at least 1 snapshot",
        "set retention = 50 (or any number >= 1)",
    )?;
    invalid_if(
        s.holdout_percent >= 100,
        "[snapshot] holdout_percent",
        format!("{} leaves nothing to train on", s.holdout_percent),
        "use 0..99, default 20",
    )
}

fn validate_http(h: &HttpConfig) -> Result<(), ConfigError> {
    h.listen_addr()?;
    invalid_if(
        !STORED_READ_DEADLINE_MS.contains(&h.stored_read_deadline_ms),
        "[http] stored_read_deadline_ms",
        format!(
            "{} is outside 100..=3600000 (a zero deadline would cut every download, no deadline \
             would let slow readers hold the stored-read turns)",
            h.stored_read_deadline_ms
        ),
        "use 100 to 3600000 milliseconds, default 30000",
    )
}

fn validate_kafka(k: &KafkaConfig) -> Result<(), ConfigError> {
    for (field, value) in [
        ("[kafka] brokers", &k.brokers),
        ("[kafka] topic", &k.topic),
        ("[kafka] group_id", &k.group_id),
        ("[kafka] dead_letter_topic", &k.dead_letter_topic),
    ] {
        invalid_if(
            value.trim().is_empty(),
            field,
            "is empty",
            "set it (see config/segmenter.toml for the default)",
        )?;
    }
    invalid_if(
        k.dead_letter_topic == k.topic,
        "[kafka] dead_letter_topic",
        "equals [kafka] topic",
        "use a separate topic, e.g. ratings-dead-letter",
    )?;
    invalid_if(
        !(1024..=(48 << 20)).contains(&k.group_part_bytes),
        "[kafka] group_part_bytes",
        "must be between 1024 and 50331648 (48 MiB; the group's topics take messages of 64 MiB)",
        "use the default 8388608",
    )?;
    let publications = k.publications_topic_name();
    let outputs: [(&'static str, &str, &'static str); 5] = [
        (
            "[kafka] changelog_topic",
            &k.changelog_topic,
            "use a topic of its own, e.g. segmenter-changelog",
        ),
        (
            "[kafka] snapshots_topic",
            &k.snapshots_topic,
            "use a topic of its own, e.g. segmenter-snapshots",
        ),
        (
            "[kafka] changes_topic",
            &k.changes_topic,
            "use a topic of its own, e.g. segment-changes",
        ),
        (
            "[kafka] assignments_topic",
            &k.assignments_topic,
            "use a topic of its own, e.g. segment-assignments",
        ),
        (
            "[kafka] publications_topic",
            if k.change_feed_on() {
                &publications
            } else {
                ""
            },
            "use a topic of its own, e.g. segmenter-publications",
        ),
    ];
    for (i, &(field, topic, fix)) in outputs.iter().enumerate() {
        let inputs = [&k.topic, &k.dead_letter_topic, &k.items_topic].map(String::as_str);
        let mut others = inputs.into_iter().chain(outputs[..i].iter().map(|o| o.1));
        invalid_if(
            !topic.is_empty() && others.any(|other| other == topic),
            field,
            "equals another of the [kafka] topics",
            fix,
        )?;
    }
    if let Some(key) = k
        .client
        .keys()
        .find(|key| SERVICE_OWNED_CLIENT_KEYS.contains(&key.as_str()))
    {
        return Err(ConfigError::ServiceOwnedClientKey { key: key.clone() });
    }
    invalid_if(
        k.change_feed_on() && k.instance_id.trim().is_empty() && k.transactional_id.is_empty(),
        "[kafka] instance_id",
        "is empty while the change feed is on (changes_topic or assignments_topic): instances \
         without one would share the transactional id segmenter-<group_id> and fence each other",
        "set [kafka] instance_id to a stable name of its own per instance (e.g. the pod name, \
         SEGMENTER_KAFKA__INSTANCE_ID), or [kafka] transactional_id",
    )?;
    invalid_if(
        k.batch_size == 0 || k.max_message_bytes == 0,
        "[kafka] batch_size/max_message_bytes",
        "must be at least 1",
        "use the defaults 5000 and 65536",
    )?;
    invalid_if(
        k.topic_replication_factor == 0
            || k.topic_replication_factor < -1
            || k.topic_replication_factor > i32::from(i16::MAX),
        "[kafka] topic_replication_factor",
        format!("{} is not a replication factor", k.topic_replication_factor),
        "use -1 (the brokers' default.replication.factor, the default) or the number of \
         brokers that keep a copy of each partition, e.g. 3",
    )?;
    invalid_if(
        k.group_model_on() && k.changelog_topic.is_empty(),
        "[kafka] group_model_interval_ms",
        "a group model needs every partition held by exactly one instance, which only the \
         changelog guarantees (without it an instance keeps the users of partitions it lost)",
        "set [kafka] changelog_topic (e.g. segmenter-changelog), or group_model_interval_ms = 0",
    )?;
    invalid_if(
        k.standby && k.changelog_topic.is_empty(),
        "[kafka] standby",
        "a standby copies the changelog, and there is none",
        "set [kafka] changelog_topic (e.g. segmenter-changelog), or standby = false",
    )
}

/// Applies one `SEGMENTER_<SECTION>__<KEY>` variable to the config table: false (and nothing
/// changed) for any other variable.
fn apply_env_override(
    table: &mut toml::Table,
    defaults: Option<&toml::Value>,
    var: &str,
    raw: &str,
) -> Result<bool, ConfigError> {
    let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
        return Ok(false);
    };
    let Some((section, key)) = rest.split_once("__") else {
        return Ok(false);
    };
    let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
    let path: Vec<&str> = std::iter::once(section.as_str())
        .chain(key.split("__"))
        .collect();
    let value = match defaults.and_then(|d| value_at(d, &path)) {
        // A string field, a map of strings (`[kafka.client]`) or an optional one.
        Some(toml::Value::String(_)) | None => toml::Value::String(raw.to_string()),
        Some(_) => parse_env_value(raw),
    };
    let env_error = |message| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    let entry = table
        .entry(section.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(section_table) = entry.as_table_mut() else {
        return Err(env_error(format!("[{section}] is not a section")));
    };
    // Nested keys: SEGMENTER_EVENTS__FIELDS__USER → [events.fields] user.
    let mut target = section_table;
    let mut parts: Vec<&str> = key.split("__").collect();
    let last = parts.pop().unwrap_or_default().to_string();
    for part in parts {
        let next = target
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        target = next
            .as_table_mut()
            .ok_or_else(|| env_error(format!("{part} is not a table")))?;
    }
    target.insert(last, value);
    Ok(true)
}

/// The value at a dotted path of a TOML tree.
fn value_at<'a>(root: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    path.iter().try_fold(root, |node, part| node.get(*part))
}

/// An override's value as TOML (numbers, booleans, arrays), or as a plain string otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_file_loads_and_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/segmenter.toml");
        let loaded = Config::load_with_env(Some(&path), vec![]).unwrap();
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn environment_overrides_sections_and_nested_keys() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("SEGMENTER_MODEL__CLUSTERS", "8"),
                ("SEGMENTER_STATE__DIR", "/tmp/x"),
                ("SEGMENTER_EVENTS__FIELDS__USER", "customer"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.model.clusters, 8);
        assert_eq!(c.state.dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.events.fields.user, "customer");
    }

    #[test]
    fn a_stored_read_deadline_outside_its_range_names_the_field_and_fix() {
        for bad in ["0", "99", "3600001"] {
            let err = Config::load_with_env(
                None,
                env(&[("SEGMENTER_HTTP__STORED_READ_DEADLINE_MS", bad)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("[http] stored_read_deadline_ms") && err.contains("use 100 to"),
                "{bad}: {err}"
            );
        }
        let c = Config::load_with_env(
            None,
            env(&[("SEGMENTER_HTTP__STORED_READ_DEADLINE_MS", "2500")]),
        )
        .unwrap();
        assert_eq!(
            c.http.stored_read_deadline(),
            std::time::Duration::from_millis(2500)
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[model]\nclusterz = 3\n").unwrap();
        let err = Config::load_with_env(Some(&path), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("clusterz"), "{err}");
        let err = Config::load_with_env(None, env(&[("SEGMENTER_MODEL__CLUSTERS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[model] clusters") && err.contains("set clusters"),
            "{err}"
        );
        let err = Config::load_with_env(None, env(&[("SEGMENTER_MODEL__COMPONENTS", "ten")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SEGMENTER_MODEL__COMPONENTS"), "{err}");
        let err = Config::load_with_env(
            None,
            env(&[("SEGMENTER_KAFKA__SNAPSHOTS_TOPIC", "ratings")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[kafka] snapshots_topic"), "{err}");
        for (vars, field) in [
            (
                &[("SEGMENTER_KAFKA__CHANGES_TOPIC", "ratings-dead-letter")][..],
                "[kafka] changes_topic",
            ),
            (
                &[
                    ("SEGMENTER_KAFKA__CHANGES_TOPIC", "changes"),
                    ("SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC", "changes"),
                ][..],
                "[kafka] assignments_topic",
            ),
            (
                &[
                    ("SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC", "table"),
                    ("SEGMENTER_KAFKA__PUBLICATIONS_TOPIC", "table"),
                ][..],
                "[kafka] publications_topic",
            ),
        ] {
            let err = Config::load_with_env(None, env(vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        // Two instances without an identity would share one transactional id and fence each
        // other: the feed needs one.
        let err = Config::load_with_env(None, env(&[("SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC", "t")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[kafka] instance_id") && err.contains("fence each other"),
            "{err}"
        );
        let named = Config::load_with_env(
            None,
            env(&[
                ("SEGMENTER_KAFKA__CHANGES_TOPIC", "c"),
                ("SEGMENTER_KAFKA__TRANSACTIONAL_ID", "feed-1"),
            ]),
        )
        .expect("a feed with its own transactional id");
        assert_eq!(named.kafka.transactional_id_name(), "feed-1");
        assert_eq!(named.kafka.publications_topic_name(), "feed-1-publications");
        let instance = Config::load_with_env(
            None,
            env(&[
                ("SEGMENTER_KAFKA__CHANGES_TOPIC", "c"),
                ("SEGMENTER_KAFKA__INSTANCE_ID", "pod-1"),
            ]),
        )
        .expect("a feed per instance");
        assert_eq!(
            instance.kafka.transactional_id_name(),
            "segmenter-segmenter-pod-1"
        );
        let err = Config::load_with_env(
            None,
            env(&[("SEGMENTER_MODEL__SNAPSHOT_STICKINESS", "0.95")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[model] snapshot_stickiness"), "{err}");
    }

    #[test]
    fn max_users_of_zero_or_past_a_user_index_names_the_field_and_the_fix() {
        assert_eq!(
            Config::default().engine_params().max_users,
            crate::engine::DEFAULT_MAX_USERS
        );
        let c = Config::load_with_env(None, env(&[("SEGMENTER_MODEL__MAX_USERS", "1000000")]))
            .expect("a cap of a million users");
        assert_eq!(c.engine_params().max_users, 1_000_000);
        for bad in ["0", "4294967295"] {
            let err = Config::load_with_env(None, env(&[("SEGMENTER_MODEL__MAX_USERS", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("[model] max_users") && err.contains("default 10000000"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn transform_defaults_by_mode_and_bad_ones_name_the_field_and_the_fix() {
        assert!(Config::default().engine_params().transform.is_identity());
        let implicit = |more: &[(&str, &str)]| {
            let mut vars = vec![("SEGMENTER_EVENTS__MODE", "implicit")];
            vars.extend_from_slice(more);
            Config::load_with_env(None, env(&vars))
        };
        let t = |c: Config| c.engine_params().transform.to_string();
        assert_eq!(t(implicit(&[]).unwrap()), "binary+l2");
        assert_eq!(
            t(implicit(&[("SEGMENTER_EVENTS__HALF_LIFE", "30d")]).unwrap()),
            "sqrt+l2"
        );
        assert_eq!(
            t(implicit(&[("SEGMENTER_EVENTS__TRANSFORM", "log1p")]).unwrap()),
            "log1p"
        );
        let err = implicit(&[("SEGMENTER_EVENTS__TRANSFORM", "sqrt+l1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transform") && err.contains("binary+l2, sqrt+l2 or log1p+l2"),
            "{err}"
        );
        let err = implicit(&[
            ("SEGMENTER_EVENTS__TRANSFORM", "log1p+l2"),
            ("SEGMENTER_EVENTS__HALF_LIFE", "30d"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[events] transform/half_life") && err.contains("remove half_life"),
            "{err}"
        );
    }

    #[test]
    fn half_life_parses_with_units_and_bad_ones_name_the_field_and_the_fix() {
        assert_eq!(Config::default().engine_params().half_life_seconds, None);
        let c =
            Config::load_with_env(None, env(&[("SEGMENTER_EVENTS__HALF_LIFE", "30d")])).unwrap();
        assert_eq!(c.events.half_life.as_deref(), Some("30d"));
        assert_eq!(c.engine_params().half_life_seconds, Some(30 * 86_400));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[events]\nhalf_life = \"12h\"\n").unwrap();
        let c = Config::load_with_env(Some(&path), vec![]).unwrap();
        assert_eq!(c.engine_params().half_life_seconds, Some(43_200));
        for bad in ["0d", "-1d", "30", "soon", "1.5h", "3y"] {
            let err = Config::load_with_env(None, env(&[("SEGMENTER_EVENTS__HALF_LIFE", bad)]))
                .unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, ConfigError::Invalid { .. }), "{bad}: {text}");
            assert!(
                text.contains("[events] half_life") && text.contains("e.g. half_life = \"30d\""),
                "{bad}: {text}"
            );
        }
        // Not a string at all: the parser names the field.
        std::fs::write(&path, "[events]\nhalf_life = 30\n").unwrap();
        let err = Config::load_with_env(Some(&path), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("half_life"), "{err}");
    }

    #[test]
    fn a_half_life_under_the_minimum_is_refused_naming_the_field_and_the_fix() {
        for short in ["1s", "299s", "4m"] {
            let err = Config::load_with_env(None, env(&[("SEGMENTER_EVENTS__HALF_LIFE", short)]))
                .unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, ConfigError::Invalid { .. }),
                "{short}: {text}"
            );
            assert!(
                text.contains("[events] half_life")
                    && text.contains("shorter than the 5m minimum")
                    && text.contains("half_life = \"5m\" or longer"),
                "{short}: {text}"
            );
        }
        for fine in ["5m", "300s", "10m"] {
            let c =
                Config::load_with_env(None, env(&[("SEGMENTER_EVENTS__HALF_LIFE", fine)])).unwrap();
            assert!(c.engine_params().half_life_seconds >= Some(300), "{fine}");
        }
    }

    #[test]
    fn a_changelog_with_a_half_life_is_refused_naming_both_fields() {
        let both = [
            ("SEGMENTER_EVENTS__HALF_LIFE", "30d"),
            ("SEGMENTER_KAFKA__CHANGELOG_TOPIC", "segmenter-changelog"),
        ];
        let text = Config::load_with_env(None, env(&both))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("[kafka] changelog_topic/[events] half_life")
                && text.contains("remove changelog_topic"),
            "{text}"
        );
        let c = Config::load_with_env(None, env(&both[1..])).expect("a changelog alone is fine");
        assert_eq!(c.kafka.changelog_topic, "segmenter-changelog");
        let same = [
            ("SEGMENTER_KAFKA__CHANGELOG_TOPIC", "ratings"),
            ("SEGMENTER_KAFKA__TOPIC", "ratings"),
        ];
        let text = Config::load_with_env(None, env(&same))
            .unwrap_err()
            .to_string();
        assert!(text.contains("[kafka] changelog_topic"), "{text}");
        let text = Config::load_with_env(None, env(&[("SEGMENTER_KAFKA__STANDBY", "true")]))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("[kafka] standby") && text.contains("set [kafka] changelog_topic"),
            "{text}"
        );
    }

    #[test]
    fn kafka_client_keys_the_service_owns_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for key in SERVICE_OWNED_CLIENT_KEYS {
            std::fs::write(&path, format!("[kafka.client]\n\"{key}\" = \"x\"\n")).unwrap();
            let err = Config::load_with_env(Some(&path), vec![]).unwrap_err();
            assert!(
                matches!(&err, ConfigError::ServiceOwnedClientKey { key: k } if k == key),
                "{key}: {err}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
        // Tuning properties stay the user's to set.
        std::fs::write(
            &path,
            "[kafka.client]\n\"fetch.wait.max.ms\" = \"50\"\n\"session.timeout.ms\" = \"30000\"\n",
        )
        .unwrap();
        let c = Config::load_with_env(Some(&path), vec![]).unwrap();
        assert_eq!(c.kafka.client["fetch.wait.max.ms"], "50");
    }

    #[test]
    fn environment_values_take_the_type_of_the_field_they_set() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("SEGMENTER_HTTP__TOKEN", "123456"),
                ("SEGMENTER_KAFKA__GROUP_ID", "42"),
                ("SEGMENTER_KAFKA__TOPIC", "2024"),
                ("SEGMENTER_KAFKA__INSTANCE_ID", "0"),
                ("SEGMENTER_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "30000"),
                ("SEGMENTER_MODEL__CLUSTERS", "8"),
                ("SEGMENTER_SNAPSHOT__DIAGNOSTICS_K", "[2, 4]"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http.token, "123456");
        assert_eq!(c.kafka.group_id, "42");
        assert_eq!(c.kafka.topic, "2024");
        assert_eq!(c.kafka.instance_id, "0");
        assert_eq!(c.kafka.client["session.timeout.ms"], "30000");
        assert_eq!(c.model.clusters, 8);
        assert_eq!(c.snapshot.diagnostics_k, vec![2, 4]);
    }

    #[test]
    fn engine_params_are_the_model_section_with_the_events_value_rules() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("SEGMENTER_EVENTS__MODE", "implicit"),
                ("SEGMENTER_EVENTS__MAX_VALUE", "100"),
                ("SEGMENTER_MODEL__POLISH_PASSES", "7"),
                ("SEGMENTER_MODEL__REFRESH_INTERVAL_MS", "250"),
            ]),
        )
        .unwrap();
        let params = c.engine_params();
        assert_eq!(params.mode, Mode::Implicit);
        assert_eq!(params.max_value, 100.0);
        assert_eq!(params.polish_passes, 7);
        assert_eq!(params.refresh_interval_ms, 250);
        // The value rules are `[events]` keys only.
        let err = Config::load_with_env(None, env(&[("SEGMENTER_MODEL__MODE", "implicit")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `mode`"), "{err}");
    }
}
