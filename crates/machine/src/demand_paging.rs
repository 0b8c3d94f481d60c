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
/// Serialised with the `pkvm` command's spellings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Backing {
    /// Anonymous memory, 4K pages.
    #[serde(rename = "anonymous")]
    Anonymous,
    /// Anonymous memory with transparent huge pages (2M when aligned).
    #[serde(rename = "anonymous_thp")]
    AnonymousThp,
    /// hugetlbfs, 2M pages.
    #[serde(rename = "hugetlb_2m")]
    Hugetlb2M,
    /// hugetlbfs, 1G pages.
    #[serde(rename = "hugetlb_1g")]
    Hugetlb1G,
}

/// The `pkvm` command's spelling of a checking level (`--check`).
pub fn coherence_name(c: Coherence) -> &'static str {
    match c {
        Coherence::Off => "off",
        Coherence::Entry => "entry",
        Coherence::EveryUse => "every-use",
    }
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
///
/// A variant that wraps another error returns it as its `source()` and does
/// not repeat it in its own message (so a report of the whole chain, such
/// as anyhow's `{:#}`, names each cause once).
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    /// Bad configuration (caller error).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The simulated machine could not be built.
    #[error("building the simulated machine")]
    Machine(#[from] pkvm_sim::SimError),
    /// The platform could not start.
    #[error("starting the platform")]
    Platform(#[from] crate::platform::PlatformError),
    /// Host process memory.
    #[error("host process memory")]
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

/// Checks the configuration for a VM of `guest_bytes`; returns the size of
/// the simulated RAM it needs (guest memory, room for alignment of huge
/// pages, tables and the hypervisor).
fn check_setup(cfg: &Config, guest_bytes: u64) -> Result<u64, RunFailure> {
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
    if guest_bytes > IPA_LIMIT - GUEST_BASE.0 {
        return Err(RunFailure::Config(format!(
            "guest memory {guest_bytes:#x} does not fit the 40-bit IPA space above {:#x}",
            GUEST_BASE.0
        )));
    }
    machine_bytes(guest_bytes, g)
        .ok_or_else(|| RunFailure::Config(format!("guest memory {guest_bytes:#x} is too large")))
}

/// Builds a machine, platform, process and VM with one memslot of
/// `guest_bytes` at [`GUEST_BASE`].
///
/// # Errors
/// See [`RunFailure`].
pub fn setup(cfg: &Config, guest_bytes: u64) -> Result<Setup, RunFailure> {
    let mem_size = check_setup(cfg, guest_bytes)?;
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

/// Largest IPA (exclusive) of the VM's 40-bit address space.
const IPA_LIMIT: u64 = 1 << 40;

/// Bytes of guest memory a run maps: `bytes_per_vcpu` once with
/// `overlap`, else once per vCPU.
///
/// # Errors
/// [`RunFailure::Config`] if that overflows or does not fit the VM's IPA
/// space above [`GUEST_BASE`].
pub fn guest_bytes(cfg: &Config) -> Result<u64, RunFailure> {
    let n = if cfg.overlap { 1 } else { cfg.vcpus as u64 };
    let total = cfg.bytes_per_vcpu.checked_mul(n).ok_or_else(|| {
        RunFailure::Config(format!(
            "{} bytes per vCPU x {} vCPUs overflows 64 bits",
            cfg.bytes_per_vcpu, cfg.vcpus
        ))
    })?;
    let room = IPA_LIMIT - GUEST_BASE.0;
    if total > room {
        return Err(RunFailure::Config(format!(
            "guest memory {total:#x} does not fit the 40-bit IPA space above {:#x} (at most {room:#x}): use a smaller --bytes or fewer --vcpus",
            GUEST_BASE.0
        )));
    }
    Ok(total)
}

/// Bytes of simulated RAM a machine for `guest_bytes` of guest memory
/// backed with pages of `granule` bytes needs: the guest memory, room to
/// align huge pages, 512 MiB for tables and the hypervisor, rounded up to
/// a GiB. `None` on overflow.
fn machine_bytes(guest_bytes: u64, granule: u64) -> Option<u64> {
    const GIB: u64 = 1 << 30;
    let raw = guest_bytes.checked_add(granule)?.checked_add(512 << 20)?;
    raw.div_ceil(GIB).checked_mul(GIB)
}

/// Host memory a run of `cfg` needs, estimated: the simulated RAM (guest
/// memory plus overhead, see [`setup`]) plus the simulator's bookkeeping
/// (about 1/64 of it for page metadata, TLBs and the checker).
///
/// # Errors
/// As [`guest_bytes`].
pub fn host_memory_needed(cfg: &Config) -> Result<u64, RunFailure> {
    let guest = guest_bytes(cfg)?;
    let ram = machine_bytes(guest, cfg.backing.granule())
        .ok_or_else(|| RunFailure::Config(format!("guest memory {guest:#x} is too large")))?;
    Ok(ram.saturating_add(ram / 64))
}

/// Runs the demand-paging workload and tears everything down.
///
/// # Errors
/// See [`RunFailure`].
pub fn run(cfg: &Config) -> Result<Report, RunFailure> {
    let s = setup(cfg, guest_bytes(cfg)?)?;
    power_on(&s, cfg)?;
    let start = Instant::now();
    let results = run_vcpus(&s, cfg);
    let total = start.elapsed();
    let mut per_vcpu = Vec::new();
    for r in results.vcpus {
        per_vcpu.push(r?);
    }
    if results.psci_failed {
        return Err(RunFailure::Vcpu {
            index: 0,
            what: "a PSCI CPU_ON did not return SUCCESS".into(),
        });
    }
    per_vcpu.sort_by_key(|v| v.index);
    finish(s, cfg, per_vcpu, total)
}

/// Powers the VM on: vCPU 0 alone (`psci_boot`: it starts the others
/// with CPU_ON), or every vCPU at the workload's entry.
fn power_on(s: &Setup, cfg: &Config) -> Result<(), RunFailure> {
    if cfg.psci_boot {
        s.vm.power_on(BootParams {
            entry: 0x8_0000,
            x0: 0,
            big_endian: false,
        })?;
        return Ok(());
    }
    for i in 0..cfg.vcpus {
        s.vm.vcpu_power(i).lock().power_on(ResetState {
            pc: 0x8_0000,
            context_id: 0,
            big_endian: false,
            reset: true,
        });
    }
    Ok(())
}

/// What the vCPU threads of a run produced.
struct VcpuResults {
    vcpus: Vec<Result<VcpuReport, RunFailure>>,
    psci_failed: bool,
}

/// Runs every vCPU on its own thread, all released at once by a barrier;
/// returns when all are done.
fn run_vcpus(s: &Setup, cfg: &Config) -> VcpuResults {
    let n = cfg.vcpus;
    let barrier = Barrier::new(n + 1);
    let psci_failed = Arc::new(AtomicBool::new(false));
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for i in 0..n {
            let job = VcpuJob {
                index: i,
                s,
                cfg,
                barrier: &barrier,
                psci_failed: &psci_failed,
            };
            let results = &results;
            scope.spawn(move || {
                let r = job.run();
                results.lock().unwrap().push(r);
            });
        }
        barrier.wait();
    });
    VcpuResults {
        vcpus: results.into_inner().unwrap(),
        psci_failed: psci_failed.load(Ordering::Relaxed),
    }
}

/// One vCPU thread of a run: what it borrows from the run.
struct VcpuJob<'a> {
    index: usize,
    s: &'a Setup,
    cfg: &'a Config,
    barrier: &'a Barrier,
    psci_failed: &'a Arc<AtomicBool>,
}

impl VcpuJob<'_> {
    /// The guest program: touch this vCPU's pages (after booting the
    /// others with CPU_ON, for vCPU 0 with `psci_boot`).
    fn program(&self) -> Box<dyn GuestProgram> {
        let (cfg, i) = (self.cfg, self.index);
        let base = if cfg.overlap {
            GUEST_BASE
        } else {
            // In range: guest_bytes() checked bytes x vCPUs.
            GUEST_BASE + i as u64 * cfg.bytes_per_vcpu
        };
        let touch = Workload::new(
            cfg.seed.wrapping_add(i as u64),
            [Phase::touch_pages(base, cfg.bytes_per_vcpu).verify(cfg.verify && !cfg.overlap)],
        );
        if cfg.psci_boot && i == 0 {
            Box::new(PsciBoot {
                targets: (1..cfg.vcpus).collect(),
                next: 0,
                issued: false,
                failed: self.psci_failed.clone(),
                then: touch,
            })
        } else {
            Box::new(touch)
        }
    }

    /// Sets the vCPU up, waits for the start, runs it to the end of its
    /// program and reports.
    fn run(&self) -> Result<VcpuReport, RunFailure> {
        let (s, i) = (self.s, self.index);
        SimPlatform::set_current_cpu(i);
        let mut vcpu = s.vm.vcpu(i)?;
        let cpu = s.machine.cpu(i)?;
        let mut be = SimBackend::new(cpu, s.platform.clone(), 1 << 16);
        be.cpu_mut().set_program(self.program());
        let id = s.vm.vmid().or(s.vm.handle()).unwrap_or(0);
        let token = s.platform.register_vcpu_thread(id, i);
        be.set_kick_token(token.clone());
        if let Some(p) = &self.cfg.progress {
            be.set_progress(p.clone());
        }
        self.barrier.wait();
        let t0 = Instant::now();
        let res = vcpu_loop(i, &mut vcpu, &mut be, &token);
        let seconds = t0.elapsed().as_secs_f64();
        s.platform.unregister_vcpu_thread(id, i);
        let exits = res?;
        let pages = self.cfg.bytes_per_vcpu / 4096;
        Ok(VcpuReport {
            index: i,
            pages,
            seconds,
            pages_per_sec: pages as f64 / seconds,
            exits,
        })
    }
}

/// The VMM's run loop of vCPU `i` until its program ends: counts exits,
/// sleeps until kicked, answers MMIO reads with 0.
fn vcpu_loop(
    i: usize,
    vcpu: &mut crate::SimVcpu,
    be: &mut SimBackend,
    token: &AtomicBool,
) -> Result<ExitCounts, RunFailure> {
    let mut exits = ExitCounts::default();
    loop {
        match vcpu.run(be) {
            VcpuExit::Halted => return Ok(exits),
            VcpuExit::Interrupted => exits.interrupted += 1,
            VcpuExit::Wfi => exits.wfi += 1,
            VcpuExit::Sleep => {
                exits.sleep += 1;
                while !token.swap(false, Ordering::AcqRel) {
                    std::thread::park_timeout(Duration::from_millis(5));
                }
            }
            // Not a call this VMM knows: the guest sees NOT_SUPPORTED
            // (already in x0).
            VcpuExit::Hypercall { .. } => exits.hypercalls += 1,
            VcpuExit::Mmio { write, .. } => {
                exits.mmio += 1;
                if !write {
                    vcpu.complete_mmio(0);
                }
            }
            VcpuExit::SystemEvent(e) => {
                return Err(RunFailure::Vcpu {
                    index: i,
                    what: format!("unexpected system event {e:?}"),
                })
            }
            VcpuExit::InternalError(e) => {
                let detail = be
                    .guest_error
                    .map(|g| format!(" ({g})"))
                    .unwrap_or_default();
                return Err(RunFailure::Vcpu {
                    index: i,
                    what: format!("{e:?}{detail}"),
                });
            }
        }
    }
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
        coherence: coherence_name(cfg.coherence).into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vcpus: usize, bytes_per_vcpu: u64) -> Config {
        Config {
            vcpus,
            bytes_per_vcpu,
            ..Config::default()
        }
    }

    /// `pkvm sim demand-paging -v 2 -b 9007199254740992K`: 2^63 bytes x 2
    /// wrapped to 0 ("guest memory 0x0") in release builds.
    #[test]
    fn guest_bytes_times_vcpus_overflow_is_a_config_error_not_a_wrap() {
        let e = guest_bytes(&cfg(2, 1 << 63)).unwrap_err();
        assert!(matches!(e, RunFailure::Config(_)), "{e}");
        assert!(e.to_string().contains("overflows"), "{e}");
        let e = run(&cfg(2, 1 << 63)).unwrap_err();
        assert!(matches!(e, RunFailure::Config(_)), "{e}");
    }

    #[test]
    fn guest_memory_beyond_the_ipa_space_is_refused_before_building_anything() {
        // 1 TiB above 0x4000_0000 does not fit 40 bits; one page less does.
        let room = IPA_LIMIT - GUEST_BASE.0;
        assert_eq!(guest_bytes(&cfg(1, room)).unwrap(), room);
        let e = guest_bytes(&cfg(1, room + 4096)).unwrap_err();
        assert!(e.to_string().contains("IPA space"), "{e}");
        assert!(matches!(
            setup(&cfg(1, room + 4096), room + 4096),
            Err(RunFailure::Config(_))
        ));
        // Overlap: the per-vCPU size counts once.
        let mut c = cfg(16, room);
        c.overlap = true;
        assert_eq!(guest_bytes(&c).unwrap(), room);
    }

    #[test]
    fn machine_size_estimate_checks_for_overflow() {
        assert_eq!(machine_bytes(1 << 30, 4096), Some(2 << 30));
        assert_eq!(machine_bytes(u64::MAX - 4096, 4096), None);
        assert!(host_memory_needed(&cfg(2, 1 << 30)).unwrap() >= 2 << 30);
        assert!(host_memory_needed(&cfg(2, 1 << 63)).is_err());
    }

    /// Every error that has a source must not repeat the source's text in
    /// its own message (anyhow's `{:#}` prints the whole chain).
    fn assert_chain_does_not_repeat(e: &dyn std::error::Error) {
        let mut cur: Option<&dyn std::error::Error> = Some(e);
        while let Some(err) = cur {
            if let Some(src) = err.source() {
                let (outer, inner) = (err.to_string(), src.to_string());
                assert!(
                    !outer.contains(&inner),
                    "`{outer}` repeats its source `{inner}`"
                );
            }
            cur = err.source();
        }
    }

    #[test]
    fn run_failure_messages_do_not_repeat_their_sources() {
        let sim = pkvm_sim::SimError::Config("memory lies above the PA size");
        assert_chain_does_not_repeat(&RunFailure::Machine(sim));
        let io = std::io::Error::other("no memory");
        assert_chain_does_not_repeat(&RunFailure::Machine(pkvm_sim::SimError::Map(io)));
        // The real path: a machine whose memory lies above the PA size.
        let e = Machine::new(SimConfig {
            mem_base: pkvm_arch::Pa(1 << 39),
            mem_size: 1 << 40,
            ..SimConfig::default()
        })
        .map_err(RunFailure::from)
        .unwrap_err();
        assert_chain_does_not_repeat(&e);
        let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert_eq!(text.matches("PA size").count(), 1, "{text}");
    }
}
