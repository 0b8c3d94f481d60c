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
