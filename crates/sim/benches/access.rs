//! Raw simulated access throughput: the TLB-hit path (with and without the
//! coherence checker) and the table-walk path.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pkvm_arch::pte::{S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa};
use pkvm_pgtable::{PtMemory, TlbOps};
use pkvm_sim::{Coherence, Machine, Pattern, Phase, SimConfig, SimExit, VmContext, Workload};

const PAGES: u64 = 256;
const BASE: u64 = 0x10_0000;
const ACCESSES: u64 = 100_000;

fn setup(coherence: Coherence) -> (Arc<Machine>, VmContext) {
    let m = Machine::new(SimConfig {
        mem_size: 64 << 20,
        hyp_carveout: 4 << 20,
        ncpus: 1,
        coherence,
        ..SimConfig::default()
    })
    .unwrap();
    let f = m.host_frames();
    let z = |o| f.alloc_zeroed(m.mem(), o).unwrap();
    let (root, l2, l3) = (z(0), z(0), z(0));
    let set = |t: Pa, i: usize, p: S2Pte| {
        m.mem().table(t)[i].store(p.0, std::sync::atomic::Ordering::Release)
    };
    set(root, 0, S2Pte::table(l2));
    set(l2, 0, S2Pte::table(l3));
    for i in 0..PAGES {
        set(
            l3,
            (BASE >> 12) as usize + i as usize,
            S2Pte::leaf(z(0), Level(3), S2Prot::RW, S2Features::default()),
        );
    }
    let ctx = m.vm_context(1, root, S2Geometry::new(Granule::Size4K, 39).unwrap());
    (m, ctx)
}

fn run_accesses(
    c: &mut Criterion,
    name: &str,
    coherence: Coherence,
    pattern: Pattern,
    flush_each_run: bool,
) {
    let (m, ctx) = setup(coherence);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(ctx);
    let env = m.env(1);
    let mut g = c.benchmark_group("sim_access");
    g.throughput(Throughput::Elements(ACCESSES));
    g.bench_function(name, |b| {
        b.iter(|| {
            let region = if flush_each_run {
                PAGES * 4096
            } else {
                64 * 4096
            };
            cpu.set_program(Box::new(Workload::new(
                1,
                [Phase::new(Ipa(BASE), region, pattern)
                    .accesses(ACCESSES)
                    .writes(300)
                    .verify(false)],
            )));
            if flush_each_run {
                env.tlbi_all();
            }
            assert_eq!(cpu.run(), SimExit::ProgramDone);
        })
    });
    g.finish();
}

/// A program replaying precomputed ops: isolates the machine's own cost.
struct Cycle {
    ops: Vec<pkvm_sim::Op>,
    i: usize,
    left: u64,
}

impl pkvm_sim::GuestProgram for Cycle {
    #[inline]
    fn next_op(&mut self, _: &[u64; 31]) -> Option<pkvm_sim::Op> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.i = (self.i + 1) & (self.ops.len() - 1);
        Some(self.ops[self.i])
    }
}

fn hit_path_minimal(c: &mut Criterion, name: &str, coherence: Coherence) {
    let (m, ctx) = setup(coherence);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(ctx);
    let ops: Vec<pkvm_sim::Op> = (0..1024u64)
        .map(|i| {
            let ipa = Ipa(BASE + (i % 64) * 4096 + (i / 64) * 8);
            let mut op = if i % 3 == 0 {
                pkvm_sim::Op::write(ipa, 8)
            } else {
                pkvm_sim::Op::read(ipa, 8)
            };
            if let pkvm_sim::Op::Access { verify, .. } = &mut op {
                *verify = false;
            }
            op
        })
        .collect();
    let mut g = c.benchmark_group("sim_access");
    g.throughput(Throughput::Elements(ACCESSES));
    g.bench_function(name, |b| {
        b.iter(|| {
            cpu.set_program(Box::new(Cycle {
                ops: ops.clone(),
                i: 0,
                left: ACCESSES,
            }));
            assert_eq!(cpu.run(), SimExit::ProgramDone);
        })
    });
    g.finish();
}

fn walk_path(c: &mut Criterion) {
    // The walk path: one full stage-2 walk + permission check per access.
    let (m, ctx) = setup(Coherence::Off);
    let mut g = c.benchmark_group("sim_walk");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mmu_translate_4k", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % PAGES;
            let a = pkvm_sim::Access::read(Ipa(BASE + i * 4096), 8, 1);
            pkvm_sim::mmu::translate(m.mem(), &ctx, &a).unwrap()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    hit_path_minimal(c, "tlb_hit_minimal_check_off", Coherence::Off);
    hit_path_minimal(c, "tlb_hit_minimal_check_every_use", Coherence::EveryUse);
    run_accesses(
        c,
        "tlb_hit_check_off",
        Coherence::Off,
        Pattern::Random,
        false,
    );
    run_accesses(
        c,
        "tlb_hit_check_every_use",
        Coherence::EveryUse,
        Pattern::Random,
        false,
    );
    walk_path(c);
}

criterion_group!(sim, benches);
criterion_main!(sim);
