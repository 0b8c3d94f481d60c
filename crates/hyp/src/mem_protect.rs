//! Page ownership (pKVM's mem_protect): who may access each physical page.
//!
//! States: host and hyp states live in the page metadata (see
//! [`crate::meta`]); a guest's state lives in the software bits of its
//! stage-2 PTE (OWNED = none, SHARED_OWNED = SW0, SHARED_BORROWED = SW1).
//! Every page is in exactly one of these combinations:
//!
//! | host          | hyp             | guests                         |
//! |---------------|-----------------|--------------------------------|
//! | OWNED         | NOPAGE          | -                              |
//! | SHARED_OWNED  | SHARED_BORROWED | - (shared with the hyp)        |
//! | SHARED_OWNED  | NOPAGE          | `guest_shares` x SHARED_BORROWED (non-protected guests) |
//! | NOPAGE        | OWNED           | - (pool, VM state, memcaches, guest tables) |
//! | NOPAGE        | NOPAGE          | one guest OWNED (donated)      |
//! | SHARED_BORROWED | SHARED_OWNED  | - (the hypervisor's code the host runs: [`crate::HypConfig::host_rx`]) |
//!
//! A page the host shared with the hyp may be pinned by the hyp while it
//! uses it ([`Hyp::hyp_pin_shared`], as pKVM's `hyp_pin_shared_mem`): a
//! pin count in its metadata, non-zero only in that state; the host's
//! unshare is refused while it is, and a shared page is never donated or
//! shared with a guest, so a pinned page stays the host's and the hyp's.
//!
//! The host's stage-2 agrees: pages the host may access have either no
//! entry (mapped lazily by [`Hyp::host_mem_abort`]) or a valid identity
//! entry (read-only and executable for the hypervisor's code the host
//! runs, never writable); hyp pages carry an owner annotation, donated
//! pages a (handle, gfn) donation annotation, always at page granularity
//! outside the pool.
//!
//! Every transition checks all its preconditions first and reserves the
//! table pages its commit may need; the commit then cannot fail. A refused
//! transition leaves no trace.

use pkvm_arch::pte::{Annotation, El2Prot, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Gfn, Ipa, Level, Pa, Pfn, Va, PAGE_SIZE};
use pkvm_pgtable::{El2, MapFlags, PageTable, PtError, Stage2};

use crate::error::HypError;
use crate::hyp::{Hyp, Reserve, HOST_DEV_TABLES, OWNER_HYP};
use crate::meta::{MemMap, PageState};
use crate::platform::HypPlatform;
use crate::vm::{guest_state, HypVm, McCache};

/// What the host's access that faulted at stage-2 did (`ESR_EL2.WnR` of
/// a data abort; an instruction fetch is a read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAccess {
    /// A load or an instruction fetch.
    Read,
    /// A store (or an atomic read-modify-write).
    Write,
}

/// The host's stage-2 and the host/hyp page states: only reachable through
/// the host MMU lock, so `&mut HostMmu` is the proof the lock is held.
pub struct HostMmu {
    pub(crate) pgt: PageTable<Stage2>,
    mem: MemMap,
    /// Pool pages taken for table pages by device-mapping faults since the
    /// last reset (at most [`HOST_DEV_TABLES`]).
    dev_tables: u64,
}

/// Panics if a commit step fails although its checks passed (a bug).
pub(crate) fn commit<T>(r: Result<T, PtError>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("hyp bug: {what} failed after its checks passed: {e}"),
    }
}

impl HostMmu {
    pub(crate) fn new(pgt: PageTable<Stage2>, mem: MemMap) -> HostMmu {
        HostMmu {
            pgt,
            mem,
            dev_tables: 0,
        }
    }

    /// The host stage-2's geometry.
    pub fn geometry(&self) -> S2Geometry {
        self.pgt.geometry()
    }

    pub(crate) fn host(&self, pa: Pa) -> PageState {
        self.mem.host_state(pa)
    }

    pub(crate) fn hyp(&self, pa: Pa) -> PageState {
        self.mem.hyp_state(pa)
    }

    pub(crate) fn shares(&self, pa: Pa) -> u16 {
        self.mem.guest_shares(pa)
    }

    pub(crate) fn set(&mut self, pa: Pa, host: PageState, hyp: PageState) {
        self.mem.set_host_state(pa, host);
        self.mem.set_hyp_state(pa, hyp);
    }

    pub(crate) fn set_shares(&mut self, pa: Pa, n: u16) {
        self.mem.set_guest_shares(pa, n);
    }

    /// Checks that every page of `[pa, pa + nr)` is host `host` / hyp `hyp`
    /// and, for host-owned pages, not shared with any guest.
    pub(crate) fn expect(
        &self,
        pa: Pa,
        nr: u64,
        host: PageState,
        hyp: PageState,
    ) -> Result<(), HypError> {
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            let (h, y) = (self.host(p), self.hyp(p));
            if h != host || y != hyp || (h == PageState::Owned && self.shares(p) != 0) {
                return Err(HypError::WrongState {
                    pa: p,
                    host: h,
                    hyp: y,
                });
            }
        }
        Ok(())
    }
}

impl<P: HypPlatform> Hyp<P> {
    /// Validates a host-provided range: `nr >= 1` pages of normal memory
    /// inside one host memory region.
    pub(crate) fn check_memory(&self, pa: Pa, nr: u64) -> Result<(), HypError> {
        let len = nr.checked_mul(PAGE_SIZE).ok_or(HypError::BadArgument {
            what: "page count",
            value: nr,
        })?;
        if nr == 0 {
            return Err(HypError::BadArgument {
                what: "page count",
                value: nr,
            });
        }
        if !pa.is_aligned(PAGE_SIZE)
            || self.region_of(pa, len).is_none()
            || !self.mem.contains(pa, nr)
        {
            return Err(HypError::BadAddress { pa });
        }
        Ok(())
    }

    /// Table pages a commit may need to annotate or map one contiguous
    /// range of at most 512 pages in the host stage-2.
    pub(crate) fn host_range_tables(&self) -> usize {
        2 * self.host_levels
    }

    // ---- host <-> hyp sharing ------------------------------------------

    /// host OWNED & hyp NOPAGE -> host SHARED_OWNED, hyp SHARED_BORROWED.
    /// The host keeps its mapping.
    ///
    /// # Errors
    /// [`HypError::BadAddress`], [`HypError::WrongState`].
    pub fn host_share_hyp(&self, pfn: Pfn) -> Result<(), HypError> {
        let pa = pfn.addr();
        self.check_memory(pa, 1)?;
        let mut host = self.host.lock();
        host.expect(pa, 1, PageState::Owned, PageState::NoPage)?;
        let mut pgd = self.pgd.lock();
        let mut res = Reserve::new(&self.pool, &self.plat, self.el2_tables_needed(&pgd, pa, 1))?;
        // Commit.
        self.hyp_map(&mut pgd, pa, 1, &mut res);
        host.set(pa, PageState::SharedOwned, PageState::SharedBorrowed);
        Ok(())
    }

    /// The reverse of [`Hyp::host_share_hyp`]; refused while the hyp has the
    /// page pinned.
    ///
    /// # Errors
    /// [`HypError::BadAddress`], [`HypError::WrongState`], [`HypError::Pinned`].
    pub fn host_unshare_hyp(&self, pfn: Pfn) -> Result<(), HypError> {
        let pa = pfn.addr();
        self.check_memory(pa, 1)?;
        let mut host = self.host.lock();
        host.expect(pa, 1, PageState::SharedOwned, PageState::SharedBorrowed)?;
        if self.mem.hyp_pins(pa) != 0 {
            return Err(HypError::Pinned { pa });
        }
        let mut pgd = self.pgd.lock();
        let mut res = Reserve::new(&self.pool, &self.plat, 0)?;
        // Commit.
        self.hyp_unmap(&mut pgd, pa, 1, &mut res);
        host.set(pa, PageState::Owned, PageState::NoPage);
        Ok(())
    }

    /// Pins `nr` pages the host shared with the hyp, so the host cannot
    /// unshare them while the hyp uses them (pKVM's `hyp_pin_shared_mem`):
    /// a shared page can be neither donated nor shared with a guest, so a
    /// pinned page stays the host's and the hyp's until every pin is
    /// dropped ([`Hyp::hyp_unpin_shared`]). All or nothing.
    ///
    /// # Errors
    /// [`HypError::BadAddress`], [`HypError::WrongState`] if a page is not
    /// shared with the hyp, [`HypError::TooManyShares`] on pin overflow.
    pub fn hyp_pin_shared(&self, pa: Pa, nr: u64) -> Result<(), HypError> {
        self.check_memory(pa, nr)?;
        let host = self.host.lock();
        // Only pages the host shared with the hyp: a host-owned page could
        // be donated meanwhile, a hyp or guest page is not the host's.
        host.expect(pa, nr, PageState::SharedOwned, PageState::SharedBorrowed)?;
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            if self.mem.hyp_pins(p) == u16::MAX {
                return Err(HypError::TooManyShares { pa: p });
            }
        }
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            self.mem.set_hyp_pins(p, self.mem.hyp_pins(p) + 1);
        }
        Ok(())
    }

    /// Drops pins taken by [`Hyp::hyp_pin_shared`].
    ///
    /// # Errors
    /// [`HypError::BadAddress`]; [`HypError::Internal`] if a page is not
    /// pinned (a hypervisor bug).
    pub fn hyp_unpin_shared(&self, pa: Pa, nr: u64) -> Result<(), HypError> {
        self.check_memory(pa, nr)?;
        let _host = self.host.lock();
        if (0..nr).any(|i| self.mem.hyp_pins(pa + i * PAGE_SIZE) == 0) {
            return Err(HypError::Internal("unpin of an unpinned page"));
        }
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            self.mem.set_hyp_pins(p, self.mem.hyp_pins(p) - 1);
        }
        Ok(())
    }

    // ---- host <-> hyp donation -----------------------------------------

    /// Commit of host OWNED -> hyp OWNED for `[pa, pa + nr)` (checked with
    /// `expect(.., Owned, NoPage)` before): annotate each page owner=hyp in
    /// the host stage-2 (page granularity, so giving pages back never needs
    /// a table page).
    pub(crate) fn commit_host_donate_hyp(
        &self,
        host: &mut HostMmu,
        pgd: &mut PageTable<El2>,
        pa: Pa,
        nr: u64,
        res: &mut Reserve<'_, P>,
    ) {
        self.hyp_map(pgd, pa, nr, res);
        let env = self.host_env();
        let ann = S2Pte::owner_annotation(OWNER_HYP);
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            commit(
                host.pgt.annotate(&env, Ipa(p.0), PAGE_SIZE, ann, res),
                "host donate annotation",
            );
            host.set(p, PageState::NoPage, PageState::Owned);
        }
    }

    /// Commit of hyp OWNED -> host OWNED (checked with
    /// `expect(.., NoPage, Owned)` before): zero, then map back.
    pub(crate) fn commit_hyp_donate_host(
        &self,
        host: &mut HostMmu,
        pgd: &mut PageTable<El2>,
        pa: Pa,
        nr: u64,
        res: &mut Reserve<'_, P>,
    ) {
        self.hyp_unmap(pgd, pa, nr, res);
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            self.plat.zero_page(p);
            self.host_map_back(host, p, res);
            host.set(p, PageState::Owned, PageState::NoPage);
        }
    }

    /// Maps `[pa, pa + nr)` into the hyp's own address space (linear, RW,
    /// never executable; page granularity, so unmapping one page later
    /// never needs a table page). Commit step: the caller reserved
    /// [`Hyp::el2_tables_needed`] pages.
    pub(crate) fn hyp_map(
        &self,
        pgd: &mut PageTable<El2>,
        pa: Pa,
        nr: u64,
        res: &mut Reserve<'_, P>,
    ) {
        let env = self.el2_env();
        commit(
            pgd.map(
                &env,
                Va(pa.0),
                nr * PAGE_SIZE,
                pa,
                El2Prot::RW,
                MapFlags::FORCE_PAGE,
                res,
            ),
            "hyp stage-1 map",
        );
    }

    /// Table pages mapping `[pa, pa + nr)` (at most 512 pages) into the
    /// hyp's stage-1 needs: the levels missing below the deepest existing
    /// table at each end of the range (usually none, so sharing a page
    /// costs no pool traffic). Checked with the hyp page-table lock held.
    pub(crate) fn el2_tables_needed(&self, pgd: &PageTable<El2>, pa: Pa, nr: u64) -> usize {
        // Every page of a run of at most 512 lies under the tables of its
        // first or its last page, so the two ends bound what is needed.
        let missing = |va: u64| 3 - pgd.get_leaf(&self.plat, Va(va)).level.0 as usize;
        missing(pa.0) + missing(pa.0 + (nr.max(1) - 1) * PAGE_SIZE)
    }

    /// Removes `[pa, pa + nr)` from the hyp's own address space (emptied
    /// tables go back through `res`). Commit step: needs no memory.
    pub(crate) fn hyp_unmap(
        &self,
        pgd: &mut PageTable<El2>,
        pa: Pa,
        nr: u64,
        res: &mut Reserve<'_, P>,
    ) {
        let env = self.el2_env();
        commit(
            pgd.unmap(&env, Va(pa.0), nr * PAGE_SIZE, res),
            "hyp stage-1 unmap",
        );
    }

    /// Gives the host its identity mapping of one page back (replacing an
    /// annotation).
    pub(crate) fn host_map_back(&self, host: &mut HostMmu, pa: Pa, res: &mut Reserve<'_, P>) {
        let env = self.host_env();
        commit(
            host.pgt.map(
                &env,
                Ipa(pa.0),
                PAGE_SIZE,
                pa,
                S2Prot::RWX,
                MapFlags::FORCE_PAGE,
                res,
            ),
            "host map back",
        );
    }

    /// host OWNED -> hyp OWNED for `nr` pages at `pa` (used for VM state and
    /// memcache pages; also available to the platform).
    ///
    /// # Errors
    /// [`HypError::BadAddress`], [`HypError::WrongState`],
    /// [`HypError::NoMemory`] if the host stage-2 needs a table page the pool
    /// cannot give.
    pub fn host_donate_hyp(&self, pa: Pa, nr: u64) -> Result<(), HypError> {
        self.check_memory(pa, nr)?;
        if nr > 512 {
            return Err(HypError::BadArgument {
                what: "page count",
                value: nr,
            });
        }
        let mut host = self.host.lock();
        let mut pgd = self.pgd.lock();
        host.expect(pa, nr, PageState::Owned, PageState::NoPage)?;
        let el2 = self.el2_tables_needed(&pgd, pa, nr);
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_range_tables() + el2)?;
        self.commit_host_donate_hyp(&mut host, &mut pgd, pa, nr, &mut res);
        Ok(())
    }

    // ---- the host's stage-2 ----------------------------------------------

    /// Handles a host stage-2 fault at `pa` by an `access`: maps the
    /// largest block around it that is unmapped, unannotated and inside one
    /// memory region (MMIO outside the managed range is mapped as a device
    /// page; the hypervisor's code the host runs,
    /// [`crate::HypConfig::host_rx`], read-only and executable, on a read
    /// or an instruction fetch only).
    ///
    /// # Errors
    /// [`HypError::HostAccessDenied`] if the host does not own the page, or
    /// writes a page it may only read (the caller injects an abort into the
    /// host); [`HypError::NoMemory`] if the
    /// pool cannot give a table page; [`HypError::Again`] if the entry is
    /// being changed.
    pub fn host_mem_abort(&self, pa: Pa, access: HostAccess) -> Result<(), HypError> {
        let page = pa.align_down(PAGE_SIZE);
        let mut host = self.host.lock();
        let env = self.host_env();
        let leaf = host.pgt.get_leaf(&env, Ipa(page.0));
        let pte = S2Pte(leaf.pte);
        if pte.is_valid() {
            // A write to a read-only mapping (the hypervisor's code) is a
            // permission fault the host cannot resolve; anything else:
            // another CPU mapped it first.
            if access == HostAccess::Write && !pte.prot(self.feat).contains(S2Prot::W) {
                return Err(HypError::HostAccessDenied { pa });
            }
            return Ok(());
        }
        if pte.is_locked() {
            return Err(HypError::Again);
        }
        if pte.0 != 0 {
            return Err(HypError::HostAccessDenied { pa });
        }
        let (region, prot) = if let Some(r) = self.region_of(page, PAGE_SIZE) {
            (*r, S2Prot::RWX)
        } else if let Some(r) = self.rx_region_of(page, PAGE_SIZE) {
            if access == HostAccess::Write {
                return Err(HypError::HostAccessDenied { pa });
            }
            (*r, S2Prot::R | S2Prot::X)
        } else {
            if self.mem.index(page).is_some() {
                return Err(HypError::HostAccessDenied { pa });
            }
            return self.host_map_device(&mut host, page, pa);
        };
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_levels)?;
        let granule = host.pgt.geometry().granule;
        let mut level = leaf.level.0.max(1);
        loop {
            let size = granule.level_size(Level(level));
            let base = page.align_down(size);
            if level == 3 || region.contains(base, size) {
                return match host.pgt.map(
                    &env,
                    Ipa(base.0),
                    size,
                    base,
                    prot,
                    MapFlags::NONE,
                    &mut res,
                ) {
                    Ok(()) | Err(PtError::Again) => Ok(()),
                    Err(e) => Err(HypError::Internal(match e {
                        PtError::NoMemory => "host stage-2 reserve too small",
                        _ => "host stage-2 map failed",
                    })),
                };
            }
            level += 1;
        }
    }

    /// Maps the device page `page` (outside the managed memory) for the
    /// host. Its table pages count against [`HOST_DEV_TABLES`]; when the
    /// budget would be exceeded, every host device mapping is removed first
    /// (the host faults them back in) and the count starts over.
    fn host_map_device(&self, host: &mut HostMmu, page: Pa, pa: Pa) -> Result<(), HypError> {
        if host.dev_tables + self.host_levels as u64 > HOST_DEV_TABLES {
            self.host_unmap_devices(host);
        }
        let env = self.host_env();
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_levels)?;
        let before = res.len();
        let prot = S2Prot::RW | S2Prot::DEVICE;
        let r = host.pgt.map(
            &env,
            Ipa(page.0),
            PAGE_SIZE,
            page,
            prot,
            MapFlags::FORCE_PAGE,
            &mut res,
        );
        host.dev_tables += before.saturating_sub(res.len()) as u64;
        match r {
            Ok(()) | Err(PtError::Again) => Ok(()),
            Err(_) => Err(HypError::HostAccessDenied { pa }),
        }
    }

    /// Removes every host mapping outside the managed memory (device
    /// mappings only: RAM blocks never leave their region, annotations are
    /// all inside) and gives their emptied table pages back to the pool.
    fn host_unmap_devices(&self, host: &mut HostMmu) {
        let env = self.host_env();
        // Unmapping needs no table page: no block crosses the range edges.
        let mut none = Reserve::empty(&self.pool, &self.plat);
        let (lo, hi) = (self.mem.start().0, self.mem.end().0);
        let top = host.pgt.geometry().ipa_size();
        for (start, end) in [(0, lo), (hi.min(top), top)] {
            if start < end {
                commit(
                    host.pgt.unmap(&env, Ipa(start), end - start, &mut none),
                    "host device unmap",
                );
            }
        }
        host.dev_tables = 0;
    }

    /// The host stage-2's root table and geometry, for the platform that
    /// enters the host under it (`VTTBR_EL2` with VMID 0, `VTCR_EL2`).
    pub fn host_stage2(&self) -> (Pa, S2Geometry) {
        let host = self.host.lock();
        (host.pgt.root(), host.pgt.geometry())
    }

    /// The host stage-2 entry covering `pa` (tests and the simulator).
    pub fn host_pte(&self, pa: Pa) -> (S2Pte, Level) {
        let host = self.host.lock();
        let leaf = host.pgt.get_leaf(&self.host_env(), Ipa(pa.0));
        (S2Pte(leaf.pte), leaf.level)
    }

    // ---- host <-> guest ----------------------------------------------------

    /// host OWNED (or SHARED_OWNED toward guests) & guest NOPAGE ->
    /// host SHARED_OWNED (+1 share), guest SHARED_BORROWED with `prot`.
    pub(crate) fn share_guest_locked(
        &self,
        host: &mut HostMmu,
        vm: &mut HypVm,
        pfn: Pfn,
        gfn: Gfn,
        prot: S2Prot,
    ) -> Result<(), HypError> {
        if vm.protected {
            return Err(HypError::WrongVmKind { handle: vm.handle });
        }
        let pa = pfn.addr();
        self.check_memory(pa, 1)?;
        let ipa = vm.check_gfn(gfn, 1)?;
        let (h, y, n) = (host.host(pa), host.hyp(pa), host.shares(pa));
        let ok = y == PageState::NoPage
            && (h == PageState::Owned || (h == PageState::SharedOwned && n > 0));
        if !ok {
            return Err(HypError::WrongState {
                pa,
                host: h,
                hyp: y,
            });
        }
        if n == u16::MAX {
            return Err(HypError::TooManyShares { pa });
        }
        let env = self.guest_env(vm.vmid);
        if vm.pgt.get_leaf(&env, ipa).pte != 0 {
            return Err(HypError::GfnMapped { gfn });
        }
        if vm.memcache.len() < vm.levels() {
            return Err(HypError::NoMemory);
        }
        // Commit.
        let mut mc = McCache::new(&mut vm.memcache, &mut vm.tables, &self.plat);
        let flags = MapFlags::FORCE_PAGE | MapFlags::NO_REPLACE;
        commit(
            vm.pgt
                .map(&env, ipa, PAGE_SIZE, pa, prot | S2Prot::SW1, flags, &mut mc),
            "guest share map",
        );
        host.set(pa, PageState::SharedOwned, PageState::NoPage);
        host.set_shares(pa, n + 1);
        Ok(())
    }

    /// guest SHARED_BORROWED -> NOPAGE; host share count -1, OWNED at zero.
    pub(crate) fn unshare_guest_locked(
        &self,
        host: &mut HostMmu,
        vm: &mut HypVm,
        gfn: Gfn,
    ) -> Result<(), HypError> {
        if vm.protected {
            return Err(HypError::WrongVmKind { handle: vm.handle });
        }
        let ipa = vm.check_gfn(gfn, 1)?;
        let env = self.guest_env(vm.vmid);
        let pte = vm
            .leaf_page(&env, ipa)
            .ok_or(HypError::GfnNotMapped { gfn })?;
        if guest_state(pte, vm.pgt.features()) != PageState::SharedBorrowed {
            return Err(HypError::GfnNotMapped { gfn });
        }
        let pa = pte.oa();
        let n = host.shares(pa);
        if host.host(pa) != PageState::SharedOwned || n == 0 {
            return Err(HypError::Internal(
                "guest-borrowed page not shared by the host",
            ));
        }
        // Commit.
        let mut mc = McCache::new(&mut vm.memcache, &mut vm.tables, &self.plat);
        commit(
            vm.pgt.unmap(&env, ipa, PAGE_SIZE, &mut mc),
            "guest unshare unmap",
        );
        self.drop_guest_share(host, pa, n);
        Ok(())
    }

    fn drop_guest_share(&self, host: &mut HostMmu, pa: Pa, n: u16) {
        host.set_shares(pa, n - 1);
        if n == 1 {
            host.set(pa, PageState::Owned, PageState::NoPage);
        }
    }

    /// host OWNED -> guest OWNED (protected VMs): the host entry is
    /// annotated with (handle, gfn).
    pub(crate) fn donate_guest_locked(
        &self,
        host: &mut HostMmu,
        vm: &mut HypVm,
        pfn: Pfn,
        gfn: Gfn,
    ) -> Result<(), HypError> {
        if !vm.protected {
            return Err(HypError::WrongVmKind { handle: vm.handle });
        }
        let pa = pfn.addr();
        self.check_memory(pa, 1)?;
        let ipa = vm.check_gfn(gfn, 1)?;
        host.expect(pa, 1, PageState::Owned, PageState::NoPage)?;
        let env = self.guest_env(vm.vmid);
        if vm.pgt.get_leaf(&env, ipa).pte != 0 {
            return Err(HypError::GfnMapped { gfn });
        }
        if vm.memcache.len() < vm.levels() {
            return Err(HypError::NoMemory);
        }
        let ann = S2Pte::donation_annotation(vm.handle, gfn.0).ok_or(HypError::BadArgument {
            what: "gfn",
            value: gfn.0,
        })?;
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_levels)?;
        // Commit.
        let henv = self.host_env();
        commit(
            host.pgt
                .annotate(&henv, Ipa(pa.0), PAGE_SIZE, ann, &mut res),
            "host donation annotation",
        );
        host.set(pa, PageState::NoPage, PageState::NoPage);
        let mut mc = McCache::new(&mut vm.memcache, &mut vm.tables, &self.plat);
        let flags = MapFlags::FORCE_PAGE | MapFlags::NO_REPLACE;
        commit(
            vm.pgt
                .map(&env, ipa, PAGE_SIZE, pa, S2Prot::RWX, flags, &mut mc),
            "guest donate map",
        );
        Ok(())
    }

    /// Gives one page of a dying guest back to the host: a donated page is
    /// zeroed and becomes host OWNED; a shared one drops its share.
    pub(crate) fn reclaim_locked(
        &self,
        host: &mut HostMmu,
        vm: &mut HypVm,
        gfn: Gfn,
    ) -> Result<(), HypError> {
        let ipa = vm.check_gfn(gfn, 1)?;
        let env = self.guest_env(vm.vmid);
        let pte = vm
            .leaf_page(&env, ipa)
            .ok_or(HypError::GfnNotMapped { gfn })?;
        let pa = pte.oa();
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_levels)?;
        match guest_state(pte, vm.pgt.features()) {
            PageState::Owned => {
                self.check_donated(host, vm.handle, pa, gfn)?;
                // Commit.
                self.plat.zero_page(pa);
                let mut mc = McCache::new(&mut vm.memcache, &mut vm.tables, &self.plat);
                commit(vm.pgt.unmap(&env, ipa, PAGE_SIZE, &mut mc), "reclaim unmap");
                self.host_map_back(host, pa, &mut res);
                host.set(pa, PageState::Owned, PageState::NoPage);
            }
            PageState::SharedBorrowed => {
                let n = host.shares(pa);
                if host.host(pa) != PageState::SharedOwned || n == 0 {
                    return Err(HypError::Internal(
                        "guest-borrowed page not shared by the host",
                    ));
                }
                let mut mc = McCache::new(&mut vm.memcache, &mut vm.tables, &self.plat);
                commit(vm.pgt.unmap(&env, ipa, PAGE_SIZE, &mut mc), "reclaim unmap");
                self.drop_guest_share(host, pa, n);
            }
            _ => return Err(HypError::GfnNotMapped { gfn }),
        }
        Ok(())
    }

    /// Checks that `pa` is donated to guest `handle` at `gfn`.
    pub(crate) fn check_donated(
        &self,
        host: &HostMmu,
        handle: u16,
        pa: Pa,
        gfn: Gfn,
    ) -> Result<(), HypError> {
        let (h, y) = (host.host(pa), host.hyp(pa));
        let ann = S2Pte(host.pgt.get_leaf(&self.host_env(), Ipa(pa.0)).pte).annotation();
        if h != PageState::NoPage
            || y != PageState::NoPage
            || ann != Some(Annotation::Donation { handle, gfn: gfn.0 })
        {
            return Err(HypError::Internal(
                "guest-owned page without a matching donation record",
            ));
        }
        Ok(())
    }
}
