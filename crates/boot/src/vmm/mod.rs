//! The VMM of the EL2 image: guests run through pkvm-host's run loop and
//! fault pipeline and, in protected mode, pkvm-hyp's hypercalls — the same
//! code the simulator (`pkvm-machine`) tests. Safe code only; the hardware
//! is reached through [`crate::platform`].
//!
//! - [`pool`]: the physical page pool (orders, page references).
//! - [`platform`]: `HostPlatform` / `HypPlatform` for the real machine and
//!   the hypervisor's set-up.
//! - [`process`]: the VMM's process memory (VMAs backing memslots).
//! - [`backend`]: `VcpuBackend` over the world switch.
//! - [`guest`]: a VM of the VMM and its exit handling (the scheduler's
//!   `HostVmm`).
//! - [`run`]: the physical CPUs (GICv3, secondaries) and VM runs through
//!   the vCPU scheduler ([`crate::sched`]): M vCPUs on N CPUs, EL2 timer
//!   preemption.
//! - [`smp`]: the SMP scenarios (`sched-smp`, `sched-spin`,
//!   `sched-smp-protected`).
//! - [`resets`]: the guest system-reset scenarios (`reset`,
//!   `reset-protected`, `reset-concurrent`).
//! - [`pmu`]: the virtual-PMU scenario (`pmu`: guest-pmu's roles).
//! - [`sysregs`]: a VM's system-register policy (pkvm-sysreg) and the
//!   handling of trapped accesses.
//! - [`sve`]: the `sve-switch` scenario (SVE state and per-VM vector
//!   lengths across world switches; UNDEF without SVE).
//! - [`vcpurun`]: `VCPU_RUN`, protected vCPUs run by the host at EL1 with
//!   their registers kept by the hypervisor.
//! - [`vcpuexits`]: `host-attack`'s phase for the exits `VCPU_RUN`'s
//!   hypervisor answers (system registers, UNDEF and abort injection) or
//!   hands the host (WFI with the virtual timer's deadline).
//! - [`runblock`]: `host-attack`'s phase for hostile `HOST_RUN` blocks
//!   (each refused with its reason, unchanged; the valid one runs).
//! - [`vcpuirq`]: `host-attack`'s phase for virtual interrupts a
//!   `VCPU_RUN` loads from the host's list registers (validated: no HW).
//! - [`a64`]: the A64 encoders and image layout of those phases' hand-assembled guests.
//! - [`irq`]: a VM's vGICv3 (pkvm-vgic) and its glue to the world switch
//!   (list registers, timer PPIs, SGIs, WFI).
//! - [`fdtgen`]: the VM device tree.
//! - this file: the memory layout and the scenarios xtask runs (`demo`,
//!   `touch`, `exits`, `protected`, `guest`, `panic`).
//!
//! Physical memory (QEMU virt, 1 GiB): image and handoff below
//! `POOL_START` (0x5000_0000); then the host page pool; then the heap
//! ([`HEAP_SIZE`]); the hypervisor's carve-out at the end of RAM: its own
//! memory (`platform::hypmem`: the `Hyp` and its page metadata; sized by
//! [`platform::hyp_heap_bytes`]) then its page pool ([`HYP_CARVEOUT`]).
//! The carve-out is kept out of the host pool in both modes; in protected
//! mode the host's memory is the pool and the heap ([`Layout`]).
#![forbid(unsafe_code)]

pub mod a64;
pub mod attack;
pub mod backend;
pub mod debug;
pub mod el1host;
pub mod fdtgen;
pub mod guest;
pub mod imagemem;
pub mod irq;
pub mod platform;
pub mod pmu;
pub mod pool;
pub mod process;
pub mod pviewrun;
pub mod resets;
pub mod run;
pub mod runblock;
pub mod smp;
pub mod sve;
pub mod sysregs;
pub mod vcpuexits;
pub mod vcpuirq;
pub mod vcpurun;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use pkvm_arch::Pa;
use pkvm_hyp::MemRegion;
use pkvm_sysreg::IdOverrides;

use crate::platform::dt::Platform;
use crate::platform::handoff::POOL_START;
use crate::platform::phys;
use crate::println;
use guest::{code, GuestVm, ImageSource, VmEnd, VmSpec};
use platform::BootPlatform;
use process::{Backing, BootProcess};

static GUEST_TOUCHER: &[u8] =
    include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-toucher.bin"));
static GUEST_MMIO: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-mmio.bin"));
static GUEST_HVC: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-hvc.bin"));
static GUEST_PSCI: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-psci.bin"));

const MIB: u64 = 1 << 20;
/// The hypervisor's page pool, the end of its carve-out at the end of RAM.
pub const HYP_CARVEOUT: u64 = 16 * MIB;
/// The global allocator's heap, below the carve-out.
pub const HEAP_SIZE: u64 = 32 * MIB;

/// Physical CPUs taking part in scheduling.
static NCPUS: AtomicUsize = AtomicUsize::new(1);

/// Physical CPUs taking part in scheduling.
pub fn ncpus() -> usize {
    NCPUS.load(Ordering::Relaxed)
}

/// A secondary CPU's life after its MMU is on.
pub fn secondary(cpu: usize) -> ! {
    run::secondary(cpu)
}

/// Runs every vCPU of every VM through the scheduler on all CPUs; whether
/// they could be scheduled.
fn run_vms(vms: &[Arc<GuestVm>]) -> bool {
    match run::run(vms) {
        Some(r) => {
            if r.all_asleep {
                println!("run: ended with every vCPU left off or suspended");
            }
            true
        }
        None => false,
    }
}

/// The physical memory layout of this boot.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    ram: (u64, u64),
    pool: (u64, u64),
    /// The image's global heap (the VMM's; host memory in protected mode).
    heap: (u64, u64),
    /// The hypervisor's carve-out: its own memory ([`Layout::hyp_heap`])
    /// then its page pool ([`Layout::hyp_pool`]).
    carveout: (u64, u64),
    /// pkvm-hyp's state (`platform::hypmem`), at the carve-out's start.
    hyp_heap: (u64, u64),
    /// pkvm-hyp's page pool, the rest of the carve-out.
    hyp_pool: (u64, u64),
}

impl Layout {
    fn of(p: &Platform) -> Layout {
        let ram = (p.ram_start, p.ram_end);
        let hyp_heap = platform::hyp_heap_bytes(ram);
        let carve = p.ram_end - HYP_CARVEOUT - hyp_heap;
        let heap = carve - HEAP_SIZE;
        Layout {
            ram,
            pool: (POOL_START, heap),
            heap: (heap, carve),
            carveout: (carve, p.ram_end),
            hyp_heap: (carve, carve + hyp_heap),
            hyp_pool: (carve + hyp_heap, p.ram_end),
        }
    }
}

/// Entry of the VMM on the boot CPU; returns the exit status.
pub fn main(p: &'static Platform) -> i32 {
    let lay = Layout::of(p);
    crate::heap::init(lay.heap.0, lay.heap.1 - lay.heap.0);
    pool::init(lay.pool.0, lay.pool.1);
    let online = match run::bring_up(p) {
        Ok(n) => n,
        Err(e) => {
            println!("cpus: {e}");
            return 1;
        }
    };
    NCPUS.store(online, Ordering::Relaxed);
    let start_free = pool::free_frames();
    println!(
        "cpus: {online} online (secondaries started with PSCI CPU_ON over SMC), one vCPU scheduler over all of them; pool: {start_free} free frames ({} MiB) at {:#x}; heap {} MiB; hyp carve-out {} MiB at {:#x} (its own memory {} MiB, its pool {} MiB)",
        start_free as u64 * 4096 / MIB,
        lay.pool.0,
        HEAP_SIZE / MIB,
        (lay.carveout.1 - lay.carveout.0) / MIB,
        lay.carveout.0,
        (lay.hyp_heap.1 - lay.hyp_heap.0) / MIB,
        (lay.hyp_pool.1 - lay.hyp_pool.0) / MIB,
    );
    if !sysreg_check() {
        return 1;
    }
    println!(
        "el: the VMM runs at EL{} (CurrentEL {:#x}){}",
        crate::platform::el1boot::current_el(),
        crate::platform::el1boot::current_el() << 2,
        if crate::platform::el1boot::host_el1() {
            ", reaching EL2 by hvc #0 only"
        } else {
            " next to the hypervisor (--host-el2: the legacy layout)"
        }
    );
    let scenario = p.handoff.as_ref().map(|h| h.scenario()).unwrap_or("demo");
    println!("scenario {scenario}: start");
    let process = Arc::new(BootProcess::new());
    let (ok, code) = match scenario {
        "demo" => bool_code(demo(&lay, &process)),
        "touch" => bool_code(touch(&process)),
        "exits" => bool_code(exits(&process)),
        "protected" => bool_code(protected(&lay, &process, true)),
        "guest" => guest(&lay, p, &process),
        "sched-smp" => bool_code(smp::sched_smp(&lay, &process, p, false)),
        "sched-smp-protected" => bool_code(smp::sched_smp(&lay, &process, p, true)),
        "sched-spin" => bool_code(smp::sched_spin(&process, p)),
        "reset" => bool_code(resets::reset(&process, p)),
        "reset-protected" => bool_code(resets::reset_protected(&lay, &process, p)),
        "reset-concurrent" => bool_code(resets::reset_concurrent(&process, p)),
        "pmu" => bool_code(pmu::scenario(&process, p)),
        "sve-switch" => bool_code(sve::sve_switch(&process)),
        "debug" => bool_code(debug::debug(&process, p)),
        "debug-isolation" => bool_code(debug::isolation(&process, p)),
        "setway" => bool_code(debug::setway(&process)),
        "host-attack" => bool_code(attack::host_attack(&lay, &process)),
        "panic" => panic!("deliberate panic (scenario \"panic\")"),
        other => {
            println!(
                "scenario {other}: unknown (known: demo, touch, exits, protected, guest, sched-smp, sched-smp-protected, sched-spin, reset, reset-protected, reset-concurrent, pmu, sve-switch, debug, debug-isolation, setway, host-attack, panic)"
            );
            (false, 2)
        }
    };
    let end_free = pool::free_frames();
    let pool_ok = end_free == start_free;
    if pool_ok {
        println!("pool: back to starting count ({end_free} free frames)");
    } else {
        println!("pool: NOT back to starting count: {start_free} at start, {end_free} now");
    }
    let (used, _) = crate::heap::usage();
    println!("heap: {} KiB in use at the end", used >> 10);
    if ok && pool_ok {
        println!("scenario {scenario}: PASS");
        code
    } else {
        println!("scenario {scenario}: FAIL");
        if code == 0 {
            1
        } else {
            code
        }
    }
}

/// Prints what the host CPU has and what VMs get, and checks that the world
/// switch covers pkvm-sysreg's `SWITCHED` list on this CPU.
fn sysreg_check() -> bool {
    use crate::platform::switch;
    use pkvm_sysreg::HostFeature as F;
    let host = crate::platform::idregs::host_ids();
    let yn = |f| if host.has(f) { "yes" } else { "no" };
    println!(
        "sysreg: host CPU: SVE {} (max VL {} bytes), SME {}, MTE2 {}, PMU {} ({} counters), PAuth {}, RAS {}; VMs get sanitised ID registers, SVE when configured (per-VM vector length), a virtual PMUv3 when offered, no SME/MTE",
        yn(F::Sve),
        host.sve_max_vl,
        yn(F::Sme),
        yn(F::Mte2),
        yn(F::Pmu),
        host.pmu_counters,
        yn(F::PAuth),
        yn(F::Ras)
    );
    let cover = sysregs::WorldSwitchCover {
        guest: switch::SWITCHED_HERE,
        pac_keys: switch::PAC_KEYS_HERE,
        el2: switch::EL2_HERE,
        sve: crate::platform::sve::SVE_HERE,
    };
    match sysregs::check_switched(&host, &cover) {
        Ok(n) => {
            println!("sysreg: the world switch covers pkvm-sysreg's SWITCHED list on this CPU ({n} registers)");
            true
        }
        Err(name) => {
            println!(
                "sysreg: the world switch does not switch {name} (in pkvm-sysreg's SWITCHED list)"
            );
            false
        }
    }
}

fn bool_code(ok: bool) -> (bool, i32) {
    (ok, if ok { 0 } else { 1 })
}

fn check(what: &str, ok: bool) -> bool {
    if !ok {
        println!("check failed: {what}");
    }
    ok
}

/// A built-in guest VM.
#[allow(clippy::too_many_arguments)]
fn builtin(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    name: &'static str,
    image: &'static [u8],
    mem: u64,
    backing: Backing,
    protected: bool,
    touch: Option<(u64, u64)>,
) -> Option<Arc<GuestVm>> {
    if image.is_empty() {
        println!("vm {name}: guest payload missing (build with `cargo xtask`)");
        return None;
    }
    let spec = VmSpec {
        name,
        mem,
        backing,
        image: ImageSource::Embedded(image),
        load_offset: 0,
        vcpus: 1,
        dtb_bootargs: None,
        initrd: None,
        protected,
        touch,
        x0: None,
    };
    match guest::create(plat, process, &spec) {
        Ok(v) => Some(v),
        Err(e) => {
            println!("vm {name}: create failed: {e}");
            None
        }
    }
}

/// A memory toucher of `size` bytes at `base` in `mem` bytes of RAM.
fn toucher(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    name: &'static str,
    mem: u64,
    (base, size): (u64, u64),
    backing: Backing,
    protected: bool,
) -> Option<Arc<GuestVm>> {
    builtin(
        plat,
        process,
        name,
        GUEST_TOUCHER,
        mem,
        backing,
        protected,
        Some((base, size)),
    )
}

/// Checks a toucher: verified values, and exactly one resolved stage-2
/// fault per 4K page (4K backing) or per 2M block (2M backing) of the
/// touched slot.
fn touch_ok(g: &GuestVm, size: u64) -> bool {
    let pages = size / 4096;
    let faults = g.touch_faults();
    let want = match g.backing {
        Backing::Page4K => pages,
        Backing::Block2M => size / (2 * MIB),
    };
    println!(
        "vm {}: touched slot: stage-2 faults {faults}, {} MiB with {} backing (expected {want})",
        g.name,
        size / MIB,
        match g.backing {
            Backing::Page4K => "4K",
            Backing::Block2M => "2M",
        }
    );
    check("touch report", g.report(code::TOUCH) == Some((0, pages)))
        & check("fault count", faults == want)
}

/// Prints how a VM ended and its statistics, destroys it and prints what
/// came back. Returns whether it powered off normally.
fn finish(g: Arc<GuestVm>) -> bool {
    let name = g.name;
    let end = g.end();
    match end {
        Some(VmEnd::PowerOff) => println!("vm {name}: powered off (PSCI SYSTEM_OFF)"),
        other => println!("vm {name}: ended: {other:?}"),
    }
    g.print_stats();
    let mapped = g.vm.stats().snapshot().bytes_mapped / 4096;
    let frames = g.destroy();
    println!(
        "vm {name}: destroyed: {mapped} pages were mapped by faults; its VMAs released {frames} frames"
    );
    end == Some(VmEnd::PowerOff)
}

fn finish_all(vms: Vec<Arc<GuestVm>>) -> bool {
    let mut ok = true;
    for g in vms {
        ok &= finish(g);
    }
    ok
}

/// Two VMs touch 64 MiB each at once: 4K pages (16384 faults) and 2M
/// blocks (32 faults).
fn touch(process: &Arc<BootProcess>) -> bool {
    let zeroed = pool::zeroing_works();
    println!(
        "pool: a dirtied 2M folio and 4K frame read as zero after zeroing: {}",
        if zeroed { "ok" } else { "FAILED" }
    );
    if !zeroed {
        return false;
    }
    let plat = BootPlatform::new(None);
    println!("mode: standard (the host manages guest stage-2 with pkvm-pgtable)");
    let r = (0x4400_0000, 64 * MIB);
    let Some(a) = toucher(
        &plat,
        process,
        "touch-4k",
        128 * MIB,
        r,
        Backing::Page4K,
        false,
    ) else {
        return false;
    };
    let Some(b) = toucher(
        &plat,
        process,
        "touch-2m",
        128 * MIB,
        r,
        Backing::Block2M,
        false,
    ) else {
        return false;
    };
    let vms = alloc::vec![a, b];
    let mut ok = run_vms(&vms);
    ok &= touch_ok(&vms[0], r.1) & touch_ok(&vms[1], r.1);
    ok & finish_all(vms)
}

fn exit_vms(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    names: [&'static str; 3],
) -> Option<[Arc<GuestVm>; 3]> {
    let m = builtin(
        plat,
        process,
        names[0],
        GUEST_MMIO,
        4 * MIB,
        Backing::Page4K,
        false,
        None,
    )?;
    let h = builtin(
        plat,
        process,
        names[1],
        GUEST_HVC,
        4 * MIB,
        Backing::Page4K,
        false,
        None,
    )?;
    let p = builtin(
        plat,
        process,
        names[2],
        GUEST_PSCI,
        4 * MIB,
        Backing::Page4K,
        false,
        None,
    )?;
    Some([m, h, p])
}

fn exits_ok(m: &GuestVm, h: &GuestVm, p: &GuestVm) -> bool {
    let v11 = pkvm_arch::smccc::psci::version(1, 1) as u64;
    let ns = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64;
    let esr = p.report(code::EXCEPTION).map_or(0, |r| r.0);
    check(
        "mmio: unclaimed mmio exit",
        m.counters.mmio_unclaimed.load(Ordering::Relaxed) >= 1,
    ) & check(
        "mmio: unbacked read value",
        m.report(code::MMIO_READ) == Some((0, 0x0a00_0000)),
    ) & check(
        "hvc: undefined hvc -> NOT_SUPPORTED",
        h.report(code::HVC_UNDEF).map(|r| r.0) == Some(ns),
    ) & check(
        "hvc: PSCI version",
        h.report(code::PSCI_VERSION) == Some((v11, 0)),
    ) & check(
        "hvc: trapped smc on an HVC-conduit VM -> NOT_SUPPORTED",
        h.report(code::SMC) == Some((ns, 0)),
    ) & check(
        "psci: injected instruction abort (EC 0x21, FSC 0x10)",
        esr >> 26 == 0x21 && esr & 0x3f == 0x10,
    ) & check(
        "psci: wfi exit",
        p.counters.wfi.load(Ordering::Relaxed) >= 1,
    )
}

/// guest-psci in a mode (`x0`): `off` (1) turns its vCPU off at once and
/// never wakes again, `late` (2) yields 300 times, then powers off.
fn psci_mode_vm(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    name: &'static str,
    mode: u64,
) -> Option<Arc<GuestVm>> {
    let spec = VmSpec {
        name,
        mem: 4 * MIB,
        backing: Backing::Page4K,
        image: ImageSource::Embedded(GUEST_PSCI),
        load_offset: 0,
        vcpus: 1,
        dtb_bootargs: None,
        initrd: None,
        protected: false,
        touch: None,
        x0: Some(mode),
    };
    guest::create(plat, process, &spec)
        .map_err(|e| println!("vm {name}: create failed: {e}"))
        .ok()
}

/// MMIO, HVC/SMC and PSCI/abort-injection guests at once, with a VM
/// (`off`) whose only vCPU turns itself off with CPU_OFF at once and one
/// (`late`) that finishes after 300 yields: once `late` is done,
/// everything left in the run is asleep for good, and the run must end
/// (not hang) with `off` stopped as unwakeable.
fn exits(process: &Arc<BootProcess>) -> bool {
    let plat = BootPlatform::new(None);
    let Some([m, h, p]) = exit_vms(&plat, process, ["mmio", "hvc", "psci"]) else {
        return false;
    };
    let (Some(off), Some(late)) = (
        psci_mode_vm(&plat, process, "off", 1),
        psci_mode_vm(&plat, process, "late", 2),
    ) else {
        return false;
    };
    let mut vms = alloc::vec![m, h, p, late, off];
    let Some(r) = run::run(&vms) else {
        return false;
    };
    if r.all_asleep {
        println!("run: ended with every vCPU left off or suspended");
    }
    let mut ok = exits_ok(&vms[0], &vms[1], &vms[2]);
    let off = vms.pop().expect("five VMs");
    let end = off.end();
    println!(
        "exits: run ended with every vCPU left asleep: {}; vm off: {end:?}",
        r.all_asleep
    );
    ok &= check("exits: run ended with vm off asleep", r.all_asleep);
    ok &= check(
        "exits: vm off stopped as unwakeable",
        matches!(end, Some(VmEnd::Error(_))),
    );
    // `off` never powers off: `finish` tears it down and says so.
    let _ = finish(off);
    ok & finish_all(vms)
}

/// Whether the VMs ran concurrently (at least two in a guest at the same
/// time) on more than one CPU, with distinct VMIDs.
fn concurrency_ok(vms: &[Arc<GuestVm>]) -> bool {
    use crate::sched::CpuList;
    let vmids: Vec<u16> = vms
        .iter()
        .map(|g| g.hw_vmid.load(Ordering::Relaxed))
        .collect();
    let cpus: Vec<CpuList> = vms
        .iter()
        .map(|g| CpuList(g.cpus.iter().fold(0, |m, c| m | c.load(Ordering::Relaxed))))
        .collect();
    let used = cpus.iter().fold(0, |m, c| m | c.0);
    let distinct = (0..vmids.len()).all(|i| (0..i).all(|j| vmids[i] != vmids[j]));
    let max = run::max_running();
    println!(
        "demo: at most {max} VMs in a guest at once; VMIDs {vmids:?}; CPUs per VM {cpus:?} (used {})",
        CpuList(used)
    );
    if ncpus() == 1 {
        println!("demo: one physical CPU: the VMs were time-shared on it");
        return check("distinct VMIDs", distinct);
    }
    let conc = max >= 2 && distinct && used.count_ones() >= 2;
    if conc {
        println!("demo: concurrent VMs on distinct CPUs with distinct VMIDs");
    }
    check("concurrency", conc)
}

/// Standard mode: five VMs over the CPUs.
fn demo_standard(process: &Arc<BootProcess>) -> bool {
    let plat = BootPlatform::new(None);
    println!("mode: standard (the host manages guest stage-2 with pkvm-pgtable)");
    let r = (0x4200_0000, 32 * MIB);
    let Some(a) = toucher(
        &plat,
        process,
        "toucher-4k",
        64 * MIB,
        r,
        Backing::Page4K,
        false,
    ) else {
        return false;
    };
    let Some(b) = toucher(
        &plat,
        process,
        "toucher-2m",
        64 * MIB,
        r,
        Backing::Block2M,
        false,
    ) else {
        return false;
    };
    let Some([m, h, p]) = exit_vms(&plat, process, ["mmio", "hvc", "psci"]) else {
        return false;
    };
    run::reset_max_running();
    let vms = alloc::vec![a, b, m, h, p];
    let mut ok = run_vms(&vms);
    ok &= concurrency_ok(&vms);
    ok &= touch_ok(&vms[0], r.1) & touch_ok(&vms[1], r.1);
    ok &= exits_ok(&vms[2], &vms[3], &vms[4]);
    ok & finish_all(vms)
}

fn print_hyp(plat: &BootPlatform, when: &str) -> pkvm_hyp::HypStats {
    let s = plat
        .hyp()
        .and_then(|_| platform::hyp_info())
        .map(|i| i.stats)
        .unwrap_or_default();
    println!(
        "hyp ({when}): pool {} of {} pages free, {} pages held for VMs, {} live VMs, {} hypercalls from the host",
        s.pool_free,
        s.pool_pages,
        s.vm_pages,
        s.live_vms,
        plat.hvcs.load(Ordering::Relaxed)
    );
    s
}

/// The host's memory in protected mode: the image's host data (the VMM's
/// `.data` and `.bss`, its stacks) with what lies above it up to the pool
/// (the handoff block, an external guest's kernel and initrd), the page pool and the image's global heap (the
/// VMM's), one region when the last two touch. The hypervisor's carve-out
/// (its own memory and pool) is not in it, nor are the image's code (the
/// host may only read and run it) and the hypervisor's data and stacks.
fn host_regions(lay: &Layout) -> Vec<MemRegion> {
    let (ps, pe) = pool::range();
    let region = |(s, e): (u64, u64)| MemRegion {
        base: Pa(s),
        size: e - s,
    };
    // The image's host data and, up to the pool, the handoff block and
    // what the loader put there (an external guest's kernel and initrd):
    // the VMM reads them at EL1.
    let host = crate::platform::hypmem::image_parts().host;
    let statics = region((host.0, host.1.max(POOL_START.min(ps))));
    if pe == lay.heap.0 {
        alloc::vec![statics, region((ps, lay.heap.1))]
    } else {
        alloc::vec![statics, region((ps, pe)), region(lay.heap)]
    }
}

/// Sets pkvm-hyp up over RAM (the host pool and the VMM's heap as the
/// host's memory, the carve-out as its own memory and pool) and finalises
/// it: the platform of protected mode.
fn protected_platform(lay: &Layout) -> Option<Arc<BootPlatform>> {
    let regions = host_regions(lay);
    let span = |(s, e): (u64, u64)| (Pa(s), e - s);
    if !platform::hyp_set_up() {
        let refused = platform::pkvm_init_bad_blocks_refused(
            lay.ram,
            &regions,
            span(lay.hyp_heap),
            span(lay.hyp_pool),
        );
        println!(
            "hyp: PKVM_INIT with bad blocks (outside RAM, misaligned, 0 or 5 regions, a host region over the hypervisor's memory) {}",
            if refused {
                "refused (INVALID_PARAMETER), nothing set up"
            } else {
                "NOT all refused"
            }
        );
        if !refused {
            return None;
        }
    }
    let hyp = match platform::init_hyp(lay.ram, &regions, span(lay.hyp_heap), span(lay.hyp_pool)) {
        Ok(h) => h,
        Err(e) => {
            println!("mode: protected: {e}");
            return None;
        }
    };
    let img = crate::platform::hypmem::image_parts();
    println!(
        "mode: protected (pkvm-hyp owns guest stage-2; host memory: the VMM's statics {:#x}..{:#x}, page pool and VMM heap {:#x}..{:#x}; the image's code {:#x}..{:#x} read-only for the host, its hypervisor data and EL2 stacks {:#x}..{:#x} never mapped ({} statics of the hypervisor checked there); hyp state {} KiB in its own memory at {:#x}, hyp pool {} MiB at {:#x}; FINALIZE done)",
        img.host.0,
        img.host.1,
        regions[1].base.0,
        regions[regions.len() - 1].end().0,
        img.code.0,
        img.code.1,
        img.hyp.0,
        img.hyp.1,
        crate::platform::hypdata::audit().unwrap_or(0),
        platform::hyp_info().map_or(0, |i| i.mem_used) / 1024,
        lay.hyp_heap.0,
        (lay.hyp_pool.1 - lay.hyp_pool.0) / MIB,
        lay.hyp_pool.0
    );
    let again = platform::pkvm_init_refused_again(
        lay.ram,
        &regions,
        span(lay.hyp_heap),
        span(lay.hyp_pool),
    );
    println!(
        "hyp: a second PKVM_INIT {}",
        if again {
            "refused (NOT_SUPPORTED), the hypervisor's memory unchanged"
        } else {
            "NOT refused"
        }
    );
    if !again {
        return None;
    }
    Some(BootPlatform::new(Some(hyp)))
}

/// Protected mode: pkvm-hyp set up over RAM (carve-out as its pool),
/// finalised; a non-protected VM whose memory is shared and a protected VM
/// whose memory is donated, both touching memory, plus the exit guests.
fn protected(lay: &Layout, process: &Arc<BootProcess>, full: bool) -> bool {
    let Some(plat) = protected_platform(lay) else {
        return false;
    };
    if let Some(h) = plat.hyp() {
        match platform::null_hvc_ns(h) {
            Some(ns) => println!(
                "hyp: null hypercall round trip {ns} ns (GET_SIZES, mean of {})",
                platform::NULL_HVC_CALLS
            ),
            None => return check("hyp: null hypercall succeeds", false),
        }
    }
    let before = print_hyp(&plat, "before the VMs");
    let size = if full { 64 * MIB } else { 16 * MIB };
    let r = (0x4400_0000, size);
    let Some(a) = toucher(
        &plat,
        process,
        "pshare-4k",
        128 * MIB,
        r,
        Backing::Page4K,
        false,
    ) else {
        return false;
    };
    let Some(b) = toucher(
        &plat,
        process,
        "pvm-2m",
        128 * MIB,
        r,
        Backing::Block2M,
        true,
    ) else {
        return false;
    };
    let mut vms = alloc::vec![a, b];
    if full {
        let Some([m, h, p]) = exit_vms(&plat, process, ["pmmio", "phvc", "ppsci"]) else {
            return false;
        };
        vms.extend([m, h, p]);
    }
    run::reset_max_running();
    let mut ok = run_vms(&vms);
    ok &= concurrency_ok(&vms[..2]);
    ok &= touch_ok(&vms[0], r.1) & touch_ok(&vms[1], r.1);
    if full {
        ok &= exits_ok(&vms[2], &vms[3], &vms[4]);
    }
    ok &= finish_all(vms);
    let after = print_hyp(&plat, "after teardown");
    // At EL1 the VMM's own stack (the EL2 stacks are the hypervisor's
    // memory, out of its reach).
    let used = if crate::platform::el1boot::host_el1() {
        crate::platform::el1boot::host_stack_used(0)
    } else {
        crate::platform::start::stack_used(0)
    };
    println!(
        "boot CPU stack: {} KiB of {} KiB used{}",
        used / 1024,
        crate::platform::STACK_SIZE / 1024,
        if crate::platform::el1boot::host_el1() {
            " (its host stack at EL1)"
        } else {
            ""
        }
    );
    ok &= check(
        "boot CPU stack: 16 KiB left",
        used + 16 * 1024 <= crate::platform::STACK_SIZE,
    );
    ok &= check(
        "hyp: no VM state left",
        after.vm_pages == 0 && after.live_vms == 0,
    );
    println!(
        "hyp: {} pool pages now hold the host stage-2 tables split by donations",
        before.pool_free as i64 - after.pool_free as i64
    );
    ok
}

/// The default demo: the VMs in standard mode, then the hypervisor in
/// protected mode with shared and donated guest memory.
fn demo(lay: &Layout, process: &Arc<BootProcess>) -> bool {
    let start = pool::free_frames();
    let mut ok = demo_standard(process);
    let mid = pool::free_frames();
    ok &= check("pool back after the standard-mode VMs", mid == start);
    ok & protected(lay, process, false)
}

/// Where the handoff's initrd goes in the external guest's RAM (after the
/// kernel, below the device tree): `Ok(None)` without one, `Err` (said on
/// the console) if it does not fit.
fn guest_initrd(
    h: &crate::platform::handoff::Handoff,
    layout: &pkvm_arch::image::GuestLayout,
    mem: u64,
) -> Result<Option<(ImageSource, u64)>, ()> {
    let Some((pa, size)) = h.initrd else {
        return Ok(None);
    };
    match pkvm_arch::image::initrd_offset(layout, size, mem, guest::DTB_RESERVE) {
        Ok(off) => Ok(Some((ImageSource::Phys(Pa(pa), size), off))),
        Err(e) => {
            println!("guest: initrd: {e}");
            Err(())
        }
    }
}

/// The external guest's feature configuration from the handoff block:
/// SVE when asked, at the given maximum vector length or the host CPU's
/// largest (a length the policy refuses stops the VM's creation with an
/// error naming `sve_max_vl`; one beyond 16 bits is passed on as
/// `u16::MAX`, which the policy refuses too).
fn guest_features(h: &crate::platform::handoff::Handoff) -> IdOverrides {
    match h.sve {
        None => IdOverrides::new(),
        Some(0) => IdOverrides::new().with_sve_host_max(&crate::platform::idregs::host_ids()),
        Some(vl) => IdOverrides::new().with_sve(u16::try_from(vl).unwrap_or(u16::MAX)),
    }
}

/// An external guest from the handoff block: returns (ok, exit status);
/// status 0 iff the guest powered off with PSCI SYSTEM_OFF.
fn guest(lay: &Layout, p: &'static Platform, process: &Arc<BootProcess>) -> (bool, i32) {
    let Some(h) = p.handoff.as_ref() else {
        return (false, 2);
    };
    let Some((gpa, gsize)) = h.guest else {
        println!("guest: no guest file in the handoff block");
        return (false, 2);
    };
    let vcpus = h.smp as usize;
    if vcpus == 0 || vcpus > guest::MAX_VCPUS {
        println!(
            "guest: {vcpus} vCPUs requested; 1..={} supported here",
            guest::MAX_VCPUS
        );
        return (false, 2);
    }
    let plat = if h.protected {
        match protected_platform(lay) {
            Some(p) => p,
            None => return (false, 2),
        }
    } else {
        BootPlatform::new(None)
    };
    let mem = h.mem_mib as u64 * MIB;
    // The header is the file's (hostile input): checked placement only.
    let layout = phys::with_slice(Pa(gpa), gsize, |img| {
        pkvm_arch::image::guest_layout(img, mem, guest::DTB_RESERVE)
    });
    let layout = match layout {
        Ok(l) => l,
        Err(e) => {
            println!("guest: {e}");
            return (false, 2);
        }
    };
    let load_offset = layout.load_offset;
    let Ok(initrd) = guest_initrd(h, &layout, mem) else {
        return (false, 2);
    };
    println!(
        "guest: {}{} of {gsize} bytes, loaded at IPA {:#x}, {vcpus} vCPUs, {} MiB",
        if h.protected { "protected VM: " } else { "" },
        if layout.header.is_some() {
            "Linux arm64 Image"
        } else {
            "flat binary"
        },
        guest::GUEST_RAM + load_offset,
        mem / MIB
    );
    // The file stays where QEMU put it (below the pool): a guest system
    // reset reloads it from there. Guest RAM is backed by 2M folios, so
    // stage-2 maps it with 2M blocks: a Linux boot takes about 30 stage-2
    // faults instead of about 15,600 with 4K pages (--mem is a multiple
    // of 2 MiB and the RAM base is 1 GiB aligned).
    let spec = VmSpec {
        name: "guest",
        mem,
        backing: Backing::Block2M,
        image: ImageSource::Phys(Pa(gpa), gsize),
        load_offset,
        vcpus,
        dtb_bootargs: Some(h.cmdline()),
        initrd,
        protected: h.protected,
        touch: None,
        x0: None,
    };
    let features = guest_features(h);
    let g = match guest::create_with(&plat, process, &spec, &features) {
        Ok(x) => x,
        Err(e) => {
            println!("guest: cannot create the VM: {e}");
            return (false, 2);
        }
    };
    if let Some(vl) = g.sve_max_vl() {
        println!(
            "guest: SVE offered, maximum vector length {vl} bytes ({} bits)",
            u32::from(vl) * 8
        );
    }
    g.claim_input();
    let ran = run_vms(core::slice::from_ref(&g));
    let ok = ran & finish(g);
    (ok, if ok { 0 } else { 1 })
}
