//! The simulated platform: `pkvm-hyp` and `pkvm-host` running on the
//! `pkvm-sim` machine.
//!
//! - [`platform::SimPlatform`] implements the host's
//!   [`HostPlatform`](pkvm_host::HostPlatform) (frames from the machine's
//!   host allocator, stage-2 environments that bracket every update for the
//!   coherence checker, the HVC instruction into an in-process
//!   [`pkvm_hyp::Hyp`] in protected mode, vCPU kicks).
//! - [`platform::SimHyp`] implements the hypervisor's
//!   [`HypPlatform`](pkvm_hyp::HypPlatform) over the same machine.
//! - [`process::SimProcess`] adapts the simulated process memory to the
//!   host's [`ProcessMemory`](pkvm_host::ProcessMemory), and
//!   [`process::VmNotifier`] routes its MMU-notifier events to a VM.
//! - [`backend::SimBackend`] enters guests on a simulated CPU
//!   ([`VcpuBackend`](pkvm_host::VcpuBackend)).
//! - [`demand_paging`]: KVM's `demand_paging_test` on this platform.
//! - [`access_tracking`]: KVM's `access_tracking_perf_test` (idle-page
//!   tracking through the age notifier).
//! - [`dirty_log_perf`]: KVM's `dirty_log_perf_test` (dirty logging,
//!   manual protect, eager page splitting, verified bitmaps).
//! - [`memslot_perf`]: KVM's `memslot_perf_test` (map, unmap, moves of
//!   inactive and active slots, read/write).
//! - [`nested_demand_paging`]: an L2 guest paging in through a shadow
//!   stage-2 built from an emulated guest hypervisor's tables.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod access_tracking;
pub mod backend;
pub mod demand_paging;
pub mod dirty_log_perf;
pub mod memslot_perf;
pub mod nested_demand_paging;
pub mod platform;
pub mod process;

pub use backend::SimBackend;
pub use platform::{Mode, SimPlatform};
pub use process::{SimProcess, VmNotifier};

/// The host VM type on the simulated platform.
pub type SimVm = pkvm_host::Vm<SimPlatform, SimProcess>;
/// A host vCPU on the simulated platform.
pub type SimVcpu = pkvm_host::Vcpu<SimPlatform, SimProcess>;
