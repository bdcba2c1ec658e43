//! User and item ids and the sparse rating vectors they index: ids interned to dense indices
//! in order of first appearance (shared copy-on-write with snapshot views), and a user's
//! ratings as sorted (item, value) pairs.

use rustc_hash::FxHashMap;

use super::CowVec;

/// A user's ratings: item indices ascending, values non-zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseVec {
    pub idx: Vec<u32>,
    pub val: Vec<f64>,
}

impl SparseVec {
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }
    pub fn get(&self, j: u32) -> f64 {
        self.idx
            .binary_search(&j)
            .map(|p| self.val[p])
            .unwrap_or(0.0)
    }
    pub fn iter(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        self.idx.iter().copied().zip(self.val.iter().copied())
    }
}

/// Engine indices of a source's own dense id keys (the replay interns every id once while
/// decoding): an event carrying such keys is applied without hashing its id strings again.
#[derive(Debug, Default)]
pub struct SourceIds {
    pub(super) users: Vec<u32>,
    pub(super) items: Vec<u32>,
}

impl SourceIds {
    pub(super) fn lookup(map: &[u32], key: u32) -> Option<u32> {
        map.get(key as usize).copied().filter(|&i| i != u32::MAX)
    }
    pub(super) fn remember(map: &mut Vec<u32>, key: u32, index: u32) {
        let key = key as usize;
        if map.len() <= key {
            map.resize(key + 1, u32::MAX);
        }
        map[key] = index;
    }
}

/// Ids by dense index, in order of first appearance; shared copy-on-write with views.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ids(pub(super) CowVec<String>);

impl Ids {
    pub fn id(&self, index: u32) -> &str {
        &self.0[index as usize]
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &String> + '_ {
        self.0.iter()
    }
    /// Indices sorted by id: an order independent of arrival, for every computation whose
    /// result could depend on the order it visits users in.
    pub fn sorted_order(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| self.id(a).cmp(self.id(b)));
        order
    }
}

/// Dense indices for string ids, in order of first appearance.
#[derive(Debug, Clone, Default)]
pub struct IdMap {
    /// Ids of up to [`SHORT_ID_BYTES`] bytes, keyed by their bytes inline: a lookup compares
    /// 16 bytes in place instead of following a pointer to the id (most ids are short, and a
    /// replay looks two up per event).
    pub(super) short: FxHashMap<[u8; 16], u32>,
    pub(super) long: FxHashMap<String, u32>,
    pub(super) ids: Ids,
}

/// Longest id kept inline in an [`IdMap`]; the 16th byte holds the length.
pub(super) const SHORT_ID_BYTES: usize = 15;

pub(super) fn short_key(id: &str) -> Option<[u8; 16]> {
    let bytes = id.as_bytes();
    (bytes.len() <= SHORT_ID_BYTES).then(|| {
        let mut key = [0u8; 16];
        key[..bytes.len()].copy_from_slice(bytes);
        key[15] = bytes.len() as u8;
        key
    })
}

impl IdMap {
    pub fn get(&self, id: &str) -> Option<u32> {
        match short_key(id) {
            Some(key) => self.short.get(&key).copied(),
            None => self.long.get(id).copied(),
        }
    }
    /// The index of `id`, and whether it was new.
    pub fn intern(&mut self, id: &str) -> (u32, bool) {
        if let Some(i) = self.get(id) {
            return (i, false);
        }
        let i = self.ids.len() as u32;
        match short_key(id) {
            Some(key) => self.short.insert(key, i),
            None => self.long.insert(id.to_string(), i),
        };
        self.ids.0.push(id.to_string());
        (i, true)
    }
    pub fn id(&self, index: u32) -> &str {
        self.ids.id(index)
    }
    pub fn ids(&self) -> &Ids {
        &self.ids
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn from_ids(ids: Vec<String>) -> Self {
        let mut map = IdMap::default();
        for (i, id) in ids.iter().enumerate() {
            match short_key(id) {
                Some(key) => map.short.insert(key, i as u32),
                None => map.long.insert(id.clone(), i as u32),
            };
        }
        map.ids = Ids(ids.into());
        map
    }
}

/// A stable 64-bit FNV-1a hash (deterministic across runs and platforms), for hold-out splits
/// and samples.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that nearby ids spread over the range.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}
