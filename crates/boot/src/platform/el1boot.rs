//! The VMM at EL1: the default layout (handoff flags bit 2, `cargo xtask
//! run --host-el2`, keeps it at EL2 next to the hypervisor instead: the
//! legacy layout, for comparisons).
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

/// `SCTLR_EL1` (the host's stage-1 controls, for its checks at EL1).
pub fn sctlr_el1() -> u64 {
    read_sysreg!("sctlr_el1")
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
    // A synchronous exception at EL1h on one of the probes' accesses
    // (an abort the hypervisor injected): resume at the probe's fault
    // return with x1 = ESR_EL1, x2 = FAR_EL1.
    cmp     x0, #4
    b.ne    2f
    mrs     x2, elr_el1
    adr     x3, pkvm_host_probe_load_insn
    cmp     x2, x3
    b.eq    3f
    adr     x3, pkvm_host_probe_store_insn
    cmp     x2, x3
    b.ne    2f
3:  adr     x3, pkvm_host_probe_fault
    msr     elr_el1, x3
    mrs     x1, esr_el1
    mrs     x2, far_el1
    ldr     x3, [sp, #24]
    ldp     x29, x30, [sp, #32]
    add     sp, sp, #256
    eret
2:  mov     x1, sp
    bl      pkvm_host_exception
1:  b       1b

// The host's probes: x0 = address (x1 = value to store). x0 = 0 and
// x1 = the value loaded; or, after an injected abort, x0 = 1, x1 =
// ESR_EL1, x2 = FAR_EL1.
.global pkvm_host_probe_load
pkvm_host_probe_load:
pkvm_host_probe_load_insn:
    ldr     x1, [x0]
    mov     x0, #0
    ret
.global pkvm_host_probe_store
pkvm_host_probe_store:
pkvm_host_probe_store_insn:
    str     x1, [x0]
    mov     x0, #0
    ret
pkvm_host_probe_fault:
    mov     x0, #1
    ret

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

/// An access a host probe made that the hypervisor refused: the abort it
/// injected (`ESR_EL1`, `FAR_EL1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `ESR_EL1` of the injected abort.
    pub esr: u64,
    /// `FAR_EL1`: the address.
    pub far: u64,
}

/// Loads the word at `addr` from the VMM at EL1, taking an abort the
/// hypervisor injects (a host stage-2 fault it refused) as an error
/// instead of a panic.
///
/// # Errors
/// The injected abort.
pub fn probe_load(addr: u64) -> Result<u64, Refused> {
    assert_eq!(current_el(), 1, "probes are for the VMM at EL1");
    let (status, a, b): (u64, u64, u64);
    // SAFETY: the probe's only memory access is the load from `addr`
    // (8-byte aligned by the callers' contract: a misaligned one is an
    // alignment fault, a host bug, panicking in the vector); an abort
    // on it is taken by the host vectors, which resume at the probe's
    // fault return (x0 = 1, x1 = ESR, x2 = FAR). Only x0..x3 and the
    // flags change (x3 in the vector, restored).
    unsafe {
        core::arch::asm!(
            "bl pkvm_host_probe_load",
            inout("x0") addr => status, out("x1") a, out("x2") b,
            out("x30") _, options(nostack),
        );
    }
    if status == 0 {
        Ok(a)
    } else {
        Err(Refused { esr: a, far: b })
    }
}

/// Stores `value` to `addr` from the VMM at EL1, as [`probe_load`].
///
/// # Errors
/// The injected abort.
pub fn probe_store(addr: u64, value: u64) -> Result<(), Refused> {
    assert_eq!(current_el(), 1, "probes are for the VMM at EL1");
    let (status, a, b): (u64, u64, u64);
    // SAFETY: as `probe_load`: the store to `addr` is the probe's only
    // memory access, an abort on it resumes at the fault return; the
    // callers store only to memory no Rust object of theirs lives in
    // (another role's memory, or a word they own).
    unsafe {
        core::arch::asm!(
            "bl pkvm_host_probe_store",
            inout("x0") addr => status, inout("x1") value => a, out("x2") b,
            out("x30") _, options(nostack),
        );
    }
    if status == 0 {
        Ok(())
    } else {
        Err(Refused { esr: a, far: b })
    }
}

/// Whether the hypervisor answers the test hooks (`HYP_PROBE`): set at
/// boot, at EL2, for the `host-attack` scenario only (its checks of the
/// hypervisor's state; a debug facility, as pKVM's EL2 debug builds).
#[link_section = ".bss.hyp.el1boot_test_hooks"]
static TEST_HOOKS: AtomicBool = AtomicBool::new(false);

/// Whether this boot's hypervisor answers the test hooks.
pub fn test_hooks() -> bool {
    TEST_HOOKS.load(Ordering::Acquire)
}

/// Reads the handoff flag on CPU 0 (EL2, MMU on, before the secondaries).
pub fn init_flag() {
    let h = super::handoff::read();
    // The VMM runs at EL1 unless the handoff block asks for the legacy
    // layout (flags bit 2, `--host-el2`).
    let asked = !h.as_ref().is_some_and(|h| h.host_el2);
    HOST_EL1.store(asked, Ordering::Relaxed);
    let hooks = h.as_ref().is_some_and(|h| h.scenario() == "host-attack");
    TEST_HOOKS.store(hooks, Ordering::Release);
}

/// CPU 0 at EL2 (MMU, device tree ready): starts every secondary at EL2
/// (firmware PSCI `CPU_ON`), each of which enters the host at EL1 and waits
/// there for [`release`].
pub fn start_secondaries(p: &super::dt::Platform) {
    build_host_stage1(p);
    for i in 1..p.ncpus.min(MAX_CPUS) {
        let r = super::start::start_secondary(i, p.cpus[i]);
        if r.is_ok() {
            STARTED.fetch_or(1 << i, Ordering::AcqRel);
        }
        if let Err(e) = r {
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

/// Where the host's writable alias of RAM starts in its stage-1 (VA):
/// one 1 GiB block at root index 2 over RAM's first GiB.
const RAM_ALIAS_VA: u64 = 0x8000_0000;

/// The VMM at EL1: the address of a writable alias of `pa` (RAM) in its
/// own stage-1, as a hostile host would make one for the image's code
/// (its identity map keeps the code read-only, so a store there stops at
/// its own stage-1; through the alias it reaches the host stage-2, which
/// must refuse it). Installed once (a block descriptor in the host's root
/// table, host memory, privileged-execute-never). At EL2, `pa` itself.
pub fn writable_alias(pa: u64) -> u64 {
    let base = super::RAM_BASE;
    if current_el() == 2 || !(base..base + (1 << 30)).contains(&pa) {
        return pa;
    }
    let root = HOST_TTBR.load(Ordering::Acquire);
    let slot = (root + 8 * (RAM_ALIAS_VA >> 30)) as *mut u64;
    let desc = base
        | (1 << 54)
        | (1 << 53)
        | (1 << 10)
        | (3 << 8)
        | (pkvm_arch::pte::el2::MAIR_IDX_NORMAL << 2)
        | 0b01;
    // SAFETY: `root` is the host's stage-1 root (`HOST_PT`, host `.bss`,
    // identity-mapped read-write at EL1); index 2 (VAs 0x8000_0000..) is
    // above RAM and the devices, unused by the identity map, so the
    // descriptor changes no translation in use; break-before-make does
    // not apply to an invalid entry.
    unsafe {
        if core::ptr::read_volatile(slot) == 0 {
            core::ptr::write_volatile(slot, desc);
            core::arch::asm!("dsb ishst", "isb", options(nostack));
        }
    }
    pa - base + RAM_ALIAS_VA
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
    let _ = percpu;
    write_sysreg!("tpidr_el1", core::ptr::from_ref(&HOST_CPUS[cpu]) as u64);
    HYP_HOST_EL1.store(true, Ordering::Release);
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

/// Any exception the host takes at EL1 outside a probe: a host bug. An
/// abort the hypervisor injected (a host stage-2 fault it refused: EC
/// 0x25/0x21, FSC 0x10) says so.
#[no_mangle]
extern "C" fn pkvm_host_exception(kind: u64, frame: &HostFrame) -> ! {
    let esr = read_sysreg!("esr_el1");
    let injected = matches!(esr >> 26, 0x21 | 0x25) && esr & 0x3f == 0x10;
    crate::println!(
        "EL1 host exception (vector {kind}) ESR_EL1={esr:#x} (EC {:#x}) ELR_EL1={:#x} FAR_EL1={:#x} lr={:#x}{}",
        esr >> 26,
        read_sysreg!("elr_el1"),
        read_sysreg!("far_el1"),
        frame.x[5],
        if injected {
            ": an abort the hypervisor injected (the host stage-2 refused the access)"
        } else {
            ""
        }
    );
    panic!("unexpected exception in the host at EL1");
}

/// The host's own per-CPU data at EL1 (`TPIDR_EL1`; host memory, not the
/// hypervisor's `PerCpu`).
#[repr(C)]
pub struct HostCpu {
    /// This CPU's index.
    pub index: u64,
}

/// One [`HostCpu`] per CPU, in host `.bss`.
static HOST_CPUS: [HostCpu; MAX_CPUS] = {
    let mut a = [const { HostCpu { index: 0 } }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        a[i].index = i as u64;
        i += 1;
    }
    a
};

/// CPUs started at EL2 for the host (bit per CPU; host memory, what the
/// VMM at EL1 reads instead of the hypervisor's `PerCpu::online`).
static STARTED: AtomicU64 = AtomicU64::new(1);

/// Whether CPU `idx` was started for the host (the VMM at EL1).
pub fn host_cpu_started(idx: usize) -> bool {
    idx < MAX_CPUS && STARTED.load(Ordering::Acquire) & (1 << idx) != 0
}

/// The VMM at EL1: this CPU's index from its own per-CPU data.
pub fn host_cpu_index() -> usize {
    let p = read_sysreg!("tpidr_el1") as *const HostCpu;
    if p.is_null() {
        return 0;
    }
    // SAFETY: the host's TPIDR_EL1 is only ever set (in `enter_host`) to
    // an element of the static HOST_CPUS array.
    unsafe { (*p).index as usize }
}

/// `HCR_EL2.VM`.
const HCR_VM: u64 = 1;

/// CPUs whose host runs under the host stage-2 (bit per CPU; the
/// hypervisor's data).
#[link_section = ".bss.hyp.el1boot_protected"]
static PROTECTED_CPUS: AtomicU64 = AtomicU64::new(0);
/// Set at EL2 when the host runs at EL1 on every CPU (the hypervisor's
/// copy of [`HOST_EL1`]).
#[link_section = ".bss.hyp.el1boot_host_el1"]
static HYP_HOST_EL1: AtomicBool = AtomicBool::new(false);

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 3] {
    [
        (
            "el1boot::TEST_HOOKS",
            core::ptr::from_ref(&TEST_HOOKS) as u64,
        ),
        (
            "el1boot::PROTECTED_CPUS",
            core::ptr::from_ref(&PROTECTED_CPUS) as u64,
        ),
        (
            "el1boot::HYP_HOST_EL1",
            core::ptr::from_ref(&HYP_HOST_EL1) as u64,
        ),
    ]
}

/// At EL2 from the VMM's hypercall on this CPU: puts the host at EL1 under
/// the host stage-2 (`VTTBR_EL2` = `vttbr`, VMID 0, `VTCR_EL2` = `vtcr`,
/// `HCR_EL2.VM`), kept on every return to the host (`HOST_RUN` and
/// `VCPU_RUN` put back the live controls). `false` (nothing changed)
/// when the caller is not the VMM at EL1.
pub fn protect_this_cpu(vttbr: u64, vtcr: u64) -> bool {
    if current_el() != 2 || !super::start::el1_vmm_here() || vttbr >> 48 != 0 {
        return false;
    }
    write_sysreg!("vtcr_el2", vtcr);
    write_sysreg!("vttbr_el2", vttbr);
    write_sysreg!("hcr_el2", read_sysreg!("hcr_el2") | HCR_VM);
    // SAFETY: drops the EL1&0 entries of VMID 0 (the host's, cached
    // without a stage-2) so that every later host access is translated
    // through the host stage-2; TLB maintenance only.
    unsafe { core::arch::asm!("isb", "tlbi vmalls12e1", "dsb nsh", "isb", options(nostack)) };
    PROTECTED_CPUS.fetch_or(1 << super::start::cpu_index(), Ordering::AcqRel);
    true
}

/// Whether the host may use protected VMs: when it runs at EL1, every
/// online CPU has its host under the host stage-2 (a CPU left out would
/// be a host with all of memory); at EL2 (the VMM in the hypervisor's
/// image, trusted) always.
pub fn all_cpus_protected() -> bool {
    if !HYP_HOST_EL1.load(Ordering::Acquire) {
        return true;
    }
    let done = PROTECTED_CPUS.load(Ordering::Acquire);
    (0..MAX_CPUS).all(|i| !super::start::is_online(i) || done & (1 << i) != 0)
}

/// Whether the host stage-2 is on for the host at EL1 on CPU `cpu`.
pub fn cpu_protected(cpu: usize) -> bool {
    cpu < MAX_CPUS && PROTECTED_CPUS.load(Ordering::Acquire) & (1 << cpu) != 0
}

/// What the hypervisor does with a host stage-2 fault of the VMM at EL1
/// (IPA, write): `Ok` retries the access (mapped, or another CPU
/// did), `Err` injects a synchronous external abort.
pub type AbortHandler = fn(ipa: u64, write: bool) -> Result<(), ()>;

/// The hypervisor's [`AbortHandler`], stored as a pointer; null: none.
#[link_section = ".bss.hyp.el1boot_abort"]
static ABORT: core::sync::atomic::AtomicPtr<()> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Sets the hypervisor's handler of the VMM's host stage-2 faults (EL2,
/// at its set-up).
pub fn set_abort_handler(h: AbortHandler) {
    ABORT.store(h as *mut (), Ordering::Release);
}

/// Host stage-2 faults of the VMM at EL1 served at EL2, and aborts
/// injected (counts, the hypervisor's).
#[link_section = ".bss.hyp.el1boot_faults"]
static FAULTS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// (host stage-2 faults served, aborts injected) so far.
pub fn fault_counts() -> (u64, u64) {
    (
        FAULTS[0].load(Ordering::Relaxed),
        FAULTS[1].load(Ordering::Relaxed),
    )
}

/// A host stage-2 fault of the VMM at EL1 (EC 0x20/0x24, at EL2): the
/// hypervisor's handler maps the page or refuses; a refusal injects a
/// synchronous external abort into the host's EL1 vector (as pKVM's
/// `host_inject_abort`).
fn host_abort(f: &mut TrapFrame, esr: u64) {
    let far = read_sysreg!("far_el2");
    let hpfar = read_sysreg!("hpfar_el2");
    let ipa = ((hpfar & 0x0000_0fff_ffff_fff0) << 8) | (far & 0xfff);
    let write = esr >> 26 == 0x24 && esr & (1 << 6) != 0;
    let p = ABORT.load(Ordering::Acquire);
    assert!(!p.is_null(), "host stage-2 fault with no hypervisor set up");
    // SAFETY: ABORT only ever holds null (checked above) or a value stored
    // by `set_abort_handler` from an `AbortHandler`.
    let h: AbortHandler = unsafe { core::mem::transmute::<*mut (), AbortHandler>(p) };
    FAULTS[0].fetch_add(1, Ordering::Relaxed);
    if h(ipa, write).is_err() {
        FAULTS[1].fetch_add(1, Ordering::Relaxed);
        inject_abort(f, esr, far);
    }
}

/// Injects a synchronous external abort for the fault `esr` at `far` into
/// the host at EL1 (pkvm-sysreg's `host_abort_esr` and `inject_sync`):
/// `ESR_EL1`, `FAR_EL1`, `ELR_EL1`, `SPSR_EL1` written, the host resumed
/// at its vector.
fn inject_abort(f: &mut TrapFrame, esr: u64, far: u64) {
    let mut s = pkvm_sysreg::El1State {
        pc: f.elr,
        pstate: f.spsr,
        spsr_el1: read_sysreg!("spsr_el1"),
        elr_el1: read_sysreg!("elr_el1"),
        esr_el1: read_sysreg!("esr_el1"),
        vbar_el1: read_sysreg!("vbar_el1"),
        sctlr_el1: read_sysreg!("sctlr_el1"),
    };
    pkvm_sysreg::inject_sync(&mut s, pkvm_sysreg::host_abort_esr(esr));
    write_sysreg!("spsr_el1", s.spsr_el1);
    write_sysreg!("elr_el1", s.elr_el1);
    write_sysreg!("esr_el1", s.esr_el1);
    write_sysreg!("far_el1", far);
    f.elr = s.pc;
    f.spsr = s.pstate;
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
    if matches!(esr >> 26, 0x20 | 0x24) && cpu_protected(super::start::cpu_index()) {
        return host_abort(f, esr);
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
        psci::VERSION | FEATURES => psci_call(func, a1, a2, a3),
        // A host under the host stage-2 cannot stop the machine under the
        // hypervisor (it ends a run by semihosting).
        psci::SYSTEM_OFF | psci::SYSTEM_RESET if !cpu_protected(super::start::cpu_index()) => {
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
