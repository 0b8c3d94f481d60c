//! SMP support shared by guest-smp and guest-spin (guest-spin includes this
//! file with `#[path]`):
//!
//! - A stage-1 identity map (one static level-1 table of 1 GiB blocks:
//!   `[0, 1 GiB)` Device-nGnRnE, `[1 GiB, 2 GiB)` Normal write-back inner
//!   shareable), turned on by every vCPU with [`enable_mmu`]. With the MMU
//!   off all data accesses are Device memory, where exclusives (atomics)
//!   are not allowed; with it on, guest RAM is Normal memory and
//!   `core::sync::atomic` works across vCPUs.
//! - The secondary entry point `smp_secondary_entry` (PSCI CPU_ON target,
//!   x0 = context id = vCPU index): a per-vCPU stack, FP/SIMD on, then the
//!   guest's `smp_secondary_main(index)`.
//! - PSCI helpers over HVC and the vCPU affinity layout (the one the VM's
//!   device tree and pkvm-host use: Aff0 = index & 0xf, Aff1 = index >> 4).

use core::arch::{asm, global_asm};

use guest_rt::hvc;
use pkvm_arch::smccc::psci;

/// vCPUs the guest supports.
pub const MAX_VCPUS: usize = 16;
/// Stack per secondary vCPU.
pub const STACK: usize = 0x2000;

global_asm!(
    r#"
.section .text
.global smp_secondary_entry
smp_secondary_entry:
    ldr     x9, =smp_stacks
    add     x10, x0, #1
    mov     x11, #{stack}
    madd    x9, x10, x11, x9
    mov     sp, x9
    mov     x9, #(3 << 20)
    msr     cpacr_el1, x9
    isb
    bl      smp_secondary_main
1:  wfi
    b       1b

.section .bss.smp_stacks, "aw", %nobits
.balign 16
smp_stacks:
    .space {stack} * {max}
"#,
    stack = const STACK,
    max = const MAX_VCPUS,
);

extern "C" {
    fn smp_secondary_entry();
}

/// The address secondaries start at (PSCI CPU_ON entry point).
pub fn secondary_entry() -> u64 {
    smp_secondary_entry as *const () as usize as u64
}

const BLOCK_VALID: u64 = 0b01;
const ATTR_DEVICE: u64 = 0 << 2;
const ATTR_NORMAL: u64 = 1 << 2;
const SH_INNER: u64 = 3 << 8;
const AF: u64 = 1 << 10;
const PXN_UXN: u64 = 3 << 53;

#[repr(C, align(4096))]
struct Table([u64; 512]);

const fn identity_l1() -> Table {
    let mut t = [0u64; 512];
    t[0] = BLOCK_VALID | ATTR_DEVICE | AF | PXN_UXN;
    t[1] = (1 << 30) | BLOCK_VALID | ATTR_NORMAL | SH_INNER | AF;
    Table(t)
}

/// The identity map (read-only data: the image is cleaned to the point of
/// coherency by the host before the guest starts).
static IDENTITY_L1: Table = identity_l1();

/// MAIR_EL1: attr 0 Device-nGnRnE, attr 1 Normal WB RA/WA.
const MAIR: u64 = 0xff << 8;
/// TCR_EL1: T0SZ 25 (39-bit VA, walk from level 1), IRGN0/ORGN0 WB-WA,
/// SH0 inner, TG0 4K, EPD1 (no TTBR1 walks), IPS 40 bits.
const TCR: u64 = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32);
/// SCTLR_EL1 bits: M, C, I.
const SCTLR_ON: u64 = 1 | (1 << 2) | (1 << 12);

/// Turns this vCPU's stage-1 MMU and caches on with the identity map.
pub fn enable_mmu() {
    let ttbr = core::ptr::addr_of!(IDENTITY_L1) as u64;
    // SAFETY: the identity map keeps every address the guest uses at the
    // same place with the same (now cacheable) memory; the TLB is
    // invalidated before the MMU goes on.
    unsafe {
        asm!(
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr}",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "isb",
            "mrs {t}, sctlr_el1",
            "orr {t}, {t}, {on}",
            "msr sctlr_el1, {t}",
            "isb",
            mair = in(reg) MAIR, tcr = in(reg) TCR, ttbr = in(reg) ttbr, on = in(reg) SCTLR_ON,
            t = out(reg) _, options(nostack)
        );
    }
}

/// MPIDR_EL1 of this vCPU.
pub fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

/// The affinity of vCPU `index` (PSCI target / device tree `reg`).
pub const fn affinity(index: usize) -> u64 {
    let i = index as u64;
    (i & 0xf) | (((i >> 4) & 0xff) << 8)
}

/// PSCI CPU_ON (64-bit) of vCPU `index` at the secondary entry with
/// context id `index`; the PSCI return code.
pub fn cpu_on(index: usize) -> i64 {
    hvc(
        psci::CPU_ON_64 as u64,
        affinity(index),
        secondary_entry(),
        index as u64,
    )[0] as i64
}

/// PSCI AFFINITY_INFO (level 0) of vCPU `index`: 0 on, 1 off.
pub fn affinity_info(index: usize) -> i64 {
    hvc(psci::AFFINITY_INFO_64 as u64, affinity(index), 0, 0)[0] as i64
}

/// PSCI CPU_OFF; returns only on failure (the error code).
pub fn cpu_off() -> i64 {
    hvc(psci::CPU_OFF as u64, 0, 0, 0)[0] as i64
}

/// Waits for an interrupt (trapped: the hypervisor lets other vCPUs run).
pub fn wfi() {
    // SAFETY: WFI only waits.
    unsafe { asm!("wfi", options(nomem, nostack)) };
}
