//! Stage-2 and EL2 stage-1 page tables for pkvm-rs.
//!
//! One generic walker ([`walk`]) drives every operation; map, unmap,
//! wrprotect, relax_perms, mkyoung, test_clear_young, split, annotate and
//! destroy are visitors over it. The same walker builds the hypervisor's own
//! EL2 stage-1 tables ([`El2`] regime).
//!
//! # Invariants
//! - Table pages come only from a caller-filled [`PageCache`]; a walk never
//!   allocates, and fails with [`PtError::NoMemory`] when the cache runs dry,
//!   leaving the table consistent (every entry is either its old or new value).
//! - A valid entry is only ever changed through one break/make pair
//!   (`break_pte`/`make_pte` in [`walk`]) that locks the entry, invalidates the
//!   TLB for the old translation, then publishes the new entry with release
//!   ordering. The only exception is a permission relaxation or access-flag
//!   set, which the architecture allows in place.
//! - Every non-zero entry holds a reference on the table page that contains
//!   it ([`PtMemory::refcount`]); a table whose count reaches zero is empty
//!   and is returned to the cache by exclusive walks.
//! - Exclusivity is in the type system: operations on `&mut PageTable` are
//!   exclusive walks (plain stores; the caller holds the MMU lock for write);
//!   [`PageTable::shared`] gives the operations that may run concurrently
//!   (compare-exchange updates; a lost race returns [`PtError::Again`]).
//! - Caller input never panics: every error is a typed [`PtError`].
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod env;
pub mod error;
pub mod regime;
pub mod table;
pub mod walk;

pub use env::{PageCache, PtMemory, SplitEnv, TlbOps};
pub use error::PtError;
pub use regime::{El2, Regime, Stage2};
pub use table::{Leaf, MapFlags, PageTable, SharedPageTable};
