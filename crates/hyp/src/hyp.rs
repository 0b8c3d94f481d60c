//! The hypervisor state: the page pool, the host's stage-2, the VM table and
//! the VMs, created once at init from what the platform hands over.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pkvm_arch::pte::{El2Prot, S2Features, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Pa, Va, PAGE_SIZE};
use pkvm_pgtable::{El2, MapFlags, PageCache, PageTable};
use pkvm_sync::{LockClass, SpinLock};

use crate::error::HypError;
use crate::mem_protect::HostMmu;
use crate::meta::{MemMap, PageState};
use crate::platform::{HypPlatform, MemRegion};
use crate::pool::HypPool;
use crate::vm::{HypVm, VmTable};

/// Number of VM table slots (handles `0x1000..0x10ff`, VMIDs `1..=255`).
pub const MAX_VMS: usize = 255;
/// vCPUs per VM.
pub const MAX_VCPUS: usize = 16;
/// Physical CPUs.
pub const MAX_CPUS: usize = 32;
/// Host memory regions.
pub const MAX_REGIONS: usize = 16;
/// Pages of hyp VM state the host donates at `init_vm`.
pub const VM_PAGES: u64 = 1;
/// Pages of hyp vCPU state (the register context) donated at `init_vcpu`.
pub const VCPU_PAGES: u64 = 1;
/// Largest number of pages one memcache top-up may donate.
pub const MAX_TOPUP_PAGES: u64 = 16;
/// Owner id of the hypervisor in host stage-2 annotations.
pub const OWNER_HYP: u8 = 1;
/// The first VM handle.
pub const HANDLE_BASE: u16 = 0x1000;
/// Table pages the host stage-2's device mappings may take from the pool.
/// When a device fault would exceed it, every host device mapping is
/// removed (the host faults them back in lazily) and the count starts over,
/// so no sequence of host faults can drain the pool that VM operations need.
pub const HOST_DEV_TABLES: u64 = 32;

/// What the platform hands the hypervisor at init.
#[derive(Clone, Copy, Debug)]
pub struct HypConfig<'a> {
    /// Metadata for every page of the managed range (all host memory).
    pub mem: MemMap,
    /// The host's normal memory regions (inside `mem`, page aligned).
    pub regions: &'a [MemRegion],
    /// The hypervisor's read-only ranges the host runs (the image's code
    /// and read-only data when the host shares the hypervisor's image):
    /// hyp-owned (host SHARED_BORROWED, hyp SHARED_OWNED), mapped in the
    /// host stage-2 read-only and executable on the host's fault, never
    /// writable, never accepted by a hypercall. Inside `mem`, page
    /// aligned, apart from `regions` and the pool; may be empty.
    pub host_rx: &'a [MemRegion],
    /// The hypervisor's page pool: `pool_pages` pages at `pool_base`.
    pub pool_base: Pa,
    /// Size of the pool in pages.
    pub pool_pages: u64,
    /// Pages at the start of the pool already in use (stay allocated).
    pub pool_reserved: u64,
    /// IPA size of the host's identity stage-2 (covers every region).
    pub host_ipa_bits: u32,
    /// Stage-2 descriptor features of the CPU.
    pub features: S2Features,
}

/// Counters for tests and the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypStats {
    /// Pages in the hyp pool's range.
    pub pool_pages: u64,
    /// Free pages in the hyp pool.
    pub pool_free: u64,
    /// Pages the VMs hold on to (VM and vCPU state, stage-2 root and table
    /// pages, memcache pages).
    pub vm_pages: u64,
    /// Live VMs.
    pub live_vms: u64,
}

/// The trusted hypervisor core. See the crate documentation for the trust
/// boundary and the lock order.
pub struct Hyp<P: HypPlatform> {
    pub(crate) plat: P,
    pub(crate) mem: MemMap,
    pub(crate) regions: [MemRegion; MAX_REGIONS],
    pub(crate) nr_regions: usize,
    /// [`HypConfig::host_rx`].
    pub(crate) rx: [MemRegion; MAX_REGIONS],
    pub(crate) nr_rx: usize,
    pub(crate) pool: HypPool,
    pub(crate) host: SpinLock<HostMmu>,
    /// The hypervisor's own EL2 stage-1: every page the hyp owns or
    /// borrows, mapped linearly (VA = PA), nothing else. Changes only with
    /// page ownership, with the host MMU lock held, so the lock order is
    /// host MMU -> hyp page table.
    pub(crate) pgd: SpinLock<PageTable<El2>>,
    pub(crate) table: SpinLock<VmTable<MAX_VMS>>,
    pub(crate) vms: [SpinLock<Option<HypVm>>; MAX_VMS],
    pub(crate) finalized: AtomicBool,
    pub(crate) feat: S2Features,
    pub(crate) hvc_count: AtomicU64,
    /// Table pages the host stage-2 may need to change one page's mapping.
    pub(crate) host_levels: usize,
}

/// The page-table environment of one translation context: the platform's
/// table memory with the TLB maintenance of one VMID.
pub(crate) type Env<'a, P> = pkvm_pgtable::SplitEnv<&'a P, <P as HypPlatform>::Tlb>;

/// The environment of the hyp's own EL2 stage-1.
pub(crate) type Env2<'a, P> = pkvm_pgtable::SplitEnv<&'a P, <P as HypPlatform>::El2Tlb>;

/// Largest number of table pages one prepared operation reserves.
pub(crate) const RESERVE_MAX: usize = 32;

/// Table pages the hyp's EL2 stage-1 may need to map one contiguous run of
/// at most 512 pages (48-bit VA, four levels): a level-1 and up to two
/// level-2 and two level-3 tables.
pub(crate) const EL2_TABLES: usize = 5;

/// VA bits of the hyp's own address space.
pub const HYP_VA_BITS: u32 = 48;

/// Table pages taken from the hyp pool *before* a commit, so the commit
/// cannot run out of memory. Unused pages go back to the pool on drop.
pub(crate) struct Reserve<'a, P: HypPlatform> {
    pool: &'a HypPool,
    plat: &'a P,
    pages: [Pa; RESERVE_MAX],
    n: usize,
}

impl<'a, P: HypPlatform> Reserve<'a, P> {
    /// Takes `count` zeroed pages from the pool.
    pub(crate) fn new(pool: &'a HypPool, plat: &'a P, count: usize) -> Result<Self, HypError> {
        assert!(
            count <= RESERVE_MAX,
            "hyp bug: reserve of {count} table pages"
        );
        let mut r = Reserve {
            pool,
            plat,
            pages: [Pa(0); RESERVE_MAX],
            n: 0,
        };
        for _ in 0..count {
            // On failure `r` is dropped and gives back what it took.
            let pa = pool.alloc(0).map_err(|_| HypError::NoMemory)?;
            r.pages[r.n] = pa;
            r.n += 1;
        }
        Ok(r)
    }
}

impl<'a, P: HypPlatform> Reserve<'a, P> {
    /// A reserve holding nothing (for steps that only free table pages).
    pub(crate) fn empty(pool: &'a HypPool, plat: &'a P) -> Self {
        Reserve {
            pool,
            plat,
            pages: [Pa(0); RESERVE_MAX],
            n: 0,
        }
    }

    /// Pages left.
    pub(crate) fn len(&self) -> usize {
        self.n
    }
}

impl<P: HypPlatform> PageCache for Reserve<'_, P> {
    fn alloc_table(&mut self) -> Option<Pa> {
        if self.n == 0 {
            return None;
        }
        self.n -= 1;
        Some(self.pages[self.n])
    }
    fn free_table(&mut self, pa: Pa) {
        if self.n < RESERVE_MAX {
            self.pages[self.n] = pa;
            self.n += 1;
        } else {
            self.pool.put(self.plat, pa);
        }
    }
}

impl<P: HypPlatform> Drop for Reserve<'_, P> {
    fn drop(&mut self) {
        for i in 0..self.n {
            self.pool.put(self.plat, self.pages[i]);
        }
    }
}

impl<P: HypPlatform> Hyp<P> {
    /// Sets up the hypervisor: the page pool over the configured range
    /// (marked hyp-owned and annotated in the host stage-2), the host's
    /// empty identity stage-2, an empty VM table. Starts unfinalised.
    ///
    /// # Errors
    /// [`HypError::BadArgument`] / [`HypError::BadAddress`] for an
    /// inconsistent configuration (platform bug), [`HypError::NoMemory`] if
    /// the pool cannot hold the host stage-2's root.
    pub fn new(plat: P, cfg: &HypConfig<'_>) -> Result<Hyp<P>, HypError> {
        let mem = cfg.mem;
        if cfg.regions.len() > MAX_REGIONS || cfg.regions.is_empty() {
            return Err(HypError::BadArgument {
                what: "region count",
                value: cfg.regions.len() as u64,
            });
        }
        let regions = check_regions(&mem, cfg.regions, &[], cfg.host_ipa_bits)?;
        let rx = check_regions(&mem, cfg.host_rx, cfg.regions, cfg.host_ipa_bits)?;
        let pool_end = cfg.pool_base.0.saturating_add(cfg.pool_pages * PAGE_SIZE);
        if let Some(r) = cfg
            .host_rx
            .iter()
            .find(|r| r.base.0 < pool_end && cfg.pool_base < r.end())
        {
            return Err(HypError::BadAddress { pa: r.base });
        }
        let geo = S2Geometry::new(Granule::Size4K, cfg.host_ipa_bits).map_err(|_| {
            HypError::BadArgument {
                what: "host IPA bits",
                value: cfg.host_ipa_bits as u64,
            }
        })?;
        let pool = HypPool::new(&plat, mem, cfg.pool_base, cfg.pool_pages, cfg.pool_reserved)
            .map_err(|_| HypError::BadAddress { pa: cfg.pool_base })?;
        for i in 0..cfg.pool_pages {
            let pa = cfg.pool_base + i * PAGE_SIZE;
            mem.set_host_state(pa, PageState::NoPage);
            mem.set_hyp_state(pa, PageState::Owned);
        }
        for r in cfg.host_rx {
            for i in 0..r.size / PAGE_SIZE {
                let pa = r.base + i * PAGE_SIZE;
                mem.set_host_state(pa, PageState::SharedBorrowed);
                mem.set_hyp_state(pa, PageState::SharedOwned);
            }
        }
        let order = geo.root_pages.trailing_zeros() as u8;
        let root = pool.alloc(order).map_err(|_| HypError::NoMemory)?;
        let mut pgt = PageTable::new(root, geo, cfg.features);
        {
            let env = Env {
                mem: &plat,
                tlb: plat.tlb(0),
            };
            let levels = 3 - geo.start_level.0 as usize;
            let mut res = Reserve::new(&pool, &plat, 2 * levels)?;
            let ann = S2Pte::owner_annotation(OWNER_HYP);
            pgt.annotate(
                &env,
                Ipa(cfg.pool_base.0),
                cfg.pool_pages * PAGE_SIZE,
                ann,
                &mut res,
            )
            .map_err(|_| HypError::BadAddress { pa: cfg.pool_base })?;
        }
        // The hyp's own address space: the pool, mapped RW (never executable).
        let el2_root = pool.alloc(0).map_err(|_| HypError::NoMemory)?;
        let el2_geo = pkvm_pgtable::table::el2_geometry(HYP_VA_BITS)
            .map_err(|_| HypError::Internal("EL2 geometry"))?;
        let mut pgd = PageTable::<El2>::new(el2_root, el2_geo, cfg.features);
        {
            let env = Env2 {
                mem: &plat,
                tlb: plat.el2_tlb(),
            };
            let mut res = Reserve::new(&pool, &plat, 2 * EL2_TABLES)?;
            pgd.map(
                &env,
                Va(cfg.pool_base.0),
                cfg.pool_pages * PAGE_SIZE,
                cfg.pool_base,
                El2Prot::RW,
                MapFlags::NONE,
                &mut res,
            )
            .map_err(|_| HypError::NoMemory)?;
        }
        Ok(Hyp {
            plat,
            mem,
            regions,
            nr_regions: cfg.regions.len(),
            rx,
            nr_rx: cfg.host_rx.len(),
            pool,
            host: SpinLock::new(HostMmu::new(pgt, mem), LockClass::HypHostMmu),
            pgd: SpinLock::new(pgd, LockClass::HypPgtable),
            table: SpinLock::new(VmTable::new(), LockClass::HypVmTable),
            vms: core::array::from_fn(|_| SpinLock::new(None, LockClass::HypVm)),
            finalized: AtomicBool::new(false),
            feat: cfg.features,
            hvc_count: AtomicU64::new(0),
            host_levels: 3 - geo.start_level.0 as usize,
        })
    }

    /// The platform.
    pub fn platform(&self) -> &P {
        &self.plat
    }

    /// The page metadata (read-only use: tests, the simulator's checks).
    pub fn memmap(&self) -> &MemMap {
        &self.mem
    }

    /// The hyp page pool.
    pub fn pool(&self) -> &HypPool {
        &self.pool
    }

    /// The host memory regions.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.nr_regions]
    }

    /// The hypervisor's ranges the host may read and execute
    /// ([`HypConfig::host_rx`]).
    pub fn host_rx(&self) -> &[MemRegion] {
        &self.rx[..self.nr_rx]
    }

    /// Whether the host has finalised protection (the `FINALIZE` hypercall).
    pub fn is_finalized(&self) -> bool {
        self.finalized.load(Ordering::Acquire)
    }

    /// Switches to the after-finalisation hypercall band (like
    /// `__pkvm_prot_finalize`). Idempotence is not needed: the call that does
    /// this is only available before.
    pub fn finalize(&self) {
        self.finalized.store(true, Ordering::Release);
    }

    /// Whether any of the hypervisor's locks is held (tests assert none is,
    /// between calls).
    pub fn any_lock_held(&self) -> bool {
        self.pool.is_locked()
            || self.host.is_locked()
            || self.pgd.is_locked()
            || self.table.is_locked()
            || self.vms.iter().any(|v| v.is_locked())
    }

    /// Counters (takes the VM table lock and each VM's lock in turn).
    pub fn stats(&self) -> HypStats {
        let t = self.table.lock();
        let mut s = HypStats {
            pool_pages: self.pool.total_pages(),
            pool_free: self.pool.free_pages(),
            ..HypStats::default()
        };
        for (i, slot) in self.vms.iter().enumerate() {
            if let Some(vm) = slot.lock().as_ref() {
                s.vm_pages += vm.owned_pages();
                if t.is_live(i) {
                    s.live_vms += 1;
                }
            }
        }
        s
    }

    pub(crate) fn host_env(&self) -> Env<'_, P> {
        Env {
            mem: &self.plat,
            tlb: self.plat.tlb(0),
        }
    }

    pub(crate) fn el2_env(&self) -> Env2<'_, P> {
        Env2 {
            mem: &self.plat,
            tlb: self.plat.el2_tlb(),
        }
    }

    /// Where the hypervisor's own page table maps `va` (linear map: VA =
    /// PA), if it does.
    pub fn hyp_translate(&self, va: Va) -> Option<(Pa, El2Prot)> {
        let pgd = self.pgd.lock();
        pgd.translate(&self.plat, va)
            .map(|(pa, prot, _)| (pa, prot))
    }

    pub(crate) fn guest_env(&self, vmid: u16) -> Env<'_, P> {
        Env {
            mem: &self.plat,
            tlb: self.plat.tlb(vmid),
        }
    }

    /// The region holding `[pa, pa + len)`, if one does.
    pub(crate) fn region_of(&self, pa: Pa, len: u64) -> Option<&MemRegion> {
        self.regions().iter().find(|r| r.contains(pa, len))
    }

    /// The read-only, executable range ([`HypConfig::host_rx`]) holding
    /// `[pa, pa + len)`, if one does.
    pub(crate) fn rx_region_of(&self, pa: Pa, len: u64) -> Option<&MemRegion> {
        self.host_rx().iter().find(|r| r.contains(pa, len))
    }
}

/// Validates `list` (at most [`MAX_REGIONS`] page-aligned ranges inside
/// `mem` and the host's IPA space, apart from each other and from
/// `others`) and copies it into a fixed array.
fn check_regions(
    mem: &MemMap,
    list: &[MemRegion],
    others: &[MemRegion],
    ipa_bits: u32,
) -> Result<[MemRegion; MAX_REGIONS], HypError> {
    if list.len() > MAX_REGIONS {
        return Err(HypError::BadArgument {
            what: "region count",
            value: list.len() as u64,
        });
    }
    let mut out = [MemRegion {
        base: Pa(0),
        size: 0,
    }; MAX_REGIONS];
    let overlap = |a: &MemRegion, b: &MemRegion| a.base < b.end() && b.base < a.end();
    for (i, r) in list.iter().enumerate() {
        let ok = r.base.is_aligned(PAGE_SIZE)
            && r.size % PAGE_SIZE == 0
            && mem.contains(r.base, r.size / PAGE_SIZE)
            && r.end().0 <= 1u64 << ipa_bits.min(48);
        if !ok || list[..i].iter().chain(others).any(|o| overlap(r, o)) {
            return Err(HypError::BadAddress { pa: r.base });
        }
        out[i] = *r;
    }
    Ok(out)
}
