//! A test double for [`PsciVm`]: a VM of `n` vCPUs whose kicks are counted.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use pkvm_host::psci::{PowerState, PsciConfig, PsciVm, SystemEventLatch, VcpuPower};
use pkvm_sync::SpinLock;

pub struct TestVm {
    pub cfg: PsciConfig,
    pub power: Vec<SpinLock<VcpuPower>>,
    pub kicks: Vec<AtomicUsize>,
    pub latch: SpinLock<SystemEventLatch>,
}

impl TestVm {
    /// `n` vCPUs, all stopped.
    pub fn new(cfg: PsciConfig, n: usize) -> Self {
        TestVm {
            cfg,
            power: (0..n).map(|_| VcpuPower::new_lock()).collect(),
            kicks: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            latch: SystemEventLatch::new_lock(),
        }
    }

    /// `n` vCPUs, those in `running` powered on (nothing pending).
    pub fn with_running(cfg: PsciConfig, n: usize, running: &[usize]) -> Self {
        let vm = TestVm::new(cfg, n);
        for &i in running {
            *vm.power[i].lock() = VcpuPower::new(PowerState::Running);
        }
        vm
    }

    pub fn state(&self, i: usize) -> PowerState {
        self.power[i].lock().state()
    }

    pub fn kicks(&self, i: usize) -> usize {
        self.kicks[i].load(Ordering::SeqCst)
    }
}

impl PsciVm for TestVm {
    fn psci_config(&self) -> PsciConfig {
        self.cfg
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
    fn kick_vcpu(&self, index: usize) {
        assert_eq!(
            pkvm_sync::held_classes(),
            0,
            "kick_vcpu called with a lock held"
        );
        self.kicks[index].fetch_add(1, Ordering::SeqCst);
    }
}
