//! The register-list test: the architecture's EL0/EL1-accessible system
//! registers (typed here from the Arm ARM, independently of the crate's
//! tables), each of which must be either trapped by the VM's EL2 controls
//! and answered by the table, or switched by the world switch — never
//! neither, never both — for every combination of host and VM offers.
//!
//! `cargo test -p pkvm-sysreg --test register_list -- --nocapture` prints
//! the table with each register's handling.

mod common;

use common::{full_host, minimal_host};
use pkvm_arch::esr::Esr;
use pkvm_sysreg::{
    handle_sysreg_trap, lookup, switched, visible, Direction, Encoding, HostFeature, HostIds,
    IdOverrides, Outcome, SysregTrap, TrapControls, VcpuSysregs, VmFeatures, When, REGISTERS,
    SWITCHED,
};
use HostFeature as F;

/// One architectural register: name, encoding, and the host feature
/// without which it does not exist.
#[derive(Clone, Debug)]
struct ArchReg {
    name: String,
    enc: Encoding,
    requires: Option<HostFeature>,
}

fn r(name: &str, e: Enc, requires: Option<HostFeature>) -> ArchReg {
    ArchReg {
        name: name.to_string(),
        enc: Encoding::new(e.0, e.1, e.2, e.3, e.4),
        requires,
    }
}

/// op0, op1, CRn, CRm, op2.
type Enc = (u8, u8, u8, u8, u8);

/// Fixed registers: (name, encoding, feature).
#[rustfmt::skip]
const FIXED: &[(&str, Enc, Option<HostFeature>)] = &[
    // Identification.
    ("MIDR_EL1", (3, 0, 0, 0, 0), None),
    ("MPIDR_EL1", (3, 0, 0, 0, 5), None),
    ("REVIDR_EL1", (3, 0, 0, 0, 6), None),
    ("ID_PFR0_EL1", (3, 0, 0, 1, 0), None),
    ("ID_PFR1_EL1", (3, 0, 0, 1, 1), None),
    ("ID_DFR0_EL1", (3, 0, 0, 1, 2), None),
    ("ID_AFR0_EL1", (3, 0, 0, 1, 3), None),
    ("ID_MMFR0_EL1", (3, 0, 0, 1, 4), None),
    ("ID_MMFR1_EL1", (3, 0, 0, 1, 5), None),
    ("ID_MMFR2_EL1", (3, 0, 0, 1, 6), None),
    ("ID_MMFR3_EL1", (3, 0, 0, 1, 7), None),
    ("ID_ISAR0_EL1", (3, 0, 0, 2, 0), None),
    ("ID_ISAR1_EL1", (3, 0, 0, 2, 1), None),
    ("ID_ISAR2_EL1", (3, 0, 0, 2, 2), None),
    ("ID_ISAR3_EL1", (3, 0, 0, 2, 3), None),
    ("ID_ISAR4_EL1", (3, 0, 0, 2, 4), None),
    ("ID_ISAR5_EL1", (3, 0, 0, 2, 5), None),
    ("ID_MMFR4_EL1", (3, 0, 0, 2, 6), None),
    ("ID_ISAR6_EL1", (3, 0, 0, 2, 7), None),
    ("MVFR0_EL1", (3, 0, 0, 3, 0), None),
    ("MVFR1_EL1", (3, 0, 0, 3, 1), None),
    ("MVFR2_EL1", (3, 0, 0, 3, 2), None),
    ("ID_PFR2_EL1", (3, 0, 0, 3, 4), None),
    ("ID_DFR1_EL1", (3, 0, 0, 3, 5), None),
    ("ID_MMFR5_EL1", (3, 0, 0, 3, 6), None),
    ("ID_AA64PFR0_EL1", (3, 0, 0, 4, 0), None),
    ("ID_AA64PFR1_EL1", (3, 0, 0, 4, 1), None),
    ("ID_AA64PFR2_EL1", (3, 0, 0, 4, 2), None),
    ("ID_AA64ZFR0_EL1", (3, 0, 0, 4, 4), None),
    ("ID_AA64SMFR0_EL1", (3, 0, 0, 4, 5), None),
    ("ID_AA64FPFR0_EL1", (3, 0, 0, 4, 7), None),
    ("ID_AA64DFR0_EL1", (3, 0, 0, 5, 0), None),
    ("ID_AA64DFR1_EL1", (3, 0, 0, 5, 1), None),
    ("ID_AA64DFR2_EL1", (3, 0, 0, 5, 2), None),
    ("ID_AA64AFR0_EL1", (3, 0, 0, 5, 4), None),
    ("ID_AA64AFR1_EL1", (3, 0, 0, 5, 5), None),
    ("ID_AA64ISAR0_EL1", (3, 0, 0, 6, 0), None),
    ("ID_AA64ISAR1_EL1", (3, 0, 0, 6, 1), None),
    ("ID_AA64ISAR2_EL1", (3, 0, 0, 6, 2), None),
    ("ID_AA64ISAR3_EL1", (3, 0, 0, 6, 3), None),
    ("ID_AA64MMFR0_EL1", (3, 0, 0, 7, 0), None),
    ("ID_AA64MMFR1_EL1", (3, 0, 0, 7, 1), None),
    ("ID_AA64MMFR2_EL1", (3, 0, 0, 7, 2), None),
    ("ID_AA64MMFR3_EL1", (3, 0, 0, 7, 3), None),
    ("ID_AA64MMFR4_EL1", (3, 0, 0, 7, 4), None),
    ("CCSIDR_EL1", (3, 1, 0, 0, 0), None),
    ("CLIDR_EL1", (3, 1, 0, 0, 1), None),
    ("CCSIDR2_EL1", (3, 1, 0, 0, 2), Some(F::Ccidx)),
    ("GMID_EL1", (3, 1, 0, 0, 4), Some(F::Mte2)),
    ("SMIDR_EL1", (3, 1, 0, 0, 6), Some(F::Sme)),
    ("AIDR_EL1", (3, 1, 0, 0, 7), None),
    ("CSSELR_EL1", (3, 2, 0, 0, 0), None),
    ("CTR_EL0", (3, 3, 0, 0, 1), None),
    ("DCZID_EL0", (3, 3, 0, 0, 7), None),
    // System control and translation.
    ("SCTLR_EL1", (3, 0, 1, 0, 0), None),
    ("ACTLR_EL1", (3, 0, 1, 0, 1), None),
    ("CPACR_EL1", (3, 0, 1, 0, 2), None),
    ("RGSR_EL1", (3, 0, 1, 0, 5), Some(F::Mte2)),
    ("GCR_EL1", (3, 0, 1, 0, 6), Some(F::Mte2)),
    ("ZCR_EL1", (3, 0, 1, 2, 0), Some(F::Sve)),
    ("TRFCR_EL1", (3, 0, 1, 2, 1), Some(F::TraceFilt)),
    ("SMPRI_EL1", (3, 0, 1, 2, 4), Some(F::Sme)),
    ("SMCR_EL1", (3, 0, 1, 2, 6), Some(F::Sme)),
    ("TTBR0_EL1", (3, 0, 2, 0, 0), None),
    ("TTBR1_EL1", (3, 0, 2, 0, 1), None),
    ("TCR_EL1", (3, 0, 2, 0, 2), None),
    ("APIAKeyLo_EL1", (3, 0, 2, 1, 0), Some(F::PAuth)),
    ("APIAKeyHi_EL1", (3, 0, 2, 1, 1), Some(F::PAuth)),
    ("APIBKeyLo_EL1", (3, 0, 2, 1, 2), Some(F::PAuth)),
    ("APIBKeyHi_EL1", (3, 0, 2, 1, 3), Some(F::PAuth)),
    ("APDAKeyLo_EL1", (3, 0, 2, 2, 0), Some(F::PAuth)),
    ("APDAKeyHi_EL1", (3, 0, 2, 2, 1), Some(F::PAuth)),
    ("APDBKeyLo_EL1", (3, 0, 2, 2, 2), Some(F::PAuth)),
    ("APDBKeyHi_EL1", (3, 0, 2, 2, 3), Some(F::PAuth)),
    ("APGAKeyLo_EL1", (3, 0, 2, 3, 0), Some(F::PAuth)),
    ("APGAKeyHi_EL1", (3, 0, 2, 3, 1), Some(F::PAuth)),
    ("SPSR_EL1", (3, 0, 4, 0, 0), None),
    ("ELR_EL1", (3, 0, 4, 0, 1), None),
    ("SP_EL0", (3, 0, 4, 1, 0), None),
    ("ICC_PMR_EL1", (3, 0, 4, 6, 0), None),
    ("AFSR0_EL1", (3, 0, 5, 1, 0), None),
    ("AFSR1_EL1", (3, 0, 5, 1, 1), None),
    ("ESR_EL1", (3, 0, 5, 2, 0), None),
    ("ERRIDR_EL1", (3, 0, 5, 3, 0), Some(F::Ras)),
    ("ERRSELR_EL1", (3, 0, 5, 3, 1), Some(F::Ras)),
    ("ERXFR_EL1", (3, 0, 5, 4, 0), Some(F::Ras)),
    ("ERXCTLR_EL1", (3, 0, 5, 4, 1), Some(F::Ras)),
    ("ERXSTATUS_EL1", (3, 0, 5, 4, 2), Some(F::Ras)),
    ("ERXADDR_EL1", (3, 0, 5, 4, 3), Some(F::Ras)),
    ("ERXPFGF_EL1", (3, 0, 5, 4, 4), Some(F::Ras)),
    ("ERXPFGCTL_EL1", (3, 0, 5, 4, 5), Some(F::Ras)),
    ("ERXPFGCDN_EL1", (3, 0, 5, 4, 6), Some(F::Ras)),
    ("ERXMISC0_EL1", (3, 0, 5, 5, 0), Some(F::Ras)),
    ("ERXMISC1_EL1", (3, 0, 5, 5, 1), Some(F::Ras)),
    ("ERXMISC2_EL1", (3, 0, 5, 5, 2), Some(F::Ras)),
    ("ERXMISC3_EL1", (3, 0, 5, 5, 3), Some(F::Ras)),
    ("TFSR_EL1", (3, 0, 5, 6, 0), Some(F::Mte2)),
    ("TFSRE0_EL1", (3, 0, 5, 6, 1), Some(F::Mte2)),
    ("FAR_EL1", (3, 0, 6, 0, 0), None),
    ("PAR_EL1", (3, 0, 7, 4, 0), None),
    // Statistical profiling and trace buffer.
    ("PMSCR_EL1", (3, 0, 9, 9, 0), Some(F::Spe)),
    ("PMSNEVFR_EL1", (3, 0, 9, 9, 1), Some(F::Spe)),
    ("PMSICR_EL1", (3, 0, 9, 9, 2), Some(F::Spe)),
    ("PMSIRR_EL1", (3, 0, 9, 9, 3), Some(F::Spe)),
    ("PMSFCR_EL1", (3, 0, 9, 9, 4), Some(F::Spe)),
    ("PMSEVFR_EL1", (3, 0, 9, 9, 5), Some(F::Spe)),
    ("PMSLATFR_EL1", (3, 0, 9, 9, 6), Some(F::Spe)),
    ("PMSIDR_EL1", (3, 0, 9, 9, 7), Some(F::Spe)),
    ("PMBLIMITR_EL1", (3, 0, 9, 10, 0), Some(F::Spe)),
    ("PMBPTR_EL1", (3, 0, 9, 10, 1), Some(F::Spe)),
    ("PMBSR_EL1", (3, 0, 9, 10, 3), Some(F::Spe)),
    ("PMBIDR_EL1", (3, 0, 9, 10, 7), Some(F::Spe)),
    ("TRBLIMITR_EL1", (3, 0, 9, 11, 0), Some(F::Trbe)),
    ("TRBPTR_EL1", (3, 0, 9, 11, 1), Some(F::Trbe)),
    ("TRBBASER_EL1", (3, 0, 9, 11, 2), Some(F::Trbe)),
    ("TRBSR_EL1", (3, 0, 9, 11, 3), Some(F::Trbe)),
    ("TRBMAR_EL1", (3, 0, 9, 11, 4), Some(F::Trbe)),
    ("TRBTRG_EL1", (3, 0, 9, 11, 6), Some(F::Trbe)),
    ("TRBIDR_EL1", (3, 0, 9, 11, 7), Some(F::Trbe)),
    // PMU.
    ("PMINTENSET_EL1", (3, 0, 9, 14, 1), Some(F::Pmu)),
    ("PMINTENCLR_EL1", (3, 0, 9, 14, 2), Some(F::Pmu)),
    ("PMMIR_EL1", (3, 0, 9, 14, 6), Some(F::Pmu)),
    ("PMCR_EL0", (3, 3, 9, 12, 0), Some(F::Pmu)),
    ("PMCNTENSET_EL0", (3, 3, 9, 12, 1), Some(F::Pmu)),
    ("PMCNTENCLR_EL0", (3, 3, 9, 12, 2), Some(F::Pmu)),
    ("PMOVSCLR_EL0", (3, 3, 9, 12, 3), Some(F::Pmu)),
    ("PMSWINC_EL0", (3, 3, 9, 12, 4), Some(F::Pmu)),
    ("PMSELR_EL0", (3, 3, 9, 12, 5), Some(F::Pmu)),
    ("PMCEID0_EL0", (3, 3, 9, 12, 6), Some(F::Pmu)),
    ("PMCEID1_EL0", (3, 3, 9, 12, 7), Some(F::Pmu)),
    ("PMCCNTR_EL0", (3, 3, 9, 13, 0), Some(F::Pmu)),
    ("PMXEVTYPER_EL0", (3, 3, 9, 13, 1), Some(F::Pmu)),
    ("PMXEVCNTR_EL0", (3, 3, 9, 13, 2), Some(F::Pmu)),
    ("PMUSERENR_EL0", (3, 3, 9, 14, 0), Some(F::Pmu)),
    ("PMOVSSET_EL0", (3, 3, 9, 14, 3), Some(F::Pmu)),
    ("PMCCFILTR_EL0", (3, 3, 14, 15, 7), Some(F::Pmu)),
    // Memory attributes, LOR, MPAM, vectors.
    ("MAIR_EL1", (3, 0, 10, 2, 0), None),
    ("AMAIR_EL1", (3, 0, 10, 3, 0), None),
    ("LORSA_EL1", (3, 0, 10, 4, 0), Some(F::Lor)),
    ("LOREA_EL1", (3, 0, 10, 4, 1), Some(F::Lor)),
    ("LORN_EL1", (3, 0, 10, 4, 2), Some(F::Lor)),
    ("LORC_EL1", (3, 0, 10, 4, 3), Some(F::Lor)),
    ("LORID_EL1", (3, 0, 10, 4, 7), Some(F::Lor)),
    ("MPAM1_EL1", (3, 0, 10, 5, 0), Some(F::Mpam)),
    ("MPAM0_EL1", (3, 0, 10, 5, 1), Some(F::Mpam)),
    ("VBAR_EL1", (3, 0, 12, 0, 0), None),
    ("DISR_EL1", (3, 0, 12, 1, 1), Some(F::Ras)),
    // GIC CPU interface.
    ("ICC_IAR0_EL1", (3, 0, 12, 8, 0), None),
    ("ICC_EOIR0_EL1", (3, 0, 12, 8, 1), None),
    ("ICC_HPPIR0_EL1", (3, 0, 12, 8, 2), None),
    ("ICC_BPR0_EL1", (3, 0, 12, 8, 3), None),
    ("ICC_AP0R0_EL1", (3, 0, 12, 8, 4), None),
    ("ICC_AP0R1_EL1", (3, 0, 12, 8, 5), None),
    ("ICC_AP0R2_EL1", (3, 0, 12, 8, 6), None),
    ("ICC_AP0R3_EL1", (3, 0, 12, 8, 7), None),
    ("ICC_AP1R0_EL1", (3, 0, 12, 9, 0), None),
    ("ICC_AP1R1_EL1", (3, 0, 12, 9, 1), None),
    ("ICC_AP1R2_EL1", (3, 0, 12, 9, 2), None),
    ("ICC_AP1R3_EL1", (3, 0, 12, 9, 3), None),
    ("ICC_DIR_EL1", (3, 0, 12, 11, 1), None),
    ("ICC_RPR_EL1", (3, 0, 12, 11, 3), None),
    ("ICC_SGI1R_EL1", (3, 0, 12, 11, 5), None),
    ("ICC_ASGI1R_EL1", (3, 0, 12, 11, 6), None),
    ("ICC_SGI0R_EL1", (3, 0, 12, 11, 7), None),
    ("ICC_IAR1_EL1", (3, 0, 12, 12, 0), None),
    ("ICC_EOIR1_EL1", (3, 0, 12, 12, 1), None),
    ("ICC_HPPIR1_EL1", (3, 0, 12, 12, 2), None),
    ("ICC_BPR1_EL1", (3, 0, 12, 12, 3), None),
    ("ICC_CTLR_EL1", (3, 0, 12, 12, 4), None),
    ("ICC_SRE_EL1", (3, 0, 12, 12, 5), None),
    ("ICC_IGRPEN0_EL1", (3, 0, 12, 12, 6), None),
    ("ICC_IGRPEN1_EL1", (3, 0, 12, 12, 7), None),
    // Thread and context ids.
    ("CONTEXTIDR_EL1", (3, 0, 13, 0, 1), None),
    ("TPIDR_EL1", (3, 0, 13, 0, 4), None),
    ("SCXTNUM_EL1", (3, 0, 13, 0, 7), None),
    ("TPIDR_EL0", (3, 3, 13, 0, 2), None),
    ("TPIDRRO_EL0", (3, 3, 13, 0, 3), None),
    ("TPIDR2_EL0", (3, 3, 13, 0, 5), Some(F::Sme)),
    ("SCXTNUM_EL0", (3, 3, 13, 0, 7), None),
    // Floating point and SME mode.
    ("FPCR", (3, 3, 4, 4, 0), None),
    ("FPSR", (3, 3, 4, 4, 1), None),
    ("SVCR", (3, 3, 4, 2, 2), Some(F::Sme)),
    // Activity monitors (fixed part).
    ("AMCR_EL0", (3, 3, 13, 2, 0), Some(F::Amu)),
    ("AMCFGR_EL0", (3, 3, 13, 2, 1), Some(F::Amu)),
    ("AMCGCR_EL0", (3, 3, 13, 2, 2), Some(F::Amu)),
    ("AMUSERENR_EL0", (3, 3, 13, 2, 3), Some(F::Amu)),
    ("AMCNTENCLR0_EL0", (3, 3, 13, 2, 4), Some(F::Amu)),
    ("AMCNTENSET0_EL0", (3, 3, 13, 2, 5), Some(F::Amu)),
    ("AMCG1IDR_EL0", (3, 3, 13, 2, 6), Some(F::Amu)),
    ("AMCNTENCLR1_EL0", (3, 3, 13, 3, 0), Some(F::Amu)),
    ("AMCNTENSET1_EL0", (3, 3, 13, 3, 1), Some(F::Amu)),
    // Generic timer.
    ("CNTKCTL_EL1", (3, 0, 14, 1, 0), None),
    ("CNTFRQ_EL0", (3, 3, 14, 0, 0), None),
    ("CNTPCT_EL0", (3, 3, 14, 0, 1), None),
    ("CNTVCT_EL0", (3, 3, 14, 0, 2), None),
    ("CNTPCTSS_EL0", (3, 3, 14, 0, 5), Some(F::Ecv)),
    ("CNTVCTSS_EL0", (3, 3, 14, 0, 6), Some(F::Ecv)),
    ("CNTP_TVAL_EL0", (3, 3, 14, 2, 0), None),
    ("CNTP_CTL_EL0", (3, 3, 14, 2, 1), None),
    ("CNTP_CVAL_EL0", (3, 3, 14, 2, 2), None),
    ("CNTV_TVAL_EL0", (3, 3, 14, 3, 0), None),
    ("CNTV_CTL_EL0", (3, 3, 14, 3, 1), None),
    ("CNTV_CVAL_EL0", (3, 3, 14, 3, 2), None),
    // Debug.
    ("OSDTRRX_EL1", (2, 0, 0, 0, 2), None),
    ("MDCCINT_EL1", (2, 0, 0, 2, 0), None),
    ("MDSCR_EL1", (2, 0, 0, 2, 2), None),
    ("OSDTRTX_EL1", (2, 0, 0, 3, 2), None),
    ("OSECCR_EL1", (2, 0, 0, 6, 2), None),
    ("MDRAR_EL1", (2, 0, 1, 0, 0), None),
    ("OSLAR_EL1", (2, 0, 1, 0, 4), None),
    ("OSLSR_EL1", (2, 0, 1, 1, 4), None),
    ("OSDLR_EL1", (2, 0, 1, 3, 4), None),
    ("DBGPRCR_EL1", (2, 0, 1, 4, 4), None),
    ("DBGCLAIMSET_EL1", (2, 0, 7, 8, 6), None),
    ("DBGCLAIMCLR_EL1", (2, 0, 7, 9, 6), None),
    ("DBGAUTHSTATUS_EL1", (2, 0, 7, 14, 6), None),
    ("MDCCSR_EL0", (2, 3, 0, 1, 0), None),
    ("DBGDTR_EL0", (2, 3, 0, 4, 0), None),
    ("DBGDTRRX_EL0", (2, 3, 0, 5, 0), None),
    // Cache maintenance by set/way.
    ("DC ISW", (1, 0, 7, 6, 2), None),
    ("DC CSW", (1, 0, 7, 10, 2), None),
    ("DC CISW", (1, 0, 7, 14, 2), None),
    ("DC IGSW", (1, 0, 7, 6, 4), Some(F::Mte2)),
    ("DC IGDSW", (1, 0, 7, 6, 6), Some(F::Mte2)),
    ("DC CGSW", (1, 0, 7, 10, 4), Some(F::Mte2)),
    ("DC CGDSW", (1, 0, 7, 10, 6), Some(F::Mte2)),
    ("DC CIGSW", (1, 0, 7, 14, 4), Some(F::Mte2)),
    ("DC CIGDSW", (1, 0, 7, 14, 6), Some(F::Mte2)),
];

/// The architecture's register list: the fixed registers plus the arrays.
fn arch_list() -> Vec<ArchReg> {
    let mut v: Vec<ArchReg> = FIXED.iter().map(|&(n, e, f)| r(n, e, f)).collect();
    for n in 0..16u8 {
        v.push(r(&format!("DBGBVR{n}_EL1"), (2, 0, 0, n, 4), None));
        v.push(r(&format!("DBGBCR{n}_EL1"), (2, 0, 0, n, 5), None));
        v.push(r(&format!("DBGWVR{n}_EL1"), (2, 0, 0, n, 6), None));
        v.push(r(&format!("DBGWCR{n}_EL1"), (2, 0, 0, n, 7), None));
    }
    for n in 0..31u8 {
        let (crm, op2) = (n >> 3, n & 7);
        v.push(r(
            &format!("PMEVCNTR{n}_EL0"),
            (3, 3, 14, 8 | crm, op2),
            Some(F::Pmu),
        ));
        v.push(r(
            &format!("PMEVTYPER{n}_EL0"),
            (3, 3, 14, 12 | crm, op2),
            Some(F::Pmu),
        ));
    }
    for n in 0..16u8 {
        let (crm, op2) = (n >> 3, n & 7);
        v.push(r(
            &format!("AMEVCNTR0{n}_EL0"),
            (3, 3, 13, 4 | crm, op2),
            Some(F::Amu),
        ));
        v.push(r(
            &format!("AMEVTYPER0{n}_EL0"),
            (3, 3, 13, 6 | crm, op2),
            Some(F::Amu),
        ));
        v.push(r(
            &format!("AMEVCNTR1{n}_EL0"),
            (3, 3, 13, 12 | crm, op2),
            Some(F::Amu),
        ));
        v.push(r(
            &format!("AMEVTYPER1{n}_EL0"),
            (3, 3, 13, 14 | crm, op2),
            Some(F::Amu),
        ));
    }
    v
}

fn configs() -> Vec<(&'static str, HostIds, IdOverrides)> {
    vec![
        (
            "full host, nothing offered",
            full_host(),
            IdOverrides::new().without_pauth(),
        ),
        ("full host, defaults", full_host(), IdOverrides::new()),
        (
            "full host, everything offered",
            full_host(),
            IdOverrides::new().with_sve(64).with_pmu(),
        ),
        (
            "Armv8.0 host, nothing offered",
            minimal_host(),
            IdOverrides::new(),
        ),
        (
            "Armv8.0 host, PMU offered",
            minimal_host(),
            IdOverrides::new().with_pmu(),
        ),
    ]
}

fn switched_for(enc: Encoding, host: &HostIds, vm: &VmFeatures) -> bool {
    switched(enc).is_some_and(|s| match s.when {
        When::Always => true,
        When::Offered(o) => vm.has(o),
        When::Host(f) => host.has(f),
    })
}

fn trapped_for(enc: Encoding, tc: &TrapControls) -> Option<usize> {
    lookup(enc).filter(|&row| tc.traps(REGISTERS[row].trap))
}

#[test]
fn every_architectural_register_is_trapped_or_switched_never_neither_nor_both() {
    let list = arch_list();
    for (what, host, cfg) in configs() {
        let vm = VmFeatures::new(&host, &cfg).unwrap();
        let tc = TrapControls::new(&vm);
        for a in &list {
            if a.requires.is_some_and(|f| !host.has(f)) {
                continue; // not on this CPU: the CPU itself UNDEFs
            }
            let sw = switched_for(a.enc, &host, &vm);
            let tr = trapped_for(a.enc, &tc);
            assert!(
                sw || tr.is_some(),
                "{what}: {} is neither trapped nor switched",
                a.name
            );
            assert!(
                !(sw && tr.is_some()),
                "{what}: {} is both trapped and switched",
                a.name
            );
        }
    }
}

#[test]
fn every_table_row_and_switched_entry_is_the_register_the_architecture_names() {
    let list = arch_list();
    let name_of = |enc: Encoding| list.iter().find(|a| a.enc == enc).map(|a| a.name.clone());
    for row in REGISTERS.iter() {
        match name_of(row.enc) {
            Some(n) => assert_eq!(row.to_string(), n, "table row at {}", row.enc),
            // Only the unallocated ID space may be missing from the list.
            None => assert!(
                row.name.is_empty() && row.enc.op0 == 3 && row.enc.op1 == 0 && row.enc.crn == 0,
                "table row {row} ({}) is not in the architecture list",
                row.enc
            ),
        }
    }
    for s in SWITCHED {
        assert_eq!(
            name_of(s.enc).as_deref(),
            Some(s.name),
            "switched {}",
            s.enc
        );
    }
}

#[test]
fn every_trapped_register_is_answered_without_stopping_the_vm() {
    let x = [0x55u64; 31];
    for (what, host, cfg) in configs() {
        let vm = VmFeatures::new(&host, &cfg).unwrap();
        let mut regs = VcpuSysregs::new();
        for (row, reg) in REGISTERS.iter().enumerate() {
            for dir in [Direction::Read, Direction::Write] {
                let esr: Esr = SysregTrap {
                    enc: reg.enc,
                    rt: 3,
                    dir,
                }
                .encode();
                let o = handle_sysreg_trap(&mut regs, &vm, esr, &x);
                if !visible(reg, &vm) {
                    assert_eq!(o, Outcome::InjectUndef, "{what}: {reg} is not visible");
                }
                if let Outcome::Hook(h) = o {
                    assert_eq!(h.row, row);
                }
            }
            assert_eq!(regs.trap_count(row), 2, "{what}: {reg}");
        }
    }
}

#[test]
fn print_the_register_table() {
    let vm = VmFeatures::new(&full_host(), &IdOverrides::new().with_pmu().with_sve(64)).unwrap();
    let tc = TrapControls::new(&vm);
    println!(
        "{:<22} {:<16} {:<34} {:<22} trap",
        "register", "encoding", "handler", "visible"
    );
    for reg in REGISTERS.iter() {
        println!(
            "{:<22} {:<16} {:<34} {:<22} {:?}{}",
            reg.to_string(),
            reg.enc.to_string(),
            format!("{:?}", reg.handler),
            format!("{:?}", reg.vis),
            reg.trap,
            if tc.traps(reg.trap) {
                ""
            } else {
                " (not armed)"
            }
        );
    }
    for s in SWITCHED {
        println!(
            "{:<22} {:<16} switched {:?} when {:?}",
            s.name,
            s.enc.to_string(),
            s.via,
            s.when
        );
    }
    assert!(REGISTERS.len() > 300 && SWITCHED.len() > 60);
}
