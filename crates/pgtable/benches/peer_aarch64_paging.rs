//! Peer side of the page-table benchmarks: the same work done by the
//! `aarch64-paging` crate (0.12), stage-2 translation regime.
//!
//! Included by the criterion benchmark with
//! `#[path = "peer_aarch64_paging.rs"] mod peer;`; it is not a bench target of
//! its own. Every `peer_*` function follows criterion's `iter_custom`
//! convention: it returns the total time of `iters` repetitions of the whole
//! operation, each on a freshly built table, with the set-up (building the
//! starting table) and the tear-down (dropping it) excluded from the timing.
//!
//! How the peer is driven (read from the 0.12.3 source):
//! - Tables are a `Mapping<PoolTranslation, Stage2>` with root
//!   level 1 (39-bit IPA, one root page, no concatenation: aarch64-paging does
//!   not support concatenated stage-2 roots). Table pages come from
//!   [`PoolTranslation`], a pool of pre-zeroed 4 KiB pages set up once, like
//!   the `TestCache` pkvm-pgtable gets: neither side pays the global
//!   allocator (whose returning memory to the OS between iterations made the
//!   peer's figures swing 4x with `IdTranslation`). A page given back is
//!   zeroed before it returns to the pool (pkvm-pgtable's walker hands back
//!   tables it emptied entry by entry, so they are zero already).
//! - The mapping is never activated (activation is aarch64-only and programs
//!   VTTBR_EL2). An inactive `Mapping` skips its break-before-make pre-check
//!   walk and all TLB maintenance, so these figures are the peer's cheapest
//!   path.
//! - unmap: `modify_range` clearing the valid bit of every page (the leaf
//!   entries and all table pages stay; this is what the table
//!   measured). `peer_unmap_free_1g_4k` is an extra variant: `map_range` with
//!   flags lacking `VALID` over a table-aligned range, which in 0.12.3 zeroes
//!   the covering table entry and frees the whole sub-hierarchy without
//!   visiting the leaves.
//! - split: `map_range` of the same IPA->PA range with the same flags and
//!   `NO_BLOCK_MAPPINGS` is a no-op in aarch64-paging (a block that already
//!   maps the wanted PA with the wanted flags is left alone), so a split is
//!   forced by `modify_range` over the first 4 KiB of each 2 MiB block with
//!   a no-op updater: `split_entry` allocates a table, rewrites the block as
//!   512 pages with the block's flags, and overwrites the block entry with
//!   the table entry in place (no break-before-make, no TLBI of the block).
//!   `peer_split_remap_1g_2m` is the one-call alternative (`map_range` with
//!   `NO_BLOCK_MAPPINGS` and one software flag changed), which writes every
//!   page twice (once by `split_entry`, once with the new flags).
//! - relax_perms and test_clear_young have no equivalent in aarch64-paging
//!   (n/a): there is no access-flag helper and no single-entry update API
//!   other than `modify_range`.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use std::cell::RefCell;
use std::ptr::NonNull;

use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes, UpdatableDescriptor};
use aarch64_paging::paging::{Constraints, MemoryRegion, PageTable, Stage2, Translation};
use aarch64_paging::Mapping;

/// A stage-2 table built and walked by aarch64-paging.
pub type PeerTable = Mapping<PoolTranslation, Stage2>;

/// Pages in the peer's table pool (a 1 GiB range of 4 KiB pages needs 514).
const POOL_PAGES: usize = 1200;

thread_local! {
    /// Free pre-zeroed pages of the pool (addresses), shared by every
    /// [`PoolTranslation`] of this thread.
    static POOL: RefCell<Vec<usize>> = RefCell::new(new_pool());
}

fn new_pool() -> Vec<usize> {
    let layout = std::alloc::Layout::from_size_align(POOL_PAGES * PAGE, PAGE).expect("layout");
    // SAFETY: the layout has a non-zero size. The slab is never freed: the
    // pool lives as long as the benchmark process.
    let slab = unsafe { std::alloc::alloc(layout) };
    assert!(!slab.is_null(), "peer table pool: out of memory");
    // Zero (and so touch) every page now: the timed runs take no first-touch
    // faults and find zeroed tables, as pkvm-pgtable's page cache does.
    // SAFETY: `slab` is a fresh allocation of exactly this many bytes.
    unsafe { std::ptr::write_bytes(slab, 0, POOL_PAGES * PAGE) };
    (0..POOL_PAGES)
        .rev()
        .map(|i| slab as usize + i * PAGE)
        .collect()
}

/// Identity translation whose table pages come from a pre-zeroed pool.
#[derive(Debug, Default)]
pub struct PoolTranslation;

impl Translation<Stage2Attributes> for PoolTranslation {
    fn allocate_table(&mut self) -> (NonNull<PageTable<Stage2Attributes>>, PhysicalAddress) {
        let va = POOL
            .with(|p| p.borrow_mut().pop())
            .expect("peer table pool exhausted: raise POOL_PAGES");
        let table = NonNull::new(va as *mut PageTable<Stage2Attributes>).expect("non-null page");
        (table, PhysicalAddress(va))
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<Stage2Attributes>>) {
        // SAFETY: the caller promises the page came from `allocate_table`
        // (a 4 KiB page of the pool slab) and is no longer in use as a table.
        unsafe { std::ptr::write_bytes(page_table.as_ptr().cast::<u8>(), 0, PAGE) };
        POOL.with(|p| p.borrow_mut().push(page_table.as_ptr() as usize));
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<Stage2Attributes>> {
        NonNull::new(pa.0 as *mut PageTable<Stage2Attributes>).expect("table at PA 0")
    }
}

/// Root level used for the peer's tables (39-bit IPA space, one root page).
pub const ROOT_LEVEL: usize = 1;
/// First IPA of the 1 GiB range every benchmark works on (1 GiB aligned, so
/// the range is exactly one level-2 table and 512 level-3 tables).
pub const IPA_BASE: usize = 0x4000_0000;
/// First PA the range maps to: 2 MiB aligned but not 1 GiB aligned, so that
/// "map 1 GiB as 2M blocks" really produces 512 level-2 blocks rather than
/// one level-1 block.
pub const PA_BASE: usize = 0x8_0020_0000;
/// Size of the range every benchmark works on.
pub const SIZE: usize = 1 << 30;
/// Number of 4 KiB pages in [`SIZE`]: divide a total by this for ns per page.
pub const PAGES: u64 = (SIZE / PAGE) as u64;

const PAGE: usize = 4096;
const BLOCK_2M: usize = 2 << 20;

/// Normal write-back memory, read-write, inner shareable, access flag set:
/// what a stage-2 fault handler installs for guest RAM.
pub fn rw_flags() -> Stage2Attributes {
    Stage2Attributes::VALID
        | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
        | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
        | Stage2Attributes::S2AP_ACCESS_RW
        | Stage2Attributes::SH_INNER
        | Stage2Attributes::ACCESS_FLAG
}

fn range() -> MemoryRegion {
    MemoryRegion::new(IPA_BASE, IPA_BASE + SIZE)
}

fn new_table() -> PeerTable {
    Mapping::new(PoolTranslation, ROOT_LEVEL, Stage2)
}

fn map(t: &mut PeerTable, ipa: usize, size: usize, flags: Stage2Attributes, c: Constraints) {
    let pa = PA_BASE + (ipa - IPA_BASE);
    t.map_range(
        &MemoryRegion::new(ipa, ipa + size),
        PhysicalAddress(pa),
        flags,
        c,
    )
    .expect("aarch64-paging map_range failed");
}

// --- The operations, split into set-up (untimed) and the work (timed) -----

/// Empty table.
fn setup_empty() -> PeerTable {
    new_table()
}

/// Empty table, with the CPU caches flushed by [`super::evict_caches`].
fn setup_empty_cold() -> PeerTable {
    let t = new_table();
    super::evict_caches();
    t
}

/// Table with the whole range mapped as 4 KiB pages.
fn setup_4k() -> PeerTable {
    let mut t = new_table();
    op_map_1g_4k(&mut t);
    t
}

/// Table with the whole range mapped as 2 MiB blocks.
fn setup_2m() -> PeerTable {
    let mut t = new_table();
    op_map_1g_2m(&mut t);
    t
}

fn op_map_1g_4k(t: &mut PeerTable) {
    map(
        t,
        IPA_BASE,
        SIZE,
        rw_flags(),
        Constraints::NO_BLOCK_MAPPINGS,
    );
}

fn op_map_4k_per_call(t: &mut PeerTable) {
    let flags = rw_flags();
    for ipa in (IPA_BASE..IPA_BASE + SIZE).step_by(PAGE) {
        map(t, ipa, PAGE, flags, Constraints::NO_BLOCK_MAPPINGS);
    }
}

fn op_map_1g_2m(t: &mut PeerTable) {
    map(t, IPA_BASE, SIZE, rw_flags(), Constraints::empty());
}

fn op_unmap_1g_4k(t: &mut PeerTable) {
    t.modify_range(&range(), &clear_valid)
        .expect("aarch64-paging modify_range (unmap) failed");
}

fn clear_valid(
    _: &MemoryRegion,
    d: &mut UpdatableDescriptor<'_, Stage2Attributes>,
) -> Result<(), ()> {
    if d.flags().contains(Stage2Attributes::VALID) {
        d.modify_flags(Stage2Attributes::empty(), Stage2Attributes::VALID)
    } else {
        Ok(())
    }
}

fn op_unmap_free_1g_4k(t: &mut PeerTable) {
    // Flags without VALID: the PA is ignored and, because the range covers
    // whole table entries, the sub-tables are detached and freed.
    map(
        t,
        IPA_BASE,
        SIZE,
        Stage2Attributes::empty(),
        Constraints::empty(),
    );
}

fn op_wrprotect_1g_4k(t: &mut PeerTable) {
    t.modify_range(&range(), &wrprotect)
        .expect("aarch64-paging modify_range (wrprotect) failed");
}

fn wrprotect(
    _: &MemoryRegion,
    d: &mut UpdatableDescriptor<'_, Stage2Attributes>,
) -> Result<(), ()> {
    if d.flags().contains(Stage2Attributes::VALID) {
        // S2AP RW (0b11) -> RO (0b01): clear S2AP[1], the write permission.
        d.modify_flags(Stage2Attributes::empty(), Stage2Attributes::S2AP_ACCESS_WO)
    } else {
        Ok(())
    }
}

fn op_split_1g_2m(t: &mut PeerTable) {
    for blk in (IPA_BASE..IPA_BASE + SIZE).step_by(BLOCK_2M) {
        // A range not aligned to the block makes modify_range split the
        // block (split_entry rebuilds all 512 pages); the updater is a no-op.
        t.modify_range(&MemoryRegion::new(blk, blk + PAGE), &|_, _| Ok(()))
            .expect("aarch64-paging modify_range (split) failed");
    }
}

fn op_split_remap_1g_2m(t: &mut PeerTable) {
    map(
        t,
        IPA_BASE,
        SIZE,
        rw_flags() | Stage2Attributes::SWFLAG_0,
        Constraints::NO_BLOCK_MAPPINGS,
    );
}

/// Builds the starting table of an operation.
type Setup = fn() -> PeerTable;
/// The timed work of an operation.
type Op = fn(&mut PeerTable);

/// Runs `op` `iters` times, each on a fresh table from `setup`; returns the
/// time spent in `op` only.
fn time_op(iters: u64, setup: Setup, op: Op) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut t = setup();
        let start = Instant::now();
        op(&mut t);
        total += start.elapsed();
        std::hint::black_box(&t);
        drop(t);
    }
    total
}

// --- Public benchmark entry points (criterion iter_custom convention) -------

/// Map 1 GiB as 4 KiB pages in one `map_range` call (`NO_BLOCK_MAPPINGS`).
pub fn peer_map_1g_4k(iters: u64) -> Duration {
    time_op(iters, setup_empty, op_map_1g_4k)
}

/// [`peer_map_1g_4k`] with cold caches (flushed before each run).
pub fn peer_map_1g_4k_cold(iters: u64) -> Duration {
    time_op(iters, setup_empty_cold, op_map_1g_4k)
}

/// Map 1 GiB one 4 KiB page per `map_range` call (262144 calls: the fault path).
pub fn peer_map_4k_per_call(iters: u64) -> Duration {
    time_op(iters, setup_empty, op_map_4k_per_call)
}

/// Map 1 GiB as 2 MiB blocks in one `map_range` call.
pub fn peer_map_1g_2m(iters: u64) -> Duration {
    time_op(iters, setup_empty, op_map_1g_2m)
}

/// "Unmap" 1 GiB of 4 KiB pages: `modify_range` clearing the valid bit of
/// every page. aarch64-paging has no unmap operation; this frees nothing.
pub fn peer_unmap_1g_4k(iters: u64) -> Duration {
    time_op(iters, setup_4k, op_unmap_1g_4k)
}

/// Extra variant: unmap 1 GiB of 4 KiB pages with `map_range` and flags
/// lacking `VALID`, which (range covering whole table entries) detaches and
/// frees all 513 sub-tables without visiting the leaf entries.
pub fn peer_unmap_free_1g_4k(iters: u64) -> Duration {
    time_op(iters, setup_4k, op_unmap_free_1g_4k)
}

/// Write-protect 1 GiB of 4 KiB pages: one `modify_range` clearing S2AP[1].
pub fn peer_wrprotect_1g_4k(iters: u64) -> Duration {
    time_op(iters, setup_4k, op_wrprotect_1g_4k)
}

/// Split 1 GiB of 2 MiB blocks into 4 KiB pages with unchanged attributes:
/// one `modify_range` per block over its first page (512 calls).
pub fn peer_split_1g_2m(iters: u64) -> Duration {
    time_op(iters, setup_2m, op_split_1g_2m)
}

/// Extra variant: split by remapping the whole 1 GiB in one `map_range` call
/// with `NO_BLOCK_MAPPINGS` and a software flag changed (with identical flags
/// aarch64-paging leaves the blocks alone).
pub fn peer_split_remap_1g_2m(iters: u64) -> Duration {
    time_op(iters, setup_2m, op_split_remap_1g_2m)
}

// --- Sanity check: every timed operation produced the expected mapping -----

/// What a walk of the 1 GiB range is expected to find at every step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Valid page at level 3 mapping `PA_BASE + offset`, with these flags.
    Pages(Stage2Attributes),
    /// Valid block at level 2 mapping `PA_BASE + offset`, with these flags.
    Blocks2M(Stage2Attributes),
    /// Only invalid level-3 entries (tables kept).
    InvalidPages,
    /// A single invalid level-1 entry covering the range (tables freed).
    InvalidL1,
}

fn check(name: &str, t: &PeerTable, expect: Expect) {
    let mut leaves = 0usize;
    let mut covered = 0usize;
    t.walk_range(&range(), &mut |mr, d, level| {
        let off = mr.start().0 - IPA_BASE;
        let ok = match expect {
            Expect::Pages(f) => {
                level == 3
                    && d.is_valid()
                    && d.output_address().0 == PA_BASE + off
                    && d.flags() == f | Stage2Attributes::TABLE_OR_PAGE
            }
            Expect::Blocks2M(f) => {
                level == 2
                    && d.is_valid()
                    && mr.len() == BLOCK_2M
                    && d.output_address().0 == PA_BASE + off
                    && d.flags() == f
            }
            Expect::InvalidPages => level == 3 && !d.is_valid(),
            Expect::InvalidL1 => level == 1 && d.bits_is_zero(),
        };
        assert!(
            ok,
            "peer sanity {name}: unexpected descriptor {d:?} at level {level} for {mr:?}"
        );
        leaves += 1;
        covered += mr.len();
        Ok(())
    })
    .unwrap_or_else(|e| panic!("peer sanity {name}: walk failed: {e}"));
    let want = match expect {
        Expect::Pages(_) | Expect::InvalidPages => SIZE / PAGE,
        Expect::Blocks2M(_) => SIZE / BLOCK_2M,
        Expect::InvalidL1 => 1,
    };
    assert_eq!(leaves, want, "peer sanity {name}: leaf count");
    assert_eq!(covered, SIZE, "peer sanity {name}: bytes covered");
}

/// Small extension so the check can ask for an all-zero descriptor.
trait BitsIsZero {
    fn bits_is_zero(&self) -> bool;
}

impl BitsIsZero for aarch64_paging::descriptor::Descriptor<Stage2Attributes> {
    fn bits_is_zero(&self) -> bool {
        !self.is_valid() && self.output_address().0 == 0 && self.flags().is_empty()
    }
}

/// Runs every peer operation once (untimed) and checks with aarch64-paging's
/// own `walk_range` that it produced the expected table: right level, output
/// address, flags and page count over the whole 1 GiB. Panics on a mismatch.
pub fn sanity() {
    let ro = (rw_flags() - Stage2Attributes::S2AP_ACCESS_RW) | Stage2Attributes::S2AP_ACCESS_RO;
    let cases: [(&str, Setup, Op, Expect); 8] = [
        (
            "map_1g_4k",
            setup_empty,
            op_map_1g_4k,
            Expect::Pages(rw_flags()),
        ),
        (
            "map_4k_per_call",
            setup_empty,
            op_map_4k_per_call,
            Expect::Pages(rw_flags()),
        ),
        (
            "map_1g_2m",
            setup_empty,
            op_map_1g_2m,
            Expect::Blocks2M(rw_flags()),
        ),
        (
            "unmap_1g_4k",
            setup_4k,
            op_unmap_1g_4k,
            Expect::InvalidPages,
        ),
        (
            "unmap_free_1g_4k",
            setup_4k,
            op_unmap_free_1g_4k,
            Expect::InvalidL1,
        ),
        (
            "wrprotect_1g_4k",
            setup_4k,
            op_wrprotect_1g_4k,
            Expect::Pages(ro),
        ),
        (
            "split_1g_2m",
            setup_2m,
            op_split_1g_2m,
            Expect::Pages(rw_flags()),
        ),
        (
            "split_remap_1g_2m",
            setup_2m,
            op_split_remap_1g_2m,
            Expect::Pages(rw_flags() | Stage2Attributes::SWFLAG_0),
        ),
    ];
    for (name, setup, op, expect) in cases {
        let mut t = setup();
        op(&mut t);
        check(name, &t, expect);
    }
}
