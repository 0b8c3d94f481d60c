//! The VMM at EL1 (handoff flags bit 2, `cargo xtask run --host-el1`;
//! being brought up, the default keeps it at EL2).
//!
//! Every CPU boots at EL2 as always ([`super::start`]: EL2 MMU, `PerCpu`,
//! the world switch's per-CPU set-up); CPU 0 starts the secondaries at EL2
//! with the firmware's PSCI `CPU_ON` ([`start_secondaries`]) before
//! anything drops. Then each CPU enters the host at EL1h ([`enter_host`],
//! an `eret` with interrupts masked): `SP_EL1` = its own stack in
//! `.host_stacks` (not the EL2 stacks), `VBAR_EL1` = the host vectors
//! below (any exception the host takes is a bug of the host: it prints
//! `ESR_EL1`/`FAR_EL1`/`ELR_EL1` and panics), `TPIDR_EL1` = its `PerCpu`
//! (what [`super::start::cpu_index`] reads at EL1), the host stage-1 =
//! the host's own copy of the identity map in host memory (`.bss`, not
//! the hypervisor's EL2 tables; same `PageTable<El2>` descriptors read as
//! EL1 ones: their `AP[1]` makes every page EL0-accessible, so writable
//! pages are privileged-execute-never and the read-only text is
//! executable; see [`super::el1host`]), `HCR_EL2` = `RW | TSC` only (no stage-2: a trusted
//! host, nVHE-style; interrupts go to EL1), `VTTBR_EL2` VMID 0,
//! `CNTHCTL_EL2.EL1PCTEN|EL1PCEN` (the host's tick is the EL1 physical
//! timer, PPI 30), `ICC_SRE_EL2.Enable` (the host owns `ICC_*_EL1`),
//! `VMPIDR_EL2` = the real `MPIDR_EL1`, `CPACR_EL1.FPEN` (FP/SIMD
//! untrapped at EL1).
//!
//! From EL1 the host reaches EL2 only by `hvc #0` (the lower-EL vector's
//! fast path, `PerCpu::el1_host` = [`EL1_VMM`]) and by the SMCs `TSC`
//! traps ([`pkvm_el2_host_trap`]: PSCI, answered by the hypervisor); any
//! other trap from the host is a bug and panics at EL2.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{MAX_CPUS, STACK_SIZE};
use crate::{read_sysreg, write_sysreg};

/// `PerCpu::el1_host` while the VMM runs at EL1 on the CPU: its `hvc #0`
/// is served in place, its trapped SMCs by [`pkvm_el2_host_trap`].
pub const EL1_VMM: u64 = 2;

/// Bytes of each CPU's host stack (see `link.ld`, `.host_stacks`): as the
/// EL2 stacks (`start::deepest_use` measures both).
pub const HOST_STACK_SIZE: u64 = STACK_SIZE;

/// Whether this boot runs the VMM at EL1 (set on CPU 0 from the handoff
/// block before any secondary starts).
static HOST_EL1: AtomicBool = AtomicBool::new(false);
/// Secondaries the VMM released (bit per CPU): a secondary started at EL2
/// before the VMM ran waits at EL1 until the VMM's GIC set-up is done.
static RELEASED: AtomicU64 = AtomicU64::new(0);

/// Whether this boot runs the VMM at EL1.
pub fn host_el1() -> bool {
    HOST_EL1.load(Ordering::Relaxed)
}

/// `CurrentEL` (2 for EL2, 1 for EL1).
pub fn current_el() -> u64 {
    (read_sysreg!("CurrentEL") >> 2) & 3
}

global_asm!(
    r#"
.macro HOST_VEC kind
    .balign 128
    sub     sp, sp, #256
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       pkvm_host_vector_common
.endm

.section .text.host_vectors, "ax"
.balign 2048
.global pkvm_host_vectors
pkvm_host_vectors:
    .irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    HOST_VEC \k
    .endr

pkvm_host_vector_common:
    stp     x2, x3, [sp, #16]
    stp     x29, x30, [sp, #32]
    mov     x1, sp
    bl      pkvm_host_exception
1:  b       1b

// x0 = CPU index, x1 = this CPU's EL2 stack top, ELR/SPSR_EL2 and the
// host's EL1 registers already written: drop to the host.
.global pkvm_eret_to_host
pkvm_eret_to_host:
    mov     sp, x1
    eret

// The host's entry at EL1h (SP_EL1 = its host stack), x0 = CPU index.
.global pkvm_host_entry
pkvm_host_entry:
    bl      pkvm_host_rust_entry
1:  b       1b
"#
);

extern "C" {
    fn pkvm_eret_to_host(cpu: usize, el2_sp: u64) -> !;
    fn pkvm_host_entry();
    static pkvm_host_vectors: u8;
}

/// Whether the handoff block asked for the VMM at EL1 for a scenario
/// that keeps it at EL2 ([`KEEPS_EL2`]).
static KEPT_AT_EL2: AtomicBool = AtomicBool::new(false);

/// Scenarios that keep the VMM at EL2 under the flag: `host-attack`'s
/// EL1 mini-host is entered from the VMM by the world switch.
pub const KEEPS_EL2: &[&str] = &["host-attack"];

/// Reads the handoff flag on CPU 0 (EL2, MMU on, before the secondaries).
pub fn init_flag() {
    let h = super::handoff::read();
    let asked = h.as_ref().is_some_and(|h| h.host_el1);
    let keep = h
        .as_ref()
        .is_some_and(|h| KEEPS_EL2.contains(&h.scenario()));
    HOST_EL1.store(asked && !keep, Ordering::Relaxed);
    KEPT_AT_EL2.store(asked && keep, Ordering::Relaxed);
}

/// Whether EL1 was asked for but this scenario keeps the VMM at EL2.
pub fn kept_at_el2() -> bool {
    KEPT_AT_EL2.load(Ordering::Relaxed)
}

/// CPU 0 at EL2 (MMU, device tree ready): starts every secondary at EL2
/// (firmware PSCI `CPU_ON`), each of which enters the host at EL1 and waits
/// there for [`release`].
pub fn start_secondaries(p: &super::dt::Platform) {
    build_host_stage1(p);
    for i in 1..p.ncpus.min(MAX_CPUS) {
        if let Err(e) = super::start::start_secondary(i, p.cpus[i]) {
            crate::println!(
                "cpus: CPU {i} (MPIDR {:#x}) did not start at EL2: {e:?}",
                p.cpus[i]
            );
            break;
        }
    }
}

/// The most of CPU `cpu`'s host stack (`.host_stacks`) used so far, in
/// bytes (as `start::stack_used` for the EL2 stacks).
pub fn host_stack_used(cpu: usize) -> u64 {
    extern "C" {
        static __host_stacks_start: u8;
    }
    if cpu >= MAX_CPUS {
        return 0;
    }
    let base = core::ptr::addr_of!(__host_stacks_start) as u64 + cpu as u64 * HOST_STACK_SIZE;
    super::start::deepest_use(base)
}

#[repr(C, align(4096))]
struct TablePage([u64; 512]);

/// Table pages of the host's stage-1 (in `.bss`: the VMM's memory, not
/// the hypervisor's EL2 tables).
const HOST_PT_PAGES: usize = 32;
static mut HOST_PT: [TablePage; HOST_PT_PAGES] = [const { TablePage([0; 512]) }; HOST_PT_PAGES];
/// Root of the host's stage-1 (`TTBR0_EL1`), built by [`start_secondaries`].
static HOST_TTBR: AtomicU64 = AtomicU64::new(0);

/// A page cache over [`HOST_PT`] (zeroed with `.bss`).
struct HostPtCache {
    next: usize,
}

impl pkvm_pgtable::PageCache for HostPtCache {
    fn alloc_table(&mut self) -> Option<pkvm_arch::Pa> {
        if self.next >= HOST_PT_PAGES {
            return None;
        }
        let base = core::ptr::addr_of!(HOST_PT) as u64;
        let pa = pkvm_arch::Pa(base + self.next as u64 * 4096);
        self.next += 1;
        Some(pa)
    }
    fn free_table(&mut self, _pa: pkvm_arch::Pa) {
        // As the EL2 map's cache: the few pages freed by collapses are zero
        // and not reused.
    }
}

/// Builds the host's stage-1, its own copy of the identity map in host
/// memory ([`HOST_PT`], `PageTable<El2>` descriptors read as EL1 ones:
/// `AP[1]` makes every page EL0-accessible, so RW pages are
/// privileged-execute-never and the read-only text is executable; EL2's
/// XN reads as UXN). CPU 0 at EL2, once.
fn build_host_stage1(p: &super::dt::Platform) -> u64 {
    let mut cache = HostPtCache { next: 0 };
    let (root, _pt) = super::mmu::identity_map(&mut cache, p.ram_start, p.ram_end);
    super::hw::dcache_clean_range(
        core::ptr::addr_of!(HOST_PT) as u64,
        (cache.next * 4096) as u64,
    );
    super::sysreg::dsb_ish();
    crate::println!(
        "el1boot: the host's stage-1: its own identity map in host memory at {:#x} ({} table pages)",
        root.0,
        cache.next
    );
    HOST_TTBR.store(root.0, Ordering::Release);
    root.0
}

/// Lets secondary `cpu`, waiting at EL1, go on into the VMM.
pub fn release(cpu: usize) {
    RELEASED.fetch_or(1 << cpu, Ordering::AcqRel);
}

/// `HCR_EL2` of the host at EL1: AArch64 EL1 (`RW`), SMCs trapped
/// (`TSC`), no stage-2 (`VM` clear: the trusted host of step 1), physical
/// interrupts to EL1 (`IMO`/`FMO`/`AMO` clear).
pub const HOST_HCR_EL2: u64 = (1 << 31) | (1 << 19);
/// `CNTHCTL_EL2` of the host: the EL1 physical counter and timer untrapped.
pub const HOST_CNTHCTL_EL2: u64 = 0b11;
/// `SPSR_EL2` of the entry: EL1h, D, A, I, F masked.
const SPSR_EL1H_MASKED: u64 = 0x3c5;

/// Drops this CPU (at EL2, `PerCpu` and `TPIDR_EL2` set) into the host at
/// EL1h: see the module docs. `percpu` is what `TPIDR_EL2` holds.
pub fn enter_host(cpu: usize, percpu: u64) -> ! {
    extern "C" {
        static __host_stacks_start: u8;
        static __stacks_start: u8;
    }
    assert!(cpu < MAX_CPUS);
    let host_sp =
        core::ptr::addr_of!(__host_stacks_start) as u64 + (cpu as u64 + 1) * HOST_STACK_SIZE;
    let el2_sp = core::ptr::addr_of!(__stacks_start) as u64 + (cpu as u64 + 1) * STACK_SIZE;
    // The host's EL1 stage-1: its own copy of the identity map.
    let ttbr = HOST_TTBR.load(Ordering::Acquire);
    assert!(ttbr != 0, "the host's stage-1 is not built");
    write_sysreg!("mair_el1", super::el1host::HOST_MAIR_EL1);
    write_sysreg!("tcr_el1", super::el1host::host_tcr_el1());
    write_sysreg!("ttbr0_el1", ttbr);
    write_sysreg!("vbar_el1", core::ptr::addr_of!(pkvm_host_vectors) as u64);
    write_sysreg!("tpidr_el1", percpu);
    // FP/SIMD untrapped at EL1 (`CPACR_EL1.FPEN`): the host's Rust uses it.
    write_sysreg!("cpacr_el1", 3 << 20);
    write_sysreg!("sp_el1", host_sp);
    write_sysreg!("vmpidr_el2", read_sysreg!("mpidr_el1"));
    write_sysreg!("vttbr_el2", 0);
    write_sysreg!("cnthctl_el2", HOST_CNTHCTL_EL2);
    write_sysreg!("icc_sre_el2", 0xf);
    write_sysreg!("hcr_el2", HOST_HCR_EL2);
    super::sysreg::isb();
    super::switch::cache_gic_counts();
    // SAFETY: drops every EL1&0 TLB entry of VMID 0 before the host's
    // stage-1 comes on; no EL1 code ran with these tables yet.
    unsafe { core::arch::asm!("tlbi vmalle1", "dsb ish", "isb", options(nostack)) };
    write_sysreg!("sctlr_el1", super::el1host::HOST_SCTLR_EL1_MMU);
    write_sysreg!("elr_el2", pkvm_host_entry as *const () as usize as u64);
    write_sysreg!("spsr_el2", SPSR_EL1H_MASKED);
    super::start::set_el1_host_mode(EL1_VMM);
    super::sysreg::isb();
    // SAFETY: every register the host's EL1 context needs is written
    // above; `el2_sp` is the top of this CPU's own EL2 stack, which the
    // hypervisor's vectors use from now on (nothing on it is live: this
    // function never returns).
    unsafe { pkvm_eret_to_host(cpu, el2_sp) }
}

/// The host's first Rust code at EL1.
#[no_mangle]
extern "C" fn pkvm_host_rust_entry(cpu: usize) -> ! {
    if cpu == 0 {
        crate::boot_main(super::dt::platform())
    }
    while RELEASED.load(Ordering::Acquire) & (1 << cpu) == 0 {
        core::hint::spin_loop();
    }
    crate::secondary_main(cpu)
}

/// x0..x3, x29, x30 as the host vectors save them.
#[repr(C)]
pub struct HostFrame {
    x: [u64; 6],
}

/// Any exception the host takes at EL1: a host bug.
#[no_mangle]
extern "C" fn pkvm_host_exception(kind: u64, frame: &HostFrame) -> ! {
    let esr = read_sysreg!("esr_el1");
    crate::println!(
        "EL1 host exception (vector {kind}) ESR_EL1={esr:#x} (EC {:#x}) ELR_EL1={:#x} FAR_EL1={:#x} lr={:#x}",
        esr >> 26,
        read_sysreg!("elr_el1"),
        read_sysreg!("far_el1"),
        frame.x[5]
    );
    panic!("unexpected exception in the host at EL1");
}

/// x0..x30 of the host at EL1, saved by the lower-EL vector's host-trap
/// path and restored on return.
#[repr(C)]
pub struct TrapFrame {
    /// x0..x30.
    pub x: [u64; 31],
    /// `ELR_EL2`, written back on return.
    pub elr: u64,
    /// `SPSR_EL2`, written back on return.
    pub spsr: u64,
}

/// A trap from the VMM at EL1 other than its `hvc #0` (EL2): its SMCs
/// (`HCR_EL2.TSC`) are PSCI calls the hypervisor answers
/// ([`host_smc`]), stepped over; anything else is a host bug.
#[no_mangle]
extern "C" fn pkvm_el2_host_trap(f: &mut TrapFrame) {
    let esr = read_sysreg!("esr_el2");
    if esr >> 26 == 0x17 {
        f.x[0] = host_smc(f.x[0] as u32, f.x[1], f.x[2], f.x[3]) as u64;
        f.elr += 4;
        return;
    }
    crate::println!(
        "trap from the VMM at EL1: ESR_EL2={esr:#x} (EC {:#x}) ELR_EL2={:#x} FAR_EL2={:#x}",
        esr >> 26,
        read_sysreg!("elr_el2"),
        read_sysreg!("far_el2")
    );
    panic!("unexpected trap from the VMM at EL1");
}

/// The VMM's SMC at EL1, as the hypervisor answers it: PSCI `VERSION`,
/// `FEATURES`, `AFFINITY_INFO` and `SYSTEM_OFF`/`SYSTEM_RESET` go on to
/// the firmware (the VMM ends the run; trusted host of step 1); `CPU_ON`
/// of a CPU that is on answers `ALREADY_ON`, of one that is off `DENIED`
/// (every CPU was started at boot); anything else `NOT_SUPPORTED`.
fn host_smc(func: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    use super::exit::psci_call;
    use pkvm_arch::smccc::psci;
    const FEATURES: u32 = 0x8400_000a;
    match func {
        psci::VERSION | FEATURES | psci::SYSTEM_OFF | psci::SYSTEM_RESET => {
            psci_call(func, a1, a2, a3)
        }
        psci::AFFINITY_INFO_32 | psci::AFFINITY_INFO_64 => psci_call(func, a1, a2, 0),
        psci::CPU_ON_32 | psci::CPU_ON_64 => {
            if psci_call(psci::AFFINITY_INFO_64, a1, 0, 0) == 0 {
                -4
            } else {
                -3
            }
        }
        _ => pkvm_arch::smccc::ret::NOT_SUPPORTED,
    }
}
