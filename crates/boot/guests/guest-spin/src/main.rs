//! Preemption guest (x0 = number of vCPUs, at least 3): vCPU 1 spins
//! forever without a single exit (no MMIO, no HVC, no WFI); vCPUs 2.. are
//! workers that print a few progress lines and set a done flag; vCPU 0
//! busy-waits (no WFI either) until every worker is done, then powers the
//! VM off, which also ends the spinner. With fewer physical CPUs than
//! vCPUs this only completes if the hypervisor preempts the spinners.
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "../../guest-smp/src/smp.rs"]
mod smp;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_rt::println;
use smp::MAX_VCPUS;

static SPINS: AtomicU64 = AtomicU64::new(0);
static DONE: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];

fn busy(iterations: u64) -> u64 {
    let mut x = 0u64;
    for i in 0..iterations {
        x = core::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
    x
}

/// A secondary vCPU (from `smp_secondary_entry`).
#[no_mangle]
extern "C" fn smp_secondary_main(index: u64) -> ! {
    smp::enable_mmu();
    let i = index as usize;
    if i == 1 {
        // The spinner: never leaves the guest on its own.
        loop {
            SPINS.fetch_add(1, Ordering::Relaxed);
        }
    }
    for step in 1..=5 {
        let x = busy(1_000_000);
        println!(
            "worker vCPU {i}: step {step}/5 (checksum {:#x})",
            x & 0xffff
        );
    }
    DONE[i].store(1, Ordering::Release);
    let r = smp::cpu_off();
    println!("worker vCPU {i}: CPU_OFF returned {r}");
    loop {
        smp::wfi();
    }
}

/// vCPU 0 (from guest-rt).
#[no_mangle]
pub fn guest_main(nvcpus: u64, _: u64, _: u64, _: u64) -> u64 {
    smp::enable_mmu();
    let n = (nvcpus as usize).clamp(1, MAX_VCPUS);
    if n < 3 {
        println!("need at least 3 vCPUs (boot, spinner, worker), got {n}: FAIL");
        return 1;
    }
    println!(
        "boot vCPU: {n} vCPUs: vCPU 1 spins forever, vCPUs 2..{} work",
        n - 1
    );
    for i in 1..n {
        let r = smp::cpu_on(i);
        if r != 0 {
            println!("CPU_ON of vCPU {i} returned {r}: FAIL");
            return 1;
        }
    }
    // Busy-wait: no exit, so only preemption lets the workers run when
    // there are fewer physical CPUs than vCPUs.
    while (2..n).any(|i| DONE[i].load(Ordering::Acquire) == 0) {
        core::hint::spin_loop();
    }
    let spins = SPINS.load(Ordering::Relaxed);
    println!(
        "all {} workers finished while vCPU 1 spins ({spins} iterations so far); SYSTEM_OFF",
        n - 2
    );
    0
}
