//! The item catalogue: titles by item id (`c/<item>`), read when snapshots are built.

use rustc_hash::FxHashMap;

use super::{Store, StoreError, key};

impl Store {
    /// Adds catalogue titles (item id → title).
    pub fn put_titles(&self, titles: &[(String, String)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (item, title) in titles {
            batch.insert(key(b'c', item.as_bytes()), title.as_bytes());
        }
        self.write(batch)?;
        Ok(())
    }

    pub fn titles(&self) -> Result<FxHashMap<String, String>, StoreError> {
        let mut out = FxHashMap::default();
        for entry in self.tree.scan_prefix(b"c/") {
            let (k, v) = entry?;
            out.insert(
                String::from_utf8_lossy(&k[2..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        Ok(out)
    }
}
