//! The world switch between the hypervisor (EL2) and a guest (EL1/EL0).
//!
//! [`run`] loads the VM's stage-2 configuration (VTCR, VTTBR), its trap
//! controls (`HCR_EL2`, `CPTR_EL2`, `MDCR_EL2`, `CNTHCTL_EL2`, `MPAM2_EL2`:
//! pkvm-sysreg's policy, computed per VM as [`TrapControls`]) and the
//! vCPU's EL1 state (system registers, timer, pointer-authentication keys)
//! and its virtual GIC CPU interface ([`GicCpu`]: list registers,
//! `ICH_HCR_EL2`, `ICH_VMCR_EL2`, `ICH_AP0R/AP1R<n>_EL2`, as many as
//! `ICH_VTR_EL2` says this CPU has), then `__guest_enter` saves the host's callee-saved registers (x19-x30,
//! d8-d15) on the EL2 stack, records the stack pointer and the vCPU's
//! [`GuestRegs`] in the per-CPU data, loads the guest's FP/SIMD and general
//! registers and `eret`s. Any exception from the guest lands in
//! `__guest_exit` (via the vectors), which stores the guest's registers
//! back, restores the host's and returns the vector index. [`run`] then
//! reads the syndrome registers and saves the EL1 state and the virtual
//! CPU interface, which it then turns off (`ICH_HCR_EL2` = 0, list
//! registers cleared) so no maintenance interrupt stays asserted at EL2.
//!
//! The host runs no EL1 code, so EL1 registers need no host copy; EL2 Rust
//! code may use FP/SIMD registers, so guest q0-q31 are switched eagerly;
//! the SVE registers of a VM with SVE lazily ([`super::sve`]: each run
//! enters with `CPTR_EL2.TZ` set; the guest's first SVE use traps, [`run`]'s
//! loop loads `ZCR_EL2.LEN`, `ZCR_EL1` and, through the entry assembly,
//! Z0-Z31, P0-P15 and FFR after q0-q31, and from then on every exit of
//! the run stores them after q0-q31). The
//! host's own FP state is only EL2's callee-saved d8-d15, kept on the
//! stack across the guest run.
//!
//! Which EL1 registers are switched follows pkvm-sysreg's `SWITCHED` list:
//! the registers the policy traps (`ACTLR_EL1` by `HCR_EL2.TACR`,
//! `CSSELR_EL1` by `TID2`, `MDSCR_EL1` and the debug registers by
//! `MDCR_EL2.TDA`) live only in the vCPU's `VcpuSysregs` and are not
//! loaded into the hardware (whose copies stay at the values
//! [`init_cpu`] gives them), except the debug state of a guest whose debug
//! is active ([`VcpuState::debug`]): loaded before entry, disabled again
//! after exit (`MDSCR_EL1` = 0, breakpoints and watchpoints off), so its
//! breakpoints, watchpoints and single-step fire while it runs and no
//! other guest ever runs with them. The trap controls are not restored at exit:
//! they act on EL0/EL1 only, except `CPTR_EL2` (TZ/TSM/TTA also trap EL2,
//! which uses no SVE outside the switch, SME or trace; TFP stays clear for
//! the EL2 FP/SIMD code) and `MDCR_EL2` (HPMD/HCCD prohibit counting at EL2, which the
//! hypervisor wants anyway).

use core::arch::global_asm;
use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_sysreg::traps::{cptr, TrapControls};
use pkvm_sysreg::{GuestDebug, MAX_POINTS};

use super::sve::{self, SveRun};
use crate::{read_sysreg, update_sysreg, write_sysreg};

/// Guest general-purpose, PC, PSTATE and FP/SIMD registers (used by asm).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuestRegs {
    /// x0..x30.
    pub x: [u64; 31],
    /// PC (ELR_EL2 on exit).
    pub pc: u64,
    /// PSTATE (SPSR_EL2 on exit).
    pub pstate: u64,
    _pad: u64,
    /// q0..q31.
    pub v: [u128; 32],
    /// FPSR.
    pub fpsr: u64,
    /// FPCR.
    pub fpcr: u64,
    /// Address of the vCPU's SVE save area while [`run`] runs a vCPU of a
    /// VM with SVE ([`SveRun`]) whose Z/P/FFR it has loaded (lazily, at
    /// the guest's first SVE use of the run), else 0: the entry loads
    /// Z/P/FFR from it after q0-q31, the exit stores them after q0-q31.
    sve: u64,
    /// The value a trapped `CTR_EL0` read returns on the vectors' own
    /// path (`__guest_ctr_read`, without a world switch); 0: such reads
    /// exit like any other trap.
    pub ctr_el0: u64,
    /// `CTR_EL0` reads answered there since the owner last took the count.
    pub ctr_reads: u64,
}

const _: () = assert!(offset_of!(GuestRegs, pc) == 248);
const _: () = assert!(offset_of!(GuestRegs, pstate) == 256);
const _: () = assert!(offset_of!(GuestRegs, v) == 272);
const _: () = assert!(offset_of!(GuestRegs, fpsr) == 784);
const _: () = assert!(offset_of!(GuestRegs, fpcr) == 792);
const _: () = assert!(offset_of!(GuestRegs, sve) == 800);
const _: () = assert!(offset_of!(GuestRegs, ctr_el0) == 808);
const _: () = assert!(offset_of!(GuestRegs, ctr_reads) == 816);

impl Default for GuestRegs {
    fn default() -> Self {
        GuestRegs {
            x: [0; 31],
            pc: 0,
            pstate: PSTATE_EL1H_MASKED,
            _pad: 0,
            v: [0; 32],
            fpsr: 0,
            fpcr: 0,
            sve: 0,
            ctr_el0: 0,
            ctr_reads: 0,
        }
    }
}

/// PSTATE for EL1h with D, A, I, F masked (the architectural reset state).
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;

global_asm!(
    r#"
.section .text
.global __guest_enter
__guest_enter:
    // x0 = &mut GuestRegs. Save host callee-saved state.
    stp     x29, x30, [sp, #-16]!
    stp     x27, x28, [sp, #-16]!
    stp     x25, x26, [sp, #-16]!
    stp     x23, x24, [sp, #-16]!
    stp     x21, x22, [sp, #-16]!
    stp     x19, x20, [sp, #-16]!
    stp     d14, d15, [sp, #-16]!
    stp     d12, d13, [sp, #-16]!
    stp     d10, d11, [sp, #-16]!
    stp     d8, d9, [sp, #-16]!
    mrs     x1, tpidr_el2
    mov     x2, sp
    str     x2, [x1, #0]
    str     x0, [x1, #8]
    // Guest FP/SIMD.
    add     x2, x0, #272
    ldp     q0, q1, [x2, #0]
    ldp     q2, q3, [x2, #32]
    ldp     q4, q5, [x2, #64]
    ldp     q6, q7, [x2, #96]
    ldp     q8, q9, [x2, #128]
    ldp     q10, q11, [x2, #160]
    ldp     q12, q13, [x2, #192]
    ldp     q14, q15, [x2, #224]
    ldp     q16, q17, [x2, #256]
    ldp     q18, q19, [x2, #288]
    ldp     q20, q21, [x2, #320]
    ldp     q22, q23, [x2, #352]
    ldp     q24, q25, [x2, #384]
    ldp     q26, q27, [x2, #416]
    ldp     q28, q29, [x2, #448]
    ldp     q30, q31, [x2, #480]
    // Guest SVE (a VM with SVE): Z/P/FFR over the V registers just loaded.
    ldr     x3, [x0, #800]
    cbz     x3, 1f
    bl      __sve_load
1:  ldr     x3, [x0, #784]
    msr     fpsr, x3
    ldr     x3, [x0, #792]
    msr     fpcr, x3
    ldr     x3, [x0, #248]
    msr     elr_el2, x3
    ldr     x3, [x0, #256]
    msr     spsr_el2, x3
    // Guest GPRs.
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret

.global __guest_exit
__guest_exit:
    // x0 = vector index; guest x0, x1 at [sp]; other GPRs are the guest's.
    mrs     x1, tpidr_el2
    ldr     x1, [x1, #8]
    stp     x2, x3, [x1, #16]
    stp     x4, x5, [x1, #32]
    stp     x6, x7, [x1, #48]
    stp     x8, x9, [x1, #64]
    stp     x10, x11, [x1, #80]
    stp     x12, x13, [x1, #96]
    stp     x14, x15, [x1, #112]
    stp     x16, x17, [x1, #128]
    stp     x18, x19, [x1, #144]
    stp     x20, x21, [x1, #160]
    stp     x22, x23, [x1, #176]
    stp     x24, x25, [x1, #192]
    stp     x26, x27, [x1, #208]
    stp     x28, x29, [x1, #224]
    str     x30, [x1, #240]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x1, #0]
    mrs     x2, elr_el2
    str     x2, [x1, #248]
    mrs     x2, spsr_el2
    str     x2, [x1, #256]
    add     x2, x1, #272
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]
    mrs     x3, fpsr
    str     x3, [x1, #784]
    mrs     x3, fpcr
    str     x3, [x1, #792]
    // Guest SVE (a VM with SVE): Z/P/FFR, before any EL2 code touches V.
    ldr     x3, [x1, #800]
    cbz     x3, 2f
    bl      __sve_save
2:
    // Host state back.
    mrs     x1, tpidr_el2
    ldr     x2, [x1, #0]
    mov     sp, x2
    str     xzr, [x1, #8]
    ldp     d8, d9, [sp], #16
    ldp     d10, d11, [sp], #16
    ldp     d12, d13, [sp], #16
    ldp     d14, d15, [sp], #16
    ldp     x19, x20, [sp], #16
    ldp     x21, x22, [sp], #16
    ldp     x23, x24, [sp], #16
    ldp     x25, x26, [sp], #16
    ldp     x27, x28, [sp], #16
    ldp     x29, x30, [sp], #16
    ret
"#
);

extern "C" {
    fn __guest_enter(regs: *mut GuestRegs) -> u64;
}

/// EL1 system registers of a vCPU.
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct El1Sysregs {
    pub sctlr: u64,
    pub cpacr: u64,
    pub ttbr0: u64,
    pub ttbr1: u64,
    pub tcr: u64,
    pub esr: u64,
    pub afsr0: u64,
    pub afsr1: u64,
    pub far: u64,
    pub mair: u64,
    pub amair: u64,
    pub vbar: u64,
    pub contextidr: u64,
    pub tpidr_el1: u64,
    pub tpidr_el0: u64,
    pub tpidrro_el0: u64,
    pub sp_el1: u64,
    pub sp_el0: u64,
    pub elr: u64,
    pub spsr: u64,
    pub par: u64,
    pub cntkctl: u64,
}

/// SCTLR_EL1 at reset: MMU and caches off, RES1 bits set.
pub const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

impl El1Sysregs {
    /// The architectural reset state used for a new vCPU.
    pub fn reset() -> Self {
        El1Sysregs {
            sctlr: SCTLR_EL1_RESET,
            ..Default::default()
        }
    }
}

macro_rules! sysregs_xfer {
    ($s:ident, $dir:ident; $($f:ident = $r:literal),* $(,)?) => {
        $( sysregs_xfer!(@one $s, $dir, $f, $r); )*
    };
    (@one $s:ident, load, $f:ident, $r:literal) => { update_sysreg!($r, $s.$f) };
    (@one $s:ident, save, $f:ident, $r:literal) => { $s.$f = read_sysreg!($r) };
}

/// The EL1 registers of [`El1Sysregs`], one list for the transfers and
/// for [`SWITCHED_HERE`].
macro_rules! el1_list {
    ($m:ident!($($a:tt)*)) => {
        $m!($($a)*;
            sctlr = "sctlr_el1", cpacr = "cpacr_el1", ttbr0 = "ttbr0_el1",
            ttbr1 = "ttbr1_el1", tcr = "tcr_el1", esr = "esr_el1", afsr0 = "afsr0_el1",
            afsr1 = "afsr1_el1", far = "far_el1", mair = "mair_el1", amair = "amair_el1",
            vbar = "vbar_el1", contextidr = "contextidr_el1", tpidr_el1 = "tpidr_el1",
            tpidr_el0 = "tpidr_el0", tpidrro_el0 = "tpidrro_el0", sp_el1 = "sp_el1",
            sp_el0 = "sp_el0", elr = "elr_el1", spsr = "spsr_el1", par = "par_el1",
            cntkctl = "cntkctl_el1",
        )
    };
}

macro_rules! names {
    (; $($f:ident = $r:literal),* $(,)?) => { &[$($r),*] };
}

/// The guest registers this world switch saves and restores, by
/// architectural name (lower case): the [`El1Sysregs`] list, FP control,
/// the virtual timer, and the optional state of [`OptRegs`]; the
/// pointer-authentication keys are [`PAC_KEYS_HERE`]. pkvm-sysreg's
/// `SWITCHED` list is checked against these at boot
/// (`vmm::sysregs::check_switched`).
pub const SWITCHED_HERE: &[&str] = {
    const EL1: &[&str] = el1_list!(names!());
    const N: usize = EL1.len() + 6;
    const ALL: [&str; N] = {
        let mut a = [""; N];
        let mut i = 0;
        while i < EL1.len() {
            a[i] = EL1[i];
            i += 1;
        }
        a[i] = "fpcr";
        a[i + 1] = "fpsr";
        a[i + 2] = "cntv_ctl_el0";
        a[i + 3] = "cntv_cval_el0";
        a[i + 4] = "tpidr2_el0";
        a[i + 5] = "smpri_el1";
        a
    };
    &ALL
};

/// The pointer-authentication key registers switched when the VM has
/// pointer authentication ([`PacKeys`], in order).
pub const PAC_KEYS_HERE: &[&str] = &[
    "apiakeylo_el1",
    "apiakeyhi_el1",
    "apibkeylo_el1",
    "apibkeyhi_el1",
    "apdakeylo_el1",
    "apdakeyhi_el1",
    "apdbkeylo_el1",
    "apdbkeyhi_el1",
    "apgakeylo_el1",
    "apgakeyhi_el1",
];

/// The EL2 registers the world switch loads per vCPU or per VM, standing
/// in for guest registers.
pub const EL2_HERE: &[&str] = &["vpidr_el2", "vmpidr_el2", "cntvoff_el2", "vdisr_el2"];

/// Guest state that exists only with an optional host feature: switched
/// when the host has it, although the VM is never offered the feature,
/// because no coarse trap covers these registers (pkvm-sysreg's `SWITCHED`
/// entries with `When::Host`).
#[derive(Clone, Copy, Debug, Default)]
pub struct OptRegs {
    /// TPIDR2_EL0 (FEAT_SME).
    pub tpidr2_el0: u64,
    /// SMPRI_EL1 (FEAT_SME).
    pub smpri_el1: u64,
    /// VDISR_EL2 (FEAT_RAS; the guest's DISR_EL1 with HCR_EL2.AMO set).
    pub vdisr_el2: u64,
}

/// Guest virtual timer state.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimerState {
    /// CNTV_CTL_EL0.
    pub ctl: u64,
    /// CNTV_CVAL_EL0.
    pub cval: u64,
    /// CNTVOFF_EL2 (per VM).
    pub voff: u64,
}

/// The guest's GIC CPU interface as the hypervisor holds it between runs
/// (the virtual CPU interface registers, `ICH_*_EL2`): what [`run`] loads
/// before entry and saves after exit. The VMM fills `lrs`/`hcr` from the
/// vGIC before each entry and folds `lrs` back after it; `vmcr` and the
/// active-priority registers are the guest's own CPU interface state
/// (priority mask, binary points, group enables, EOImode; active
/// priorities) and only pass through.
#[derive(Clone, Copy, Debug, Default)]
pub struct GicCpu {
    /// `ICH_LR<n>_EL2` (the first [`gic_lrs`] are used).
    pub lrs: [u64; 16],
    /// `ICH_HCR_EL2` for the next entry (En, UIE, NPIE).
    pub hcr: u64,
    /// `ICH_VMCR_EL2`.
    pub vmcr: u64,
    /// `ICH_AP0R<n>_EL2` (the first [`gic_aprs`] are used).
    pub ap0r: [u64; 4],
    /// `ICH_AP1R<n>_EL2`.
    pub ap1r: [u64; 4],
}

/// `ICH_HCR_EL2.En`: the virtual CPU interface is on.
pub const ICH_HCR_EN: u64 = 1 << 0;
/// `ICH_HCR_EL2.UIE`: maintenance interrupt when at most one list register
/// holds a valid interrupt.
pub const ICH_HCR_UIE: u64 = 1 << 1;
/// `ICH_HCR_EL2.NPIE`: maintenance interrupt when no list register holds a
/// pending interrupt.
pub const ICH_HCR_NPIE: u64 = 1 << 3;

/// [`gic_lrs`] and [`gic_aprs`] as [`cache_gic_counts`] found them on the
/// first CPU whose GIC CPU interface was set up (`lrs | aprs << 8`; 0: not
/// yet): what the host, which cannot read `ICH_VTR_EL2` from EL1, sizes
/// its vGIC's list-register view with.
static GIC_COUNTS: AtomicU64 = AtomicU64::new(0);

/// Records [`gic_lrs`] and [`gic_aprs`] for [`gic_counts`] (at EL2 with
/// the CPU interface's system registers enabled, right after
/// `ICC_SRE_EL2` is written; nothing below EL2, where `ICH_VTR_EL2` does
/// not exist; the first call wins: the CPUs of a machine have the same
/// counts).
pub fn cache_gic_counts() {
    if !super::hw::at_el2() {
        return;
    }
    let counts = gic_lrs() as u64 | (gic_aprs() as u64) << 8;
    let _ = GIC_COUNTS.compare_exchange(0, counts, Ordering::Relaxed, Ordering::Relaxed);
}

/// The number of list registers and of active-priority registers per
/// group, cached at boot ([`GIC_COUNTS`]); readable at EL1.
pub fn gic_counts() -> (usize, usize) {
    let v = GIC_COUNTS.load(Ordering::Relaxed);
    ((v & 0xff) as usize, (v >> 8) as usize)
}

/// The number of list registers of this CPU (`ICH_VTR_EL2.ListRegs` + 1).
/// EL2 only (the host reads [`gic_counts`]).
pub fn gic_lrs() -> usize {
    (read_sysreg!("S3_4_C12_C11_1") & 0x1f) as usize + 1
}

/// The number of `ICH_AP0R/AP1R<n>_EL2` of this CPU (from
/// `ICH_VTR_EL2.PREbits`: 5 bits -> 1, 6 -> 2, 7 -> 4). EL2 only.
pub fn gic_aprs() -> usize {
    let pre = ((read_sysreg!("S3_4_C12_C11_1") >> 26) & 7) as usize + 1;
    1 << pre.saturating_sub(5).min(2)
}

macro_rules! lr_xfer {
    ($dir:ident, $g:expr, $n:expr; $($i:literal = $r:literal),*) => {
        $( if $i < $n { lr_xfer!(@one $dir, $g.lrs[$i], $r); } )*
    };
    (@one load, $v:expr, $r:literal) => { update_sysreg!($r, $v) };
    (@one save, $v:expr, $r:literal) => { $v = read_sysreg!($r) };
    (@one clear, $v:expr, $r:literal) => { if $v != 0 { write_sysreg!($r, 0) } };
}

macro_rules! all_lrs {
    ($dir:ident, $g:expr, $n:expr) => {
        lr_xfer!($dir, $g, $n;
            0 = "S3_4_C12_C12_0", 1 = "S3_4_C12_C12_1", 2 = "S3_4_C12_C12_2",
            3 = "S3_4_C12_C12_3", 4 = "S3_4_C12_C12_4", 5 = "S3_4_C12_C12_5",
            6 = "S3_4_C12_C12_6", 7 = "S3_4_C12_C12_7", 8 = "S3_4_C12_C13_0",
            9 = "S3_4_C12_C13_1", 10 = "S3_4_C12_C13_2", 11 = "S3_4_C12_C13_3",
            12 = "S3_4_C12_C13_4", 13 = "S3_4_C12_C13_5", 14 = "S3_4_C12_C13_6",
            15 = "S3_4_C12_C13_7")
    };
}

macro_rules! apr_xfer {
    ($dir:ident, $g:expr, $n:expr) => {
        apr_xfer!(@one $dir, $g.ap0r[0], "S3_4_C12_C8_0");
        apr_xfer!(@one $dir, $g.ap1r[0], "S3_4_C12_C9_0");
        if $n > 1 {
            apr_xfer!(@one $dir, $g.ap0r[1], "S3_4_C12_C8_1");
            apr_xfer!(@one $dir, $g.ap1r[1], "S3_4_C12_C9_1");
        }
        if $n > 2 {
            apr_xfer!(@one $dir, $g.ap0r[2], "S3_4_C12_C8_2");
            apr_xfer!(@one $dir, $g.ap1r[2], "S3_4_C12_C9_2");
            apr_xfer!(@one $dir, $g.ap0r[3], "S3_4_C12_C8_3");
            apr_xfer!(@one $dir, $g.ap1r[3], "S3_4_C12_C9_3");
        }
    };
    (@one load, $v:expr, $r:literal) => { update_sysreg!($r, $v) };
    (@one save, $v:expr, $r:literal) => { $v = read_sysreg!($r) };
}

/// Loads the guest's virtual CPU interface (list registers, VMCR, APRs,
/// then `ICH_HCR_EL2`).
///
/// Each register is written only when it holds another value (as the EL1
/// registers, [`update_sysreg!`]): every write of an `ICH_*_EL2` register
/// makes QEMU's TCG re-evaluate the virtual interrupt lines and leave its
/// translated block, and between two runs the list registers are mostly
/// empty on both sides.
fn load_gic(g: &GicCpu, lrs: usize, aprs: usize) {
    all_lrs!(load, g, lrs);
    apr_xfer!(load, g, aprs);
    update_sysreg!("S3_4_C12_C11_7", g.vmcr);
    update_sysreg!("S3_4_C12_C11_0", g.hcr);
}

/// Saves the guest's virtual CPU interface and turns it off
/// (`ICH_HCR_EL2` = 0 and the list registers cleared: no maintenance
/// interrupt stays asserted while the hypervisor runs).
fn save_gic(g: &mut GicCpu, lrs: usize, aprs: usize) {
    all_lrs!(save, g, lrs);
    apr_xfer!(save, g, aprs);
    g.vmcr = read_sysreg!("S3_4_C12_C11_7");
    update_sysreg!("S3_4_C12_C11_0", 0);
    // Only the list registers that hold something (just read into `g`).
    all_lrs!(clear, g, lrs);
}

/// Pointer-authentication keys (APIA, APIB, APDA, APDB, APGA; lo/hi).
#[derive(Clone, Copy, Debug, Default)]
pub struct PacKeys(pub [u64; 10]);

macro_rules! pac_list {
    ($k:ident, $dir:ident) => {
        pac_list!(@x $k, $dir;
            0 = "S3_0_C2_C1_0", 1 = "S3_0_C2_C1_1", 2 = "S3_0_C2_C1_2", 3 = "S3_0_C2_C1_3",
            4 = "S3_0_C2_C2_0", 5 = "S3_0_C2_C2_1", 6 = "S3_0_C2_C2_2", 7 = "S3_0_C2_C2_3",
            8 = "S3_0_C2_C3_0", 9 = "S3_0_C2_C3_1")
    };
    (@x $k:ident, load; $($i:literal = $r:literal),*) => { $( write_sysreg!($r, $k.0[$i]); )* };
    (@x $k:ident, save; $($i:literal = $r:literal),*) => { $( $k.0[$i] = read_sysreg!($r); )* };
}

/// A vCPU's full architectural state as the world switch sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VcpuState {
    /// General registers (first: the asm uses a pointer to this).
    pub regs: GuestRegs,
    /// EL1 system registers.
    pub sys: El1Sysregs,
    /// Virtual timer.
    pub timer: TimerState,
    /// Pointer-authentication keys.
    pub pac: PacKeys,
    /// VMPIDR_EL2 (what the guest reads as MPIDR_EL1).
    pub vmpidr: u64,
    /// Optional state of the host's features ([`VmRegs::sme`], [`VmRegs::ras`]).
    pub opt: OptRegs,
    /// The virtual GIC CPU interface.
    pub gic: GicCpu,
    /// The guest's debug registers for the next entry, while its debug is
    /// active (pkvm-sysreg's [`guest_debug`]); off: the hardware keeps
    /// the hypervisor's disabled state. Plain integers (no `Option`), so
    /// that every bit pattern is a valid `VcpuState` and the hypervisor
    /// may copy one out of host memory ([`super::hostrun`]).
    pub debug: DebugSlot,
}

impl VcpuState {
    /// The guest's EL1 exception state, as pkvm-sysreg's injections
    /// (`inject_undef`, `inject_sync`) take it.
    pub fn el1_state(&self) -> pkvm_sysreg::El1State {
        pkvm_sysreg::El1State {
            pc: self.regs.pc,
            pstate: self.regs.pstate,
            spsr_el1: self.sys.spsr,
            elr_el1: self.sys.elr,
            esr_el1: self.sys.esr,
            vbar_el1: self.sys.vbar,
            sctlr_el1: self.sys.sctlr,
        }
    }

    /// Writes back what an injection changed ([`VcpuState::el1_state`]'s
    /// PC, PSTATE, `SPSR_EL1`, `ELR_EL1`, `ESR_EL1`).
    pub fn set_el1_state(&mut self, s: &pkvm_sysreg::El1State) {
        self.regs.pc = s.pc;
        self.regs.pstate = s.pstate;
        self.sys.spsr = s.spsr_el1;
        self.sys.elr = s.elr_el1;
        self.sys.esr = s.esr_el1;
    }

    /// A vCPU at reset: EL1h, interrupts masked, MMU off, entering at `pc`
    /// with `x0..x3 = args`; `mpidr_aff` is its affinity.
    pub fn new(pc: u64, args: [u64; 4], mpidr_aff: u64) -> Self {
        let mut regs = GuestRegs {
            pc,
            ..GuestRegs::default()
        };
        regs.x[..4].copy_from_slice(&args);
        VcpuState {
            regs,
            sys: El1Sysregs::reset(),
            timer: TimerState::default(),
            pac: PacKeys::default(),
            vmpidr: (1 << 31) | mpidr_aff,
            opt: OptRegs::default(),
            gic: GicCpu::default(),
            debug: DebugSlot::OFF,
        }
    }
}

/// A vCPU's debug registers for the next entry, or off: an `Option` in
/// plain integers (`on` is 0 or 1; the hypervisor refuses any other value
/// in a run block).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DebugSlot {
    /// 1: `regs` are loaded for the run; 0: off.
    pub on: u64,
    /// The registers (meaningful while `on`).
    pub regs: GuestDebug,
}

impl DebugSlot {
    /// Off: the hardware keeps the hypervisor's disabled debug state.
    pub const OFF: DebugSlot = DebugSlot {
        on: 0,
        regs: GuestDebug {
            mdscr: 0,
            brps: 0,
            wrps: 0,
            bvr: [0; MAX_POINTS],
            bcr: [0; MAX_POINTS],
            wvr: [0; MAX_POINTS],
            wcr: [0; MAX_POINTS],
        },
    };

    /// The slot for `d` (pkvm-sysreg's `guest_debug`).
    pub fn new(d: Option<GuestDebug>) -> DebugSlot {
        match d {
            Some(regs) => DebugSlot { on: 1, regs },
            None => DebugSlot::OFF,
        }
    }

    /// The registers, when on.
    pub fn get(&self) -> Option<&GuestDebug> {
        (self.on != 0).then_some(&self.regs)
    }
}

/// The VM-wide registers for a guest entry.
#[derive(Clone, Copy, Debug)]
pub struct VmRegs {
    /// VTTBR_EL2 (root + VMID).
    pub vttbr: u64,
    /// VTCR_EL2.
    pub vtcr: u64,
    /// The VM's trap controls (pkvm-sysreg's policy for its features).
    pub traps: TrapControls,
    /// Whether the VM has pointer authentication (its keys are switched).
    pub pauth: bool,
    /// Whether the host has SME (TPIDR2_EL0 and SMPRI_EL1 are switched).
    pub sme: bool,
    /// Whether the host has RAS (VDISR_EL2 is switched).
    pub ras: bool,
    /// List registers of this CPU ([`gic_lrs`]).
    pub lrs: usize,
    /// Active-priority registers per group of this CPU ([`gic_aprs`]).
    pub aprs: usize,
}

/// Why the guest stopped running.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// Vector index: 8 sync, 9 IRQ, 10 FIQ, 11 SError from AArch64; 12-15 from AArch32.
    pub kind: u64,
    /// ESR_EL2.
    pub esr: u64,
    /// FAR_EL2.
    pub far: u64,
    /// HPFAR_EL2.
    pub hpfar: u64,
    /// The physical count just before the `eret` into the guest and just
    /// after its exit: the guest's run slice (the virtual PMU counts it).
    pub slice: (u64, u64),
    /// Whether the run loaded the vCPU's SVE registers (its guest used SVE
    /// and took the lazy load, [`super::sve`]).
    pub sve_loaded: bool,
}

/// Vector index of a synchronous exception from a lower AArch64 EL.
pub const EXIT_SYNC: u64 = 8;
/// Vector index of an IRQ from a lower AArch64 EL.
pub const EXIT_IRQ: u64 = 9;

/// ID_AA64MMFR0_EL1.PARange of this CPU.
pub fn parange() -> u8 {
    (read_sysreg!("id_aa64mmfr0_el1") & 0xf) as u8
}

/// This CPU's MPIDR affinity bits.
pub fn this_mpidr() -> u64 {
    super::sysreg::mpidr()
}

/// Per-CPU EL2 set-up for running guests. The trap controls written here
/// are the hypervisor's own between guest runs; [`run`] writes each VM's.
pub fn init_cpu() {
    // CNTHCTL_EL2 (E2H=0): no EL1 code runs outside a guest; guests get
    // their VM's value (EL1PCTEN/EL1PCEN clear: the physical timer traps).
    write_sysreg!("cnthctl_el2", 0);
    write_sysreg!("cntvoff_el2", 0);
    // VPIDR_EL2: guests see the real MIDR.
    write_sysreg!("vpidr_el2", read_sysreg!("midr_el1"));
    write_sysreg!("hcr_el2", 1 << 31);
    // FP/SIMD untrapped (EL2 Rust code uses it); SVE, SME and trace
    // trapped (bits 8 and 12 are TZ and TSM on CPUs with SVE/SME, RES1
    // without).
    write_sysreg!("cptr_el2", cptr::RES1 | cptr::TZ | cptr::TSM | cptr::TTA);
    // MDCR_EL2: no traps, HPMN = PMCR_EL0.N (HPMN = 0 needs FEAT_HPMN0):
    // guests get their VM's value; nothing below EL2 runs otherwise.
    let hpmn = if super::idregs::host_ids().has(pkvm_sysreg::HostFeature::Pmu) {
        (read_sysreg!("pmcr_el0") >> 11) & 0x1f
    } else {
        0
    };
    write_sysreg!("mdcr_el2", hpmn);
    // The hypervisor's debug state, which guests never read (MDCR_EL2.TDA
    // traps them into their emulated register files) and the world switch
    // puts back after a guest with active debug: MDSCR_EL1 = 0, every
    // breakpoint and watchpoint disabled (their reset values are UNKNOWN),
    // the OS lock clear (it resets locked; while locked, a guest's debug
    // the world switch loads would generate no exception). MDCR_EL2.TDE
    // stays clear: the debug target is EL1, EL2 takes no debug exception.
    let dfr0 = read_sysreg!("id_aa64dfr0_el1");
    disable_debug(
        ((dfr0 >> 12) & 0xf) as usize + 1,
        ((dfr0 >> 20) & 0xf) as usize + 1,
    );
    write_sysreg!("oslar_el1", 0);
    if super::idregs::has_hcx() {
        // HCRX_EL2 = 0: the FEAT_HCX controls off, so TCR2_EL1,
        // SCTLR2_EL1 and the like trap and meet pkvm-sysreg's UNDEF.
        write_sysreg!("S3_4_C1_C2_2", 0);
    }
    super::sysreg::isb();
}

/// Writes a VM's trap controls (`MPAM2_EL2` only exists with FEAT_MPAM,
/// for which the policy's value is non-zero).
fn load_traps(t: &TrapControls) {
    update_sysreg!("hcr_el2", t.hcr);
    update_sysreg!("cptr_el2", t.cptr);
    update_sysreg!("mdcr_el2", t.mdcr);
    update_sysreg!("cnthctl_el2", t.cnthctl);
    if t.mpam2 != 0 {
        update_sysreg!("S3_4_C10_C5_0", t.mpam2);
    }
}

fn load_opt(vm: &VmRegs, o: &OptRegs) {
    if vm.sme {
        write_sysreg!("S3_3_C13_C0_5", o.tpidr2_el0);
        write_sysreg!("S3_0_C1_C2_4", o.smpri_el1);
    }
    if vm.ras {
        write_sysreg!("S3_4_C12_C1_1", o.vdisr_el2);
    }
}

fn save_opt(vm: &VmRegs, o: &mut OptRegs) {
    if vm.sme {
        o.tpidr2_el0 = read_sysreg!("S3_3_C13_C0_5");
        o.smpri_el1 = read_sysreg!("S3_0_C1_C2_4");
    }
    if vm.ras {
        o.vdisr_el2 = read_sysreg!("S3_4_C12_C1_1");
    }
}

/// Loads the guest's `PMUSERENR_EL0` (its virtual PMU's): the hardware
/// register only decides whether an EL0 PMU access traps to the guest's
/// EL1 or goes on to EL2 (`MDCR_EL2.TPM`), where the virtual PMU answers.
/// No EL0/EL1 code but guests' runs, so it needs no host value.
pub fn load_pmuserenr(v: u64) {
    update_sysreg!("pmuserenr_el0", v);
}

/// Runs the vCPU until it exits to EL2 with an exit `fast` does not
/// complete. `sve`: the vCPU's SVE registers, for a VM with SVE (whose
/// trap controls leave `CPTR_EL2.TZ` clear): the run enters with TZ set
/// and loads them at the guest's first SVE use ([`super::sve`]), on this
/// loop, before `fast` sees anything.
///
/// `fast` sees every other exit first, with the guest's EL1 state, timer
/// and virtual CPU interface still loaded in the hardware (only the
/// general, FP/SIMD and, once loaded, Z/P/FFR registers are in memory): when it
/// completes the exit (it returns `true`, having updated `regs`, e.g. Rt
/// and PC of a trapped register read), the guest is entered again at
/// once, without the register saves and loads of a full switch. It must
/// not touch EL1, timer or GIC CPU interface registers. A physical
/// interrupt that arrives meanwhile stays pending (PSTATE.I is set at EL2)
/// and takes the guest out again right after the next entry, so the fast
/// path cannot keep the scheduler's tick or a kick from this CPU.
pub fn run(
    vm: &VmRegs,
    vcpu: &mut VcpuState,
    mut sve: Option<&mut SveRun>,
    fast: &mut dyn FnMut(&Exit, &mut GuestRegs) -> bool,
) -> Exit {
    load_vcpu(vm, vcpu, sve.is_some());
    let entered = read_sysreg!("cntpct_el0");
    let exit = run_loop(vcpu, sve.as_deref_mut(), fast, entered);
    let exit = Exit {
        slice: (entered, read_sysreg!("cntpct_el0")),
        sve_loaded: vcpu.regs.sve != 0,
        ..exit
    };
    if let Some(s) = sve.filter(|_| vcpu.regs.sve != 0) {
        sve::save(s);
    }
    vcpu.regs.sve = 0;
    save_vcpu(vm, vcpu);
    exit
}

/// The first half of [`run`]: the VM's stage-2 and trap controls (SVE
/// trapped for a VM with SVE, `with_sve`, until its first use), then the
/// vCPU's EL1, timer, pointer-authentication, optional, GIC and debug
/// state into the hardware.
fn load_vcpu(vm: &VmRegs, vcpu: &mut VcpuState, with_sve: bool) {
    update_sysreg!("vtcr_el2", vm.vtcr);
    update_sysreg!("vttbr_el2", vm.vttbr);
    // A VM with SVE enters with SVE trapped: its first SVE use loads the
    // vCPU's SVE registers (`run_loop`).
    assert!(
        !with_sve || vm.traps.cptr & cptr::TZ == 0,
        "SVE state switched for a VM whose CPTR_EL2 traps SVE"
    );
    let mut traps = vm.traps;
    if with_sve {
        traps.cptr |= cptr::TZ;
    }
    load_traps(&traps);
    vcpu.regs.sve = 0;
    update_sysreg!("vmpidr_el2", vcpu.vmpidr);
    update_sysreg!("cntvoff_el2", vcpu.timer.voff);
    let s = &vcpu.sys;
    el1_list!(sysregs_xfer!(s, load));
    update_sysreg!("cntv_cval_el0", vcpu.timer.cval);
    update_sysreg!("cntv_ctl_el0", vcpu.timer.ctl);
    if vm.pauth {
        let k = &vcpu.pac;
        pac_list!(k, load);
    }
    load_opt(vm, &vcpu.opt);
    load_gic(&vcpu.gic, vm.lrs, vm.aprs);
    if let Some(d) = vcpu.debug.get() {
        load_debug(d);
    }
    super::sysreg::isb();
}

/// Enters the guest until an exit neither the lazy SVE load nor `fast`
/// completes.
fn run_loop(
    vcpu: &mut VcpuState,
    mut sve: Option<&mut SveRun>,
    fast: &mut dyn FnMut(&Exit, &mut GuestRegs) -> bool,
    entered: u64,
) -> Exit {
    loop {
        // SAFETY: `regs` is a valid, exclusively borrowed GuestRegs; the
        // asm saves/restores every callee-saved register and the stack
        // pointer around the guest run, the guest runs under stage-2 with
        // memory the VM owns, and TPIDR_EL2 points at this CPU's PerCpu.
        // `regs.sve` is 0 or (set by `sve::lazy_load`, which cleared
        // CPTR_EL2.TZ so the SVE transfers do not trap at EL2) the area of
        // the `SveRun` borrowed mutably for this call, whose area has room for
        // Z/P/FFR at the architecture's largest vector length (so at
        // whatever length ZCR_EL2 gives EL2). After a fast-path exit the
        // loaded state is as before (`fast` only changes `regs`).
        let kind = unsafe { __guest_enter(&mut vcpu.regs) };
        let exit = Exit {
            kind,
            esr: read_sysreg!("esr_el2"),
            far: read_sysreg!("far_el2"),
            hpfar: read_sysreg!("hpfar_el2"),
            slice: (entered, 0),
            sve_loaded: false,
        };
        if let Some(s) = sve.as_deref_mut() {
            if vcpu.regs.sve == 0 && sve::is_sve_trap(&exit) {
                vcpu.regs.sve = sve::lazy_load(s, &vcpu.regs.v);
                continue;
            }
        }
        if !fast(&exit, &mut vcpu.regs) {
            return exit;
        }
    }
}

/// The second half of [`run`]: the vCPU's state back from the hardware,
/// its timer stopped, the hypervisor's debug state restored.
fn save_vcpu(vm: &VmRegs, vcpu: &mut VcpuState) {
    let s = &mut vcpu.sys;
    el1_list!(sysregs_xfer!(s, save));
    vcpu.timer.ctl = read_sysreg!("cntv_ctl_el0");
    vcpu.timer.cval = read_sysreg!("cntv_cval_el0");
    // Stop the guest's timer while it is not running (a write re-arms
    // QEMU's timer: only when it was on).
    if vcpu.timer.ctl != 0 {
        write_sysreg!("cntv_ctl_el0", 0);
    }
    if vm.pauth {
        let k = &mut vcpu.pac;
        pac_list!(k, save);
    }
    save_opt(vm, &mut vcpu.opt);
    save_gic(&mut vcpu.gic, vm.lrs, vm.aprs);
    if let Some(d) = vcpu.debug.get() {
        disable_debug(d.brps, d.wrps);
    }
    super::sysreg::isb();
}

/// Saves the hardware's EL1 registers of [`El1Sysregs`] (the host
/// context's, before the hypervisor runs a guest for it).
pub fn save_el1(s: &mut El1Sysregs) {
    el1_list!(sysregs_xfer!(s, save));
}

/// Loads the EL1 registers of [`El1Sysregs`] into the hardware.
pub fn load_el1(s: &El1Sysregs) {
    el1_list!(sysregs_xfer!(s, load));
    super::sysreg::isb();
}

/// Writes a VM's (or the host context's) stage-2 and trap controls
/// without entering it (the host's, back after a guest run inside one of
/// its hypercalls).
pub fn load_vm_controls(vm: &VmRegs) {
    write_sysreg!("vtcr_el2", vm.vtcr);
    write_sysreg!("vttbr_el2", vm.vttbr);
    load_traps(&vm.traps);
    super::sysreg::isb();
}

/// Writes one of 16 numbered registers (the names are literals) for a
/// run-time index `n` (`n >= 16`: nothing).
macro_rules! nth_write {
    ($n:expr, $v:expr; $($i:literal => $r:literal),* $(,)?) => {
        match $n {
            $( $i => write_sysreg!($r, $v), )*
            _ => {}
        }
    };
}

fn write_bvr(n: usize, v: u64) {
    nth_write!(n, v; 0 => "dbgbvr0_el1", 1 => "dbgbvr1_el1", 2 => "dbgbvr2_el1", 3 => "dbgbvr3_el1", 4 => "dbgbvr4_el1", 5 => "dbgbvr5_el1", 6 => "dbgbvr6_el1", 7 => "dbgbvr7_el1", 8 => "dbgbvr8_el1", 9 => "dbgbvr9_el1", 10 => "dbgbvr10_el1", 11 => "dbgbvr11_el1", 12 => "dbgbvr12_el1", 13 => "dbgbvr13_el1", 14 => "dbgbvr14_el1", 15 => "dbgbvr15_el1");
}

fn write_bcr(n: usize, v: u64) {
    nth_write!(n, v; 0 => "dbgbcr0_el1", 1 => "dbgbcr1_el1", 2 => "dbgbcr2_el1", 3 => "dbgbcr3_el1", 4 => "dbgbcr4_el1", 5 => "dbgbcr5_el1", 6 => "dbgbcr6_el1", 7 => "dbgbcr7_el1", 8 => "dbgbcr8_el1", 9 => "dbgbcr9_el1", 10 => "dbgbcr10_el1", 11 => "dbgbcr11_el1", 12 => "dbgbcr12_el1", 13 => "dbgbcr13_el1", 14 => "dbgbcr14_el1", 15 => "dbgbcr15_el1");
}

fn write_wvr(n: usize, v: u64) {
    nth_write!(n, v; 0 => "dbgwvr0_el1", 1 => "dbgwvr1_el1", 2 => "dbgwvr2_el1", 3 => "dbgwvr3_el1", 4 => "dbgwvr4_el1", 5 => "dbgwvr5_el1", 6 => "dbgwvr6_el1", 7 => "dbgwvr7_el1", 8 => "dbgwvr8_el1", 9 => "dbgwvr9_el1", 10 => "dbgwvr10_el1", 11 => "dbgwvr11_el1", 12 => "dbgwvr12_el1", 13 => "dbgwvr13_el1", 14 => "dbgwvr14_el1", 15 => "dbgwvr15_el1");
}

fn write_wcr(n: usize, v: u64) {
    nth_write!(n, v; 0 => "dbgwcr0_el1", 1 => "dbgwcr1_el1", 2 => "dbgwcr2_el1", 3 => "dbgwcr3_el1", 4 => "dbgwcr4_el1", 5 => "dbgwcr5_el1", 6 => "dbgwcr6_el1", 7 => "dbgwcr7_el1", 8 => "dbgwcr8_el1", 9 => "dbgwcr9_el1", 10 => "dbgwcr10_el1", 11 => "dbgwcr11_el1", 12 => "dbgwcr12_el1", 13 => "dbgwcr13_el1", 14 => "dbgwcr14_el1", 15 => "dbgwcr15_el1");
}

/// Loads an active guest's breakpoints, watchpoints and `MDSCR_EL1`
/// (values and counts as pkvm-sysreg's `guest_debug` computed them for
/// this VM: never more than the CPU has, HMC clear). `MDCR_EL2.TDE` is
/// clear, so their exceptions go to the guest's EL1 vectors and never to
/// EL2 (above the debug target).
fn load_debug(d: &GuestDebug) {
    for n in 0..d.brps.min(MAX_POINTS) {
        write_bvr(n, d.bvr[n]);
        write_bcr(n, d.bcr[n]);
    }
    for n in 0..d.wrps.min(MAX_POINTS) {
        write_wvr(n, d.wvr[n]);
        write_wcr(n, d.wcr[n]);
    }
    write_sysreg!("mdscr_el1", d.mdscr);
}

/// The hypervisor's debug state: `MDSCR_EL1` = 0 and breakpoints
/// `0..brps`, watchpoints `0..wrps` disabled (their value registers are
/// left: nothing reads them, every guest access traps).
pub fn disable_debug(brps: usize, wrps: usize) {
    write_sysreg!("mdscr_el1", 0);
    for n in 0..brps.min(MAX_POINTS) {
        write_bcr(n, 0);
    }
    for n in 0..wrps.min(MAX_POINTS) {
        write_wcr(n, 0);
    }
}
