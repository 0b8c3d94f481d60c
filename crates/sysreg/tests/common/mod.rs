//! Host CPU profiles shared by the tests.
#![allow(dead_code)]

use pkvm_sysreg::{HostIds, IdReg};

/// A register value from `(shift, field)` pairs.
pub fn fields(f: &[(u8, u64)]) -> u64 {
    f.iter().fold(0, |acc, &(sh, v)| acc | (v << sh))
}

/// The 4-bit field at `shift`.
pub fn get(v: u64, shift: u8) -> u64 {
    (v >> shift) & 0xf
}

/// An Armv9 server CPU with every optional feature this crate hides or offers.
pub fn full_host() -> HostIds {
    let mut h = HostIds::new();
    h.set(
        IdReg::Pfr0,
        fields(&[
            (0, 2),  // EL0: AArch64 and AArch32
            (4, 2),  // EL1
            (8, 1),  // EL2
            (12, 1), // EL3
            (16, 1), // FP with FP16
            (20, 1), // AdvSIMD with FP16
            (24, 3), // GIC v4.1 system registers
            (28, 2), // RAS v1p1
            (32, 1), // SVE
            (36, 1), // SEL2
            (40, 1), // MPAM
            (44, 1), // AMU
            (48, 1), // DIT
            (52, 1), // RME
            (56, 2), // CSV2_2
            (60, 1), // CSV3
        ]),
    )
    .set(
        IdReg::Pfr1,
        fields(&[
            (0, 1),  // BT
            (4, 2),  // SSBS2
            (8, 3),  // MTE3
            (12, 1), // RAS_frac
            (16, 1), // MPAM_frac
            (24, 2), // SME2
            (32, 2), // CSV2_frac
            (36, 1), // NMI
        ]),
    )
    .set(
        IdReg::Zfr0,
        fields(&[
            (0, 1),
            (4, 2),
            (16, 1),
            (20, 1),
            (32, 1),
            (40, 1),
            (44, 1),
            (52, 1),
            (56, 1),
        ]),
    )
    .set(IdReg::Smfr0, 0x8000_0000_0000_0000 | fields(&[(32, 1)]))
    .set(
        IdReg::Dfr0,
        fields(&[
            (0, 9),  // DebugVer v8.4
            (4, 1),  // TraceVer
            (8, 6),  // PMUVer v3p5
            (12, 5), // BRPs: 6 breakpoints
            (20, 3), // WRPs: 4 watchpoints
            (28, 1), // CTX_CMPs: 2
            (32, 3), // PMSVer
            (36, 0), // DoubleLock implemented
            (40, 1), // TraceFilt
            (44, 1), // TraceBuffer
            (48, 1), // MTPMU
            (52, 1), // BRBE
            (60, 1), // HPMN0
        ]),
    )
    .set(IdReg::Dfr1, 1)
    .set(IdReg::Afr0, 0x11)
    .set(
        IdReg::Isar0,
        fields(&[
            (4, 2),
            (8, 1),
            (12, 2),
            (16, 1),
            (20, 2),
            (24, 1), // TME
            (28, 1),
            (32, 1),
            (36, 1),
            (40, 1),
            (44, 1),
            (48, 1),
            (52, 2),
            (56, 2),
            (60, 1),
        ]),
    )
    .set(
        IdReg::Isar1,
        fields(&[
            (0, 2),
            (4, 5), // APA: QARMA5 with FPACCOMBINE
            (12, 1),
            (16, 1),
            (20, 3),
            (24, 1), // GPA
            (32, 1),
            (36, 1),
            (40, 1),
            (44, 1),
            (48, 1),
            (52, 1),
            (56, 1),
            (60, 3), // LS64
        ]),
    )
    .set(
        IdReg::Isar2,
        fields(&[
            (0, 2), // WFxT
            (4, 1),
            (16, 1), // MOPS
            (20, 1),
            (24, 1),
            (28, 1),
            (48, 1),
            (52, 1),
        ]),
    )
    .set(
        IdReg::Mmfr0,
        fields(&[
            (0, 5),
            (4, 2),
            (8, 1),
            (12, 1), // SNSMem
            (20, 2),
            (24, 0), // TGran64 supported
            (28, 1), // TGran4 with 52-bit
            (44, 1),
            (56, 1), // FGT
            (60, 2), // ECV
        ]),
    )
    .set(
        IdReg::Mmfr1,
        fields(&[
            (0, 2),
            (4, 2), // VMIDBits
            (8, 1), // VH
            (12, 2),
            (16, 1), // LO
            (20, 3),
            (24, 1), // SpecSEI
            (28, 1), // XNX
            (32, 1), // TWED
            (36, 1),
            (40, 1), // HCX
            (44, 1),
            (48, 1),
            (52, 1), // TIDCP1
            (56, 1),
        ]),
    )
    .set(
        IdReg::Mmfr2,
        fields(&[
            (0, 1),
            (4, 1),
            (12, 1),
            (16, 1),
            (20, 1), // CCIDX
            (24, 2), // NV
            (28, 1),
            (32, 1),
            (36, 1),
            (40, 1), // FWB
            (48, 1),
            (52, 2),
            (56, 2), // EVT
            (60, 1),
        ]),
    )
    .set(IdReg::Midr, 0x410f_d4f0)
    .set(IdReg::Revidr, 0x1)
    .set(IdReg::Aidr, 0x2)
    .set(IdReg::Ctr, 0x9444_c004);
    h.pmu_counters = 6;
    h.sve_max_vl = 64;
    h
}

/// An Armv8.0 CPU: FP/SIMD, PMUv3 with 4 counters, no optional extension.
pub fn minimal_host() -> HostIds {
    let mut h = HostIds::new();
    h.set(IdReg::Pfr0, fields(&[(0, 1), (4, 1), (8, 1), (24, 1)]))
        .set(
            IdReg::Dfr0,
            fields(&[(0, 6), (8, 1), (12, 5), (20, 3), (28, 1)]),
        )
        .set(IdReg::Isar0, fields(&[(4, 2), (8, 1), (12, 1), (16, 1)]))
        .set(IdReg::Mmfr0, fields(&[(0, 2), (4, 2), (20, 1)]))
        .set(IdReg::Midr, 0x410f_d034)
        .set(IdReg::Ctr, 0x8444_c004);
    h.pmu_counters = 4;
    h
}
