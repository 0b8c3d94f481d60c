//! Reset guest (x0 = resets to ask for, at least 1): leaves itself a note
//! across PSCI system resets and checks that each one restarts the VM from
//! its entry point with only the boot vCPU on.
//!
//! Every boot (MMU off throughout: plain Device-memory accesses, no
//! atomics) reads the note page at [`NOTE`] (guest RAM outside the image,
//! which the VMM does not clear on a reset): no magic -> boot 1, else boot
//! = the note's count + 1; writes the magic and the count back; reads and
//! then overwrites a `.data` canary (back at its initial value after a
//! reset only if the VMM reloaded the image); reports both (code `RESET`).
//! From boot 2 on, AFFINITY_INFO must say vCPU 1 is off. While boots are
//! left, vCPU 1 is started with CPU_ON (it spins without exits, so the
//! reset must force it out of the guest) and the VM is reset: SYSTEM_RESET
//! on odd boots, SYSTEM_RESET2 (warm reset) on even ones. The last boot
//! returns 0 (guest-rt powers off with SYSTEM_OFF). A VM with one vCPU
//! skips the secondary.
//!
//! With bit 32 of x0 set ([`CONCURRENT`]), vCPU 1 makes the same reset
//! call as vCPU 0, at the same moment (both wait for a go flag in the note
//! page): the two requests race in the hypervisor and must make exactly
//! one restart.
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "../../guest-smp/src/smp.rs"]
mod smp;

use guest_rt::{code, hvc, println, report};
use pkvm_arch::smccc::psci;

/// The note page: guest RAM 8 MiB in, far past the image.
const NOTE: usize = 0x4080_0000;
/// The note's magic (first word); the boot count follows it.
const MAGIC: u64 = u64::from_le_bytes(*b"RSTNOTE1");
/// Third word of the note: set by vCPU 1 once it runs.
const SECONDARY_UP: usize = NOTE + 16;
/// Fourth word of the note: vCPU 1 makes the reset call too (concurrent
/// mode of this boot).
const BOTH_RESET: usize = NOTE + 24;
/// Fifth word of the note: the handshake before the concurrent reset calls
/// (vCPU 0 sets 1, vCPU 1 answers 2, then both call at once).
const GO: usize = NOTE + 32;
/// x0 bit: concurrent mode.
const CONCURRENT: u64 = 1 << 32;
/// The canary's value in the image.
const CANARY_INIT: u64 = 0x00c0_ffee_0dd5_0001;
/// What each boot leaves in the canary.
const CANARY_LEFT: u64 = 0xdead_0000_0000_0000;

/// Lives in `.data`: the image holds `CANARY_INIT`.
static mut CANARY: u64 = CANARY_INIT;

fn read(addr: usize) -> u64 {
    // SAFETY: an aligned address in guest RAM (the note page), ours.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn write(addr: usize, v: u64) {
    // SAFETY: as for `read`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// The reset call of boot `boot`: SYSTEM_RESET on odd boots,
/// SYSTEM_RESET2 (warm reset) on even ones; returns x0 if it returns.
fn reset_call(boot: u64) -> u64 {
    if boot % 2 == 1 {
        hvc(psci::SYSTEM_RESET as u64, 0, 0, 0)[0]
    } else {
        hvc(psci::SYSTEM_RESET2_64 as u64, 0, 0, 0)[0]
    }
}

/// vCPU 1 (from `smp_secondary_entry`): says it runs, then spins forever
/// without leaving the guest, or (concurrent mode) waits for the go flag
/// and makes the boot's reset call too.
#[no_mangle]
extern "C" fn smp_secondary_main(index: u64) -> ! {
    write(SECONDARY_UP, index);
    if read(BOTH_RESET) == 1 {
        while read(GO) != 1 {
            core::hint::spin_loop();
        }
        write(GO, 2);
        reset_call(read(NOTE + 8));
    }
    loop {
        core::hint::spin_loop();
    }
}

/// vCPU 0 (from guest-rt).
#[no_mangle]
pub fn guest_main(x0: u64, _: u64, _: u64, _: u64) -> u64 {
    let concurrent = x0 & CONCURRENT != 0;
    let resets = (x0 & 0xffff_ffff).max(1);
    let boot = if read(NOTE) == MAGIC {
        read(NOTE + 8) + 1
    } else {
        1
    };
    write(NOTE, MAGIC);
    write(NOTE + 8, boot);
    // SAFETY: only vCPU 0 touches the canary; a raw pointer, no reference.
    let canary = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(CANARY)) };
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(CANARY), CANARY_LEFT) };
    let reloaded = canary == CANARY_INIT;
    let secondary = smp::affinity_info(1) != psci::RET_INVALID_PARAMETERS;
    if boot == 1 {
        println!("reset: first boot (note at {NOTE:#x}; {resets} reset(s) to ask for)");
        if !reloaded {
            println!("reset: .data canary {canary:#x} on the first boot: FAIL");
            return 1;
        }
    } else {
        println!("reset: restarted from the entry point (boot {boot})");
        println!(
            "reset: note from boot {} found; .data canary {}",
            boot - 1,
            if reloaded {
                "back at its initial value (image reloaded)"
            } else {
                "as the previous boot left it (image not reloaded)"
            }
        );
        if secondary {
            let s = smp::affinity_info(1);
            if s != psci::AFFINITY_OFF {
                println!("reset: vCPU 1 is not off after the reset (AFFINITY_INFO {s}): FAIL");
                return 1;
            }
            println!("reset: vCPU 1 is off after the reset");
        }
    }
    report(code::RESET, boot, reloaded as u64);
    if boot > resets {
        println!("reset: {} reset(s) done; SYSTEM_OFF", boot - 1);
        return 0;
    }
    if secondary {
        write(SECONDARY_UP, 0);
        write(GO, 0);
        write(BOTH_RESET, concurrent as u64);
        let r = smp::cpu_on(1);
        if r != psci::RET_SUCCESS {
            println!("reset: CPU_ON of vCPU 1 returned {r}: FAIL");
            return 1;
        }
        while read(SECONDARY_UP) != 1 {
            smp::wfi();
        }
        println!("reset: vCPU 1 is spinning in the guest");
    }
    let both = if secondary && concurrent {
        " (vCPU 1 too, at the same time)"
    } else {
        ""
    };
    if boot % 2 == 1 {
        println!("reset: SYSTEM_RESET{both}");
    } else {
        println!("reset: SYSTEM_RESET2 (warm reset){both}");
    }
    write(GO, 1);
    if !both.is_empty() {
        while read(GO) != 2 {
            core::hint::spin_loop();
        }
    }
    let r = reset_call(boot);
    println!("reset: the reset call returned {}: FAIL", r as i64);
    1
}
