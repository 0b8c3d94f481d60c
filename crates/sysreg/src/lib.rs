//! What a guest sees of the Arm system registers: shared policy for both
//! tiers of pkvm-rs (the simulated machine and the EL2 image).
//!
//! What it models:
//! - [`REGISTERS`]: one typed table of every system register (and set/way
//!   cache instruction) a guest can reach through a trap, in the spirit of
//!   KVM's `sys_reg_descs[]`: encoding, name, reset value, [`Visibility`]
//!   (always, only with a feature the VM was offered, or hidden), the
//!   [`Handler`] that answers it (RAZ/WI, a read-only ID value from the VM's
//!   sanitised view, emulated storage in the vCPU's register file, UNDEF, or
//!   a [`Hook`] for the PMU, the physical timer, set/way and SGIs) and the
//!   EL2 control that makes it trap ([`Trap`]).
//! - [`handle_sysreg_trap`]: decodes an EC 0x18 syndrome ([`SysregTrap`])
//!   and answers it from the table, counting traps per row in
//!   [`VcpuSysregs`]; [`handle_feature_trap`] for SVE/SME/PAC/unknown
//!   exception classes.
//! - [`inject_undef`]: the architecture's exception entry to EL1 for an
//!   Undefined Instruction exception, over an [`El1State`]; [`inject_sync`]
//!   the same entry with any syndrome, e.g. [`host_abort_esr`]'s for a host
//!   access the hypervisor refuses.
//! - [`VmFeatures`]: a VM's sanitised ID registers, computed from the
//!   host's ([`HostIds`]) and the VM configuration ([`IdOverrides`]):
//!   features not virtualised are hidden, the PMU and debug versions say
//!   what is emulated, SVE appears only when offered with a vector length
//!   (a power-of-two multiple of 16 bytes the host supports;
//!   [`IdOverrides::with_sve_host_max`] asks for the largest,
//!   [`HostIds::sve_vl_limit`]), and a configuration may lower fields but never raise them above the
//!   host ([`IdError`] names the field).
//! - [`pmu`]: the virtual PMUv3 of one vCPU behind [`Hook::Pmu`]
//!   ([`VirtPmu`]; [`pmu::handle_pmu_trap`] answers a hook call): counters
//!   that count only their vCPU's run slices, `SW_INCR`, overflow flags
//!   and the overflow interrupt line.
//! - [`traps`]: `HCR_EL2`, `CPTR_EL2`, `MDCR_EL2`, `CNTHCTL_EL2` and
//!   `MPAM2_EL2` for a VM, as pure functions of its [`VmFeatures`].
//! - [`SWITCHED`]: the registers a guest uses directly, which the world
//!   switch saves and restores (or an EL2 register stands in for).
//! - [`guest_debug`]: the breakpoints, watchpoints and `MDSCR_EL1` the
//!   world switch loads for an entry while the guest's debug is active
//!   (and [`set_way`]: a trapped set/way operation becomes a flush of the
//!   VM's memory by VA).
//!
//! Invariants:
//! - Every EL0/EL1-accessible register is trapped (a table row whose
//!   [`Trap`] the policy sets, or absent from the host CPU) or in
//!   [`SWITCHED`]; never both for one VM. `tests/register_list.rs` checks
//!   this against its own list of the architecture's registers.
//! - A guest access outside the table, to a register the VM cannot see, or
//!   in the wrong direction gets an UNDEF, never a stopped VM; nothing a
//!   guest passes in panics.
//! - A VM's ID view never shows more than the host has under the field's
//!   ordering (unsigned, or signed with `0xF` = not implemented).
//!
//! What it leaves out: state switching itself (the world switch's job: it
//! reads [`SWITCHED`] and the trap controls), the physical-timer,
//! set/way and SGI models behind the hooks, SVE state (Z/P/FFR) switching,
//! AArch32 guests (no AArch32 is offered; the AArch32 ID registers read as
//! zero, though a CPU with AArch32 EL0 still lets a guest enter it),
//! nested virtualisation, fine-grained traps (FEAT_FGT: a few read-only
//! registers stay readable, see [`Via::HostReadOnly`]) and `HCRX_EL2` (the
//! EL2 image must write 0 to it on FEAT_HCX CPUs so that `TCR2_EL1`,
//! `SCTLR2_EL1` and the like trap and get the table's UNDEF),
//! the trace unit's own registers (trapped wholesale by `CPTR_EL2.TTA`,
//! not listed), `MPAMIDR_EL1`, and implementation-defined registers
//! (trapped by `HCR_EL2.TIDCP`, answered with an UNDEF as unknown encodings).
//!
//! # Example
//!
//! The exit that stopped a Debian kernel in issue 10: `msr zcr_el1` with
//! SVE not offered (EC 0x19). The guest now takes an UNDEF at its vector.
//!
//! ```
//! use pkvm_arch::esr::Esr;
//! use pkvm_sysreg::{handle_feature_trap, inject_undef, El1State, HostIds, IdOverrides, IdReg};
//! use pkvm_sysreg::{Outcome, VmFeatures};
//!
//! let mut host = HostIds::new();
//! host.set(IdReg::Pfr0, (1 << 32) | 0x11); // SVE, EL0/EL1 AArch64
//! host.sve_max_vl = 32;
//! let vm = VmFeatures::new(&host, &IdOverrides::new())?; // SVE not offered
//! assert_eq!(handle_feature_trap(&vm, Esr(0x6600_0000)), Some(Outcome::InjectUndef));
//!
//! let mut el1 = El1State { pc: 0x4008_0000, pstate: 0x3c5, vbar_el1: 0x4000_0000, ..El1State::default() };
//! inject_undef(&mut el1);
//! assert_eq!((el1.pc, el1.elr_el1, el1.esr_el1), (0x4000_0200, 0x4008_0000, 0x0200_0000));
//! # Ok::<(), pkvm_sysreg::IdError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

mod debug;
mod dispatch;
mod enc;
mod id;
pub mod pmu;
mod switched;
mod table;
pub mod traps;
mod undef;

pub use debug::{
    debug_active, guest_debug, set_way, GuestDebug, SetWay, MAX_POINTS, MDSCR_KDE, MDSCR_MDE,
    MDSCR_SS,
};
pub use dispatch::{
    handle_feature_trap, handle_sysreg_trap, visible, Done, HookCall, Outcome, VcpuSysregs,
};
pub use enc::{iss, Direction, Encoding, SysregTrap, RT_XZR};
pub use id::{
    HostFeature, HostIds, IdError, IdField, IdOverrides, IdReg, Offer, Policy, VmFeatures,
    DEBUG_EMULATED, ID_FIELDS, ID_FIELD_COUNT, PMU_EMULATED_MAX, SVE_VL_ARCH_MAX,
};
pub use pmu::{handle_pmu_trap, VirtPmu, PMU_PPI};
pub use switched::{switched, Switched, Via, When, SWITCHED};
pub use table::{
    lookup, Handler, Hook, SysReg, Trap, Visibility, DBGBCR_MASK, DBGWCR_MASK, MDSCR_MASK,
    NO_INDEX, OSLSR_OSLK, OSLSR_RESET, REGISTERS, REG_COUNT,
};
pub use traps::TrapControls;
pub use undef::{
    host_abort_esr, inject_sync, inject_undef, pstate, vector, vector_offset, El1State, ESR_UNDEF,
    FSC_SEA, SCTLR_DSSBS, SCTLR_SPAN,
};

/// The row of the register named `name` (array rows: `name` with `<n>`
/// replaced is not found; use [`lookup`] with the encoding).
pub fn lookup_named(name: &str) -> Option<usize> {
    REGISTERS.iter().position(|r| r.name == name)
}
