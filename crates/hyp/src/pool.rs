//! The hypervisor's page pool: a buddy allocator over one physical range.
//!
//! - Free lists per order `0..=MAX_ORDER`, linked through the page metadata
//!   (`next`/`prev` hold metadata indices), so the pool never touches the
//!   pages themselves except to zero them.
//! - A block of order `k` starts at a `4K << k` aligned address; its buddy is
//!   `pa ^ (4K << k)`, considered only when it lies inside the pool's range.
//! - A free block's head carries its order and refcount 0; every other page
//!   of a free block carries [`NO_ORDER`]. An allocated block's head carries
//!   its order and a refcount >= 1.
//! - Freeing (the refcount reaching zero) zeroes the block, then coalesces
//!   it with free buddies: allocations always come back zeroed.
//! - Refcount overflow/underflow and `get` of a free page are hypervisor
//!   bugs (the host cannot reach pool refcounts): they panic with a message.
//! - One [`SpinLock`] of class `HypPool` (the innermost class) per pool.

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use pkvm_arch::{Pa, PAGE_SIZE};
use pkvm_sync::{LockClass, SpinLock};

use crate::meta::{MemMap, NIL, NO_ORDER};
use crate::platform::HypPlatform;

/// Largest block order (4 MiB blocks).
pub const MAX_ORDER: u8 = 10;

/// Why a pool operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// No free block of at least this order (or an injected failure).
    NoMemory {
        /// The requested order.
        order: u8,
    },
    /// The order is above [`MAX_ORDER`] (caller bug).
    BadOrder {
        /// The requested order.
        order: u8,
    },
    /// The pool's range is empty, unaligned or outside the metadata
    /// (platform bug at init).
    BadRange {
        /// Start of the range.
        base: Pa,
        /// Number of pages.
        pages: u64,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::NoMemory { order } => write!(f, "hyp pool has no free order-{order} block"),
            PoolError::BadOrder { order } => {
                write!(f, "order {order} exceeds the maximum {MAX_ORDER}")
            }
            PoolError::BadRange { base, pages } => {
                write!(
                    f,
                    "pool range {base}+{pages} pages is invalid (platform bug)"
                )
            }
        }
    }
}

struct PoolInner {
    mem: MemMap,
    start: usize,
    end: usize,
    free: [u32; MAX_ORDER as usize + 1],
    free_pages: u64,
}

/// A buddy allocator over a fixed physical range.
pub struct HypPool {
    inner: SpinLock<PoolInner>,
    /// Fault injection: 0 = off, n = the n-th allocation from now fails.
    fail_countdown: AtomicU32,
    start: Pa,
    pages: u64,
}

impl fmt::Debug for HypPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HypPool")
            .field("start", &self.start)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl PoolInner {
    fn push(&mut self, order: u8, idx: usize) {
        let head = self.free[order as usize];
        let m = self.mem.at(idx);
        m.next.store(head, Relaxed);
        m.prev.store(NIL, Relaxed);
        if head != NIL {
            self.mem.at(head as usize).prev.store(idx as u32, Relaxed);
        }
        self.free[order as usize] = idx as u32;
    }

    fn remove(&mut self, order: u8, idx: usize) {
        let m = self.mem.at(idx);
        let (next, prev) = (m.next.load(Relaxed), m.prev.load(Relaxed));
        if prev == NIL {
            debug_assert_eq!(self.free[order as usize], idx as u32);
            self.free[order as usize] = next;
        } else {
            self.mem.at(prev as usize).next.store(next, Relaxed);
        }
        if next != NIL {
            self.mem.at(next as usize).prev.store(prev, Relaxed);
        }
    }

    /// Zeroes the block at `idx` (order `order`), then inserts it, merging
    /// with free buddies inside the range.
    fn attach<P: HypPlatform + ?Sized>(&mut self, plat: &P, mut idx: usize, mut order: u8) {
        let n = 1usize << order;
        for i in idx..idx + n {
            plat.zero_page(self.mem.pa_of(i));
            self.mem.at(i).order.store(NO_ORDER, Relaxed);
        }
        self.free_pages += n as u64;
        while order < MAX_ORDER {
            // Indices are relative to the metadata base, which is page but
            // not block aligned: work with absolute pfns.
            let pa = self.mem.pa_of(idx);
            let buddy_pa = Pa(pa.0 ^ (PAGE_SIZE << order));
            let Some(bidx) = self.mem.index(buddy_pa) else {
                break;
            };
            if bidx < self.start || bidx + (1usize << order) > self.end {
                break;
            }
            let b = self.mem.at(bidx);
            if b.refcount.load(Relaxed) != 0 || b.order.load(Relaxed) != order {
                break;
            }
            self.remove(order, bidx);
            b.order.store(NO_ORDER, Relaxed);
            idx = idx.min(bidx);
            order += 1;
        }
        self.mem.at(idx).order.store(order, Relaxed);
        self.push(order, idx);
    }
}

impl HypPool {
    /// A pool over `[base, base + pages)`; the first `reserved` pages stay
    /// allocated (order 0, refcount 1), the rest are zeroed and freed.
    ///
    /// # Errors
    /// [`PoolError::BadRange`] if the range is empty, unaligned or not
    /// covered by `mem`, or `reserved > pages`.
    pub fn new<P: HypPlatform + ?Sized>(
        plat: &P,
        mem: MemMap,
        base: Pa,
        pages: u64,
        reserved: u64,
    ) -> Result<HypPool, PoolError> {
        let bad = PoolError::BadRange { base, pages };
        if !base.is_aligned(PAGE_SIZE) || reserved > pages || !mem.contains(base, pages) {
            return Err(bad);
        }
        let start = mem.index(base).ok_or(bad)?;
        let end = start + pages as usize;
        let mut inner = PoolInner {
            mem,
            start,
            end,
            free: [NIL; MAX_ORDER as usize + 1],
            free_pages: 0,
        };
        for i in start..end {
            let m = mem.at(i);
            m.refcount.store(1, Relaxed);
            m.order.store(0, Relaxed);
        }
        for i in start + reserved as usize..end {
            mem.at(i).refcount.store(0, Relaxed);
            inner.attach(plat, i, 0);
        }
        Ok(HypPool {
            inner: SpinLock::new(inner, LockClass::HypPool),
            fail_countdown: AtomicU32::new(0),
            start: base,
            pages,
        })
    }

    /// Whether `pa` belongs to this pool's range.
    pub fn contains(&self, pa: Pa) -> bool {
        pa >= self.start && pa.0 < self.start.0 + self.pages * PAGE_SIZE
    }

    /// Number of pages in the pool's range.
    pub fn total_pages(&self) -> u64 {
        self.pages
    }

    /// Number of free pages.
    pub fn free_pages(&self) -> u64 {
        self.inner.lock().free_pages
    }

    /// Whether the pool's lock is held (tests assert it is not, between calls).
    pub fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }

    /// Makes the allocation after `after` successful ones fail once
    /// (fault injection for tests).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_alloc_failure(&self, after: u32) {
        self.fail_countdown.store(after + 1, Relaxed);
    }

    /// Cancels a pending injected failure; returns whether it was still pending.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn clear_injected_failure(&self) -> bool {
        self.fail_countdown.swap(0, Relaxed) != 0
    }

    fn injected_failure(&self) -> bool {
        let c = self.fail_countdown.load(Relaxed);
        if c == 0 {
            return false;
        }
        self.fail_countdown.store(c - 1, Relaxed);
        c == 1
    }

    /// Allocates a zeroed block of `4K << order` bytes, aligned to its size,
    /// with refcount 1.
    ///
    /// # Errors
    /// [`PoolError::NoMemory`] when no block is large enough,
    /// [`PoolError::BadOrder`] above [`MAX_ORDER`].
    pub fn alloc(&self, order: u8) -> Result<Pa, PoolError> {
        if order > MAX_ORDER {
            return Err(PoolError::BadOrder { order });
        }
        let mut p = self.inner.lock();
        if self.injected_failure() {
            return Err(PoolError::NoMemory { order });
        }
        let Some(mut o) = (order..=MAX_ORDER).find(|&o| p.free[o as usize] != NIL) else {
            return Err(PoolError::NoMemory { order });
        };
        let idx = p.free[o as usize] as usize;
        p.remove(o, idx);
        while o > order {
            o -= 1;
            let upper = idx + (1usize << o);
            p.mem.at(upper).order.store(o, Relaxed);
            p.push(o, upper);
        }
        let m = p.mem.at(idx);
        m.order.store(order, Relaxed);
        m.refcount.store(1, Relaxed);
        p.free_pages -= 1u64 << order;
        Ok(p.mem.pa_of(idx))
    }

    fn head_index(p: &PoolInner, pa: Pa, what: &str) -> usize {
        match p.mem.index(pa) {
            Some(i) if i >= p.start && i < p.end && pa.is_aligned(PAGE_SIZE) => i,
            _ => panic!("hyp pool bug: {what} of {pa:?}, which is not a pool page"),
        }
    }

    /// Takes an extra reference on an allocated block.
    ///
    /// # Panics
    /// On refcount overflow or if the block is free (hypervisor bugs).
    pub fn get(&self, pa: Pa) {
        let p = self.inner.lock();
        let m = p.mem.at(Self::head_index(&p, pa, "get"));
        let c = m.refcount.load(Relaxed);
        assert!(c != 0, "hyp pool bug: get of free page {pa:?}");
        assert!(c != u16::MAX, "hyp pool bug: refcount overflow on {pa:?}");
        m.refcount.store(c + 1, Relaxed);
    }

    /// Drops a reference; the last one frees (zeroes and coalesces) the block.
    ///
    /// # Panics
    /// On refcount underflow (a double free: a hypervisor bug).
    pub fn put<P: HypPlatform + ?Sized>(&self, plat: &P, pa: Pa) {
        let mut p = self.inner.lock();
        let idx = Self::head_index(&p, pa, "put");
        let m = p.mem.at(idx);
        let c = m.refcount.load(Relaxed);
        assert!(
            c != 0,
            "hyp pool bug: refcount underflow (double free) on {pa:?}"
        );
        m.refcount.store(c - 1, Relaxed);
        if c == 1 {
            let order = m.order.load(Relaxed);
            assert!(
                order <= MAX_ORDER,
                "hyp pool bug: put of non-head page {pa:?}"
            );
            p.attach(plat, idx, order);
        }
    }

    /// Turns an allocated block of order `k` (refcount 1) into `2^k`
    /// independent order-0 pages, each with refcount 1.
    ///
    /// # Panics
    /// If `pa` is not the head of an allocated, unshared block (a bug).
    pub fn split(&self, pa: Pa) {
        let p = self.inner.lock();
        let idx = Self::head_index(&p, pa, "split");
        let m = p.mem.at(idx);
        let order = m.order.load(Relaxed);
        assert!(
            m.refcount.load(Relaxed) == 1 && order <= MAX_ORDER,
            "hyp pool bug: split of {pa:?}, not an allocated unshared block head"
        );
        for i in idx..idx + (1usize << order) {
            let t = p.mem.at(i);
            t.order.store(0, Relaxed);
            t.refcount.store(1, Relaxed);
        }
    }

    /// Checks the free lists against the metadata (tests): every listed
    /// block is free, in range, aligned and of its list's order, and the
    /// counts add up. Returns the number of free pages found.
    ///
    /// # Panics
    /// On any inconsistency.
    pub fn check(&self) -> u64 {
        let p = self.inner.lock();
        let mut total = 0u64;
        for o in 0..=MAX_ORDER {
            let mut i = p.free[o as usize];
            while i != NIL {
                let idx = i as usize;
                let m = p.mem.at(idx);
                assert!(
                    idx >= p.start && idx + (1usize << o) <= p.end,
                    "free block out of range"
                );
                assert_eq!(m.refcount.load(Relaxed), 0, "free block with references");
                assert_eq!(m.order.load(Relaxed), o, "free block in the wrong list");
                assert!(
                    p.mem.pa_of(idx).is_aligned(PAGE_SIZE << o),
                    "unaligned free block"
                );
                total += 1u64 << o;
                i = m.next.load(Relaxed);
            }
        }
        assert_eq!(total, p.free_pages, "free page count mismatch");
        total
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::testutil::FakePlatform;
    use pkvm_pgtable::PtMemory;

    fn pool(pages: u64, reserved: u64) -> (FakePlatform, HypPool) {
        let plat = FakePlatform::new(pages as usize);
        let p = HypPool::new(&plat, plat.memmap(), plat.base(), pages, reserved).unwrap();
        (plat, p)
    }

    #[test]
    fn fresh_pool_coalesces_into_maximal_blocks() {
        let (_plat, p) = pool(1024, 0);
        assert_eq!(p.check(), 1024);
        // 4 MiB base alignment: one order-10 block.
        assert_eq!(p.alloc(10).unwrap(), Pa(0x4000_0000));
        assert_eq!(p.free_pages(), 0);
        assert_eq!(p.alloc(0), Err(PoolError::NoMemory { order: 0 }));
    }

    #[test]
    fn reserved_pages_stay_allocated() {
        let (plat, p) = pool(16, 3);
        assert_eq!(p.check(), 13);
        let m = plat.memmap();
        for i in 0..3 {
            assert_eq!(m.refcount(Pa(0x4000_0000 + i * PAGE_SIZE)), 1);
        }
        // Reserved pages can be released later and coalesce.
        for i in 0..3 {
            p.put(&plat, Pa(0x4000_0000 + i * PAGE_SIZE));
        }
        assert_eq!(p.check(), 16);
        assert_eq!(p.alloc(4).unwrap(), Pa(0x4000_0000));
    }

    #[test]
    fn alloc_splits_and_free_coalesces() {
        let (plat, p) = pool(16, 0);
        let a = p.alloc(0).unwrap();
        assert_eq!(p.check(), 15);
        let b = p.alloc(2).unwrap();
        assert!(b.is_aligned(4 * PAGE_SIZE));
        assert_eq!(p.check(), 11);
        p.put(&plat, a);
        p.put(&plat, b);
        assert_eq!(p.check(), 16);
        assert_eq!(p.alloc(4).unwrap(), plat.base());
    }

    #[test]
    fn buddies_outside_the_range_are_ignored() {
        // A range starting at an odd page: page 0 of the block would be
        // outside, so no order-1 block may include it.
        let plat = FakePlatform::new(8);
        let p = HypPool::new(&plat, plat.memmap(), Pa(0x4000_1000), 3, 0).unwrap();
        assert_eq!(p.check(), 3);
        let x = p.alloc(1).unwrap();
        assert_eq!(x, Pa(0x4000_2000));
        assert_eq!(p.alloc(1), Err(PoolError::NoMemory { order: 1 }));
        assert_eq!(p.alloc(0).unwrap(), Pa(0x4000_1000));
    }

    #[test]
    fn freed_blocks_are_zeroed() {
        let (plat, p) = pool(4, 0);
        let a = p.alloc(1).unwrap();
        plat.table(a)[7].store(0xdead, Relaxed);
        plat.table(a + PAGE_SIZE)[511].store(0xbeef, Relaxed);
        p.put(&plat, a);
        let b = p.alloc(1).unwrap();
        assert_eq!(b, a);
        assert_eq!(plat.table(b)[7].load(Relaxed), 0);
        assert_eq!(plat.table(b + PAGE_SIZE)[511].load(Relaxed), 0);
    }

    #[test]
    fn split_block_pages_are_freed_independently() {
        let (plat, p) = pool(8, 0);
        let a = p.alloc(3).unwrap();
        p.split(a);
        for i in 0..8 {
            assert_eq!(plat.memmap().refcount(a + i * PAGE_SIZE), 1);
        }
        p.put(&plat, a + 3 * PAGE_SIZE);
        assert_eq!(p.check(), 1);
        assert_eq!(p.alloc(0).unwrap(), a + 3 * PAGE_SIZE);
        for i in 0..8 {
            p.put(&plat, a + i * PAGE_SIZE);
        }
        assert_eq!(p.check(), 8);
        assert_eq!(p.alloc(3).unwrap(), a);
    }

    #[test]
    fn get_and_put_keep_the_block_until_the_last_reference() {
        let (plat, p) = pool(2, 0);
        let a = p.alloc(0).unwrap();
        p.get(a);
        p.put(&plat, a);
        assert_eq!(p.check(), 1);
        p.put(&plat, a);
        assert_eq!(p.check(), 2);
    }

    #[test]
    #[should_panic(expected = "refcount underflow")]
    fn double_free_is_a_fatal_bug() {
        let (plat, p) = pool(2, 0);
        let a = p.alloc(0).unwrap();
        p.put(&plat, a);
        p.put(&plat, a);
    }

    #[test]
    #[should_panic(expected = "refcount overflow")]
    fn refcount_overflow_is_a_fatal_bug() {
        let (_plat, p) = pool(2, 0);
        let a = p.alloc(0).unwrap();
        for _ in 0..u16::MAX {
            p.get(a);
        }
    }

    #[test]
    #[should_panic(expected = "get of free page")]
    fn get_of_a_free_page_is_a_fatal_bug() {
        let (plat, p) = pool(2, 0);
        let a = p.alloc(0).unwrap();
        p.put(&plat, a);
        p.get(a);
    }

    #[test]
    fn bad_orders_and_ranges_are_errors() {
        let (plat, p) = pool(2, 0);
        assert_eq!(p.alloc(11), Err(PoolError::BadOrder { order: 11 }));
        assert!(HypPool::new(&plat, plat.memmap(), plat.base(), 3, 0).is_err());
        assert!(HypPool::new(&plat, plat.memmap(), Pa(0x4000_0800), 1, 0).is_err());
        assert!(HypPool::new(&plat, plat.memmap(), plat.base(), 1, 2).is_err());
    }

    #[test]
    fn injected_failure_fails_exactly_once() {
        let (_plat, p) = pool(8, 0);
        p.inject_alloc_failure(1);
        assert!(p.alloc(0).is_ok());
        assert_eq!(p.alloc(0), Err(PoolError::NoMemory { order: 0 }));
        assert!(p.alloc(0).is_ok());
        assert!(!p.clear_injected_failure());
        assert!(!p.is_locked());
    }
}
