//! The hypervisor's own memory: a bump allocator over the front of its
//! carve-out, where pkvm-hyp's state lives (the `Hyp` with its VM table
//! and per-VM locks, the per-page metadata array, the registers of the
//! protected vCPUs run by `VCPU_RUN`), apart from the image's
//! global heap, which is host memory.
//!
//! The range is never part of the host's memory regions, so the host
//! stage-2 never maps it (a host access is refused with an injected
//! abort) and no hypercall accepts its frames. Objects placed here live
//! for the rest of the run (nothing is ever freed), which is what the
//! hypervisor's boot-time state needs.

use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::Pa;

/// Next free byte (0 until [`init`]).
#[link_section = ".bss.hyp.hypmem_next"]
static NEXT: AtomicU64 = AtomicU64::new(0);
/// Start and end of the range (both 0 until [`init`]).
#[link_section = ".bss.hyp.hypmem_start"]
static START: AtomicU64 = AtomicU64::new(0);
#[link_section = ".bss.hyp.hypmem_end"]
static END: AtomicU64 = AtomicU64::new(0);

/// Hands `[base, base + size)` to the hypervisor's allocator, zeroed.
/// Only the first call has an effect.
///
/// # Panics
/// If the range is not inside RAM (as recorded by `super::phys`).
pub fn init(base: u64, size: u64) {
    if START
        .compare_exchange(0, base, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    super::phys::zero(Pa(base), size);
    END.store(base + size, Ordering::Release);
    NEXT.store(base, Ordering::Release);
}

/// The range handed to [`init`] (`(0, 0)` before).
pub fn range() -> (u64, u64) {
    (START.load(Ordering::Acquire), END.load(Ordering::Acquire))
}

/// Bytes handed out so far.
pub fn used() -> u64 {
    NEXT.load(Ordering::Acquire)
        .saturating_sub(START.load(Ordering::Acquire))
}

/// Takes `size` bytes aligned to `align` (a power of two); `None` when the
/// range is exhausted or not set up.
fn take(size: u64, align: u64) -> Option<u64> {
    let end = END.load(Ordering::Acquire);
    let mut cur = NEXT.load(Ordering::Acquire);
    loop {
        if cur == 0 {
            return None;
        }
        let at = cur.checked_add(align - 1)? & !(align - 1);
        let next = at.checked_add(size)?;
        if next > end {
            return None;
        }
        match NEXT.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(at),
            Err(now) => cur = now,
        }
    }
}

/// Moves `value` into the hypervisor's memory for the rest of the run;
/// `None` (and `value` dropped) when there is no room.
pub fn place<T: Sync + 'static>(value: T) -> Option<&'static T> {
    let at = take(size_of::<T>() as u64, align_of::<T>() as u64)?;
    let ptr = at as *mut T;
    // SAFETY: `[at, at + size_of::<T>())` is RAM identity-mapped read-write
    // at EL2 (checked by `init`), aligned for `T`, and handed out once by
    // `take`, never reused or freed, so no other object lives there and the
    // written value stays valid for `'static`; `T: Sync` makes the shared
    // reference sound across CPUs.
    unsafe {
        ptr.write(value);
        Some(&*ptr)
    }
}

/// `n` values made by `make`, in the hypervisor's memory for the rest of
/// the run; `None` when there is no room.
pub fn place_slice<T: Sync + 'static>(
    n: usize,
    mut make: impl FnMut() -> T,
) -> Option<&'static [T]> {
    let bytes = (size_of::<T>() as u64).checked_mul(n as u64)?;
    let at = take(bytes, align_of::<T>() as u64)?;
    let ptr = at as *mut T;
    for i in 0..n {
        // SAFETY: element `i` lies inside the range `take` handed out for
        // `n` elements (aligned, RAM, identity-mapped read-write at EL2,
        // used by nothing else).
        unsafe { ptr.add(i).write(make()) };
    }
    // SAFETY: all `n` elements were just initialised; the memory is never
    // reused or freed (see `place`), and `T: Sync`.
    Some(unsafe { core::slice::from_raw_parts(ptr, n) })
}

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 3] {
    [
        ("hypmem::NEXT", NEXT.as_ptr() as u64),
        ("hypmem::START", START.as_ptr() as u64),
        ("hypmem::END", END.as_ptr() as u64),
    ]
}

/// The image's parts (`link.ld`), as `(start, end)` physical addresses
/// (the EL2 identity map: virtual = physical).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageParts {
    /// Text and read-only data: the hypervisor's, which the host may read
    /// and run but never write (pkvm-hyp's `HypConfig::host_rx`).
    pub code: (u64, u64),
    /// The hypervisor's statics (`.data.hyp*`, `.bss.hyp*`) and the EL2
    /// stacks: never host memory.
    pub hyp: (u64, u64),
    /// The host's (the VMM's) statics, `.data` and `.bss`: host memory.
    pub host: (u64, u64),
}

/// Where the image's parts are (all page aligned).
pub fn image_parts() -> ImageParts {
    extern "C" {
        static __image_start: u8;
        static __rodata_end: u8;
        static __hyp_data_start: u8;
        static __hyp_data_end: u8;
        static __host_data_start: u8;
        static __host_data_end: u8;
    }
    let a = |p: *const u8| p as u64;
    ImageParts {
        code: (
            a(core::ptr::addr_of!(__image_start)),
            a(core::ptr::addr_of!(__rodata_end)),
        ),
        hyp: (
            a(core::ptr::addr_of!(__hyp_data_start)),
            a(core::ptr::addr_of!(__hyp_data_end)),
        ),
        host: (
            a(core::ptr::addr_of!(__host_data_start)),
            a(core::ptr::addr_of!(__host_data_end)),
        ),
    }
}
