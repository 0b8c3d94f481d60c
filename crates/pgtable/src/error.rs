//! Page-table errors.

use core::fmt;

/// Why a page-table operation failed. Every variant leaves the table
/// consistent (old or new value in every entry, no leaked table page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtError {
    /// The range is outside the table's input address space.
    OutOfRange {
        /// Start of the offending range.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// An address or size is not aligned to the page size.
    Misaligned {
        /// The offending value.
        value: u64,
    },
    /// The page cache ran dry; refill it and retry.
    NoMemory,
    /// Lost a race with a concurrent walker, or the mapping already exists:
    /// the caller retries (a guest re-executes the instruction).
    Again,
    /// The range is already mapped (for map operations that must not replace).
    AlreadyMapped {
        /// Input address of the existing mapping.
        addr: u64,
    },
    /// Nothing is mapped at the address.
    NotMapped {
        /// The input address.
        addr: u64,
    },
    /// The requested permissions or attributes cannot be expressed.
    InvalidProt,
    /// The operation is not allowed in a shared walk (it would free tables).
    NeedsExclusive,
}

impl fmt::Display for PtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PtError::OutOfRange { addr, size } => {
                write!(f, "range {addr:#x}+{size:#x} is outside the address space")
            }
            PtError::Misaligned { value } => write!(f, "{value:#x} is not page aligned"),
            PtError::NoMemory => write!(f, "page-table cache is empty"),
            PtError::Again => write!(f, "lost a race or mapping exists; retry"),
            PtError::AlreadyMapped { addr } => write!(f, "{addr:#x} is already mapped"),
            PtError::NotMapped { addr } => write!(f, "{addr:#x} is not mapped"),
            PtError::InvalidProt => write!(f, "invalid protection"),
            PtError::NeedsExclusive => write!(f, "operation needs an exclusive walk"),
        }
    }
}
