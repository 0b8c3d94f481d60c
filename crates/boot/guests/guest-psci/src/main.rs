//! PSCI guest: asks PSCI_VERSION, executes WFI (a trapped exit), then
//! jumps to an IPA with no memory: the host injects a synchronous external
//! abort, our vector reports ESR_EL1 (code EXCEPTION) and powers off with
//! PSCI SYSTEM_OFF.
//!
//! With `x0` = [`MODE_CPU_OFF`] it instead turns its only vCPU off with
//! PSCI CPU_OFF at once (a VM that nothing can wake again: the scheduler
//! must still end a run it shares with other VMs once they finish); with
//! [`MODE_LATE`] it yields [`LATE_WFIS`] times with WFI and powers off (a
//! VM that finishes well after such a one has gone to sleep).
#![no_std]
#![no_main]

use guest_rt::{code, hvc, println, report};

/// No memslot and no device here.
const NO_MEMORY: u64 = 0x0c00_0000;

/// `x0` asking for the CPU_OFF mode.
const MODE_CPU_OFF: u64 = 1;
/// `x0` asking for the late power-off mode.
const MODE_LATE: u64 = 2;
/// WFIs of [`MODE_LATE`] (each yields the CPU: the guest's vGIC is off).
const LATE_WFIS: u32 = 300;
/// PSCI CPU_OFF (SMC32).
const PSCI_CPU_OFF: u64 = 0x8400_0002;

/// Entry called by guest-rt.
#[no_mangle]
pub fn guest_main(mode: u64, _: u64, _: u64, _: u64) -> u64 {
    if mode == MODE_CPU_OFF {
        println!("psci: CPU_OFF of the only vCPU");
        let r = hvc(PSCI_CPU_OFF, 0, 0, 0)[0];
        println!("psci: CPU_OFF returned {r:#x}");
        return 1;
    }
    if mode == MODE_LATE {
        for _ in 0..LATE_WFIS {
            // SAFETY: WFI only waits (the hypervisor traps it and resumes us).
            unsafe { core::arch::asm!("wfi") };
        }
        println!("psci: {LATE_WFIS} WFIs done, powering off");
        return 0;
    }
    let p = hvc(0x8400_0000, 0, 0, 0)[0];
    println!("psci: PSCI_VERSION = {}.{}", p >> 16, p & 0xffff);
    report(code::PSCI_VERSION, p, 0);
    // SAFETY: WFI only waits (the hypervisor traps it and resumes us).
    unsafe { core::arch::asm!("wfi") };
    guest_rt::install_vectors();
    println!("psci: jumping to {NO_MEMORY:#x} (no memory there)");
    // SAFETY: deliberately executes from an unbacked IPA; the resulting
    // abort is taken by the vectors installed above, which never return.
    let f: extern "C" fn() = unsafe { core::mem::transmute(NO_MEMORY as usize) };
    f();
    0
}
