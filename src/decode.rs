//! Decoders from bytes to [`RatingEvent`]s: JSON objects (Kafka messages, JSON-lines files),
//! MovieLens `u.data`, CSV with a header, and item catalogues (`u.item`, CSV/TSV `item,title`).
//! A record that cannot be decoded becomes a [`Rejection`] with a reason; decoders never panic.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::event::{DecodedRef, MAX_TS, RatingEvent, RejectReason, Rejection, ValuePolicy};

/// The field names a JSON event uses. Defaults match `{"user":..,"item":..,"rating":..,"ts":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonFields {
    /// Field holding the user id (string or integer).
    pub user: String,
    /// Field holding the item id (string or integer).
    pub item: String,
    /// Field holding the value (number, or null to retract in explicit mode).
    pub rating: String,
    /// Field holding the event time in seconds since the epoch (optional in the message).
    pub ts: String,
}

impl Default for JsonFields {
    fn default() -> Self {
        JsonFields {
            user: "user".into(),
            item: "item".into(),
            rating: "rating".into(),
            ts: "ts".into(),
        }
    }
}

/// Deepest nesting of arrays and objects accepted anywhere in a JSON event, its own object
/// counting 1: an event is flat, and a parser walking a deeper one (even in a field nobody
/// reads) spends stack and time on what no producer of events means to send.
pub const MAX_JSON_DEPTH: usize = 16;

/// Decodes one JSON object into an event. `default_ts` is used when the object has no time
/// field (for Kafka, the message timestamp). The value policy is *not* applied here.
///
/// The whole message must be well-formed, not just the fields read: valid UTF-8, no key twice
/// in an object (which one would count?), nesting at most [`MAX_JSON_DEPTH`] deep; otherwise
/// it is [`RejectReason::Malformed`].
pub fn decode_json(
    bytes: &[u8],
    fields: &JsonFields,
    default_ts: i64,
) -> Result<RatingEvent, Rejection> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Rejection::new(RejectReason::Empty, "empty message"));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::Malformed,
            format!(
                "message is not valid UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let object = pick_fields(text, fields)?;
    let user = json_id(&object, &fields.user)?;
    let item = json_id(&object, &fields.item)?;
    let value = json_rating(&object, &fields.rating)?;
    let ts = json_ts(&object, &fields.ts, default_ts)?;
    Ok(RatingEvent {
        user,
        item,
        value,
        ts,
    })
}

/// A user or item id: a non-empty string, or an integer (kept as its decimal text).
fn json_id(object: &PickedFields<'_, '_>, name: &str) -> Result<String, Rejection> {
    match object.get(name) {
        None | Some(Picked::Null) => Err(Rejection::new(
            RejectReason::MissingField,
            format!("missing field `{name}`"),
        )),
        Some(Picked::Str(s)) if s.is_empty() => Err(Rejection::new(
            RejectReason::MissingField,
            format!("empty field `{name}`"),
        )),
        Some(Picked::Str(s)) => Ok(s.to_string()),
        Some(Picked::Int(n)) => Ok(n.to_string()),
        Some(Picked::UInt(n)) => Ok(n.to_string()),
        Some(other) => Err(Rejection::new(
            RejectReason::WrongType,
            format!(
                "field `{name}` must be a string or an integer, got {}",
                other.type_name()
            ),
        )),
    }
}

/// The value: a number, or null (a retraction). The field itself must be present.
fn json_rating(object: &PickedFields<'_, '_>, name: &str) -> Result<Option<f64>, Rejection> {
    match object.get(name) {
        None => Err(Rejection::new(
            RejectReason::MissingField,
            format!("missing field `{name}`"),
        )),
        Some(Picked::Null) => Ok(None),
        Some(Picked::Int(n)) => Ok(Some(*n as f64)),
        Some(Picked::UInt(n)) => Ok(Some(*n as f64)),
        Some(Picked::Float(v)) => Ok(Some(*v)),
        // JSON has no NaN; producers that write "NaN"/"Infinity" as strings get a precise reason.
        Some(Picked::Str(s)) if is_non_finite_word(s) => Ok(Some(f64::NAN)),
        Some(other) => Err(Rejection::new(
            RejectReason::WrongType,
            format!(
                "field `{name}` must be a number or null, got {}",
                other.type_name()
            ),
        )),
    }
}

/// The event time in whole seconds; `default_ts` when the field is absent or null. A number
/// beyond [`MAX_TS`] or below 0 is no time (`bad_timestamp`), never one clamped to fit.
fn json_ts(object: &PickedFields<'_, '_>, name: &str, default_ts: i64) -> Result<i64, Rejection> {
    let no_time = |shown: String| {
        Rejection::new(
            RejectReason::BadTimestamp,
            format!(
                "field `{name}` = {shown} is no time: give seconds since 1970, from 0 to {MAX_TS}"
            ),
        )
    };
    match object.get(name) {
        None | Some(Picked::Null) => Ok(default_ts),
        // The range of integers is the value policy's to check, for every source alike.
        Some(Picked::Int(t)) => Ok(*t),
        Some(Picked::UInt(t)) => i64::try_from(*t).map_err(|_| no_time(t.to_string())),
        Some(Picked::Float(t)) if (0.0..=MAX_TS as f64).contains(t) => Ok(*t as i64),
        Some(Picked::Float(t)) => Err(no_time(t.to_string())),
        Some(other) => Err(Rejection::new(
            RejectReason::WrongType,
            format!("field `{name}` must be a number, got {}", other.type_name()),
        )),
    }
}

/// A field's value as the decoders read it: scalars kept (strings borrowed from the message
/// when they hold no escapes), arrays and objects checked and skipped.
enum Picked<'de> {
    Null,
    Bool,
    Str(Cow<'de, str>),
    Int(i64),
    UInt(u64),
    Float(f64),
    Array,
    Object,
}

impl Picked<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Picked::Null => "null",
            Picked::Bool => "a boolean",
            Picked::Int(_) | Picked::UInt(_) | Picked::Float(_) => "a number",
            Picked::Str(_) => "a string",
            Picked::Array => "an array",
            Picked::Object => "an object",
        }
    }
}

/// The four configured fields of a JSON object, parsed without building the whole object
/// (other fields are walked, checked and dropped): the hot path of the Kafka consumer.
struct PickedFields<'f, 'de> {
    names: [&'f str; 4],
    values: [Option<Picked<'de>>; 4],
}

impl<'de> PickedFields<'_, 'de> {
    fn get(&self, name: &str) -> Option<&Picked<'de>> {
        self.names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| self.values[i].as_ref())
    }
}

/// The error of an object holding `key` twice.
fn duplicate_key<E: serde::de::Error>(keys: &mut [Cow<'_, str>]) -> Result<(), E> {
    keys.sort_unstable();
    match keys.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(E::custom(format_args!("duplicate key `{}`", pair[0]))),
        None => Ok(()),
    }
}

fn too_deep<E: serde::de::Error>(depth: usize) -> Result<(), E> {
    if depth > MAX_JSON_DEPTH {
        return Err(E::custom(format_args!(
            "nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    Ok(())
}

/// An object key, borrowed from the message unless it holds escapes.
struct KeySeed;

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
}

/// Walks any value whose arrays and objects, if it is one, sit at nesting `depth`: checks the
/// depth, duplicate keys and (through the parser) string escapes, and keeps nothing.
#[derive(Clone, Copy)]
struct Skip {
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Skip {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Skip {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        too_deep(self.depth)?;
        let inner = Skip {
            depth: self.depth + 1,
        };
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        too_deep(self.depth)?;
        let inner = Skip {
            depth: self.depth + 1,
        };
        let mut keys = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.push(key);
            map.next_value_seed(inner)?;
        }
        duplicate_key(&mut keys)
    }
}

/// A top-level field's value: scalars kept, arrays and objects walked like [`Skip`].
struct FieldSeed;

impl<'de> serde::de::DeserializeSeed<'de> for FieldSeed {
    type Value = Picked<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldSeed {
    type Value = Picked<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Picked::Bool)
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Picked::Int(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Picked::UInt(n))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Picked::Float(v))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Picked::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Picked::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Picked::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Skip { depth: 2 }.visit_seq(seq).map(|()| Picked::Array)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Skip { depth: 2 }.visit_map(map).map(|()| Picked::Object)
    }
}

struct PickVisitor<'f> {
    names: [&'f str; 4],
}

impl<'de, 'f> serde::de::Visitor<'de> for PickVisitor<'f> {
    type Value = Option<PickedFields<'f, 'de>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values: [Option<Picked<'de>>; 4] = Default::default();
        let mut keys = Vec::with_capacity(8);
        let other = Skip { depth: 2 };
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match self.names.iter().position(|n| *n == key) {
                Some(i) => values[i] = Some(map.next_value_seed(FieldSeed)?),
                None => map.next_value_seed(other)?,
            }
            keys.push(key);
        }
        duplicate_key(&mut keys)?;
        Ok(Some(PickedFields {
            names: self.names,
            values,
        }))
    }

    // Any other JSON value: well-formed, but not an object.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Skip { depth: 1 }.visit_seq(seq).map(|()| None)
    }
}

fn pick_fields<'f, 'de>(
    text: &'de str,
    fields: &'f JsonFields,
) -> Result<PickedFields<'f, 'de>, Rejection> {
    use serde::Deserializer;
    let names = [
        fields.user.as_str(),
        fields.item.as_str(),
        fields.rating.as_str(),
        fields.ts.as_str(),
    ];
    let mut de = serde_json::Deserializer::from_str(text);
    let picked = de
        .deserialize_any(PickVisitor { names })
        .and_then(|p| de.end().map(|()| p))
        .map_err(|e| Rejection::new(RejectReason::Malformed, format!("invalid JSON: {e}")))?;
    picked.ok_or_else(|| Rejection::new(RejectReason::WrongType, "expected a JSON object"))
}

fn is_non_finite_word(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "nan" | "inf" | "-inf" | "infinity" | "-infinity" | "+inf" | "+infinity"
    )
}

/// The layout of a ratings file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// MovieLens `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`, no header.
    Movielens,
    /// Comma-separated with a header naming the columns (MovieLens `ratings.csv`:
    /// `userId,movieId,rating,timestamp`; or `user,item,rating,ts`).
    Csv,
    /// One JSON object per line, as on the Kafka topic.
    Json,
}

impl FileFormat {
    /// Guesses the format from a file name: `.json`/`.jsonl` → JSON, `.csv` → CSV, else MovieLens.
    pub fn guess(path: &Path) -> FileFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") | Some("jsonl") | Some("ndjson") => FileFormat::Json,
            Some("csv") => FileFormat::Csv,
            _ => FileFormat::Movielens,
        }
    }
}

/// Counts of rejected records by reason, with the first few examples for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RejectTally {
    pub total: u64,
    pub by_reason: BTreeMap<RejectReason, u64>,
    /// Up to [`RejectTally::MAX_EXAMPLES`] `(record number, message)` pairs.
    pub examples: Vec<(u64, String)>,
}

impl RejectTally {
    pub const MAX_EXAMPLES: usize = 10;
    /// Longest example text kept (bytes).
    pub const MAX_EXAMPLE_BYTES: usize = 300;

    /// Adds the counts and examples of a tally made over a later piece of the same file, whose
    /// record numbers start `record_offset` records in.
    pub fn absorb(&mut self, other: RejectTally, record_offset: u64) {
        self.total += other.total;
        for (reason, n) in other.by_reason {
            *self.by_reason.entry(reason).or_default() += n;
        }
        let room = Self::MAX_EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(
            other
                .examples
                .into_iter()
                .take(room)
                .map(|(no, text)| (no + record_offset, text)),
        );
    }

    pub fn record(&mut self, record_no: u64, rejection: &Rejection) {
        self.total += 1;
        *self.by_reason.entry(rejection.reason).or_default() += 1;
        if self.examples.len() < Self::MAX_EXAMPLES {
            // A huge bad record must not be echoed whole: the reason and its start suffice.
            let mut text = rejection.to_string();
            if text.len() > Self::MAX_EXAMPLE_BYTES {
                let mut cut = Self::MAX_EXAMPLE_BYTES;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push_str("… (truncated)");
            }
            self.examples.push((record_no, text));
        }
    }

    /// `12 rejected (malformed: 3, out_of_range: 9)`, or `0 rejected`.
    pub fn summary(&self) -> String {
        if self.total == 0 {
            return "0 rejected".into();
        }
        let parts: Vec<String> = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{}: {n}", r.label()))
            .collect();
        format!("{} rejected ({})", self.total, parts.join(", "))
    }
}

/// A decoded ratings file: the good events in file order, and what was rejected.
#[derive(Debug, Clone, Default)]
pub struct DecodedRatings {
    pub events: Vec<RatingEvent>,
    pub rejected: RejectTally,
}

/// Column-name aliases recognised in CSV headers.
const USER_COLUMNS: &[&str] = &["user", "userid", "user_id"];
const ITEM_COLUMNS: &[&str] = &["item", "itemid", "item_id", "movieid", "movie_id"];
const RATING_COLUMNS: &[&str] = &["rating", "value", "score"];
const TS_COLUMNS: &[&str] = &["ts", "timestamp", "time"];

/// Reads a ratings file; every record either becomes an event or is counted as rejected.
pub fn read_ratings_file(
    path: &Path,
    format: FileFormat,
    fields: &JsonFields,
    policy: &ValuePolicy,
) -> anyhow::Result<DecodedRatings> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot read ratings file {}: {e}", path.display()))?;
    Ok(decode_ratings(&bytes, format, fields, policy))
}

/// Decodes a whole ratings file held in memory (see [`read_ratings_file`]).
pub fn decode_ratings(
    bytes: &[u8],
    format: FileFormat,
    fields: &JsonFields,
    policy: &ValuePolicy,
) -> DecodedRatings {
    let mut events = vec![];
    let rejected =
        decode_ratings_into(bytes, format, fields, policy, |e| events.push(e.to_event()));
    DecodedRatings { events, rejected }
}

/// Like [`decode_ratings`], handing each good event to `sink` in file order instead of
/// collecting them (a caller can keep them in a more compact form).
pub fn decode_ratings_into(
    bytes: &[u8],
    format: FileFormat,
    fields: &JsonFields,
    policy: &ValuePolicy,
    sink: impl FnMut(DecodedRef<'_>),
) -> RejectTally {
    // A UTF-8 byte-order mark (spreadsheet exports) is not part of the first record.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    decode_piece(&[], bytes, format, fields, policy, sink)
}

/// [`decode_ratings_into`] on up to `parts` threads: the file is cut at line ends into pieces,
/// each decoded into a sink of its own (made by `new_sink`, fed by `push`); the pieces come
/// back in file order with their rejections numbered as in the whole file. One piece when a
/// record may span lines (a CSV file with a quote character) or the file is small.
pub fn decode_ratings_in_parts<S: Send>(
    bytes: &[u8],
    format: FileFormat,
    fields: &JsonFields,
    policy: &ValuePolicy,
    parts: usize,
    new_sink: impl Fn() -> S + Sync,
    push: impl Fn(&mut S, DecodedRef<'_>) + Sync,
) -> (Vec<S>, RejectTally) {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // A CSV header is decoded again in front of every piece; the other formats have none.
    let header_end = match format {
        FileFormat::Csv => memchr::memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1),
        FileFormat::Json | FileFormat::Movielens => 0,
    };
    let (header, body) = bytes.split_at(header_end);
    let quoted = format == FileFormat::Csv && memchr::memchr(b'"', bytes).is_some();
    let parts = if quoted || body.len() < MIN_PIECE_BYTES {
        1
    } else {
        parts.clamp(1, body.len() / MIN_PIECE_BYTES)
    };
    let pieces = split_at_line_ends(body, parts);
    let decoded: Vec<(S, RejectTally, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = pieces
            .iter()
            .map(|&piece| {
                let (new_sink, push) = (&new_sink, &push);
                scope.spawn(move || {
                    let mut sink = new_sink();
                    let tally = decode_piece(header, piece, format, fields, policy, |e| {
                        push(&mut sink, e)
                    });
                    (
                        sink,
                        tally,
                        memchr::memchr_iter(b'\n', piece).count() as u64,
                    )
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut sinks = Vec::with_capacity(decoded.len());
    let mut rejected = RejectTally::default();
    let mut lines_before = 0;
    for (sink, tally, lines) in decoded {
        rejected.absorb(tally, lines_before);
        lines_before += lines;
        sinks.push(sink);
    }
    (sinks, rejected)
}

/// Below this, a piece is not worth a thread.
const MIN_PIECE_BYTES: usize = 1 << 20;

/// `bytes` cut into `parts` pieces of about equal size, each ending at a line end (or the end).
fn split_at_line_ends(bytes: &[u8], parts: usize) -> Vec<&[u8]> {
    let mut pieces = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 1..=parts {
        let target = (bytes.len() * i / parts).max(start);
        let end = if i == parts {
            bytes.len()
        } else {
            memchr::memchr(b'\n', &bytes[target..]).map_or(bytes.len(), |at| target + at + 1)
        };
        pieces.push(&bytes[start..end]);
        start = end;
    }
    pieces
}

/// Decodes one piece of a file (`header`, if any, is the CSV header line in front of it);
/// record numbers count from the piece's first line.
fn decode_piece(
    header: &[u8],
    bytes: &[u8],
    format: FileFormat,
    fields: &JsonFields,
    policy: &ValuePolicy,
    mut sink: impl FnMut(DecodedRef<'_>),
) -> RejectTally {
    let mut rejected = RejectTally::default();
    let mut accept = |record_no: u64, decoded: Result<DecodedRef<'_>, Rejection>| match decoded
        .and_then(|e| policy.check(&e).map(|()| e))
    {
        Ok(event) => sink(event),
        Err(rejection) => rejected.record(record_no, &rejection),
    };
    match format {
        FileFormat::Json => {
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                match decode_json(line, fields, 0) {
                    Ok(e) => accept(
                        i as u64 + 1,
                        Ok(DecodedRef {
                            user: &e.user,
                            item: &e.item,
                            value: e.value,
                            ts: e.ts,
                        }),
                    ),
                    Err(rejection) => accept(i as u64 + 1, Err(rejection)),
                }
            }
        }
        FileFormat::Movielens => {
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.is_empty() {
                    continue;
                }
                accept(i as u64 + 1, decode_movielens_line(line));
            }
        }
        FileFormat::Csv => decode_csv(std::io::Read::chain(header, bytes), &mut accept),
    }
    rejected
}

fn decode_movielens_line(line: &[u8]) -> Result<DecodedRef<'_>, Rejection> {
    let text = std::str::from_utf8(line)
        .map_err(|_| Rejection::new(RejectReason::Malformed, "line is not valid UTF-8"))?;
    let cols: Vec<&str> = text.split('\t').collect();
    if cols.len() != 4 {
        return Err(Rejection::new(
            RejectReason::Malformed,
            format!("expected 4 tab-separated columns, found {}", cols.len()),
        ));
    }
    event_from_columns(cols[0], cols[1], cols[2], Some(cols[3]))
}

fn event_from_columns<'a>(
    user: &'a str,
    item: &'a str,
    rating: &str,
    ts: Option<&str>,
) -> Result<DecodedRef<'a>, Rejection> {
    let user = user.trim();
    let item = item.trim();
    if user.is_empty() {
        return Err(Rejection::new(RejectReason::MissingField, "empty user id"));
    }
    if item.is_empty() {
        return Err(Rejection::new(RejectReason::MissingField, "empty item id"));
    }
    let rating = rating.trim();
    let value = if rating.is_empty() {
        None
    } else {
        Some(rating.parse::<f64>().map_err(|_| {
            Rejection::new(
                RejectReason::WrongType,
                format!("rating `{rating}` is not a number"),
            )
        })?)
    };
    let ts = match ts.map(str::trim) {
        None | Some("") => 0,
        Some(t) => match (t.parse::<i64>(), t.parse::<f64>()) {
            (Ok(ts), _) => ts,
            (Err(_), Ok(f)) if (0.0..=MAX_TS as f64).contains(&f) => f as i64,
            // Too large for an integer, or out of range: no time, rather than one clamped.
            (Err(_), Ok(f)) if !f.is_nan() => {
                return Err(Rejection::new(
                    RejectReason::BadTimestamp,
                    format!(
                        "timestamp `{t}` is no time: give seconds since 1970, from 0 to {MAX_TS}"
                    ),
                ));
            }
            _ => {
                return Err(Rejection::new(
                    RejectReason::WrongType,
                    format!("timestamp `{t}` is not a number"),
                ));
            }
        },
    };
    Ok(DecodedRef {
        user,
        item,
        value,
        ts,
    })
}

fn find_column(headers: &csv::ByteRecord, aliases: &[&str]) -> Option<usize> {
    headers.iter().position(|h| {
        let name = String::from_utf8_lossy(h).trim().to_ascii_lowercase();
        aliases.contains(&name.as_str())
    })
}

fn decode_csv(
    bytes: impl std::io::Read,
    accept: &mut impl FnMut(u64, Result<DecodedRef<'_>, Rejection>),
) {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(bytes);
    let headers = match reader.byte_headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            accept(
                1,
                Err(Rejection::new(
                    RejectReason::Malformed,
                    format!("bad header: {e}"),
                )),
            );
            return;
        }
    };
    let (Some(user_col), Some(item_col), Some(rating_col)) = (
        find_column(&headers, USER_COLUMNS),
        find_column(&headers, ITEM_COLUMNS),
        find_column(&headers, RATING_COLUMNS),
    ) else {
        accept(
            1,
            Err(Rejection::new(
                RejectReason::Malformed,
                "CSV header must name user (user/userId), item (item/movieId) and rating columns",
            )),
        );
        return;
    };
    let ts_col = find_column(&headers, TS_COLUMNS);
    let width = headers.len();
    let mut record = csv::ByteRecord::new();
    let mut line = 1u64;
    loop {
        line += 1;
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                if record.len() == 1 && record.get(0).is_some_and(|f| f.is_empty()) {
                    continue;
                }
                if record.len() != width {
                    accept(
                        line,
                        Err(Rejection::new(
                            RejectReason::Malformed,
                            format!("expected {width} columns, found {}", record.len()),
                        )),
                    );
                    continue;
                }
                // Every column, read or not: a record with broken bytes is not a record.
                if std::str::from_utf8(record.as_slice()).is_err() {
                    accept(
                        line,
                        Err(Rejection::new(
                            RejectReason::Malformed,
                            "record is not valid UTF-8",
                        )),
                    );
                    continue;
                }
                let field = |i: usize| std::str::from_utf8(record.get(i).unwrap_or_default());
                let decoded = match (field(user_col), field(item_col), field(rating_col)) {
                    (Ok(u), Ok(i), Ok(r)) => {
                        let ts = ts_col.map(|c| field(c).unwrap_or(""));
                        event_from_columns(u, i, r, ts)
                    }
                    _ => Err(Rejection::new(
                        RejectReason::Malformed,
                        "record is not valid UTF-8",
                    )),
                };
                accept(line, decoded);
            }
            Err(e) => accept(
                line,
                Err(Rejection::new(
                    RejectReason::Malformed,
                    format!("unreadable CSV record: {e}"),
                )),
            ),
        }
    }
}

/// Reads an item catalogue: MovieLens `u.item` (pipe-separated, latin-1) or CSV/TSV whose first
/// two columns are item id and title (a header row starting with `item`/`movieId` is skipped).
/// Returns `(item, title)` pairs and the number of unreadable lines.
pub fn read_catalogue_file(path: &Path) -> anyhow::Result<(Vec<(String, String)>, u64)> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read item catalogue {}: {e}", path.display()))?;
    Ok(decode_catalogue(&bytes))
}

/// Decodes catalogue bytes (see [`read_catalogue_file`]).
pub fn decode_catalogue(bytes: &[u8]) -> (Vec<(String, String)>, u64) {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // Latin-1 is a subset of windows-1252; decoding UTF-8 input this way would mangle it, so
    // only fall back when the bytes are not valid UTF-8.
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => encoding_rs::WINDOWS_1252.decode(bytes).0.into_owned(),
    };
    let first_line = text.lines().next().unwrap_or("");
    let mut items = Vec::new();
    let mut bad = 0u64;
    if first_line.contains('|') {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut cols = line.split('|');
            match (cols.next(), cols.next()) {
                (Some(id), Some(title)) if !id.trim().is_empty() => {
                    items.push((id.trim().to_string(), title.trim().to_string()))
                }
                _ => bad += 1,
            }
        }
        return (items, bad);
    }
    let delimiter = if first_line.contains('\t') {
        b'\t'
    } else {
        b','
    };
    // One record per line: a quote left open on one line must not swallow the lines after it
    // (catalogue titles never span lines), so such a line is counted bad on its own.
    let records = text.lines().map(|line| {
        if line.matches('"').count() % 2 == 1 {
            return None;
        }
        csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(line.as_bytes())
            .records()
            .next()
            .unwrap_or_else(|| Ok(csv::StringRecord::new()))
            .ok()
    });
    for (i, record) in records.enumerate() {
        match record {
            Some(r) if r.len() >= 2 => {
                let id = r[0].trim();
                if i == 0
                    && ITEM_COLUMNS.contains(&id.to_ascii_lowercase().as_str())
                    && r[1].trim().eq_ignore_ascii_case("title")
                {
                    continue;
                }
                if id.is_empty() {
                    bad += 1;
                } else {
                    items.push((id.to_string(), r[1].trim().to_string()));
                }
            }
            Some(r) if r.len() <= 1 && r.iter().all(|f| f.trim().is_empty()) => {}
            _ => bad += 1,
        }
    }
    (items, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unterminated_quote_in_a_catalogue_costs_one_line_not_the_ones_after_it() {
        let mut text = String::from("item,title\n1,Toy Story (1995)\n2,\"Broken (1996)\n");
        for i in 3..103 {
            text.push_str(&format!("{i},Title {i}\n"));
        }
        let (items, bad) = decode_catalogue(text.as_bytes());
        assert_eq!(bad, 1, "only the line with the open quote");
        assert_eq!(items.len(), 101);
        assert_eq!(items[0], ("1".to_string(), "Toy Story (1995)".to_string()));
        assert_eq!(items[1], ("3".to_string(), "Title 3".to_string()));
        let (quoted, bad) = decode_catalogue(b"7,\"Seven, the film\"\n");
        assert_eq!((quoted[0].1.as_str(), bad), ("Seven, the film", 0));
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_record() {
        let policy = ValuePolicy {
            mode: crate::event::Mode::Explicit,
            min_value: 0.0,
            max_value: 5.0,
            half_life_seconds: None,
            future_tolerance_seconds: None,
        };
        let fields = JsonFields::default();
        let movielens = decode_ratings(
            b"\xEF\xBB\xBF196\t242\t3\t881250949\n",
            FileFormat::Movielens,
            &fields,
            &policy,
        );
        assert_eq!(movielens.events[0].user, "196");
        let json = decode_ratings(
            b"\xEF\xBB\xBF{\"user\":\"u1\",\"item\":\"i1\",\"rating\":3}\n",
            FileFormat::Json,
            &fields,
            &policy,
        );
        assert_eq!((json.events.len(), json.rejected.total), (1, 0));
        let csv = decode_ratings(
            b"\xEF\xBB\xBFuser,item,rating\nu1,i1,4\n",
            FileFormat::Csv,
            &fields,
            &policy,
        );
        assert_eq!((csv.events.len(), csv.rejected.total), (1, 0));
    }

    #[test]
    fn a_huge_bad_record_is_reported_without_echoing_it_whole() {
        let mut tally = RejectTally::default();
        let detail = "x".repeat(50 << 20);
        tally.record(1, &Rejection::new(RejectReason::Malformed, detail));
        assert!(tally.examples[0].1.len() < RejectTally::MAX_EXAMPLE_BYTES + 32);
        assert!(tally.examples[0].1.ends_with("(truncated)"));
    }
    use crate::event::Mode;

    const POLICY: ValuePolicy = ValuePolicy {
        mode: Mode::Explicit,
        min_value: 1.0,
        max_value: 5.0,
        half_life_seconds: None,
        future_tolerance_seconds: None,
    };

    #[test]
    fn json_event_decodes_with_string_or_integer_ids() {
        let f = JsonFields::default();
        let e = decode_json(
            br#"{"user":"196","item":242,"rating":3,"ts":881250949}"#,
            &f,
            0,
        )
        .unwrap();
        assert_eq!(
            e,
            RatingEvent {
                user: "196".into(),
                item: "242".into(),
                value: Some(3.0),
                ts: 881250949
            }
        );
        let retract = decode_json(br#"{"user":"a","item":"b","rating":null}"#, &f, 7).unwrap();
        assert_eq!(retract.value, None);
        assert_eq!(retract.ts, 7);
    }

    #[test]
    fn json_rejections_name_their_reason() {
        let f = JsonFields::default();
        let reason = |b: &[u8]| decode_json(b, &f, 0).unwrap_err().reason;
        assert_eq!(reason(b""), RejectReason::Empty);
        assert_eq!(reason(b"{not json"), RejectReason::Malformed);
        assert_eq!(reason(b"[1,2]"), RejectReason::WrongType);
        assert_eq!(
            reason(br#"{"item":"b","rating":1}"#),
            RejectReason::MissingField
        );
        assert_eq!(
            reason(br#"{"user":"a","item":"b","rating":"3"}"#),
            RejectReason::WrongType
        );
        assert_eq!(
            reason(br#"{"user":{},"item":"b","rating":3}"#),
            RejectReason::WrongType
        );
        let nan = decode_json(br#"{"user":"a","item":"b","rating":"NaN"}"#, &f, 0).unwrap();
        assert_eq!(
            POLICY.check(&nan).unwrap_err().reason,
            RejectReason::NotFinite
        );
    }

    #[test]
    fn a_json_event_with_a_key_twice_is_malformed_and_the_detail_names_the_key() {
        let f = JsonFields::default();
        for (bytes, key) in [
            (
                &br#"{"user":"a","item":"b","rating":1,"rating":5}"#[..],
                "rating",
            ),
            (br#"{"user":"a","user":"z","item":"b","rating":1}"#, "user"),
            (br#"{"user":"a","item":"b","rating":1,"x":1,"x":2}"#, "x"),
            (
                br#"{"user":"a","item":"b","rating":1,"m":[{"k":1,"k":1}]}"#,
                "k",
            ),
            (
                br#"{"user":"a","item":"b","rating":1,"\u0072ating":2}"#,
                "rating",
            ),
        ] {
            let rejection = decode_json(bytes, &f, 0).unwrap_err();
            assert_eq!(rejection.reason, RejectReason::Malformed, "{rejection}");
            assert!(
                rejection.detail.contains(&format!("duplicate key `{key}`")),
                "{rejection}"
            );
        }
        // The same name in different objects is no duplicate.
        let ok = br#"{"user":"a","item":"b","rating":1,"m":{"user":1,"n":{"user":2}}}"#;
        assert_eq!(decode_json(ok, &f, 0).unwrap().user, "a");
    }

    #[test]
    fn invalid_utf8_anywhere_in_a_record_is_malformed_even_in_a_field_nobody_reads() {
        let f = JsonFields::default();
        let mut json = br#"{"user":"a","item":"b","rating":1,"note":"caf"#.to_vec();
        json.extend_from_slice(b"\xE9\"}");
        let rejection = decode_json(&json, &f, 0).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert!(rejection.detail.contains("UTF-8"), "{rejection}");
        let mut csv = b"user,item,rating,note\nu1,i1,4,ok\nu2,i1,4,caf".to_vec();
        csv.extend_from_slice(b"\xE9\n");
        let out = decode_ratings(&csv, FileFormat::Csv, &f, &POLICY);
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.rejected.by_reason[&RejectReason::Malformed], 1);
    }

    #[test]
    fn nesting_deeper_than_the_limit_anywhere_is_malformed() {
        let f = JsonFields::default();
        let nested = |levels: usize| {
            format!(
                r#"{{"user":"a","item":"b","rating":1,"extra":{}0{}}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        // The event's own object is the first level.
        assert!(decode_json(nested(MAX_JSON_DEPTH - 1).as_bytes(), &f, 0).is_ok());
        for levels in [MAX_JSON_DEPTH, 200, 5_000] {
            let rejection = decode_json(nested(levels).as_bytes(), &f, 0).unwrap_err();
            assert_eq!(rejection.reason, RejectReason::Malformed, "{levels}");
            assert!(rejection.detail.contains("nested deeper"), "{rejection}");
        }
        let deep_objects = format!(
            r#"{{"user":"a","item":"b","rating":1,"m":{}1{}}}"#,
            r#"{"k":"#.repeat(40),
            "}".repeat(40)
        );
        let rejection = decode_json(deep_objects.as_bytes(), &f, 0).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::Malformed);
        // In a field that is read, too: the detail says why, not "wrong type".
        let in_user = format!(
            r#"{{"user":{}1{},"item":"b","rating":1}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            decode_json(in_user.as_bytes(), &f, 0).unwrap_err().reason,
            RejectReason::Malformed
        );
    }

    #[test]
    fn a_ts_that_is_no_time_is_rejected_as_bad_timestamp_without_a_half_life() {
        let f = JsonFields::default();
        let json = b"{\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":1e30}\n\
            {\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":99999999999999999999999}\n\
            {\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":-5}\n\
            {\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":-1.5e300}\n\
            {\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":18446744073709551615}\n\
            {\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":881250949}\n\
            {\"user\":\"a\",\"item\":\"b\",\"rating\":1,\"ts\":881250949.5}\n";
        let out = decode_ratings(json, FileFormat::Json, &f, &POLICY);
        assert_eq!(out.rejected.by_reason[&RejectReason::BadTimestamp], 5);
        assert_eq!(out.rejected.total, 5);
        assert_eq!(
            out.events.iter().map(|e| e.ts).collect::<Vec<_>>(),
            [881250949, 881250949]
        );
        assert!(
            out.rejected.examples[0]
                .1
                .contains("1000000000000000000000000000000")
        );
        let csv = b"user,item,rating,ts\na,b,1,1e30\na,b,1,99999999999999999999999\na,b,1,-5\na,b,1,inf\na,b,1,881250949\n";
        let out = decode_ratings(csv, FileFormat::Csv, &f, &POLICY);
        assert_eq!(out.rejected.by_reason[&RejectReason::BadTimestamp], 4);
        assert_eq!(out.events.len(), 1);
        let movielens = b"1\t2\t3\t-5\n1\t2\t3\t1e30\n1\t2\t3\t881250949\n";
        let out = decode_ratings(movielens, FileFormat::Movielens, &f, &POLICY);
        assert_eq!(out.rejected.by_reason[&RejectReason::BadTimestamp], 2);
        assert_eq!(out.events.len(), 1);
    }

    #[test]
    fn ids_with_a_nul_byte_or_past_the_length_limit_are_rejected_as_bad_id_in_every_format() {
        let f = JsonFields::default();
        let long = "u".repeat(300);
        let json = format!(
            "{{\"user\":\"a\\u0000b\",\"item\":\"i\",\"rating\":1}}\n\
             {{\"user\":\"{long}\",\"item\":\"i\",\"rating\":1}}\n\
             {{\"user\":\"u\",\"item\":\"{long}\",\"rating\":1}}\n\
             {{\"user\":\"u\",\"item\":\"i\",\"rating\":1}}\n"
        );
        let out = decode_ratings(json.as_bytes(), FileFormat::Json, &f, &POLICY);
        assert_eq!(out.rejected.by_reason[&RejectReason::BadId], 3);
        assert_eq!(out.events.len(), 1);
        let csv = format!("user,item,rating\na\0b,i,1\n{long},i,1\nu,i,1\n");
        let out = decode_ratings(csv.as_bytes(), FileFormat::Csv, &f, &POLICY);
        assert_eq!(out.rejected.by_reason[&RejectReason::BadId], 2);
        assert_eq!(out.events.len(), 1);
        let movielens = format!("a\x01b\ti\t1\t5\n{long}\ti\t1\t5\nu\ti\t1\t5\n");
        let out = decode_ratings(movielens.as_bytes(), FileFormat::Movielens, &f, &POLICY);
        assert_eq!(out.rejected.by_reason[&RejectReason::BadId], 2);
        assert_eq!(out.events.len(), 1);
    }

    #[test]
    fn configurable_json_field_names_are_used() {
        let f = JsonFields {
            user: "customer".into(),
            item: "sku".into(),
            rating: "plays".into(),
            ts: "at".into(),
        };
        let e = decode_json(br#"{"customer":"c1","sku":"s9","plays":2,"at":5}"#, &f, 0).unwrap();
        assert_eq!((e.user.as_str(), e.item.as_str(), e.ts), ("c1", "s9", 5));
    }

    #[test]
    fn movielens_file_with_bad_lines_keeps_every_good_line() {
        let data = b"1\t10\t5\t100\nbroken line\n2\t10\tNaN\t101\n3\t11\t9\t102\n4\t12\tx\t103\n5\t13\t2\t104\n";
        let out = decode_ratings(data, FileFormat::Movielens, &JsonFields::default(), &POLICY);
        assert_eq!(out.events.len(), 2);
        assert_eq!(out.rejected.total, 4);
        assert_eq!(out.rejected.by_reason[&RejectReason::Malformed], 1);
        assert_eq!(out.rejected.by_reason[&RejectReason::NotFinite], 1);
        assert_eq!(out.rejected.by_reason[&RejectReason::OutOfRange], 1);
        assert_eq!(out.rejected.by_reason[&RejectReason::WrongType], 1);
    }

    #[test]
    fn csv_header_aliases_and_retraction_by_empty_rating() {
        let data = b"userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,31,,1260759145\n";
        let out = decode_ratings(data, FileFormat::Csv, &JsonFields::default(), &POLICY);
        assert_eq!(out.events.len(), 2);
        assert_eq!(out.events[0].value, Some(2.5));
        assert_eq!(out.events[1].value, None);
    }

    #[test]
    fn catalogue_reads_u_item_latin1_and_csv() {
        let mut uitem = b"1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n2|Caf".to_vec();
        uitem.push(0xE9); // é in latin-1
        uitem.extend_from_slice(b" (1990)|x\n");
        let (items, bad) = decode_catalogue(&uitem);
        assert_eq!(bad, 0);
        assert_eq!(items[1].1, "Café (1990)");
        let (items, _) = decode_catalogue(b"movieId,title,genres\n1,\"Heat, The (1995)\",Action\n");
        assert_eq!(
            items,
            vec![("1".to_string(), "Heat, The (1995)".to_string())]
        );
    }
}

#[cfg(test)]
mod parts_tests {
    use super::*;
    use crate::event::Mode;

    /// A file of a few MB in `format` with a bad record every 997 lines.
    fn big_file(format: FileFormat) -> Vec<u8> {
        let mut text = String::new();
        if format == FileFormat::Csv {
            text.push_str("user,item,rating,ts\n");
        }
        for i in 0..250_000u64 {
            let (user, item, rating) =
                (format!("u{}", i % 7919), format!("i{}", i % 613), i % 5 + 1);
            let rating = if i % 997 == 3 {
                "x".to_string()
            } else {
                rating.to_string()
            };
            let line = match format {
                FileFormat::Csv => format!("{user},{item},{rating},{i}\n"),
                FileFormat::Movielens => format!("{user}\t{item}\t{rating}\t{i}\n"),
                FileFormat::Json => {
                    format!(
                        "{{\"user\":\"{user}\",\"item\":\"{item}\",\"rating\":{rating},\"ts\":{i}}}\n"
                    )
                }
            };
            text.push_str(&line);
        }
        text.into_bytes()
    }

    #[test]
    fn decoding_in_parts_gives_the_events_and_rejections_of_one_pass() {
        let policy = ValuePolicy {
            mode: Mode::Explicit,
            min_value: 1.0,
            max_value: 5.0,
            half_life_seconds: None,
            future_tolerance_seconds: None,
        };
        let fields = JsonFields::default();
        for format in [FileFormat::Csv, FileFormat::Movielens, FileFormat::Json] {
            let bytes = big_file(format);
            assert!(bytes.len() > 3 * MIN_PIECE_BYTES, "the file must split");
            let whole = decode_ratings(&bytes, format, &fields, &policy);
            let (pieces, rejected) = decode_ratings_in_parts(
                &bytes,
                format,
                &fields,
                &policy,
                3,
                Vec::new,
                |v: &mut Vec<RatingEvent>, e| v.push(e.to_event()),
            );
            assert_eq!(pieces.len(), 3, "{format:?}");
            assert_eq!(pieces.concat(), whole.events, "{format:?}");
            assert!(whole.rejected.total > 100);
            assert_eq!(rejected, whole.rejected, "{format:?}");
        }
    }

    #[test]
    fn a_quoted_csv_file_is_decoded_in_one_piece() {
        let mut bytes = big_file(FileFormat::Csv);
        bytes.extend_from_slice(b"\"u1\",i1,3,5\n");
        let (pieces, _) = decode_ratings_in_parts(
            &bytes,
            FileFormat::Csv,
            &JsonFields::default(),
            &ValuePolicy {
                mode: Mode::Explicit,
                min_value: 1.0,
                max_value: 5.0,
                half_life_seconds: None,
                future_tolerance_seconds: None,
            },
            4,
            || 0u64,
            |n: &mut u64, _| *n += 1,
        );
        assert_eq!(pieces.len(), 1);
    }
}
