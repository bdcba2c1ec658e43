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
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Malformed,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::NotFinite,
        RejectReason::OutOfRange,
        RejectReason::RetractionNotAllowed,
        RejectReason::Oversized,
        RejectReason::Empty,
        RejectReason::CatalogueFull,
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
}

impl ValuePolicy {
    pub fn check(&self, event: &impl Rating) -> Result<(), Rejection> {
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
    fn policy_rejects_non_finite_out_of_range_and_implicit_retractions() {
        let explicit = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 1.0,
            max_value: 5.0,
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
