//! Concurrency: several vCPUs make system event calls (`SYSTEM_RESET`,
//! `SYSTEM_RESET2`, `SYSTEM_OFF`) at the same moment. Exactly one of them
//! exits to the VMM, the VMM acting as `pkvm_host::psci` prescribes (wait
//! until the others left their run loops, take the latched event, act on
//! it) restarts the VM exactly once for any number of concurrent resets,
//! and a concurrent `SYSTEM_OFF` always wins over the resets.
#![cfg(not(loom))]

mod psci_common;

use std::sync::Barrier;
use std::thread;

use pkvm_arch::smccc::psci as f;
use pkvm_host::psci::{
    handle_psci, take_system_event, Conduit, PowerState, PsciCaller, PsciConfig, PsciOutcome,
    SystemEvent, SystemEventKind,
};
use pkvm_host::reset::{power_on_vm, BootParams};
use pkvm_host::vcpu_state::GuestGprs;
use psci_common::TestVm;

const ROUNDS: usize = 1500;
const BOOT: BootParams = BootParams {
    entry: 0x4000_0000,
    x0: 0x4800_0000,
    big_endian: false,
};

/// vCPU `caller`'s system event call `func`, made when every vCPU is
/// ready.
fn racer(vm: &TestVm, caller: usize, func: u32, go: &Barrier) -> (PsciOutcome, u64) {
    let mut regs = GuestGprs::default();
    regs.x[0] = u64::from(func);
    go.wait();
    let out = handle_psci(vm, &PsciCaller::new(caller, Conduit::Hvc), &mut regs).unwrap();
    assert_eq!(pkvm_sync::held_classes(), 0);
    (out, regs.x[0])
}

/// The VMM's side once every vCPU thread has left its call (its "run
/// loop"): for each exit, take the latched event and act on it. Returns
/// (restarts, power-offs).
fn vmm(vm: &TestVm, exits: &[SystemEvent]) -> (u32, u32) {
    let (mut restarts, mut offs) = (0, 0);
    for _ in exits {
        match take_system_event(vm).map(|e| e.kind) {
            Some(SystemEventKind::Reset) => {
                power_on_vm(vm, &BOOT).unwrap();
                restarts += 1;
            }
            Some(SystemEventKind::Shutdown) => offs += 1,
            Some(SystemEventKind::Suspend) | None => {}
        }
    }
    (restarts, offs)
}

/// One round: vCPU i calls `calls[i]`; checks the outcome.
fn round(round: usize, calls: &[u32]) {
    let n = calls.len();
    let all: Vec<usize> = (0..n).collect();
    let vm = TestVm::with_running(PsciConfig::default(), n, &all);
    let go = Barrier::new(n);
    let results: Vec<(PsciOutcome, u64)> = thread::scope(|s| {
        let hs: Vec<_> = calls
            .iter()
            .enumerate()
            .map(|(i, &func)| {
                let (vm, go) = (&vm, &go);
                s.spawn(move || racer(vm, i, func, go))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let exits: Vec<SystemEvent> = results
        .iter()
        .filter_map(|(o, _)| match o {
            PsciOutcome::Exit(ev) => Some(*ev),
            _ => None,
        })
        .collect();
    assert_eq!(
        exits.len(),
        1,
        "round {round}: calls {calls:x?}: {} vCPUs exited to the VMM, want exactly 1 ({results:?})",
        exits.len()
    );
    for (i, (o, x0)) in results.iter().enumerate() {
        assert!(
            matches!(o, PsciOutcome::Exit(_) | PsciOutcome::PowerOff),
            "round {round}: vCPU {i}: {o:?}"
        );
        assert_eq!(
            *x0 as i64,
            f::RET_INTERNAL_FAILURE,
            "round {round}: vCPU {i} x0"
        );
    }
    let any_off = calls.contains(&f::SYSTEM_OFF);
    let (restarts, offs) = vmm(&vm, &exits);
    if any_off {
        assert_eq!(
            (restarts, offs),
            (0, 1),
            "round {round}: calls {calls:x?}: a SYSTEM_OFF must win over concurrent resets"
        );
        for i in 0..n {
            assert_eq!(vm.state(i), PowerState::Stopped, "round {round}: vCPU {i}");
        }
    } else {
        assert_eq!(
            (restarts, offs),
            (1, 0),
            "round {round}: calls {calls:x?}: {restarts} restarts, want exactly 1"
        );
        assert_eq!(vm.state(0), PowerState::Running, "round {round}: vCPU 0");
        for i in 1..n {
            assert_eq!(vm.state(i), PowerState::Stopped, "round {round}: vCPU {i}");
        }
    }
    // The latch is empty for the next boot.
    assert_eq!(take_system_event(&vm), None, "round {round}");
}

#[test]
fn concurrent_system_resets_from_all_vcpus_restart_the_vm_exactly_once() {
    for r in 0..ROUNDS {
        let n = 2 + r % 3;
        let calls: Vec<u32> = (0..n)
            .map(|i| {
                if (r + i) % 2 == 0 {
                    f::SYSTEM_RESET
                } else {
                    f::SYSTEM_RESET2_64
                }
            })
            .collect();
        round(r, &calls);
    }
}

#[test]
fn system_off_concurrent_with_resets_always_powers_off_whichever_comes_first() {
    for r in 0..ROUNDS {
        let n = 2 + r % 3;
        let off = r % n;
        let calls: Vec<u32> = (0..n)
            .map(|i| {
                if i == off {
                    f::SYSTEM_OFF
                } else {
                    f::SYSTEM_RESET
                }
            })
            .collect();
        round(r, &calls);
    }
}

#[test]
fn merged_event_keeps_the_first_reset_and_lets_a_shutdown_win() {
    let reset = SystemEvent {
        kind: SystemEventKind::Reset,
        flags: SystemEvent::FLAG_PSCI_RESET2,
        args: [0, 7],
    };
    let reset1 = SystemEvent {
        kind: SystemEventKind::Reset,
        flags: 0,
        args: [0, 0],
    };
    let off = SystemEvent {
        kind: SystemEventKind::Shutdown,
        flags: 0,
        args: [0, 0],
    };
    assert_eq!(reset.merged(reset1), reset);
    assert_eq!(reset.merged(off), off);
    assert_eq!(off.merged(reset), off);
}
