//! What the host needs from the machine it runs on: memory for page tables,
//! the stage-2 environment (TLB maintenance) for its VMs in standard mode,
//! the hypercall instruction, the host process memory behind memslots, and
//! a way to enter a guest. The simulator and the real EL2 image implement
//! these; the host logic is the same on both.

use alloc::sync::Arc;
use alloc::vec::Vec;

use pkvm_arch::pte::S2Features;
use pkvm_arch::{Hva, Pa};
use pkvm_pgtable::{PageCache, PtMemory, TlbOps};

use crate::fault::GuestFault;
use crate::vcpu_state::{El1SysRegs, GuestGprs};

/// The machine services the host uses.
pub trait HostPlatform: Send + Sync {
    /// The stage-2 environment of one VMID (standard mode). It brackets a
    /// page-table update: created before the change, dropped after its TLB
    /// maintenance (the simulator's coherence checker relies on it).
    type S2Env<'a>: PtMemory + TlbOps
    where
        Self: 'a;

    /// The environment for changing the stage-2 tables of `vmid`.
    fn s2_env(&self, vmid: u16) -> Self::S2Env<'_>;

    /// Descriptor encoding features (FEAT_S2FWB).
    fn s2_features(&self) -> S2Features {
        S2Features::default()
    }

    /// `2^order` contiguous, naturally aligned, zeroed pages.
    fn alloc_pages(&self, order: u32) -> Option<Pa>;

    /// Frees pages from [`HostPlatform::alloc_pages`] (contents arbitrary).
    fn free_pages(&self, pa: Pa, order: u32);

    /// Whether the hypervisor runs in protected mode (then guest stage-2 is
    /// the hypervisor's and the host maps guest memory by hypercalls).
    fn protected_mode(&self) -> bool;

    /// Issues a hypercall from physical CPU `cpu`: x0 = function id,
    /// x1..x7 arguments; on return x0 = status, x1..x3 results.
    fn hvc(&self, cpu: usize, regs: &mut [u64; 8]);

    /// Makes vCPU `index` of the VM with `vmid` notice new requests: wake
    /// it if it sleeps, force an exit if it runs guest code.
    fn kick_vcpu(&self, vmid: u16, index: usize);
}

/// What the fault path needs to know about a VMA, taken while the process
/// memory lock is held. The reference never outlives [`ProcessMemory::with_vma`].
pub trait VmaInfo {
    /// First address.
    fn start(&self) -> Hva;
    /// One past the last address.
    fn end(&self) -> Hva;
    /// The size of one host mapping in this VMA when fully populated: 4K
    /// for normal memory, 2M for THP-eligible or hugetlb-2M, 1G for
    /// hugetlb-1G.
    fn mapping_size(&self) -> u64;
    /// hugetlbfs VMA (the size is guaranteed, not opportunistic like THP).
    fn is_hugetlb(&self) -> bool;
    /// Transparent huge pages allowed (the size is opportunistic).
    fn is_thp(&self) -> bool;
    /// Device memory without struct pages (VM_PFNMAP).
    fn is_pfnmap(&self) -> bool;
    /// The VMA allows writes.
    fn writable(&self) -> bool;
}

/// A host page reference taken by [`ProcessMemory::pin`]. Dropping it
/// releases the reference, on every path.
pub trait PinnedPage {
    /// Physical address of the page containing the faulting address.
    fn pa(&self) -> Pa;
    /// Physical address of the whole host mapping (THP/hugetlb folio).
    fn folio_pa(&self) -> Pa;
    /// Host address of the whole host mapping.
    fn folio_hva(&self) -> Hva;
    /// Size of the host mapping the page is part of.
    fn size(&self) -> u64;
    /// Whether the host mapping is writable.
    fn writable(&self) -> bool;
    /// Device memory (no struct page; not refcounted).
    fn is_device(&self) -> bool;
}

/// Why a host page could not be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinError {
    /// No VMA, or the VMA forbids the access: the VMM's memslot is broken.
    BadAddress(Hva),
    /// Out of memory.
    NoMemory,
    /// Transient (e.g. a migration in progress): the guest retries.
    Again,
}

/// The host process memory behind memslots (a userspace `mm`).
pub trait ProcessMemory: Send + Sync {
    /// The page reference type.
    type Pin: PinnedPage + Send + Sync;

    /// Runs `f` with the VMA containing `hva`, held stable for the call
    /// (under the process memory read lock, or, like Linux's per-VMA lock,
    /// through a reference to a VMA that can be unmapped meanwhile but not
    /// changed: a fault that used it then fails to pin or retries on the
    /// MMU notifier sequence). The reference's lifetime is the closure call
    /// (higher-ranked), so a VMA can never be used after it: that does not
    /// compile.
    fn with_vma<R>(&self, hva: Hva, f: impl FnOnce(Option<&dyn VmaInfo>) -> R) -> R;

    /// Faults `hva` in (for write if `write`) and takes a reference on it.
    ///
    /// # Errors
    /// See [`PinError`].
    fn pin(&self, hva: Hva, write: bool) -> Result<Self::Pin, PinError>;
}

/// A vCPU's architectural context, owned by the host's vCPU and handed to
/// the backend on each entry (the world switch loads and saves it).
#[derive(Clone, Debug, Default)]
pub struct VcpuContext {
    /// General-purpose registers, PC and PSTATE.
    pub gprs: GuestGprs,
    /// EL1 system registers.
    pub sys: El1SysRegs,
}

/// Why the guest stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// A stage-2 data or instruction abort.
    Abort {
        /// ESR_EL2.
        esr: u64,
        /// FAR_EL2.
        far: u64,
        /// HPFAR_EL2.
        hpfar: u64,
    },
    /// HVC or SMC from the guest (ESR_EL2 gives which and the immediate);
    /// the PC already points after the instruction.
    Call {
        /// ESR_EL2.
        esr: u64,
    },
    /// WFI/WFE. The backend has already stepped the PC past the
    /// instruction (the trap returns to it otherwise).
    Wfx,
    /// A physical interrupt or the preemption timer: check requests and
    /// re-enter.
    Interrupt,
    /// Any other trap the host does not emulate (ESR_EL2).
    Unhandled {
        /// ESR_EL2.
        esr: u64,
    },
    /// The simulated guest program finished.
    ProgramDone,
    /// The simulated guest detected corrupted memory (details in the
    /// backend).
    GuestCheckFailed,
}

/// What a guest entry needs to know about the VM's stage-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageTwo {
    /// Host-managed tables (standard mode).
    Host {
        /// VMID.
        vmid: u16,
        /// Root table.
        root: Pa,
        /// Geometry (for VTCR_EL2).
        geo: pkvm_arch::vtcr::S2Geometry,
    },
    /// Hypervisor-managed tables (protected mode): the vCPU is loaded on
    /// this CPU and the hypervisor enters the guest.
    Hyp {
        /// The pKVM handle.
        handle: u16,
    },
}

/// Enters a guest: the world switch on hardware, a simulated CPU in the
/// simulator.
pub trait VcpuBackend {
    /// The physical CPU this backend runs on.
    fn cpu(&self) -> usize;
    /// Runs the guest from `ctx` until it exits; `ctx` holds the state at
    /// the exit.
    fn enter(&mut self, ctx: &mut VcpuContext, s2: &StageTwo) -> GuestExit;
    /// Completes the MMIO access that caused the last exit: for a read,
    /// writes `value` to the destination register (syndrome SRT, sign
    /// extended as SSE/SF say); then steps past the instruction.
    fn complete_mmio(&mut self, ctx: &mut VcpuContext, fault: &GuestFault, value: u64);
    /// Injects a synchronous external abort for `fault` into the guest
    /// (data or instruction abort to EL1, as KVM does).
    fn inject_abort(&mut self, ctx: &mut VcpuContext, fault: &GuestFault);

    /// The vCPU was just reset (first start, `CPU_ON`, `SYSTEM_RESET`):
    /// `ctx` already holds the architectural reset values and the start
    /// state. Backends reset the state they keep outside `ctx` (FP/SIMD,
    /// timers). Called before the next [`VcpuBackend::enter`].
    fn on_reset(&mut self, _ctx: &mut VcpuContext, _start: &crate::psci::ResetState) {}
}

/// A page cache for host-managed stage-2 tables, filled from the platform
/// before any lock is taken and drained back when dropped.
pub struct HostPageCache<P: HostPlatform> {
    platform: Arc<P>,
    pages: Vec<Pa>,
}

impl<P: HostPlatform> HostPageCache<P> {
    /// An empty cache.
    pub fn new(platform: Arc<P>) -> Self {
        HostPageCache {
            platform,
            pages: Vec::new(),
        }
    }

    /// Fills the cache up to `min` pages.
    ///
    /// # Errors
    /// `Err(())` when the platform is out of memory (the cache keeps what
    /// it got).
    #[allow(clippy::result_unit_err)]
    pub fn topup(&mut self, min: usize) -> Result<(), ()> {
        while self.pages.len() < min {
            let pa = self.platform.alloc_pages(0).ok_or(())?;
            self.pages.push(pa);
        }
        Ok(())
    }

    /// Pages currently held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

impl<P: HostPlatform> PageCache for HostPageCache<P> {
    fn alloc_table(&mut self) -> Option<Pa> {
        self.pages.pop()
    }
    fn free_table(&mut self, pa: Pa) {
        self.pages.push(pa);
    }
}

impl<P: HostPlatform> Drop for HostPageCache<P> {
    fn drop(&mut self) {
        for pa in self.pages.drain(..) {
            self.platform.free_pages(pa, 0);
        }
    }
}
