//! Concurrency: two vCPUs CPU_ON the same stopped target at the same time.
//! Exactly one wins (SUCCESS), the other gets ALREADY_ON, and the target
//! starts exactly once, at the winner's entry point with the winner's
//! context id.
#![cfg(not(loom))]

mod psci_common;

use std::sync::Barrier;
use std::thread;

use pkvm_arch::smccc::psci as f;
use pkvm_host::psci::{handle_psci, Conduit, PsciCaller, PsciConfig, PsciOutcome};
use pkvm_host::reset::{prepare_to_run, Readiness};
use pkvm_host::vcpu_state::{El1SysRegs, GuestGprs};
use psci_common::TestVm;

const TARGET: usize = 2;
const ROUNDS: usize = 2000;

fn entry(caller: usize) -> u64 {
    0x4000_0000 + 0x1000 * caller as u64
}

fn ctx(caller: usize) -> u64 {
    0xc0de_0000 + caller as u64
}

/// vCPU `caller`'s CPU_ON of `target`, started when both threads are ready.
fn racer(vm: &TestVm, caller: usize, target: usize, go: &Barrier) -> i64 {
    let mut regs = GuestGprs::default();
    regs.x[..4].copy_from_slice(&[
        u64::from(f::CPU_ON_64),
        target as u64,
        entry(caller),
        ctx(caller),
    ]);
    go.wait();
    let out = handle_psci(vm, &PsciCaller::new(caller, Conduit::Hvc), &mut regs).unwrap();
    assert_eq!(out, PsciOutcome::Continue);
    assert_eq!(pkvm_sync::held_classes(), 0);
    regs.x[0] as i64
}

#[test]
fn concurrent_cpu_on_of_one_target_has_exactly_one_winner_whose_entry_is_used() {
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        let vm = TestVm::with_running(PsciConfig::default(), 3, &[0, 1]);
        let go = Barrier::new(2);
        let (a, b) = thread::scope(|s| {
            let ha = s.spawn(|| racer(&vm, 0, TARGET, &go));
            let hb = s.spawn(|| racer(&vm, 1, TARGET, &go));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        let winner = match (a, b) {
            (0, -4) => 0,
            (-4, 0) => 1,
            other => {
                panic!("round {round}: results {other:?}, want one SUCCESS and one ALREADY_ON")
            }
        };
        wins[winner] += 1;
        assert_eq!(vm.kicks(TARGET), 1, "round {round}: target woken once");

        // The target's run loop: exactly one start, at the winner's entry.
        let mut regs = GuestGprs::default();
        let mut sys = El1SysRegs::default();
        let first = prepare_to_run(&vm, TARGET, &mut regs, &mut sys).unwrap();
        let Readiness::Run { reset: Some(start) } = first else {
            panic!("round {round}: target did not start: {first:?}")
        };
        assert_eq!(
            (start.pc, start.context_id),
            (entry(winner), ctx(winner)),
            "round {round}"
        );
        assert_eq!(
            (regs.pc, regs.x[0]),
            (entry(winner), ctx(winner)),
            "round {round}"
        );
        assert_eq!(
            prepare_to_run(&vm, TARGET, &mut regs, &mut sys).unwrap(),
            Readiness::Run { reset: None },
            "round {round}: started twice"
        );
        assert!(vm.power[TARGET].lock().requests().is_empty());
    }
    // Not an assertion on timing: both outcomes are legal, this only shows
    // the race was exercised.
    println!("wins by vCPU 0 / vCPU 1: {wins:?}");
}

#[test]
fn cpu_on_racing_with_the_targets_run_loop_never_loses_the_start() {
    // One vCPU powers the target on while the target's run loop polls;
    // the run loop must see exactly one start with the caller's entry.
    for round in 0..500 {
        let vm = TestVm::with_running(PsciConfig::default(), 2, &[0]);
        let go = Barrier::new(2);
        thread::scope(|s| {
            let on = s.spawn(|| racer(&vm, 0, 1, &go));
            let mut regs = GuestGprs::default();
            let mut sys = El1SysRegs::default();
            let mut starts = Vec::new();
            go.wait();
            loop {
                // Read before polling: once the CPU_ON has returned, the
                // next poll must see its start.
                let caller_done = on.is_finished();
                match prepare_to_run(&vm, 1, &mut regs, &mut sys).unwrap() {
                    Readiness::Sleep(st) => {
                        assert!(!caller_done, "round {round}: start lost, target {st:?}");
                        std::hint::spin_loop();
                    }
                    Readiness::Run { reset: Some(st) } => starts.push(st),
                    Readiness::Run { reset: None } => break,
                }
            }
            assert_eq!(on.join().unwrap(), 0, "round {round}: CPU_ON failed");
            assert_eq!(starts.len(), 1, "round {round}");
            assert_eq!((regs.pc, regs.x[0]), (entry(0), ctx(0)), "round {round}");
        });
    }
}
