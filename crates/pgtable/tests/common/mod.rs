//! Test environments for pkvm-pgtable: heap-backed table memory, a page
//! cache with leak/double-free accounting, and TLB models.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use pkvm_arch::{Level, Pa};
use pkvm_pgtable::env::ENTRIES;
use pkvm_pgtable::{PageCache, PtMemory, TlbOps};

pub const MEM_BASE: u64 = 0x4000_0000;

type Page = [AtomicU64; ENTRIES];

/// Table memory: `pages` 4K pages starting at `MEM_BASE`.
pub struct HeapMem {
    pages: Box<[Page]>,
    refs: Box<[AtomicU32]>,
}

impl HeapMem {
    pub fn new(pages: usize) -> Self {
        HeapMem {
            pages: (0..pages)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            refs: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        }
    }
    fn idx(&self, pa: Pa) -> usize {
        assert!(pa.0 >= MEM_BASE && pa.0 & 0xfff == 0, "bad table pa {pa:?}");
        ((pa.0 - MEM_BASE) >> 12) as usize
    }
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }
    pub fn is_zero(&self, pa: Pa) -> bool {
        self.table(pa)
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == 0)
    }
}

impl PtMemory for HeapMem {
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        let i = self.idx(pa);
        &self.pages[i]
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        &self.refs[self.idx(pa)]
    }
}

/// A page cache over a range of `HeapMem` pages that detects leaks and
/// double frees. Pages `[first, first+count)`.
pub struct TestCache {
    free: Vec<Pa>,
    out: HashSet<u64>,
    pub total: usize,
    pub allocs: usize,
    /// Fail after this many more allocations (fault injection).
    pub fail_after: Option<usize>,
}

impl TestCache {
    pub fn new(first_page: usize, count: usize) -> Self {
        let free = (first_page..first_page + count)
            .rev()
            .map(|i| Pa(MEM_BASE + (i as u64) * 4096))
            .collect();
        TestCache {
            free,
            out: HashSet::new(),
            total: count,
            allocs: 0,
            fail_after: None,
        }
    }
    pub fn outstanding(&self) -> usize {
        self.out.len()
    }
    pub fn available(&self) -> usize {
        self.free.len()
    }
    /// Every page handed back must be all-zero.
    pub fn check_all_free_zero(&self, mem: &HeapMem) {
        for pa in &self.free {
            assert!(mem.is_zero(*pa), "page {pa:?} returned non-zero");
            assert_eq!(
                mem.refcount(*pa).load(Ordering::Relaxed),
                0,
                "page {pa:?} refcount"
            );
        }
    }
}

impl PageCache for TestCache {
    fn alloc_table(&mut self) -> Option<Pa> {
        if let Some(n) = self.fail_after.as_mut() {
            if *n == 0 {
                return None;
            }
            *n -= 1;
        }
        let pa = self.free.pop()?;
        assert!(self.out.insert(pa.0), "page {pa:?} handed out twice");
        self.allocs += 1;
        Some(pa)
    }
    fn free_table(&mut self, pa: Pa) {
        assert!(
            self.out.remove(&pa.0),
            "page {pa:?} freed twice or never allocated"
        );
        self.free.push(pa);
    }
}

/// A TLB that does nothing (benchmarks, single-threaded tests).
pub struct NoTlb;

impl TlbOps for NoTlb {
    fn tlbi_leaf(&self, _addr: u64, _level: Level) {}
    fn tlbi_leaf_local(&self, _addr: u64, _level: Level) {}
    fn tlbi_range(&self, _start: u64, _end: u64) {}
    fn tlbi_all(&self) {}
    fn dcache_clean_poc(&self, _pa: Pa, _size: u64) {}
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {}
    fn needs_dcache_maintenance(&self) -> bool {
        false
    }
}

/// Memory plus a TLB in one environment.
pub type Env<'a, T> = pkvm_pgtable::SplitEnv<&'a HeapMem, T>;

/// The break-before-make checker: a model TLB that caches every
/// translation the test "used" and is dropped only by invalidations.
/// After each operation the test calls `check`, which fails if a cached
/// translation grants more than the table now does (different output
/// address, write where the table is read-only, execute where XN, or a
/// mapping that no longer exists) — i.e. a valid entry was replaced without
/// an invalidation of that address in between. A cached entry that is more
/// restrictive (a permission relaxation not yet seen) is allowed.
#[derive(Default)]
pub struct CheckingTlb {
    /// page address -> (descriptor, level) cached.
    pub cached: Mutex<BTreeMap<u64, (u64, Level)>>,
    pub invalidations: AtomicU64,
}

impl CheckingTlb {
    pub fn fill(&self, page: u64, pte: u64, level: Level) {
        self.cached.lock().unwrap().insert(page, (pte, level));
    }
    fn drop_range(&self, start: u64, end: u64) {
        let mut c = self.cached.lock().unwrap();
        let keys: Vec<u64> = c.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            c.remove(&k);
        }
    }
}

impl TlbOps for CheckingTlb {
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let size = pkvm_arch::Granule::Size4K.level_size(level);
        self.drop_range(addr & !(size - 1), (addr & !(size - 1)) + size);
    }
    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        self.tlbi_leaf(addr, level)
    }
    fn tlbi_range(&self, start: u64, end: u64) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.drop_range(start, end);
    }
    fn tlbi_all(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.cached.lock().unwrap().clear();
    }
    fn dcache_clean_poc(&self, _pa: Pa, _size: u64) {}
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {}
}
