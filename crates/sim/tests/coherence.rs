//! The TLB coherence checker: it catches table changes whose TLB
//! maintenance is missing, and stays silent on correct sequences.

mod common;

use std::sync::Arc;

use common::*;
use pkvm_arch::esr::FaultStatus;
use pkvm_arch::pte::{s2, S2Prot, S2Pte};
use pkvm_arch::Level;
use pkvm_pgtable::TlbOps;
use pkvm_sim::{Coherence, FnProgram, Machine, Op, SimExit, Staleness};

fn setup(c: Coherence) -> (Arc<Machine>, Vm, pkvm_sim::SimCpu) {
    let m = machine(c);
    let vm = vm(&m, 1, 4);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    // Fill the TLB with page 0.
    assert!(run(&mut cpu, [Op::write(ipa(0), 8), Op::read(ipa(0), 8)]).is_empty());
    assert_eq!(cpu.stats().tlb_hits, 1);
    (m, vm, cpu)
}

fn kinds(m: &Machine) -> Vec<Staleness> {
    m.check().iter().map(|v| v.kind).collect()
}

#[test]
fn remap_without_tlbi_is_a_violation() {
    let (m, vm, mut cpu) = setup(Coherence::EveryUse);
    {
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(0), leaf(vm.data[1], 3, S2Prot::RW));
    }
    run(&mut cpu, [Op::read(ipa(0), 8)]);
    let v = m.check();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, Staleness::DifferentPa);
    assert_eq!((v[0].cpu, v[0].vmid, v[0].ipa), (0, 1, ipa(0)));
    assert_eq!(v[0].cached.pte, leaf(vm.data[0], 3, S2Prot::RW));
    assert_eq!(v[0].current.unwrap().pte, leaf(vm.data[1], 3, S2Prot::RW));
}

#[test]
fn unmap_without_tlbi_is_a_violation() {
    let (m, vm, mut cpu) = setup(Coherence::Entry);
    {
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(0), S2Pte::INVALID);
    }
    // Caught at the next guest entry, before any access.
    run(&mut cpu, []);
    let v = m.check();
    assert_eq!(kinds(&m), vec![Staleness::NoLongerMapped]);
    assert_eq!(v[0].current, Err(FaultStatus::Translation(Level(3))));
}

#[test]
fn wrprotect_without_the_flush_is_a_violation_and_with_it_is_not() {
    let (m, vm, mut cpu) = setup(Coherence::EveryUse);
    let ro = S2Pte(leaf(vm.data[0], 3, S2Prot::RW).0 & !s2::S2AP_W);
    {
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(0), ro);
        // The memslot flush is forgotten.
    }
    run(&mut cpu, [Op::read(ipa(0), 8)]);
    assert_eq!(kinds(&m), vec![Staleness::WriteRevoked]);

    // Same on page 1, this time with the flush.
    let (m, vm, mut cpu) = setup(Coherence::EveryUse);
    {
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(0), ro);
        m.env(1).tlbi_all();
    }
    let exits = run(&mut cpu, [Op::read(ipa(0), 8), Op::write(ipa(0), 8)]);
    assert_eq!(
        exits[0].fault().unwrap().status(),
        FaultStatus::Permission(Level(3))
    );
    assert!(m.check().is_empty());
}

#[test]
fn break_before_make_is_clean_even_when_the_window_is_used() {
    let (m, vm, mut cpu) = setup(Coherence::EveryUse);
    let env = m.env(1);
    m.begin_update(1);
    // Break.
    set(&m, vm.l3, l3_idx(0), S2Pte::INVALID);
    // Another CPU uses its stale entry inside the window: legal.
    assert!(run(&mut cpu, [Op::read(ipa(0), 8)]).is_empty());
    assert_eq!(m.violation_count(), 0);
    assert!(
        m.pending_suspects() > 0,
        "the use in the window is kept as a suspect"
    );
    // TLBI, make, end of the update.
    env.tlbi_leaf(ipa(0).0, Level(3));
    set(&m, vm.l3, l3_idx(0), leaf(vm.data[2], 3, S2Prot::RW));
    m.end_update(1);
    assert_eq!(m.pending_suspects(), 0);
    // The guest now sees the new page (it wrote nothing there: unverified).
    m.mem().write_u64(vm.data[2], 0x77).unwrap();
    cpu.forget_writes(ipa(0), 4096);
    run(&mut cpu, [Op::read(ipa(0), 8)]);
    assert_eq!(cpu.regs()[1], 0x77);
    assert!(m.check().is_empty());
}

#[test]
fn lazily_relaxed_permission_is_allowed() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 1);
    set(&m, vm.l3, l3_idx(0), leaf(vm.data[0], 3, S2Prot::R));
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    run(&mut cpu, [Op::read(ipa(0), 8)]);
    {
        // Relax in place, no TLBI.
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(0), leaf(vm.data[0], 3, S2Prot::RW));
    }
    // The cached read-only entry gives a spurious permission fault ...
    let exits = run(&mut cpu, [Op::write(ipa(0), 8), Op::read(ipa(0), 8)]);
    assert_eq!(
        exits[0].fault().unwrap().status(),
        FaultStatus::Permission(Level(3))
    );
    // ... which the handler resolves with a local TLBI, then the retry works.
    m.env(1).on_cpu(0).tlbi_leaf_local(ipa(0).0, Level(3));
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert_eq!(cpu.stats().verified_reads, 1);
    assert!(m.check().is_empty());
}

#[test]
fn a_stale_entry_used_mid_run_is_caught_on_the_tlb_hit() {
    let (m, vm, mut cpu) = setup(Coherence::EveryUse);
    let m2 = m.clone();
    let (l3, other) = (vm.l3, vm.data[3]);
    let mut step = 0;
    // The program itself changes the tables between two accesses (as another
    // CPU would), without a TLBI; no guest entry happens in between.
    cpu.set_program(Box::new(FnProgram(move |_: &[u64; 31]| {
        step += 1;
        match step {
            1 => Some(Op::read(ipa(0), 8)),
            2 => {
                m2.begin_update(1);
                set(&m2, l3, l3_idx(0), leaf(other, 3, S2Prot::RW));
                m2.end_update(1);
                Some(Op::read(ipa(0), 8))
            }
            _ => None,
        }
    })));
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert_eq!(m.violation_count(), 1);
    assert_eq!(m.violations()[0].kind, Staleness::DifferentPa);
}

#[test]
fn a_wrongly_hinted_tlbi_leaves_a_stale_block() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 0);
    let block = m.host_frames().alloc_zeroed(m.mem(), 9).unwrap();
    // 2M block at IPA 0x20_0000 (L2 index 1).
    set(&m, vm.l2, 1, leaf(block, 2, S2Prot::RW));
    let mut cpu = m.cpu(1).unwrap();
    cpu.load(vm.ctx);
    run(&mut cpu, [Op::write(pkvm_arch::Ipa(0x20_1000), 8)]);
    {
        let _u = m.update(1);
        set(&m, vm.l2, 1, S2Pte::INVALID);
        // Level hint 3 for a level-2 leaf: not required to invalidate it.
        m.env(1).tlbi_leaf(0x20_0000, Level(3));
    }
    run(&mut cpu, []);
    assert_eq!(kinds(&m), vec![Staleness::NoLongerMapped]);
    assert_eq!(m.violations()[0].cached.level, Level(2));
}

#[test]
fn entries_of_other_vmids_are_not_confused() {
    let m = machine(Coherence::EveryUse);
    let a = vm(&m, 1, 1);
    let b = vm(&m, 2, 1);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(a.ctx);
    run(&mut cpu, [Op::write(ipa(0), 8)]);
    cpu.load(b.ctx);
    run(&mut cpu, [Op::write(ipa(0), 8), Op::read(ipa(0), 8)]);
    // Each VM's write went to its own frame.
    assert_ne!(
        m.mem().read_u64(a.data[0]).unwrap(),
        m.mem().read_u64(b.data[0]).unwrap()
    );
    // Changing VM 1's tables with a TLBI for VM 2 only is still a violation
    // for VM 1.
    {
        let _u = m.update(1);
        set(&m, a.l3, l3_idx(0), S2Pte::INVALID);
        m.env(2).tlbi_all();
    }
    cpu.load(a.ctx);
    run(&mut cpu, []);
    let v = m.check();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].vmid, 1);
}
