//! vCPU reset and VM power-on: registers after reset, the boot vCPU at the
//! entry point, secondaries powered off, SYSTEM_RESET restarting vCPU 0,
//! SYSTEM_SUSPEND resume.
#![cfg(not(loom))]

mod psci_common;

use pkvm_arch::smccc::psci as f;
use pkvm_host::psci::{
    complete_system_suspend, handle_psci, Conduit, PowerState, PsciCaller, PsciConfig, PsciOutcome,
    PsciVersion, ResetState, SystemEventKind,
};
use pkvm_host::reset::{
    power_on_vm, prepare_to_run, reset_registers, reset_vcpu, BootParams, Readiness, ResetError,
};
use pkvm_host::vcpu_state::{mpidr_el1, El1SysRegs, GuestGprs};
use psci_common::TestVm;

const ENTRY: u64 = 0x4020_0000;
const DTB: u64 = 0x4000_0000;
const BOOT: BootParams = BootParams {
    entry: ENTRY,
    x0: DTB,
    big_endian: false,
};

/// Register files full of junk, as a vCPU's would be after running.
fn dirty() -> (GuestGprs, El1SysRegs) {
    let mut regs = GuestGprs {
        x: [0xdead_beef; 31],
        sp: 1,
        pc: 2,
        pstate: 0x3c4,
    };
    regs.x[30] = 0x1234;
    let mut sys = El1SysRegs::reset(0, true);
    sys.sctlr_el1 |= 1; // MMU on
    sys.ttbr0_el1 = 0x8000;
    sys.tcr_el1 = 0x19;
    sys.mair_el1 = 0xff;
    sys.vbar_el1 = 0x4000_0800;
    sys.cpacr_el1 = 3 << 20;
    sys.sp_el1 = 0x5000;
    sys.cntv_ctl_el0 = 1;
    sys.cntv_cval_el0 = 99;
    (regs, sys)
}

#[test]
fn reset_registers_gives_architectural_state_then_pc_and_x0() {
    let (mut regs, mut sys) = dirty();
    let start = ResetState {
        pc: 0x8_0000,
        context_id: 0xabc,
        big_endian: false,
        reset: true,
    };
    reset_registers(&mut regs, &mut sys, mpidr_el1(5), Some(&start));
    let mut want = GuestGprs {
        pc: 0x8_0000,
        pstate: 0x3c5,
        ..GuestGprs::default()
    };
    want.x[0] = 0xabc;
    assert_eq!(regs, want);
    assert_eq!(sys, El1SysRegs::reset(0x8000_0005, false));
    assert_eq!(sys.sctlr_el1, 0x30d0_0800);
    assert_eq!(
        (sys.ttbr0_el1, sys.tcr_el1, sys.mair_el1, sys.vbar_el1),
        (0, 0, 0, 0)
    );
    assert_eq!(
        (
            sys.cpacr_el1,
            sys.sp_el1,
            sys.cntv_ctl_el0,
            sys.cntv_cval_el0
        ),
        (0, 0, 0, 0)
    );
}

#[test]
fn big_endian_reset_sets_ee_and_e0e() {
    let (mut regs, mut sys) = dirty();
    let start = ResetState {
        pc: 0x100,
        context_id: 0,
        big_endian: true,
        reset: true,
    };
    reset_registers(&mut regs, &mut sys, mpidr_el1(0), Some(&start));
    assert!(sys.is_big_endian());
    assert_eq!(sys.sctlr_el1, 0x30d0_0800 | (1 << 25) | (1 << 24));
    // Without a reset state the vCPU is little-endian at PC 0.
    reset_registers(&mut regs, &mut sys, mpidr_el1(0), None);
    assert!(!sys.is_big_endian());
    assert_eq!(regs.pc, 0);
}

#[test]
fn reset_vcpu_takes_and_clears_the_pending_state_under_the_lock() {
    let vm = TestVm::new(PsciConfig::default(), 20);
    let start = ResetState {
        pc: 0x7000,
        context_id: 0x11,
        big_endian: false,
        reset: true,
    };
    vm.power[17].lock().power_on(start);
    let (mut regs, mut sys) = dirty();
    assert_eq!(reset_vcpu(&vm, 17, &mut regs, &mut sys), Ok(Some(start)));
    assert_eq!((regs.pc, regs.x[0], regs.pstate), (0x7000, 0x11, 0x3c5));
    assert_eq!(sys.mpidr_el1, 0x8000_0101, "vCPU 17: Aff1 = 1, Aff0 = 1");
    assert!(!vm.power[17].lock().reset_state().reset);
    assert_eq!(
        reset_vcpu(&vm, 17, &mut regs, &mut sys),
        Ok(None),
        "consumed once"
    );
    assert_eq!(
        reset_vcpu(&vm, 20, &mut regs, &mut sys),
        Err(ResetError::NoSuchVcpu {
            index: 20,
            vcpu_count: 20
        })
    );
    assert_eq!(pkvm_sync::held_classes(), 0);
}

#[test]
fn first_vcpu_starts_at_the_entry_point_and_secondaries_start_stopped() {
    let vm = TestVm::new(PsciConfig::default(), 4);
    power_on_vm(&vm, &BOOT).unwrap();
    let (mut regs, mut sys) = dirty();
    let r = prepare_to_run(&vm, 0, &mut regs, &mut sys).unwrap();
    assert_eq!(
        r,
        Readiness::Run {
            reset: Some(ResetState {
                pc: ENTRY,
                context_id: DTB,
                big_endian: false,
                reset: true
            })
        }
    );
    assert_eq!(
        (regs.pc, regs.x[0], regs.pstate, sys.mpidr_el1),
        (ENTRY, DTB, 0x3c5, 0x8000_0000)
    );
    // The next entry does not reset again.
    regs.pc += 4;
    assert_eq!(
        prepare_to_run(&vm, 0, &mut regs, &mut sys),
        Ok(Readiness::Run { reset: None })
    );
    assert_eq!(regs.pc, ENTRY + 4);
    for i in 1..4 {
        let (mut r2, mut s2) = dirty();
        assert_eq!(
            prepare_to_run(&vm, i, &mut r2, &mut s2),
            Ok(Readiness::Sleep(PowerState::Stopped))
        );
        assert_eq!(r2, dirty().0, "a stopped vCPU's registers are not touched");
    }
    assert_eq!(
        power_on_vm(&TestVm::new(PsciConfig::default(), 0), &BOOT),
        Err(ResetError::NoVcpus)
    );
}

#[test]
fn cpu_on_then_prepare_to_run_starts_the_secondary_at_its_entry() {
    let vm = TestVm::new(PsciConfig::default(), 2);
    power_on_vm(&vm, &BOOT).unwrap();
    let (mut r0, mut s0) = dirty();
    let _ = prepare_to_run(&vm, 0, &mut r0, &mut s0).unwrap();
    r0.x[..4].copy_from_slice(&[u64::from(f::CPU_ON_64), 1, 0x4030_0000, 0x77]);
    let caller = PsciCaller {
        big_endian: s0.is_big_endian(),
        ..PsciCaller::new(0, Conduit::Hvc)
    };
    assert_eq!(
        handle_psci(&vm, &caller, &mut r0),
        Ok(PsciOutcome::Continue)
    );
    assert_eq!(r0.x[0], 0);
    let (mut r1, mut s1) = dirty();
    let got = prepare_to_run(&vm, 1, &mut r1, &mut s1).unwrap();
    assert!(matches!(got, Readiness::Run { reset: Some(_) }));
    assert_eq!(
        (r1.pc, r1.x[0], r1.x[1], r1.pstate),
        (0x4030_0000, 0x77, 0, 0x3c5)
    );
    assert_eq!(s1.mpidr_el1, 0x8000_0001);
    assert!(!s1.is_big_endian());
}

#[test]
fn system_reset_restarts_vcpu_0_from_the_entry_point() {
    let vm = TestVm::new(PsciConfig::default(), 3);
    power_on_vm(&vm, &BOOT).unwrap();
    let (mut r0, mut s0) = dirty();
    let _ = prepare_to_run(&vm, 0, &mut r0, &mut s0).unwrap();
    // Bring up vCPU 2, which then resets the system.
    r0.x[..4].copy_from_slice(&[u64::from(f::CPU_ON_64), 2, 0x5000, 0]);
    let _ = handle_psci(&vm, &PsciCaller::new(0, Conduit::Hvc), &mut r0).unwrap();
    let (mut r2, mut s2) = dirty();
    let _ = prepare_to_run(&vm, 2, &mut r2, &mut s2).unwrap();
    r0.pc = 0x4020_1234;
    s0.sctlr_el1 |= 1;
    r2.x[0] = u64::from(f::SYSTEM_RESET);
    let out = handle_psci(&vm, &PsciCaller::new(2, Conduit::Hvc), &mut r2).unwrap();
    let PsciOutcome::Exit(ev) = out else {
        panic!("{out:?}")
    };
    assert_eq!(ev.kind, SystemEventKind::Reset);
    for i in 0..3 {
        assert_eq!(vm.state(i), PowerState::Stopped);
        let (mut r, mut s) = dirty();
        assert_eq!(
            prepare_to_run(&vm, i, &mut r, &mut s),
            Ok(Readiness::Sleep(PowerState::Stopped))
        );
    }
    // The VMM restarts the VM.
    power_on_vm(&vm, &BOOT).unwrap();
    let got = prepare_to_run(&vm, 0, &mut r0, &mut s0).unwrap();
    assert!(matches!(got, Readiness::Run { reset: Some(_) }));
    assert_eq!(
        (r0.pc, r0.x[0], r0.pstate, s0.sctlr_el1),
        (ENTRY, DTB, 0x3c5, 0x30d0_0800)
    );
    for i in [1, 2] {
        let (mut r, mut s) = dirty();
        assert_eq!(
            prepare_to_run(&vm, i, &mut r, &mut s),
            Ok(Readiness::Sleep(PowerState::Stopped))
        );
    }
    // vCPU 2's old CPU_ON entry point is gone: a new CPU_ON decides.
    assert!(!vm.power[2].lock().reset_state().reset);
}

#[test]
fn system_suspend_is_denied_while_another_vcpu_runs_and_resumes_at_its_entry() {
    let cfg = PsciConfig {
        version: PsciVersion::V1_1,
        system_suspend: true,
        ..PsciConfig::default()
    };
    let vm = TestVm::with_running(cfg, 2, &[0, 1]);
    let caller = PsciCaller::new(0, Conduit::Hvc);
    let mut regs = GuestGprs::default();
    regs.x[..3].copy_from_slice(&[u64::from(f::SYSTEM_SUSPEND_64), 0x6000, 0x66]);
    let PsciOutcome::Exit(ev) = handle_psci(&vm, &caller, &mut regs).unwrap() else {
        panic!()
    };
    assert_eq!(
        complete_system_suspend(&vm, &caller, &ev, &mut regs),
        Ok(PsciOutcome::Continue)
    );
    assert_eq!(regs.x[0] as i64, -3, "DENIED");
    assert_eq!(vm.state(0), PowerState::Running);

    vm.power[1].lock().power_off();
    let PsciOutcome::Exit(ev) = handle_psci(&vm, &caller, &mut regs_for_suspend()).unwrap() else {
        panic!()
    };
    assert_eq!(
        complete_system_suspend(&vm, &caller, &ev, &mut regs),
        Ok(PsciOutcome::Suspended)
    );
    assert_eq!(vm.state(0), PowerState::Suspended);
    let (mut r, mut s) = dirty();
    assert_eq!(
        prepare_to_run(&vm, 0, &mut r, &mut s),
        Ok(Readiness::Sleep(PowerState::Suspended))
    );
    assert!(vm.power[0].lock().wake_from_suspend());
    assert!(
        !vm.power[1].lock().wake_from_suspend(),
        "only a suspended vCPU wakes"
    );
    let got = prepare_to_run(&vm, 0, &mut r, &mut s).unwrap();
    assert!(matches!(got, Readiness::Run { reset: Some(_) }));
    assert_eq!((r.pc, r.x[0], r.pstate), (0x6000, 0x66, 0x3c5));
}

fn regs_for_suspend() -> GuestGprs {
    let mut regs = GuestGprs::default();
    regs.x[..3].copy_from_slice(&[u64::from(f::SYSTEM_SUSPEND_64), 0x6000, 0x66]);
    regs
}
