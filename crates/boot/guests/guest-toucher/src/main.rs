//! Memory toucher: writes two words into every 4 KiB page of
//! `[x0, x0 + x1)`, reads every written word back and reports the number of
//! wrong values and pages (code TOUCH). Every first touch of a page is a
//! stage-2 fault the host resolves.
#![no_std]
#![no_main]

use guest_rt::{code, println, report};

fn pattern(addr: u64) -> u64 {
    addr.rotate_left(17) ^ 0x5a5a_1234_9876_a5a5
}

/// Entry called by guest-rt: x0 = base IPA, x1 = size in bytes.
#[no_mangle]
pub fn guest_main(base: u64, size: u64, _: u64, _: u64) -> u64 {
    println!("toucher: writing {} MiB at {base:#x}", size >> 20);
    let pages = size / 4096;
    for p in 0..pages {
        let a = base + p * 4096;
        for off in [0u64, 4088] {
            // SAFETY: the range is guest RAM given to us by the host.
            unsafe { core::ptr::write_volatile((a + off) as *mut u64, pattern(a + off)) };
        }
    }
    let mut bad = 0u64;
    for p in 0..pages {
        let a = base + p * 4096;
        for off in [0u64, 4088] {
            // SAFETY: as above.
            let v = unsafe { core::ptr::read_volatile((a + off) as *const u64) };
            if v != pattern(a + off) {
                bad += 1;
            }
        }
    }
    println!("toucher: verified {pages} pages, {bad} wrong values");
    report(code::TOUCH, bad, pages);
    0
}
