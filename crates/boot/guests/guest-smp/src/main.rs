//! SMP guest: vCPU 0 (x0 = number of vCPUs) turns its MMU on, then twice
//! brings up every secondary with PSCI CPU_ON. Each secondary turns its MMU
//! on, prints its MPIDR_EL1, increments a shared atomic counter and its own
//! check-in count, and turns itself off with CPU_OFF. vCPU 0 waits (WFI)
//! until all have reported in and AFFINITY_INFO says they are off, checks
//! that every secondary reported in exactly twice, and returns (guest-rt
//! then powers the VM off with SYSTEM_OFF).
#![no_std]
#![no_main]

mod smp;

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use guest_rt::println;
use smp::MAX_VCPUS;

static ARRIVED: AtomicUsize = AtomicUsize::new(0);
static ROUND: AtomicUsize = AtomicUsize::new(0);
static CHECKINS: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];

/// A secondary vCPU (from `smp_secondary_entry`).
#[no_mangle]
extern "C" fn smp_secondary_main(index: u64) -> ! {
    smp::enable_mmu();
    let i = index as usize;
    let round = ROUND.load(Ordering::Acquire);
    println!(
        "secondary vCPU {i}: MPIDR_EL1 {:#x}, reporting in (round {round})",
        smp::mpidr()
    );
    if let Some(c) = CHECKINS.get(i) {
        c.fetch_add(1, Ordering::AcqRel);
    }
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    let r = smp::cpu_off();
    println!("secondary vCPU {i}: CPU_OFF returned {r}");
    loop {
        smp::wfi();
    }
}

/// vCPU 0 (from guest-rt).
#[no_mangle]
pub fn guest_main(nvcpus: u64, _: u64, _: u64, _: u64) -> u64 {
    smp::enable_mmu();
    let n = (nvcpus as usize).clamp(1, MAX_VCPUS);
    let v = guest_rt::hvc(0x8400_0000, 0, 0, 0)[0];
    println!(
        "boot vCPU: MPIDR_EL1 {:#x}, {n} vCPUs, PSCI {}.{}, stage-1 MMU on",
        smp::mpidr(),
        v >> 16,
        v & 0xffff
    );
    for round in 1..=2usize {
        ROUND.store(round, Ordering::Release);
        for i in 1..n {
            let r = smp::cpu_on(i);
            if r != 0 {
                println!("round {round}: CPU_ON of vCPU {i} returned {r}: FAIL");
                return 1;
            }
        }
        while ARRIVED.load(Ordering::Acquire) < round * (n - 1) {
            smp::wfi();
        }
        for i in 1..n {
            while smp::affinity_info(i) != 1 {
                smp::wfi();
            }
        }
        println!(
            "round {round}: all {} secondaries reported in and are off again",
            n - 1
        );
    }
    let bad = (1..n)
        .filter(|&i| CHECKINS[i].load(Ordering::Acquire) != 2)
        .count();
    if bad != 0 {
        println!("{bad} secondaries did not report in exactly twice: FAIL");
        return 1;
    }
    println!("all {} secondaries reported in twice; SYSTEM_OFF", n - 1);
    0
}
