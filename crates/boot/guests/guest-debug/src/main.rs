//! Self-hosted debug guest: hardware breakpoints, watchpoints and
//! single-step on every vCPU while the vCPUs move between physical CPUs
//! (the image's `debug` and `debug-isolation` scenarios).
//!
//! `x0` = vCPU count | role << 8 | rounds << 16. Every vCPU turns its MMU
//! on, points `TPIDR_EL1` at its index, installs vectors that count debug
//! exceptions per vCPU, clears its OS lock and runs its role:
//!
//! - Tester (role 0): each round, with breakpoint `r % BRPs` and watchpoint
//!   `r % WRPs` (so every register is used):
//!   1. a breakpoint on one of 8 target functions (a different one per
//!      vCPU and round), a yield (WFI with the GIC off: the vCPU often resumes on the other
//!      CPU), then all 8 targets are called: exactly one hit, at the
//!      target's address;
//!   2. a watchpoint on one of 8 shared doublewords, a yield, then a load
//!      and a store to each: exactly two hits, `FAR_EL1` in the watched one;
//!   3. `MDSCR_EL1.SS`, a yield, then an `ERET` into 8 instructions with
//!      `SPSR_EL1.SS` set, one of them an `MRS CTR_EL0` the hypervisor
//!      traps and emulates: exactly 8 step exceptions, each `ELR_EL1` the
//!      next instruction, and each instruction ran once;
//!   4. quiet: `MDSCR_EL1` = 0 (debug off), a yield, then every target and
//!      doubleword again: no exception at all (another vCPU's or VM's
//!      debug state left in the hardware would fire here).
//!
//!   It also checks each round that its breakpoint/watchpoint registers
//!   and its EL1 physical timer (`CNTP_CVAL_EL0`, `CNTP_CTL_EL0`, set
//!   once to a per-vCPU value) read back what it wrote.
//! - Hostile (role 2, a second VM of the `debug-isolation` scenario): each
//!   round programs every breakpoint on the targets and every watchpoint on
//!   the doublewords (the same addresses as the tester's: same image),
//!   with HMC and every other bit set, `MDSCR_EL1` with MDE, KDE, SS and
//!   TDCC, its physical timer to fire soon, then yields; with PSTATE.D
//!   masked, so it takes none of its own debug exceptions.
//!
//! vCPU 0 starts the others (PSCI CPU_ON), runs its own rounds, waits for
//! them and prints one line per vCPU and a verdict. `guest_main` returns
//! the verdict (0: all passed), which guest-rt reports (the scenario checks
//! it) before powering off.
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "../../guest-smp/src/smp.rs"]
mod smp;

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use guest_rt::{println, sysreg_read as rd, sysreg_write as wr, wfi};

const MAX_VCPUS: usize = 8;
const ROLE_HOSTILE: u64 = 2;
const ROLE_SETWAY: u64 = 3;
/// Target functions / watched doublewords.
const TARGETS: usize = 8;
/// Instructions of the stepped sequence.
const STEPS: u64 = 8;
/// `MDSCR_EL1` bits.
const SS: u64 = 1;
const TDCC: u64 = 1 << 12;
const KDE: u64 = 1 << 13;
const MDE: u64 = 1 << 15;
/// `DBGBCR`: E, PMC = 0b11 (EL1 and EL0), BAS = 0b1111 (A64), address match.
const BCR_EL1_EL0: u64 = 1 | (0b11 << 1) | (0b1111 << 5);
/// `DBGWCR`: E, PAC = 0b11, LSC = 0b11 (loads and stores), BAS = 0xff.
const WCR_EL1_EL0: u64 = 1 | (0b11 << 1) | (0b11 << 3) | (0xff << 5);
/// HMC: match at EL2 too (the hypervisor must never let it through).
const HMC: u64 = 1 << 13;
/// SPSR for the stepped code: EL1h, A/I/F masked, D clear, SS set.
const SPSR_STEP: u64 = 0b0101 | (0b111 << 6) | (1 << 21);
const SPSR_SS: u64 = 1 << 21;
const SPSR_D: u64 = 1 << 9;
/// Exception classes (from the current EL).
const EC_BKPT: u64 = 0x31;
const EC_STEP: u64 = 0x33;
const EC_WPT: u64 = 0x35;
/// The vector of a synchronous exception from EL1 with SP_EL1.
const VEC_SYNC_CURRENT: u64 = 4;
/// The tester's physical timer: far in the future, enabled and masked.
const PTIMER_CVAL: u64 = 0x00ab_cdef_0000_0000;
const PTIMER_CTL: u64 = 0b11;

global_asm!(
    r#"
.section .text.debug_vectors, "ax"
.balign 2048
.global debug_vectors
debug_vectors:
.irp idx, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .balign 128
    sub     sp, sp, #176
    stp     x0, x1, [sp, #0]
    mov     x0, #\idx
    b       debug_common
.endr

// Saves the caller-saved registers, calls debug_exception(vector, esr,
// elr, far) and resumes at the ELR it returns.
debug_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x29, [sp, #144]
    str     x30, [sp, #160]
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    bl      debug_exception
    msr     elr_el1, x0
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x29, [sp, #144]
    ldr     x30, [sp, #160]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #176
    eret

// Breakpoint targets: target k at bp_targets + 16 * k.
.section .text.debug_targets, "ax"
.balign 64
.global bp_targets
bp_targets:
.rept 8
    nop
    ret
    .balign 16
.endr

// run_stepped(x0 = SPSR): ERETs into step_seq with that PSTATE; step_end
// returns to the caller (x30 untouched). x9-x11 clobbered; x10 counts
// the `add`s of step_seq that ran (7 of its 8 instructions).
.global run_stepped
run_stepped:
    adr     x9, step_seq
    msr     elr_el1, x9
    msr     spsr_el1, x0
    isb
    eret
.global step_seq
step_seq:
.rept 4
    add     x10, x10, #1
.endr
    mrs     x11, ctr_el0        // trapped (TID2) and emulated by the hypervisor
.rept 3
    add     x10, x10, #1
.endr
.global step_end
step_end:
    ret

// An AArch32 EL0 excursion: run_a32() ERETs to a32_code in AArch32 User
// mode with temporary vectors; any exception to EL1 comes back here with
// x0 = vector index, x1 = ESR_EL1, x2 = ELR_EL1 (callee-saved registers
// and VBAR_EL1 restored).
.section .text.a32_vectors, "ax"
.balign 2048
a32_vectors:
.irp idx, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .balign 128
    mov     x0, #\idx
    b       a32_back
.endr
.global run_a32
run_a32:
    stp     x19, x20, [sp, #-112]!
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    mrs     x9, vbar_el1
    str     x9, [sp, #96]
    adr     x9, a32_vectors
    msr     vbar_el1, x9
    adr     x9, a32_code
    msr     elr_el1, x9
    mov     x9, #0x1d0
    msr     spsr_el1, x9
    isb
    eret
a32_back:
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    ldr     x9, [sp, #96]
    msr     vbar_el1, x9
    isb
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    ldp     x19, x20, [sp], #112
    ret
.balign 4
.global a32_code
a32_code:
    .inst   0xec510f0e      // mrrc p15, 0, r0, r1, c14: CNTPCT (trapped to EL2, EC 0x4)
    .inst   0xe7f000f0      // udf #0
"#
);

extern "C" {
    static a32_code: u8;
    static debug_vectors: u8;
    static bp_targets: u8;
    static step_seq: u8;
    static step_end: u8;
}

/// One counter per vCPU.
struct PerVcpu([AtomicU64; MAX_VCPUS]);

impl PerVcpu {
    const fn new() -> PerVcpu {
        PerVcpu([const { AtomicU64::new(0) }; MAX_VCPUS])
    }
    fn get(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Acquire)
    }
    fn set(&self, i: usize, v: u64) {
        self.0[i].store(v, Ordering::Release);
    }
    fn inc(&self, i: usize) {
        self.0[i].fetch_add(1, Ordering::AcqRel);
    }
}

static BP_HITS: PerVcpu = PerVcpu::new();
static WP_HITS: PerVcpu = PerVcpu::new();
static STEP_HITS: PerVcpu = PerVcpu::new();
/// Debug exceptions that were not expected (wrong place, wrong phase).
static SPURIOUS: PerVcpu = PerVcpu::new();
/// Failed checks other than exception counts (read-backs, step order).
static FAILED: PerVcpu = PerVcpu::new();
/// What the handler expects now: breakpoint address, watched doubleword.
static EXPECT_BP: PerVcpu = PerVcpu::new();
static EXPECT_WP: PerVcpu = PerVcpu::new();
/// 1 while the vCPU single-steps the sequence.
static STEPPING: PerVcpu = PerVcpu::new();
/// The last unexpected exception (ESR, ELR) per vCPU, for the report.
static LAST_BAD: PerVcpu = PerVcpu::new();
static LAST_BAD_ELR: PerVcpu = PerVcpu::new();
/// Secondaries that finished.
static DONE: AtomicU64 = AtomicU64::new(0);
/// The doublewords the watchpoints watch (shared by every vCPU).
static SLOTS: [AtomicU64; TARGETS] = [const { AtomicU64::new(0) }; TARGETS];

fn target(k: usize) -> u64 {
    core::ptr::addr_of!(bp_targets) as u64 + 16 * k as u64
}

fn slot(k: usize) -> u64 {
    SLOTS[k].as_ptr() as u64
}

fn step_addr(end: bool) -> u64 {
    if end {
        core::ptr::addr_of!(step_end) as u64
    } else {
        core::ptr::addr_of!(step_seq) as u64
    }
}

fn me() -> usize {
    rd!("tpidr_el1") as usize
}

/// The EL1 synchronous-exception handler (from `debug_common`): counts a
/// debug exception for this vCPU and returns where to resume.
#[no_mangle]
extern "C" fn debug_exception(vector: u64, esr: u64, elr: u64, far: u64) -> u64 {
    let i = me();
    let ec = esr >> 26;
    if vector == VEC_SYNC_CURRENT && ec == EC_STEP && STEPPING.get(i) == 1 {
        let n = STEP_HITS.get(i) % STEPS;
        if elr != step_addr(false) + 4 * (n + 1) {
            FAILED.inc(i);
        }
        STEP_HITS.inc(i);
        let spsr = rd!("spsr_el1");
        if elr == step_addr(true) {
            STEPPING.set(i, 0);
            wr!("mdscr_el1", MDE | KDE);
            wr!("spsr_el1", spsr & !SPSR_SS);
        } else {
            wr!("spsr_el1", spsr | SPSR_SS);
        }
        return elr;
    }
    let expected = match ec {
        EC_BKPT => elr == EXPECT_BP.get(i),
        EC_WPT => far & !7 == EXPECT_WP.get(i),
        _ => false,
    };
    if vector == VEC_SYNC_CURRENT && expected {
        if ec == EC_BKPT {
            BP_HITS.inc(i);
        } else {
            WP_HITS.inc(i);
        }
    } else {
        // Wrong place or phase: count it, and mask debug exceptions in
        // the interrupted code so a leaked state cannot loop forever.
        SPURIOUS.inc(i);
        LAST_BAD.set(i, esr);
        LAST_BAD_ELR.set(i, elr);
        wr!("spsr_el1", rd!("spsr_el1") | SPSR_D);
    }
    elr + 4
}

/// Writes or reads numbered register `n` (0..16) of the 16 literals.
macro_rules! nth {
    (write $n:expr, $v:expr; $($i:literal => $r:literal),*) => {
        match $n { $( $i => wr!($r, $v), )* _ => {} }
    };
    (read $n:expr; $($i:literal => $r:literal),*) => {
        match $n { $( $i => rd!($r), )* _ => 0 }
    };
}

fn set_bvr(n: usize, v: u64) {
    nth!(write n, v; 0 => "dbgbvr0_el1", 1 => "dbgbvr1_el1", 2 => "dbgbvr2_el1", 3 => "dbgbvr3_el1", 4 => "dbgbvr4_el1", 5 => "dbgbvr5_el1", 6 => "dbgbvr6_el1", 7 => "dbgbvr7_el1", 8 => "dbgbvr8_el1", 9 => "dbgbvr9_el1", 10 => "dbgbvr10_el1", 11 => "dbgbvr11_el1", 12 => "dbgbvr12_el1", 13 => "dbgbvr13_el1", 14 => "dbgbvr14_el1", 15 => "dbgbvr15_el1");
}

fn get_bvr(n: usize) -> u64 {
    nth!(read n; 0 => "dbgbvr0_el1", 1 => "dbgbvr1_el1", 2 => "dbgbvr2_el1", 3 => "dbgbvr3_el1", 4 => "dbgbvr4_el1", 5 => "dbgbvr5_el1", 6 => "dbgbvr6_el1", 7 => "dbgbvr7_el1", 8 => "dbgbvr8_el1", 9 => "dbgbvr9_el1", 10 => "dbgbvr10_el1", 11 => "dbgbvr11_el1", 12 => "dbgbvr12_el1", 13 => "dbgbvr13_el1", 14 => "dbgbvr14_el1", 15 => "dbgbvr15_el1")
}

fn set_bcr(n: usize, v: u64) {
    nth!(write n, v; 0 => "dbgbcr0_el1", 1 => "dbgbcr1_el1", 2 => "dbgbcr2_el1", 3 => "dbgbcr3_el1", 4 => "dbgbcr4_el1", 5 => "dbgbcr5_el1", 6 => "dbgbcr6_el1", 7 => "dbgbcr7_el1", 8 => "dbgbcr8_el1", 9 => "dbgbcr9_el1", 10 => "dbgbcr10_el1", 11 => "dbgbcr11_el1", 12 => "dbgbcr12_el1", 13 => "dbgbcr13_el1", 14 => "dbgbcr14_el1", 15 => "dbgbcr15_el1");
}

fn get_bcr(n: usize) -> u64 {
    nth!(read n; 0 => "dbgbcr0_el1", 1 => "dbgbcr1_el1", 2 => "dbgbcr2_el1", 3 => "dbgbcr3_el1", 4 => "dbgbcr4_el1", 5 => "dbgbcr5_el1", 6 => "dbgbcr6_el1", 7 => "dbgbcr7_el1", 8 => "dbgbcr8_el1", 9 => "dbgbcr9_el1", 10 => "dbgbcr10_el1", 11 => "dbgbcr11_el1", 12 => "dbgbcr12_el1", 13 => "dbgbcr13_el1", 14 => "dbgbcr14_el1", 15 => "dbgbcr15_el1")
}

fn set_wvr(n: usize, v: u64) {
    nth!(write n, v; 0 => "dbgwvr0_el1", 1 => "dbgwvr1_el1", 2 => "dbgwvr2_el1", 3 => "dbgwvr3_el1", 4 => "dbgwvr4_el1", 5 => "dbgwvr5_el1", 6 => "dbgwvr6_el1", 7 => "dbgwvr7_el1", 8 => "dbgwvr8_el1", 9 => "dbgwvr9_el1", 10 => "dbgwvr10_el1", 11 => "dbgwvr11_el1", 12 => "dbgwvr12_el1", 13 => "dbgwvr13_el1", 14 => "dbgwvr14_el1", 15 => "dbgwvr15_el1");
}

fn get_wvr(n: usize) -> u64 {
    nth!(read n; 0 => "dbgwvr0_el1", 1 => "dbgwvr1_el1", 2 => "dbgwvr2_el1", 3 => "dbgwvr3_el1", 4 => "dbgwvr4_el1", 5 => "dbgwvr5_el1", 6 => "dbgwvr6_el1", 7 => "dbgwvr7_el1", 8 => "dbgwvr8_el1", 9 => "dbgwvr9_el1", 10 => "dbgwvr10_el1", 11 => "dbgwvr11_el1", 12 => "dbgwvr12_el1", 13 => "dbgwvr13_el1", 14 => "dbgwvr14_el1", 15 => "dbgwvr15_el1")
}

fn set_wcr(n: usize, v: u64) {
    nth!(write n, v; 0 => "dbgwcr0_el1", 1 => "dbgwcr1_el1", 2 => "dbgwcr2_el1", 3 => "dbgwcr3_el1", 4 => "dbgwcr4_el1", 5 => "dbgwcr5_el1", 6 => "dbgwcr6_el1", 7 => "dbgwcr7_el1", 8 => "dbgwcr8_el1", 9 => "dbgwcr9_el1", 10 => "dbgwcr10_el1", 11 => "dbgwcr11_el1", 12 => "dbgwcr12_el1", 13 => "dbgwcr13_el1", 14 => "dbgwcr14_el1", 15 => "dbgwcr15_el1");
}

fn get_wcr(n: usize) -> u64 {
    nth!(read n; 0 => "dbgwcr0_el1", 1 => "dbgwcr1_el1", 2 => "dbgwcr2_el1", 3 => "dbgwcr3_el1", 4 => "dbgwcr4_el1", 5 => "dbgwcr5_el1", 6 => "dbgwcr6_el1", 7 => "dbgwcr7_el1", 8 => "dbgwcr8_el1", 9 => "dbgwcr9_el1", 10 => "dbgwcr10_el1", 11 => "dbgwcr11_el1", 12 => "dbgwcr12_el1", 13 => "dbgwcr13_el1", 14 => "dbgwcr14_el1", 15 => "dbgwcr15_el1")
}

fn call(addr: u64) {
    // SAFETY: `addr` is one of the `nop; ret` targets; only x30 changes.
    unsafe { asm!("blr {t}", t = in(reg) addr, out("x30") _, options(nostack)) };
}

fn load_store(addr: u64) {
    // SAFETY: `addr` is one of the SLOTS doublewords (ours, aligned); a
    // watchpoint hit skips the access.
    unsafe {
        asm!("ldr {v}, [{a}]", "str {v}, [{a}]", a = in(reg) addr, v = out(reg) _,
             options(nostack))
    };
}

/// Single-steps the 8 instructions of `step_seq` (one of them trapped and
/// emulated by the hypervisor); how many of its 7 `add`s ran.
fn stepped() -> u64 {
    let ran: u64;
    // SAFETY: run_stepped ERETs into step_seq (EL1h, SS set) and returns
    // here from step_end; it clobbers x9, x10 and x30 only.
    unsafe {
        asm!("mov x10, xzr", "bl run_stepped", in("x0") SPSR_STEP, out("x9") _,
             out("x10") ran, out("x11") _, out("x30") _, options(nostack))
    };
    ran
}

/// Gives the CPU up: a WFI with the guest's distributor off is a yield
/// (QEMU does not trap WFE); the vCPU often resumes on the other CPU.
fn yield_cpu() {
    wfi();
}

fn mask_debug() {
    // SAFETY: masking PSTATE.D only holds debug exceptions off.
    unsafe { asm!("msr daifset, #8", "isb", options(nostack)) };
}

fn unmask_debug() {
    // SAFETY: unmasking PSTATE.D only lets debug exceptions in; the vectors
    // handle them.
    unsafe { asm!("msr daifclr, #8", "isb", options(nostack)) };
}

/// Counts a failed check of vCPU `i` (and says what failed, once).
fn check(i: usize, r: u64, ok: bool, what: &str, got: u64, want: u64) {
    if !ok {
        if FAILED.get(i) == 0 {
            println!("debug: vCPU {i} round {r}: FAIL: {what}: {got:#x}, want {want:#x}");
        }
        FAILED.inc(i);
    }
}

/// Geometry read from the VM's ID_AA64DFR0_EL1.
#[derive(Clone, Copy)]
struct Points {
    brps: usize,
    wrps: usize,
}

fn points() -> Points {
    let dfr0 = rd!("id_aa64dfr0_el1");
    Points {
        brps: ((dfr0 >> 12) & 0xf) as usize + 1,
        wrps: ((dfr0 >> 20) & 0xf) as usize + 1,
    }
}

/// Phase 1: one breakpoint, exactly one hit where expected.
fn breakpoint_phase(i: usize, r: u64, p: Points) {
    let b = r as usize % p.brps;
    let t = target((i + r as usize) % TARGETS);
    EXPECT_BP.set(i, t);
    set_bvr(b, t);
    set_bcr(b, BCR_EL1_EL0);
    yield_cpu();
    check(i, r, get_bvr(b) == t, "DBGBVR read back", get_bvr(b), t);
    let bcr = get_bcr(b);
    check(
        i,
        r,
        bcr == BCR_EL1_EL0,
        "DBGBCR read back",
        bcr,
        BCR_EL1_EL0,
    );
    let before = BP_HITS.get(i);
    (0..TARGETS).for_each(|k| call(target(k)));
    let hits = BP_HITS.get(i) - before;
    check(i, r, hits == 1, "breakpoint hits", hits, 1);
    set_bcr(b, 0);
    EXPECT_BP.set(i, 0);
}

/// Phase 2: one watchpoint, exactly a load and a store hit.
fn watchpoint_phase(i: usize, r: u64, p: Points) {
    let w = r as usize % p.wrps;
    let s = slot((i + r as usize) % TARGETS);
    EXPECT_WP.set(i, s);
    set_wvr(w, s);
    set_wcr(w, WCR_EL1_EL0);
    yield_cpu();
    check(i, r, get_wvr(w) == s, "DBGWVR read back", get_wvr(w), s);
    let wcr = get_wcr(w);
    check(
        i,
        r,
        wcr == WCR_EL1_EL0,
        "DBGWCR read back",
        wcr,
        WCR_EL1_EL0,
    );
    let before = WP_HITS.get(i);
    (0..TARGETS).for_each(|k| load_store(slot(k)));
    let hits = WP_HITS.get(i) - before;
    check(i, r, hits == 2, "watchpoint hits", hits, 2);
    set_wcr(w, 0);
    EXPECT_WP.set(i, u64::MAX);
}

/// Phase 3: single-step exactly the 8 instructions.
fn step_phase(i: usize, r: u64) {
    // With PSTATE.D clear, setting SS would step at once (the step state
    // machine is active-pending while PSTATE.SS is 0): mask D first, the
    // ERET into the sequence unmasks it.
    mask_debug();
    wr!("mdscr_el1", MDE | KDE | SS);
    yield_cpu();
    let before = STEP_HITS.get(i);
    STEPPING.set(i, 1);
    let ran = stepped();
    let steps = STEP_HITS.get(i) - before;
    check(i, r, steps == STEPS, "single-step exceptions", steps, STEPS);
    check(i, r, ran == STEPS - 1, "stepped adds run", ran, STEPS - 1);
    check(i, r, STEPPING.get(i) == 0, "stepping ended", 1, 0);
    STEPPING.set(i, 0);
}

/// Phase 4: debug off, nothing may fire.
fn quiet_phase() {
    wr!("mdscr_el1", 0);
    yield_cpu();
    (0..TARGETS).for_each(|k| {
        call(target(k));
        load_store(slot(k));
    });
    wr!("mdscr_el1", MDE | KDE);
}

/// One round of the tester.
fn tester_round(i: usize, r: u64, p: Points) {
    unmask_debug();
    breakpoint_phase(i, r, p);
    unmask_debug();
    watchpoint_phase(i, r, p);
    unmask_debug();
    step_phase(i, r);
    unmask_debug();
    quiet_phase();
    let (cval, ctl) = (rd!("cntp_cval_el0"), rd!("cntp_ctl_el0") & 3);
    let want = PTIMER_CVAL + i as u64;
    check(i, r, cval == want, "CNTP_CVAL_EL0 read back", cval, want);
    check(
        i,
        r,
        ctl == PTIMER_CTL,
        "CNTP_CTL_EL0 read back",
        ctl,
        PTIMER_CTL,
    );
}

/// One round of the hostile VM: everything it can program, then a yield.
fn hostile_round(r: u64, p: Points) {
    let bcr = if r.is_multiple_of(2) {
        BCR_EL1_EL0 | HMC
    } else {
        u64::MAX
    };
    let wcr = if r.is_multiple_of(2) {
        WCR_EL1_EL0 | HMC
    } else {
        u64::MAX
    };
    for n in 0..p.brps {
        set_bvr(n, target(n % TARGETS));
        set_bcr(n, bcr);
    }
    for n in 0..p.wrps {
        set_wvr(n, slot(n % TARGETS));
        set_wcr(n, wcr);
    }
    wr!("mdscr_el1", MDE | KDE | SS | TDCC);
    wr!("oslar_el1", 0);
    let now = rd!("cntpct_el0");
    wr!("cntp_cval_el0", now + 50_000);
    wr!("cntp_ctl_el0", 1);
    (0..TARGETS).for_each(|k| {
        call(target(k));
        load_store(slot(k));
    });
    yield_cpu();
}

/// A vCPU's life: set-up, then its rounds.
fn vcpu_main(i: usize, role: u64, rounds: u64) {
    smp::enable_mmu();
    wr!("tpidr_el1", i as u64);
    // A valid, 2 KiB-aligned vector table.
    wr!("vbar_el1", core::ptr::addr_of!(debug_vectors) as u64);
    wr!("oslar_el1", 0);
    let p = points();
    if role == ROLE_HOSTILE {
        for r in 0..rounds {
            hostile_round(r, p);
        }
        return;
    }
    EXPECT_WP.set(i, u64::MAX);
    wr!("cntp_cval_el0", PTIMER_CVAL + i as u64);
    wr!("cntp_ctl_el0", PTIMER_CTL);
    wr!("mdscr_el1", MDE | KDE);
    for r in 0..rounds {
        tester_round(i, r, p);
    }
    wr!("mdscr_el1", 0);
}

/// Secondaries (from `smp_secondary_entry`; x0 = index). The role and
/// rounds are the boot vCPU's.
#[no_mangle]
extern "C" fn smp_secondary_main(index: u64) -> ! {
    vcpu_main(
        index as usize,
        ROLE.load(Ordering::Acquire),
        ROUNDS.load(Ordering::Acquire),
    );
    DONE.fetch_add(1, Ordering::AcqRel);
    guest_rt::sev();
    smp::cpu_off();
    loop {
        smp::wfi();
    }
}

static ROLE: AtomicU64 = AtomicU64::new(0);
static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// Prints vCPU `i`'s results; whether they are as expected.
fn report(i: usize, rounds: u64, p: Points) -> bool {
    let (bp, wp, ss) = (BP_HITS.get(i), WP_HITS.get(i), STEP_HITS.get(i));
    let (bad, failed) = (SPURIOUS.get(i), FAILED.get(i));
    println!(
        "debug: vCPU {i}: {rounds} rounds, {} BRPs {} WRPs: breakpoint hits {bp}/{rounds}, watchpoint hits {wp}/{}, steps {ss}/{}, spurious {bad}, failed {failed}",
        p.brps,
        p.wrps,
        2 * rounds,
        STEPS * rounds
    );
    if bad != 0 {
        println!(
            "debug: vCPU {i}: last spurious exception ESR_EL1 {:#x} at {:#x}",
            LAST_BAD.get(i),
            LAST_BAD_ELR.get(i)
        );
    }
    bp == rounds && wp == 2 * rounds && ss == STEPS * rounds && bad == 0 && failed == 0
}

/// The set/way guest's buffer (words).
const SETWAY_WORDS: usize = 8192;
static SETWAY_BUF: [AtomicU64; SETWAY_WORDS] = [const { AtomicU64::new(0) }; SETWAY_WORDS];

/// `DC CSW`, `DC ISW` or `DC CISW` over every set and way of every data or
/// unified cache level up to the Level of Coherence (the VM's
/// `CLIDR_EL1`/`CCSIDR_EL1`), as a kernel's flush-all does; the number of
/// operations.
fn setway_loop(op: u8) -> u64 {
    let clidr = rd!("clidr_el1");
    let loc = (clidr >> 24) & 7;
    let mut ops = 0;
    for level in 0..loc {
        if (clidr >> (3 * level)) & 7 < 2 {
            continue; // no data cache at this level
        }
        wr!("csselr_el1", level << 1);
        let ccsidr = rd!("ccsidr_el1");
        let line_shift = (ccsidr & 7) + 4;
        let ways = ((ccsidr >> 3) & 0x3ff) + 1;
        let sets = ((ccsidr >> 13) & 0x7fff) + 1;
        let way_shift = ((ways - 1) as u32).leading_zeros();
        for way in 0..ways {
            for set in 0..sets {
                let w = if ways > 1 { way << way_shift } else { 0 };
                let v = w | (set << line_shift) | (level << 1);
                // SAFETY: a set/way cache maintenance instruction (trapped
                // by the hypervisor, HCR_EL2.TSW).
                unsafe {
                    match op {
                        0 => asm!("dc csw, {}", in(reg) v, options(nostack)),
                        1 => asm!("dc isw, {}", in(reg) v, options(nostack)),
                        _ => asm!("dc cisw, {}", in(reg) v, options(nostack)),
                    }
                }
                ops += 1;
            }
        }
    }
    // SAFETY: barriers only.
    unsafe { asm!("dsb sy", "isb", options(nostack)) };
    ops
}

fn pattern(k: usize) -> u64 {
    0x5e7_0000_0000_0000 ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn pattern_intact() -> usize {
    (0..SETWAY_WORDS)
        .filter(|&k| SETWAY_BUF[k].load(Ordering::Relaxed) != pattern(k))
        .count()
}

fn set_caches(on: bool) {
    let sctlr = rd!("sctlr_el1");
    let bits = 1 | (1 << 2) | (1 << 12); // M, C, I
    wr!("sctlr_el1", if on { sctlr | bits } else { sctlr & !bits });
}

/// The set/way role: a full clean (caches on), then with the MMU and
/// caches off an invalidate, then (caches on again) a clean and invalidate;
/// the pattern written first must survive each, and no exception (an
/// UNDEF would land in the vectors as a spurious one) may come. Then the
/// [`unknown_class`] check.
fn setway_main() -> u64 {
    smp::enable_mmu();
    wr!("tpidr_el1", 0);
    // A valid, 2 KiB-aligned vector table.
    wr!("vbar_el1", core::ptr::addr_of!(debug_vectors) as u64);
    (0..SETWAY_WORDS).for_each(|k| SETWAY_BUF[k].store(pattern(k), Ordering::Relaxed));
    let mut ops = setway_loop(0);
    set_caches(false);
    ops += setway_loop(1);
    let bad_off = pattern_intact();
    set_caches(true);
    ops += setway_loop(2);
    let bad_on = pattern_intact();
    let exc = SPURIOUS.get(0);
    println!(
        "setway: DC CSW, DC ISW (MMU and caches off), DC CISW loops: {ops} set/way operations, {exc} exceptions; {} KiB pattern: {bad_off} words wrong with caches off, {bad_on} after",
        SETWAY_WORDS * 8 / 1024
    );
    if exc != 0 {
        println!(
            "setway: exception ESR_EL1 {:#x} at {:#x}",
            LAST_BAD.get(0),
            LAST_BAD_ELR.get(0)
        );
    }
    let ok = ops >= 3 && exc == 0 && bad_off == 0 && bad_on == 0 && unknown_class();
    if !ok {
        println!("setway: FAIL");
        return 1;
    }
    println!("setway: the memory survived a full set/way clean/invalidate: ok");
    0
}

/// An exception class the hypervisor does not handle: an AArch32 EL0
/// `MRRC` of `CNTPCT` (EL0 access allowed by `CNTKCTL_EL1.EL0PCTEN`,
/// trapped to EL2 by `CNTHCTL_EL2.EL1PCTEN` with EC 0x4). The VM must live
/// and take an UNDEF at `VBAR_EL1` + 0x600 (from AArch32 EL0) on the MRRC.
fn unknown_class() -> bool {
    let (vector, esr, elr): (u64, u64, u64);
    wr!("cntkctl_el1", rd!("cntkctl_el1") | 1);
    // SAFETY: run_a32 saves and restores every callee-saved register and
    // VBAR_EL1 around its AArch32 excursion, which touches no memory.
    unsafe {
        asm!("bl run_a32", out("x0") vector, out("x1") esr, out("x2") elr, out("x9") _,
             out("x30") _, clobber_abi("C"))
    };
    let code = core::ptr::addr_of!(a32_code) as u64;
    let ok = vector == 12 && esr == 0x0200_0000 && elr == code;
    println!(
        "unknown class: MRRC CNTPCT from AArch32 EL0 (EC 0x4 at EL2): vector {vector} (VBAR_EL1+{:#x}), ESR_EL1 {esr:#x}, ELR_EL1 {}: {}",
        vector * 0x80,
        if elr == code { "on the MRRC" } else { "elsewhere" },
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

/// vCPU 0 (from guest-rt).
#[no_mangle]
pub fn guest_main(x0: u64, _: u64, _: u64, _: u64) -> u64 {
    if (x0 >> 8) & 0xff == ROLE_SETWAY {
        return setway_main();
    }
    let n = ((x0 & 0xff) as usize).clamp(1, MAX_VCPUS);
    let role = (x0 >> 8) & 0xff;
    let rounds = (x0 >> 16).max(1);
    ROLE.store(role, Ordering::Release);
    ROUNDS.store(rounds, Ordering::Release);
    for i in 1..n {
        if smp::cpu_on(i) != 0 {
            println!("debug: CPU_ON of vCPU {i} failed");
            return 1;
        }
    }
    vcpu_main(0, role, rounds);
    while DONE.load(Ordering::Acquire) != n as u64 - 1 {
        yield_cpu();
    }
    if role == ROLE_HOSTILE {
        println!("debug: hostile: {n} vCPUs programmed every breakpoint, watchpoint, MDSCR_EL1 and the physical timer {rounds} times");
        return 0;
    }
    let p = points();
    let ok = (0..n).fold(true, |ok, i| report(i, rounds, p) & ok);
    if !ok {
        println!("debug: FAIL");
        return 1;
    }
    println!("debug: all {n} vCPUs: every breakpoint, watchpoint and step hit exactly where expected, no spurious debug exception: ok");
    0
}
