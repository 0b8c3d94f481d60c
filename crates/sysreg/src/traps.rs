//! The EL2 trap controls for a VM, as pure functions of [`VmFeatures`].
//!
//! Bit positions are those of the Arm ARM (DDI 0487) for `HCR_EL2.E2H` = 0,
//! the layout the EL2 image runs with. A control that only exists with an
//! optional feature is set only when the host has that feature (it is RES0
//! otherwise and must be written as zero).

use crate::id::{HostFeature, Offer, VmFeatures};
use crate::table::Trap;

/// `HCR_EL2` bits.
pub mod hcr {
    /// Stage-2 translation for EL1&0: guests never see physical addresses.
    pub const VM: u64 = 1 << 0;
    /// Set/way invalidate is upgraded to clean+invalidate (a guest's
    /// invalidate must not discard another owner's dirty lines).
    pub const SWIO: u64 = 1 << 1;
    /// Physical FIQs go to EL2 (and virtual FIQs to the guest).
    pub const FMO: u64 = 1 << 3;
    /// Physical IRQs go to EL2; also traps `ICC_SGI1R/ASGI1R_EL1` writes.
    pub const IMO: u64 = 1 << 4;
    /// Physical SErrors go to EL2.
    pub const AMO: u64 = 1 << 5;
    /// Broadcast TLB and instruction-cache maintenance in the inner
    /// shareable domain (the vCPU may move between CPUs).
    pub const FB: u64 = 1 << 9;
    /// Barrier shareability upgraded to inner shareable (BSU = 0b01).
    pub const BSU_IS: u64 = 1 << 10;
    /// Trap WFI: an idle vCPU gives its CPU back to the scheduler.
    pub const TWI: u64 = 1 << 13;
    /// Trap WFE: a spinning vCPU yields (the scheduler may run the lock holder).
    pub const TWE: u64 = 1 << 14;
    /// Trap REVIDR/AIDR (and SMIDR): identification comes from the VM's view.
    pub const TID1: u64 = 1 << 16;
    /// Trap CTR/CCSIDR/CCSIDR2/CLIDR/CSSELR: one cache topology on every
    /// CPU the vCPU may run on (TID2 rather than FEAT_EVT's TID4, which
    /// exists on every CPU and also covers CTR_EL0).
    pub const TID2: u64 = 1 << 17;
    /// Trap the ID register space: the VM sees its sanitised view.
    pub const TID3: u64 = 1 << 18;
    /// Trap SMC: firmware calls go through the hypervisor.
    pub const TSC: u64 = 1 << 19;
    /// Trap IMPLEMENTATION DEFINED registers (CRn 11 and 15): UNDEF.
    pub const TIDCP: u64 = 1 << 20;
    /// Trap ACTLR_EL1: emulated storage, no implementation-defined controls.
    pub const TACR: u64 = 1 << 21;
    /// Trap set/way cache maintenance: done by VA over the VM's memory.
    pub const TSW: u64 = 1 << 22;
    /// EL1 is AArch64.
    pub const RW: u64 = 1 << 31;
    /// Trap LOR registers (FEAT_LOR; LO is hidden).
    pub const TLOR: u64 = 1 << 35;
    /// Trap RAS error record registers (FEAT_RAS; RAS is hidden).
    pub const TERR: u64 = 1 << 36;
    /// Pointer-authentication key registers do not trap (keys switched).
    pub const APK: u64 = 1 << 40;
    /// Pointer-authentication instructions do not trap.
    pub const API: u64 = 1 << 41;
    /// Trap GMID_EL1 (FEAT_MTE2; MTE is hidden).
    pub const TID5: u64 = 1 << 58;
    /// Allocation tag access (kept clear: MTE registers trap).
    pub const ATA: u64 = 1 << 56;
    /// SCXTNUM_ELx enable (kept clear: they trap).
    pub const ENSCXT: u64 = 1 << 53;
}

/// `CPTR_EL2` bits (`HCR_EL2.E2H` = 0 layout).
pub mod cptr {
    /// RES1 bits 7:0, 9, 13 (bits 8 and 12 are RES1 too without SVE/SME).
    pub const RES1: u64 = 0xff | (1 << 9) | (1 << 13);
    /// Trap SVE (EC 0x19): set unless the VM has SVE.
    pub const TZ: u64 = 1 << 8;
    /// Trap FP/SIMD: clear, the world switch switches FP/SIMD eagerly.
    pub const TFP: u64 = 1 << 10;
    /// Trap SME (EC 0x1D): always set, SME is never offered.
    pub const TSM: u64 = 1 << 12;
    /// Trap trace registers: no trace unit is offered.
    pub const TTA: u64 = 1 << 20;
    /// Trap activity-monitor registers (FEAT_AMUv1; AMU is hidden).
    pub const TAM: u64 = 1 << 30;
    /// Trap CPACR_EL1: clear, CPACR_EL1 is switched.
    pub const TCPAC: u64 = 1 << 31;
}

/// `MDCR_EL2` bits.
pub mod mdcr {
    /// HPMN (4:0): event counters 0..HPMN-1 belong to EL1/EL0.
    pub const HPMN_MASK: u64 = 0x1f;
    /// Trap PMCR_EL0: the virtual PMU's own PMCR.
    pub const TPMCR: u64 = 1 << 5;
    /// Trap all PMU registers: the PMU is emulated per vCPU.
    pub const TPM: u64 = 1 << 6;
    /// Route debug exceptions to EL2 (kept clear).
    pub const TDE: u64 = 1 << 8;
    /// Trap debug registers: breakpoints, watchpoints and MDSCR are per
    /// vCPU state, not the CPU's.
    pub const TDA: u64 = 1 << 9;
    /// Trap the OS lock and power-down registers.
    pub const TDOSA: u64 = 1 << 10;
    /// Trap MDRAR_EL1 (no memory-mapped debug for guests).
    pub const TDRA: u64 = 1 << 11;
    /// E2PB (13:12) = 0b00: the SPE buffer belongs to EL2, EL1 accesses trap.
    pub const E2PB_MASK: u64 = 3 << 12;
    /// Trap SPE sampling registers (FEAT_SPE).
    pub const TPMS: u64 = 1 << 14;
    /// Prohibit event counting at EL2 (FEAT_PMUv3p1): a guest cannot
    /// count the hypervisor's events.
    pub const HPMD: u64 = 1 << 17;
    /// Trap TRFCR_EL1 (FEAT_TRF).
    pub const TTRF: u64 = 1 << 19;
    /// Prohibit cycle counting at EL2 (FEAT_PMUv3p5).
    pub const HCCD: u64 = 1 << 23;
    /// E2TB (25:24) = 0b00: the trace buffer belongs to EL2, EL1 accesses trap.
    pub const E2TB_MASK: u64 = 3 << 24;
}

/// `CNTHCTL_EL2` bits (`HCR_EL2.E2H` = 0 layout).
pub mod cnthctl {
    /// EL1PCTEN: 0 traps EL1/EL0 reads of CNTPCT_EL0 (the physical count
    /// is per machine, the VM's is offset).
    pub const EL1PCTEN: u64 = 1 << 0;
    /// EL1PCEN: 0 traps EL1/EL0 accesses to CNTP_* (the EL1 physical timer
    /// is emulated; the virtual timer, CNTV_*, stays direct and switched).
    pub const EL1PCEN: u64 = 1 << 1;
}

/// `MPAM2_EL2` bits.
pub mod mpam2 {
    /// Trap MPAM0_EL1 (FEAT_MPAM; MPAM is hidden).
    pub const TRAPMPAM0EL1: u64 = 1 << 49;
    /// Trap MPAM1_EL1.
    pub const TRAPMPAM1EL1: u64 = 1 << 48;
}

/// `HCR_EL2` for the VM's vCPUs.
pub fn hcr_el2(vm: &VmFeatures) -> u64 {
    use hcr::*;
    let host = vm.host();
    let mut v = VM | SWIO | FMO | IMO | AMO | FB | BSU_IS | TWI | TWE;
    v |= TID1 | TID2 | TID3 | TSC | TIDCP | TACR | TSW | RW;
    if host.has(HostFeature::Lor) {
        v |= TLOR;
    }
    if host.has(HostFeature::Ras) {
        v |= TERR;
    }
    if host.has(HostFeature::Mte2) {
        v |= TID5;
    }
    if vm.has(Offer::PAuth) {
        v |= APK | API;
    }
    v
}

/// `CPTR_EL2` for the VM's vCPUs.
pub fn cptr_el2(vm: &VmFeatures) -> u64 {
    use cptr::*;
    let mut v = RES1 | TSM | TTA;
    if !vm.has(Offer::Sve) {
        v |= TZ;
    }
    if vm.host().has(HostFeature::Amu) {
        v |= TAM;
    }
    v
}

/// `MDCR_EL2` for the VM's vCPUs.
pub fn mdcr_el2(vm: &VmFeatures) -> u64 {
    use mdcr::*;
    let host = vm.host();
    let mut v = TDA | TDOSA | TDRA;
    if host.has(HostFeature::Pmu) {
        // All counters in the EL1 range; every access traps anyway.
        v |= TPM | TPMCR | (u64::from(host.pmu_counters) & HPMN_MASK);
    }
    if host.has(HostFeature::PmuV3p1) {
        v |= HPMD;
    }
    if host.has(HostFeature::PmuV3p5) {
        v |= HCCD;
    }
    if host.has(HostFeature::Spe) {
        v |= TPMS; // and E2PB = 0b00
    }
    if host.has(HostFeature::TraceFilt) {
        v |= TTRF; // and E2TB = 0b00
    }
    v
}

/// `CNTHCTL_EL2` for the VM's vCPUs: EL1PCTEN and EL1PCEN clear.
pub fn cnthctl_el2(_vm: &VmFeatures) -> u64 {
    0
}

/// `MPAM2_EL2` for the VM's vCPUs (only written when the host has MPAM).
pub fn mpam2_el2(vm: &VmFeatures) -> u64 {
    if vm.host().has(HostFeature::Mpam) {
        mpam2::TRAPMPAM0EL1 | mpam2::TRAPMPAM1EL1
    } else {
        0
    }
}

/// All of a VM's EL2 trap controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapControls {
    /// `HCR_EL2`.
    pub hcr: u64,
    /// `CPTR_EL2`.
    pub cptr: u64,
    /// `MDCR_EL2`.
    pub mdcr: u64,
    /// `CNTHCTL_EL2`.
    pub cnthctl: u64,
    /// `MPAM2_EL2`.
    pub mpam2: u64,
}

impl TrapControls {
    /// The controls for `vm`.
    pub fn new(vm: &VmFeatures) -> TrapControls {
        TrapControls {
            hcr: hcr_el2(vm),
            cptr: cptr_el2(vm),
            mdcr: mdcr_el2(vm),
            cnthctl: cnthctl_el2(vm),
            mpam2: mpam2_el2(vm),
        }
    }

    /// Whether these controls make accesses guarded by `trap` trap to EL2.
    pub fn traps(&self, trap: Trap) -> bool {
        let set = |reg: u64, bit: u64| reg & bit != 0;
        match trap {
            Trap::Tid1 => set(self.hcr, hcr::TID1),
            Trap::Tid2 => set(self.hcr, hcr::TID2),
            Trap::Tid3 => set(self.hcr, hcr::TID3),
            Trap::Tid5 => set(self.hcr, hcr::TID5),
            Trap::Tacr => set(self.hcr, hcr::TACR),
            Trap::Tsw => set(self.hcr, hcr::TSW),
            Trap::Tlor => set(self.hcr, hcr::TLOR),
            Trap::Terr => set(self.hcr, hcr::TERR),
            Trap::AtaClear => !set(self.hcr, hcr::ATA),
            Trap::EnScxtClear => !set(self.hcr, hcr::ENSCXT),
            Trap::ApkClear => !set(self.hcr, hcr::APK),
            Trap::Imo => set(self.hcr, hcr::IMO),
            Trap::Fmo => set(self.hcr, hcr::FMO),
            Trap::Tpm => set(self.mdcr, mdcr::TPM),
            Trap::Tpmcr => set(self.mdcr, mdcr::TPMCR) || set(self.mdcr, mdcr::TPM),
            Trap::Tda => set(self.mdcr, mdcr::TDA),
            Trap::Tdosa => set(self.mdcr, mdcr::TDOSA),
            Trap::Tdra => set(self.mdcr, mdcr::TDRA),
            Trap::Tpms => set(self.mdcr, mdcr::TPMS),
            Trap::E2pb => self.mdcr & mdcr::E2PB_MASK == 0,
            Trap::E2tb => self.mdcr & mdcr::E2TB_MASK == 0,
            Trap::Ttrf => set(self.mdcr, mdcr::TTRF),
            Trap::Tam => set(self.cptr, cptr::TAM),
            Trap::Tz => set(self.cptr, cptr::TZ),
            Trap::Tsm => set(self.cptr, cptr::TSM),
            Trap::El1pctenClear => !set(self.cnthctl, cnthctl::EL1PCTEN),
            Trap::El1pcenClear => !set(self.cnthctl, cnthctl::EL1PCEN),
            Trap::Mpam0 => set(self.mpam2, mpam2::TRAPMPAM0EL1),
            Trap::Mpam1 => set(self.mpam2, mpam2::TRAPMPAM1EL1),
        }
    }
}
