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
    /// A `ts` that is no time: before 1970 or past [`MAX_TS`]. With `[events] half_life`
    /// (events weighed by their time) also none or zero, more than [`future_tolerance`] ahead of
    /// the machine's clock (milliseconds for seconds?), or so far behind the decay clock that
    /// its weight would vanish (it would erase the rating it replaces, see `engine::decay`).
    BadTimestamp,
    /// A user or item id longer than [`MAX_ID_BYTES`] bytes or holding a control character
    /// (NUL, newline…): such an id could never be looked up over HTTP.
    BadId,
}

impl RejectReason {
    pub const ALL: [RejectReason; 12] = [
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
        RejectReason::BadId,
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
            RejectReason::BadId => "bad_id",
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
    /// `[events] half_life` in seconds: events are weighed by their time, so a missing or zero
    /// `ts` (which decoders default to 0 without a column or message timestamp) would weigh
    /// about nothing and, in explicit mode, all but erase the rating it replaces.
    #[serde(default)]
    pub half_life_seconds: Option<u64>,
    /// With a half-life, sources also refuse a `ts` more than this many seconds past the wall
    /// clock ([`future_tolerance`]: a far-future event would decay every other rating to
    /// nothing). `None` in the engine, which has no clock: the sources check before it.
    #[serde(default)]
    pub future_tolerance_seconds: Option<i64>,
}

/// The most a source accepts an event's `ts` past the wall clock when events are weighed by
/// it, whatever the half-life.
pub const FUTURE_TOLERANCE_SECONDS: i64 = 86_400;

/// The largest `ts` accepted (2^53 − 1 seconds, the largest integer a JSON number is sure to
/// carry exactly): a larger one is no time (1e30, a number of 23 digits, nanoseconds).
pub const MAX_TS: i64 = (1 << 53) - 1;

/// Longest user or item id accepted, in bytes, by every source and by the HTTP API's
/// `/users/{id}`, so every user the engine holds can be looked up.
pub const MAX_ID_BYTES: usize = 256;

/// How far past the wall clock a source accepts an event's `ts` with this half-life: one
/// half-life, at most [`FUTURE_TOLERANCE_SECONDS`]. An event ahead of every other rating by
/// `a` seconds weighs `2^(a/h)` times a rating given now, and the decay clock stays ahead until
/// the wall clock catches up: one half-life bounds that to a factor of 2 for at most one
/// half-life (a day ahead with `half_life = "10m"` would be 2^144, everything else erased).
pub fn future_tolerance(half_life_seconds: u64) -> i64 {
    FUTURE_TOLERANCE_SECONDS.min(half_life_seconds.min(i64::MAX as u64) as i64)
}

/// A user or item id (`what` names which) is at most [`MAX_ID_BYTES`] bytes long and holds no
/// control character (NUL, newline, tab, DEL…). An empty id is the caller's
/// [`RejectReason::MissingField`].
pub fn check_id(what: &str, id: &str) -> Result<(), Rejection> {
    if id.len() > MAX_ID_BYTES {
        return Err(Rejection::new(
            RejectReason::BadId,
            format!(
                "{what} id of {} bytes is longer than the {MAX_ID_BYTES} bytes allowed",
                id.len()
            ),
        ));
    }
    // Bytes below 0x80 are the common case; only then are non-ASCII (C1) controls looked for.
    let ascii_control = |b: &u8| *b < 0x20 || *b == 0x7f;
    if id.as_bytes().iter().any(ascii_control)
        || (!id.is_ascii() && id.chars().any(char::is_control))
    {
        let (at, c) = id
            .char_indices()
            .find(|(_, c)| c.is_control())
            .unwrap_or((0, '\0'));
        return Err(Rejection::new(
            RejectReason::BadId,
            format!(
                "{what} id holds the control character U+{:04X} at byte {at}",
                c as u32
            ),
        ));
    }
    Ok(())
}

impl ValuePolicy {
    /// The policy of a source (which has a clock) for an engine with this one.
    pub fn for_source(self) -> ValuePolicy {
        ValuePolicy {
            future_tolerance_seconds: self.half_life_seconds.map(future_tolerance),
            ..self
        }
    }

    /// Whether events must carry their time (a half-life is set).
    pub fn requires_ts(&self) -> bool {
        self.half_life_seconds.is_some()
    }

    fn check_ts(&self, ts: i64) -> Result<(), Rejection> {
        if !(0..=MAX_TS).contains(&ts) {
            return Err(Rejection::new(
                RejectReason::BadTimestamp,
                format!("ts {ts} is no time: give seconds since 1970, from 0 to {MAX_TS}"),
            ));
        }
        if !self.requires_ts() {
            return Ok(());
        }
        if ts == 0 {
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
                         ({now}): with [events] half_life an event may lead by one half-life \
                         (a day at most), or it would outweigh every rating given now; ts is in \
                         seconds, not milliseconds, and the producer's clock must be right"
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
        check_id("user", event.user())?;
        check_id("item", event.item())?;
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
            half_life_seconds: Some(86_400),
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
            half_life_seconds: None,
            ..engine
        }
        .for_source();
        assert_eq!(reason(&plain, 0), Ok(()));
        assert_eq!(reason(&plain, 1_700_000_000_000), Ok(()));
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    #[test]
    fn a_source_accepts_a_ts_at_most_one_half_life_and_at_most_a_day_ahead_of_its_clock() {
        assert_eq!(future_tolerance(600), 600);
        assert_eq!(future_tolerance(30 * 86_400), FUTURE_TOLERANCE_SECONDS);
        let source = |half_life: u64| {
            ValuePolicy {
                mode: Mode::Explicit,
                min_value: 0.0,
                max_value: 5.0,
                half_life_seconds: Some(half_life),
                future_tolerance_seconds: None,
            }
            .for_source()
        };
        let reason = |policy: ValuePolicy, ahead: i64| {
            policy
                .check(&RatingEvent {
                    ts: now() + ahead,
                    ..event(Some(4.0))
                })
                .map_err(|r| r.reason)
        };
        // 20 h ahead with a half-life of 10 minutes would weigh 2^120 times a rating given now.
        assert_eq!(
            reason(source(600), 20 * 3_600),
            Err(RejectReason::BadTimestamp)
        );
        assert_eq!(
            reason(source(600), 3 * 600),
            Err(RejectReason::BadTimestamp)
        );
        // A clock a little ahead is not refused (the margin covers the seconds the test takes).
        assert_eq!(reason(source(600), 60), Ok(()));
        assert_eq!(reason(source(600), -3_000), Ok(()));
        assert_eq!(reason(source(30 * 86_400), 20 * 3_600), Ok(()));
        assert_eq!(
            reason(source(30 * 86_400), 2 * 86_400),
            Err(RejectReason::BadTimestamp)
        );
    }

    #[test]
    fn a_ts_before_1970_or_past_the_largest_is_rejected_even_without_a_half_life() {
        let plain = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 0.0,
            max_value: 5.0,
            half_life_seconds: None,
            future_tolerance_seconds: None,
        }
        .for_source();
        let reason = |ts: i64| {
            plain
                .check(&RatingEvent {
                    ts,
                    ..event(Some(4.0))
                })
                .map_err(|r| r.reason)
        };
        for bad in [-5, -1, MAX_TS + 1, i64::MAX, i64::MIN] {
            assert_eq!(reason(bad), Err(RejectReason::BadTimestamp), "{bad}");
        }
        // 0 is a record without a time; milliseconds only order a replay without a half-life.
        for good in [0, 881_250_949, 1_700_000_000_000, MAX_TS] {
            assert_eq!(reason(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn ids_past_the_length_limit_or_holding_control_characters_are_rejected_as_bad_id() {
        let policy = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 0.0,
            max_value: 5.0,
            half_life_seconds: None,
            future_tolerance_seconds: None,
        };
        let with = |user: &str, item: &str| {
            policy
                .check(&RatingEvent {
                    user: user.into(),
                    item: item.into(),
                    value: Some(3.0),
                    ts: 0,
                })
                .map_err(|r| (r.reason, r.detail))
        };
        let longest = "u".repeat(MAX_ID_BYTES);
        assert_eq!(with(&longest, &"i".repeat(MAX_ID_BYTES)), Ok(()));
        assert_eq!(with("café ☕ 7", "item one"), Ok(()));
        let (reason, detail) = with(&"u".repeat(300), "i").unwrap_err();
        assert_eq!(reason, RejectReason::BadId);
        assert!(detail.contains("user id of 300 bytes"), "{detail}");
        let (reason, detail) = with("u", &"é".repeat(129)).unwrap_err();
        assert_eq!(reason, RejectReason::BadId);
        assert!(detail.contains("item id of 258 bytes"), "{detail}");
        for bad in ["u\0x1", "u\n", "\tu", "u\u{7f}", "u\u{85}x"] {
            let (reason, detail) = with(bad, "i").unwrap_err();
            assert_eq!(reason, RejectReason::BadId, "{bad:?}");
            assert!(detail.contains("control character"), "{bad:?}: {detail}");
        }
        assert!(with("u", "i\0").unwrap_err().1.contains("U+0000 at byte 1"));
    }

    #[test]
    fn policy_rejects_non_finite_out_of_range_and_implicit_retractions() {
        let explicit = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 1.0,
            max_value: 5.0,
            half_life_seconds: None,
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
