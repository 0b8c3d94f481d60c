//! System-register access macros and small barriers.

/// Reads a system register by name (`read_sysreg!("esr_el2")`).
#[macro_export]
macro_rules! read_sysreg {
    ($r:literal) => {{
        let v: u64;
        // SAFETY: reading a system register has no memory effects; the
        // image runs at EL2 where every register used here is accessible.
        unsafe { core::arch::asm!(concat!("mrs {}, ", $r), out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }};
}

/// Writes a system register by name. Callers add `isb` where the new value
/// must take effect before the next instruction.
#[macro_export]
macro_rules! write_sysreg {
    ($r:literal, $v:expr) => {{
        let v: u64 = $v;
        // SAFETY: the registers written through this macro only configure
        // lower exception levels, traps or EL2 state the caller documents;
        // writing them cannot break Rust's memory model at EL2.
        unsafe { core::arch::asm!(concat!("msr ", $r, ", {}"), in(reg) v, options(nostack, preserves_flags)) };
    }};
}

/// Instruction synchronization barrier.
#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// Data synchronization barrier, inner shareable.
#[inline(always)]
pub fn dsb_ish() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// The current CPU's MPIDR affinity bits.
pub fn mpidr() -> u64 {
    read_sysreg!("mpidr_el1") & 0xff_00ff_ffff
}
