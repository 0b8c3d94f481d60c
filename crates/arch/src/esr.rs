//! `ESR_EL2` syndromes, and the faulting address from `HPFAR_EL2`/`FAR_EL2`.
//!
//! Decoding yields immutable descriptions ([`DataAbort`], [`FaultStatus`]);
//! encoding (used by the simulated machine) produces the exact values a CPU
//! reports, so host abort handling is the same code on both tiers.

use crate::addr::Ipa;
use crate::granule::Level;

/// Exception classes (ESR_ELx.EC).
pub mod ec {
    /// Unknown reason.
    pub const UNKNOWN: u8 = 0x00;
    /// WFI/WFE trapped.
    pub const WFX: u8 = 0x01;
    /// FP/SIMD access trapped.
    pub const FP_ASIMD: u8 = 0x07;
    /// HVC from AArch64.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u8 = 0x17;
    /// MSR/MRS/system instruction trapped.
    pub const SYS64: u8 = 0x18;
    /// SVE access trapped.
    pub const SVE: u8 = 0x19;
    /// Pointer authentication instruction trapped.
    pub const PAC: u8 = 0x09;
    /// Instruction abort from a lower EL.
    pub const IABT_LOW: u8 = 0x20;
    /// Instruction abort from the current EL.
    pub const IABT_CUR: u8 = 0x21;
    /// PC alignment fault.
    pub const PC_ALIGN: u8 = 0x22;
    /// Data abort from a lower EL.
    pub const DABT_LOW: u8 = 0x24;
    /// Data abort from the current EL.
    pub const DABT_CUR: u8 = 0x25;
    /// SP alignment fault.
    pub const SP_ALIGN: u8 = 0x26;
    /// SError.
    pub const SERROR: u8 = 0x2f;
    /// BRK instruction.
    pub const BRK64: u8 = 0x3c;
}

/// ESR bit positions.
pub mod bits {
    /// Instruction length (32-bit instruction).
    pub const IL: u64 = 1 << 25;
    /// EC shift.
    pub const EC_SHIFT: u32 = 26;
    /// Syndrome valid.
    pub const ISV: u64 = 1 << 24;
    /// Access size shift (SAS, 23:22).
    pub const SAS_SHIFT: u32 = 22;
    /// Sign extend.
    pub const SSE: u64 = 1 << 21;
    /// Register number shift (SRT, 20:16).
    pub const SRT_SHIFT: u32 = 16;
    /// 64-bit register.
    pub const SF: u64 = 1 << 15;
    /// Acquire/release.
    pub const AR: u64 = 1 << 14;
    /// FAR not valid.
    pub const FNV: u64 = 1 << 10;
    /// External abort type.
    pub const EA: u64 = 1 << 9;
    /// Cache maintenance.
    pub const CM: u64 = 1 << 8;
    /// Stage-2 fault on a stage-1 table walk.
    pub const S1PTW: u64 = 1 << 7;
    /// Write not read.
    pub const WNR: u64 = 1 << 6;
    /// Fault status code mask (5:0).
    pub const FSC_MASK: u64 = 0x3f;
}

/// A fault status code (DFSC/IFSC) decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultStatus {
    /// Address size fault at a level.
    AddressSize(Level),
    /// Translation fault at a level.
    Translation(Level),
    /// Access flag fault at a level.
    AccessFlag(Level),
    /// Permission fault at a level.
    Permission(Level),
    /// Synchronous external abort (not on a table walk).
    ExternalAbort,
    /// Alignment fault.
    Alignment,
    /// TLB conflict abort.
    TlbConflict,
    /// Unsupported exclusive or atomic access.
    ExclusiveAtomic,
    /// Anything else, raw code kept.
    Other(u8),
}

impl FaultStatus {
    /// Decodes a 6-bit FSC.
    pub const fn decode(fsc: u8) -> FaultStatus {
        let level = Level(fsc & 3);
        match fsc & 0x3f {
            0x00..=0x03 => FaultStatus::AddressSize(level),
            0x04..=0x07 => FaultStatus::Translation(level),
            0x08..=0x0b => FaultStatus::AccessFlag(level),
            0x0c..=0x0f => FaultStatus::Permission(level),
            0x10 => FaultStatus::ExternalAbort,
            0x21 => FaultStatus::Alignment,
            0x30 => FaultStatus::TlbConflict,
            0x35 => FaultStatus::ExclusiveAtomic,
            other => FaultStatus::Other(other),
        }
    }

    /// Encodes to a 6-bit FSC.
    pub const fn encode(self) -> u8 {
        match self {
            FaultStatus::AddressSize(l) => l.0 & 3,
            FaultStatus::Translation(l) => 0x04 | (l.0 & 3),
            FaultStatus::AccessFlag(l) => 0x08 | (l.0 & 3),
            FaultStatus::Permission(l) => 0x0c | (l.0 & 3),
            FaultStatus::ExternalAbort => 0x10,
            FaultStatus::Alignment => 0x21,
            FaultStatus::TlbConflict => 0x30,
            FaultStatus::ExclusiveAtomic => 0x35,
            FaultStatus::Other(c) => c & 0x3f,
        }
    }

    /// The level for translation / access-flag / permission / size faults.
    pub const fn level(self) -> Option<Level> {
        match self {
            FaultStatus::AddressSize(l)
            | FaultStatus::Translation(l)
            | FaultStatus::AccessFlag(l)
            | FaultStatus::Permission(l) => Some(l),
            _ => None,
        }
    }
}

/// The instruction-specific syndrome of a data access (valid when ISV).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessSyndrome {
    /// log2 of the access size in bytes (0..=3).
    pub sas: u8,
    /// Sign-extend the loaded value.
    pub sse: bool,
    /// The transfer register (31 = xzr).
    pub srt: u8,
    /// 64-bit register (else 32-bit).
    pub sf: bool,
    /// Acquire/release semantics.
    pub ar: bool,
}

impl AccessSyndrome {
    /// Access size in bytes.
    pub const fn size(&self) -> u8 {
        1 << self.sas
    }
}

/// A decoded data or instruction abort from a lower EL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAbort {
    /// Instruction (true) or data (false) abort.
    pub instruction: bool,
    /// Instruction syndrome, when the hardware gave one (ISV=1).
    pub syndrome: Option<AccessSyndrome>,
    /// Write (for data aborts).
    pub write: bool,
    /// The fault happened on the guest's stage-1 table walk.
    pub s1ptw: bool,
    /// FAR_EL2 is not valid.
    pub fnv: bool,
    /// Cache maintenance operation.
    pub cm: bool,
    /// External abort type bit.
    pub ea: bool,
    /// Fault status.
    pub status: FaultStatus,
}

/// A raw `ESR_EL2` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Esr(pub u64);

impl Esr {
    /// The exception class.
    #[inline(always)]
    pub const fn ec(self) -> u8 {
        ((self.0 >> bits::EC_SHIFT) & 0x3f) as u8
    }

    /// The instruction-specific syndrome (24:0).
    #[inline(always)]
    pub const fn iss(self) -> u32 {
        (self.0 & 0x1ff_ffff) as u32
    }

    /// The 16-bit immediate of an HVC/SMC.
    #[inline(always)]
    pub const fn imm16(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// Decodes a data or instruction abort from a lower EL.
    pub const fn abort(self) -> Option<DataAbort> {
        let ec = self.ec();
        let instruction = match ec {
            ec::DABT_LOW => false,
            ec::IABT_LOW => true,
            _ => return None,
        };
        let v = self.0;
        let syndrome = if !instruction && v & bits::ISV != 0 {
            Some(AccessSyndrome {
                sas: ((v >> bits::SAS_SHIFT) & 3) as u8,
                sse: v & bits::SSE != 0,
                srt: ((v >> bits::SRT_SHIFT) & 0x1f) as u8,
                sf: v & bits::SF != 0,
                ar: v & bits::AR != 0,
            })
        } else {
            None
        };
        Some(DataAbort {
            instruction,
            syndrome,
            write: !instruction && v & bits::WNR != 0,
            s1ptw: v & bits::S1PTW != 0,
            fnv: v & bits::FNV != 0,
            cm: !instruction && v & bits::CM != 0,
            ea: v & bits::EA != 0,
            status: FaultStatus::decode((v & bits::FSC_MASK) as u8),
        })
    }

    /// Encodes a data abort from a lower EL.
    pub const fn data_abort(
        syndrome: Option<AccessSyndrome>,
        write: bool,
        s1ptw: bool,
        status: FaultStatus,
    ) -> Esr {
        let mut v = ((ec::DABT_LOW as u64) << bits::EC_SHIFT) | bits::IL;
        if let Some(s) = syndrome {
            v |= bits::ISV
                | ((s.sas as u64 & 3) << bits::SAS_SHIFT)
                | ((s.srt as u64 & 0x1f) << bits::SRT_SHIFT);
            if s.sse {
                v |= bits::SSE;
            }
            if s.sf {
                v |= bits::SF;
            }
            if s.ar {
                v |= bits::AR;
            }
        }
        if write {
            v |= bits::WNR;
        }
        if s1ptw {
            v |= bits::S1PTW;
        }
        Esr(v | status.encode() as u64)
    }

    /// Encodes an instruction abort from a lower EL.
    pub const fn instruction_abort(s1ptw: bool, status: FaultStatus) -> Esr {
        let mut v = ((ec::IABT_LOW as u64) << bits::EC_SHIFT) | bits::IL;
        if s1ptw {
            v |= bits::S1PTW;
        }
        Esr(v | status.encode() as u64)
    }

    /// Encodes an HVC #imm from AArch64.
    pub const fn hvc(imm: u16) -> Esr {
        Esr(((ec::HVC64 as u64) << bits::EC_SHIFT) | bits::IL | imm as u64)
    }

    /// Encodes an SMC #imm from AArch64.
    pub const fn smc(imm: u16) -> Esr {
        Esr(((ec::SMC64 as u64) << bits::EC_SHIFT) | bits::IL | imm as u64)
    }

    /// Encodes a trapped WFI (`wfe == false`) or WFE.
    pub const fn wfx(wfe: bool) -> Esr {
        Esr(((ec::WFX as u64) << bits::EC_SHIFT) | bits::IL | wfe as u64)
    }
}

/// HPFAR_EL2.FIPA occupies bits 43:4 and holds IPA bits 51:12.
pub const HPFAR_FIPA_MASK: u64 = 0x0000_0fff_ffff_fff0;

/// The faulting IPA: page from HPFAR_EL2, offset from FAR_EL2.
#[inline(always)]
pub const fn fault_ipa(hpfar: u64, far: u64) -> Ipa {
    Ipa(((hpfar & HPFAR_FIPA_MASK) << 8) | (far & 0xfff))
}

/// The HPFAR_EL2 value a CPU reports for a fault at `ipa`.
#[inline(always)]
pub const fn hpfar_for(ipa: Ipa) -> u64 {
    (ipa.0 >> 8) & HPFAR_FIPA_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_abort_observed_on_qemu() {
        // ESR_EL2 = 0x93c98046: data abort, ISV, 64-bit, SRT=x9, WnR, level-2 translation.
        let a = Esr(0x93c9_8046).abort().unwrap();
        assert!(!a.instruction);
        assert!(a.write);
        assert_eq!(
            a.syndrome,
            Some(AccessSyndrome {
                sas: 3,
                sse: false,
                srt: 9,
                sf: true,
                ar: false
            })
        );
        assert_eq!(a.status, FaultStatus::Translation(Level(2)));
    }

    #[test]
    fn encode_round_trips_the_observed_abort() {
        let s = AccessSyndrome {
            sas: 3,
            sse: false,
            srt: 9,
            sf: true,
            ar: false,
        };
        let e = Esr::data_abort(Some(s), true, false, FaultStatus::Translation(Level(2)));
        assert_eq!(e, Esr(0x93c9_8046));
    }

    #[test]
    fn fault_status_codes() {
        for code in 0u8..64 {
            let s = FaultStatus::decode(code);
            assert_eq!(s.encode(), code, "{s:?}");
        }
        assert_eq!(FaultStatus::decode(0x0f), FaultStatus::Permission(Level(3)));
        assert_eq!(FaultStatus::decode(0x09), FaultStatus::AccessFlag(Level(1)));
    }

    #[test]
    fn instruction_abort_and_calls() {
        let e = Esr::instruction_abort(false, FaultStatus::Translation(Level(3)));
        assert_eq!(e.0, 0x8200_0007);
        let a = e.abort().unwrap();
        assert!(a.instruction && !a.write && a.syndrome.is_none());
        assert_eq!(Esr::hvc(0).0, 0x5a00_0000);
        assert_eq!(Esr::hvc(0).ec(), ec::HVC64);
        assert_eq!(Esr::smc(7).imm16(), 7);
        assert!(Esr::hvc(0).abort().is_none());
    }

    #[test]
    fn fault_ipa_from_hpfar_and_far() {
        let ipa = Ipa(0x48_0000_1234);
        let hpfar = hpfar_for(ipa);
        assert_eq!(fault_ipa(hpfar, 0xffff_0000_0000_0234), ipa);
        assert_eq!(fault_ipa(0x48_0000, 0x8), Ipa(0x4800_0008));
    }
}
