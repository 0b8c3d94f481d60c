//! KVM's `demand_paging_test` on the simulated platform: N vCPUs each touch
//! every page of their region once (a write per 4K page), on a VM whose
//! memory is faulted in on demand through the host's fault pipeline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use pkvm_arch::smccc::psci;
use pkvm_arch::{Hva, Ipa};
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::psci::{PsciVm, ResetState};
use pkvm_host::reset::BootParams;
use pkvm_host::vcpu_state::mpidr_affinity;
use pkvm_host::{VcpuExit, VmConfig, VmStatsSnapshot};
use pkvm_sim::cpu::{GuestProgram, Op};
use pkvm_sim::mm::{ProcessMm, VmaKind};
pub use pkvm_sim::Coherence;
use pkvm_sim::{Machine, Phase, SimConfig, Workload};

use crate::backend::SimBackend;
use crate::platform::{Mode, SimPlatform};
use crate::process::{SimProcess, VmNotifier};
use crate::SimVm;

/// The backing of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Backing {
    /// Anonymous memory, 4K pages.
    Anonymous,
    /// Anonymous memory with transparent huge pages (2M when aligned).
    AnonymousThp,
    /// hugetlbfs, 2M pages.
    Hugetlb2M,
    /// hugetlbfs, 1G pages.
    Hugetlb1G,
}

impl Backing {
    fn kind(self) -> VmaKind {
        match self {
            Backing::Anonymous => VmaKind::Anonymous4K,
            Backing::AnonymousThp => VmaKind::AnonymousThp,
            Backing::Hugetlb2M => VmaKind::Hugetlb2M,
            Backing::Hugetlb1G => VmaKind::Hugetlb1G,
        }
    }
    fn granule(self) -> u64 {
        self.kind().granule()
    }
}

/// Guest memory starts at this IPA.
pub const GUEST_BASE: Ipa = Ipa(0x4000_0000);

/// Configuration of a run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Bytes each vCPU touches.
    pub bytes_per_vcpu: u64,
    /// Memory backing.
    pub backing: Backing,
    /// All vCPUs touch the same region (else each its own partition).
    pub overlap: bool,
    /// Standard or protected mode.
    pub mode: Mode,
    /// In protected mode: a protected VM (memory donated, not shared).
    pub protected_vm: bool,
    /// vCPU 0 boots the others with PSCI CPU_ON before touching memory.
    pub psci_boot: bool,
    /// Seed for the guest programs.
    pub seed: u64,
    /// Guest accesses completed so far (for a progress bar).
    pub progress: Option<Arc<AtomicU64>>,
    /// How much TLB coherence checking the machine does.
    pub coherence: Coherence,
    /// Back the simulated RAM with host memory before the run, so the
    /// measurement excludes the host kernel's first-touch page faults.
    pub prefault: bool,
    /// The guest remembers what it wrote and checks what it reads back
    /// (simulator bookkeeping per write; off for raw speed).
    pub verify: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vcpus: 1,
            bytes_per_vcpu: 1 << 30,
            backing: Backing::Anonymous,
            overlap: false,
            mode: Mode::Standard,
            protected_vm: false,
            psci_boot: false,
            seed: 1,
            progress: None,
            coherence: Coherence::EveryUse,
            prefault: false,
            verify: true,
        }
    }
}

/// Per-vCPU results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: usize,
    /// Pages touched.
    pub pages: u64,
    /// Seconds from its first guest entry to the end of its program.
    pub seconds: f64,
    /// Pages per second.
    pub pages_per_sec: f64,
    /// Exits by kind.
    pub exits: ExitCounts,
}

/// Exits returned to the VMM loop.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ExitCounts {
    /// Preemptions/kicks.
    pub interrupted: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Sleeps (powered off, waiting for CPU_ON).
    pub sleep: u64,
    /// WFI.
    pub wfi: u64,
    /// Hypercalls forwarded to the VMM.
    pub hypercalls: u64,
}

/// Results of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The configuration.
    pub vcpus: usize,
    /// Bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// Backing.
    pub backing: Backing,
    /// Overlapping regions.
    pub overlap: bool,
    /// Mode.
    pub mode: Mode,
    /// Protected VM.
    pub protected_vm: bool,
    /// Wall time of the guest phase (all vCPUs).
    pub total_seconds: f64,
    /// Total pages touched / total time.
    pub overall_pages_per_sec: f64,
    /// Per vCPU.
    pub per_vcpu: Vec<VcpuReport>,
    /// Fault statistics from the host.
    pub faults: FaultReport,
    /// Coherence-checker violations (must be 0; not checked with
    /// [`Coherence::Off`]).
    pub coherence_violations: usize,
    /// The checking level the run used.
    pub coherence: String,
    /// Host frames still allocated after teardown, beyond the starting count
    /// (must be 0).
    pub frames_leaked: i64,
    /// Pages the hypervisor still holds for VMs after teardown, plus live
    /// VMs (protected mode; must be 0).
    pub hyp_pages_leaked: i64,
    /// Hypervisor pool pages now holding the host's own stage-2 tables
    /// (blocks split by donations; not a leak, reported for the record).
    pub hyp_host_s2_pages: i64,
    /// Hypercalls made.
    pub hypercalls: u64,
}

/// Fault counts.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FaultReport {
    /// Translation faults.
    pub translation: u64,
    /// Permission faults.
    pub permission: u64,
    /// Access-flag faults.
    pub access_flag: u64,
    /// Retries.
    pub retries: u64,
    /// Mappings made: 4K, 2M, 1G.
    pub maps_4k: u64,
    /// 2M mappings.
    pub maps_2m: u64,
    /// 1G mappings.
    pub maps_1g: u64,
}

impl From<VmStatsSnapshot> for FaultReport {
    fn from(s: VmStatsSnapshot) -> Self {
        FaultReport {
            translation: s.translation_faults,
            permission: s.permission_faults,
            access_flag: s.access_flag_faults,
            retries: s.retries,
            maps_4k: s.maps_by_size[0],
            maps_2m: s.maps_by_size[1],
            maps_1g: s.maps_by_size[2],
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    /// Bad configuration (caller error).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The simulated machine could not be built.
    #[error("machine: {0}")]
    Machine(#[from] pkvm_sim::SimError),
    /// The platform could not start.
    #[error("platform: {0}")]
    Platform(#[from] crate::platform::PlatformError),
    /// Host process memory.
    #[error("process memory: {0}")]
    Mm(#[from] pkvm_sim::mm::MmError),
    /// The VM could not be created or configured.
    #[error("vm: {0}")]
    Vm(pkvm_host::VmError),
    /// A vCPU stopped with an error.
    #[error("vcpu {index}: {what}")]
    Vcpu {
        /// vCPU index.
        index: usize,
        /// What happened.
        what: String,
    },
}

impl From<pkvm_host::VmError> for RunFailure {
    fn from(e: pkvm_host::VmError) -> Self {
        RunFailure::Vm(e)
    }
}

/// vCPU 0's PSCI boot sequence: CPU_ON every secondary, checking each
/// result, then hand over to the memory workload.
struct PsciBoot {
    targets: Vec<usize>,
    next: usize,
    issued: bool,
    failed: Arc<AtomicBool>,
    then: Workload,
}

impl GuestProgram for PsciBoot {
    fn next_op(&mut self, regs: &[u64; 31]) -> Option<Op> {
        if self.issued {
            self.issued = false;
            if regs[0] != psci::RET_SUCCESS as u64 {
                self.failed.store(true, Ordering::Relaxed);
            }
        }
        if let Some(&t) = self.targets.get(self.next) {
            self.next += 1;
            self.issued = true;
            return Some(Op::Hvc {
                imm: 0,
                args: [
                    psci::CPU_ON_64 as u64,
                    mpidr_affinity(t),
                    0x8_0000,
                    t as u64,
                ],
            });
        }
        self.then.next_op(regs)
    }
}

/// Everything a run builds, for tests that need to poke at it.
pub struct Setup {
    /// The machine.
    pub machine: Arc<Machine>,
    /// The platform.
    pub platform: Arc<SimPlatform>,
    /// The host process memory.
    pub process: SimProcess,
    /// The VM.
    pub vm: Arc<SimVm>,
    /// Host address of guest memory.
    pub hva: Hva,
    /// Bytes of guest memory.
    pub guest_bytes: u64,
    /// Host frames in use before the VM existed.
    pub frames_before: u64,
    /// Free hyp pool pages before the VM existed.
    pub hyp_free_before: u64,
}

/// Builds a machine, platform, process and VM with one memslot of
/// `guest_bytes` at [`GUEST_BASE`].
///
/// # Errors
/// See [`RunFailure`].
pub fn setup(cfg: &Config, guest_bytes: u64) -> Result<Setup, RunFailure> {
    let g = cfg.backing.granule();
    if guest_bytes == 0 || !guest_bytes.is_multiple_of(g) {
        return Err(RunFailure::Config(format!(
            "guest memory {guest_bytes:#x} must be a non-zero multiple of the backing page size {g:#x}"
        )));
    }
    if cfg.vcpus == 0 || cfg.vcpus > 16 {
        return Err(RunFailure::Config(format!(
            "{} vCPUs: 1..=16 supported",
            cfg.vcpus
        )));
    }
    if cfg.protected_vm && cfg.mode != Mode::Protected {
        return Err(RunFailure::Config(
            "a protected VM needs --mode protected".into(),
        ));
    }
    let gib = 1u64 << 30;
    // Guest memory, room for alignment of huge pages, tables and the hyp.
    let mem_size = (guest_bytes + g + (512 << 20)).div_ceil(gib) * gib;
    let machine = Machine::new(SimConfig {
        mem_size,
        hyp_carveout: 128 << 20,
        ncpus: cfg.vcpus.max(1),
        coherence: cfg.coherence,
        ..SimConfig::default()
    })?;
    if cfg.prefault {
        let (base, size) = machine.host_frames().range();
        machine
            .mem()
            .populate(base, size)
            .map_err(|e| RunFailure::Config(format!("prefaulting simulated RAM: {e}")))?;
    }
    let platform = SimPlatform::new(machine.clone(), cfg.mode)?;
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let process = SimProcess::new(mm.clone());
    let frames_before = machine.host_frames().stats().in_use;
    let hyp_free_before = platform.hyp().map(|h| h.stats().pool_free).unwrap_or(0);
    SimPlatform::set_current_cpu(0);
    let vm = SimVm::create(
        platform.clone(),
        Arc::new(process.clone()),
        VmConfig {
            ipa_bits: 40,
            protected: cfg.protected_vm,
            nr_vcpus: cfg.vcpus,
            ..VmConfig::default()
        },
        0,
    )?;
    mm.register_notifier(VmNotifier::new(&vm));
    let hva = mm.mmap(guest_bytes, cfg.backing.kind())?;
    vm.set_user_memory_region(
        UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GUEST_BASE.0,
            memory_size: guest_bytes,
            userspace_addr: hva.0,
        },
        0,
    )?;
    Ok(Setup {
        machine,
        platform,
        process,
        vm,
        hva,
        guest_bytes,
        frames_before,
        hyp_free_before,
    })
}

/// Runs the demand-paging workload and tears everything down.
///
/// # Errors
/// See [`RunFailure`].
pub fn run(cfg: &Config) -> Result<Report, RunFailure> {
    let guest_bytes = if cfg.overlap {
        cfg.bytes_per_vcpu
    } else {
        cfg.bytes_per_vcpu * cfg.vcpus as u64
    };
    let s = setup(cfg, guest_bytes)?;
    let n = cfg.vcpus;
    if cfg.psci_boot {
        s.vm.power_on(BootParams {
            entry: 0x8_0000,
            x0: 0,
            big_endian: false,
        })?;
    } else {
        for i in 0..n {
            s.vm.vcpu_power(i).lock().power_on(ResetState {
                pc: 0x8_0000,
                context_id: 0,
                big_endian: false,
                reset: true,
            });
        }
    }
    let pages_per_vcpu = cfg.bytes_per_vcpu / 4096;
    let barrier = Arc::new(Barrier::new(n + 1));
    let psci_failed = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Result<VcpuReport, RunFailure>>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<(), RunFailure> {
        for i in 0..n {
            let vm = s.vm.clone();
            let platform = s.platform.clone();
            let machine = s.machine.clone();
            let barrier = barrier.clone();
            let results = results.clone();
            let progress = cfg.progress.clone();
            let failed = psci_failed.clone();
            let base = if cfg.overlap {
                GUEST_BASE
            } else {
                GUEST_BASE + i as u64 * cfg.bytes_per_vcpu
            };
            let (seed, bytes, overlap, psci_boot, verify) = (
                cfg.seed,
                cfg.bytes_per_vcpu,
                cfg.overlap,
                cfg.psci_boot,
                cfg.verify,
            );
            scope.spawn(move || {
                let r = (|| -> Result<VcpuReport, RunFailure> {
                    SimPlatform::set_current_cpu(i);
                    let mut vcpu = vm.vcpu(i)?;
                    let cpu = machine.cpu(i)?;
                    let touch = Workload::new(
                        seed.wrapping_add(i as u64),
                        [Phase::touch_pages(base, bytes).verify(verify && !overlap)],
                    );
                    let mut be = SimBackend::new(cpu, platform.clone(), 1 << 16);
                    if psci_boot && i == 0 {
                        be.cpu_mut().set_program(Box::new(PsciBoot {
                            targets: (1..vm.vcpu_count()).collect(),
                            next: 0,
                            issued: false,
                            failed: failed.clone(),
                            then: touch,
                        }));
                    } else {
                        be.cpu_mut().set_program(Box::new(touch));
                    }
                    let id = vm.vmid().or(vm.handle()).unwrap_or(0);
                    let token = platform.register_vcpu_thread(id, i);
                    be.set_kick_token(token.clone());
                    if let Some(p) = progress {
                        be.set_progress(p);
                    }
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut exits = ExitCounts::default();
                    let res = loop {
                        match vcpu.run(&mut be) {
                            VcpuExit::Halted => break Ok(()),
                            VcpuExit::Interrupted => exits.interrupted += 1,
                            VcpuExit::Wfi => exits.wfi += 1,
                            VcpuExit::Sleep => {
                                exits.sleep += 1;
                                while !token.swap(false, Ordering::AcqRel) {
                                    std::thread::park_timeout(Duration::from_millis(5));
                                }
                            }
                            // Not a call this VMM knows: the guest sees
                            // NOT_SUPPORTED (already in x0).
                            VcpuExit::Hypercall { .. } => exits.hypercalls += 1,
                            VcpuExit::Mmio { write, .. } => {
                                exits.mmio += 1;
                                if !write {
                                    vcpu.complete_mmio(0);
                                }
                            }
                            VcpuExit::SystemEvent(e) => {
                                break Err(RunFailure::Vcpu {
                                    index: i,
                                    what: format!("unexpected system event {e:?}"),
                                })
                            }
                            VcpuExit::InternalError(e) => {
                                let detail = be
                                    .guest_error
                                    .map(|g| format!(" ({g})"))
                                    .unwrap_or_default();
                                break Err(RunFailure::Vcpu {
                                    index: i,
                                    what: format!("{e:?}{detail}"),
                                });
                            }
                        }
                    };
                    let seconds = t0.elapsed().as_secs_f64();
                    platform.unregister_vcpu_thread(id, i);
                    res?;
                    Ok(VcpuReport {
                        index: i,
                        pages: pages_per_vcpu,
                        seconds,
                        pages_per_sec: pages_per_vcpu as f64 / seconds,
                        exits,
                    })
                })();
                results.lock().unwrap().push(r);
            });
        }
        barrier.wait();
        Ok(())
    })?;
    let total = start.elapsed();
    let mut per_vcpu = Vec::new();
    for r in std::mem::take(&mut *results.lock().unwrap()) {
        per_vcpu.push(r?);
    }
    if psci_failed.load(Ordering::Relaxed) {
        return Err(RunFailure::Vcpu {
            index: 0,
            what: "a PSCI CPU_ON did not return SUCCESS".into(),
        });
    }
    per_vcpu.sort_by_key(|v| v.index);
    finish(s, cfg, per_vcpu, total)
}

fn finish(
    s: Setup,
    cfg: &Config,
    per_vcpu: Vec<VcpuReport>,
    total: Duration,
) -> Result<Report, RunFailure> {
    let faults = FaultReport::from(s.vm.stats().snapshot());
    let hypercalls = s.platform.hvcs.load(Ordering::Relaxed);
    // Tear down: the VM (single owner), then the process memory.
    s.vm.teardown(0);
    let mm = s.process.mm().clone();
    drop(s.vm);
    mm.exit();
    drop(s.process);
    drop(mm);
    let violations = s.machine.check().len();
    let frames_after = s.machine.host_frames().stats().in_use;
    let hyp_after = s.platform.hyp().map(|h| h.stats()).unwrap_or_default();
    let pages: u64 = per_vcpu.iter().map(|v| v.pages).sum();
    let secs = total.as_secs_f64();
    Ok(Report {
        vcpus: cfg.vcpus,
        bytes_per_vcpu: cfg.bytes_per_vcpu,
        backing: cfg.backing,
        overlap: cfg.overlap,
        mode: cfg.mode,
        protected_vm: cfg.protected_vm,
        total_seconds: secs,
        overall_pages_per_sec: pages as f64 / secs,
        per_vcpu,
        faults,
        coherence_violations: violations,
        coherence: format!("{:?}", cfg.coherence),
        frames_leaked: frames_after as i64 - s.frames_before as i64,
        hyp_pages_leaked: (hyp_after.vm_pages + hyp_after.live_vms) as i64,
        hyp_host_s2_pages: if s.platform.hyp().is_some() {
            s.hyp_free_before as i64 - hyp_after.pool_free as i64
        } else {
            0
        },
        hypercalls,
    })
}
