//! Rating events as they enter the engine, the checks every event passes, and the reasons an
//! event is rejected.

use serde::{Deserialize, Serialize};

/// How successive values for one (user, item) pair combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Star ratings: the latest value replaces the previous one; a null value retracts it.
    Explicit,
    /// Plays, views: values add up.
    Implicit,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Explicit => "explicit",
            Mode::Implicit => "implicit",
        })
    }
}

/// One behaviour event: `user` gave `item` the value `value` at `ts` (seconds since the epoch).
/// `value == None` retracts the user's rating of the item (explicit mode only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatingEvent {
    pub user: String,
    pub item: String,
    pub value: Option<f64>,
    pub ts: i64,
}

/// An event as the engine reads it: owned ([`RatingEvent`]) or borrowed from a store of
/// interned ids ([`RatingRef`]), so a source that already holds the ids hands them over
/// without allocating.
pub trait Rating {
    fn user(&self) -> &str;
    fn item(&self) -> &str;
    fn value(&self) -> Option<f64>;
    /// Event time, seconds since the epoch: the clock a `[events] half_life` decays by.
    fn ts(&self) -> i64;
    /// The source's own dense keys for the user and item ids, when it has interned them
    /// already (see `engine::SourceIds`).
    fn source_keys(&self) -> Option<(u32, u32)> {
        None
    }
}

impl Rating for RatingEvent {
    fn user(&self) -> &str {
        &self.user
    }
    fn item(&self) -> &str {
        &self.item
    }
    fn value(&self) -> Option<f64> {
        self.value
    }
    fn ts(&self) -> i64 {
        self.ts
    }
}

/// A borrowed [`RatingEvent`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatingRef<'a> {
    pub user: &'a str,
    pub item: &'a str,
    pub value: Option<f64>,
    pub ts: i64,
    /// The source's dense keys of `user` and `item`, if it has some.
    pub keys: Option<(u32, u32)>,
}

impl Rating for RatingRef<'_> {
    fn user(&self) -> &str {
        self.user
    }
    fn item(&self) -> &str {
        self.item
    }
    fn value(&self) -> Option<f64> {
        self.value
    }
    fn ts(&self) -> i64 {
        self.ts
    }
    fn source_keys(&self) -> Option<(u32, u32)> {
        self.keys
    }
}

/// A decoded event borrowing its ids from the bytes it was decoded from (a file decoder hands
/// these out, so the ids are not copied for every record).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodedRef<'a> {
    pub user: &'a str,
    pub item: &'a str,
    pub value: Option<f64>,
    pub ts: i64,
}

impl DecodedRef<'_> {
    pub fn to_event(&self) -> RatingEvent {
        RatingEvent {
            user: self.user.to_string(),
            item: self.item.to_string(),
            value: self.value,
            ts: self.ts,
        }
    }
}

impl Rating for DecodedRef<'_> {
    fn user(&self) -> &str {
        self.user
    }
    fn item(&self) -> &str {
        self.item
    }
    fn value(&self) -> Option<f64> {
        self.value
    }
    fn ts(&self) -> i64 {
        self.ts
    }
}

/// Why an event was not applied. The label is stable: it is used in reports, dead-letter
/// headers and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The bytes are not a well-formed record (bad JSON, wrong number of columns, bad encoding).
    Malformed,
    /// A required field (user, item, rating) is absent or empty.
    MissingField,
    /// A field has the wrong type (a number where a string is expected, text in a number).
    WrongType,
    /// The value is NaN or infinite.
    NotFinite,
    /// The value is outside the configured `[events] min_value..=max_value` range.
    OutOfRange,
    /// A null value (retraction) in implicit mode, where values only add up.
    RetractionNotAllowed,
    /// The message is larger than the configured maximum size.
    Oversized,
    /// The message is empty.
    Empty,
    /// A new item would push the catalogue past `[model] max_items`.
    CatalogueFull,
    /// A new user would push the population past `[model] max_users`.
    PopulationFull,
    /// With `[events] half_life` (events weighed by their time): no usable `ts`, none or zero
    /// (1970), or one more than a day ahead of the machine's clock (milliseconds for seconds?).
    BadTimestamp,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        RejectReason::Malformed,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::NotFinite,
        RejectReason::OutOfRange,
        RejectReason::RetractionNotAllowed,
        RejectReason::Oversized,
        RejectReason::Empty,
        RejectReason::CatalogueFull,
        RejectReason::PopulationFull,
        RejectReason::BadTimestamp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::NotFinite => "not_finite",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::RetractionNotAllowed => "retraction_not_allowed",
            RejectReason::Oversized => "oversized",
            RejectReason::Empty => "empty",
            RejectReason::CatalogueFull => "catalogue_full",
            RejectReason::PopulationFull => "population_full",
            RejectReason::BadTimestamp => "bad_timestamp",
        }
    }
}

/// A rejected event: the reason class and a human-readable detail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", reason.label())]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// The value checks every decoded event passes before it reaches the engine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValuePolicy {
    pub mode: Mode,
    pub min_value: f64,
    pub max_value: f64,
    /// Events are weighed by their time (`[events] half_life`): a missing or zero `ts` (which
    /// decoders default to 0 without a column or message timestamp) would weigh about nothing
    /// and, in explicit mode, all but erase the rating it replaces.
    #[serde(default)]
    pub requires_ts: bool,
    /// With `requires_ts`, sources also refuse a `ts` more than this many seconds past the wall
    /// clock (a far-future event would decay every other rating to nothing). `None` in the
    /// engine, which has no clock: the sources check before it.
    #[serde(default)]
    pub future_tolerance_seconds: Option<i64>,
}

/// How far past the wall clock a source accepts an event's `ts` when events are weighed by it.
pub const FUTURE_TOLERANCE_SECONDS: i64 = 86_400;

impl ValuePolicy {
    /// The policy of a source (which has a clock) for an engine with this one.
    pub fn for_source(self) -> ValuePolicy {
        ValuePolicy {
            future_tolerance_seconds: self.requires_ts.then_some(FUTURE_TOLERANCE_SECONDS),
            ..self
        }
    }

    fn check_ts(&self, ts: i64) -> Result<(), Rejection> {
        if !self.requires_ts {
            return Ok(());
        }
        if ts <= 0 {
            return Err(Rejection::new(
                RejectReason::BadTimestamp,
                format!(
                    "ts {ts}: [events] half_life weighs events by their time; give each event \
                     its ts in seconds since the epoch"
                ),
            ));
        }
        if let Some(tolerance) = self.future_tolerance_seconds {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if ts > now.saturating_add(tolerance) {
                return Err(Rejection::new(
                    RejectReason::BadTimestamp,
                    format!(
                        "ts {ts} is more than {tolerance} s ahead of this machine's clock \
                         ({now}); ts is in seconds, not milliseconds"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn check(&self, event: &impl Rating) -> Result<(), Rejection> {
        self.check_ts(event.ts())?;
        if event.user().is_empty() {
            return Err(Rejection::new(RejectReason::MissingField, "empty user id"));
        }
        if event.item().is_empty() {
            return Err(Rejection::new(RejectReason::MissingField, "empty item id"));
        }
        match event.value() {
            None if self.mode == Mode::Implicit => Err(Rejection::new(
                RejectReason::RetractionNotAllowed,
                "null value: retractions are only allowed in explicit mode",
            )),
            None => Ok(()),
            Some(v) if !v.is_finite() => Err(Rejection::new(
                RejectReason::NotFinite,
                format!("value {v} is not finite"),
            )),
            Some(v) if v < self.min_value || v > self.max_value => Err(Rejection::new(
                RejectReason::OutOfRange,
                format!("value {v} outside [{}, {}]", self.min_value, self.max_value),
            )),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(value: Option<f64>) -> RatingEvent {
        RatingEvent {
            user: "u".into(),
            item: "i".into(),
            value,
            ts: 0,
        }
    }

    #[test]
    fn with_a_half_life_a_missing_or_far_future_ts_is_rejected() {
        let engine = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 0.0,
            max_value: 5.0,
            requires_ts: true,
            future_tolerance_seconds: None,
        };
        let at = |ts: i64| RatingEvent {
            ts,
            ..event(Some(4.0))
        };
        let reason = |policy: &ValuePolicy, ts| policy.check(&at(ts)).map_err(|r| r.reason);
        assert_eq!(reason(&engine, 0), Err(RejectReason::BadTimestamp));
        assert_eq!(reason(&engine, -5), Err(RejectReason::BadTimestamp));
        assert_eq!(reason(&engine, 1_700_000_000), Ok(()));
        // The engine has no clock; a source does.
        assert_eq!(reason(&engine, 1_700_000_000_000), Ok(()));
        let source = engine.for_source();
        assert_eq!(
            reason(&source, 1_700_000_000_000),
            Err(RejectReason::BadTimestamp),
            "milliseconds"
        );
        assert_eq!(reason(&source, 1_700_000_000), Ok(()));
        // Without a half-life nothing about ts is checked.
        let plain = ValuePolicy {
            requires_ts: false,
            ..engine
        }
        .for_source();
        assert_eq!(reason(&plain, 0), Ok(()));
        assert_eq!(reason(&plain, 1_700_000_000_000), Ok(()));
    }

    #[test]
    fn policy_rejects_non_finite_out_of_range_and_implicit_retractions() {
        let explicit = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 1.0,
            max_value: 5.0,
            requires_ts: false,
            future_tolerance_seconds: None,
        };
        assert!(explicit.check(&event(Some(3.0))).is_ok());
        assert!(explicit.check(&event(None)).is_ok());
        assert_eq!(
            explicit.check(&event(Some(f64::NAN))).unwrap_err().reason,
            RejectReason::NotFinite
        );
        assert_eq!(
            explicit.check(&event(Some(6.0))).unwrap_err().reason,
            RejectReason::OutOfRange
        );
        let implicit = ValuePolicy {
            mode: Mode::Implicit,
            ..explicit
        };
        assert_eq!(
            implicit.check(&event(None)).unwrap_err().reason,
            RejectReason::RetractionNotAllowed
        );
    }
}
