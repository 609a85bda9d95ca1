//! A sparse in-memory [`BlockBackend`], for testing the NBD server alone.
//!
//! Data lives in 64 KiB pages allocated on first write; a page never
//! written (or fully trimmed) is a hole, which makes BLOCK_STATUS answers
//! meaningful. The crate's tests use it, and `sdc --memory-export NAME:SIZE`
//! serves it instead of the cluster (no MDM, nothing kept), to check NBD
//! clients and measure the protocol layer alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::backend::{BackendError, BlockBackend, ExportInfo, Extent, VolumeIo, ZeroFlags};

/// Allocation granularity of the in-memory volume.
pub const PAGE_SIZE: u64 = 64 * 1024;

/// A set of in-memory exports.
#[derive(Default)]
pub struct MemoryBackend {
    volumes: Mutex<Vec<Arc<MemoryVolume>>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export and returns it (tests inspect it directly).
    pub fn add(&self, name: &str, size: u64, read_only: bool) -> Arc<MemoryVolume> {
        let v = Arc::new(MemoryVolume {
            info: ExportInfo {
                name: name.to_owned(),
                description: format!("in-memory volume {name}"),
                size,
                read_only,
            },
            pages: Mutex::new(HashMap::new()),
            flushes: Default::default(),
        });
        self.volumes.lock().expect("volume list lock").push(v.clone());
        v
    }
}

impl BlockBackend for MemoryBackend {
    type Volume = MemoryVolume;

    async fn list(&self) -> Vec<ExportInfo> {
        self.volumes.lock().expect("volume list lock").iter().map(|v| v.info.clone()).collect()
    }

    async fn open(&self, name: &str) -> Option<Arc<MemoryVolume>> {
        let volumes = self.volumes.lock().expect("volume list lock");
        if name.is_empty() {
            return volumes.first().cloned();
        }
        volumes.iter().find(|v| v.info.name == name).cloned()
    }
}

/// One in-memory export.
pub struct MemoryVolume {
    info: ExportInfo,
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
    flushes: std::sync::atomic::AtomicU64,
}

impl MemoryVolume {
    /// Number of FLUSH requests served.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Indexes of the allocated pages.
    pub fn allocated_pages(&self) -> BTreeSet<u64> {
        self.pages.lock().expect("pages lock").keys().copied().collect()
    }

    fn check(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(BackendError::Invalid("range beyond the end of the volume".into())),
        }
    }

    /// Applies `f(page_index, range_in_page, range_in_buffer)` to each page piece.
    fn for_each_piece(
        offset: u64,
        length: u64,
        mut f: impl FnMut(u64, std::ops::Range<usize>, std::ops::Range<usize>),
    ) {
        let mut done = 0u64;
        while done < length {
            let pos = offset + done;
            let page = pos / PAGE_SIZE;
            let in_page = (pos % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE - pos % PAGE_SIZE).min(length - done) as usize;
            f(page, in_page..in_page + n, done as usize..done as usize + n);
            done += n as u64;
        }
    }

    fn fill(&self, offset: u64, length: u64, data: Option<&[u8]>, allocate: bool) {
        let mut pages = self.pages.lock().expect("pages lock");
        Self::for_each_piece(offset, length, |page, in_page, in_buf| {
            let whole = in_page.len() as u64 == PAGE_SIZE;
            match data {
                Some(d) => {
                    let p = pages
                        .entry(page)
                        .or_insert_with(|| vec![0u8; PAGE_SIZE as usize].into_boxed_slice());
                    p[in_page].copy_from_slice(&d[in_buf]);
                }
                None if whole && !allocate => {
                    pages.remove(&page);
                }
                None if allocate => {
                    let p = pages
                        .entry(page)
                        .or_insert_with(|| vec![0u8; PAGE_SIZE as usize].into_boxed_slice());
                    p[in_page].fill(0);
                }
                None => {
                    if let Some(p) = pages.get_mut(&page) {
                        p[in_page].fill(0);
                    }
                }
            }
        });
    }
}

impl VolumeIo for MemoryVolume {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, BackendError> {
        self.check(offset, u64::from(length))?;
        let mut out = vec![0u8; length as usize];
        let pages = self.pages.lock().expect("pages lock");
        Self::for_each_piece(offset, u64::from(length), |page, in_page, in_buf| {
            if let Some(p) = pages.get(&page) {
                out[in_buf].copy_from_slice(&p[in_page]);
            }
        });
        Ok(Bytes::from(out))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BackendError> {
        if self.info.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.check(offset, data.len() as u64)?;
        self.fill(offset, data.len() as u64, Some(&data), true);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, _fua: bool) -> Result<(), BackendError> {
        self.check(offset, length)?;
        self.fill(offset, length, None, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        self.check(offset, length)?;
        self.fill(offset, length, None, flags.no_hole);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BackendError> {
        self.check(offset, length)?;
        let pages = self.pages.lock().expect("pages lock");
        let mut extents: Vec<Extent> = Vec::new();
        Self::for_each_piece(offset, length, |page, in_page, _| {
            let hole = !pages.contains_key(&page);
            let len = in_page.len() as u64;
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length += len,
                _ => extents.push(Extent { length: len, hole }),
            }
        });
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sparse_read_write_trim() {
        let b = MemoryBackend::new();
        let v = b.add("m", 4 * PAGE_SIZE, false);
        v.write(PAGE_SIZE - 3, Bytes::from_static(b"abcdef"), false).await.unwrap();
        assert_eq!(&v.read(PAGE_SIZE - 3, 6).await.unwrap()[..], b"abcdef");
        assert_eq!(v.allocated_pages().into_iter().collect::<Vec<_>>(), vec![0, 1]);
        let st = v.block_status(0, 4 * PAGE_SIZE).await.unwrap();
        assert_eq!(
            st,
            vec![
                Extent { length: 2 * PAGE_SIZE, hole: false },
                Extent { length: 2 * PAGE_SIZE, hole: true }
            ]
        );
        v.trim(0, PAGE_SIZE, false).await.unwrap();
        assert_eq!(v.allocated_pages().into_iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(&v.read(PAGE_SIZE - 3, 6).await.unwrap()[..], b"\0\0\0def");
        v.write_zeroes(2 * PAGE_SIZE, PAGE_SIZE, ZeroFlags { no_hole: true, ..Default::default() })
            .await
            .unwrap();
        assert!(v.allocated_pages().contains(&2));
        assert!(v.read(4 * PAGE_SIZE - 1, 2).await.is_err());
        assert!(b.open("").await.is_some());
        assert!(b.open("nope").await.is_none());
    }
}
