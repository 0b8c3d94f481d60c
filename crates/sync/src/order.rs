//! The global lock order.

/// Lock classes, outermost first. A thread may only acquire a lock whose
/// class is strictly greater than every class it already holds (two locks
/// of one class only through [`crate::SpinLock::lock_two`]).
///
/// Hypervisor order (pKVM): VM table -> host MMU -> hyp page table -> VM ->
/// page pools. Host order (KVM): VM config -> memslots -> MMU -> vCPU power
/// state -> host page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum LockClass {
    /// Host: per-VM configuration and lifecycle (`kvm->lock`).
    HostVm = 0,
    /// Host: memslot updates (`kvm->slots_lock`).
    HostSlots = 1,
    /// Host: the VM's stage-2 MMU (`kvm->mmu_lock`).
    HostMmu = 2,
    /// Host: a vCPU's power state (`vcpu->arch.mp_state_lock`).
    HostVcpu = 3,
    /// Host: one shard of a protected-mode VM's table of hypervisor
    /// mappings (taken under the MMU lock, read or write).
    HostMmuShard = 4,
    /// Hyp: the VM table (`vm_table_lock`).
    HypVmTable = 10,
    /// Hyp: the host's stage-2 (`host_mmu.lock`).
    HypHostMmu = 11,
    /// Hyp: the hypervisor's own page table (`pkvm_pgd_lock`).
    HypPgtable = 12,
    /// Hyp: one VM's state and stage-2 (`vm->lock`).
    HypVm = 13,
    /// Hyp: a page pool (`pool->lock`).
    HypPool = 14,
    /// Leaf locks that never nest (statistics, consoles).
    Leaf = 255,
}

#[cfg(all(feature = "std", debug_assertions, not(loom)))]
mod checker {
    use super::LockClass;
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        static HELD: RefCell<Vec<LockClass>> = const { RefCell::new(Vec::new()) };
    }

    pub fn acquire(class: LockClass, same_class_ok: bool) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(&top) = h.iter().max() {
                let ok = class > top || (same_class_ok && class == top);
                assert!(
                    ok,
                    "lock order violation: acquiring {class:?} while holding {top:?} \
                     (order: VM table -> host MMU -> hyp page table -> VM -> pools)"
                );
            }
            h.push(class);
        });
    }

    pub fn release(class: LockClass) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(pos) = h.iter().rposition(|c| *c == class) {
                h.remove(pos);
            }
        });
    }

    pub fn held() -> usize {
        HELD.with(|h| h.borrow().len())
    }
}

#[cfg(not(all(feature = "std", debug_assertions, not(loom))))]
mod checker {
    use super::LockClass;
    #[inline(always)]
    pub fn acquire(_class: LockClass, _same_class_ok: bool) {}
    #[inline(always)]
    pub fn release(_class: LockClass) {}
    #[inline(always)]
    pub fn held() -> usize {
        0
    }
}

pub(crate) use checker::{acquire, release};

/// Number of checked locks the current thread holds (always 0 when checking
/// is compiled out). Tests assert it is 0 between hypercalls.
pub fn held_classes() -> usize {
    checker::held()
}
