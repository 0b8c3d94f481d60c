//! Dirty logging per memslot (KVM's `KVM_GET_DIRTY_LOG`,
//! `KVM_CLEAR_DIRTY_LOG`, `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` and
//! `KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`).
//!
//! - A slot with `MEM_LOG_DIRTY_PAGES` has a [`DirtyBitmap`], one bit per
//!   page. It is installed before the slot's flags change (so no fault can
//!   see a logging slot without its bitmap) and removed after logging stops.
//! - Enabling logging write-protects the slot's stage-2 inside an
//!   invalidation (a fault that looked the slot up before the change
//!   retries), then, with a chunk size set, splits its blocks eagerly.
//!   With manual protect and "initially all set", nothing is protected at
//!   enable time: every bit starts set and each clear protects (and splits)
//!   only what it clears.
//! - A write fault on a logging slot maps one page writable, then sets the
//!   page's bit (after the map: a get that runs in between re-protects the
//!   page and the guest's retried write faults and sets it again). Reads
//!   map read-only and set nothing.
//! - Get (without manual protect) exchanges each bitmap word with zero and
//!   write-protects the pages it took, under the MMU write lock, with one
//!   TLB flush. With manual protect, get only copies and clear does that for
//!   the bits the caller names.
//! - Eager splitting uses the stage-2's split page cache
//!   (`mmu::SplitStash`): pages are allocated outside the MMU lock,
//!   handed in under it, and the cache is freed only with the stage-2.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::{Ipa, PAGE_SIZE};
use pkvm_sync::{LockClass, RwSpinLock};

use crate::memslot::{Memslot, SlotChange, MAX_SLOTS};
use crate::mmu::S2State;
use crate::platform::{HostPlatform, ProcessMemory};
use crate::vm::Vm;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: get does not clear; clear
/// protects.
pub const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: bitmaps start all set and enabling
/// logging protects nothing (needs [`MANUAL_PROTECT_ENABLE`]).
pub const INITIALLY_SET: u64 = 1 << 1;

const G2M: u64 = 2 << 20;
const G1G: u64 = 1 << 30;
/// Table pages needed to split one 1 GiB block into pages.
const PAGES_PER_1G_SPLIT: usize = 513;

/// Why a dirty-log request was refused. Nothing changed. Each maps to the
/// errno KVM returns ([`DirtyLogError::errno`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// Slot id out of range (caller error, `EINVAL`).
    InvalidSlot(u32),
    /// No such slot, or it does not log (caller error, `ENOENT`).
    NotLogging(u32),
    /// The bitmap buffer has the wrong number of words (caller error,
    /// `EINVAL`).
    BitmapSize {
        /// Words the request needs.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// `first_page` not a multiple of 64, or `num_pages` not a multiple of
    /// 64 without reaching the slot's end (caller error, `EINVAL`).
    Misaligned {
        /// First page.
        first_page: u64,
        /// Pages.
        num_pages: u64,
    },
    /// The range leaves the slot (caller error, `EINVAL`).
    OutOfSlot {
        /// First page.
        first_page: u64,
        /// Pages.
        num_pages: u64,
        /// The slot's size in pages.
        npages: u64,
    },
    /// Clear without manual protect enabled (caller error, `EINVAL`).
    NotManualProtect,
    /// Unknown manual-protect flags, or INITIALLY_SET alone (caller error,
    /// `EINVAL`).
    InvalidFlags(u64),
    /// Eager-split chunk size that is not 0 or a block size (caller error,
    /// `EINVAL`).
    InvalidChunkSize(u64),
    /// Chunk size changed while memslots exist (caller error, `EBUSY`).
    Busy,
    /// The VM was torn down (`EIO`).
    Dead,
}

impl DirtyLogError {
    /// The (positive) errno KVM returns for this refusal.
    pub const fn errno(&self) -> i32 {
        match self {
            DirtyLogError::NotLogging(_) => 2,
            DirtyLogError::Busy => 16,
            DirtyLogError::Dead => 5,
            _ => 22,
        }
    }
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogError::InvalidSlot(s) => write!(f, "slot id {s} exceeds {MAX_SLOTS} (EINVAL)"),
            DirtyLogError::NotLogging(s) => {
                write!(
                    f,
                    "slot {s} does not exist or does not log dirty pages (ENOENT)"
                )
            }
            DirtyLogError::BitmapSize { expected, got } => {
                write!(
                    f,
                    "bitmap of {got} words, the range needs {expected} (EINVAL)"
                )
            }
            DirtyLogError::Misaligned {
                first_page,
                num_pages,
            } => write!(
                f,
                "clear range {first_page}+{num_pages}: not 64-page aligned (EINVAL)"
            ),
            DirtyLogError::OutOfSlot {
                first_page,
                num_pages,
                npages,
            } => write!(
                f,
                "clear range {first_page}+{num_pages} leaves the slot of {npages} pages (EINVAL)"
            ),
            DirtyLogError::NotManualProtect => {
                write!(f, "clearing the dirty log needs manual protect (EINVAL)")
            }
            DirtyLogError::InvalidFlags(x) => {
                write!(f, "invalid manual dirty-log protect flags {x:#x} (EINVAL)")
            }
            DirtyLogError::InvalidChunkSize(x) => {
                write!(f, "eager split chunk size {x:#x}: 0, 4K, 2M or 1G (EINVAL)")
            }
            DirtyLogError::Busy => {
                write!(
                    f,
                    "the eager split chunk size cannot change once memslots exist (EBUSY)"
                )
            }
            DirtyLogError::Dead => write!(f, "the VM was torn down (EIO)"),
        }
    }
}

/// One bit per page of a logging slot.
#[derive(Debug)]
pub struct DirtyBitmap {
    npages: u64,
    words: Vec<AtomicU64>,
}

impl DirtyBitmap {
    fn new(npages: u64, set: bool) -> Self {
        let n = npages.div_ceil(64) as usize;
        let words = (0..n)
            .map(|i| {
                let left = npages - i as u64 * 64;
                let v = if !set {
                    0
                } else if left >= 64 {
                    u64::MAX
                } else {
                    (1u64 << left) - 1
                };
                AtomicU64::new(v)
            })
            .collect();
        DirtyBitmap { npages, words }
    }

    /// Words in the bitmap.
    pub fn len_words(&self) -> usize {
        self.words.len()
    }

    fn mark(&self, page: u64) {
        if page < self.npages {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }
}

/// The VM's dirty-logging state: capabilities and the slots' bitmaps.
#[derive(Debug)]
pub(crate) struct DirtyLog {
    manual: AtomicU64,
    chunk: AtomicU64,
    /// Bitmaps by slot id (a leaf lock: taken under the slots or MMU lock,
    /// nothing taken under it).
    maps: RwSpinLock<BTreeMap<u32, Arc<DirtyBitmap>>>,
}

impl DirtyLog {
    pub fn new() -> Self {
        DirtyLog {
            manual: AtomicU64::new(0),
            chunk: AtomicU64::new(0),
            maps: RwSpinLock::new(BTreeMap::new(), LockClass::Leaf),
        }
    }

    fn init_set(&self) -> bool {
        self.manual.load(Ordering::Acquire) == MANUAL_PROTECT_ENABLE | INITIALLY_SET
    }

    fn bitmap(&self, slot: u32) -> Option<Arc<DirtyBitmap>> {
        self.maps.read().get(&slot).cloned()
    }

    /// Called with the slots write lock held, before `change` is applied:
    /// a slot starting to log gets its bitmap now, so a fault that sees the
    /// logging slot always finds it.
    pub fn prepare(&self, change: &SlotChange) {
        let new = match change {
            SlotChange::Create(n) => n,
            SlotChange::FlagsOnly { old, new } | SlotChange::Move { old, new }
                if !old.logging() =>
            {
                new
            }
            _ => return,
        };
        if new.logging() {
            let b = DirtyBitmap::new(new.npages, self.init_set());
            self.maps.write().insert(new.id, Arc::new(b));
        }
    }

    /// After `change` was applied: a slot that stopped logging or went away
    /// loses its bitmap.
    pub fn commit(&self, change: &SlotChange) {
        match change {
            SlotChange::Delete(old) => {
                self.maps.write().remove(&old.id);
            }
            SlotChange::FlagsOnly { old, new } | SlotChange::Move { old, new }
                if old.logging() && !new.logging() =>
            {
                self.maps.write().remove(&old.id);
            }
            _ => {}
        }
    }
}

/// Table pages the split cache holds for one chunk (KVM's
/// `kvm_mmu_split_nr_page_tables`).
pub const fn split_cache_pages(chunk: u64) -> usize {
    (chunk.div_ceil(G1G) + chunk.div_ceil(G2M)) as usize
}

/// The IPA range of pages `[first, first + n)` of `slot`.
fn page_range(slot: &Memslot, first: u64, n: u64) -> (Ipa, Ipa) {
    let s = slot.start().0 + first * PAGE_SIZE;
    (Ipa(s), Ipa(s + n * PAGE_SIZE))
}

impl<P: HostPlatform, M: ProcessMemory> Vm<P, M> {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `flags` is 0 or
    /// [`MANUAL_PROTECT_ENABLE`], optionally with [`INITIALLY_SET`].
    ///
    /// # Errors
    /// [`DirtyLogError::InvalidFlags`].
    pub fn set_manual_dirty_log_protect(&self, flags: u64) -> Result<(), DirtyLogError> {
        let all = MANUAL_PROTECT_ENABLE | INITIALLY_SET;
        if flags & !all != 0 || flags == INITIALLY_SET {
            return Err(DirtyLogError::InvalidFlags(flags));
        }
        self.dirty.manual.store(flags, Ordering::Release);
        Ok(())
    }

    /// `KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`: split blocks eagerly, `bytes`
    /// at a time, when logging starts (or on clear with "initially set");
    /// 0 turns it off. Only while the VM has no memslot.
    ///
    /// # Errors
    /// [`DirtyLogError::InvalidChunkSize`], [`DirtyLogError::Busy`].
    pub fn set_eager_split_chunk_size(&self, bytes: u64) -> Result<(), DirtyLogError> {
        if ![0, PAGE_SIZE, G2M, G1G].contains(&bytes) {
            return Err(DirtyLogError::InvalidChunkSize(bytes));
        }
        let slots = self.slots.write();
        if slots.iter().next().is_some() {
            return Err(DirtyLogError::Busy);
        }
        self.dirty.chunk.store(bytes, Ordering::Release);
        drop(slots);
        Ok(())
    }

    /// The eager split chunk size (0: off).
    pub fn eager_split_chunk_size(&self) -> u64 {
        self.dirty.chunk.load(Ordering::Acquire)
    }

    /// Sets the dirty bit of `ipa` if `slot` logs. Called by the fault path
    /// after it mapped the page writable.
    pub(crate) fn mark_page_dirty(&self, slot: &Memslot, ipa: Ipa) {
        if !slot.logging() || !slot.contains(ipa) {
            return;
        }
        if let Some(b) = self.dirty.bitmap(slot.id) {
            b.mark((ipa.0 - slot.start().0) / PAGE_SIZE);
        }
    }

    /// Validates a slot id and returns the slot and its bitmap.
    fn logging_slot(&self, slot: u32) -> Result<(Memslot, Arc<DirtyBitmap>), DirtyLogError> {
        if slot >= MAX_SLOTS {
            return Err(DirtyLogError::InvalidSlot(slot));
        }
        let s = self
            .slots
            .read()
            .get(slot)
            .copied()
            .filter(Memslot::logging)
            .ok_or(DirtyLogError::NotLogging(slot))?;
        let b = self
            .dirty
            .bitmap(slot)
            .ok_or(DirtyLogError::NotLogging(slot))?;
        Ok((s, b))
    }

    /// `KVM_GET_DIRTY_LOG`: copies slot `slot`'s bitmap into `out` (one bit
    /// per page, `ceil(npages / 64)` words). Without manual protect the
    /// reported bits are cleared and their pages write-protected again.
    ///
    /// # Errors
    /// See [`DirtyLogError`]; nothing changed.
    pub fn get_dirty_log(
        &self,
        slot: u32,
        out: &mut [u64],
        cpu: usize,
    ) -> Result<(), DirtyLogError> {
        let (s, b) = self.logging_slot(slot)?;
        if out.len() != b.len_words() {
            return Err(DirtyLogError::BitmapSize {
                expected: b.len_words(),
                got: out.len(),
            });
        }
        if self.dirty.manual.load(Ordering::Acquire) & MANUAL_PROTECT_ENABLE != 0 {
            for (o, w) in out.iter_mut().zip(&b.words) {
                *o = w.load(Ordering::Acquire);
            }
            return Ok(());
        }
        let mut state = self.mmu.state.write();
        let st = state.as_mut().ok_or(DirtyLogError::Dead)?;
        for (i, (o, w)) in out.iter_mut().zip(&b.words).enumerate() {
            *o = w.swap(0, Ordering::AcqRel);
            self.protect_word(st, &s, i as u64, *o, cpu);
        }
        self.flush_slot(st, &s);
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears, in pages `[first_page, first_page +
    /// num_pages)` of slot `slot`, the bits set in `bits` (bit 0 of word 0
    /// is `first_page`) and write-protects those pages (splitting their
    /// blocks first with "initially set" and a chunk size).
    ///
    /// # Errors
    /// See [`DirtyLogError`]; nothing changed.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        bits: &[u64],
        cpu: usize,
    ) -> Result<(), DirtyLogError> {
        if self.dirty.manual.load(Ordering::Acquire) & MANUAL_PROTECT_ENABLE == 0 {
            return Err(DirtyLogError::NotManualProtect);
        }
        let (s, b) = self.logging_slot(slot)?;
        let npages = s.npages;
        if first_page > npages || num_pages > npages - first_page {
            return Err(DirtyLogError::OutOfSlot {
                first_page,
                num_pages,
                npages,
            });
        }
        if !first_page.is_multiple_of(64)
            || (!num_pages.is_multiple_of(64) && first_page + num_pages != npages)
        {
            return Err(DirtyLogError::Misaligned {
                first_page,
                num_pages,
            });
        }
        let expected = num_pages.div_ceil(64) as usize;
        if bits.len() != expected {
            return Err(DirtyLogError::BitmapSize {
                expected,
                got: bits.len(),
            });
        }
        if num_pages == 0 {
            return Ok(());
        }
        if self.dirty.init_set() {
            let (lo, hi) = page_range(&s, first_page, num_pages);
            let lo = Ipa(lo.align_down(G1G).0.max(s.start().0));
            let hi = Ipa(hi.0.div_ceil(G1G).saturating_mul(G1G).min(s.end().0));
            self.eager_split(lo, hi);
        }
        let mut state = self.mmu.state.write();
        let st = state.as_mut().ok_or(DirtyLogError::Dead)?;
        let w0 = first_page / 64;
        for (i, &m) in bits.iter().enumerate() {
            let left = num_pages - i as u64 * 64;
            let m = if left >= 64 { m } else { m & ((1 << left) - 1) };
            let word = &b.words[(w0 + i as u64) as usize];
            let cleared = word.fetch_and(!m, Ordering::AcqRel) & m;
            self.protect_word(st, &s, w0 + i as u64, cleared, cpu);
        }
        self.flush_slot(st, &s);
        Ok(())
    }

    /// Write-protects the pages of word `w` of `slot` whose bits are in
    /// `mask` (one walk over the span from the lowest to the highest bit).
    /// No TLB flush: the caller flushes once.
    fn protect_word(
        &self,
        st: &mut S2State<M::Pin>,
        slot: &Memslot,
        w: u64,
        mask: u64,
        cpu: usize,
    ) {
        if mask == 0 {
            return;
        }
        let first = w * 64 + mask.trailing_zeros() as u64;
        let last = w * 64 + 63 - mask.leading_zeros() as u64;
        let (s, e) = page_range(slot, first, last + 1 - first);
        match st {
            S2State::Standard(pt) => {
                let env = self.platform.s2_env(self.vmid().unwrap_or(0));
                let r = pt.wrprotect(&env, s, e.0 - s.0);
                debug_assert!(r.is_ok(), "wrprotect inside a memslot failed: {r:?}");
                drop(env);
                self.nested_unmap_all(pt);
            }
            S2State::Protected(_) => self.hyp_wrprotect(s, e, cpu),
        }
    }

    /// One TLB flush over a slot after protecting parts of it.
    fn flush_slot(&self, st: &mut S2State<M::Pin>, slot: &Memslot) {
        if let S2State::Standard(_) = st {
            let env = self.platform.s2_env(self.vmid().unwrap_or(0));
            pkvm_pgtable::TlbOps::tlbi_range(&env, slot.start().0, slot.end().0);
        }
    }

    /// After a memslot change was applied: starts logging (write-protect
    /// inside an invalidation, then eager split) or drops the bitmap of a
    /// slot that stopped logging.
    pub(crate) fn dirty_log_commit(&self, change: &SlotChange, cpu: usize) {
        if let SlotChange::FlagsOnly { old, new } = change {
            if new.logging() && !old.logging() && !self.dirty.init_set() {
                self.mmu.invalidate_begin(new.start(), new.end());
                self.wrprotect_range(new.start(), new.end(), cpu);
                self.mmu.invalidate_end();
                self.eager_split(new.start(), new.end());
            }
        }
        self.dirty.commit(change);
    }

    /// Splits every block in `[start, end)` into pages, one chunk at a time
    /// under the MMU write lock; the split cache is refilled outside the
    /// lock before each chunk (and again if a chunk needed more, e.g. a
    /// 1 GiB block in a small chunk). No-op without a chunk size or for
    /// hypervisor-managed tables.
    pub(crate) fn eager_split(&self, start: Ipa, end: Ipa) {
        let chunk = self.eager_split_chunk_size();
        if chunk == 0 || self.hyp.is_some() {
            return;
        }
        let mut at = start.0;
        let mut want = split_cache_pages(chunk);
        while at < end.0 {
            let next = ((at / chunk) + 1).saturating_mul(chunk).min(end.0);
            let have = match self.mmu.state.read().as_ref() {
                Some(S2State::Standard(s2)) => s2.split.len(),
                _ => return,
            };
            // Allocated outside the lock.
            let fresh: Vec<_> = (have..want)
                .map_while(|_| self.platform.alloc_pages(0))
                .collect();
            let short = have + fresh.len() < want;
            let mut state = self.mmu.state.write();
            let Some(S2State::Standard(s2)) = state.as_mut() else {
                drop(state);
                fresh
                    .into_iter()
                    .for_each(|pa| self.platform.free_pages(pa, 0));
                return;
            };
            s2.split.refill(fresh);
            let env = self.platform.s2_env(self.vmid().unwrap_or(0));
            let crate::mmu::HostS2 { pt, split, .. } = s2;
            match pt.split(&env, Ipa(at), next - at, split) {
                Ok(()) => at = next,
                // The platform is out of memory: blocks stay blocks and
                // split on fault instead.
                Err(pkvm_pgtable::PtError::NoMemory) if short => return,
                // A block bigger than the chunk's estimate (a 1 GiB block
                // in a small chunk): enough for any block next time; blocks
                // already split stay split.
                Err(pkvm_pgtable::PtError::NoMemory) => want = want.max(PAGES_PER_1G_SPLIT),
                Err(e) => {
                    debug_assert!(false, "eager split failed: {e:?}");
                    return;
                }
            }
        }
    }
}
