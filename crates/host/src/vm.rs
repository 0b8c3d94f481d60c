//! VMs: creation, memslots, MMU notifiers, PSCI plumbing and teardown.
//!
//! # The pKVM handle (seed 001)
//! In protected mode the VM's hypervisor handle is reserved when the VM is
//! created, so every early path (MMU notifiers, memslot changes) has a
//! valid handle. The reservation is recorded in the VM as
//! `Option<HypVm>`, decided once from the platform's mode; teardown
//! releases exactly what that `Option` holds (unreserve if the hyp VM was
//! never initialised, start/reclaim/finalize if it was). An acquire without
//! its release, or a release under a different condition, cannot be
//! written.
//!
//! # Teardown (seed 003)
//! [`Vm::teardown`] can be reached from VM destroy and from the mm-exit
//! notifier at the same time. Each piece of state it frees sits in an
//! `Option` under a lock and is taken exactly once; the second caller finds
//! nothing to free.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pkvm_arch::pte::S2Prot;
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Hva, Ipa, Pa, PAGE_SIZE};
use pkvm_pgtable::{PageTable, Stage2};
use pkvm_sync::{LockClass, RwSpinLock, SpinLock};

use crate::hypcall::{self, HypCallError};
use crate::memslot::{
    MemslotError, Memslots, SlotChange, UserMemoryRegion, MEM_LOG_DIRTY_PAGES, MEM_READONLY,
};
use crate::mmu::{self, Mmu, S2State};
use crate::platform::{HostPlatform, ProcessMemory, StageTwo};
use crate::psci::{PsciConfig, PsciVm, SystemEventLatch, VcpuPower};
use crate::vmid::Vmid;

/// How a VM is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// IPA size in bits (32..=48).
    pub ipa_bits: u32,
    /// A protected VM (needs protected mode): its memory is donated to it
    /// and unreachable by the host.
    pub protected: bool,
    /// Number of vCPUs.
    pub nr_vcpus: usize,
    /// PSCI emulation settings.
    pub psci: PsciConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            ipa_bits: 40,
            protected: false,
            nr_vcpus: 1,
            psci: PsciConfig::default(),
        }
    }
}

/// Largest vCPU count per VM.
pub const MAX_VCPUS: usize = 64;

/// Why a VM operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmError {
    /// IPA size outside 32..=48.
    IpaBits(u32),
    /// vCPU count outside 1..=MAX_VCPUS.
    VcpuCount(usize),
    /// A protected VM needs the hypervisor in protected mode.
    NotProtectedMode,
    /// All VMIDs are in use.
    NoVmid,
    /// Out of memory.
    NoMemory,
    /// A memslot request was invalid.
    Memslot(MemslotError),
    /// The hypervisor refused a call.
    Hyp(HypCallError),
    /// No such vCPU.
    NoSuchVcpu(usize),
    /// The vCPU is already claimed by a thread.
    VcpuBusy(usize),
    /// The VM was torn down.
    Dead,
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::IpaBits(b) => write!(f, "IPA size {b} bits is outside 32..=48"),
            VmError::VcpuCount(n) => write!(f, "{n} vCPUs is outside 1..={MAX_VCPUS}"),
            VmError::NotProtectedMode => {
                write!(f, "protected VMs need the hypervisor in protected mode")
            }
            VmError::NoVmid => write!(f, "no free VMID"),
            VmError::NoMemory => write!(f, "out of memory"),
            VmError::Memslot(e) => write!(f, "memslot: {e}"),
            VmError::Hyp(e) => write!(f, "{e}"),
            VmError::NoSuchVcpu(i) => write!(f, "no vCPU {i}"),
            VmError::VcpuBusy(i) => write!(f, "vCPU {i} is already in use"),
            VmError::Dead => write!(f, "the VM was torn down"),
        }
    }
}

impl From<MemslotError> for VmError {
    fn from(e: MemslotError) -> Self {
        VmError::Memslot(e)
    }
}

impl From<HypCallError> for VmError {
    fn from(e: HypCallError) -> Self {
        VmError::Hyp(e)
    }
}

/// A counter of [`VmStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Stat {
    /// Stage-2 translation faults handled.
    TranslationFaults,
    /// Permission faults handled.
    PermissionFaults,
    /// Access-flag faults handled.
    AccessFlagFaults,
    /// Faults that returned to the guest to retry (race, invalidation).
    Retries,
    /// Bytes mapped by faults.
    BytesMapped,
    /// 4K mappings made.
    Maps4K,
    /// 2M mappings made.
    Maps2M,
    /// 1G mappings made.
    Maps1G,
    /// MMIO exits.
    MmioExits,
    /// Aborts injected into the guest.
    InjectedAborts,
    /// Guest hypercalls (HVC/SMC) handled.
    GuestCalls,
    /// Notifier invalidations.
    Invalidations,
}

/// Number of [`Stat`] counters.
const NR_STATS: usize = Stat::Invalidations as usize + 1;

/// One vCPU's (or the VM-wide) counters, on cache lines of their own.
#[repr(align(128))]
#[derive(Debug, Default)]
struct StatShard([AtomicU64; NR_STATS]);

/// Per-VM statistics, kept per vCPU like KVM's `vcpu->stat`: a fault
/// counts on its vCPU's cache lines, never on a line every vCPU writes;
/// [`VmStats::snapshot`] sums them.
#[derive(Debug)]
pub struct VmStats {
    /// One shard per vCPU, then one for VM-wide events.
    shards: alloc::boxed::Box<[StatShard]>,
}

impl VmStats {
    /// Statistics for a VM of `vcpus` vCPUs.
    pub(crate) fn new(vcpus: usize) -> VmStats {
        VmStats {
            shards: (0..=vcpus).map(|_| StatShard::default()).collect(),
        }
    }

    /// Adds `n` to `stat` on `vcpu`'s shard (`None`: a VM-wide event).
    pub(crate) fn add(&self, vcpu: Option<usize>, stat: Stat, n: u64) {
        let last = self.shards.len() - 1;
        let shard = vcpu.map_or(last, |v| v.min(last));
        self.shards[shard].0[stat as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of `stat` over every shard.
    pub fn get(&self, stat: Stat) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[stat as usize].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// A snapshot of [`VmStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStatsSnapshot {
    /// Translation faults.
    pub translation_faults: u64,
    /// Permission faults.
    pub permission_faults: u64,
    /// Access-flag faults.
    pub access_flag_faults: u64,
    /// Retries.
    pub retries: u64,
    /// Bytes mapped.
    pub bytes_mapped: u64,
    /// Mappings of 4K, 2M, 1G.
    pub maps_by_size: [u64; 3],
    /// MMIO exits.
    pub mmio_exits: u64,
    /// Injected aborts.
    pub injected_aborts: u64,
    /// Guest hypercalls.
    pub guest_calls: u64,
    /// Invalidations.
    pub invalidations: u64,
}

impl VmStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> VmStatsSnapshot {
        let r = |st| self.get(st);
        VmStatsSnapshot {
            translation_faults: r(Stat::TranslationFaults),
            permission_faults: r(Stat::PermissionFaults),
            access_flag_faults: r(Stat::AccessFlagFaults),
            retries: r(Stat::Retries),
            bytes_mapped: r(Stat::BytesMapped),
            maps_by_size: [r(Stat::Maps4K), r(Stat::Maps2M), r(Stat::Maps1G)],
            mmio_exits: r(Stat::MmioExits),
            injected_aborts: r(Stat::InjectedAborts),
            guest_calls: r(Stat::GuestCalls),
            invalidations: r(Stat::Invalidations),
        }
    }
}

/// The hypervisor side of a VM in protected mode.
pub(crate) struct HypVm {
    pub handle: u16,
    /// `Some` until teardown took it; `initialized` once INIT_VM succeeded.
    pub state: SpinLock<Option<HypVmState>>,
}

pub(crate) struct HypVmState {
    pub initialized: bool,
    /// vCPUs initialised in the hypervisor (in index order); a first run
    /// that failed part-way resumes from here.
    pub vcpus_ready: usize,
    /// Pages donated to the hypervisor (VM, vCPU, root, memcache), freed
    /// back after FINALIZE_TEARDOWN returns them.
    pub donated: Vec<(Pa, u32)>,
}

/// Per-vCPU state shared between threads.
pub(crate) struct VcpuShared {
    pub power: SpinLock<VcpuPower>,
    pub claimed: AtomicBool,
}

/// A virtual machine.
pub struct Vm<P: HostPlatform, M: ProcessMemory> {
    pub(crate) platform: Arc<P>,
    pub(crate) mm: Arc<M>,
    pub(crate) cfg: VmConfig,
    pub(crate) geo: S2Geometry,
    /// Host VMID (standard mode).
    pub(crate) vmid: Option<Vmid>,
    pub(crate) slots: RwSpinLock<Memslots>,
    /// Bumped (under the memslots write lock) by every memslot change, so
    /// a vCPU can keep its own copy of the memslots and take the lock only
    /// when they changed (the role SRCU plays for KVM's memslots).
    pub(crate) slots_gen: AtomicU64,
    pub(crate) mmu: Mmu<M::Pin>,
    pub(crate) vcpus: Vec<VcpuShared>,
    pub(crate) hyp: Option<HypVm>,
    pub(crate) stats: VmStats,
    /// Dirty logging: capabilities and per-slot bitmaps.
    pub(crate) dirty: crate::dirty::DirtyLog,
    /// Shadow stage-2 statistics.
    pub(crate) nested_stats: crate::nested::NestedStats,
    /// Where the boot vCPU starts.
    pub(crate) boot: SpinLock<crate::reset::BootParams>,
    /// The pending system event (see [`crate::psci`]).
    pub(crate) system_event: SpinLock<SystemEventLatch>,
}

impl<P: HostPlatform, M: ProcessMemory> fmt::Debug for Vm<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("cfg", &self.cfg)
            .field("vmid", &self.vmid)
            .finish_non_exhaustive()
    }
}

impl<P: HostPlatform, M: ProcessMemory> Vm<P, M> {
    /// Creates a VM. In protected mode its hypervisor handle is reserved now
    /// (so early paths always have one); in standard mode the host allocates
    /// its stage-2 root.
    ///
    /// # Errors
    /// Invalid configuration, no VMID / memory, or the hypervisor's refusal.
    pub fn create(
        platform: Arc<P>,
        mm: Arc<M>,
        cfg: VmConfig,
        cpu: usize,
    ) -> Result<Arc<Self>, VmError> {
        let geo = S2Geometry::new(Granule::Size4K, cfg.ipa_bits)
            .map_err(|_| VmError::IpaBits(cfg.ipa_bits))?;
        if cfg.nr_vcpus == 0 || cfg.nr_vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(cfg.nr_vcpus));
        }
        let protected_mode = platform.protected_mode();
        if cfg.protected && !protected_mode {
            return Err(VmError::NotProtectedMode);
        }
        let (vmid, hyp, state) = if protected_mode {
            let handle = hypcall::reserve_vm(&*platform, cpu)?;
            let hyp = HypVm {
                handle,
                state: SpinLock::new(
                    Some(HypVmState {
                        initialized: false,
                        vcpus_ready: 0,
                        donated: Vec::new(),
                    }),
                    LockClass::HostVm,
                ),
            };
            (
                None,
                Some(hyp),
                S2State::Protected(mmu::ProtectedMaps::new()),
            )
        } else {
            let vmid = Vmid::alloc().ok_or(VmError::NoVmid)?;
            let order = mmu::root_order(&geo);
            let root = platform.alloc_pages(order).ok_or(VmError::NoMemory)?;
            let pt = PageTable::<Stage2>::new(root, geo, platform.s2_features());
            (Some(vmid), None, S2State::Standard(mmu::HostS2::new(pt)))
        };
        let vcpus = (0..cfg.nr_vcpus)
            .map(|_| VcpuShared {
                power: VcpuPower::new_lock(),
                claimed: AtomicBool::new(false),
            })
            .collect();
        Ok(Arc::new(Vm {
            platform,
            mm,
            cfg,
            geo,
            vmid,
            slots: RwSpinLock::new(Memslots::new(), LockClass::HostSlots),
            slots_gen: AtomicU64::new(0),
            mmu: Mmu::new(state),
            vcpus,
            hyp,
            stats: VmStats::new(cfg.nr_vcpus),
            dirty: crate::dirty::DirtyLog::new(),
            nested_stats: crate::nested::NestedStats::default(),
            boot: SpinLock::new(crate::reset::BootParams::default(), LockClass::HostVm),
            system_event: SystemEventLatch::new_lock(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The stage-2 geometry.
    pub fn geometry(&self) -> S2Geometry {
        self.geo
    }

    /// The pKVM handle (protected mode).
    pub fn handle(&self) -> Option<u16> {
        self.hyp.as_ref().map(|h| h.handle)
    }

    /// The host VMID (standard mode).
    pub fn vmid(&self) -> Option<u16> {
        self.vmid.as_ref().map(Vmid::get)
    }

    /// Statistics.
    pub fn stats(&self) -> &VmStats {
        &self.stats
    }

    /// The platform.
    pub fn platform(&self) -> &Arc<P> {
        &self.platform
    }

    /// The process memory.
    pub fn mm(&self) -> &Arc<M> {
        &self.mm
    }

    /// A copy of the memslots.
    pub fn memslots(&self) -> Memslots {
        self.slots.read().clone()
    }

    /// Sets where vCPU 0 starts, and powers the VM on (vCPU 0 running,
    /// the others off until a guest `CPU_ON`).
    ///
    /// # Errors
    /// None in practice (the VM has at least one vCPU).
    pub fn power_on(&self, boot: crate::reset::BootParams) -> Result<(), VmError> {
        *self.boot.lock() = boot;
        crate::reset::power_on_vm(self, &boot).map_err(|_| VmError::VcpuCount(0))
    }

    /// `KVM_SET_USER_MEMORY_REGION`: creates, moves, changes the flags of,
    /// or deletes a memslot. A deleted or moved slot's old range is
    /// unmapped from stage-2 before this returns.
    ///
    /// # Errors
    /// [`VmError::Memslot`] naming the problem; nothing changed.
    pub fn set_user_memory_region(
        &self,
        r: UserMemoryRegion,
        cpu: usize,
    ) -> Result<SlotChange, VmError> {
        // A protected VM's pages are donated (mapped RWX by the hypervisor,
        // out of the host's reach): READONLY would not hold and dirty
        // logging could not write-protect.
        if self.cfg.protected
            && r.memory_size != 0
            && r.flags & (MEM_READONLY | MEM_LOG_DIRTY_PAGES) != 0
        {
            return Err(MemslotError::ProtectedVmFlags(r.flags).into());
        }
        let change = {
            // A protected VM that has run owns its donated pages: the host
            // cannot take them back, so its memslots can no longer move or
            // go away (KVM refuses this too). The hyp state lock is held
            // across the update so the VM cannot start in between.
            let hyp_state = self
                .hyp
                .as_ref()
                .filter(|_| self.cfg.protected)
                .map(|h| h.state.lock());
            let started = hyp_state
                .as_ref()
                .is_some_and(|s| s.as_ref().is_none_or(|s| s.initialized));
            let mut slots = self.slots.write();
            let change = slots.check(&r, self.cfg.ipa_bits)?;
            if started {
                if let SlotChange::Delete(old) | SlotChange::Move { old, .. } = change {
                    return Err(MemslotError::ProtectedVmStarted(old.id).into());
                }
            }
            // A slot that starts logging has its bitmap before any fault
            // can see its new flags.
            self.dirty.prepare(&change);
            slots.apply(change);
            self.slots_gen.fetch_add(1, Ordering::Release);
            change
        };
        if let SlotChange::Delete(old) | SlotChange::Move { old, .. } = change {
            self.invalidate_ipa(old.start(), old.end(), cpu);
        }
        self.dirty_log_commit(&change, cpu);
        Ok(change)
    }

    /// Unmaps `[start, end)` from stage-2 as an invalidation (sequence
    /// bumped, so a fault that raced it retries).
    fn invalidate_ipa(&self, start: Ipa, end: Ipa, cpu: usize) {
        self.mmu.invalidate_begin(start, end);
        self.unmap_ipa(start, end, cpu);
        self.mmu.invalidate_end();
    }

    fn unmap_ipa(&self, start: Ipa, end: Ipa, cpu: usize) {
        let mut state = self.mmu.state.write();
        match state.as_mut() {
            Some(S2State::Standard(pt)) => {
                mmu::unmap_standard(&self.platform, self.vmid().unwrap_or(0), pt, start, end);
                self.nested_unmap_all(pt);
            }
            // A protected VM's donated pages cannot be taken back by the
            // host: the host's pins keep them, nothing to unmap.
            Some(S2State::Protected(maps)) if !self.cfg.protected => {
                if let Some(h) = &self.hyp {
                    let r = mmu::unmap_protected(&*self.platform, cpu, h.handle, maps, start, end);
                    debug_assert!(r.is_ok(), "unshare refused: {r:?}");
                }
            }
            Some(S2State::Protected(_)) | None => {}
        }
    }

    /// Write-protects `[start, end)` (dirty logging enabled) and flushes.
    pub(crate) fn wrprotect_range(&self, start: Ipa, end: Ipa, cpu: usize) {
        let mut state = self.mmu.state.write();
        match state.as_mut() {
            Some(S2State::Standard(pt)) => {
                let env = self.platform.s2_env(self.vmid().unwrap_or(0));
                let r = pt.wrprotect(&env, start, end.0 - start.0);
                debug_assert!(r.is_ok(), "wrprotect of a memslot failed: {r:?}");
                pkvm_pgtable::TlbOps::tlbi_range(&env, start.0, end.0);
                drop(env);
                self.nested_unmap_all(pt);
            }
            Some(S2State::Protected(_)) => self.hyp_wrprotect(start, end, cpu),
            None => {}
        }
    }

    /// Write-protects `[start, end)` of a hypervisor-managed stage-2 (the
    /// hypervisor flushes). Called under the MMU write lock.
    pub(crate) fn hyp_wrprotect(&self, start: Ipa, end: Ipa, cpu: usize) {
        if let Some(h) = &self.hyp {
            let _ = hypcall::call(
                &*self.platform,
                cpu,
                "wrprotect_guest",
                pkvm_hyp::hvc::id::WRPROTECT_GUEST,
                &[
                    h.handle as u64,
                    start.gfn().0,
                    (end.0 - start.0) / PAGE_SIZE,
                ],
            );
        }
    }

    /// IPA ranges backed by `[start, end)` of host memory.
    fn ipa_ranges(&self, start: Hva, end: Hva) -> Vec<(Ipa, Ipa)> {
        self.slots
            .read()
            .iter()
            .filter_map(|s| s.ipa_range_of_hva(start, end))
            .collect()
    }

    /// MMU notifier: the host is about to change `[start, end)`; unmap what
    /// stage-2 maps from it. No guest fault can map it again until
    /// [`Vm::mmu_notifier_invalidate_end`].
    pub fn mmu_notifier_invalidate_start(&self, start: Hva, end: Hva, cpu: usize) {
        self.stats.add(None, Stat::Invalidations, 1);
        let ranges = self.ipa_ranges(start, end);
        let (lo, hi) = ranges
            .iter()
            .fold((u64::MAX, 0), |(lo, hi), (s, e)| (lo.min(s.0), hi.max(e.0)));
        // Always counts as in progress, even when no slot is affected, so
        // that begin/end stay balanced.
        self.mmu.invalidate_begin(Ipa(lo.min(hi)), Ipa(hi));
        for (s, e) in ranges {
            self.unmap_ipa(s, e, cpu);
        }
    }

    /// MMU notifier: the change of the range is complete.
    pub fn mmu_notifier_invalidate_end(&self) {
        self.mmu.invalidate_end();
    }

    /// MMU notifier: whether the guest accessed `[start, end)` recently;
    /// clears the access flags if `clear`.
    pub fn mmu_notifier_age(&self, start: Hva, end: Hva, clear: bool, cpu: usize) -> bool {
        let ranges = self.ipa_ranges(start, end);
        let state = self.mmu.state.read();
        let mut young = false;
        for (s, e) in ranges {
            match state.as_ref() {
                Some(S2State::Standard(pt)) => {
                    let env = self.platform.s2_env(self.vmid().unwrap_or(0));
                    let y = pt
                        .shared()
                        .test_clear_young(&env, s, e.0 - s.0, clear)
                        .unwrap_or(false);
                    if clear && y {
                        // As KVM's clear_flush_young: without the flush a
                        // cached translation keeps the page looking idle
                        // however often the guest touches it.
                        pkvm_pgtable::TlbOps::tlbi_range(&env, s.0, e.0);
                    }
                    young |= y;
                }
                Some(S2State::Protected(_)) => {
                    if let Some(h) = &self.hyp {
                        young |= hypcall::test_clear_young_guest(
                            &*self.platform,
                            cpu,
                            h.handle,
                            s.gfn(),
                            (e.0 - s.0) / PAGE_SIZE,
                            clear,
                        )
                        .unwrap_or(false);
                    }
                }
                None => {}
            }
        }
        young
    }

    /// MMU notifier: the process address space is going away (mm exit).
    /// Tears the stage-2 down now; VM destroy later finds nothing to free.
    pub fn mmu_notifier_release(&self, cpu: usize) {
        self.teardown(cpu);
    }

    /// Tears the VM's memory down: stage-2 tables (standard mode) or the
    /// hypervisor VM (protected mode: teardown, reclaim of every guest
    /// page, finalize; or unreserve if never initialised), and every page
    /// the host donated. Safe to call any number of times from any thread:
    /// each piece is taken exactly once.
    pub fn teardown(&self, cpu: usize) {
        let taken = self.mmu.state.write().take();
        match taken {
            Some(S2State::Standard(s2)) => {
                let n =
                    mmu::destroy_standard(&self.platform, self.vmid().unwrap_or(0), s2, &self.geo);
                self.nested_stats.freed.fetch_add(n, Ordering::Relaxed);
            }
            Some(S2State::Protected(maps)) => {
                self.teardown_hyp(cpu, Some(maps));
            }
            // Someone else took the stage-2 state: the hypervisor VM is
            // theirs to tear down, with the page references of what it
            // maps. Tearing it down here (without those mappings) would
            // let the owner drop the references before the guest lost the
            // pages, and skip reclaiming donated pages.
            None => {}
        }
    }

    fn teardown_hyp(&self, cpu: usize, maps: Option<mmu::ProtectedMaps<M::Pin>>) {
        let Some(h) = &self.hyp else { return };
        let Some(state) = h.state.lock().take() else {
            return;
        };
        let p = &*self.platform;
        let maps: alloc::vec::Vec<_> = maps.into_iter().flat_map(|m| m.into_entries()).collect();
        if state.initialized {
            // Every vCPU was put (vCPU handles put on every exit path).
            let r = hypcall::start_teardown(p, cpu, h.handle);
            debug_assert!(r.is_ok(), "start_teardown: {r:?}");
            for (gfn, m) in &maps {
                for g in *gfn..*gfn + m.npages {
                    let r = hypcall::reclaim_guest_page(p, cpu, h.handle, pkvm_arch::Gfn(g));
                    debug_assert!(r.is_ok(), "reclaim gfn {g:#x}: {r:?}");
                }
            }
            let r = hypcall::finalize_teardown(p, cpu, h.handle);
            debug_assert!(r.is_ok(), "finalize_teardown: {r:?}");
        } else {
            let r = hypcall::unreserve_vm(p, cpu, h.handle);
            debug_assert!(r.is_ok(), "unreserve_vm: {r:?}");
        }
        // The guest pages' references go only now that the guest lost them.
        drop(maps);
        for (pa, order) in state.donated {
            p.free_pages(pa, order);
        }
    }

    /// Initialises the hypervisor VM on first run (protected mode): donates
    /// its memory, then initialises every vCPU. Idempotent.
    pub fn ensure_hyp_init(&self, cpu: usize) -> Result<(), VmError> {
        let Some(h) = &self.hyp else { return Ok(()) };
        let mut guard = h.state.lock();
        let state = guard.as_mut().ok_or(VmError::Dead)?;
        if state.initialized && state.vcpus_ready == self.cfg.nr_vcpus {
            return Ok(());
        }
        let p = &*self.platform;
        let (vm_pages, vcpu_pages, root_pages) = hypcall::get_sizes(p, cpu, self.cfg.ipa_bits)?;
        let order_of = |n: u64| n.max(1).next_power_of_two().trailing_zeros();
        let vcpu_order = order_of(vcpu_pages);
        if state.initialized {
            // A previous first run failed after INIT_VM: finish the vCPUs.
            return self.init_hyp_vcpus(cpu, h.handle, state, vcpu_order);
        }
        let vm_order = order_of(vm_pages);
        let root_order = order_of(root_pages);
        let vm_mem = p.alloc_pages(vm_order).ok_or(VmError::NoMemory)?;
        let Some(root) = p.alloc_pages(root_order) else {
            p.free_pages(vm_mem, vm_order);
            return Err(VmError::NoMemory);
        };
        let config = pkvm_hyp::VmConfig {
            ipa_bits: self.cfg.ipa_bits,
            nr_vcpus: self.cfg.nr_vcpus as u8,
            protected: self.cfg.protected,
        };
        if let Err(e) =
            hypcall::init_vm(p, cpu, h.handle, vm_mem.pfn(), root.pfn(), config.encode())
        {
            // The hypervisor gave the memory back and kept the reservation.
            p.free_pages(vm_mem, vm_order);
            p.free_pages(root, root_order);
            return Err(e.into());
        }
        state.donated.push((vm_mem, vm_order));
        state.donated.push((root, root_order));
        state.initialized = true;
        self.init_hyp_vcpus(cpu, h.handle, state, vcpu_order)
    }

    /// Initialises the hyp vCPUs not yet initialised, in index order.
    fn init_hyp_vcpus(
        &self,
        cpu: usize,
        handle: u16,
        state: &mut HypVmState,
        vcpu_order: u32,
    ) -> Result<(), VmError> {
        let p = &*self.platform;
        for i in state.vcpus_ready..self.cfg.nr_vcpus {
            let mem = p.alloc_pages(vcpu_order).ok_or(VmError::NoMemory)?;
            if let Err(e) = hypcall::init_vcpu(p, cpu, handle, i, mem.pfn()) {
                p.free_pages(mem, vcpu_order);
                return Err(e.into());
            }
            state.donated.push((mem, vcpu_order));
            state.vcpus_ready = i + 1;
        }
        Ok(())
    }

    /// Donates `n` pages to the hypervisor's memcache for this VM.
    pub(crate) fn topup_hyp_memcache(&self, cpu: usize, n: usize) -> Result<(), VmError> {
        let Some(h) = &self.hyp else { return Ok(()) };
        for _ in 0..n {
            let pa = self.platform.alloc_pages(0).ok_or(VmError::NoMemory)?;
            let mut guard = h.state.lock();
            let state = guard.as_mut().ok_or(VmError::Dead)?;
            match hypcall::topup_memcache(&*self.platform, cpu, h.handle, pa.pfn(), 1) {
                Ok(_) => state.donated.push((pa, 0)),
                Err(e) => {
                    drop(guard);
                    self.platform.free_pages(pa, 0);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// What a guest entry needs to know about stage-2.
    pub(crate) fn stage_two(&self) -> Result<StageTwo, VmError> {
        match (&self.hyp, self.mmu.state.read().as_ref()) {
            (Some(h), Some(_)) => Ok(StageTwo::Hyp { handle: h.handle }),
            (None, Some(S2State::Standard(pt))) => Ok(StageTwo::Host {
                vmid: self.vmid().unwrap_or(0),
                root: pt.root(),
                geo: self.geo,
            }),
            _ => Err(VmError::Dead),
        }
    }

    /// Claims vCPU `index` for the calling thread.
    ///
    /// # Errors
    /// No such vCPU, or already claimed.
    pub fn vcpu(self: &Arc<Self>, index: usize) -> Result<crate::vcpu::Vcpu<P, M>, VmError> {
        let v = self.vcpus.get(index).ok_or(VmError::NoSuchVcpu(index))?;
        if v.claimed.swap(true, Ordering::AcqRel) {
            return Err(VmError::VcpuBusy(index));
        }
        Ok(crate::vcpu::Vcpu::new(self.clone(), index))
    }

    /// Translation of `ipa` in host-managed stage-2 (standard mode; for
    /// tests and statistics).
    pub fn s2_translate(&self, ipa: Ipa) -> Option<(Pa, S2Prot, u64)> {
        let state = self.mmu.state.read();
        match state.as_ref() {
            Some(S2State::Standard(pt)) => {
                let env = self.platform.s2_env(self.vmid().unwrap_or(0));
                pt.translate(&env, ipa)
                    .map(|(pa, prot, l)| (pa, prot, Granule::Size4K.level_size(l)))
            }
            _ => None,
        }
    }

    /// Number of guest frames mapped through the hypervisor (protected mode).
    pub fn hyp_mapped_pages(&self) -> u64 {
        match self.mmu.state.read().as_ref() {
            Some(S2State::Protected(m)) => m.pages(),
            _ => 0,
        }
    }
}

impl<P: HostPlatform, M: ProcessMemory> Drop for Vm<P, M> {
    fn drop(&mut self) {
        self.teardown(0);
    }
}

impl<P: HostPlatform, M: ProcessMemory> PsciVm for Vm<P, M> {
    fn psci_config(&self) -> PsciConfig {
        self.cfg.psci
    }
    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
    fn vcpu_power(&self, index: usize) -> &SpinLock<VcpuPower> {
        &self.vcpus[index].power
    }
    fn system_event_latch(&self) -> &SpinLock<SystemEventLatch> {
        &self.system_event
    }
    fn kick_vcpu(&self, index: usize) {
        let id = self.vmid().or(self.handle()).unwrap_or(0);
        self.platform.kick_vcpu(id, index);
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn per_vcpu_counts_sum_into_the_snapshot() {
        let s = VmStats::new(3);
        s.add(Some(0), Stat::TranslationFaults, 2);
        s.add(Some(2), Stat::TranslationFaults, 5);
        s.add(Some(1), Stat::Maps2M, 1);
        s.add(None, Stat::Invalidations, 4);
        // An index past the vCPUs counts VM-wide rather than panicking.
        s.add(Some(99), Stat::Retries, 1);
        let snap = s.snapshot();
        assert_eq!(snap.translation_faults, 7);
        assert_eq!(snap.maps_by_size, [0, 1, 0]);
        assert_eq!(snap.invalidations, 4);
        assert_eq!(snap.retries, 1);
        assert_eq!(s.get(Stat::PermissionFaults), 0);
    }
}
