//! An L2 guest paging in through a shadow stage-2.
//!
//! The guest hypervisor (L1) is emulated by this module: it keeps the
//! stage-2 tables of its guest (L2) in L1 memory and fills them on demand
//! when the host forwards an L2 fault its tables do not cover (mapping L2
//! page `i` to a scrambled L1 page, so the composition matters). The host
//! builds the shadow stage-2 ([`pkvm_host::nested`]) that the simulated CPU
//! runs L2 on. L2 writes every page, then reads every page back and checks
//! the values (the simulator's guest records its writes). At the end L1
//! unmaps one page and issues a TLBI, which must drop it from the shadow;
//! teardown must free every shadow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pkvm_arch::pte::{S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Hva, Ipa, Level, Pa, PAGE_SIZE};
use pkvm_host::fault::GuestFault;
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::nested::{GuestS2Config, NestedOutcome, ShadowRef};
use pkvm_host::platform::HostPageCache;
use pkvm_host::{GuestExit, VcpuBackend, VcpuContext, VmConfig};
use pkvm_sim::mm::ProcessMm;
use pkvm_sim::{Machine, Phase, SimConfig, Workload};

use crate::backend::SimBackend;
use crate::demand_paging::{Backing, RunFailure, GUEST_BASE};
use crate::platform::{Mode, SimPlatform};
use crate::process::{SimProcess, VmNotifier};
use crate::SimVm;

/// L2's memory starts here (an L2 IPA).
pub const L2_BASE: Ipa = Ipa(0x8000_0000);
/// The guest hypervisor's VMID for its guest.
pub const L2_VMID: u16 = 7;
const TABLE_AREA: u64 = 4 << 20;

/// Configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes of L2 memory.
    pub l2_bytes: u64,
    /// Backing of L1 memory.
    pub backing: Backing,
    /// Migrate L1 pages while L2 runs.
    pub notifier_storm: bool,
    /// Seed.
    pub seed: u64,
}

/// Results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Bytes of L2 memory.
    pub l2_bytes: u64,
    /// L2 run time.
    pub seconds: f64,
    /// L2 pages (written then read) per second.
    pub pages_per_sec: f64,
    /// L2 stage-2 faults the host handled.
    pub shadow_faults: u64,
    /// Faults forwarded to the guest hypervisor (its tables were empty).
    pub forwarded: u64,
    /// Faults retried (an invalidation raced them).
    pub retries: u64,
    /// Shadow unmaps (notifiers, guest TLBIs).
    pub shadow_unmaps: u64,
    /// L2 read back every value it wrote.
    pub readback_ok: bool,
    /// A guest TLBI dropped the page L1 unmapped from the shadow.
    pub guest_tlbi_ok: bool,
    /// An MMU-notifier invalidation of an L1 page (migration) dropped the
    /// L2 page it backs from the shadow.
    pub notifier_unmap_ok: bool,
    /// Shadow MMUs built.
    pub shadows_created: u64,
    /// Shadow MMUs freed (must equal created after teardown).
    pub shadows_freed: u64,
    /// Coherence violations (must be 0).
    pub coherence_violations: usize,
    /// Host frames not returned (must be 0).
    pub frames_leaked: i64,
}

/// The emulated guest hypervisor: its stage-2 tables in L1 memory.
struct GuestHyp {
    mm: Arc<ProcessMm>,
    machine: Arc<Machine>,
    l1_hva: Hva,
    root: Ipa,
    next_table: Ipa,
    geo: S2Geometry,
    l2_pages: u64,
}

impl GuestHyp {
    fn hva(&self, l1: Ipa) -> Hva {
        Hva(self.l1_hva.0 + (l1.0 - GUEST_BASE.0))
    }
    fn read(&self, l1: Ipa) -> Result<u64, RunFailure> {
        let pin = self
            .mm
            .fault_in(self.hva(l1.align_down(PAGE_SIZE)), false)?;
        let pa = Pa(pin.pa().0 + (l1.0 & (PAGE_SIZE - 1)));
        self.machine
            .mem()
            .read_u64(pa)
            .map_err(|e| RunFailure::Config(format!("L1 read: {e}")))
    }
    fn write(&self, l1: Ipa, v: u64) -> Result<(), RunFailure> {
        let pin = self.mm.fault_in(self.hva(l1.align_down(PAGE_SIZE)), true)?;
        let pa = Pa(pin.pa().0 + (l1.0 & (PAGE_SIZE - 1)));
        self.machine
            .mem()
            .write_u64(pa, v)
            .map_err(|e| RunFailure::Config(format!("L1 write: {e}")))
    }

    /// The L1 page backing L2 page `l2`: a permutation of L1's data pages.
    fn backing_of(&self, l2: Ipa) -> Ipa {
        let i = (l2.0 - L2_BASE.0) / PAGE_SIZE;
        Ipa(GUEST_BASE.0 + ((i * 7 + 3) % self.l2_pages) * PAGE_SIZE)
    }

    /// The address of the level-3 entry for `l2`, building tables on the way.
    fn leaf_slot(&mut self, l2: Ipa) -> Result<Ipa, RunFailure> {
        let shift = |l: u8| 12 + 9 * (3 - l as u32);
        let mut table = self.root;
        let mut level = self.geo.start_level.0;
        let mut idx = l2.0 >> shift(level);
        while level < 3 {
            let at = Ipa(table.0 + idx * 8);
            let pte = S2Pte(self.read(at)?);
            table = if pte.is_valid() {
                Ipa(pte.oa().0)
            } else {
                let t = self.next_table;
                self.next_table = Ipa(t.0 + PAGE_SIZE);
                self.write(at, S2Pte::table(Pa(t.0)).0)?;
                t
            };
            level += 1;
            idx = (l2.0 >> shift(level)) & 0x1ff;
        }
        Ok(Ipa(table.0 + idx * 8))
    }

    /// L1 handles a forwarded L2 fault: maps the page read-write.
    fn map(&mut self, l2: Ipa) -> Result<(), RunFailure> {
        let slot = self.leaf_slot(l2)?;
        let oa = Pa(self.backing_of(l2).0);
        self.write(
            slot,
            S2Pte::leaf(oa, Level(3), S2Prot::RW, S2Features::default()).0,
        )
    }

    /// L1 unmaps `l2` from its tables (a guest TLBI must follow).
    fn unmap(&mut self, l2: Ipa) -> Result<(), RunFailure> {
        let slot = self.leaf_slot(l2)?;
        self.write(slot, 0)
    }
}

struct Counters {
    faults: u64,
    forwarded: u64,
    retries: u64,
}

/// Runs L2 on the shadow of `shadow` until its program ends; `Ok(false)`
/// if L2 saw a wrong value.
fn run_l2(
    vm: &SimVm,
    be: &mut SimBackend,
    shadow: &ShadowRef,
    l1: &mut GuestHyp,
    cache: &mut HostPageCache<SimPlatform>,
    c: &mut Counters,
) -> Result<bool, RunFailure> {
    let mut ctx = VcpuContext::default();
    let err = |what: String| RunFailure::Vcpu { index: 0, what };
    loop {
        let s2 = vm
            .nested_stage_two(shadow)
            .map_err(|e| err(e.to_string()))?;
        match be.enter(&mut ctx, &s2) {
            GuestExit::Abort { esr, far, hpfar } => {
                let f = GuestFault::decode(esr, far, hpfar).map_err(|e| err(format!("{e:?}")))?;
                c.faults += 1;
                match vm
                    .nested_fault(shadow, &f, cache)
                    .map_err(|e| err(e.to_string()))?
                {
                    NestedOutcome::Mapped => {}
                    NestedOutcome::Retry => c.retries += 1,
                    NestedOutcome::ForwardToGuest { ipa, .. } => {
                        c.forwarded += 1;
                        l1.map(ipa)?;
                    }
                }
            }
            GuestExit::Interrupt => {}
            GuestExit::ProgramDone => return Ok(true),
            GuestExit::GuestCheckFailed => return Ok(false),
            e => return Err(err(format!("unexpected L2 exit {e:?}"))),
        }
    }
}

/// The host side of a run.
struct World {
    machine: Arc<Machine>,
    platform: Arc<SimPlatform>,
    mm: Arc<ProcessMm>,
    process: SimProcess,
    vm: Arc<SimVm>,
    frames_before: u64,
}

/// Machine, VM and L1 memory (one memslot: L2's data pages, then room for
/// the guest hypervisor's tables), and the emulated guest hypervisor.
fn build(cfg: &Config) -> Result<(World, GuestHyp), RunFailure> {
    if cfg.l2_bytes == 0 || !cfg.l2_bytes.is_multiple_of(2 << 20) || cfg.l2_bytes > 1 << 30 {
        return Err(RunFailure::Config(
            "L2 memory: a multiple of 2M up to 1G".into(),
        ));
    }
    let kind = match cfg.backing {
        Backing::Anonymous => pkvm_sim::mm::VmaKind::Anonymous4K,
        Backing::AnonymousThp => pkvm_sim::mm::VmaKind::AnonymousThp,
        Backing::Hugetlb2M => pkvm_sim::mm::VmaKind::Hugetlb2M,
        Backing::Hugetlb1G => pkvm_sim::mm::VmaKind::Hugetlb1G,
    };
    let l1_bytes = (cfg.l2_bytes + TABLE_AREA).div_ceil(kind.granule()) * kind.granule();
    let machine = Machine::new(SimConfig {
        mem_size: (l1_bytes * 2 + (512 << 20)).div_ceil(1 << 30) << 30,
        hyp_carveout: 64 << 20,
        ncpus: 1,
        ..SimConfig::default()
    })?;
    let platform = SimPlatform::new(machine.clone(), Mode::Standard)?;
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let process = SimProcess::new(mm.clone());
    let frames_before = machine.host_frames().stats().in_use;
    SimPlatform::set_current_cpu(0);
    let vm = SimVm::create(
        platform.clone(),
        Arc::new(process.clone()),
        VmConfig::default(),
        0,
    )?;
    mm.register_notifier(VmNotifier::new(&vm));
    let l1_hva = mm.mmap(l1_bytes, kind)?;
    vm.set_user_memory_region(
        UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GUEST_BASE.0,
            memory_size: l1_bytes,
            userspace_addr: l1_hva.0,
        },
        0,
    )?;
    let geo =
        S2Geometry::new(Granule::Size4K, 32).map_err(|e| RunFailure::Config(format!("{e:?}")))?;
    let root = Ipa(GUEST_BASE.0 + cfg.l2_bytes);
    let l1 = GuestHyp {
        mm: mm.clone(),
        machine: machine.clone(),
        l1_hva,
        root,
        next_table: Ipa(root.0 + geo.root_pages as u64 * PAGE_SIZE),
        geo,
        l2_pages: cfg.l2_bytes / PAGE_SIZE,
    };
    let w = World {
        machine,
        platform,
        mm,
        process,
        vm,
        frames_before,
    };
    Ok((w, l1))
}

/// Migrates random L1 data pages until `stop`.
fn storm(mm: &ProcessMm, l1: Hva, pages: u64, seed: u64, stop: &AtomicBool) {
    let mut x = seed | 1;
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let _ = mm.migrate(Hva(l1.0 + (x % pages) * PAGE_SIZE));
        std::thread::yield_now();
    }
}

/// After L2 ran: (1) L1 unmaps the first L2 page and issues a TLBI, which
/// must drop it from the shadow; (2) the host migrates the L1 page behind
/// the second L2 page, and the notifier must drop that from the shadow
/// (it would map the freed frame). Returns both outcomes.
fn check_invalidations(
    vm: &SimVm,
    mm: &ProcessMm,
    shadow: &ShadowRef,
    l1: &mut GuestHyp,
) -> Result<(bool, bool), RunFailure> {
    let mapped_before = vm.nested_translate(shadow, L2_BASE).is_some();
    l1.unmap(L2_BASE)?;
    vm.nested_guest_tlbi(L2_VMID, Some((L2_BASE, Ipa(L2_BASE.0 + PAGE_SIZE))));
    let tlbi_ok = mapped_before && vm.nested_translate(shadow, L2_BASE).is_none();
    let l2 = Ipa(L2_BASE.0 + PAGE_SIZE);
    let mapped_before = vm.nested_translate(shadow, l2).is_some();
    let moved = mm.migrate(l1.hva(l1.backing_of(l2))).is_ok();
    let notifier_ok = mapped_before && moved && vm.nested_translate(shadow, l2).is_none();
    Ok((tlbi_ok, notifier_ok))
}

/// Runs the workload.
///
/// # Errors
/// See [`RunFailure`].
pub fn run(cfg: &Config) -> Result<Report, RunFailure> {
    let (w, mut l1) = build(cfg)?;
    let vm = &w.vm;
    let gcfg = GuestS2Config {
        vttbr: ((L2_VMID as u64) << 48) | l1.root.0,
        vtcr: 64 - 32,
    };
    let shadow = vm
        .nested_get_mmu(gcfg)
        .map_err(|e| RunFailure::Config(e.to_string()))?;
    let mut be = SimBackend::new(w.machine.cpu(0)?, w.platform.clone(), 1 << 14);
    be.cpu_mut().set_program(Box::new(Workload::new(
        cfg.seed,
        [
            Phase::touch_pages(L2_BASE, cfg.l2_bytes).verify(true),
            Phase::touch_pages(L2_BASE, cfg.l2_bytes)
                .writes(0)
                .verify(true),
        ],
    )));
    let mut cache = HostPageCache::new(w.platform.clone());
    let mut c = Counters {
        faults: 0,
        forwarded: 0,
        retries: 0,
    };
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let readback = std::thread::scope(|s| {
        if cfg.notifier_storm {
            let (mm, stop, hva) = (&w.mm, &stop, l1.l1_hva);
            s.spawn(move || storm(mm, hva, cfg.l2_bytes / PAGE_SIZE, cfg.seed, stop));
        }
        let r = run_l2(vm, &mut be, &shadow, &mut l1, &mut cache, &mut c);
        stop.store(true, Ordering::Release);
        r
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    // The storm may have unmapped the shadow: L2 reads its first two pages
    // again so the checks start from mapped pages.
    be.cpu_mut().set_program(Box::new(Workload::new(
        cfg.seed,
        [Phase::touch_pages(L2_BASE, 2 * PAGE_SIZE).writes(0)],
    )));
    run_l2(vm, &mut be, &shadow, &mut l1, &mut cache, &mut c)?;
    let (guest_tlbi_ok, notifier_unmap_ok) = check_invalidations(vm, &w.mm, &shadow, &mut l1)?;
    vm.nested_put_mmu(shadow);
    drop((cache, be, l1));
    let shadow_unmaps = vm.nested_stats().unmaps.load(Ordering::Relaxed);
    vm.teardown(0);
    let created = vm.nested_stats().created.load(Ordering::Relaxed);
    let freed = vm.nested_stats().freed.load(Ordering::Relaxed);
    let World {
        machine,
        mm,
        process,
        vm,
        frames_before,
        ..
    } = w;
    drop(vm);
    mm.exit();
    drop((process, mm));
    Ok(Report {
        l2_bytes: cfg.l2_bytes,
        seconds,
        pages_per_sec: (2 * cfg.l2_bytes / PAGE_SIZE) as f64 / seconds,
        shadow_faults: c.faults,
        forwarded: c.forwarded,
        retries: c.retries,
        shadow_unmaps,
        readback_ok: readback,
        guest_tlbi_ok,
        notifier_unmap_ok,
        shadows_created: created,
        shadows_freed: freed,
        coherence_violations: machine.check().len(),
        frames_leaked: machine.host_frames().stats().in_use as i64 - frames_before as i64,
    })
}
