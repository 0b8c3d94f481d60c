//! System-register encodings and the `ESR_EL2` syndrome of a trapped
//! `MSR`/`MRS`/`SYS` instruction (EC 0x18).

use core::fmt;

use pkvm_arch::esr::{ec, Esr};

/// A system register or system instruction encoding: `op0, op1, CRn, CRm, op2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Encoding {
    /// op0 (2 bits): 1 system instructions, 2 debug, 3 everything else.
    pub op0: u8,
    /// op1 (3 bits).
    pub op1: u8,
    /// CRn (4 bits).
    pub crn: u8,
    /// CRm (4 bits).
    pub crm: u8,
    /// op2 (3 bits).
    pub op2: u8,
}

impl Encoding {
    /// An encoding; the fields are masked to their architectural widths.
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Encoding {
        Encoding {
            op0: op0 & 3,
            op1: op1 & 7,
            crn: crn & 0xf,
            crm: crm & 0xf,
            op2: op2 & 7,
        }
    }

    /// The 16-bit packed form `op0:op1:CRn:CRm:op2` (the `S<op0>_<op1>_C<n>_C<m>_<op2>` order).
    pub const fn packed(self) -> u16 {
        ((self.op0 as u16) << 14)
            | ((self.op1 as u16) << 11)
            | ((self.crn as u16) << 7)
            | ((self.crm as u16) << 3)
            | self.op2 as u16
    }

    /// The ISS bits of an EC 0x18 syndrome that hold this encoding.
    pub const fn iss_bits(self) -> u32 {
        ((self.op0 as u32) << iss::OP0_SHIFT)
            | ((self.op2 as u32) << iss::OP2_SHIFT)
            | ((self.op1 as u32) << iss::OP1_SHIFT)
            | ((self.crn as u32) << iss::CRN_SHIFT)
            | ((self.crm as u32) << iss::CRM_SHIFT)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "S{}_{}_C{}_C{}_{}",
            self.op0, self.op1, self.crn, self.crm, self.op2
        )
    }
}

/// Field positions in the ISS of an EC 0x18 syndrome (Arm ARM D24.2.45,
/// "ISS encoding for an exception from MSR, MRS, or System instruction").
pub mod iss {
    /// Op0, bits 21:20.
    pub const OP0_SHIFT: u32 = 20;
    /// Op2, bits 19:17.
    pub const OP2_SHIFT: u32 = 17;
    /// Op1, bits 16:14.
    pub const OP1_SHIFT: u32 = 14;
    /// CRn, bits 13:10.
    pub const CRN_SHIFT: u32 = 10;
    /// Rt, bits 9:5.
    pub const RT_SHIFT: u32 = 5;
    /// CRm, bits 4:1.
    pub const CRM_SHIFT: u32 = 1;
    /// Direction, bit 0: 1 = read (MRS), 0 = write (MSR or SYS).
    pub const DIR_READ: u32 = 1;
}

/// Which way a trapped access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `MRS Xt, reg`: the register is read into Rt.
    Read,
    /// `MSR reg, Xt` (or a `SYS` instruction taking Xt): Rt is written to the register.
    Write,
}

/// A decoded EC 0x18 trap: which register, which general register, which way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysregTrap {
    /// The register (or system instruction) accessed.
    pub enc: Encoding,
    /// The general register (0..=30; 31 is XZR).
    pub rt: u8,
    /// Read or write.
    pub dir: Direction,
}

/// Rt value that names XZR: reads to it are discarded, writes from it are zero.
pub const RT_XZR: u8 = 31;

impl SysregTrap {
    /// Decodes an `ESR_EL2` value; `None` unless EC is 0x18 (MSR/MRS/SYS).
    pub const fn decode(esr: Esr) -> Option<SysregTrap> {
        if esr.ec() != ec::SYS64 {
            return None;
        }
        let v = esr.iss();
        let enc = Encoding::new(
            ((v >> iss::OP0_SHIFT) & 3) as u8,
            ((v >> iss::OP1_SHIFT) & 7) as u8,
            ((v >> iss::CRN_SHIFT) & 0xf) as u8,
            ((v >> iss::CRM_SHIFT) & 0xf) as u8,
            ((v >> iss::OP2_SHIFT) & 7) as u8,
        );
        let dir = if v & iss::DIR_READ != 0 {
            Direction::Read
        } else {
            Direction::Write
        };
        Some(SysregTrap {
            enc,
            rt: ((v >> iss::RT_SHIFT) & 0x1f) as u8,
            dir,
        })
    }

    /// The `ESR_EL2` value a CPU reports for this trap (IL set).
    pub const fn encode(self) -> Esr {
        let mut iss = self.enc.iss_bits() | ((self.rt as u32 & 0x1f) << iss::RT_SHIFT);
        if matches!(self.dir, Direction::Read) {
            iss |= iss::DIR_READ;
        }
        Esr(((ec::SYS64 as u64) << pkvm_arch::esr::bits::EC_SHIFT)
            | pkvm_arch::esr::bits::IL
            | iss as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn decodes_a_hand_assembled_mrs_id_aa64pfr0() {
        // MRS x3, ID_AA64PFR0_EL1 = S3_0_C0_C4_0:
        // EC 0x18 << 26 | IL | op0 3<<20 | op2 0<<17 | op1 0<<14 | CRn 0<<10 | Rt 3<<5 | CRm 4<<1 | 1.
        let esr = Esr(0x6230_0069);
        let t = SysregTrap::decode(esr).unwrap();
        assert_eq!(t.enc, Encoding::new(3, 0, 0, 4, 0));
        assert_eq!(t.rt, 3);
        assert_eq!(t.dir, Direction::Read);
        assert_eq!(t.encode(), esr);
    }

    #[test]
    fn decodes_a_hand_assembled_msr_mdscr() {
        // MSR MDSCR_EL1, x30 = S2_0_C0_C2_2: op0 2, op2 2, CRm 2, Rt 30, write.
        let esr = Esr((0x18 << 26) | (1 << 25) | (2 << 20) | (2 << 17) | (30 << 5) | (2 << 1));
        let t = SysregTrap::decode(esr).unwrap();
        assert_eq!(t.enc, Encoding::new(2, 0, 0, 2, 2));
        assert_eq!(t.rt, 30);
        assert_eq!(t.dir, Direction::Write);
    }

    #[test]
    fn other_exception_classes_are_not_sysreg_traps() {
        assert!(SysregTrap::decode(Esr::hvc(0)).is_none());
        assert!(SysregTrap::decode(Esr(0x6600_0000)).is_none()); // EC 0x19, the SVE trap of issue 10
    }

    #[test]
    fn display_uses_the_generic_name() {
        assert_eq!(Encoding::new(3, 0, 0, 4, 0).to_string(), "S3_0_C0_C4_0");
    }
}
