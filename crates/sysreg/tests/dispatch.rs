//! The trap dispatcher: every handler kind, visibility, direction, XZR,
//! trap counters and the feature traps.

mod common;

use common::{full_host, minimal_host};
use pkvm_arch::esr::Esr;
use pkvm_sysreg::{
    handle_feature_trap, handle_sysreg_trap, lookup, Direction, Done, Encoding, Hook, IdOverrides,
    IdReg, Outcome, SysregTrap, VcpuSysregs, VmFeatures, DBGBCR_MASK, MDSCR_MASK, REGISTERS,
};

fn esr(e: (u8, u8, u8, u8, u8), rt: u8, dir: Direction) -> Esr {
    SysregTrap {
        enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
        rt,
        dir,
    }
    .encode()
}

struct Vcpu {
    regs: VcpuSysregs,
    vm: VmFeatures,
    x: [u64; 31],
}

impl Vcpu {
    fn new(cfg: IdOverrides) -> Vcpu {
        Vcpu {
            regs: VcpuSysregs::new(),
            vm: VmFeatures::new(&full_host(), &cfg).unwrap(),
            x: [0; 31],
        }
    }

    fn read(&mut self, e: (u8, u8, u8, u8, u8)) -> Outcome {
        handle_sysreg_trap(
            &mut self.regs,
            &self.vm,
            esr(e, 5, Direction::Read),
            &self.x,
        )
    }

    fn write(&mut self, e: (u8, u8, u8, u8, u8), v: u64) -> Outcome {
        self.x[7] = v;
        handle_sysreg_trap(
            &mut self.regs,
            &self.vm,
            esr(e, 7, Direction::Write),
            &self.x,
        )
    }

    fn read_value(&mut self, e: (u8, u8, u8, u8, u8)) -> u64 {
        match self.read(e) {
            Outcome::Handled(Done::Read { rt: 5, value }) => value,
            other => panic!("{e:?}: expected a read, got {other:?}"),
        }
    }
}

const ID_AA64PFR0: (u8, u8, u8, u8, u8) = (3, 0, 0, 4, 0);
const MDSCR: (u8, u8, u8, u8, u8) = (2, 0, 0, 2, 2);
const OSLAR: (u8, u8, u8, u8, u8) = (2, 0, 1, 0, 4);
const OSLSR: (u8, u8, u8, u8, u8) = (2, 0, 1, 1, 4);
const WRITTEN: Outcome = Outcome::Handled(Done::Write);

#[test]
fn id_registers_read_the_sanitised_view_and_refuse_writes() {
    let mut v = Vcpu::new(IdOverrides::new());
    assert_eq!(v.read_value(ID_AA64PFR0), v.vm.id(IdReg::Pfr0));
    assert_ne!(v.read_value(ID_AA64PFR0), full_host().get(IdReg::Pfr0));
    assert_eq!(v.write(ID_AA64PFR0, 0), Outcome::InjectUndef);
    assert_eq!(
        v.read_value((3, 3, 0, 0, 1)),
        full_host().get(IdReg::Ctr),
        "CTR_EL0"
    );
    assert_eq!(v.read_value((3, 0, 0, 0, 6)), 1, "REVIDR_EL1");
}

#[test]
fn reserved_and_aarch32_id_space_reads_as_zero() {
    let mut v = Vcpu::new(IdOverrides::new());
    assert_eq!(v.read_value((3, 0, 0, 1, 0)), 0, "ID_PFR0_EL1");
    assert_eq!(v.read_value((3, 0, 0, 3, 7)), 0, "unallocated");
    assert_eq!(v.write((3, 0, 0, 3, 7), 1), Outcome::InjectUndef);
}

#[test]
fn unknown_encodings_inject_undef_and_are_counted() {
    let mut v = Vcpu::new(IdOverrides::new());
    // An IMPLEMENTATION DEFINED register (CRn = 15) and an unallocated one.
    assert_eq!(v.read((3, 0, 15, 2, 1)), Outcome::InjectUndef);
    assert_eq!(v.write((3, 5, 4, 0, 0), 1), Outcome::InjectUndef);
    assert_eq!(v.regs.unknown_traps(), 2);
    // Nothing else changed.
    assert_eq!(v.regs, {
        let mut r = VcpuSysregs::new();
        let vm = v.vm;
        let _ = handle_sysreg_trap(
            &mut r,
            &vm,
            esr((3, 0, 15, 2, 1), 0, Direction::Read),
            &[0; 31],
        );
        let _ = handle_sysreg_trap(
            &mut r,
            &vm,
            esr((3, 0, 15, 2, 1), 0, Direction::Read),
            &[0; 31],
        );
        r
    });
}

#[test]
fn hidden_features_inject_undef() {
    let mut v = Vcpu::new(IdOverrides::new().with_sve(32).with_pmu());
    for (e, what) in [
        ((3, 0, 5, 6, 0), "TFSR_EL1 (MTE)"),
        ((3, 0, 1, 2, 6), "SMCR_EL1 (SME)"),
        ((3, 0, 5, 4, 2), "ERXSTATUS_EL1 (RAS)"),
        ((3, 3, 13, 2, 0), "AMCR_EL0 (AMU)"),
        ((3, 0, 9, 10, 0), "PMBLIMITR_EL1 (SPE)"),
        ((3, 0, 9, 11, 0), "TRBLIMITR_EL1 (TRBE)"),
        ((3, 0, 10, 5, 0), "MPAM1_EL1"),
        ((3, 0, 10, 4, 7), "LORID_EL1"),
        ((1, 0, 7, 14, 4), "DC CIGSW (MTE set/way)"),
    ] {
        assert_eq!(v.read(e), Outcome::InjectUndef, "{what} read");
        assert_eq!(v.write(e, 1), Outcome::InjectUndef, "{what} write");
    }
}

#[test]
fn mdscr_is_vcpu_storage_with_only_the_writable_bits() {
    let mut v = Vcpu::new(IdOverrides::new());
    assert_eq!(v.read_value(MDSCR), 0);
    assert_eq!(v.write(MDSCR, u64::MAX), WRITTEN);
    assert_eq!(v.read_value(MDSCR), MDSCR_MASK);
    assert_eq!(MDSCR_MASK, 0b1011_0000_0000_0001, "SS, TDCC, KDE, MDE");
    // Another vCPU's file is untouched.
    assert_eq!(
        VcpuSysregs::new().get(lookup(Encoding::new(2, 0, 0, 2, 2)).unwrap()),
        0
    );
}

#[test]
fn a_guest_breakpoint_can_never_match_at_el2() {
    let mut v = Vcpu::new(IdOverrides::new());
    let dbgbcr0 = (2, 0, 0, 0, 5);
    let dbgwcr0 = (2, 0, 0, 0, 7);
    // E | HMC | SSC = 0b11 | BAS: a breakpoint at every EL including EL2.
    assert_eq!(
        v.write(dbgbcr0, 1 | (1 << 13) | (3 << 14) | (0xf << 5)),
        WRITTEN
    );
    assert_eq!(v.read_value(dbgbcr0) & (1 << 13), 0, "HMC dropped");
    assert_eq!(v.read_value(dbgbcr0), 1 | (3 << 14) | (0xf << 5));
    assert_eq!(v.write(dbgwcr0, u64::MAX), WRITTEN);
    assert_eq!(v.read_value(dbgwcr0) & (1 << 13), 0, "HMC dropped");
    assert_eq!(DBGBCR_MASK & (1 << 13), 0);
}

#[test]
fn breakpoints_and_watchpoints_beyond_the_vm_count_undef() {
    // The full host has 6 breakpoints and 4 watchpoints.
    let mut v = Vcpu::new(IdOverrides::new());
    for n in 0..16u8 {
        let bvr = v.write((2, 0, 0, n, 4), 0x1000 + u64::from(n) * 4);
        let wvr = v.write((2, 0, 0, n, 6), 0x2000);
        assert_eq!(bvr == WRITTEN, n < 6, "DBGBVR{n}: {bvr:?}");
        assert_eq!(wvr == WRITTEN, n < 4, "DBGWVR{n}: {wvr:?}");
    }
    assert_eq!(v.read_value((2, 0, 0, 5, 4)), 0x1014);
}

#[test]
fn the_os_lock_starts_locked_and_follows_oslar() {
    let mut v = Vcpu::new(IdOverrides::new());
    assert_eq!(v.read_value(OSLSR), 0b1010, "OSLM = 0b10, OSLK = 1");
    assert!(v.regs.os_locked());
    assert_eq!(v.write(OSLAR, 0), WRITTEN);
    assert_eq!(v.read_value(OSLSR), 0b1000);
    assert!(!v.regs.os_locked());
    assert_eq!(v.write(OSLAR, 1), WRITTEN);
    assert_eq!(v.read_value(OSLSR), 0b1010);
    assert_eq!(
        v.write(OSLSR, 0),
        Outcome::InjectUndef,
        "OSLSR is read-only"
    );
    assert_eq!(v.read(OSLAR), Outcome::InjectUndef, "OSLAR is write-only");
    v.regs.reset();
    assert!(v.regs.os_locked(), "vCPU reset locks again");
}

#[test]
fn pmu_registers_go_to_the_pmu_hook_only_when_offered() {
    let pmcr = (3, 3, 9, 12, 0);
    let mut off = Vcpu::new(IdOverrides::new());
    assert_eq!(off.read(pmcr), Outcome::InjectUndef);
    let mut on = Vcpu::new(IdOverrides::new().with_pmu().with_pmu_counters(3));
    match on.write(pmcr, 0x41) {
        Outcome::Hook(h) => {
            assert_eq!(h.hook, Hook::Pmu);
            assert_eq!(h.value, 0x41);
            assert_eq!(REGISTERS[h.row].name, "PMCR_EL0");
        }
        o => panic!("{o:?}"),
    }
    // PMEVCNTR<n>_EL0 = S3_3_C14_C(8 + n/8)_(n%8): counters 0..3 only.
    for n in 0..31u8 {
        let o = on.read((3, 3, 14, 8 | (n >> 3), n & 7));
        assert_eq!(
            matches!(o, Outcome::Hook(_)),
            n < 3,
            "PMEVCNTR{n}_EL0: {o:?}"
        );
    }
}

#[test]
fn timer_set_way_and_sgi_go_to_their_hooks() {
    let mut v = Vcpu::new(IdOverrides::new());
    let hook = |o: Outcome| match o {
        Outcome::Hook(h) => h.hook,
        o => panic!("{o:?}"),
    };
    assert_eq!(
        hook(v.write((3, 3, 14, 2, 1), 1)),
        Hook::Timer,
        "CNTP_CTL_EL0"
    );
    assert_eq!(hook(v.read((3, 3, 14, 0, 1))), Hook::Timer, "CNTPCT_EL0");
    assert_eq!(
        hook(v.write((1, 0, 7, 14, 2), 0x42)),
        Hook::SetWay,
        "DC CISW"
    );
    assert_eq!(
        v.read((1, 0, 7, 14, 2)),
        Outcome::InjectUndef,
        "SYSL form of DC CISW"
    );
    assert_eq!(
        hook(v.write((3, 0, 12, 11, 5), 1)),
        Hook::Sgi,
        "ICC_SGI1R_EL1"
    );
}

#[test]
fn ccsidr_follows_the_vcpu_csselr() {
    let mut v = Vcpu::new(IdOverrides::new());
    let csselr = (3, 2, 0, 0, 0);
    let ccsidr = (3, 1, 0, 0, 0);
    assert_eq!(v.read_value(ccsidr), 2, "L1 data/unified: 64-byte lines");
    assert_eq!(v.write(csselr, 0x1f | (1 << 8)), WRITTEN);
    assert_eq!(v.read_value(csselr), 0x1f, "CSSELR keeps bits 4:0");
    assert_eq!(v.read_value(ccsidr), 0, "no such cache");
    assert_eq!(v.read_value((3, 1, 0, 0, 1)), v.vm.clidr(), "CLIDR_EL1");
    assert_eq!(v.write((3, 1, 0, 0, 1), 0), Outcome::InjectUndef);
}

#[test]
fn ccsidr2_exists_only_with_ccidx() {
    let mut full = Vcpu::new(IdOverrides::new());
    assert_eq!(full.read_value((3, 1, 0, 0, 2)), 0);
    let mut old = Vcpu {
        regs: VcpuSysregs::new(),
        vm: VmFeatures::new(&minimal_host(), &IdOverrides::new()).unwrap(),
        x: [0; 31],
    };
    assert_eq!(old.read((3, 1, 0, 0, 2)), Outcome::InjectUndef);
}

#[test]
fn xzr_reads_zero_for_writes_and_discards_reads() {
    let mut v = Vcpu::new(IdOverrides::new());
    v.x = [0xdead; 31];
    let e = esr((3, 0, 1, 0, 1), 31, Direction::Write); // MSR ACTLR_EL1, XZR
    let _ = v.write((3, 0, 1, 0, 1), 7);
    assert_eq!(handle_sysreg_trap(&mut v.regs, &v.vm, e, &v.x), WRITTEN);
    assert_eq!(v.read_value((3, 0, 1, 0, 1)), 0);
    let o = handle_sysreg_trap(
        &mut v.regs,
        &v.vm,
        esr(ID_AA64PFR0, 31, Direction::Read),
        &v.x,
    );
    let (mut x, mut pc) = ([1u64; 31], 0x1000);
    o.complete(&mut x, &mut pc);
    assert_eq!(
        (x, pc),
        ([1; 31], 0x1004),
        "no register written, PC advanced"
    );
}

#[test]
fn complete_writes_rt_and_advances_the_pc_only_when_handled() {
    let mut v = Vcpu::new(IdOverrides::new());
    let o = v.read(ID_AA64PFR0);
    let (mut x, mut pc) = ([0u64; 31], 0x8000);
    o.complete(&mut x, &mut pc);
    assert_eq!(x[5], v.vm.id(IdReg::Pfr0));
    assert_eq!(pc, 0x8004);
    Outcome::InjectUndef.complete(&mut x, &mut pc);
    assert_eq!(pc, 0x8004, "an UNDEF does not advance the PC");
}

#[test]
fn traps_are_counted_per_register() {
    let mut v = Vcpu::new(IdOverrides::new());
    for _ in 0..3 {
        let _ = v.read(ID_AA64PFR0);
    }
    let _ = v.write(MDSCR, 1);
    let _ = v.read((3, 0, 5, 6, 0)); // TFSR_EL1, hidden: counted all the same
    let row = |e: (u8, u8, u8, u8, u8)| lookup(Encoding::new(e.0, e.1, e.2, e.3, e.4)).unwrap();
    assert_eq!(v.regs.trap_count(row(ID_AA64PFR0)), 3);
    assert_eq!(v.regs.trap_count(row(MDSCR)), 1);
    assert_eq!(v.regs.trap_count(row((3, 0, 5, 6, 0))), 1);
    let total: u32 = (0..REGISTERS.len()).map(|r| v.regs.trap_count(r)).sum();
    assert_eq!(total, 5);
    v.regs.reset();
    assert_eq!(
        v.regs.trap_count(row(ID_AA64PFR0)),
        3,
        "statistics survive a vCPU reset"
    );
}

#[test]
fn other_exception_classes_are_not_sysreg_traps() {
    let mut v = Vcpu::new(IdOverrides::new());
    assert_eq!(
        handle_sysreg_trap(&mut v.regs, &v.vm, Esr::hvc(0), &v.x),
        Outcome::InjectUndef
    );
    assert_eq!(v.regs.unknown_traps(), 0);
}

#[test]
fn sve_sme_pac_and_unknown_traps_undef_when_not_offered() {
    let sve = Esr(0x6600_0000); // EC 0x19: the `msr zcr_el1` of issue 10
    let sme = Esr((0x1d << 26) | (1 << 25));
    let pac = Esr((0x09 << 26) | (1 << 25));
    let unknown = Esr(1 << 25);
    let none = VmFeatures::new(&full_host(), &IdOverrides::new().without_pauth()).unwrap();
    let all = VmFeatures::new(&full_host(), &IdOverrides::new().with_sve(64)).unwrap();
    assert_eq!(handle_feature_trap(&none, sve), Some(Outcome::InjectUndef));
    assert_eq!(handle_feature_trap(&all, sve), None, "lazy SVE switch");
    assert_eq!(handle_feature_trap(&all, sme), Some(Outcome::InjectUndef));
    assert_eq!(handle_feature_trap(&none, pac), Some(Outcome::InjectUndef));
    assert_eq!(handle_feature_trap(&all, pac), None);
    assert_eq!(
        handle_feature_trap(&all, unknown),
        Some(Outcome::InjectUndef)
    );
    assert_eq!(handle_feature_trap(&all, Esr::hvc(0)), None);
}
