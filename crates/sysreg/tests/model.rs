//! Property tests: random syndromes against a reference model of the
//! table, random host CPUs and VM configurations against the "never more
//! than the host" rule, random guest states against the exception entry.

mod common;

use pkvm_arch::esr::Esr;
use pkvm_sysreg::{
    handle_sysreg_trap, inject_undef, visible, Direction, Done, El1State, Encoding, Handler,
    HostIds, IdOverrides, IdReg, Outcome, SysregTrap, VcpuSysregs, VmFeatures, ID_FIELDS,
    REGISTERS,
};
use proptest::prelude::*;

fn host_strategy() -> impl Strategy<Value = HostIds> {
    (
        proptest::collection::vec(any::<u64>(), IdReg::COUNT),
        0u8..=31,
        prop_oneof![Just(0u16), (1u16..=16).prop_map(|q| q * 16)],
    )
        .prop_map(|(regs, n, vl)| {
            let mut h = HostIds::new();
            for (r, v) in IdReg::ALL.iter().zip(regs) {
                h.set(*r, v);
            }
            h.pmu_counters = n;
            h.sve_max_vl = vl;
            h
        })
}

fn config_strategy() -> impl Strategy<Value = IdOverrides> {
    (
        proptest::option::of(0u16..=300),
        any::<bool>(),
        proptest::option::of(0u8..=40),
        any::<bool>(),
        proptest::collection::vec((0..ID_FIELDS.len(), 0u8..=16), 0..4),
    )
        .prop_map(|(vl, pmu, n, pauth, lowered)| {
            let mut c = IdOverrides::new();
            c.sve_max_vl = vl;
            c.pmu = pmu;
            c.pmu_counters = n;
            c.pauth = pauth;
            for (i, v) in lowered {
                let _ = c.set(ID_FIELDS[i].name, v);
            }
            c
        })
}

fn vm_strategy() -> impl Strategy<Value = VmFeatures> {
    (host_strategy(), config_strategy()).prop_filter_map("invalid configuration", |(h, c)| {
        VmFeatures::new(&h, &c).ok()
    })
}

/// An EC 0x18 syndrome: half the time a register of the table, else any encoding.
fn sysreg_esr() -> impl Strategy<Value = SysregTrap> {
    let enc = prop_oneof![
        (0..REGISTERS.len()).prop_map(|i| REGISTERS[i].enc),
        (0u8..4, 0u8..8, 0u8..16, 0u8..16, 0u8..8)
            .prop_map(|(a, b, c, d, e)| Encoding::new(a, b, c, d, e)),
    ];
    (enc, 0u8..32, any::<bool>()).prop_map(|(enc, rt, read)| SysregTrap {
        enc,
        rt,
        dir: if read {
            Direction::Read
        } else {
            Direction::Write
        },
    })
}

/// What the table says should happen, computed without the dispatcher.
#[derive(Debug, PartialEq)]
enum Expect {
    Undef,
    Read(u64),
    Write,
    Hook,
}

fn expect(row: Option<usize>, t: SysregTrap, vm: &VmFeatures, file: &VcpuSysregs) -> Expect {
    let Some(row) = row else { return Expect::Undef };
    let r = &REGISTERS[row];
    let read = t.dir == Direction::Read;
    if !visible(r, vm) || (r.enc.op0 == 1 && read) {
        return Expect::Undef;
    }
    let csselr = REGISTERS
        .iter()
        .position(|r| r.name == "CSSELR_EL1")
        .unwrap();
    match (r.handler, read) {
        (Handler::RazWi | Handler::Raz, true) => Expect::Read(0),
        (Handler::Id(id), true) => Expect::Read(vm.id(id)),
        (Handler::Clidr, true) => Expect::Read(vm.clidr()),
        (Handler::Ccsidr, true) => Expect::Read(vm.ccsidr(file.get(csselr))),
        (Handler::Storage { .. } | Handler::ReadOnly, true) => Expect::Read(file.get(row)),
        (Handler::RazWi | Handler::Storage { .. } | Handler::Oslar, false) => Expect::Write,
        (Handler::Hook(_), _) => Expect::Hook,
        _ => Expect::Undef,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_esr_is_answered_and_non_sysreg_classes_undef(
        esr in any::<u64>(), x in proptest::array::uniform31(any::<u64>()), vm in vm_strategy()
    ) {
        let mut file = VcpuSysregs::new();
        let o = handle_sysreg_trap(&mut file, &vm, Esr(esr), &x);
        if Esr(esr).ec() != 0x18 {
            prop_assert_eq!(o, Outcome::InjectUndef);
            prop_assert_eq!(&file, &VcpuSysregs::new());
        }
    }

    #[test]
    fn sysreg_traps_follow_the_table(
        t in sysreg_esr(), x in proptest::array::uniform31(any::<u64>()), vm in vm_strategy(),
        warm in proptest::collection::vec(sysreg_esr(), 0..8),
    ) {
        let mut file = VcpuSysregs::new();
        for w in warm {
            let _ = handle_sysreg_trap(&mut file, &vm, w.encode(), &x);
        }
        let before = file.clone();
        let row = REGISTERS.iter().position(|r| r.enc == t.enc);
        let want = expect(row, t, &vm, &file);
        let o = handle_sysreg_trap(&mut file, &vm, t.encode(), &x);
        match (&want, o) {
            (Expect::Undef, Outcome::InjectUndef)
            | (Expect::Write, Outcome::Handled(Done::Write))
            | (Expect::Hook, Outcome::Hook(_)) => {}
            (Expect::Read(v), Outcome::Handled(Done::Read { rt, value })) => {
                prop_assert_eq!(*v, value);
                prop_assert_eq!(rt, t.rt);
            }
            (w, o) => prop_assert!(false, "{:?} {}: expected {:?}, got {:?}", t, t.enc, w, o),
        }
        match row {
            None => prop_assert_eq!(file.unknown_traps(), before.unknown_traps() + 1),
            Some(r) => prop_assert_eq!(file.trap_count(r), before.trap_count(r) + 1),
        }
        // Only a successful write changes stored state, and only its own
        // row (OSLAR writes OSLSR).
        for (i, reg) in REGISTERS.iter().enumerate() {
            if file.get(i) != before.get(i) {
                prop_assert_eq!(&want, &Expect::Write);
                let own = Some(i) == row;
                let oslsr = reg.name == "OSLSR_EL1"
                    && row.is_some_and(|r| REGISTERS[r].handler == Handler::Oslar);
                prop_assert!(own || oslsr, "{} changed by {}", reg, t.enc);
            }
        }
    }

    #[test]
    fn a_vm_never_sees_more_than_the_host(host in host_strategy(), cfg in config_strategy()) {
        let Ok(vm) = VmFeatures::new(&host, &cfg) else { return Ok(()) };
        for f in ID_FIELDS {
            let h = f.get(host.get(f.reg));
            let v = f.get(vm.id(f.reg));
            // 0xF, "not implemented", is the bottom of a signed field (the
            // reserved 0x8..=0xE never come from a real CPU).
            let hidden = f.signed && v == 0xf;
            prop_assert!(hidden || f.rank(v) <= f.rank(h), "{}: VM {:#x} above host {:#x}", f.name, v, h);
        }
        for r in IdReg::ALL.iter().filter(|r| !r.is_passthrough()) {
            let listed: u64 = ID_FIELDS.iter().filter(|f| f.reg == *r).map(|f| 0xf << f.shift).sum();
            prop_assert_eq!(vm.id(*r) & !listed, 0, "{}: an unlisted field shows", r.name());
        }
        if let Some(vl) = vm.sve_max_vl() {
            prop_assert!(vl <= host.sve_max_vl && vl.is_power_of_two() && vl >= 16);
        }
        prop_assert!(vm.pmu_counters() <= host.pmu_counters);
    }

    #[test]
    fn a_request_above_the_host_is_always_refused(
        host in host_strategy(), i in 0..ID_FIELDS.len(), v in 0u8..16
    ) {
        let f = &ID_FIELDS[i];
        let h = f.get(host.get(f.reg));
        let mut cfg = IdOverrides::new().with_pmu();
        cfg.set(f.name, v).unwrap();
        // 0xF, "not implemented", is the bottom of a signed field: asking
        // for it is never more than the host has, even when the generated
        // host holds a reserved value (0x8..=0xE, which no real CPU reports).
        let bottom = f.signed && v == 0xf;
        if !bottom && f.rank(v) > f.rank(h) {
            prop_assert!(VmFeatures::new(&host, &cfg).is_err(), "{} = {:#x} over host {:#x}", f.name, v, h);
        }
    }

    #[test]
    fn undef_entry_matches_the_architecture(
        pc in any::<u64>(), pstate in any::<u32>(), vbar in any::<u64>(), sctlr in any::<u64>()
    ) {
        let pstate = u64::from(pstate);
        let mut s = El1State { pc, pstate, vbar_el1: vbar, sctlr_el1: sctlr, ..El1State::default() };
        inject_undef(&mut s);
        let offset = if pstate & 0x10 != 0 {
            0x600
        } else if pstate & 0xc == 0 {
            0x400
        } else if pstate & 1 == 1 {
            0x200
        } else {
            0
        };
        prop_assert_eq!(s.pc, vbar.wrapping_add(offset));
        prop_assert_eq!(s.elr_el1, pc);
        prop_assert_eq!(s.spsr_el1, pstate);
        prop_assert_eq!(s.esr_el1, 1 << 25);
        prop_assert_eq!(s.pstate & 0x3df, 0x3c5, "EL1h, AArch64, DAIF masked");
        prop_assert_eq!(s.pstate & !(0x3df | (1 << 12) | (1 << 22) | (1 << 24)), 0);
    }
}
