//! Loom models of the host's two races, driving the real code:
//! - fault vs. invalidation: a vCPU thread runs the real fault path
//!   (`Vcpu::run` -> pipeline -> `map_standard` / `map_protected`) on the
//!   [`crate::testkit`] doubles (a page-table memory and a fake hypervisor,
//!   a process whose frames move) while another thread runs the real MMU
//!   notifier around the process moving the page: in every interleaving,
//!   the frame stage-2 maps at the end is the process's current one (a
//!   freed frame is never left mapped). Removing the sequence re-check in
//!   `memory_fault` (standard) or `map_protected_locked` (protected) makes
//!   these models fail ("freed frame ... left mapped");
//! - two vCPUs faulting on one 2 MiB block in protected mode while the
//!   hypervisor's memcache runs dry part-way: neither fails (before the
//!   partial block was recorded, the second one shared its first page
//!   again and stopped the VM with EXISTS / DENIED);
//! - two concurrent teardowns (seed 003: VM destroy vs. the mm-exit
//!   notifier) through the real [`Vm::teardown`] with a fake platform that
//!   counts allocations, frees and hypercalls: everything is freed exactly
//!   once, and a guest page's host reference is dropped only after the
//!   hypervisor finalized the teardown.
//!
//! (The teardown models once hit loom's branch limit because
//! `RwSpinLock::write` stored a "writer waiting" flag inside its spin loop;
//! the lock now spins read-only, as loom requires, and they run normally.
//! Before that change the finalize model found the teardown race fixed in
//! `Vm::teardown`.)
//!
//! They are unit tests (not `tests/`) because the VM's internal state and
//! the test doubles are crate-private. Run:
//! `RUSTFLAGS="--cfg loom" cargo test -p pkvm-host --release --lib loom`.

extern crate std;

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32 as CoreAtomicU32, AtomicU64 as CoreAtomicU64};

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Mutex;
use pkvm_arch::{Hva, Level, Pa, PAGE_SIZE};
use pkvm_hyp::hvc::{id, ret};
use pkvm_pgtable::env::ENTRIES;
use pkvm_pgtable::{PtMemory, TlbOps};

use crate::mmu::{HypMapping, S2State};
use crate::platform::{HostPlatform, PinError, PinnedPage, ProcessMemory, VmaInfo};
use crate::testkit::{guest_frame, migrate, test_vm, Mode, TestBackend, HVA, RAM};
use crate::vm::{Vm, VmConfig};
use crate::VcpuExit;

fn bounded(f: impl Fn() + Sync + Send + 'static) {
    bounded_by(3, f);
}

fn bounded_by(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.max_branches = 100_000;
    b.check(f);
}

// ---------------------------------------------------------------- (a)

/// One guest access to [`RAM`] (one fault, then the guest halts) races the
/// process moving the page to a new frame inside the MMU notifier.
fn fault_vs_invalidate(mode: Mode) {
    bounded(move || {
        let vm = test_vm(mode, PAGE_SIZE, 1);
        let vm2 = vm.clone();
        let t = loom::thread::spawn(move || migrate(&vm2));
        let mut vcpu = vm.vcpu(0).expect("vcpu");
        let mut be = TestBackend::new(&vm, 0, RAM, true).max_entries(1);
        let exit = vcpu.run(&mut be);
        t.join().unwrap();
        assert_eq!(exit, VcpuExit::Halted);
        let now = vm.mm().frame(HVA);
        if let Some(pa) = guest_frame(&vm, RAM) {
            assert_eq!(pa, now, "freed frame {pa:?} left mapped (current {now:?})");
        }
    });
}

#[test]
fn loom_fault_vs_invalidate_never_maps_a_freed_frame_standard() {
    fault_vs_invalidate(Mode::Standard);
}

#[test]
fn loom_fault_vs_invalidate_never_maps_a_freed_frame_protected_mode() {
    fault_vs_invalidate(Mode::Shared);
}

/// Two vCPUs fault on the same 2 MiB block (protected mode, pages shared
/// or donated one by one) while the hypervisor's memcache runs dry after
/// 100 pages: whichever tops it up (dropping the MMU lock), the other
/// resumes the block or finds its page mapped; neither fails, and the block
/// is mapped once, to the process's frames.
/// (Two preemptions: each thread runs a whole fault path, and the race
/// needs one switch while the MMU lock is dropped.)
fn two_faults_on_a_block_with_the_memcache_dry(mode: Mode) {
    bounded_by(2, move || {
        let vm = test_vm(mode, 2 << 20, 2);
        vm.platform().hyp.lock().unwrap().budget = Some(100);
        let vm2 = vm.clone();
        let t = loom::thread::spawn(move || {
            let mut vcpu = vm2.vcpu(1).expect("vcpu 1");
            let mut be = TestBackend::new(&vm2, 1, RAM + 300 * PAGE_SIZE, true).max_entries(3);
            vcpu.run(&mut be)
        });
        let mut vcpu = vm.vcpu(0).expect("vcpu 0");
        let mut be = TestBackend::new(&vm, 0, RAM + 200 * PAGE_SIZE, true).max_entries(3);
        let exit0 = vcpu.run(&mut be);
        let exit1 = t.join().unwrap();
        assert_eq!((exit0, exit1), (VcpuExit::Halted, VcpuExit::Halted));
        let hyp = vm.platform().hyp.lock().unwrap();
        for (gfn, pfn) in &hyp.guest {
            let hva = HVA + (gfn * PAGE_SIZE - RAM.0);
            assert_eq!(*pfn, vm.mm().frame(hva).pfn().0, "gfn {gfn:#x}");
        }
        drop(hyp);
        assert!(vm.hyp_mapped_pages() <= 512);
    });
}

#[test]
fn loom_two_faults_on_a_block_with_the_memcache_dry_shared() {
    two_faults_on_a_block_with_the_memcache_dry(Mode::Shared);
}

#[test]
fn loom_two_faults_on_a_block_with_the_memcache_dry_donated() {
    two_faults_on_a_block_with_the_memcache_dry(Mode::Donated);
}

// ---------------------------------------------------------------- (b)

const BASE: u64 = 0x1000_0000;
const PAGES: usize = 16;

struct Tables {
    t: Vec<[CoreAtomicU64; ENTRIES]>,
    rc: Vec<CoreAtomicU32>,
}

/// A fake machine: 16 pages of "memory", an allocator that panics on a
/// double free, a hypervisor that answers every call and counts them.
struct FakePlat {
    protected: bool,
    mem: Tables,
    used: Mutex<[bool; PAGES]>,
    calls: Mutex<BTreeMap<u32, u32>>,
    finalized: AtomicBool,
}

impl FakePlat {
    fn new(protected: bool) -> Self {
        FakePlat {
            protected,
            mem: Tables {
                t: (0..PAGES)
                    .map(|_| core::array::from_fn(|_| CoreAtomicU64::new(0)))
                    .collect(),
                rc: (0..PAGES).map(|_| CoreAtomicU32::new(0)).collect(),
            },
            used: Mutex::new([false; PAGES]),
            calls: Mutex::new(BTreeMap::new()),
            finalized: AtomicBool::new(false),
        }
    }
    fn in_use(&self) -> usize {
        self.used.lock().unwrap().iter().filter(|u| **u).count()
    }
    fn calls(&self, f: u32) -> u32 {
        self.calls.lock().unwrap().get(&f).copied().unwrap_or(0)
    }
}

struct Env<'a>(&'a Tables);

impl PtMemory for Env<'_> {
    fn table(&self, pa: Pa) -> &[CoreAtomicU64; ENTRIES] {
        &self.0.t[((pa.0 - BASE) / 4096) as usize]
    }
    fn refcount(&self, pa: Pa) -> &CoreAtomicU32 {
        &self.0.rc[((pa.0 - BASE) / 4096) as usize]
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

impl HostPlatform for FakePlat {
    type S2Env<'a> = Env<'a>;
    fn s2_env(&self, _vmid: u16) -> Env<'_> {
        Env(&self.mem)
    }
    fn alloc_pages(&self, order: u32) -> Option<Pa> {
        let n = 1usize << order;
        let mut used = self.used.lock().unwrap();
        let i = (0..PAGES)
            .step_by(n)
            .find(|&i| i + n <= PAGES && used[i..i + n].iter().all(|u| !u))?;
        used[i..i + n].iter_mut().for_each(|u| *u = true);
        Some(Pa(BASE + i as u64 * 4096))
    }
    fn free_pages(&self, pa: Pa, order: u32) {
        let i = ((pa.0 - BASE) / 4096) as usize;
        let mut used = self.used.lock().unwrap();
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
        *self.calls.lock().unwrap().entry(f).or_default() += 1;
        regs[0] = ret::SUCCESS as u64;
        match f {
            id::RESERVE_VM => regs[1] = 0x1000,
            id::GET_SIZES => regs[1..4].copy_from_slice(&[1, 1, 1]),
            id::FINALIZE_TEARDOWN => self.finalized.store(true, Ordering::Release),
            _ => {}
        }
    }
    fn kick_vcpu(&self, _: u16, _: usize) {}
}

/// A guest page's host reference: must not be released before the
/// hypervisor finalized the teardown (the guest still maps it until then).
struct FakePin(Arc<FakePlat>);

impl Drop for FakePin {
    fn drop(&mut self) {
        assert!(
            self.0.finalized.load(Ordering::Acquire),
            "page reference dropped while the guest may still map the page"
        );
    }
}

impl PinnedPage for FakePin {
    fn pa(&self) -> Pa {
        Pa(0)
    }
    fn folio_pa(&self) -> Pa {
        Pa(0)
    }
    fn folio_hva(&self) -> Hva {
        Hva(0)
    }
    fn size(&self) -> u64 {
        4096
    }
    fn writable(&self) -> bool {
        true
    }
    fn is_device(&self) -> bool {
        false
    }
}

struct NoMm;

impl ProcessMemory for NoMm {
    type Pin = FakePin;
    fn with_vma<R>(&self, _: Hva, f: impl FnOnce(Option<&dyn VmaInfo>) -> R) -> R {
        f(None)
    }
    fn pin(&self, hva: Hva, _: bool) -> Result<FakePin, PinError> {
        Err(PinError::BadAddress(hva))
    }
}

/// Creates a VM (initialised in the hypervisor and with one guest page
/// mapped if `run`), races VM destroy against the mm-exit notifier, and
/// returns the platform.
fn race_teardowns(protected_mode: bool, protected_vm: bool, run: bool) -> Arc<FakePlat> {
    let p = Arc::new(FakePlat::new(protected_mode));
    let cfg = VmConfig {
        protected: protected_vm,
        ..VmConfig::default()
    };
    let vm = Vm::create(p.clone(), Arc::new(NoMm), cfg, 0).expect("create");
    if run {
        vm.ensure_hyp_init(0).expect("hyp init");
        if let Some(S2State::Protected(m)) = vm.mmu.state.write().as_mut() {
            m.shard(pkvm_arch::Gfn(0x40000)).insert(
                0x40000,
                HypMapping {
                    npages: 1,
                    pa: Pa(0),
                    _pin: FakePin(p.clone()),
                },
            );
        }
    }
    let vm2 = vm.clone();
    let t = loom::thread::spawn(move || vm2.mmu_notifier_release(1));
    vm.teardown(0);
    t.join().unwrap();
    drop(vm);
    p
}

#[test]
fn loom_concurrent_teardowns_free_the_standard_stage2_once() {
    bounded(|| {
        let p = race_teardowns(false, false, false);
        assert_eq!(p.in_use(), 0, "stage-2 root leaked");
    });
}

#[test]
fn loom_concurrent_teardowns_unreserve_a_never_run_hyp_vm_once() {
    bounded(|| {
        let p = race_teardowns(true, false, false);
        assert_eq!(p.calls(id::UNRESERVE_VM), 1);
        assert_eq!(p.calls(id::START_TEARDOWN), 0);
        assert_eq!(p.in_use(), 0);
    });
}

#[test]
fn loom_concurrent_teardowns_finalize_a_hyp_vm_once() {
    for protected_vm in [false, true] {
        bounded(move || {
            let p = race_teardowns(true, protected_vm, true);
            assert_eq!(p.calls(id::UNRESERVE_VM), 0);
            assert_eq!(p.calls(id::START_TEARDOWN), 1);
            assert_eq!(p.calls(id::FINALIZE_TEARDOWN), 1);
            if protected_vm {
                assert_eq!(p.calls(id::RECLAIM_GUEST_PAGE), 1, "donated page reclaimed");
            }
            assert_eq!(p.in_use(), 0, "donated pages freed back");
        });
    }
}

#[path = "loom_teardown.rs"]
mod teardown;
