//! Table-driven test of every PSCI/SMCCC function and edge case the VM
//! answers, plus the state changes each call makes.
#![cfg(not(loom))]

mod psci_common;

use pkvm_arch::smccc::{arch, psci as f};
use pkvm_host::psci::{
    handle_psci, Conduit, PowerState, PsciCaller, PsciConfig, PsciError, PsciOutcome, PsciVersion,
    Requests, ResetState, SystemEvent, SystemEventKind,
};
use pkvm_host::vcpu_state::GuestGprs;
use psci_common::TestVm;

use PsciVersion::*;

const SUCCESS: i64 = 0;
const NOT_SUPPORTED: i64 = -1;
const INVALID: i64 = -2;
const ALREADY_ON: i64 = -4;
const INTERNAL_FAILURE: i64 = -6;
const ON: i64 = 0;
const OFF: i64 = 1;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Continue with this x0 (x1..x3 = 0).
    Ret(i64),
    /// WaitForInterrupt with x0 = SUCCESS.
    Wfi,
    /// PowerOff with x0 = SUCCESS.
    Off,
    /// Exit(kind, flags, args) with x0 = INTERNAL_FAILURE.
    Exit(SystemEventKind, u64, [u64; 2]),
}

struct Case {
    name: &'static str,
    version: PsciVersion,
    suspend: bool,
    /// The VM's conduit.
    conduit: Conduit,
    /// The instruction the guest used.
    via: Conduit,
    imm: u16,
    /// vCPUs in the VM, and those running (vCPU 0, the caller, always is).
    vcpus: usize,
    running: &'static [usize],
    x: [u64; 4],
    want: Want,
}

const fn case(name: &'static str, version: PsciVersion, x: [u64; 4], want: Want) -> Case {
    Case {
        name,
        version,
        suspend: false,
        conduit: Conduit::Hvc,
        via: Conduit::Hvc,
        imm: 0,
        vcpus: 4,
        running: &[0, 2],
        x,
        want,
    }
}

fn id(v: u32) -> u64 {
    u64::from(v)
}

fn cases() -> Vec<Case> {
    use Want::*;
    let ret2 = SystemEvent::FLAG_PSCI_RESET2;
    let off2 = SystemEvent::FLAG_PSCI_OFF2;
    let (shut, reset, susp) = (
        SystemEventKind::Shutdown,
        SystemEventKind::Reset,
        SystemEventKind::Suspend,
    );
    vec![
        // PSCI_VERSION follows the configuration.
        case("version 0.2", V0_2, [id(f::VERSION), 0, 0, 0], Ret(0x2)),
        case(
            "version 1.0",
            V1_0,
            [id(f::VERSION), 0, 0, 0],
            Ret(0x1_0000),
        ),
        case(
            "version 1.1",
            V1_1,
            [id(f::VERSION), 0, 0, 0],
            Ret(0x1_0001),
        ),
        case(
            "version 1.3",
            V1_3,
            [id(f::VERSION), 0, 0, 0],
            Ret(0x1_0003),
        ),
        case(
            "high half of x0 ignored",
            V1_1,
            [0xffff_ffff_0000_0000 | id(f::VERSION), 0, 0, 0],
            Ret(0x1_0001),
        ),
        // CPU_SUSPEND is WFI.
        case(
            "cpu_suspend32",
            V0_2,
            [id(f::CPU_SUSPEND_32), 0, 0x1000, 0],
            Wfi,
        ),
        case(
            "cpu_suspend64",
            V1_1,
            [id(f::CPU_SUSPEND_64), 0x1_0000, 0x1000, 7],
            Wfi,
        ),
        case("cpu_off", V1_1, [id(f::CPU_OFF), 0, 0, 0], Off),
        // CPU_ON.
        case(
            "cpu_on64 stopped target",
            V1_1,
            [id(f::CPU_ON_64), 1, 0x8000_0000, 0x42],
            Ret(SUCCESS),
        ),
        case(
            "cpu_on32 stopped target",
            V0_2,
            [id(f::CPU_ON_32), 3, 0x8000, 0x42],
            Ret(SUCCESS),
        ),
        case(
            "cpu_on32 ignores high halves",
            V1_1,
            [id(f::CPU_ON_32), 0xdead_0000_0001, 0x8000, 0],
            Ret(SUCCESS),
        ),
        case(
            "cpu_on running target",
            V1_1,
            [id(f::CPU_ON_64), 2, 0x8000, 0],
            Ret(ALREADY_ON),
        ),
        case(
            "cpu_on self",
            V1_1,
            [id(f::CPU_ON_64), 0, 0x8000, 0],
            Ret(ALREADY_ON),
        ),
        case(
            "cpu_on unknown mpidr",
            V1_1,
            [id(f::CPU_ON_64), 4, 0x8000, 0],
            Ret(INVALID),
        ),
        case(
            "cpu_on unknown mpidr aff1",
            V1_1,
            [id(f::CPU_ON_64), 0x100, 0x8000, 0],
            Ret(INVALID),
        ),
        case(
            "cpu_on unknown mpidr aff3",
            V1_1,
            [id(f::CPU_ON_64), 1 << 32 | 1, 0x8000, 0],
            Ret(INVALID),
        ),
        case(
            "cpu_on bad affinity bit 24",
            V1_1,
            [id(f::CPU_ON_64), 1 << 24 | 1, 0x8000, 0],
            Ret(INVALID),
        ),
        case(
            "cpu_on bad affinity bit 31",
            V1_1,
            [id(f::CPU_ON_64), 1 << 31 | 1, 0x8000, 0],
            Ret(INVALID),
        ),
        case(
            "cpu_on bad affinity bit 40",
            V1_1,
            [id(f::CPU_ON_64), 1 << 40 | 1, 0x8000, 0],
            Ret(INVALID),
        ),
        // AFFINITY_INFO.
        case(
            "affinity_info running",
            V1_1,
            [id(f::AFFINITY_INFO_64), 2, 0, 0],
            Ret(ON),
        ),
        case(
            "affinity_info stopped",
            V1_1,
            [id(f::AFFINITY_INFO_64), 1, 0, 0],
            Ret(OFF),
        ),
        case(
            "affinity_info32 stopped",
            V0_2,
            [id(f::AFFINITY_INFO_32), 3, 0, 0],
            Ret(OFF),
        ),
        case(
            "affinity_info unknown",
            V1_1,
            [id(f::AFFINITY_INFO_64), 9, 0, 0],
            Ret(INVALID),
        ),
        case(
            "affinity_info bad bits",
            V1_1,
            [id(f::AFFINITY_INFO_64), 1 << 30 | 1, 0, 0],
            Ret(INVALID),
        ),
        case(
            "affinity_info level 1 cluster on",
            V1_1,
            [id(f::AFFINITY_INFO_64), 0, 1, 0],
            Ret(ON),
        ),
        case(
            "affinity_info level 1 no match",
            V1_1,
            [id(f::AFFINITY_INFO_64), 0x100, 1, 0],
            Ret(INVALID),
        ),
        case(
            "affinity_info level 1 aff0 set",
            V1_1,
            [id(f::AFFINITY_INFO_64), 0x1, 1, 0],
            Ret(INVALID),
        ),
        case(
            "affinity_info level 3",
            V1_1,
            [id(f::AFFINITY_INFO_64), 0, 3, 0],
            Ret(ON),
        ),
        case(
            "affinity_info level 4",
            V1_1,
            [id(f::AFFINITY_INFO_64), 0, 4, 0],
            Ret(INVALID),
        ),
        Case {
            running: &[0],
            ..case(
                "affinity_info level 2 all off but caller",
                V1_1,
                [id(f::AFFINITY_INFO_64), 0, 2, 0],
                Ret(ON),
            )
        },
        Case {
            vcpus: 20,
            ..case(
                "affinity_info level 1 second cluster off",
                V1_1,
                [id(f::AFFINITY_INFO_64), 0x100, 1, 0],
                Ret(OFF),
            )
        },
        Case {
            vcpus: 20,
            running: &[0, 17],
            ..case(
                "affinity_info level 1 second cluster on",
                V1_1,
                [id(f::AFFINITY_INFO_64), 0x100, 1, 0],
                Ret(ON),
            )
        },
        // MIGRATE*.
        case(
            "migrate_info_type",
            V0_2,
            [id(f::MIGRATE_INFO_TYPE), 0, 0, 0],
            Ret(2),
        ),
        case(
            "migrate unsupported",
            V1_1,
            [id(f::MIGRATE_64), 1, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "migrate_info_up_cpu unsupported",
            V1_1,
            [id(f::MIGRATE_INFO_UP_CPU_64), 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        // System events.
        case(
            "system_off",
            V0_2,
            [id(f::SYSTEM_OFF), 0, 0, 0],
            Exit(shut, 0, [0, 0]),
        ),
        case(
            "system_reset",
            V0_2,
            [id(f::SYSTEM_RESET), 0, 0, 0],
            Exit(reset, 0, [0, 0]),
        ),
        case(
            "system_reset2 warm",
            V1_1,
            [id(f::SYSTEM_RESET2_64), 0, 0x77, 0],
            Exit(reset, ret2, [0, 0x77]),
        ),
        case(
            "system_reset2 vendor",
            V1_1,
            [id(f::SYSTEM_RESET2_32), 0x8000_0001, 5, 0],
            Exit(reset, ret2, [0x8000_0001, 5]),
        ),
        case(
            "system_reset2 vendor max",
            V1_3,
            [id(f::SYSTEM_RESET2_64), 0xffff_ffff, 0, 0],
            Exit(reset, ret2, [0xffff_ffff, 0]),
        ),
        case(
            "system_reset2 type 1",
            V1_1,
            [id(f::SYSTEM_RESET2_64), 1, 0, 0],
            Ret(INVALID),
        ),
        case(
            "system_reset2 type 0x7fffffff",
            V1_1,
            [id(f::SYSTEM_RESET2_32), 0x7fff_ffff, 0, 0],
            Ret(INVALID),
        ),
        case(
            "system_reset2 type above 32 bits",
            V1_1,
            [id(f::SYSTEM_RESET2_64), 1 << 32, 0, 0],
            Ret(INVALID),
        ),
        case(
            "system_reset2 on 1.0",
            V1_0,
            [id(f::SYSTEM_RESET2_64), 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "system_off2 hibernate",
            V1_3,
            [id(f::SYSTEM_OFF2_64), 1, 0, 0],
            Exit(shut, off2, [1, 0]),
        ),
        case(
            "system_off2 type 0",
            V1_3,
            [id(f::SYSTEM_OFF2_32), 0, 0, 0],
            Exit(shut, off2, [0, 0]),
        ),
        case(
            "system_off2 bad type",
            V1_3,
            [id(f::SYSTEM_OFF2_64), 2, 0, 0],
            Ret(INVALID),
        ),
        case(
            "system_off2 nonzero cookie",
            V1_3,
            [id(f::SYSTEM_OFF2_64), 1, 1, 0],
            Ret(INVALID),
        ),
        case(
            "system_off2 on 1.1",
            V1_1,
            [id(f::SYSTEM_OFF2_64), 1, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "system_suspend disabled",
            V1_1,
            [id(f::SYSTEM_SUSPEND_64), 0x8000, 1, 0],
            Ret(NOT_SUPPORTED),
        ),
        Case {
            suspend: true,
            ..case(
                "system_suspend enabled",
                V1_0,
                [id(f::SYSTEM_SUSPEND_64), 0x8000, 9, 0],
                Exit(susp, 0, [0x8000, 9]),
            )
        },
        Case {
            suspend: true,
            ..case(
                "system_suspend32 narrows",
                V1_1,
                [id(f::SYSTEM_SUSPEND_32), 0x1_0000_8000, 9, 0],
                Exit(susp, 0, [0x8000, 9]),
            )
        },
        Case {
            suspend: true,
            ..case(
                "system_suspend enabled on 0.2",
                V0_2,
                [id(f::SYSTEM_SUSPEND_64), 0x8000, 9, 0],
                Ret(NOT_SUPPORTED),
            )
        },
        // PSCI_FEATURES reports per version.
        case(
            "features on 0.2",
            V0_2,
            [id(f::PSCI_FEATURES), id(f::CPU_ON_64), 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "features cpu_on",
            V1_0,
            [id(f::PSCI_FEATURES), id(f::CPU_ON_64), 0, 0],
            Ret(SUCCESS),
        ),
        case(
            "features cpu_suspend flags",
            V1_1,
            [id(f::PSCI_FEATURES), id(f::CPU_SUSPEND_64), 0, 0],
            Ret(0),
        ),
        case(
            "features features",
            V1_1,
            [id(f::PSCI_FEATURES), id(f::PSCI_FEATURES), 0, 0],
            Ret(SUCCESS),
        ),
        case(
            "features reset2 on 1.1",
            V1_1,
            [id(f::PSCI_FEATURES), id(f::SYSTEM_RESET2_32), 0, 0],
            Ret(SUCCESS),
        ),
        case(
            "features reset2 on 1.0",
            V1_0,
            [id(f::PSCI_FEATURES), id(f::SYSTEM_RESET2_64), 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "features off2 on 1.3",
            V1_3,
            [id(f::PSCI_FEATURES), id(f::SYSTEM_OFF2_64), 0, 0],
            Ret(1),
        ),
        case(
            "features off2 on 1.1",
            V1_1,
            [id(f::PSCI_FEATURES), id(f::SYSTEM_OFF2_64), 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "features suspend disabled",
            V1_1,
            [id(f::PSCI_FEATURES), id(f::SYSTEM_SUSPEND_64), 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        Case {
            suspend: true,
            ..case(
                "features suspend enabled",
                V1_1,
                [id(f::PSCI_FEATURES), id(f::SYSTEM_SUSPEND_64), 0, 0],
                Ret(SUCCESS),
            )
        },
        case(
            "features smccc_version",
            V1_0,
            [id(f::PSCI_FEATURES), id(arch::SMCCC_VERSION), 0, 0],
            Ret(SUCCESS),
        ),
        case(
            "features arch_features",
            V1_0,
            [id(f::PSCI_FEATURES), id(arch::SMCCC_ARCH_FEATURES), 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "features migrate",
            V1_1,
            [id(f::PSCI_FEATURES), id(f::MIGRATE_32), 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "features unknown",
            V1_1,
            [id(f::PSCI_FEATURES), 0x8400_0050, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        // SMCCC architecture calls.
        case(
            "smccc_version",
            V1_1,
            [id(arch::SMCCC_VERSION), 0, 0, 0],
            Ret(0x1_0001),
        ),
        case(
            "smccc_version on 0.2",
            V0_2,
            [id(arch::SMCCC_VERSION), 0, 0, 0],
            Ret(0x1_0001),
        ),
        case(
            "arch_features version",
            V1_1,
            [id(arch::SMCCC_ARCH_FEATURES), id(arch::SMCCC_VERSION), 0, 0],
            Ret(SUCCESS),
        ),
        case(
            "arch_features itself",
            V1_1,
            [
                id(arch::SMCCC_ARCH_FEATURES),
                id(arch::SMCCC_ARCH_FEATURES),
                0,
                0,
            ],
            Ret(SUCCESS),
        ),
        case(
            "arch_features workaround_1",
            V1_1,
            [
                id(arch::SMCCC_ARCH_FEATURES),
                id(arch::SMCCC_ARCH_WORKAROUND_1),
                0,
                0,
            ],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "arch_features workaround_3",
            V1_1,
            [
                id(arch::SMCCC_ARCH_FEATURES),
                id(arch::SMCCC_ARCH_WORKAROUND_3),
                0,
                0,
            ],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "arch_features soc_id",
            V1_1,
            [
                id(arch::SMCCC_ARCH_FEATURES),
                id(arch::SMCCC_ARCH_SOC_ID),
                0,
                0,
            ],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "arch_features high bits",
            V1_1,
            [
                id(arch::SMCCC_ARCH_FEATURES),
                1 << 32 | id(arch::SMCCC_VERSION),
                0,
                0,
            ],
            Ret(SUCCESS),
        ),
        // Unknown ids.
        case(
            "unknown psci id",
            V1_3,
            [0x8400_0050, 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "cpu_freeze",
            V1_3,
            [id(f::CPU_FREEZE), 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "mem_protect",
            V1_3,
            [id(f::MEM_PROTECT), 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "stat_count",
            V1_3,
            [id(f::STAT_COUNT_64), 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case(
            "vendor hyp call",
            V1_1,
            [0xc600_0000, 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        case("id 0", V1_1, [0, 0, 0, 0], Ret(NOT_SUPPORTED)),
        case(
            "id all ones",
            V1_1,
            [0xffff_ffff, 0, 0, 0],
            Ret(NOT_SUPPORTED),
        ),
        // Conduits and immediates.
        Case {
            via: Conduit::Smc,
            ..case(
                "smc on an hvc vm",
                V1_1,
                [id(f::VERSION), 0, 0, 0],
                Ret(NOT_SUPPORTED),
            )
        },
        Case {
            conduit: Conduit::Smc,
            ..case(
                "hvc on an smc vm",
                V1_1,
                [id(f::VERSION), 0, 0, 0],
                Ret(NOT_SUPPORTED),
            )
        },
        Case {
            conduit: Conduit::Smc,
            via: Conduit::Smc,
            ..case(
                "smc on an smc vm",
                V1_1,
                [id(f::VERSION), 0, 0, 0],
                Ret(0x1_0001),
            )
        },
        Case {
            conduit: Conduit::Smc,
            via: Conduit::Smc,
            ..case(
                "system_off over smc",
                V1_1,
                [id(f::SYSTEM_OFF), 0, 0, 0],
                Exit(shut, 0, [0, 0]),
            )
        },
        Case {
            imm: 1,
            ..case(
                "hvc #1",
                V1_1,
                [id(f::VERSION), 0, 0, 0],
                Ret(NOT_SUPPORTED),
            )
        },
        Case {
            imm: 1,
            ..case(
                "hvc #1 system_off",
                V1_1,
                [id(f::SYSTEM_OFF), 0, 0, 0],
                Ret(NOT_SUPPORTED),
            )
        },
    ]
}

#[test]
fn every_function_and_edge_case_answers_per_table() {
    for c in cases() {
        let cfg = PsciConfig {
            version: c.version,
            conduit: c.conduit,
            system_suspend: c.suspend,
        };
        let vm = TestVm::with_running(cfg, c.vcpus, c.running);
        let mut regs = GuestGprs {
            pc: 0x4000_0000,
            ..GuestGprs::default()
        };
        regs.x[..4].copy_from_slice(&c.x);
        regs.x[4] = 0x5555;
        let caller = PsciCaller {
            imm: c.imm,
            ..PsciCaller::new(0, c.via)
        };
        let out = handle_psci(&vm, &caller, &mut regs).unwrap();
        let n = c.name;
        let x0 = regs.x[0] as i64;
        match c.want {
            Want::Ret(v) => {
                assert_eq!(out, PsciOutcome::Continue, "{n}");
                assert_eq!(x0, v, "{n}: x0");
                assert_eq!(&regs.x[1..4], &[0, 0, 0], "{n}: x1..x3");
            }
            Want::Wfi => {
                assert_eq!(out, PsciOutcome::WaitForInterrupt, "{n}");
                assert_eq!(x0, SUCCESS, "{n}: x0");
            }
            Want::Off => {
                assert_eq!(out, PsciOutcome::PowerOff, "{n}");
                assert_eq!(x0, SUCCESS, "{n}: x0");
            }
            Want::Exit(kind, flags, args) => {
                assert_eq!(
                    out,
                    PsciOutcome::Exit(SystemEvent { kind, flags, args }),
                    "{n}"
                );
                assert_eq!(x0, INTERNAL_FAILURE, "{n}: x0 preset");
            }
        }
        assert_eq!(regs.x[4], 0x5555, "{n}: x4 untouched");
        let pc = if c.via == Conduit::Smc {
            0x4000_0004
        } else {
            0x4000_0000
        };
        assert_eq!(regs.pc, pc, "{n}: pc");
        assert_eq!(pkvm_sync::held_classes(), 0, "{n}: lock leaked");
    }
}

fn vm(version: PsciVersion, n: usize, running: &[usize]) -> TestVm {
    let cfg = PsciConfig {
        version,
        ..PsciConfig::default()
    };
    TestVm::with_running(cfg, n, running)
}

fn call(vm: &TestVm, caller: usize, x: [u64; 4]) -> (PsciOutcome, GuestGprs) {
    let mut regs = GuestGprs::default();
    regs.x[..4].copy_from_slice(&x);
    let out = handle_psci(vm, &PsciCaller::new(caller, Conduit::Hvc), &mut regs).unwrap();
    (out, regs)
}

#[test]
fn cpu_on_stores_reset_state_marks_running_and_kicks_target_once() {
    let vm = vm(V1_1, 4, &[0]);
    let mut regs = GuestGprs::default();
    regs.x[..4].copy_from_slice(&[id(f::CPU_ON_64), 2, 0x4008_0000, 0xc0de]);
    let caller = PsciCaller {
        big_endian: true,
        ..PsciCaller::new(0, Conduit::Hvc)
    };
    assert_eq!(
        handle_psci(&vm, &caller, &mut regs),
        Ok(PsciOutcome::Continue)
    );
    assert_eq!(regs.x[0], 0);
    let p = *vm.power[2].lock();
    assert_eq!(p.state(), PowerState::Running);
    assert_eq!(
        p.reset_state(),
        ResetState {
            pc: 0x4008_0000,
            context_id: 0xc0de,
            big_endian: true,
            reset: true
        }
    );
    assert!(p.requests().contains(Requests::RESET | Requests::WAKE));
    assert_eq!(
        (vm.kicks(0), vm.kicks(1), vm.kicks(2), vm.kicks(3)),
        (0, 0, 1, 0)
    );
}

#[test]
fn failed_cpu_on_changes_nothing() {
    let vm = vm(V1_1, 4, &[0, 1]);
    for target in [1u64, 7, 1 << 24] {
        let before: Vec<_> = vm.power.iter().map(|p| *p.lock()).collect();
        let (_, regs) = call(&vm, 0, [id(f::CPU_ON_64), target, 0x1000, 1]);
        assert_ne!(regs.x[0], 0);
        let after: Vec<_> = vm.power.iter().map(|p| *p.lock()).collect();
        assert_eq!(before, after, "target {target:#x}");
        assert!(vm
            .kicks
            .iter()
            .all(|k| k.load(std::sync::atomic::Ordering::SeqCst) == 0));
    }
}

#[test]
fn cpu_off_stops_the_caller_and_requests_sleep() {
    let vm = vm(V1_1, 2, &[0, 1]);
    let (out, _) = call(&vm, 1, [id(f::CPU_OFF), 0, 0, 0]);
    assert_eq!(out, PsciOutcome::PowerOff);
    assert_eq!(vm.state(1), PowerState::Stopped);
    assert_eq!(vm.state(0), PowerState::Running);
    assert!(vm.power[1].lock().requests().contains(Requests::SLEEP));
    // Once off, AFFINITY_INFO sees it off and CPU_ON can start it again.
    assert_eq!(
        call(&vm, 0, [id(f::AFFINITY_INFO_64), 1, 0, 0]).1.x[0] as i64,
        OFF
    );
    assert_eq!(
        call(&vm, 0, [id(f::CPU_ON_64), 1, 0x2000, 0]).1.x[0] as i64,
        SUCCESS
    );
    assert_eq!(
        call(&vm, 0, [id(f::AFFINITY_INFO_64), 1, 0, 0]).1.x[0] as i64,
        ON
    );
}

#[test]
fn system_events_stop_every_vcpu_and_kick_the_others() {
    for (fid, kind) in [
        (f::SYSTEM_OFF, SystemEventKind::Shutdown),
        (f::SYSTEM_RESET, SystemEventKind::Reset),
        (f::SYSTEM_RESET2_64, SystemEventKind::Reset),
        (f::SYSTEM_OFF2_64, SystemEventKind::Shutdown),
    ] {
        let vm = vm(V1_3, 4, &[0, 1, 3]);
        let (out, regs) = call(&vm, 1, [id(fid), 0, 0, 0]);
        let PsciOutcome::Exit(ev) = out else {
            panic!("{fid:#x}: {out:?}")
        };
        assert_eq!(ev.kind, kind);
        assert_eq!(regs.x[0] as i64, INTERNAL_FAILURE);
        for i in 0..4 {
            let p = *vm.power[i].lock();
            assert_eq!(p.state(), PowerState::Stopped, "{fid:#x} vcpu {i}");
            assert!(p.requests().contains(Requests::SLEEP), "{fid:#x} vcpu {i}");
            assert_eq!(vm.kicks(i), usize::from(i != 1), "{fid:#x} vcpu {i} kicks");
        }
    }
}

#[test]
fn system_suspend_exit_changes_no_power_state() {
    let cfg = PsciConfig {
        system_suspend: true,
        ..PsciConfig::default()
    };
    let vm = TestVm::with_running(cfg, 2, &[0, 1]);
    let (out, regs) = call(&vm, 0, [id(f::SYSTEM_SUSPEND_64), 0x9000, 3, 0]);
    assert!(matches!(
        out,
        PsciOutcome::Exit(SystemEvent {
            kind: SystemEventKind::Suspend,
            ..
        })
    ));
    assert_eq!(regs.x[0] as i64, INTERNAL_FAILURE);
    assert_eq!(
        (vm.state(0), vm.state(1)),
        (PowerState::Running, PowerState::Running)
    );
}

#[test]
fn a_caller_outside_the_vm_is_a_host_error_not_a_panic() {
    let vm = vm(V1_1, 2, &[0]);
    let mut regs = GuestGprs::default();
    regs.x[0] = id(f::VERSION);
    let before = regs;
    assert_eq!(
        handle_psci(&vm, &PsciCaller::new(2, Conduit::Hvc), &mut regs),
        Err(PsciError::CallerOutOfRange {
            caller: 2,
            vcpu_count: 2
        })
    );
    assert_eq!(regs, before);
}

#[test]
fn caller_decoded_from_hvc_and_smc_syndromes() {
    use pkvm_arch::esr::Esr;
    let hvc = Esr((0x16 << 26) | (1 << 25));
    let smc = Esr((0x17 << 26) | (1 << 25) | 3);
    let dabt = Esr(0x93c9_8046);
    assert_eq!(
        PsciCaller::from_esr(1, hvc, false),
        Some(PsciCaller::new(1, Conduit::Hvc))
    );
    let s = PsciCaller::from_esr(2, smc, true).unwrap();
    assert_eq!((s.conduit, s.imm, s.big_endian), (Conduit::Smc, 3, true));
    assert_eq!(PsciCaller::from_esr(0, dabt, false), None);
}

#[test]
fn version_config_round_trips_and_rejects_unemulated_versions() {
    for v in [V0_2, V1_0, V1_1, V1_3] {
        assert_eq!(PsciVersion::from_encoded(v.encoded()), Ok(v));
    }
    assert_eq!(PsciConfig::default().version, V1_1);
    assert_eq!(PsciConfig::default().conduit.dt_method(), "hvc");
    for bad in [0x1, 0x1_0002, 0x2_0000] {
        assert!(PsciVersion::from_encoded(bad).is_err());
    }
    let e = PsciVersion::from_encoded(0x1_0002).unwrap_err().to_string();
    assert!(e.contains("1.2"), "{e}");
}
