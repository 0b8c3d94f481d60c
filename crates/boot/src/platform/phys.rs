//! Access to physical memory through the EL2 identity map (VA == PA for
//! all of RAM). Callers own the frames they pass: the page pool hands each
//! frame to exactly one owner.

use pkvm_arch::Pa;

use super::RAM_BASE;

static RAM_END: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(RAM_BASE);

/// Records the end of RAM (from the device tree) for range checks.
pub fn set_ram_end(end: u64) {
    RAM_END.store(end, core::sync::atomic::Ordering::Relaxed);
}

/// Whether `[pa, pa + len)` lies inside RAM (for addresses a caller hands
/// in: no panic).
pub fn in_ram(pa: u64, len: u64) -> bool {
    let end = RAM_END.load(core::sync::atomic::Ordering::Relaxed);
    pa >= RAM_BASE && pa.checked_add(len).is_some_and(|e| e <= end)
}

fn check(pa: Pa, len: u64) {
    let end = RAM_END.load(core::sync::atomic::Ordering::Relaxed);
    assert!(
        pa.0 >= RAM_BASE && pa.0.checked_add(len).is_some_and(|e| e <= end),
        "physical access {:#x}+{len:#x} outside RAM (internal bug)",
        pa.0
    );
}

/// Zeroes `[pa, pa+len)`.
///
/// # Panics
/// If the range is not inside RAM (an internal bug: frames come from the pool).
pub fn zero(pa: Pa, len: u64) {
    check(pa, len);
    if let Some(block) = zva_block() {
        if pa.0.is_multiple_of(block) && len.is_multiple_of(block) {
            // One `DC ZVA` per block: under QEMU's TCG a single host
            // memset each instead of a loop of emulated stores (a 2M
            // folio: 32,768 instructions instead of about 10 times as
            // many).
            for a in (pa.0..pa.0 + len).step_by(block as usize) {
                // SAFETY: as below; `a` is a block-aligned address inside
                // the range, which DC ZVA zeroes (Normal memory, EL2).
                unsafe {
                    core::arch::asm!("dc zva, {}", in(reg) a, options(nostack, preserves_flags))
                };
            }
            return;
        }
    }
    // SAFETY: the range is RAM, identity-mapped read-write at EL2, and owned
    // by the caller (a frame just taken from the pool), so no Rust object
    // lives there.
    unsafe { core::ptr::write_bytes(pa.0 as *mut u8, 0, len as usize) };
}

/// The `DC ZVA` block size in bytes (`DCZID_EL0.BS` words), or `None`
/// when `DCZID_EL0.DZP` prohibits it.
fn zva_block() -> Option<u64> {
    let dczid = crate::read_sysreg!("dczid_el0");
    (dczid & 0x10 == 0).then(|| 4 << (dczid & 0xf))
}

/// Copies `src` to physical memory at `pa`.
///
/// # Panics
/// If the range is not inside RAM.
pub fn write(pa: Pa, src: &[u8]) {
    check(pa, src.len() as u64);
    // SAFETY: as for `zero`; `src` is ordinary memory that cannot overlap a
    // frame owned by the caller.
    unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), pa.0 as *mut u8, src.len()) };
}

/// Reads `len` bytes of physical memory at `pa` (e.g. the external guest
/// file QEMU loaded) and passes them to `f`.
///
/// # Panics
/// If the range is not inside RAM.
pub fn with_slice<R>(pa: Pa, len: u64, f: impl FnOnce(&[u8]) -> R) -> R {
    check(pa, len);
    // SAFETY: the range is RAM that QEMU filled before boot and nothing
    // writes while `f` runs (it is outside the image and the pool).
    let s = unsafe { core::slice::from_raw_parts(pa.0 as *const u8, len as usize) };
    f(s)
}

/// Reads a little-endian u64 at `pa`.
pub fn read_u64(pa: Pa) -> u64 {
    check(pa, 8);
    assert!(
        pa.0.is_multiple_of(8),
        "unaligned physical read (internal bug)"
    );
    // SAFETY: aligned RAM inside the identity map.
    unsafe { core::ptr::read_volatile(pa.0 as *const u64) }
}
