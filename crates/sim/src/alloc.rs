//! Frame allocation over a range of simulated RAM.
//!
//! [`FrameAllocator`] is a buddy allocator (orders 0 = 4K up to 18 = 1G)
//! behind one mutex, handing out the lowest free block first so runs are
//! reproducible. It counts pages allocated, freed and in use, and rejects
//! double frees. [`SimPageCache`] implements [`PageCache`] on top of it: it
//! is topped up (and zeroed) outside any lock and gives its pages back on
//! drop.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pkvm_arch::{Pa, PAGE_SHIFT, PAGE_SIZE};
use pkvm_pgtable::PageCache;

use crate::physmem::PhysMem;

/// The largest order: 2^18 pages = 1 GiB.
pub const MAX_ORDER: u32 = 18;

/// Why an allocator call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No free block of the requested order.
    #[error("out of memory for an order-{order} block in {region}")]
    OutOfMemory {
        /// Requested order.
        order: u32,
        /// Allocator name.
        region: &'static str,
    },
    /// Order above [`MAX_ORDER`].
    #[error("order {0} is above the maximum")]
    Order(u32),
    /// The block was not allocated with that order (caller bug: double or
    /// mismatched free).
    #[error("{pa:?} (order {order}) is not an allocated block")]
    NotAllocated {
        /// The block.
        pa: Pa,
        /// The order given.
        order: u32,
    },
}

/// Counters of a [`FrameAllocator`], in 4K pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Pages handed out so far.
    pub allocated: u64,
    /// Pages given back so far.
    pub freed: u64,
    /// Pages currently allocated.
    pub in_use: u64,
    /// Total pages managed.
    pub total: u64,
}

struct Buddy {
    /// Free block start pfns, per order.
    free: Vec<BTreeSet<u64>>,
    /// Per frame of the range: the order of the allocated block it heads,
    /// or [`NOT_HEAD`].
    heads: Vec<u8>,
    /// First pfn of the range.
    base_pfn: u64,
}

/// `Buddy::heads` value of a frame that does not head an allocated block.
const NOT_HEAD: u8 = u8::MAX;

impl Buddy {
    fn head(&self, pfn: u64) -> Option<u32> {
        let i = pfn.checked_sub(self.base_pfn)? as usize;
        match self.heads.get(i) {
            Some(&o) if o != NOT_HEAD => Some(o as u32),
            _ => None,
        }
    }
    fn set_head(&mut self, pfn: u64, order: Option<u32>) {
        let i = (pfn - self.base_pfn) as usize;
        self.heads[i] = order.map_or(NOT_HEAD, |o| o as u8);
    }
}

/// A thread-safe buddy allocator over `[base, base+size)`.
pub struct FrameAllocator {
    name: &'static str,
    base: Pa,
    size: u64,
    inner: Mutex<Buddy>,
    allocated: AtomicU64,
    freed: AtomicU64,
}

impl std::fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("size", &self.size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FrameAllocator {
    /// An allocator for `[base, base+size)` (both 4K aligned).
    pub fn new(name: &'static str, base: Pa, size: u64) -> FrameAllocator {
        let mut free = vec![BTreeSet::new(); MAX_ORDER as usize + 1];
        let mut pfn = base.0 >> PAGE_SHIFT;
        let end = (base.0 + size) >> PAGE_SHIFT;
        while pfn < end {
            let mut order = MAX_ORDER;
            while order > 0 && (pfn & ((1 << order) - 1) != 0 || pfn + (1 << order) > end) {
                order -= 1;
            }
            free[order as usize].insert(pfn);
            pfn += 1 << order;
        }
        FrameAllocator {
            name,
            base,
            size,
            inner: Mutex::new(Buddy {
                free,
                heads: vec![NOT_HEAD; (size >> PAGE_SHIFT) as usize],
                base_pfn: base.0 >> PAGE_SHIFT,
            }),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        }
    }

    /// The managed range.
    pub fn range(&self) -> (Pa, u64) {
        (self.base, self.size)
    }

    /// Whether `pa` is inside the managed range.
    pub fn contains(&self, pa: Pa) -> bool {
        pa.0 >= self.base.0 && pa.0 < self.base.0 + self.size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buddy> {
        // A panic while holding this lock cannot leave the free lists
        // inconsistent in a way later users care about; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates 2^`order` contiguous pages aligned to their size. The
    /// contents are whatever the previous user left.
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`], [`AllocError::Order`].
    pub fn alloc(&self, order: u32) -> Result<Pa, AllocError> {
        if order > MAX_ORDER {
            return Err(AllocError::Order(order));
        }
        let mut b = self.lock();
        let Some(from) = (order..=MAX_ORDER).find(|&o| !b.free[o as usize].is_empty()) else {
            return Err(AllocError::OutOfMemory {
                order,
                region: self.name,
            });
        };
        let pfn = b.free[from as usize].pop_first().expect("non-empty list");
        for o in (order..from).rev() {
            b.free[o as usize].insert(pfn + (1 << o));
        }
        b.set_head(pfn, Some(order));
        drop(b);
        self.allocated.fetch_add(1 << order, Ordering::Relaxed);
        Ok(Pa(pfn << PAGE_SHIFT))
    }

    /// Allocates one 4K page.
    ///
    /// # Errors
    /// See [`FrameAllocator::alloc`].
    pub fn alloc_page(&self) -> Result<Pa, AllocError> {
        self.alloc(0)
    }

    /// Allocates and zeroes 2^`order` pages (zeroing happens outside the lock).
    ///
    /// # Errors
    /// See [`FrameAllocator::alloc`].
    pub fn alloc_zeroed(&self, mem: &PhysMem, order: u32) -> Result<Pa, AllocError> {
        let pa = self.alloc(order)?;
        mem.zero(pa, PAGE_SIZE << order)
            .expect("allocator ranges are RAM");
        Ok(pa)
    }

    /// Frees a block allocated with `order`.
    ///
    /// # Errors
    /// [`AllocError::NotAllocated`] for a double or mismatched free.
    pub fn free(&self, pa: Pa, order: u32) -> Result<(), AllocError> {
        let mut pfn = pa.0 >> PAGE_SHIFT;
        let mut b = self.lock();
        if b.head(pfn) != Some(order) {
            return Err(AllocError::NotAllocated { pa, order });
        }
        b.set_head(pfn, None);
        let mut o = order;
        while o < MAX_ORDER {
            let buddy = pfn ^ (1 << o);
            if !b.free[o as usize].remove(&buddy) {
                break;
            }
            pfn = pfn.min(buddy);
            o += 1;
        }
        b.free[o as usize].insert(pfn);
        drop(b);
        self.freed.fetch_add(1 << order, Ordering::Relaxed);
        Ok(())
    }

    /// Turns an allocated order-`order` block into 2^order allocated
    /// order-0 pages (a huge page split), so they can be freed one by one.
    ///
    /// # Errors
    /// [`AllocError::NotAllocated`] if no such block is allocated.
    pub fn split_allocation(&self, pa: Pa, order: u32) -> Result<(), AllocError> {
        let pfn = pa.0 >> PAGE_SHIFT;
        let mut b = self.lock();
        if b.head(pfn) != Some(order) {
            return Err(AllocError::NotAllocated { pa, order });
        }
        for i in 0..1u64 << order {
            b.set_head(pfn + i, Some(0));
        }
        Ok(())
    }

    /// Whether the page at `pa` is part of an allocated block.
    pub fn is_allocated(&self, pa: Pa) -> bool {
        let pfn = pa.0 >> PAGE_SHIFT;
        let b = self.lock();
        (0..=MAX_ORDER).any(|o| {
            let start = pfn & !((1u64 << o) - 1);
            b.head(start) == Some(o)
        })
    }

    /// The counters.
    pub fn stats(&self) -> AllocStats {
        let allocated = self.allocated.load(Ordering::Relaxed);
        let freed = self.freed.load(Ordering::Relaxed);
        AllocStats {
            allocated,
            freed,
            in_use: allocated - freed,
            total: self.size / PAGE_SIZE,
        }
    }
}

/// A [`PageCache`] of zeroed pages taken from a [`FrameAllocator`].
///
/// Top it up (outside any lock) before a page-table operation; the walker
/// takes pages with [`PageCache::alloc_table`] and hands back emptied
/// (all-zero) tables with [`PageCache::free_table`]. Unused pages go back to
/// the allocator on [`SimPageCache::release`] or drop.
pub struct SimPageCache {
    mem: Arc<PhysMem>,
    frames: Arc<FrameAllocator>,
    pages: Vec<Pa>,
}

impl std::fmt::Debug for SimPageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPageCache")
            .field("pages", &self.pages.len())
            .finish()
    }
}

impl SimPageCache {
    /// An empty cache drawing from `frames`.
    pub fn new(mem: Arc<PhysMem>, frames: Arc<FrameAllocator>) -> SimPageCache {
        SimPageCache {
            mem,
            frames,
            pages: Vec::new(),
        }
    }

    /// Fills the cache until it holds at least `min` pages.
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`]; pages obtained so far stay in the cache.
    pub fn topup(&mut self, min: usize) -> Result<(), AllocError> {
        while self.pages.len() < min {
            let pa = self.frames.alloc_zeroed(&self.mem, 0)?;
            self.pages.push(pa);
        }
        Ok(())
    }

    /// Pages currently held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Gives every held page back to the allocator.
    pub fn release(&mut self) {
        for pa in self.pages.drain(..) {
            // The cache only holds order-0 pages it allocated or that a walker
            // freed (which it got from a cache of the same allocator).
            if let Err(e) = self.frames.free(pa, 0) {
                debug_assert!(
                    false,
                    "page cache held a page its allocator does not know: {e}"
                );
            }
        }
    }
}

impl PageCache for SimPageCache {
    fn alloc_table(&mut self) -> Option<Pa> {
        self.pages.pop()
    }

    fn free_table(&mut self, pa: Pa) {
        debug_assert!(
            self.mem.is_zero(pa, PAGE_SIZE).unwrap_or(false),
            "table page {pa:?} handed back to the cache is not zero"
        );
        self.pages.push(pa);
    }
}

impl Drop for SimPageCache {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_allocates_aligned_blocks_lowest_first_and_merges_back() {
        let a = FrameAllocator::new("t", Pa(0x4000_0000), 8 << 20);
        let p0 = a.alloc(0).unwrap();
        assert_eq!(p0, Pa(0x4000_0000));
        let big = a.alloc(9).unwrap();
        assert!(big.is_aligned(2 << 20));
        let p1 = a.alloc(0).unwrap();
        assert_eq!(p1, Pa(0x4000_1000));
        assert_eq!(a.stats().in_use, 514);
        a.free(p0, 0).unwrap();
        a.free(p1, 0).unwrap();
        a.free(big, 9).unwrap();
        assert_eq!(
            a.stats(),
            AllocStats {
                allocated: 514,
                freed: 514,
                in_use: 0,
                total: 2048
            }
        );
        // Fully merged again: a 4M block is available.
        assert!(a.alloc(10).is_ok());
    }

    #[test]
    fn double_free_and_exhaustion_are_errors() {
        let a = FrameAllocator::new("t", Pa(0x4000_0000), 2 * PAGE_SIZE);
        let x = a.alloc(0).unwrap();
        let _y = a.alloc(0).unwrap();
        assert_eq!(
            a.alloc(0),
            Err(AllocError::OutOfMemory {
                order: 0,
                region: "t"
            })
        );
        a.free(x, 0).unwrap();
        assert_eq!(
            a.free(x, 0),
            Err(AllocError::NotAllocated { pa: x, order: 0 })
        );
        assert_eq!(
            a.alloc(MAX_ORDER + 1),
            Err(AllocError::Order(MAX_ORDER + 1))
        );
    }

    #[test]
    fn split_allocation_lets_pages_be_freed_one_by_one() {
        let a = FrameAllocator::new("t", Pa(0x4000_0000), 4 << 20);
        let b = a.alloc(9).unwrap();
        a.split_allocation(b, 9).unwrap();
        for i in 0..512 {
            assert!(a.is_allocated(b + i * PAGE_SIZE));
            a.free(b + i * PAGE_SIZE, 0).unwrap();
        }
        assert_eq!(a.stats().in_use, 0);
        assert!(a.alloc(10).is_ok());
    }

    #[test]
    fn page_cache_hands_out_zeroed_pages_and_returns_them_on_drop() {
        let mem = Arc::new(PhysMem::new(Pa(0x4000_0000), 4 << 20, &[]).unwrap());
        let a = Arc::new(FrameAllocator::new("t", Pa(0x4000_0000), 4 << 20));
        let dirty = a.alloc(0).unwrap();
        mem.fill(dirty, PAGE_SIZE, 0xff).unwrap();
        a.free(dirty, 0).unwrap();
        {
            let mut c = SimPageCache::new(mem.clone(), a.clone());
            c.topup(3).unwrap();
            assert_eq!(c.len(), 3);
            let p = c.alloc_table().unwrap();
            assert!(mem.is_zero(p, PAGE_SIZE).unwrap());
            c.free_table(p);
            assert_eq!(a.stats().in_use, 3);
        }
        assert_eq!(a.stats().in_use, 0);
    }
}
