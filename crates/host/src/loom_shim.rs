//! Atomics for the state the loom models exercise: loom's under
//! `cfg(loom)` (so loom explores their interleavings), `core`'s otherwise.
//! Only for values created inside a loom model (not statics).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU64, Ordering};
