//! The VM table and the hyp's per-VM state.
//!
//! [`VmTable`] is the lifecycle state machine (slots FREE -> RESERVED ->
//! LIVE -> LIVE+dying -> FREE, references, loaded vCPUs); it is pure data
//! under the VM table lock, small enough to model with loom. `HypVm`
//! holds a live VM's stage-2 and the pages it was given, under its own
//! lock (class `HypVm`).

use pkvm_arch::pte::{S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::{vttbr, S2Geometry};
use pkvm_arch::{Gfn, Granule, Ipa, Level, Pa, Pfn, PAGE_SIZE};
use pkvm_pgtable::{PageCache, PageTable, PtError, PtMemory, Stage2};

use crate::error::HypError;
use crate::hyp::{
    Env, Hyp, Reserve, HANDLE_BASE, MAX_CPUS, MAX_TOPUP_PAGES, MAX_VCPUS, MAX_VMS, VCPU_PAGES,
    VM_PAGES,
};
use crate::mem_protect::commit;
use crate::meta::PageState;
use crate::platform::HypPlatform;

/// A live VM's lifecycle state in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveVm {
    /// References: loaded vCPUs plus calls in flight.
    pub refs: u32,
    /// Teardown started.
    pub dying: bool,
    /// Number of vCPUs the VM was created with.
    pub nr_vcpus: u8,
    /// Bit i: vCPU i is initialised.
    pub vcpu_init: u32,
    /// `cpu + 1` where vCPU i is loaded, 0 if not loaded.
    pub loaded: [u8; MAX_VCPUS],
}

/// One VM table slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Unused.
    Free,
    /// Handed out by `reserve_vm`, not initialised: invisible to lookups.
    Reserved,
    /// Initialised.
    Live(LiveVm),
}

/// The VM table: `N` slots, handle = index + 0x1000, VMID = index + 1.
#[derive(Debug)]
pub struct VmTable<const N: usize> {
    slots: [Slot; N],
    cpu_loaded: [Option<(u16, u8)>; MAX_CPUS],
}

impl<const N: usize> Default for VmTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> VmTable<N> {
    /// An empty table.
    pub const fn new() -> Self {
        assert!(N <= MAX_VMS);
        VmTable {
            slots: [Slot::Free; N],
            cpu_loaded: [None; MAX_CPUS],
        }
    }

    /// The handle of slot `idx`.
    pub const fn handle_of(idx: usize) -> u16 {
        HANDLE_BASE + idx as u16
    }

    /// The VMID of slot `idx`.
    pub const fn vmid_of(idx: usize) -> u16 {
        idx as u16 + 1
    }

    fn index(handle: u64) -> Option<usize> {
        let i = handle.checked_sub(HANDLE_BASE as u64)?;
        if i < N as u64 {
            Some(i as usize)
        } else {
            None
        }
    }

    /// A slot's state (tests).
    pub fn slot(&self, idx: usize) -> Slot {
        self.slots[idx]
    }

    /// Whether slot `idx` holds a live VM (dying or not).
    pub fn is_live(&self, idx: usize) -> bool {
        matches!(self.slots[idx], Slot::Live(_))
    }

    /// Takes the first free slot.
    ///
    /// # Errors
    /// [`HypError::TableFull`].
    pub fn reserve(&mut self) -> Result<u16, HypError> {
        let idx = self
            .slots
            .iter()
            .position(|s| *s == Slot::Free)
            .ok_or(HypError::TableFull)?;
        self.slots[idx] = Slot::Reserved;
        Ok(Self::handle_of(idx))
    }

    /// Frees a slot that is still only reserved.
    ///
    /// # Errors
    /// [`HypError::NotReserved`].
    pub fn unreserve(&mut self, handle: u64) -> Result<(), HypError> {
        let idx = self.reserved_index(handle)?;
        self.slots[idx] = Slot::Free;
        Ok(())
    }

    /// The index of a reserved slot.
    ///
    /// # Errors
    /// [`HypError::NotReserved`].
    pub fn reserved_index(&self, handle: u64) -> Result<usize, HypError> {
        match Self::index(handle) {
            Some(i) if self.slots[i] == Slot::Reserved => Ok(i),
            _ => Err(HypError::NotReserved { handle }),
        }
    }

    /// RESERVED -> LIVE (the last step of init).
    ///
    /// # Panics
    /// If the slot is not reserved (the caller checked under this lock).
    pub fn publish(&mut self, idx: usize, nr_vcpus: u8) {
        assert_eq!(
            self.slots[idx],
            Slot::Reserved,
            "hyp bug: publish of a non-reserved slot"
        );
        self.slots[idx] = Slot::Live(LiveVm {
            refs: 0,
            dying: false,
            nr_vcpus,
            vcpu_init: 0,
            loaded: [0; MAX_VCPUS],
        });
    }

    fn live_mut(&mut self, handle: u64) -> Result<(usize, &mut LiveVm), HypError> {
        match Self::index(handle) {
            Some(i) => match &mut self.slots[i] {
                Slot::Live(l) => Ok((i, l)),
                _ => Err(HypError::NoSuchVm { handle }),
            },
            None => Err(HypError::NoSuchVm { handle }),
        }
    }

    /// The index of a live VM that is not dying.
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`].
    pub fn live_index(&mut self, handle: u64) -> Result<usize, HypError> {
        let (i, l) = self.live_mut(handle)?;
        if l.dying {
            return Err(HypError::VmDying {
                handle: handle as u16,
            });
        }
        Ok(i)
    }

    /// Takes a reference on a live, non-dying VM.
    ///
    /// # Errors
    /// As [`VmTable::live_index`].
    pub fn get_ref(&mut self, handle: u64) -> Result<usize, HypError> {
        let i = self.live_index(handle)?;
        if let Slot::Live(l) = &mut self.slots[i] {
            l.refs = l
                .refs
                .checked_add(1)
                .expect("hyp bug: VM refcount overflow");
        }
        Ok(i)
    }

    /// Drops a reference taken by [`VmTable::get_ref`] or a load.
    ///
    /// # Panics
    /// On underflow (a hypervisor bug).
    pub fn put_ref(&mut self, idx: usize) {
        match &mut self.slots[idx] {
            Slot::Live(l) if l.refs > 0 => l.refs -= 1,
            s => panic!("hyp bug: put_ref on slot {idx} in state {s:?}"),
        }
    }

    /// The live VM in slot `idx`.
    pub fn live(&self, idx: usize) -> Option<&LiveVm> {
        match &self.slots[idx] {
            Slot::Live(l) => Some(l),
            _ => None,
        }
    }

    /// Marks vCPU `vcpu` of slot `idx` initialised.
    pub fn mark_vcpu_init(&mut self, idx: usize, vcpu: usize) {
        if let Slot::Live(l) = &mut self.slots[idx] {
            l.vcpu_init |= 1 << vcpu;
        }
    }

    /// Loads vCPU `vcpu` of VM `handle` on `cpu`, taking a VM reference.
    ///
    /// # Errors
    /// [`HypError::BadArgument`] for a bad cpu, [`HypError::CpuBusy`],
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`],
    /// [`HypError::NoSuchVcpu`], [`HypError::VcpuLoaded`].
    pub fn load(&mut self, cpu: usize, handle: u64, vcpu: u64) -> Result<usize, HypError> {
        if cpu >= MAX_CPUS {
            return Err(HypError::BadArgument {
                what: "cpu",
                value: cpu as u64,
            });
        }
        if self.cpu_loaded[cpu].is_some() {
            return Err(HypError::CpuBusy { cpu });
        }
        let i = self.live_index(handle)?;
        let Slot::Live(l) = &mut self.slots[i] else {
            unreachable!()
        };
        if vcpu >= l.nr_vcpus as u64 || l.vcpu_init & (1 << vcpu) == 0 {
            return Err(HypError::NoSuchVcpu { vcpu });
        }
        if l.loaded[vcpu as usize] != 0 {
            return Err(HypError::VcpuLoaded { vcpu });
        }
        l.loaded[vcpu as usize] = cpu as u8 + 1;
        l.refs += 1;
        self.cpu_loaded[cpu] = Some((i as u16, vcpu as u8));
        Ok(i)
    }

    /// Puts the vCPU loaded on `cpu`, dropping its VM reference.
    ///
    /// # Errors
    /// [`HypError::BadArgument`], [`HypError::NothingLoaded`].
    pub fn put_vcpu(&mut self, cpu: usize) -> Result<(usize, u8), HypError> {
        if cpu >= MAX_CPUS {
            return Err(HypError::BadArgument {
                what: "cpu",
                value: cpu as u64,
            });
        }
        let (i, v) = self.cpu_loaded[cpu]
            .take()
            .ok_or(HypError::NothingLoaded { cpu })?;
        let i = i as usize;
        if let Slot::Live(l) = &mut self.slots[i] {
            l.loaded[v as usize] = 0;
        }
        self.put_ref(i);
        Ok((i, v))
    }

    /// What is loaded on `cpu`: (slot, vCPU).
    pub fn loaded(&self, cpu: usize) -> Option<(usize, u8)> {
        self.cpu_loaded
            .get(cpu)
            .copied()
            .flatten()
            .map(|(i, v)| (i as usize, v))
    }

    /// Marks a live VM dying.
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`] if already dying,
    /// [`HypError::VmBusy`] while referenced (a vCPU is loaded).
    pub fn start_teardown(&mut self, handle: u64) -> Result<usize, HypError> {
        let (i, l) = self.live_mut(handle)?;
        if l.dying {
            return Err(HypError::VmDying {
                handle: handle as u16,
            });
        }
        if l.refs != 0 {
            return Err(HypError::VmBusy {
                handle: handle as u16,
            });
        }
        l.dying = true;
        Ok(i)
    }

    /// The index of a dying VM (no references can exist: teardown started
    /// with none and `get_ref`/`load` refuse dying VMs).
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmNotDying`].
    pub fn dying_index(&mut self, handle: u64) -> Result<usize, HypError> {
        let (i, l) = self.live_mut(handle)?;
        if !l.dying {
            return Err(HypError::VmNotDying {
                handle: handle as u16,
            });
        }
        debug_assert_eq!(l.refs, 0);
        Ok(i)
    }

    /// LIVE (dying) -> FREE.
    ///
    /// # Panics
    /// If the slot is not a dying VM (the caller checked under this lock).
    pub fn remove(&mut self, idx: usize) {
        assert!(
            matches!(
                self.slots[idx],
                Slot::Live(LiveVm {
                    dying: true,
                    refs: 0,
                    ..
                })
            ),
            "hyp bug: remove of a VM that is not dying"
        );
        self.slots[idx] = Slot::Free;
    }
}

/// Guest page state from a valid guest PTE's software bits.
pub(crate) fn guest_state(pte: S2Pte, feat: S2Features) -> PageState {
    let p = pte.prot(feat);
    if p.contains(S2Prot::SW0) {
        PageState::SharedOwned
    } else if p.contains(S2Prot::SW1) {
        PageState::SharedBorrowed
    } else {
        PageState::Owned
    }
}

/// A stack of zeroed pages the host donated for a VM's stage-2 tables,
/// linked through the pages' first word (`next | 1`, 0 = end).
#[derive(Debug, Default)]
pub(crate) struct Memcache {
    head: Option<Pa>,
    nr: u64,
}

impl Memcache {
    pub(crate) fn len(&self) -> u64 {
        self.nr
    }

    pub(crate) fn push<P: HypPlatform>(&mut self, plat: &P, pa: Pa) {
        plat.write_u64(pa, self.head.map_or(0, |h| h.0 | 1));
        self.head = Some(pa);
        self.nr += 1;
    }

    pub(crate) fn pop<P: HypPlatform>(&mut self, plat: &P) -> Option<Pa> {
        let pa = self.head?;
        let link = plat.read_u64(pa);
        plat.write_u64(pa, 0);
        self.head = if link == 0 { None } else { Some(Pa(link & !1)) };
        self.nr -= 1;
        Some(pa)
    }
}

/// A VM's memcache as the page-table cache, counting table pages in use.
pub(crate) struct McCache<'a, P: HypPlatform> {
    mc: &'a mut Memcache,
    tables: &'a mut u64,
    plat: &'a P,
}

impl<'a, P: HypPlatform> McCache<'a, P> {
    pub(crate) fn new(mc: &'a mut Memcache, tables: &'a mut u64, plat: &'a P) -> Self {
        McCache { mc, tables, plat }
    }
}

impl<P: HypPlatform> PageCache for McCache<'_, P> {
    fn alloc_table(&mut self) -> Option<Pa> {
        let pa = self.mc.pop(self.plat)?;
        *self.tables += 1;
        Some(pa)
    }
    fn free_table(&mut self, pa: Pa) {
        self.mc.push(self.plat, pa);
        *self.tables -= 1;
    }
}

/// The hyp's state of one live VM.
#[derive(Debug)]
pub(crate) struct HypVm {
    pub handle: u16,
    pub vmid: u16,
    pub protected: bool,
    pub pgt: PageTable<Stage2>,
    pub vm_mem: Pa,
    pub vcpu_mem: [Option<Pa>; MAX_VCPUS],
    pub memcache: Memcache,
    /// Stage-2 table pages in use below the root.
    pub tables: u64,
}

impl HypVm {
    /// Pages this VM holds (all hyp OWNED).
    pub(crate) fn owned_pages(&self) -> u64 {
        VM_PAGES
            + self.pgt.geometry().root_pages as u64
            + self.vcpu_mem.iter().flatten().count() as u64 * VCPU_PAGES
            + self.memcache.len()
            + self.tables
    }

    /// Table pages one new page mapping may need.
    pub(crate) fn levels(&self) -> u64 {
        3 - self.pgt.geometry().start_level.0 as u64
    }

    /// The IPA of `gfn` if `[gfn, gfn + nr)` is inside the IPA space.
    pub(crate) fn check_gfn(&self, gfn: Gfn, nr: u64) -> Result<Ipa, HypError> {
        let bad = HypError::BadArgument {
            what: "gfn",
            value: gfn.0,
        };
        let end = gfn.0.checked_add(nr).ok_or(bad)?;
        if nr == 0 || end > self.pgt.geometry().ipa_size() >> 12 {
            return Err(bad);
        }
        Ok(gfn.addr())
    }

    /// The valid level-3 PTE mapping `ipa`, if any.
    pub(crate) fn leaf_page<E: PtMemory>(&self, env: &E, ipa: Ipa) -> Option<S2Pte> {
        let leaf = self.pgt.get_leaf(env, ipa);
        let pte = S2Pte(leaf.pte);
        (leaf.level == Level::LAST && pte.is_leaf(leaf.level)).then_some(pte)
    }
}

/// Decoded `init_vm` configuration word (x4): bits 7:0 IPA bits, 15:8 number
/// of vCPUs, bit 16 protected; other bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest IPA size in bits (32..=48).
    pub ipa_bits: u32,
    /// Number of vCPUs (1..=MAX_VCPUS).
    pub nr_vcpus: u8,
    /// A protected VM (memory donated, not shared).
    pub protected: bool,
}

impl VmConfig {
    /// Encodes the configuration word.
    pub const fn encode(self) -> u64 {
        self.ipa_bits as u64 | (self.nr_vcpus as u64) << 8 | (self.protected as u64) << 16
    }

    /// Decodes and validates the configuration word.
    ///
    /// # Errors
    /// [`HypError::BadArgument`].
    pub fn decode(raw: u64) -> Result<VmConfig, HypError> {
        let bad = HypError::BadArgument {
            what: "VM config",
            value: raw,
        };
        let ipa_bits = (raw & 0xff) as u32;
        let nr_vcpus = ((raw >> 8) & 0xff) as u8;
        if raw >> 17 != 0
            || !(32..=48).contains(&ipa_bits)
            || nr_vcpus == 0
            || nr_vcpus as usize > MAX_VCPUS
        {
            return Err(bad);
        }
        Ok(VmConfig {
            ipa_bits,
            nr_vcpus,
            protected: raw & (1 << 16) != 0,
        })
    }

    /// The VM's stage-2 geometry.
    pub fn geometry(&self) -> S2Geometry {
        match S2Geometry::new(Granule::Size4K, self.ipa_bits) {
            Ok(g) => g,
            Err(_) => unreachable!("ipa_bits validated by decode"),
        }
    }
}

/// What the run path needs to enter a loaded vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuContext {
    /// The VM's handle.
    pub handle: u16,
    /// Its VMID.
    pub vmid: u16,
    /// The vCPU index.
    pub vcpu: u8,
    /// Hyp-owned page holding the vCPU's register context.
    pub context: Pa,
    /// The stage-2 root.
    pub s2_root: Pa,
    /// The stage-2 geometry (for VTCR_EL2).
    pub geometry: S2Geometry,
    /// `VTTBR_EL2` value.
    pub vttbr: u64,
    /// A protected VM.
    pub protected: bool,
}

/// A reference on a live VM, dropped (under the table lock) when this goes
/// out of scope: declare it before any lock guard so it is released last.
pub(crate) struct VmRef<'a, P: HypPlatform> {
    hyp: &'a Hyp<P>,
    pub idx: usize,
}

impl<P: HypPlatform> Drop for VmRef<'_, P> {
    fn drop(&mut self) {
        self.hyp.table.lock().put_ref(self.idx);
    }
}

impl<P: HypPlatform> Hyp<P> {
    fn get_vm(&self, handle: u64) -> Result<VmRef<'_, P>, HypError> {
        let idx = self.table.lock().get_ref(handle)?;
        Ok(VmRef { hyp: self, idx })
    }

    fn loaded_idx(&self, cpu: usize) -> Result<usize, HypError> {
        self.table
            .lock()
            .loaded(cpu)
            .map(|(i, _)| i)
            .ok_or(HypError::NothingLoaded { cpu })
    }

    /// Reserves a VM table slot; returns its handle.
    ///
    /// # Errors
    /// [`HypError::TableFull`].
    pub fn reserve_vm(&self) -> Result<u16, HypError> {
        self.table.lock().reserve()
    }

    /// Releases a slot that is still only reserved.
    ///
    /// # Errors
    /// [`HypError::NotReserved`].
    pub fn unreserve_vm(&self, handle: u64) -> Result<(), HypError> {
        self.table.lock().unreserve(handle)
    }

    /// Initialises the reserved VM `handle`: takes `VM_PAGES` pages at
    /// `vm_pfn` and the stage-2 root (`geometry.root_pages` pages at
    /// `pgd_pfn`, aligned to their size) from the host, builds the VM, and
    /// publishes it last. On failure nothing changed (the reservation stays).
    ///
    /// # Errors
    /// [`HypError::NotReserved`], [`HypError::BadArgument`],
    /// [`HypError::BadAddress`], [`HypError::WrongState`],
    /// [`HypError::NoMemory`].
    pub fn init_vm(
        &self,
        handle: u64,
        vm_pfn: Pfn,
        pgd_pfn: Pfn,
        config: VmConfig,
    ) -> Result<(), HypError> {
        let mut table = self.table.lock();
        let idx = table.reserved_index(handle)?;
        let geo = config.geometry();
        let (vm_pa, pgd_pa) = (vm_pfn.addr(), pgd_pfn.addr());
        let pgd_pages = geo.root_pages as u64;
        self.check_memory(vm_pa, VM_PAGES)?;
        self.check_memory(pgd_pa, pgd_pages)?;
        if !pgd_pa.is_aligned(pgd_pages * PAGE_SIZE) {
            return Err(HypError::BadArgument {
                what: "pgd alignment",
                value: pgd_pa.0,
            });
        }
        let mut host = self.host.lock();
        let mut pgd = self.pgd.lock();
        host.expect(vm_pa, VM_PAGES, PageState::Owned, PageState::NoPage)?;
        host.expect(pgd_pa, pgd_pages, PageState::Owned, PageState::NoPage)?;
        // Overlap: the second check would already fail after the first
        // commit, but nothing is committed yet, so test it explicitly.
        let overlap =
            vm_pa.0 < pgd_pa.0 + pgd_pages * PAGE_SIZE && pgd_pa.0 < vm_pa.0 + VM_PAGES * PAGE_SIZE;
        if overlap {
            return Err(HypError::BadArgument {
                what: "overlapping donations",
                value: vm_pa.0,
            });
        }
        let el2 = self.el2_tables_needed(&pgd, vm_pa, VM_PAGES)
            + self.el2_tables_needed(&pgd, pgd_pa, pgd_pages);
        let mut res = Reserve::new(&self.pool, &self.plat, 2 * self.host_range_tables() + el2)?;
        let mut slot = self.vms[idx].lock();
        if slot.is_some() {
            return Err(HypError::Internal("reserved slot holds a VM"));
        }
        // Commit: nothing below can fail.
        self.commit_host_donate_hyp(&mut host, &mut pgd, vm_pa, VM_PAGES, &mut res);
        self.commit_host_donate_hyp(&mut host, &mut pgd, pgd_pa, pgd_pages, &mut res);
        for i in 0..pgd_pages {
            self.plat.zero_page(pgd_pa + i * PAGE_SIZE);
        }
        *slot = Some(HypVm {
            handle: handle as u16,
            vmid: VmTable::<MAX_VMS>::vmid_of(idx),
            protected: config.protected,
            pgt: PageTable::new(pgd_pa, geo, self.feat),
            vm_mem: vm_pa,
            vcpu_mem: [None; MAX_VCPUS],
            memcache: Memcache::default(),
            tables: 0,
        });
        table.publish(idx, config.nr_vcpus);
        Ok(())
    }

    /// Initialises vCPU `vcpu` of a live VM with `VCPU_PAGES` donated pages.
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`],
    /// [`HypError::NoSuchVcpu`], [`HypError::VcpuExists`],
    /// [`HypError::BadAddress`], [`HypError::WrongState`],
    /// [`HypError::NoMemory`].
    pub fn init_vcpu(&self, handle: u64, vcpu: u64, pfn: Pfn) -> Result<(), HypError> {
        let mut table = self.table.lock();
        let idx = table.live_index(handle)?;
        let live = *table
            .live(idx)
            .ok_or(HypError::Internal("live slot vanished"))?;
        if vcpu >= live.nr_vcpus as u64 {
            return Err(HypError::NoSuchVcpu { vcpu });
        }
        if live.vcpu_init & (1 << vcpu) != 0 {
            return Err(HypError::VcpuExists { vcpu });
        }
        let pa = pfn.addr();
        self.check_memory(pa, VCPU_PAGES)?;
        let mut host = self.host.lock();
        let mut pgd = self.pgd.lock();
        host.expect(pa, VCPU_PAGES, PageState::Owned, PageState::NoPage)?;
        let el2 = self.el2_tables_needed(&pgd, pa, VCPU_PAGES);
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_range_tables() + el2)?;
        let mut slot = self.vms[idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("live slot without a VM"))?;
        // Commit.
        self.commit_host_donate_hyp(&mut host, &mut pgd, pa, VCPU_PAGES, &mut res);
        vm.vcpu_mem[vcpu as usize] = Some(pa);
        table.mark_vcpu_init(idx, vcpu as usize);
        Ok(())
    }

    /// Donates `nr` pages at `pfn` to VM `handle`'s memcache (stage-2 table
    /// pages).
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`],
    /// [`HypError::BadArgument`] (`nr` outside `1..=MAX_TOPUP_PAGES`),
    /// [`HypError::BadAddress`], [`HypError::WrongState`], [`HypError::NoMemory`].
    pub fn topup_memcache(&self, handle: u64, pfn: Pfn, nr: u64) -> Result<(), HypError> {
        let r = self.get_vm(handle)?;
        if nr == 0 || nr > MAX_TOPUP_PAGES {
            return Err(HypError::BadArgument {
                what: "page count",
                value: nr,
            });
        }
        let pa = pfn.addr();
        self.check_memory(pa, nr)?;
        let mut host = self.host.lock();
        let mut pgd = self.pgd.lock();
        host.expect(pa, nr, PageState::Owned, PageState::NoPage)?;
        let el2 = self.el2_tables_needed(&pgd, pa, nr);
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_range_tables() + el2)?;
        let mut slot = self.vms[r.idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("live slot without a VM"))?;
        // Commit.
        self.commit_host_donate_hyp(&mut host, &mut pgd, pa, nr, &mut res);
        for i in 0..nr {
            let p = pa + i * PAGE_SIZE;
            self.plat.zero_page(p);
            vm.memcache.push(&self.plat, p);
        }
        Ok(())
    }

    /// Loads vCPU `vcpu` of `handle` on `cpu` (one CPU per vCPU; holds a VM
    /// reference until [`Hyp::vcpu_put`]).
    ///
    /// # Errors
    /// See [`VmTable::load`].
    pub fn vcpu_load(&self, cpu: usize, handle: u64, vcpu: u64) -> Result<(), HypError> {
        self.table.lock().load(cpu, handle, vcpu).map(|_| ())
    }

    /// Puts the vCPU loaded on `cpu`.
    ///
    /// # Errors
    /// See [`VmTable::put_vcpu`].
    pub fn vcpu_put(&self, cpu: usize) -> Result<(), HypError> {
        self.table.lock().put_vcpu(cpu).map(|_| ())
    }

    /// What the run path needs to enter the vCPU loaded on `cpu`.
    pub fn loaded_vcpu_context(&self, cpu: usize) -> Option<VcpuContext> {
        let (idx, vcpu) = self.table.lock().loaded(cpu)?;
        let slot = self.vms[idx].lock();
        let vm = slot.as_ref()?;
        Some(VcpuContext {
            handle: vm.handle,
            vmid: vm.vmid,
            vcpu,
            context: vm.vcpu_mem[vcpu as usize]?,
            s2_root: vm.pgt.root(),
            geometry: vm.pgt.geometry(),
            vttbr: vttbr(vm.pgt.root(), vm.vmid),
            protected: vm.protected,
        })
    }

    /// Shares host page `pfn` with the VM loaded on `cpu` (non-protected)
    /// at `gfn` with `prot` (R/W/X).
    ///
    /// # Errors
    /// [`HypError::NothingLoaded`], [`HypError::WrongVmKind`], and the
    /// ownership errors of the transition.
    pub fn host_share_guest(
        &self,
        cpu: usize,
        pfn: Pfn,
        gfn: Gfn,
        prot: S2Prot,
    ) -> Result<(), HypError> {
        let idx = self.loaded_idx(cpu)?;
        let mut host = self.host.lock();
        let mut slot = self.vms[idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("loaded VM missing"))?;
        self.share_guest_locked(&mut host, vm, pfn, gfn, prot)
    }

    /// Donates host page `pfn` to the (protected) VM loaded on `cpu` at `gfn`.
    ///
    /// # Errors
    /// As [`Hyp::host_share_guest`].
    pub fn host_donate_guest(&self, cpu: usize, pfn: Pfn, gfn: Gfn) -> Result<(), HypError> {
        let idx = self.loaded_idx(cpu)?;
        let mut host = self.host.lock();
        let mut slot = self.vms[idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("loaded VM missing"))?;
        self.donate_guest_locked(&mut host, vm, pfn, gfn)
    }

    /// Unshares `gfn` of non-protected VM `handle`.
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`],
    /// [`HypError::WrongVmKind`], [`HypError::GfnNotMapped`], [`HypError::BadArgument`].
    pub fn host_unshare_guest(&self, handle: u64, gfn: Gfn) -> Result<(), HypError> {
        let r = self.get_vm(handle)?;
        let mut host = self.host.lock();
        let mut slot = self.vms[r.idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("live slot without a VM"))?;
        self.unshare_guest_locked(&mut host, vm, gfn)
    }

    fn with_np_vm<T>(
        &self,
        idx: usize,
        f: impl FnOnce(&mut HypVm, &Env<'_, P>) -> Result<T, HypError>,
    ) -> Result<T, HypError> {
        let mut slot = self.vms[idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("live slot without a VM"))?;
        if vm.protected {
            return Err(HypError::WrongVmKind { handle: vm.handle });
        }
        let env = self.guest_env(vm.vmid);
        f(vm, &env)
    }

    /// Adds `prot` to the mapping of `gfn` in the (non-protected) VM loaded
    /// on `cpu`.
    ///
    /// # Errors
    /// [`HypError::NothingLoaded`], [`HypError::WrongVmKind`],
    /// [`HypError::BadArgument`], [`HypError::GfnNotMapped`].
    pub fn relax_perms_guest(&self, cpu: usize, gfn: Gfn, prot: S2Prot) -> Result<(), HypError> {
        let idx = self.loaded_idx(cpu)?;
        self.with_np_vm(idx, |vm, env| {
            let ipa = vm.check_gfn(gfn, 1)?;
            vm.leaf_page(env, ipa)
                .ok_or(HypError::GfnNotMapped { gfn })?;
            vm.pgt
                .relax_perms(env, ipa, prot & S2Prot::PERMS)
                .map_err(|_| HypError::GfnNotMapped { gfn })
        })
    }

    /// Write-protects `nr` pages from `gfn` in non-protected VM `handle`,
    /// then invalidates the range once.
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmDying`],
    /// [`HypError::WrongVmKind`], [`HypError::BadArgument`].
    pub fn wrprotect_guest(&self, handle: u64, gfn: Gfn, nr: u64) -> Result<(), HypError> {
        let r = self.get_vm(handle)?;
        self.with_np_vm(r.idx, |vm, env| {
            let ipa = vm.check_gfn(gfn, nr)?;
            commit(vm.pgt.wrprotect(env, ipa, nr * PAGE_SIZE), "wrprotect");
            pkvm_pgtable::TlbOps::tlbi_range(env, ipa.0, ipa.0 + nr * PAGE_SIZE);
            Ok(())
        })
    }

    /// Sets the access flag of `gfn` in non-protected VM `handle`.
    ///
    /// # Errors
    /// As [`Hyp::wrprotect_guest`], plus [`HypError::GfnNotMapped`].
    pub fn mkyoung_guest(&self, handle: u64, gfn: Gfn) -> Result<(), HypError> {
        let r = self.get_vm(handle)?;
        self.with_np_vm(r.idx, |vm, env| {
            let ipa = vm.check_gfn(gfn, 1)?;
            vm.pgt
                .mkyoung(env, ipa)
                .map_err(|_| HypError::GfnNotMapped { gfn })
        })
    }

    /// Whether any of `nr` pages from `gfn` is young; clears the flags if
    /// `mkold`.
    ///
    /// # Errors
    /// As [`Hyp::wrprotect_guest`].
    pub fn test_clear_young_guest(
        &self,
        handle: u64,
        gfn: Gfn,
        nr: u64,
        mkold: bool,
    ) -> Result<bool, HypError> {
        let r = self.get_vm(handle)?;
        self.with_np_vm(r.idx, |vm, env| {
            let ipa = vm.check_gfn(gfn, nr)?;
            Ok(commit(
                vm.pgt.test_clear_young(env, ipa, nr * PAGE_SIZE, mkold),
                "test_clear_young",
            ))
        })
    }

    /// Marks VM `handle` dying.
    ///
    /// # Errors
    /// See [`VmTable::start_teardown`].
    pub fn start_teardown(&self, handle: u64) -> Result<(), HypError> {
        self.table.lock().start_teardown(handle).map(|_| ())
    }

    /// Gives the page at `gfn` of dying VM `handle` back to the host
    /// (zeroed if the guest owned it).
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmNotDying`],
    /// [`HypError::BadArgument`], [`HypError::GfnNotMapped`], [`HypError::NoMemory`].
    pub fn reclaim_guest_page(&self, handle: u64, gfn: Gfn) -> Result<(), HypError> {
        let mut table = self.table.lock();
        let idx = table.dying_index(handle)?;
        let mut host = self.host.lock();
        let mut slot = self.vms[idx].lock();
        let vm = slot
            .as_mut()
            .ok_or(HypError::Internal("live slot without a VM"))?;
        self.reclaim_locked(&mut host, vm, gfn)
    }

    /// Finishes tearing down dying VM `handle`: flushes its VMID, removes
    /// the table entry, gives every remaining guest page back, destroys the
    /// stage-2 and returns every page the VM held to the host, zeroed.
    ///
    /// # Errors
    /// [`HypError::NoSuchVm`], [`HypError::VmNotDying`], [`HypError::NoMemory`].
    pub fn finalize_teardown(&self, handle: u64) -> Result<(), HypError> {
        let mut table = self.table.lock();
        let idx = table.dying_index(handle)?;
        let mut host = self.host.lock();
        let mut pgd = self.pgd.lock();
        let mut res = Reserve::new(&self.pool, &self.plat, self.host_levels)?;
        let mut slot = self.vms[idx].lock();
        let Some(vm) = slot.as_ref() else {
            return Err(HypError::Internal("live slot without a VM"));
        };
        let env = self.guest_env(vm.vmid);
        // Check every page we are about to hand back.
        let mut bad = None;
        let feat = vm.pgt.features();
        let size = vm.pgt.geometry().ipa_size();
        commit(
            vm.pgt
                .for_each_leaf(&env, Ipa(0), size, |addr, level, raw| {
                    let pte = S2Pte(raw);
                    let ok = level == Level::LAST
                        && pte.is_leaf(level)
                        && match guest_state(pte, feat) {
                            PageState::Owned => self
                                .check_donated(&host, vm.handle, pte.oa(), Ipa(addr).gfn())
                                .is_ok(),
                            PageState::SharedBorrowed => host.shares(pte.oa()) > 0,
                            _ => false,
                        };
                    if !ok && bad.is_none() {
                        bad = Some(addr);
                    }
                }),
            "guest stage-2 scan",
        );
        if bad.is_some() {
            return Err(HypError::Internal("unexpected guest stage-2 entry"));
        }
        let Some(vm) = slot.take() else {
            unreachable!()
        };
        // Commit: nothing below can fail.
        pkvm_pgtable::TlbOps::tlbi_all(&env);
        table.remove(idx);
        commit(
            vm.pgt
                .for_each_leaf(&env, Ipa(0), size, |_addr, _level, raw| {
                    let pte = S2Pte(raw);
                    let pa = pte.oa();
                    match guest_state(pte, feat) {
                        PageState::Owned => {
                            self.plat.zero_page(pa);
                            self.host_map_back(&mut host, pa, &mut res);
                            host.set(pa, PageState::Owned, PageState::NoPage);
                        }
                        _ => {
                            let n = host.shares(pa);
                            host.set_shares(pa, n - 1);
                            if n == 1 {
                                host.set(pa, PageState::Owned, PageState::NoPage);
                            }
                        }
                    }
                }),
            "guest stage-2 reclaim",
        );
        let HypVm {
            pgt,
            vm_mem,
            vcpu_mem,
            mut memcache,
            mut tables,
            ..
        } = vm;
        let root_pages = pgt.geometry().root_pages as u64;
        let root = {
            let mut mc = McCache::new(&mut memcache, &mut tables, &self.plat);
            pgt.destroy(&env, &mut mc)
        };
        debug_assert_eq!(tables, 0, "table pages leaked by destroy");
        self.commit_hyp_donate_host(&mut host, &mut pgd, root, root_pages, &mut res);
        self.commit_hyp_donate_host(&mut host, &mut pgd, vm_mem, VM_PAGES, &mut res);
        for pa in vcpu_mem.iter().flatten() {
            self.commit_hyp_donate_host(&mut host, &mut pgd, *pa, VCPU_PAGES, &mut res);
        }
        while let Some(pa) = memcache.pop(&self.plat) {
            self.commit_hyp_donate_host(&mut host, &mut pgd, pa, 1, &mut res);
        }
        Ok(())
    }

    /// Calls `f(gfn, pa, state, prot)` for every page mapped in VM
    /// `handle`'s stage-2 (tests and the simulator's checks). Returns false
    /// if no VM is initialised in that slot.
    pub fn for_each_guest_page(
        &self,
        handle: u64,
        mut f: impl FnMut(Gfn, Pa, PageState, S2Prot),
    ) -> bool {
        let Some(idx) = handle
            .checked_sub(HANDLE_BASE as u64)
            .filter(|&i| i < MAX_VMS as u64)
        else {
            return false;
        };
        let slot = self.vms[idx as usize].lock();
        let Some(vm) = slot.as_ref() else {
            return false;
        };
        let env = self.guest_env(vm.vmid);
        let feat = vm.pgt.features();
        let size = vm.pgt.geometry().ipa_size();
        let r: Result<(), PtError> =
            vm.pgt
                .for_each_leaf(&env, Ipa(0), size, |addr, _level, raw| {
                    let pte = S2Pte(raw);
                    f(
                        Ipa(addr).gfn(),
                        pte.oa(),
                        guest_state(pte, feat),
                        pte.prot(feat),
                    );
                });
        r.is_ok()
    }
}
