//! The physical CPU's identification, read at EL2 for pkvm-sysreg's
//! [`HostIds`] (from which every VM's sanitised view is computed).
//!
//! Read once on the boot CPU ([`init`]); QEMU's `virt` CPUs are identical,
//! a heterogeneous machine would need the intersection over all CPUs.

use pkvm_sync::{LockClass, SpinLock};
use pkvm_sysreg::{HostFeature, HostIds, IdReg};

use crate::read_sysreg;

/// The CPU's ID registers as read at EL2 (the hypervisor's: every VM's
/// sanitised view is computed from them).
#[link_section = ".data.hyp.idregs"]
static HOST: SpinLock<Option<HostIds>> = SpinLock::new(None, LockClass::Leaf);

/// The host's copy of [`HOST`] (host `.data`, written at boot at EL2
/// before the host runs): what the VMM at EL1 reads, as it may not read
/// the hypervisor's data.
static HOST_COPY: SpinLock<Option<HostIds>> = SpinLock::new(None, LockClass::Leaf);

/// Reads this CPU's ID registers (the whole `op0=3, op1=0, CRn=0` ID space
/// is readable at EL2: unallocated encodings there read as zero).
fn read() -> HostIds {
    let mut h = HostIds::new();
    for r in IdReg::ALL {
        h.set(r, read_one(r));
    }
    if h.has(HostFeature::Pmu) {
        // PMCR_EL0.N: event counters implemented.
        h.pmu_counters = ((read_sysreg!("pmcr_el0") >> 11) & 0x1f) as u8;
    }
    if h.has(HostFeature::Sve) {
        // The largest vector length: a ZCR_EL2 probe (VMs get at most it).
        h.sve_max_vl = super::sve::probe_max_vl();
    }
    h
}

fn read_one(r: IdReg) -> u64 {
    match r {
        IdReg::Pfr0 => read_sysreg!("S3_0_C0_C4_0"),
        IdReg::Pfr1 => read_sysreg!("S3_0_C0_C4_1"),
        IdReg::Pfr2 => read_sysreg!("S3_0_C0_C4_2"),
        IdReg::Zfr0 => read_sysreg!("S3_0_C0_C4_4"),
        IdReg::Smfr0 => read_sysreg!("S3_0_C0_C4_5"),
        IdReg::Fpfr0 => read_sysreg!("S3_0_C0_C4_7"),
        IdReg::Dfr0 => read_sysreg!("S3_0_C0_C5_0"),
        IdReg::Dfr1 => read_sysreg!("S3_0_C0_C5_1"),
        IdReg::Dfr2 => read_sysreg!("S3_0_C0_C5_2"),
        IdReg::Afr0 => read_sysreg!("S3_0_C0_C5_4"),
        IdReg::Afr1 => read_sysreg!("S3_0_C0_C5_5"),
        IdReg::Isar0 => read_sysreg!("S3_0_C0_C6_0"),
        IdReg::Isar1 => read_sysreg!("S3_0_C0_C6_1"),
        IdReg::Isar2 => read_sysreg!("S3_0_C0_C6_2"),
        IdReg::Isar3 => read_sysreg!("S3_0_C0_C6_3"),
        IdReg::Mmfr0 => read_sysreg!("S3_0_C0_C7_0"),
        IdReg::Mmfr1 => read_sysreg!("S3_0_C0_C7_1"),
        IdReg::Mmfr2 => read_sysreg!("S3_0_C0_C7_2"),
        IdReg::Mmfr3 => read_sysreg!("S3_0_C0_C7_3"),
        IdReg::Mmfr4 => read_sysreg!("S3_0_C0_C7_4"),
        IdReg::Midr => read_sysreg!("midr_el1"),
        IdReg::Revidr => read_sysreg!("revidr_el1"),
        IdReg::Aidr => read_sysreg!("aidr_el1"),
        IdReg::Ctr => read_sysreg!("ctr_el0"),
    }
}

/// Reads the boot CPU's identification (call once, on the boot CPU, before
/// any VM is created).
pub fn init() -> HostIds {
    let h = read();
    *HOST.lock() = Some(h);
    *HOST_COPY.lock() = Some(h);
    h
}

/// The host CPU's identification ([`init`] must have run; read now
/// otherwise). At EL1 (the VMM) the host's copy.
pub fn host_ids() -> HostIds {
    if super::el1boot::current_el() != 2 {
        let g = HOST_COPY.lock();
        return g.expect("the ID registers are read at boot, at EL2");
    }
    let mut g = HOST.lock();
    *g.get_or_insert_with(read)
}

/// Whether the CPU has FEAT_HCX (`ID_AA64MMFR1_EL1.HCX`), so `HCRX_EL2` exists.
pub fn has_hcx() -> bool {
    (read_sysreg!("S3_0_C0_C7_1") >> 40) & 0xf != 0
}

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 1] {
    [("idregs::HOST", core::ptr::from_ref(&HOST) as u64)]
}
