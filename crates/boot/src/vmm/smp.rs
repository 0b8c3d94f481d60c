//! The SMP scenarios (handoff scenario names starting with `sched-`; the
//! handoff's vCPU count is the guest's, QEMU's `-smp` the physical CPUs):
//! real pkvm-host VMs ([`GuestVm`]: `pkvm_host::Vm`, `Vcpu::run` through
//! the [`HwBackend`](super::backend::HwBackend)) scheduled by
//! [`crate::sched`] through [`super::run`].
//!
//! - `sched-smp`: guest-smp: vCPU 0 starts every secondary with PSCI
//!   CPU_ON, each reports in (MPIDR_EL1, a shared atomic counter under the
//!   guest's own stage-1 identity map) and turns itself off with CPU_OFF; a
//!   second round does it again; vCPU 0 ends the VM with SYSTEM_OFF.
//!   Passes if the VM powered off, every secondary was started (reset by
//!   pkvm-host) exactly twice and vCPU 0 once, and the pool is back.
//! - `sched-smp-protected`: the same guest as a non-protected VM under
//!   pkvm-hyp (protected mode: its memory is shared with it by hypercalls,
//!   each scheduler run loads the vCPU on the CPU it runs on).
//! - `sched-spin`: guest-spin: vCPU 1 spins forever without a single exit,
//!   vCPU 0 busy-waits (no WFI) for the workers (vCPUs 2..) to finish, then
//!   powers off. With fewer physical CPUs than vCPUs it only completes
//!   because the EL2 timer preempts the spinners. Passes if the VM powered
//!   off and the spinner was preempted by the timer.

use alloc::sync::Arc;
use core::sync::atomic::Ordering;

use super::guest::{self, GuestVm, VmEnd, VmSpec};
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::run::{self, SCHED};
use super::{check, finish, ncpus, print_hyp, protected_platform, Layout, MIB};
use crate::platform::dt::Platform;
use crate::platform::gic;
use crate::println;
use crate::sched::CpuList;

static GUEST_SMP: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-smp.bin"));
static GUEST_SPIN: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-spin.bin"));

/// The guest's vCPU count from the handoff block.
fn vcpus_of(p: &Platform) -> usize {
    p.handoff.as_ref().map_or(4, |h| h.smp as usize)
}

/// Creates the scenario's VM: `image` with `vcpus` vCPUs, 16 MiB of 4K
/// backed RAM, x0 = `vcpus`.
fn create(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    name: &'static str,
    image: &'static [u8],
    (vcpus, protected): (usize, bool),
) -> Option<Arc<GuestVm>> {
    if image.is_empty() {
        println!("vm {name}: guest payload missing (build with `cargo xtask`)");
        return None;
    }
    let spec = VmSpec {
        name,
        mem: 16 * MIB,
        backing: Backing::Page4K,
        image: guest::ImageSource::Embedded(image),
        load_offset: 0,
        vcpus,
        dtb_bootargs: None,
        initrd: None,
        protected,
        touch: None,
        x0: Some(vcpus as u64),
    };
    match guest::create(plat, process, &spec) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("vm {name}: create failed: {e}");
            None
        }
    }
}

/// Runs the VM through the scheduler and prints what each vCPU and CPU
/// did; returns (ran at all, per-vCPU starts as expected).
fn run_and_report(g: &Arc<GuestVm>, want_starts: Option<fn(usize) -> u64>) -> bool {
    let n = g.vcpu_count();
    let cpus = ncpus();
    println!(
        "sched: {n} vCPUs on {cpus} physical CPUs, one global run queue, time slice {} ms (EL2 physical timer)",
        SCHED.slice_us() / 1000
    );
    let Some(r) = run::run(core::slice::from_ref(g)) else {
        return false;
    };
    let l = |a: &core::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut ok = true;
    let mut timer_total = 0;
    let mut used = 0u64;
    for i in 0..n {
        let slot = g.slots[i].load(Ordering::Relaxed);
        let Some(s) = SCHED.stats.get(slot) else {
            println!("sched: vCPU {i}: never scheduled");
            ok = false;
            continue;
        };
        let hw = g.vcpu_stats(i);
        timer_total += hw.timer_irqs;
        used |= l(&s.cpus);
        println!(
            "sched: vCPU {i}: started {}x, ran {}x on CPUs {}, preempted {}x (EL2 timer {}, kick {}), yields {}, sleeps {}, exits {}",
            hw.resets,
            l(&s.runs),
            CpuList(l(&s.cpus)),
            l(&s.preempted),
            hw.timer_irqs,
            hw.kick_irqs,
            l(&s.yields),
            l(&s.sleeps),
            hw.exits,
        );
        if let Some(want) = want_starts {
            if hw.resets != want(i) {
                println!(
                    "check failed: vCPU {i} started {} times, expected {}",
                    hw.resets,
                    want(i)
                );
                ok = false;
            }
        }
    }
    for c in 0..cpus {
        println!(
            "sched: CPU {c}: {} vCPU runs, {} idle waits, {} interrupts acknowledged",
            l(&SCHED.cpu_runs[c]),
            l(&SCHED.cpu_idle[c]),
            gic::acked(c)
        );
    }
    println!(
        "sched: {n} vCPUs on {cpus} CPUs (used {}), {timer_total} timer preemptions, {} ms",
        CpuList(used),
        r.ms
    );
    ok
}

/// `sched-smp` (standard mode) and `sched-smp-protected` (a non-protected
/// VM under pkvm-hyp, then a protected one: its secondaries' second
/// `CPU_ON` restarts vCPUs that ran, which the hypervisor accepts only
/// against the guest's own `CPU_ON` it saw, `platform::pview`).
pub fn sched_smp(lay: &Layout, process: &Arc<BootProcess>, p: &Platform, protected: bool) -> bool {
    let vcpus = vcpus_of(p);
    let (plat, name) = if protected {
        let Some(plat) = protected_platform(lay) else {
            return false;
        };
        (plat, "psmp")
    } else {
        println!("mode: standard (the host manages guest stage-2 with pkvm-pgtable)");
        (BootPlatform::new(None), "smp")
    };
    let before = protected.then(|| print_hyp(&plat, "before the VM"));
    let mut ok = smp_vm(&plat, process, name, (vcpus, false));
    if protected {
        ok &= smp_vm(&plat, process, "pvsmp", (vcpus, true));
    }
    if let Some(before) = before {
        let after = print_hyp(&plat, "after teardown");
        ok &= check(
            "hyp: no VM state left",
            after.vm_pages == 0 && after.live_vms == 0,
        );
        println!(
            "hyp: {} pool pages now hold the host stage-2 tables split by sharing",
            before.pool_free as i64 - after.pool_free as i64
        );
    }
    ok
}

/// One SMP guest run to its power-off (its secondaries started twice).
fn smp_vm(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    name: &'static str,
    vcpus: (usize, bool),
) -> bool {
    let Some(g) = create(plat, process, name, GUEST_SMP, vcpus) else {
        return false;
    };
    let mut ok = run_and_report(&g, Some(|i| if i == 0 { 1 } else { 2 }));
    let powered_off = g.end() == Some(VmEnd::PowerOff);
    if ok && powered_off {
        println!(
            "sched: vm {name}: all {} secondaries were started twice by CPU_ON and turned themselves off",
            vcpus.0.saturating_sub(1)
        );
    }
    ok &= finish(g);
    ok
}

/// `sched-spin`: a vCPU that never exits cannot starve the others.
pub fn sched_spin(process: &Arc<BootProcess>, p: &Platform) -> bool {
    let vcpus = vcpus_of(p);
    println!("mode: standard (the host manages guest stage-2 with pkvm-pgtable)");
    let plat = BootPlatform::new(None);
    let Some(g) = create(&plat, process, "spin", GUEST_SPIN, (vcpus, false)) else {
        return false;
    };
    let mut ok = run_and_report(&g, None);
    let t = g.vcpu_stats(1).timer_irqs;
    if t == 0 {
        println!("check failed: the spinning vCPU 1 was never preempted by the timer");
        ok = false;
    } else if g.end() == Some(VmEnd::PowerOff) {
        println!(
            "sched: spinning vCPU 1 preempted {t}x by the EL2 timer; the others made progress"
        );
    }
    ok & finish(g)
}
