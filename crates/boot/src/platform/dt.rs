//! The host device tree (from QEMU, at the start of RAM) parsed with the
//! `fdt` crate into a [`Platform`] description; finishing platform set-up
//! that depends on it (console address, EL2 identity map, handoff block).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

use super::handoff::Handoff;
use super::{MAX_CPUS, RAM_BASE};

/// Where QEMU puts the DTB for an ELF linked at 0x4020_0000.
pub const DTB_PA: u64 = RAM_BASE;

/// What the image learned about the machine.
#[derive(Debug, Clone)]
pub struct Platform {
    /// First byte of RAM.
    pub ram_start: u64,
    /// End of RAM (exclusive).
    pub ram_end: u64,
    /// MPIDR (`reg`) of each CPU, boot CPU first.
    pub cpus: [u64; MAX_CPUS],
    /// Number of CPUs found (capped at [`MAX_CPUS`]).
    pub ncpus: usize,
    /// PL011 base.
    pub uart: u64,
    /// GICv3 distributor base (0 if absent).
    pub gicd: u64,
    /// GICv3 redistributor base (0 if absent).
    pub gicr: u64,
    /// PSCI conduit is SMC (QEMU at EL2) rather than HVC.
    pub psci_smc: bool,
    /// Size of the DTB.
    pub dtb_size: usize,
    /// What xtask asked for, if anything.
    pub handoff: Option<Handoff>,
}

struct Once<T> {
    ready: AtomicBool,
    v: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once (before `ready` is released) and only
// read afterwards.
unsafe impl<T: Sync> Sync for Once<T> {}

static PLATFORM: Once<Platform> = Once {
    ready: AtomicBool::new(false),
    v: UnsafeCell::new(MaybeUninit::uninit()),
};

/// The platform description (after boot).
///
/// # Panics
/// Before [`init`] ran (an internal ordering bug).
pub fn platform() -> &'static Platform {
    assert!(
        PLATFORM.ready.load(Ordering::Acquire),
        "platform() before dt::init"
    );
    // SAFETY: `ready` is set only after the value was written, and the
    // value is never written again.
    unsafe { (*PLATFORM.v.get()).assume_init_ref() }
}

fn parse() -> Platform {
    // SAFETY: QEMU placed a DTB at the start of RAM; the header gives its
    // size, which `from_ptr` validates (magic, sizes) before use.
    let fdt = unsafe { fdt::Fdt::from_ptr(DTB_PA as *const u8) }
        .unwrap_or_else(|e| panic!("no valid device tree at {DTB_PA:#x}: {e:?}"));
    let mem = fdt
        .memory()
        .regions()
        .next()
        .expect("device tree has no memory node");
    let ram_start = mem.starting_address as u64;
    let ram_end = ram_start + mem.size.unwrap_or(0) as u64;
    let mut cpus = [0u64; MAX_CPUS];
    let mut ncpus = 0;
    for c in fdt.cpus() {
        if ncpus < MAX_CPUS {
            cpus[ncpus] = c.ids().first() as u64;
            ncpus += 1;
        }
    }
    let reg0 = |compat: &[&str], idx: usize| -> u64 {
        fdt.find_compatible(compat)
            .and_then(|n| n.reg())
            .and_then(|mut r| r.nth(idx))
            .map(|r| r.starting_address as u64)
            .unwrap_or(0)
    };
    let uart = reg0(&["arm,pl011"], 0);
    let gicd = reg0(&["arm,gic-v3"], 0);
    let gicr = reg0(&["arm,gic-v3"], 1);
    let psci_smc = fdt
        .find_compatible(&["arm,psci-1.0", "arm,psci-0.2", "arm,psci"])
        .and_then(|n| n.property("method"))
        .and_then(|p| p.as_str())
        .is_none_or(|m| m == "smc");
    Platform {
        ram_start,
        ram_end,
        cpus,
        ncpus,
        uart,
        gicd,
        gicr,
        psci_smc,
        dtb_size: fdt.total_size(),
        handoff: None,
    }
}

/// Parses the device tree, finishes platform set-up and returns the
/// description (boot CPU, once).
pub fn init() -> &'static Platform {
    let mut p = parse();
    assert!(p.ram_start == RAM_BASE, "RAM must start at {RAM_BASE:#x}");
    if p.uart != 0 {
        super::console::set_base(p.uart as usize);
    }
    super::phys::set_ram_end(p.ram_end);
    crate::println!(
        "\npkvm-boot: EL2 image up on CPU 0 (MPIDR {:#x})",
        super::sysreg::mpidr()
    );
    crate::println!(
        "dt: RAM {:#x}..{:#x} ({} MiB), {} CPUs, PL011 {:#x}, GICv3 dist {:#x} redist {:#x}, PSCI conduit {}",
        p.ram_start,
        p.ram_end,
        (p.ram_end - p.ram_start) >> 20,
        p.ncpus,
        p.uart,
        p.gicd,
        p.gicr,
        if p.psci_smc { "smc" } else { "hvc" }
    );
    super::mmu::build_el2_table(p.ram_start, p.ram_end);
    p.handoff = super::handoff::read();
    assert!(
        !PLATFORM.ready.load(Ordering::Relaxed),
        "dt::init called twice"
    );
    // SAFETY: only the boot CPU runs here, once (checked above); no reader
    // exists before `ready` is released.
    unsafe { (*PLATFORM.v.get()).write(p) };
    PLATFORM.ready.store(true, Ordering::Release);
    platform()
}
