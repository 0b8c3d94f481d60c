//! A reader-writer spinlock whose only handles are guards.
//!
//! Writer-preferring: once a writer waits, new readers wait too, so a
//! stream of readers (parallel guest faults) cannot starve an MMU notifier.

use core::cell::UnsafeCell;
use core::fmt;
use core::ops::{Deref, DerefMut};

#[cfg(not(loom))]
use core::sync::atomic::{AtomicU32, Ordering};
#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering};

use crate::order::{self, LockClass};

const WRITER: u32 = 1 << 31;
const READERS: u32 = WRITER - 1;

/// A reader-writer spinlock protecting a `T`, of a given [`LockClass`].
pub struct RwSpinLock<T> {
    /// WRITER bit, or the number of readers.
    state: AtomicU32,
    /// Writers waiting: new readers hold back while non-zero (a heuristic
    /// for writer preference; exclusion rests on `state` alone).
    writers_waiting: AtomicU32,
    class: LockClass,
    value: UnsafeCell<T>,
}

// SAFETY: readers get `&T` concurrently (needs `T: Sync`), the writer gets
// `&mut T` alone (needs `T: Send`).
unsafe impl<T: Send + Sync> Sync for RwSpinLock<T> {}
// SAFETY: moving the lock moves the `T`.
unsafe impl<T: Send> Send for RwSpinLock<T> {}

impl<T> RwSpinLock<T> {
    /// A new unlocked lock.
    #[cfg(not(loom))]
    pub const fn new(value: T, class: LockClass) -> Self {
        RwSpinLock {
            state: AtomicU32::new(0),
            writers_waiting: AtomicU32::new(0),
            class,
            value: UnsafeCell::new(value),
        }
    }

    /// A new unlocked lock.
    #[cfg(loom)]
    pub fn new(value: T, class: LockClass) -> Self {
        RwSpinLock {
            state: AtomicU32::new(0),
            writers_waiting: AtomicU32::new(0),
            class,
            value: UnsafeCell::new(value),
        }
    }

    /// Shared access; waits while a writer holds or waits for the lock.
    ///
    /// # Panics
    /// On a lock-order violation in checked builds.
    pub fn read(&self) -> RwReadGuard<'_, T> {
        order::acquire(self.class, false);
        let mut spins = 0;
        loop {
            if self.writers_waiting.load(Ordering::Relaxed) == 0 {
                let s = self.state.load(Ordering::Relaxed);
                if s & WRITER == 0 {
                    assert!(s != READERS, "reader count overflow");
                    if self
                        .state
                        .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        return RwReadGuard { lock: self };
                    }
                }
            }
            crate::relax(&mut spins);
        }
    }

    /// Exclusive access.
    ///
    /// # Panics
    /// On a lock-order violation in checked builds.
    pub fn write(&self) -> RwWriteGuard<'_, T> {
        order::acquire(self.class, false);
        if self
            .state
            .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return RwWriteGuard { lock: self };
        }
        self.writers_waiting.fetch_add(1, Ordering::Relaxed);
        let mut spins = 0;
        loop {
            // Read-only while waiting (no stores in the spin).
            while self.state.load(Ordering::Relaxed) != 0 {
                crate::relax(&mut spins);
            }
            if self
                .state
                .compare_exchange_weak(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                self.writers_waiting.fetch_sub(1, Ordering::Relaxed);
                return RwWriteGuard { lock: self };
            }
        }
    }

    /// Mutable access without locking: `&mut self` proves exclusivity.
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }

    /// Consumes the lock.
    pub fn into_inner(self) -> T {
        self.value.into_inner()
    }

    /// Whether anyone holds the lock (for assertions in tests).
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != 0
    }
}

impl<T> fmt::Debug for RwSpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwSpinLock")
            .field("class", &self.class)
            .finish_non_exhaustive()
    }
}

/// Proof of shared access to an [`RwSpinLock`].
#[must_use = "dropping the guard releases the lock immediately"]
pub struct RwReadGuard<'a, T> {
    lock: &'a RwSpinLock<T>,
}

impl<T> Deref for RwReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: readers only exist while no writer holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> Drop for RwReadGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.state.fetch_sub(1, Ordering::Release);
        order::release(self.lock.class);
    }
}

/// Proof of exclusive access to an [`RwSpinLock`].
#[must_use = "dropping the guard releases the lock immediately"]
pub struct RwWriteGuard<'a, T> {
    lock: &'a RwSpinLock<T>,
}

impl<T> Deref for RwWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the writer is alone.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for RwWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the writer is alone, and `&mut self` makes this the only access.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for RwWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.state.store(0, Ordering::Release);
        order::release(self.lock.class);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn readers_share_writers_exclude() {
        let l = RwSpinLock::new(5, LockClass::HostMmu);
        {
            let a = l.read();
            assert_eq!(*a, 5);
            assert!(l.is_locked());
        }
        // Two threads read at once.
        std::thread::scope(|s| {
            let g = l.read();
            s.spawn(|| assert_eq!(*l.read(), 5)).join().unwrap();
            drop(g);
        });
        *l.write() += 1;
        assert_eq!(*l.read(), 6);
        assert!(!l.is_locked());
    }

    #[test]
    fn concurrent_readers_and_writers_stay_consistent() {
        let l = Arc::new(RwSpinLock::new((0u64, 0u64), LockClass::HostMmu));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..5000 {
                        if t % 2 == 0 {
                            let mut g = l.write();
                            g.0 += 1;
                            g.1 += 1;
                        } else {
                            let g = l.read();
                            assert_eq!(g.0, g.1, "torn read under the read lock");
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(l.read().0, 10_000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    #[test]
    fn loom_two_writers_exclude_each_other() {
        loom::model(|| {
            let l = Arc::new(RwSpinLock::new(0u32, LockClass::Leaf));
            let l2 = l.clone();
            let t = loom::thread::spawn(move || {
                *l2.write() += 1;
            });
            *l.write() += 1;
            t.join().unwrap();
            assert_eq!(*l.read(), 2);
        });
    }

    #[test]
    fn loom_two_writers_and_a_reader_exclude_each_other() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(|| {
            let l = Arc::new(RwSpinLock::new(0u32, LockClass::Leaf));
            let l2 = l.clone();
            let t = loom::thread::spawn(move || {
                *l2.write() += 1;
            });
            let l3 = l.clone();
            let r = loom::thread::spawn(move || {
                let v = *l3.read();
                assert!(v <= 2);
            });
            *l.write() += 1;
            t.join().unwrap();
            r.join().unwrap();
            assert_eq!(*l.read(), 2);
        });
    }
}
