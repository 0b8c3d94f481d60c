//! System-register policy checker: what a VM sees of the CPU's system
//! registers under the EL2 image (pkvm-sysreg's table and trap controls).
//!
//! Installs its own EL1 vectors that record the vector entry, `ESR_EL1` and
//! `ELR_EL1` of each synchronous exception and resume after the faulting
//! instruction, then checks:
//! - the sanitised ID registers: no SVE, SME, MTE or PMU shown although
//!   QEMU's `max` CPU has them (`HCR_EL2.TID3`);
//! - an UNDEF at `VBAR_EL1` + 0x200 (or + 0x000 from EL1t) with `ESR_EL1`
//!   EC 0 / IL 1 and `ELR_EL1` on the faulting instruction for: an
//!   IMPLEMENTATION DEFINED register (read and write), `ZCR_EL1` and an SVE
//!   instruction (SVE not offered), `SVCR` (SME never offered), the PMU (not
//!   offered), a write to a read-only ID register;
//! - emulated registers keep what they should: `MDSCR_EL1` (writable mask),
//!   `CSSELR_EL1`, the EL1 physical timer (`CNTP_CVAL`/`CNTP_CTL` with
//!   ISTATUS computed, `CNTPCT_EL0` counting);
//! - trapped `CTR_EL0` reads (answered by the EL2 vectors themselves) into
//!   x0, x1, x2 (their saved copies), x4, x17, x30 (their registers) and XZR
//!   each give the same value, with no exception and every other general
//!   register unchanged ([`ctr_probe`]).
//!
//! Prints one line per check. All passed: `guest_main` returns 0 (guest-rt
//! powers off). Any failure: the vCPU turns itself off with PSCI CPU_OFF,
//! so the VM ends with an error (and xtask's test with a non-zero exit).
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

use guest_rt::skip::{self, taken};
use guest_rt::{hvc, println};

// ctr_probe(buf: x0): x1..x30 = their index, x0 = 0x100, then CTR_EL0
// into x0, x1, x2 (three of the four the vectors keep on their stack: a
// wrong slot shows in x3 or a missing value), x4, x17, x30 and XZR;
// stores x0..x30 to buf[0..31].
// Saves and restores x18-x30 (callee-saved and the platform register).
global_asm!(
    r#"
.section .text.ctr_probe, "ax"
.global ctr_probe
ctr_probe:
    stp     x29, x30, [sp, #-128]!
    stp     x18, x19, [sp, #16]
    stp     x20, x21, [sp, #32]
    stp     x22, x23, [sp, #48]
    stp     x24, x25, [sp, #64]
    stp     x26, x27, [sp, #80]
    str     x28, [sp, #96]
    str     x0, [sp, #104]
.irp n, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30
    mov     x\n, #\n
.endr
    mov     x0, #0x100
    mrs     x0, ctr_el0
    mrs     x1, ctr_el0
    mrs     x2, ctr_el0
    mrs     x4, ctr_el0
    mrs     x17, ctr_el0
    mrs     x30, ctr_el0
    mrs     xzr, ctr_el0
    stp     x0, x1, [sp, #-256]!
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    ldr     x0, [sp, #360]
    mov     x1, #0
1:  ldr     x2, [sp, x1, lsl #3]
    str     x2, [x0, x1, lsl #3]
    add     x1, x1, #1
    cmp     x1, #31
    b.ne    1b
    add     sp, sp, #256
    ldp     x18, x19, [sp, #16]
    ldp     x20, x21, [sp, #32]
    ldp     x22, x23, [sp, #48]
    ldp     x24, x25, [sp, #64]
    ldp     x26, x27, [sp, #80]
    ldr     x28, [sp, #96]
    ldp     x29, x30, [sp], #128
    ret
"#
);

extern "C" {
    fn ctr_probe(buf: *mut [u64; 31]);
}

/// Runs one instruction (`$insn`, with x0 as its register) and returns its
/// address and x0 afterwards.
macro_rules! insn {
    ($insn:literal, $x0:expr) => {{
        let pc: u64;
        let x0: u64;
        // SAFETY: one system-register access or SVE instruction on x0; if
        // it UNDEFs, the vectors (x9-x11 clobbered) resume after it.
        unsafe {
            asm!(
                "adr {pc}, 2f",
                "2:",
                $insn,
                pc = out(reg) pc,
                inout("x0") $x0 => x0,
                out("x9") _, out("x10") _, out("x11") _,
                options(nostack)
            )
        };
        (pc, x0)
    }};
}

/// `ESR_EL1` of an UNDEF: EC 0 (unknown reason), IL = 1.
const ESR_UNDEF: u64 = 1 << 25;
/// Vector entry of a synchronous exception from EL1 with SP_ELx (offset 0x200).
const ENTRY_CURRENT_SPX: u64 = 4;
/// ... with SP_EL0 (offset 0x000).
const ENTRY_CURRENT_SP0: u64 = 0;

struct Checker {
    passed: u32,
    failed: u32,
}

impl Checker {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            println!("sysreg: ok: {name}: {detail}");
        } else {
            self.failed += 1;
            println!("sysreg: FAILED: {name}: {detail}");
        }
    }

    /// The instruction at `pc` must have UNDEFed exactly once since
    /// `before`, at vector entry `entry`, with ESR_EL1 EC 0 and ELR_EL1 = `pc`.
    fn undef(&mut self, name: &str, before: u64, pc: u64, entry: u64) {
        let t = taken();
        let ok = t.count == before + 1 && t.entry == entry && t.esr == ESR_UNDEF && t.elr == pc;
        self.check(
            name,
            ok,
            format_args!(
                "UNDEF at VBAR_EL1+{:#x} ESR_EL1 {:#x} ELR_EL1 {:#x} (instruction at {pc:#x}, {} exception(s))",
                t.entry * 0x80,
                t.esr,
                t.elr,
                t.count - before
            ),
        );
    }
}

/// No exception since `before`.
fn no_exception(before: u64) -> bool {
    taken().count == before
}

fn field(v: u64, shift: u32) -> u64 {
    (v >> shift) & 0xf
}

fn id_registers(c: &mut Checker) {
    let n = taken().count;
    let (_, pfr0) = insn!("mrs x0, id_aa64pfr0_el1", 0u64);
    let (_, pfr1) = insn!("mrs x0, id_aa64pfr1_el1", 0u64);
    let (_, zfr0) = insn!("mrs x0, S3_0_C0_C4_4", 0u64);
    let (_, dfr0) = insn!("mrs x0, id_aa64dfr0_el1", 0u64);
    let quiet = no_exception(n);
    c.check(
        "ID_AA64PFR0_EL1.SVE",
        quiet && field(pfr0, 32) == 0 && field(pfr0, 4) == 1,
        format_args!("{pfr0:#x}: SVE {}, EL1 {}", field(pfr0, 32), field(pfr0, 4)),
    );
    c.check(
        "ID_AA64PFR1_EL1.SME/MTE",
        quiet && field(pfr1, 24) == 0 && field(pfr1, 8) == 0,
        format_args!("{pfr1:#x}: SME {}, MTE {}", field(pfr1, 24), field(pfr1, 8)),
    );
    c.check(
        "ID_AA64ZFR0_EL1",
        quiet && zfr0 == 0,
        format_args!("{zfr0:#x}"),
    );
    c.check(
        "ID_AA64DFR0_EL1.PMUVer",
        quiet && field(dfr0, 8) == 0,
        format_args!("{dfr0:#x}: PMUVer {}", field(dfr0, 8)),
    );
}

fn undefs(c: &mut Checker) {
    let n = taken().count;
    let (pc, _) = insn!("mrs x0, S3_0_C15_C0_0", 0u64);
    c.undef(
        "IMPLEMENTATION DEFINED read (S3_0_C15_C0_0)",
        n,
        pc,
        ENTRY_CURRENT_SPX,
    );
    let n = taken().count;
    let (pc, _) = insn!("msr S3_0_C10_C4_3, x0", 0u64);
    c.undef("LORC_EL1 write (LOR hidden)", n, pc, ENTRY_CURRENT_SPX);
    let n = taken().count;
    let (pc, _) = insn!("mrs x0, S3_0_C13_C0_7", 0u64);
    c.undef("SCXTNUM_EL1 read (hidden)", n, pc, ENTRY_CURRENT_SPX);
    // CPACR_EL1.ZEN and SMEN opened, so that SVE/SME accesses are not
    // stopped at EL1 by the guest's own trap and reach CPTR_EL2.TZ/TSM.
    // SAFETY: enables SVE/SME register access at EL1; no memory effect.
    unsafe {
        asm!(
            "mrs {t}, cpacr_el1",
            "orr {t}, {t}, #(3 << 16)",
            "orr {t}, {t}, #(3 << 24)",
            "msr cpacr_el1, {t}",
            "isb",
            t = out(reg) _,
            options(nostack)
        )
    };
    let n = taken().count;
    let (pc, _) = insn!("msr S3_0_C1_C2_0, x0", 0u64);
    c.undef("ZCR_EL1 write (SVE not offered)", n, pc, ENTRY_CURRENT_SPX);
    let n = taken().count;
    let (pc, _) = insn!(".inst 0x04bf5020", 0u64); // rdvl x0, #1
    c.undef("RDVL (SVE not offered)", n, pc, ENTRY_CURRENT_SPX);
    let n = taken().count;
    let (pc, _) = insn!("mrs x0, S3_3_C4_C2_2", 0u64);
    c.undef("SVCR read (SME not offered)", n, pc, ENTRY_CURRENT_SPX);
    let n = taken().count;
    let (pc, _) = insn!("mrs x0, pmccntr_el0", 0u64);
    c.undef(
        "PMCCNTR_EL0 read (no PMU offered)",
        n,
        pc,
        ENTRY_CURRENT_SPX,
    );
    let n = taken().count;
    let (pc, _) = insn!("msr S3_0_C0_C4_0, x0", 0u64);
    c.undef(
        "ID_AA64PFR0_EL1 write (read-only)",
        n,
        pc,
        ENTRY_CURRENT_SPX,
    );
    // From EL1t: the same stack through SP_EL0, vector offset 0x000.
    let n = taken().count;
    let pc: u64;
    // SAFETY: SP_EL0 is pointed at the current stack before SPSel = 0 and
    // SPSel = 1 is restored right after; the UNDEF resumes after the access.
    unsafe {
        asm!(
            "mov {t}, sp",
            "msr sp_el0, {t}",
            "msr spsel, #0",
            "adr {pc}, 2f",
            "2: mrs x0, S3_0_C15_C0_0",
            "msr spsel, #1",
            t = out(reg) _,
            pc = out(reg) pc,
            out("x0") _, out("x9") _, out("x10") _, out("x11") _,
        )
    };
    c.undef(
        "IMPLEMENTATION DEFINED read from EL1t",
        n,
        pc,
        ENTRY_CURRENT_SP0,
    );
}

fn emulated(c: &mut Checker) {
    let n = taken().count;
    let _ = insn!("msr mdscr_el1, x0", u64::MAX);
    let (_, mdscr) = insn!("mrs x0, mdscr_el1", 0u64);
    let _ = insn!("msr mdscr_el1, x0", 0u64);
    c.check(
        "MDSCR_EL1 (emulated, writable bits SS/TDCC/KDE/MDE)",
        no_exception(n) && mdscr == 0xb001,
        format_args!("wrote all ones, read {mdscr:#x}"),
    );
    let n = taken().count;
    let _ = insn!("msr csselr_el1, x0", 3u64);
    let (_, csselr) = insn!("mrs x0, csselr_el1", 0u64);
    let _ = insn!("msr csselr_el1, x0", 0u64);
    c.check(
        "CSSELR_EL1 (emulated)",
        no_exception(n) && csselr == 3,
        format_args!("wrote 3, read {csselr:#x}"),
    );
    let n = taken().count;
    let (_, t0) = insn!("mrs x0, cntpct_el0", 0u64);
    let _ = insn!("msr cntp_cval_el0, x0", 0u64);
    let _ = insn!("msr cntp_ctl_el0, x0", 1u64);
    let (_, ctl) = insn!("mrs x0, cntp_ctl_el0", 0u64);
    let (_, cval) = insn!("mrs x0, cntp_cval_el0", 0u64);
    let _ = insn!("msr cntp_ctl_el0, x0", 0u64);
    let (_, t1) = insn!("mrs x0, cntpct_el0", 0u64);
    c.check(
        "EL1 physical timer (emulated)",
        no_exception(n) && ctl == 0b101 && cval == 0 && t0 != 0 && t1 >= t0,
        format_args!(
            "CNTP_CTL {ctl:#x} (enabled, ISTATUS) CNTP_CVAL {cval:#x}, CNTPCT {t0:#x} -> {t1:#x}"
        ),
    );
}

/// `CTR_EL0` into several kinds of destination register ([`ctr_probe`]).
fn ctr_el0(c: &mut Checker) {
    let n = taken().count;
    let mut buf = [0u64; 31];
    // SAFETY: `ctr_probe` writes the 31 words of `buf` and restores every
    // register the calling convention asks it to keep.
    unsafe { ctr_probe(&mut buf) };
    let ctr = buf[0];
    let read_into = [0usize, 1, 2, 4, 17, 30];
    let same = read_into.iter().all(|&r| buf[r] == ctr);
    let kept = (1..31)
        .filter(|r| !read_into.contains(r))
        .all(|r| buf[r] == r as u64);
    c.check(
        "CTR_EL0 into x0, x1, x2, x4, x17, x30, xzr (EL2 vectors)",
        no_exception(n) && ctr & (1 << 31) != 0 && same && kept,
        format_args!(
            "{ctr:#x}; x1 {:#x} x2 {:#x} x4 {:#x} x17 {:#x} x30 {:#x}; others kept: {kept}",
            buf[1], buf[2], buf[4], buf[17], buf[30]
        ),
    );
}

/// Entry called by guest-rt.
#[no_mangle]
pub fn guest_main(_: u64, _: u64, _: u64, _: u64) -> u64 {
    skip::install();
    let mut c = Checker {
        passed: 0,
        failed: 0,
    };
    id_registers(&mut c);
    undefs(&mut c);
    emulated(&mut c);
    ctr_el0(&mut c);
    if c.failed == 0 {
        println!("sysreg: all {} checks passed", c.passed);
        return 0;
    }
    println!(
        "sysreg: {} of {} checks FAILED; turning the vCPU off",
        c.failed,
        c.passed + c.failed
    );
    hvc(0x8400_0002, 0, 0, 0); // PSCI CPU_OFF
    0
}
