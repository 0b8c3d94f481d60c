//! What the hypervisor core needs from the machine it runs on.
//!
//! Two implementations exist: the real one in `crates/boot` (identity-mapped
//! memory, `tlbi` instructions) and the simulator's (a physical-memory
//! arena). This crate's tests use a heap-backed fake.

use core::sync::atomic::Ordering;

use pkvm_arch::{Pa, PAGE_SIZE};
use pkvm_pgtable::{PtMemory, TlbOps};

/// The machine interface of the hypervisor.
///
/// [`PtMemory::table`] must give access to *every* page of the managed
/// physical range (not only table pages): the hypervisor zeroes pages and
/// keeps memcache links through it.
pub trait HypPlatform: PtMemory + Sync {
    /// Stage-2 TLB maintenance for one VMID.
    type Tlb: TlbOps;

    /// TLB operations for `vmid` (0 is the host's stage-2).
    fn tlb(&self, vmid: u16) -> Self::Tlb;

    /// TLB maintenance of the hypervisor's own EL2 stage-1 regime.
    type El2Tlb: TlbOps;

    /// TLB operations for the hypervisor's EL2 stage-1 (hardware: `tlbi
    /// vae2is` / `tlbi alle2is`).
    fn el2_tlb(&self) -> Self::El2Tlb;

    /// The id of the CPU executing this code (`0..MAX_CPUS`).
    fn cpu_id(&self) -> usize;

    /// Fills the 4K page at `pa` with zeroes.
    fn zero_page(&self, pa: Pa) {
        for e in self.table(pa).iter() {
            e.store(0, Ordering::Relaxed);
        }
    }

    /// Copies the 4K page at `src` to `dst`.
    fn copy_page(&self, dst: Pa, src: Pa) {
        let (d, s) = (self.table(dst), self.table(src));
        for (d, s) in d.iter().zip(s.iter()) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Reads the 64-bit word at `pa` (8-byte aligned).
    fn read_u64(&self, pa: Pa) -> u64 {
        let base = pa.align_down(PAGE_SIZE);
        self.table(base)[((pa.0 & (PAGE_SIZE - 1)) / 8) as usize].load(Ordering::Relaxed)
    }

    /// Writes the 64-bit word at `pa` (8-byte aligned).
    fn write_u64(&self, pa: Pa, v: u64) {
        let base = pa.align_down(PAGE_SIZE);
        self.table(base)[((pa.0 & (PAGE_SIZE - 1)) / 8) as usize].store(v, Ordering::Relaxed);
    }
}

/// A range of normal memory the host may use (from the platform's memory
/// map). The host's stage-2 never maps a block that crosses a region edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// First byte (4K aligned).
    pub base: Pa,
    /// Size in bytes (multiple of 4K).
    pub size: u64,
}

impl MemRegion {
    /// One past the last byte.
    pub fn end(&self) -> Pa {
        Pa(self.base.0 + self.size)
    }

    /// Whether `[pa, pa + len)` lies inside the region.
    pub fn contains(&self, pa: Pa, len: u64) -> bool {
        match pa.checked_add(len) {
            Some(e) => pa >= self.base && e <= self.end(),
            None => false,
        }
    }
}
