//! Leaving QEMU with a status (semihosting), and PSCI calls to the
//! firmware (QEMU's built-in PSCI over SMC when virtualization=on).

use core::arch::asm;

/// Semihosting SYS_EXIT_EXTENDED.
const SYS_EXIT_EXTENDED: u32 = 0x20;
/// ADP_Stopped_ApplicationExit.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// Exit status used by the panic handler.
pub const PANIC_EXIT_CODE: i32 = 101;

/// Ends the QEMU run with `code` (0 = success) via semihosting; falls back
/// to PSCI SYSTEM_OFF (status 0 from QEMU) when semihosting is off, so a
/// failure is also printed by the caller.
pub fn exit(code: i32) -> ! {
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, code as u32 as u64];
    // SAFETY: the semihosting call reads the two-word parameter block we
    // pass; with `-semihosting` QEMU exits and the call never returns,
    // without it `hlt` is a no-op-like trap QEMU ignores.
    unsafe {
        asm!("hlt #0xf000", in("w0") SYS_EXIT_EXTENDED, in("x1") block.as_ptr(), options(nostack));
    }
    psci_call(pkvm_arch::smccc::psci::SYSTEM_OFF, 0, 0, 0);
    loop {
        // SAFETY: waiting for an event has no memory effect.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

/// An SMCCC call to the firmware over SMC (QEMU's PSCI). Returns x0.
pub fn psci_call(fid: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    let r: u64;
    // SAFETY: QEMU's firmware emulation handles the SMC and returns with
    // x0 set; it does not touch our memory except as PSCI documents
    // (CPU_ON starts another CPU at the entry point we pass).
    unsafe {
        asm!("smc #0", inout("x0") fid as u64 => r, inout("x1") a1 => _, inout("x2") a2 => _,
             inout("x3") a3 => _, options(nostack));
    }
    r as i64
}
