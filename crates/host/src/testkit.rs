//! Test doubles that let unit tests and loom models drive the real fault
//! path (`Vcpu::run` -> `handle_abort` -> the pipeline -> `map_standard` or
//! `map_protected`), not a copy of it:
//! - [`TestPlat`]: a small page-table memory for standard mode and a fake
//!   hypervisor for protected mode that keeps the guest's gfn -> pfn map
//!   as the real one does (`EXISTS` for a mapped gfn, `DENIED` for a page
//!   the host no longer owns, `NO_MEMORY` when a test exhausts its
//!   memcache), with a hook run at the allocation that tops the memcache
//!   up (outside the MMU lock);
//! - [`TestMm`]: one VMA whose frames move to new ones when the test
//!   migrates it, with a hook run inside `pin` (after the frame was taken:
//!   between pin and map);
//! - [`TestBackend`]: a guest that touches one address until it is mapped.
//!
//! Bookkeeping uses `std` mutexes held only across plain code (never
//! across a loom operation or a hook), so loom models can use it too.

#![cfg_attr(loom, allow(dead_code))]

extern crate std;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI64, AtomicU32, AtomicU64 as CoreAtomicU64};
use std::sync::{Mutex, PoisonError};

use pkvm_arch::esr::{hpfar_for, AccessSyndrome, Esr, FaultStatus};
use pkvm_arch::{Hva, Ipa, Level, Pa, PAGE_SIZE};
use pkvm_hyp::hvc::{id, ret};
use pkvm_pgtable::env::ENTRIES;
use pkvm_pgtable::{PtMemory, TlbOps};

use crate::fault::GuestFault;
use crate::loom_shim::{AtomicU64, Ordering};
use crate::memslot::UserMemoryRegion;
use crate::platform::{
    GuestExit, HostPlatform, PinError, PinnedPage, ProcessMemory, StageTwo, VcpuBackend,
    VcpuContext, VmaInfo,
};
use crate::psci::{PsciVm, ResetState};
use crate::vm::{Vm, VmConfig};
use crate::VcpuExit;

/// Something a test runs at a chosen point of the fault path.
pub(crate) type Hook = Box<dyn FnOnce() + Send>;

const TABLE_BASE: u64 = 0x1000_0000;
const TABLE_PAGES: usize = 16;

/// Guest RAM: one memslot.
pub(crate) const RAM: Ipa = Ipa(0x4000_0000);
/// Its size.
pub(crate) const RAM_SIZE: u64 = 4 << 20;
/// The host address behind it (2 MiB aligned).
pub(crate) const HVA: Hva = Hva(0x7f00_0000_0000);
const FRAME_BASE: u64 = 0x8000_0000;
/// Distance between the frames of two generations of the VMA.
const GEN_STRIDE: u64 = 0x1000_0000;

/// Which flavour of VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Standard mode: host-managed stage-2.
    Standard,
    /// Protected mode, non-protected VM: pages shared.
    Shared,
    /// Protected mode, protected VM: pages donated.
    Donated,
}

/// The fake hypervisor's state.
#[derive(Default)]
pub(crate) struct FakeHyp {
    /// The guest's stage-2: gfn -> pfn.
    pub guest: BTreeMap<u64, u64>,
    /// Pages donated to the guest (the host no longer owns them).
    pub donated: BTreeSet<u64>,
    /// Share/donate calls answered before `NO_MEMORY` (`None`: no limit);
    /// a memcache top-up lifts the limit.
    pub budget: Option<u64>,
    /// Calls by function id.
    pub calls: BTreeMap<u32, u32>,
    /// Run at the first allocation after a `NO_MEMORY` answer (the host
    /// topping the memcache up, outside the MMU lock).
    pub on_topup: Option<Hook>,
    topup_pending: bool,
}

impl FakeHyp {
    fn map(&mut self, pfn: u64, gfn: u64, donate: bool) -> i64 {
        if self.donated.contains(&pfn) {
            return ret::DENIED;
        }
        if self.guest.contains_key(&gfn) {
            return ret::EXISTS;
        }
        match &mut self.budget {
            Some(0) => {
                self.topup_pending = true;
                return ret::NO_MEMORY;
            }
            Some(n) => *n -= 1,
            None => {}
        }
        self.guest.insert(gfn, pfn);
        if donate {
            self.donated.insert(pfn);
        }
        ret::SUCCESS
    }

    fn unmap(&mut self, gfn: u64) -> i64 {
        match self.guest.remove(&gfn) {
            Some(pfn) => {
                self.donated.remove(&pfn);
                ret::SUCCESS
            }
            None => ret::NOT_FOUND,
        }
    }
}

struct Tables {
    t: Vec<[CoreAtomicU64; ENTRIES]>,
    rc: Vec<AtomicU32>,
}

/// The machine: table pages and the fake hypervisor.
pub(crate) struct TestPlat {
    protected: bool,
    mem: Tables,
    used: Mutex<[bool; TABLE_PAGES]>,
    /// The hypervisor's state.
    pub hyp: Mutex<FakeHyp>,
}

impl TestPlat {
    pub(crate) fn new(protected: bool) -> Self {
        TestPlat {
            protected,
            mem: Tables {
                t: (0..TABLE_PAGES)
                    .map(|_| core::array::from_fn(|_| CoreAtomicU64::new(0)))
                    .collect(),
                rc: (0..TABLE_PAGES).map(|_| AtomicU32::new(0)).collect(),
            },
            used: Mutex::new([false; TABLE_PAGES]),
            hyp: Mutex::new(FakeHyp::default()),
        }
    }

    /// Table pages in use.
    pub(crate) fn pages_in_use(&self) -> usize {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|u| **u)
            .count()
    }

    /// Calls of hypercall `f`.
    pub(crate) fn calls(&self, f: u32) -> u32 {
        self.hyp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .calls
            .get(&f)
            .copied()
            .unwrap_or(0)
    }
}

/// The stage-2 environment: the table pages, no TLB to maintain.
pub(crate) struct Env<'a>(&'a Tables);

impl PtMemory for Env<'_> {
    fn table(&self, pa: Pa) -> &[CoreAtomicU64; ENTRIES] {
        &self.0.t[((pa.0 - TABLE_BASE) / PAGE_SIZE) as usize]
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        &self.0.rc[((pa.0 - TABLE_BASE) / PAGE_SIZE) as usize]
    }
}

impl TlbOps for Env<'_> {
    fn tlbi_leaf(&self, _: u64, _: Level) {}
    fn tlbi_leaf_local(&self, _: u64, _: Level) {}
    fn tlbi_range(&self, _: u64, _: u64) {}
    fn tlbi_all(&self) {}
    fn dcache_clean_poc(&self, _: Pa, _: u64) {}
    fn icache_inval_pou(&self, _: Pa, _: u64) {}
}

impl HostPlatform for TestPlat {
    type S2Env<'a> = Env<'a>;
    fn s2_env(&self, _vmid: u16) -> Env<'_> {
        Env(&self.mem)
    }
    fn alloc_pages(&self, order: u32) -> Option<Pa> {
        let hook = {
            let mut h = self.hyp.lock().unwrap_or_else(PoisonError::into_inner);
            if core::mem::take(&mut h.topup_pending) {
                h.on_topup.take()
            } else {
                None
            }
        };
        if let Some(f) = hook {
            f();
        }
        let n = 1usize << order;
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let i = (0..TABLE_PAGES)
            .step_by(n)
            .find(|&i| i + n <= TABLE_PAGES && used[i..i + n].iter().all(|u| !u))?;
        used[i..i + n].iter_mut().for_each(|u| *u = true);
        Some(Pa(TABLE_BASE + i as u64 * PAGE_SIZE))
    }
    fn free_pages(&self, pa: Pa, order: u32) {
        let i = ((pa.0 - TABLE_BASE) / PAGE_SIZE) as usize;
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        for u in &mut used[i..i + (1 << order)] {
            assert!(*u, "double free of {pa:?}");
            *u = false;
        }
    }
    fn protected_mode(&self) -> bool {
        self.protected
    }
    fn hvc(&self, _cpu: usize, regs: &mut [u64; 8]) {
        let f = regs[0] as u32;
        let mut h = self.hyp.lock().unwrap_or_else(PoisonError::into_inner);
        *h.calls.entry(f).or_default() += 1;
        let status = match f {
            id::RESERVE_VM => {
                regs[1] = 1;
                ret::SUCCESS
            }
            id::GET_SIZES => {
                regs[1..4].copy_from_slice(&[1, 1, 1]);
                ret::SUCCESS
            }
            id::TOPUP_MEMCACHE => {
                h.budget = None;
                ret::SUCCESS
            }
            id::HOST_SHARE_GUEST => h.map(regs[1], regs[2], false),
            id::HOST_DONATE_GUEST => h.map(regs[1], regs[2], true),
            id::HOST_UNSHARE_GUEST | id::RECLAIM_GUEST_PAGE => h.unmap(regs[2]),
            id::RELAX_PERMS_GUEST if !h.guest.contains_key(&regs[1]) => ret::NOT_FOUND,
            id::TEST_CLEAR_YOUNG_GUEST => {
                regs[1] = 0;
                ret::SUCCESS
            }
            _ => ret::SUCCESS,
        };
        regs[0] = status as u64;
    }
    fn kick_vcpu(&self, _: u16, _: usize) {}
}

/// The VMA: `size` bytes at [`HVA`], mapped by the host in `block`-sized
/// pieces; its frames are those of the current generation.
pub(crate) struct TestMm {
    block: u64,
    size: u64,
    gen: AtomicU64,
    /// Page references held now.
    pins: Arc<AtomicI64>,
    /// Run inside the next `pin`, after the frame was taken.
    pub on_pin: Mutex<Option<Hook>>,
}

impl TestMm {
    pub(crate) fn new(block: u64, size: u64) -> Self {
        TestMm {
            block,
            size,
            gen: AtomicU64::new(0),
            pins: Arc::new(AtomicI64::new(0)),
            on_pin: Mutex::new(None),
        }
    }

    /// The frame behind `hva` in generation `gen`.
    pub(crate) fn frame_in(&self, hva: Hva, gen: u64) -> Pa {
        Pa(FRAME_BASE + gen * GEN_STRIDE + (hva.0 - HVA.0))
    }

    /// The frame behind `hva` now.
    pub(crate) fn frame(&self, hva: Hva) -> Pa {
        self.frame_in(hva, self.gen.load(Ordering::Acquire))
    }

    /// The process moves every page to a new frame (the old ones are
    /// freed once unreferenced). Callers bracket it with the MMU notifier.
    pub(crate) fn move_frames(&self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Page references held now.
    pub(crate) fn pins(&self) -> i64 {
        self.pins.load(core::sync::atomic::Ordering::Acquire)
    }
}

struct TestVma(u64, u64);

impl VmaInfo for TestVma {
    fn start(&self) -> Hva {
        HVA
    }
    fn end(&self) -> Hva {
        HVA + self.1
    }
    fn mapping_size(&self) -> u64 {
        self.0
    }
    fn is_hugetlb(&self) -> bool {
        self.0 > PAGE_SIZE
    }
    fn is_thp(&self) -> bool {
        false
    }
    fn is_pfnmap(&self) -> bool {
        false
    }
    fn writable(&self) -> bool {
        true
    }
}

/// A page reference.
pub(crate) struct TestPin {
    pa: Pa,
    folio: Pa,
    size: u64,
    pins: Arc<AtomicI64>,
}

impl Drop for TestPin {
    fn drop(&mut self) {
        self.pins.fetch_sub(1, core::sync::atomic::Ordering::AcqRel);
    }
}

impl PinnedPage for TestPin {
    fn pa(&self) -> Pa {
        self.pa
    }
    fn folio_pa(&self) -> Pa {
        self.folio
    }
    fn folio_hva(&self) -> Hva {
        HVA
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn writable(&self) -> bool {
        true
    }
    fn is_device(&self) -> bool {
        false
    }
}

impl ProcessMemory for TestMm {
    type Pin = TestPin;
    fn with_vma<R>(&self, hva: Hva, f: impl FnOnce(Option<&dyn VmaInfo>) -> R) -> R {
        let vma = TestVma(self.block, self.size);
        f((hva.0 >= HVA.0 && hva.0 < HVA.0 + self.size).then_some(&vma as &dyn VmaInfo))
    }
    fn pin(&self, hva: Hva, _write: bool) -> Result<TestPin, PinError> {
        if hva.0 < HVA.0 || hva.0 >= HVA.0 + self.size {
            return Err(PinError::BadAddress(hva));
        }
        let pa = self.frame(hva.align_down(PAGE_SIZE));
        self.pins.fetch_add(1, core::sync::atomic::Ordering::AcqRel);
        let pin = TestPin {
            pa,
            folio: Pa(pa.0 & !(self.block - 1)),
            size: self.block,
            pins: self.pins.clone(),
        };
        let hook = self
            .on_pin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(f) = hook {
            f();
        }
        Ok(pin)
    }
}

/// The VM type of these tests.
pub(crate) type TestVm = Vm<TestPlat, TestMm>;

/// A VM with one 4 MiB memslot at [`RAM`] backed by a `block`-mapped VMA,
/// every vCPU powered on.
pub(crate) fn test_vm(mode: Mode, block: u64, nr_vcpus: usize) -> Arc<TestVm> {
    let plat = Arc::new(TestPlat::new(mode != Mode::Standard));
    let mm = Arc::new(TestMm::new(block, RAM_SIZE));
    let cfg = VmConfig {
        protected: mode == Mode::Donated,
        nr_vcpus,
        ..VmConfig::default()
    };
    let vm = Vm::create(plat, mm, cfg, 0).expect("create");
    let region = UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM.0,
        memory_size: RAM_SIZE,
        userspace_addr: HVA.0,
    };
    vm.set_user_memory_region(region, 0).expect("memslot");
    for i in 0..nr_vcpus {
        vm.vcpu_power(i).lock().power_on(ResetState {
            pc: 0,
            context_id: 0,
            big_endian: false,
            reset: true,
        });
    }
    vm
}

/// The frame stage-2 maps `ipa` to now, if any.
pub(crate) fn guest_frame(vm: &TestVm, ipa: Ipa) -> Option<Pa> {
    if vm.handle().is_none() {
        return vm.s2_translate(ipa).map(|(pa, _, _)| pa);
    }
    let hyp = vm
        .platform()
        .hyp
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let pfn = hyp.guest.get(&ipa.gfn().0)?;
    Some(Pa(pfn * PAGE_SIZE + (ipa.0 & (PAGE_SIZE - 1))))
}

/// The MMU notifier around the process moving every frame of the VMA.
pub(crate) fn migrate(vm: &TestVm) {
    vm.mmu_notifier_invalidate_start(HVA, HVA + RAM_SIZE, 0);
    vm.mm().move_frames();
    vm.mmu_notifier_invalidate_end();
}

/// A guest that reads (or writes) one address: it exits with a stage-2
/// translation fault until the address is mapped, then halts; after
/// `max_entries` entries it halts regardless.
pub(crate) struct TestBackend {
    cpu: usize,
    ipa: Ipa,
    write: bool,
    mapped: Box<dyn Fn(Ipa) -> bool>,
    max_entries: u32,
    late_fault: bool,
    /// Guest entries so far.
    pub entries: u32,
}

impl TestBackend {
    /// The guest of vCPU thread `cpu` of `vm`, accessing `ipa`.
    pub(crate) fn new(vm: &Arc<TestVm>, cpu: usize, ipa: Ipa, write: bool) -> Self {
        let vm = Arc::downgrade(vm);
        TestBackend {
            cpu,
            ipa,
            write,
            mapped: Box::new(move |ipa| {
                vm.upgrade()
                    .is_some_and(|vm| guest_frame(&vm, ipa).is_some())
            }),
            max_entries: 16,
            late_fault: false,
            entries: 0,
        }
    }

    /// The first entry exits with the fault even if the address is mapped
    /// by then: a fault taken before another vCPU mapped the page, handled
    /// after.
    pub(crate) fn late_fault(mut self) -> Self {
        self.late_fault = true;
        self
    }

    /// Halts after `n` entries even if the address is still unmapped.
    pub(crate) fn max_entries(mut self, n: u32) -> Self {
        self.max_entries = n;
        self
    }
}

impl VcpuBackend for TestBackend {
    fn cpu(&self) -> usize {
        self.cpu
    }
    fn enter(&mut self, _ctx: &mut VcpuContext, _s2: &StageTwo) -> GuestExit {
        self.entries += 1;
        let late = self.late_fault && self.entries == 1;
        if self.entries > self.max_entries || (!late && (self.mapped)(self.ipa)) {
            return GuestExit::ProgramDone;
        }
        let s = AccessSyndrome {
            sas: 3,
            sse: false,
            srt: 1,
            sf: true,
            ar: false,
        };
        let esr = Esr::data_abort(
            Some(s),
            self.write,
            false,
            FaultStatus::Translation(Level(3)),
        );
        GuestExit::Abort {
            esr: esr.0,
            far: self.ipa.0,
            hpfar: hpfar_for(self.ipa),
        }
    }
    fn complete_mmio(&mut self, _: &mut VcpuContext, _: &GuestFault, _: u64) {
        panic!("unexpected MMIO exit at {:?}", self.ipa);
    }
    fn inject_abort(&mut self, _: &mut VcpuContext, f: &GuestFault) {
        panic!("unexpected abort injected for {f:?}");
    }
}

/// Runs vCPU `index` of `vm` on CPU `index` until its guest halts.
pub(crate) fn run_guest(vm: &Arc<TestVm>, index: usize, ipa: Ipa) -> (VcpuExit, u32) {
    run_backend(vm, index, TestBackend::new(vm, index, ipa, true))
}

/// Runs vCPU `index` of `vm` with `be` until its guest halts.
pub(crate) fn run_backend(vm: &Arc<TestVm>, index: usize, mut be: TestBackend) -> (VcpuExit, u32) {
    let mut vcpu = vm.vcpu(index).expect("vcpu");
    let exit = vcpu.run(&mut be);
    (exit, be.entries)
}
