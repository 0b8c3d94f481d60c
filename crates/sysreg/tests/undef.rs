//! UNDEF injection against hand-computed exception entries.

use pkvm_sysreg::{host_abort_esr, inject_sync, inject_undef, El1State};

const VBAR: u64 = 0xffff_8000_1001_0000;
/// SCTLR_EL1 reset value of the EL2 image (SPAN set, DSSBS clear).
const SCTLR: u64 = 0x30d0_0800;

fn undef(pc: u64, pstate: u64, sctlr: u64) -> El1State {
    let mut s = El1State {
        pc,
        pstate,
        spsr_el1: 0x1111,
        elr_el1: 0x2222,
        esr_el1: 0x3333,
        vbar_el1: VBAR,
        sctlr_el1: sctlr,
    };
    inject_undef(&mut s);
    s
}

#[test]
fn from_el1h_goes_to_the_current_el_spx_vector() {
    // EL1h, NZCV = 0b0110, interrupts unmasked.
    let s = undef(0xffff_8000_0800_1234, 0x6000_0005, SCTLR);
    assert_eq!(s.pc, 0xffff_8000_1001_0200);
    assert_eq!(s.elr_el1, 0xffff_8000_0800_1234);
    assert_eq!(s.spsr_el1, 0x6000_0005);
    assert_eq!(s.esr_el1, 0x0200_0000, "EC 0, IL 1");
    assert_eq!(s.pstate, 0x3c5, "EL1h, DAIF masked, flags clear");
    assert_eq!(s.vbar_el1, VBAR);
}

#[test]
fn from_el1t_goes_to_the_current_el_sp0_vector() {
    let s = undef(0x4000_0000, 0x0000_0004, SCTLR);
    assert_eq!(s.pc, 0xffff_8000_1001_0000);
    assert_eq!(s.spsr_el1, 0x4);
    assert_eq!(s.pstate, 0x3c5);
}

#[test]
fn from_el0_goes_to_the_lower_el_aarch64_vector() {
    let s = undef(0x40_1000, 0x8000_0000, SCTLR);
    assert_eq!(s.pc, 0xffff_8000_1001_0400);
    assert_eq!(s.elr_el1, 0x40_1000);
    assert_eq!(s.spsr_el1, 0x8000_0000);
    assert_eq!(s.pstate, 0x3c5);
}

#[test]
fn from_aarch32_el0_goes_to_the_lower_el_aarch32_vector() {
    let s = undef(0x8000, 0x10, SCTLR); // M[4] = 1, User mode
    assert_eq!(s.pc, 0xffff_8000_1001_0600);
}

#[test]
fn pan_ssbs_and_dit_follow_the_architecture() {
    // SCTLR_EL1.SPAN = 0: PAN set on entry. DSSBS = 1: SSBS set. DIT kept.
    let s = undef(0x1000, 0x0100_0005, SCTLR & !(1 << 23) | (1 << 44));
    assert_eq!(s.pstate, 0x3c5 | (1 << 22) | (1 << 12) | (1 << 24));
    // PAN already set stays set even with SPAN = 1; SS, IL, BTYPE, UAO cleared.
    let s = undef(
        0x1000,
        (1 << 22) | (1 << 21) | (1 << 20) | (3 << 10) | (1 << 23) | 5,
        SCTLR,
    );
    assert_eq!(s.pstate, 0x3c5 | (1 << 22));
}

#[test]
fn a_refused_host_data_abort_becomes_a_same_el_external_abort() {
    // Stage-2 data abort from EL1: EC 0x24, IL, ISV, SAS 3, SRT x5, WnR,
    // level-3 translation fault.
    let esr_el2 = (0x24 << 26) | (1 << 25) | (1 << 24) | (3 << 22) | (5 << 16) | (1 << 6) | 0x07;
    let esr = host_abort_esr(esr_el2);
    assert_eq!(esr >> 26, 0x25, "data abort from the current EL");
    assert_eq!(esr & 0x3f, 0x10, "synchronous external abort");
    assert_eq!(esr & (1 << 6), 1 << 6, "WnR kept");
    assert_eq!((esr >> 16) & 0x1f, 5, "SRT kept");
    assert_eq!(esr & (1 << 25), 1 << 25, "IL");
    assert_eq!(esr, 0x97c5_0050);
}

#[test]
fn a_refused_host_instruction_abort_becomes_a_same_el_external_abort() {
    let esr = host_abort_esr((0x20 << 26) | (1 << 25) | 0x0f);
    assert_eq!(esr, (0x21 << 26) | (1 << 25) | 0x10);
}

#[test]
fn inject_sync_enters_the_vector_with_the_given_syndrome() {
    let mut s = El1State {
        pc: 0x5000_0804,
        pstate: 0x3c5,
        vbar_el1: 0x5000_0000,
        sctlr_el1: SCTLR,
        ..El1State::default()
    };
    inject_sync(&mut s, 0x97c3_8010);
    assert_eq!(s.esr_el1, 0x97c3_8010);
    assert_eq!(s.elr_el1, 0x5000_0804);
    assert_eq!(s.spsr_el1, 0x3c5);
    assert_eq!(s.pc, 0x5000_0200);
    assert_eq!(s.pstate, 0x3c5);
}
