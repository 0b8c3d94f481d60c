//! Injecting an UNDEF (an Undefined Instruction exception) into a guest:
//! what the CPU does when it takes a synchronous exception to EL1, done
//! by hand on the vCPU's saved state.

/// The vCPU state an exception entry to EL1 reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct El1State {
    /// The guest's PC (`ELR_EL2` at the trap): the faulting instruction.
    pub pc: u64,
    /// The guest's PSTATE (`SPSR_EL2` at the trap).
    pub pstate: u64,
    /// `SPSR_EL1`.
    pub spsr_el1: u64,
    /// `ELR_EL1`.
    pub elr_el1: u64,
    /// `ESR_EL1`.
    pub esr_el1: u64,
    /// `VBAR_EL1`.
    pub vbar_el1: u64,
    /// `SCTLR_EL1` (SPAN and DSSBS decide PSTATE.PAN and PSTATE.SSBS).
    pub sctlr_el1: u64,
}

/// PSTATE bits used here.
pub mod pstate {
    /// `M[3:0]`: EL and SP selection.
    pub const M_MASK: u64 = 0xf;
    /// `M[4]` (nRW): 1 = AArch32.
    pub const NRW: u64 = 1 << 4;
    /// EL1h: EL1 using SP_EL1.
    pub const MODE_EL1H: u64 = 0b0101;
    /// F, I, A, D (bits 6..9).
    pub const DAIF: u64 = 0xf << 6;
    /// SSBS (bit 12).
    pub const SSBS: u64 = 1 << 12;
    /// PAN (bit 22).
    pub const PAN: u64 = 1 << 22;
    /// DIT (bit 24).
    pub const DIT: u64 = 1 << 24;
}

/// `SCTLR_EL1.SPAN` (bit 23): 0 = set PSTATE.PAN on exception entry to EL1.
pub const SCTLR_SPAN: u64 = 1 << 23;
/// `SCTLR_EL1.DSSBS` (bit 44): PSTATE.SSBS on exception entry to EL1.
pub const SCTLR_DSSBS: u64 = 1 << 44;

/// `ESR_EL1` of an UNDEF: EC 0 (unknown reason), IL = 1, ISS 0.
pub const ESR_UNDEF: u64 = 1 << 25;

/// Vector offsets from `VBAR_EL1` for a synchronous exception.
pub mod vector {
    /// From the current EL (EL1) using SP_EL0.
    pub const CURRENT_SP0: u64 = 0x000;
    /// From the current EL (EL1) using SP_EL1.
    pub const CURRENT_SPX: u64 = 0x200;
    /// From a lower EL (EL0) in AArch64.
    pub const LOWER_A64: u64 = 0x400;
    /// From a lower EL (EL0) in AArch32.
    pub const LOWER_A32: u64 = 0x600;
}

/// The synchronous-exception vector offset for an exception to EL1 from
/// `pstate`.
pub const fn vector_offset(pstate: u64) -> u64 {
    if pstate & pstate::NRW != 0 {
        return vector::LOWER_A32;
    }
    let el = (pstate >> 2) & 3;
    if el == 0 {
        vector::LOWER_A64
    } else if pstate & 1 != 0 {
        vector::CURRENT_SPX
    } else {
        vector::CURRENT_SP0
    }
}

/// Makes the guest take an UNDEF at its next entry, as the architecture's
/// `AArch64.TakeException` does for a synchronous exception to EL1:
/// `SPSR_EL1` = the old PSTATE, `ELR_EL1` = the faulting instruction,
/// `ESR_EL1` = EC 0 with IL set, PC = `VBAR_EL1` + the vector offset of
/// the old EL and SP, and the new PSTATE is EL1h with D, A, I, F masked,
/// DIT kept, PAN set if it was set or `SCTLR_EL1.SPAN` is 0, SSBS from
/// `SCTLR_EL1.DSSBS`, everything else (SS, IL, BTYPE, UAO, NZCV...) zero.
///
/// The guest's EL1 state must be the vCPU's current one (loaded or saved
/// consistently); the caller writes the results back before entry.
pub fn inject_undef(s: &mut El1State) {
    inject_sync(s, ESR_UNDEF);
}

/// Makes the vCPU (or the host at EL1) take a synchronous exception to
/// EL1 with syndrome `esr` at its next entry: [`inject_undef`]'s entry
/// with any syndrome (the caller sets `FAR_EL1` for an abort).
pub fn inject_sync(s: &mut El1State, esr: u64) {
    let old = s.pstate;
    s.spsr_el1 = old;
    s.elr_el1 = s.pc;
    s.esr_el1 = esr;
    s.pc = s.vbar_el1.wrapping_add(vector_offset(old));
    let mut new = pstate::DAIF | pstate::MODE_EL1H | (old & pstate::DIT);
    if old & pstate::PAN != 0 || s.sctlr_el1 & SCTLR_SPAN == 0 {
        new |= pstate::PAN;
    }
    if s.sctlr_el1 & SCTLR_DSSBS != 0 {
        new |= pstate::SSBS;
    }
    s.pstate = new;
}

/// Exception classes of [`host_abort_esr`].
mod ec {
    pub const IABT_LOW: u64 = 0x20;
    pub const IABT_CUR: u64 = 0x21;
    pub const DABT_CUR: u64 = 0x25;
}

/// `ESR_ELx.IL`.
const ESR_IL: u64 = 1 << 25;
/// `ESR_ELx.ISS` without the fault status code.
const ISS_NO_FSC: u64 = 0x01ff_ffc0;
/// Fault status code: synchronous external abort, not on a walk.
pub const FSC_SEA: u64 = 0x10;

/// The syndrome of the abort injected into a host at EL1 whose stage-2
/// fault `esr_el2` (EC 0x20 or 0x24, from the lower EL) the hypervisor
/// refuses, as pKVM's `host_inject_abort`: the same-EL class (instruction
/// 0x21, data 0x25), IL set, the fault's ISS (WnR, ISV, SRT...) kept but
/// its fault status replaced by a synchronous external abort.
pub const fn host_abort_esr(esr_el2: u64) -> u64 {
    let class = if esr_el2 >> 26 == ec::IABT_LOW {
        ec::IABT_CUR
    } else {
        ec::DABT_CUR
    };
    (class << 26) | ESR_IL | (esr_el2 & ISS_NO_FSC) | FSC_SEA
}
