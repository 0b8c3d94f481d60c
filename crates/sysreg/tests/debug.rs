//! The debug state the world switch loads ([`guest_debug`]) and the set/way
//! policy ([`set_way`]), driven through the trap dispatcher as a guest
//! would program them.

mod common;

use common::full_host;
use pkvm_sysreg::{
    debug_active, guest_debug, handle_sysreg_trap, set_way, Direction, Encoding, IdOverrides,
    Outcome, SetWay, SysregTrap, VcpuSysregs, VmFeatures, MAX_POINTS, MDSCR_KDE, MDSCR_MDE,
    MDSCR_SS,
};

struct Vcpu {
    regs: VcpuSysregs,
    vm: VmFeatures,
}

impl Vcpu {
    fn new() -> Vcpu {
        Vcpu {
            regs: VcpuSysregs::new(),
            vm: VmFeatures::new(&full_host(), &IdOverrides::new()).unwrap(),
        }
    }

    fn access(&mut self, e: (u8, u8, u8, u8, u8), dir: Direction, v: u64) -> Outcome {
        let mut x = [0; 31];
        x[3] = v;
        let esr = SysregTrap {
            enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
            rt: 3,
            dir,
        }
        .encode();
        handle_sysreg_trap(&mut self.regs, &self.vm, esr, &x)
    }

    fn write(&mut self, e: (u8, u8, u8, u8, u8), v: u64) {
        let out = self.access(e, Direction::Write, v);
        assert!(matches!(out, Outcome::Handled(_)), "{e:?}: {out:?}");
    }
}

const MDSCR: (u8, u8, u8, u8, u8) = (2, 0, 0, 2, 2);
const OSLAR: (u8, u8, u8, u8, u8) = (2, 0, 1, 0, 4);

#[test]
fn debug_is_loaded_only_with_mde_kde_or_ss_and_the_os_lock_clear() {
    let mut v = Vcpu::new();
    assert!(
        guest_debug(&v.regs, &v.vm).is_none(),
        "reset: nothing loaded"
    );
    // The OS lock is set at reset: enabling MDE alone is not enough.
    v.write(MDSCR, MDSCR_MDE);
    assert!(!debug_active(&v.regs), "OS lock set at reset");
    v.write(OSLAR, 0);
    for bit in [MDSCR_MDE, MDSCR_KDE, MDSCR_SS] {
        v.write(MDSCR, bit);
        let d = guest_debug(&v.regs, &v.vm).expect("active");
        assert_eq!(d.mdscr, bit);
    }
    // TDCC alone (bit 12) traps EL0 DCC accesses: nothing to load.
    v.write(MDSCR, 1 << 12);
    assert!(guest_debug(&v.regs, &v.vm).is_none());
    v.write(MDSCR, MDSCR_MDE);
    v.write(OSLAR, 1);
    assert!(guest_debug(&v.regs, &v.vm).is_none(), "OS lock set again");
}

#[test]
fn loaded_breakpoints_and_watchpoints_are_the_vcpus_own_values_masked_to_the_vm() {
    let mut v = Vcpu::new();
    v.write(OSLAR, 0);
    v.write(MDSCR, MDSCR_MDE | MDSCR_KDE);
    let (brps, wrps) = (
        usize::from(v.vm.breakpoints()),
        usize::from(v.vm.watchpoints()),
    );
    assert!(brps >= 2 && wrps >= 2 && brps <= MAX_POINTS && wrps <= MAX_POINTS);
    for n in 0..brps as u8 {
        v.write((2, 0, 0, n, 4), 0x4000_1000 + u64::from(n) * 4);
        // All ones: HMC (bit 13) must not reach the hardware.
        v.write((2, 0, 0, n, 5), u64::MAX);
    }
    for n in 0..wrps as u8 {
        v.write((2, 0, 0, n, 6), 0x4100_0000 + u64::from(n) * 8);
        v.write((2, 0, 0, n, 7), u64::MAX);
    }
    let d = guest_debug(&v.regs, &v.vm).expect("active");
    assert_eq!((d.brps, d.wrps), (brps, wrps));
    for n in 0..brps {
        assert_eq!(d.bvr[n], 0x4000_1000 + n as u64 * 4);
        assert_eq!(d.bcr[n] & (1 << 13), 0, "DBGBCR{n}.HMC clear");
        assert_eq!(d.bcr[n] & 1, 1, "DBGBCR{n}.E kept");
    }
    for n in 0..wrps {
        assert_eq!(d.wvr[n], 0x4100_0000 + n as u64 * 8);
        assert_eq!(d.wcr[n] & (1 << 13), 0, "DBGWCR{n}.HMC clear");
    }
    for n in brps..MAX_POINTS {
        assert_eq!(
            (d.bvr[n], d.bcr[n]),
            (0, 0),
            "no breakpoint {n} beyond the VM's"
        );
    }
    for n in wrps..MAX_POINTS {
        assert_eq!(
            (d.wvr[n], d.wcr[n]),
            (0, 0),
            "no watchpoint {n} beyond the VM's"
        );
    }
}

#[test]
fn two_vcpus_keep_separate_debug_state() {
    let (mut a, mut b) = (Vcpu::new(), Vcpu::new());
    for (v, addr) in [(&mut a, 0x4000_2000), (&mut b, 0x4000_3000)] {
        v.write(OSLAR, 0);
        v.write(MDSCR, MDSCR_MDE);
        v.write((2, 0, 0, 0, 4), addr);
        v.write((2, 0, 0, 0, 5), 0x1e7);
    }
    b.write(MDSCR, 0);
    assert_eq!(guest_debug(&a.regs, &a.vm).unwrap().bvr[0], 0x4000_2000);
    assert!(
        guest_debug(&b.regs, &b.vm).is_none(),
        "b's MDSCR write left a alone"
    );
}

#[test]
fn set_way_writes_flush_the_vm_and_reads_do_not_exist() {
    let mut v = Vcpu::new();
    for e in [(1, 0, 7, 6, 2), (1, 0, 7, 10, 2), (1, 0, 7, 14, 2)] {
        match v.access(e, Direction::Write, 0) {
            Outcome::Hook(call) => assert_eq!(set_way(&call), Some(SetWay::FlushVm), "{e:?}"),
            other => panic!("{e:?}: {other:?}"),
        }
        // SYSL form: the table refuses it before any hook.
        assert_eq!(v.access(e, Direction::Read, 0), Outcome::InjectUndef);
    }
}
