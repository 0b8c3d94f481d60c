//! Translation granule and level geometry.
//!
//! Only the 4K granule is implemented today. Everything that depends on the
//! granule goes through [`Granule`] so that 16K and 64K can be added as new
//! variants without touching callers: they ask the granule for a level's
//! shift, its block support and its index bits, never hard-code `12`/`9`.

/// The base page shift used by the host and hypervisor (4K).
pub const PAGE_SHIFT: u32 = 12;
/// The base page size (4K).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A translation table level (0 = root of a 48-bit 4K table, 3 = pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(pub u8);

impl Level {
    /// The last level: entries there are pages.
    pub const LAST: Level = Level(3);

    /// The next level down, or `None` at the last level.
    #[inline(always)]
    pub const fn next(self) -> Option<Level> {
        if self.0 >= 3 {
            None
        } else {
            Some(Level(self.0 + 1))
        }
    }
}

/// A translation granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB pages, 512 entries per table, blocks at levels 1 and 2.
    Size4K,
}

impl Granule {
    /// log2 of the page size.
    #[inline(always)]
    pub const fn shift(self) -> u32 {
        match self {
            Granule::Size4K => 12,
        }
    }

    /// The page size in bytes.
    #[inline(always)]
    pub const fn size(self) -> u64 {
        1 << self.shift()
    }

    /// Index bits resolved per level (a table holds `1 << bits` entries).
    #[inline(always)]
    pub const fn bits_per_level(self) -> u32 {
        self.shift() - 3
    }

    /// Entries in one table page.
    #[inline(always)]
    pub const fn entries(self) -> usize {
        1 << self.bits_per_level()
    }

    /// Shift of the region one entry at `level` maps.
    #[inline(always)]
    pub const fn level_shift(self, level: Level) -> u32 {
        self.shift() + (3 - level.0 as u32) * self.bits_per_level()
    }

    /// Size of the region one entry at `level` maps.
    #[inline(always)]
    pub const fn level_size(self, level: Level) -> u64 {
        1 << self.level_shift(level)
    }

    /// Whether a block (or page) descriptor is allowed at `level`.
    #[inline(always)]
    pub const fn block_allowed(self, level: Level) -> bool {
        match self {
            Granule::Size4K => level.0 >= 1 && level.0 <= 3,
        }
    }

    /// The lowest level a walk can start at for this granule.
    #[inline(always)]
    pub const fn min_level(self) -> Level {
        match self {
            Granule::Size4K => Level(0),
        }
    }

    /// Index of `addr` in a table at `level`.
    #[inline(always)]
    pub const fn index(self, addr: u64, level: Level) -> usize {
        ((addr >> self.level_shift(level)) & (self.entries() as u64 - 1)) as usize
    }

    /// The mask of output-address bits in a descriptor (bits 47:shift).
    #[inline(always)]
    pub const fn oa_mask(self) -> u64 {
        ((1u64 << 48) - 1) & !(self.size() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_k_geometry() {
        let g = Granule::Size4K;
        assert_eq!(g.size(), 4096);
        assert_eq!(g.entries(), 512);
        assert_eq!(g.level_size(Level(3)), 4096);
        assert_eq!(g.level_size(Level(2)), 2 << 20);
        assert_eq!(g.level_size(Level(1)), 1 << 30);
        assert_eq!(g.level_size(Level(0)), 512 << 30);
        assert!(!g.block_allowed(Level(0)));
        assert!(g.block_allowed(Level(1)));
        assert_eq!(g.index(0x4020_1000, Level(2)), 1);
        assert_eq!(g.index(0x4020_1000, Level(1)), 1);
        assert_eq!(g.index(0x4020_1000, Level(3)), 1);
        assert_eq!(g.oa_mask(), 0x0000_ffff_ffff_f000);
        assert_eq!(Level(2).next(), Some(Level(3)));
        assert_eq!(Level(3).next(), None);
    }
}
