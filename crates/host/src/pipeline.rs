//! Guest abort handling and the memory fault pipeline (KVM's
//! `kvm_handle_guest_abort()` / `user_mem_abort()`, restructured).
//!
//! Each step is a function that owns exactly its state (seed 002):
//! 1. [`classify`]: the immutable [`GuestFault`] and the memslots decide
//!    the route (inject, MMIO, access flag, memory).
//! 2. [`topup`]: fill the vCPU's table-page cache, before any lock.
//! 3. [`snapshot_vma`]: under the process memory read lock, copy the facts
//!    the decision needs into a [`VmaSnapshot`]; the VMA reference is
//!    confined to the closure, so using it after the lock is dropped does
//!    not compile.
//! 4. [`max_mapping_size`]: the largest mapping the VMA, the memslot, the
//!    IPA/host-address congruence and dirty logging allow.
//! 5. The invalidation sequence is sampled, then [`ProcessMemory::pin`]
//!    takes the page reference (an RAII value: released on every path).
//! 6. [`compute_prot`]: the stage-2 permissions and memory type.
//! 7. `map_*`: under the MMU lock (read + shared walk in standard mode,
//!    write + hypercalls in protected mode), either map, relax permissions,
//!    or return to the guest to retry because an invalidation ran since the
//!    sequence was sampled. In protected mode `plan_protected` decides
//!    first what is left to map (a block whose sharing stopped part-way
//!    when the hypervisor's memcache ran dry is resumed), and the sequence
//!    is re-checked on every attempt, since a memcache top-up drops the
//!    lock.

use alloc::collections::BTreeMap;

use pkvm_arch::pte::S2Prot;
use pkvm_arch::{Gfn, Hva, Ipa, Pa, PAGE_SIZE};
use pkvm_pgtable::{MapFlags, PtError};

use crate::fault::{FaultKind, GuestFault};
use crate::memslot::Memslot;
use crate::mmu::HypMapping;
use crate::platform::{HostPageCache, HostPlatform, PinError, PinnedPage, ProcessMemory};

const G2M: u64 = 2 << 20;
const G1G: u64 = 1 << 30;

/// Where a guest abort goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Inject a synchronous external abort into the guest.
    InjectAbort,
    /// Emulated device access: exit to the VMM with the access.
    Mmio,
    /// A device access without a valid syndrome: the VMM cannot emulate it.
    MmioNoSyndrome,
    /// A cache maintenance instruction on non-memory: skip it.
    SkipCacheMaintenance,
    /// Set the access flag.
    AccessFlag(Memslot),
    /// Map memory.
    Memory(Memslot),
    /// A fault status the host does not handle.
    Unsupported,
}

/// Step 1: routes a fault (KVM's `kvm_handle_guest_abort` decisions).
pub fn classify(fault: &GuestFault, ipa_size: u64, slot: Option<&Memslot>) -> Route {
    match fault.kind {
        FaultKind::AddressSize => return Route::InjectAbort,
        FaultKind::Other(_) => return Route::Unsupported,
        _ => {}
    }
    if fault.ipa.0 >= ipa_size {
        return Route::InjectAbort;
    }
    let slot = match slot {
        Some(s) if !(fault.write && s.readonly()) => *s,
        _ => {
            if fault.exec {
                return Route::InjectAbort;
            }
            if fault.cm {
                return Route::SkipCacheMaintenance;
            }
            return if fault.syndrome.is_some() {
                Route::Mmio
            } else {
                Route::MmioNoSyndrome
            };
        }
    };
    if fault.kind == FaultKind::AccessFlag {
        Route::AccessFlag(slot)
    } else {
        Route::Memory(slot)
    }
}

/// Why the memory fault path could not map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemFaultError {
    /// No memory for table pages.
    NoMemory,
    /// The memslot's host address has no VMA, or the VMA forbids the access.
    BadHostAddress(Hva),
    /// The hypervisor refused a call.
    Hyp(crate::hypcall::HypCallError),
    /// The VM was torn down.
    Dead,
    /// A page-table error that is a host bug.
    Internal(PtError),
}

/// What the pipeline did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapped {
    /// A new mapping of this size.
    Map(u64),
    /// Permissions relaxed in place.
    Relaxed,
    /// Someone else mapped it first, or an invalidation ran: the guest
    /// retries the access.
    Retry,
}

/// Step 2: top up the page cache, before any lock is taken.
///
/// # Errors
/// [`MemFaultError::NoMemory`].
pub fn topup<P: HostPlatform>(
    cache: &mut HostPageCache<P>,
    min: usize,
) -> Result<(), MemFaultError> {
    cache.topup(min).map_err(|()| MemFaultError::NoMemory)
}

/// The VMA facts the fault path needs, copied under the mm read lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmaSnapshot {
    /// VMA start.
    pub start: Hva,
    /// VMA end.
    pub end: Hva,
    /// Host mapping size when populated.
    pub mapping_size: u64,
    /// hugetlbfs.
    pub hugetlb: bool,
    /// THP-eligible.
    pub thp: bool,
    /// Device memory.
    pub pfnmap: bool,
    /// Writable VMA.
    pub writable: bool,
}

/// Step 3: snapshot the VMA at `hva` under the process memory read lock.
///
/// # Errors
/// [`MemFaultError::BadHostAddress`] when no VMA covers `hva`.
pub fn snapshot_vma<M: ProcessMemory>(mm: &M, hva: Hva) -> Result<VmaSnapshot, MemFaultError> {
    mm.with_vma(hva, |vma| {
        vma.map(|v| VmaSnapshot {
            start: v.start(),
            end: v.end(),
            mapping_size: v.mapping_size(),
            hugetlb: v.is_hugetlb(),
            thp: v.is_thp(),
            pfnmap: v.is_pfnmap(),
            writable: v.writable(),
        })
    })
    .ok_or(MemFaultError::BadHostAddress(hva))
}

/// Step 4: the largest mapping size allowed at `ipa` (backed by `hva`):
/// the VMA's size (hugetlb or THP), degraded while the block would leave
/// the memslot or the VMA, or the IPA and host address are not congruent
/// within the block; pages only while dirty logging.
pub fn max_mapping_size(vma: &VmaSnapshot, slot: &Memslot, ipa: Ipa, hva: Hva) -> u64 {
    if slot.logging() {
        return PAGE_SIZE;
    }
    let mut size = vma.mapping_size.min(G1G);
    while size > PAGE_SIZE {
        let ipa_base = ipa.align_down(size);
        let hva_base = hva.align_down(size);
        let fits_slot = ipa_base.0 >= slot.start().0 && ipa_base.0 + size <= slot.end().0;
        let fits_vma = hva_base.0 >= vma.start.0 && hva_base.0 + size <= vma.end.0;
        let congruent = (ipa.0 ^ hva.0) & (size - 1) == 0;
        if fits_slot && fits_vma && congruent {
            break;
        }
        size = if size == G1G { G2M } else { PAGE_SIZE };
    }
    size
}

/// Step 6: stage-2 permissions: R always, W if the host page is writable
/// and the slot is not read-only (while logging only on a write fault, so
/// the first write is seen), X on instruction fetches; device memory is
/// never executable.
pub fn compute_prot(fault: &GuestFault, slot: &Memslot, writable: bool, device: bool) -> S2Prot {
    let mut prot = S2Prot::R;
    if writable && !slot.readonly() && (!slot.logging() || fault.write) {
        prot |= S2Prot::W;
    }
    if device {
        prot |= S2Prot::DEVICE;
    } else if fault.exec {
        prot |= S2Prot::X;
    }
    prot
}

/// A pinned host page and where to map it.
pub struct Target<Pin> {
    /// The IPA of the block (aligned to `size`).
    pub ipa: Ipa,
    /// The PA of the block.
    pub pa: Pa,
    /// Mapping size.
    pub size: u64,
    /// Protection.
    pub prot: S2Prot,
    /// The page reference (dropped after mapping in standard mode, kept
    /// with the mapping in protected mode).
    pub pin: Pin,
}

/// Steps 4-6 after the VMA snapshot: pins the page and decides the target.
///
/// # Errors
/// Pin failures ([`PinError::Again`] becomes `Ok(None)`: retry).
pub fn pin_target<M: ProcessMemory>(
    mm: &M,
    fault: &GuestFault,
    slot: &Memslot,
    vma: &VmaSnapshot,
) -> Result<Option<Target<M::Pin>>, MemFaultError> {
    let hva = slot.hva_of(fault.page());
    let max = max_mapping_size(vma, slot, fault.page(), hva);
    let write_fault = fault.write;
    if write_fault && !vma.writable {
        return Err(MemFaultError::BadHostAddress(hva));
    }
    let pin = match mm.pin(hva, write_fault) {
        Ok(p) => p,
        Err(PinError::Again) => return Ok(None),
        Err(PinError::NoMemory) => return Err(MemFaultError::NoMemory),
        Err(PinError::BadAddress(a)) => return Err(MemFaultError::BadHostAddress(a)),
    };
    // THP / hugetlb: only as large as what the host actually maps now.
    let mut size = max.min(pin.size().max(PAGE_SIZE));
    if !pin.size().is_power_of_two() {
        size = PAGE_SIZE;
    }
    let ipa = fault.page().align_down(size);
    let off = hva.0 & (size - 1);
    let pa = Pa(pin.pa().0 - off);
    if pa.0 < pin.folio_pa().0 || pa.0 & (size - 1) != 0 {
        // The host mapping is not laid out as a block: map the page.
        let prot = compute_prot(fault, slot, pin.writable(), pin.is_device());
        return Ok(Some(Target {
            ipa: fault.page(),
            pa: pin.pa(),
            size: PAGE_SIZE,
            prot,
            pin,
        }));
    }
    let prot = compute_prot(fault, slot, pin.writable(), pin.is_device());
    Ok(Some(Target {
        ipa,
        pa,
        size,
        prot,
        pin,
    }))
}

/// Step 7 (standard mode): maps `t` with a shared walk. The caller holds
/// the MMU read lock and checked the invalidation sequence.
///
/// # Errors
/// [`MemFaultError::NoMemory`] if the cache ran dry; internal errors.
pub fn map_standard<P: HostPlatform, Pin>(
    platform: &P,
    vmid: u16,
    pt: &pkvm_pgtable::PageTable<pkvm_pgtable::Stage2>,
    fault: &GuestFault,
    t: &Target<Pin>,
    cache: &mut HostPageCache<P>,
) -> Result<Mapped, MemFaultError> {
    let env = platform.s2_env(vmid);
    let fault_granule = fault
        .level
        .map(|l| pkvm_arch::Granule::Size4K.level_size(l));
    let r = if fault.kind == FaultKind::Permission && fault_granule == Some(t.size) {
        pt.shared()
            .relax_perms(&env, fault.page(), t.prot & S2Prot::PERMS)
            .map(|()| Mapped::Relaxed)
    } else {
        pt.shared()
            .map(&env, t.ipa, t.size, t.pa, t.prot, MapFlags::NONE, cache)
            .map(|()| Mapped::Map(t.size))
    };
    match r {
        Ok(m) => Ok(m),
        Err(PtError::Again) => Ok(Mapped::Retry),
        Err(PtError::NoMemory) => Err(MemFaultError::NoMemory),
        Err(e) => Err(MemFaultError::Internal(e)),
    }
}

/// A run of guest frames and the host frames behind them (protected mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// First guest frame.
    pub gfn: Gfn,
    /// Host physical address of the first frame.
    pub pa: Pa,
    /// Number of pages.
    pub npages: u64,
}

impl Block {
    /// The block of a pinned target.
    pub fn of<Pin>(t: &Target<Pin>) -> Self {
        Block {
            gfn: t.ipa.gfn(),
            pa: t.pa,
            npages: t.size / PAGE_SIZE,
        }
    }

    /// The part of this block in `gfn`'s 2M chunk: hypervisor mappings
    /// never cross one (see `mmu::ProtectedMaps`); a 1G block is
    /// mapped 2M at a time.
    pub fn within_chunk(&self, gfn: Gfn) -> Self {
        use crate::mmu::CHUNK_PAGES;
        if self.npages <= CHUNK_PAGES {
            return *self;
        }
        let start = gfn.0 & !(CHUNK_PAGES - 1);
        Block {
            gfn: Gfn(start),
            pa: Pa(self.pa.0 + (start - self.gfn.0) * PAGE_SIZE),
            npages: CHUNK_PAGES,
        }
    }

    /// The single page `gfn` of this block.
    fn page(&self, gfn: Gfn) -> Self {
        Block {
            gfn,
            pa: Pa(self.pa.0 + (gfn.0 - self.gfn.0) * PAGE_SIZE),
            npages: 1,
        }
    }
}

/// What a protected-mode fault does, given what the host already asked
/// the hypervisor to map (step 7's decision, under the MMU lock and the
/// block's shard of the mapping table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProtectedPlan {
    /// The faulting page is mapped already (another vCPU won, or this is
    /// a permission fault).
    Mapped,
    /// Map the pages `[from, npages)` of `block`. `from > 0` resumes the
    /// partial entry recorded at `block.gfn` by a fault whose sharing
    /// stopped part-way; `from == 0` makes a new entry.
    Map {
        /// The block.
        block: Block,
        /// The first page still to map.
        from: u64,
    },
}

/// Step 7's decision (protected mode): `maps` are the host's records of
/// what the hypervisor maps (non-overlapping, by first gfn).
/// - a partial entry of this very block (same first gfn and frame; its
///   sharing stopped part-way) and nothing else in the rest of it: resume
///   after its last page, whether or not the faulting page is among those
///   done (unless this is a permission fault on one of them);
/// - an entry covers the faulting page: [`ProtectedPlan::Mapped`];
/// - anything else overlaps the block (pages mapped while logging, a
///   protected VM's donation that failed for good part-way, then
///   invalidated): the faulting page alone, or the guest would retry
///   forever;
/// - otherwise the whole block.
pub(crate) fn plan_protected<Pin>(
    maps: &BTreeMap<u64, HypMapping<Pin>>,
    fault_gfn: Gfn,
    permission: bool,
    block: &Block,
) -> ProtectedPlan {
    let overlap = |a: u64, b: u64| {
        maps.range(..b)
            .next_back()
            .is_some_and(|(k, m)| *k + m.npages > a)
    };
    let f = fault_gfn.0;
    let covered = overlap(f, f + 1);
    let (start, end) = (block.gfn.0, block.gfn.0 + block.npages);
    if let Some(m) = maps.get(&start) {
        let partial = m.pa == block.pa && m.npages < block.npages;
        if partial && !overlap(start + m.npages, end) && !(covered && permission) {
            return ProtectedPlan::Map {
                block: *block,
                from: m.npages,
            };
        }
    }
    if covered {
        return ProtectedPlan::Mapped;
    }
    let block = if overlap(start, end) {
        block.page(fault_gfn)
    } else {
        *block
    };
    ProtectedPlan::Map { block, from: 0 }
}

/// Step 7 (protected mode): shares (non-protected VM) or donates
/// (protected VM) the pages of `block` to the loaded guest, starting at
/// page `*done` and advancing it, so an attempt interrupted by an empty
/// hypervisor memcache resumes where it stopped. The caller holds the MMU
/// lock and the block's shard of the mapping table.
///
/// # Errors
/// The hypervisor's refusal; `NO_MEMORY` means its memcache needs a top-up.
pub fn map_protected<P: HostPlatform + ?Sized>(
    platform: &P,
    cpu: usize,
    protected_vm: bool,
    block: &Block,
    prot: S2Prot,
    done: &mut u64,
) -> Result<(), crate::hypcall::HypCallError> {
    for i in *done..block.npages {
        let gfn = Gfn(block.gfn.0 + i);
        let pfn = Pa(block.pa.0 + i * PAGE_SIZE).pfn();
        if protected_vm {
            crate::hypcall::donate_guest(platform, cpu, pfn, gfn)?;
        } else {
            crate::hypcall::share_guest(platform, cpu, pfn, gfn, prot & S2Prot::PERMS)?;
        }
        *done = i + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkvm_arch::esr::{AccessSyndrome, Esr, FaultStatus};
    use pkvm_arch::Level;

    fn slot(flags: u32) -> Memslot {
        Memslot {
            id: 0,
            base_gfn: Gfn(0x40000),
            npages: 0x40000,
            userspace_addr: Hva(0x7f00_0000_0000),
            flags,
        }
    }

    fn fault(ipa: u64, write: bool, syndrome: bool) -> GuestFault {
        let s = syndrome.then_some(AccessSyndrome {
            sas: 2,
            sse: false,
            srt: 3,
            sf: false,
            ar: false,
        });
        let esr = Esr::data_abort(s, write, false, FaultStatus::Translation(Level(3)));
        GuestFault::decode(esr.0, ipa, pkvm_arch::esr::hpfar_for(Ipa(ipa))).unwrap()
    }

    #[test]
    fn routes_follow_kvm() {
        let s = slot(0);
        let ro = slot(crate::memslot::MEM_READONLY);
        assert_eq!(
            classify(&fault(0x4000_0000, false, true), 1 << 40, Some(&s)),
            Route::Memory(s)
        );
        assert_eq!(
            classify(&fault(1 << 40, false, true), 1 << 40, None),
            Route::InjectAbort
        );
        assert_eq!(
            classify(&fault(0x900_0000, true, true), 1 << 40, None),
            Route::Mmio
        );
        assert_eq!(
            classify(&fault(0x900_0000, true, false), 1 << 40, None),
            Route::MmioNoSyndrome
        );
        assert_eq!(
            classify(&fault(0x4000_0000, true, true), 1 << 40, Some(&ro)),
            Route::Mmio
        );
        assert_eq!(
            classify(&fault(0x4000_0000, false, true), 1 << 40, Some(&ro)),
            Route::Memory(ro)
        );
        let ifetch = GuestFault::decode(
            Esr::instruction_abort(false, FaultStatus::Translation(Level(3))).0,
            0,
            pkvm_arch::esr::hpfar_for(Ipa(0x900_0000)),
        )
        .unwrap();
        assert_eq!(classify(&ifetch, 1 << 40, None), Route::InjectAbort);
        let af = GuestFault::decode(
            Esr::data_abort(None, false, false, FaultStatus::AccessFlag(Level(3))).0,
            0,
            pkvm_arch::esr::hpfar_for(Ipa(0x4000_0000)),
        )
        .unwrap();
        assert_eq!(classify(&af, 1 << 40, Some(&s)), Route::AccessFlag(s));
    }

    #[test]
    fn mapping_size_degrades_for_slot_edges_congruence_and_logging() {
        let vma = VmaSnapshot {
            start: Hva(0x7f00_0000_0000),
            end: Hva(0x7f00_4000_0000),
            mapping_size: G1G,
            hugetlb: true,
            thp: false,
            pfnmap: false,
            writable: true,
        };
        let s = slot(0);
        assert_eq!(
            max_mapping_size(&vma, &s, Ipa(0x4000_0000), Hva(0x7f00_0000_0000)),
            G1G
        );
        // Not congruent at 1G, congruent at 2M.
        assert_eq!(
            max_mapping_size(&vma, &s, Ipa(0x4000_0000), Hva(0x7f00_0020_0000)),
            G2M
        );
        // Not congruent at all.
        assert_eq!(
            max_mapping_size(&vma, &s, Ipa(0x4000_0000), Hva(0x7f00_0000_1000)),
            PAGE_SIZE
        );
        // A slot smaller than the block.
        let small = Memslot { npages: 256, ..s };
        assert_eq!(
            max_mapping_size(&vma, &small, Ipa(0x4000_0000), Hva(0x7f00_0000_0000)),
            PAGE_SIZE
        );
        let logging = slot(crate::memslot::MEM_LOG_DIRTY_PAGES);
        assert_eq!(
            max_mapping_size(&vma, &logging, Ipa(0x4000_0000), Hva(0x7f00_0000_0000)),
            PAGE_SIZE
        );
    }

    #[test]
    fn protections() {
        let s = slot(0);
        let w = fault(0x4000_0000, true, true);
        let r = fault(0x4000_0000, false, true);
        assert_eq!(compute_prot(&w, &s, true, false), S2Prot::RW);
        assert_eq!(compute_prot(&r, &s, true, false), S2Prot::RW);
        assert_eq!(compute_prot(&r, &s, false, false), S2Prot::R);
        let logging = slot(crate::memslot::MEM_LOG_DIRTY_PAGES);
        assert_eq!(
            compute_prot(&r, &logging, true, false),
            S2Prot::R,
            "first write must fault while logging"
        );
        assert_eq!(
            compute_prot(&w, &s, true, true),
            S2Prot::RW | S2Prot::DEVICE
        );
    }

    #[test]
    fn protected_plan_resumes_a_partial_block_and_maps_single_pages_around_others() {
        let m = |npages, pa| HypMapping {
            npages,
            pa: Pa(pa),
            _pin: (),
        };
        let block = Block {
            gfn: Gfn(0x40000),
            pa: Pa(0x8000_0000),
            npages: 512,
        };
        let plan = |maps: &BTreeMap<u64, HypMapping<()>>, f: u64, perm: bool| {
            plan_protected(maps, Gfn(f), perm, &block)
        };
        let mut maps = BTreeMap::new();
        assert_eq!(
            plan(&maps, 0x40005, false),
            ProtectedPlan::Map { block, from: 0 }
        );
        maps.insert(0x40000, m(100, 0x8000_0000));
        for f in [0x40000, 0x40063, 0x40100] {
            assert_eq!(
                plan(&maps, f, false),
                ProtectedPlan::Map { block, from: 100 }
            );
        }
        assert_eq!(plan(&maps, 0x40001, true), ProtectedPlan::Mapped);
        // Another frame behind the partial entry: not this block's.
        maps.insert(0x40000, m(100, 0x9000_0000));
        assert_eq!(plan(&maps, 0x40001, false), ProtectedPlan::Mapped);
        let page = |g: u64| ProtectedPlan::Map {
            block: Block {
                gfn: Gfn(g),
                pa: Pa(0x8000_0000 + (g - 0x40000) * PAGE_SIZE),
                npages: 1,
            },
            from: 0,
        };
        assert_eq!(plan(&maps, 0x40100, false), page(0x40100));
        // Something else inside the rest of the block: single pages.
        maps.insert(0x40000, m(100, 0x8000_0000));
        maps.insert(0x40180, m(1, 0x7000_0000));
        assert_eq!(plan(&maps, 0x40100, false), page(0x40100));
        maps.insert(0x40000, m(512, 0x8000_0000));
        maps.remove(&0x40180);
        assert_eq!(plan(&maps, 0x401ff, false), ProtectedPlan::Mapped);
    }
}
