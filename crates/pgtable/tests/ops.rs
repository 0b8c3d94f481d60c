//! Behaviour of every page-table operation, pinned down on exact descriptors.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use pkvm_arch::pte::{El2Prot, S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa, Va};
use pkvm_pgtable::table::el2_geometry;
use pkvm_pgtable::{El2, MapFlags, PageTable, PtError, PtMemory, Stage2};

const G2M: u64 = 2 << 20;
const G1G: u64 = 1 << 30;
const NOFWB: S2Features = S2Features { fwb: false };

struct Fixture {
    mem: HeapMem,
    cache: TestCache,
}

impl Fixture {
    fn new() -> Self {
        let mem = HeapMem::new(2048);
        // page 0..16 reserved for roots.
        let cache = TestCache::new(16, 2032);
        Fixture { mem, cache }
    }
    fn s2(&self, ipa_bits: u32) -> PageTable<Stage2> {
        let geo = S2Geometry::new(Granule::Size4K, ipa_bits).unwrap();
        PageTable::new(Pa(MEM_BASE), geo, NOFWB)
    }
    /// Every table page's refcount equals its number of non-zero entries.
    fn check_refcounts(&self, pt: &PageTable<Stage2>) {
        let geo = pt.geometry();
        for p in 0..geo.root_pages {
            self.check_table(Pa(pt.root().0 + p as u64 * 4096), geo.start_level);
        }
    }
    fn check_table(&self, table: Pa, level: Level) {
        let entries = self.mem.table(table);
        let mut n = 0;
        for e in entries.iter() {
            let v = e.load(Ordering::Relaxed);
            if v != 0 {
                n += 1;
                if level.0 < 3 && v & 3 == 3 {
                    self.check_table(Pa(v & 0x0000_ffff_ffff_f000), Level(level.0 + 1));
                }
            }
        }
        assert_eq!(
            self.mem.refcount(table).load(Ordering::Relaxed),
            n,
            "refcount of {table:?}"
        );
    }
    fn finish(mut self, pt: PageTable<Stage2>) {
        self.check_refcounts(&pt);
        let env = Env {
            mem: &self.mem,
            tlb: NoTlb,
        };
        let root = pt.destroy(&env, &mut self.cache);
        assert_eq!(root, Pa(MEM_BASE));
        assert_eq!(self.cache.outstanding(), 0, "table pages leaked");
        self.cache.check_all_free_zero(&self.mem);
        assert!(self.mem.is_zero(root));
    }
}

#[test]
fn map_uses_largest_aligned_block_and_exact_descriptor_bytes() {
    let mut f = Fixture::new();
    let mut pt = f.s2(40);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    // 1G + 2M + 4K at an IPA/PA pair aligned for 1G.
    pt.map(
        &env,
        Ipa(G1G),
        G1G + G2M + 4096,
        Pa(0x80_0000_0000),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    let l1 = pt.get_leaf(&env, Ipa(G1G));
    assert_eq!(l1.level, Level(1));
    // Normal WB RW XN block: OA | XN | AF | SH | S2AP | MemAttr | valid.
    assert_eq!(l1.pte, 0x0040_0080_0000_07fd);
    let l2 = pt.get_leaf(&env, Ipa(2 * G1G));
    assert_eq!(l2.level, Level(2));
    assert_eq!(l2.pte, 0x0040_0080_4000_07fd);
    let l3 = pt.get_leaf(&env, Ipa(2 * G1G + G2M));
    assert_eq!(l3.level, Level(3));
    assert_eq!(l3.pte, 0x0040_0080_4020_07ff);
    assert_eq!(pt.get_leaf(&env, Ipa(2 * G1G + G2M + 4096)).pte, 0);
    // Root (level 1, 2 concatenated pages for 40 bits): table descriptors.
    let root_entry = f.mem.table(Pa(MEM_BASE))[2].load(Ordering::Relaxed);
    assert_eq!(root_entry & 3, 3);
    assert_eq!(
        pt.translate(&env, Ipa(2 * G1G + G2M + 0x123)),
        Some((Pa(0x80_4020_0123), S2Prot::RW, Level(3)))
    );
    f.finish(pt);
}

#[test]
fn misaligned_pa_degrades_to_smaller_mappings() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    // IPA 2M aligned but PA only 4K aligned: must use pages.
    pt.map(
        &env,
        Ipa(G2M),
        G2M,
        Pa(0x1000_1000),
        S2Prot::R,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(pt.get_leaf(&env, Ipa(G2M)).level, Level(3));
    assert_eq!(
        pt.translate(&env, Ipa(G2M + 0x5000)).unwrap().0,
        Pa(0x1000_6000)
    );
    f.finish(pt);
}

#[test]
fn force_page_maps_only_level3() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(0),
        G2M,
        Pa(0),
        S2Prot::RWX,
        MapFlags::FORCE_PAGE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(pt.get_leaf(&env, Ipa(0)).level, Level(3));
    assert_eq!(pt.get_leaf(&env, Ipa(G2M - 4096)).level, Level(3));
    f.finish(pt);
}

#[test]
fn remapping_identical_entry_returns_again_and_relax_upgrades() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(0x1000),
        4096,
        Pa(0x5000),
        S2Prot::R,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(
        pt.map(
            &env,
            Ipa(0x1000),
            4096,
            Pa(0x5000),
            S2Prot::RW,
            MapFlags::NONE,
            &mut f.cache
        ),
        Err(PtError::Again)
    );
    pt.relax_perms(&env, Ipa(0x1000), S2Prot::W | S2Prot::X)
        .unwrap();
    assert_eq!(pt.translate(&env, Ipa(0x1000)).unwrap().1, S2Prot::RWX);
    assert_eq!(
        pt.relax_perms(&env, Ipa(0x9000), S2Prot::W),
        Err(PtError::Again)
    );
    assert_eq!(
        pt.map(
            &env,
            Ipa(0x1000),
            4096,
            Pa(0x6000),
            S2Prot::R,
            MapFlags::NO_REPLACE,
            &mut f.cache
        ),
        Err(PtError::AlreadyMapped { addr: 0x1000 })
    );
    f.finish(pt);
}

#[test]
fn mapping_inside_a_block_splits_it_and_keeps_the_rest() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(G1G),
        G1G,
        Pa(G1G),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    pt.map(
        &env,
        Ipa(G1G + 3 * G2M + 0x4000),
        4096,
        Pa(0x7000_0000),
        S2Prot::R,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(
        pt.translate(&env, Ipa(G1G + 3 * G2M + 0x4000)),
        Some((Pa(0x7000_0000), S2Prot::R, Level(3)))
    );
    // Neighbours keep the old mapping at the largest level still possible.
    assert_eq!(
        pt.translate(&env, Ipa(G1G + 3 * G2M + 0x3000)),
        Some((Pa(G1G + 3 * G2M + 0x3000), S2Prot::RW, Level(3)))
    );
    assert_eq!(
        pt.translate(&env, Ipa(G1G + 5 * G2M)),
        Some((Pa(G1G + 5 * G2M), S2Prot::RW, Level(2)))
    );
    assert_eq!(f.cache.allocs, 2);
    f.finish(pt);
}

/// Dirty logging write-protected a block; a write fault maps one page of
/// it writable (shared walk, as the fault path does). The block must be
/// split (the page then relaxed on the guest's retry), not reported as
/// "already mapped": that answer made the guest retry the write forever.
#[test]
fn page_needing_more_than_its_block_splits_the_block() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(G2M),
        G2M,
        Pa(G2M),
        S2Prot::R,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    let page = Ipa(G2M + 0x5000);
    // Same output address, more permission than the block grants.
    let r = pt.shared().map(
        &env,
        page,
        4096,
        Pa(G2M + 0x5000),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    );
    assert_ne!(
        r,
        Ok(()),
        "the page already exists (read-only) after the split"
    );
    assert_eq!(
        pt.get_leaf(&env, page).level,
        Level(3),
        "the write-protected block was not split: a write fault would retry forever"
    );
    pt.relax_perms(&env, page, S2Prot::W).unwrap();
    assert_eq!(pt.translate(&env, page).unwrap().1, S2Prot::RW);
    assert_eq!(pt.translate(&env, Ipa(G2M + 0x6000)).unwrap().1, S2Prot::R);
    // Asking for no more than the block grants still changes nothing.
    let other = Ipa(3 * G2M);
    pt.map(
        &env,
        other,
        G2M,
        Pa(other.0),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    let r = pt.shared().map(
        &env,
        Ipa(other.0 + 0x1000),
        4096,
        Pa(other.0 + 0x1000),
        S2Prot::R,
        MapFlags::NONE,
        &mut f.cache,
    );
    assert_eq!(r, Err(PtError::Again));
    assert_eq!(pt.get_leaf(&env, other).level, Level(2));
    f.finish(pt);
}

#[test]
fn mapping_a_block_over_a_table_collapses_and_frees_it() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(G2M),
        G2M,
        Pa(G2M),
        S2Prot::RW,
        MapFlags::FORCE_PAGE,
        &mut f.cache,
    )
    .unwrap();
    let before = f.cache.outstanding();
    pt.map(
        &env,
        Ipa(G2M),
        G2M,
        Pa(4 * G2M),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(pt.get_leaf(&env, Ipa(G2M)).level, Level(2));
    assert_eq!(
        f.cache.outstanding(),
        before - 1,
        "the level-3 table was freed"
    );
    f.finish(pt);
}

#[test]
fn unmap_frees_empty_tables_and_splits_straddling_blocks() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(0),
        4 * G2M,
        Pa(0),
        S2Prot::RW,
        MapFlags::FORCE_PAGE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(f.cache.outstanding(), 1 + 4);
    pt.unmap(&env, Ipa(0), 4 * G2M, &mut f.cache).unwrap();
    assert_eq!(f.cache.outstanding(), 0, "all tables freed once empty");
    // A 2M block with a 4K hole punched in it.
    pt.map(
        &env,
        Ipa(G2M),
        G2M,
        Pa(G2M),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    pt.unmap(&env, Ipa(G2M + 0x1000), 4096, &mut f.cache)
        .unwrap();
    assert_eq!(pt.translate(&env, Ipa(G2M + 0x1000)), None);
    assert_eq!(pt.translate(&env, Ipa(G2M)).unwrap().0, Pa(G2M));
    assert_eq!(
        pt.translate(&env, Ipa(G2M + 0x2000)).unwrap().0,
        Pa(G2M + 0x2000)
    );
    f.finish(pt);
}

#[test]
fn wrprotect_mkyoung_and_test_clear_young() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(0),
        G2M + 8192,
        Pa(0),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    pt.wrprotect(&env, Ipa(0), G2M + 8192).unwrap();
    assert_eq!(pt.translate(&env, Ipa(0)).unwrap().1, S2Prot::R);
    assert_eq!(pt.translate(&env, Ipa(G2M + 4096)).unwrap().1, S2Prot::R);
    assert!(pt.test_clear_young(&env, Ipa(0), G2M + 8192, true).unwrap());
    assert!(!S2Pte(pt.get_leaf(&env, Ipa(0)).pte).young());
    assert!(!pt
        .test_clear_young(&env, Ipa(0), G2M + 8192, false)
        .unwrap());
    pt.mkyoung(&env, Ipa(G2M)).unwrap();
    assert!(pt.test_clear_young(&env, Ipa(G2M), 4096, false).unwrap());
    assert_eq!(pt.mkyoung(&env, Ipa(0x4000_0000)), Err(PtError::Again));
    f.finish(pt);
}

#[test]
fn split_uses_one_page_per_2m_and_513_per_1g() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(G1G),
        G1G,
        Pa(G1G),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    pt.map(
        &env,
        Ipa(0),
        2 * G2M,
        Pa(0),
        S2Prot::R,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    let before = f.cache.allocs;
    pt.split(&env, Ipa(0), 2 * G2M, &mut f.cache).unwrap();
    assert_eq!(f.cache.allocs - before, 2);
    let before = f.cache.allocs;
    pt.split(&env, Ipa(G1G), G1G, &mut f.cache).unwrap();
    assert_eq!(f.cache.allocs - before, 513);
    for ipa in [G1G, G1G + 0x1234_5000, 2 * G1G - 4096] {
        assert_eq!(
            pt.translate(&env, Ipa(ipa)),
            Some((Pa(ipa), S2Prot::RW, Level(3)))
        );
    }
    assert_eq!(
        pt.translate(&env, Ipa(G2M + 0x3000)),
        Some((Pa(G2M + 0x3000), S2Prot::R, Level(3)))
    );
    f.finish(pt);
}

#[test]
fn split_without_memory_fails_cleanly() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    pt.map(
        &env,
        Ipa(G1G),
        G1G,
        Pa(G1G),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    let out = f.cache.outstanding();
    f.cache.fail_after = Some(100);
    assert_eq!(
        pt.split(&env, Ipa(G1G), G1G, &mut f.cache),
        Err(PtError::NoMemory)
    );
    assert_eq!(f.cache.outstanding(), out, "partial subtree given back");
    assert_eq!(
        pt.get_leaf(&env, Ipa(G1G)).level,
        Level(1),
        "block untouched"
    );
    f.cache.fail_after = None;
    f.finish(pt);
}

#[test]
fn map_without_memory_leaves_table_consistent() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    f.cache.fail_after = Some(3);
    let r = pt.map(
        &env,
        Ipa(0),
        8 * G2M,
        Pa(0x1000),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    );
    assert_eq!(r, Err(PtError::NoMemory));
    f.cache.fail_after = None;
    // What got mapped is exactly right; the rest is unmapped.
    let mut mapped = 0;
    for i in 0..(8 * G2M / 4096) {
        if let Some((pa, _, _)) = pt.translate(&env, Ipa(i * 4096)) {
            assert_eq!(pa, Pa(0x1000 + i * 4096));
            mapped += 1;
        }
    }
    assert_eq!(mapped, 2 * 512);
    f.check_refcounts(&pt);
    f.finish(pt);
}

#[test]
fn annotations_replace_mappings_and_survive_splits() {
    let mut f = Fixture::new();
    let mut pt = f.s2(39);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    let hyp = S2Pte::owner_annotation(1);
    pt.map(
        &env,
        Ipa(0),
        G2M,
        Pa(0),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    pt.annotate(&env, Ipa(0), G2M, hyp, &mut f.cache).unwrap();
    assert_eq!(
        pt.get_leaf(&env, Ipa(0)),
        pkvm_pgtable::Leaf {
            pte: hyp.0,
            level: Level(2)
        }
    );
    // Mapping one page inside the annotated block keeps the others annotated.
    pt.map(
        &env,
        Ipa(0x3000),
        4096,
        Pa(0x3000),
        S2Prot::RW,
        MapFlags::NONE,
        &mut f.cache,
    )
    .unwrap();
    assert_eq!(pt.get_leaf(&env, Ipa(0x2000)).pte, hyp.0);
    assert!(pt.translate(&env, Ipa(0x3000)).is_some());
    // NO_REPLACE refuses to map over an annotation.
    assert_eq!(
        pt.map(
            &env,
            Ipa(0x4000),
            4096,
            Pa(0x4000),
            S2Prot::RW,
            MapFlags::NO_REPLACE,
            &mut f.cache
        ),
        Err(PtError::AlreadyMapped { addr: 0x4000 })
    );
    let d = S2Pte::donation_annotation(0x1001, 0x42).unwrap();
    pt.annotate(&env, Ipa(0x5000), 4096, d, &mut f.cache)
        .unwrap();
    assert_eq!(
        S2Pte(pt.get_leaf(&env, Ipa(0x5000)).pte).annotation(),
        Some(pkvm_arch::pte::Annotation::Donation {
            handle: 0x1001,
            gfn: 0x42
        })
    );
    assert_eq!(
        pt.annotate(&env, Ipa(0), 4096, S2Pte(0), &mut f.cache),
        Err(PtError::InvalidProt)
    );
    pt.unmap(&env, Ipa(0), G2M, &mut f.cache).unwrap();
    assert_eq!(
        f.cache.outstanding(),
        0,
        "emptied level-3 and level-2 tables freed"
    );
    f.finish(pt);
}

#[test]
fn caller_errors_are_typed_never_panics() {
    let mut f = Fixture::new();
    let mut pt = f.s2(32);
    let env = Env {
        mem: &f.mem,
        tlb: NoTlb,
    };
    let c = &mut f.cache;
    assert_eq!(
        pt.map(&env, Ipa(0x1001), 4096, Pa(0), S2Prot::R, MapFlags::NONE, c),
        Err(PtError::Misaligned { value: 0x1001 })
    );
    assert_eq!(
        pt.map(&env, Ipa(0), 4095, Pa(0), S2Prot::R, MapFlags::NONE, c),
        Err(PtError::Misaligned { value: 4095 })
    );
    assert_eq!(
        pt.map(&env, Ipa(0), 4096, Pa(7), S2Prot::R, MapFlags::NONE, c),
        Err(PtError::Misaligned { value: 7 })
    );
    assert_eq!(
        pt.map(
            &env,
            Ipa(1 << 32),
            4096,
            Pa(0),
            S2Prot::R,
            MapFlags::NONE,
            c
        ),
        Err(PtError::OutOfRange {
            addr: 1 << 32,
            size: 4096
        })
    );
    assert_eq!(
        pt.map(
            &env,
            Ipa(!0xfffu64),
            8192,
            Pa(0),
            S2Prot::R,
            MapFlags::NONE,
            c
        ),
        Err(PtError::OutOfRange {
            addr: !0xfffu64,
            size: 8192
        })
    );
    assert_eq!(
        pt.map(
            &env,
            Ipa(0),
            4096,
            Pa(0),
            S2Prot::R | S2Prot::X | S2Prot::DEVICE,
            MapFlags::NONE,
            c
        ),
        Err(PtError::InvalidProt)
    );
    assert_eq!(
        pt.unmap(&env, Ipa(0), 1 << 33, c),
        Err(PtError::OutOfRange {
            addr: 0,
            size: 1 << 33
        })
    );
    assert_eq!(pt.translate(&env, Ipa(u64::MAX)), None);
    assert_eq!(
        pt.relax_perms(&env, Ipa(0), S2Prot::DEVICE),
        Err(PtError::InvalidProt)
    );
    // 32-bit IPA: level 2 start with 4 concatenated root pages; the last page works.
    pt.map(
        &env,
        Ipa((1 << 32) - 4096),
        4096,
        Pa(0x1000),
        S2Prot::R,
        MapFlags::NONE,
        c,
    )
    .unwrap();
    assert!(f.mem.table(Pa(MEM_BASE + 3 * 4096))[511].load(Ordering::Relaxed) != 0);
    f.finish(pt);
}

#[test]
fn el2_stage1_tables_use_the_el2_attribute_format() {
    let mem = HeapMem::new(64);
    let mut cache = TestCache::new(1, 63);
    let env = Env {
        mem: &mem,
        tlb: NoTlb,
    };
    let geo = el2_geometry(48).unwrap();
    assert_eq!(geo.start_level, Level(0));
    let mut pt: PageTable<El2> = PageTable::new(Pa(MEM_BASE), geo, NOFWB);
    pt.map(
        &env,
        Va(0x4008_0000),
        0x8000,
        Pa(0x4008_0000),
        El2Prot::RX,
        MapFlags::NONE,
        &mut cache,
    )
    .unwrap();
    pt.map(
        &env,
        Va(0x0900_0000),
        G2M,
        Pa(0x0900_0000),
        El2Prot::RW | El2Prot::DEVICE,
        MapFlags::NONE,
        &mut cache,
    )
    .unwrap();
    let leaf = pt.get_leaf(&env, Va(0x4008_0000));
    assert_eq!(
        leaf.pte,
        0x4008_0000 | 0b11 | (1 << 2) | (1 << 6) | (1 << 7) | (3 << 8) | (1 << 10)
    );
    assert_eq!(
        pt.translate(&env, Va(0x0900_0010)),
        Some((Pa(0x0900_0010), El2Prot::RW | El2Prot::DEVICE, Level(2)))
    );
    assert_eq!(
        pt.map(
            &env,
            Va(0),
            4096,
            Pa(0),
            El2Prot::RW | El2Prot::X,
            MapFlags::NONE,
            &mut cache
        ),
        Err(PtError::InvalidProt),
        "W^X enforced at EL2"
    );
    pt.unmap(&env, Va(0x4008_0000), 0x8000, &mut cache).unwrap();
    assert_eq!(pt.translate(&env, Va(0x4008_0000)), None);
    pt.destroy(&env, &mut cache);
    assert_eq!(cache.outstanding(), 0);
}
