//! Nested virtualization, memory side: shadow stage-2 MMUs.
//!
//! A guest hypervisor (L1) keeps the stage-2 tables of its own guest (L2)
//! in L1 memory: descriptors whose output addresses are L1 IPAs. The host
//! cannot let hardware walk them, so it builds a shadow stage-2 per
//! (guest VTTBR, guest VTCR) that maps L2 IPAs straight to host PAs:
//! - [`Vm::nested_get_mmu`] / [`Vm::nested_put_mmu`]: find or build the
//!   shadow for a guest stage-2 configuration and count its users; an entry
//!   with no user is recycled round-robin (unmapped and rebuilt). At most
//!   two per vCPU, as KVM.
//! - [`Vm::nested_fault`]: an L2 stage-2 fault walks the guest's tables (in
//!   L1 memory) for the L1 IPA and the guest's permissions, then resolves
//!   the L1 IPA like any fault (memslot, pinned host page, invalidation
//!   sequence), and installs the composition (guest permissions
//!   intersected with the host's) in the shadow. A miss in the guest's
//!   tables goes back to the guest hypervisor.
//! - Invalidation: whatever unmaps or write-protects the canonical stage-2
//!   (MMU notifiers, memslot changes, dirty logging) also unmaps every
//!   shadow (a shadow holds no mapping the canonical stage-2 would not
//!   allow); a trapped guest TLBI unmaps the shadows of that guest VMID.
//! - Teardown: the shadows live in `mmu::HostS2` with the
//!   canonical table and go with it, once (seed 003).

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::pte::{S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa, PAGE_SIZE};
use pkvm_pgtable::{MapFlags, PageTable, PtError, Stage2, TlbOps};

use crate::fault::GuestFault;
use crate::mmu::{HostS2, S2State};
use crate::platform::{HostPageCache, HostPlatform, PinnedPage, ProcessMemory, StageTwo};
use crate::vm::Vm;
use crate::vmid::Vmid;

/// The guest hypervisor's stage-2 configuration for one L2 guest: the
/// shadow MMU's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestS2Config {
    /// Guest VTTBR_EL2: root table (an L1 IPA) and VMID (bits 63:48).
    pub vttbr: u64,
    /// Guest VTCR_EL2 (T0SZ gives the L2 IPA size; 4K granule only).
    pub vtcr: u64,
}

impl GuestS2Config {
    /// The guest's VMID.
    pub const fn vmid(&self) -> u16 {
        (self.vttbr >> 48) as u16
    }
    /// The L1 IPA of the guest's root table.
    pub const fn root(&self) -> Ipa {
        Ipa(self.vttbr & 0x0000_ffff_ffff_f000)
    }
    /// The L2 IPA size in bits (64 - T0SZ).
    pub const fn ipa_bits(&self) -> u32 {
        64 - (self.vtcr & 0x3f) as u32
    }
    fn geometry(&self) -> Result<S2Geometry, NestedError> {
        S2Geometry::new(Granule::Size4K, self.ipa_bits())
            .map_err(|_| NestedError::BadVtcr(self.vtcr))
    }
}

/// Why a nested operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedError {
    /// The guest's VTCR asks for an IPA size the host cannot shadow (guest
    /// error).
    BadVtcr(u64),
    /// Every shadow MMU is in use (caller error: more loaded L2 contexts
    /// than two per vCPU).
    NoFreeShadow,
    /// The handle names no live shadow (caller error).
    StaleHandle,
    /// No memory for tables or the root.
    NoMemory,
    /// The guest's tables live outside its memory (guest error).
    BadGuestTable(Ipa),
    /// The host could not back an L1 IPA (no memslot or host page).
    BadL1Ipa(Ipa),
    /// The VM was torn down, or runs with hypervisor-managed stage-2.
    Dead,
}

impl fmt::Display for NestedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NestedError::BadVtcr(v) => write!(f, "guest VTCR {v:#x}: unsupported IPA size"),
            NestedError::NoFreeShadow => write!(f, "every shadow stage-2 MMU is in use"),
            NestedError::StaleHandle => write!(f, "no such shadow stage-2 MMU"),
            NestedError::NoMemory => write!(f, "out of memory"),
            NestedError::BadGuestTable(i) => {
                write!(
                    f,
                    "guest stage-2 table at L1 IPA {:#x} is not guest memory",
                    i.0
                )
            }
            NestedError::BadL1Ipa(i) => write!(f, "L1 IPA {:#x} is not backed", i.0),
            NestedError::Dead => write!(f, "the VM has no host-managed stage-2"),
        }
    }
}

/// A reference on a shadow MMU, from [`Vm::nested_get_mmu`]; give it back
/// with [`Vm::nested_put_mmu`].
#[derive(Debug, PartialEq, Eq)]
pub struct ShadowRef {
    index: usize,
    key: GuestS2Config,
}

/// What [`Vm::nested_fault`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedOutcome {
    /// The composed translation was installed (or already was).
    Mapped,
    /// An invalidation raced the fault: L2 retries.
    Retry,
    /// The guest's own stage-2 does not allow the access: the fault is the
    /// guest hypervisor's (KVM injects it into virtual EL2).
    ForwardToGuest {
        /// The L2 IPA.
        ipa: Ipa,
        /// A translation fault (else a permission fault).
        translation: bool,
    },
}

/// Nested statistics.
#[derive(Debug, Default)]
pub struct NestedStats {
    /// Shadow MMUs built.
    pub created: AtomicU64,
    /// Shadow MMUs freed (recycled or torn down).
    pub freed: AtomicU64,
    /// Shadow unmaps (notifiers, guest TLBIs, logging).
    pub unmaps: AtomicU64,
}

/// One shadow stage-2.
pub(crate) struct ShadowMmu {
    key: GuestS2Config,
    geo: S2Geometry,
    pt: PageTable<Stage2>,
    vmid: Vmid,
    refcnt: u32,
}

/// The VM's shadow MMUs (KVM's `nested_mmus`), part of the stage-2 state.
#[derive(Default)]
pub(crate) struct ShadowMmus {
    mmus: Vec<Option<ShadowMmu>>,
    next: usize,
}

fn root_order(geo: &S2Geometry) -> u32 {
    geo.root_pages.trailing_zeros()
}

fn free_shadow<P: HostPlatform>(p: &alloc::sync::Arc<P>, m: ShadowMmu) {
    let env = p.s2_env(m.vmid.get());
    env.tlbi_all();
    let mut cache = HostPageCache::new(p.clone());
    let root = m.pt.destroy(&env, &mut cache);
    drop(env);
    p.free_pages(root, root_order(&m.geo));
}

impl ShadowMmus {
    /// Frees every shadow (teardown: by the stage-2's one owner).
    pub fn destroy_all<P: HostPlatform>(self, p: &alloc::sync::Arc<P>) -> u64 {
        let mut n = 0;
        for m in self.mmus.into_iter().flatten() {
            // A vCPU may still hold a reference (the mm exited under it):
            // its handle then finds no stage-2 and gets `Dead`.
            free_shadow(p, m);
            n += 1;
        }
        n
    }

    /// Whether any shadow exists.
    pub fn is_empty(&self) -> bool {
        self.mmus.iter().all(Option::is_none)
    }

    /// Unmaps everything from the shadows matching `vmid` (all if `None`)
    /// in `[start, end)` of their L2 IPA space (all of it if `None`).
    pub fn unmap<P: HostPlatform>(
        &mut self,
        p: &alloc::sync::Arc<P>,
        vmid: Option<u16>,
        range: Option<(Ipa, Ipa)>,
    ) -> u64 {
        let mut n = 0;
        for m in self.mmus.iter_mut().flatten() {
            if vmid.is_some_and(|v| v != m.key.vmid()) {
                continue;
            }
            let (s, e) = range.unwrap_or((Ipa(0), Ipa(m.geo.ipa_size())));
            let e = Ipa(e.0.min(m.geo.ipa_size()));
            if s.0 < e.0 {
                crate::mmu::unmap_standard(p, m.vmid.get(), &mut m.pt, s, e);
                n += 1;
            }
        }
        n
    }
}

/// Reads the 8-byte descriptor at `l1_ipa` of the guest's memory.
fn read_guest_u64<P: HostPlatform, M: ProcessMemory>(
    vm: &Vm<P, M>,
    l1_ipa: Ipa,
) -> Result<u64, NestedError> {
    let slot = vm
        .slots
        .read()
        .find(l1_ipa)
        .copied()
        .ok_or(NestedError::BadGuestTable(l1_ipa))?;
    let pin = vm
        .mm
        .pin(slot.hva_of(l1_ipa.align_down(PAGE_SIZE)), false)
        .map_err(|_| NestedError::BadGuestTable(l1_ipa))?;
    let env = vm.platform.s2_env(0);
    let idx = ((l1_ipa.0 & (PAGE_SIZE - 1)) / 8) as usize;
    let v = pkvm_pgtable::PtMemory::table(&env, pin.pa())[idx].load(Ordering::Acquire);
    Ok(v)
}

/// Walks the guest's stage-2 for `l2`: the L1 IPA and permissions, or the
/// level where the walk found nothing.
fn walk_guest<P: HostPlatform, M: ProcessMemory>(
    vm: &Vm<P, M>,
    cfg: &GuestS2Config,
    geo: &S2Geometry,
    l2: Ipa,
) -> Result<Result<(Ipa, S2Prot), Level>, NestedError> {
    let mut table = cfg.root();
    let mut level = geo.start_level;
    // The concatenated root: the index covers the extra top bits.
    let shift = |l: Level| 12 + 9 * (3 - l.0 as u32);
    let mut idx = (l2.0 >> shift(level)) as usize;
    loop {
        let pte = S2Pte(read_guest_u64(vm, Ipa(table.0 + idx as u64 * 8))?);
        if !pte.is_valid() {
            return Ok(Err(level));
        }
        if pte.is_table(level) && level.0 < 3 {
            table = Ipa(pte.oa().0);
            level = Level(level.0 + 1);
            idx = ((l2.0 >> shift(level)) & 0x1ff) as usize;
            continue;
        }
        let size = 1u64 << shift(level);
        let out = Ipa(pte.oa().0 + (l2.0 & (size - 1) & !(PAGE_SIZE - 1)));
        return Ok(Ok((out, pte.prot(Default::default()) & S2Prot::PERMS)));
    }
}

impl<P: HostPlatform, M: ProcessMemory> Vm<P, M> {
    /// Nested statistics.
    pub fn nested_stats(&self) -> &NestedStats {
        &self.nested_stats
    }

    /// Finds or builds the shadow MMU for `cfg` and takes a reference on it
    /// (a vCPU entering that L2 context). The root is allocated outside the
    /// MMU lock.
    ///
    /// # Errors
    /// See [`NestedError`].
    pub fn nested_get_mmu(&self, cfg: GuestS2Config) -> Result<ShadowRef, NestedError> {
        let geo = cfg.geometry()?;
        let order = root_order(&geo);
        let root = self
            .platform
            .alloc_pages(order)
            .ok_or(NestedError::NoMemory)?;
        let vmid = Vmid::alloc();
        let mut state = self.mmu.state.write();
        let Some(S2State::Standard(s2)) = state.as_mut() else {
            drop(state);
            self.platform.free_pages(root, order);
            return Err(NestedError::Dead);
        };
        let r = self.install_shadow(s2, cfg, geo, root, vmid);
        drop(state);
        match r {
            Ok((r, None)) => Ok(r),
            Ok((r, Some(unused))) => {
                // Found an existing shadow: the new root was not needed.
                self.platform.free_pages(unused, order);
                Ok(r)
            }
            Err(e) => {
                self.platform.free_pages(root, order);
                Err(e)
            }
        }
    }

    /// Under the MMU write lock: a reference on the shadow for `cfg`,
    /// building it with `root` in a free or recycled entry if needed.
    /// Returns `root` when it was not used.
    fn install_shadow(
        &self,
        s2: &mut HostS2,
        cfg: GuestS2Config,
        geo: S2Geometry,
        root: Pa,
        vmid: Option<Vmid>,
    ) -> Result<(ShadowRef, Option<Pa>), NestedError> {
        let cap = 2 * self.cfg.nr_vcpus;
        let list = &mut s2.nested;
        if let Some(i) = list
            .mmus
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.key == cfg))
        {
            if let Some(m) = list.mmus[i].as_mut() {
                m.refcnt += 1;
            }
            return Ok((ShadowRef { index: i, key: cfg }, Some(root)));
        }
        let vmid = vmid.ok_or(NestedError::NoFreeShadow)?;
        let index = if list.mmus.len() < cap {
            list.mmus.push(None);
            list.mmus.len() - 1
        } else {
            let n = list.mmus.len();
            let i = (0..n)
                .map(|k| (list.next + k) % n)
                .find(|&i| list.mmus[i].as_ref().is_none_or(|m| m.refcnt == 0))
                .ok_or(NestedError::NoFreeShadow)?;
            list.next = (i + 1) % n;
            if let Some(old) = list.mmus[i].take() {
                free_shadow(&self.platform, old);
                self.nested_stats.freed.fetch_add(1, Ordering::Relaxed);
            }
            i
        };
        let pt = PageTable::<Stage2>::new(root, geo, self.platform.s2_features());
        list.mmus[index] = Some(ShadowMmu {
            key: cfg,
            geo,
            pt,
            vmid,
            refcnt: 1,
        });
        self.nested_stats.created.fetch_add(1, Ordering::Relaxed);
        Ok((ShadowRef { index, key: cfg }, None))
    }

    /// Drops a reference from [`Vm::nested_get_mmu`].
    pub fn nested_put_mmu(&self, r: ShadowRef) {
        let mut state = self.mmu.state.write();
        if let Some(S2State::Standard(s2)) = state.as_mut() {
            if let Some(Some(m)) = s2.nested.mmus.get_mut(r.index) {
                if m.key == r.key {
                    debug_assert!(m.refcnt > 0, "shadow MMU reference count underflow");
                    m.refcnt = m.refcnt.saturating_sub(1);
                }
            }
        }
    }

    /// What entering the L2 context of `r` needs (the shadow's VMID and
    /// root).
    ///
    /// # Errors
    /// [`NestedError::StaleHandle`], [`NestedError::Dead`].
    pub fn nested_stage_two(&self, r: &ShadowRef) -> Result<StageTwo, NestedError> {
        let state = self.mmu.state.read();
        let Some(S2State::Standard(s2)) = state.as_ref() else {
            return Err(NestedError::Dead);
        };
        match s2.nested.mmus.get(r.index) {
            Some(Some(m)) if m.key == r.key => Ok(StageTwo::Host {
                vmid: m.vmid.get(),
                root: m.pt.root(),
                geo: m.geo,
            }),
            _ => Err(NestedError::StaleHandle),
        }
    }

    /// Translation of `l2` in the shadow of `r` (tests, statistics).
    pub fn nested_translate(&self, r: &ShadowRef, l2: Ipa) -> Option<(Pa, S2Prot)> {
        let state = self.mmu.state.read();
        let Some(S2State::Standard(s2)) = state.as_ref() else {
            return None;
        };
        let m = s2.nested.mmus.get(r.index)?.as_ref()?;
        let env = self.platform.s2_env(m.vmid.get());
        m.pt.translate(&env, l2).map(|(pa, prot, _)| (pa, prot))
    }

    /// Shadow MMUs alive now.
    pub fn nested_live(&self) -> usize {
        match self.mmu.state.read().as_ref() {
            Some(S2State::Standard(s2)) => s2.nested.mmus.iter().flatten().count(),
            _ => 0,
        }
    }

    /// A trapped guest TLBI: the guest hypervisor changed its stage-2 for
    /// `vmid` in `range` (all of it if `None`); the shadows drop it.
    pub fn nested_guest_tlbi(&self, vmid: u16, range: Option<(Ipa, Ipa)>) {
        let mut state = self.mmu.state.write();
        if let Some(S2State::Standard(s2)) = state.as_mut() {
            let n = s2.nested.unmap(&self.platform, Some(vmid), range);
            self.nested_stats.unmaps.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Unmaps every shadow (the canonical stage-2 lost or narrowed a
    /// mapping). Called under the MMU write lock.
    pub(crate) fn nested_unmap_all(&self, s2: &mut HostS2) {
        if !s2.nested.is_empty() {
            let n = s2.nested.unmap(&self.platform, None, None);
            self.nested_stats.unmaps.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// An L2 stage-2 fault on the shadow of `r`: walks the guest's tables,
    /// then faults the L1 page in on the host side and maps the composition.
    ///
    /// # Errors
    /// See [`NestedError`].
    pub fn nested_fault(
        &self,
        r: &ShadowRef,
        fault: &GuestFault,
        cache: &mut HostPageCache<P>,
    ) -> Result<NestedOutcome, NestedError> {
        let seq = self.mmu.seq();
        let cfg = r.key;
        let geo = cfg.geometry()?;
        let l2 = fault.page();
        let (l1, gprot) = match walk_guest(self, &cfg, &geo, l2)? {
            Ok(t) => t,
            Err(_) => {
                return Ok(NestedOutcome::ForwardToGuest {
                    ipa: l2,
                    translation: true,
                })
            }
        };
        if (fault.write && !gprot.contains(S2Prot::W)) || !gprot.contains(S2Prot::R) {
            return Ok(NestedOutcome::ForwardToGuest {
                ipa: l2,
                translation: false,
            });
        }
        let slot = self
            .slots
            .read()
            .find(l1)
            .copied()
            .ok_or(NestedError::BadL1Ipa(l1))?;
        let write = fault.write;
        let pin = self
            .mm
            .pin(slot.hva_of(l1), write)
            .map_err(|_| NestedError::BadL1Ipa(l1))?;
        let mut prot = S2Prot::R | (gprot & S2Prot::X);
        if pin.writable() && !slot.readonly() && (!slot.logging() || write) {
            prot |= gprot & S2Prot::W;
        }
        cache
            .topup((3 - geo.start_level.0) as usize)
            .map_err(|()| NestedError::NoMemory)?;
        let out = self.nested_map(r, seq, l1, l2, pin.pa(), prot, cache)?;
        drop(pin);
        if out == NestedOutcome::Mapped && prot.contains(S2Prot::W) {
            self.mark_page_dirty(&slot, l1);
        }
        Ok(out)
    }

    /// Maps `l2 -> pa` in the shadow of `r` under the MMU write lock, unless
    /// an invalidation of `l1` ran since `seq`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn nested_map(
        &self,
        r: &ShadowRef,
        seq: u64,
        l1: Ipa,
        l2: Ipa,
        pa: Pa,
        prot: S2Prot,
        cache: &mut HostPageCache<P>,
    ) -> Result<NestedOutcome, NestedError> {
        let mut state = self.mmu.state.write();
        let Some(S2State::Standard(s2)) = state.as_mut() else {
            return Err(NestedError::Dead);
        };
        if self.mmu.retry(seq, l1) {
            return Ok(NestedOutcome::Retry);
        }
        let m = match s2.nested.mmus.get_mut(r.index) {
            Some(Some(m)) if m.key == r.key => m,
            _ => return Err(NestedError::StaleHandle),
        };
        let env = self.platform.s2_env(m.vmid.get());
        match m
            .pt
            .map(&env, l2, PAGE_SIZE, pa, prot, MapFlags::FORCE_PAGE, cache)
        {
            Ok(()) => Ok(NestedOutcome::Mapped),
            // Mapped already: a permission upgrade (or another vCPU won).
            Err(PtError::Again) => match m.pt.relax_perms(&env, l2, prot) {
                Ok(()) | Err(PtError::Again) => Ok(NestedOutcome::Mapped),
                Err(_) => Ok(NestedOutcome::Retry),
            },
            Err(PtError::NoMemory) => Err(NestedError::NoMemory),
            Err(e) => {
                debug_assert!(false, "shadow map failed: {e:?}");
                Err(NestedError::NoMemory)
            }
        }
    }
}
