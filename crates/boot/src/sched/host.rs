//! The adapter that lets the scheduler run pkvm-host vCPUs:
//! [`HostRunner`] owns a claimed `pkvm_host::Vcpu` and implements
//! [`SchedVcpu`] by calling `Vcpu::run` with a backend for the current
//! physical CPU until an exit needs the scheduler.
//!
//! What the VMM provides ([`HostVmm`]): a `VcpuBackend` for vCPU `index`
//! on physical CPU `cpu` (the world switch, lending the vCPU's
//! hardware-only state; on an IRQ exit it must call
//! [`crate::platform::gic::drain`] and return `GuestExit::Interrupt`), the
//! handling of every exit that is not the scheduler's business (MMIO,
//! hypercalls, system events), and whether the VM is over. Its
//! `HostPlatform::kick_vcpu` must forward to [`super::Scheduler::kick`] so
//! PSCI `CPU_ON` queues a sleeping target and a running target is sent the
//! kick SGI.
//!
//! Exit mapping, after [`HostVmm::exit`] has seen the exit: a VM that is
//! over -> [`Outcome::Done`]; `Interrupted` -> [`Outcome::Preempted`];
//! `Wfi` -> [`HostVmm::wfi`]'s answer ([`Outcome::Yield`] for WFE or a
//! guest without interrupts, [`Outcome::Wait`] for a WFI with nothing
//! pending); `Sleep` -> [`Outcome::Sleep`]; `Mmio` and
//! `Hypercall` -> run again; `SystemEvent` of a VM the VMM did not stop (it
//! restarted it: a system reset) -> run again (`Vcpu::run` then starts the
//! boot vCPU at its entry point, or reports `Sleep` for a vCPU left off);
//! `Halted`, `InternalError` -> [`Outcome::Done`] (the VMM stops the VM,
//! which retires its other vCPUs).

use alloc::sync::Arc;

use pkvm_host::{HostPlatform, ProcessMemory, Vcpu, VcpuBackend, VcpuExit};

use super::{Outcome, SchedVcpu};

/// The VMM side a [`HostRunner`] needs (implemented by the VMM's VM type).
pub trait HostVmm: Send + Sync {
    /// The host platform of its VMs.
    type Platform: HostPlatform;
    /// The process memory behind its memslots.
    type Memory: ProcessMemory;
    /// The backend type (borrows the VMM: the vCPU's hardware-only state).
    type Backend<'a>: VcpuBackend
    where
        Self: 'a;

    /// A backend that enters vCPU `index` on physical CPU `cpu`, lending it
    /// that vCPU's hardware-only state (FP/SIMD, PAC keys) for the run.
    fn backend(&self, cpu: usize, index: usize) -> Self::Backend<'_>;

    /// What a `VcpuExit::Wfi` asks of the scheduler (the backend saw the
    /// WFI/WFE): [`Outcome::Yield`] or [`Outcome::Wait`].
    fn wfi(&self, be: &mut Self::Backend<'_>) -> Outcome;

    /// Called with the backend at the end of each scheduler run of the
    /// vCPU (e.g. to collect its statistics).
    fn after_run(&self, be: Self::Backend<'_>);

    /// Sees every exit of `Vcpu::run`: emulates MMIO (calling
    /// `Vcpu::complete_mmio` for reads), answers hypercalls (results in
    /// `Vcpu::context_mut`), stops the VM on a system event or error, or
    /// restarts it on a system reset (powering it on again before
    /// returning), and counts.
    fn exit(&self, vcpu: &mut Vcpu<Self::Platform, Self::Memory>, exit: &VcpuExit);

    /// Whether the VM is over (its vCPUs leave the scheduler).
    fn stopping(&self) -> bool;
}

/// A pkvm-host vCPU the scheduler can run.
pub struct HostRunner<V: HostVmm> {
    vcpu: Vcpu<V::Platform, V::Memory>,
    vmm: Arc<V>,
}

impl<V: HostVmm> HostRunner<V> {
    /// Wraps a claimed vCPU of `vmm`'s VM.
    pub fn new(vcpu: Vcpu<V::Platform, V::Memory>, vmm: Arc<V>) -> Self {
        HostRunner { vcpu, vmm }
    }

    /// The wrapped vCPU.
    pub fn vcpu(&self) -> &Vcpu<V::Platform, V::Memory> {
        &self.vcpu
    }

    /// The VMM.
    pub fn vmm(&self) -> &Arc<V> {
        &self.vmm
    }
}

impl<V: HostVmm> SchedVcpu for HostRunner<V>
where
    Vcpu<V::Platform, V::Memory>: Send,
{
    fn run(&mut self, cpu: usize) -> Outcome {
        let vmm = &*self.vmm;
        if vmm.stopping() {
            return Outcome::Done;
        }
        let mut be = vmm.backend(cpu, self.vcpu.index());
        let outcome = loop {
            let exit = self.vcpu.run(&mut be);
            vmm.exit(&mut self.vcpu, &exit);
            if vmm.stopping() {
                break Outcome::Done;
            }
            match exit {
                VcpuExit::Interrupted => break Outcome::Preempted,
                VcpuExit::Wfi => break vmm.wfi(&mut be),
                VcpuExit::Sleep => break Outcome::Sleep,
                // A system event whose VM is not stopping was a reset the
                // VMM carried out: run again (start over, or sleep).
                VcpuExit::Mmio { .. } | VcpuExit::Hypercall { .. } | VcpuExit::SystemEvent(_) => {}
                VcpuExit::Halted | VcpuExit::InternalError(_) => break Outcome::Done,
            }
        };
        vmm.after_run(be);
        outcome
    }
}
