//! The EL2 physical timer (`CNTHP_*_EL2`), used as the scheduler's
//! preemption tick. On QEMU virt its interrupt is PPI 10 = INTID 26 (the
//! device tree's timer node lists it as the fourth interrupt). With the
//! VMM at EL1 ([`super::el1boot`]) the tick is the EL1 physical timer
//! (`CNTP_*_EL0`, INTID 30, [`super::gic::PPI_EL1_PHYS`]): the same
//! functions pick it by `CurrentEL` ([`ppi`]).
//!
//! The timer is one-shot: [`arm_after`] sets a deadline (TVAL) and enables
//! it with the interrupt unmasked; when the deadline passes the (level)
//! interrupt stays asserted until [`disable`] (or a new deadline), which
//! the GIC driver calls before ending the interrupt.

use crate::{read_sysreg, write_sysreg};

/// INTID of the EL2 physical timer interrupt on QEMU virt.
pub const PPI_EL2_PHYS: u32 = 26;

/// CNTHP_CTL_EL2.ENABLE.
const CTL_ENABLE: u64 = 1;

/// Whether the tick is the EL1 physical timer (the VMM runs at EL1).
fn el1() -> bool {
    super::el1boot::current_el() != 2
}

/// INTID of the tick at this EL: [`PPI_EL2_PHYS`] at EL2, the EL1
/// physical timer's at EL1.
pub fn ppi() -> u32 {
    if el1() {
        super::gic::PPI_EL1_PHYS
    } else {
        PPI_EL2_PHYS
    }
}

/// Counter frequency in Hz (CNTFRQ_EL0).
pub fn frequency() -> u64 {
    read_sysreg!("cntfrq_el0")
}

/// The physical count (CNTPCT_EL0).
pub fn now() -> u64 {
    super::sysreg::isb();
    read_sysreg!("cntpct_el0")
}

/// Counter ticks in `us` microseconds.
pub fn ticks_for_us(us: u64) -> u64 {
    frequency().saturating_mul(us) / 1_000_000
}

/// Arms the timer to fire `ticks` counter ticks from now (capped to the
/// 32-bit TVAL range) and enables it, interrupt unmasked.
pub fn arm_after(ticks: u64) {
    let t = ticks.clamp(1, i32::MAX as u64);
    if el1() {
        write_sysreg!("cntp_tval_el0", t);
        write_sysreg!("cntp_ctl_el0", CTL_ENABLE);
    } else {
        write_sysreg!("cnthp_tval_el2", t);
        write_sysreg!("cnthp_ctl_el2", CTL_ENABLE);
    }
    super::sysreg::isb();
}

/// Disables the timer (its interrupt deasserts).
pub fn disable() {
    if el1() {
        write_sysreg!("cntp_ctl_el0", 0);
    } else {
        write_sysreg!("cnthp_ctl_el2", 0);
    }
    super::sysreg::isb();
}

/// Brings the armed timer's deadline forward to physical count `deadline`
/// if it is later (or the timer is off): a deadline of a guest's emulated
/// timer that falls inside the current slice.
pub fn pull_in(deadline: u64) {
    if el1() {
        let on = read_sysreg!("cntp_ctl_el0") & CTL_ENABLE != 0;
        if !on || read_sysreg!("cntp_cval_el0") > deadline {
            write_sysreg!("cntp_cval_el0", deadline);
            write_sysreg!("cntp_ctl_el0", CTL_ENABLE);
            super::sysreg::isb();
        }
        return;
    }
    let on = read_sysreg!("cnthp_ctl_el2") & CTL_ENABLE != 0;
    if !on || read_sysreg!("cnthp_cval_el2") > deadline {
        write_sysreg!("cnthp_cval_el2", deadline);
        write_sysreg!("cnthp_ctl_el2", CTL_ENABLE);
        super::sysreg::isb();
    }
}
