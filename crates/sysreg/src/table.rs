//! The table of system registers a guest can reach through a trap: one
//! row per register (arrays such as `DBGBVR<n>_EL1` have one row per `n`),
//! in the spirit of KVM's `sys_reg_descs[]`.
//!
//! Every row says how an access is answered ([`Handler`]), when the VM can
//! see the register at all ([`Visibility`]; an access to an invisible
//! register is an UNDEF, as on a CPU without the feature), and which EL2
//! control makes the access trap ([`Trap`], checked against the policy of
//! [`crate::traps`] by the tests). The rows are sorted by encoding at
//! compile time, which also rejects a duplicate encoding.

use core::fmt;

use crate::enc::Encoding;
use crate::id::{HostFeature, IdReg, Offer};

/// How an access to a visible register is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    /// Reads as zero, writes ignored.
    RazWi,
    /// Read-only, reads as zero (reserved ID space, unimplemented
    /// AArch32 ID registers); a write is an UNDEF.
    Raz,
    /// Read-only value from the VM's sanitised ID view; a write is an UNDEF.
    Id(IdReg),
    /// `CLIDR_EL1` of the VM's cache topology ([`crate::VmFeatures::clidr`]).
    Clidr,
    /// `CCSIDR_EL1` for the level selected by the vCPU's `CSSELR_EL1`.
    Ccsidr,
    /// Emulated storage in the vCPU's register file; writes keep only the
    /// bits in the mask (the others read as their reset value).
    Storage {
        /// Writable bits.
        mask: u64,
    },
    /// Read-only emulated storage (reset value, changed only by the
    /// emulation: `OSLSR_EL1`); a write is an UNDEF.
    ReadOnly,
    /// `OSLAR_EL1`: write-only; bit 0 becomes `OSLSR_EL1.OSLK`.
    Oslar,
    /// Handled by a device model outside this crate.
    Hook(Hook),
    /// Always an UNDEF (used with [`Visibility::Hidden`]).
    Undef,
}

/// Device models that own some registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The virtual PMU.
    Pmu,
    /// The EL1 physical timer and counter (`CNTP_*`, `CNTPCT*`).
    Timer,
    /// Data-cache maintenance by set/way: clean/invalidate the VM's memory by VA.
    SetWay,
    /// SGI generation (`ICC_SGI0R/SGI1R/ASGI1R_EL1` writes), for the vGIC.
    Sgi,
}

/// When the VM can see a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// Always.
    Always,
    /// Only when the VM has the feature.
    If(Offer),
    /// Breakpoint `n`: only when `n < BRPs + 1`.
    Breakpoint(u8),
    /// Watchpoint `n`: only when `n < WRPs + 1`.
    Watchpoint(u8),
    /// PMU event counter `n`: only with a PMU and `n < PMCR_EL0.N`.
    PmuCounter(u8),
    /// Only when the VM's `ID_AA64MMFR2_EL1.CCIDX` is set.
    Ccidx,
    /// Never: a feature the hypervisor does not virtualise. Any access is an UNDEF.
    Hidden,
}

/// The EL2 control that makes an EL1/EL0 access to a register trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// `HCR_EL2.TID1` (REVIDR, AIDR, SMIDR).
    Tid1,
    /// `HCR_EL2.TID2` (CTR, CCSIDR, CCSIDR2, CLIDR, CSSELR).
    Tid2,
    /// `HCR_EL2.TID3` (the ID register space `op0=3, op1=0, CRn=0, CRm=1..7`).
    Tid3,
    /// `HCR_EL2.TID5` (GMID_EL1).
    Tid5,
    /// `HCR_EL2.TACR` (ACTLR_EL1).
    Tacr,
    /// `HCR_EL2.TSW` (DC ISW/CSW/CISW and the MTE set/way forms).
    Tsw,
    /// `HCR_EL2.TLOR` (LOR* registers).
    Tlor,
    /// `HCR_EL2.TERR` (RAS error record registers).
    Terr,
    /// `HCR_EL2.ATA` clear (MTE registers).
    AtaClear,
    /// `HCR_EL2.EnSCXT` clear (SCXTNUM_ELx).
    EnScxtClear,
    /// `HCR_EL2.APK` clear (pointer-authentication key registers).
    ApkClear,
    /// `HCR_EL2.IMO` set (ICC_SGI1R/ASGI1R_EL1 writes).
    Imo,
    /// `HCR_EL2.FMO` set (ICC_SGI0R_EL1 writes).
    Fmo,
    /// `MDCR_EL2.TPM` (PMU registers).
    Tpm,
    /// `MDCR_EL2.TPMCR` (PMCR_EL0).
    Tpmcr,
    /// `MDCR_EL2.TDA` (debug registers).
    Tda,
    /// `MDCR_EL2.TDOSA` (OS lock and power-down registers).
    Tdosa,
    /// `MDCR_EL2.TDRA` (MDRAR_EL1).
    Tdra,
    /// `MDCR_EL2.TPMS` (SPE sampling registers).
    Tpms,
    /// `MDCR_EL2.E2PB` = 0b00 (SPE buffer registers).
    E2pb,
    /// `MDCR_EL2.E2TB` = 0b00 (trace buffer registers).
    E2tb,
    /// `MDCR_EL2.TTRF` (TRFCR_EL1).
    Ttrf,
    /// `CPTR_EL2.TAM` (activity monitors).
    Tam,
    /// `CPTR_EL2.TZ` (ZCR_EL1; reported with EC 0x19).
    Tz,
    /// `CPTR_EL2.TSM` (SME registers; reported with EC 0x1D).
    Tsm,
    /// `CNTHCTL_EL2.EL1PCTEN` clear (CNTPCT_EL0, CNTPCTSS_EL0).
    El1pctenClear,
    /// `CNTHCTL_EL2.EL1PCEN` clear (CNTP_CTL/CVAL/TVAL_EL0).
    El1pcenClear,
    /// `MPAM2_EL2.TRAPMPAM0EL1` (MPAM0_EL1).
    Mpam0,
    /// `MPAM2_EL2.TRAPMPAM1EL1` (MPAM1_EL1).
    Mpam1,
}

impl Trap {
    /// The host feature without which the registers this control traps do
    /// not exist (the CPU itself then answers an access with an UNDEF).
    pub const fn requires(self) -> Option<HostFeature> {
        match self {
            Trap::Tid5 | Trap::AtaClear => Some(HostFeature::Mte2),
            Trap::Tlor => Some(HostFeature::Lor),
            Trap::Terr => Some(HostFeature::Ras),
            Trap::ApkClear => Some(HostFeature::PAuth),
            Trap::Tpm | Trap::Tpmcr => Some(HostFeature::Pmu),
            Trap::Tpms | Trap::E2pb => Some(HostFeature::Spe),
            Trap::E2tb => Some(HostFeature::Trbe),
            Trap::Ttrf => Some(HostFeature::TraceFilt),
            Trap::Tam => Some(HostFeature::Amu),
            Trap::Tz => Some(HostFeature::Sve),
            Trap::Tsm => Some(HostFeature::Sme),
            Trap::Mpam0 | Trap::Mpam1 => Some(HostFeature::Mpam),
            _ => None,
        }
    }
}

/// Marks a row that is not one of an array.
pub const NO_INDEX: u8 = 0xff;

/// One system register (or system instruction) reachable by a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysReg {
    /// Architectural name; arrays use `<n>` for the index (see [`SysReg::index`]).
    /// Empty for reserved encodings (displayed as `S<op0>_<op1>_C<n>_C<m>_<op2>`).
    pub name: &'static str,
    /// The array index, or [`NO_INDEX`].
    pub index: u8,
    /// The encoding.
    pub enc: Encoding,
    /// Value at vCPU reset (for [`Handler::Storage`] and [`Handler::ReadOnly`]).
    pub reset: u64,
    /// When the VM sees it.
    pub vis: Visibility,
    /// How an access is answered.
    pub handler: Handler,
    /// What makes an access trap.
    pub trap: Trap,
}

impl fmt::Display for SysReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            return write!(f, "{}", self.enc);
        }
        match self.name.split_once("<n>") {
            Some((a, b)) if self.index != NO_INDEX => write!(f, "{a}{}{b}", self.index),
            _ => f.write_str(self.name),
        }
    }
}

const PLACEHOLDER: SysReg = SysReg {
    name: "",
    index: NO_INDEX,
    enc: Encoding::new(0, 0, 0, 0, 0),
    reset: 0,
    vis: Visibility::Hidden,
    handler: Handler::Undef,
    trap: Trap::Tid3,
};

const MAX_ROWS: usize = 512;

/// `MDSCR_EL1` bits a guest may write: SS (0), TDCC (12), KDE (13), MDE (15).
pub const MDSCR_MASK: u64 = (1 << 0) | (1 << 12) | (1 << 13) | (1 << 15);
/// `DBGBCR<n>_EL1` bits a guest may write: E, PMC, BAS, SSC, LBN, BT. HMC
/// (bit 13) is kept clear so that no guest breakpoint can match at EL2.
pub const DBGBCR_MASK: u64 = 0x00ff_c1e7;
/// `DBGWCR<n>_EL1` bits a guest may write: E, PAC, LSC, BAS, SSC, LBN, WT,
/// MASK. HMC (bit 13) is kept clear so that no guest watchpoint can match at EL2.
pub const DBGWCR_MASK: u64 = 0x1f1f_dfff;
/// `DBGWVR<n>_EL1`: bits 1:0 are RES0.
pub const DBGWVR_MASK: u64 = !3;
/// `DBGBVR<n>_EL1`: bits 1:0 are RES0.
pub const DBGBVR_MASK: u64 = !3;
/// `OSLSR_EL1` at reset: OSLM = 0b10 (OS lock implemented), OSLK = 1 (locked,
/// the architecture's cold-reset value).
pub const OSLSR_RESET: u64 = 0b1010;
/// `OSLSR_EL1.OSLK`.
pub const OSLSR_OSLK: u64 = 1 << 1;

struct Builder {
    rows: [SysReg; MAX_ROWS],
    len: usize,
}

impl Builder {
    const fn push(mut self, r: SysReg) -> Builder {
        self.rows[self.len] = r;
        self.len += 1;
        self
    }

    #[allow(clippy::too_many_arguments)]
    const fn reg(
        self,
        name: &'static str,
        e: (u8, u8, u8, u8, u8),
        vis: Visibility,
        handler: Handler,
        trap: Trap,
    ) -> Builder {
        self.push(SysReg {
            name,
            index: NO_INDEX,
            enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
            reset: 0,
            vis,
            handler,
            trap,
        })
    }

    /// The hidden feature registers: always UNDEF.
    const fn hidden(self, name: &'static str, e: (u8, u8, u8, u8, u8), trap: Trap) -> Builder {
        self.reg(name, e, Visibility::Hidden, Handler::Undef, trap)
    }
}

use Handler::{Hook as H, RazWi, Storage};
use Visibility::{Always, Hidden};

const ALL_BITS: Handler = Storage { mask: u64::MAX };

const AARCH32_ID_NAMES: [(u8, u8, &str); 17] = [
    (1, 0, "ID_PFR0_EL1"),
    (1, 1, "ID_PFR1_EL1"),
    (1, 2, "ID_DFR0_EL1"),
    (1, 3, "ID_AFR0_EL1"),
    (1, 4, "ID_MMFR0_EL1"),
    (1, 5, "ID_MMFR1_EL1"),
    (1, 6, "ID_MMFR2_EL1"),
    (1, 7, "ID_MMFR3_EL1"),
    (2, 0, "ID_ISAR0_EL1"),
    (2, 1, "ID_ISAR1_EL1"),
    (2, 2, "ID_ISAR2_EL1"),
    (2, 3, "ID_ISAR3_EL1"),
    (2, 4, "ID_ISAR4_EL1"),
    (2, 5, "ID_ISAR5_EL1"),
    (2, 6, "ID_MMFR4_EL1"),
    (2, 7, "ID_ISAR6_EL1"),
    (3, 0, "MVFR0_EL1"),
];
const AARCH32_ID_NAMES2: [(u8, u8, &str); 5] = [
    (3, 1, "MVFR1_EL1"),
    (3, 2, "MVFR2_EL1"),
    (3, 4, "ID_PFR2_EL1"),
    (3, 5, "ID_DFR1_EL1"),
    (3, 6, "ID_MMFR5_EL1"),
];

/// The ID register space `op0=3, op1=0, CRn=0, CRm=1..7`: AArch64 ID
/// registers from the sanitised view, AArch32 ones (no AArch32 is offered)
/// and unallocated encodings read as zero (the architecture makes the
/// unallocated ID space RAZ).
const fn id_space(mut b: Builder) -> Builder {
    let mut crm = 1;
    while crm <= 7 {
        let mut op2 = 0;
        while op2 <= 7 {
            let enc = (3, 0, 0, crm, op2);
            let mut handler = Handler::Raz;
            let mut name = "";
            let mut i = 0;
            while i < IdReg::COUNT {
                let r = IdReg::ALL[i];
                let e = r.encoding();
                if e.op1 == 0 && e.crn == 0 && e.crm == crm && e.op2 == op2 {
                    handler = Handler::Id(r);
                    name = r.name();
                }
                i += 1;
            }
            let mut j = 0;
            while j < AARCH32_ID_NAMES.len() + AARCH32_ID_NAMES2.len() {
                let (c, o, n) = if j < AARCH32_ID_NAMES.len() {
                    AARCH32_ID_NAMES[j]
                } else {
                    AARCH32_ID_NAMES2[j - AARCH32_ID_NAMES.len()]
                };
                if c == crm && o == op2 {
                    name = n;
                }
                j += 1;
            }
            b = b.reg(name, enc, Always, handler, Trap::Tid3);
            op2 += 1;
        }
        crm += 1;
    }
    b
}

const fn cache_and_ident(b: Builder) -> Builder {
    b.reg(
        "REVIDR_EL1",
        (3, 0, 0, 0, 6),
        Always,
        Handler::Id(IdReg::Revidr),
        Trap::Tid1,
    )
    .reg(
        "AIDR_EL1",
        (3, 1, 0, 0, 7),
        Always,
        Handler::Id(IdReg::Aidr),
        Trap::Tid1,
    )
    .reg(
        "CTR_EL0",
        (3, 3, 0, 0, 1),
        Always,
        Handler::Id(IdReg::Ctr),
        Trap::Tid2,
    )
    .reg(
        "CCSIDR_EL1",
        (3, 1, 0, 0, 0),
        Always,
        Handler::Ccsidr,
        Trap::Tid2,
    )
    .reg(
        "CLIDR_EL1",
        (3, 1, 0, 0, 1),
        Always,
        Handler::Clidr,
        Trap::Tid2,
    )
    // NumSets - 1 of the single one-set cache: zero.
    .reg(
        "CCSIDR2_EL1",
        (3, 1, 0, 0, 2),
        Visibility::Ccidx,
        Handler::Raz,
        Trap::Tid2,
    )
    .reg(
        "CSSELR_EL1",
        (3, 2, 0, 0, 0),
        Always,
        Storage { mask: 0x1f },
        Trap::Tid2,
    )
    .hidden("GMID_EL1", (3, 1, 0, 0, 4), Trap::Tid5)
    .hidden("SMIDR_EL1", (3, 1, 0, 0, 6), Trap::Tid1)
    .reg("ACTLR_EL1", (3, 0, 1, 0, 1), Always, ALL_BITS, Trap::Tacr)
}

const fn debug(mut b: Builder) -> Builder {
    b = b
        .reg("OSDTRRX_EL1", (2, 0, 0, 0, 2), Always, RazWi, Trap::Tda)
        .reg("MDCCINT_EL1", (2, 0, 0, 2, 0), Always, RazWi, Trap::Tda)
        .reg(
            "MDSCR_EL1",
            (2, 0, 0, 2, 2),
            Always,
            Storage { mask: MDSCR_MASK },
            Trap::Tda,
        )
        .reg("OSDTRTX_EL1", (2, 0, 0, 3, 2), Always, RazWi, Trap::Tda)
        .reg("OSECCR_EL1", (2, 0, 0, 6, 2), Always, RazWi, Trap::Tda)
        .reg(
            "MDRAR_EL1",
            (2, 0, 1, 0, 0),
            Always,
            Handler::Raz,
            Trap::Tdra,
        )
        .reg(
            "OSLAR_EL1",
            (2, 0, 1, 0, 4),
            Always,
            Handler::Oslar,
            Trap::Tdosa,
        )
        .push(SysReg {
            reset: OSLSR_RESET,
            ..Builder::one("OSLSR_EL1", (2, 0, 1, 1, 4), Handler::ReadOnly, Trap::Tdosa)
        })
        // DoubleLock is not offered (ID_AA64DFR0_EL1.DoubleLock = 0xF): RAZ/WI.
        .reg("OSDLR_EL1", (2, 0, 1, 3, 4), Always, RazWi, Trap::Tdosa)
        .reg(
            "DBGPRCR_EL1",
            (2, 0, 1, 4, 4),
            Always,
            Storage { mask: 1 },
            Trap::Tdosa,
        )
        .reg("DBGCLAIMSET_EL1", (2, 0, 7, 8, 6), Always, RazWi, Trap::Tda)
        .reg("DBGCLAIMCLR_EL1", (2, 0, 7, 9, 6), Always, RazWi, Trap::Tda)
        .reg(
            "DBGAUTHSTATUS_EL1",
            (2, 0, 7, 14, 6),
            Always,
            Handler::Raz,
            Trap::Tda,
        )
        .reg(
            "MDCCSR_EL0",
            (2, 3, 0, 1, 0),
            Always,
            Handler::Raz,
            Trap::Tda,
        )
        .reg("DBGDTR_EL0", (2, 3, 0, 4, 0), Always, RazWi, Trap::Tda)
        .reg("DBGDTRRX_EL0", (2, 3, 0, 5, 0), Always, RazWi, Trap::Tda);
    let mut n = 0;
    while n < 16 {
        let bp = Visibility::Breakpoint(n);
        let wp = Visibility::Watchpoint(n);
        b = b
            .push(Builder::arr(
                "DBGBVR<n>_EL1",
                n,
                (2, 0, 0, n, 4),
                bp,
                DBGBVR_MASK,
                Trap::Tda,
            ))
            .push(Builder::arr(
                "DBGBCR<n>_EL1",
                n,
                (2, 0, 0, n, 5),
                bp,
                DBGBCR_MASK,
                Trap::Tda,
            ))
            .push(Builder::arr(
                "DBGWVR<n>_EL1",
                n,
                (2, 0, 0, n, 6),
                wp,
                DBGWVR_MASK,
                Trap::Tda,
            ))
            .push(Builder::arr(
                "DBGWCR<n>_EL1",
                n,
                (2, 0, 0, n, 7),
                wp,
                DBGWCR_MASK,
                Trap::Tda,
            ));
        n += 1;
    }
    b
}

impl Builder {
    const fn one(
        name: &'static str,
        e: (u8, u8, u8, u8, u8),
        handler: Handler,
        trap: Trap,
    ) -> SysReg {
        SysReg {
            name,
            index: NO_INDEX,
            enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
            reset: 0,
            vis: Always,
            handler,
            trap,
        }
    }

    const fn arr(
        name: &'static str,
        n: u8,
        e: (u8, u8, u8, u8, u8),
        vis: Visibility,
        mask: u64,
        trap: Trap,
    ) -> SysReg {
        SysReg {
            name,
            index: n,
            enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
            reset: 0,
            vis,
            handler: Storage { mask },
            trap,
        }
    }
}

const fn pmu(mut b: Builder) -> Builder {
    let v = Visibility::If(Offer::Pmu);
    let p = H(Hook::Pmu);
    b = b
        .reg("PMCR_EL0", (3, 3, 9, 12, 0), v, p, Trap::Tpmcr)
        .reg("PMCNTENSET_EL0", (3, 3, 9, 12, 1), v, p, Trap::Tpm)
        .reg("PMCNTENCLR_EL0", (3, 3, 9, 12, 2), v, p, Trap::Tpm)
        .reg("PMOVSCLR_EL0", (3, 3, 9, 12, 3), v, p, Trap::Tpm)
        .reg("PMSWINC_EL0", (3, 3, 9, 12, 4), v, p, Trap::Tpm)
        .reg("PMSELR_EL0", (3, 3, 9, 12, 5), v, p, Trap::Tpm)
        .reg("PMCEID0_EL0", (3, 3, 9, 12, 6), v, p, Trap::Tpm)
        .reg("PMCEID1_EL0", (3, 3, 9, 12, 7), v, p, Trap::Tpm)
        .reg("PMCCNTR_EL0", (3, 3, 9, 13, 0), v, p, Trap::Tpm)
        .reg("PMXEVTYPER_EL0", (3, 3, 9, 13, 1), v, p, Trap::Tpm)
        .reg("PMXEVCNTR_EL0", (3, 3, 9, 13, 2), v, p, Trap::Tpm)
        .reg("PMUSERENR_EL0", (3, 3, 9, 14, 0), v, p, Trap::Tpm)
        .reg("PMINTENSET_EL1", (3, 0, 9, 14, 1), v, p, Trap::Tpm)
        .reg("PMINTENCLR_EL1", (3, 0, 9, 14, 2), v, p, Trap::Tpm)
        .reg("PMOVSSET_EL0", (3, 3, 9, 14, 3), v, p, Trap::Tpm)
        .reg("PMMIR_EL1", (3, 0, 9, 14, 6), v, p, Trap::Tpm)
        .reg("PMCCFILTR_EL0", (3, 3, 14, 15, 7), v, p, Trap::Tpm);
    let mut n = 0;
    while n < 31 {
        let (crm, op2) = (n >> 3, n & 7);
        let c = Visibility::PmuCounter(n);
        b = b
            .push(SysReg {
                index: n,
                vis: c,
                ..Builder::one("PMEVCNTR<n>_EL0", (3, 3, 14, 8 | crm, op2), p, Trap::Tpm)
            })
            .push(SysReg {
                index: n,
                vis: c,
                ..Builder::one("PMEVTYPER<n>_EL0", (3, 3, 14, 12 | crm, op2), p, Trap::Tpm)
            });
        n += 1;
    }
    b
}

const fn timer_cache_gic_pauth(b: Builder) -> Builder {
    let t = H(Hook::Timer);
    let pk = Trap::ApkClear;
    b.reg(
        "CNTPCT_EL0",
        (3, 3, 14, 0, 1),
        Always,
        t,
        Trap::El1pctenClear,
    )
    .reg(
        "CNTPCTSS_EL0",
        (3, 3, 14, 0, 5),
        Always,
        t,
        Trap::El1pctenClear,
    )
    .reg(
        "CNTP_TVAL_EL0",
        (3, 3, 14, 2, 0),
        Always,
        t,
        Trap::El1pcenClear,
    )
    .reg(
        "CNTP_CTL_EL0",
        (3, 3, 14, 2, 1),
        Always,
        t,
        Trap::El1pcenClear,
    )
    .reg(
        "CNTP_CVAL_EL0",
        (3, 3, 14, 2, 2),
        Always,
        t,
        Trap::El1pcenClear,
    )
    .reg(
        "DC ISW",
        (1, 0, 7, 6, 2),
        Always,
        H(Hook::SetWay),
        Trap::Tsw,
    )
    .reg(
        "DC CSW",
        (1, 0, 7, 10, 2),
        Always,
        H(Hook::SetWay),
        Trap::Tsw,
    )
    .reg(
        "DC CISW",
        (1, 0, 7, 14, 2),
        Always,
        H(Hook::SetWay),
        Trap::Tsw,
    )
    .hidden("DC IGSW", (1, 0, 7, 6, 4), Trap::Tsw)
    .hidden("DC IGDSW", (1, 0, 7, 6, 6), Trap::Tsw)
    .hidden("DC CGSW", (1, 0, 7, 10, 4), Trap::Tsw)
    .hidden("DC CGDSW", (1, 0, 7, 10, 6), Trap::Tsw)
    .hidden("DC CIGSW", (1, 0, 7, 14, 4), Trap::Tsw)
    .hidden("DC CIGDSW", (1, 0, 7, 14, 6), Trap::Tsw)
    .reg(
        "ICC_SGI1R_EL1",
        (3, 0, 12, 11, 5),
        Always,
        H(Hook::Sgi),
        Trap::Imo,
    )
    .reg(
        "ICC_ASGI1R_EL1",
        (3, 0, 12, 11, 6),
        Always,
        H(Hook::Sgi),
        Trap::Imo,
    )
    .reg(
        "ICC_SGI0R_EL1",
        (3, 0, 12, 11, 7),
        Always,
        H(Hook::Sgi),
        Trap::Fmo,
    )
    // The keys are switched by the world switch when the VM has
    // pointer authentication (HCR_EL2.APK set, no trap); a trap means it
    // does not.
    .hidden("APIAKeyLo_EL1", (3, 0, 2, 1, 0), pk)
    .hidden("APIAKeyHi_EL1", (3, 0, 2, 1, 1), pk)
    .hidden("APIBKeyLo_EL1", (3, 0, 2, 1, 2), pk)
    .hidden("APIBKeyHi_EL1", (3, 0, 2, 1, 3), pk)
    .hidden("APDAKeyLo_EL1", (3, 0, 2, 2, 0), pk)
    .hidden("APDAKeyHi_EL1", (3, 0, 2, 2, 1), pk)
    .hidden("APDBKeyLo_EL1", (3, 0, 2, 2, 2), pk)
    .hidden("APDBKeyHi_EL1", (3, 0, 2, 2, 3), pk)
    .hidden("APGAKeyLo_EL1", (3, 0, 2, 3, 0), pk)
    .hidden("APGAKeyHi_EL1", (3, 0, 2, 3, 1), pk)
}

/// Features not virtualised: MTE, SME, SVE when not offered (switched
/// when offered), SPE, TRBE, self-hosted trace, RAS error records, LOR,
/// MPAM, SCXTNUM. Some registers of these features do not trap at all
/// without FEAT_FGT (`TPIDR2_EL0`, `SMPRI_EL1`, `PMBIDR_EL1`,
/// `TRBIDR_EL1`): they are in [`crate::SWITCHED`] instead.
const fn hidden_features(b: Builder) -> Builder {
    b.hidden("RGSR_EL1", (3, 0, 1, 0, 5), Trap::AtaClear)
        .hidden("GCR_EL1", (3, 0, 1, 0, 6), Trap::AtaClear)
        .hidden("TFSR_EL1", (3, 0, 5, 6, 0), Trap::AtaClear)
        .hidden("TFSRE0_EL1", (3, 0, 5, 6, 1), Trap::AtaClear)
        .hidden("ZCR_EL1", (3, 0, 1, 2, 0), Trap::Tz)
        .hidden("SMCR_EL1", (3, 0, 1, 2, 6), Trap::Tsm)
        .hidden("SVCR", (3, 3, 4, 2, 2), Trap::Tsm)
        .hidden("PMSCR_EL1", (3, 0, 9, 9, 0), Trap::Tpms)
        .hidden("PMSNEVFR_EL1", (3, 0, 9, 9, 1), Trap::Tpms)
        .hidden("PMSICR_EL1", (3, 0, 9, 9, 2), Trap::Tpms)
        .hidden("PMSIRR_EL1", (3, 0, 9, 9, 3), Trap::Tpms)
        .hidden("PMSFCR_EL1", (3, 0, 9, 9, 4), Trap::Tpms)
        .hidden("PMSEVFR_EL1", (3, 0, 9, 9, 5), Trap::Tpms)
        .hidden("PMSLATFR_EL1", (3, 0, 9, 9, 6), Trap::Tpms)
        .hidden("PMSIDR_EL1", (3, 0, 9, 9, 7), Trap::Tpms)
        .hidden("PMBLIMITR_EL1", (3, 0, 9, 10, 0), Trap::E2pb)
        .hidden("PMBPTR_EL1", (3, 0, 9, 10, 1), Trap::E2pb)
        .hidden("PMBSR_EL1", (3, 0, 9, 10, 3), Trap::E2pb)
        .hidden("TRBLIMITR_EL1", (3, 0, 9, 11, 0), Trap::E2tb)
        .hidden("TRBPTR_EL1", (3, 0, 9, 11, 1), Trap::E2tb)
        .hidden("TRBBASER_EL1", (3, 0, 9, 11, 2), Trap::E2tb)
        .hidden("TRBSR_EL1", (3, 0, 9, 11, 3), Trap::E2tb)
        .hidden("TRBMAR_EL1", (3, 0, 9, 11, 4), Trap::E2tb)
        .hidden("TRBTRG_EL1", (3, 0, 9, 11, 6), Trap::E2tb)
        .hidden("TRFCR_EL1", (3, 0, 1, 2, 1), Trap::Ttrf)
        .hidden("ERRIDR_EL1", (3, 0, 5, 3, 0), Trap::Terr)
        .hidden("ERRSELR_EL1", (3, 0, 5, 3, 1), Trap::Terr)
        .hidden("ERXFR_EL1", (3, 0, 5, 4, 0), Trap::Terr)
        .hidden("ERXCTLR_EL1", (3, 0, 5, 4, 1), Trap::Terr)
        .hidden("ERXSTATUS_EL1", (3, 0, 5, 4, 2), Trap::Terr)
        .hidden("ERXADDR_EL1", (3, 0, 5, 4, 3), Trap::Terr)
        .hidden("ERXPFGF_EL1", (3, 0, 5, 4, 4), Trap::Terr)
        .hidden("ERXPFGCTL_EL1", (3, 0, 5, 4, 5), Trap::Terr)
        .hidden("ERXPFGCDN_EL1", (3, 0, 5, 4, 6), Trap::Terr)
        .hidden("ERXMISC0_EL1", (3, 0, 5, 5, 0), Trap::Terr)
        .hidden("ERXMISC1_EL1", (3, 0, 5, 5, 1), Trap::Terr)
        .hidden("ERXMISC2_EL1", (3, 0, 5, 5, 2), Trap::Terr)
        .hidden("ERXMISC3_EL1", (3, 0, 5, 5, 3), Trap::Terr)
        .hidden("LORSA_EL1", (3, 0, 10, 4, 0), Trap::Tlor)
        .hidden("LOREA_EL1", (3, 0, 10, 4, 1), Trap::Tlor)
        .hidden("LORN_EL1", (3, 0, 10, 4, 2), Trap::Tlor)
        .hidden("LORC_EL1", (3, 0, 10, 4, 3), Trap::Tlor)
        .hidden("LORID_EL1", (3, 0, 10, 4, 7), Trap::Tlor)
        .hidden("MPAM1_EL1", (3, 0, 10, 5, 0), Trap::Mpam1)
        .hidden("MPAM0_EL1", (3, 0, 10, 5, 1), Trap::Mpam0)
        .hidden("SCXTNUM_EL1", (3, 0, 13, 0, 7), Trap::EnScxtClear)
        .hidden("SCXTNUM_EL0", (3, 3, 13, 0, 7), Trap::EnScxtClear)
}

/// Activity monitors (AMU): hidden, trapped by `CPTR_EL2.TAM`.
const fn amu(mut b: Builder) -> Builder {
    b = b
        .hidden("AMCR_EL0", (3, 3, 13, 2, 0), Trap::Tam)
        .hidden("AMCFGR_EL0", (3, 3, 13, 2, 1), Trap::Tam)
        .hidden("AMCGCR_EL0", (3, 3, 13, 2, 2), Trap::Tam)
        .hidden("AMUSERENR_EL0", (3, 3, 13, 2, 3), Trap::Tam)
        .hidden("AMCNTENCLR0_EL0", (3, 3, 13, 2, 4), Trap::Tam)
        .hidden("AMCNTENSET0_EL0", (3, 3, 13, 2, 5), Trap::Tam)
        .hidden("AMCG1IDR_EL0", (3, 3, 13, 2, 6), Trap::Tam)
        .hidden("AMCNTENCLR1_EL0", (3, 3, 13, 3, 0), Trap::Tam)
        .hidden("AMCNTENSET1_EL0", (3, 3, 13, 3, 1), Trap::Tam);
    let names = [
        "AMEVCNTR0<n>_EL0",
        "AMEVTYPER0<n>_EL0",
        "AMEVCNTR1<n>_EL0",
        "AMEVTYPER1<n>_EL0",
    ];
    let base = [4, 6, 12, 14];
    let mut k = 0;
    while k < 4 {
        let mut n = 0;
        while n < 16 {
            b = b.push(SysReg {
                index: n,
                vis: Hidden,
                ..Builder::one(
                    names[k],
                    (3, 3, 13, base[k] | (n >> 3), n & 7),
                    Handler::Undef,
                    Trap::Tam,
                )
            });
            n += 1;
        }
        k += 1;
    }
    b
}

const fn build() -> Builder {
    let b = Builder {
        rows: [PLACEHOLDER; MAX_ROWS],
        len: 0,
    };
    let b = amu(hidden_features(timer_cache_gic_pauth(pmu(debug(
        cache_and_ident(id_space(b)),
    )))));
    sort(b)
}

/// Insertion sort by packed encoding; a duplicate encoding fails the build.
const fn sort(mut b: Builder) -> Builder {
    let mut i = 1;
    while i < b.len {
        let mut j = i;
        while j > 0 && b.rows[j - 1].enc.packed() >= b.rows[j].enc.packed() {
            if b.rows[j - 1].enc.packed() == b.rows[j].enc.packed() {
                panic!("two system-register rows share an encoding");
            }
            let t = b.rows[j - 1];
            b.rows[j - 1] = b.rows[j];
            b.rows[j] = t;
            j -= 1;
        }
        i += 1;
    }
    b
}

/// Number of rows in [`REGISTERS`].
pub const REG_COUNT: usize = build().len;

const fn trim() -> [SysReg; REG_COUNT] {
    let b = build();
    let mut out = [PLACEHOLDER; REG_COUNT];
    let mut i = 0;
    while i < REG_COUNT {
        out[i] = b.rows[i];
        i += 1;
    }
    out
}

/// Every trappable register, sorted by encoding. Row indices are stable
/// for a build and index [`crate::VcpuSysregs`]' storage and trap counters.
pub static REGISTERS: [SysReg; REG_COUNT] = trim();

/// The row of `enc`, if the table has one (binary search).
pub fn lookup(enc: Encoding) -> Option<usize> {
    REGISTERS
        .binary_search_by_key(&enc.packed(), |r| r.enc.packed())
        .ok()
}
