//! Typed addresses. Each address space has its own newtype; converting
//! between spaces is always an explicit, named operation.

use core::fmt;
use core::ops::{Add, Sub};

use crate::granule::{PAGE_SHIFT, PAGE_SIZE};

macro_rules! address {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            #[inline(always)]
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// Whether the address is aligned to `align` (a power of two).
            #[inline(always)]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// Rounds down to `align` (a power of two).
            #[inline(always)]
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
            /// Rounds up to `align` (a power of two); `None` on overflow.
            #[inline(always)]
            pub const fn checked_align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }
            /// Offset inside the 4K page.
            #[inline(always)]
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
            /// `self + off`, or `None` on overflow.
            #[inline(always)]
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, rhs: u64) -> Self {
                Self(self.0 + rhs)
            }
        }

        impl Sub<$name> for $name {
            type Output = u64;
            #[inline(always)]
            fn sub(self, rhs: $name) -> u64 {
                self.0 - rhs.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, " {:#x}"), self.0)
            }
        }
    };
}

macro_rules! frame {
    ($(#[$m:meta])* $name:ident, $addr:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw frame number.
            #[inline(always)]
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// The address of the first byte of the frame.
            #[inline(always)]
            pub const fn addr(self) -> $addr {
                $addr(self.0 << PAGE_SHIFT)
            }
        }

        impl $addr {
            /// The 4K frame containing this address.
            #[inline(always)]
            pub const fn frame(self) -> $name {
                $name(self.0 >> PAGE_SHIFT)
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, rhs: u64) -> Self {
                Self(self.0 + rhs)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, " {:#x}"), self.0)
            }
        }
    };
}

address!(
    /// A physical address (the output of stage-2, or of the host's identity map).
    Pa,
    "Pa"
);
address!(
    /// An intermediate physical address: what a guest believes is physical.
    Ipa,
    "Ipa"
);
address!(
    /// A host virtual address: the userspace mapping behind a memslot.
    Hva,
    "Hva"
);
address!(
    /// A virtual address in the hypervisor's own (EL2 stage-1) address space.
    Va,
    "Va"
);
frame!(
    /// A physical frame number (`Pa >> 12`).
    Pfn,
    Pa,
    "Pfn"
);
frame!(
    /// A guest frame number (`Ipa >> 12`).
    Gfn,
    Ipa,
    "Gfn"
);

impl Pa {
    /// The physical frame number of this address (same as [`Pa::frame`]).
    #[inline(always)]
    pub const fn pfn(self) -> Pfn {
        self.frame()
    }
}

impl Ipa {
    /// The guest frame number of this address (same as [`Ipa::frame`]).
    #[inline(always)]
    pub const fn gfn(self) -> Gfn {
        self.frame()
    }
    /// The identity conversion used by the host's own stage-2, where IPA == PA.
    #[inline(always)]
    pub const fn identity_pa(self) -> Pa {
        Pa(self.0)
    }
}

impl Pa {
    /// The identity conversion used by the host's own stage-2, where IPA == PA.
    #[inline(always)]
    pub const fn identity_ipa(self) -> Ipa {
        Ipa(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_conversions_round_trip() {
        let pa = Pa(0x4000_1234);
        assert_eq!(pa.pfn(), Pfn(0x40001));
        assert_eq!(pa.pfn().addr(), Pa(0x4000_1000));
        assert_eq!(Ipa(0x2000).gfn().addr(), Ipa(0x2000));
        assert_eq!(pa.page_offset(), 0x234);
    }

    #[test]
    fn alignment_helpers() {
        assert!(Ipa(0x20_0000).is_aligned(0x20_0000));
        assert!(!Ipa(0x20_1000).is_aligned(0x20_0000));
        assert_eq!(Ipa(0x20_1000).align_down(0x20_0000), Ipa(0x20_0000));
        assert_eq!(
            Ipa(0x20_1000).checked_align_up(0x20_0000),
            Some(Ipa(0x40_0000))
        );
        assert_eq!(Ipa(u64::MAX).checked_align_up(0x1000), None);
        assert_eq!(Pa(u64::MAX).checked_add(1), None);
    }
}
