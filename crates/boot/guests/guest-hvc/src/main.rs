//! HVC reporter: calls SMCCC_VERSION and PSCI_VERSION, an undefined vendor
//! HVC (must return SMCCC NOT_SUPPORTED, -1) and an SMC (trapped), and
//! reports every result.
#![no_std]
#![no_main]

use guest_rt::{code, hvc, println, report, smc};

/// A function id nobody implements (vendor hypervisor range, 0xabc).
const UNDEFINED: u64 = 0xc600_0abc;

/// Entry called by guest-rt.
#[no_mangle]
pub fn guest_main(_: u64, _: u64, _: u64, _: u64) -> u64 {
    let v = hvc(0x8000_0000, 0, 0, 0)[0];
    println!("hvc: SMCCC_VERSION = {v:#x}");
    let p = hvc(0x8400_0000, 0, 0, 0)[0];
    report(code::PSCI_VERSION, p, 0);
    let r = hvc(UNDEFINED, 1, 2, 3)[0];
    println!("hvc: undefined function returned {}", r as i64);
    report(code::HVC_UNDEF, r, UNDEFINED);
    let s = smc(0x8400_0000);
    report(code::SMC, s, 0);
    0
}
