//! The hypervisor's statics whose code lives in `vmm/` (which forbids
//! `unsafe`, and so `#[link_section]`): kept here in the hypervisor's own
//! data (`.data.hyp.*`, `link.ld`), never in the host's `.data`/`.bss`,
//! so the host stage-2 never maps them.

use pkvm_sync::{LockClass, SpinLock};
use pkvm_sysreg::VcpuSysregs;

use crate::vmm::el1host::NullGuest;
use crate::vmm::platform::BootHyp;
use crate::vmm::vcpurun::Table;

/// The hypervisor of this boot, once `vmm::platform::init_hyp` ran.
#[link_section = ".data.hyp.vmm_hyp"]
pub static HYP: SpinLock<Option<&'static BootHyp>> = SpinLock::new(None, LockClass::Leaf);

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
