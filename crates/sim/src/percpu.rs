//! Per-CPU state for the simulator's hot paths: the calling thread's CPU
//! slot (threads stand in for CPUs: each vCPU thread keeps its slot,
//! assigned round-robin on first use) and counters split into one cache
//! line per slot, so counting on the fault path writes no line that other
//! CPUs write too (Linux's per-CPU counters; KVM's per-vCPU stats).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots of a [`Counter`].
const SLOTS: usize = 32;

/// The calling thread's CPU slot (stable for the thread's life).
pub(crate) fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|s| *s)
}

#[repr(align(128))]
#[derive(Default)]
struct Cell(AtomicU64);

/// A counter with one cache line per CPU slot; reads sum them.
pub(crate) struct Counter {
    cells: Box<[Cell]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            cells: (0..SLOTS).map(|_| Cell::default()).collect(),
        }
    }
}

impl Counter {
    /// Adds `n` on the calling CPU's line.
    pub(crate) fn add(&self, n: u64) {
        self.cells[slot() % SLOTS].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over every CPU (exact once the adders are quiescent).
    pub(crate) fn sum(&self) -> u64 {
        self.cells
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_from_many_threads_add_up() {
        let c = Arc::new(Counter::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.sum(), 24_000);
    }
}
