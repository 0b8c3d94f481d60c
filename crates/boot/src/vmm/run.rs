//! Running VMs on the physical CPUs through the vCPU scheduler
//! ([`crate::sched`]): every vCPU of every VM of one run is a
//! [`HostRunner`] (a claimed `pkvm_host::Vcpu` plus its [`GuestVm`]) in
//! [`SCHED`]; every physical CPU runs the scheduling loop until all of
//! them are done. Any number of vCPUs (up to the scheduler's slots) share
//! any number of CPUs; the EL2 timer preempts a vCPU after one slice.
//!
//! - [`bring_up`] (boot CPU, once): the GICv3 (distributor, this CPU's
//!   redistributor and interface), then the secondary CPUs with PSCI
//!   CPU_ON over SMC; each secondary brings its GIC interface up and
//!   parks in [`secondary`].
//! - [`run`]: hands the vCPUs to the scheduler, queues those that are
//!   powered on (the others wait for a guest CPU_ON, which kicks them
//!   through `BootPlatform::kick_vcpu` -> [`kick`]), wakes the secondaries
//!   (a new run generation and the kick SGI), runs the loop on the boot CPU
//!   too, and returns once every CPU has left it.
//! - Between runs a secondary waits in `wfi` (interrupts masked at EL2;
//!   the SGI stays pending, so a wake-up sent before the `wfi` is not
//!   lost).

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use pkvm_host::psci::{PowerState, PsciVm};

use super::guest::{GuestVm, VmEnd};
use crate::platform::dt::Platform;
use crate::platform::{gic, start, timer, MAX_CPUS};
use crate::println;
use crate::sched::host::HostRunner;
use crate::sched::{Scheduler, MAX_SCHED_VCPUS};

/// A vCPU as the scheduler holds it.
pub type VmmVcpu = HostRunner<GuestVm>;

/// The image's vCPU scheduler.
pub static SCHED: Scheduler<VmmVcpu> = Scheduler::new();

/// Run generation: bumped by [`run`] to start the secondaries' loops.
static GEN: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the last generation whose loop it left.
static LEFT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Secondaries whose GIC interface is up (bit per CPU).
static READY: AtomicU64 = AtomicU64::new(0);
/// Secondaries that failed to bring their GIC interface up.
static FAILED: AtomicU64 = AtomicU64::new(0);
/// VMs with a vCPU in a scheduler run right now, and the most at once.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MAX_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// `BootPlatform::kick_vcpu`'s way into the scheduler.
pub fn kick(slot: usize) {
    SCHED.kick(slot)
}

/// A VM got its first vCPU into a scheduler run (statistics).
pub fn vm_started_running() {
    let now = RUNNING.fetch_add(1, Ordering::AcqRel) + 1;
    MAX_RUNNING.fetch_max(now, Ordering::AcqRel);
}

/// A VM's last running vCPU left its scheduler run (statistics).
pub fn vm_stopped_running() {
    RUNNING.fetch_sub(1, Ordering::AcqRel);
}

/// The most VMs that had a vCPU in the guest at the same time, since the
/// last [`reset_max_running`].
pub fn max_running() -> usize {
    MAX_RUNNING.load(Ordering::Relaxed)
}

/// Restarts the [`max_running`] statistic.
pub fn reset_max_running() {
    MAX_RUNNING.store(0, Ordering::Relaxed);
}

/// Why the CPUs could not be brought up.
#[derive(Clone, Copy, Debug)]
pub enum BringUpError {
    /// The boot CPU's GICv3 could not be set up.
    Gic(gic::GicError),
    /// The VMM at EL1 did not take its tick or a kick at EL1.
    El1Interrupts,
}

impl core::fmt::Display for BringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BringUpError::Gic(e) => write!(f, "GICv3 on the boot CPU: {e}"),
            BringUpError::El1Interrupts => {
                write!(f, "the VMM at EL1 did not take its tick or a kick SGI")
            }
        }
    }
}

/// Boot CPU, once: GICv3 up, secondaries started; returns the number of
/// CPUs that take part in scheduling (the boot CPU and every secondary
/// whose GIC interface came up).
///
/// # Errors
/// The boot CPU's GIC could not be set up (no GICv3: QEMU needs
/// `gic-version=3`).
pub fn bring_up(p: &Platform) -> Result<usize, BringUpError> {
    gic::init_global(p.gicd, p.gicr)
        .and_then(|()| gic::init_cpu(0))
        .map_err(BringUpError::Gic)?;
    let mut started = 0u64;
    for i in 1..p.ncpus.min(MAX_CPUS) {
        match start::start_secondary(i, p.cpus[i]) {
            Ok(()) => started |= 1 << i,
            Err(e) => {
                println!(
                    "cpus: CPU {i} (MPIDR {:#x}) did not start: {e:?}",
                    p.cpus[i]
                );
                break;
            }
        }
    }
    while (READY.load(Ordering::Acquire) | FAILED.load(Ordering::Acquire)) != started {
        core::hint::spin_loop();
    }
    let ready = READY.load(Ordering::Acquire);
    println!(
        "gic: GICv3 dist {:#x} redist {:#x}: {} CPU interfaces up (group 1, SGI {} = kick, PPI INTID {} = the tick (EL{} physical timer), {} = guest virtual timer, {} = maintenance; {} list registers); counter {} Hz",
        p.gicd,
        p.gicr,
        1 + ready.count_ones(),
        gic::SGI_KICK,
        timer::ppi(),
        crate::platform::el1boot::current_el(),
        gic::PPI_VTIMER,
        gic::PPI_MAINTENANCE,
        crate::platform::switch::gic_counts().0,
        timer::frequency()
    );
    if crate::platform::el1boot::current_el() == 1 && !el1_interrupts() {
        return Err(BringUpError::El1Interrupts);
    }
    Ok(1 + ready.count_ones() as usize)
}

/// The VMM at EL1, on the boot CPU: its tick (the EL1 physical timer) and
/// a kick SGI to itself are taken at EL1 (the `wfi` wakes for them with
/// `HCR_EL2.IMO` clear, `gic::drain` acknowledges them with
/// `ICC_IAR1_EL1`). Whether both came.
fn el1_interrupts() -> bool {
    let slice = timer::ticks_for_us(500);
    let wait = |want: fn(&gic::Drained) -> bool| {
        (0..64).any(|_| {
            timer::arm_after(slice);
            let d = gic::wait_for_interrupt();
            timer::disable();
            want(&d)
        })
    };
    let tick = wait(|d| d.timer);
    gic::send_sgi(gic::SGI_KICK, start::cpu_index());
    let kick = wait(|d| d.kick);
    println!(
        "el1: the tick (INTID {}) {} and a kick SGI {} at EL1 on CPU {}",
        timer::ppi(),
        if tick { "taken" } else { "NOT taken" },
        if kick { "taken" } else { "NOT taken" },
        start::cpu_index()
    );
    tick && kick
}

/// Set by the boot CPU after `FINALIZE` with the VMM at EL1: every
/// secondary then issues `PROT_FINALIZE_CPU` ([`finalize_secondaries`]).
static FINALIZE_ASKED: AtomicBool = AtomicBool::new(false);
/// Secondaries whose `PROT_FINALIZE_CPU` was answered (bit per CPU), and
/// those it failed on.
static FINALIZED: AtomicU64 = AtomicU64::new(0);
static FINALIZE_FAILED: AtomicU64 = AtomicU64::new(0);

/// The boot CPU, the VMM at EL1, after `FINALIZE` (which put its own host
/// under the host stage-2): asks every other CPU taking part to issue
/// `PROT_FINALIZE_CPU` (a kick SGI wakes them) and waits for them.
///
/// # Errors
/// The status of a secondary's failed `PROT_FINALIZE_CPU`.
pub fn finalize_secondaries() -> Result<(), i64> {
    FINALIZE_ASKED.store(true, Ordering::Release);
    gic::send_sgi_others(gic::SGI_KICK);
    let want = READY.load(Ordering::Acquire);
    while (FINALIZED.load(Ordering::Acquire) | FINALIZE_FAILED.load(Ordering::Acquire)) & want
        != want
    {
        core::hint::spin_loop();
    }
    if FINALIZE_FAILED.load(Ordering::Acquire) != 0 {
        return Err(pkvm_hyp::hvc::ret::DENIED);
    }
    println!(
        "el1: the VMM is under the host stage-2 on {} CPUs (FINALIZE, then PROT_FINALIZE_CPU on each secondary)",
        1 + want.count_ones()
    );
    Ok(())
}

/// A secondary's part of [`finalize_secondaries`], once asked.
fn finalize_here(cpu: usize) {
    if !FINALIZE_ASKED.load(Ordering::Acquire)
        || FINALIZED.load(Ordering::Acquire) & (1 << cpu) != 0
    {
        return;
    }
    let s = super::platform::prot_finalize_cpu();
    if s == pkvm_hyp::hvc::ret::SUCCESS {
        FINALIZED.fetch_or(1 << cpu, Ordering::AcqRel);
    } else {
        println!("el1: CPU {cpu}: PROT_FINALIZE_CPU failed: {s}");
        FINALIZE_FAILED.fetch_or(1 << cpu, Ordering::AcqRel);
    }
}

/// A secondary CPU: GIC interface up, then one scheduling loop per run.
pub fn secondary(cpu: usize) -> ! {
    if let Err(e) = gic::init_cpu(cpu) {
        println!("cpus: CPU {cpu}: GIC: {e}; it takes no part in scheduling");
        FAILED.fetch_or(1 << cpu, Ordering::AcqRel);
        loop {
            core::hint::spin_loop();
        }
    }
    READY.fetch_or(1 << cpu, Ordering::AcqRel);
    let mut seen = 0;
    loop {
        finalize_here(cpu);
        let g = GEN.load(Ordering::Acquire);
        if g != seen {
            seen = g;
            SCHED.run_cpu(cpu);
            LEFT[cpu].store(g, Ordering::Release);
        } else {
            let _ = gic::wait_for_interrupt();
        }
    }
}

/// What one [`run`] did.
#[derive(Clone, Copy, Debug)]
pub struct RunReport {
    /// Wall time of the run in milliseconds.
    pub ms: u64,
    /// The run ended because every vCPU left was asleep.
    pub all_asleep: bool,
}

/// Runs every vCPU of `vms` through the scheduler on every CPU until each
/// VM has stopped (or every vCPU left is asleep: those VMs are stopped with
/// an error). `None` if the vCPUs do not fit in the scheduler.
pub fn run(vms: &[Arc<GuestVm>]) -> Option<RunReport> {
    let total: usize = vms.iter().map(|g| g.vm.vcpu_count()).sum();
    if total > MAX_SCHED_VCPUS {
        println!("run: {total} vCPUs, but the scheduler holds at most {MAX_SCHED_VCPUS}");
        return None;
    }
    SCHED.begin();
    for g in vms {
        for i in 0..g.vm.vcpu_count() {
            let vcpu = match g.vm.vcpu(i) {
                Ok(v) => v,
                Err(e) => {
                    println!("vm {}: vCPU {i}: {e}", g.name);
                    g.stop(VmEnd::Error("vCPU claim failed"));
                    continue;
                }
            };
            match SCHED.add(HostRunner::new(vcpu, g.clone())) {
                Ok(slot) => g.attach(i, slot),
                // Cannot happen: the slots were counted above and every
                // run empties them.
                Err(_) => g.stop(VmEnd::Error("no scheduler slot")),
            }
        }
    }
    // Queue the vCPUs that are powered on; the others wait for CPU_ON.
    for g in vms {
        for i in 0..g.vm.vcpu_count() {
            let on = g.vm.vcpu_power(i).lock().state() != PowerState::Stopped;
            if on || g.stopping_now() {
                g.vm.kick_vcpu(i);
            }
        }
    }
    let t0 = timer::now();
    let gen = GEN.fetch_add(1, Ordering::AcqRel) + 1;
    gic::send_sgi_others(gic::SGI_KICK);
    SCHED.run_cpu(0);
    let ready = READY.load(Ordering::Acquire);
    for c in (1..MAX_CPUS).filter(|c| ready & (1 << c) != 0) {
        while LEFT[c].load(Ordering::Acquire) != gen {
            core::hint::spin_loop();
        }
    }
    let ms = (timer::now() - t0) * 1000 / timer::frequency().max(1);
    let all_asleep = SCHED.ended_all_asleep();
    for g in vms {
        g.detach();
    }
    SCHED.drain(|r| {
        r.vmm().stop(VmEnd::Error(
            "every vCPU is off or suspended and nothing can wake them",
        ));
    });
    Some(RunReport { ms, all_asleep })
}
