//! Locks for pkvm-rs.
//!
//! - [`SpinLock`]: the only way to hold it is a [`SpinGuard`]; dropping the
//!   guard releases the lock, so an early `return Err(..)` can never leak it
//!   (seed 000: lock leaks on early error paths in page_alloc.c, mm.c,
//!   pkvm.c, ffa.c).
//! - [`SpinLock::lock_two`]: two locks of one class, always taken in address
//!   order, so two CPUs locking the same pair never deadlock.
//! - [`RwSpinLock`]: the same for a reader-writer lock (the host's MMU
//!   lock: parallel faults read, notifiers and teardown write).
//! - [`LockClass`]: the global lock order, written in one place. In debug
//!   builds with the `std` feature every acquisition is checked against the
//!   classes the current thread already holds; taking a lock out of order
//!   panics (a test failure), naming both classes.
//! - Under `cfg(loom)` the locks are built on loom's atomics so loom can
//!   explore their interleavings.
#![cfg_attr(not(any(feature = "std", loom)), no_std)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod order;
mod rw;
mod spin;

pub use order::{held_classes, LockClass};
pub use rw::{RwReadGuard, RwSpinLock, RwWriteGuard};
pub use spin::{SpinGuard, SpinLock};

/// Spins a waiting lock holder calls between looks at the lock word, before
/// it starts yielding (hosted builds only).
#[cfg(all(feature = "std", not(loom)))]
const SPINS_BEFORE_YIELD: u32 = 128;

/// One step of waiting for a lock: a spin-loop hint. In hosted builds
/// (feature `std`: tests and the simulator, where threads stand in for
/// CPUs and a lock holder can be preempted by the host kernel) a waiter
/// that has spun [`SPINS_BEFORE_YIELD`] times yields its time slice
/// instead, so an oversubscribed host does not burn the holder's CPU. On
/// the hypervisor (no_std) CPUs are never preempted while holding a lock,
/// and it only spins. Under loom every step yields to the model checker.
#[inline(always)]
pub(crate) fn relax(spins: &mut u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(all(not(loom), feature = "std"))]
    {
        *spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
            std::thread::yield_now();
        } else {
            core::hint::spin_loop();
        }
    }
    #[cfg(all(not(loom), not(feature = "std")))]
    {
        let _ = spins;
        core::hint::spin_loop();
    }
}
