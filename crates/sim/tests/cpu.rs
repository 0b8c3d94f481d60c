//! Simulated CPUs: verified guest memory, exits and their resolution.

mod common;

use common::*;
use pkvm_arch::esr::{AccessSyndrome, FaultStatus};
use pkvm_arch::pte::{S2Prot, S2Pte};
use pkvm_arch::{Ipa, Level, Pa};
use pkvm_sim::cpu::GuestError;
use pkvm_sim::workload::{Call, Mmio};
use pkvm_sim::{Coherence, FnProgram, Op, Pattern, Phase, SimExit, Workload};

#[test]
fn every_guest_read_returns_the_last_value_the_guest_wrote() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 8);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    cpu.set_program(Box::new(Workload::new(
        42,
        [
            Phase::fill(ipa(0), 8 * 4096),
            Phase::new(ipa(0), 8 * 4096, Pattern::Random)
                .accesses(20_000)
                .writes(300)
                .size(0),
            Phase::new(ipa(0), 8 * 4096, Pattern::Sequential).accesses(4096),
        ],
    )));
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    let s = cpu.stats();
    assert_eq!(s.accesses, 4096 + 20_000 + 4096);
    assert!(s.verified_reads > 10_000, "{s:?}");
    assert_eq!(s.tlb_misses, 8, "one walk per page, then hits");
    assert!(m.check().is_empty());
}

#[test]
fn a_read_that_does_not_see_the_last_write_is_reported_with_details() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 1);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    run(&mut cpu, [Op::write(ipa(0) + 8, 8)]);
    // Someone corrupts the page behind the guest's back.
    m.mem().write_u32(vm.data[0] + 12, 0xdead).unwrap();
    cpu.set_program(Box::new(pkvm_sim::Script::new([Op::read(ipa(0) + 12, 4)])));
    match cpu.run() {
        SimExit::GuestError(GuestError::ReadMismatch {
            ipa: i,
            pa,
            size,
            found,
            ..
        }) => {
            assert_eq!(
                (i, pa, size, found),
                (ipa(0) + 12, vm.data[0] + 12, 4, 0xdead)
            );
        }
        e => panic!("expected a mismatch, got {e:?}"),
    }
}

#[test]
fn faults_are_retried_after_the_handler_maps_the_page() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 1);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    let exits = run(&mut cpu, [Op::write(ipa(1), 8), Op::read(ipa(1), 8)]);
    let f = exits[0].fault().unwrap();
    assert_eq!(f.status(), FaultStatus::Translation(Level(3)));
    assert_eq!(f.ipa(), ipa(1));
    assert_eq!(cpu.stats().exits_abort, 1);
    // Handler: map the page (inside an update bracket) and resume.
    let frame = m.host_frames().alloc_zeroed(m.mem(), 0).unwrap();
    {
        let _u = m.update(1);
        set(&m, vm.l3, l3_idx(1), leaf(frame, 3, S2Prot::RW));
    }
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert_eq!(cpu.stats().verified_reads, 1);
    assert!(m.check().is_empty());
}

#[test]
fn mmio_exits_carry_the_syndrome_and_are_completed_by_emulation() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 1);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    let dev = Ipa(0x900_0000);
    let exits = run(
        &mut cpu,
        [Op::Access {
            ipa: dev + 4,
            kind: pkvm_sim::AccessKind::Read,
            size: 4,
            verify: false,
            plain: true,
        }],
    );
    let a = exits[0].fault().unwrap().esr.abort().unwrap();
    assert_eq!(
        a.syndrome,
        Some(AccessSyndrome {
            sas: 2,
            sse: false,
            srt: 1,
            sf: false,
            ar: false
        })
    );
    assert_eq!(cpu.pending_access().unwrap().ipa, dev + 4);
    cpu.emulate_pending(0x1234);
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert_eq!(cpu.regs()[1], 0x1234);
    assert_eq!(cpu.stats().emulated, 1);
    // A store: the value is in x2 when the exit is taken.
    let exits = run(
        &mut cpu,
        [Op::Access {
            ipa: dev,
            kind: pkvm_sim::AccessKind::Write,
            size: 8,
            verify: false,
            plain: true,
        }],
    );
    assert!(exits[0].fault().unwrap().esr.abort().unwrap().write);
    assert_eq!(cpu.regs()[2] >> 56, 0xa5);
    cpu.inject_abort();
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert_eq!(cpu.stats().injected_aborts, 1);
}

#[test]
fn hvc_exits_pass_arguments_and_results_in_registers() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 1);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    let mut step = 0;
    cpu.set_program(Box::new(FnProgram(move |regs: &[u64; 31]| {
        step += 1;
        match step {
            1 => Some(Op::Hvc {
                imm: 0,
                args: [0x8400_0000, 1, 2, 3],
            }),
            2 => Some(Op::Smc {
                imm: 7,
                args: [regs[0], 0, 0, 0],
            }),
            3 => Some(Op::Wfi),
            _ => None,
        }
    })));
    assert_eq!(cpu.run(), SimExit::Hvc { imm: 0 });
    assert_eq!(&cpu.regs()[..4], &[0x8400_0000, 1, 2, 3]);
    cpu.regs_mut()[0] = 0x1_0002; // PSCI 1.2
    assert_eq!(cpu.run(), SimExit::Smc { imm: 7 });
    assert_eq!(cpu.regs()[0], 0x1_0002, "the program saw the HVC result");
    assert_eq!(cpu.run(), SimExit::Wfi);
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    let s = cpu.stats();
    assert_eq!((s.exits_hvc, s.exits_smc, s.exits_wfi), (1, 1, 1));
}

#[test]
fn workloads_mix_calls_and_mmio_and_the_budget_preempts() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 4);
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    let phase = Phase::new(ipa(0), 4 * 4096, Pattern::Random)
        .accesses(1000)
        .writes(500)
        .call_every(
            100,
            Call {
                smc: false,
                imm: 0,
                args: [0x8400_0000, 0, 0, 0],
            },
        )
        .mmio(Mmio {
            base: Ipa(0x900_0000),
            size: 4096,
            every: 50,
        });
    cpu.set_program(Box::new(Workload::new(3, [phase])));
    cpu.set_budget(16);
    let (mut hvc, mut mmio, mut preempt) = (0, 0, 0);
    loop {
        match cpu.run() {
            SimExit::ProgramDone => break,
            SimExit::Hvc { .. } => hvc += 1,
            SimExit::Preempted => preempt += 1,
            SimExit::Abort { .. } => {
                mmio += 1;
                cpu.emulate_pending(0);
            }
            e => panic!("unexpected exit {e:?}"),
        }
    }
    assert_eq!(hvc, 10);
    assert_eq!(mmio, 10);
    assert!(preempt > 0);
}

#[test]
fn unbacked_output_address_is_an_external_abort() {
    let m = machine(Coherence::EveryUse);
    let vm = vm(&m, 1, 1);
    set(&m, vm.l3, l3_idx(1), leaf(Pa(0x8000_0000), 3, S2Prot::RW));
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(vm.ctx);
    let exits = run(&mut cpu, [Op::read(ipa(1), 8)]);
    assert_eq!(
        exits[0].fault().unwrap().status(),
        FaultStatus::ExternalAbort
    );
    let _ = S2Pte::INVALID;
}

#[test]
fn running_without_a_context_is_an_error_exit() {
    let m = machine(Coherence::EveryUse);
    let mut cpu = m.cpu(0).unwrap();
    assert_eq!(cpu.run(), SimExit::GuestError(GuestError::NoContext(0)));
    assert!(m.cpu(0).is_err(), "a CPU is taken once");
    drop(cpu);
    assert!(m.cpu(0).is_ok());
}
