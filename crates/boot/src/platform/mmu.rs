//! The EL2 stage-1 MMU.
//!
//! 1. [`bootstrap_and_enable`] (boot CPU, first thing in Rust): a static
//!    level-1 table of 1 GiB blocks — device for `[0, 1 GiB)`, normal
//!    write-back for `[1 GiB, 4 GiB)` — is enough to turn the MMU and
//!    caches on, so atomics and locks work (with the MMU off every access
//!    is Device memory, where exclusives are not allowed).
//! 2. [`build_el2_table`] (after the device tree is parsed): the real
//!    identity map built with pkvm-pgtable's `PageTable<El2>`: devices
//!    below RAM Device-nGnRE (XN), RAM normal write-back RW (XN), the image
//!    text RX. `TTBR0_EL2` is switched to it.
//! 3. Secondaries load the same registers ([`enable_secondary`]).
//!
//! Register values (non-VHE EL2, HCR_EL2.E2H = 0):
//! - `MAIR_EL2` = `pkvm_arch::pte::el2::MAIR_EL2` (0: Device-nGnRE,
//!   1: Normal WB RA/WA, 2: Normal NC).
//! - `TCR_EL2` = T0SZ 25 (39-bit VA, walk starts at level 1), IRGN0 = ORGN0
//!   = WBWA, SH0 inner shareable, TG0 4K, PS = PARange (capped at 48 bits),
//!   RES1 bits 31 and 23.
//! - `SCTLR_EL2` = RES1 (0x30c5_0830) | M | C | SA | I; A = 0, WXN = 0, EE = 0.

use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::pte::el2::MAIR_EL2;
use pkvm_arch::pte::{El2Prot, El2Pte};
use pkvm_arch::{Level, Pa, Va};
use pkvm_pgtable::{El2, MapFlags, PageCache, PageTable};
use pkvm_sync::{LockClass, SpinLock};

use super::hw::HwEl2;
use super::sysreg::{dsb_ish, isb};
use crate::{read_sysreg, write_sysreg};

/// Virtual address bits of the EL2 regime.
pub const VA_BITS: u64 = 39;
/// SCTLR_EL2 RES1 bits (E2H = 0).
pub const SCTLR_EL2_RES1: u64 = 0x30c5_0830;
/// SCTLR_EL2 with MMU, D-cache, SP alignment check and I-cache on.
pub const SCTLR_EL2: u64 = SCTLR_EL2_RES1 | 1 | (1 << 2) | (1 << 3) | (1 << 12);

/// TCR_EL2 for our identity map on a CPU with `parange`.
pub const fn tcr_el2(parange: u64) -> u64 {
    let ps = if parange > 5 { 5 } else { parange };
    (64 - VA_BITS) | (1 << 8) | (1 << 10) | (3 << 12) | (ps << 16) | (1 << 23) | (1 << 31)
}

#[repr(C, align(4096))]
struct Page([u64; 512]);

const EL2_PAGES: usize = 32;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO_PAGE: Page = Page([0; 512]);

/// The bootstrap level-1 table.
#[link_section = ".bss.hyp.mmu_boot_l1"]
static mut BOOT_L1: Page = ZERO_PAGE;
/// Pages for the real EL2 table (root + intermediate tables).
#[link_section = ".bss.hyp.mmu_el2_pool"]
static mut EL2_POOL: [Page; EL2_PAGES] = [ZERO_PAGE; EL2_PAGES];

/// The hypervisor's own address space (for later EL2 mappings).
#[link_section = ".data.hyp.mmu_el2_pt"]
pub static EL2_PT: SpinLock<Option<PageTable<El2>>> = SpinLock::new(None, LockClass::HypPgtable);

/// Values secondaries load to turn their MMU on.
#[link_section = ".bss.hyp.mmu_regs"]
static MMU_REGS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

fn enable(ttbr: u64, tcr: u64) {
    write_sysreg!("mair_el2", MAIR_EL2);
    write_sysreg!("tcr_el2", tcr);
    write_sysreg!("ttbr0_el2", ttbr);
    isb();
    // SAFETY: invalidating all EL2 TLB entries and the I-cache before the
    // MMU comes on only drops cached state.
    unsafe { core::arch::asm!("tlbi alle2", "ic iallu", "dsb nsh", "isb", options(nostack)) };
    write_sysreg!("sctlr_el2", SCTLR_EL2);
    isb();
}

/// Builds the bootstrap block table and turns the MMU on (boot CPU, MMU off).
pub fn bootstrap_and_enable() {
    let l1 = core::ptr::addr_of_mut!(BOOT_L1) as *mut u64;
    let dev = El2Pte::leaf(Pa(0), Level(1), El2Prot::RW.union(El2Prot::DEVICE));
    // SAFETY: BOOT_L1 is a static page only this function (on the boot CPU,
    // before any other CPU runs) writes; volatile stores because the MMU
    // will read it.
    unsafe { core::ptr::write_volatile(l1, dev.0) };
    for i in 1..4u64 {
        let ram = El2Pte::leaf(Pa(i << 30), Level(1), El2Prot::RW.union(El2Prot::X));
        // SAFETY: as above; i < 512.
        unsafe { core::ptr::write_volatile(l1.add(i as usize), ram.0) };
    }
    dsb_ish();
    let parange = read_sysreg!("id_aa64mmfr0_el1") & 0xf;
    enable(l1 as u64, tcr_el2(parange));
}

/// A page cache over the static EL2 table pages (zeroed in `.bss`).
struct BootCache {
    next: usize,
}

impl PageCache for BootCache {
    fn alloc_table(&mut self) -> Option<Pa> {
        if self.next >= EL2_PAGES {
            return None;
        }
        let base = core::ptr::addr_of!(EL2_POOL) as u64;
        let pa = Pa(base + self.next as u64 * 4096);
        self.next += 1;
        Some(pa)
    }
    fn free_table(&mut self, _pa: Pa) {
        // Pages freed while building the identity map (collapses) are
        // simply not reused: there are few and they are zero.
    }
}

/// Builds the EL2 identity map with `PageTable<El2>` and switches to it.
///
/// # Panics
/// If the map cannot be built (too few static table pages: a build bug).
pub fn build_el2_table(ram_start: u64, ram_end: u64) {
    let mut cache = BootCache { next: 0 };
    let (root, pt) = identity_map(&mut cache, ram_start, ram_end);
    let (text_start, text_end) = text_range();
    dsb_ish();
    write_sysreg!("ttbr0_el2", root.0);
    isb();
    // SAFETY: drops every EL2 TLB entry of the bootstrap table; the new
    // table maps the same addresses to the same physical memory.
    unsafe { core::arch::asm!("tlbi alle2", "dsb ish", "isb", options(nostack)) };
    crate::println!(
        "mmu: EL2 identity map via PageTable<El2>: {} table pages, text {text_start:#x}..{text_end:#x} RX, RAM RW, devices nGnRE",
        cache.next
    );
    *EL2_PT.lock() = Some(pt);
    MMU_REGS[0].store(root.0, Ordering::Relaxed);
    MMU_REGS[1].store(
        tcr_el2(read_sysreg!("id_aa64mmfr0_el1") & 0xf),
        Ordering::Relaxed,
    );
}

/// The image's text: `[__image_start, __text_end)`.
fn text_range() -> (u64, u64) {
    extern "C" {
        static __image_start: u8;
        static __text_end: u8;
    }
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__text_end) as u64,
    )
}

/// Builds an identity map in the table pages of `cache` with
/// `PageTable<El2>`: devices below RAM Device-nGnRE (XN), RAM normal
/// write-back RW (XN), the image text RX. Returns its root and the table.
/// The EL2 map's pages are the hypervisor's; the VMM at EL1 gets its own
/// copy in host memory (`el1boot`).
///
/// # Panics
/// If the map cannot be built (too few table pages: a build bug).
pub fn identity_map(
    cache: &mut impl PageCache,
    ram_start: u64,
    ram_end: u64,
) -> (Pa, PageTable<El2>) {
    let (text_start, text_end) = text_range();
    let root = cache.alloc_table().expect("identity map root page");
    let geo = pkvm_pgtable::table::el2_geometry(VA_BITS as u32).expect("EL2 geometry");
    let mut pt: PageTable<El2> = PageTable::new(root, geo, pkvm_arch::pte::S2Features::default());
    let env = HwEl2;
    let dev = El2Prot::RW.union(El2Prot::DEVICE);
    let maps: [(u64, u64, El2Prot); 4] = [
        (0, ram_start, dev),
        (ram_start, text_start, El2Prot::RW),
        (text_start, text_end, El2Prot::RX),
        (text_end, ram_end, El2Prot::RW),
    ];
    for (start, end, prot) in maps {
        if end > start {
            pt.map(
                &env,
                Va(start),
                end - start,
                Pa(start),
                prot,
                MapFlags::NONE,
                cache,
            )
            .unwrap_or_else(|e| panic!("identity map {start:#x}..{end:#x}: {e}"));
        }
    }
    (root, pt)
}

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 4] {
    [
        ("mmu::BOOT_L1", core::ptr::addr_of!(BOOT_L1) as u64),
        ("mmu::EL2_POOL", core::ptr::addr_of!(EL2_POOL) as u64),
        ("mmu::EL2_PT", core::ptr::from_ref(&EL2_PT) as u64),
        ("mmu::MMU_REGS", MMU_REGS.as_ptr() as u64),
    ]
}

/// Makes the MMU registers visible to CPUs that start with caches off.
pub fn publish_for_secondaries() {
    super::hw::dcache_clean_range(
        MMU_REGS.as_ptr() as u64,
        core::mem::size_of_val(&MMU_REGS) as u64,
    );
}

/// Turns the MMU on for a secondary CPU (MMU off on entry).
pub fn enable_secondary() {
    // Plain loads: with the MMU off these are non-cacheable reads of what
    // the boot CPU cleaned to the point of coherency.
    let ttbr = MMU_REGS[0].as_ptr();
    let tcr = MMU_REGS[1].as_ptr();
    // SAFETY: the atomics' storage is valid; the boot CPU wrote the values
    // before CPU_ON and does not change them afterwards.
    let (ttbr, tcr) = unsafe {
        (
            core::ptr::read_volatile(ttbr),
            core::ptr::read_volatile(tcr),
        )
    };
    enable(ttbr, tcr);
}
