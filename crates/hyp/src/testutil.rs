//! A heap-backed fake platform for tests and benchmarks (std only).
//! Benchmarks include this file with `#[path]`, so it names items through
//! `crate::` paths that both the library and the bench root provide.

extern crate std;

use std::boxed::Box;
use std::vec::Vec;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use pkvm_arch::{Level, Pa, Pfn, PAGE_SIZE};
use pkvm_pgtable::{PtMemory, TlbOps};

use crate::{HypPlatform, MemMap, PageMeta};

/// Counts TLB invalidations per VMID.
#[derive(Debug)]
pub struct TlbLog {
    /// Whole-VMID flushes, indexed by VMID (0..=255; index 256 counts the
    /// hypervisor's own EL2 regime).
    pub all: Vec<AtomicU64>,
    /// Per-entry or range invalidations, indexed by VMID.
    pub partial: Vec<AtomicU64>,
}

/// The [`TlbLog`] index of the hypervisor's EL2 regime.
pub const EL2_LOG: usize = 256;

/// TLB operations that only count.
#[derive(Debug, Clone, Copy)]
pub struct FakeTlb {
    vmid: u16,
    log: &'static TlbLog,
}

impl TlbOps for FakeTlb {
    fn tlbi_leaf(&self, _addr: u64, _level: Level) {
        self.log.partial[self.vmid as usize].fetch_add(1, Relaxed);
    }
    fn tlbi_leaf_local(&self, _addr: u64, _level: Level) {
        self.log.partial[self.vmid as usize].fetch_add(1, Relaxed);
    }
    fn tlbi_range(&self, _start: u64, _end: u64) {
        self.log.partial[self.vmid as usize].fetch_add(1, Relaxed);
    }
    fn tlbi_all(&self) {
        self.log.all[self.vmid as usize].fetch_add(1, Relaxed);
    }
    fn dcache_clean_poc(&self, _pa: Pa, _size: u64) {}
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {}
    fn needs_dcache_maintenance(&self) -> bool {
        false
    }
}

/// `pages` pages of zeroed memory at 0x4000_0000, with their metadata.
pub struct FakePlatform {
    mem: Box<[[AtomicU64; 512]]>,
    rc: Box<[AtomicU32]>,
    map: MemMap,
    /// TLB invalidation counters.
    pub tlb_log: &'static TlbLog,
}

/// Base address of the fake memory.
pub const FAKE_BASE: Pa = Pa(0x4000_0000);

impl FakePlatform {
    /// A fake machine with `pages` pages of memory.
    pub fn new(pages: usize) -> FakePlatform {
        let mem: Vec<[AtomicU64; 512]> = (0..pages)
            .map(|_| core::array::from_fn(|_| AtomicU64::new(0)))
            .collect();
        let rc: Vec<AtomicU32> = (0..pages).map(|_| AtomicU32::new(0)).collect();
        let meta: Vec<PageMeta> = (0..pages).map(|_| PageMeta::new()).collect();
        let log = TlbLog {
            all: (0..=EL2_LOG).map(|_| AtomicU64::new(0)).collect(),
            partial: (0..=EL2_LOG).map(|_| AtomicU64::new(0)).collect(),
        };
        FakePlatform {
            mem: mem.into_boxed_slice(),
            rc: rc.into_boxed_slice(),
            map: MemMap::new(
                Box::leak(meta.into_boxed_slice()),
                Pfn(FAKE_BASE.0 / PAGE_SIZE),
            ),
            tlb_log: Box::leak(Box::new(log)),
        }
    }

    /// The metadata map covering the whole fake memory.
    pub fn memmap(&self) -> MemMap {
        self.map
    }

    /// First byte of memory.
    pub fn base(&self) -> Pa {
        FAKE_BASE
    }

    fn idx(&self, pa: Pa) -> usize {
        let i =
            pa.0.checked_sub(FAKE_BASE.0)
                .map(|o| (o / PAGE_SIZE) as usize)
                .filter(|&i| i < self.mem.len());
        match i {
            Some(i) => i,
            None => panic!("fake platform: access outside memory at {pa:?}"),
        }
    }

    /// Whether every word of the page at `pa` is zero.
    pub fn page_is_zero(&self, pa: Pa) -> bool {
        self.table(pa).iter().all(|w| w.load(Relaxed) == 0)
    }
}

impl PtMemory for FakePlatform {
    fn table(&self, pa: Pa) -> &[AtomicU64; 512] {
        &self.mem[self.idx(pa)]
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        &self.rc[self.idx(pa)]
    }
}

impl HypPlatform for FakePlatform {
    type Tlb = FakeTlb;
    type El2Tlb = FakeTlb;
    fn el2_tlb(&self) -> FakeTlb {
        FakeTlb {
            vmid: EL2_LOG as u16,
            log: self.tlb_log,
        }
    }
    fn tlb(&self, vmid: u16) -> FakeTlb {
        FakeTlb {
            vmid,
            log: self.tlb_log,
        }
    }
    fn cpu_id(&self) -> usize {
        0
    }
}
