//! The only `unsafe` in the crate: anonymous `mmap` regions viewed as slices
//! of atomics.
//!
//! A [`Mapping`] is a private anonymous `MAP_NORESERVE` mapping: the kernel
//! backs it lazily, so a 4 GiB arena costs only the pages actually touched.
//! The mapping is only ever viewed as `&[AtomicU64]` / `&[AtomicU32]`, never
//! as `&[u8]` or `&mut`, because simulated CPUs, the page-table code and the
//! host all read and write it concurrently.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// A lazily backed, zero-initialised anonymous mapping.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory only ever accessed through atomics
// (see `words`/`u32s`); moving or sharing the handle between threads is fine.
unsafe impl Send for Mapping {}
// SAFETY: as above: all shared access goes through atomic types.
unsafe impl Sync for Mapping {}

const PAGE: usize = 4096;

impl Mapping {
    /// Maps `len` bytes (rounded up to a page), zero-filled and lazily backed.
    pub(crate) fn new(len: usize) -> io::Result<Mapping> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: an anonymous private mapping at a kernel-chosen address
        // aliases nothing; the arguments are a valid mmap call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// The mapping as 64-bit atomics.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: the pointer is page aligned (so aligned for AtomicU64), the
        // region is `len` bytes of readable, writable memory that lives as
        // long as `self`, and it is only accessed through atomics, which
        // permit shared mutation. Zero bytes are a valid AtomicU64.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// The mapping as 32-bit atomics.
    pub(crate) fn u32s(&self) -> &[AtomicU32] {
        // SAFETY: as for `words`, with the alignment and size of AtomicU32.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU32>(), self.len / 4) }
    }

    /// Gives the pages of `[offset, offset+len)` back to the kernel: they read
    /// as zero afterwards and stop costing memory. Both bounds must be page
    /// aligned and inside the mapping (checked; out-of-range calls do nothing).
    ///
    /// Callers only discard frames nobody may legitimately access (free
    /// frames being zeroed); a racing atomic access would see either the old
    /// value or zero, never anything else.
    pub(crate) fn discard(&self, offset: usize, len: usize) {
        if offset % PAGE != 0
            || len % PAGE != 0
            || offset.checked_add(len).is_none_or(|e| e > self.len)
        {
            return;
        }
        // SAFETY: the range is inside our own private anonymous mapping
        // (checked above); MADV_DONTNEED on it only replaces its contents with
        // zero pages, which every atomic in it may hold.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::MADV_DONTNEED,
            )
        };
        debug_assert_eq!(rc, 0, "madvise(MADV_DONTNEED) failed on our own mapping");
    }
}

impl Mapping {
    /// Makes the kernel back `[offset, offset+len)` now (zero-filled), so
    /// later first touches do not take host page faults. Bounds are checked;
    /// out-of-range calls do nothing.
    ///
    /// # Errors
    /// The kernel refused (e.g. no `MADV_POPULATE_WRITE` before Linux 5.14).
    pub(crate) fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        if offset % PAGE != 0
            || len % PAGE != 0
            || offset.checked_add(len).is_none_or(|e| e > self.len)
        {
            return Ok(());
        }
        // SAFETY: the range lies inside our own mapping (checked above);
        // populating only allocates zeroed backing for it and changes no
        // content anyone could observe.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the region returned by mmap in
        // `new`; no reference derived from it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
