//! Seed 003 with the state it is about: the split page cache and the
//! nested shadow MMUs. The mm-exit flush (`mmu_notifier_release`), the
//! last VM reference (`teardown` + `Drop`), a fault on a shadow MMU
//! (`nested_get_mmu` / `nested_put_mmu`) and a memslot commit that stops
//! dirty logging race on the real [`Vm`]; the fake platform panics on a
//! double free, and every page must come back exactly once.

use alloc::sync::Arc;

use pkvm_arch::pte::S2Prot;
use pkvm_arch::{Ipa, Pa};

use super::{bounded, FakePlat, NoMm};
use crate::memslot::{UserMemoryRegion, MEM_LOG_DIRTY_PAGES};
use crate::nested::GuestS2Config;
use crate::platform::HostPageCache;
use crate::vm::{Vm, VmConfig};

const CFG: GuestS2Config = GuestS2Config {
    vttbr: (5 << 48) | 0x4000_0000,
    vtcr: 32,
};

fn slot(flags: u32) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: 0x4000_0000,
        memory_size: 2 << 20,
        userspace_addr: 0x1000_0000,
    }
}

/// A VM whose stage-2 holds a filled split cache and one idle shadow MMU.
fn vm_with_split_cache_and_shadow(p: &Arc<FakePlat>) -> Arc<Vm<FakePlat, NoMm>> {
    let vm = Vm::create(p.clone(), Arc::new(NoMm), VmConfig::default(), 0).expect("create");
    vm.set_eager_split_chunk_size(2 << 20).expect("chunk");
    vm.set_user_memory_region(slot(MEM_LOG_DIRTY_PAGES), 0)
        .expect("slot");
    vm.eager_split(Ipa(0x4000_0000), Ipa(0x4020_0000));
    let r = vm.nested_get_mmu(CFG).expect("shadow");
    vm.nested_put_mmu(r);
    assert_eq!(vm.nested_live(), 1);
    vm
}

/// `a` on a second thread against `b` on this one, then the last VM
/// reference goes (its `Drop` tears down whatever is left).
fn race(a: fn(&Vm<FakePlat, NoMm>), b: fn(&Vm<FakePlat, NoMm>)) {
    bounded(move || {
        let p = Arc::new(FakePlat::new(false));
        let vm = vm_with_split_cache_and_shadow(&p);
        let vm1 = vm.clone();
        let t = loom::thread::spawn(move || a(&vm1));
        b(&vm);
        t.join().unwrap();
        drop(vm);
        assert_eq!(
            p.in_use(),
            0,
            "a page (root, split cache, shadow) was never freed"
        );
    });
}

/// The mm exit's flush-all.
fn flush_all(vm: &Vm<FakePlat, NoMm>) {
    vm.mmu_notifier_release(1);
}

/// VM destroy (the last file reference).
fn destroy(vm: &Vm<FakePlat, NoMm>) {
    vm.teardown(0);
}

/// A vCPU entering L2 and faulting: takes (maybe builds) the shadow,
/// installs a translation in it (table pages from its own cache), and
/// puts the shadow back.
fn shadow_fault(vm: &Vm<FakePlat, NoMm>) {
    if let Ok(r) = vm.nested_get_mmu(CFG) {
        let mut cache = HostPageCache::new(vm.platform().clone());
        if cache.topup(2).is_ok() {
            let seq = vm.mmu.seq();
            let _ = vm.nested_map(
                &r,
                seq,
                Ipa(0x4000_0000),
                Ipa(0x1000),
                Pa(0x8000_0000),
                S2Prot::RW,
                &mut cache,
            );
        }
        vm.nested_put_mmu(r);
    }
}

/// A memslot commit that stops dirty logging.
fn stop_logging(vm: &Vm<FakePlat, NoMm>) {
    let _ = vm.set_user_memory_region(slot(0), 2);
}

#[test]
fn loom_flush_all_vs_destroy_free_shadows_and_split_cache_once() {
    race(flush_all, destroy);
}

#[test]
fn loom_flush_all_vs_shadow_fault_frees_every_shadow_once() {
    race(flush_all, shadow_fault);
}

#[test]
fn loom_destroy_vs_logging_commit_frees_the_split_cache_once() {
    race(stop_logging, destroy);
}

/// A fault that sampled the invalidation sequence (and so may hold the
/// memslot from before logging started, without the flag) must retry
/// rather than map a writable block the enable's write-protect missed.
#[test]
fn loom_enabling_logging_makes_an_earlier_fault_retry() {
    bounded(|| {
        let p = Arc::new(FakePlat::new(false));
        let vm = Vm::create(p.clone(), Arc::new(NoMm), VmConfig::default(), 0).expect("create");
        vm.set_user_memory_region(slot(0), 0).expect("slot");
        let seq = vm.mmu.seq();
        let vm1 = vm.clone();
        let t = loom::thread::spawn(move || {
            vm1.set_user_memory_region(slot(MEM_LOG_DIRTY_PAGES), 0)
                .expect("logging");
        });
        t.join().unwrap();
        assert!(
            vm.mmu.retry(seq, Ipa(0x4000_0000)),
            "a fault from before logging started would map without retrying"
        );
    });
}
