//! The EL2 trap controls against values computed by hand from the Arm
//! ARM's bit positions (HCR_EL2, CPTR_EL2 and MDCR_EL2 for E2H = 0).

mod common;

use common::{full_host, minimal_host};
use pkvm_sysreg::traps::{self, cnthctl_el2, cptr_el2, hcr_el2, mdcr_el2, mpam2_el2};
use pkvm_sysreg::{IdOverrides, VmFeatures};

fn vm(host: pkvm_sysreg::HostIds, cfg: IdOverrides) -> VmFeatures {
    VmFeatures::new(&host, &cfg).unwrap()
}

#[test]
fn hcr_on_an_armv8_0_host() {
    // VM 0, SWIO 1, FMO 3, IMO 4, AMO 5, FB 9, BSU 11:10 = 0b01, TWI 13,
    // TWE 14, TID1 16, TID2 17, TID3 18, TSC 19, TIDCP 20, TACR 21, TSW 22, RW 31.
    let v = vm(minimal_host(), IdOverrides::new());
    assert_eq!(hcr_el2(&v), 0x807f_663b);
}

#[test]
fn hcr_on_a_host_with_lor_ras_mte_and_pauth() {
    // Plus TLOR 35, TERR 36, APK 40, API 41, TID5 58; ATA 56 and EnSCXT 53 clear.
    let v = vm(full_host(), IdOverrides::new());
    assert_eq!(hcr_el2(&v), 0x0400_0318_807f_663b);
    let no_pauth = vm(full_host(), IdOverrides::new().without_pauth());
    assert_eq!(hcr_el2(&no_pauth), 0x0400_0018_807f_663b);
}

#[test]
fn hcr_never_sets_the_dangerous_bits() {
    for v in [
        vm(full_host(), IdOverrides::new()),
        vm(minimal_host(), IdOverrides::new()),
    ] {
        let h = hcr_el2(&v);
        for (bit, what) in [
            (12, "DC: stage-1 MMU off would be forced"),
            (26, "TVM: EL1 context is switched, not trapped"),
            (27, "TGE"),
            (34, "E2H: the image runs with E2H = 0"),
            (42, "NV"),
            (53, "EnSCXT: SCXTNUM must trap"),
            (56, "ATA: MTE registers must trap"),
        ] {
            assert_eq!(h & (1 << bit), 0, "{what}");
        }
    }
}

#[test]
fn cptr_lets_fp_through_and_traps_sve_only_when_not_offered() {
    // RES1 7:0, 9, 13; TZ 8; TFP 10 = 0; TSM 12; TTA 20; TAM 30.
    let min = vm(minimal_host(), IdOverrides::new());
    assert_eq!(
        cptr_el2(&min),
        0x0010_33ff,
        "0x33ff (today's value) plus TTA"
    );
    let full = vm(full_host(), IdOverrides::new());
    assert_eq!(cptr_el2(&full), 0x4010_33ff, "plus TAM");
    let sve = vm(full_host(), IdOverrides::new().with_sve(64));
    assert_eq!(cptr_el2(&sve), 0x4010_32ff, "TZ clear");
    for v in [min, full, sve] {
        assert_eq!(cptr_el2(&v) & (1 << 10), 0, "TFP clear");
        assert_ne!(cptr_el2(&v) & (1 << 12), 0, "TSM set: SME never offered");
        assert_eq!(
            cptr_el2(&v) & (1 << 31),
            0,
            "TCPAC clear: CPACR_EL1 is switched"
        );
    }
}

#[test]
fn mdcr_traps_pmu_and_debug_and_forbids_counting_at_el2() {
    // HPMN = 6, TPMCR 5, TPM 6, TDA 9, TDOSA 10, TDRA 11, E2PB 13:12 = 0,
    // TPMS 14, HPMD 17, TTRF 19, HCCD 23, E2TB 25:24 = 0, TDE 8 = 0.
    let full = vm(full_host(), IdOverrides::new().with_pmu());
    assert_eq!(mdcr_el2(&full), 0x008a_4e66);
    // PMUv3 (Armv8.0), 4 counters: no HPMD/HCCD, no SPE/TRF.
    let min = vm(minimal_host(), IdOverrides::new());
    assert_eq!(mdcr_el2(&min), 0xe64);
    // A PMU-less VM is still trapped (its PMU accesses UNDEF).
    let no_pmu = vm(full_host(), IdOverrides::new());
    assert_eq!(mdcr_el2(&no_pmu), mdcr_el2(&full));
}

#[test]
fn the_el1_physical_timer_and_counter_trap() {
    let v = vm(full_host(), IdOverrides::new());
    assert_eq!(cnthctl_el2(&v) & 3, 0, "EL1PCTEN and EL1PCEN clear");
    assert_eq!(cnthctl_el2(&v), 0, "event stream off");
}

#[test]
fn mpam_registers_trap_when_the_host_has_mpam() {
    assert_eq!(mpam2_el2(&vm(full_host(), IdOverrides::new())), 3 << 48);
    assert_eq!(mpam2_el2(&vm(minimal_host(), IdOverrides::new())), 0);
}

#[test]
fn named_bits_are_the_architectures() {
    use traps::{cnthctl, cptr, hcr, mdcr};
    let bits = [
        (hcr::VM, 0),
        (hcr::SWIO, 1),
        (hcr::FMO, 3),
        (hcr::IMO, 4),
        (hcr::AMO, 5),
        (hcr::TWI, 13),
        (hcr::TID3, 18),
        (hcr::TSW, 22),
        (hcr::RW, 31),
        (hcr::APK, 40),
        (hcr::TID5, 58),
        (cptr::TZ, 8),
        (cptr::TFP, 10),
        (cptr::TSM, 12),
        (cptr::TTA, 20),
        (cptr::TAM, 30),
        (mdcr::TPMCR, 5),
        (mdcr::TPM, 6),
        (mdcr::TDA, 9),
        (mdcr::TDOSA, 10),
        (mdcr::TDRA, 11),
        (mdcr::TPMS, 14),
        (mdcr::HPMD, 17),
        (mdcr::TTRF, 19),
        (mdcr::HCCD, 23),
        (cnthctl::EL1PCTEN, 0),
        (cnthctl::EL1PCEN, 1),
    ];
    for (mask, bit) in bits {
        assert_eq!(mask, 1 << bit, "bit {bit}");
    }
}
