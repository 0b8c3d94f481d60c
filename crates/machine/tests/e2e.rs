//! End-to-end guest abort handling on the simulated machine, in every
//! flavour (standard mode; protected mode with a non-protected VM whose
//! pages are shared; protected mode with a protected VM whose pages are
//! donated): MMIO exits, read-only memslots, out-of-range IPAs, memslot
//! delete/move, and a clean teardown (no coherence violation, every frame
//! and table page back, the hypervisor holding nothing).

mod common;

use common::{recording, store_value, Env, Flavor, MMIO, RAM};
use pkvm_arch::Ipa;
use pkvm_host::memslot::{MemslotError, UserMemoryRegion, MEM_LOG_DIRTY_PAGES, MEM_READONLY};
use pkvm_host::{VcpuExit, VmError};
use pkvm_sim::cpu::{Op, Script};
use pkvm_sim::mm::VmaKind;
use pkvm_sim::{AccessKind, Phase, Workload};

const MB: u64 = 1 << 20;

fn mmio(addr: Ipa, len: u8, write: bool, data: u64) -> VcpuExit {
    VcpuExit::Mmio {
        addr,
        len,
        write,
        data,
    }
}

fn unverified_read(ipa: Ipa, size: u8) -> Op {
    Op::Access {
        ipa,
        kind: AccessKind::Read,
        size,
        verify: false,
        plain: true,
    }
}

#[test]
fn mmio_exits_carry_address_size_direction_and_data() {
    for flavor in Flavor::ALL {
        let env = Env::new(flavor, 1);
        env.add_slot(0, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        let (prog, seen) = recording(vec![
            Op::write(MMIO, 8),        // store 1
            Op::write(MMIO + 0x12, 2), // store 2
            Op::read(MMIO + 0x20, 4),  // gets 0x1234_5678
            Op::read(MMIO + 0x28, 8),  // gets u64::MAX - 1
            Op::write(RAM + 0x100, 4), // store 3, real memory
            Op::read(MMIO + 0x31, 1),  // gets 0xab
            Op::read(RAM + 0x100, 4),  // verified against store 3
        ]);
        let mut r = env.runner(0, prog);
        assert_eq!(
            r.run(),
            mmio(MMIO, 8, true, store_value(0, 1)),
            "{flavor:?}"
        );
        assert_eq!(
            r.run(),
            mmio(MMIO + 0x12, 2, true, store_value(0, 2) & 0xffff),
            "{flavor:?}"
        );
        assert_eq!(r.run(), mmio(MMIO + 0x20, 4, false, 0), "{flavor:?}");
        r.vcpu.complete_mmio(0x1234_5678);
        assert_eq!(r.run(), mmio(MMIO + 0x28, 8, false, 0), "{flavor:?}");
        r.vcpu.complete_mmio(u64::MAX - 1);
        assert_eq!(r.run(), mmio(MMIO + 0x31, 1, false, 0), "{flavor:?}");
        r.vcpu.complete_mmio(0xab);
        assert_eq!(
            r.run(),
            VcpuExit::Halted,
            "{flavor:?}: {:?}",
            r.be.guest_error
        );
        let seen = seen.lock().unwrap().clone();
        // seen[i] is x1 before op i: after the read at op 2 comes op 3.
        assert_eq!(seen[3], 0x1234_5678, "{flavor:?}");
        assert_eq!(seen[4], u64::MAX - 1, "{flavor:?}");
        assert_eq!(seen[6], 0xab, "{flavor:?}");
        let st = env.vm.stats().snapshot();
        assert_eq!(st.mmio_exits, 5, "{flavor:?}");
        assert_eq!(r.be.cpu_ref().stats().emulated, 5, "{flavor:?}");
        assert_eq!(
            st.translation_faults, 1,
            "{flavor:?}: the RAM page faulted once"
        );
        drop(r);
        env.finish();
    }
}

#[test]
fn mmio_read_value_is_truncated_to_the_access_size() {
    // KVM hands the guest only `len` bytes of the VMM's data (zero
    // extended for a load without sign extension).
    for flavor in Flavor::ALL {
        let env = Env::new(flavor, 1);
        let (prog, seen) = recording(vec![
            Op::read(MMIO, 1),
            Op::read(MMIO + 4, 4),
            Op::read(MMIO + 8, 2),
        ]);
        let mut r = env.runner(0, prog);
        assert_eq!(r.run(), mmio(MMIO, 1, false, 0));
        r.vcpu.complete_mmio(0x1122_3344_5566_7788);
        assert_eq!(r.run(), mmio(MMIO + 4, 4, false, 0));
        r.vcpu.complete_mmio(0x1122_3344_5566_7788);
        assert_eq!(r.run(), mmio(MMIO + 8, 2, false, 0));
        r.vcpu.complete_mmio(0x1122_3344_5566_7788);
        assert_eq!(r.run(), VcpuExit::Halted);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(&seen[1..4], &[0x88, 0x5566_7788, 0x7788], "{flavor:?}");
        drop(r);
        env.finish();
    }
}

#[test]
fn workload_mmio_phase_exits_for_every_device_access() {
    for flavor in Flavor::ALL {
        let env = Env::new(flavor, 1);
        env.add_slot(0, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        let dev = pkvm_sim::workload::Mmio {
            base: MMIO,
            size: 0x1000,
            every: 10,
        };
        let phase = Phase::new(RAM, 2 * MB, pkvm_sim::Pattern::Random)
            .accesses(2000)
            .writes(500)
            .size(0)
            .mmio(dev);
        let mut r = env.runner(0, Box::new(Workload::new(7, [phase])));
        let (mut reads, mut writes) = (0u64, 0u64);
        loop {
            match r.run() {
                VcpuExit::Halted => break,
                VcpuExit::Mmio {
                    addr, len, write, ..
                } => {
                    assert!(addr.0 >= MMIO.0 && addr.0 < MMIO.0 + 0x1000, "{addr:?}");
                    assert_eq!(len, 4);
                    if write {
                        writes += 1;
                    } else {
                        reads += 1;
                        r.vcpu.complete_mmio(0);
                    }
                }
                e => panic!("{flavor:?}: {e:?} ({:?})", r.be.guest_error),
            }
        }
        assert_eq!(reads + writes, 200, "{flavor:?}");
        assert!(reads > 0 && writes > 0);
        assert_eq!(env.vm.stats().snapshot().mmio_exits, 200);
        drop(r);
        env.finish();
    }
}

#[test]
fn read_only_slot_maps_reads_and_exits_writes_as_mmio() {
    for flavor in [Flavor::Standard, Flavor::ProtectedShared] {
        let env = Env::new(flavor, 1);
        env.add_slot(0, RAM, 2 * MB, VmaKind::Anonymous4K, MEM_READONLY);
        let a = RAM + 0x3000;
        let (prog, seen) = recording(vec![
            unverified_read(a, 8),
            Op::write(a, 8), // store 1: must exit, memory unchanged
            unverified_read(a, 8),
            Op::write(a + 8, 4), // store 2: exits again (still read-only)
        ]);
        let mut r = env.runner(0, prog);
        assert_eq!(r.run(), mmio(a, 8, true, store_value(0, 1)), "{flavor:?}");
        assert_eq!(
            r.run(),
            mmio(a + 8, 4, true, store_value(0, 2) & 0xffff_ffff),
            "{flavor:?}"
        );
        assert_eq!(r.run(), VcpuExit::Halted, "{flavor:?}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[1], 0, "{flavor:?}: fresh anonymous memory reads zero");
        assert_eq!(
            seen[3], 0,
            "{flavor:?}: the write to the read-only slot did not land"
        );
        let st = env.vm.stats().snapshot();
        assert_eq!(st.mmio_exits, 2, "{flavor:?}");
        assert_eq!(
            st.translation_faults, 1,
            "{flavor:?}: the read mapped the page once"
        );
        if flavor == Flavor::Standard {
            let (_, prot, _) = env.vm.s2_translate(a).expect("mapped");
            assert!(
                !prot.contains(pkvm_arch::pte::S2Prot::W),
                "read-only slot mapped writable: {prot:?}"
            );
        }
        drop(r);
        env.finish();
    }
}

#[test]
fn protected_vm_refuses_read_only_and_dirty_logged_slots() {
    // Donated memory is mapped by the hypervisor and out of the host's
    // reach: a read-only slot could not stay read-only (a read would donate
    // the page and later writes would land), nor could logging
    // write-protect it. KVM refuses these flags for protected VMs too.
    let env = Env::new(Flavor::ProtectedDonated, 1);
    let hva = env.mm.mmap(2 * MB, VmaKind::Anonymous4K).unwrap();
    for flags in [MEM_READONLY, MEM_LOG_DIRTY_PAGES] {
        let r = UserMemoryRegion {
            slot: 0,
            flags,
            guest_phys_addr: RAM.0,
            memory_size: 2 * MB,
            userspace_addr: hva.0,
        };
        assert_eq!(
            env.vm.set_user_memory_region(r, 0),
            Err(VmError::Memslot(MemslotError::ProtectedVmFlags(flags)))
        );
    }
    assert!(env.vm.memslots().iter().next().is_none(), "nothing changed");
    env.finish();
}

#[test]
fn out_of_range_ipas_inject_aborts_and_the_guest_continues() {
    for flavor in Flavor::ALL {
        let env = Env::with_ipa_bits(flavor, 1, 36);
        env.add_slot(0, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        let top = Ipa(1 << 36);
        let mut r = env.runner(
            0,
            Box::new(Script::new([
                Op::read(top, 8),
                Op::write(Ipa((1 << 36) + 0x1234_5000), 4),
                Op::exec(Ipa(0xffff_ffff_f000)),
                Op::exec(MMIO), // fetch from non-memory: abort too
                Op::write(RAM, 8),
                Op::read(RAM, 8),
            ])),
        );
        assert_eq!(
            r.run(),
            VcpuExit::Halted,
            "{flavor:?}: {:?}",
            r.be.guest_error
        );
        let st = env.vm.stats().snapshot();
        assert_eq!(st.injected_aborts, 4, "{flavor:?}");
        assert_eq!(r.be.cpu_ref().stats().injected_aborts, 4, "{flavor:?}");
        assert_eq!(st.mmio_exits, 0, "{flavor:?}");
        assert_eq!(r.be.cpu_ref().stats().verified_reads, 1, "{flavor:?}");
        drop(r);
        env.finish();
    }
}

#[test]
fn deleting_a_memslot_unmaps_it_and_accesses_fault_again() {
    for flavor in Flavor::ALL {
        let env = Env::new(flavor, 1);
        let hva = env.add_slot(3, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        let pages = 8u64;
        let ops: Vec<Op> = (0..pages).map(|i| Op::write(RAM + i * 4096, 8)).collect();
        let mut r = env.runner(0, Box::new(Script::new(ops)));
        assert_eq!(r.run(), VcpuExit::Halted);
        assert!(env.mapped(RAM), "{flavor:?}");
        if flavor == Flavor::ProtectedDonated {
            // The host cannot take donated pages back from a live
            // protected VM: deleting (or moving) its memory is refused,
            // nothing changes, and the pages stay until teardown reclaims them.
            let r = env.vm.set_user_memory_region(
                UserMemoryRegion {
                    slot: 3,
                    flags: 0,
                    guest_phys_addr: RAM.0,
                    memory_size: 0,
                    userspace_addr: hva.0,
                },
                0,
            );
            assert_eq!(
                r,
                Err(VmError::Memslot(MemslotError::ProtectedVmStarted(3)))
            );
            let r = env.vm.set_user_memory_region(
                UserMemoryRegion {
                    slot: 3,
                    flags: 0,
                    guest_phys_addr: 0x8000_0000,
                    memory_size: 2 * MB,
                    userspace_addr: hva.0,
                },
                0,
            );
            assert_eq!(
                r,
                Err(VmError::Memslot(MemslotError::ProtectedVmStarted(3)))
            );
            assert!(env.vm.memslots().get(3).is_some(), "slot still there");
            assert_eq!(env.vm.hyp_mapped_pages(), pages, "{flavor:?}");
        } else {
            env.set_slot(3, RAM, 0, hva, 0); // delete
            assert!(!env.mapped(RAM), "{flavor:?}: deleted slot still mapped");
            // No slot any more: the same addresses are now MMIO.
            r.be.cpu_mut().set_program(Box::new(Script::new([
                unverified_read(RAM, 8),
                Op::write(RAM + 4096, 8),
            ])));
            assert!(
                matches!(r.run(), VcpuExit::Mmio { addr, write: false, .. } if addr == RAM),
                "{flavor:?}"
            );
            r.vcpu.complete_mmio(7);
            assert!(
                matches!(r.run(), VcpuExit::Mmio { addr, write: true, .. } if addr == RAM + 4096)
            );
            assert_eq!(r.run(), VcpuExit::Halted);
        }
        drop(r);
        env.finish();
    }
}

#[test]
fn moving_a_memslot_unmaps_the_old_range_and_maps_the_same_memory_at_the_new() {
    for flavor in [Flavor::Standard, Flavor::ProtectedShared] {
        let env = Env::new(flavor, 1);
        let hva = env.add_slot(1, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        let new = Ipa(0x8000_0000);
        let (prog, seen) = recording(vec![Op::write(RAM + 0x5008, 8)]);
        let mut r = env.runner(0, prog);
        assert_eq!(r.run(), VcpuExit::Halted);
        let faults = env.vm.stats().snapshot().translation_faults;
        env.set_slot(1, new, 2 * MB, hva, 0); // move
        assert!(!env.mapped(RAM), "{flavor:?}: old range still mapped");
        drop(seen);
        let (prog, seen) = recording(vec![
            unverified_read(new + 0x5008, 8),
            unverified_read(RAM + 0x5008, 8),
        ]);
        r.be.cpu_mut().set_program(prog);
        // The old IPA has no slot any more: MMIO.
        assert!(
            matches!(r.run(), VcpuExit::Mmio { addr, .. } if addr == RAM + 0x5008),
            "{flavor:?}"
        );
        r.vcpu.complete_mmio(0);
        assert_eq!(r.run(), VcpuExit::Halted);
        assert_eq!(
            seen.lock().unwrap()[1],
            store_value(0, 1),
            "{flavor:?}: moved slot shows the same memory"
        );
        assert_eq!(
            env.vm.stats().snapshot().translation_faults,
            faults + 1,
            "{flavor:?}: new IPA faulted in"
        );
        drop(r);
        env.finish();
    }
}

#[test]
fn munmap_of_slot_memory_unmaps_stage2_and_frees_the_frames_now() {
    // Standard and shared: the notifier unmaps stage-2 and releases the
    // page references, so munmap frees the frames now; a new mapping at the
    // same address faults in fresh zeroed memory.
    for flavor in [Flavor::Standard, Flavor::ProtectedShared] {
        let env = Env::new(flavor, 1);
        let hva = env.add_slot(0, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        let mut r = env.runner(
            0,
            Box::new(Script::new((0..4).map(|i| Op::write(RAM + i * 4096, 8)))),
        );
        assert_eq!(r.run(), VcpuExit::Halted);
        let before = env.mm.stats();
        env.mm.munmap(hva, 2 * MB).unwrap();
        assert!(!env.mapped(RAM), "{flavor:?}");
        let after = env.mm.stats();
        assert_eq!(
            after.frames_freed - before.frames_freed,
            4,
            "{flavor:?}: frames freed at munmap"
        );
        drop(r);
        env.finish();
    }
}

#[test]
fn teardown_before_first_run_releases_the_reservation() {
    for flavor in Flavor::ALL {
        let env = Env::new(flavor, 2);
        env.add_slot(0, RAM, 2 * MB, VmaKind::Anonymous4K, 0);
        env.finish();
    }
}
