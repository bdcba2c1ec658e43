//! Forgetting with a half-life in event time (`[events] half_life`): a rating's weight is
//! `2^(−age/h)`, its age measured from the largest event time applied so far.
//!
//! Decaying every stored value at every event would cost O(all ratings) per event. Instead a
//! value for an event at time `t` is stored scaled by `2^((t − origin)/h)`, so old values keep
//! their stored numbers and the true decayed matrix is `c · S` with the one global factor
//! `c = 2^(−(clock − origin)/h)` ([`DecayClock::scale`]). PCA directions, explained-variance
//! ratios, K-Means labels and TF-IDF profiles do not depend on that factor; whatever is
//! reported in rating units is multiplied by it (or its square). Before the scaled values could
//! grow past [`REBASE_HALF_LIVES`] half-lives, the engine moves the origin forward by a whole
//! multiple of that span and multiplies everything scale-carrying by the exact power of two
//! [`power_of_two`] gives, so the rebase changes no label.

use serde::{Deserialize, Serialize};

use crate::event::{RejectReason, Rejection};

/// Scaled values stay within `2^REBASE_HALF_LIVES` of the values given (about 1.8e19): far
/// from the f64 range even squared and summed over millions of users.
pub const REBASE_HALF_LIVES: i64 = 64;

/// At a rebase, a cell whose stored value would fall below `2^−FORGOTTEN_BELOW_EXPONENT` is
/// retracted (its weight, against the newest events' 1 to 2^64, is beyond anything f64 figures
/// can show); a user left with no cell leaves. It keeps every value and square a normal float,
/// so rescaling by powers of two stays exact.
pub const FORGOTTEN_BELOW_EXPONENT: i64 = 200;

/// The shortest `[events] half_life` the config accepts (5 minutes). Sources accept an event
/// up to one half-life ahead of their clock (`event::future_tolerance`), which must cover
/// producers' clock skew; and all stored values are rescaled every [`REBASE_HALF_LIVES`]
/// half-lives of event time, an O(ratings) pass that should stay rare.
pub const MIN_HALF_LIFE_SECONDS: u64 = 300;

/// Where event time stands for a decaying engine; persisted with the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DecayClock {
    /// Event time the stored values are scaled against (the first event's, then moved forward
    /// by whole [`REBASE_HALF_LIVES`] spans); `None` before the first event.
    pub origin_ts: Option<i64>,
    /// The largest event time applied: the decayed matrix is the one as of this moment.
    pub clock_ts: Option<i64>,
    /// `Σ 2^((t − origin)/h)` over the applied events, scaled like the stored values
    /// (stored as its bits, so a restart continues with exactly the same number).
    #[serde(with = "f64_bits")]
    pub scaled_events: f64,
}

impl DecayClock {
    /// The factor `c = 2^(−(clock − origin)/h)` turning stored values into decayed ones
    /// (1 before the first event).
    pub fn scale(&self, half_life_seconds: u64) -> f64 {
        match (self.origin_ts, self.clock_ts) {
            (Some(origin), Some(clock)) => {
                (-((clock - origin) as f64) / half_life_seconds as f64).exp2()
            }
            _ => 1.0,
        }
    }

    /// [`DecayClock::scale`] for an engine with `half_life_seconds` (1 without one).
    pub fn value_scale(&self, half_life_seconds: Option<u64>) -> f64 {
        half_life_seconds.map_or(1.0, |h| self.scale(h))
    }

    /// The number of applied events, each weighted by `2^(−age/h)`.
    pub fn effective_events(&self, half_life_seconds: u64) -> f64 {
        self.scaled_events * self.scale(half_life_seconds)
    }

    /// Whole spans of [`REBASE_HALF_LIVES`] half-lives the origin must move forward by before
    /// an event at `ts` is scaled (0: none), the first event setting the origin.
    pub(crate) fn spans_due(&mut self, ts: i64, half_life_seconds: u64) -> i64 {
        let origin = *self.origin_ts.get_or_insert(ts);
        let span = span_seconds(half_life_seconds);
        let ahead = ts.saturating_sub(origin);
        if ahead > span { ahead / span } else { 0 }
    }

    /// Why an event at `ts` with `value` cannot be weighed, decided before anything changes:
    /// its weight `2^((ts − origin)/h)` would be below `2^−FORGOTTEN_BELOW_EXPONENT` (or take
    /// the value to 0 or a subnormal). Stored, such a value is one the next rebase drops; in
    /// explicit mode it would replace the user's rating with nothing, a deletion nobody sent.
    /// Only events older than the origin are weighed below 1, so only they cost an `exp2` here.
    pub fn refuses(
        &self,
        ts: i64,
        value: Option<f64>,
        half_life_seconds: u64,
    ) -> Option<Rejection> {
        let origin = self.origin_ts?;
        if ts >= origin {
            return None;
        }
        let half_lives_behind = (origin as f64 - ts as f64) / half_life_seconds as f64;
        let weight = (-half_lives_behind).exp2();
        let floor = power_of_two(-FORGOTTEN_BELOW_EXPONENT);
        let vanishes = half_lives_behind > FORGOTTEN_BELOW_EXPONENT as f64
            || weight < floor
            || value.is_some_and(|v| v != 0.0 && !(v * weight).is_normal());
        vanishes.then(|| {
            let newest = self.clock_ts.unwrap_or(origin);
            Rejection::new(
                RejectReason::BadTimestamp,
                format!(
                    "ts {ts} is {:.0} half-lives older than the newest event ({newest}): its \
                     weight, about 2^-{half_lives_behind:.0}, would round its value away and \
                     erase the rating it replaces; ratings older than {FORGOTTEN_BELOW_EXPONENT} \
                     half-lives are forgotten",
                    (newest as f64 - ts as f64) / half_life_seconds as f64
                ),
            )
        })
    }

    /// Moves the origin forward by `spans` spans (the caller rescales the stored values).
    pub(crate) fn advance(&mut self, spans: i64, half_life_seconds: u64) {
        if let Some(origin) = self.origin_ts.as_mut() {
            *origin = origin.saturating_add(spans.saturating_mul(span_seconds(half_life_seconds)));
        }
    }

    /// The scaled weight `2^((ts − origin)/h)` of an event at `ts`, counted as applied; the
    /// clock moves to `ts` when it is later. [`DecayClock::spans_due`] must have been settled.
    pub(crate) fn weigh(&mut self, ts: i64, half_life_seconds: u64) -> f64 {
        let origin = *self.origin_ts.get_or_insert(ts);
        let weight = ((ts.saturating_sub(origin)) as f64 / half_life_seconds as f64).exp2();
        self.clock_ts = Some(self.clock_ts.map_or(ts, |clock| clock.max(ts)));
        self.scaled_events += weight;
        weight
    }
}

/// Seconds in one rebase span.
fn span_seconds(half_life_seconds: u64) -> i64 {
    (half_life_seconds.min(i64::MAX as u64) as i64).saturating_mul(REBASE_HALF_LIVES)
}

/// `2^exponent`, exact (built from its bits rather than by `exp2`, whose result libm does not
/// promise to be exact): 0 below the smallest subnormal, infinity above the largest.
pub fn power_of_two(exponent: i64) -> f64 {
    if exponent > 1023 {
        f64::INFINITY
    } else if exponent >= -1022 {
        f64::from_bits(((exponent + 1023) as u64) << 52)
    } else if exponent >= -1074 {
        f64::from_bits(1u64 << (exponent + 1074))
    } else {
        0.0
    }
}

/// A half-life as the config writes it: the largest unit (w, d, h, m, s) that divides it.
pub fn format_half_life(seconds: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(604_800, "w"), (86_400, "d"), (3_600, "h"), (60, "m")];
    UNITS
        .iter()
        .find(|(unit, _)| seconds > 0 && seconds.is_multiple_of(*unit))
        .map_or(format!("{seconds}s"), |(unit, name)| {
            format!("{}{name}", seconds / unit)
        })
}

/// A half-life from the config: a positive whole number and a unit, `s`, `m`, `h`, `d` or
/// `w` (`"30d"`), in seconds; `Err` says what is wrong.
pub fn parse_half_life(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit"))?;
    let (digits, unit) = text.split_at(split);
    let unit_seconds: u64 = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("`{text}` is not a whole number with a unit")),
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number with a unit"))?;
    if count == 0 {
        return Err(format!("`{text}` is zero"));
    }
    count
        .checked_mul(unit_seconds)
        .filter(|&s| s <= i64::MAX as u64 / REBASE_HALF_LIVES as u64)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Serialises an f64 as its bits, so it survives a round trip through JSON exactly.
mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        u64::deserialize(deserializer).map(f64::from_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_lives_parse_with_units_and_format_back() {
        assert_eq!(parse_half_life("30d"), Ok(30 * 86_400));
        assert_eq!(parse_half_life("1s"), Ok(1));
        assert_eq!(parse_half_life("90m"), Ok(5_400));
        assert_eq!(parse_half_life("2w"), Ok(1_209_600));
        assert_eq!(parse_half_life(" 12h "), Ok(43_200));
        for bad in [
            "0d",
            "-3d",
            "30",
            "d",
            "3.5d",
            "30 days",
            "",
            "1y",
            "99999999999999999w",
        ] {
            assert!(parse_half_life(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_half_life(30 * 86_400), "30d");
        assert_eq!(format_half_life(1_209_600), "2w");
        assert_eq!(format_half_life(5_400), "90m");
        assert_eq!(format_half_life(61), "61s");
    }

    #[test]
    fn powers_of_two_are_exact() {
        // The reference doubles or halves 1.0 step by step, exact down to the smallest
        // subnormal (`powi` is not exact for subnormal results in debug builds).
        let exact = |e: i64| {
            let step = if e < 0 { 0.5 } else { 2.0 };
            (0..e.unsigned_abs()).fold(1.0f64, |x, _| x * step)
        };
        for e in [-1074, -1060, -1023, -1022, -128, -64, 0, 1, 64, 1023] {
            assert_eq!(power_of_two(e), exact(e), "{e}");
        }
        assert_eq!(power_of_two(-1075), 0.0);
        assert_eq!(power_of_two(1024), f64::INFINITY);
    }

    #[test]
    fn an_event_whose_weight_would_vanish_is_refused_before_it_is_weighed() {
        let h = 600;
        let mut clock = DecayClock::default();
        assert!(
            clock.refuses(1, Some(4.0), h).is_none(),
            "the first event sets the origin"
        );
        let now = 1_700_000_000;
        clock.weigh(now, h);
        let before = clock;
        let behind = |half_lives: i64| now - half_lives * h as i64;
        assert!(clock.refuses(behind(199), Some(4.0), h).is_none());
        assert!(
            clock
                .refuses(behind(FORGOTTEN_BELOW_EXPONENT), Some(4.0), h)
                .is_none()
        );
        for old in [behind(FORGOTTEN_BELOW_EXPONENT + 1), behind(3_000), 1] {
            let rejection = clock.refuses(old, Some(4.0), h).expect("refused");
            assert_eq!(rejection.reason, RejectReason::BadTimestamp);
        }
        assert!(
            clock
                .refuses(behind(3_000), Some(4.0), h)
                .is_some_and(|r| r.detail.contains("3000 half-lives older")),
        );
        // A tiny value that a still-visible weight would take to a subnormal or 0.
        assert!(clock.refuses(behind(150), Some(1e-270), h).is_some());
        assert!(clock.refuses(behind(150), Some(0.0), h).is_none());
        assert!(clock.refuses(behind(150), None, h).is_none());
        // Newer than the origin: weighed 1 or more, nothing to check.
        assert!(clock.refuses(now + 60, Some(1e-300), h).is_none());
        assert_eq!(clock, before, "deciding changes nothing");
    }

    #[test]
    fn the_clock_weighs_by_event_time_and_counts_spans() {
        let h = 10;
        let mut clock = DecayClock::default();
        assert_eq!(clock.spans_due(1_000, h), 0);
        assert_eq!(clock.weigh(1_000, h), 1.0);
        assert_eq!(clock.weigh(1_020, h), 4.0);
        // Out of order: older events weigh less and leave the clock where it was.
        assert_eq!(clock.weigh(1_010, h), 2.0);
        assert_eq!(clock.clock_ts, Some(1_020));
        assert_eq!(clock.scale(h), 0.25);
        assert_eq!(clock.effective_events(h), 7.0 * 0.25);
        assert_eq!(clock.spans_due(1_000 + 640, h), 0);
        assert_eq!(clock.spans_due(1_000 + 641, h), 1);
        assert_eq!(clock.spans_due(1_000 + 1_300, h), 2);
        clock.advance(2, h);
        assert_eq!(clock.origin_ts, Some(2_280));
        let json = serde_json::to_string(&DecayClock {
            scaled_events: 0.1 + 0.2,
            ..clock
        })
        .unwrap();
        let back: DecayClock = serde_json::from_str(&json).unwrap();
        assert_eq!(back.scaled_events, 0.1 + 0.2);
    }
}
