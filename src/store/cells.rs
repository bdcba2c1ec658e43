//! The compact byte encoding of rating cells on disk: LEB128 varints for indices (as deltas
//! where they ascend) and one byte for the values ratings usually take (multiples of ½ up to
//! 125), so a logged change costs about 4 bytes and a checkpointed rating about 2-3, not 16
//! and 12. Every value round-trips exactly.

/// Values `b / 2` for `b` in `0..=250` take one byte, `b` itself.
const HALVES_MAX: u8 = 250;
/// Tag of a value stored as the 4 bytes of an `f32` that holds it exactly.
const TAG_F32: u8 = 251;
/// Tag of a value stored as the 8 bytes of an `f64`.
const TAG_F64: u8 = 252;

pub(super) fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

pub(super) fn put_value(out: &mut Vec<u8>, value: f64) {
    let twice = value * 2.0;
    if (0.0..=HALVES_MAX as f64).contains(&twice) && twice.fract() == 0.0 {
        out.push(twice as u8);
    } else if (value as f32) as f64 == value {
        out.push(TAG_F32);
        out.extend_from_slice(&(value as f32).to_le_bytes());
    } else {
        out.push(TAG_F64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// Reads the encodings above from a byte slice; `None` at the end or on malformed bytes.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(super) fn varint(&mut self) -> Option<u64> {
        let mut x = 0u64;
        for (i, &b) in self.bytes.iter().enumerate().take(10) {
            // The 10th byte holds the 64th bit only: anything more overflows.
            if i == 9 && b > 1 {
                return None;
            }
            x |= ((b & 0x7f) as u64) << (7 * i);
            if b < 0x80 {
                self.bytes = &self.bytes[i + 1..];
                return Some(x);
            }
        }
        None
    }

    pub(super) fn index(&mut self) -> Option<u32> {
        self.varint().and_then(|x| u32::try_from(x).ok())
    }

    pub(super) fn value(&mut self) -> Option<f64> {
        let (&tag, rest) = self.bytes.split_first()?;
        let (value, rest) = match tag {
            b if b <= HALVES_MAX => (b as f64 / 2.0, rest),
            TAG_F32 => {
                let (v, rest) = rest.split_first_chunk::<4>()?;
                (f32::from_le_bytes(*v) as f64, rest)
            }
            TAG_F64 => {
                let (v, rest) = rest.split_first_chunk::<8>()?;
                (f64::from_le_bytes(*v), rest)
            }
            _ => return None,
        };
        self.bytes = rest;
        Some(value)
    }
}

/// Appends a log record of `cells` (user, item, value), sorted by (user, item) without
/// repeats: `[magic][count][user delta][item or item delta][value]...`. An item is a delta from the
/// previous item when the user is the same, absolute otherwise.
pub(super) fn encode_log_cells(cells: impl ExactSizeIterator<Item = (u32, u32, f64)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(cells.len() * 4 + 16);
    out.extend_from_slice(&COMPACT_MAGIC);
    put_varint(&mut out, cells.len() as u64);
    let mut previous: Option<(u32, u32)> = None;
    for (u, j, value) in cells {
        match previous {
            Some((pu, pj)) if pu == u => {
                put_varint(&mut out, 0);
                put_varint(&mut out, (j - pj) as u64);
            }
            Some((pu, _)) => {
                put_varint(&mut out, (u - pu) as u64);
                put_varint(&mut out, j as u64);
            }
            None => {
                put_varint(&mut out, u as u64);
                put_varint(&mut out, j as u64);
            }
        }
        put_value(&mut out, value);
        previous = Some((u, j));
    }
    out
}

/// The number of cells in a log record from [`encode_log_cells`], without decoding them.
pub(super) fn log_cell_count(record: &[u8]) -> Option<u64> {
    Reader::new(record.strip_prefix(&COMPACT_MAGIC)?).varint()
}

/// Decodes a log record from [`encode_log_cells`]; `None` if it is malformed.
pub(super) fn decode_log_cells(record: &[u8]) -> Option<Vec<(u32, u32, f64)>> {
    let mut r = Reader::new(record.strip_prefix(&COMPACT_MAGIC)?);
    let count = r.varint()?;
    let mut cells = Vec::with_capacity(count.min(record.len() as u64) as usize);
    let mut previous: Option<(u32, u32)> = None;
    for _ in 0..count {
        let user_step = r.index()?;
        let item = r.index()?;
        let (u, j) = match previous {
            None => (user_step, item),
            Some(_) if user_step == 0 && item == 0 => return None, // a repeated cell
            Some((pu, pj)) if user_step == 0 => (pu, pj.checked_add(item)?),
            Some((pu, _)) => (pu.checked_add(user_step)?, item),
        };
        cells.push((u, j, r.value()?));
        previous = Some((u, j));
    }
    r.is_empty().then_some(cells)
}

/// First four bytes of a compact record (log record or checkpoint chunk). A record written
/// before compact records began with a little-endian u32 that is never `u32::MAX` (a user
/// index in a log, a user count of at most 1024 in a chunk), so the two never mix up.
pub(super) const COMPACT_MAGIC: [u8; 4] = [0xff; 4];

/// Whether `record` is in the compact encoding.
pub(super) fn is_compact(record: &[u8]) -> bool {
    record.starts_with(&COMPACT_MAGIC)
}

/// Appends one sparse vector: `[nnz][first item, value][item delta, value]...`.
pub(super) fn put_vector(out: &mut Vec<u8>, idx: &[u32], val: &[f64]) {
    put_varint(out, idx.len() as u64);
    let mut previous = 0u32;
    for (i, (&j, &v)) in idx.iter().zip(val).enumerate() {
        put_varint(out, if i == 0 { j } else { j - previous } as u64);
        put_value(out, v);
        previous = j;
    }
}

impl Reader<'_> {
    /// A vector from [`put_vector`]: its ascending indices and values.
    pub(super) fn vector(&mut self) -> Option<(Vec<u32>, Vec<f64>)> {
        let nnz = self.varint()?;
        let capacity = nnz.min(self.bytes.len() as u64) as usize;
        let (mut idx, mut val) = (Vec::with_capacity(capacity), Vec::with_capacity(capacity));
        let mut previous = 0u32;
        for i in 0..nnz {
            let step = self.index()?;
            let j = if i == 0 {
                step
            } else if step == 0 {
                return None;
            } else {
                previous.checked_add(step)?
            };
            idx.push(j);
            val.push(self.value()?);
            previous = j;
        }
        Some((idx, val))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_exactly_in_the_fewest_bytes() {
        for (value, bytes) in [
            (0.0, 1),
            (0.5, 1),
            (3.0, 1),
            (4.5, 1),
            (125.0, 1),
            (125.5, 5),
            (-1.0, 5),
            (0.1, 9),
            (1e300, 9),
            (f64::MIN_POSITIVE, 9),
        ] {
            let mut out = vec![];
            put_value(&mut out, value);
            assert_eq!(out.len(), bytes, "{value}");
            let mut r = Reader::new(&out);
            assert_eq!(
                r.value().map(f64::to_bits),
                Some(value.to_bits()),
                "{value}"
            );
            assert!(r.is_empty());
        }
    }

    #[test]
    fn log_records_round_trip_and_garbage_is_refused() {
        let cells = vec![
            (0, 7, 4.0),
            (0, 9, 0.0),
            (0, 1_000_000, 2.5),
            (3, 2, 0.1),
            (u32::MAX, u32::MAX, 5.0),
        ];
        let record = encode_log_cells(cells.iter().copied());
        assert_eq!(log_cell_count(&record), Some(5));
        assert_eq!(decode_log_cells(&record), Some(cells));
        assert_eq!(
            decode_log_cells(&encode_log_cells(std::iter::empty())),
            Some(vec![])
        );
        assert_eq!(decode_log_cells(&record[..record.len() - 1]), None);
        assert_eq!(decode_log_cells(&[record.as_slice(), &[0]].concat()), None);
        assert_eq!(decode_log_cells(&[255, 255, 255, 255, 2, 0, 1, 253]), None);
        assert_eq!(decode_log_cells(&record[4..]), None);
        let repeated = [255, 255, 255, 255, 2, 0, 1, 6, 0, 0, 6];
        assert_eq!(decode_log_cells(&repeated), None);
        assert_eq!(decode_log_cells(&repeated[..8]).map(|c| c.len()), None);
        let mut r = Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]);
        assert_eq!(r.varint(), None, "past 64 bits");
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(r.varint(), Some(u64::MAX));
    }

    #[test]
    fn vectors_round_trip_and_repeated_indices_are_refused() {
        let mut out = vec![];
        put_vector(&mut out, &[2, 3, 4000], &[1.0, 0.25, 7.5]);
        put_vector(&mut out, &[], &[]);
        let mut r = Reader::new(&out);
        assert_eq!(r.vector(), Some((vec![2, 3, 4000], vec![1.0, 0.25, 7.5])));
        assert_eq!(r.vector(), Some((vec![], vec![])));
        assert!(r.is_empty());
        assert_eq!(Reader::new(&[2, 5, 2, 0, 2]).vector(), None);
    }

    #[test]
    fn a_typical_change_costs_about_four_bytes() {
        let cells: Vec<(u32, u32, f64)> = (0..10_000u32)
            .map(|i| (i * 3, (i * 7919) % 5_000, (i % 5 + 1) as f64))
            .collect();
        let record = encode_log_cells(cells.iter().copied());
        assert!(
            record.len() <= cells.len() * 4 + 8,
            "{} bytes",
            record.len()
        );
    }
}
