//! `VTCR_EL2` and `VTTBR_EL2` computation.
//!
//! The stage-2 root may be up to 16 concatenated table pages, so a walk
//! resolves up to 4 extra bits at its start level; the start level is the
//! one that minimises the number of levels within that limit.

use core::fmt;

use crate::addr::Pa;
use crate::granule::{Granule, Level};

/// Largest number of concatenated root tables.
pub const MAX_CONCAT_ROOTS: usize = 16;

/// The stage-2 geometry of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct S2Geometry {
    /// The translation granule.
    pub granule: Granule,
    /// IPA size in bits.
    pub ipa_bits: u32,
    /// Level the walk starts at.
    pub start_level: Level,
    /// Number of concatenated root table pages.
    pub root_pages: usize,
}

impl S2Geometry {
    /// Geometry for `ipa_bits` with `granule`.
    ///
    /// # Errors
    /// [`VtcrError::IpaBits`] if `ipa_bits` is outside `32..=48`.
    pub const fn new(granule: Granule, ipa_bits: u32) -> Result<S2Geometry, VtcrError> {
        if ipa_bits < 32 || ipa_bits > 48 {
            return Err(VtcrError::IpaBits(ipa_bits));
        }
        let bpl = granule.bits_per_level();
        // Number of levels needed if the root may resolve 4 extra bits.
        let levels = (ipa_bits - 4 - granule.shift()).div_ceil(bpl);
        let start = 4 - levels;
        let start_level = Level(start as u8);
        let root_bits = ipa_bits - granule.level_shift(start_level);
        let entries = 1usize << root_bits;
        let per_page = granule.entries();
        let root_pages = if entries <= per_page {
            1
        } else {
            entries / per_page
        };
        Ok(S2Geometry {
            granule,
            ipa_bits,
            start_level,
            root_pages,
        })
    }

    /// Size of the IPA space in bytes.
    pub const fn ipa_size(&self) -> u64 {
        1 << self.ipa_bits
    }

    /// Number of root entries actually used.
    pub const fn root_entries(&self) -> usize {
        1 << (self.ipa_bits - self.granule.level_shift(self.start_level))
    }

    /// The SL0 encoding of the start level (4K granule).
    pub const fn sl0(&self) -> u64 {
        match self.granule {
            Granule::Size4K => (2 - self.start_level.0 as i32) as u64,
        }
    }
}

/// Why a VTCR value could not be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtcrError {
    /// IPA size outside 32..=48 bits.
    IpaBits(u32),
    /// The IPA size exceeds what the CPU's physical address range supports.
    IpaExceedsPa {
        /// Requested IPA bits.
        ipa_bits: u32,
        /// Bits the PARange supports.
        pa_bits: u32,
    },
    /// Unknown `ID_AA64MMFR0_EL1.PARange` encoding.
    PaRange(u8),
}

impl fmt::Display for VtcrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VtcrError::IpaBits(b) => write!(f, "IPA size {b} bits is outside 32..=48"),
            VtcrError::IpaExceedsPa { ipa_bits, pa_bits } => write!(
                f,
                "IPA size {ipa_bits} bits exceeds the {pa_bits}-bit physical address range"
            ),
            VtcrError::PaRange(r) => write!(f, "unknown PARange encoding {r:#x}"),
        }
    }
}

/// Physical address bits for an `ID_AA64MMFR0_EL1.PARange` value.
pub const fn parange_bits(parange: u8) -> Option<u32> {
    match parange {
        0 => Some(32),
        1 => Some(36),
        2 => Some(40),
        3 => Some(42),
        4 => Some(44),
        5 => Some(48),
        6 => Some(52),
        _ => None,
    }
}

/// VTCR_EL2 fields.
pub mod fields {
    /// RES1 bit 31.
    pub const RES1: u64 = 1 << 31;
    /// Inner write-back read/write-allocate table walks.
    pub const IRGN0_WBWA: u64 = 1 << 8;
    /// Outer write-back read/write-allocate table walks.
    pub const ORGN0_WBWA: u64 = 1 << 10;
    /// Inner-shareable table walks.
    pub const SH0_INNER: u64 = 3 << 12;
    /// 16-bit VMIDs.
    pub const VS: u64 = 1 << 19;
    /// Hardware access flag update.
    pub const HA: u64 = 1 << 21;
}

/// Options for [`vtcr`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtcrOptions {
    /// Use 16-bit VMIDs (VS).
    pub vmid16: bool,
    /// Let hardware set the access flag (HA).
    pub hw_access_flag: bool,
}

/// Computes `VTCR_EL2` for a VM of `ipa_bits` on a CPU with `parange`.
///
/// PS is the CPU's PARange capped at 48 bits (no LPA2).
///
/// # Errors
/// See [`VtcrError`].
pub const fn vtcr(ipa_bits: u32, parange: u8, opts: VtcrOptions) -> Result<u64, VtcrError> {
    let pa_bits = match parange_bits(parange) {
        Some(b) => b,
        None => return Err(VtcrError::PaRange(parange)),
    };
    let geo = match S2Geometry::new(Granule::Size4K, ipa_bits) {
        Ok(g) => g,
        Err(e) => return Err(e),
    };
    let ps = if parange > 5 { 5 } else { parange } as u64;
    let pa_bits_eff = if pa_bits > 48 { 48 } else { pa_bits };
    if ipa_bits > pa_bits_eff {
        return Err(VtcrError::IpaExceedsPa {
            ipa_bits,
            pa_bits: pa_bits_eff,
        });
    }
    let mut v = (64 - ipa_bits as u64)
        | (geo.sl0() << 6)
        | fields::IRGN0_WBWA
        | fields::ORGN0_WBWA
        | fields::SH0_INNER
        | (ps << 16)
        | fields::RES1;
    if opts.vmid16 {
        v |= fields::VS;
    }
    if opts.hw_access_flag {
        v |= fields::HA;
    }
    Ok(v)
}

/// `VTTBR_EL2` for a root table and VMID.
pub const fn vttbr(root: Pa, vmid: u16) -> u64 {
    (root.0 & 0x0000_ffff_ffff_fffe) | ((vmid as u64) << 48)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtcr_39_bit_matches_value_verified_on_qemu() {
        assert_eq!(vtcr(39, 2, VtcrOptions::default()), Ok(0x8002_3559));
    }

    #[test]
    fn vtcr_for_several_ipa_sizes() {
        // 40-bit: T0SZ 24, level 1 (SL0=1), PS=2.
        assert_eq!(vtcr(40, 2, VtcrOptions::default()), Ok(0x8002_3558));
        // 32-bit: T0SZ 32, level 2 (SL0=0).
        assert_eq!(vtcr(32, 2, VtcrOptions::default()), Ok(0x8002_3520));
        // 48-bit on a 48-bit PA CPU: T0SZ 16, level 0 (SL0=2), PS=5.
        assert_eq!(vtcr(48, 5, VtcrOptions::default()), Ok(0x8005_3590));
        // 44-bit with VS and HA on a 52-bit CPU: PS capped to 48 bits.
        assert_eq!(
            vtcr(
                44,
                6,
                VtcrOptions {
                    vmid16: true,
                    hw_access_flag: true
                }
            ),
            Ok(0x8005_3594 | (1 << 19) | (1 << 21))
        );
    }

    #[test]
    fn vtcr_rejects_bad_inputs() {
        assert_eq!(
            vtcr(31, 2, VtcrOptions::default()),
            Err(VtcrError::IpaBits(31))
        );
        assert_eq!(
            vtcr(49, 5, VtcrOptions::default()),
            Err(VtcrError::IpaBits(49))
        );
        assert_eq!(
            vtcr(44, 2, VtcrOptions::default()),
            Err(VtcrError::IpaExceedsPa {
                ipa_bits: 44,
                pa_bits: 40
            })
        );
        assert_eq!(
            vtcr(40, 9, VtcrOptions::default()),
            Err(VtcrError::PaRange(9))
        );
    }

    #[test]
    fn geometry_start_level_and_concatenation() {
        let g = |b| S2Geometry::new(Granule::Size4K, b).unwrap();
        assert_eq!((g(32).start_level, g(32).root_pages), (Level(2), 4));
        assert_eq!((g(36).start_level, g(36).root_pages), (Level(1), 1));
        assert_eq!((g(39).start_level, g(39).root_pages), (Level(1), 1));
        assert_eq!((g(40).start_level, g(40).root_pages), (Level(1), 2));
        assert_eq!((g(42).start_level, g(42).root_pages), (Level(1), 8));
        assert_eq!((g(43).start_level, g(43).root_pages), (Level(1), 16));
        assert_eq!((g(44).start_level, g(44).root_pages), (Level(0), 1));
        assert_eq!((g(48).start_level, g(48).root_pages), (Level(0), 1));
        assert_eq!(g(40).root_entries(), 1024);
    }

    #[test]
    fn vttbr_encodes_vmid() {
        assert_eq!(vttbr(Pa(0x4010_0000), 3), 0x0003_0000_4010_0000);
    }
}
