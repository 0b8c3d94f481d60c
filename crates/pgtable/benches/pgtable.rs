//! Page-table benchmarks, each side by side with the same work done by the
//! `aarch64-paging` crate (0.12, stage-2 regime) in the same run, reported
//! as ns per 4K page (criterion's throughput is pages).
//!
//! After the criterion groups, a summary table (min of several runs, one
//! core) is printed with the goals.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use pkvm_arch::pte::{S2Features, S2Prot};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Pa};
use pkvm_pgtable::{MapFlags, PageTable, Stage2};

#[path = "../tests/common/mod.rs"]
mod common;
mod peer_aarch64_paging;

use common::{Env, HeapMem, NoTlb, TestCache, MEM_BASE};

const G1G: u64 = 1 << 30;
const G2M: u64 = 2 << 20;
const PAGES: u64 = G1G / 4096;
const GUEST_PA: u64 = 0x80_0000_0000;

struct Bench {
    mem: HeapMem,
    cache: TestCache,
    pt: Option<PageTable<Stage2>>,
}

impl Bench {
    fn new() -> Self {
        let mem = HeapMem::new(1200);
        let cache = TestCache::new(16, 1184);
        let mut b = Bench {
            mem,
            cache,
            pt: None,
        };
        b.reset();
        b
    }
    fn reset(&mut self) {
        if let Some(pt) = self.pt.take() {
            let env = Env {
                mem: &self.mem,
                tlb: NoTlb,
            };
            pt.destroy(&env, &mut self.cache);
        }
        let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();
        self.pt = Some(PageTable::new(Pa(MEM_BASE), geo, S2Features::default()));
    }
    fn run<R>(
        &mut self,
        f: impl FnOnce(&mut PageTable<Stage2>, &Env<'_, NoTlb>, &mut TestCache) -> R,
    ) -> R {
        let env = Env {
            mem: &self.mem,
            tlb: NoTlb,
        };
        f(self.pt.as_mut().unwrap(), &env, &mut self.cache)
    }
    fn map(&mut self, flags: MapFlags, prot: S2Prot) {
        self.run(|pt, env, c| {
            pt.map(env, Ipa(G1G), G1G, Pa(GUEST_PA), prot, flags, c)
                .unwrap()
        });
    }
}

/// Times `op` after `setup`, `iters` times; setup excluded.
fn timed(
    b: &mut Bench,
    iters: u64,
    setup: impl Fn(&mut Bench),
    op: impl Fn(&mut PageTable<Stage2>, &Env<'_, NoTlb>, &mut TestCache),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        b.reset();
        setup(b);
        let env = Env {
            mem: &b.mem,
            tlb: NoTlb,
        };
        let pt = b.pt.as_mut().unwrap();
        let t = Instant::now();
        op(pt, &env, &mut b.cache);
        total += t.elapsed();
    }
    total
}

type PkvmOp = fn(&mut Bench, u64) -> Duration;
type PeerOp = fn(u64) -> Duration;

fn pk_map_1g_4k(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |_| {},
        |pt, env, c| {
            pt.map(
                env,
                Ipa(G1G),
                G1G,
                Pa(GUEST_PA),
                S2Prot::RW,
                MapFlags::FORCE_PAGE,
                c,
            )
            .unwrap()
        },
    )
}
fn pk_map_4k_per_call(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |_| {},
        |pt, env, c| {
            for i in 0..PAGES {
                let off = i * 4096;
                pt.map(
                    env,
                    Ipa(G1G + off),
                    4096,
                    Pa(GUEST_PA + off),
                    S2Prot::RW,
                    MapFlags::NONE,
                    c,
                )
                .unwrap();
            }
        },
    )
}
fn pk_map_1g_2m(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |_| {},
        |pt, env, c| {
            // 2M blocks: the PA is 2M- but not 1G-aligned, so no 1G block forms.
            pt.map(
                env,
                Ipa(G1G),
                G1G,
                Pa(GUEST_PA + G2M),
                S2Prot::RW,
                MapFlags::NONE,
                c,
            )
            .unwrap();
            debug_assert_eq!(pt.get_leaf(env, Ipa(G1G)).level.0, 2);
        },
    )
}
fn pk_unmap_1g_4k(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |b| b.map(MapFlags::FORCE_PAGE, S2Prot::RW),
        |pt, env, c| pt.unmap(env, Ipa(G1G), G1G, c).unwrap(),
    )
}
fn pk_wrprotect_1g_4k(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |b| b.map(MapFlags::FORCE_PAGE, S2Prot::RW),
        |pt, env, _| pt.wrprotect(env, Ipa(G1G), G1G).unwrap(),
    )
}
fn pk_split_1g_2m(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |b| {
            b.run(|pt, env, c| {
                pt.map(
                    env,
                    Ipa(G1G),
                    G1G,
                    Pa(GUEST_PA + G2M),
                    S2Prot::RW,
                    MapFlags::NONE,
                    c,
                )
                .unwrap()
            })
        },
        |pt, env, c| pt.split(env, Ipa(G1G), G1G, c).unwrap(),
    )
}
fn pk_relax_perms(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |b| b.map(MapFlags::FORCE_PAGE, S2Prot::R),
        |pt, env, _| {
            for i in 0..PAGES {
                pt.relax_perms(env, Ipa(G1G + i * 4096), S2Prot::W).unwrap();
            }
        },
    )
}
fn pk_test_clear_young(b: &mut Bench, iters: u64) -> Duration {
    timed(
        b,
        iters,
        |b| b.map(MapFlags::FORCE_PAGE, S2Prot::RW),
        |pt, env, _| {
            black_box(pt.test_clear_young(env, Ipa(G1G), G1G, true).unwrap());
        },
    )
}

struct Case {
    name: &'static str,
    pkvm: PkvmOp,
    peer: Option<PeerOp>,
    linux: f64,
    peer_ref: Option<f64>,
    goal: f64,
}

fn cases() -> Vec<Case> {
    use peer_aarch64_paging as p;
    vec![
        Case {
            name: "map 1 GiB 4K, one call",
            pkvm: pk_map_1g_4k,
            peer: Some(p::peer_map_1g_4k),
            linux: 24.7,
            peer_ref: Some(10.7),
            goal: 5.0,
        },
        Case {
            name: "map 4K, one call per page",
            pkvm: pk_map_4k_per_call,
            peer: Some(p::peer_map_4k_per_call),
            linux: 96.0,
            peer_ref: Some(32.5),
            goal: 25.0,
        },
        Case {
            name: "map 1 GiB as 2M blocks",
            pkvm: pk_map_1g_2m,
            peer: Some(p::peer_map_1g_2m),
            linux: f64::NAN,
            peer_ref: None,
            goal: f64::NAN,
        },
        Case {
            name: "unmap 1 GiB of 4K",
            pkvm: pk_unmap_1g_4k,
            peer: Some(p::peer_unmap_1g_4k),
            linux: 9.1,
            peer_ref: Some(3.1),
            goal: 3.0,
        },
        Case {
            name: "wrprotect 1 GiB of 4K",
            pkvm: pk_wrprotect_1g_4k,
            peer: Some(p::peer_wrprotect_1g_4k),
            linux: 6.5,
            peer_ref: Some(2.9),
            goal: 2.5,
        },
        Case {
            name: "split 2M blocks -> 4K",
            pkvm: pk_split_1g_2m,
            peer: Some(p::peer_split_1g_2m),
            linux: 33.4,
            peer_ref: Some(12.1),
            goal: 8.0,
        },
        Case {
            name: "relax_perms, per call",
            pkvm: pk_relax_perms,
            peer: None,
            linux: 50.6,
            peer_ref: None,
            goal: 20.0,
        },
        Case {
            name: "test_clear_young 1 GiB",
            pkvm: pk_test_clear_young,
            peer: None,
            linux: 8.4,
            peer_ref: None,
            goal: 4.0,
        },
    ]
}

fn bench_all(c: &mut Criterion) {
    let mut b = Bench::new();
    for case in cases() {
        let mut g = c.benchmark_group(case.name);
        g.throughput(Throughput::Elements(PAGES));
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(300));
        g.measurement_time(Duration::from_secs(2));
        g.bench_function(BenchmarkId::new("pkvm-pgtable", "1GiB"), |bn| {
            bn.iter_custom(|i| (case.pkvm)(&mut b, i))
        });
        if let Some(peer) = case.peer {
            g.bench_function(BenchmarkId::new("aarch64-paging", "1GiB"), |bn| {
                bn.iter_custom(peer)
            });
        }
        g.finish();
    }
}

fn summary() {
    let mut b = Bench::new();
    let per_page = |d: Duration| d.as_nanos() as f64 / PAGES as f64;
    println!();
    println!("pkvm-pgtable vs aarch64-paging 0.12, ns per 4K page (min of 5, this run)");
    println!(
        "| operation | pkvm-pgtable | aarch64-paging | goal | (issue: Linux / aarch64-paging) |"
    );
    println!("|---|---|---|---|---|");
    for case in cases() {
        let pk = (0..5)
            .map(|_| per_page((case.pkvm)(&mut b, 1)))
            .fold(f64::INFINITY, f64::min);
        let peer = case
            .peer
            .map(|p| (0..5).map(|_| per_page(p(1))).fold(f64::INFINITY, f64::min));
        let fmt = |v: f64| {
            if v.is_nan() {
                "n/a".to_string()
            } else {
                format!("{v:.2}")
            }
        };
        println!(
            "| {} | {:.3} | {} | {} | {} / {} |",
            case.name,
            pk,
            peer.map(fmt).unwrap_or_else(|| "n/a".into()),
            fmt(case.goal),
            fmt(case.linux),
            case.peer_ref.map(fmt).unwrap_or_else(|| "n/a".into()),
        );
    }
}

criterion_group!(benches, bench_all);

fn main() {
    peer_aarch64_paging::sanity();
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
