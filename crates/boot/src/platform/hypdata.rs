//! The hypervisor's statics whose code lives in `vmm/` (which forbids
//! `unsafe`, and so `#[link_section]`): kept here in the hypervisor's own
//! data (`.data.hyp.*`, `link.ld`), never in the host's `.data`/`.bss`,
//! so the host stage-2 never maps them.
//!
//! [`audit`] checks, before the hypervisor is set up, that every static
//! the hypervisor decides by (these and those of the other `platform`
//! modules) lies in its own data: a static that lost its
//! `#[link_section]` would be host memory.

use pkvm_sync::{LockClass, SpinLock};
use pkvm_sysreg::VcpuSysregs;

use crate::vmm::el1host::NullGuest;
use crate::vmm::platform::BootHyp;
use crate::vmm::vcpurun::Table;

/// The hypervisor the host's HVCs reach (set by `init_hyp` before
/// `FINALIZE`).
#[link_section = ".data.hyp.hvc_target"]
pub static HVC_TARGET: SpinLock<Option<&'static BootHyp>> = SpinLock::new(None, LockClass::Leaf);

/// `VCPU_RUN`'s table of protected vCPUs (`vmm::vcpurun`), in the
/// hypervisor's own memory once placed.
#[link_section = ".data.hyp.vcpu_table"]
pub(crate) static VCPU_TABLE: SpinLock<Option<&'static Table>> =
    SpinLock::new(None, LockClass::Leaf);

/// Per slot of [`VCPU_TABLE`], its vCPU's trapped system registers, in
/// the hypervisor's own memory once placed.
#[link_section = ".data.hyp.vcpu_sysregs"]
pub(crate) static VCPU_SYSREGS: SpinLock<Option<&'static [SpinLock<VcpuSysregs>]>> =
    SpinLock::new(None, LockClass::Leaf);

/// The guest `NULL_RUN` runs (`vmm::el1host`): its registers (stage-2,
/// trap controls) decide how the hypervisor runs it.
#[link_section = ".data.hyp.null_guest"]
pub(crate) static NULL_GUEST: SpinLock<Option<NullGuest>> = SpinLock::new(None, LockClass::Leaf);

/// Every static of the hypervisor with its address.
fn statics() -> impl Iterator<Item = (&'static str, u64)> {
    let here = [
        (
            "hypdata::HVC_TARGET",
            core::ptr::from_ref(&HVC_TARGET) as u64,
        ),
        (
            "hypdata::VCPU_TABLE",
            core::ptr::from_ref(&VCPU_TABLE) as u64,
        ),
        (
            "hypdata::VCPU_SYSREGS",
            core::ptr::from_ref(&VCPU_SYSREGS) as u64,
        ),
        (
            "hypdata::NULL_GUEST",
            core::ptr::from_ref(&NULL_GUEST) as u64,
        ),
    ];
    here.into_iter()
        .chain(super::mmu::hyp_statics())
        .chain(super::start::hyp_statics())
        .chain(super::hypmem::hyp_statics())
        .chain(super::idregs::hyp_statics())
        .chain(super::hvc::hyp_statics())
        .chain(super::hw::hyp_statics())
        .chain(super::gic::hyp_statics())
        .chain(super::console::hyp_statics())
        .chain(super::hostrun::hyp_statics())
        .chain(super::pview::hyp_statics())
        .chain(super::el1boot::hyp_statics())
}

/// Checks that every static of the hypervisor lies in its own data
/// (`[__hyp_data_start, __hyp_data_end)`): the number checked, or the
/// first one outside (name, address).
///
/// # Errors
/// The first static outside the hypervisor's data.
pub fn audit() -> Result<usize, (&'static str, u64)> {
    let (start, end) = super::hypmem::image_parts().hyp;
    let mut n = 0;
    for (name, addr) in statics() {
        if !(start..end).contains(&addr) {
            return Err((name, addr));
        }
        n += 1;
    }
    Ok(n)
}
