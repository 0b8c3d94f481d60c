//! The trusted hypervisor core of pkvm-rs (the pKVM role at EL2).
//!
//! # Trust boundary
//! In protected mode the hypervisor is the only trusted party. **The host
//! kernel is hostile**: every value it passes through a hypercall (handles,
//! pfns, gfns, sizes, alignment, permissions, the ownership of the pages it
//! names) is validated where it enters ([`hvc`], then each operation), and a
//! bad value gets an error code and changes nothing. Nothing the host can do
//! makes this crate panic; panics are reserved for broken internal
//! invariants (hypervisor bugs), and say which.
//!
//! # What is here
//! - [`pool`]: the hyp's page pool, a buddy allocator over a fixed range
//!   with per-page metadata ([`meta`]); no heap allocator anywhere.
//! - [`mem_protect`]: page ownership (host / hyp / guest states) and the
//!   transitions between them; the host's lazily built identity stage-2;
//!   the hypervisor's own EL2 stage-1 (built with `pkvm-pgtable`'s EL2
//!   regime), which maps exactly the pages the hyp owns or borrows, and
//!   changes with their ownership.
//! - [`vm`]: the VM table (reserved handles, lifecycle, loaded vCPUs) and
//!   the hyp's per-VM state with its stage-2 (built with `pkvm-pgtable`).
//! - [`hvc`]: hypercall ids, typed one-read-per-register decoding, return
//!   codes and the single dispatcher [`Hyp::handle_host_hvc`].
//! - [`platform`]: the narrow machine interface ([`HypPlatform`]) the
//!   boot image and the simulator implement.
//!
//! # Invariants
//! - Every page of the managed range is in exactly one consistent state
//!   across host, hyp and guests (table in [`mem_protect`]); transitions
//!   check every precondition and reserve every table page before they
//!   change anything, so a refused call leaves no trace.
//! - Lookups by handle never see a reserved or torn-down slot; a VM cannot
//!   be torn down while referenced (a loaded vCPU or a call in flight).
//! - Locks are only held through guards ([`pkvm_sync::SpinLock`]), so no
//!   early return leaks one, and no lock is held between hypercalls.
//!
//! # Lock order (outermost first)
//! VM table (`HypVmTable`) -> host MMU (`HypHostMmu`) -> hyp page table
//! (`HypPgtable`) -> one VM (`HypVm`) -> page pool (`HypPool`). The classes
//! are defined once in [`pkvm_sync::LockClass`] and checked in debug builds.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod error;
pub mod hvc;
mod hyp;
pub mod mem_protect;
pub mod meta;
pub mod platform;
pub mod pool;
pub mod vm;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;
#[cfg(all(test, not(loom)))]
mod testutil;

pub use error::HypError;
pub use hvc::{HostCall, HVC_REGS};
pub use hyp::{
    Hyp, HypConfig, HypStats, HANDLE_BASE, HOST_DEV_TABLES, MAX_CPUS, MAX_REGIONS, MAX_TOPUP_PAGES,
    MAX_VCPUS, MAX_VMS, OWNER_HYP, VCPU_PAGES, VM_PAGES,
};
pub use mem_protect::HostAccess;
pub use meta::{MemMap, PageMeta, PageState};
pub use platform::{HypPlatform, MemRegion};
pub use pool::{HypPool, PoolError, MAX_ORDER};
pub use vm::{VcpuContext, VmConfig, VmTable};
