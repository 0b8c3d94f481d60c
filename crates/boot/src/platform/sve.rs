//! SVE at EL2: the CPU's maximum vector length, and a vCPU's SVE register
//! file (Z0-Z31, P0-P15, FFR, `ZCR_EL1`) for the world switch.
//!
//! The world switch ([`super::switch`]) switches the SVE state of a VM that
//! has SVE lazily, as KVM does: each run enters the guest with
//! `CPTR_EL2.TZ` set (FP/SIMD is switched eagerly), so the guest's first
//! SVE instruction or `ZCR_EL1` access of the run traps to EL2 (EC 0x19).
//! The run's loop answers that trap without a full exit ([`lazy_load`]):
//! the guest's current V registers (just stored by the exit) become the
//! low 128 bits of the saved Z, `ZCR_EL2.LEN` and `ZCR_EL1` are loaded,
//! TZ is cleared and the guest re-enters at the trapping instruction with
//! `GuestRegs.sve` set, so that the entry/exit assembly loads Z/P/FFR
//! after q0-q31 (`__sve_load`) and stores them after q0-q31
//! (`__sve_save`) for the rest of the run, and the final exit leaves them
//! in the save area. A run in which the guest uses no SVE moves only
//! q0-q31.
//!
//! V and Z agree in both directions: while Z/P/FFR are loaded, the exit
//! stores q0-q31 and then Z (the same low 128 bits); while they are not,
//! the V registers in `GuestRegs` are the authority for the low 128 bits
//! and the lazy load merges them into the save area. A V register that
//! changed since the save (an FP/SIMD write, which architecturally zeroes
//! the Z register's upper bits) gets its upper bits zeroed; an unchanged
//! one keeps them. The transfers run with `ZCR_EL2.LEN` at the VM's
//! vector length, so the area holds exactly that many bytes per register.
//! EL2 code uses only FP/SIMD (writes to V zero the upper bits of Z:
//! harmless, the guest's Z were saved before any EL2 Rust code runs).

use alloc::vec;
use alloc::vec::Vec;
use core::arch::{asm, global_asm};

use pkvm_sysreg::traps::cptr;
use pkvm_sysreg::SVE_VL_ARCH_MAX;

use super::switch::{Exit, EXIT_SYNC};

use crate::{read_sysreg, write_sysreg};

/// The guest registers this module switches besides Z/P/FFR (checked
/// against pkvm-sysreg's `SWITCHED` list at boot).
pub const SVE_HERE: &[&str] = &["zcr_el1"];

/// Bytes of the SVE save area for a vector length of `vl` bytes: 32 Z
/// registers of `vl` bytes, 16 P registers and FFR of `vl / 8` bytes.
pub const fn area_bytes(vl: u16) -> usize {
    let vl = vl as usize;
    32 * vl + 17 * (vl / 8)
}

/// The current vector length at EL2 in bytes (`RDVL`). `CPTR_EL2.TZ` must
/// be clear.
fn rdvl() -> u64 {
    let v: u64;
    // SAFETY: RDVL only reads the vector length into a register; the
    // caller has cleared CPTR_EL2.TZ so it does not trap.
    unsafe {
        asm!(".arch_extension sve", "rdvl {}, #1", out(reg) v,
             options(nomem, nostack, preserves_flags))
    };
    v
}

/// The CPU's largest SVE vector length in bytes: `ZCR_EL2.LEN` set to its
/// maximum (the CPU clamps the effective length to what it implements),
/// read back with `RDVL`. Call only when `ID_AA64PFR0_EL1.SVE` says the CPU
/// has SVE. `CPTR_EL2` is left as it was found; `ZCR_EL2` keeps the
/// maximum (every entry of a VM with SVE writes its own).
pub fn probe_max_vl() -> u16 {
    let saved = read_sysreg!("cptr_el2");
    write_sysreg!("cptr_el2", saved & !cptr::TZ);
    super::sysreg::isb();
    write_sysreg!("S3_4_C1_C2_0", 0xf); // ZCR_EL2.LEN: 2048 bits asked
    super::sysreg::isb();
    let vl = rdvl();
    write_sysreg!("cptr_el2", saved);
    super::sysreg::isb();
    vl.min(u64::from(u16::MAX)) as u16
}

/// One vCPU's SVE registers while it is not running, for a VM with a
/// vector length of `vl` bytes.
pub struct SveRegs {
    vl: u16,
    /// `ZCR_EL1` (the guest's own limit, at most the VM's length).
    pub zcr_el1: u64,
    /// Z0-Z31, P0-P15, FFR in the layout of `STR Z/P [.., #i, MUL VL]`.
    /// Invariant: at least [`area_bytes`]`(SVE_VL_ARCH_MAX)` bytes: room
    /// for any vector length, so that memory safety does not rest on
    /// `ZCR_EL2` holding exactly `vl` (8.5 KiB per vCPU with SVE). Whole
    /// pages of their own ([`AREA_PAGES`]), so that the host can share
    /// exactly them with the hypervisor ([`SveRegs::pages`]).
    area: Vec<AreaPage>,
}

/// One page of a save area.
#[derive(Clone)]
#[repr(C, align(4096))]
struct AreaPage([u128; 256]);

/// Pages of a save area ([`AREA_BYTES`] rounded up).
pub const AREA_PAGES: usize = (AREA_BYTES as usize).div_ceil(4096);

impl SveRegs {
    /// Zeroed registers for vector length `vl` bytes (a power of two in
    /// 16..=256, checked by pkvm-sysreg's policy); `ZCR_EL1` at its reset
    /// value ([`SveRegs::reset`]).
    pub fn new(vl: u16) -> SveRegs {
        debug_assert!(
            vl.is_power_of_two() && (16..=256).contains(&vl),
            "SVE VL {vl}"
        );
        SveRegs {
            vl,
            zcr_el1: zcr_len(vl),
            area: vec![AreaPage([0; 256]); AREA_PAGES],
        }
    }

    /// The vector length in bytes.
    pub fn vl(&self) -> u16 {
        self.vl
    }

    /// Back to the state of a vCPU at reset: registers zero, `ZCR_EL1.LEN`
    /// at the VM's length (architecturally UNKNOWN; the largest, so a guest
    /// that never writes it gets its VM's full length).
    pub fn reset(&mut self) {
        self.area.iter_mut().for_each(|p| p.0.fill(0));
        self.zcr_el1 = zcr_len(self.vl);
    }

    /// The world switch's view of these registers for one run (the save
    /// area by physical address: the identity map, VA == PA, at EL2 and
    /// for the host at EL1). [`SveRegs::after_run`] takes `ZCR_EL1` back.
    pub fn run_view(&mut self) -> SveRun {
        SveRun {
            vl: self.vl,
            zcr_el1: self.zcr_el1,
            area: self.area.as_mut_ptr() as u64,
        }
    }

    /// The save area's pages: the first one's physical address (the
    /// identity map) and their count, [`AREA_PAGES`].
    pub fn pages(&self) -> (u64, usize) {
        (self.area.as_ptr() as u64, AREA_PAGES)
    }

    /// `ZCR_EL1` as the run left it (`run` from [`SveRegs::run_view`]).
    pub fn after_run(&mut self, zcr_el1: u64) {
        self.zcr_el1 = zcr_el1;
    }
}

/// Bytes of every save area ([`SveRegs`]): room for the architecture's
/// largest vector length, whatever length a run uses.
pub const AREA_BYTES: u64 = area_bytes(SVE_VL_ARCH_MAX) as u64;

/// A vCPU's SVE registers as one world switch uses them: the VM's vector
/// length, `ZCR_EL1`, and the address of a save area of [`AREA_BYTES`]
/// (16-byte aligned, RAM, identity-mapped, not the hypervisor's memory:
/// checked by [`SveRun::checked`] when it comes from a host's run block).
#[derive(Clone, Copy, Debug)]
pub struct SveRun {
    vl: u16,
    /// `ZCR_EL1`.
    pub zcr_el1: u64,
    area: u64,
}

impl SveRun {
    /// The view for vector length `vl` bytes over the area at `area`, when
    /// `vl` is a power of two in 16..=256 and `area_ok` accepts the
    /// 16-byte aligned range `[area, area + AREA_BYTES)`.
    pub fn checked(
        vl: u64,
        zcr_el1: u64,
        area: u64,
        area_ok: impl FnOnce(u64, u64) -> bool,
    ) -> Option<SveRun> {
        let ok_vl = vl.is_power_of_two() && (16..=u64::from(SVE_VL_ARCH_MAX)).contains(&vl);
        (ok_vl && area.is_multiple_of(16) && area_ok(area, AREA_BYTES)).then_some(SveRun {
            vl: vl as u16,
            zcr_el1,
            area,
        })
    }

    /// Makes the low 128 bits of each saved Z register the guest's current
    /// V register (`v`: q0-q31 as the exit stored them); a Z register whose
    /// low bits change gets its upper bits zeroed, as an FP/SIMD write
    /// does on hardware.
    /// The save area's physical address.
    pub fn area(&self) -> u64 {
        self.area
    }

    /// The vector length in bytes.
    pub fn vl(&self) -> u16 {
        self.vl
    }

    fn merge_v(&mut self, v: &[u128; 32]) {
        let per = usize::from(self.vl) / 16;
        let words = AREA_BYTES as usize / 16;
        // SAFETY: `area` is 16-byte aligned and `[area, area + AREA_BYTES)`
        // is RAM identity-mapped read-write at EL2 (a `SveRegs` area, or
        // checked by `SveRun::checked`); u128 has no invalid bit patterns.
        // Another CPU writing it meanwhile (a hostile host) changes only
        // the guest's register values.
        let area = unsafe { core::slice::from_raw_parts_mut(self.area as *mut u128, words) };
        for (n, &q) in v.iter().enumerate() {
            let Some(z) = area.get_mut(n * per..(n + 1) * per) else {
                return;
            };
            if z[0] != q {
                z[0] = q;
                z[1..].fill(0);
            }
        }
    }
}

impl core::fmt::Debug for SveRegs {
    /// The length and `ZCR_EL1`, not the 8.5 KiB of registers.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SveRegs")
            .field("vl", &self.vl)
            .field("zcr_el1", &self.zcr_el1)
            .finish_non_exhaustive()
    }
}

/// `ZCR_ELx.LEN` for `vl` bytes.
const fn zcr_len(vl: u16) -> u64 {
    (vl / 16) as u64 - 1
}

/// With `CPTR_EL2.TZ` clear and synchronised (ISB): the VM's vector length
/// into `ZCR_EL2` and the vCPU's `ZCR_EL1` (an ISB makes them take effect).
fn load(s: &SveRun) {
    write_sysreg!("S3_4_C1_C2_0", zcr_len(s.vl));
    write_sysreg!("S3_0_C1_C2_0", s.zcr_el1);
}

/// Exception class of a trapped SVE instruction or `ZCR_EL1` access
/// (`CPTR_EL2.TZ`).
pub const EC_SVE: u64 = 0x19;

/// Whether `exit` is the trap of a guest's SVE use (`CPTR_EL2.TZ`).
pub(super) fn is_sve_trap(exit: &Exit) -> bool {
    exit.kind == EXIT_SYNC && (exit.esr >> 26) & 0x3f == EC_SVE
}

/// The lazy load, on the world switch's loop after the guest's first SVE
/// use of a run trapped (the guest's registers are stored in memory, its
/// EL1 state is loaded): the V registers `v` are merged into the save
/// area ([`SveRun::merge_v`]), `CPTR_EL2.TZ` is cleared, `ZCR_EL2.LEN`
/// set to the VM's length and the vCPU's `ZCR_EL1` loaded. Returns the
/// area's address for `GuestRegs.sve`: the next entry loads Z/P/FFR from
/// it, and every exit of the run stores them there. The caller re-enters
/// at the trapping instruction (its PC is unchanged).
pub(super) fn lazy_load(s: &mut SveRun, v: &[u128; 32]) -> u64 {
    s.merge_v(v);
    write_sysreg!("cptr_el2", read_sysreg!("cptr_el2") & !cptr::TZ);
    super::sysreg::isb();
    load(s);
    super::sysreg::isb();
    s.area
}

/// After a guest exit of a run whose Z/P/FFR were loaded: the vCPU's
/// `ZCR_EL1` (Z/P/FFR were stored by the exit).
pub(super) fn save(s: &mut SveRun) {
    s.zcr_el1 = read_sysreg!("S3_0_C1_C2_0");
}

// `__sve_load` / `__sve_save`: x3 = the save area; use x3 and x4 only
// (plus Z/P/FFR), return with `ret` (called with `bl` from the world
// switch, which saved x30). Run at EL2 with CPTR_EL2.TZ clear and
// ZCR_EL2.LEN at the area's vector length.
global_asm!(
    r#"
.arch_extension sve
.section .text
.global __sve_load
__sve_load:
    // FFR first (through p0, loaded again below), then P, then Z.
    addvl   x4, x3, #16
    addvl   x4, x4, #16
    addpl   x4, x4, #16
    ldr     p0, [x4]
    wrffr   p0.b
    addvl   x4, x3, #16
    addvl   x4, x4, #16
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    ldr     p\n, [x4, #\n, mul vl]
    .endr
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    ldr     z\n, [x3, #\n, mul vl]
    .endr
    ret

.global __sve_save
__sve_save:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    str     z\n, [x3, #\n, mul vl]
    .endr
    addvl   x4, x3, #16
    addvl   x4, x4, #16
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    str     p\n, [x4, #\n, mul vl]
    .endr
    // FFR last, through p0 (already saved).
    addpl   x4, x4, #16
    rdffr   p0.b
    str     p0, [x4]
    ret
"#
);
