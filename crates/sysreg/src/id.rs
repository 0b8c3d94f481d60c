//! ID registers: the host CPU's values, the per-VM sanitised view, and the
//! VM configuration that may lower fields further.
//!
//! Every ID register field the guest can see is listed in [`ID_FIELDS`] with
//! a [`Policy`]; a field that is not listed reads as zero (an allowlist: a
//! feature the architecture adds later is hidden until someone decides to
//! offer it). Fields are 4 bits wide; most are unsigned ("a higher value
//! means more"), a few are signed (`0xF` = not implemented, `0` = the base
//! feature), as the Arm ARM's "Principles of the ID scheme" (D19.1.3) says.
//! "Lower is safe" under the field's own ordering: a VM may be offered less
//! than the host, never more.

use core::fmt;

use crate::enc::Encoding;

/// The ID registers the sanitised view holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum IdReg {
    Pfr0,
    Pfr1,
    Pfr2,
    Zfr0,
    Smfr0,
    Fpfr0,
    Dfr0,
    Dfr1,
    Dfr2,
    Afr0,
    Afr1,
    Isar0,
    Isar1,
    Isar2,
    Isar3,
    Mmfr0,
    Mmfr1,
    Mmfr2,
    Mmfr3,
    Mmfr4,
    Midr,
    Revidr,
    Aidr,
    Ctr,
}

impl IdReg {
    /// Number of ID registers.
    pub const COUNT: usize = 24;
    /// Every ID register, in index order.
    pub const ALL: [IdReg; IdReg::COUNT] = [
        IdReg::Pfr0,
        IdReg::Pfr1,
        IdReg::Pfr2,
        IdReg::Zfr0,
        IdReg::Smfr0,
        IdReg::Fpfr0,
        IdReg::Dfr0,
        IdReg::Dfr1,
        IdReg::Dfr2,
        IdReg::Afr0,
        IdReg::Afr1,
        IdReg::Isar0,
        IdReg::Isar1,
        IdReg::Isar2,
        IdReg::Isar3,
        IdReg::Mmfr0,
        IdReg::Mmfr1,
        IdReg::Mmfr2,
        IdReg::Mmfr3,
        IdReg::Mmfr4,
        IdReg::Midr,
        IdReg::Revidr,
        IdReg::Aidr,
        IdReg::Ctr,
    ];

    /// Index into [`HostIds`] arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The architectural name.
    pub const fn name(self) -> &'static str {
        match self {
            IdReg::Pfr0 => "ID_AA64PFR0_EL1",
            IdReg::Pfr1 => "ID_AA64PFR1_EL1",
            IdReg::Pfr2 => "ID_AA64PFR2_EL1",
            IdReg::Zfr0 => "ID_AA64ZFR0_EL1",
            IdReg::Smfr0 => "ID_AA64SMFR0_EL1",
            IdReg::Fpfr0 => "ID_AA64FPFR0_EL1",
            IdReg::Dfr0 => "ID_AA64DFR0_EL1",
            IdReg::Dfr1 => "ID_AA64DFR1_EL1",
            IdReg::Dfr2 => "ID_AA64DFR2_EL1",
            IdReg::Afr0 => "ID_AA64AFR0_EL1",
            IdReg::Afr1 => "ID_AA64AFR1_EL1",
            IdReg::Isar0 => "ID_AA64ISAR0_EL1",
            IdReg::Isar1 => "ID_AA64ISAR1_EL1",
            IdReg::Isar2 => "ID_AA64ISAR2_EL1",
            IdReg::Isar3 => "ID_AA64ISAR3_EL1",
            IdReg::Mmfr0 => "ID_AA64MMFR0_EL1",
            IdReg::Mmfr1 => "ID_AA64MMFR1_EL1",
            IdReg::Mmfr2 => "ID_AA64MMFR2_EL1",
            IdReg::Mmfr3 => "ID_AA64MMFR3_EL1",
            IdReg::Mmfr4 => "ID_AA64MMFR4_EL1",
            IdReg::Midr => "MIDR_EL1",
            IdReg::Revidr => "REVIDR_EL1",
            IdReg::Aidr => "AIDR_EL1",
            IdReg::Ctr => "CTR_EL0",
        }
    }

    /// The register's encoding.
    pub const fn encoding(self) -> Encoding {
        let (op1, crm, op2) = match self {
            IdReg::Pfr0 => (0, 4, 0),
            IdReg::Pfr1 => (0, 4, 1),
            IdReg::Pfr2 => (0, 4, 2),
            IdReg::Zfr0 => (0, 4, 4),
            IdReg::Smfr0 => (0, 4, 5),
            IdReg::Fpfr0 => (0, 4, 7),
            IdReg::Dfr0 => (0, 5, 0),
            IdReg::Dfr1 => (0, 5, 1),
            IdReg::Dfr2 => (0, 5, 2),
            IdReg::Afr0 => (0, 5, 4),
            IdReg::Afr1 => (0, 5, 5),
            IdReg::Isar0 => (0, 6, 0),
            IdReg::Isar1 => (0, 6, 1),
            IdReg::Isar2 => (0, 6, 2),
            IdReg::Isar3 => (0, 6, 3),
            IdReg::Mmfr0 => (0, 7, 0),
            IdReg::Mmfr1 => (0, 7, 1),
            IdReg::Mmfr2 => (0, 7, 2),
            IdReg::Mmfr3 => (0, 7, 3),
            IdReg::Mmfr4 => (0, 7, 4),
            IdReg::Midr => (0, 0, 0),
            IdReg::Revidr => (0, 0, 6),
            IdReg::Aidr => (1, 0, 7),
            IdReg::Ctr => (3, 0, 1),
        };
        Encoding::new(3, op1, 0, crm, op2)
    }

    /// Registers passed through whole (identification, not features):
    /// MIDR (guests see it through `VPIDR_EL2`), REVIDR, AIDR and CTR.
    pub const fn is_passthrough(self) -> bool {
        matches!(self, IdReg::Midr | IdReg::Revidr | IdReg::Aidr | IdReg::Ctr)
    }
}

/// The host CPU's identification, read once at boot by the EL2 image (or
/// made up by the simulated tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostIds {
    regs: [u64; IdReg::COUNT],
    /// `PMCR_EL0.N`: event counters the CPU implements.
    pub pmu_counters: u8,
    /// The largest SVE vector length the CPU supports, in bytes (0 without SVE).
    pub sve_max_vl: u16,
}

impl Default for HostIds {
    fn default() -> Self {
        HostIds::new()
    }
}

impl HostIds {
    /// The largest vector length a VM may be given on this CPU, in bytes:
    /// the largest power of two of at most [`HostIds::sve_max_vl`] and
    /// [`SVE_VL_ARCH_MAX`] (the architecture makes every power-of-two length
    /// up to the maximum available; others need not be); 0 without SVE.
    pub const fn sve_vl_limit(&self) -> u16 {
        let max = if self.sve_max_vl < SVE_VL_ARCH_MAX {
            self.sve_max_vl
        } else {
            SVE_VL_ARCH_MAX
        };
        if max < 16 {
            0
        } else {
            1 << (15 - max.leading_zeros())
        }
    }

    /// All registers zero (a CPU with nothing optional).
    pub const fn new() -> HostIds {
        HostIds {
            regs: [0; IdReg::COUNT],
            pmu_counters: 0,
            sve_max_vl: 0,
        }
    }

    /// Sets one register's host value.
    pub fn set(&mut self, reg: IdReg, value: u64) -> &mut Self {
        self.regs[reg.index()] = value;
        self
    }

    /// One register's host value.
    pub const fn get(&self, reg: IdReg) -> u64 {
        self.regs[reg.index()]
    }

    /// Whether the host CPU implements `feature`.
    pub fn has(&self, feature: HostFeature) -> bool {
        feature.present(&self.regs)
    }
}

/// Features the trap policy and the sanitisation ask about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFeature {
    /// FEAT_SVE (`ID_AA64PFR0_EL1.SVE`).
    Sve,
    /// FEAT_SME (`ID_AA64PFR1_EL1.SME`).
    Sme,
    /// PMUv3 (`ID_AA64DFR0_EL1.PMUVer` 1..=14; 15 is an IMPLEMENTATION DEFINED PMU).
    Pmu,
    /// FEAT_PMUv3p1 (`PMUVer` >= 4): `MDCR_EL2.HPMD` exists.
    PmuV3p1,
    /// FEAT_PMUv3p5 (`PMUVer` >= 6): `MDCR_EL2.HCCD` exists.
    PmuV3p5,
    /// Any pointer authentication algorithm (`ID_AA64ISAR1/2_EL1` APA/API/GPA/GPI/APA3/GPA3).
    PAuth,
    /// FEAT_MTE2 (`ID_AA64PFR1_EL1.MTE` >= 2): `GMID_EL1` and `HCR_EL2.TID5`.
    Mte2,
    /// FEAT_SPE (`ID_AA64DFR0_EL1.PMSVer`).
    Spe,
    /// FEAT_TRBE (`ID_AA64DFR0_EL1.TraceBuffer`).
    Trbe,
    /// FEAT_TRF (`ID_AA64DFR0_EL1.TraceFilt`): `TRFCR_EL1`, `MDCR_EL2.TTRF`.
    TraceFilt,
    /// FEAT_AMUv1 (`ID_AA64PFR0_EL1.AMU`).
    Amu,
    /// FEAT_RAS (`ID_AA64PFR0_EL1.RAS`).
    Ras,
    /// FEAT_MPAM (`ID_AA64PFR0_EL1.MPAM` or `ID_AA64PFR1_EL1.MPAM_frac`).
    Mpam,
    /// FEAT_LOR (`ID_AA64MMFR1_EL1.LO`).
    Lor,
    /// FEAT_CCIDX (`ID_AA64MMFR2_EL1.CCIDX`): the 64-bit `CCSIDR_EL1` layout and `CCSIDR2_EL1`.
    Ccidx,
    /// FEAT_ECV (`ID_AA64MMFR0_EL1.ECV`): the self-synchronised counters `CNT*CTSS_EL0`.
    Ecv,
}

const fn field(v: u64, shift: u8) -> u8 {
    ((v >> shift) & 0xf) as u8
}

impl HostFeature {
    fn present(self, regs: &[u64; IdReg::COUNT]) -> bool {
        let r = |reg: IdReg| regs[reg.index()];
        match self {
            HostFeature::Sve => field(r(IdReg::Pfr0), 32) != 0,
            HostFeature::Sme => field(r(IdReg::Pfr1), 24) != 0,
            HostFeature::Pmu => matches!(field(r(IdReg::Dfr0), 8), 1..=14),
            HostFeature::PmuV3p1 => matches!(field(r(IdReg::Dfr0), 8), 4..=14),
            HostFeature::PmuV3p5 => matches!(field(r(IdReg::Dfr0), 8), 6..=14),
            HostFeature::PAuth => {
                let i1 = r(IdReg::Isar1);
                let i2 = r(IdReg::Isar2);
                field(i1, 4)
                    | field(i1, 8)
                    | field(i1, 24)
                    | field(i1, 28)
                    | field(i2, 8)
                    | field(i2, 12)
                    != 0
            }
            HostFeature::Mte2 => field(r(IdReg::Pfr1), 8) >= 2,
            HostFeature::Spe => field(r(IdReg::Dfr0), 32) != 0,
            HostFeature::Trbe => field(r(IdReg::Dfr0), 44) != 0,
            HostFeature::TraceFilt => field(r(IdReg::Dfr0), 40) != 0,
            HostFeature::Amu => field(r(IdReg::Pfr0), 44) != 0,
            HostFeature::Ras => field(r(IdReg::Pfr0), 28) != 0,
            HostFeature::Mpam => field(r(IdReg::Pfr0), 40) != 0 || field(r(IdReg::Pfr1), 16) != 0,
            HostFeature::Lor => field(r(IdReg::Mmfr1), 16) != 0,
            HostFeature::Ccidx => field(r(IdReg::Mmfr2), 20) != 0,
            HostFeature::Ecv => field(r(IdReg::Mmfr0), 60) != 0,
        }
    }
}

/// Features a VM may be offered (the VM configuration's choice, within
/// what the host has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// SVE, with a maximum vector length.
    Sve,
    /// A virtual PMUv3.
    Pmu,
    /// Pointer authentication (keys switched by the world switch).
    PAuth,
}

/// How a field's VM value follows from the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The host's value.
    Host,
    /// The host's value, capped (under the field's ordering) at this one.
    Cap(u8),
    /// The host's value when the VM is offered the feature, else hidden.
    IfOffered(Offer),
    /// The PMU version: the host's capped at [`PMU_EMULATED_MAX`] when the
    /// VM is offered a PMU; hidden otherwise (also for an IMPLEMENTATION
    /// DEFINED host PMU, `0xF`).
    PmuVer,
    /// Always the "not implemented" value (listed because the field is
    /// signed: its hidden value is `0xF`, not the zero an unlisted field gets).
    Hidden,
}

/// The highest PMU version the virtual PMU claims: PMUv3 for Armv8.4 (`0b0101`).
pub const PMU_EMULATED_MAX: u8 = 0b0101;
/// The debug architecture the virtual debug registers implement: Armv8.0 (`0b0110`).
pub const DEBUG_EMULATED: u8 = 0b0110;

/// One 4-bit ID register field the guest may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdField {
    /// The register.
    pub reg: IdReg,
    /// "REGISTER.FIELD", e.g. `ID_AA64PFR0_EL1.SVE`.
    pub name: &'static str,
    /// Bit position of the field's least significant bit.
    pub shift: u8,
    /// Signed field: `0xF` is "not implemented", lower values mean less
    /// under two's-complement ordering.
    pub signed: bool,
    /// How the VM's value follows from the host's.
    pub policy: Policy,
    /// The lowest value a VM configuration may ask for (DebugVer: Armv8.0).
    pub min: u8,
}

const fn f(reg: IdReg, name: &'static str, shift: u8, policy: Policy) -> IdField {
    IdField {
        reg,
        name,
        shift,
        signed: false,
        policy,
        min: 0,
    }
}

const fn s(reg: IdReg, name: &'static str, shift: u8, policy: Policy) -> IdField {
    IdField {
        reg,
        name,
        shift,
        signed: true,
        policy,
        min: 0,
    }
}

use IdReg::*;
use Policy::{Cap, Host, IfOffered};

/// Every ID register field a guest may see, with its policy. Fields of the
/// `ID_AA64*` registers not listed here read as zero: that hides, among
/// others, EL2/EL3 (no nested virtualisation), RAS, MPAM, AMU, RME, SEL2,
/// MTE, SME, NMI, GCS, SPE (`PMSVer`), TRBE, trace (`TraceVer`,
/// `TraceFilt`), BRBE, TME, LS64, MOPS, WFxT, LOR, VH, FGT, HCX, NV, FWB
/// and EVT.
pub const ID_FIELDS: &[IdField] = &[
    // ID_AA64PFR0_EL1.
    f(Pfr0, "ID_AA64PFR0_EL1.EL0", 0, Cap(1)),
    f(Pfr0, "ID_AA64PFR0_EL1.EL1", 4, Cap(1)),
    s(Pfr0, "ID_AA64PFR0_EL1.FP", 16, Host),
    s(Pfr0, "ID_AA64PFR0_EL1.AdvSIMD", 20, Host),
    f(Pfr0, "ID_AA64PFR0_EL1.GIC", 24, Cap(1)),
    f(Pfr0, "ID_AA64PFR0_EL1.SVE", 32, IfOffered(Offer::Sve)),
    f(Pfr0, "ID_AA64PFR0_EL1.DIT", 48, Host),
    f(Pfr0, "ID_AA64PFR0_EL1.CSV2", 56, Cap(1)),
    f(Pfr0, "ID_AA64PFR0_EL1.CSV3", 60, Host),
    // ID_AA64PFR1_EL1.
    f(Pfr1, "ID_AA64PFR1_EL1.BT", 0, Host),
    f(Pfr1, "ID_AA64PFR1_EL1.SSBS", 4, Host),
    // ID_AA64ZFR0_EL1: only with SVE.
    f(Zfr0, "ID_AA64ZFR0_EL1.SVEver", 0, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.AES", 4, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.BitPerm", 16, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.BF16", 20, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.SHA3", 32, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.SM4", 40, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.I8MM", 44, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.F32MM", 52, IfOffered(Offer::Sve)),
    f(Zfr0, "ID_AA64ZFR0_EL1.F64MM", 56, IfOffered(Offer::Sve)),
    // ID_AA64DFR0_EL1.
    IdField {
        min: DEBUG_EMULATED,
        ..f(Dfr0, "ID_AA64DFR0_EL1.DebugVer", 0, Cap(DEBUG_EMULATED))
    },
    f(Dfr0, "ID_AA64DFR0_EL1.PMUVer", 8, Policy::PmuVer),
    f(Dfr0, "ID_AA64DFR0_EL1.BRPs", 12, Host),
    f(Dfr0, "ID_AA64DFR0_EL1.WRPs", 20, Host),
    f(Dfr0, "ID_AA64DFR0_EL1.CTX_CMPs", 28, Host),
    s(Dfr0, "ID_AA64DFR0_EL1.DoubleLock", 36, Policy::Hidden),
    s(Dfr0, "ID_AA64DFR0_EL1.MTPMU", 48, Policy::Hidden),
    // ID_AA64ISAR0_EL1.
    f(Isar0, "ID_AA64ISAR0_EL1.AES", 4, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.SHA1", 8, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.SHA2", 12, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.CRC32", 16, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.Atomic", 20, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.RDM", 28, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.SHA3", 32, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.SM3", 36, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.SM4", 40, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.DP", 44, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.FHM", 48, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.TS", 52, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.TLB", 56, Host),
    f(Isar0, "ID_AA64ISAR0_EL1.RNDR", 60, Host),
    // ID_AA64ISAR1_EL1.
    f(Isar1, "ID_AA64ISAR1_EL1.DPB", 0, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.APA", 4, IfOffered(Offer::PAuth)),
    f(Isar1, "ID_AA64ISAR1_EL1.API", 8, IfOffered(Offer::PAuth)),
    f(Isar1, "ID_AA64ISAR1_EL1.JSCVT", 12, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.FCMA", 16, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.LRCPC", 20, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.GPA", 24, IfOffered(Offer::PAuth)),
    f(Isar1, "ID_AA64ISAR1_EL1.GPI", 28, IfOffered(Offer::PAuth)),
    f(Isar1, "ID_AA64ISAR1_EL1.FRINTTS", 32, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.SB", 36, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.SPECRES", 40, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.BF16", 44, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.DGH", 48, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.I8MM", 52, Host),
    f(Isar1, "ID_AA64ISAR1_EL1.XS", 56, Host),
    // ID_AA64ISAR2_EL1.
    f(Isar2, "ID_AA64ISAR2_EL1.RPRES", 4, Host),
    f(Isar2, "ID_AA64ISAR2_EL1.GPA3", 8, IfOffered(Offer::PAuth)),
    f(Isar2, "ID_AA64ISAR2_EL1.APA3", 12, IfOffered(Offer::PAuth)),
    f(Isar2, "ID_AA64ISAR2_EL1.BC", 20, Host),
    f(
        Isar2,
        "ID_AA64ISAR2_EL1.PAC_frac",
        24,
        IfOffered(Offer::PAuth),
    ),
    f(Isar2, "ID_AA64ISAR2_EL1.CLRBHB", 28, Host),
    f(Isar2, "ID_AA64ISAR2_EL1.RPRFM", 48, Host),
    f(Isar2, "ID_AA64ISAR2_EL1.CSSC", 52, Host),
    // ID_AA64MMFR0_EL1.
    f(Mmfr0, "ID_AA64MMFR0_EL1.PARange", 0, Host),
    f(Mmfr0, "ID_AA64MMFR0_EL1.ASIDBits", 4, Host),
    f(Mmfr0, "ID_AA64MMFR0_EL1.BigEnd", 8, Host),
    f(Mmfr0, "ID_AA64MMFR0_EL1.BigEndEL0", 16, Host),
    f(Mmfr0, "ID_AA64MMFR0_EL1.TGran16", 20, Host),
    s(Mmfr0, "ID_AA64MMFR0_EL1.TGran64", 24, Host),
    s(Mmfr0, "ID_AA64MMFR0_EL1.TGran4", 28, Host),
    f(Mmfr0, "ID_AA64MMFR0_EL1.ExS", 44, Host),
    f(Mmfr0, "ID_AA64MMFR0_EL1.ECV", 60, Cap(1)),
    // ID_AA64MMFR1_EL1.
    f(Mmfr1, "ID_AA64MMFR1_EL1.HAFDBS", 0, Host),
    f(Mmfr1, "ID_AA64MMFR1_EL1.HPDS", 12, Host),
    f(Mmfr1, "ID_AA64MMFR1_EL1.PAN", 20, Host),
    f(Mmfr1, "ID_AA64MMFR1_EL1.ETS", 36, Host),
    f(Mmfr1, "ID_AA64MMFR1_EL1.AFP", 44, Host),
    f(Mmfr1, "ID_AA64MMFR1_EL1.nTLBPA", 48, Host),
    f(Mmfr1, "ID_AA64MMFR1_EL1.CMOW", 56, Host),
    // ID_AA64MMFR2_EL1.
    f(Mmfr2, "ID_AA64MMFR2_EL1.CnP", 0, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.UAO", 4, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.LSM", 8, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.IESB", 12, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.VARange", 16, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.CCIDX", 20, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.ST", 28, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.AT", 32, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.IDS", 36, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.TTL", 48, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.BBM", 52, Host),
    f(Mmfr2, "ID_AA64MMFR2_EL1.E0PD", 60, Host),
];

/// Number of rows in [`ID_FIELDS`].
pub const ID_FIELD_COUNT: usize = ID_FIELDS.len();

impl IdField {
    /// The field's value in a register value.
    pub const fn get(&self, reg_value: u64) -> u8 {
        field(reg_value, self.shift)
    }

    /// The value meaning "not implemented".
    pub const fn hidden(&self) -> u8 {
        if self.signed {
            0xf
        } else {
            0
        }
    }

    /// The field's ordering key: signed fields compare as 4-bit two's complement.
    pub const fn rank(&self, v: u8) -> i8 {
        if self.signed {
            (((v & 0xf) << 4) as i8) >> 4
        } else {
            (v & 0xf) as i8
        }
    }

    /// `min(a, b)` under the field's ordering.
    pub const fn lower(&self, a: u8, b: u8) -> u8 {
        if self.rank(a) <= self.rank(b) {
            a
        } else {
            b
        }
    }

    /// The field's index in [`ID_FIELDS`], by name.
    pub fn index_of(name: &str) -> Option<usize> {
        ID_FIELDS.iter().position(|f| f.name == name)
    }
}

/// Why a VM configuration's ID view was refused. Always the VM
/// configuration's fault (the host's user), never the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdError {
    /// No field of that name in [`ID_FIELDS`] (not overridable or misspelt).
    UnknownField,
    /// A field value wider than 4 bits.
    ValueTooWide {
        /// The field.
        field: &'static str,
        /// What was asked.
        requested: u8,
    },
    /// The configuration asks for more than the host (or the hypervisor) offers.
    AboveHost {
        /// The field.
        field: &'static str,
        /// What was asked.
        requested: u8,
        /// The most this VM can have.
        allowed: u8,
    },
    /// A reserved value of a signed field (`0x8..=0xE`; only `0xF`, "not
    /// implemented", is negative).
    Reserved {
        /// The field.
        field: &'static str,
        /// What was asked.
        requested: u8,
    },
    /// The configuration asks for less than the architecture allows.
    BelowMinimum {
        /// The field.
        field: &'static str,
        /// What was asked.
        requested: u8,
        /// The architectural minimum.
        min: u8,
    },
    /// Two fields contradict each other (e.g. more context-aware
    /// breakpoints than breakpoints).
    Inconsistent {
        /// The field that is too large.
        field: &'static str,
        /// The field it must not exceed.
        limit: &'static str,
    },
    /// The VM is offered a feature the host CPU lacks.
    NotOnHost {
        /// The feature, e.g. "SVE".
        feature: &'static str,
    },
    /// The SVE vector length (`sve_max_vl`) is not a power-of-two multiple
    /// of 16 bytes in 16..=256, or exceeds what the host CPU supports.
    SveVectorLength {
        /// What was asked, in bytes.
        requested: u16,
        /// The largest the host allows, in bytes ([`HostIds::sve_vl_limit`]).
        host_max: u16,
    },
    /// More PMU event counters than the host has.
    PmuCounters {
        /// What was asked.
        requested: u8,
        /// The host's `PMCR_EL0.N`.
        host: u8,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IdError::UnknownField => write!(f, "VM configuration: unknown ID register field"),
            IdError::ValueTooWide { field, requested } => write!(
                f,
                "VM configuration: {field} = {requested:#x} does not fit a 4-bit field"
            ),
            IdError::AboveHost {
                field,
                requested,
                allowed,
            } => write!(
                f,
                "VM configuration: {field} = {requested:#x} is more than this host offers (at most {allowed:#x})"
            ),
            IdError::Reserved { field, requested } => write!(
                f,
                "VM configuration: {field} = {requested:#x} is a reserved value"
            ),
            IdError::BelowMinimum {
                field,
                requested,
                min,
            } => write!(
                f,
                "VM configuration: {field} = {requested:#x} is below the architectural minimum {min:#x}"
            ),
            IdError::Inconsistent { field, limit } => {
                write!(f, "VM configuration: {field} exceeds {limit}")
            }
            IdError::NotOnHost { feature } => {
                write!(f, "VM configuration: {feature} is offered but the host CPU lacks it")
            }
            IdError::SveVectorLength {
                requested,
                host_max,
            } if !(requested.is_power_of_two() && requested >= 16) => write!(
                f,
                "VM configuration: sve_max_vl = {requested} bytes is not a power-of-two multiple of 16 bytes in 16..={SVE_VL_ARCH_MAX} (this CPU: at most {host_max})"
            ),
            IdError::SveVectorLength {
                requested,
                host_max,
            } => write!(
                f,
                "VM configuration: sve_max_vl = {requested} bytes is more than this CPU supports (at most {host_max} bytes)"
            ),
            IdError::PmuCounters { requested, host } => write!(
                f,
                "VM configuration: {requested} PMU event counters, the host has {host}"
            ),
        }
    }
}

/// The VM configuration's say over its ID view: which optional features it
/// is offered, and fields lowered below the default view (like KVM's
/// writable ID registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdOverrides {
    /// SVE with this maximum vector length in bytes; `None`: SVE not offered.
    pub sve_max_vl: Option<u16>,
    /// A virtual PMU.
    pub pmu: bool,
    /// PMU event counters (`PMCR_EL0.N`); `None`: as many as the host has.
    pub pmu_counters: Option<u8>,
    /// Pointer authentication when the host has it (default on).
    pub pauth: bool,
    fields: [Option<u8>; ID_FIELD_COUNT],
}

impl Default for IdOverrides {
    fn default() -> Self {
        IdOverrides::new()
    }
}

impl IdOverrides {
    /// No SVE, no PMU, pointer authentication as the host has it, no field lowered.
    pub const fn new() -> IdOverrides {
        IdOverrides {
            sve_max_vl: None,
            pmu: false,
            pmu_counters: None,
            pauth: true,
            fields: [None; ID_FIELD_COUNT],
        }
    }

    /// Offers SVE with a maximum vector length of `vl_bytes` (checked by
    /// [`VmFeatures::new`]: a power-of-two multiple of 16 bytes the host
    /// supports).
    pub const fn with_sve(mut self, vl_bytes: u16) -> Self {
        self.sve_max_vl = Some(vl_bytes);
        self
    }

    /// Offers SVE with the largest vector length `host` allows
    /// ([`HostIds::sve_vl_limit`]); refused by [`VmFeatures::new`] when the
    /// host has no SVE.
    pub const fn with_sve_host_max(self, host: &HostIds) -> Self {
        self.with_sve(host.sve_vl_limit())
    }

    /// Offers a virtual PMU.
    pub const fn with_pmu(mut self) -> Self {
        self.pmu = true;
        self
    }

    /// Limits the virtual PMU to `n` event counters.
    pub const fn with_pmu_counters(mut self, n: u8) -> Self {
        self.pmu_counters = Some(n);
        self
    }

    /// Withholds pointer authentication.
    pub const fn without_pauth(mut self) -> Self {
        self.pauth = false;
        self
    }

    /// Asks for `value` in the field named `name` (e.g.
    /// `"ID_AA64ISAR0_EL1.AES"`). Checked against the host by [`VmFeatures::new`].
    ///
    /// # Errors
    /// [`IdError::UnknownField`] for a name not in [`ID_FIELDS`];
    /// [`IdError::ValueTooWide`] for a value over `0xF`.
    pub fn set(&mut self, name: &str, value: u8) -> Result<&mut Self, IdError> {
        let i = IdField::index_of(name).ok_or(IdError::UnknownField)?;
        if value > 0xf {
            return Err(IdError::ValueTooWide {
                field: ID_FIELDS[i].name,
                requested: value,
            });
        }
        self.fields[i] = Some(value);
        Ok(self)
    }

    /// The value asked for field `index` of [`ID_FIELDS`], if any.
    pub fn get(&self, index: usize) -> Option<u8> {
        self.fields.get(index).copied().flatten()
    }
}

/// What one VM sees: its sanitised ID registers and the optional features
/// it was offered. Immutable once made; shared by all the VM's vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmFeatures {
    host: HostIds,
    view: [u64; IdReg::COUNT],
    sve_max_vl: Option<u16>,
    pmu_counters: u8,
}

/// The largest SVE vector length the architecture allows, in bytes.
pub const SVE_VL_ARCH_MAX: u16 = 256;

/// Whether `vl` bytes is a vector length a VM may have on some CPU: a
/// power-of-two multiple of 16 bytes, at most [`SVE_VL_ARCH_MAX`].
const fn sve_vl_well_formed(vl: u16) -> bool {
    vl.is_power_of_two() && vl >= 16 && vl <= SVE_VL_ARCH_MAX
}

impl VmFeatures {
    /// Computes a VM's view from the host's ID registers and its configuration.
    ///
    /// # Errors
    /// An [`IdError`] naming the field (or feature) when the configuration
    /// asks for more than the host has, for less than the architecture
    /// allows, or for contradictory values. Nothing is created on error.
    pub fn new(host: &HostIds, cfg: &IdOverrides) -> Result<VmFeatures, IdError> {
        if let Some(vl) = cfg.sve_max_vl {
            if !host.has(HostFeature::Sve) {
                return Err(IdError::NotOnHost { feature: "SVE" });
            }
            if !sve_vl_well_formed(vl) || vl > host.sve_vl_limit() {
                return Err(IdError::SveVectorLength {
                    requested: vl,
                    host_max: host.sve_vl_limit(),
                });
            }
        }
        if cfg.pmu && !host.has(HostFeature::Pmu) {
            return Err(IdError::NotOnHost { feature: "PMUv3" });
        }
        let offered = |o: Offer| match o {
            Offer::Sve => cfg.sve_max_vl.is_some(),
            Offer::Pmu => cfg.pmu,
            Offer::PAuth => cfg.pauth,
        };
        let mut view = [0u64; IdReg::COUNT];
        for r in IdReg::ALL {
            if r.is_passthrough() {
                view[r.index()] = host.get(r);
            }
        }
        for (i, fd) in ID_FIELDS.iter().enumerate() {
            let h = fd.get(host.get(fd.reg));
            let allowed = match fd.policy {
                Policy::Host => h,
                Policy::Cap(c) => fd.lower(h, c),
                Policy::IfOffered(o) if offered(o) => h,
                Policy::IfOffered(_) | Policy::Hidden => fd.hidden(),
                Policy::PmuVer if cfg.pmu && matches!(h, 1..=14) => h.min(PMU_EMULATED_MAX),
                Policy::PmuVer => 0,
            };
            let v = match cfg.get(i) {
                None => allowed,
                Some(req) => check_request(fd, req, allowed)?,
            };
            view[fd.reg.index()] |= (v as u64) << fd.shift;
        }
        let mut vm = VmFeatures {
            host: *host,
            view,
            sve_max_vl: cfg.sve_max_vl,
            pmu_counters: 0,
        };
        vm.finish(host, cfg)?;
        Ok(vm)
    }

    /// Cross-field rules and the features that follow from the final view.
    fn finish(&mut self, host: &HostIds, cfg: &IdOverrides) -> Result<(), IdError> {
        let dfr0 = self.id(IdReg::Dfr0);
        if field(dfr0, 28) > field(dfr0, 12) {
            return Err(IdError::Inconsistent {
                field: "ID_AA64DFR0_EL1.CTX_CMPs",
                limit: "ID_AA64DFR0_EL1.BRPs",
            });
        }
        // SVE lowered away by a field override: no SVE at all.
        if field(self.id(IdReg::Pfr0), 32) == 0 {
            self.sve_max_vl = None;
            self.view[IdReg::Zfr0.index()] = 0;
        }
        if self.has(Offer::Pmu) {
            let n = host.pmu_counters.min(31);
            self.pmu_counters = match cfg.pmu_counters {
                None => n,
                Some(req) if req <= n => req,
                Some(req) => {
                    return Err(IdError::PmuCounters {
                        requested: req,
                        host: host.pmu_counters,
                    })
                }
            };
        }
        Ok(())
    }

    /// The sanitised value of an ID register.
    pub const fn id(&self, reg: IdReg) -> u64 {
        self.view[reg.index()]
    }

    /// The host CPU's identification this view was made from.
    pub const fn host(&self) -> &HostIds {
        &self.host
    }

    /// Whether the VM has `offer` in its final view.
    pub fn has(&self, offer: Offer) -> bool {
        match offer {
            Offer::Sve => self.sve_max_vl.is_some(),
            Offer::Pmu => field(self.id(IdReg::Dfr0), 8) != 0,
            Offer::PAuth => HostFeature::PAuth.present(&self.view),
        }
    }

    /// The VM's maximum SVE vector length in bytes, when it has SVE.
    pub const fn sve_max_vl(&self) -> Option<u16> {
        self.sve_max_vl
    }

    /// `ZCR_EL2.LEN` for this VM (vector length in quadwords minus one),
    /// when it has SVE.
    pub fn zcr_el2_len(&self) -> Option<u64> {
        self.sve_max_vl.map(|vl| u64::from(vl / 16 - 1))
    }

    /// The virtual PMU's event counters (`PMCR_EL0.N`; 0 without a PMU).
    pub const fn pmu_counters(&self) -> u8 {
        self.pmu_counters
    }

    /// Breakpoints the VM has (`BRPs + 1`).
    pub const fn breakpoints(&self) -> u8 {
        field(self.id(IdReg::Dfr0), 12) + 1
    }

    /// Watchpoints the VM has (`WRPs + 1`).
    pub const fn watchpoints(&self) -> u8 {
        field(self.id(IdReg::Dfr0), 20) + 1
    }

    /// The VM's `CLIDR_EL1`: one level of unified cache, so that set/way
    /// loops (trapped anyway, `HCR_EL2.TSW`) are one operation. The Level
    /// of Unification is 0 when `CTR_EL0.IDC` says no cleaning is needed
    /// for instruction/data coherence, else 1; the Level of Coherence is 1.
    pub const fn clidr(&self) -> u64 {
        let idc = (self.id(IdReg::Ctr) >> 28) & 1 != 0;
        let lou = if idc { 0 } else { 1 };
        0b100 | (lou << 21) | (1 << 24) | (lou << 27)
    }

    /// The VM's `CCSIDR_EL1` for a `CSSELR_EL1` value: level 1 (the only
    /// one, unified) has one set of one way with the `CTR_EL0.DminLine`
    /// line size; anything else is an unimplemented cache and reads 0.
    pub const fn ccsidr(&self, csselr: u64) -> u64 {
        if csselr & 0xf != 0 {
            return 0; // not (Level 1, data or unified)
        }
        let dminline = (self.id(IdReg::Ctr) >> 16) & 0xf; // log2(words)
                                                          // LineSize = log2(bytes) - 4 = DminLine + 2 - 4; at least 16 bytes.
        dminline.saturating_sub(2)
    }
}

fn check_request(fd: &IdField, req: u8, allowed: u8) -> Result<u8, IdError> {
    if fd.signed && (0x8..=0xe).contains(&req) {
        return Err(IdError::Reserved {
            field: fd.name,
            requested: req,
        });
    }
    if fd.rank(req) > fd.rank(allowed) {
        return Err(IdError::AboveHost {
            field: fd.name,
            requested: req,
            allowed,
        });
    }
    if fd.min != 0 && fd.rank(req) < fd.rank(fd.min) {
        return Err(IdError::BelowMinimum {
            field: fd.name,
            requested: req,
            min: fd.min,
        });
    }
    Ok(req)
}
