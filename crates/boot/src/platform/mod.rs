//! The hardware layer of the EL2 image: every `unsafe` of the image lives
//! below this module, in small files with `// SAFETY:` comments.
//!
//! | module | what |
//! |---|---|
//! | [`start`] | entry asm, per-CPU stacks and data, secondary CPU start |
//! | [`console`] | PL011 driver, `println!`, panic handler |
//! | [`el1boot`] | the VMM at EL1: each CPU's drop from EL2 into the host, its vectors, its trapped SMCs |
//! | [`el1host`] | a host context at EL1 under the host stage-2 (the `host-attack` program) |
//! | [`exit`] | semihosting exit (status to QEMU), PSCI calls over SMC |
//! | [`dt`] | device tree parsing (`fdt` crate) into [`dt::Platform`] |
//! | [`mmu`] | EL2 stage-1: bootstrap blocks, then `PageTable<El2>` |
//! | [`hvc`] | the host's `hvc #0` and the hypervisor's handler of it |
//! | [`hostrun`] | `HOST_RUN` (every guest run of the VMM is a hypercall) and the TLB hypercalls: host call, hypervisor side |
//! | [`hypdata`] | the hypervisor's statics whose code is in `vmm/` (in `.data.hyp`) |
//! | [`hypmem`] | the hypervisor's own memory (pkvm-hyp's state, in its carve-out) |
//! | [`hw`] | `PtMemory` and `TlbOps` for real hardware |
//! | [`idregs`] | the CPU's ID registers (pkvm-sysreg's `HostIds`) |
//! | [`phys`] | access to identity-mapped physical memory |
//! | [`vectors`] | EL2 exception vectors |
//! | [`switch`] | the world switch: trap controls, guest GPRs, EL1 sysregs, FP/SIMD, timer, PAC keys |
//! | [`sve`] | SVE: the CPU's maximum vector length, a vCPU's Z/P/FFR/`ZCR_EL1` (switched by [`switch`]) |
//! | [`handoff`] | the block xtask passes at 0x4800_0000 |
//! | [`gic`] | GICv3: distributor, redistributors, CPU interface, SGIs |
//! | [`timer`] | the EL2 physical timer (preemption tick) |

pub mod console;
pub mod dt;
pub mod el1boot;
pub mod el1host;
pub mod exit;
pub mod gic;
pub mod handoff;
pub mod hostrun;
pub mod hvc;
pub mod hw;
pub mod hypdata;
pub mod hypmem;
pub mod idregs;
pub mod mmu;
pub mod phys;
pub mod pview;
pub mod start;
pub mod sve;
pub mod switch;
pub mod sysreg;
pub mod timer;
pub mod vectors;

/// Base of RAM on QEMU virt (checked against the device tree).
pub const RAM_BASE: u64 = 0x4000_0000;
/// Largest RAM the per-page metadata covers.
pub const MAX_RAM: u64 = 2 << 30;
/// Maximum number of physical CPUs.
pub const MAX_CPUS: usize = 8;
/// Stack size per CPU (see `link.ld`).
pub const STACK_SIZE: u64 = 0x4_0000;
