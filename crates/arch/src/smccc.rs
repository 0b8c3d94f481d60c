//! SMCCC function identifiers and return codes: the calling convention for
//! the host -> hypervisor interface and for guest PSCI calls.

/// Fast call (bit 31).
pub const FAST_CALL: u32 = 1 << 31;
/// SMC64/HVC64 calling convention (bit 30).
pub const CONV_64: u32 = 1 << 30;
/// Owning entity shift (29:24).
pub const OWNER_SHIFT: u32 = 24;
/// Owner: Arm architecture calls.
pub const OWNER_ARCH: u32 = 0;
/// Owner: standard secure service calls (PSCI).
pub const OWNER_STANDARD: u32 = 4;
/// Owner: vendor-specific hypervisor service calls (KVM's band).
pub const OWNER_VENDOR_HYP: u32 = 6;

/// Builds a function id.
pub const fn call_val(fast: bool, smc64: bool, owner: u32, func: u16) -> u32 {
    (if fast { FAST_CALL } else { 0 })
        | (if smc64 { CONV_64 } else { 0 })
        | ((owner & 0x3f) << OWNER_SHIFT)
        | func as u32
}

/// A decoded function id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionId(pub u32);

impl FunctionId {
    /// Fast call?
    pub const fn is_fast(self) -> bool {
        self.0 & FAST_CALL != 0
    }
    /// SMC64 convention?
    pub const fn is_64(self) -> bool {
        self.0 & CONV_64 != 0
    }
    /// Owning entity.
    pub const fn owner(self) -> u32 {
        (self.0 >> OWNER_SHIFT) & 0x3f
    }
    /// Function number.
    pub const fn number(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

/// SMCCC return codes (as the 64-bit register value).
pub mod ret {
    /// Success.
    pub const SUCCESS: i64 = 0;
    /// Function not supported.
    pub const NOT_SUPPORTED: i64 = -1;
    /// Not required.
    pub const NOT_REQUIRED: i64 = -2;
    /// Invalid parameter.
    pub const INVALID_PARAMETER: i64 = -3;
}

/// Arm architecture calls.
pub mod arch {
    /// SMCCC_VERSION.
    pub const SMCCC_VERSION: u32 = 0x8000_0000;
    /// SMCCC_ARCH_FEATURES.
    pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
    /// SMCCC_ARCH_SOC_ID.
    pub const SMCCC_ARCH_SOC_ID: u32 = 0x8000_0002;
    /// SMCCC_ARCH_WORKAROUND_1 (Spectre v2).
    pub const SMCCC_ARCH_WORKAROUND_1: u32 = 0x8000_8000;
    /// SMCCC_ARCH_WORKAROUND_2 (SSBS).
    pub const SMCCC_ARCH_WORKAROUND_2: u32 = 0x8000_7fff;
    /// SMCCC_ARCH_WORKAROUND_3 (Spectre-BHB).
    pub const SMCCC_ARCH_WORKAROUND_3: u32 = 0x8000_3fff;
    /// The SMCCC version we implement: 1.1.
    pub const VERSION_1_1: u32 = 0x1_0001;
}

/// PSCI function ids and return codes.
pub mod psci {
    /// PSCI_VERSION.
    pub const VERSION: u32 = 0x8400_0000;
    /// CPU_SUSPEND (SMC32).
    pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
    /// CPU_SUSPEND (SMC64).
    pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
    /// CPU_OFF.
    pub const CPU_OFF: u32 = 0x8400_0002;
    /// CPU_ON (SMC32).
    pub const CPU_ON_32: u32 = 0x8400_0003;
    /// CPU_ON (SMC64).
    pub const CPU_ON_64: u32 = 0xc400_0003;
    /// AFFINITY_INFO (SMC32).
    pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
    /// AFFINITY_INFO (SMC64).
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    /// MIGRATE (SMC32).
    pub const MIGRATE_32: u32 = 0x8400_0005;
    /// MIGRATE (SMC64).
    pub const MIGRATE_64: u32 = 0xc400_0005;
    /// MIGRATE_INFO_TYPE.
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    /// MIGRATE_INFO_UP_CPU (SMC32).
    pub const MIGRATE_INFO_UP_CPU_32: u32 = 0x8400_0007;
    /// MIGRATE_INFO_UP_CPU (SMC64).
    pub const MIGRATE_INFO_UP_CPU_64: u32 = 0xc400_0007;
    /// SYSTEM_OFF.
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    /// SYSTEM_RESET.
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES.
    pub const PSCI_FEATURES: u32 = 0x8400_000a;
    /// CPU_FREEZE.
    pub const CPU_FREEZE: u32 = 0x8400_000b;
    /// CPU_DEFAULT_SUSPEND (SMC32).
    pub const CPU_DEFAULT_SUSPEND_32: u32 = 0x8400_000c;
    /// CPU_DEFAULT_SUSPEND (SMC64).
    pub const CPU_DEFAULT_SUSPEND_64: u32 = 0xc400_000c;
    /// NODE_HW_STATE (SMC32).
    pub const NODE_HW_STATE_32: u32 = 0x8400_000d;
    /// NODE_HW_STATE (SMC64).
    pub const NODE_HW_STATE_64: u32 = 0xc400_000d;
    /// SYSTEM_SUSPEND (SMC32).
    pub const SYSTEM_SUSPEND_32: u32 = 0x8400_000e;
    /// SYSTEM_SUSPEND (SMC64).
    pub const SYSTEM_SUSPEND_64: u32 = 0xc400_000e;
    /// PSCI_SET_SUSPEND_MODE.
    pub const SET_SUSPEND_MODE: u32 = 0x8400_000f;
    /// PSCI_STAT_RESIDENCY (SMC32).
    pub const STAT_RESIDENCY_32: u32 = 0x8400_0010;
    /// PSCI_STAT_RESIDENCY (SMC64).
    pub const STAT_RESIDENCY_64: u32 = 0xc400_0010;
    /// PSCI_STAT_COUNT (SMC32).
    pub const STAT_COUNT_32: u32 = 0x8400_0011;
    /// PSCI_STAT_COUNT (SMC64).
    pub const STAT_COUNT_64: u32 = 0xc400_0011;
    /// SYSTEM_RESET2 (SMC32).
    pub const SYSTEM_RESET2_32: u32 = 0x8400_0012;
    /// SYSTEM_RESET2 (SMC64).
    pub const SYSTEM_RESET2_64: u32 = 0xc400_0012;
    /// MEM_PROTECT.
    pub const MEM_PROTECT: u32 = 0x8400_0013;
    /// MEM_PROTECT_CHECK_RANGE (SMC32).
    pub const MEM_PROTECT_CHECK_RANGE_32: u32 = 0x8400_0014;
    /// MEM_PROTECT_CHECK_RANGE (SMC64).
    pub const MEM_PROTECT_CHECK_RANGE_64: u32 = 0xc400_0014;
    /// SYSTEM_OFF2 (SMC32, PSCI 1.3).
    pub const SYSTEM_OFF2_32: u32 = 0x8400_0015;
    /// SYSTEM_OFF2 (SMC64, PSCI 1.3).
    pub const SYSTEM_OFF2_64: u32 = 0xc400_0015;

    /// Success.
    pub const RET_SUCCESS: i64 = 0;
    /// Not supported.
    pub const RET_NOT_SUPPORTED: i64 = -1;
    /// Invalid parameters.
    pub const RET_INVALID_PARAMETERS: i64 = -2;
    /// Denied.
    pub const RET_DENIED: i64 = -3;
    /// Already on.
    pub const RET_ALREADY_ON: i64 = -4;
    /// On pending.
    pub const RET_ON_PENDING: i64 = -5;
    /// Internal failure.
    pub const RET_INTERNAL_FAILURE: i64 = -6;
    /// Not present.
    pub const RET_NOT_PRESENT: i64 = -7;
    /// Disabled.
    pub const RET_DISABLED: i64 = -8;
    /// Invalid address.
    pub const RET_INVALID_ADDRESS: i64 = -9;

    /// AFFINITY_INFO: on.
    pub const AFFINITY_ON: i64 = 0;
    /// AFFINITY_INFO: off.
    pub const AFFINITY_OFF: i64 = 1;
    /// AFFINITY_INFO: on pending.
    pub const AFFINITY_ON_PENDING: i64 = 2;
    /// MIGRATE_INFO_TYPE: trusted OS not present or does not need migration.
    pub const TOS_NOT_PRESENT_MP: i64 = 2;
    /// SYSTEM_RESET2 warm reset type.
    pub const RESET2_SYSTEM_WARM_RESET: u32 = 0;
    /// SYSTEM_RESET2 vendor-specific range bit.
    pub const RESET2_VENDOR: u32 = 1 << 31;
    /// SYSTEM_OFF2 hibernate-off type.
    pub const OFF2_HIBERNATE_OFF: u32 = 1;

    /// Encodes a PSCI version.
    pub const fn version(major: u16, minor: u16) -> u32 {
        ((major as u32) << 16) | minor as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_id_fields() {
        let id = FunctionId(psci::CPU_ON_64);
        assert!(id.is_fast() && id.is_64());
        assert_eq!(id.owner(), OWNER_STANDARD);
        assert_eq!(id.number(), 3);
        assert_eq!(call_val(true, true, OWNER_VENDOR_HYP, 0x12), 0xc600_0012);
        assert_eq!(call_val(true, false, OWNER_STANDARD, 8), psci::SYSTEM_OFF);
        assert_eq!(psci::version(1, 1), 0x1_0001);
    }
}
