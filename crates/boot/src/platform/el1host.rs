//! A host context at EL1: a small program the hypervisor enters at EL1h
//! under the host's stage-2 (pkvm-hyp's lazily mapped identity map, VMID 0)
//! with the host's own exception vectors, the way pKVM runs its host. It
//! executes a list of commands from a mailbox in host memory (load, store,
//! `hvc #0`, read `CurrentEL`, a timed loop of hypercalls) and returns to EL2 with `hvc #1` when done.
//!
//! The program is position independent and is copied into a host-owned
//! page ([`install`]): the image itself is the hypervisor's memory, which
//! the host stage-2 never maps. It runs with the host's own EL1 stage-1
//! ([`host_tcr_el1`], [`HOST_MAIR_EL1`], [`HOST_SCTLR_EL1_MMU`]) over
//! tables in host memory built by the caller, or with it off (flat
//! physical addresses, data accesses Device-nGnRnE); every access it makes
//! is a naturally aligned 64-bit one.
//!
//! Page layout: the EL1 vector table at offset 0 (`VBAR_EL1`, 2 KiB
//! aligned), the entry at [`ENTRY_OFFSET`]. A synchronous exception taken
//! at EL1 (an abort the hypervisor injected) records `ESR_EL1` and
//! `FAR_EL1` in the current command and resumes after the faulting
//! instruction; any other vector reports itself with `hvc #2`, x0 = the
//! vector offset.
//!
//! Mailbox (x0 at entry): word 0 = number of commands, commands of
//! [`CMD_WORDS`] words from byte 128: `op, addr, value, result, esr, far,
//! x0..x7` ([`Cmd`]).

use core::arch::global_asm;

use pkvm_arch::Pa;

/// Offset of the program's entry in its page.
pub const ENTRY_OFFSET: u64 = 0x800;
/// Words per mailbox command.
pub const CMD_WORDS: usize = 16;
/// Byte offset of the first command in the mailbox.
pub const CMDS_OFFSET: u64 = 128;
/// `hvc` immediate: the program finished.
pub const HVC_DONE: u16 = 1;
/// `hvc` immediate: an unexpected exception at EL1 (x0 = vector offset).
pub const HVC_UNEXPECTED: u16 = 2;

/// Command operations.
pub mod op {
    /// `result` = the 64-bit load at `addr`.
    pub const LOAD: u64 = 1;
    /// Store `value` at `addr`.
    pub const STORE: u64 = 2;
    /// `hvc #0` with x0..x7 from the command; x0..x7 stored back.
    pub const HVC: u64 = 3;
    /// `result` = `CurrentEL`, `value` = `SCTLR_EL1`.
    pub const CURRENT_EL: u64 = 4;
    /// `hvc #0` `value` times with x0, x1 from the command (x2..x7 zero);
    /// `result` = the physical counter ticks taken (`CNTPCT_EL0`, which
    /// the host reads untrapped), x0..x7 of the last call stored back.
    pub const HVC_LOOP: u64 = 5;
    /// The host's own timer interrupt: enable PPI 30 with a 32-bit store
    /// of bit 30 at `addr` (this CPU's `GICR_ISENABLER0`), arm the EL1
    /// physical timer `value` ticks ahead, unmask IRQs and wait (up to 16
    /// times `value` ticks) for the IRQ vector, which acknowledges with
    /// `ICC_IAR1_EL1`, stops the timer, ends it with `ICC_EOIR1_EL1` and
    /// stores the INTID in `result`; then IRQs masked and the PPI
    /// disabled again (`addr` + 0x80). `esr` = the `CNTPCT_EL0` ticks
    /// waited.
    pub const TIMER_IRQ: u64 = 6;
    /// `smc #0` with x0..x7 from the command; x0..x7 stored back.
    pub const SMC: u64 = 7;
}

/// One mailbox command, as the program reads and writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cmd {
    /// [`op`].
    pub op: u64,
    /// Address of a load or store.
    pub addr: u64,
    /// Value of a store.
    pub value: u64,
    /// Value of a load or of `CurrentEL`.
    pub result: u64,
    /// `ESR_EL1` of an exception the command took at EL1 (0: none).
    pub esr: u64,
    /// `FAR_EL1` of that exception.
    pub far: u64,
    /// x0..x7 of an `hvc #0`, in and out.
    pub regs: [u64; 8],
}

impl Cmd {
    /// The command as mailbox words.
    pub fn to_words(&self) -> [u64; CMD_WORDS] {
        let mut w = [0u64; CMD_WORDS];
        w[..6].copy_from_slice(&[
            self.op,
            self.addr,
            self.value,
            self.result,
            self.esr,
            self.far,
        ]);
        w[6..14].copy_from_slice(&self.regs);
        w
    }

    /// A command from mailbox words.
    pub fn from_words(w: &[u64; CMD_WORDS]) -> Cmd {
        let mut regs = [0u64; 8];
        regs.copy_from_slice(&w[6..14]);
        Cmd {
            op: w[0],
            addr: w[1],
            value: w[2],
            result: w[3],
            esr: w[4],
            far: w[5],
            regs,
        }
    }
}

global_asm!(
    r#"
// x0..x7 from / to the current command's `regs` (x19 = the command).
.macro CMD_LOAD_X0_X7
    ldp     x0, x1, [x19, #48]
    ldp     x2, x3, [x19, #64]
    ldp     x4, x5, [x19, #80]
    ldp     x6, x7, [x19, #96]
.endm
.macro CMD_STORE_X0_X7
    stp     x0, x1, [x19, #48]
    stp     x2, x3, [x19, #64]
    stp     x4, x5, [x19, #80]
    stp     x6, x7, [x19, #96]
.endm
.macro EL1_UNEXPECTED off
    .balign 128
    mov     x0, #\off
    hvc     #{unexpected}
.endm

.section .rodata.el1host, "a"
.balign 4096
.global pkvm_el1host_start
pkvm_el1host_start:
    EL1_UNEXPECTED 0x000
    EL1_UNEXPECTED 0x080
    EL1_UNEXPECTED 0x100
    EL1_UNEXPECTED 0x180
    // Synchronous, EL1 with SP_EL1: an abort injected by the hypervisor.
    .balign 128
    mrs     x9, esr_el1
    str     x9, [x19, #32]
    mrs     x9, far_el1
    str     x9, [x19, #40]
    mrs     x9, elr_el1
    add     x9, x9, #4
    msr     elr_el1, x9
    eret
    // IRQ, EL1 with SP_EL1: the host's own interrupt (its timer).
    .balign 128
    mrs     x9, S3_0_C12_C12_0
    str     x9, [x19, #24]
    msr     cntp_ctl_el0, xzr
    isb
    msr     S3_0_C12_C12_1, x9
    eret
    EL1_UNEXPECTED 0x300
    EL1_UNEXPECTED 0x380
    EL1_UNEXPECTED 0x400
    EL1_UNEXPECTED 0x480
    EL1_UNEXPECTED 0x500
    EL1_UNEXPECTED 0x580
    EL1_UNEXPECTED 0x600
    EL1_UNEXPECTED 0x680
    EL1_UNEXPECTED 0x700
    EL1_UNEXPECTED 0x780

    // Entry: x0 = mailbox.
    .balign 2048
    ldr     x21, [x0]
    add     x19, x0, #{cmds}
1:  cbz     x21, 9f
    ldr     x1, [x19, #0]
    ldr     x2, [x19, #8]
    mov     x3, #0
    cmp     x1, #{op_load}
    b.ne    2f
    ldr     x3, [x2]
    str     x3, [x19, #24]
    b       8f
2:  cmp     x1, #{op_store}
    b.ne    3f
    ldr     x3, [x19, #16]
    str     x3, [x2]
    b       8f
3:  cmp     x1, #{op_hvc}
    b.ne    13f
    CMD_LOAD_X0_X7
    hvc     #0
    CMD_STORE_X0_X7
    b       8f
13: cmp     x1, #{op_smc}
    b.ne    4f
    CMD_LOAD_X0_X7
    smc     #0
    CMD_STORE_X0_X7
    b       8f
4:  cmp     x1, #{op_el}
    b.ne    10f
    mrs     x3, CurrentEL
    str     x3, [x19, #24]
    mrs     x3, sctlr_el1
    str     x3, [x19, #16]
    b       8f
10: cmp     x1, #{op_loop}
    b.ne    5f
    ldr     x22, [x19, #16]
    isb
    mrs     x23, cntpct_el0
11: cbz     x22, 12f
    ldp     x0, x1, [x19, #48]
    mov     x2, #0
    mov     x3, #0
    mov     x4, #0
    mov     x5, #0
    mov     x6, #0
    mov     x7, #0
    hvc     #0
    sub     x22, x22, #1
    b       11b
12: isb
    mrs     x24, cntpct_el0
    sub     x24, x24, x23
    str     x24, [x19, #24]
    CMD_STORE_X0_X7
    b       8f
5:  cmp     x1, #{op_timer}
    b.ne    8f
    mov     w4, #{ppi_bit}
    str     w4, [x2]
    ldr     x4, [x19, #16]
    isb
    mrs     x23, cntpct_el0
    add     x24, x23, x4, lsl #4
    msr     cntp_tval_el0, x4
    mov     x5, #1
    msr     cntp_ctl_el0, x5
    isb
    msr     daifclr, #2
6:  ldr     x5, [x19, #24]
    cbnz    x5, 7f
    isb
    mrs     x6, cntpct_el0
    cmp     x6, x24
    b.lo    6b
7:  msr     daifset, #2
    msr     cntp_ctl_el0, xzr
    mov     w4, #{ppi_bit}
    str     w4, [x2, #0x80]
    isb
    mrs     x6, cntpct_el0
    sub     x6, x6, x23
    str     x6, [x19, #32]
8:  add     x19, x19, #{cmd_bytes}
    sub     x21, x21, #1
    b       1b
9:  hvc     #{done}
    b       9b
.balign 4096
.global pkvm_el1host_end
pkvm_el1host_end:
"#,
    unexpected = const HVC_UNEXPECTED,
    done = const HVC_DONE,
    cmds = const CMDS_OFFSET,
    cmd_bytes = const CMD_WORDS * 8,
    op_load = const op::LOAD,
    op_store = const op::STORE,
    op_hvc = const op::HVC,
    op_el = const op::CURRENT_EL,
    op_loop = const op::HVC_LOOP,
    op_timer = const op::TIMER_IRQ,
    op_smc = const op::SMC,
    ppi_bit = const 1u32 << super::gic::PPI_EL1_PHYS,
);

global_asm!(
    r#"
.section .rodata.el1host, "a"
.balign 8
.global pkvm_null_guest_start
pkvm_null_guest_start:
1:  hvc     #0
    b       1b
    // MMIO: store x5 to [x6], load x7 from [x6], hvc, again.
2:  str     x5, [x6]
    ldr     x7, [x6]
    hvc     #0
    b       2b
.global pkvm_null_guest_end
pkvm_null_guest_end:
"#
);

extern "C" {
    static pkvm_el1host_start: [u8; 4096];
    static pkvm_el1host_end: u8;
    static pkvm_null_guest_start: [u8; NULL_GUEST_BYTES];
    static pkvm_null_guest_end: u8;
}

/// Bytes of the null guest's code.
const NULL_GUEST_BYTES: usize = 24;
/// Offset of the null guest's MMIO loop (after `hvc #0; b .-4`).
pub const NULL_GUEST_MMIO: u64 = 8;

/// Copies the null guest's code to the start of `page` (host memory):
/// at offset 0 `hvc #0` in a loop, at [`NULL_GUEST_MMIO`] a store of x5
/// and a load into x7 at the address in x6, then `hvc #0`, in a loop.
pub fn install_null_guest(page: Pa) {
    let start = core::ptr::addr_of!(pkvm_null_guest_start) as u64;
    let end = core::ptr::addr_of!(pkvm_null_guest_end) as u64;
    assert_eq!(end - start, NULL_GUEST_BYTES as u64, "null guest size");
    // SAFETY: the symbol starts the null guest's code in `.rodata`, whose
    // size the assertion above checked.
    let code: &[u8; NULL_GUEST_BYTES] = unsafe { &*core::ptr::addr_of!(pkvm_null_guest_start) };
    super::phys::write(page, code);
    super::hw::dcache_clean_range(page.0, 4096);
    super::hw::icache_inval_all();
}

/// Copies the program into the host page `page` (page aligned, host
/// owned) and makes it visible to instruction fetches. Returns
/// (`VBAR_EL1`, entry PC).
pub fn install(page: Pa) -> (u64, u64) {
    let start = core::ptr::addr_of!(pkvm_el1host_start) as u64;
    let end = core::ptr::addr_of!(pkvm_el1host_end) as u64;
    assert_eq!(end - start, 4096, "the EL1 host program is not one page");
    // SAFETY: the symbol is the start of the 4 KiB-aligned, 4 KiB program
    // in `.rodata` (the asm above pads it to exactly one page), read-only.
    let code: &[u8; 4096] = unsafe { &*core::ptr::addr_of!(pkvm_el1host_start) };
    super::phys::write(page, code);
    super::hw::dcache_clean_range(page.0, 4096);
    super::hw::icache_inval_all();
    (page.0, page.0 + ENTRY_OFFSET)
}

/// The trap controls the host runs under at EL1: its stage-2 (`VM`),
/// AArch64 EL1 (`RW`), SMCs trapped (`TSC`: PSCI reaches the hypervisor),
/// `IMO`/`FMO`/`AMO` clear: physical interrupts and SErrors go to the
/// host at EL1, which owns the GIC CPU interface (`ICC_*_EL1`, reachable
/// with `ICC_SRE_EL2.Enable`, set by the GIC driver); SVE, SME and trace
/// trapped as for the hypervisor itself, no debug or PMU traps; the EL1
/// physical counter and timer untrapped (`CNTHCTL_EL2.EL1PCTEN`/`EL1PCEN`:
/// the host's timer).
pub fn host_traps() -> pkvm_sysreg::traps::TrapControls {
    use pkvm_sysreg::traps::{cnthctl, cptr, hcr};
    let hpmn = if super::idregs::host_ids().has(pkvm_sysreg::HostFeature::Pmu) {
        (crate::read_sysreg!("pmcr_el0") >> 11) & 0x1f
    } else {
        0
    };
    pkvm_sysreg::traps::TrapControls {
        hcr: hcr::VM | hcr::RW | hcr::TSC,
        cptr: cptr::RES1 | cptr::TZ | cptr::TSM | cptr::TTA,
        mdcr: hpmn,
        cnthctl: cnthctl::EL1PCTEN | cnthctl::EL1PCEN,
        mpam2: 0,
    }
}

/// `TCR_EL1` of the host context's stage-1 (TTBR0 only): 39-bit VAs
/// (`T0SZ` 25, as the EL2 map), 4K granule, inner-shareable write-back
/// walks, TTBR1 walks off (`EPD1`), `IPS` = this CPU's PA range.
pub fn host_tcr_el1() -> u64 {
    let parange = (crate::read_sysreg!("id_aa64mmfr0_el1") & 0xf).min(5);
    (64 - super::mmu::VA_BITS) | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (parange << 32)
}

/// `MAIR_EL1` of the host context: the EL2 map's attributes (its
/// descriptors' `AttrIndx` mean the same).
pub const HOST_MAIR_EL1: u64 = pkvm_arch::pte::el2::MAIR_EL2;

/// `SCTLR_EL1` of the host context with its stage-1 on: the reset value
/// with `M`, `C` and `I` set.
pub const HOST_SCTLR_EL1_MMU: u64 = super::switch::SCTLR_EL1_RESET | 1 | (1 << 2) | (1 << 12);
