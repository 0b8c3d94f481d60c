//! Deterministic replay of a concurrent host run: vCPUs running the real
//! fault pipeline and MMU-notifier events (reclaim, migration, THP split,
//! aging) are interleaved on one thread in an order drawn from a seed. The
//! same seed gives exactly the same trace (every exit, every event result,
//! the fault statistics), so a failing interleaving found by the stress
//! tests can be reproduced step by step by rerunning its seed.

mod common;

use common::{Env, Flavor, RAM};
use pkvm_arch::Hva;
use pkvm_host::VcpuExit;
use pkvm_machine::SimPlatform;
use pkvm_sim::mm::VmaKind;
use pkvm_sim::rng::SplitMix64;
use pkvm_sim::{Pattern, Phase, Workload};

const MB: u64 = 1 << 20;
const VCPUS: usize = 3;
const PER_VCPU: u64 = 4 * MB;

/// Runs `steps` seeded steps and returns the trace.
fn run(flavor: Flavor, seed: u64, steps: usize) -> Vec<String> {
    let env = Env::new(flavor, VCPUS);
    let hva = env.add_slot(0, RAM, PER_VCPU * VCPUS as u64, VmaKind::AnonymousThp, 0);
    let mut runners: Vec<_> = (0..VCPUS)
        .map(|i| {
            let base = RAM + i as u64 * PER_VCPU;
            let w = Workload::new(
                seed ^ (i as u64 + 1),
                [
                    Phase::touch_pages(base, PER_VCPU),
                    Phase::new(base, PER_VCPU, Pattern::Random)
                        .accesses(20_000)
                        .writes(400),
                ],
            );
            let mut r = env.runner(i, Box::new(w));
            // Short slices: the seed decides who runs next every 97 accesses.
            r.be.cpu_mut().set_budget(97);
            r
        })
        .collect();
    let mut done = [false; VCPUS];
    let mut rng = SplitMix64::new(seed);
    let mut trace = Vec::new();
    for step in 0..steps {
        if done.iter().all(|d| *d) {
            break;
        }
        let pick = rng.below(VCPUS as u64 + 2) as usize;
        if pick < VCPUS {
            if done[pick] {
                continue;
            }
            SimPlatform::set_current_cpu(pick);
            let r = &mut runners[pick];
            let exit = r.vcpu.run(&mut r.be);
            match exit {
                VcpuExit::Halted => done[pick] = true,
                VcpuExit::Interrupted => {}
                e => panic!(
                    "{flavor:?} seed {seed} step {step}: vCPU {pick}: {e:?} (guest error {:?})",
                    runners[pick].be.guest_error
                ),
            }
            let s = runners[pick].be.cpu_ref().stats();
            trace.push(format!(
                "{step}: vcpu {pick} {exit:?} accesses {} verified {}",
                s.accesses, s.verified_reads
            ));
        } else {
            SimPlatform::set_current_cpu(pkvm_machine::platform::NOTIFIER_CPU);
            let off = rng.below(PER_VCPU * VCPUS as u64 / 4096) * 4096;
            let chunk = Hva(hva.0 + (off & !(2 * MB - 1)));
            let what = match rng.below(4) {
                0 => format!("reclaim {}", env.mm.reclaim(chunk, 2 * MB)),
                1 => format!("migrate {:?}", env.mm.migrate(Hva(hva.0 + off)).is_ok()),
                2 => format!("split {:?}", env.mm.split_thp(chunk).is_ok()),
                _ => format!("age {}", env.mm.age(chunk, chunk + 2 * MB)),
            };
            trace.push(format!("{step}: event {what} at {off:#x}"));
        }
    }
    assert!(
        done.iter().all(|d| *d),
        "{flavor:?} seed {seed}: the guests did not finish in {steps} steps"
    );
    trace.push(format!("stats {:?}", env.vm.stats().snapshot()));
    drop(runners);
    env.finish();
    trace
}

#[test]
fn the_same_seed_replays_the_same_interleaving_exactly() {
    for flavor in [Flavor::Standard, Flavor::ProtectedShared] {
        let a = run(flavor, 0x5eed_0001, 20_000);
        let b = run(flavor, 0x5eed_0001, 20_000);
        assert!(a.len() > 100, "{flavor:?}: trace too short: {}", a.len());
        assert!(
            a.iter().any(|l| l.contains("event reclaim")),
            "{flavor:?}: no reclaim ran"
        );
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!(
                "{flavor:?}: traces diverge at line {i}: {:?} vs {:?}",
                a[i], b[i]
            );
        }
        assert_eq!(a.len(), b.len());
        let c = run(flavor, 0x5eed_0002, 20_000);
        assert_ne!(
            a, c,
            "{flavor:?}: a different seed gives a different interleaving"
        );
    }
}
