//! The host's physical page pool: a bitmap over RAM from
//! [`POOL_START`](crate::platform::handoff::POOL_START) to the start of the
//! heap, handing out zeroed, naturally aligned runs of `2^order` frames
//! (4K table pages, 8K concatenated stage-2 roots, 2M blocks), plus a
//! per-frame page reference count for process memory (a page is freed when
//! its last reference goes: the VMA's own, or a pin held by the fault
//! path or a protected mapping).

use core::sync::atomic::{AtomicU32, Ordering};

use pkvm_arch::Pa;
use pkvm_sync::{LockClass, SpinLock};

use crate::platform::phys;

const MAX_FRAMES: usize = 512 * 1024;
const WORDS: usize = MAX_FRAMES / 64;

struct Bitmap {
    base: u64,
    frames: usize,
    free: usize,
    hint: usize,
    used: [u64; WORDS],
}

/// The pool (lock class `HypPool`: innermost).
static POOL: SpinLock<Bitmap> = SpinLock::new(
    Bitmap {
        base: 0,
        frames: 0,
        free: 0,
        hint: 0,
        used: [0; WORDS],
    },
    LockClass::HypPool,
);

/// Page references of process-memory frames (index: frame in the pool).
static REFS: [AtomicU32; MAX_FRAMES] = [const { AtomicU32::new(0) }; MAX_FRAMES];

impl Bitmap {
    fn is_used(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    fn run_free(&self, i: usize, n: usize) -> bool {
        if n >= 64 && i.is_multiple_of(64) && n.is_multiple_of(64) {
            self.used[i / 64..(i + n) / 64].iter().all(|&w| w == 0)
        } else {
            (i..i + n).all(|j| !self.is_used(j))
        }
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

    fn alloc(&mut self, n: usize) -> Option<usize> {
        if n == 1 {
            let words = self.frames.div_ceil(64);
            for k in 0..words {
                let w = (self.hint / 64 + k) % words;
                if self.used[w] != u64::MAX {
                    let i = w * 64 + (!self.used[w]).trailing_zeros() as usize;
                    if i < self.frames {
                        self.set(i, 1, true);
                        self.hint = i;
                        return Some(i);
                    }
                }
            }
            return None;
        }
        // Naturally aligned in physical terms.
        let pfn0 = (self.base >> 12) as usize;
        let mut i = pfn0.next_multiple_of(n) - pfn0;
        while i + n <= self.frames {
            if self.run_free(i, n) {
                self.set(i, n, true);
                return Some(i);
            }
            i += n;
        }
        None
    }
}

/// Covers `[start, end)` (4K aligned). Called once at boot.
pub fn init(start: u64, end: u64) {
    let mut p = POOL.lock();
    p.base = start;
    p.frames = (((end - start) >> 12) as usize).min(MAX_FRAMES);
    p.free = p.frames;
    p.hint = 0;
    p.used = [0; WORDS];
}

/// `2^order` contiguous, naturally aligned, zeroed frames.
pub fn alloc(order: u32) -> Option<Pa> {
    let n = 1usize << order;
    let pa = {
        let mut p = POOL.lock();
        let i = p.alloc(n)?;
        Pa(p.base + (i as u64) * 4096)
    };
    phys::zero(pa, n as u64 * 4096);
    Some(pa)
}

/// Whether the zeroing behind [`alloc`] zeroes (no data of a previous
/// owner reaches the next one): a 2M folio and a 4K frame are filled with
/// a pattern, zeroed as [`alloc`] zeroes them, read back word by word and
/// freed. `false` also when the pool is out of frames.
pub fn zeroing_works() -> bool {
    const PATTERN: [u8; 4096] = [0xa5; 4096];
    [9u32, 0].iter().all(|&order| {
        let Some(pa) = alloc(order) else {
            return false;
        };
        let len = 4096u64 << order;
        for off in (0..len).step_by(PATTERN.len()) {
            phys::write(Pa(pa.0 + off), &PATTERN);
        }
        phys::zero(pa, len);
        let zero = phys::with_slice(pa, len, |s| s.iter().all(|&b| b == 0));
        free(pa, order);
        zero
    })
}

/// Returns `2^order` frames from [`alloc`].
///
/// # Panics
/// On a frame outside the pool or not allocated (an internal bug).
pub fn free(pa: Pa, order: u32) {
    let n = 1usize << order;
    let mut p = POOL.lock();
    assert!(
        pa.0 >= p.base && pa.0.is_multiple_of(4096),
        "free of foreign frame {:#x} (internal bug)",
        pa.0
    );
    let i = ((pa.0 - p.base) >> 12) as usize;
    assert!(
        i + n <= p.frames,
        "free of foreign frame {:#x} (internal bug)",
        pa.0
    );
    p.set(i, n, false);
}

/// Free frames in the pool.
pub fn free_frames() -> usize {
    POOL.lock().free
}

/// The pool's range `[start, end)`.
pub fn range() -> (u64, u64) {
    let p = POOL.lock();
    (p.base, p.base + (p.frames as u64) * 4096)
}

fn refcount(pa: Pa) -> &'static AtomicU32 {
    let base = POOL.lock().base;
    let i = (pa.0.wrapping_sub(base) >> 12) as usize;
    REFS.get(i)
        .unwrap_or_else(|| panic!("page reference on foreign frame {:#x} (internal bug)", pa.0))
}

/// Allocates a process-memory folio of `2^order` frames holding one
/// reference (its owner's).
pub fn alloc_folio(order: u32) -> Option<Pa> {
    let pa = alloc(order)?;
    let prev = refcount(pa).swap(1, Ordering::AcqRel);
    assert_eq!(prev, 0, "fresh folio {:#x} has references", pa.0);
    Some(pa)
}

/// Takes another reference on a folio (its head frame).
pub fn get_folio(pa: Pa) {
    let prev = refcount(pa).fetch_add(1, Ordering::AcqRel);
    assert!(
        prev > 0,
        "reference on free folio {:#x} (internal bug)",
        pa.0
    );
}

/// Drops a reference on a folio of `2^order` frames; the last one frees it.
pub fn put_folio(pa: Pa, order: u32) {
    let prev = refcount(pa).fetch_sub(1, Ordering::AcqRel);
    assert!(
        prev > 0,
        "reference underflow on {:#x} (internal bug)",
        pa.0
    );
    if prev == 1 {
        free(pa, order);
    }
}
