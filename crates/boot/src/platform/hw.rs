//! pkvm-pgtable's environment on real hardware.
//!
//! - [`PtMemory`]: table pages are read through the EL2 identity map; each
//!   RAM page's table reference count lives in a static metadata array
//!   indexed by frame number (covers [`MAX_RAM`] from [`RAM_BASE`]).
//! - [`TlbOps`]: the TLBI / DSB / ISB sequences of the facts file. Stage-2
//!   invalidation by IPA needs the target VMID in `VTTBR_EL2`, so
//!   [`HwS2`] loads its VTTBR around the TLBI when another is current.
//!   These are EL2-only: below EL2 (the host at EL1) [`HwS2`] asks the
//!   hypervisor instead ([`super::hostrun::TLB_FLUSH_VMID_IPA`],
//!   [`super::hostrun::TLB_FLUSH_VMID`]), deciding by `CurrentEL`.

use core::sync::atomic::{AtomicU32, AtomicU64};

use pkvm_arch::{Level, Pa};
use pkvm_pgtable::env::ENTRIES;
use pkvm_pgtable::{PtMemory, TlbOps};

use super::{MAX_RAM, RAM_BASE};
use crate::{read_sysreg, write_sysreg};

const META_PAGES: usize = (MAX_RAM >> 12) as usize;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU32 = AtomicU32::new(0);
static REFCOUNTS: [AtomicU32; META_PAGES] = [ZERO; META_PAGES];

/// Above this many pages a range invalidation becomes a whole-context one.
const TLBI_RANGE_MAX_PAGES: u64 = 64;

fn table_at(pa: Pa) -> &'static [AtomicU64; ENTRIES] {
    assert!(
        pa.0.is_multiple_of(4096) && pa.0 >= RAM_BASE && pa.0 < RAM_BASE + MAX_RAM,
        "table page {:#x} outside RAM (internal bug)",
        pa.0
    );
    // SAFETY: `pa` is a 4K-aligned RAM page (checked), identity-mapped
    // read-write at EL2 for the whole run. Table pages are only handed to
    // page tables by page caches that own them; all access is atomic, so
    // concurrent walkers and the hardware walker are fine.
    unsafe { &*(pa.0 as *const [AtomicU64; ENTRIES]) }
}

fn refcount_at(pa: Pa) -> &'static AtomicU32 {
    let idx = ((pa.0.wrapping_sub(RAM_BASE)) >> 12) as usize;
    REFCOUNTS
        .get(idx)
        .unwrap_or_else(|| panic!("refcount for {:#x} outside RAM (internal bug)", pa.0))
}

/// Line size of the data cache (CTR_EL0.DminLine).
fn dcache_line() -> u64 {
    4 << ((read_sysreg!("ctr_el0") >> 16) & 0xf)
}

/// Cleans `[va, va+size)` to the point of coherency (`dc cvac` loop).
pub fn dcache_clean_range(va: u64, size: u64) {
    let line = dcache_line();
    let mut a = va & !(line - 1);
    while a < va + size {
        // SAFETY: cleaning a cache line only writes back data; `a` is
        // identity-mapped memory (image statics or RAM frames).
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += line;
    }
    super::sysreg::dsb_ish();
}

/// Cleans and invalidates `[va, va+size)` to the point of coherency
/// (`dc civac` loop).
pub fn dcache_clean_inval_range(va: u64, size: u64) {
    let line = dcache_line();
    let mut a = va & !(line - 1);
    while a < va + size {
        // SAFETY: cleaning and invalidating a cache line writes dirty data
        // back first, so memory keeps its contents; `a` is identity-mapped
        // RAM (a guest's stage-2-mapped frame).
        unsafe { core::arch::asm!("dc civac, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += line;
    }
    super::sysreg::dsb_ish();
}

/// Invalidates every instruction cache of the inner shareable domain (e.g.
/// after the VMM rewrote a guest image in memory the guest may already
/// have executed).
pub fn icache_inval_all() {
    // SAFETY: invalidating the instruction caches (inner shareable) has no
    // effect beyond refetching instructions.
    unsafe {
        core::arch::asm!(
            "ic ialluis",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// Stage-2 page tables of one VM (identified by its VTTBR: root + VMID).
#[derive(Clone, Copy, Debug)]
pub struct HwS2 {
    /// VTTBR_EL2 of the VM (root table and VMID).
    pub vttbr: u64,
}

impl HwS2 {
    /// Runs `f` with this VM's VTTBR loaded (the TLBI by IPA / VMID
    /// operations act on the current VMID).
    fn with_vmid(&self, f: impl FnOnce()) {
        let old = read_sysreg!("vttbr_el2");
        if old != self.vttbr {
            write_sysreg!("vttbr_el2", self.vttbr);
            super::sysreg::isb();
        }
        f();
        if old != self.vttbr {
            write_sysreg!("vttbr_el2", old);
            super::sysreg::isb();
        }
    }
}

impl PtMemory for HwS2 {
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        table_at(pa)
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        refcount_at(pa)
    }
}

impl HwS2 {
    fn el2_tlbi_leaf(&self, addr: u64, _level: Level) {
        self.with_vmid(|| {
            // SAFETY: TLB maintenance for the current VMID only drops
            // cached translations.
            unsafe {
                core::arch::asm!(
                    "dsb ishst", "tlbi ipas2e1is, {ipa}", "dsb ish", "tlbi vmalle1is", "dsb ish", "isb",
                    ipa = in(reg) addr >> 12, options(nostack, preserves_flags)
                )
            }
        });
    }
    fn el2_tlbi_leaf_local(&self, addr: u64, _level: Level) {
        self.with_vmid(|| {
            // SAFETY: as above, this CPU only.
            unsafe {
                core::arch::asm!(
                    "dsb nshst", "tlbi ipas2e1, {ipa}", "dsb nsh", "tlbi vmalle1", "dsb nsh", "isb",
                    ipa = in(reg) addr >> 12, options(nostack, preserves_flags)
                )
            }
        });
    }
    fn el2_tlbi_range(&self, start: u64, end: u64) {
        if (end - start) >> 12 > TLBI_RANGE_MAX_PAGES {
            return self.el2_tlbi_all();
        }
        self.with_vmid(|| {
            // SAFETY: as above.
            unsafe { core::arch::asm!("dsb ishst", options(nostack, preserves_flags)) };
            let mut a = start;
            while a < end {
                // SAFETY: as above.
                unsafe { core::arch::asm!("tlbi ipas2e1is, {}", in(reg) a >> 12, options(nostack, preserves_flags)) };
                a += 4096;
            }
            // SAFETY: as above.
            unsafe { core::arch::asm!("dsb ish", "tlbi vmalle1is", "dsb ish", "isb", options(nostack, preserves_flags)) };
        });
    }
    fn el2_tlbi_all(&self) {
        self.with_vmid(|| {
            // SAFETY: as above, whole VMID (stage 1 and 2).
            unsafe {
                core::arch::asm!(
                    "dsb ishst",
                    "tlbi vmalls12e1is",
                    "dsb ish",
                    "isb",
                    options(nostack, preserves_flags)
                )
            }
        });
    }
}

/// Whether this code runs at EL2 (`CurrentEL`), where the TLB maintenance
/// instructions of a stage-2 are available.
pub fn at_el2() -> bool {
    (read_sysreg!("CurrentEL") >> 2) & 3 == 2
}

impl TlbOps for HwS2 {
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        if at_el2() {
            return self.el2_tlbi_leaf(addr, level);
        }
        let f = super::hostrun::TLB_FLUSH_VMID_IPA;
        super::hostrun::call_tlb_flush(f, self.vttbr, addr, false);
    }
    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        if at_el2() {
            return self.el2_tlbi_leaf_local(addr, level);
        }
        let f = super::hostrun::TLB_FLUSH_VMID_IPA;
        super::hostrun::call_tlb_flush(f, self.vttbr, addr, true);
    }
    fn tlbi_range(&self, start: u64, end: u64) {
        if at_el2() {
            return self.el2_tlbi_range(start, end);
        }
        if (end - start) >> 12 > TLBI_RANGE_MAX_PAGES {
            return self.tlbi_all();
        }
        for a in (start..end).step_by(4096) {
            self.tlbi_leaf(a, Level(3));
        }
    }
    fn tlbi_all(&self) {
        if at_el2() {
            return self.el2_tlbi_all();
        }
        let f = super::hostrun::TLB_FLUSH_VMID;
        super::hostrun::call_tlb_flush(f, self.vttbr, 0, false);
    }
    fn dcache_clean_poc(&self, pa: Pa, size: u64) {
        dcache_clean_range(pa.0, size);
    }
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {
        icache_inval_all();
    }
}

/// The EL2 stage-1 table.
#[derive(Clone, Copy, Debug)]
pub struct HwEl2;

impl PtMemory for HwEl2 {
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        table_at(pa)
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        refcount_at(pa)
    }
}

impl TlbOps for HwEl2 {
    fn tlbi_leaf(&self, addr: u64, _level: Level) {
        // SAFETY: EL2 TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!("dsb ishst", "tlbi vae2is, {}", "dsb ish", "isb", in(reg) addr >> 12,
                             options(nostack, preserves_flags))
        }
    }
    fn tlbi_leaf_local(&self, addr: u64, _level: Level) {
        // SAFETY: as above, this CPU only.
        unsafe {
            core::arch::asm!("dsb nshst", "tlbi vae2, {}", "dsb nsh", "isb", in(reg) addr >> 12,
                             options(nostack, preserves_flags))
        }
    }
    fn tlbi_range(&self, start: u64, end: u64) {
        if (end - start) >> 12 > TLBI_RANGE_MAX_PAGES {
            return self.tlbi_all();
        }
        let mut a = start;
        while a < end {
            self.tlbi_leaf(a, Level::LAST);
            a += 4096;
        }
    }
    fn tlbi_all(&self) {
        // SAFETY: as above.
        unsafe {
            core::arch::asm!(
                "dsb ishst",
                "tlbi alle2is",
                "dsb ish",
                "isb",
                options(nostack, preserves_flags)
            )
        }
    }
    fn dcache_clean_poc(&self, pa: Pa, size: u64) {
        dcache_clean_range(pa.0, size);
    }
    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {
        icache_inval_all();
    }
    /// The EL2 map only covers memory the hypervisor itself already uses
    /// cacheably (RAM, its own image): nothing to clean before mapping.
    fn needs_dcache_maintenance(&self) -> bool {
        false
    }
}
