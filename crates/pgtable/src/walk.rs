//! The one page-table walker, and the break/make pair.
//!
//! A [`Visitor`] is called for entries in a range: `leaf` for any non-table
//! entry (valid or not), `table_pre` before descending into a table and
//! `table_post` after. After `leaf` or `table_pre` the entry is re-read, so a
//! visitor that installs a table gets it walked (unless it returns
//! [`Next::SkipChildren`]).
//!
//! Entries change only through [`VisitCtx`]: [`VisitCtx::set`] for changes
//! the architecture allows without break-before-make (invalid -> anything,
//! permission relaxation, access flag), and [`VisitCtx::replace`] (break,
//! invalidate, make) for everything else. In a shared walk every update is a
//! compare-exchange against the value the visitor saw; losing the race
//! returns [`PtError::Again`]. The visitor's refcount changes are batched per
//! table page and applied once when the walker leaves that table.

use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::pte::{bits, s2};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Level, Pa};

use crate::env::{PageCache, PtMemory, TlbOps, ENTRIES};
use crate::error::PtError;

/// The software lock marker written during break-before-make.
pub const LOCKED: u64 = s2::INVALID_LOCKED;

const G: Granule = Granule::Size4K;

/// What the walker does after a visitor returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Descend into the entry if it is (now) a table.
    Continue,
    /// Do not descend into the entry's children.
    SkipChildren,
}

/// Whether `pte` is a table descriptor at `level`.
#[inline(always)]
pub const fn is_table(pte: u64, level: Level) -> bool {
    level.0 < 3 && pte & (bits::VALID | bits::TYPE) == (bits::VALID | bits::TYPE)
}

/// Whether `pte` is a valid leaf (block or page) at `level`.
#[inline(always)]
pub const fn is_valid_leaf(pte: u64, level: Level) -> bool {
    pte & bits::VALID != 0 && (level.0 == 3) == (pte & bits::TYPE != 0)
}

/// Output address of a descriptor.
#[inline(always)]
pub const fn oa(pte: u64) -> Pa {
    Pa(pte & bits::OA_MASK_4K)
}

/// Attribute bits of a leaf: everything but valid, type and output address.
#[inline(always)]
pub const fn leaf_attrs_of(pte: u64) -> u64 {
    pte & !(bits::OA_MASK_4K | bits::VALID | bits::TYPE)
}

/// A leaf descriptor at `level`.
#[inline(always)]
pub const fn make_leaf(pa: u64, level: Level, attrs: u64) -> u64 {
    let ty = if level.0 == 3 { bits::TYPE } else { 0 };
    (pa & bits::OA_MASK_4K) | attrs | bits::VALID | ty
}

/// A table descriptor.
#[inline(always)]
pub const fn make_table(pa: Pa) -> u64 {
    (pa.0 & bits::OA_MASK_4K) | bits::VALID | bits::TYPE
}

/// Size of the region an entry at `level` covers.
#[inline(always)]
pub const fn level_size(level: Level) -> u64 {
    G.level_size(level)
}

/// The state a visitor sees for one entry.
pub struct VisitCtx<'a, E> {
    /// The environment (memory, TLB).
    pub env: &'a E,
    entry: &'a AtomicU64,
    /// The entry's value when it was read.
    pub old: u64,
    /// First input address the entry covers.
    pub addr: u64,
    /// The part of the walk's range inside this entry: `[start, end)`.
    pub start: u64,
    /// End of the part of the walk's range inside this entry.
    pub end: u64,
    /// The entry's level.
    pub level: Level,
    /// Whether this is a shared (concurrent) walk.
    pub shared: bool,
    delta: &'a mut i32,
}

impl<E: PtMemory + TlbOps> VisitCtx<'_, E> {
    /// Size covered by this entry.
    #[inline(always)]
    pub fn size(&self) -> u64 {
        level_size(self.level)
    }

    /// Whether the walk's range covers the whole entry.
    #[inline(always)]
    pub fn fully_covered(&self) -> bool {
        self.start == self.addr && self.end == self.addr + self.size()
    }

    #[inline(always)]
    fn account(&mut self, old: u64, new: u64) {
        *self.delta += (new != 0) as i32 - (old != 0) as i32;
    }

    /// Writes `new` where the architecture allows an in-place update (the
    /// old entry was invalid, or only permissions/AF grow). Shared walks
    /// compare-exchange against `self.old`.
    ///
    /// # Errors
    /// [`PtError::Again`] if a concurrent walker changed the entry.
    #[inline(always)]
    pub fn set(&mut self, new: u64) -> Result<(), PtError> {
        if self.shared {
            self.entry
                .compare_exchange(self.old, new, Ordering::Release, Ordering::Relaxed)
                .map_err(|_| PtError::Again)?;
        } else {
            self.entry.store(new, Ordering::Release);
        }
        let old = self.old;
        self.account(old, new);
        self.old = new;
        Ok(())
    }

    /// Break-before-make: locks the entry, invalidates the old translation
    /// (one IPA at the old level for a leaf; the covered range for a table),
    /// then publishes `new` with release ordering. The only way a valid
    /// entry is replaced by a different one.
    ///
    /// # Errors
    /// [`PtError::Again`] if the entry is locked by, or changed by, a
    /// concurrent walker.
    #[inline]
    pub fn replace(&mut self, new: u64) -> Result<(), PtError> {
        self.break_pte()?;
        self.make_pte(new);
        Ok(())
    }

    fn break_pte(&mut self) -> Result<(), PtError> {
        let old = self.old;
        if old & bits::VALID == 0 && old & LOCKED != 0 {
            return Err(PtError::Again);
        }
        if self.shared {
            self.entry
                .compare_exchange(old, LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .map_err(|_| PtError::Again)?;
        } else {
            self.entry.store(LOCKED, Ordering::Relaxed);
        }
        if old & bits::VALID != 0 {
            if is_table(old, self.level) {
                self.env.tlbi_range(self.addr, self.addr + self.size());
            } else {
                self.env.tlbi_leaf(self.addr, self.level);
            }
        }
        // The locked marker is non-zero: it keeps the old entry's reference
        // until make_pte settles it.
        self.account(old, LOCKED);
        self.old = LOCKED;
        Ok(())
    }

    fn make_pte(&mut self, new: u64) {
        self.entry.store(new, Ordering::Release);
        self.account(LOCKED, new);
        self.old = new;
    }
}

/// A page-table visitor. The associated constants select which callbacks
/// the walker makes.
pub trait Visitor<E> {
    /// Call `leaf` for non-table entries.
    const LEAF: bool;
    /// Call `table_pre` before descending into a table.
    const TABLE_PRE: bool;
    /// Call `table_post` after a table's children were walked.
    const TABLE_POST: bool;

    /// A non-table entry (valid or not).
    ///
    /// # Errors
    /// Any error stops the walk and is returned to the caller.
    fn leaf(&mut self, _ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        Ok(Next::Continue)
    }
    /// A table entry, before its children.
    ///
    /// # Errors
    /// Any error stops the walk and is returned to the caller.
    fn table_pre(&mut self, _ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        Ok(Next::Continue)
    }
    /// A table entry, after its children.
    ///
    /// # Errors
    /// Any error stops the walk and is returned to the caller.
    fn table_post(&mut self, _ctx: &mut VisitCtx<'_, E>) -> Result<(), PtError> {
        Ok(())
    }
}

/// Walks `[start, end)` of the table rooted at `root` with geometry `geo`.
/// The range must already be validated and page aligned.
#[inline]
pub(crate) fn walk_range<E, V>(
    env: &E,
    root: Pa,
    geo: &S2Geometry,
    start: u64,
    end: u64,
    shared: bool,
    v: &mut V,
) -> Result<(), PtError>
where
    E: PtMemory + TlbOps,
    V: Visitor<E>,
{
    let level = geo.start_level;
    let span = level_size(level) * ENTRIES as u64;
    let mut addr = start;
    while addr < end {
        let page = (addr >> span.trailing_zeros()) as usize;
        debug_assert!(page < geo.root_pages);
        let table = Pa(root.0 + (page as u64) * G.size());
        let page_end = ((page as u64) + 1) * span;
        let stop = if page_end < end { page_end } else { end };
        walk_table(env, table, level, addr, stop, shared, v)?;
        addr = stop;
    }
    Ok(())
}

#[inline(always)]
fn apply_delta<E: PtMemory>(env: &E, table: Pa, delta: i32, shared: bool) {
    if delta == 0 {
        return;
    }
    let rc = env.refcount(table);
    if shared {
        if delta > 0 {
            rc.fetch_add(delta as u32, Ordering::Relaxed);
        } else {
            rc.fetch_sub((-delta) as u32, Ordering::Relaxed);
        }
    } else {
        // Exclusive walk: no concurrent updates, and no atomic RMW (which
        // would fault on Device memory while the EL2 MMU is still off).
        let v = rc.load(Ordering::Relaxed) as i64 + delta as i64;
        debug_assert!(
            (0..=ENTRIES as i64).contains(&v),
            "table refcount out of range: {v}"
        );
        rc.store(v as u32, Ordering::Relaxed);
    }
}

#[inline]
fn walk_table<E, V>(
    env: &E,
    table: Pa,
    level: Level,
    start: u64,
    end: u64,
    shared: bool,
    v: &mut V,
) -> Result<(), PtError>
where
    E: PtMemory + TlbOps,
    V: Visitor<E>,
{
    let entries = env.table(table);
    let size = level_size(level);
    let mut idx = G.index(start, level);
    let mut addr = start & !(size - 1);
    let mut delta = 0i32;
    let mut res = Ok(());
    while addr < end && idx < ENTRIES {
        let entry = &entries[idx];
        let s = if addr > start { addr } else { start };
        let e = if addr + size < end { addr + size } else { end };
        if let Err(err) = visit_entry(env, entry, addr, s, e, level, shared, v, &mut delta) {
            res = Err(err);
            break;
        }
        idx += 1;
        addr += size;
    }
    apply_delta(env, table, delta, shared);
    res
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn visit_entry<E, V>(
    env: &E,
    entry: &AtomicU64,
    addr: u64,
    start: u64,
    end: u64,
    level: Level,
    shared: bool,
    v: &mut V,
    delta: &mut i32,
) -> Result<(), PtError>
where
    E: PtMemory + TlbOps,
    V: Visitor<E>,
{
    let old = entry.load(Ordering::Acquire);
    let table = is_table(old, level);
    let mut cur = old;
    if table && V::TABLE_PRE || !table && V::LEAF {
        let mut ctx = VisitCtx {
            env,
            entry,
            old,
            addr,
            start,
            end,
            level,
            shared,
            delta,
        };
        let next = if table {
            v.table_pre(&mut ctx)?
        } else {
            v.leaf(&mut ctx)?
        };
        if next == Next::SkipChildren {
            return Ok(());
        }
        // The visitor may have installed a table: re-read.
        cur = entry.load(Ordering::Acquire);
    }
    if !is_table(cur, level) {
        return Ok(());
    }
    let child_level = Level(level.0 + 1);
    walk_table(env, oa(cur), child_level, start, end, shared, v)?;
    if V::TABLE_POST {
        let mut ctx = VisitCtx {
            env,
            entry,
            old: cur,
            addr,
            start,
            end,
            level,
            shared,
            delta,
        };
        v.table_post(&mut ctx)?;
    }
    Ok(())
}

/// Frees a detached subtree rooted at the table page `table` (at `level`):
/// every table page below it is zeroed and handed back to `cache`. No TLB
/// maintenance: the caller unlinked it and invalidated already.
pub(crate) fn free_subtree<E: PtMemory, C: PageCache>(
    env: &E,
    cache: &mut C,
    table: Pa,
    level: Level,
) {
    let entries = env.table(table);
    for e in entries.iter() {
        let pte = e.load(Ordering::Relaxed);
        if pte != 0 {
            if is_table(pte, level) {
                free_subtree(env, cache, oa(pte), Level(level.0 + 1));
            }
            e.store(0, Ordering::Relaxed);
        }
    }
    env.refcount(table).store(0, Ordering::Relaxed);
    cache.free_table(table);
}

/// Builds a detached table at `level + 1` that maps exactly what the block
/// `block` at `level` maps (same attributes), descending to pages if
/// `to_pages`. On `NoMemory` every page taken is given back.
pub(crate) fn build_split<E: PtMemory, C: PageCache>(
    env: &E,
    cache: &mut C,
    block: u64,
    level: Level,
    to_pages: bool,
) -> Result<Pa, PtError> {
    let child_level = Level(level.0 + 1);
    let table = cache.alloc_table().ok_or(PtError::NoMemory)?;
    let entries = env.table(table);
    let child_size = level_size(child_level);
    let base = oa(block).0 & !(level_size(level) - 1);
    let attrs = leaf_attrs_of(block);
    if to_pages && child_level.0 < 3 {
        for (i, e) in entries.iter().enumerate() {
            let sub = make_leaf(base + i as u64 * child_size, child_level, attrs);
            match build_split(env, cache, sub, child_level, true) {
                Ok(t) => e.store(make_table(t), Ordering::Relaxed),
                Err(err) => {
                    env.refcount(table).store(i as u32, Ordering::Relaxed);
                    free_subtree(env, cache, table, child_level);
                    return Err(err);
                }
            }
        }
    } else {
        let ty = if child_level.0 == 3 { bits::TYPE } else { 0 };
        let mut pa = base;
        for e in entries.iter() {
            e.store(pa | attrs | bits::VALID | ty, Ordering::Relaxed);
            pa += child_size;
        }
    }
    env.refcount(table).store(ENTRIES as u32, Ordering::Relaxed);
    Ok(table)
}

/// Builds a detached table whose entries all carry the invalid annotation
/// `annotation` (so splitting an annotated block keeps ownership records).
pub(crate) fn build_annotated<E: PtMemory, C: PageCache>(
    env: &E,
    cache: &mut C,
    annotation: u64,
) -> Result<Pa, PtError> {
    let table = cache.alloc_table().ok_or(PtError::NoMemory)?;
    if annotation != 0 {
        for e in env.table(table).iter() {
            e.store(annotation, Ordering::Relaxed);
        }
        env.refcount(table).store(ENTRIES as u32, Ordering::Relaxed);
    }
    Ok(table)
}
