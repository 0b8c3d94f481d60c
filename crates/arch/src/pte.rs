//! Translation table descriptors.
//!
//! Two translation regimes use the same walker but different attribute
//! layouts, so they get different types: [`S2Pte`]/[`S2Prot`] for stage-2
//! (guest and host IPA -> PA) and [`El2Pte`]/[`El2Prot`] for the
//! hypervisor's own EL2 stage-1 address space.
//!
//! Shared layout (VMSAv8-64, 4K granule): bit 0 valid, bit 1 type (table at
//! levels 0..=2 or page at level 3; 0 = block), output address in 47:12.

use bitflags::bitflags;

use crate::addr::Pa;
use crate::granule::{Granule, Level};

/// Raw bit positions shared by both regimes.
pub mod bits {
    /// Descriptor is valid.
    pub const VALID: u64 = 1 << 0;
    /// Table (levels 0..=2) or page (level 3); clear for a block.
    pub const TYPE: u64 = 1 << 1;
    /// Output address bits for the 4K granule (47:12).
    pub const OA_MASK_4K: u64 = 0x0000_ffff_ffff_f000;
    /// Shareability field (9:8).
    pub const SH_MASK: u64 = 3 << 8;
    /// Inner shareable.
    pub const SH_INNER: u64 = 3 << 8;
    /// Access flag.
    pub const AF: u64 = 1 << 10;
    /// Execute-never (stage-2 `XN[1]` / EL2 XN).
    pub const XN: u64 = 1 << 54;
    /// Software bits 58:55.
    pub const SW_MASK: u64 = 0xf << 55;
    /// Shift of the first software bit.
    pub const SW_SHIFT: u32 = 55;
}

/// Stage-2 specific bit positions.
pub mod s2 {
    /// MemAttr field (5:2).
    pub const MEMATTR_MASK: u64 = 0xf << 2;
    /// Shift of MemAttr.
    pub const MEMATTR_SHIFT: u32 = 2;
    /// S2AP read permission (bit 6).
    pub const S2AP_R: u64 = 1 << 6;
    /// S2AP write permission (bit 7).
    pub const S2AP_W: u64 = 1 << 7;
    /// XN field with FEAT_XNX (54:53).
    pub const XN_MASK: u64 = 3 << 53;
    /// Bits a permission-only change may touch: S2AP R/W and XN.
    pub const PERM_MASK: u64 = S2AP_R | S2AP_W | XN_MASK;

    /// MemAttr without FEAT_FWB: Normal, outer and inner write-back.
    pub const MEMATTR_NORMAL_WB: u64 = 0b1111;
    /// MemAttr without FEAT_FWB: Normal, non-cacheable.
    pub const MEMATTR_NORMAL_NC: u64 = 0b0101;
    /// MemAttr without FEAT_FWB: Device-nGnRE.
    pub const MEMATTR_DEVICE_NGNRE: u64 = 0b0001;
    /// MemAttr with FEAT_FWB: forced Normal write-back.
    pub const FWB_MEMATTR_NORMAL_WB: u64 = 0b0110;
    /// MemAttr with FEAT_FWB: Normal non-cacheable.
    pub const FWB_MEMATTR_NORMAL_NC: u64 = 0b0101;
    /// MemAttr with FEAT_FWB: Device-nGnRE.
    pub const FWB_MEMATTR_DEVICE_NGNRE: u64 = 0b0001;

    /// Invalid-entry annotation: the software "locked" marker used during
    /// break-before-make.
    pub const INVALID_LOCKED: u64 = 1 << 10;
    /// Invalid-entry annotation type field (63:60).
    pub const INVALID_TYPE_MASK: u64 = 0xf << 60;
    /// Shift of the annotation type.
    pub const INVALID_TYPE_SHIFT: u32 = 60;
    /// Annotation type: owned by the owner id in bits 9:2.
    pub const INVALID_TYPE_OWNER: u64 = 1;
    /// Annotation type: donated to a guest (handle, gfn).
    pub const INVALID_TYPE_DONATION: u64 = 2;
    /// Owner id field of an owner annotation (9:2).
    pub const INVALID_OWNER_MASK: u64 = 0xff << 2;
    /// Handle field of a donation annotation: `handle - 0x1000` in 59:48.
    pub const INVALID_HANDLE_MASK: u64 = 0xfff << 48;
    /// Gfn field of a donation annotation (47:12).
    pub const INVALID_GFN_MASK: u64 = 0x0000_ffff_ffff_f000;
    /// The lowest pKVM VM handle (handles are `index + 0x1000`).
    pub const HANDLE_BASE: u16 = 0x1000;
}

/// EL2 stage-1 specific bit positions.
pub mod el2 {
    /// AttrIndx field (4:2): index into MAIR_EL2.
    pub const ATTRINDX_MASK: u64 = 7 << 2;
    /// Shift of AttrIndx.
    pub const ATTRINDX_SHIFT: u32 = 2;
    /// `AP[1]` (bit 6): RES1 at non-VHE EL2.
    pub const AP1: u64 = 1 << 6;
    /// `AP[2]` (bit 7): read-only.
    pub const AP_RO: u64 = 1 << 7;
    /// MAIR_EL2 index used for Device-nGnRE.
    pub const MAIR_IDX_DEVICE: u64 = 0;
    /// MAIR_EL2 index used for Normal write-back.
    pub const MAIR_IDX_NORMAL: u64 = 1;
    /// MAIR_EL2 index used for Normal non-cacheable.
    pub const MAIR_IDX_NORMAL_NC: u64 = 2;
    /// The MAIR_EL2 value matching the indices above.
    pub const MAIR_EL2: u64 = 0x04 | (0xff << 8) | (0x44 << 16);
}

/// What a descriptor is, given the level it sits at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PteKind {
    /// Not valid (may carry an annotation).
    Invalid,
    /// Points at a next-level table.
    Table,
    /// A block mapping (levels 1 and 2 with 4K).
    Block,
    /// A page mapping (level 3).
    Page,
}

#[inline(always)]
const fn kind_of(raw: u64, level: Level) -> PteKind {
    if raw & bits::VALID == 0 {
        PteKind::Invalid
    } else if level.0 == 3 {
        if raw & bits::TYPE != 0 {
            PteKind::Page
        } else {
            // Level-3 descriptors with bit 1 clear are reserved: treat as
            // invalid, as the hardware does (translation fault).
            PteKind::Invalid
        }
    } else if raw & bits::TYPE != 0 {
        PteKind::Table
    } else {
        PteKind::Block
    }
}

bitflags! {
    /// Stage-2 mapping protection and memory type, independent of the
    /// descriptor encoding (which depends on FEAT_FWB).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct S2Prot: u32 {
        /// Readable.
        const R = 1 << 0;
        /// Writable.
        const W = 1 << 1;
        /// Executable.
        const X = 1 << 2;
        /// Device-nGnRE memory (otherwise Normal).
        const DEVICE = 1 << 3;
        /// Normal non-cacheable memory (otherwise write-back).
        const NORMAL_NC = 1 << 4;
        /// Software bit 0 (bit 55).
        const SW0 = 1 << 8;
        /// Software bit 1 (bit 56).
        const SW1 = 1 << 9;
        /// Software bit 2 (bit 57).
        const SW2 = 1 << 10;
        /// Software bit 3 (bit 58).
        const SW3 = 1 << 11;
    }
}

impl S2Prot {
    /// Read + write.
    pub const RW: S2Prot = S2Prot::R.union(S2Prot::W);
    /// Read + write + execute.
    pub const RWX: S2Prot = S2Prot::RW.union(S2Prot::X);
    /// The permission bits only.
    pub const PERMS: S2Prot = S2Prot::R.union(S2Prot::W).union(S2Prot::X);
    /// The software bits only.
    pub const SW: S2Prot = S2Prot::SW0
        .union(S2Prot::SW1)
        .union(S2Prot::SW2)
        .union(S2Prot::SW3);
}

/// Stage-2 encoding options that come from the CPU's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct S2Features {
    /// FEAT_S2FWB in use (HCR_EL2.FWB = 1).
    pub fwb: bool,
}

/// An owner annotation carried by an invalid stage-2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Annotation {
    /// The page belongs to this owner id (e.g. the hypervisor).
    Owner(u8),
    /// The page was donated to the guest with this handle, at this gfn.
    Donation {
        /// pKVM handle of the guest (`0x1000..=0x1fff`).
        handle: u16,
        /// The guest frame the page is mapped at.
        gfn: u64,
    },
}

/// A stage-2 descriptor value.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(transparent)]
pub struct S2Pte(pub u64);

impl core::fmt::Debug for S2Pte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "S2Pte({:#018x})", self.0)
    }
}

impl S2Pte {
    /// The all-zero invalid entry.
    pub const INVALID: S2Pte = S2Pte(0);
    /// The software lock marker (an invalid entry).
    pub const LOCKED: S2Pte = S2Pte(s2::INVALID_LOCKED);

    /// A table descriptor pointing at `table`.
    #[inline(always)]
    pub const fn table(table: Pa) -> S2Pte {
        S2Pte((table.0 & bits::OA_MASK_4K) | bits::VALID | bits::TYPE)
    }

    /// The attribute bits (everything but valid/type/OA) of a leaf with `prot`.
    #[inline(always)]
    pub const fn leaf_attrs(prot: S2Prot, feat: S2Features) -> u64 {
        let memattr = if prot.contains(S2Prot::DEVICE) {
            if feat.fwb {
                s2::FWB_MEMATTR_DEVICE_NGNRE
            } else {
                s2::MEMATTR_DEVICE_NGNRE
            }
        } else if prot.contains(S2Prot::NORMAL_NC) {
            if feat.fwb {
                s2::FWB_MEMATTR_NORMAL_NC
            } else {
                s2::MEMATTR_NORMAL_NC
            }
        } else if feat.fwb {
            s2::FWB_MEMATTR_NORMAL_WB
        } else {
            s2::MEMATTR_NORMAL_WB
        };
        let mut a = (memattr << s2::MEMATTR_SHIFT) | bits::AF;
        if !prot.contains(S2Prot::DEVICE) {
            a |= bits::SH_INNER;
        }
        if prot.contains(S2Prot::R) {
            a |= s2::S2AP_R;
        }
        if prot.contains(S2Prot::W) {
            a |= s2::S2AP_W;
        }
        if !prot.contains(S2Prot::X) {
            a |= bits::XN;
        }
        a |= ((prot.bits() as u64 >> 8) & 0xf) << bits::SW_SHIFT;
        a
    }

    /// A leaf (block or page) at `level` mapping `pa` with `prot`.
    #[inline(always)]
    pub const fn leaf(pa: Pa, level: Level, prot: S2Prot, feat: S2Features) -> S2Pte {
        Self::leaf_from_attrs(pa, level, Self::leaf_attrs(prot, feat))
    }

    /// A leaf at `level` from precomputed attribute bits.
    #[inline(always)]
    pub const fn leaf_from_attrs(pa: Pa, level: Level, attrs: u64) -> S2Pte {
        let ty = if level.0 == 3 { bits::TYPE } else { 0 };
        S2Pte((pa.0 & bits::OA_MASK_4K) | attrs | bits::VALID | ty)
    }

    /// An invalid entry carrying an owner annotation.
    #[inline(always)]
    pub const fn owner_annotation(owner: u8) -> S2Pte {
        S2Pte((s2::INVALID_TYPE_OWNER << s2::INVALID_TYPE_SHIFT) | ((owner as u64) << 2))
    }

    /// An invalid entry recording a donation to guest `handle` at `gfn`.
    /// Returns `None` if the handle or gfn cannot be encoded.
    #[inline(always)]
    pub const fn donation_annotation(handle: u16, gfn: u64) -> Option<S2Pte> {
        if handle < s2::HANDLE_BASE || handle - s2::HANDLE_BASE > 0xfff || gfn >> 36 != 0 {
            return None;
        }
        Some(S2Pte(
            (s2::INVALID_TYPE_DONATION << s2::INVALID_TYPE_SHIFT)
                | (((handle - s2::HANDLE_BASE) as u64) << 48)
                | (gfn << 12),
        ))
    }

    /// Bit 0.
    #[inline(always)]
    pub const fn is_valid(self) -> bool {
        self.0 & bits::VALID != 0
    }

    /// Whether this is the software lock marker.
    #[inline(always)]
    pub const fn is_locked(self) -> bool {
        !self.is_valid() && self.0 & s2::INVALID_LOCKED != 0
    }

    /// What the entry is at `level`.
    #[inline(always)]
    pub const fn kind(self, level: Level) -> PteKind {
        kind_of(self.0, level)
    }

    /// Whether this is a table descriptor at `level`.
    #[inline(always)]
    pub const fn is_table(self, level: Level) -> bool {
        matches!(self.kind(level), PteKind::Table)
    }

    /// Whether this is a valid leaf (block or page) at `level`.
    #[inline(always)]
    pub const fn is_leaf(self, level: Level) -> bool {
        matches!(self.kind(level), PteKind::Block | PteKind::Page)
    }

    /// Output address (table address for a table descriptor).
    #[inline(always)]
    pub const fn oa(self) -> Pa {
        Pa(self.0 & bits::OA_MASK_4K)
    }

    /// Output address for a given granule.
    #[inline(always)]
    pub const fn oa_for(self, g: Granule) -> Pa {
        Pa(self.0 & g.oa_mask())
    }

    /// The attribute bits of a leaf (everything but valid, type and OA).
    #[inline(always)]
    pub const fn attrs(self) -> u64 {
        self.0 & !(bits::OA_MASK_4K | bits::VALID | bits::TYPE)
    }

    /// Decoded protection of a valid leaf.
    pub const fn prot(self, feat: S2Features) -> S2Prot {
        let mut p = S2Prot::empty();
        if self.0 & s2::S2AP_R != 0 {
            p = p.union(S2Prot::R);
        }
        if self.0 & s2::S2AP_W != 0 {
            p = p.union(S2Prot::W);
        }
        if self.0 & bits::XN == 0 {
            p = p.union(S2Prot::X);
        }
        let memattr = (self.0 & s2::MEMATTR_MASK) >> s2::MEMATTR_SHIFT;
        let (dev, nc) = if feat.fwb {
            (
                memattr == s2::FWB_MEMATTR_DEVICE_NGNRE,
                memattr == s2::FWB_MEMATTR_NORMAL_NC,
            )
        } else {
            (
                memattr == s2::MEMATTR_DEVICE_NGNRE,
                memattr == s2::MEMATTR_NORMAL_NC,
            )
        };
        if dev {
            p = p.union(S2Prot::DEVICE);
        }
        if nc {
            p = p.union(S2Prot::NORMAL_NC);
        }
        p.union(S2Prot::from_bits_truncate(
            (((self.0 & bits::SW_MASK) >> bits::SW_SHIFT) as u32) << 8,
        ))
    }

    /// Access flag.
    #[inline(always)]
    pub const fn young(self) -> bool {
        self.0 & bits::AF != 0
    }

    /// Readable by the guest.
    #[inline(always)]
    pub const fn readable(self) -> bool {
        self.0 & s2::S2AP_R != 0
    }

    /// Writable by the guest.
    #[inline(always)]
    pub const fn writable(self) -> bool {
        self.0 & s2::S2AP_W != 0
    }

    /// Executable by the guest.
    #[inline(always)]
    pub const fn executable(self) -> bool {
        self.0 & bits::XN == 0
    }

    /// The invalid-entry annotation, if any.
    pub const fn annotation(self) -> Option<Annotation> {
        if self.is_valid() {
            return None;
        }
        match (self.0 & s2::INVALID_TYPE_MASK) >> s2::INVALID_TYPE_SHIFT {
            s2::INVALID_TYPE_OWNER => Some(Annotation::Owner(
                ((self.0 & s2::INVALID_OWNER_MASK) >> 2) as u8,
            )),
            s2::INVALID_TYPE_DONATION => Some(Annotation::Donation {
                handle: s2::HANDLE_BASE + ((self.0 & s2::INVALID_HANDLE_MASK) >> 48) as u16,
                gfn: (self.0 & s2::INVALID_GFN_MASK) >> 12,
            }),
            _ => None,
        }
    }

    /// Whether `other` differs from `self` only in permission bits
    /// (S2AP R/W, XN), as a permission relaxation does.
    #[inline(always)]
    pub const fn same_but_perms(self, other: S2Pte) -> bool {
        (self.0 ^ other.0) & !s2::PERM_MASK == 0
    }
}

bitflags! {
    /// EL2 stage-1 mapping protection and memory type.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct El2Prot: u32 {
        /// Readable (always true for a valid EL2 mapping).
        const R = 1 << 0;
        /// Writable.
        const W = 1 << 1;
        /// Executable.
        const X = 1 << 2;
        /// Device-nGnRE memory.
        const DEVICE = 1 << 3;
        /// Normal non-cacheable memory.
        const NORMAL_NC = 1 << 4;
    }
}

impl El2Prot {
    /// Read + write data.
    pub const RW: El2Prot = El2Prot::R.union(El2Prot::W);
    /// Read + execute text.
    pub const RX: El2Prot = El2Prot::R.union(El2Prot::X);
}

/// An EL2 stage-1 descriptor value.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(transparent)]
pub struct El2Pte(pub u64);

impl core::fmt::Debug for El2Pte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "El2Pte({:#018x})", self.0)
    }
}

impl El2Pte {
    /// A table descriptor pointing at `table`.
    #[inline(always)]
    pub const fn table(table: Pa) -> El2Pte {
        El2Pte((table.0 & bits::OA_MASK_4K) | bits::VALID | bits::TYPE)
    }

    /// The attribute bits of a leaf with `prot`.
    #[inline(always)]
    pub const fn leaf_attrs(prot: El2Prot) -> u64 {
        let idx = if prot.contains(El2Prot::DEVICE) {
            el2::MAIR_IDX_DEVICE
        } else if prot.contains(El2Prot::NORMAL_NC) {
            el2::MAIR_IDX_NORMAL_NC
        } else {
            el2::MAIR_IDX_NORMAL
        };
        let mut a = (idx << el2::ATTRINDX_SHIFT) | el2::AP1 | bits::AF;
        if !prot.contains(El2Prot::DEVICE) {
            a |= bits::SH_INNER;
        }
        if !prot.contains(El2Prot::W) {
            a |= el2::AP_RO;
        }
        if !prot.contains(El2Prot::X) {
            a |= bits::XN;
        }
        a
    }

    /// A leaf at `level` mapping `pa` with `prot`.
    #[inline(always)]
    pub const fn leaf(pa: Pa, level: Level, prot: El2Prot) -> El2Pte {
        let ty = if level.0 == 3 { bits::TYPE } else { 0 };
        El2Pte((pa.0 & bits::OA_MASK_4K) | Self::leaf_attrs(prot) | bits::VALID | ty)
    }

    /// What the entry is at `level`.
    #[inline(always)]
    pub const fn kind(self, level: Level) -> PteKind {
        kind_of(self.0, level)
    }

    /// Output address.
    #[inline(always)]
    pub const fn oa(self) -> Pa {
        Pa(self.0 & bits::OA_MASK_4K)
    }

    /// Decoded protection of a valid leaf.
    pub const fn prot(self) -> El2Prot {
        let mut p = El2Prot::R;
        if self.0 & el2::AP_RO == 0 {
            p = p.union(El2Prot::W);
        }
        if self.0 & bits::XN == 0 {
            p = p.union(El2Prot::X);
        }
        match (self.0 & el2::ATTRINDX_MASK) >> el2::ATTRINDX_SHIFT {
            el2::MAIR_IDX_DEVICE => p.union(El2Prot::DEVICE),
            el2::MAIR_IDX_NORMAL_NC => p.union(El2Prot::NORMAL_NC),
            _ => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOFWB: S2Features = S2Features { fwb: false };
    const FWB: S2Features = S2Features { fwb: true };

    #[test]
    fn stage2_table_descriptor_bytes() {
        assert_eq!(S2Pte::table(Pa(0x4123_4000)).0, 0x4123_4003);
        assert_eq!(S2Pte::table(Pa(0x4123_4000)).kind(Level(1)), PteKind::Table);
    }

    #[test]
    fn stage2_normal_block_matches_qemu_verified_value() {
        // normal block = pa | 1 | MemAttr 0b1111<<2 | S2AP RW | SH 0b11<<8 | AF,
        // executable (XN clear): 0x4000_0000 | 0x7fd
        let pte = S2Pte::leaf(Pa(0x4000_0000), Level(2), S2Prot::RWX, NOFWB);
        assert_eq!(pte.0, 0x4000_07fd);
        assert_eq!(pte.kind(Level(2)), PteKind::Block);
        assert_eq!(pte.prot(NOFWB), S2Prot::RWX);
    }

    #[test]
    fn stage2_page_bytes_for_each_memory_type() {
        let pa = Pa(0x8_0000_1000);
        // Normal WB, RW, XN: 0xf<<2 | 3<<6 | 3<<8 | AF | XN | page
        let wb = S2Pte::leaf(pa, Level(3), S2Prot::RW, NOFWB);
        assert_eq!(wb.0, 0x0040_0008_0000_17ff);
        assert_eq!(wb.kind(Level(3)), PteKind::Page);
        // Normal NC, R only, exec.
        let nc = S2Pte::leaf(
            pa,
            Level(3),
            S2Prot::R | S2Prot::X | S2Prot::NORMAL_NC,
            NOFWB,
        );
        assert_eq!(
            nc.0,
            0x0000_0008_0000_1000 | 0b11 | (0b0101 << 2) | (1 << 6) | (3 << 8) | (1 << 10)
        );
        assert_eq!(nc.prot(NOFWB), S2Prot::R | S2Prot::X | S2Prot::NORMAL_NC);
        // Device nGnRE, RW, never executable, not shareable-inner.
        let dev = S2Pte::leaf(pa, Level(3), S2Prot::RW | S2Prot::DEVICE, NOFWB);
        assert_eq!(
            dev.0,
            0x0040_0008_0000_1000 | 0b11 | (0b0001 << 2) | (3 << 6) | (1 << 10)
        );
        assert_eq!(dev.prot(NOFWB), S2Prot::RW | S2Prot::DEVICE);
    }

    #[test]
    fn stage2_fwb_memattr_encodings() {
        let pa = Pa(0x1000);
        let wb = S2Pte::leaf(pa, Level(3), S2Prot::RW, FWB);
        assert_eq!((wb.0 >> 2) & 0xf, 0b0110);
        assert_eq!(wb.prot(FWB), S2Prot::RW);
        let nc = S2Pte::leaf(pa, Level(3), S2Prot::RW | S2Prot::NORMAL_NC, FWB);
        assert_eq!((nc.0 >> 2) & 0xf, 0b0101);
        let dev = S2Pte::leaf(pa, Level(3), S2Prot::RW | S2Prot::DEVICE, FWB);
        assert_eq!((dev.0 >> 2) & 0xf, 0b0001);
        assert_eq!(dev.prot(FWB), S2Prot::RW | S2Prot::DEVICE);
    }

    #[test]
    fn stage2_software_bits_round_trip() {
        let p = S2Prot::R | S2Prot::SW0 | S2Prot::SW3;
        let pte = S2Pte::leaf(Pa(0x2000), Level(3), p, NOFWB);
        assert_eq!(pte.0 & bits::SW_MASK, (1 << 55) | (1 << 58));
        assert_eq!(pte.prot(NOFWB), p);
    }

    #[test]
    fn invalid_annotations() {
        assert!(S2Pte::LOCKED.is_locked());
        assert_eq!(S2Pte::LOCKED.0, 0x400);
        assert!(!S2Pte::INVALID.is_locked());
        let o = S2Pte::owner_annotation(1);
        assert_eq!(o.0, 0x1000_0000_0000_0004);
        assert_eq!(o.annotation(), Some(Annotation::Owner(1)));
        assert!(!o.is_valid());
        let d = S2Pte::donation_annotation(0x1005, 0x4_0001).unwrap();
        assert_eq!(d.0, 0x2005_0000_4000_1000);
        assert_eq!(
            d.annotation(),
            Some(Annotation::Donation {
                handle: 0x1005,
                gfn: 0x4_0001
            })
        );
        assert_eq!(S2Pte::donation_annotation(0x0fff, 0), None);
        assert_eq!(S2Pte::donation_annotation(0x1000, 1 << 36), None);
        assert_eq!(S2Pte::INVALID.annotation(), None);
    }

    #[test]
    fn permission_only_difference() {
        let a = S2Pte::leaf(Pa(0x1000), Level(3), S2Prot::R, NOFWB);
        let b = S2Pte::leaf(Pa(0x1000), Level(3), S2Prot::RWX, NOFWB);
        let c = S2Pte::leaf(Pa(0x2000), Level(3), S2Prot::R, NOFWB);
        assert!(a.same_but_perms(b));
        assert!(!a.same_but_perms(c));
    }

    #[test]
    fn reserved_level3_encoding_is_invalid() {
        assert_eq!(S2Pte(0x1001).kind(Level(3)), PteKind::Invalid);
    }

    #[test]
    fn el2_descriptor_bytes() {
        // Normal WB RW data: AttrIndx 1, AP[1] RES1, SH inner, AF, XN.
        let d = El2Pte::leaf(Pa(0x4008_0000), Level(3), El2Prot::RW);
        assert_eq!(
            d.0,
            0x0040_0000_4008_0000 | 0b11 | (1 << 2) | (1 << 6) | (3 << 8) | (1 << 10)
        );
        assert_eq!(d.prot(), El2Prot::RW);
        // Text: read-only, executable.
        let t = El2Pte::leaf(Pa(0x4008_0000), Level(3), El2Prot::RX);
        assert_eq!(t.0 & (1 << 7), 1 << 7);
        assert_eq!(t.0 & bits::XN, 0);
        assert_eq!(t.prot(), El2Prot::RX);
        // Device block at level 2.
        let dv = El2Pte::leaf(Pa(0x0900_0000), Level(2), El2Prot::RW | El2Prot::DEVICE);
        assert_eq!(dv.0, 0x0040_0000_0900_0000 | 1 | (1 << 6) | (1 << 10));
        assert_eq!(dv.kind(Level(2)), PteKind::Block);
        assert_eq!(dv.prot(), El2Prot::RW | El2Prot::DEVICE);
    }
}
