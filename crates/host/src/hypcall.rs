//! Typed wrappers of the pKVM hypercalls the host makes (protected mode).
//! The only way the host talks to the hypervisor: ids and status codes come
//! from the hypervisor's ABI module, every call goes through
//! [`HostPlatform::hvc`].

use core::fmt;

use pkvm_arch::pte::S2Prot;
use pkvm_arch::{Gfn, Pfn};
use pkvm_hyp::hvc::{id, ret};

use crate::platform::HostPlatform;

/// A failed hypercall: the function and the status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypCallError {
    /// Function name.
    pub call: &'static str,
    /// Status returned in x0.
    pub status: i64,
}

impl HypCallError {
    /// The hypervisor asked to retry.
    pub fn is_again(&self) -> bool {
        self.status == ret::AGAIN
    }
    /// The hypervisor's memcache (or pool) ran dry.
    pub fn is_no_memory(&self) -> bool {
        self.status == ret::NO_MEMORY
    }
    /// The mapping already exists.
    pub fn is_exists(&self) -> bool {
        self.status == ret::EXISTS
    }
}

impl fmt::Display for HypCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hypercall {} failed with status {}",
            self.call, self.status
        )
    }
}

/// Hypercall results: x1..x3.
pub type HypResult = Result<[u64; 3], HypCallError>;

/// Makes one hypercall.
pub fn call<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    name: &'static str,
    func: u32,
    args: &[u64],
) -> HypResult {
    let mut regs = [0u64; 8];
    regs[0] = func as u64;
    regs[1..=args.len()].copy_from_slice(args);
    p.hvc(cpu, &mut regs);
    let status = regs[0] as i64;
    if status == ret::SUCCESS {
        Ok([regs[1], regs[2], regs[3]])
    } else {
        Err(HypCallError { call: name, status })
    }
}

fn prot_bits(p: S2Prot) -> u64 {
    (p & S2Prot::PERMS).bits() as u64
}

/// `RESERVE_VM` -> handle.
pub fn reserve_vm<P: HostPlatform + ?Sized>(p: &P, cpu: usize) -> Result<u16, HypCallError> {
    call(p, cpu, "reserve_vm", id::RESERVE_VM, &[]).map(|r| r[0] as u16)
}
/// `UNRESERVE_VM`.
pub fn unreserve_vm<P: HostPlatform + ?Sized>(p: &P, cpu: usize, handle: u16) -> HypResult {
    call(p, cpu, "unreserve_vm", id::UNRESERVE_VM, &[handle as u64])
}
/// `GET_SIZES` -> (VM pages, vCPU pages, stage-2 root pages).
pub fn get_sizes<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    ipa_bits: u32,
) -> Result<(u64, u64, u64), HypCallError> {
    call(p, cpu, "get_sizes", id::GET_SIZES, &[ipa_bits as u64]).map(|r| (r[0], r[1], r[2]))
}
/// `INIT_VM`.
pub fn init_vm<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    vm: Pfn,
    root: Pfn,
    config: u64,
) -> HypResult {
    call(
        p,
        cpu,
        "init_vm",
        id::INIT_VM,
        &[handle as u64, vm.0, root.0, config],
    )
}
/// `INIT_VCPU`.
pub fn init_vcpu<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    index: usize,
    state: Pfn,
) -> HypResult {
    call(
        p,
        cpu,
        "init_vcpu",
        id::INIT_VCPU,
        &[handle as u64, index as u64, state.0],
    )
}
/// `TOPUP_MEMCACHE` with `n` contiguous pages from `first`.
pub fn topup_memcache<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    first: Pfn,
    n: u64,
) -> HypResult {
    call(
        p,
        cpu,
        "topup_memcache",
        id::TOPUP_MEMCACHE,
        &[handle as u64, first.0, n],
    )
}
/// `VCPU_LOAD`.
pub fn vcpu_load<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    index: usize,
) -> HypResult {
    call(
        p,
        cpu,
        "vcpu_load",
        id::VCPU_LOAD,
        &[handle as u64, index as u64],
    )
}
/// `VCPU_PUT`.
pub fn vcpu_put<P: HostPlatform + ?Sized>(p: &P, cpu: usize) -> HypResult {
    call(p, cpu, "vcpu_put", id::VCPU_PUT, &[])
}
/// `HOST_SHARE_GUEST` (loaded non-protected VM).
pub fn share_guest<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    pfn: Pfn,
    gfn: Gfn,
    prot: S2Prot,
) -> HypResult {
    call(
        p,
        cpu,
        "host_share_guest",
        id::HOST_SHARE_GUEST,
        &[pfn.0, gfn.0, prot_bits(prot)],
    )
}
/// `HOST_DONATE_GUEST` (loaded protected VM).
pub fn donate_guest<P: HostPlatform + ?Sized>(p: &P, cpu: usize, pfn: Pfn, gfn: Gfn) -> HypResult {
    call(
        p,
        cpu,
        "host_donate_guest",
        id::HOST_DONATE_GUEST,
        &[pfn.0, gfn.0],
    )
}
/// `HOST_UNSHARE_GUEST`.
pub fn unshare_guest<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    gfn: Gfn,
) -> HypResult {
    call(
        p,
        cpu,
        "host_unshare_guest",
        id::HOST_UNSHARE_GUEST,
        &[handle as u64, gfn.0],
    )
}
/// `RELAX_PERMS_GUEST` (loaded VM).
pub fn relax_perms_guest<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    gfn: Gfn,
    prot: S2Prot,
) -> HypResult {
    call(
        p,
        cpu,
        "relax_perms_guest",
        id::RELAX_PERMS_GUEST,
        &[gfn.0, prot_bits(prot)],
    )
}
/// `MKYOUNG_GUEST`.
pub fn mkyoung_guest<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    gfn: Gfn,
) -> HypResult {
    call(
        p,
        cpu,
        "mkyoung_guest",
        id::MKYOUNG_GUEST,
        &[handle as u64, gfn.0],
    )
}
/// `TEST_CLEAR_YOUNG_GUEST` -> young.
pub fn test_clear_young_guest<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    gfn: Gfn,
    npages: u64,
    clear: bool,
) -> Result<bool, HypCallError> {
    call(
        p,
        cpu,
        "test_clear_young_guest",
        id::TEST_CLEAR_YOUNG_GUEST,
        &[handle as u64, gfn.0, npages, clear as u64],
    )
    .map(|r| r[0] != 0)
}
/// `START_TEARDOWN`.
pub fn start_teardown<P: HostPlatform + ?Sized>(p: &P, cpu: usize, handle: u16) -> HypResult {
    call(
        p,
        cpu,
        "start_teardown",
        id::START_TEARDOWN,
        &[handle as u64],
    )
}
/// `RECLAIM_GUEST_PAGE`.
pub fn reclaim_guest_page<P: HostPlatform + ?Sized>(
    p: &P,
    cpu: usize,
    handle: u16,
    gfn: Gfn,
) -> HypResult {
    call(
        p,
        cpu,
        "reclaim_guest_page",
        id::RECLAIM_GUEST_PAGE,
        &[handle as u64, gfn.0],
    )
}
/// `FINALIZE_TEARDOWN`.
pub fn finalize_teardown<P: HostPlatform + ?Sized>(p: &P, cpu: usize, handle: u16) -> HypResult {
    call(
        p,
        cpu,
        "finalize_teardown",
        id::FINALIZE_TEARDOWN,
        &[handle as u64],
    )
}
