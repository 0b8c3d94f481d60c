//! vCPU reset and VM power-on.
//!
//! - [`reset_registers`]: the architectural reset of one vCPU's registers
//!   (GPRs 0, PSTATE EL1h with DAIF masked, EL1 system registers and timer
//!   to their reset values, MPIDR_EL1 from the VM), then PC, x0 and the
//!   endianness from a [`ResetState`]. Pure: no locks.
//! - [`reset_vcpu`]: takes and clears the pending reset state under the
//!   vCPU's power-state lock (released before the registers are touched),
//!   then [`reset_registers`].
//! - [`prepare_to_run`]: the run loop's step before entering the guest:
//!   consume requests, apply a pending reset, say whether the vCPU may run.
//! - [`power_on_vm`]: the VM's boot (and restart after `SYSTEM_RESET`): the
//!   first vCPU starts at the entry point, secondaries are powered off until
//!   a `CPU_ON`.

use core::fmt;

use crate::psci::{PowerState, PsciVm, Requests, ResetState};
use crate::vcpu_state::{pstate, El1SysRegs, GuestGprs, MPIDR_RES1};

/// A reset request the host itself got wrong (a host bug).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetError {
    /// The vCPU index is not a vCPU of this VM.
    NoSuchVcpu {
        /// The index passed in.
        index: usize,
        /// The VM's vCPU count.
        vcpu_count: usize,
    },
    /// [`power_on_vm`] on a VM without vCPUs.
    NoVcpus,
}

impl fmt::Display for ResetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetError::NoSuchVcpu { index, vcpu_count } => {
                write!(
                    f,
                    "host bug: reset of vCPU {index} but the VM has {vcpu_count} vCPUs"
                )
            }
            ResetError::NoVcpus => write!(f, "host bug: powering on a VM with no vCPUs"),
        }
    }
}

/// Resets a vCPU's registers: all GPRs and SP_EL0 to 0, PSTATE =
/// [`pstate::RESET`] (EL1h, DAIF masked), the EL1 registers and virtual
/// timer to [`El1SysRegs::reset`] with MPIDR_EL1 = `mpidr_el1`; then, if
/// `start` is given, PC = `start.pc`, x0 = `start.context_id` and
/// SCTLR_EL1.EE/E0E set if `start.big_endian`. Without `start` the PC is 0
/// (the VMM sets it, as after KVM's `KVM_ARM_VCPU_INIT`).
pub fn reset_registers(
    regs: &mut GuestGprs,
    sys: &mut El1SysRegs,
    mpidr_el1: u64,
    start: Option<&ResetState>,
) {
    let big_endian = start.is_some_and(|s| s.big_endian);
    *regs = GuestGprs {
        pstate: pstate::RESET,
        ..GuestGprs::default()
    };
    *sys = El1SysRegs::reset(mpidr_el1, big_endian);
    if let Some(s) = start {
        regs.pc = s.pc;
        regs.x[0] = s.context_id;
    }
}

fn check_index<V: PsciVm + ?Sized>(vm: &V, index: usize) -> Result<(), ResetError> {
    let vcpu_count = vm.vcpu_count();
    if index >= vcpu_count {
        return Err(ResetError::NoSuchVcpu { index, vcpu_count });
    }
    Ok(())
}

/// Resets vCPU `index`: takes and clears its pending reset state under its
/// power-state lock, then (lock released) [`reset_registers`] with
/// MPIDR_EL1 = the VM's affinity for it plus bit 31. Returns the reset state
/// that was applied, `None` if none was pending (registers are reset
/// anyway).
///
/// # Errors
/// [`ResetError::NoSuchVcpu`] if `index` is not a vCPU of `vm`.
pub fn reset_vcpu<V: PsciVm + ?Sized>(
    vm: &V,
    index: usize,
    regs: &mut GuestGprs,
    sys: &mut El1SysRegs,
) -> Result<Option<ResetState>, ResetError> {
    check_index(vm, index)?;
    let start = vm.vcpu_power(index).lock().take_reset_state();
    reset_registers(
        regs,
        sys,
        vm.vcpu_affinity(index) | MPIDR_RES1,
        start.as_ref(),
    );
    Ok(start)
}

/// Whether a vCPU may enter the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a vCPU that must sleep must not enter the guest"]
pub enum Readiness {
    /// `Running`: enter the guest. `reset` is the reset state applied just
    /// now, if one was pending.
    Run {
        /// The applied reset state.
        reset: Option<ResetState>,
    },
    /// `Stopped` or `Suspended`: do not enter the guest; wait for a kick
    /// (and for a `Suspended` vCPU, for a wake-up interrupt), then call
    /// again.
    Sleep(PowerState),
}

/// The run loop's step before each guest entry of vCPU `index`: under its
/// lock, consumes the pending `SLEEP`/`WAKE` requests and reads its state;
/// if `Running` with a reset pending, takes and clears the reset state;
/// then (lock released) applies it to `regs`/`sys`. A vCPU that is not
/// `Running` keeps its pending reset for when it is powered on.
///
/// # Errors
/// [`ResetError::NoSuchVcpu`] if `index` is not a vCPU of `vm`.
pub fn prepare_to_run<V: PsciVm + ?Sized>(
    vm: &V,
    index: usize,
    regs: &mut GuestGprs,
    sys: &mut El1SysRegs,
) -> Result<Readiness, ResetError> {
    check_index(vm, index)?;
    let (state, start) = {
        let mut p = vm.vcpu_power(index).lock();
        let requests = p.take_requests();
        let state = p.state();
        let start = if state == PowerState::Running && requests.contains(Requests::RESET) {
            // Some(..) even if the state is not pending: RESET without a
            // pending state only happens if the VMM broke the invariant.
            Some(p.take_reset_state())
        } else {
            None
        };
        (state, start)
    };
    match (state, start) {
        (PowerState::Running, None) => Ok(Readiness::Run { reset: None }),
        (PowerState::Running, Some(start)) => {
            reset_registers(
                regs,
                sys,
                vm.vcpu_affinity(index) | MPIDR_RES1,
                start.as_ref(),
            );
            Ok(Readiness::Run { reset: start })
        }
        (other, _) => Ok(Readiness::Sleep(other)),
    }
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// The VM's entry point (IPA of the kernel/payload).
    pub entry: u64,
    /// x0 at entry (for Linux: the device tree's IPA).
    pub x0: u64,
    /// Start big-endian.
    pub big_endian: bool,
}

/// Powers the VM on (at creation, or again after a `SYSTEM_RESET` exit):
/// vCPU 0 becomes `Running` with a reset to `boot` pending; every other vCPU
/// becomes `Stopped` (no reset pending, `SLEEP` requested) until a guest
/// `CPU_ON`. The VM's system event latch is cleared first (see
/// [`crate::psci`]: a VMM restarting after `SYSTEM_RESET` must do so only
/// once no other vCPU is in its run loop). Each vCPU is updated under its
/// own lock, one at a time; all are kicked afterwards.
///
/// # Errors
/// [`ResetError::NoVcpus`] if the VM has no vCPUs.
pub fn power_on_vm<V: PsciVm + ?Sized>(vm: &V, boot: &BootParams) -> Result<(), ResetError> {
    let n = vm.vcpu_count();
    if n == 0 {
        return Err(ResetError::NoVcpus);
    }
    // A system event still latched belongs to the previous boot.
    let _ = vm.system_event_latch().lock().take();
    for i in 1..n {
        let mut p = vm.vcpu_power(i).lock();
        p.power_off();
        let _ = p.take_reset_state();
    }
    vm.vcpu_power(0).lock().power_on(ResetState {
        pc: boot.entry,
        context_id: boot.x0,
        big_endian: boot.big_endian,
        reset: true,
    });
    for i in 0..n {
        vm.kick_vcpu(i);
    }
    Ok(())
}
