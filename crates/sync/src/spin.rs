//! A test-and-test-and-set spinlock whose only handle is a guard.

use core::cell::UnsafeCell;
use core::fmt;
use core::ops::{Deref, DerefMut};

#[cfg(not(loom))]
use core::sync::atomic::{AtomicBool, Ordering};
#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, Ordering};

use crate::order::{self, LockClass};

/// A spinlock protecting a `T`, of a given [`LockClass`].
pub struct SpinLock<T> {
    locked: AtomicBool,
    class: LockClass,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `value` to one guard at a time, so
// sharing the lock between threads is sound whenever `T` can be sent.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: moving the lock moves the `T`.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A new unlocked lock of `class`.
    #[cfg(not(loom))]
    pub const fn new(value: T, class: LockClass) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            class,
            value: UnsafeCell::new(value),
        }
    }

    /// A new unlocked lock of `class`.
    #[cfg(loom)]
    pub fn new(value: T, class: LockClass) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            class,
            value: UnsafeCell::new(value),
        }
    }

    /// The lock's class.
    pub fn class(&self) -> LockClass {
        self.class
    }

    fn raw_lock(&self) {
        let mut spins = 0;
        loop {
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            while self.locked.load(Ordering::Relaxed) {
                crate::relax(&mut spins);
            }
        }
    }

    /// Acquires the lock, spinning until it is free.
    ///
    /// # Panics
    /// In checked builds, if the current thread holds a lock of an equal or
    /// later class (a lock-order violation).
    pub fn lock(&self) -> SpinGuard<'_, T> {
        order::acquire(self.class, false);
        self.raw_lock();
        SpinGuard { lock: self }
    }

    /// Acquires the lock if it is free.
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            order::acquire(self.class, false);
            Some(SpinGuard { lock: self })
        } else {
            None
        }
    }

    /// Locks two locks of the same class in a fixed (address) order, so
    /// that two CPUs locking the same pair in opposite argument order can
    /// never deadlock. Returns the guards in argument order.
    ///
    /// # Panics
    /// If `a` and `b` are the same lock or of different classes (a caller
    /// bug), or on a lock-order violation in checked builds.
    pub fn lock_two<'a>(a: &'a Self, b: &'a Self) -> (SpinGuard<'a, T>, SpinGuard<'a, T>) {
        assert!(!core::ptr::eq(a, b), "lock_two on the same lock");
        assert_eq!(a.class, b.class, "lock_two needs two locks of one class");
        let a_first = (a as *const Self) < (b as *const Self);
        let (first, second) = if a_first { (a, b) } else { (b, a) };
        order::acquire(first.class, false);
        first.raw_lock();
        let g1 = SpinGuard { lock: first };
        order::acquire(second.class, true);
        second.raw_lock();
        let g2 = SpinGuard { lock: second };
        if a_first {
            (g1, g2)
        } else {
            (g2, g1)
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

    /// Whether the lock is currently held (for assertions in tests).
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

impl<T: Default> Default for SpinLock<T> {
    fn default() -> Self {
        SpinLock::new(T::default(), LockClass::Leaf)
    }
}

impl<T> fmt::Debug for SpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinLock")
            .field("class", &self.class)
            .field("locked", &self.is_locked())
            .finish_non_exhaustive()
    }
}

/// Proof that a [`SpinLock`] is held; releases it when dropped.
#[must_use = "dropping the guard releases the lock immediately"]
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held, so no other
        // reference to the value exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
        order::release(self.lock.class);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn fallible(lock: &SpinLock<u32>, fail: bool) -> Result<u32, ()> {
        let mut g = lock.lock();
        if fail {
            return Err(());
        }
        *g += 1;
        Ok(*g)
    }

    #[test]
    fn early_error_return_releases_the_lock() {
        let l = SpinLock::new(0, LockClass::HypVm);
        assert_eq!(fallible(&l, true), Err(()));
        assert!(!l.is_locked());
        assert_eq!(fallible(&l, false), Ok(1));
        assert!(!l.is_locked());
    }

    #[test]
    fn try_lock_fails_while_held() {
        let l = SpinLock::new(0, LockClass::Leaf);
        let g = l.lock();
        assert!(l.try_lock().is_none());
        drop(g);
        assert!(l.try_lock().is_some());
    }

    #[test]
    fn lock_two_returns_guards_in_argument_order() {
        let a = SpinLock::new(1, LockClass::HypVm);
        let b = SpinLock::new(2, LockClass::HypVm);
        {
            let (ga, gb) = SpinLock::lock_two(&b, &a);
            assert_eq!((*ga, *gb), (2, 1));
        }
        assert!(!a.is_locked() && !b.is_locked());
    }

    #[cfg(all(feature = "std", debug_assertions))]
    #[test]
    #[should_panic(expected = "lock order violation")]
    fn out_of_order_acquisition_is_caught() {
        let pool = SpinLock::new((), LockClass::HypPool);
        let table = SpinLock::new((), LockClass::HypVmTable);
        let _p = pool.lock();
        let _t = table.lock();
    }

    #[cfg(all(feature = "std", debug_assertions))]
    #[test]
    fn in_order_acquisition_is_fine_and_tracked() {
        let table = SpinLock::new((), LockClass::HypVmTable);
        let pool = SpinLock::new((), LockClass::HypPool);
        {
            let _t = table.lock();
            let _p = pool.lock();
            assert_eq!(crate::held_classes(), 2);
        }
        assert_eq!(crate::held_classes(), 0);
    }

    #[test]
    fn contended_counter_is_exact() {
        extern crate std;
        use std::sync::Arc;
        let l = Arc::new(SpinLock::new(0u64, LockClass::Leaf));
        let hs: std::vec::Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*l.lock(), 40_000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    #[test]
    fn loom_mutual_exclusion() {
        loom::model(|| {
            let l = Arc::new(SpinLock::new(0u32, LockClass::Leaf));
            let l2 = l.clone();
            let t = loom::thread::spawn(move || {
                *l2.lock() += 1;
            });
            *l.lock() += 1;
            t.join().unwrap();
            assert_eq!(*l.lock(), 2);
        });
    }
}
