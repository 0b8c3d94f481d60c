//! The pkvm-rs EL2 image for QEMU's `virt` machine
//! (`-M virt,virtualization=on,gic-version=3 -cpu max`).
//!
//! Two layers, kept apart so the demo logic can be replaced by pkvm-host's
//! run loop and pkvm-hyp's hypercalls without touching the platform:
//!
//! - [`platform`]: everything that touches the hardware, and all of the
//!   image's `unsafe`: boot entry and per-CPU stacks, the PL011 console,
//!   the device tree, the EL2 stage-1 MMU (built with pkvm-pgtable's
//!   `PageTable<El2>`), the EL2 vectors, the world switch, the
//!   `TlbOps`/`PtMemory` implementations, PSCI and semihosting.
//! - [`demo`]: safe code only. A page pool over RAM, VMs with stage-2
//!   tables (`PageTable<Stage2>`) filled on faults, a run loop handling
//!   aborts, MMIO (an emulated PL011), HVC/SMC (PSCI and a report call),
//!   WFx and IRQ exits, per-VM statistics and the scenarios xtask tests.
//!
//! Boot: QEMU loads this ELF at 0x4020_0000 and the device tree at
//! 0x4000_0000 (an ELF linked there gets the DTB at the start of RAM, x0 =
//! 0; see `link.ld`). xtask passes what to run in a handoff block at
//! 0x4800_0000 ([`platform::handoff`]).
#![no_std]
#![no_main]
#![deny(missing_docs)]

pub mod demo;
pub mod platform;
pub mod sched;

/// Called on the boot CPU with the MMU, console and device tree ready.
pub fn boot_main(info: &'static platform::dt::Platform) -> ! {
    if sched::scenario::wants(info) {
        platform::exit::exit(sched::scenario::main(info))
    }
    let code = demo::main(info);
    platform::exit::exit(code)
}

/// Called on each secondary CPU once its MMU is on.
pub fn secondary_main(cpu: usize) -> ! {
    if sched::scenario::active() {
        sched::scenario::secondary(cpu)
    }
    demo::secondary(cpu)
}
