//! Deterministic races on the real fault path ([`crate::testkit`]): an
//! MMU-notifier invalidation injected between pin and map, and the
//! hypervisor's memcache running dry in the middle of a block while another
//! vCPU faults on the block or the block is invalidated.

extern crate std;

use alloc::boxed::Box;
use alloc::sync::Arc;
use std::sync::Mutex;

use pkvm_arch::{Hva, Ipa, PAGE_SIZE};
use pkvm_hyp::hvc::id;

use crate::testkit::{
    guest_frame, migrate, run_backend, run_guest, test_vm, Mode, TestBackend, HVA, RAM,
};
use crate::VcpuExit;

const MODES: [Mode; 3] = [Mode::Standard, Mode::Shared, Mode::Donated];
const G2M: u64 = 2 << 20;

fn hva_of(ipa: Ipa) -> Hva {
    HVA + (ipa.0 - RAM.0)
}

#[test]
fn invalidation_between_pin_and_map_is_retried_and_maps_the_new_frame() {
    for mode in MODES {
        for block in [PAGE_SIZE, G2M] {
            let vm = test_vm(mode, block, 1);
            let ipa = RAM + 0x23_4000;
            let stale = vm.mm().frame(hva_of(ipa));
            let weak = Arc::downgrade(&vm);
            *vm.mm().on_pin.lock().unwrap() =
                Some(Box::new(move || migrate(&weak.upgrade().unwrap())));
            let (exit, entries) = run_guest(&vm, 0, ipa);
            let now = vm.mm().frame(hva_of(ipa));
            assert_ne!(now, stale);
            assert_eq!(exit, VcpuExit::Halted, "{mode:?}/{block:#x}");
            assert_eq!(
                guest_frame(&vm, ipa),
                Some(now),
                "{mode:?}/{block:#x}: the frame pinned before the invalidation ({stale:?}) was mapped"
            );
            assert_eq!(
                entries, 3,
                "{mode:?}/{block:#x}: fault, retried fault, access"
            );
            assert_eq!(vm.stats().snapshot().retries, 1, "{mode:?}/{block:#x}");
            let (plat, mm) = (vm.platform().clone(), vm.mm().clone());
            drop(vm);
            assert_eq!(mm.pins(), 0, "{mode:?}/{block:#x}: page references left");
            assert_eq!(plat.pages_in_use(), 0, "{mode:?}/{block:#x}: pages leaked");
        }
    }
}

#[test]
fn invalidation_in_progress_at_map_time_is_retried_until_it_ends() {
    for mode in MODES {
        let vm = test_vm(mode, PAGE_SIZE, 1);
        let ipa = RAM + 0x5000;
        let stale = vm.mm().frame(hva_of(ipa));
        let weak = Arc::downgrade(&vm);
        *vm.mm().on_pin.lock().unwrap() = Some(Box::new(move || {
            let vm = weak.upgrade().unwrap();
            vm.mmu_notifier_invalidate_start(HVA, HVA + 0x10_0000, 0);
            vm.mm().move_frames();
        }));
        // Two faults while the invalidation runs: neither maps.
        let mut vcpu = vm.vcpu(0).unwrap();
        let mut be = TestBackend::new(&vm, 0, ipa, true).max_entries(2);
        assert_eq!(vcpu.run(&mut be), VcpuExit::Halted);
        assert_eq!(
            guest_frame(&vm, ipa),
            None,
            "{mode:?}: mapped during an invalidation (stale frame {stale:?})"
        );
        assert_eq!(vm.stats().snapshot().retries, 2, "{mode:?}");
        vm.mmu_notifier_invalidate_end();
        let mut be = TestBackend::new(&vm, 0, ipa, true);
        assert_eq!(vcpu.run(&mut be), VcpuExit::Halted);
        assert_eq!(
            guest_frame(&vm, ipa),
            Some(vm.mm().frame(hva_of(ipa))),
            "{mode:?}"
        );
    }
}

/// vCPU 0 faults on page `first` of a 2 MiB block; the hypervisor's
/// memcache runs dry after 100 pages; while vCPU 0 tops it up (the MMU lock
/// dropped) `during` runs.
fn dry_mid_block(
    mode: Mode,
    first: u64,
    during: impl FnOnce(&Arc<crate::testkit::TestVm>) + Send + 'static,
) -> Arc<crate::testkit::TestVm> {
    let vm = test_vm(mode, G2M, 2);
    vm.platform().hyp.lock().unwrap().budget = Some(100);
    let weak = Arc::downgrade(&vm);
    vm.platform().hyp.lock().unwrap().on_topup =
        Some(Box::new(move || during(&weak.upgrade().unwrap())));
    let (exit, _) = run_guest(&vm, 0, RAM + first * PAGE_SIZE);
    assert_eq!(exit, VcpuExit::Halted, "{mode:?}: vCPU 0");
    vm
}

/// Every page of the first block maps the process's current frame.
fn assert_block_current(vm: &crate::testkit::TestVm, what: &str) {
    for p in 0..512 {
        let ipa = RAM + p * PAGE_SIZE;
        assert_eq!(
            guest_frame(vm, ipa),
            Some(vm.mm().frame(hva_of(ipa))),
            "{what}: page {p}"
        );
    }
}

#[test]
fn memcache_dry_mid_block_and_a_second_vcpu_on_the_block_both_complete() {
    for mode in [Mode::Shared, Mode::Donated] {
        // The second vCPU faults on the block's first page (already shared
        // or donated by vCPU 0) or on one after where vCPU 0 stopped.
        for second in [0, 300] {
            let exit1 = Arc::new(Mutex::new(None));
            let e = exit1.clone();
            let vm = dry_mid_block(mode, 200, move |vm| {
                // Its fault was taken before vCPU 0 shared anything.
                let be = TestBackend::new(vm, 1, RAM + second * PAGE_SIZE, true).late_fault();
                *e.lock().unwrap() = Some(run_backend(vm, 1, be).0);
            });
            let exit1 = exit1.lock().unwrap().take();
            assert_eq!(
                exit1,
                Some(VcpuExit::Halted),
                "{mode:?}: vCPU 1 on page {second}"
            );
            assert_block_current(&vm, "after both faults");
            assert_eq!(
                vm.hyp_mapped_pages(),
                512,
                "{mode:?}/{second}: one block, recorded once"
            );
            assert!(
                vm.platform().calls(id::TOPUP_MEMCACHE) > 0,
                "the memcache ran dry"
            );
            let mm = vm.mm().clone();
            drop(vm);
            assert_eq!(mm.pins(), 0, "{mode:?}/{second}: page references left");
        }
    }
}

#[test]
fn invalidation_while_the_memcache_is_topped_up_takes_the_partial_block_back() {
    // A non-protected VM (a protected VM's donated pages cannot move).
    let vm = dry_mid_block(Mode::Shared, 200, |vm| migrate(vm));
    let stale: alloc::vec::Vec<(u64, u64)> = {
        let hyp = vm.platform().hyp.lock().unwrap();
        hyp.guest
            .iter()
            .map(|(g, pfn)| (*g, *pfn))
            .filter(|(g, pfn)| *pfn != vm.mm().frame(hva_of(Ipa(g * PAGE_SIZE))).pfn().0)
            .collect()
    };
    assert!(
        stale.is_empty(),
        "{} stale frames still shared, first (gfn, pfn) {:x?}",
        stale.len(),
        stale.first()
    );
    assert_block_current(&vm, "after the invalidation");
}
