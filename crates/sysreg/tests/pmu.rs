//! The virtual PMUv3: register semantics (write-1-to-set/clear, PMCR's
//! reset bits, selection, RES0 bits, UNDEFs), SW_INCR counting, cycle
//! accounting per run slice with filters, overflow flags and the
//! interrupt line, and state surviving a save/restore.

mod common;

use common::full_host;
use pkvm_arch::esr::Esr;
use pkvm_sysreg::pmu::{event, evtyper, pmcr, GuestEl, PmuReg, Undef, VirtPmu, CYCLE_BIT, PMCEID0};
use pkvm_sysreg::{
    handle_pmu_trap, handle_sysreg_trap, Direction, Done, Encoding, Handler, Hook, IdOverrides,
    Outcome, SysregTrap, VcpuSysregs, VmFeatures, REGISTERS,
};
use proptest::prelude::*;

const N: u8 = 6;

fn pmu() -> VirtPmu {
    VirtPmu::new(N)
}

fn rd(p: &VirtPmu, r: PmuReg) -> u64 {
    p.read(r).unwrap_or_else(|_| panic!("{r:?}: read refused"))
}

fn wr(p: &mut VirtPmu, r: PmuReg, v: u64) {
    p.write(r, v)
        .unwrap_or_else(|_| panic!("{r:?}: write refused"));
}

/// Counter `i` counting `ev`, enabled, with PMCR_EL0.E.
fn program(p: &mut VirtPmu, i: u8, ev: u16) {
    wr(p, PmuReg::EvTyper(i), u64::from(ev));
    wr(p, PmuReg::CntenSet, 1 << i);
    wr(p, PmuReg::Pmcr, rd(p, PmuReg::Pmcr) | pmcr::E);
}

#[test]
fn every_pmu_row_of_the_table_decodes_to_its_register() {
    let mut rows = 0;
    for r in REGISTERS
        .iter()
        .filter(|r| r.handler == Handler::Hook(Hook::Pmu))
    {
        let reg = PmuReg::decode(r.enc).unwrap_or_else(|| panic!("{r}: not a PMU register"));
        let name = r.to_string();
        let want = match reg {
            PmuReg::EvCntr(n) => format!("PMEVCNTR{n}_EL0"),
            PmuReg::EvTyper(n) => format!("PMEVTYPER{n}_EL0"),
            PmuReg::Pmcr => "PMCR_EL0".into(),
            PmuReg::CntenSet => "PMCNTENSET_EL0".into(),
            PmuReg::CntenClr => "PMCNTENCLR_EL0".into(),
            PmuReg::OvsClr => "PMOVSCLR_EL0".into(),
            PmuReg::SwInc => "PMSWINC_EL0".into(),
            PmuReg::Selr => "PMSELR_EL0".into(),
            PmuReg::Ceid0 => "PMCEID0_EL0".into(),
            PmuReg::Ceid1 => "PMCEID1_EL0".into(),
            PmuReg::Ccntr => "PMCCNTR_EL0".into(),
            PmuReg::XevTyper => "PMXEVTYPER_EL0".into(),
            PmuReg::XevCntr => "PMXEVCNTR_EL0".into(),
            PmuReg::UserEnr => "PMUSERENR_EL0".into(),
            PmuReg::IntenSet => "PMINTENSET_EL1".into(),
            PmuReg::IntenClr => "PMINTENCLR_EL1".into(),
            PmuReg::OvsSet => "PMOVSSET_EL0".into(),
            PmuReg::Mmir => "PMMIR_EL1".into(),
            PmuReg::CcFiltr => "PMCCFILTR_EL0".into(),
        };
        assert_eq!(name, want);
        rows += 1;
    }
    assert_eq!(rows, 17 + 2 * 31);
}

#[test]
fn pmcr_reads_n_keeps_writable_bits_and_p_c_reset_counters() {
    let mut p = pmu();
    assert_eq!(rd(&p, PmuReg::Pmcr), pmcr::LC | (u64::from(N) << 11));
    wr(&mut p, PmuReg::EvCntr(2), 77);
    wr(&mut p, PmuReg::Ccntr, 99);
    // N (15:11), IMP, IDCODE are read-only; X (4) is RAZ/WI.
    wr(&mut p, PmuReg::Pmcr, !(pmcr::P | pmcr::C));
    assert_eq!(rd(&p, PmuReg::Pmcr), pmcr::WRITABLE | (u64::from(N) << 11));
    assert_eq!((rd(&p, PmuReg::EvCntr(2)), rd(&p, PmuReg::Ccntr)), (77, 99));
    wr(&mut p, PmuReg::Pmcr, pmcr::E | pmcr::P);
    assert_eq!(rd(&p, PmuReg::EvCntr(2)), 0, "P resets event counters");
    assert_eq!(rd(&p, PmuReg::Ccntr), 99, "P leaves the cycle counter");
    assert_eq!(rd(&p, PmuReg::Pmcr) & (pmcr::P | pmcr::C), 0, "P, C read 0");
    wr(&mut p, PmuReg::EvCntr(2), 5);
    wr(&mut p, PmuReg::Pmcr, pmcr::E | pmcr::C);
    assert_eq!((rd(&p, PmuReg::EvCntr(2)), rd(&p, PmuReg::Ccntr)), (5, 0));
}

#[test]
fn set_clear_pairs_write_one_to_set_and_to_clear_within_n_and_the_cycle_bit() {
    let pairs = [
        (PmuReg::CntenSet, PmuReg::CntenClr),
        (PmuReg::IntenSet, PmuReg::IntenClr),
        (PmuReg::OvsSet, PmuReg::OvsClr),
    ];
    for (set, clr) in pairs {
        let mut p = pmu();
        wr(&mut p, set, 0b101);
        wr(&mut p, set, 0b010);
        assert_eq!(rd(&p, set), 0b111, "{set:?}: zeros leave bits alone");
        wr(&mut p, set, u64::MAX);
        let all = u64::from(CYCLE_BIT) | 0x3f;
        assert_eq!(rd(&p, set), all, "{set:?}: only counters < N and bit 31");
        assert_eq!(rd(&p, clr), all, "{clr:?} reads the same state");
        wr(&mut p, clr, 0b100 | u64::from(CYCLE_BIT));
        assert_eq!(rd(&p, set), 0b11_1011, "{clr:?}: ones clear");
        wr(&mut p, clr, 0);
        assert_eq!(rd(&p, clr), 0b11_1011, "{clr:?}: zeros leave bits alone");
    }
}

#[test]
fn sw_incr_counts_exactly_one_per_write_on_enabled_sw_incr_counters() {
    let mut p = pmu();
    program(&mut p, 0, event::SW_INCR);
    program(&mut p, 1, event::CPU_CYCLES);
    wr(&mut p, PmuReg::EvTyper(2), u64::from(event::SW_INCR)); // not enabled
    for _ in 0..1000 {
        wr(&mut p, PmuReg::SwInc, 0b111 | (1 << 40));
    }
    assert_eq!(rd(&p, PmuReg::EvCntr(0)), 1000);
    assert_eq!(rd(&p, PmuReg::EvCntr(1)), 0, "CPU_CYCLES ignores PMSWINC");
    assert_eq!(rd(&p, PmuReg::EvCntr(2)), 0, "disabled counter");
    wr(&mut p, PmuReg::SwInc, 0b10);
    assert_eq!(rd(&p, PmuReg::EvCntr(0)), 1000, "bit clear: no count");
    wr(&mut p, PmuReg::Pmcr, 0);
    wr(&mut p, PmuReg::SwInc, 1);
    assert_eq!(
        rd(&p, PmuReg::EvCntr(0)),
        1000,
        "PMCR_EL0.E clear: no count"
    );
    assert_eq!(p.read(PmuReg::SwInc), Err(Undef), "PMSWINC is write-only");
}

#[test]
fn a_32_bit_event_counter_wraps_sets_its_overflow_flag_and_raises_the_line() {
    let mut p = pmu();
    program(&mut p, 3, event::SW_INCR);
    wr(&mut p, PmuReg::EvCntr(3), 0xffff_fff0 | (0xdead << 32));
    assert_eq!(rd(&p, PmuReg::EvCntr(3)), 0xffff_fff0, "bits 63:32 RES0");
    for _ in 0..0xf {
        wr(&mut p, PmuReg::SwInc, 1 << 3);
    }
    assert_eq!(
        (rd(&p, PmuReg::EvCntr(3)), rd(&p, PmuReg::OvsSet)),
        (0xffff_ffff, 0)
    );
    wr(&mut p, PmuReg::SwInc, 1 << 3);
    wr(&mut p, PmuReg::SwInc, 1 << 3);
    assert_eq!(
        (rd(&p, PmuReg::EvCntr(3)), rd(&p, PmuReg::OvsSet)),
        (1, 1 << 3)
    );
    assert!(!p.irq_level(), "interrupt not enabled");
    wr(&mut p, PmuReg::IntenSet, 1 << 3);
    assert!(p.irq_level());
    wr(&mut p, PmuReg::Pmcr, pmcr::LC);
    assert!(!p.irq_level(), "PMCR_EL0.E gates the request");
    wr(&mut p, PmuReg::Pmcr, pmcr::E | pmcr::LC);
    wr(&mut p, PmuReg::OvsClr, 1 << 3);
    assert!(!p.irq_level(), "flag cleared: line drops");
}

#[test]
fn run_slices_advance_the_cycle_counter_and_cpu_cycles_counters_only_when_enabled() {
    let mut p = pmu();
    p.advance(1000, GuestEl::El1);
    assert_eq!(rd(&p, PmuReg::Ccntr), 0, "nothing enabled");
    wr(&mut p, PmuReg::CntenSet, u64::from(CYCLE_BIT));
    p.advance(1000, GuestEl::El1);
    assert_eq!(rd(&p, PmuReg::Ccntr), 0, "PMCR_EL0.E clear");
    program(&mut p, 4, event::CPU_CYCLES);
    program(&mut p, 5, event::INST_RETIRED);
    p.advance(1000, GuestEl::El1);
    p.advance(234, GuestEl::El0);
    assert_eq!(rd(&p, PmuReg::Ccntr), 1234);
    assert_eq!(rd(&p, PmuReg::EvCntr(4)), 1234);
    assert_eq!(
        rd(&p, PmuReg::EvCntr(5)),
        0,
        "events not modelled do not count"
    );
    assert_eq!(rd(&p, PmuReg::Ceid0), PMCEID0);
    assert_eq!(PMCEID0, (1 << 0x11) | 1);
}

#[test]
fn filters_exclude_el1_with_p_and_el0_with_u_and_nsh_is_res0() {
    let mut p = pmu();
    program(&mut p, 0, event::CPU_CYCLES);
    wr(&mut p, PmuReg::CntenSet, u64::from(CYCLE_BIT));
    wr(&mut p, PmuReg::EvTyper(0), evtyper::P | 0x11 | (1 << 27));
    assert_eq!(rd(&p, PmuReg::EvTyper(0)), evtyper::P | 0x11, "NSH is RES0");
    wr(&mut p, PmuReg::CcFiltr, evtyper::U | (1 << 27) | 0xff);
    assert_eq!(rd(&p, PmuReg::CcFiltr), evtyper::U);
    p.advance(100, GuestEl::El1);
    p.advance(10, GuestEl::El0);
    assert_eq!(rd(&p, PmuReg::EvCntr(0)), 10, "P: EL1 slices not counted");
    assert_eq!(rd(&p, PmuReg::Ccntr), 100, "U: EL0 slices not counted");
    assert_eq!(GuestEl::of_pstate(0x3c5), GuestEl::El1);
    assert_eq!(GuestEl::of_pstate(0x3c4), GuestEl::El1);
    assert_eq!(GuestEl::of_pstate(0x0), GuestEl::El0);
}

#[test]
fn the_cycle_counter_overflows_at_32_bits_without_lc_and_at_64_with_it() {
    let mut p = pmu();
    wr(&mut p, PmuReg::CntenSet, u64::from(CYCLE_BIT));
    wr(&mut p, PmuReg::Pmcr, pmcr::E);
    wr(&mut p, PmuReg::Ccntr, 0xffff_fff0);
    assert_eq!(p.cycles_to_overflow(), None, "interrupt not enabled");
    wr(&mut p, PmuReg::IntenSet, u64::from(CYCLE_BIT));
    assert_eq!(p.cycles_to_overflow(), Some(0x10));
    p.advance(0x20, GuestEl::El1);
    assert_eq!(rd(&p, PmuReg::Ccntr), 0x1_0000_0010, "64 bits wide");
    assert_eq!(rd(&p, PmuReg::OvsSet), u64::from(CYCLE_BIT));
    assert!(p.irq_level());
    wr(&mut p, PmuReg::OvsClr, u64::from(CYCLE_BIT));
    wr(&mut p, PmuReg::Pmcr, pmcr::E | pmcr::LC);
    p.advance(0x1_0000_0000, GuestEl::El1);
    assert_eq!(rd(&p, PmuReg::OvsSet), 0, "LC: no overflow at bit 32");
    wr(&mut p, PmuReg::Ccntr, u64::MAX - 1);
    assert_eq!(p.cycles_to_overflow(), Some(2));
    p.advance(2, GuestEl::El1);
    assert_eq!(
        (rd(&p, PmuReg::Ccntr), rd(&p, PmuReg::OvsSet)),
        (0, u64::from(CYCLE_BIT))
    );
}

#[test]
fn the_clock_divider_counts_every_64th_cycle_across_slices() {
    let mut p = pmu();
    wr(&mut p, PmuReg::CntenSet, u64::from(CYCLE_BIT));
    wr(&mut p, PmuReg::Pmcr, pmcr::E | pmcr::D);
    for _ in 0..100 {
        p.advance(10, GuestEl::El1);
    }
    assert_eq!(rd(&p, PmuReg::Ccntr), 1000 / 64);
}

#[test]
fn cpu_cycles_counter_preset_near_the_top_overflows_and_predicts_it() {
    let mut p = pmu();
    program(&mut p, 1, event::CPU_CYCLES);
    wr(&mut p, PmuReg::IntenSet, 0b10);
    wr(&mut p, PmuReg::EvCntr(1), 0xffff_ff00);
    assert_eq!(p.cycles_to_overflow(), Some(0x100));
    p.advance(0xff, GuestEl::El1);
    assert!(!p.irq_level());
    p.advance(1, GuestEl::El1);
    assert_eq!(
        (rd(&p, PmuReg::EvCntr(1)), rd(&p, PmuReg::OvsSet)),
        (0, 0b10)
    );
    assert!(p.irq_level());
    assert_eq!(p.cycles_to_overflow(), None, "already overflowed");
}

#[test]
fn pmselr_selects_the_xev_registers_and_out_of_range_indices_undef() {
    let mut p = pmu();
    wr(&mut p, PmuReg::Selr, 0x3f);
    assert_eq!(rd(&p, PmuReg::Selr), 31, "SEL is 5 bits");
    wr(&mut p, PmuReg::XevTyper, evtyper::P | 0xffff);
    assert_eq!(rd(&p, PmuReg::CcFiltr), evtyper::P, "SEL 31: PMCCFILTR");
    assert_eq!(p.read(PmuReg::XevCntr), Err(Undef), "SEL 31: PMXEVCNTR");
    wr(&mut p, PmuReg::Selr, 2);
    wr(&mut p, PmuReg::XevTyper, 0x1234);
    wr(&mut p, PmuReg::XevCntr, 42);
    assert_eq!(rd(&p, PmuReg::EvTyper(2)), 0x1234);
    assert_eq!(rd(&p, PmuReg::EvCntr(2)), 42);
    wr(&mut p, PmuReg::Selr, u64::from(N));
    assert_eq!(p.read(PmuReg::XevTyper), Err(Undef));
    assert_eq!(p.write(PmuReg::XevCntr, 1), Err(Undef));
    assert_eq!(p.read(PmuReg::EvCntr(N)), Err(Undef));
    assert_eq!(p.write(PmuReg::EvTyper(30), 1), Err(Undef));
    for ro in [PmuReg::Ceid0, PmuReg::Ceid1, PmuReg::Mmir] {
        assert_eq!(p.write(ro, 0), Err(Undef), "{ro:?} is read-only");
    }
    wr(&mut p, PmuReg::UserEnr, u64::MAX);
    assert_eq!((rd(&p, PmuReg::UserEnr), p.userenr()), (0xf, 0xf));
}

fn esr(e: Encoding, rt: u8, dir: Direction) -> Esr {
    SysregTrap { enc: e, rt, dir }.encode()
}

#[test]
fn trapped_accesses_reach_the_model_through_the_table_hook() {
    let vm = VmFeatures::new(&full_host(), &IdOverrides::new().with_pmu()).unwrap();
    let mut regs = VcpuSysregs::new();
    let mut p = VirtPmu::new(vm.pmu_counters());
    let mut x = [0u64; 31];
    let pmcr_enc = Encoding::new(3, 3, 9, 12, 0);
    let swinc = Encoding::new(3, 3, 9, 12, 4);
    let mut access = |p: &mut VirtPmu, e, dir, x: &[u64; 31]| match handle_sysreg_trap(
        &mut regs,
        &vm,
        esr(e, 3, dir),
        x,
    ) {
        Outcome::Hook(call) if call.hook == Hook::Pmu => handle_pmu_trap(p, &call),
        other => panic!("{e}: not a PMU hook: {other:?}"),
    };
    let n = u64::from(vm.pmu_counters());
    assert_eq!(
        access(&mut p, pmcr_enc, Direction::Read, &x),
        Outcome::Handled(Done::Read {
            rt: 3,
            value: pmcr::LC | (n << 11)
        })
    );
    x[3] = 1;
    assert_eq!(
        access(&mut p, swinc, Direction::Read, &x),
        Outcome::InjectUndef,
        "PMSWINC read"
    );
    assert_eq!(
        access(&mut p, swinc, Direction::Write, &x),
        Outcome::Handled(Done::Write)
    );
}

/// One guest action on the PMU.
#[derive(Clone, Debug)]
enum Op {
    Write(PmuReg, u64),
    Slice(u64, bool),
}

fn reg() -> impl Strategy<Value = PmuReg> {
    prop_oneof![
        Just(PmuReg::Pmcr),
        Just(PmuReg::CntenSet),
        Just(PmuReg::CntenClr),
        Just(PmuReg::IntenSet),
        Just(PmuReg::IntenClr),
        Just(PmuReg::OvsSet),
        Just(PmuReg::OvsClr),
        Just(PmuReg::SwInc),
        Just(PmuReg::Selr),
        Just(PmuReg::Ccntr),
        Just(PmuReg::XevTyper),
        Just(PmuReg::XevCntr),
        Just(PmuReg::UserEnr),
        Just(PmuReg::CcFiltr),
        (0..8u8).prop_map(PmuReg::EvCntr),
        (0..8u8).prop_map(PmuReg::EvTyper),
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0..0x20u64),
        Just(0x11u64),
        Just(0u64),
        (0xffff_ff00u64..=0xffff_ffff),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (reg(), value()).prop_map(|(r, v)| Op::Write(r, v)),
        (0..0x2_0000u64, any::<bool>()).prop_map(|(c, el0)| Op::Slice(c, el0)),
    ]
}

fn apply(p: &mut VirtPmu, op: &Op) {
    match *op {
        Op::Write(r, v) => {
            let _ = p.write(r, v);
        }
        Op::Slice(c, el0) => p.advance(c, if el0 { GuestEl::El0 } else { GuestEl::El1 }),
    }
}

/// Every readable register, for comparing two PMUs by what a guest sees.
fn visible(p: &VirtPmu) -> Vec<Result<u64, Undef>> {
    let mut regs = vec![
        PmuReg::Pmcr,
        PmuReg::CntenSet,
        PmuReg::IntenSet,
        PmuReg::OvsSet,
        PmuReg::Selr,
        PmuReg::Ccntr,
        PmuReg::UserEnr,
        PmuReg::CcFiltr,
        PmuReg::XevTyper,
        PmuReg::XevCntr,
    ];
    for i in 0..p.counters() {
        regs.push(PmuReg::EvCntr(i));
        regs.push(PmuReg::EvTyper(i));
    }
    let mut v: Vec<_> = regs.into_iter().map(|r| p.read(r)).collect();
    v.push(Ok(u64::from(p.irq_level())));
    v
}

proptest! {
    /// A PMU saved and restored into a fresh one (another vCPU slot, as on
    /// a migration) reads the same in every register and keeps counting
    /// identically under the same further guest actions.
    #[test]
    fn counters_and_configuration_survive_save_and_restore(
        n in 1u8..=8,
        before in proptest::collection::vec(op(), 0..40),
        after in proptest::collection::vec(op(), 0..40),
    ) {
        let mut a = VirtPmu::new(n);
        for o in &before {
            apply(&mut a, o);
        }
        let mask = u64::from(a.counter_mask());
        for r in [PmuReg::CntenSet, PmuReg::IntenSet, PmuReg::OvsSet] {
            prop_assert_eq!(rd(&a, r) & !mask, 0, "{:?}: a bit beyond N", r);
        }
        let mut b = VirtPmu::new(n);
        b.restore(&a.save());
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(visible(&a), visible(&b));
        for o in &after {
            apply(&mut a, o);
            apply(&mut b, o);
            prop_assert_eq!(visible(&a), visible(&b));
        }
    }

    /// SW_INCR counts exactly the writes with the counter's bit set while
    /// enabled, whatever else the guest writes to PMSWINC (reference: a
    /// count kept by the test, modulo 2^32, and the overflow flag).
    #[test]
    fn sw_incr_matches_a_reference_count(
        start in 0xffff_f000u64..=0xffff_ffff,
        writes in proptest::collection::vec(any::<u64>(), 0..3000),
    ) {
        let mut p = pmu();
        program(&mut p, 2, event::SW_INCR);
        wr(&mut p, PmuReg::EvCntr(2), start);
        let hits = writes.iter().filter(|&&w| w & 0b100 != 0).count() as u64;
        for w in &writes {
            wr(&mut p, PmuReg::SwInc, *w);
        }
        prop_assert_eq!(rd(&p, PmuReg::EvCntr(2)), (start + hits) & 0xffff_ffff);
        let wrapped = start + hits > 0xffff_ffff;
        prop_assert_eq!(rd(&p, PmuReg::OvsSet) & 0b100 != 0, wrapped);
    }
}
