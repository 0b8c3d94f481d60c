//! What the page-table code needs from its environment: memory for table
//! pages, table-page reference counts, TLB and cache maintenance. Real
//! instructions on hardware, a model in the simulator, a checker in tests.

use core::sync::atomic::{AtomicU32, AtomicU64};

use pkvm_arch::{Level, Pa};

/// Number of entries in a 4K table page.
pub const ENTRIES: usize = 512;

/// Access to table pages by physical address.
///
/// Implementations guarantee that every page handed out by the
/// [`PageCache`] used with this memory (and every root page) is readable and
/// writable through [`PtMemory::table`] for as long as `self` lives. The
/// returned references are to atomics: other CPUs (and the MMU) read and
/// change entries concurrently, so nothing ever holds a `&mut` to a live entry.
pub trait PtMemory {
    /// The entries of the table page at `pa` (4K aligned).
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES];
    /// The reference count of the table page at `pa`: the number of non-zero
    /// entries it holds. Zero for a free or empty page.
    fn refcount(&self, pa: Pa) -> &AtomicU32;
}

/// TLB and cache maintenance for one translation context (a VMID for
/// stage-2, the EL2 regime for stage-1). Addresses are input addresses of
/// that regime (IPAs for stage-2, VAs for EL2).
pub trait TlbOps {
    /// Broadcast-invalidate the translation of `addr` cached from a leaf at
    /// `level` (hardware: `tlbi ipas2e1is` + `tlbi vmalle1is`).
    fn tlbi_leaf(&self, addr: u64, level: Level);
    /// Invalidate `addr` on the local CPU only (after a permission relaxation).
    fn tlbi_leaf_local(&self, addr: u64, level: Level);
    /// Invalidate every translation in `[start, end)` (after a table was
    /// removed or a range unmapped).
    fn tlbi_range(&self, start: u64, end: u64);
    /// Invalidate the whole context (hardware: `tlbi vmalls12e1is`).
    fn tlbi_all(&self);
    /// Clean the data cache to the point of coherency for `[pa, pa+size)`,
    /// before the range is mapped cacheable for the first time.
    fn dcache_clean_poc(&self, pa: Pa, size: u64);
    /// Invalidate the instruction cache for `[pa, pa+size)`, before the
    /// range is mapped executable.
    fn icache_inval_pou(&self, pa: Pa, size: u64);
    /// Whether the data cache maintenance above is needed at all (false with
    /// FEAT_S2FWB or in the simulator).
    fn needs_dcache_maintenance(&self) -> bool {
        true
    }
}

/// A caller-filled cache of zeroed pages for table allocations.
///
/// Filled outside any lock; the walker takes pages from it and never
/// allocates on its own.
pub trait PageCache {
    /// A zeroed, 4K-aligned page, or `None` when the cache is dry.
    fn alloc_table(&mut self) -> Option<Pa>;
    /// Returns a table page the walker no longer uses. The page is all-zero
    /// when handed back.
    fn free_table(&mut self, pa: Pa);
}

impl<T: PtMemory + ?Sized> PtMemory for &T {
    #[inline(always)]
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        (**self).table(pa)
    }
    #[inline(always)]
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        (**self).refcount(pa)
    }
}

impl<T: TlbOps + ?Sized> TlbOps for &T {
    #[inline(always)]
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        (**self).tlbi_leaf(addr, level)
    }
    #[inline(always)]
    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        (**self).tlbi_leaf_local(addr, level)
    }
    #[inline(always)]
    fn tlbi_range(&self, start: u64, end: u64) {
        (**self).tlbi_range(start, end)
    }
    #[inline(always)]
    fn tlbi_all(&self) {
        (**self).tlbi_all()
    }
    #[inline(always)]
    fn dcache_clean_poc(&self, pa: Pa, size: u64) {
        (**self).dcache_clean_poc(pa, size)
    }
    #[inline(always)]
    fn icache_inval_pou(&self, pa: Pa, size: u64) {
        (**self).icache_inval_pou(pa, size)
    }
    #[inline(always)]
    fn needs_dcache_maintenance(&self) -> bool {
        (**self).needs_dcache_maintenance()
    }
}

/// An environment assembled from a memory and a TLB implementation: the
/// usual way to pair a platform's table memory with the TLB maintenance of
/// one translation context.
#[derive(Debug)]
pub struct SplitEnv<M, T> {
    /// Table memory.
    pub mem: M,
    /// TLB and cache maintenance.
    pub tlb: T,
}

impl<M: PtMemory, T> PtMemory for SplitEnv<M, T> {
    #[inline(always)]
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        self.mem.table(pa)
    }
    #[inline(always)]
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        self.mem.refcount(pa)
    }
}

impl<M, T: TlbOps> TlbOps for SplitEnv<M, T> {
    #[inline(always)]
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        self.tlb.tlbi_leaf(addr, level)
    }
    #[inline(always)]
    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        self.tlb.tlbi_leaf_local(addr, level)
    }
    #[inline(always)]
    fn tlbi_range(&self, start: u64, end: u64) {
        self.tlb.tlbi_range(start, end)
    }
    #[inline(always)]
    fn tlbi_all(&self) {
        self.tlb.tlbi_all()
    }
    #[inline(always)]
    fn dcache_clean_poc(&self, pa: Pa, size: u64) {
        self.tlb.dcache_clean_poc(pa, size)
    }
    #[inline(always)]
    fn icache_inval_pou(&self, pa: Pa, size: u64) {
        self.tlb.icache_inval_pou(pa, size)
    }
    #[inline(always)]
    fn needs_dcache_maintenance(&self) -> bool {
        self.tlb.needs_dcache_maintenance()
    }
}
