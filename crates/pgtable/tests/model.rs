//! Property tests against a reference model, the break-before-make checker,
//! and concurrent shared walks.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use common::*;
use pkvm_arch::pte::{S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa};
use pkvm_pgtable::{MapFlags, PageTable, PtError, PtMemory, Stage2, TlbOps};
use proptest::prelude::*;

const PAGE: u64 = 4096;
const G2M: u64 = 2 << 20;
const G1G: u64 = 1 << 30;
/// The test window: IPA [0, 4 GiB) so 1G blocks are possible.
const WINDOW: u64 = 4 * G1G;

#[derive(Clone, Debug)]
enum Op {
    Map {
        ipa: u64,
        size: u64,
        pa: u64,
        prot: u8,
        force: bool,
    },
    Unmap {
        ipa: u64,
        size: u64,
    },
    Wrprotect {
        ipa: u64,
        size: u64,
    },
    Relax {
        ipa: u64,
        prot: u8,
    },
    Split {
        ipa: u64,
        size: u64,
    },
    Annotate {
        ipa: u64,
        size: u64,
    },
}

fn prot_of(p: u8) -> S2Prot {
    [S2Prot::R, S2Prot::RW, S2Prot::R | S2Prot::X, S2Prot::RWX][(p & 3) as usize]
}

/// Ranges aligned to their granule so blocks and tables both appear.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..WINDOW / PAGE, 1u64..64).prop_map(|(p, n)| (p * PAGE, n * PAGE)),
        (0..WINDOW / G2M, 1u64..4).prop_map(|(p, n)| (p * G2M, n * G2M)),
        (0..WINDOW / G2M, 1u64..600).prop_map(|(p, n)| (p * G2M + 0x3000, n * PAGE)),
        (0..4u64, 1u64..2).prop_map(|(p, n)| (p * G1G, n * G1G)),
    ]
    .prop_map(|(a, s)| (a, s.min(WINDOW - a)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), 0u64..64, any::<u8>(), any::<bool>()).prop_map(|((ipa, size), pa_sel, prot, force)| {
            // PA congruent with the IPA (so blocks can form) or offset by a page.
            let pa = if pa_sel % 2 == 0 { ipa + (pa_sel << 30) } else { ipa + (pa_sel << 30) + PAGE };
            Op::Map { ipa, size, pa, prot, force }
        }),
        2 => range().prop_map(|(ipa, size)| Op::Unmap { ipa, size }),
        1 => range().prop_map(|(ipa, size)| Op::Wrprotect { ipa, size }),
        1 => (0..WINDOW / PAGE, any::<u8>()).prop_map(|(p, prot)| Op::Relax { ipa: p * PAGE, prot }),
        1 => range().prop_map(|(ipa, size)| Op::Split { ipa, size }),
        1 => range().prop_map(|(ipa, size)| Op::Annotate { ipa, size }),
    ]
}

/// The reference model, sampled at probe pages: page -> (pa, prot), or
/// absent when unmapped.
struct Model {
    probes: Vec<u64>,
    map: BTreeMap<u64, (u64, S2Prot)>,
}

impl Model {
    fn in_range(&self, ipa: u64, size: u64) -> impl Iterator<Item = u64> + '_ {
        self.probes
            .iter()
            .copied()
            .filter(move |p| *p >= ipa && *p < ipa + size)
    }
}

fn check_refcounts(mem: &HeapMem, table: Pa, level: Level) -> usize {
    let mut pages = 1;
    let mut n = 0;
    for e in mem.table(table).iter() {
        let v = e.load(Ordering::Relaxed);
        if v != 0 {
            n += 1;
            if level.0 < 3 && v & 3 == 3 {
                pages += check_refcounts(mem, Pa(v & 0x0000_ffff_ffff_f000), Level(level.0 + 1));
            }
        }
    }
    assert_eq!(
        mem.refcount(table).load(Ordering::Relaxed),
        n,
        "refcount of {table:?}"
    );
    pages
}

/// Fails if a translation cached before an operation grants more than the
/// table grants now (different PA, write or exec lost, or unmapped): the
/// operation changed a live entry without invalidating it.
fn check_bbm(tlb: &CheckingTlb, pt: &PageTable<Stage2>, mem: &HeapMem) {
    let env = Env { mem, tlb: NoTlb };
    for (page, (pte, _level)) in tlb.cached.lock().unwrap().iter() {
        let old = S2Pte(*pte);
        let feat = S2Features::default();
        let now = pt.translate(&env, Ipa(*page));
        let stale = match now {
            None => true,
            Some((pa, prot, _)) => {
                let old_pa = old.oa().0
                    + (*page & (pkvm_arch::Granule::Size4K.level_size(_level_of(*_level)) - 1));
                pa.0 != old_pa
                    || (old.prot(feat).contains(S2Prot::W) && !prot.contains(S2Prot::W))
                    || (old.prot(feat).contains(S2Prot::X) && !prot.contains(S2Prot::X))
            }
        };
        assert!(
            !stale,
            "break-before-make violated at IPA {page:#x}: cached {old:?}, table now {now:?}"
        );
    }
}

fn _level_of(l: Level) -> Level {
    l
}

fn run_ops(ops: &[Op], probes: Vec<u64>) {
    let mem = HeapMem::new(8192);
    let mut cache = TestCache::new(16, 8192 - 16);
    let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();
    let mut pt: PageTable<Stage2> = PageTable::new(Pa(MEM_BASE), geo, S2Features::default());
    let mut model = Model {
        probes,
        map: BTreeMap::new(),
    };
    let tlb = OrderTlb::new(&mem, Pa(MEM_BASE), geo, model.probes.clone());
    for op in ops {
        // A CPU uses every probe translation before the operation.
        {
            let env = Env {
                mem: &mem,
                tlb: NoTlb,
            };
            tlb.tlbi_all();
            for &p in &model.probes {
                let leaf = pt.get_leaf(&env, Ipa(p));
                if S2Pte(leaf.pte).is_leaf(leaf.level) {
                    tlb.cached.fill(p, leaf.pte, leaf.level);
                }
            }
        }
        tlb.begin_op();
        let env = Env {
            mem: &mem,
            tlb: &tlb,
        };
        let res = match *op {
            Op::Map {
                ipa,
                size,
                pa,
                prot,
                force,
            } => {
                let flags = if force {
                    MapFlags::FORCE_PAGE
                } else {
                    MapFlags::NONE
                };
                let r = pt.map(
                    &env,
                    Ipa(ipa),
                    size,
                    Pa(pa),
                    prot_of(prot),
                    flags,
                    &mut cache,
                );
                match r {
                    Ok(()) => {
                        let probes: Vec<u64> = model.in_range(ipa, size).collect();
                        for p in probes {
                            model.map.insert(p, (pa + (p - ipa), prot_of(prot)));
                        }
                    }
                    Err(PtError::Again) => {
                        // Stops at the first page already mapped identically
                        // (permissions aside): pages before it are mapped.
                        let probes: Vec<u64> = model.in_range(ipa, size).collect();
                        for p in probes {
                            if let Some((pa2, prot2, _)) = pt.translate(&env, Ipa(p)) {
                                if pa2.0 == pa + (p - ipa) {
                                    model.map.insert(p, (pa2.0, prot2));
                                }
                            }
                        }
                    }
                    Err(e) => panic!("map failed: {e:?}"),
                }
                Ok(())
            }
            Op::Unmap { ipa, size } => {
                let r = pt.unmap(&env, Ipa(ipa), size, &mut cache);
                let probes: Vec<u64> = model.in_range(ipa, size).collect();
                for p in probes {
                    model.map.remove(&p);
                }
                r
            }
            Op::Wrprotect { ipa, size } => {
                let r = pt.wrprotect(&env, Ipa(ipa), size);
                // wrprotect leaves the flush to the caller: flush the range.
                env.tlbi_range(ipa, ipa + size);
                // Pages in the range lose write; so do pages of a block
                // straddling the range, protected whole. The block's extent
                // comes from the table, the permission from the model.
                let probes: Vec<u64> = model.probes.clone();
                for p in probes {
                    let inside = p >= ipa && p < ipa + size;
                    let in_block = pt.translate(&env, Ipa(p)).is_some_and(|(_, _, level)| {
                        let bs = Granule::Size4K.level_size(level);
                        let base = p & !(bs - 1);
                        base < ipa + size && base + bs > ipa
                    });
                    if let Some(m) = model.map.get_mut(&p).filter(|_| inside || in_block) {
                        m.1.remove(S2Prot::W);
                    }
                }
                r
            }
            Op::Relax { ipa, prot } => {
                let p = prot_of(prot);
                match pt.relax_perms(&env, Ipa(ipa), p) {
                    Ok(()) => {
                        let (_, _, level) = pt.translate(&env, Ipa(ipa)).unwrap();
                        let bs = Granule::Size4K.level_size(level);
                        let base = ipa & !(bs - 1);
                        let probes: Vec<u64> = model.in_range(base, bs).collect();
                        for q in probes {
                            if let Some(m) = model.map.get_mut(&q) {
                                m.1 |= p;
                            }
                        }
                        Ok(())
                    }
                    Err(PtError::Again) => {
                        assert!(pt.translate(&env, Ipa(ipa)).is_none());
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Split { ipa, size } => pt.split(&env, Ipa(ipa), size, &mut cache),
            Op::Annotate { ipa, size } => {
                let r = pt.annotate(&env, Ipa(ipa), size, S2Pte::owner_annotation(3), &mut cache);
                let probes: Vec<u64> = model.in_range(ipa, size).collect();
                for p in probes {
                    model.map.remove(&p);
                }
                r
            }
        };
        res.unwrap_or_else(|e| panic!("{op:?} failed: {e:?}"));
        tlb.end_op(op);
        check_bbm(&tlb.cached, &pt, &mem);
        let env = Env {
            mem: &mem,
            tlb: NoTlb,
        };
        for &p in &model.probes {
            let got = pt.translate(&env, Ipa(p)).map(|(pa, prot, _)| (pa.0, prot));
            let want = model.map.get(&p).copied();
            assert_eq!(got, want, "after {op:?}: IPA {p:#x}");
        }
        let mut pages = 0;
        for r in 0..geo.root_pages {
            pages += check_refcounts(&mem, Pa(MEM_BASE + r as u64 * PAGE), geo.start_level);
        }
        assert_eq!(
            pages - geo.root_pages,
            cache.outstanding(),
            "table pages in the tree vs handed out"
        );
    }
    let env = Env {
        mem: &mem,
        tlb: NoTlb,
    };
    pt.destroy(&env, &mut cache);
    assert_eq!(cache.outstanding(), 0, "no table page leaked");
    cache.check_all_free_zero(&mem);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_agree_with_the_model(
        ops in prop::collection::vec(op(), 1..24),
        probes in prop::collection::btree_set(0..WINDOW / PAGE, 64..128),
    ) {
        let mut probes: Vec<u64> = probes.into_iter().map(|p| p * PAGE).collect();
        // Probe the edges of every operation's range too.
        for op in &ops {
            let (ipa, size) = match *op {
                Op::Map { ipa, size, .. } | Op::Unmap { ipa, size } | Op::Wrprotect { ipa, size }
                | Op::Split { ipa, size } | Op::Annotate { ipa, size } => (ipa, size),
                Op::Relax { ipa, .. } => (ipa, PAGE),
            };
            for p in [ipa.saturating_sub(PAGE), ipa, ipa + size - PAGE, ipa + size] {
                if p < WINDOW { probes.push(p); }
            }
        }
        probes.sort_unstable();
        probes.dedup();
        run_ops(&ops, probes);
    }
}

#[test]
#[should_panic(expected = "break-before-make violated")]
fn the_bbm_checker_catches_a_remap_without_invalidation() {
    // Sanity check of the checker itself: rewrite a live entry behind the
    // library's back.
    let mem = HeapMem::new(64);
    let mut cache = TestCache::new(16, 48);
    let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();
    let mut pt: PageTable<Stage2> = PageTable::new(Pa(MEM_BASE), geo, S2Features::default());
    let tlb = CheckingTlb::default();
    let env = Env {
        mem: &mem,
        tlb: &tlb,
    };
    pt.map(
        &env,
        Ipa(0x1000),
        PAGE,
        Pa(0x8000),
        S2Prot::RW,
        MapFlags::NONE,
        &mut cache,
    )
    .unwrap();
    let leaf = pt.get_leaf(&env, Ipa(0x1000));
    tlb.fill(0x1000, leaf.pte, leaf.level);
    // Find the level-3 table and overwrite the entry with another PA.
    let l1 = mem.table(Pa(MEM_BASE))[0].load(Ordering::Relaxed) & 0x0000_ffff_ffff_f000;
    let l2 = mem.table(Pa(l1))[0].load(Ordering::Relaxed) & 0x0000_ffff_ffff_f000;
    mem.table(Pa(l2))[1].store(leaf.pte + 0x1000, Ordering::Relaxed);
    check_bbm(&tlb, &pt, &mem);
}

/// A table with IPA `[0, 4M)` mapped as two 2 MiB blocks, watched by a
/// write-order checker probing every 64th page.
fn order_fixture(mem: &HeapMem, cache: &mut TestCache) -> (PageTable<Stage2>, S2Geometry) {
    let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();
    let mut pt: PageTable<Stage2> = PageTable::new(Pa(MEM_BASE), geo, S2Features::default());
    let env = Env { mem, tlb: NoTlb };
    pt.map(
        &env,
        Ipa(0),
        2 * G2M,
        Pa(G1G),
        S2Prot::RW,
        MapFlags::NONE,
        cache,
    )
    .unwrap();
    (pt, geo)
}

#[test]
#[should_panic(expected = "write order violated")]
fn the_write_order_checker_catches_make_before_break() {
    // Sanity check of the checker itself: overwrite a live block with
    // another one, then invalidate (the make-before-break order).
    let mem = HeapMem::new(64);
    let mut cache = TestCache::new(16, 48);
    let (pt, geo) = order_fixture(&mem, &mut cache);
    let tlb = OrderTlb::new(
        &mem,
        Pa(MEM_BASE),
        geo,
        (0..1024).map(|p| p * 64 * PAGE).collect(),
    );
    tlb.begin_op();
    let l1 = mem.table(Pa(MEM_BASE))[0].load(Ordering::Relaxed) & 0x0000_ffff_ffff_f000;
    let entry = &mem.table(Pa(l1))[0];
    entry.store(entry.load(Ordering::Relaxed) + G2M, Ordering::Relaxed);
    tlb.tlbi_leaf(0, Level(2));
    let _ = pt;
}

#[test]
fn replacing_live_entries_breaks_then_invalidates_then_makes() {
    let mem = HeapMem::new(64);
    let mut cache = TestCache::new(16, 48);
    let (mut pt, geo) = order_fixture(&mem, &mut cache);
    let probes: Vec<u64> = (0..1024).map(|p| p * 64 * PAGE).collect();
    let tlb = OrderTlb::new(&mem, Pa(MEM_BASE), geo, probes);
    let env = Env {
        mem: &mem,
        tlb: &tlb,
    };
    let force = MapFlags::FORCE_PAGE;
    // Remap a block to another PA (leaf -> leaf), split a block by mapping
    // one page in it (leaf -> table), collapse the table back (table ->
    // leaf), annotate a live block (leaf -> invalid annotation).
    type Step<'a> = &'a dyn Fn(&mut PageTable<Stage2>, &mut TestCache);
    let steps: [(&str, Step<'_>); 4] = [
        ("remap", &|pt, c| {
            pt.map(
                &env,
                Ipa(0),
                G2M,
                Pa(3 * G1G),
                S2Prot::RW,
                MapFlags::NONE,
                c,
            )
            .unwrap()
        }),
        ("split", &|pt, c| {
            pt.map(&env, Ipa(G2M), PAGE, Pa(5 * G1G), S2Prot::R, force, c)
                .unwrap()
        }),
        ("collapse", &|pt, c| {
            pt.map(
                &env,
                Ipa(G2M),
                G2M,
                Pa(7 * G1G),
                S2Prot::RW,
                MapFlags::NONE,
                c,
            )
            .unwrap()
        }),
        ("annotate", &|pt, c| {
            pt.annotate(&env, Ipa(0), G2M, S2Pte::owner_annotation(3), c)
                .unwrap()
        }),
    ];
    for (what, step) in steps {
        tlb.begin_op();
        step(&mut pt, &mut cache);
        tlb.end_op(&what);
    }
    pt.destroy(
        &Env {
            mem: &mem,
            tlb: NoTlb,
        },
        &mut cache,
    );
    assert_eq!(cache.outstanding(), 0);
}

/// Several threads map and fault overlapping ranges with shared walks; the
/// result equals the single-threaded result.
#[test]
fn concurrent_shared_maps_equal_the_single_threaded_result() {
    const THREADS: usize = 4;
    let ops: Vec<(u64, u64, bool)> = (0..64u64)
        .map(|i| {
            let ipa = (i * 37 % 48) * G2M + (i % 3) * PAGE * 16;
            let size = if i % 4 == 0 { G2M } else { PAGE * (1 + i % 40) };
            (ipa, size, i % 5 == 0)
        })
        .collect();
    let pa_of = |ipa: u64| ipa + (8 << 30);
    let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();

    // Single-threaded reference: same operations, retrying Again on the
    // first page that already exists by mapping page by page.
    let mem1 = HeapMem::new(4096);
    let mut cache1 = TestCache::new(16, 4000);
    let mut pt1: PageTable<Stage2> = PageTable::new(Pa(MEM_BASE), geo, S2Features::default());
    let apply = |pt: &PageTable<Stage2>,
                 env: &Env<'_, NoTlb>,
                 cache: &mut TestCache,
                 (ipa, size, force): (u64, u64, bool)| {
        let flags = if force {
            MapFlags::FORCE_PAGE
        } else {
            MapFlags::NONE
        };
        match pt.shared().map(
            env,
            Ipa(ipa),
            size,
            Pa(pa_of(ipa)),
            S2Prot::RW,
            flags,
            cache,
        ) {
            Ok(()) => {}
            Err(PtError::Again) => {
                // Fall back to page granularity, as the fault path would.
                for off in (0..size).step_by(PAGE as usize) {
                    loop {
                        match pt.shared().map(
                            env,
                            Ipa(ipa + off),
                            PAGE,
                            Pa(pa_of(ipa + off)),
                            S2Prot::RW,
                            flags,
                            cache,
                        ) {
                            Ok(()) => break,
                            Err(PtError::Again) => {
                                if pt.translate(env, Ipa(ipa + off)).is_some() {
                                    break;
                                }
                            }
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                }
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    {
        let env = Env {
            mem: &mem1,
            tlb: NoTlb,
        };
        for op in &ops {
            apply(&pt1, &env, &mut cache1, *op);
        }
    }

    let mem = Arc::new(HeapMem::new(8192));
    let pt = Arc::new(PageTable::<Stage2>::new(
        Pa(MEM_BASE),
        geo,
        S2Features::default(),
    ));
    let barrier = Arc::new(Barrier::new(THREADS));
    let caches: Vec<TestCache> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let mem = mem.clone();
                let pt = pt.clone();
                let barrier = barrier.clone();
                let ops = &ops;
                s.spawn(move || {
                    let mut cache = TestCache::new(16 + t * 2000, 2000);
                    let env = Env {
                        mem: &mem,
                        tlb: NoTlb,
                    };
                    barrier.wait();
                    // Each thread runs every op, rotated, so they overlap.
                    for k in 0..ops.len() {
                        apply(&pt, &env, &mut cache, ops[(k + t * 16) % ops.len()]);
                    }
                    cache
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let env = Env {
        mem: &mem,
        tlb: NoTlb,
    };
    let env1 = Env {
        mem: &mem1,
        tlb: NoTlb,
    };
    for page in (0..64 * G2M).step_by(PAGE as usize) {
        assert_eq!(
            pt.translate(&env, Ipa(page)).map(|t| (t.0, t.1)),
            pt1.translate(&env1, Ipa(page)).map(|t| (t.0, t.1)),
            "IPA {page:#x}"
        );
    }
    let mut pages = 0;
    for r in 0..geo.root_pages {
        pages += check_refcounts(&mem, Pa(MEM_BASE + r as u64 * PAGE), geo.start_level);
    }
    let outstanding: usize = caches.iter().map(|c| c.outstanding()).sum();
    assert_eq!(
        pages - geo.root_pages,
        outstanding,
        "no table page lost in races"
    );
    pt1 = {
        let env = Env {
            mem: &mem1,
            tlb: NoTlb,
        };
        pt1.destroy(&env, &mut cache1);
        PageTable::new(Pa(MEM_BASE), geo, S2Features::default())
    };
    let _ = pt1;
    assert_eq!(cache1.outstanding(), 0);
}
