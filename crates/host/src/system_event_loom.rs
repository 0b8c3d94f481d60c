//! Loom model of concurrent system events, driving the real
//! [`handle_psci`], [`take_system_event`] and [`power_on_vm`] on a small
//! VM double whose locks are the real `pkvm_sync` locks (loom atomics
//! under `cfg(loom)`): in every interleaving of two vCPUs making system
//! event calls at once, exactly one exits to the VMM, two resets restart
//! the VM once, and a `SYSTEM_OFF` racing a reset always wins.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p pkvm-host --release --lib loom`.

extern crate std;

use alloc::vec::Vec;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use pkvm_arch::smccc::psci as f;
use pkvm_sync::SpinLock;

use crate::psci::{
    handle_psci, take_system_event, Conduit, PowerState, PsciCaller, PsciConfig, PsciOutcome,
    PsciVm, SystemEventKind, SystemEventLatch, VcpuPower,
};
use crate::reset::{power_on_vm, BootParams};
use crate::vcpu_state::GuestGprs;

struct LoomVm {
    power: Vec<SpinLock<VcpuPower>>,
    latch: SpinLock<SystemEventLatch>,
    kicks: AtomicUsize,
}

impl PsciVm for LoomVm {
    fn psci_config(&self) -> PsciConfig {
        PsciConfig::default()
    }
    fn vcpu_count(&self) -> usize {
        self.power.len()
    }
    fn vcpu_power(&self, index: usize) -> &SpinLock<VcpuPower> {
        &self.power[index]
    }
    fn system_event_latch(&self) -> &SpinLock<SystemEventLatch> {
        &self.latch
    }
    fn kick_vcpu(&self, _index: usize) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
    }
}

fn call(vm: &LoomVm, caller: usize, func: u32) -> PsciOutcome {
    let mut regs = GuestGprs::default();
    regs.x[0] = u64::from(func);
    handle_psci(vm, &PsciCaller::new(caller, Conduit::Hvc), &mut regs).unwrap()
}

/// Two running vCPUs call `a` and `b` at once; then the VMM acts on each
/// exit as `crate::psci` prescribes. Returns (exits, restarts, offs,
/// whether each vCPU is running afterwards).
fn race(a: u32, b: u32) -> (usize, u32, u32, [bool; 2]) {
    let vm = Arc::new(LoomVm {
        power: (0..2)
            .map(|_| {
                SpinLock::new(
                    VcpuPower::new(PowerState::Running),
                    pkvm_sync::LockClass::HostVcpu,
                )
            })
            .collect(),
        latch: SystemEventLatch::new_lock(),
        kicks: AtomicUsize::new(0),
    });
    let vm1 = vm.clone();
    let t = loom::thread::spawn(move || call(&vm1, 1, b));
    let oa = call(&vm, 0, a);
    let ob = t.join().unwrap();
    let exits = [oa, ob]
        .iter()
        .filter(|o| matches!(o, PsciOutcome::Exit(_)))
        .count();
    let (mut restarts, mut offs) = (0, 0);
    for _ in 0..exits {
        match take_system_event(&*vm).map(|e| e.kind) {
            Some(SystemEventKind::Reset) => {
                power_on_vm(&*vm, &BootParams::default()).unwrap();
                restarts += 1;
            }
            Some(SystemEventKind::Shutdown) => offs += 1,
            _ => {}
        }
    }
    let on = |i: usize| vm.power[i].lock().state() == PowerState::Running;
    (exits, restarts, offs, [on(0), on(1)])
}

#[test]
fn loom_concurrent_system_resets_restart_the_vm_once() {
    loom::model(|| {
        let r = race(f::SYSTEM_RESET, f::SYSTEM_RESET2_64);
        // One restart: vCPU 0 on again, vCPU 1 off until a CPU_ON.
        assert_eq!(r, (1, 1, 0, [true, false]));
    });
}

#[test]
fn loom_system_off_racing_a_reset_always_powers_off() {
    loom::model(|| {
        let r = race(f::SYSTEM_RESET, f::SYSTEM_OFF);
        assert_eq!(r, (1, 0, 1, [false, false]));
    });
}
