//! The host's page pool: a bitmap over RAM from 0x5000_0000 to the end,
//! handing out zeroed 4 KiB frames and naturally aligned contiguous runs
//! (2 MiB blocks, concatenated stage-2 roots), and a KVM-style per-VM
//! memory cache that is topped up outside the VM lock.

use pkvm_arch::Pa;
use pkvm_pgtable::PageCache;
use pkvm_sync::{LockClass, SpinLock};

use crate::platform::phys;

const MAX_FRAMES: usize = 512 * 1024;
const WORDS: usize = MAX_FRAMES / 64;

/// A frame allocator over one physical range.
pub struct PagePool {
    base: u64,
    frames: usize,
    free: usize,
    hint: usize,
    used: [u64; WORDS],
}

/// The pool (lock class `HypPool`: innermost).
pub static POOL: SpinLock<PagePool> = SpinLock::new(
    PagePool {
        base: 0,
        frames: 0,
        free: 0,
        hint: 0,
        used: [0; WORDS],
    },
    LockClass::HypPool,
);

impl PagePool {
    /// Covers `[start, end)` (4K aligned).
    pub fn init(&mut self, start: u64, end: u64) {
        self.base = start;
        self.frames = (((end - start) >> 12) as usize).min(MAX_FRAMES);
        self.free = self.frames;
        self.hint = 0;
        self.used = [0; WORDS];
    }

    /// Free frames.
    pub fn free_frames(&self) -> usize {
        self.free
    }

    fn is_used(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize, n: usize, used: bool) {
        for j in i..i + n {
            if used {
                self.used[j / 64] |= 1 << (j % 64);
            } else {
                assert!(
                    self.is_used(j),
                    "double free of frame {:#x} (internal bug)",
                    self.base + (j as u64) * 4096
                );
                self.used[j / 64] &= !(1 << (j % 64));
            }
        }
        if used {
            self.free -= n;
        } else {
            self.free += n;
        }
    }

    /// `n` contiguous frames aligned to `n` frames (`n` a power of two).
    pub fn alloc(&mut self, n: usize) -> Option<Pa> {
        if n == 1 {
            for k in 0..self.frames.div_ceil(64) {
                let w = (self.hint / 64 + k) % self.frames.div_ceil(64);
                if self.used[w] != u64::MAX {
                    let bit = (!self.used[w]).trailing_zeros() as usize;
                    let i = w * 64 + bit;
                    if i < self.frames {
                        self.set(i, 1, true);
                        self.hint = i;
                        return Some(Pa(self.base + (i as u64) * 4096));
                    }
                }
            }
            return None;
        }
        let align = n.max(1);
        // Align in physical terms.
        let first =
            ((self.base >> 12) as usize).next_multiple_of(align) - (self.base >> 12) as usize;
        let mut i = first;
        while i + n <= self.frames {
            if (i..i + n).all(|j| !self.is_used(j)) {
                self.set(i, n, true);
                return Some(Pa(self.base + (i as u64) * 4096));
            }
            i += align;
        }
        None
    }

    /// Returns `n` frames starting at `pa`.
    ///
    /// # Panics
    /// On a frame outside the pool or not allocated (an internal bug).
    pub fn free(&mut self, pa: Pa, n: usize) {
        assert!(
            pa.0 >= self.base && pa.0.is_multiple_of(4096),
            "free of foreign frame {:#x}",
            pa.0
        );
        let i = ((pa.0 - self.base) >> 12) as usize;
        assert!(i + n <= self.frames, "free of foreign frame {:#x}", pa.0);
        self.set(i, n, false);
    }
}

/// Takes `n` contiguous, aligned frames from the pool and zeroes them.
pub fn alloc_zeroed(n: usize) -> Option<Pa> {
    let pa = POOL.lock().alloc(n)?;
    phys::zero(pa, n as u64 * 4096);
    Some(pa)
}

/// Returns frames to the pool.
pub fn free(pa: Pa, n: usize) {
    POOL.lock().free(pa, n);
}

/// Free frames in the pool.
pub fn free_frames() -> usize {
    POOL.lock().free_frames()
}

/// A per-VM cache of zeroed table pages (KVM's memcache): topped up from
/// the pool before the VM's MMU lock is taken, drained on destroy.
pub struct MemCache {
    pages: [Pa; MemCache::CAP],
    n: usize,
}

impl MemCache {
    /// Capacity: enough for one fault (levels 1..3) plus a split.
    pub const CAP: usize = 8;
    /// The minimum a fault needs.
    pub const MIN: usize = 4;

    /// An empty cache.
    pub const fn new() -> Self {
        MemCache {
            pages: [Pa(0); MemCache::CAP],
            n: 0,
        }
    }

    /// Fills the cache to at least [`MemCache::MIN`] pages.
    ///
    /// # Errors
    /// `Err(())` when the pool is exhausted.
    #[allow(clippy::result_unit_err)]
    pub fn topup(&mut self) -> Result<(), ()> {
        while self.n < Self::MIN {
            let pa = alloc_zeroed(1).ok_or(())?;
            self.pages[self.n] = pa;
            self.n += 1;
        }
        Ok(())
    }

    /// Returns every cached page to the pool.
    pub fn drain(&mut self) {
        while self.n > 0 {
            self.n -= 1;
            free(self.pages[self.n], 1);
        }
    }
}

impl Default for MemCache {
    fn default() -> Self {
        Self::new()
    }
}

impl PageCache for MemCache {
    fn alloc_table(&mut self) -> Option<Pa> {
        if self.n == 0 {
            return None;
        }
        self.n -= 1;
        Some(self.pages[self.n])
    }
    fn free_table(&mut self, pa: Pa) {
        if self.n < Self::CAP {
            self.pages[self.n] = pa;
            self.n += 1;
        } else {
            free(pa, 1);
        }
    }
}
