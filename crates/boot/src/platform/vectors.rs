//! EL2 exception vectors.
//!
//! - An `hvc #0` from a lower EL while the host context runs at EL1
//!   (`PerCpu::el1_host`) is the host's hypercall, served in place like one
//!   from EL2 (the handler touches no EL1 state, so none is switched).
//!   Any other synchronous exception from the VMM at EL1 (`el1_host` =
//!   [`super::el1boot::EL1_VMM`]: a trapped SMC) is served in place too,
//!   by `el1boot`'s trap handler with x0..x30 in and out.
//! - Other exceptions from a lower EL (the guest; AArch64 sync/IRQ/FIQ/SError and
//!   AArch32) push the guest's x0/x1, load the vector index into x0 and
//!   branch to `__guest_exit` (see [`super::switch`]), which returns from
//!   `__guest_enter` into Rust with the exit kind.
//! - Except a trapped `MRS Xt, CTR_EL0` (`HCR_EL2.TID2`; Linux reads it
//!   in every cache-maintenance loop, ~90,000 times per boot): when the
//!   running vCPU's [`GuestRegs::ctr_el0`](super::switch::GuestRegs) is
//!   set, `__guest_ctr_read` writes it to Xt, counts the read, steps the
//!   guest's PC and returns to the guest, touching only x0-x3 (saved on
//!   the EL2 stack and restored). Nothing of the guest's state is loaded
//!   or saved and no other register changes, so this is the world
//!   switch's fast path at its cheapest; the value is the VM's sanitised
//!   `CTR_EL0`, the one pkvm-sysreg's table answers with.
//! - An `hvc #0` taken at EL2 itself (the host, while it runs at EL2) is
//!   the host's hypercall: the entry saves the registers the SMCCC
//!   preserves and calls [`super::hvc`]'s handler on x0..x7.
//! - Other exceptions taken at EL2 itself are hypervisor bugs: the registers are
//!   saved and [`el2_exception`] prints them and panics (failure exit).

use core::arch::global_asm;

use super::switch::GuestRegs;

global_asm!(
    r#"
.macro CUR_ENTRY kind
    .balign 128
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       pkvm_el2_self_exception
.endm
.macro GUEST_ENTRY kind
    .balign 128
    stp     x0, x1, [sp, #-16]!
    mov     x0, #\kind
    b       __guest_exit
.endm
// Store / load the registers x2..x17 at [sp, #16..#144) (x0, x1 at [sp]
// already): the common part of every EL2 frame below.
.macro SAVE_X2_X17
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
.endm
.macro LOAD_X2_X17
    ldp     x16, x17, [sp, #128]
    ldp     x14, x15, [sp, #112]
    ldp     x12, x13, [sp, #96]
    ldp     x10, x11, [sp, #80]
    ldp     x8, x9, [sp, #64]
    ldp     x6, x7, [sp, #48]
    ldp     x4, x5, [sp, #32]
    ldp     x2, x3, [sp, #16]
.endm
// x18..x30 at [sp, #144..#248) (a full frame of x0..x30).
.macro SAVE_X18_X30
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
.endm
.macro LOAD_X18_X30
    ldr     x30, [sp, #240]
    ldp     x28, x29, [sp, #224]
    ldp     x26, x27, [sp, #208]
    ldp     x24, x25, [sp, #192]
    ldp     x22, x23, [sp, #176]
    ldp     x20, x21, [sp, #160]
    ldp     x18, x19, [sp, #144]
.endm

.section .text.vectors, "ax"
.balign 2048
.global pkvm_el2_vectors
pkvm_el2_vectors:
    CUR_ENTRY 0
    CUR_ENTRY 1
    CUR_ENTRY 2
    CUR_ENTRY 3
    // Synchronous, current EL with SP_EL2: `hvc #0` from the host while it
    // runs at EL2 (any other class is a hypervisor bug).
    .balign 128
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    mrs     x0, esr_el2
    lsr     x0, x0, #26
    cmp     x0, #0x16
    b.eq    pkvm_el2_hvc_entry
    mov     x0, #4
    b       pkvm_el2_self_exception
    CUR_ENTRY 5
    CUR_ENTRY 6
    CUR_ENTRY 7
    // 8: synchronous from a lower AArch64 EL. While the host context
    // runs at EL1, its `hvc #0` is served in place (no world switch); a
    // guest's CTR_EL0 read (its ESR with the Rt field cleared) takes the
    // short path; everything else leaves the world switch.
    .balign 128
    stp     x0, x1, [sp, #-16]!
    mrs     x0, tpidr_el2
    ldr     x0, [x0, #16]
    cbz     x0, 1f
    mrs     x0, esr_el2
    lsr     x1, x0, #26
    cmp     x1, #0x16
    b.ne    3f
    tst     x0, #0xffff
    b.ne    3f
    ldp     x0, x1, [sp], #16
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    b       pkvm_el2_hvc_entry
1:  mrs     x0, esr_el2
    and     x0, x0, #0xfffffffffffffc1f
    movz    x1, #{ctr_lo}
    movk    x1, #{ctr_hi}, lsl #16
    cmp     x0, x1
    b.eq    __guest_ctr_read
2:  mov     x0, #8
    b       __guest_exit
3:  b       pkvm_el2_lower_not_hvc
    GUEST_ENTRY 9
    GUEST_ENTRY 10
    GUEST_ENTRY 11
    GUEST_ENTRY 12
    GUEST_ENTRY 13
    GUEST_ENTRY 14
    GUEST_ENTRY 15

// Guest x0/x1 at [sp]. Rt's saved copy (x0-x3, on the stack) or the
// register itself (x4-x30) gets the VM's CTR_EL0; Rt 31 (XZR) nothing.
__guest_ctr_read:
    stp     x2, x3, [sp, #-16]!
    mrs     x2, tpidr_el2
    ldr     x2, [x2, #8]
    ldr     x0, [x2, #{ctr_off}]
    cbz     x0, 8f
    ldr     x3, [x2, #{reads_off}]
    add     x3, x3, #1
    str     x3, [x2, #{reads_off}]
    mrs     x1, esr_el2
    ubfx    x1, x1, #5, #5
    cmp     x1, #4
    b.hs    1f
    // x0 -> [sp+16], x1 -> [sp+24], x2 -> [sp], x3 -> [sp+8].
    eor     x3, x1, #2
    str     x0, [sp, x3, lsl #3]
    b       7f
1:  adr     x3, 2f
    sub     x1, x1, #4
    add     x3, x3, x1, lsl #3
    br      x3
2:
    .irp n, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30
    mov     x\n, x0
    b       7f
    .endr
    b       7f
    nop
7:  mrs     x1, elr_el2
    add     x1, x1, #4
    msr     elr_el2, x1
    ldp     x2, x3, [sp], #16
    ldp     x0, x1, [sp], #16
    eret
    // Not answered here: the ordinary exit.
8:  ldp     x2, x3, [sp], #16
    mov     x0, #8
    b       __guest_exit

// A lower-EL synchronous exception other than `hvc #0` while a host
// context runs at EL1 (x0, x1 at [sp]): the VMM's (`el1_host` = 2) is
// served in place by `pkvm_el2_host_trap` with x0..x30 in and out; the
// host-attack context's leaves the world switch.
pkvm_el2_lower_not_hvc:
    mrs     x0, tpidr_el2
    ldr     x0, [x0, #16]
    cmp     x0, #{el1_vmm}
    b.eq    1f
    mov     x0, #8
    b       __guest_exit
1:  ldp     x0, x1, [sp], #16
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    SAVE_X2_X17
    SAVE_X18_X30
    mrs     x0, elr_el2
    mrs     x1, spsr_el2
    stp     x0, x1, [sp, #248]
    mov     x0, sp
    bl      pkvm_el2_host_trap
    ldp     x0, x1, [sp, #248]
    msr     elr_el2, x0
    msr     spsr_el2, x1
    LOAD_X18_X30
    LOAD_X2_X17
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{frame}
    eret

// The host's hypercall: x0..x7 in and out (SMCCC), x8..x18, x29, x30,
// ELR_EL2 and SPSR_EL2 preserved; the frame's first 64 bytes are the
// `[u64; 8]` the handler works on. x0, x1 are already at [sp].
pkvm_el2_hvc_entry:
    SAVE_X2_X17
    stp     x18, x29, [sp, #144]
    mrs     x0, elr_el2
    mrs     x1, spsr_el2
    stp     x0, x1, [sp, #160]
    str     x30, [sp, #176]
    mov     x0, sp
    bl      pkvm_el2_hvc
    ldp     x0, x1, [sp, #160]
    msr     elr_el2, x0
    msr     spsr_el2, x1
    ldr     x30, [sp, #176]
    ldp     x18, x29, [sp, #144]
    LOAD_X2_X17
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{frame}
    eret

pkvm_el2_self_exception:
    SAVE_X2_X17
    SAVE_X18_X30
    mov     x1, x0
    mov     x0, sp
    bl      pkvm_el2_exception
1:  b       1b
"#,
    ctr_lo = const CTR_READ_ESR & 0xffff,
    ctr_hi = const CTR_READ_ESR >> 16,
    ctr_off = const core::mem::offset_of!(GuestRegs, ctr_el0),
    reads_off = const core::mem::offset_of!(GuestRegs, ctr_reads),
    frame = const FRAME,
    el1_vmm = const super::el1boot::EL1_VMM,
);

/// `ESR_EL2` of a trapped `MRS Xt, CTR_EL0` with Rt = 0: EC 0x18, IL,
/// ISS Op0 3, Op2 1, Op1 3, CRn 0, CRm 0, direction read.
pub const CTR_READ_ESR: u64 = (0x18 << 26) | (1 << 25) | (3 << 20) | (1 << 17) | (3 << 14) | 1;
const _: () = assert!(CTR_READ_ESR == 0x6232_c001);

/// Bytes of the frame an exception taken at EL2 pushes (a multiple of 16).
const FRAME: usize = 272;

/// Registers saved by an EL2-self exception (x0..x30).
#[repr(C)]
pub struct SelfFrame {
    x: [u64; 31],
}

/// Handler of exceptions taken at EL2: always a hypervisor bug.
#[no_mangle]
extern "C" fn pkvm_el2_exception(frame: &SelfFrame, kind: u64) -> ! {
    let esr = crate::read_sysreg!("esr_el2");
    let elr = crate::read_sysreg!("elr_el2");
    let far = crate::read_sysreg!("far_el2");
    crate::println!(
        "EL2 exception (vector {kind}) ESR_EL2={esr:#x} (EC {:#x}) ELR_EL2={elr:#x} FAR_EL2={far:#x} lr={:#x} sp={:#x}",
        esr >> 26,
        frame.x[30],
        frame as *const SelfFrame as u64 + FRAME as u64
    );
    panic!("unexpected exception at EL2");
}
