//! Deterministic interleavings of a shared walk with another writer.
//!
//! A shared walk reads an entry, decides, and publishes its update with a
//! compare-exchange against what it read. Between the read and the
//! compare-exchange it calls out to its environment (cache maintenance,
//! the page cache): these tests use those calls as the point where another
//! CPU writes the same entry, so a walker that stores instead of
//! compare-exchanging clobbers that write every time, not only when a
//! stress test happens to hit the window.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use common::*;
use pkvm_arch::pte::{s2, S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa};
use pkvm_pgtable::{MapFlags, PageCache, PageTable, PtError, PtMemory, Stage2, TlbOps};

const PAGE: u64 = 4096;
const G2M: u64 = 2 << 20;
const FEAT: S2Features = S2Features { fwb: false };

/// A one-shot action run by a hook.
type Hook<'a> = Mutex<Option<Box<dyn FnOnce() + 'a>>>;

fn fire(hook: &Hook<'_>) {
    if let Some(f) = hook.lock().unwrap().take() {
        f();
    }
}

/// TLB/cache maintenance that asks for data-cache cleaning and runs a
/// one-shot hook on the first clean: the walker has read the entry and
/// not yet written it.
struct HookTlb<'a> {
    on_clean: Hook<'a>,
}

impl TlbOps for HookTlb<'_> {
    fn tlbi_leaf(&self, _addr: u64, _level: Level) {}
    fn tlbi_leaf_local(&self, _addr: u64, _level: Level) {}
    fn tlbi_range(&self, _start: u64, _end: u64) {}
    fn tlbi_all(&self) {}
    fn dcache_clean_poc(&self, _pa: Pa, _size: u64) {
        fire(&self.on_clean);
    }
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {}
    fn needs_dcache_maintenance(&self) -> bool {
        true
    }
}

/// A page cache that runs a one-shot hook after handing out a page.
struct HookCache<'a> {
    inner: TestCache,
    on_alloc: Hook<'a>,
}

impl PageCache for HookCache<'_> {
    fn alloc_table(&mut self) -> Option<Pa> {
        let pa = self.inner.alloc_table();
        fire(&self.on_alloc);
        pa
    }
    fn free_table(&mut self, pa: Pa) {
        self.inner.free_table(pa)
    }
}

/// The entry at `level` on the walk to `ipa` (every level above must be a
/// table).
fn slot<'m>(mem: &'m HeapMem, pt: &PageTable<Stage2>, ipa: u64, level: Level) -> &'m AtomicU64 {
    let geo = pt.geometry();
    let g = Granule::Size4K;
    let span = g.level_size(geo.start_level) * 512;
    let mut table = Pa(pt.root().0 + (ipa / span) * PAGE);
    let mut l = geo.start_level;
    loop {
        let e = &mem.table(table)[g.index(ipa, l)];
        if l == level {
            return e;
        }
        let v = S2Pte(e.load(Ordering::Relaxed));
        assert!(v.is_table(l), "no table at level {} for {ipa:#x}", l.0);
        table = v.oa();
        l = Level(l.0 + 1);
    }
}

struct Fixture {
    mem: HeapMem,
    pt: PageTable<Stage2>,
}

/// A table with IPA `[0, 2M)` mapped with pages (so the level-1, -2 and -3
/// tables for the first 2 MiB exist) and `[4M, 6M)` as one block.
fn fixture() -> (Fixture, TestCache) {
    let mem = HeapMem::new(64);
    let mut cache = TestCache::new(16, 48);
    let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();
    let mut pt = PageTable::new(Pa(MEM_BASE), geo, FEAT);
    let env = Env {
        mem: &mem,
        tlb: NoTlb,
    };
    let force = MapFlags::FORCE_PAGE;
    pt.map(
        &env,
        Ipa(0),
        PAGE,
        Pa(1 << 30),
        S2Prot::RW,
        force,
        &mut cache,
    )
    .unwrap();
    let block = MapFlags::NONE;
    pt.map(
        &env,
        Ipa(2 * G2M),
        G2M,
        Pa(3 << 30),
        S2Prot::RW,
        block,
        &mut cache,
    )
    .unwrap();
    (Fixture { mem, pt }, cache)
}

#[test]
fn the_one_page_fast_path_does_not_overwrite_an_entry_changed_after_its_read() {
    let (f, cache) = fixture();
    let target = slot(&f.mem, &f.pt, PAGE, Level(3));
    let l3 = S2Pte(slot(&f.mem, &f.pt, 0, Level(2)).load(Ordering::Relaxed)).oa();
    let rc = f.mem.refcount(l3).load(Ordering::Relaxed);
    let env = pkvm_pgtable::SplitEnv {
        mem: &f.mem,
        tlb: HookTlb {
            // Another CPU starts a break-before-make on the entry.
            on_clean: Mutex::new(Some(Box::new(|| {
                target.store(s2::INVALID_LOCKED, Ordering::Relaxed)
            }))),
        },
    };
    let mut cache = cache;
    let r = f.pt.shared().map(
        &env,
        Ipa(PAGE),
        PAGE,
        Pa((1 << 30) + PAGE),
        S2Prot::RW,
        MapFlags::FORCE_PAGE,
        &mut cache,
    );
    assert!(env.tlb.on_clean.lock().unwrap().is_none(), "the hook ran");
    assert_eq!(r, Err(PtError::Again), "the walker lost the race");
    assert_eq!(
        S2Pte(target.load(Ordering::Relaxed)),
        S2Pte::LOCKED,
        "the other writer's entry was overwritten"
    );
    assert_eq!(f.mem.refcount(l3).load(Ordering::Relaxed), rc, "refcount");
}

#[test]
fn a_shared_walk_does_not_overwrite_an_entry_changed_after_its_read() {
    let (f, cache) = fixture();
    // A 2 MiB block at [2M, 4M): the walker reads the empty level-2 entry,
    // cleans the range, then publishes the block.
    let target = slot(&f.mem, &f.pt, G2M, Level(2));
    let env = pkvm_pgtable::SplitEnv {
        mem: &f.mem,
        tlb: HookTlb {
            on_clean: Mutex::new(Some(Box::new(|| {
                target.store(s2::INVALID_LOCKED, Ordering::Relaxed)
            }))),
        },
    };
    let mut cache = cache;
    let outstanding = cache.outstanding();
    let r = f.pt.shared().map(
        &env,
        Ipa(G2M),
        G2M,
        Pa(5 << 30),
        S2Prot::RW,
        MapFlags::NONE,
        &mut cache,
    );
    assert!(env.tlb.on_clean.lock().unwrap().is_none(), "the hook ran");
    assert_eq!(r, Err(PtError::Again), "the walker lost the race");
    assert_eq!(
        S2Pte(target.load(Ordering::Relaxed)),
        S2Pte::LOCKED,
        "the other writer's entry was overwritten"
    );
    assert_eq!(cache.outstanding(), outstanding, "no table page kept");
}

#[test]
fn a_shared_break_does_not_overwrite_an_entry_changed_after_its_read() {
    let (f, cache) = fixture();
    // Mapping one page inside the [4M, 6M) block to another PA splits the
    // block: the walker reads it, builds the split table (allocating), then
    // breaks the entry. Meanwhile another CPU relaxes the block's
    // permissions in place.
    let target = slot(&f.mem, &f.pt, 2 * G2M, Level(2));
    let old = target.load(Ordering::Relaxed);
    let relaxed = old & !s2::XN_MASK;
    assert_ne!(relaxed, old, "the block was not executable");
    let mut cache = HookCache {
        inner: cache,
        on_alloc: Mutex::new(Some(Box::new(|| target.store(relaxed, Ordering::Relaxed)))),
    };
    let outstanding = cache.inner.outstanding();
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    let r = f.pt.shared().map(
        &env,
        Ipa(2 * G2M + PAGE),
        PAGE,
        Pa(7 << 30),
        S2Prot::RW,
        MapFlags::NONE,
        &mut cache,
    );
    assert!(cache.on_alloc.lock().unwrap().is_none(), "the hook ran");
    assert_eq!(r, Err(PtError::Again), "the walker lost the race");
    assert_eq!(
        target.load(Ordering::Relaxed),
        relaxed,
        "the other writer's entry was overwritten"
    );
    assert_eq!(cache.inner.outstanding(), outstanding, "split table freed");
    cache.inner.check_all_free_zero(&f.mem);
}
