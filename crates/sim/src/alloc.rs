//! Frame allocation over a range of simulated RAM.
//!
//! [`FrameAllocator`] is a buddy allocator (orders 0 = 4K up to 18 = 1G)
//! behind one mutex, handing out the lowest free block first so runs are
//! reproducible, with per-CPU lists of 4K frames in front of it (like
//! Linux's per-CPU page lists) so 4K faults on different CPUs do not
//! serialise on it. It counts pages allocated, freed and in use, and rejects
//! double frees. [`SimPageCache`] implements [`PageCache`] on top of it: it
//! is topped up (and zeroed) outside any lock and gives its pages back on
//! drop.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
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
}

/// `FrameAllocator::heads` value of a frame that does not head an
/// allocated block (free in the buddy lists, or inside a larger block).
const NOT_HEAD: u8 = u8::MAX;
/// `FrameAllocator::heads` value of a free order-0 frame parked on a
/// per-CPU list: not allocated, not in the buddy lists.
const PCP_FREE: u8 = u8::MAX - 1;

/// Order-0 frames a per-CPU list takes from the buddy lists at once.
const PCP_BATCH: usize = 32;
/// A per-CPU list holding more than this gives [`PCP_BATCH`] frames back.
const PCP_HIGH: usize = 3 * PCP_BATCH;

/// One per-CPU list of free order-0 frames (Linux's `per_cpu_pages`), with
/// its own counters so the fault path writes no cache line that other
/// CPUs write too. Aligned to keep neighbours off its cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Pcp {
    pfns: Mutex<Vec<u64>>,
    allocated: AtomicU64,
    freed: AtomicU64,
}

impl Pcp {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.pfns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Index of the calling thread's per-CPU list.
fn pcp_index(n: usize) -> usize {
    crate::percpu::slot() % n
}

/// A thread-safe buddy allocator over `[base, base+size)`.
///
/// Order-0 frames go through per-CPU lists (refilled and drained in
/// batches under the buddy lock), so concurrent 4K allocations and frees
/// from different threads take no lock they share. Larger blocks come from
/// the buddy lists; when those cannot satisfy a request, every per-CPU list
/// is drained back first, so frames parked on a list never cause a failure.
/// Each frame's allocation state is an atomic byte, so double and
/// mismatched frees are caught on both paths.
pub struct FrameAllocator {
    name: &'static str,
    base: Pa,
    size: u64,
    inner: Mutex<Buddy>,
    /// Per frame of the range: the order of the allocated block it heads,
    /// [`NOT_HEAD`] or [`PCP_FREE`].
    heads: Box<[AtomicU8]>,
    pcp: Box<[Pcp]>,
    /// Counters of blocks above order 0 (rare; shared is fine).
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
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        FrameAllocator {
            name,
            base,
            size,
            inner: Mutex::new(Buddy { free }),
            heads: (0..size >> PAGE_SHIFT)
                .map(|_| AtomicU8::new(NOT_HEAD))
                .collect(),
            pcp: (0..(2 * cpus).clamp(4, 256))
                .map(|_| Pcp::default())
                .collect(),
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

    fn head_cell(&self, pfn: u64) -> Option<&AtomicU8> {
        let i = pfn.checked_sub(self.base.0 >> PAGE_SHIFT)?;
        self.heads.get(usize::try_from(i).ok()?)
    }

    fn head(&self, pfn: u64) -> Option<u32> {
        match self.head_cell(pfn)?.load(Ordering::Acquire) {
            NOT_HEAD | PCP_FREE => None,
            o => Some(o as u32),
        }
    }

    fn set_head(&self, pfn: u64, v: u8) {
        self.head_cell(pfn)
            .expect("buddy pfns lie in the range")
            .store(v, Ordering::Release);
    }

    /// Takes a block of `order` from the buddy lists (lowest first).
    fn buddy_alloc(&self, b: &mut Buddy, order: u32) -> Option<u64> {
        let from = (order..=MAX_ORDER).find(|&o| !b.free[o as usize].is_empty())?;
        let pfn = b.free[from as usize].pop_first().expect("non-empty list");
        for o in (order..from).rev() {
            b.free[o as usize].insert(pfn + (1 << o));
        }
        Some(pfn)
    }

    /// Puts a free block back into the buddy lists, merging with its
    /// buddies. Its head byte must already say it is not allocated.
    fn buddy_free(&self, b: &mut Buddy, mut pfn: u64, order: u32) {
        let base = self.base.0 >> PAGE_SHIFT;
        let end = base + (self.size >> PAGE_SHIFT);
        let mut o = order;
        while o < MAX_ORDER {
            let buddy = pfn ^ (1 << o);
            if buddy < base || buddy + (1 << o) > end || !b.free[o as usize].remove(&buddy) {
                break;
            }
            pfn = pfn.min(buddy);
            o += 1;
        }
        b.free[o as usize].insert(pfn);
    }

    /// Gives every frame parked on a per-CPU list back to the buddy lists.
    fn drain_pcp(&self) {
        for pcp in self.pcp.iter() {
            let pfns: Vec<u64> = std::mem::take(&mut *pcp.lock());
            if pfns.is_empty() {
                continue;
            }
            let mut b = self.lock();
            for pfn in pfns {
                self.set_head(pfn, NOT_HEAD);
                self.buddy_free(&mut b, pfn, 0);
            }
        }
    }

    fn out_of_memory(&self, order: u32) -> AllocError {
        AllocError::OutOfMemory {
            order,
            region: self.name,
        }
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
        if order == 0 {
            return self.alloc_pcp();
        }
        let mut b = self.lock();
        let pfn = match self.buddy_alloc(&mut b, order) {
            Some(pfn) => pfn,
            None => {
                drop(b);
                self.drain_pcp();
                b = self.lock();
                self.buddy_alloc(&mut b, order)
                    .ok_or_else(|| self.out_of_memory(order))?
            }
        };
        self.set_head(pfn, order as u8);
        drop(b);
        self.allocated.fetch_add(1 << order, Ordering::Relaxed);
        Ok(Pa(pfn << PAGE_SHIFT))
    }

    /// The order-0 path: the calling CPU's list, refilled from the buddy
    /// lists in a batch when empty.
    fn alloc_pcp(&self) -> Result<Pa, AllocError> {
        let pcp = &self.pcp[pcp_index(self.pcp.len())];
        let mut list = pcp.lock();
        if list.is_empty() {
            self.refill(&mut list);
        }
        if list.is_empty() {
            // Other CPUs may hold the last free frames on their lists.
            drop(list);
            self.drain_pcp();
            list = pcp.lock();
            self.refill(&mut list);
        }
        let pfn = list.pop().ok_or_else(|| self.out_of_memory(0))?;
        drop(list);
        let prev = self
            .head_cell(pfn)
            .expect("listed frames lie in the range")
            .swap(0, Ordering::AcqRel);
        debug_assert_eq!(prev, PCP_FREE, "frame on a per-CPU list was not free");
        pcp.allocated.fetch_add(1, Ordering::Relaxed);
        Ok(Pa(pfn << PAGE_SHIFT))
    }

    /// Moves up to [`PCP_BATCH`] of the lowest free frames onto `list`,
    /// highest last-out so the lowest is handed out first.
    fn refill(&self, list: &mut Vec<u64>) {
        let mut b = self.lock();
        let start = list.len();
        while list.len() < start + PCP_BATCH {
            let Some(pfn) = self.buddy_alloc(&mut b, 0) else {
                break;
            };
            self.set_head(pfn, PCP_FREE);
            list.push(pfn);
        }
        list[start..].reverse();
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
        let pfn = pa.0 >> PAGE_SHIFT;
        let not_allocated = AllocError::NotAllocated { pa, order };
        let cell = self.head_cell(pfn).ok_or(not_allocated)?;
        if order == 0 {
            // Claim the free atomically: of two racing frees one wins.
            cell.compare_exchange(0, PCP_FREE, Ordering::AcqRel, Ordering::Acquire)
                .map_err(|_| not_allocated)?;
            let pcp = &self.pcp[pcp_index(self.pcp.len())];
            pcp.freed.fetch_add(1, Ordering::Relaxed);
            let mut list = pcp.lock();
            list.push(pfn);
            if list.len() > PCP_HIGH {
                let give: Vec<u64> = list.drain(..PCP_BATCH).collect();
                drop(list);
                let mut b = self.lock();
                for pfn in give {
                    self.set_head(pfn, NOT_HEAD);
                    self.buddy_free(&mut b, pfn, 0);
                }
            }
            return Ok(());
        }
        let mut b = self.lock();
        if self.head(pfn) != Some(order) {
            return Err(not_allocated);
        }
        self.set_head(pfn, NOT_HEAD);
        self.buddy_free(&mut b, pfn, order);
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
        let _b = self.lock();
        if self.head(pfn) != Some(order) {
            return Err(AllocError::NotAllocated { pa, order });
        }
        for i in 0..1u64 << order {
            self.set_head(pfn + i, 0);
        }
        // Counters stay as they are: the block counted 2^order pages when
        // allocated, and each page counts one when freed.
        Ok(())
    }

    /// Whether the page at `pa` is part of an allocated block.
    pub fn is_allocated(&self, pa: Pa) -> bool {
        let pfn = pa.0 >> PAGE_SHIFT;
        (0..=MAX_ORDER).any(|o| {
            let start = pfn & !((1u64 << o) - 1);
            self.head(start) == Some(o)
        })
    }

    /// The counters.
    pub fn stats(&self) -> AllocStats {
        // Frees first, then allocations: a free counted here was allocated
        // before it, so while frames move the sums can only err towards
        // more in use, never fewer (exact once the allocator is quiescent).
        let freed = self
            .pcp
            .iter()
            .fold(self.freed.load(Ordering::Acquire), |n, p| {
                n + p.freed.load(Ordering::Acquire)
            });
        let allocated = self
            .pcp
            .iter()
            .fold(self.allocated.load(Ordering::Acquire), |n, p| {
                n + p.allocated.load(Ordering::Acquire)
            });
        AllocStats {
            allocated,
            freed,
            in_use: allocated.saturating_sub(freed),
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
    fn frames_parked_on_another_cpus_list_are_still_allocatable() {
        // 64 pages: another thread allocates and frees them all, leaving
        // them on its per-CPU list; this thread must still get every page,
        // and then a block that needs them merged.
        let a = Arc::new(FrameAllocator::new("t", Pa(0x4000_0000), 64 * PAGE_SIZE));
        let a2 = a.clone();
        std::thread::spawn(move || {
            let pages: Vec<Pa> = (0..64).map(|_| a2.alloc(0).unwrap()).collect();
            for p in pages {
                a2.free(p, 0).unwrap();
            }
        })
        .join()
        .unwrap();
        assert_eq!(a.stats().in_use, 0);
        let mine: Vec<Pa> = (0..64).map(|_| a.alloc(0).unwrap()).collect();
        assert!(a.alloc(0).is_err());
        for p in mine {
            a.free(p, 0).unwrap();
        }
        // Parked on this thread's list now: a 256K block needs all of them.
        assert_eq!(a.alloc(6), Ok(Pa(0x4000_0000)));
    }

    #[test]
    fn concurrent_order0_traffic_never_hands_a_frame_out_twice() {
        let a = Arc::new(FrameAllocator::new("t", Pa(0x4000_0000), 4 << 20));
        let owner: Arc<Vec<AtomicU64>> = Arc::new((0..1024).map(|_| AtomicU64::new(0)).collect());
        let threads: Vec<_> = (1..=4u64)
            .map(|t| {
                let (a, owner) = (a.clone(), owner.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000u64 {
                        if held.len() < 200 && (i * t) % 3 != 0 {
                            let pa = a.alloc(0).unwrap();
                            let slot = &owner[((pa.0 - 0x4000_0000) >> PAGE_SHIFT) as usize];
                            assert_eq!(
                                slot.swap(t, Ordering::AcqRel),
                                0,
                                "{pa:?} handed out twice"
                            );
                            held.push(pa);
                        } else if let Some(pa) = held.pop() {
                            owner[((pa.0 - 0x4000_0000) >> PAGE_SHIFT) as usize]
                                .store(0, Ordering::Release);
                            a.free(pa, 0).unwrap();
                        }
                    }
                    for pa in held {
                        owner[((pa.0 - 0x4000_0000) >> PAGE_SHIFT) as usize]
                            .store(0, Ordering::Release);
                        a.free(pa, 0).unwrap();
                        assert!(a.free(pa, 0).is_err(), "double free accepted");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(a.stats().in_use, 0);
        // Everything merges back into one 4M block.
        assert_eq!(a.alloc(10), Ok(Pa(0x4000_0000)));
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
