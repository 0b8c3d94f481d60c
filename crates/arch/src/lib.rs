//! Architecture definitions shared by every pkvm-rs crate.
//!
//! This crate is `no_std`, allocation-free and contains no `unsafe`: it is pure
//! encoding and decoding of what the ARMv8-A architecture defines.
//!
//! - [`addr`]: newtypes for every address space (`Pa`, `Ipa`, `Hva`, `Pfn`,
//!   `Gfn`, `Va`); conversions between them are explicit.
//! - [`granule`]: translation granule and level geometry.
//! - [`pte`]: stage-2 and EL2 stage-1 descriptor encoding (separate attribute
//!   types per translation regime: the same bit means different things).
//! - [`vtcr`]: `VTCR_EL2` computation from the IPA size and `PARange`.
//! - [`esr`]: `ESR_EL2` syndrome decoding/encoding, `HPFAR_EL2`/`FAR_EL2`.
//! - [`smccc`]: SMCCC and PSCI function identifiers and return codes.
//! - [`image`]: the Linux arm64 `Image` header and guest file placement
//!   (checked arithmetic on the file's hostile fields).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod addr;
pub mod esr;
pub mod granule;
pub mod image;
pub mod pte;
pub mod smccc;
pub mod vtcr;

pub use addr::{Gfn, Hva, Ipa, Pa, Pfn, Va};
pub use granule::{Granule, Level, PAGE_SHIFT, PAGE_SIZE};
