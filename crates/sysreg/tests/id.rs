//! ID register sanitisation: hidden features, offered features, and VM
//! configurations that lower fields (accepted) or raise them (refused,
//! naming the field).

mod common;

use common::{full_host, get, minimal_host};
use pkvm_sysreg::{
    traps, HostIds, IdError, IdOverrides, IdReg, Offer, VmFeatures, DEBUG_EMULATED, ID_FIELDS,
    PMU_EMULATED_MAX,
};

fn vm(host: &HostIds, cfg: &IdOverrides) -> VmFeatures {
    VmFeatures::new(host, cfg).expect("valid configuration")
}

fn everything() -> IdOverrides {
    IdOverrides::new().with_sve(32).with_pmu()
}

/// (register, shift, expected VM value) for fields the hypervisor does not
/// virtualise, on a host that has them all. The expected values come from
/// the architecture: 0 = not implemented, 0xF for the signed fields.
const HIDDEN: &[(IdReg, u8, u64, &str)] = &[
    (IdReg::Pfr0, 8, 0, "EL2"),
    (IdReg::Pfr0, 12, 0, "EL3"),
    (IdReg::Pfr0, 28, 0, "RAS"),
    (IdReg::Pfr0, 36, 0, "SEL2"),
    (IdReg::Pfr0, 40, 0, "MPAM"),
    (IdReg::Pfr0, 44, 0, "AMU"),
    (IdReg::Pfr0, 52, 0, "RME"),
    (IdReg::Pfr1, 8, 0, "MTE"),
    (IdReg::Pfr1, 12, 0, "RAS_frac"),
    (IdReg::Pfr1, 16, 0, "MPAM_frac"),
    (IdReg::Pfr1, 24, 0, "SME"),
    (IdReg::Pfr1, 32, 0, "CSV2_frac"),
    (IdReg::Pfr1, 36, 0, "NMI"),
    (IdReg::Dfr0, 4, 0, "TraceVer"),
    (IdReg::Dfr0, 32, 0, "PMSVer (SPE)"),
    (IdReg::Dfr0, 36, 0xf, "DoubleLock"),
    (IdReg::Dfr0, 40, 0, "TraceFilt"),
    (IdReg::Dfr0, 44, 0, "TraceBuffer (TRBE)"),
    (IdReg::Dfr0, 48, 0xf, "MTPMU"),
    (IdReg::Dfr0, 52, 0, "BRBE"),
    (IdReg::Dfr0, 60, 0, "HPMN0"),
    (IdReg::Isar0, 24, 0, "TME"),
    (IdReg::Isar1, 60, 0, "LS64"),
    (IdReg::Isar2, 0, 0, "WFxT"),
    (IdReg::Isar2, 16, 0, "MOPS"),
    (IdReg::Mmfr0, 12, 0, "SNSMem"),
    (IdReg::Mmfr0, 56, 0, "FGT"),
    (IdReg::Mmfr1, 4, 0, "VMIDBits"),
    (IdReg::Mmfr1, 8, 0, "VH"),
    (IdReg::Mmfr1, 16, 0, "LO"),
    (IdReg::Mmfr1, 24, 0, "SpecSEI"),
    (IdReg::Mmfr1, 40, 0, "HCX"),
    (IdReg::Mmfr1, 52, 0, "TIDCP1"),
    (IdReg::Mmfr2, 24, 0, "NV"),
    (IdReg::Mmfr2, 40, 0, "FWB"),
    (IdReg::Mmfr2, 56, 0, "EVT"),
];

#[test]
fn features_not_virtualised_are_hidden_even_when_everything_else_is_offered() {
    let host = full_host();
    for cfg in [IdOverrides::new(), everything()] {
        let v = vm(&host, &cfg);
        for &(reg, shift, want, what) in HIDDEN {
            assert_ne!(
                get(host.get(reg), shift),
                want,
                "{what}: the test host must have it"
            );
            assert_eq!(
                get(v.id(reg), shift),
                want,
                "{} {what} must be hidden",
                reg.name()
            );
        }
        for reg in [IdReg::Smfr0, IdReg::Dfr1, IdReg::Afr0, IdReg::Afr1] {
            assert_eq!(v.id(reg), 0, "{} is all hidden", reg.name());
        }
    }
}

#[test]
fn aarch32_and_gic_v4_are_capped() {
    let v = vm(&full_host(), &IdOverrides::new());
    assert_eq!(get(v.id(IdReg::Pfr0), 0), 1, "EL0 AArch64 only");
    assert_eq!(get(v.id(IdReg::Pfr0), 4), 1, "EL1 AArch64 only");
    assert_eq!(
        get(v.id(IdReg::Pfr0), 24),
        1,
        "GICv3 system registers, not v4.1"
    );
    assert_eq!(get(v.id(IdReg::Pfr0), 56), 1, "CSV2 without SCXTNUM");
    assert_eq!(
        get(v.id(IdReg::Mmfr0), 60),
        1,
        "ECV without the EL2 offset controls"
    );
}

#[test]
fn features_passed_through_keep_the_host_value() {
    let host = full_host();
    let v = vm(&host, &IdOverrides::new());
    assert_eq!(
        v.id(IdReg::Isar0) & !(0xf << 24),
        host.get(IdReg::Isar0) & !(0xf << 24)
    );
    assert_eq!(get(v.id(IdReg::Mmfr0), 0), 5, "PARange");
    assert_eq!(get(v.id(IdReg::Mmfr0), 28), 1, "TGran4 (signed)");
    assert_eq!(v.id(IdReg::Midr), host.get(IdReg::Midr));
    assert_eq!(v.id(IdReg::Ctr), host.get(IdReg::Ctr));
}

#[test]
fn sve_is_visible_only_when_offered_with_a_vector_length() {
    let host = full_host();
    let off = vm(&host, &IdOverrides::new());
    assert_eq!(get(off.id(IdReg::Pfr0), 32), 0);
    assert_eq!(off.id(IdReg::Zfr0), 0);
    assert!(!off.has(Offer::Sve));
    assert_eq!(off.zcr_el2_len(), None);
    let on = vm(&host, &everything());
    assert_eq!(get(on.id(IdReg::Pfr0), 32), 1);
    assert_eq!(on.id(IdReg::Zfr0), host.get(IdReg::Zfr0));
    assert_eq!(on.sve_max_vl(), Some(32));
    assert_eq!(
        on.zcr_el2_len(),
        Some(1),
        "256-bit VL = 2 quadwords, LEN = 1"
    );
}

#[test]
fn sve_configurations_beyond_the_host_are_refused() {
    let cfg = |vl| IdOverrides::new().with_sve(vl);
    assert_eq!(
        VmFeatures::new(&minimal_host(), &cfg(16)),
        Err(IdError::NotOnHost { feature: "SVE" })
    );
    // Not a power-of-two multiple of 16 bytes (48: 384 bits, which some
    // CPUs implement but the architecture does not guarantee), beyond the
    // architecture, beyond this host (64 bytes).
    for bad in [0, 8, 24, 48, 80, 96, 128, 256, 512] {
        assert_eq!(
            VmFeatures::new(&full_host(), &cfg(bad)),
            Err(IdError::SveVectorLength {
                requested: bad,
                host_max: 64
            }),
            "VL {bad}"
        );
    }
    for good in [16, 32, 64] {
        let vm = VmFeatures::new(&full_host(), &cfg(good)).unwrap();
        assert_eq!(vm.sve_max_vl(), Some(good));
        assert_eq!(vm.zcr_el2_len(), Some(u64::from(good / 16 - 1)));
    }
}

#[test]
fn sve_errors_name_the_configuration_field() {
    let cfg = |vl| IdOverrides::new().with_sve(vl);
    let above = VmFeatures::new(&full_host(), &cfg(128)).unwrap_err();
    assert_eq!(
        above.to_string(),
        "VM configuration: sve_max_vl = 128 bytes is more than this CPU supports (at most 64 bytes)"
    );
    let odd = VmFeatures::new(&full_host(), &cfg(48)).unwrap_err();
    assert_eq!(
        odd.to_string(),
        "VM configuration: sve_max_vl = 48 bytes is not a power-of-two multiple of 16 bytes in 16..=256 (this CPU: at most 64)"
    );
}

#[test]
fn sve_default_length_is_the_largest_power_of_two_the_host_allows() {
    let mut host = full_host();
    for (max, limit) in [
        (0, 0),
        (16, 16),
        (48, 32),
        (64, 64),
        (240, 128),
        (256, 256),
        (512, 256),
    ] {
        host.sve_max_vl = max;
        assert_eq!(host.sve_vl_limit(), limit, "host max {max}");
    }
    host.sve_max_vl = 48; // a 384-bit CPU: the VM gets 256 bits
    let vm = VmFeatures::new(&host, &IdOverrides::new().with_sve_host_max(&host)).unwrap();
    assert_eq!(vm.sve_max_vl(), Some(32));
    assert_eq!(
        VmFeatures::new(
            &minimal_host(),
            &IdOverrides::new().with_sve_host_max(&minimal_host())
        ),
        Err(IdError::NotOnHost { feature: "SVE" })
    );
}

#[test]
fn pmu_and_debug_versions_say_what_is_emulated() {
    let host = full_host();
    let no_pmu = vm(&host, &IdOverrides::new());
    assert_eq!(get(no_pmu.id(IdReg::Dfr0), 8), 0);
    assert_eq!(no_pmu.pmu_counters(), 0);
    let pmu = vm(&host, &everything());
    assert_eq!(get(pmu.id(IdReg::Dfr0), 8), u64::from(PMU_EMULATED_MAX));
    assert_eq!(pmu.pmu_counters(), 6);
    assert_eq!(get(pmu.id(IdReg::Dfr0), 0), u64::from(DEBUG_EMULATED));
    assert_eq!(pmu.breakpoints(), 6);
    assert_eq!(pmu.watchpoints(), 4);
    // A PMUv3 for Armv8.0 host: the version stays 1.
    let old = vm(&minimal_host(), &everything_but_sve());
    assert_eq!(get(old.id(IdReg::Dfr0), 8), 1);
}

fn everything_but_sve() -> IdOverrides {
    IdOverrides::new().with_pmu()
}

#[test]
fn an_implementation_defined_pmu_is_not_offered_as_pmuv3() {
    let mut host = minimal_host();
    host.set(
        IdReg::Dfr0,
        (host.get(IdReg::Dfr0) & !(0xf << 8)) | (0xf << 8),
    );
    assert_eq!(
        VmFeatures::new(&host, &everything_but_sve()),
        Err(IdError::NotOnHost { feature: "PMUv3" })
    );
    let v = vm(&host, &IdOverrides::new());
    assert_eq!(get(v.id(IdReg::Dfr0), 8), 0);
}

#[test]
fn lowering_a_field_is_accepted() {
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64ISAR0_EL1.AES", 1)
        .unwrap()
        .set("ID_AA64MMFR0_EL1.PARange", 2)
        .unwrap()
        .set("ID_AA64DFR0_EL1.BRPs", 1)
        .unwrap()
        .set("ID_AA64DFR0_EL1.CTX_CMPs", 0)
        .unwrap();
    let v = vm(&full_host(), &cfg);
    assert_eq!(get(v.id(IdReg::Isar0), 4), 1);
    assert_eq!(get(v.id(IdReg::Mmfr0), 0), 2);
    assert_eq!(v.breakpoints(), 2);
}

#[test]
fn raising_a_field_above_the_host_is_refused_naming_the_field() {
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64ISAR0_EL1.AES", 3).unwrap();
    let err = VmFeatures::new(&full_host(), &cfg).unwrap_err();
    assert_eq!(
        err,
        IdError::AboveHost {
            field: "ID_AA64ISAR0_EL1.AES",
            requested: 3,
            allowed: 2
        }
    );
    assert!(err.to_string().contains("ID_AA64ISAR0_EL1.AES"), "{err}");
}

#[test]
fn a_hidden_or_unoffered_feature_cannot_be_switched_on_by_a_field() {
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64PFR0_EL1.SVE", 1).unwrap();
    assert_eq!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::AboveHost {
            field: "ID_AA64PFR0_EL1.SVE",
            requested: 1,
            allowed: 0
        })
    );
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64DFR0_EL1.DoubleLock", 0).unwrap();
    assert!(matches!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::AboveHost {
            field: "ID_AA64DFR0_EL1.DoubleLock",
            ..
        })
    ));
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64DFR0_EL1.PMUVer", 1).unwrap();
    assert!(matches!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::AboveHost {
            field: "ID_AA64DFR0_EL1.PMUVer",
            ..
        })
    ));
}

#[test]
fn signed_fields_order_not_implemented_below_implemented() {
    // TGran4: host 0 (4K supported); 0xF (not supported) is lower: accepted.
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64MMFR0_EL1.TGran4", 0xf).unwrap();
    let v = vm(&minimal_host(), &cfg);
    assert_eq!(get(v.id(IdReg::Mmfr0), 28), 0xf);
    // FP: host 0xF (no FP); asking for 0 (FP) is more: refused.
    let mut host = minimal_host();
    host.set(IdReg::Pfr0, host.get(IdReg::Pfr0) | (0xf << 16));
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64PFR0_EL1.FP", 0).unwrap();
    assert_eq!(
        VmFeatures::new(&host, &cfg),
        Err(IdError::AboveHost {
            field: "ID_AA64PFR0_EL1.FP",
            requested: 0,
            allowed: 0xf
        })
    );
    // FP: host 1 (FP16); 0 (FP without FP16) is lower: accepted.
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64PFR0_EL1.FP", 0).unwrap();
    assert_eq!(get(vm(&full_host(), &cfg).id(IdReg::Pfr0), 16), 0);
}

#[test]
fn debug_version_below_armv8_and_contradictory_breakpoints_are_refused() {
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64DFR0_EL1.DebugVer", 5).unwrap();
    assert!(matches!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::BelowMinimum {
            field: "ID_AA64DFR0_EL1.DebugVer",
            min: 6,
            ..
        })
    ));
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64DFR0_EL1.BRPs", 0).unwrap();
    assert_eq!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::Inconsistent {
            field: "ID_AA64DFR0_EL1.CTX_CMPs",
            limit: "ID_AA64DFR0_EL1.BRPs"
        })
    );
}

#[test]
fn pmu_counters_and_version_may_be_lowered_not_raised() {
    let cfg = everything_but_sve().with_pmu_counters(2);
    assert_eq!(vm(&full_host(), &cfg).pmu_counters(), 2);
    let cfg = everything_but_sve().with_pmu_counters(7);
    assert_eq!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::PmuCounters {
            requested: 7,
            host: 6
        })
    );
    let mut cfg = everything_but_sve();
    cfg.set("ID_AA64DFR0_EL1.PMUVer", 0).unwrap();
    let v = vm(&full_host(), &cfg);
    assert!(!v.has(Offer::Pmu), "PMUVer lowered to 0 removes the PMU");
    assert_eq!(v.pmu_counters(), 0);
}

#[test]
fn pointer_authentication_follows_the_host_unless_disabled() {
    let host = full_host();
    let on = vm(&host, &IdOverrides::new());
    assert!(on.has(Offer::PAuth));
    assert_eq!(get(on.id(IdReg::Isar1), 4), 5);
    assert_ne!(traps::hcr_el2(&on) & traps::hcr::APK, 0);
    let off = vm(&host, &IdOverrides::new().without_pauth());
    assert!(!off.has(Offer::PAuth));
    assert_eq!(
        get(off.id(IdReg::Isar1), 4) | get(off.id(IdReg::Isar1), 24),
        0
    );
    assert_eq!(
        traps::hcr_el2(&off) & (traps::hcr::APK | traps::hcr::API),
        0
    );
    assert!(!vm(&minimal_host(), &IdOverrides::new()).has(Offer::PAuth));
}

#[test]
fn bad_override_names_and_values_are_errors() {
    let mut cfg = IdOverrides::new();
    assert_eq!(
        cfg.set("ID_AA64PFR0_EL1.NOPE", 0).err(),
        Some(IdError::UnknownField)
    );
    assert_eq!(
        cfg.set("ID_AA64ISAR0_EL1.AES", 0x10).err(),
        Some(IdError::ValueTooWide {
            field: "ID_AA64ISAR0_EL1.AES",
            requested: 0x10
        })
    );
}

#[test]
fn every_listed_field_is_four_bits_inside_its_register_and_unique() {
    for (i, f) in ID_FIELDS.iter().enumerate() {
        assert!(f.shift % 4 == 0 && f.shift <= 60, "{}", f.name);
        assert!(f.name.starts_with(f.reg.name()), "{}", f.name);
        for g in &ID_FIELDS[i + 1..] {
            assert!(
                !(f.reg == g.reg && f.shift == g.shift),
                "{} and {}",
                f.name,
                g.name
            );
            assert_ne!(f.name, g.name);
        }
    }
}

#[test]
fn cache_topology_is_one_unified_level_from_ctr() {
    // CTR_EL0 0x9444_c004: IDC = 1, DminLine = 4 (64 bytes).
    let v = vm(&full_host(), &IdOverrides::new());
    assert_eq!(v.clidr(), 0b100 | (1 << 24), "unified L1, LoC 1, LoU 0");
    assert_eq!(v.ccsidr(0), 2, "LineSize = log2(64) - 4, one way, one set");
    assert_eq!(v.ccsidr(1), 0, "no instruction cache");
    assert_eq!(v.ccsidr(2), 0, "no level 2");
    // CTR_EL0 0x8444_c004: IDC = 0, so LoUU = LoUIS = 1.
    let v = vm(&minimal_host(), &IdOverrides::new());
    assert_eq!(v.clidr(), 0b100 | (1 << 21) | (1 << 24) | (1 << 27));
}

#[test]
fn reserved_values_of_signed_fields_are_refused() {
    let mut cfg = IdOverrides::new();
    cfg.set("ID_AA64MMFR0_EL1.TGran64", 0x8).unwrap();
    assert_eq!(
        VmFeatures::new(&full_host(), &cfg),
        Err(IdError::Reserved {
            field: "ID_AA64MMFR0_EL1.TGran64",
            requested: 0x8
        })
    );
}
