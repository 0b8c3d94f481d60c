//! The error type of the hypervisor core's operations.
//!
//! Every variant except [`HypError::Internal`] is caused by the host (it
//! passed a bad value, or asked for a transition the current state does not
//! allow): the operation changed nothing and the host gets an error code.

use core::fmt;

use pkvm_arch::{Gfn, Pa};

use crate::meta::PageState;

/// Why an operation was refused. The host is at fault unless noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypError {
    /// An address the host passed is not normal memory the hyp manages.
    BadAddress {
        /// The address.
        pa: Pa,
    },
    /// A malformed argument (alignment, range, unknown bits).
    BadArgument {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The page is not in the state the transition requires.
    WrongState {
        /// The page.
        pa: Pa,
        /// Its host state.
        host: PageState,
        /// Its hyp state.
        hyp: PageState,
    },
    /// The page is pinned by the hypervisor (in use at EL2).
    Pinned {
        /// The page.
        pa: Pa,
    },
    /// A guest frame is already mapped.
    GfnMapped {
        /// The guest frame.
        gfn: Gfn,
    },
    /// A guest frame is not mapped (or not in the state required).
    GfnNotMapped {
        /// The guest frame.
        gfn: Gfn,
    },
    /// A share count would overflow.
    TooManyShares {
        /// The page.
        pa: Pa,
    },
    /// Out of memory: the hyp pool or the VM's memcache is empty (the host
    /// may top up the memcache and retry).
    NoMemory,
    /// No live VM has this handle (free, reserved, or torn down).
    NoSuchVm {
        /// The handle.
        handle: u64,
    },
    /// The VM table is full.
    TableFull,
    /// The slot is not in the reserved state this call needs.
    NotReserved {
        /// The handle.
        handle: u64,
    },
    /// The VM is referenced (a loaded vCPU or a call in flight).
    VmBusy {
        /// The handle.
        handle: u16,
    },
    /// The VM is dying: only reclaim and finalize are allowed.
    VmDying {
        /// The handle.
        handle: u16,
    },
    /// The VM is not dying (reclaim and finalize need it).
    VmNotDying {
        /// The handle.
        handle: u16,
    },
    /// The call does not apply to this kind of VM (protected vs not).
    WrongVmKind {
        /// The handle.
        handle: u16,
    },
    /// No such vCPU, or not initialised.
    NoSuchVcpu {
        /// The vCPU index.
        vcpu: u64,
    },
    /// The vCPU is already initialised.
    VcpuExists {
        /// The vCPU index.
        vcpu: u64,
    },
    /// The vCPU is loaded on another CPU.
    VcpuLoaded {
        /// The vCPU index.
        vcpu: u64,
    },
    /// This physical CPU already has a vCPU loaded.
    CpuBusy {
        /// The CPU.
        cpu: usize,
    },
    /// This physical CPU has no vCPU loaded.
    NothingLoaded {
        /// The CPU.
        cpu: usize,
    },
    /// The host touched memory it does not own: inject an abort into it.
    HostAccessDenied {
        /// The faulting address.
        pa: Pa,
    },
    /// A concurrent change got there first: retry.
    Again,
    /// A hypervisor invariant failed (a bug in this crate, not the host's
    /// doing); the operation was refused before changing anything.
    Internal(&'static str),
}

impl fmt::Display for HypError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HypError::*;
        match self {
            BadAddress { pa } => write!(f, "host passed {pa}, not managed memory"),
            BadArgument { what, value } => write!(f, "host passed a bad {what}: {value:#x}"),
            WrongState { pa, host, hyp } => {
                write!(
                    f,
                    "{pa} is host {host:?} / hyp {hyp:?}: transition not allowed"
                )
            }
            Pinned { pa } => write!(f, "{pa} is pinned by the hypervisor"),
            GfnMapped { gfn } => write!(f, "guest {gfn} is already mapped"),
            GfnNotMapped { gfn } => write!(f, "guest {gfn} is not mapped in the required state"),
            TooManyShares { pa } => write!(f, "{pa} is shared too many times"),
            NoMemory => write!(f, "out of hypervisor memory (top up the memcache)"),
            NoSuchVm { handle } => write!(f, "no live VM with handle {handle:#x}"),
            TableFull => write!(f, "the VM table is full"),
            NotReserved { handle } => write!(f, "handle {handle:#x} is not a reserved slot"),
            VmBusy { handle } => write!(f, "VM {handle:#x} is in use"),
            VmDying { handle } => write!(f, "VM {handle:#x} is being torn down"),
            VmNotDying { handle } => write!(f, "VM {handle:#x} is not being torn down"),
            WrongVmKind { handle } => write!(f, "call not allowed for VM {handle:#x}'s kind"),
            NoSuchVcpu { vcpu } => write!(f, "no initialised vCPU {vcpu}"),
            VcpuExists { vcpu } => write!(f, "vCPU {vcpu} is already initialised"),
            VcpuLoaded { vcpu } => write!(f, "vCPU {vcpu} is loaded on another CPU"),
            CpuBusy { cpu } => write!(f, "CPU {cpu} already has a vCPU loaded"),
            NothingLoaded { cpu } => write!(f, "CPU {cpu} has no vCPU loaded"),
            HostAccessDenied { pa } => write!(f, "host access to {pa} denied"),
            Again => write!(f, "try again"),
            Internal(m) => write!(f, "hypervisor bug: {m}"),
        }
    }
}
