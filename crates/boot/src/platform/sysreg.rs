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

/// Writes a system register by name only when its value differs from
/// `$v` (`update_sysreg!("tcr_el1", v)`): the world switch's way to load
/// guest state. Writing the value a register already holds is
/// architecturally a no-op, but not free: QEMU 7.2's TCG flushes the
/// CPU's whole soft TLB (and its jump cache) on every `TCR_EL1` write and
/// re-evaluates timers on every timer-register write, so after each exit
/// the guest would refill its TLB with two-stage walks. A read of a plain
/// register is cheap on hardware and in TCG alike.
#[macro_export]
macro_rules! update_sysreg {
    ($r:literal, $v:expr) => {{
        let v: u64 = $v;
        if $crate::read_sysreg!($r) != v {
            $crate::write_sysreg!($r, v);
        }
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
