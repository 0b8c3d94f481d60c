//! Entering guests on a simulated CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use pkvm_arch::esr::Esr;
use pkvm_host::fault::GuestFault;
use pkvm_host::{GuestExit, StageTwo, VcpuBackend, VcpuContext};
use pkvm_sim::{GuestError, SimCpu, SimExit, VmContext};

use crate::platform::SimPlatform;

/// A simulated CPU running one vCPU's guest program.
pub struct SimBackend {
    cpu: SimCpu,
    platform: Arc<SimPlatform>,
    loaded: Option<VmContext>,
    kick: Option<Arc<AtomicBool>>,
    progress: Option<Arc<AtomicU64>>,
    last_accesses: u64,
    /// The guest's error, when it reported one.
    pub guest_error: Option<GuestError>,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend")
            .field("cpu", &self.cpu.id())
            .finish_non_exhaustive()
    }
}

impl SimBackend {
    /// A backend on `cpu`; runs slices of `budget` guest operations
    /// between checks for kicks.
    pub fn new(mut cpu: SimCpu, platform: Arc<SimPlatform>, budget: u64) -> Self {
        cpu.set_budget(budget);
        SimBackend {
            cpu,
            platform,
            loaded: None,
            kick: None,
            progress: None,
            last_accesses: 0,
            guest_error: None,
        }
    }

    /// Kicks set this token (see [`SimPlatform::register_vcpu_thread`]).
    pub fn set_kick_token(&mut self, token: Arc<AtomicBool>) {
        self.kick = Some(token);
    }

    /// Adds completed guest accesses to `counter` after each entry.
    pub fn set_progress(&mut self, counter: Arc<AtomicU64>) {
        self.progress = Some(counter);
    }

    /// The simulated CPU.
    pub fn cpu_ref(&self) -> &SimCpu {
        &self.cpu
    }

    /// The simulated CPU, mutable (to set its program).
    pub fn cpu_mut(&mut self) -> &mut SimCpu {
        &mut self.cpu
    }

    fn context_for(&self, s2: &StageTwo) -> Option<VmContext> {
        let m = self.platform.machine();
        match *s2 {
            StageTwo::Host { vmid, root, geo } => Some(m.vm_context(vmid, root, geo)),
            StageTwo::Hyp { .. } => {
                let h = self.platform.hyp()?;
                let c = h.loaded_vcpu_context(self.cpu.id())?;
                Some(m.vm_context(c.vmid, c.s2_root, c.geometry))
            }
        }
    }
}

impl VcpuBackend for SimBackend {
    fn cpu(&self) -> usize {
        self.cpu.id()
    }

    fn enter(&mut self, ctx: &mut VcpuContext, s2: &StageTwo) -> GuestExit {
        SimPlatform::set_current_cpu(self.cpu.id());
        let Some(vmctx) = self.context_for(s2) else {
            return GuestExit::Unhandled { esr: 0 };
        };
        if self.loaded != Some(vmctx) {
            self.cpu.load(vmctx);
            self.loaded = Some(vmctx);
        }
        if let Some(k) = &self.kick {
            if k.swap(false, Ordering::AcqRel) {
                return GuestExit::Interrupt;
            }
        }
        self.cpu.regs_mut().copy_from_slice(&ctx.gprs.x);
        let exit = self.cpu.run();
        ctx.gprs.x.copy_from_slice(self.cpu.regs());
        if let Some(p) = &self.progress {
            let a = self.cpu.stats().accesses;
            p.fetch_add(a - self.last_accesses, Ordering::Relaxed);
            self.last_accesses = a;
        }
        match exit {
            SimExit::Abort { esr, far, hpfar } => GuestExit::Abort {
                esr: esr.0,
                far,
                hpfar,
            },
            SimExit::Hvc { imm } => GuestExit::Call {
                esr: Esr::hvc(imm).0,
            },
            SimExit::Smc { imm } => GuestExit::Call {
                esr: Esr::smc(imm).0,
            },
            SimExit::Wfi => GuestExit::Wfx,
            SimExit::ProgramDone => GuestExit::ProgramDone,
            SimExit::Preempted => GuestExit::Interrupt,
            SimExit::GuestError(e) => {
                self.guest_error = Some(e);
                GuestExit::GuestCheckFailed
            }
        }
    }

    fn complete_mmio(&mut self, ctx: &mut VcpuContext, fault: &GuestFault, value: u64) {
        let value = match fault.syndrome {
            Some(s) if !fault.write => load_value(s, value),
            _ => value,
        };
        self.cpu.emulate_pending(value);
        ctx.gprs.x.copy_from_slice(self.cpu.regs());
    }

    fn inject_abort(&mut self, _ctx: &mut VcpuContext, _fault: &GuestFault) {
        self.cpu.inject_abort();
    }
}

/// What an emulated load of `s.size()` bytes puts in its destination
/// register when the VMM supplies `data` (KVM's `kvm_handle_mmio_return`):
/// only the access's bytes, sign-extended if SSE, and a 32-bit register
/// (SF=0) keeps only the low word.
fn load_value(s: pkvm_arch::esr::AccessSyndrome, data: u64) -> u64 {
    let bits = 8 * u32::from(s.size());
    let mut v = if bits == 64 {
        data
    } else {
        data & ((1u64 << bits) - 1)
    };
    if s.sse && bits < 64 {
        let shift = 64 - bits;
        v = (((v << shift) as i64) >> shift) as u64;
    }
    if !s.sf {
        v &= 0xffff_ffff;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::load_value;
    use pkvm_arch::esr::AccessSyndrome;

    fn syn(sas: u8, sse: bool, sf: bool) -> AccessSyndrome {
        AccessSyndrome {
            sas,
            sse,
            srt: 1,
            sf,
            ar: false,
        }
    }

    #[test]
    fn emulated_loads_keep_only_the_access_bytes_and_extend_as_the_syndrome_says() {
        let d = 0x1122_3344_5566_7788;
        assert_eq!(load_value(syn(0, false, false), d), 0x88);
        assert_eq!(load_value(syn(2, false, false), d), 0x5566_7788);
        assert_eq!(load_value(syn(3, false, true), d), d);
        assert_eq!(load_value(syn(0, true, true), 0x80), 0xffff_ffff_ffff_ff80);
        assert_eq!(load_value(syn(1, true, false), 0x8000), 0xffff_8000);
        assert_eq!(load_value(syn(1, true, true), 0x7fff), 0x7fff);
    }
}
