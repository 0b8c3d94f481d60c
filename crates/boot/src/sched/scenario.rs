//! The scheduler scenarios xtask runs (handoff scenario names starting with
//! `sched-`; the handoff's vCPU count is the guest's):
//!
//! - `sched-smp`: guest-smp, a real SMP guest: vCPU 0 starts every
//!   secondary with PSCI CPU_ON, each reports in (MPIDR_EL1, a shared
//!   atomic counter under the guest's own stage-1 identity map) and turns
//!   itself off with CPU_OFF; a second round does it again; vCPU 0 ends the
//!   VM with SYSTEM_OFF. Passes if the VM powered off, every secondary was
//!   started exactly twice and vCPU 0 once.
//! - `sched-spin`: guest-spin: vCPU 1 spins forever without a single exit,
//!   vCPU 0 busy-waits (no WFI) for the workers (vCPUs 2..) to finish, then
//!   powers off. With fewer physical CPUs than vCPUs it only completes
//!   because the EL2 timer preempts the spinners. Passes if the VM powered
//!   off and the spinner was preempted by the timer.
//!
//! Every physical CPU runs [`Scheduler::run_cpu`]; the boot CPU prints the
//! per-vCPU statistics afterwards.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::vm::{Frames, SchedVm, SchedVmVcpu, GUEST_RAM};
use super::{Scheduler, VmEnd, DEFAULT_SLICE_US};
use crate::platform::dt::Platform;
use crate::platform::handoff::POOL_START;
use crate::platform::{gic, start, timer, MAX_CPUS};
use crate::println;

static GUEST_SMP: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-smp.bin"));
static GUEST_SPIN: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-spin.bin"));

static SCHED: Scheduler<SchedVmVcpu> = Scheduler::new();
static VM_SMP: SchedVm = SchedVm::new("smp", &SCHED);
static VM_SPIN: SchedVm = SchedVm::new("spin", &SCHED);
static FRAMES: Frames = Frames::new();

/// Set before secondaries start: they run [`secondary`].
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Released by the boot CPU once the VM is ready.
static GO: AtomicBool = AtomicBool::new(false);
/// Secondaries whose GIC CPU interface is up.
static READY: AtomicUsize = AtomicUsize::new(0);

const MIB: u64 = 1 << 20;
/// Physical memory the scenarios use, from the start of the pool area.
const FRAMES_SIZE: u64 = 64 * MIB;

/// Whether the image was asked for a scheduler scenario.
pub fn wants(p: &Platform) -> bool {
    p.handoff
        .as_ref()
        .is_some_and(|h| h.scenario().starts_with("sched-"))
}

/// Whether secondaries belong to the scheduler (set by [`main`]).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// A secondary CPU: GIC interface up, then the scheduling loop; parks when
/// the run is over.
pub fn secondary(cpu: usize) -> ! {
    match gic::init_cpu(cpu) {
        Ok(()) => {
            READY.fetch_add(1, Ordering::AcqRel);
            while !GO.load(Ordering::Acquire) {
                core::hint::spin_loop();
            }
            SCHED.run_cpu(cpu);
        }
        Err(e) => println!("sched: CPU {cpu}: GIC: {e}"),
    }
    loop {
        let _ = gic::wait_for_interrupt();
    }
}

/// A CPU bitmask printed as `{0,1}`.
struct CpuList(u64);

impl core::fmt::Display for CpuList {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{{")?;
        let mut first = true;
        for c in (0..64).filter(|c| self.0 & (1 << c) != 0) {
            if !first {
                write!(f, ",")?;
            }
            write!(f, "{c}")?;
            first = false;
        }
        write!(f, "}}")
    }
}

/// Entry on the boot CPU; returns the exit status.
pub fn main(p: &'static Platform) -> i32 {
    let Some(h) = p.handoff.as_ref() else {
        return 2;
    };
    let name = h.scenario();
    let (vm, image, spin) = match name {
        "sched-smp" => (&VM_SMP, GUEST_SMP, false),
        "sched-spin" => (&VM_SPIN, GUEST_SPIN, true),
        other => {
            println!("scenario {other}: unknown (known: sched-smp, sched-spin)");
            return 2;
        }
    };
    println!("scenario {name}: start");
    if let Err(e) = gic::init_global(p.gicd, p.gicr).and_then(|()| gic::init_cpu(0)) {
        println!("sched: GIC: {e}");
        return 1;
    }
    ACTIVE.store(true, Ordering::Release);
    let mut online = 1;
    for i in 1..p.ncpus.min(MAX_CPUS) {
        match start::start_secondary(i, p.cpus[i]) {
            Ok(()) => online += 1,
            Err(e) => {
                println!("sched: CPU {i} did not start: {e:?}");
                break;
            }
        }
    }
    while READY.load(Ordering::Acquire) < online - 1 {
        core::hint::spin_loop();
    }
    println!(
        "gic: GICv3 dist {:#x} redist {:#x}: {online} CPU interfaces up (group 1, SGI {} = kick, PPI INTID {} = EL2 physical timer); counter {} Hz",
        p.gicd,
        p.gicr,
        gic::SGI_KICK,
        timer::PPI_EL2_PHYS,
        timer::frequency()
    );
    let vcpus = h.smp as usize;
    // The start of the page-pool area (the heap and other users sit above).
    FRAMES.init(POOL_START, (POOL_START + FRAMES_SIZE).min(p.ram_end));
    if let Err(e) = vm.create(&FRAMES, 1, 16 * MIB, image, vcpus) {
        println!("vm {}: create failed: {e}", vm.name());
        return 1;
    }
    for i in 0..vcpus {
        if SCHED.add(i, SchedVmVcpu::new(vm, i)).is_err() {
            println!("sched: cannot add vCPU {i}");
            return 1;
        }
    }
    SCHED.set_slice_us(DEFAULT_SLICE_US);
    if let Err(e) = vm.power_on(GUEST_RAM, vcpus as u64) {
        println!("vm {}: {e}", vm.name());
        return 1;
    }
    println!(
        "sched: {vcpus} vCPUs on {online} physical CPUs, one global run queue, time slice {} ms (EL2 physical timer)",
        SCHED.slice_us() / 1000
    );
    let t0 = timer::now();
    GO.store(true, Ordering::Release);
    SCHED.run_cpu(0);
    // Wait (bounded) for the other CPUs to leave their loops.
    let mut spins = 0u64;
    while SCHED.cpus_in_loop() > 0 && spins < 100_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
    let ms = (timer::now() - t0) * 1000 / timer::frequency().max(1);
    let end = SCHED.end();
    match end {
        Some(VmEnd::PowerOff) => println!("vm {}: powered off (PSCI SYSTEM_OFF)", vm.name()),
        other => println!("vm {}: ended: {other:?}", vm.name()),
    }
    report(vm, vcpus, online, ms, spin, end == Some(VmEnd::PowerOff))
}

fn report(vm: &SchedVm, vcpus: usize, online: usize, ms: u64, spin: bool, off: bool) -> i32 {
    let l = |a: &core::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut ok = off;
    let mut timer_total = 0;
    let mut used_cpus = 0u64;
    for i in 0..vcpus {
        let s = &SCHED.stats[i];
        let starts = l(&vm.starts[i]);
        let t = l(&vm.timer_exits[i]);
        timer_total += t;
        used_cpus |= l(&s.cpus);
        println!(
            "sched: vCPU {i}: started {starts}x, ran {}x on CPUs {}, preempted {}x (EL2 timer {t}, kick {}), yields {}, sleeps {}, exits {}",
            l(&s.runs),
            CpuList(l(&s.cpus)),
            l(&s.preempted),
            l(&vm.kick_exits[i]),
            l(&s.yields),
            l(&s.sleeps),
            l(&vm.exits[i]),
        );
        if !spin {
            let want = if i == 0 { 1 } else { 2 };
            if starts != want {
                println!("check failed: vCPU {i} started {starts} times, expected {want}");
                ok = false;
            }
        }
    }
    for c in 0..online {
        println!(
            "sched: CPU {c}: {} vCPU runs, {} idle waits, {} interrupts acknowledged",
            l(&SCHED.cpu_runs[c]),
            l(&SCHED.cpu_idle[c]),
            gic::acked(c)
        );
    }
    println!(
        "sched: {vcpus} vCPUs on {online} CPUs (used {}), {timer_total} timer preemptions, {ms} ms",
        CpuList(used_cpus)
    );
    if spin {
        let t = l(&vm.timer_exits[1]);
        if t == 0 {
            println!("check failed: the spinning vCPU 1 was never preempted by the timer");
            ok = false;
        } else {
            println!(
                "sched: spinning vCPU 1 preempted {t}x by the EL2 timer; the others made progress"
            );
        }
    } else if ok {
        println!(
            "sched: all {} secondaries were started twice by CPU_ON and turned themselves off",
            vcpus - 1
        );
    }
    let name = if spin { "sched-spin" } else { "sched-smp" };
    if ok {
        println!("scenario {name}: PASS");
        0
    } else {
        println!("scenario {name}: FAIL");
        1
    }
}
