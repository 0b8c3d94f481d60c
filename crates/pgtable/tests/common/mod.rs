//! Test environments for pkvm-pgtable: heap-backed table memory, a page
//! cache with leak/double-free accounting, and TLB models.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use pkvm_arch::pte::S2Pte;
use pkvm_arch::vtcr::S2Geometry;
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

/// What one probe page's translation last looked like, and what it owes.
#[derive(Clone, Copy, Default)]
struct ProbeState {
    /// Leaf descriptor and level last observed (invalid: zero or not a leaf).
    pte: u64,
    level: u8,
    /// Went from valid to invalid, and no broadcast invalidation covering
    /// the page has been observed since.
    broken: bool,
    /// Lost permissions in place, not yet invalidated.
    restricted: bool,
}

/// The write-order checker: a TLB that, at every invalidation, looks at the
/// translation of each probe page the invalidation covers (walking the
/// live table from its root) and at the end of an operation looks at all
/// of them. It fails when a probe's translation goes from one valid leaf
/// to a different valid leaf without an invalid state followed by a
/// broadcast invalidation covering it in between (make-before-break, or a
/// break whose invalidation came after the make or missed the page).
/// Changes allowed in place: permission bits and the access flag (same
/// output address, level and attributes); a permission restriction must be
/// followed by a covering invalidation before the operation ends. Which
/// changes are allowed is decided from the two descriptors, never from what
/// the table claims. Also keeps the cached-translation model of
/// [`CheckingTlb`] in `cached`.
pub struct OrderTlb<'m> {
    pub cached: CheckingTlb,
    mem: &'m HeapMem,
    root: Pa,
    geo: S2Geometry,
    probes: Vec<u64>,
    state: Mutex<Vec<ProbeState>>,
}

impl<'m> OrderTlb<'m> {
    /// `probes` must be sorted; `root`/`geo` name the table under test.
    pub fn new(mem: &'m HeapMem, root: Pa, geo: S2Geometry, probes: Vec<u64>) -> Self {
        assert!(probes.windows(2).all(|w| w[0] < w[1]), "probes unsorted");
        let state = Mutex::new(vec![ProbeState::default(); probes.len()]);
        OrderTlb {
            cached: CheckingTlb::default(),
            mem,
            root,
            geo,
            probes,
            state,
        }
    }

    /// The leaf a hardware walk of `ipa` reaches now.
    fn leaf(&self, ipa: u64) -> (u64, Level) {
        let g = pkvm_arch::Granule::Size4K;
        let mut level = self.geo.start_level;
        let span = g.level_size(level) * ENTRIES as u64;
        let mut table = Pa(self.root.0 + (ipa / span) * 4096);
        loop {
            let pte = self.mem.table(table)[g.index(ipa, level)].load(Ordering::Acquire);
            if !S2Pte(pte).is_table(level) {
                return (pte, level);
            }
            table = S2Pte(pte).oa();
            level = Level(level.0 + 1);
        }
    }

    /// Starts an operation: the current table is the reference.
    pub fn begin_op(&self) {
        let mut st = self.state.lock().unwrap();
        for (i, &p) in self.probes.iter().enumerate() {
            let (pte, level) = self.leaf(p);
            st[i] = ProbeState {
                pte,
                level: level.0,
                ..ProbeState::default()
            };
        }
    }

    /// Ends an operation: every probe observed, nothing owed.
    pub fn end_op(&self, what: &dyn std::fmt::Debug) {
        self.observe(0, u64::MAX, false);
        let st = self.state.lock().unwrap();
        for (i, s) in st.iter().enumerate() {
            let p = self.probes[i];
            assert!(
                !s.broken,
                "write order violated at IPA {p:#x}: a valid entry was removed without a covering invalidation (after {what:?})"
            );
            assert!(
                !s.restricted,
                "write order violated at IPA {p:#x}: permissions reduced in place without a covering invalidation (after {what:?})"
            );
        }
    }

    /// Observes the probes in `[start, end)`; `covered`: this is a
    /// broadcast invalidation of that range, applied after the observation.
    fn observe(&self, start: u64, end: u64, covered: bool) {
        let mut st = self.state.lock().unwrap();
        let first = self.probes.partition_point(|&p| p < start);
        for i in first..self.probes.len() {
            let p = self.probes[i];
            if p >= end {
                break;
            }
            let (pte, level) = self.leaf(p);
            let s = &mut st[i];
            let (was, is) = (
                S2Pte(s.pte).is_leaf(Level(s.level)),
                S2Pte(pte).is_leaf(level),
            );
            if was && is && (s.pte, s.level) != (pte, level.0) {
                match in_place_change(s.pte, s.level, pte, level.0) {
                    Some(restrict) => s.restricted |= restrict,
                    None => panic!(
                        "write order violated at IPA {p:#x}: valid {:#x} (level {}) became valid {pte:#x} (level {}) without break-before-make",
                        s.pte, s.level, level.0
                    ),
                }
            }
            assert!(
                !(is && s.broken),
                "write order violated at IPA {p:#x}: made valid ({pte:#x}) before the break of {:#x} was invalidated",
                s.pte
            );
            s.broken |= was && !is;
            s.pte = pte;
            s.level = level.0;
            if covered {
                s.broken = false;
                s.restricted = false;
            }
        }
    }
}

/// Whether `old -> new` (both valid leaves) is allowed without
/// break-before-make: `Some(true)` for a permission restriction (needs an
/// invalidation afterwards), `Some(false)` for a relaxation or an
/// access-flag change, `None` otherwise.
fn in_place_change(old: u64, old_level: u8, new: u64, new_level: u8) -> Option<bool> {
    use pkvm_arch::pte::{bits, s2};
    if old_level != new_level || (old ^ new) & !(s2::PERM_MASK | bits::AF) != 0 {
        return None;
    }
    let lost_access = old & !new & (s2::S2AP_R | s2::S2AP_W) != 0;
    let lost_exec = new & !old & s2::XN_MASK != 0;
    Some(lost_access || lost_exec)
}

impl TlbOps for OrderTlb<'_> {
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        let size = pkvm_arch::Granule::Size4K.level_size(level);
        let base = addr & !(size - 1);
        self.observe(base, base + size, true);
        self.cached.tlbi_leaf(addr, level);
    }
    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        // Only enough after a relaxation: observe, discharge nothing.
        let size = pkvm_arch::Granule::Size4K.level_size(level);
        let base = addr & !(size - 1);
        self.observe(base, base + size, false);
        self.cached.tlbi_leaf_local(addr, level);
    }
    fn tlbi_range(&self, start: u64, end: u64) {
        self.observe(start, end, true);
        self.cached.tlbi_range(start, end);
    }
    fn tlbi_all(&self) {
        self.observe(0, u64::MAX, true);
        self.cached.tlbi_all();
    }
    fn dcache_clean_poc(&self, _pa: Pa, _size: u64) {}
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {}
}
