//! The item catalogue: titles by item id (`c/<item>`), read when snapshots are built.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{Database, StoreError, key};

/// Item titles by item id. A cheap handle: clones share the database (the Kafka catalogue
/// reader holds one).
#[derive(Clone)]
pub struct Catalogue {
    db: Arc<Database>,
}

impl Catalogue {
    pub(super) fn new(db: Arc<Database>) -> Catalogue {
        Catalogue { db }
    }

    /// Adds catalogue titles (item id → title).
    pub fn put_titles(&self, titles: &[(String, String)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (item, title) in titles {
            batch.insert(key(b'c', item.as_bytes()), title.as_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    pub fn titles(&self) -> Result<FxHashMap<String, String>, StoreError> {
        let mut out = FxHashMap::default();
        for entry in self.db.tree.scan_prefix(b"c/") {
            let (k, v) = entry?;
            out.insert(
                String::from_utf8_lossy(&k[2..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        Ok(out)
    }
}
