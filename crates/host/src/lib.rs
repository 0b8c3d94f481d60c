//! The host side of pkvm-rs (the KVM role): VMs, vCPUs, memslots, the guest
//! fault pipeline, MMU notifiers, PSCI, and the run loop.
//!
//! `no_std` + `alloc`, so the real EL2 image uses the same code as the
//! simulator. Everything machine-specific is behind the traits in
//! [`platform`]: [`platform::HostPlatform`] (page allocation, stage-2 TLB
//! maintenance, the hypercall instruction), [`platform::ProcessMemory`]
//! (the userspace memory behind memslots) and [`platform::VcpuBackend`]
//! (entering a guest).
//!
//! Modules:
//! - [`vm`]: VM creation (the pKVM handle is reserved at creation in
//!   protected mode), memslots, MMU notifiers, single-owner teardown.
//! - [`vcpu`]: the run loop and guest abort handling.
//! - [`pipeline`]: the memory fault pipeline, one function per step.
//! - [`fault`]: the immutable architectural fault description.
//! - [`memslot`]: KVM memslot validation.
//! - [`dirty`]: dirty logging (bitmaps, get/clear, manual protect, eager
//!   page splitting).
//! - [`nested`]: shadow stage-2 MMUs for a guest hypervisor's guests.
//! - [`hypcall`]: typed pKVM hypercalls (the only way the host talks to
//!   the hypervisor).
//! - [`psci`], [`reset`], [`vcpu_state`]: PSCI emulation, vCPU reset and
//!   register files.
//!
//! # Lock order (host)
//! `HostVm` (hyp VM init state) -> `HostSlots` (memslots) -> `HostMmu`
//! (stage-2) -> `HostVcpu` (power state) -> `HostMmuShard` (a protected VM's
//! mapping table shard, under the MMU lock). Memslots are copied out and the
//! lock dropped before the fault path pins a page; the invalidation
//! sequence, sampled before the memslot lookup, catches a slot deleted in
//! between (or switched to dirty logging). The dirty bitmaps' map is a leaf
//! lock (taken under the slots lock when a slot starts logging; nothing is
//! taken under it).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;

pub mod dirty;
pub mod fault;
#[cfg(all(test, not(loom)))]
mod fault_tests;
pub mod hypcall;
mod loom_shim;
#[cfg(all(test, loom))]
mod loom_tests;
pub mod memslot;
mod mmu;
pub mod nested;
pub mod pipeline;
pub mod platform;
pub mod psci;
pub mod reset;
#[cfg(all(test, loom))]
mod system_event_loom;
#[cfg(test)]
mod testkit;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vmid;

pub use platform::{
    GuestExit, HostPlatform, PinError, PinnedPage, ProcessMemory, StageTwo, VcpuBackend,
    VcpuContext, VmaInfo,
};
pub use vcpu::{RunError, Vcpu, VcpuExit};
pub use vm::{Stat, Vm, VmConfig, VmError, VmStats, VmStatsSnapshot};
