//! The adapter that lets the scheduler run pkvm-host vCPUs:
//! [`HostRunner`] wraps a claimed `pkvm_host::Vcpu` and implements
//! [`SchedVcpu`] by calling `Vcpu::run` with a backend for the current
//! physical CPU until an exit needs the scheduler.
//!
//! What the VMM provides ([`HostVmm`]): a `VcpuBackend` for physical CPU
//! `cpu` (the world switch; on an IRQ exit it must call
//! [`crate::platform::gic::drain`] and return `GuestExit::Interrupt`), and
//! its MMIO emulation. Its `HostPlatform::kick_vcpu` must forward to
//! [`super::Scheduler::kick`] so PSCI `CPU_ON` queues a sleeping target
//! and a running target is sent the kick SGI.
//!
//! Exit mapping: `Mmio` is emulated here and the vCPU re-entered;
//! `Interrupted` -> [`Outcome::Preempted`]; `Wfi` -> [`Outcome::Yield`];
//! `Sleep` -> [`Outcome::Sleep`]; `SystemEvent` -> [`Outcome::VmEnd`]
//! (shutdown, reset; suspend is an error: not offered); `Halted` and
//! `InternalError` -> [`Outcome::VmEnd`] with an error.

use pkvm_host::psci::SystemEventKind;
use pkvm_host::{HostPlatform, ProcessMemory, Vcpu, VcpuBackend, VcpuExit};

use super::{Outcome, SchedVcpu, VmEnd};

/// The VMM side a [`HostRunner`] needs.
pub trait HostVmm: Sync {
    /// The backend type (borrows the VMM).
    type Backend<'a>: VcpuBackend
    where
        Self: 'a;

    /// A backend that enters guests on physical CPU `cpu`.
    fn backend(&self, cpu: usize) -> Self::Backend<'_>;

    /// Emulates an MMIO access of vCPU `index`; returns the value read
    /// (ignored for writes).
    fn mmio(&self, index: usize, addr: u64, len: u8, write: bool, data: u64) -> u64;
}

/// A pkvm-host vCPU the scheduler can run.
pub struct HostRunner<P: HostPlatform, M: ProcessMemory, V: HostVmm + 'static> {
    vcpu: Vcpu<P, M>,
    vmm: &'static V,
}

impl<P: HostPlatform, M: ProcessMemory, V: HostVmm + 'static> HostRunner<P, M, V> {
    /// Wraps a claimed vCPU.
    pub fn new(vcpu: Vcpu<P, M>, vmm: &'static V) -> Self {
        HostRunner { vcpu, vmm }
    }

    /// The wrapped vCPU.
    pub fn vcpu(&self) -> &Vcpu<P, M> {
        &self.vcpu
    }
}

impl<P, M, V> SchedVcpu for HostRunner<P, M, V>
where
    P: HostPlatform,
    M: ProcessMemory,
    V: HostVmm + 'static,
    Vcpu<P, M>: Send,
{
    fn run(&mut self, cpu: usize) -> Outcome {
        let mut be = self.vmm.backend(cpu);
        loop {
            match self.vcpu.run(&mut be) {
                VcpuExit::Mmio {
                    addr,
                    len,
                    write,
                    data,
                } => {
                    let v = self.vmm.mmio(self.vcpu.index(), addr.0, len, write, data);
                    if !write {
                        self.vcpu.complete_mmio(v);
                    }
                }
                VcpuExit::Interrupted => return Outcome::Preempted,
                VcpuExit::Wfi => return Outcome::Yield,
                VcpuExit::Sleep => return Outcome::Sleep,
                VcpuExit::SystemEvent(ev) => {
                    return Outcome::VmEnd(match ev.kind {
                        SystemEventKind::Shutdown => VmEnd::PowerOff,
                        SystemEventKind::Reset => VmEnd::Reset,
                        SystemEventKind::Suspend => VmEnd::Error("SYSTEM_SUSPEND (not offered)"),
                    })
                }
                VcpuExit::Halted => return Outcome::VmEnd(VmEnd::Error("vCPU halted")),
                VcpuExit::InternalError(_) => {
                    return Outcome::VmEnd(VmEnd::Error("host internal error"))
                }
            }
        }
    }
}
