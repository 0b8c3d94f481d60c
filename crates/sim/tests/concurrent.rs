//! vCPU threads running while a host thread migrates their pages with
//! correct break-before-make: no lost write, no false coherence report.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use pkvm_arch::pte::{S2Prot, S2Pte};
use pkvm_arch::Level;
use pkvm_pgtable::TlbOps;
use pkvm_sim::{Coherence, Pattern, Phase, SimExit, Workload};

#[test]
fn concurrent_page_moves_with_break_before_make_lose_nothing() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 16);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        for c in 0..2u64 {
            let (m, done) = (&m, &done);
            let ctx = vm.ctx;
            s.spawn(move || {
                let mut cpu = m.cpu(c as usize).unwrap();
                cpu.load(ctx);
                let region = ipa(8 * c);
                cpu.set_program(Box::new(Workload::new(
                    c,
                    [
                        Phase::fill(region, 8 * 4096),
                        Phase::new(region, 8 * 4096, Pattern::Random)
                            .accesses(60_000)
                            .writes(400)
                            .size(0),
                    ],
                )));
                cpu.set_budget(1000);
                loop {
                    match cpu.run() {
                        SimExit::ProgramDone => break,
                        SimExit::Abort { .. } | SimExit::Preempted => std::thread::yield_now(),
                        e => panic!("cpu {c}: {e:?}"),
                    }
                }
                assert!(cpu.stats().verified_reads > 10_000);
                done.store(true, Ordering::SeqCst);
            });
        }
        // The host: move pages around, break-before-make.
        let env = m.env(1);
        let frames = m.host_frames();
        let mut cur = vm.data.clone();
        let mut rng = pkvm_sim::rng::SplitMix64::new(1);
        let mut moves = 0;
        while !done.load(Ordering::SeqCst) || moves < 50 {
            let p = rng.below(16) as usize;
            let new = frames.alloc(0).unwrap();
            {
                let _u = m.update(1);
                set(&m, vm.l3, l3_idx(p), S2Pte::INVALID);
                env.tlbi_leaf(ipa(p as u64).0, Level(3));
                m.mem().copy_page(new, cur[p]).unwrap();
                set(&m, vm.l3, l3_idx(p), leaf(new, 3, S2Prot::RW));
            }
            frames.free(cur[p], 0).unwrap();
            cur[p] = new;
            moves += 1;
            if moves % 16 == 0 {
                std::thread::yield_now();
            }
        }
    });
    let v = m.check();
    assert!(v.is_empty(), "{v:?}");
}
