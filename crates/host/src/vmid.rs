//! VMIDs for VMs whose stage-2 the host manages (standard mode). VMID 0 is
//! the host's own; in protected mode the hypervisor assigns VMIDs.

use core::sync::atomic::{AtomicU64, Ordering};

static USED: [AtomicU64; 4] = [
    AtomicU64::new(1),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

/// A VMID, released when dropped.
#[derive(Debug)]
pub struct Vmid(u16);

impl Vmid {
    /// Takes a free VMID in 1..=255, or `None` if all are in use.
    pub fn alloc() -> Option<Vmid> {
        for (w, word) in USED.iter().enumerate() {
            let mut cur = word.load(Ordering::Relaxed);
            while cur != u64::MAX {
                let bit = (!cur).trailing_zeros();
                match word.compare_exchange(
                    cur,
                    cur | (1 << bit),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Some(Vmid((w as u32 * 64 + bit) as u16)),
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// The value.
    pub const fn get(&self) -> u16 {
        self.0
    }
}

impl Drop for Vmid {
    fn drop(&mut self) {
        let (w, b) = ((self.0 / 64) as usize, self.0 % 64);
        USED[w].fetch_and(!(1 << b), Ordering::AcqRel);
    }
}
