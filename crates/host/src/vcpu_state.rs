//! Plain-data vCPU register files and the vCPU affinity (MPIDR) layout.
//!
//! These types are shared by three users that must agree on them bit for
//! bit: the host's PSCI and reset code (this crate), the simulated machine
//! (`crates/sim`), and the EL2 world switch of the real image
//! (`crates/boot`), which saves and restores them with plain loads and
//! stores. Both structs are therefore `#[repr(C)]`, contain only `u64`
//! fields, and their offsets are pinned by the `*_OFFSET` constants and
//! compile-time assertions below: changing the layout is an ABI change for
//! the world-switch assembly.

use core::mem::{offset_of, size_of};

/// PSTATE (SPSR_EL2 as saved on a trap from EL1) bit values.
pub mod pstate {
    /// `M[3:0]` = EL1 with SP_EL1 ("EL1h"); `M[4]` = 0 (AArch64).
    pub const MODE_EL1H: u64 = 0b0101;
    /// `M[3:0]` = EL0 (SP_EL0).
    pub const MODE_EL0T: u64 = 0b0000;
    /// The mode field `M[4:0]`.
    pub const MODE_MASK: u64 = 0x1f;
    /// FIQ mask (F).
    pub const F: u64 = 1 << 6;
    /// IRQ mask (I).
    pub const I: u64 = 1 << 7;
    /// SError mask (A).
    pub const A: u64 = 1 << 8;
    /// Debug mask (D).
    pub const D: u64 = 1 << 9;
    /// All four DAIF masks.
    pub const DAIF: u64 = D | A | I | F;
    /// PSTATE after a vCPU reset: EL1h with D, A, I and F masked (0x3c5).
    pub const RESET: u64 = MODE_EL1H | DAIF;
}

/// SCTLR_EL1 bit values.
pub mod sctlr {
    /// Stage-1 MMU enable.
    pub const M: u64 = 1 << 0;
    /// Data endianness at EL0 (1 = big-endian).
    pub const E0E: u64 = 1 << 24;
    /// Data endianness at EL1 and of stage-1 walks (1 = big-endian).
    pub const EE: u64 = 1 << 25;
    /// The RES1 bits of SCTLR_EL1 (ARMv8.0: 29, 28, 23, 22, 20, 11).
    pub const RES1: u64 = (1 << 29) | (1 << 28) | (1 << 23) | (1 << 22) | (1 << 20) | (1 << 11);
    /// SCTLR_EL1 after a vCPU reset: only the RES1 bits, so MMU and caches
    /// off, little-endian (0x30d0_0800).
    pub const RESET: u64 = RES1;
}

/// MPIDR_EL1 bit 31, RES1.
pub const MPIDR_RES1: u64 = 1 << 31;
/// The affinity fields of MPIDR_EL1 (Aff3 in 39:32, Aff2..Aff0 in 23:0):
/// the only bits a PSCI `target_cpu` / `target_affinity` may have set.
pub const MPIDR_HWID_MASK: u64 = 0xff_00ff_ffff;
/// The number of vCPUs the affinity layout of [`mpidr_affinity`] can name
/// without reusing a value (Aff0: 4 bits, Aff1 and Aff2: 8 bits each).
pub const MAX_VCPUS: usize = 1 << 20;

/// The affinity value of vCPU `index`: Aff0 = `index & 0xf`,
/// Aff1 = `(index >> 4) & 0xff`, Aff2 = `(index >> 12) & 0xff`, Aff3 = 0.
///
/// This is KVM's layout: Aff0 only takes 16 values because a GICv3 SGI
/// (ICC_SGI1R_EL1) targets at most 16 CPUs of one Aff0 cluster by a bitmap.
/// The value is what PSCI `CPU_ON`/`AFFINITY_INFO` take and what the device
/// tree's `/cpus/cpu@N` `reg` property holds; MPIDR_EL1 is this value with
/// bit 31 set ([`mpidr_el1`]).
///
/// Indices at or above [`MAX_VCPUS`] wrap; VM creation must reject them.
pub const fn mpidr_affinity(index: usize) -> u64 {
    let i = index as u64;
    (i & 0xf) | (((i >> 4) & 0xff) << 8) | (((i >> 12) & 0xff) << 16)
}

/// The MPIDR_EL1 value vCPU `index` reads: [`mpidr_affinity`] plus the RES1
/// bit 31 (U = 0: part of a multiprocessor system; MT = 0).
pub const fn mpidr_el1(index: usize) -> u64 {
    mpidr_affinity(index) | MPIDR_RES1
}

/// A vCPU's general-purpose registers, PC and PSTATE (the same shape as
/// Linux's `struct user_pt_regs`).
///
/// Layout (`#[repr(C)]`, all `u64`, 272 bytes): `x[0..31]` at 0..248,
/// `sp` at [`GuestGprs::SP_OFFSET`] (248), `pc` at
/// [`GuestGprs::PC_OFFSET`] (256), `pstate` at
/// [`GuestGprs::PSTATE_OFFSET`] (264).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestGprs {
    /// X0..X30.
    pub x: [u64; 31],
    /// SP_EL0 (the EL1 stack pointer SP_EL1 lives in [`El1SysRegs`]).
    pub sp: u64,
    /// The address the vCPU resumes at (ELR_EL2 on the real machine).
    pub pc: u64,
    /// PSTATE (SPSR_EL2 on the real machine); see [`pstate`].
    pub pstate: u64,
}

impl GuestGprs {
    /// Byte offset of `sp`.
    pub const SP_OFFSET: usize = 248;
    /// Byte offset of `pc`.
    pub const PC_OFFSET: usize = 256;
    /// Byte offset of `pstate`.
    pub const PSTATE_OFFSET: usize = 264;
    /// Size in bytes.
    pub const SIZE: usize = 272;
}

const _: () = {
    assert!(offset_of!(GuestGprs, x) == 0);
    assert!(offset_of!(GuestGprs, sp) == GuestGprs::SP_OFFSET);
    assert!(offset_of!(GuestGprs, pc) == GuestGprs::PC_OFFSET);
    assert!(offset_of!(GuestGprs, pstate) == GuestGprs::PSTATE_OFFSET);
    assert!(size_of::<GuestGprs>() == GuestGprs::SIZE);
};

/// The EL1 (and EL0-context) system registers a world switch saves and
/// restores for a vCPU, plus its virtual timer.
///
/// Layout: `#[repr(C)]`, one `u64` per field in declaration order, so
/// field `n` is at byte `8 * n`; [`El1SysRegs::SIZE`] bytes in all. The
/// field order is the save/restore order of the world switch.
///
/// Reset values ([`El1SysRegs::reset`]): SCTLR_EL1 = [`sctlr::RESET`]
/// (MMU off, little-endian unless asked otherwise); MPIDR_EL1 as given;
/// everything else 0. Most of these registers are architecturally UNKNOWN
/// at reset; 0 is the deterministic choice KVM also makes. In particular
/// CPACR_EL1 = 0 traps FP/SIMD at EL1 until the guest enables it (Linux does
/// in `__cpu_setup`; bare-metal payloads must set CPACR_EL1.FPEN themselves),
/// and the virtual timer is disabled with CVAL 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct El1SysRegs {
    /// SCTLR_EL1.
    pub sctlr_el1: u64,
    /// CPACR_EL1.
    pub cpacr_el1: u64,
    /// TTBR0_EL1.
    pub ttbr0_el1: u64,
    /// TTBR1_EL1.
    pub ttbr1_el1: u64,
    /// TCR_EL1.
    pub tcr_el1: u64,
    /// MAIR_EL1.
    pub mair_el1: u64,
    /// AMAIR_EL1.
    pub amair_el1: u64,
    /// VBAR_EL1.
    pub vbar_el1: u64,
    /// CONTEXTIDR_EL1.
    pub contextidr_el1: u64,
    /// ESR_EL1.
    pub esr_el1: u64,
    /// FAR_EL1.
    pub far_el1: u64,
    /// AFSR0_EL1.
    pub afsr0_el1: u64,
    /// AFSR1_EL1.
    pub afsr1_el1: u64,
    /// PAR_EL1.
    pub par_el1: u64,
    /// TPIDR_EL0.
    pub tpidr_el0: u64,
    /// TPIDRRO_EL0.
    pub tpidrro_el0: u64,
    /// TPIDR_EL1.
    pub tpidr_el1: u64,
    /// SP_EL1.
    pub sp_el1: u64,
    /// ELR_EL1.
    pub elr_el1: u64,
    /// SPSR_EL1.
    pub spsr_el1: u64,
    /// CNTKCTL_EL1.
    pub cntkctl_el1: u64,
    /// MDSCR_EL1.
    pub mdscr_el1: u64,
    /// CSSELR_EL1.
    pub csselr_el1: u64,
    /// The MPIDR_EL1 value the guest reads (VMPIDR_EL2 on the real machine).
    pub mpidr_el1: u64,
    /// CNTV_CTL_EL0 (virtual timer control).
    pub cntv_ctl_el0: u64,
    /// CNTV_CVAL_EL0 (virtual timer compare value).
    pub cntv_cval_el0: u64,
}

impl El1SysRegs {
    /// Number of registers (all `u64`).
    pub const COUNT: usize = 26;
    /// Size in bytes.
    pub const SIZE: usize = Self::COUNT * 8;

    /// The architectural reset state of a vCPU whose MPIDR_EL1 reads
    /// `mpidr_el1`, with SCTLR_EL1.EE and .E0E set if `big_endian`.
    pub const fn reset(mpidr_el1: u64, big_endian: bool) -> Self {
        let mut sctlr_el1 = sctlr::RESET;
        if big_endian {
            sctlr_el1 |= sctlr::EE | sctlr::E0E;
        }
        El1SysRegs {
            sctlr_el1,
            cpacr_el1: 0,
            ttbr0_el1: 0,
            ttbr1_el1: 0,
            tcr_el1: 0,
            mair_el1: 0,
            amair_el1: 0,
            vbar_el1: 0,
            contextidr_el1: 0,
            esr_el1: 0,
            far_el1: 0,
            afsr0_el1: 0,
            afsr1_el1: 0,
            par_el1: 0,
            tpidr_el0: 0,
            tpidrro_el0: 0,
            tpidr_el1: 0,
            sp_el1: 0,
            elr_el1: 0,
            spsr_el1: 0,
            cntkctl_el1: 0,
            mdscr_el1: 0,
            csselr_el1: 0,
            mpidr_el1,
            cntv_ctl_el0: 0,
            cntv_cval_el0: 0,
        }
    }

    /// Whether the vCPU's EL1 data accesses are big-endian (SCTLR_EL1.EE):
    /// the endianness a PSCI caller passes on to a vCPU it powers on.
    pub const fn is_big_endian(&self) -> bool {
        self.sctlr_el1 & sctlr::EE != 0
    }
}

const _: () = {
    assert!(size_of::<El1SysRegs>() == El1SysRegs::SIZE);
    assert!(offset_of!(El1SysRegs, sctlr_el1) == 0);
    assert!(offset_of!(El1SysRegs, mpidr_el1) == 23 * 8);
    assert!(offset_of!(El1SysRegs, cntv_cval_el0) == 25 * 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpidr_layout_matches_kvm() {
        assert_eq!(mpidr_affinity(0), 0);
        assert_eq!(mpidr_affinity(15), 0xf);
        assert_eq!(mpidr_affinity(16), 0x100);
        assert_eq!(mpidr_affinity(17), 0x101);
        assert_eq!(mpidr_affinity(0x1234), 0x01_23_04);
        assert_eq!(mpidr_el1(3), 0x8000_0003);
        assert_eq!(mpidr_affinity(MAX_VCPUS - 1) & !MPIDR_HWID_MASK, 0);
    }

    #[test]
    fn mpidr_affinity_is_injective_below_max_vcpus() {
        // Spot-check the field boundaries: distinct indices, distinct values.
        let idx = [0usize, 1, 15, 16, 255, 256, 4095, 4096, 4097, MAX_VCPUS - 1];
        for (n, a) in idx.iter().enumerate() {
            for b in &idx[n + 1..] {
                assert_ne!(mpidr_affinity(*a), mpidr_affinity(*b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn reset_values_are_architectural() {
        let r = El1SysRegs::reset(mpidr_el1(1), false);
        assert_eq!(r.sctlr_el1, 0x30d0_0800);
        assert_eq!(r.sctlr_el1 & sctlr::M, 0);
        assert!(!r.is_big_endian());
        assert_eq!(r.mpidr_el1, 0x8000_0001);
        let be = El1SysRegs::reset(0, true);
        assert!(be.is_big_endian());
        assert_eq!(be.sctlr_el1, 0x30d0_0800 | (1 << 25) | (1 << 24));
        assert_eq!(pstate::RESET, 0x3c5);
    }
}
