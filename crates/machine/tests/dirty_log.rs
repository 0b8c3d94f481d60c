//! Dirty logging end to end: bitmaps equal the guest's writes (every
//! backing, with and without manual protect / eager split, with a notifier
//! storm), eager splitting leaves no block, and bad requests are refused
//! with KVM's errors without changing anything.

mod common;

use common::{Env, Flavor, RAM};
use pkvm_arch::{Ipa, PAGE_SIZE};
use pkvm_host::dirty::{DirtyLogError, INITIALLY_SET, MANUAL_PROTECT_ENABLE};
use pkvm_host::memslot::MEM_LOG_DIRTY_PAGES;
use pkvm_machine::demand_paging::Backing;
use pkvm_machine::dirty_log_perf::{self, Config};
use pkvm_sim::cpu::{Op, Script};
use pkvm_sim::mm::VmaKind;

fn verified(backing: Backing, manual: bool, eager: u64, storm: bool) {
    let cfg = Config {
        vcpus: 2,
        bytes_per_vcpu: 8 << 20,
        backing,
        iterations: 2,
        manual_protect: manual,
        eager_split_chunk: eager,
        write_percent: 40,
        verify: true,
        notifier_storm: storm,
        ..Config::default()
    };
    let r = dirty_log_perf::run(&cfg)
        .unwrap_or_else(|e| panic!("{backing:?} manual={manual} eager={eager}: {e}"));
    assert_eq!(r.coherence_violations, 0);
    assert_eq!(r.frames_leaked, 0, "frames leaked");
    for it in &r.iterations {
        assert_eq!((it.missing, it.extra), (0, 0), "iteration {}", it.n);
        assert!(it.pages_written > 0 && it.pages_written < 4096 || manual && it.n == 1);
    }
}

/// Get/clear modes crossed with eager splitting (off, 2M and 1G chunks).
fn every_mode(backing: Backing) {
    for (manual, eager) in [(false, 0), (true, 0), (false, 2 << 20), (true, 1 << 30)] {
        verified(backing, manual, eager, false);
    }
}

#[test]
fn bitmaps_equal_the_guests_writes_with_4k_pages() {
    every_mode(Backing::Anonymous);
}

#[test]
fn bitmaps_equal_the_guests_writes_with_thp() {
    every_mode(Backing::AnonymousThp);
}

#[test]
fn bitmaps_equal_the_guests_writes_with_hugetlb() {
    every_mode(Backing::Hugetlb2M);
}

#[test]
fn bitmaps_stay_exact_under_a_notifier_storm() {
    for backing in [Backing::Anonymous, Backing::AnonymousThp] {
        verified(backing, false, 2 << 20, true);
        verified(backing, true, 0, true);
    }
}

/// Logging on a hugetlb slot with eager splitting: no block is left
/// after enabling, and reads after that take no fault.
#[test]
fn eager_split_leaves_only_pages_and_reads_do_not_dirty() {
    let env = Env::new(Flavor::Standard, 1);
    env.vm.set_eager_split_chunk_size(2 << 20).unwrap();
    let size = 4u64 << 20;
    let hva = env.add_slot(0, RAM, size, VmaKind::Hugetlb2M, 0);
    let touch = |write: bool| {
        let ops = (0..size / PAGE_SIZE).map(|p| {
            let ipa = Ipa(RAM.0 + p * PAGE_SIZE);
            if write {
                Op::write(ipa, 8)
            } else {
                Op::read(ipa, 8)
            }
        });
        let mut r = env.runner(0, Box::new(Script::new(ops.collect::<Vec<_>>())));
        r.run_to_end();
    };
    touch(true);
    assert_eq!(
        env.vm.s2_translate(RAM).unwrap().2,
        2 << 20,
        "populated as blocks"
    );
    env.set_slot(0, RAM, size, hva, MEM_LOG_DIRTY_PAGES);
    for p in (0..size).step_by(PAGE_SIZE as usize) {
        let (_, prot, sz) = env.vm.s2_translate(Ipa(RAM.0 + p)).expect("still mapped");
        assert_eq!(sz, PAGE_SIZE, "block left at {p:#x}");
        assert!(
            !prot.contains(pkvm_arch::pte::S2Prot::W),
            "writable at {p:#x}"
        );
    }
    let f0 = env.vm.stats().snapshot();
    touch(false);
    let f1 = env.vm.stats().snapshot();
    assert_eq!(
        f1.translation_faults + f1.permission_faults,
        f0.translation_faults + f0.permission_faults
    );
    let mut bm = vec![0u64; (size / PAGE_SIZE / 64) as usize];
    env.vm.get_dirty_log(0, &mut bm, 0).unwrap();
    assert!(bm.iter().all(|w| *w == 0), "reads set dirty bits: {bm:x?}");
    env.finish();
}

#[test]
fn bad_dirty_log_requests_are_refused_with_kvm_errors_and_change_nothing() {
    let env = Env::new(Flavor::Standard, 1);
    let npages = 256u64;
    let hva = env.add_slot(0, RAM, npages * PAGE_SIZE, VmaKind::Anonymous4K, 0);
    env.add_slot(
        1,
        Ipa(RAM.0 + (64 << 20)),
        64 * PAGE_SIZE,
        VmaKind::Anonymous4K,
        0,
    );
    let vm = &env.vm;
    assert_eq!(
        vm.set_eager_split_chunk_size(2 << 20),
        Err(DirtyLogError::Busy)
    );
    assert_eq!(
        vm.set_manual_dirty_log_protect(INITIALLY_SET),
        Err(DirtyLogError::InvalidFlags(2))
    );
    let mut bm = vec![0u64; 4];
    assert_eq!(
        vm.get_dirty_log(1, &mut bm, 0),
        Err(DirtyLogError::NotLogging(1))
    );
    assert_eq!(
        vm.get_dirty_log(9, &mut bm, 0),
        Err(DirtyLogError::NotLogging(9))
    );
    assert_eq!(
        vm.get_dirty_log(4096, &mut bm, 0),
        Err(DirtyLogError::InvalidSlot(4096))
    );
    vm.set_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE | INITIALLY_SET)
        .unwrap();
    env.set_slot(0, RAM, npages * PAGE_SIZE, hva, MEM_LOG_DIRTY_PAGES);
    assert_eq!(
        vm.get_dirty_log(0, &mut [0u64; 3], 0),
        Err(DirtyLogError::BitmapSize {
            expected: 4,
            got: 3
        })
    );
    let ones = [u64::MAX; 4];
    let cases = [
        (
            0,
            65,
            DirtyLogError::Misaligned {
                first_page: 0,
                num_pages: 65,
            },
        ),
        (
            32,
            64,
            DirtyLogError::Misaligned {
                first_page: 32,
                num_pages: 64,
            },
        ),
        (
            192,
            128,
            DirtyLogError::OutOfSlot {
                first_page: 192,
                num_pages: 128,
                npages,
            },
        ),
        (
            320,
            0,
            DirtyLogError::OutOfSlot {
                first_page: 320,
                num_pages: 0,
                npages,
            },
        ),
    ];
    for (first, n, e) in cases {
        let words = (n as usize).div_ceil(64);
        assert_eq!(
            vm.clear_dirty_log(0, first, n, &ones[..words.min(4)], 0),
            Err(e)
        );
        assert_eq!(e.errno(), 22);
    }
    assert_eq!(
        vm.clear_dirty_log(0, 0, 128, &ones[..1], 0),
        Err(DirtyLogError::BitmapSize {
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        vm.clear_dirty_log(1, 0, 64, &ones[..1], 0)
            .unwrap_err()
            .errno(),
        2
    );
    // Nothing changed: still all set (initially set).
    vm.get_dirty_log(0, &mut bm, 0).unwrap();
    assert_eq!(bm, vec![u64::MAX; 4]);
    // A valid clear of the last 64 pages clears exactly those bits.
    vm.clear_dirty_log(0, 192, 64, &[u64::MAX], 0).unwrap();
    vm.get_dirty_log(0, &mut bm, 0).unwrap();
    assert_eq!(bm, vec![u64::MAX, u64::MAX, u64::MAX, 0]);
    // Clear without manual protect: EINVAL.
    vm.set_manual_dirty_log_protect(0).unwrap();
    assert_eq!(
        vm.clear_dirty_log(0, 0, 64, &ones[..1], 0),
        Err(DirtyLogError::NotManualProtect)
    );
    env.finish();
}

/// Protected mode, non-protected VM: the hypervisor owns stage-2 and
/// write-protects on the host's request; the bitmaps are just as exact.
#[test]
fn bitmaps_equal_the_guests_writes_in_protected_mode() {
    let env = Env::new(Flavor::ProtectedShared, 1);
    let npages = 128u64;
    let hva = env.add_slot(0, RAM, npages * PAGE_SIZE, VmaKind::Anonymous4K, 0);
    let page = |p: u64| Ipa(RAM.0 + p * PAGE_SIZE);
    let mut r = env.runner(
        0,
        Box::new(Script::new((0..npages).map(|p| Op::write(page(p), 8)))),
    );
    r.run_to_end();
    env.set_slot(0, RAM, npages * PAGE_SIZE, hva, MEM_LOG_DIRTY_PAGES);
    let mut bm = vec![0u64; 2];
    for round in 0..3u64 {
        // Writes to pages p with p % 3 == round, reads of the others.
        let ops: Vec<Op> = (0..npages)
            .map(|p| {
                if p % 3 == round {
                    Op::write(page(p), 8)
                } else {
                    Op::read(page(p), 8)
                }
            })
            .collect();
        r.be.cpu_mut().set_program(Box::new(Script::new(ops)));
        r.run_to_end();
        env.vm
            .get_dirty_log(0, &mut bm, pkvm_machine::platform::NOTIFIER_CPU)
            .unwrap();
        let want: Vec<u64> = (0..2)
            .map(|w| {
                (0..64)
                    .filter(|b| (w * 64 + b) % 3 == round)
                    .fold(0, |m, b| m | 1 << b)
            })
            .collect();
        assert_eq!(bm, want, "round {round}");
    }
    drop(r);
    env.finish();
}

/// A slot moved and switched to logging in one request logs at its new
/// place; moved and switched off, it stops.
#[test]
fn moving_a_slot_can_start_and_stop_logging() {
    let env = Env::new(Flavor::Standard, 1);
    let npages = 64u64;
    let hva = env.add_slot(0, RAM, npages * PAGE_SIZE, VmaKind::Anonymous4K, 0);
    let moved = Ipa(RAM.0 + (1 << 30));
    env.set_slot(0, moved, npages * PAGE_SIZE, hva, MEM_LOG_DIRTY_PAGES);
    let mut r = env.runner(
        0,
        Box::new(Script::new([Op::write(Ipa(moved.0 + 5 * PAGE_SIZE), 8)])),
    );
    r.run_to_end();
    let mut bm = [0u64];
    env.vm.get_dirty_log(0, &mut bm, 0).unwrap();
    assert_eq!(bm, [1 << 5]);
    env.set_slot(0, RAM, npages * PAGE_SIZE, hva, 0);
    assert_eq!(
        env.vm.get_dirty_log(0, &mut bm, 0),
        Err(DirtyLogError::NotLogging(0))
    );
    drop(r);
    env.finish();
}
