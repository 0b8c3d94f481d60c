//! The pkvm-rs EL2 image for QEMU's `virt` machine
//! (`-M virt,virtualization=on,gic-version=3 -cpu max`).
//!
//! Layers, kept apart:
//!
//! - [`platform`]: everything that touches the hardware, and all of the
//!   image's `unsafe`: boot entry and per-CPU stacks, the PL011 console,
//!   the device tree, the EL2 stage-1 MMU (built with pkvm-pgtable's
//!   `PageTable<El2>`), the EL2 vectors, the world switch, the
//!   `TlbOps`/`PtMemory` implementations, PSCI and semihosting.
//! - [`vmm`]: safe code only. The VMM: guests run through pkvm-host's run
//!   loop and fault pipeline (and, in protected mode, pkvm-hyp's
//!   hypercalls, with the hypervisor in the image) over the platform
//!   traits implemented here for the real machine: page pool, process
//!   memory, the world-switch backend; an emulated PL011, per-VM
//!   statistics and the scenarios xtask tests. Every VM runs under:
//! - [`sched`]: the vCPU scheduler (M vCPUs on N CPUs, EL2 timer
//!   preemption, kicks by SGI), safe code over `platform::{gic, timer}`.
//! - [`heap`]: the global allocator pkvm-host's `alloc` needs.
//!
//! Boot: QEMU loads this ELF at 0x4020_0000 and the device tree at
//! 0x4000_0000 (an ELF linked there gets the DTB at the start of RAM, x0 =
//! 0; see `link.ld`). xtask passes what to run in a handoff block at
//! 0x4800_0000 ([`platform::handoff`]).
#![no_std]
#![no_main]
#![deny(missing_docs)]

extern crate alloc;

pub mod heap;
pub mod platform;
pub mod sched;
pub mod vmm;

/// Called on the boot CPU with the MMU, console and device tree ready.
pub fn boot_main(info: &'static platform::dt::Platform) -> ! {
    let code = vmm::main(info);
    platform::exit::exit(code)
}

/// Called at EL2 on the boot CPU before the VMM starts (and, with the VMM
/// at EL1, `platform::el1boot`, before it drops): the hypervisor's
/// hypercall handler, which serves `PKVM_INIT` (the hypervisor's set-up)
/// from then on.
pub fn hyp_init_el2() {
    vmm::platform::install_hvc_handler();
}

/// Called on each secondary CPU once its MMU is on.
pub fn secondary_main(cpu: usize) -> ! {
    vmm::secondary(cpu)
}
