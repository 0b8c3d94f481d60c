//! KVM's `memslot_perf_test` on the simulated platform: guest memory split
//! over many memslots; each test is timed over its iterations:
//! - map: the guest writes every page (faulting each in);
//! - unmap: the host deletes and re-creates every slot (stage-2 unmapped),
//!   and the guest faults everything back in;
//! - move inactive: the host moves the last slot (which the guest does not
//!   touch) away and back while the guest writes the others;
//! - move active: the host moves the last slot while the guest writes it
//!   (accesses that find no slot exit to the VMM and are retried);
//! - rw: the guest writes every page and reads each back, checking it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pkvm_arch::{Hva, Ipa, PAGE_SIZE};
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::psci::{PsciVm, ResetState};
use pkvm_host::{VcpuExit, VmConfig};
use pkvm_sim::mm::{ProcessMm, VmaKind};
use pkvm_sim::{Machine, Phase, SimConfig, Workload};

use crate::backend::SimBackend;
use crate::demand_paging::{RunFailure, GUEST_BASE};
use crate::platform::{Mode, SimPlatform, NOTIFIER_CPU};
use crate::process::{SimProcess, VmNotifier};
use crate::{SimVcpu, SimVm};

/// Configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Memslots.
    pub slots: u32,
    /// Bytes per slot (a multiple of 4K).
    pub slot_bytes: u64,
    /// Iterations of each test.
    pub iterations: u32,
}

/// One test's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TestTime {
    /// Test name.
    pub name: &'static str,
    /// Iterations.
    pub iterations: u32,
    /// Average seconds per iteration.
    pub average_seconds: f64,
    /// Memslot changes made.
    pub slot_changes: u64,
}

/// Results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Memslots.
    pub slots: u32,
    /// Bytes per slot.
    pub slot_bytes: u64,
    /// Per test.
    pub tests: Vec<TestTime>,
    /// The guest read back what it wrote in the rw test.
    pub readback_ok: bool,
    /// Coherence violations (must be 0).
    pub coherence_violations: usize,
    /// Host frames not returned (must be 0).
    pub frames_leaked: i64,
}

struct Built {
    machine: Arc<Machine>,
    platform: Arc<SimPlatform>,
    mm: Arc<ProcessMm>,
    vm: Arc<SimVm>,
    hva: Hva,
    frames_before: u64,
}

fn slot_ipa(cfg: &Config, s: u32) -> Ipa {
    Ipa(GUEST_BASE.0 + s as u64 * cfg.slot_bytes)
}

fn set(b: &Built, cfg: &Config, s: u32, ipa: Ipa, size: u64) -> Result<(), RunFailure> {
    b.vm.set_user_memory_region(
        UserMemoryRegion {
            slot: s,
            flags: 0,
            guest_phys_addr: ipa.0,
            memory_size: size,
            userspace_addr: b.hva.0 + s as u64 * cfg.slot_bytes,
        },
        NOTIFIER_CPU,
    )?;
    Ok(())
}

fn build(cfg: &Config) -> Result<Built, RunFailure> {
    if cfg.slots < 2 || cfg.slots > 256 || cfg.slot_bytes == 0 || cfg.iterations == 0 {
        return Err(RunFailure::Config(
            "2..=256 slots, non-zero slot size and iterations".into(),
        ));
    }
    if !cfg.slot_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(RunFailure::Config("slot size: a multiple of 4K".into()));
    }
    let bytes = cfg.slot_bytes * cfg.slots as u64;
    let machine = Machine::new(SimConfig {
        mem_size: (bytes + (512 << 20)).div_ceil(1 << 30) << 30,
        hyp_carveout: 64 << 20,
        ncpus: 1,
        ..SimConfig::default()
    })?;
    let platform = SimPlatform::new(machine.clone(), Mode::Standard)?;
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let frames_before = machine.host_frames().stats().in_use;
    SimPlatform::set_current_cpu(0);
    let vm = SimVm::create(
        platform.clone(),
        Arc::new(SimProcess::new(mm.clone())),
        VmConfig::default(),
        0,
    )?;
    mm.register_notifier(VmNotifier::new(&vm));
    let hva = mm.mmap(bytes, VmaKind::Anonymous4K)?;
    vm.vcpu_power(0).lock().power_on(ResetState {
        pc: 0x8_0000,
        context_id: 0,
        big_endian: false,
        reset: true,
    });
    let b = Built {
        machine,
        platform,
        mm,
        vm,
        hva,
        frames_before,
    };
    for s in 0..cfg.slots {
        set(&b, cfg, s, slot_ipa(cfg, s), cfg.slot_bytes)?;
    }
    Ok(b)
}

/// Runs `phases` on the vCPU; MMIO exits (a slot moved away under the
/// guest) are answered and the access retried. `Ok(false)` if the guest
/// read a value it did not write.
fn guest(vcpu: &mut SimVcpu, be: &mut SimBackend, phases: Vec<Phase>) -> Result<bool, RunFailure> {
    be.cpu_mut().set_program(Box::new(Workload::new(1, phases)));
    loop {
        match vcpu.run(be) {
            VcpuExit::Halted => return Ok(true),
            VcpuExit::Interrupted | VcpuExit::Wfi => {}
            VcpuExit::Mmio { write: false, .. } => vcpu.complete_mmio(0),
            VcpuExit::Mmio { write: true, .. } => {}
            VcpuExit::InternalError(pkvm_host::RunError::GuestCheckFailed) => return Ok(false),
            e => {
                return Err(RunFailure::Vcpu {
                    index: 0,
                    what: format!("{e:?}"),
                })
            }
        }
    }
}

/// Times `cfg.iterations` calls of `f` (which returns the memslot changes
/// it made) as test `name`.
fn time(
    tests: &mut Vec<TestTime>,
    cfg: &Config,
    name: &'static str,
    f: &mut dyn FnMut() -> Result<u64, RunFailure>,
) -> Result<(), RunFailure> {
    let t = Instant::now();
    let mut changes = 0;
    for _ in 0..cfg.iterations {
        changes += f()?;
    }
    tests.push(TestTime {
        name,
        iterations: cfg.iterations,
        average_seconds: t.elapsed().as_secs_f64() / cfg.iterations as f64,
        slot_changes: changes,
    });
    Ok(())
}

/// The workload's vCPU and the tests' times.
struct Bench<'a> {
    b: &'a Built,
    cfg: &'a Config,
    vcpu: SimVcpu,
    be: SimBackend,
    tests: Vec<TestTime>,
}

impl Bench<'_> {
    fn all(&self) -> u64 {
        self.cfg.slot_bytes * u64::from(self.cfg.slots)
    }

    /// "map": the guest touches every page of every slot; "unmap": every
    /// slot deleted and created again, then touched again.
    fn map_unmap(&mut self) -> Result<(), RunFailure> {
        let (b, cfg, all) = (self.b, self.cfg, self.all());
        let (vcpu, be) = (&mut self.vcpu, &mut self.be);
        time(&mut self.tests, cfg, "map", &mut || {
            guest(vcpu, be, vec![Phase::touch_pages(GUEST_BASE, all)]).map(|_| 0)
        })?;
        time(&mut self.tests, cfg, "unmap", &mut || {
            for s in 0..cfg.slots {
                set(b, cfg, s, slot_ipa(cfg, s), 0)?;
                set(b, cfg, s, slot_ipa(cfg, s), cfg.slot_bytes)?;
            }
            guest(vcpu, be, vec![Phase::touch_pages(GUEST_BASE, all)])
                .map(|_| 2 * u64::from(cfg.slots))
        })
    }

    /// "move inactive" / "move active": the last slot moves away and back
    /// on another thread while the guest touches the other slots / it.
    fn moves(&mut self) -> Result<(), RunFailure> {
        let (b, cfg) = (self.b, self.cfg);
        let inactive = self.all() - cfg.slot_bytes;
        let last = cfg.slots - 1;
        let away = Ipa(GUEST_BASE.0 + (64u64 << 30));
        let mover = |stop: &AtomicBool| -> Result<u64, RunFailure> {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) || n == 0 {
                set(b, cfg, last, away, cfg.slot_bytes)?;
                set(b, cfg, last, slot_ipa(cfg, last), cfg.slot_bytes)?;
                n += 2;
            }
            Ok(n)
        };
        let (vcpu, be) = (&mut self.vcpu, &mut self.be);
        for (name, region) in [
            ("move inactive", (GUEST_BASE, inactive)),
            ("move active", (slot_ipa(cfg, last), cfg.slot_bytes)),
        ] {
            time(&mut self.tests, cfg, name, &mut || {
                let stop = AtomicBool::new(false);
                std::thread::scope(|s| {
                    let m = s.spawn(|| mover(&stop));
                    let r = guest(vcpu, be, vec![Phase::touch_pages(region.0, region.1)]);
                    stop.store(true, Ordering::Release);
                    let m = m
                        .join()
                        .map_err(|_| RunFailure::Config("mover panicked".into()))?;
                    r?;
                    m
                })
            })?;
        }
        Ok(())
    }

    /// "rw": write and verify every page, then read and verify; returns
    /// whether every read-back matched.
    fn rw(&mut self) -> Result<bool, RunFailure> {
        let (cfg, all) = (self.cfg, self.all());
        let (vcpu, be) = (&mut self.vcpu, &mut self.be);
        let mut readback_ok = true;
        time(&mut self.tests, cfg, "rw", &mut || {
            let ok = guest(
                vcpu,
                be,
                vec![
                    Phase::touch_pages(GUEST_BASE, all).verify(true),
                    Phase::touch_pages(GUEST_BASE, all).writes(0).verify(true),
                ],
            )?;
            readback_ok &= ok;
            Ok(0)
        })?;
        Ok(readback_ok)
    }
}

/// Runs the workload.
///
/// # Errors
/// See [`RunFailure`].
pub fn run(cfg: &Config) -> Result<Report, RunFailure> {
    let b = build(cfg)?;
    let vcpu = b.vm.vcpu(0)?;
    let be = SimBackend::new(b.machine.cpu(0)?, b.platform.clone(), 1 << 14);
    let mut bench = Bench {
        b: &b,
        cfg,
        vcpu,
        be,
        tests: Vec::new(),
    };
    bench.map_unmap()?;
    bench.moves()?;
    let readback_ok = bench.rw()?;
    let tests = bench.tests;
    drop(bench.vcpu);
    drop(bench.be);
    b.vm.teardown(0);
    drop(b.vm);
    b.mm.exit();
    drop(b.mm);
    Ok(Report {
        slots: cfg.slots,
        slot_bytes: cfg.slot_bytes,
        tests,
        readback_ok,
        coherence_violations: b.machine.check().len(),
        frames_leaked: b.machine.host_frames().stats().in_use as i64 - b.frames_before as i64,
    })
}
