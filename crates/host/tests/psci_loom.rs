//! Loom model of the CPU_ON race: every interleaving of two vCPUs powering
//! on the same stopped target gives one SUCCESS and one ALREADY_ON, and the
//! target's pending start is the winner's.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p pkvm-host --test psci_loom --release`.
#![cfg(loom)]

mod psci_common;

use loom::sync::Arc;
use pkvm_arch::smccc::psci as f;
use pkvm_host::psci::{handle_psci, Conduit, PowerState, PsciCaller, PsciConfig};
use pkvm_host::vcpu_state::GuestGprs;
use psci_common::TestVm;

fn cpu_on(vm: &TestVm, caller: usize) -> i64 {
    let mut regs = GuestGprs::default();
    regs.x[..4].copy_from_slice(&[
        u64::from(f::CPU_ON_64),
        2,
        0x1000 * (caller as u64 + 1),
        caller as u64,
    ]);
    let _ = handle_psci(vm, &PsciCaller::new(caller, Conduit::Hvc), &mut regs).unwrap();
    regs.x[0] as i64
}

#[test]
fn loom_cpu_on_race_has_one_winner() {
    loom::model(|| {
        let vm = Arc::new(TestVm::with_running(PsciConfig::default(), 3, &[0, 1]));
        let vm1 = vm.clone();
        let t = loom::thread::spawn(move || cpu_on(&vm1, 1));
        let a = cpu_on(&vm, 0);
        let b = t.join().unwrap();
        let winner = match (a, b) {
            (0, -4) => 0,
            (-4, 0) => 1,
            other => panic!("results {other:?}"),
        };
        let p = *vm.power[2].lock();
        assert_eq!(p.state(), PowerState::Running);
        let st = p.reset_state();
        assert!(st.reset);
        assert_eq!(
            (st.pc, st.context_id),
            (0x1000 * (winner as u64 + 1), winner as u64)
        );
        assert_eq!(vm.kicks(2), 1);
    });
}
