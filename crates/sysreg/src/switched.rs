//! The registers a guest uses directly, without a trap: the world switch
//! saves and restores them (or an EL2 register stands in for them). Every
//! EL0/EL1 register is either here or in [`crate::REGISTERS`]
//! (trapped), which `tests/register_list.rs` checks against its own list
//! of the architecture's registers.

use crate::enc::Encoding;
use crate::id::{HostFeature, Offer};

/// How a register's per-vCPU value reaches the hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Saved at exit and restored at entry by the world switch.
    WorldSwitch,
    /// The guest reaches a virtual copy held in (or offset by) this EL2
    /// register, which the world switch loads per vCPU or per VM.
    El2Register(&'static str),
    /// The GICv3 CPU interface's virtual registers (`ICV_*`, backed by the
    /// `ICH_*_EL2` list registers and `ICH_VMCR_EL2`), switched with the vGIC state.
    GicCpuInterface,
    /// Read-only and identical on every CPU (`CNTFRQ_EL0`, `DCZID_EL0`):
    /// nothing to switch, nothing to hide.
    Constant,
    /// Read-only, answered by the CPU itself: no coarse EL2 control traps
    /// it (only FEAT_FGT, which is left out), and what it shows tells the
    /// guest nothing usable (`PMBIDR_EL1.P`/`TRBIDR_EL1.P` read 1:
    /// "programming not allowed", the buffers belong to EL2).
    HostReadOnly,
}

/// When an entry applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Always.
    Always,
    /// Only for a VM offered the feature (otherwise the register traps to
    /// its table row and UNDEFs).
    Offered(Offer),
    /// Only on a host with the feature (otherwise the register does not exist).
    Host(HostFeature),
}

/// One directly accessible register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switched {
    /// Architectural name.
    pub name: &'static str,
    /// Encoding.
    pub enc: Encoding,
    /// How it is switched.
    pub via: Via,
    /// When this applies.
    pub when: When,
}

const fn ws(name: &'static str, e: (u8, u8, u8, u8, u8)) -> Switched {
    Switched {
        name,
        enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
        via: Via::WorldSwitch,
        when: When::Always,
    }
}

const fn via(name: &'static str, e: (u8, u8, u8, u8, u8), via: Via) -> Switched {
    Switched { via, ..ws(name, e) }
}

const fn offered(name: &'static str, e: (u8, u8, u8, u8, u8), o: Offer) -> Switched {
    Switched {
        when: When::Offered(o),
        ..ws(name, e)
    }
}

const GIC: Via = Via::GicCpuInterface;

/// Every register a guest accesses without trapping.
pub const SWITCHED: &[Switched] = &[
    // EL1 translation and exception context.
    ws("SCTLR_EL1", (3, 0, 1, 0, 0)),
    ws("CPACR_EL1", (3, 0, 1, 0, 2)),
    ws("TTBR0_EL1", (3, 0, 2, 0, 0)),
    ws("TTBR1_EL1", (3, 0, 2, 0, 1)),
    ws("TCR_EL1", (3, 0, 2, 0, 2)),
    ws("SPSR_EL1", (3, 0, 4, 0, 0)),
    ws("ELR_EL1", (3, 0, 4, 0, 1)),
    ws("SP_EL0", (3, 0, 4, 1, 0)),
    ws("AFSR0_EL1", (3, 0, 5, 1, 0)),
    ws("AFSR1_EL1", (3, 0, 5, 1, 1)),
    ws("ESR_EL1", (3, 0, 5, 2, 0)),
    ws("FAR_EL1", (3, 0, 6, 0, 0)),
    ws("PAR_EL1", (3, 0, 7, 4, 0)),
    ws("MAIR_EL1", (3, 0, 10, 2, 0)),
    ws("AMAIR_EL1", (3, 0, 10, 3, 0)),
    ws("VBAR_EL1", (3, 0, 12, 0, 0)),
    ws("CONTEXTIDR_EL1", (3, 0, 13, 0, 1)),
    ws("TPIDR_EL1", (3, 0, 13, 0, 4)),
    ws("CNTKCTL_EL1", (3, 0, 14, 1, 0)),
    ws("TPIDR_EL0", (3, 3, 13, 0, 2)),
    ws("TPIDRRO_EL0", (3, 3, 13, 0, 3)),
    ws("FPCR", (3, 3, 4, 4, 0)),
    ws("FPSR", (3, 3, 4, 4, 1)),
    // Optional state the VM may be offered.
    offered("ZCR_EL1", (3, 0, 1, 2, 0), Offer::Sve),
    offered("APIAKeyLo_EL1", (3, 0, 2, 1, 0), Offer::PAuth),
    offered("APIAKeyHi_EL1", (3, 0, 2, 1, 1), Offer::PAuth),
    offered("APIBKeyLo_EL1", (3, 0, 2, 1, 2), Offer::PAuth),
    offered("APIBKeyHi_EL1", (3, 0, 2, 1, 3), Offer::PAuth),
    offered("APDAKeyLo_EL1", (3, 0, 2, 2, 0), Offer::PAuth),
    offered("APDAKeyHi_EL1", (3, 0, 2, 2, 1), Offer::PAuth),
    offered("APDBKeyLo_EL1", (3, 0, 2, 2, 2), Offer::PAuth),
    offered("APDBKeyHi_EL1", (3, 0, 2, 2, 3), Offer::PAuth),
    offered("APGAKeyLo_EL1", (3, 0, 2, 3, 0), Offer::PAuth),
    offered("APGAKeyHi_EL1", (3, 0, 2, 3, 1), Offer::PAuth),
    // SME state that no coarse control traps (CPTR_EL2.TSM does not cover
    // them): switched on an SME host even though SME is never offered.
    Switched {
        when: When::Host(HostFeature::Sme),
        ..ws("SMPRI_EL1", (3, 0, 1, 2, 4))
    },
    Switched {
        when: When::Host(HostFeature::Sme),
        ..ws("TPIDR2_EL0", (3, 3, 13, 0, 5))
    },
    // Profiling/trace buffer identification, readable at EL1 without FGT.
    Switched {
        when: When::Host(HostFeature::Spe),
        ..via("PMBIDR_EL1", (3, 0, 9, 10, 7), Via::HostReadOnly)
    },
    Switched {
        when: When::Host(HostFeature::Trbe),
        ..via("TRBIDR_EL1", (3, 0, 9, 11, 7), Via::HostReadOnly)
    },
    // The virtual timer: direct, its state switched, one CNTVOFF_EL2 per VM.
    ws("CNTV_CTL_EL0", (3, 3, 14, 3, 1)),
    ws("CNTV_CVAL_EL0", (3, 3, 14, 3, 2)),
    via(
        "CNTV_TVAL_EL0",
        (3, 3, 14, 3, 0),
        Via::El2Register("CNTVOFF_EL2"),
    ),
    via(
        "CNTVCT_EL0",
        (3, 3, 14, 0, 2),
        Via::El2Register("CNTVOFF_EL2"),
    ),
    Switched {
        when: When::Host(HostFeature::Ecv),
        ..via(
            "CNTVCTSS_EL0",
            (3, 3, 14, 0, 6),
            Via::El2Register("CNTVOFF_EL2"),
        )
    },
    via("CNTFRQ_EL0", (3, 3, 14, 0, 0), Via::Constant),
    via("DCZID_EL0", (3, 3, 0, 0, 7), Via::Constant),
    // Identification with an EL2 stand-in.
    via("MIDR_EL1", (3, 0, 0, 0, 0), Via::El2Register("VPIDR_EL2")),
    via("MPIDR_EL1", (3, 0, 0, 0, 5), Via::El2Register("VMPIDR_EL2")),
    // With HCR_EL2.AMO set, EL1 accesses to DISR_EL1 reach VDISR_EL2.
    Switched {
        when: When::Host(HostFeature::Ras),
        ..via("DISR_EL1", (3, 0, 12, 1, 1), Via::El2Register("VDISR_EL2"))
    },
    // The GICv3 CPU interface (virtual with HCR_EL2.IMO/FMO set).
    via("ICC_PMR_EL1", (3, 0, 4, 6, 0), GIC),
    via("ICC_IAR0_EL1", (3, 0, 12, 8, 0), GIC),
    via("ICC_EOIR0_EL1", (3, 0, 12, 8, 1), GIC),
    via("ICC_HPPIR0_EL1", (3, 0, 12, 8, 2), GIC),
    via("ICC_BPR0_EL1", (3, 0, 12, 8, 3), GIC),
    via("ICC_AP0R0_EL1", (3, 0, 12, 8, 4), GIC),
    via("ICC_AP0R1_EL1", (3, 0, 12, 8, 5), GIC),
    via("ICC_AP0R2_EL1", (3, 0, 12, 8, 6), GIC),
    via("ICC_AP0R3_EL1", (3, 0, 12, 8, 7), GIC),
    via("ICC_AP1R0_EL1", (3, 0, 12, 9, 0), GIC),
    via("ICC_AP1R1_EL1", (3, 0, 12, 9, 1), GIC),
    via("ICC_AP1R2_EL1", (3, 0, 12, 9, 2), GIC),
    via("ICC_AP1R3_EL1", (3, 0, 12, 9, 3), GIC),
    via("ICC_DIR_EL1", (3, 0, 12, 11, 1), GIC),
    via("ICC_RPR_EL1", (3, 0, 12, 11, 3), GIC),
    via("ICC_IAR1_EL1", (3, 0, 12, 12, 0), GIC),
    via("ICC_EOIR1_EL1", (3, 0, 12, 12, 1), GIC),
    via("ICC_HPPIR1_EL1", (3, 0, 12, 12, 2), GIC),
    via("ICC_BPR1_EL1", (3, 0, 12, 12, 3), GIC),
    via("ICC_CTLR_EL1", (3, 0, 12, 12, 4), GIC),
    via("ICC_SRE_EL1", (3, 0, 12, 12, 5), GIC),
    via("ICC_IGRPEN0_EL1", (3, 0, 12, 12, 6), GIC),
    via("ICC_IGRPEN1_EL1", (3, 0, 12, 12, 7), GIC),
];

/// The entry for `enc`, if the register is accessed directly.
pub fn switched(enc: Encoding) -> Option<&'static Switched> {
    SWITCHED.iter().find(|s| s.enc == enc)
}
