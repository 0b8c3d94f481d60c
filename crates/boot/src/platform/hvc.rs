//! The host -> hypervisor call over `hvc #0` (SMCCC: function and
//! arguments in x0..x7, results in x0..x7).
//!
//! [`call`] is the host's side. The hypervisor's side is the EL2 vector
//! for an HVC ([`super::vectors`]), which calls the handler set with
//! [`set_handler`] on x0..x7 with this CPU's index (read by EL2 from
//! `TPIDR_EL2`, never taken from the caller). Until a handler is set,
//! every call answers SMCCC `NOT_SUPPORTED`, except the image-level calls
//! of [`super::hostrun`] (`HOST_RUN`, the TLB calls), served first in
//! either mode.

use core::arch::asm;
use core::sync::atomic::{AtomicPtr, Ordering};

/// The hypervisor's hypercall handler: this CPU's index and x0..x7.
pub type Handler = fn(cpu: usize, regs: &mut [u64; 8]);

/// The handler, stored as a pointer to a [`Handler`]; null: none yet.
static HANDLER: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Sets the function every later `hvc #0` runs.
pub fn set_handler(h: Handler) {
    HANDLER.store(h as *mut (), Ordering::Release);
}

/// Issues `hvc #0` with `regs` in x0..x7 and stores x0..x7 back.
#[inline(never)]
pub fn call(regs: &mut [u64; 8]) {
    let [mut r0, mut r1, mut r2, mut r3, mut r4, mut r5, mut r6, mut r7] = *regs;
    // SAFETY: the HVC is taken by this image's EL2 vectors, whose entry
    // preserves every register the C ABI does not let a call clobber
    // (x8..x18, x19..x29 by the Rust handler, x30, SP) and returns to the
    // next instruction with ELR/SPSR_EL2 restored; the registers the
    // handler may change are x0..x7 (outputs here) and the caller-saved
    // rest (`clobber_abi("C")`). The handler touches only the
    // hypervisor's own memory, never Rust objects of the caller.
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") r0, inout("x1") r1, inout("x2") r2, inout("x3") r3,
            inout("x4") r4, inout("x5") r5, inout("x6") r6, inout("x7") r7,
            clobber_abi("C"),
        );
    }
    *regs = [r0, r1, r2, r3, r4, r5, r6, r7];
}

/// Called by the EL2 HVC vector with the caller's x0..x7 (in the vector's
/// frame).
#[no_mangle]
extern "C" fn pkvm_el2_hvc(regs: &mut [u64; 8]) {
    let imm = crate::read_sysreg!("esr_el2") & 0xffff;
    if imm == 0 && super::hostrun::serve(super::start::cpu_index(), regs) {
        return;
    }
    let p = HANDLER.load(Ordering::Acquire);
    if imm != 0 || p.is_null() {
        regs[0] = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64;
        return;
    }
    // SAFETY: HANDLER only ever holds null (checked above) or a value
    // stored by `set_handler` from a `Handler`, a function pointer of
    // exactly this type.
    let h: Handler = unsafe { core::mem::transmute::<*mut (), Handler>(p) };
    let cpu = super::start::cpu_index();
    h(cpu, regs)
}
