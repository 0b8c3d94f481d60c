//! PSCI guest: asks PSCI_VERSION, executes WFI (a trapped exit), then
//! jumps to an IPA with no memory: the host injects a synchronous external
//! abort, our vector reports ESR_EL1 (code EXCEPTION) and powers off with
//! PSCI SYSTEM_OFF.
#![no_std]
#![no_main]

use guest_rt::{code, hvc, println, report};

/// No memslot and no device here.
const NO_MEMORY: u64 = 0x0c00_0000;

/// Entry called by guest-rt.
#[no_mangle]
pub fn guest_main(_: u64, _: u64, _: u64, _: u64) -> u64 {
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
