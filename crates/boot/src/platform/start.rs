//! Entry at EL2, per-CPU stacks and data, secondary CPUs.
//!
//! QEMU enters `_start` on the boot CPU at EL2 with the MMU off (the other
//! CPUs start powered off, waiting for PSCI CPU_ON). Every CPU runs
//! `pkvm_cpu_entry` with x0 = its index: it picks its 256 KiB stack from
//! `.stacks`, stops FP/SIMD traps (CPTR_EL2), installs the EL2 vectors and
//! enters Rust. CPU 0 also zeroes the hypervisor's `.hyp.bss` and the
//! host's `.bss` first (`link.ld`). `TPIDR_EL2` points at the
//! CPU's [`PerCpu`] once Rust runs.
//! With the VMM at EL1 (handoff flags bit 2) CPU 0 starts the secondaries
//! here, at EL2, and every CPU then drops into the host
//! ([`super::el1boot`]).

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::{MAX_CPUS, STACK_SIZE};

global_asm!(
    r#"
.section .text.boot, "ax"
.global _start
_start:
    mov     x0, #0
    b       pkvm_cpu_entry

.global pkvm_secondary_entry
pkvm_secondary_entry:
    // PSCI CPU_ON: x0 = context id = our CPU index.
pkvm_cpu_entry:
    msr     daifset, #0xf
    cmp     x0, #{max_cpus}
    b.hs    9f
    ldr     x1, =__stacks_start
    mov     x2, #{stack_size}
    madd    x1, x0, x2, x1
    add     x1, x1, x2
    mov     sp, x1
    // CPTR_EL2 (E2H=0 layout): RES1 bits 13:12 and 9:0, TFP (bit 10) = 0.
    mov     x1, #0x33ff
    msr     cptr_el2, x1
    ldr     x1, =pkvm_el2_vectors
    msr     vbar_el2, x1
    isb
    cbnz    x0, 2f
    // The hypervisor's zeroed statics, then the host's.
    ldr     x1, =__hyp_bss_start
    ldr     x2, =__hyp_bss_end
1:  cmp     x1, x2
    b.hs    3f
    str     xzr, [x1], #8
    b       1b
3:  ldr     x1, =__bss_start
    ldr     x2, =__bss_end
4:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       4b
2:  bl      pkvm_rust_entry
9:  wfe
    b       9b
"#,
    max_cpus = const MAX_CPUS,
    stack_size = const STACK_SIZE,
);

extern "C" {
    fn pkvm_secondary_entry();
}

/// Per-CPU data. `host_sp` and `vcpu` are used by the world switch asm,
/// `el1_host` by the vectors (offsets 0, 8 and 16, checked below).
#[repr(C)]
pub struct PerCpu {
    /// Host stack pointer saved while a guest runs.
    pub host_sp: AtomicU64,
    /// The running vCPU's register block while a guest runs.
    pub vcpu: AtomicU64,
    /// Non-zero while the host context runs at EL1 on this CPU
    /// ([`set_el1_host`]): the lower-EL vector then serves its `hvc #0`
    /// in place instead of leaving the world switch; `el1boot::EL1_VMM`
    /// (2) when the host is the VMM at EL1 (its other traps are served in
    /// place as well).
    pub el1_host: AtomicU64,
    /// This CPU's index.
    pub index: AtomicUsize,
    /// Set once the CPU runs Rust code with its MMU on.
    pub online: AtomicBool,
}

const _: () = assert!(core::mem::offset_of!(PerCpu, host_sp) == 0);
const _: () = assert!(core::mem::offset_of!(PerCpu, vcpu) == 8);
const _: () = assert!(core::mem::offset_of!(PerCpu, el1_host) == 16);

#[allow(clippy::declare_interior_mutable_const)]
const PERCPU_INIT: PerCpu = PerCpu {
    host_sp: AtomicU64::new(0),
    vcpu: AtomicU64::new(0),
    el1_host: AtomicU64::new(0),
    index: AtomicUsize::new(0),
    online: AtomicBool::new(false),
};

#[link_section = ".bss.hyp.percpu"]
static PERCPU: [PerCpu; MAX_CPUS] = [PERCPU_INIT; MAX_CPUS];

/// This CPU's `PerCpu` pointer: `TPIDR_EL2` at EL2, `TPIDR_EL1` in the
/// host at EL1 (set to the same by [`super::el1boot::enter_host`]).
fn percpu_ptr() -> *const PerCpu {
    crate::read_sysreg!("tpidr_el2") as *const PerCpu
}

/// This CPU's index (0 = boot CPU): the hypervisor's `PerCpu` at EL2, the
/// host's own per-CPU data at EL1 ([`super::el1boot::host_cpu_index`]).
pub fn cpu_index() -> usize {
    if super::el1boot::current_el() != 2 {
        return super::el1boot::host_cpu_index();
    }
    let p = percpu_ptr();
    if p.is_null() {
        return 0;
    }
    // SAFETY: TPIDR_EL2 is only ever set (in `pkvm_rust_entry`), and the
    // host's TPIDR_EL1 (in `el1boot::enter_host`), to point at an element
    // of the static PERCPU array.
    unsafe { (*p).index.load(Ordering::Relaxed) }
}

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 1] {
    [("start::PERCPU", percpu_addr())]
}

/// Where the per-CPU data is (the hypervisor's, in `.bss.hyp`): for the
/// checks that the host can reach none of it.
pub fn percpu_addr() -> u64 {
    PERCPU.as_ptr() as u64
}

/// CPU `cpu`'s EL2 stack, `(lowest, one past the highest)` address.
pub fn stack_range(cpu: usize) -> (u64, u64) {
    extern "C" {
        static __stacks_start: u8;
    }
    let base = core::ptr::addr_of!(__stacks_start) as u64 + cpu as u64 * STACK_SIZE;
    (base, base + STACK_SIZE)
}

/// The most stack CPU `cpu` has used so far, in bytes: the stacks are
/// never written before use (RAM starts zeroed, and so does `.stacks`,
/// which the loader does not fill), so the lowest non-zero word marks the
/// deepest use. A value near [`STACK_SIZE`] means the CPU ran (or nearly
/// ran) off its stack into the one below it or into `.hyp.bss` (no guard
/// page).
pub fn stack_used(cpu: usize) -> u64 {
    extern "C" {
        static __stacks_start: u8;
    }
    if cpu >= MAX_CPUS {
        return 0;
    }
    deepest_use(core::ptr::addr_of!(__stacks_start) as u64 + cpu as u64 * STACK_SIZE)
}

/// The bytes used of the [`STACK_SIZE`] stack at `base` (see
/// [`stack_used`]; also the host stacks of `el1boot`, in `.host_stacks`).
pub(super) fn deepest_use(base: u64) -> u64 {
    let mut a = base;
    while a < base + STACK_SIZE {
        // SAFETY: `a` is 8-byte aligned inside `.stacks` or
        // `.host_stacks` (the callers' bases), which the EL2 identity map
        // maps RW; a racing write by the owning CPU only changes which
        // (still valid) value is read.
        if unsafe { core::ptr::read_volatile(a as *const u64) } != 0 {
            break;
        }
        a += 8;
    }
    base + STACK_SIZE - a
}

/// Marks whether the host context runs at EL1 on this CPU (its `hvc #0`
/// is then served by the lower-EL vector's fast path).
pub fn set_el1_host(on: bool) {
    this_percpu()
        .el1_host
        .store(u64::from(on), Ordering::Relaxed);
}

/// Sets this CPU's `PerCpu::el1_host` to `mode` (`el1boot::EL1_VMM`: the
/// VMM runs at EL1 here).
pub fn set_el1_host_mode(mode: u64) {
    this_percpu().el1_host.store(mode, Ordering::Relaxed);
}

/// Whether the caller of the hypercall being served is the VMM at EL1
/// on this CPU.
pub fn el1_vmm_here() -> bool {
    this_percpu().el1_host.load(Ordering::Relaxed) == super::el1boot::EL1_VMM
}

/// Whether this CPU runs the host context at EL1 with the fast path (a
/// `hvc #0` now came from the host at EL1, not from EL2).
pub fn el1_host() -> bool {
    this_percpu().el1_host.load(Ordering::Relaxed) != 0
}

/// The world switch's per-CPU state of the host context's run (saved host
/// stack pointer, register block, [`PerCpu::el1_host`]), set aside while
/// the hypervisor runs a guest for the host from inside one of its
/// hypercalls ([`take_switch_state`], [`restore_switch_state`]).
#[derive(Clone, Copy, Debug)]
pub struct SwitchState([u64; 3]);

fn this_percpu() -> &'static PerCpu {
    let p = crate::read_sysreg!("tpidr_el2") as *const PerCpu;
    assert!(!p.is_null(), "per-CPU data used before it is set up");
    // SAFETY: TPIDR_EL2 is only ever set (in `pkvm_rust_entry`) to point at
    // an element of the static PERCPU array.
    unsafe { &*p }
}

/// Takes this CPU's [`SwitchState`] and clears `el1_host` (a guest's
/// `hvc #0` must leave the world switch).
pub fn take_switch_state() -> SwitchState {
    let p = this_percpu();
    let st = SwitchState([
        p.host_sp.load(Ordering::Relaxed),
        p.vcpu.load(Ordering::Relaxed),
        p.el1_host.load(Ordering::Relaxed),
    ]);
    p.el1_host.store(0, Ordering::Relaxed);
    st
}

/// Puts back what [`take_switch_state`] took.
pub fn restore_switch_state(st: SwitchState) {
    let p = this_percpu();
    p.host_sp.store(st.0[0], Ordering::Relaxed);
    p.vcpu.store(st.0[1], Ordering::Relaxed);
    p.el1_host.store(st.0[2], Ordering::Relaxed);
}

/// Whether CPU `idx` is up.
pub fn is_online(idx: usize) -> bool {
    PERCPU
        .get(idx)
        .is_some_and(|p| p.online.load(Ordering::Acquire))
}

#[no_mangle]
extern "C" fn pkvm_rust_entry(cpu: usize) -> ! {
    if cpu == 0 {
        super::mmu::bootstrap_and_enable();
    } else {
        super::mmu::enable_secondary();
    }
    let pc = &PERCPU[cpu];
    pc.index.store(cpu, Ordering::Relaxed);
    crate::write_sysreg!("tpidr_el2", pc as *const PerCpu as u64);
    if cpu == 0 {
        super::idregs::init();
    }
    super::switch::init_cpu();
    pc.online.store(true, Ordering::Release);
    if cpu == 0 {
        let info = super::dt::init();
        super::el1boot::init_flag();
        crate::hyp_init_el2();
        if super::el1boot::host_el1() {
            super::el1boot::start_secondaries(info);
            super::el1boot::enter_host(0, pc as *const PerCpu as u64)
        }
        crate::boot_main(info)
    } else if super::el1boot::host_el1() {
        super::el1boot::enter_host(cpu, pc as *const PerCpu as u64)
    } else {
        crate::secondary_main(cpu)
    }
}

/// Why a secondary CPU could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuStartError {
    /// Index out of range of our per-CPU data.
    BadIndex(usize),
    /// The firmware refused (PSCI return code).
    Psci(i64),
    /// The CPU did not come online.
    Timeout(usize),
}

/// Starts CPU `idx` (device-tree `reg` = `mpidr`) at the common entry with
/// PSCI CPU_ON over SMC and waits until it is online.
///
/// # Errors
/// See [`CpuStartError`].
pub fn start_secondary(idx: usize, mpidr: u64) -> Result<(), CpuStartError> {
    if idx == 0 || idx >= MAX_CPUS {
        return Err(CpuStartError::BadIndex(idx));
    }
    if super::el1boot::current_el() != 2 {
        // The VMM at EL1: every CPU was started at EL2 at boot and waits
        // in the host for the VMM to let it go on.
        if !super::el1boot::host_cpu_started(idx) {
            return Err(CpuStartError::Psci(-3));
        }
        super::el1boot::release(idx);
        return Ok(());
    }
    super::mmu::publish_for_secondaries();
    let r = super::exit::psci_call(
        pkvm_arch::smccc::psci::CPU_ON_64,
        mpidr,
        pkvm_secondary_entry as *const () as usize as u64,
        idx as u64,
    );
    if r != 0 {
        return Err(CpuStartError::Psci(r));
    }
    for _ in 0..100_000_000u64 {
        if is_online(idx) {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(CpuStartError::Timeout(idx))
}
