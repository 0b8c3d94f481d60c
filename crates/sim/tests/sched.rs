//! Deterministic interleaving: the same seed replays the same trace.

mod common;

use common::*;
use pkvm_arch::pte::{S2Prot, S2Pte};
use pkvm_arch::Level;
use pkvm_pgtable::TlbOps;
use pkvm_sim::sched::{Control, Scheduler, TraceEntry};
use pkvm_sim::{Coherence, Pattern, Phase, SimExit, Workload};

/// Two vCPUs on their own halves of an 8-page VM; a host event unmaps a
/// random page with a correct break + TLBI; the abort handler maps it back.
fn schedule(seed: u64) -> (Vec<TraceEntry>, u64) {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 8);
    let mut cpus = [m.cpu(0).unwrap(), m.cpu(1).unwrap()];
    for (i, cpu) in cpus.iter_mut().enumerate() {
        cpu.load(vm.ctx);
        let region = ipa(4 * i as u64);
        cpu.set_program(Box::new(Workload::new(
            seed + i as u64,
            [
                Phase::fill(region, 4 * 4096),
                Phase::new(region, 4 * 4096, Pattern::Random)
                    .accesses(3000)
                    .writes(300),
            ],
        )));
    }
    let [c0, c1] = &mut cpus;
    let mut s = Scheduler::new(seed, 200);
    let handler = |cpu: &mut pkvm_sim::SimCpu, exit: SimExit| {
        if let Some(f) = exit.fault() {
            let page = (f.ipa().0 - BASE_IPA) / 4096;
            let _u = m.update(1);
            set(
                &m,
                vm.l3,
                l3_idx(page as usize),
                leaf(vm.data[page as usize], 3, S2Prot::RW),
            );
        }
        assert!(
            !matches!(exit, SimExit::GuestError(_)),
            "cpu {}: {exit:?}",
            cpu.id()
        );
        Control::Continue
    };
    s.add_cpu(c0, 4, handler);
    s.add_cpu(c1, 4, handler);
    let mut rng = pkvm_sim::rng::SplitMix64::new(seed ^ 0xabc);
    s.add_event("unmap", 1, |_| {
        let page = rng.below(8) as usize;
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(page), S2Pte::INVALID);
        m.env(1).tlbi_leaf(ipa(page as u64).0, Level(3));
        Control::Continue
    });
    let trace = s.run(100_000).to_vec();
    drop(s);
    assert!(m.check().is_empty());
    let aborts = cpus.iter().map(|c| c.stats().exits_abort).sum();
    (trace, aborts)
}

#[test]
fn same_seed_gives_the_same_trace_and_another_seed_does_not() {
    let (a, aborts) = schedule(11);
    let (b, _) = schedule(11);
    assert!(aborts > 0, "the unmap events made the vCPUs fault");
    assert!(a.len() > 20);
    assert_eq!(a, b);
    let (c, _) = schedule(12);
    assert_ne!(a, c);
}
