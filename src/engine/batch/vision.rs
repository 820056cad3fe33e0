//! The vision-feature cache: projector outputs of images already seen, keyed by a content hash of the
//! encoded image and the tiling options, least recently used out first, bounded in entries and bytes.
//! A second question about the same face skips decoding, tiling and the vision tower.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::tensor::Tensor;

/// SHA-256 of the image bytes and the preprocessing options: two requests share features only when the
/// tower would see the same tiles (a 64-bit hash could be forced to collide by a hostile client).
pub type ImageDigest = [u8; 32];

struct Entry {
    features: Arc<Tensor>,
    tiles: usize,
    bytes: usize,
    stamp: u64,
}

pub struct VisionCache {
    map: HashMap<ImageDigest, Entry>,
    by_stamp: BTreeMap<u64, ImageDigest>,
    next: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl VisionCache {
    /// A cache of at most `max_entries` images and `max_bytes` bytes of features (0 entries: no caching).
    pub fn new(max_entries: usize, max_bytes: usize) -> VisionCache {
        VisionCache { map: HashMap::new(), by_stamp: BTreeMap::new(), next: 0, bytes: 0, max_entries, max_bytes }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of features held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The features `[tiles * 256, hidden]` and tile count of an image, marked as just used.
    pub fn get(&mut self, key: &ImageDigest) -> Option<(Arc<Tensor>, usize)> {
        self.next += 1;
        let stamp = self.next;
        let e = self.map.get_mut(key)?;
        self.by_stamp.remove(&e.stamp);
        e.stamp = stamp;
        self.by_stamp.insert(stamp, *key);
        Some((e.features.clone(), e.tiles))
    }

    /// Adds an image's features, evicting the least recently used entries to stay within the bounds. An
    /// entry larger than the whole byte budget is not kept.
    pub fn insert(&mut self, key: ImageDigest, features: Arc<Tensor>, tiles: usize) {
        let bytes = features.numel() * 4;
        if self.max_entries == 0 || bytes > self.max_bytes {
            return;
        }
        if let Some(old) = self.map.remove(&key) {
            self.by_stamp.remove(&old.stamp);
            self.bytes -= old.bytes;
        }
        while self.map.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            let Some((_, oldest)) = self.by_stamp.pop_first() else { break };
            if let Some(e) = self.map.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
        self.next += 1;
        self.by_stamp.insert(self.next, key);
        self.map.insert(key, Entry { features, tiles, bytes, stamp: self.next });
        self.bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feat(rows: usize) -> Arc<Tensor> {
        Arc::new(Tensor::zeros([rows, 4]))
    }

    #[test]
    fn lru_within_entries_and_bytes() {
        let mut c = VisionCache::new(2, 1000);
        c.insert([1; 32], feat(10), 1);
        c.insert([2; 32], feat(10), 1);
        assert!(c.get(&[1; 32]).is_some());
        c.insert([3; 32], feat(10), 1);
        assert!(c.get(&[2; 32]).is_none(), "least recently used goes first");
        assert!(c.get(&[1; 32]).is_some() && c.get(&[3; 32]).is_some());
        c.insert([4; 32], feat(60), 2);
        assert_eq!(c.len(), 1, "960 bytes leave room for nothing else");
        assert_eq!(c.bytes(), 960);
        c.insert([5; 32], feat(300), 1);
        assert!(c.get(&[5; 32]).is_none(), "larger than the whole budget: not kept");
        assert_eq!(c.get(&[4; 32]).map(|(_, t)| t), Some(2));
    }
}
