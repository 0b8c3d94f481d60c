//! Runtime for the pkvm-rs test guests (small programs run at EL1 under the
//! EL2 image's stage-2).
//!
//! - Entry (`_start`, first byte of the flat image, MMU off): sets the stack,
//!   zeroes `.bss`, enables FP/SIMD at EL1, calls the guest's
//!   `guest_main(x0, x1, x2, x3) -> u64`, reports its return value and
//!   powers off with PSCI SYSTEM_OFF over HVC.
//! - [`print!`]/[`println!`] write bytes to the PL011 data register at IPA
//!   0x0900_0000: the host emulates the UART through MMIO exits.
//! - [`report`]: a vendor hypercall telling the host a result code.
//! - With the MMU off every data access is Device memory: guests use no
//!   atomics and no unaligned accesses (the target is `+strict-align`).
#![no_std]
#![deny(missing_docs)]

use core::arch::{asm, global_asm};
use core::fmt;

use pkvm_arch::smccc::psci;

/// The vendor-hypervisor hypercall guests report results with
/// (SMC64 fast call, owner 6, function 0x100): x1 = code, x2/x3 = values.
pub const REPORT_FID: u64 = 0xc600_0100;

/// Report codes (the demo in the image decodes the same numbers).
pub mod code {
    /// `guest_main` returned: a = return value.
    pub const DONE: u64 = 0;
    /// Memory toucher: a = wrong values found, b = pages touched.
    pub const TOUCH: u64 = 1;
    /// A read from an address outside the memslots: a = value read.
    pub const MMIO_READ: u64 = 2;
    /// An undefined HVC returned: a = x0.
    pub const HVC_UNDEF: u64 = 3;
    /// PSCI_VERSION returned: a = version.
    pub const PSCI_VERSION: u64 = 4;
    /// An exception was taken at EL1: a = ESR_EL1, b = FAR_EL1.
    pub const EXCEPTION: u64 = 5;
    /// The guest panicked.
    pub const PANIC: u64 = 6;
    /// A trapped SMC returned: a = x0.
    pub const SMC: u64 = 7;
    /// guest-reset booted: a = boot number (1 = first), b = 1 if the
    /// image's `.data` was back at its initial value.
    pub const RESET: u64 = 8;
}

/// The emulated PL011 data register.
pub const UART_DR: usize = 0x0900_0000;

global_asm!(
    r#"
.section .text.entry, "ax"
.global _start
_start:
    ldr     x9, =__stack_top
    mov     sp, x9
    ldr     x9, =__bss_start
    ldr     x10, =__bss_end
1:  cmp     x9, x10
    b.hs    2f
    str     xzr, [x9], #8
    b       1b
2:  mov     x9, #(3 << 20)
    msr     cpacr_el1, x9
    isb
    bl      guest_rt_main
3:  b       3b
"#
);

extern "Rust" {
    fn guest_main(x0: u64, x1: u64, x2: u64, x3: u64) -> u64;
}

#[no_mangle]
extern "C" fn guest_rt_main(x0: u64, x1: u64, x2: u64, x3: u64) -> ! {
    // SAFETY: `guest_main` is defined by the guest binary with this
    // signature; it is a plain Rust function.
    let r = unsafe { guest_main(x0, x1, x2, x3) };
    report(code::DONE, r, 0);
    system_off()
}

/// An SMCCC call over HVC: returns x0..x3.
pub fn hvc(fid: u64, a1: u64, a2: u64, a3: u64) -> [u64; 4] {
    let (r0, r1, r2, r3);
    // SAFETY: HVC traps to the hypervisor, which returns to the next
    // instruction with x0-x3 set; no memory of ours is touched.
    unsafe {
        asm!("hvc #0", inout("x0") fid => r0, inout("x1") a1 => r1, inout("x2") a2 => r2,
             inout("x3") a3 => r3, options(nostack));
    }
    [r0, r1, r2, r3]
}

/// An SMCCC call over SMC (trapped by the hypervisor, HCR_EL2.TSC).
pub fn smc(fid: u64) -> u64 {
    let r0;
    // SAFETY: as for `hvc`; the hypervisor emulates the SMC and skips it.
    unsafe {
        asm!("smc #0", inout("x0") fid => r0, out("x1") _, out("x2") _, out("x3") _,
             options(nostack));
    }
    r0
}

/// Reports `code` with two values to the host.
pub fn report(code: u64, a: u64, b: u64) {
    hvc(REPORT_FID, code, a, b);
}

/// PSCI SYSTEM_OFF over HVC; never returns.
pub fn system_off() -> ! {
    loop {
        hvc(psci::SYSTEM_OFF as u64, 0, 0, 0);
    }
}

/// Reads a 32-bit value from a guest physical address.
pub fn read32(ipa: usize) -> u32 {
    // SAFETY: guest physical addresses are ours to access; a read of an
    // unbacked address becomes an MMIO exit the host completes.
    unsafe { core::ptr::read_volatile(ipa as *const u32) }
}

/// Writes a 32-bit value to a guest physical address (a device register).
pub fn write32(ipa: usize, v: u32) {
    // SAFETY: guest physical addresses are ours to access; a write to an
    // unbacked address becomes an MMIO exit the host completes.
    unsafe { core::ptr::write_volatile(ipa as *mut u32, v) }
}

/// Waits for an interrupt (after completing earlier memory accesses).
pub fn wfi() {
    // SAFETY: WFI only waits.
    unsafe { asm!("dsb sy", "wfi", options(nostack)) };
}

/// Waits for an event (trapped by the hypervisor: a yield).
pub fn wfe() {
    // SAFETY: WFE only waits.
    unsafe { asm!("wfe", options(nostack)) };
}

/// Signals an event to every CPU (after completing memory accesses).
pub fn sev() {
    // SAFETY: SEV only signals an event.
    unsafe { asm!("dsb sy", "sev", options(nostack)) };
}

/// Reads the system register named by the string literal (after an ISB,
/// so earlier register writes are seen).
#[macro_export]
macro_rules! sysreg_read {
    ($r:literal) => {{
        let v: u64;
        // SAFETY: reading a system register the guest may access.
        unsafe { ::core::arch::asm!("isb", concat!("mrs {}, ", $r), out(reg) v, options(nostack)) };
        v
    }};
}

/// Writes the system register named by the string literal, then an ISB.
#[macro_export]
macro_rules! sysreg_write {
    ($r:literal, $v:expr) => {{
        let v: u64 = $v;
        // SAFETY: writing a system register of this vCPU's own.
        unsafe { ::core::arch::asm!(concat!("msr ", $r, ", {}"), "isb", in(reg) v, options(nostack)) };
    }};
}

/// A check's verdict line, `<prefix>: ok: <what>` or `<prefix>: FAIL:
/// <what>`; returns 1 for a failure (summed into a guest's result).
pub fn check(prefix: &str, what: impl core::fmt::Display, ok: bool) -> u64 {
    if ok {
        println!("{prefix}: ok: {what}");
        0
    } else {
        println!("{prefix}: FAIL: {what}");
        1
    }
}

/// The generic timer as guests read it.
pub mod timer {
    /// `CNTFRQ_EL0` (at least 1).
    pub fn freq() -> u64 {
        crate::sysreg_read!("cntfrq_el0").max(1)
    }

    /// `CNTVCT_EL0`.
    pub fn vct() -> u64 {
        crate::sysreg_read!("cntvct_el0")
    }
}

/// EL1 vectors that record an exception and resume after the faulting
/// instruction (for guests that provoke UNDEFs and aborts on purpose).
/// The entry code uses x9-x11 only: asm that faults on purpose declares
/// them clobbered.
pub mod skip {
    use core::arch::{asm, global_asm};
    use core::ptr::{addr_of, read_volatile};

    global_asm!(
        r#"
.section .bss.guest_rt_skip_log, "aw"
.balign 8
.global guest_rt_skip_log
guest_rt_skip_log:
    .zero 40

.section .text.guest_rt_skip_vectors, "ax"
.balign 2048
.global guest_rt_skip_vectors
guest_rt_skip_vectors:
.irp idx, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .balign 128
    mov     x9, #\idx
    b       guest_rt_skip
.endr

// Records [vector entry, ESR_EL1, ELR_EL1, FAR_EL1, count + 1] and
// resumes after the faulting instruction.
guest_rt_skip:
    ldr     x10, =guest_rt_skip_log
    str     x9, [x10, #0]
    mrs     x11, esr_el1
    str     x11, [x10, #8]
    mrs     x11, far_el1
    str     x11, [x10, #24]
    mrs     x11, elr_el1
    str     x11, [x10, #16]
    add     x11, x11, #4
    msr     elr_el1, x11
    ldr     x11, [x10, #32]
    add     x11, x11, #1
    str     x11, [x10, #32]
    eret
"#
    );

    extern "C" {
        static guest_rt_skip_log: [u64; 5];
        static guest_rt_skip_vectors: u8;
    }

    /// What the last exception recorded, and how many were taken.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Taken {
        /// Vector entry (0-15: 4 is synchronous from the current EL with SP_ELx).
        pub entry: u64,
        /// `ESR_EL1`.
        pub esr: u64,
        /// `ELR_EL1` (the faulting instruction).
        pub elr: u64,
        /// `FAR_EL1`.
        pub far: u64,
        /// Exceptions taken since boot.
        pub count: u64,
    }

    /// Points `VBAR_EL1` at the recording vectors.
    pub fn install() {
        let v = addr_of!(guest_rt_skip_vectors) as u64;
        // SAFETY: VBAR_EL1 points at a valid, 2 KiB-aligned vector table.
        unsafe { asm!("msr vbar_el1, {}", "isb", in(reg) v, options(nostack)) };
    }

    /// The record of the last exception.
    pub fn taken() -> Taken {
        // SAFETY: 40 bytes of .bss written only by the vector code;
        // volatile reads because asm writes it behind the compiler's back.
        let r = |i: usize| unsafe { read_volatile(addr_of!(guest_rt_skip_log[i])) };
        Taken {
            entry: r(0),
            esr: r(1),
            elr: r(2),
            far: r(3),
            count: r(4),
        }
    }
}

/// The guest's GICv3 on the generated device tree (QEMU virt's layout).
pub mod gic {
    /// The distributor.
    pub const GICD: usize = 0x0800_0000;
    /// The first redistributor.
    pub const GICR: usize = 0x080a_0000;
    /// Bytes per redistributor (RD frame + SGI frame).
    pub const GICR_STRIDE: usize = 0x2_0000;
    /// The SGI frame's offset within a redistributor.
    pub const SGI_BASE: usize = 0x1_0000;
    /// The INTID an acknowledge returns when nothing is pending.
    pub const SPURIOUS: u64 = 1023;

    /// Wakes `vcpu`'s redistributor (GICR_WAKER.ProcessorSleep cleared,
    /// then ChildrenAsleep awaited) and puts its SGIs/PPIs in Group 1;
    /// returns the redistributor's base.
    pub fn wake_redistributor(vcpu: usize) -> usize {
        let rd = GICR + vcpu * GICR_STRIDE;
        let waker = rd + 0x14;
        super::write32(waker, super::read32(waker) & !2);
        while super::read32(waker) & 4 != 0 {}
        super::write32(rd + SGI_BASE + 0x80, u32::MAX);
        rd
    }
}

/// Writes one byte to the emulated UART.
pub fn putc(b: u8) {
    // SAFETY: UART_DR is the (emulated) PL011 data register.
    unsafe { core::ptr::write_volatile(UART_DR as *mut u8, b) }
}

/// The UART as a `fmt::Write` sink.
pub struct Uart;

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(putc);
        Ok(())
    }
}

/// Prints to the emulated UART.
#[macro_export]
macro_rules! print {
    ($($a:tt)*) => {{ let _ = core::fmt::Write::write_fmt(&mut $crate::Uart, format_args!($($a)*)); }};
}

/// Prints a line to the emulated UART.
#[macro_export]
macro_rules! println {
    ($($a:tt)*) => {{ $crate::print!($($a)*); $crate::putc(b'\n'); }};
}

global_asm!(
    r#"
.section .text.vectors, "ax"
.balign 2048
.global guest_rt_vectors
guest_rt_vectors:
.rept 16
    .balign 128
    mrs     x0, esr_el1
    mrs     x1, far_el1
    mrs     x2, elr_el1
    b       guest_rt_exception
.endr
"#
);

extern "C" {
    static guest_rt_vectors: u8;
}

/// Installs EL1 vectors that report any exception (code
/// [`code::EXCEPTION`]) and power off.
pub fn install_vectors() {
    let v = core::ptr::addr_of!(guest_rt_vectors) as u64;
    // SAFETY: VBAR_EL1 points at a valid, 2 KiB-aligned vector table.
    unsafe { asm!("msr vbar_el1, {}", "isb", in(reg) v, options(nostack)) };
}

#[no_mangle]
extern "C" fn guest_rt_exception(esr: u64, far: u64, elr: u64) -> ! {
    println!("guest: exception ESR_EL1={esr:#x} FAR_EL1={far:#x} ELR_EL1={elr:#x}");
    report(code::EXCEPTION, esr, far);
    system_off()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panic: {}", info.message());
    report(code::PANIC, 0, 0);
    system_off()
}
