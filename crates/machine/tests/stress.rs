//! Stress: 4 vCPUs (one thread each) fault and verify their own memory
//! while a host thread runs reclaim / migration / THP split / aging storms
//! on the same VMA, and munmaps, re-mmaps and re-slots a scratch VMA the
//! guests also touch. The guest verifies every read of an address it wrote
//! (a lost write is a `GuestCheckFailed` exit and fails the test); after
//! the run there must be no coherence violation and teardown must give
//! back every frame and table page.
//!
//! Standard mode is the strong test: guest pages are not pinned while
//! mapped, so reclaim swaps them out under the guest, migration moves them
//! and THP splits break the 2M mappings. In protected mode the host keeps a
//! page reference for as long as the hypervisor maps the page, so reclaim,
//! migration and splits skip every page the guest has mapped: only the
//! scratch munmap/slot churn (unshare for a shared VM; nothing for a
//! protected VM, whose donated pages stay the guest's) races the faults
//! there.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Env, Flavor, RAM};
use pkvm_arch::{Hva, Ipa};
use pkvm_host::pipeline::MemFaultError;
use pkvm_host::{RunError, VcpuExit};
use pkvm_machine::SimPlatform;
use pkvm_sim::cpu::{GuestProgram, Op};
use pkvm_sim::mm::VmaKind;
use pkvm_sim::rng::SplitMix64;
use pkvm_sim::{AccessKind, Pattern, Phase, Workload};

const MB: u64 = 1 << 20;
const VCPUS: usize = 4;
/// Each vCPU's own verified region.
const PER_VCPU: u64 = 8 * MB;
/// The scratch slot (unverified; munmapped and re-slotted under the guests).
const SCRATCH: Ipa = Ipa(0x8000_0000);
const SCRATCH_SIZE: u64 = MB;
const STORM: Duration = Duration::from_millis(2500);

/// The vCPU's workload, an unverified scratch access every 64 operations,
/// until `stop`.
struct StressProgram {
    w: Workload,
    rng: SplitMix64,
    n: u64,
    stop: Arc<AtomicBool>,
}

impl GuestProgram for StressProgram {
    fn next_op(&mut self, regs: &[u64; 31]) -> Option<Op> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        self.n += 1;
        if self.n & 63 == 0 {
            let ipa = SCRATCH + self.rng.below(SCRATCH_SIZE / 8) * 8;
            let kind = if self.rng.chance(500) {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            return Some(Op::Access {
                ipa,
                kind,
                size: 8,
                verify: false,
                plain: true,
            });
        }
        self.w.next_op(regs)
    }
}

#[derive(Debug, Default)]
struct StormCounts {
    reclaimed_pages: u64,
    migrated: u64,
    split: u64,
    aged: u64,
    scratch_cycles: u64,
}

fn stress(flavor: Flavor) {
    let env = Env::new(flavor, VCPUS);
    let hva = env.add_slot(0, RAM, PER_VCPU * VCPUS as u64, VmaKind::AnonymousThp, 0);
    let mut scratch = env.add_slot(1, SCRATCH, SCRATCH_SIZE, VmaKind::Anonymous4K, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicU64::new(0));
    let mut counts = StormCounts::default();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..VCPUS {
            let (env, stop, verified) = (&env, stop.clone(), verified.clone());
            handles.push(s.spawn(move || {
                let base = RAM + i as u64 * PER_VCPU;
                // Fill first so reads have something to verify, then mix.
                let w = Workload::new(
                    0x5eed + i as u64,
                    [
                        Phase::touch_pages(base, PER_VCPU),
                        Phase::new(base, PER_VCPU, Pattern::Random)
                            .accesses(u64::MAX)
                            .writes(300)
                            .size(0),
                    ],
                );
                let prog = StressProgram {
                    w,
                    rng: SplitMix64::new(i as u64),
                    n: 0,
                    stop,
                };
                let mut r = env.runner(i, Box::new(prog));
                SimPlatform::set_current_cpu(i);
                loop {
                    match r.run() {
                        VcpuExit::Halted => break,
                        // The scratch slot is between delete and re-create.
                        VcpuExit::Mmio { addr, write, .. } => {
                            assert!(
                                addr.0 >= SCRATCH.0 && addr.0 < SCRATCH.0 + SCRATCH_SIZE,
                                "MMIO at {addr:?}"
                            );
                            if !write {
                                r.vcpu.complete_mmio(0);
                            }
                        }
                        // The scratch VMA is munmapped but its slot not yet
                        // replaced (a VMM would see EFAULT): retry.
                        VcpuExit::InternalError(RunError::Memory(
                            MemFaultError::BadHostAddress(_),
                        )) if r.be.cpu_ref().pending_access().is_some_and(|a| {
                            a.ipa.0 >= SCRATCH.0 && a.ipa.0 < SCRATCH.0 + SCRATCH_SIZE
                        }) =>
                        {
                            std::thread::yield_now()
                        }
                        e => panic!(
                            "{flavor:?} vCPU {i}: {e:?} (guest error: {:?})",
                            r.be.guest_error
                        ),
                    }
                }
                verified.fetch_add(r.be.cpu_ref().stats().verified_reads, Ordering::Relaxed);
            }));
        }
        // The storm. If it panics, the guard still stops the vCPUs, so the
        // test fails instead of hanging.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop_guard = StopOnDrop(stop.clone());
        let mut rng = SplitMix64::new(99);
        let t0 = Instant::now();
        while t0.elapsed() < STORM && !handles.iter().any(|h| h.is_finished()) {
            let off = rng.below(PER_VCPU * VCPUS as u64 / 4096) * 4096;
            let chunk = Hva(hva.0 + (off & !(2 * MB - 1)));
            match rng.below(8) {
                0 | 1 => counts.reclaimed_pages += env.mm.reclaim(chunk, 2 * MB),
                2 | 3 => counts.migrated += u64::from(env.mm.migrate(Hva(hva.0 + off)).is_ok()),
                4 => counts.split += u64::from(env.mm.split_thp(chunk).is_ok()),
                5 => {
                    counts.aged += u64::from(env.mm.age(chunk, chunk + 2 * MB));
                    let _ = env.mm.test_age(chunk, chunk + 2 * MB);
                }
                6 if flavor == Flavor::ProtectedDonated => {
                    // A protected VM that has run keeps its memslots (the
                    // host cannot take donated pages back): churn an
                    // unrelated VMA instead, so notifiers still run.
                    let v = env.mm.mmap(2 * MB, VmaKind::Anonymous4K).unwrap();
                    drop(env.mm.fault_in(v, true).unwrap());
                    env.mm.munmap(v, 2 * MB).unwrap();
                    counts.scratch_cycles += 1;
                }
                6 => {
                    // munmap the scratch VMA under the guests (the notifier
                    // unmaps stage-2), then replace it and its slot.
                    env.mm.munmap(scratch, SCRATCH_SIZE).unwrap();
                    std::thread::yield_now();
                    env.set_slot(1, SCRATCH, 0, scratch, 0);
                    scratch = env.add_slot(1, SCRATCH, SCRATCH_SIZE, VmaKind::Anonymous4K, 0);
                    counts.scratch_cycles += 1;
                }
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    });
    let st = env.vm.stats().snapshot();
    eprintln!(
        "{flavor:?}: storm {counts:?}; vm {st:?}; verified reads {}",
        verified.load(Ordering::Relaxed)
    );
    assert!(
        verified.load(Ordering::Relaxed) > 0,
        "{flavor:?}: the guests verified nothing"
    );
    assert!(
        counts.scratch_cycles > 0 && st.invalidations > 0,
        "{flavor:?}: no invalidation ran"
    );
    if flavor == Flavor::Standard {
        // Nothing pins mapped pages in standard mode: every storm bites.
        assert!(counts.reclaimed_pages > 0, "{counts:?}");
        assert!(counts.migrated > 0, "{counts:?}");
    }
    env.finish();
}

#[test]
fn standard_guests_never_lose_a_write_under_reclaim_migration_split_and_munmap_storms() {
    stress(Flavor::Standard);
}

#[test]
fn protected_shared_guests_never_lose_a_write_under_storms() {
    stress(Flavor::ProtectedShared);
}

#[test]
fn protected_vm_guests_never_lose_a_write_under_storms() {
    stress(Flavor::ProtectedDonated);
}
