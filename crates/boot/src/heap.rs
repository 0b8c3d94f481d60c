//! The image's global allocator: `linked_list_allocator`'s spin-locked heap
//! over a fixed range of RAM handed over once at boot ([`init`]).
//!
//! pkvm-host needs `alloc` (VMs are `Arc`s, memslot copies and protected
//! mappings live in `Vec`/`BTreeMap`). The heap is a range of RAM outside
//! the image, the handoff area, the host page pool and the hypervisor's
//! carve-out (see `vmm::Layout`), identity-mapped read-write at EL2. It is
//! the VMM's (host memory in protected mode, reachable by the host at
//! EL1): the hypervisor's own state is placed in its carve-out by
//! `platform::hypmem`, never here.
//!
//! Invariant: nothing allocates from an exception handler taken at EL2 (the
//! heap lock is a plain spin lock; an allocation interrupted by another
//! allocation on the same CPU would deadlock).

use core::sync::atomic::{AtomicBool, Ordering};

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static INIT: AtomicBool = AtomicBool::new(false);

/// Hands `[base, base + size)` to the global allocator. Only the first call
/// has an effect.
///
/// # Panics
/// If the range is not inside RAM (as recorded by `platform::phys`).
pub fn init(base: u64, size: u64) {
    if INIT.swap(true, Ordering::AcqRel) {
        return;
    }
    // Range check (panics outside RAM) before the range becomes the heap.
    crate::platform::phys::zero(pkvm_arch::Pa(base), 0);
    crate::platform::phys::zero(pkvm_arch::Pa(base + size - 1), 1);
    // SAFETY: `[base, base + size)` is RAM identity-mapped read-write at EL2
    // for the whole run (checked above), used by nothing else: the caller
    // takes it out of every other user (image, handoff area, page pool,
    // hypervisor carve-out) and `INIT` makes sure it is handed over once.
    unsafe { HEAP.lock().init(base as *mut u8, size as usize) };
}

/// Bytes in use and free (statistics).
pub fn usage() -> (usize, usize) {
    let h = HEAP.lock();
    (h.used(), h.free())
}
