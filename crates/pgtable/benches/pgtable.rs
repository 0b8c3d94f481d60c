//! Page-table benchmarks, each side by side with the same work done by the
//! `aarch64-paging` crate (0.12, stage-2 regime) in the same run, reported
//! as ns per 4K page (criterion's throughput is pages).
//!
//! After the criterion groups, a summary table is printed from criterion's
//! own estimates of this run (the point estimate it reports as `time:`, with
//! its 95% confidence interval), per 4K page, with the project's goals.
//!
//! Both sides get the same setup: table pages from a pool of pre-zeroed
//! pages set up before timing (pkvm-pgtable's `TestCache`, the peer's
//! `PoolTranslation`), no TLB maintenance. "cold cache" variants evict the
//! CPU caches (by streaming through a buffer larger than the last-level
//! cache) before each timed run.

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

/// Maps the whole GiB as 4K pages in one call.
fn map_1g_4k(pt: &mut PageTable<Stage2>, env: &Env<'_, NoTlb>, c: &mut TestCache) {
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
}
fn pk_map_1g_4k(b: &mut Bench, iters: u64) -> Duration {
    timed(b, iters, |_| {}, map_1g_4k)
}
fn pk_map_1g_4k_cold(b: &mut Bench, iters: u64) -> Duration {
    timed(b, iters, |_| evict_caches(), map_1g_4k)
}

/// Size of the buffer [`evict_caches`] streams through: larger than any
/// last-level cache of the machines this runs on.
const EVICT_BYTES: usize = 256 << 20;

/// Evicts the CPU caches (and the TLB's working set) by writing and reading
/// a buffer far larger than the last-level cache.
pub fn evict_caches() {
    use std::sync::OnceLock;
    static BUF: OnceLock<std::sync::Mutex<Vec<u64>>> = OnceLock::new();
    let buf = BUF.get_or_init(|| std::sync::Mutex::new(vec![1u64; EVICT_BYTES / 8]));
    let mut v = buf.lock().unwrap_or_else(|e| e.into_inner());
    let mut sum = 0u64;
    for x in v.iter_mut().step_by(8) {
        *x = x.wrapping_add(1);
        sum = sum.wrapping_add(*x);
    }
    black_box(sum);
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
    goal: f64,
}

fn cases() -> Vec<Case> {
    use peer_aarch64_paging as p;
    vec![
        Case {
            name: "map 1 GiB 4K, one call",
            pkvm: pk_map_1g_4k,
            peer: Some(p::peer_map_1g_4k),
            goal: 5.0,
        },
        Case {
            name: "map 1 GiB 4K, one call, cold cache",
            pkvm: pk_map_1g_4k_cold,
            peer: Some(p::peer_map_1g_4k_cold),
            goal: f64::NAN,
        },
        Case {
            name: "map 4K, one call per page",
            pkvm: pk_map_4k_per_call,
            peer: Some(p::peer_map_4k_per_call),
            goal: 25.0,
        },
        Case {
            name: "map 1 GiB as 2M blocks",
            pkvm: pk_map_1g_2m,
            peer: Some(p::peer_map_1g_2m),
            goal: f64::NAN,
        },
        Case {
            name: "unmap 1 GiB of 4K",
            pkvm: pk_unmap_1g_4k,
            peer: Some(p::peer_unmap_1g_4k),
            goal: 3.0,
        },
        Case {
            name: "wrprotect 1 GiB of 4K",
            pkvm: pk_wrprotect_1g_4k,
            peer: Some(p::peer_wrprotect_1g_4k),
            goal: 2.5,
        },
        Case {
            name: "split 2M blocks -> 4K",
            pkvm: pk_split_1g_2m,
            peer: Some(p::peer_split_1g_2m),
            goal: 8.0,
        },
        Case {
            name: "relax_perms, per call",
            pkvm: pk_relax_perms,
            peer: None,
            goal: 20.0,
        },
        Case {
            name: "test_clear_young 1 GiB",
            pkvm: pk_test_clear_young,
            peer: None,
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

/// Criterion's estimate of one benchmark in this run: the figure it prints
/// as `time:` (the slope of the linear fit when it sampled linearly, else
/// the mean) with its 95% confidence interval, in ns per iteration.
#[derive(Clone, Copy, Debug)]
struct Estimate {
    point: f64,
    lower: f64,
    upper: f64,
}

/// Where criterion keeps its results.
fn criterion_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("CRITERION_HOME") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return std::path::PathBuf::from(d).join("criterion");
    }
    // target/<profile>/deps/<bench binary>
    let exe = std::env::current_exe().expect("current exe");
    let target = exe.ancestors().nth(3).expect("bench binary under target/");
    target.join("criterion")
}

/// Reads the estimate criterion saved for `group`/`function` (its
/// `benchmark.json` names them) under `dir`.
/// Results older than `since` (an earlier run) are ignored.
fn read_estimate(
    dir: &std::path::Path,
    group: &str,
    function: &str,
    since: std::time::SystemTime,
) -> Option<Estimate> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let bench = path.join("new").join("benchmark.json");
        if let Ok(text) = std::fs::read_to_string(&bench) {
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            if v["group_id"] == group && v["function_id"] == function {
                let file = path.join("new").join("estimates.json");
                if std::fs::metadata(&file).ok()?.modified().ok()? < since {
                    return None;
                }
                let est = std::fs::read_to_string(file).ok()?;
                let e: serde_json::Value = serde_json::from_str(&est).ok()?;
                let stat = if e["slope"].is_object() {
                    &e["slope"]
                } else {
                    &e["mean"]
                };
                let ci = &stat["confidence_interval"];
                return Some(Estimate {
                    point: stat["point_estimate"].as_f64()?,
                    lower: ci["lower_bound"].as_f64()?,
                    upper: ci["upper_bound"].as_f64()?,
                });
            }
        }
        if let Some(e) = read_estimate(&path, group, function, since) {
            return Some(e);
        }
    }
    None
}

fn summary(since: std::time::SystemTime) {
    let dir = criterion_dir();
    let per_page = |e: Estimate| {
        format!(
            "{:.2} [{:.2}, {:.2}]",
            e.point / PAGES as f64,
            e.lower / PAGES as f64,
            e.upper / PAGES as f64
        )
    };
    let cell = |case: &Case, who: &str| {
        read_estimate(&dir, case.name, who, since).map_or_else(|| "not run".into(), per_page)
    };
    println!();
    println!(
        "pkvm-pgtable vs aarch64-paging 0.12, ns per 4K page: criterion's estimate of this run \
         [95% confidence interval]"
    );
    println!("| operation | pkvm-pgtable | aarch64-paging | goal |");
    println!("|---|---|---|---|");
    for case in cases() {
        let peer = if case.peer.is_some() {
            cell(&case, "aarch64-paging")
        } else {
            "n/a".into()
        };
        let goal = if case.goal.is_nan() {
            "-".to_string()
        } else {
            format!("<= {:.1}", case.goal)
        };
        println!(
            "| {} | {} | {} | {} |",
            case.name,
            cell(&case, "pkvm-pgtable"),
            peer,
            goal
        );
    }
}

criterion_group!(benches, bench_all);

fn main() {
    let since = std::time::SystemTime::now();
    peer_aarch64_paging::sanity();
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary(since);
}
