//! Translation regimes: what differs between stage-2 and EL2 stage-1 is the
//! address type and the attribute encoding; the walker is shared.

use pkvm_arch::pte::{El2Prot, El2Pte, S2Features, S2Prot, S2Pte};
use pkvm_arch::{Ipa, Va};

/// An input address of a translation regime.
pub trait Address: Copy + core::fmt::Debug {
    /// The raw value.
    fn to_raw(self) -> u64;
    /// From a raw value.
    fn from_raw(raw: u64) -> Self;
}

impl Address for Ipa {
    #[inline(always)]
    fn to_raw(self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn from_raw(raw: u64) -> Self {
        Ipa(raw)
    }
}

impl Address for Va {
    #[inline(always)]
    fn to_raw(self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn from_raw(raw: u64) -> Self {
        Va(raw)
    }
}

/// A translation regime.
pub trait Regime {
    /// Input address type.
    type Addr: Address;
    /// Protection type.
    type Prot: Copy + core::fmt::Debug + PartialEq;
    /// Leaf attribute bits for `prot`.
    fn leaf_attrs(prot: Self::Prot, feat: S2Features) -> u64;
    /// Decoded protection of a valid leaf.
    fn prot_of(pte: u64, feat: S2Features) -> Self::Prot;
    /// Whether `prot` maps cacheable normal memory (needs D-cache clean
    /// before first mapping when the CPU lacks FWB).
    fn cacheable(prot: Self::Prot) -> bool;
    /// Whether `prot` is executable (needs I-cache invalidation).
    fn executable(prot: Self::Prot) -> bool;
    /// Whether `prot` can be expressed (e.g. stage-2 W without R is fine;
    /// EL2 needs R).
    fn valid_prot(prot: Self::Prot) -> bool;
}

/// Stage-2: IPA -> PA for guests and the host.
#[derive(Debug)]
pub struct Stage2;

/// The hypervisor's own EL2 stage-1 address space.
#[derive(Debug)]
pub struct El2;

impl Regime for Stage2 {
    type Addr = Ipa;
    type Prot = S2Prot;
    #[inline(always)]
    fn leaf_attrs(prot: S2Prot, feat: S2Features) -> u64 {
        S2Pte::leaf_attrs(prot, feat)
    }
    #[inline(always)]
    fn prot_of(pte: u64, feat: S2Features) -> S2Prot {
        S2Pte(pte).prot(feat)
    }
    #[inline(always)]
    fn cacheable(prot: S2Prot) -> bool {
        !prot.intersects(S2Prot::DEVICE.union(S2Prot::NORMAL_NC))
    }
    #[inline(always)]
    fn executable(prot: S2Prot) -> bool {
        prot.contains(S2Prot::X)
    }
    #[inline(always)]
    fn valid_prot(prot: S2Prot) -> bool {
        // Executable device memory makes no sense at stage-2.
        !prot.contains(S2Prot::DEVICE) || !prot.intersects(S2Prot::X.union(S2Prot::NORMAL_NC))
    }
}

impl Regime for El2 {
    type Addr = Va;
    type Prot = El2Prot;
    #[inline(always)]
    fn leaf_attrs(prot: El2Prot, _feat: S2Features) -> u64 {
        El2Pte::leaf_attrs(prot)
    }
    #[inline(always)]
    fn prot_of(pte: u64, _feat: S2Features) -> El2Prot {
        El2Pte(pte).prot()
    }
    #[inline(always)]
    fn cacheable(prot: El2Prot) -> bool {
        !prot.intersects(El2Prot::DEVICE.union(El2Prot::NORMAL_NC))
    }
    #[inline(always)]
    fn executable(prot: El2Prot) -> bool {
        prot.contains(El2Prot::X)
    }
    #[inline(always)]
    fn valid_prot(prot: El2Prot) -> bool {
        prot.contains(El2Prot::R)
            && !(prot.contains(El2Prot::W) && prot.contains(El2Prot::X))
            && !(prot.contains(El2Prot::DEVICE) && prot.contains(El2Prot::X))
    }
}
