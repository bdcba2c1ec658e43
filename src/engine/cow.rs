//! A vector kept in shared chunks, so a snapshot can read the engine's data while the engine
//! goes on changing it: cloning shares every chunk (O(len / CHUNK) pointer copies), and a write
//! copies the one chunk it lands in, only while a clone still holds that chunk.

use std::sync::Arc;

/// Elements per chunk: small enough that a write copies little, large enough that a clone and
/// a scan stay cheap (the chunk headers of 1M users fit in 8 KB).
const CHUNK: usize = 1024;

#[derive(Debug, Clone)]
pub struct CowVec<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for CowVec<T> {
    fn default() -> Self {
        CowVec {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Clone> CowVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// The element at `i` for writing; its chunk is copied first if a clone shares it.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let chunk = self.chunks.get_mut(i / CHUNK)?;
        Arc::make_mut(chunk).get_mut(i % CHUNK)
    }

    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(value),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The elements in `start..end` as the contiguous slices they are stored in.
    pub fn slices(&self, start: usize, end: usize) -> Vec<&[T]> {
        let end = end.min(self.len);
        let mut out = vec![];
        let mut i = start;
        while i < end {
            let chunk = &self.chunks[i / CHUNK];
            let from = i % CHUNK;
            let to = (from + (end - i)).min(chunk.len());
            out.push(&chunk[from..to]);
            i += to - from;
        }
        out
    }

    pub fn to_vec(&self) -> Vec<T> {
        self.iter().cloned().collect()
    }
}

impl<T: Clone> From<Vec<T>> for CowVec<T> {
    fn from(values: Vec<T>) -> Self {
        values.into_iter().collect()
    }
}

impl<T: Clone> FromIterator<T> for CowVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v = CowVec::default();
        for x in iter {
            v.push(x);
        }
        v
    }
}

impl<T: Clone> std::ops::Index<usize> for CowVec<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T: Clone> std::ops::IndexMut<usize> for CowVec<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut Arc::make_mut(&mut self.chunks[i / CHUNK])[i % CHUNK]
    }
}

impl<'a, T: Clone> IntoIterator for &'a CowVec<T> {
    type Item = &'a T;
    type IntoIter = std::iter::FlatMap<
        std::slice::Iter<'a, Arc<Vec<T>>>,
        std::slice::Iter<'a, T>,
        fn(&'a Arc<Vec<T>>) -> std::slice::Iter<'a, T>,
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

impl<T: Clone + PartialEq> PartialEq for CowVec<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_keeps_what_it_saw_and_shares_untouched_chunks() {
        let mut v: CowVec<u64> = (0..3000).collect();
        let view = v.clone();
        v[5] = 99;
        v.push(3000);
        assert_eq!(view[5], 5);
        assert_eq!(view.len(), 3000);
        assert_eq!(v[5], 99);
        assert_eq!(v.len(), 3001);
        // Only the written chunk was copied; the others are still shared.
        assert!(!Arc::ptr_eq(&v.chunks[0], &view.chunks[0]));
        assert!(Arc::ptr_eq(&v.chunks[1], &view.chunks[1]));
        let joined: Vec<u64> = v.slices(1000, 2100).concat();
        assert_eq!(joined, (1000..2100).collect::<Vec<u64>>());
        assert_eq!(v.iter().count(), 3001);
    }
}
