//! The page-table handle and its operations.

use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use pkvm_arch::pte::{bits, s2, S2Features, S2Prot};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa, PAGE_SIZE};

use crate::env::{PageCache, PtMemory, TlbOps, ENTRIES};
use crate::error::PtError;
use crate::regime::{Address, Regime, Stage2};
use crate::walk::{
    self, build_annotated, build_split, free_subtree, is_table, is_valid_leaf, level_size,
    make_leaf, make_table, oa, walk_range, Next, VisitCtx, Visitor,
};

/// Options for map operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MapFlags(u32);

impl MapFlags {
    /// No options.
    pub const NONE: MapFlags = MapFlags(0);
    /// Map with level-3 pages only (e.g. while dirty logging).
    pub const FORCE_PAGE: MapFlags = MapFlags(1);
    /// Fail with [`PtError::AlreadyMapped`] instead of replacing any
    /// existing valid or annotated entry.
    pub const NO_REPLACE: MapFlags = MapFlags(2);

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: MapFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for MapFlags {
    type Output = MapFlags;
    fn bitor(self, rhs: MapFlags) -> MapFlags {
        MapFlags(self.0 | rhs.0)
    }
}

/// A leaf found by [`PageTable::get_leaf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The descriptor (may be invalid, an annotation, or zero).
    pub pte: u64,
    /// The level it sits at.
    pub level: Level,
}

/// The geometry of an EL2 stage-1 table for `va_bits` (one root page).
///
/// # Errors
/// [`PtError::OutOfRange`] if `va_bits` is outside `25..=48`.
pub const fn el2_geometry(va_bits: u32) -> Result<S2Geometry, PtError> {
    if va_bits < 25 || va_bits > 48 {
        return Err(PtError::OutOfRange { addr: 0, size: 0 });
    }
    let g = Granule::Size4K;
    let levels = (va_bits - g.shift()).div_ceil(g.bits_per_level());
    Ok(S2Geometry {
        granule: g,
        ipa_bits: va_bits,
        start_level: Level((4 - levels) as u8),
        root_pages: 1,
    })
}

/// A page table of regime `R`. Not `Clone`: holding `&mut PageTable` is the
/// proof that a walk is exclusive; concurrent walks go through
/// [`PageTable::shared`].
#[derive(Debug)]
pub struct PageTable<R: Regime> {
    root: Pa,
    geo: S2Geometry,
    feat: S2Features,
    _regime: PhantomData<R>,
}

/// Shared (concurrent) access to a page table: updates by compare-exchange,
/// never frees table pages.
#[derive(Debug)]
pub struct SharedPageTable<'a, R: Regime> {
    pt: &'a PageTable<R>,
}

impl<R: Regime> PageTable<R> {
    /// A table whose root is `geo.root_pages` contiguous, zeroed pages at
    /// `root` (aligned to their total size), provided by the caller.
    pub const fn new(root: Pa, geo: S2Geometry, feat: S2Features) -> Self {
        PageTable {
            root,
            geo,
            feat,
            _regime: PhantomData,
        }
    }

    /// Physical address of the root table.
    pub const fn root(&self) -> Pa {
        self.root
    }

    /// The table's geometry.
    pub const fn geometry(&self) -> S2Geometry {
        self.geo
    }

    /// The descriptor encoding features.
    pub const fn features(&self) -> S2Features {
        self.feat
    }

    /// Shared-walk access.
    pub const fn shared(&self) -> SharedPageTable<'_, R> {
        SharedPageTable { pt: self }
    }

    fn check_range(&self, addr: u64, size: u64) -> Result<u64, PtError> {
        if addr & (PAGE_SIZE - 1) != 0 {
            return Err(PtError::Misaligned { value: addr });
        }
        if size & (PAGE_SIZE - 1) != 0 {
            return Err(PtError::Misaligned { value: size });
        }
        match addr.checked_add(size) {
            Some(end) if end <= self.geo.ipa_size() => Ok(end),
            _ => Err(PtError::OutOfRange { addr, size }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn do_map<E: PtMemory + TlbOps, C: PageCache>(
        &self,
        env: &E,
        addr: R::Addr,
        size: u64,
        pa: Pa,
        prot: R::Prot,
        flags: MapFlags,
        cache: &mut C,
        shared: bool,
    ) -> Result<(), PtError> {
        let addr = addr.to_raw();
        let end = self.check_range(addr, size)?;
        if pa.0 & (PAGE_SIZE - 1) != 0 {
            return Err(PtError::Misaligned { value: pa.0 });
        }
        if pa.0.checked_add(size).is_none_or(|e| e > 1 << 48) {
            return Err(PtError::OutOfRange { addr: pa.0, size });
        }
        if !R::valid_prot(prot) {
            return Err(PtError::InvalidProt);
        }
        if size == 0 {
            return Ok(());
        }
        let attrs = R::leaf_attrs(prot, self.feat);
        if size == PAGE_SIZE {
            // The fault path: one page. A direct descent handles the common
            // case (tables present or missing, the page entry empty); any
            // other situation falls back to the general walker, which sees
            // exactly what the descent left (only new, empty tables).
            let maint = (
                env.needs_dcache_maintenance() && R::cacheable(prot),
                R::executable(prot),
            );
            if let Some(r) = map_page_fast(self, env, addr, pa, attrs, maint, cache, shared) {
                return r;
            }
        }
        let mut v = MapVisitor::<R, C> {
            pa_delta: pa.0.wrapping_sub(addr),
            attrs,
            cacheable: R::cacheable(prot),
            exec: R::executable(prot),
            flags,
            cache,
            _r: PhantomData,
        };
        walk_range(env, self.root, &self.geo, addr, end, shared, &mut v)
    }

    /// Maps `[addr, addr+size)` to `[pa, pa+size)` with `prot`, using the
    /// largest block that fits and is aligned (pages only with
    /// [`MapFlags::FORCE_PAGE`]). A table where a block now fits is
    /// collapsed; a block that cannot stay is split (its other parts keep
    /// their mapping). Table pages come from `cache`.
    ///
    /// # Errors
    /// Range/alignment errors; [`PtError::NoMemory`] when `cache` runs dry;
    /// [`PtError::Again`] if the same mapping (permissions aside) exists;
    /// [`PtError::AlreadyMapped`] with [`MapFlags::NO_REPLACE`].
    #[allow(clippy::too_many_arguments)]
    pub fn map<E: PtMemory + TlbOps, C: PageCache>(
        &mut self,
        env: &E,
        addr: R::Addr,
        size: u64,
        pa: Pa,
        prot: R::Prot,
        flags: MapFlags,
        cache: &mut C,
    ) -> Result<(), PtError> {
        self.do_map(env, addr, size, pa, prot, flags, cache, false)
    }

    /// Unmaps `[addr, addr+size)` (annotations included), splitting blocks
    /// that straddle the range's edges and freeing tables that become empty.
    ///
    /// # Errors
    /// Range/alignment errors; [`PtError::NoMemory`] if a straddling block
    /// needs a table page and `cache` is dry.
    pub fn unmap<E: PtMemory + TlbOps, C: PageCache>(
        &mut self,
        env: &E,
        addr: R::Addr,
        size: u64,
        cache: &mut C,
    ) -> Result<(), PtError> {
        let addr = addr.to_raw();
        let end = self.check_range(addr, size)?;
        let mut v = UnmapVisitor { cache };
        walk_range(env, self.root, &self.geo, addr, end, false, &mut v)
    }

    /// The entry translating `addr` and its level: the deepest entry a
    /// hardware walk reaches. Out-of-range addresses give a zero entry at the
    /// start level.
    pub fn get_leaf<E: PtMemory>(&self, env: &E, addr: R::Addr) -> Leaf {
        get_leaf_raw(env, self.root, &self.geo, addr.to_raw())
    }

    /// What `addr` translates to: output address (with the page offset),
    /// protection and level; `None` if not mapped.
    pub fn translate<E: PtMemory>(&self, env: &E, addr: R::Addr) -> Option<(Pa, R::Prot, Level)> {
        let a = addr.to_raw();
        let leaf = self.get_leaf(env, addr);
        if !is_valid_leaf(leaf.pte, leaf.level) {
            return None;
        }
        let off = a & (level_size(leaf.level) - 1);
        Some((
            Pa(oa(leaf.pte).0 + off),
            R::prot_of(leaf.pte, self.feat),
            leaf.level,
        ))
    }

    /// Calls `f(addr, level, pte)` for every non-zero leaf entry in
    /// `[addr, addr+size)` (read-only walk).
    ///
    /// # Errors
    /// Range/alignment errors.
    pub fn for_each_leaf<E: PtMemory + TlbOps, F: FnMut(u64, Level, u64)>(
        &self,
        env: &E,
        addr: R::Addr,
        size: u64,
        f: F,
    ) -> Result<(), PtError> {
        let addr = addr.to_raw();
        let end = self.check_range(addr, size)?;
        let mut v = ReadVisitor { f };
        walk_range(env, self.root, &self.geo, addr, end, true, &mut v)
    }

    /// Walks `[addr, addr+size)` exclusively with a custom visitor.
    ///
    /// # Errors
    /// Range/alignment errors, or what the visitor returns.
    pub fn walk<E: PtMemory + TlbOps, V: Visitor<E>>(
        &mut self,
        env: &E,
        addr: R::Addr,
        size: u64,
        v: &mut V,
    ) -> Result<(), PtError> {
        let addr = addr.to_raw();
        let end = self.check_range(addr, size)?;
        walk_range(env, self.root, &self.geo, addr, end, false, v)
    }

    /// Tears the table down: every table page below the root is zeroed and
    /// handed back to `cache`; the root pages are zeroed and their address
    /// returned for the caller to free. Consumes the table, so it can run
    /// once. No TLB maintenance: the caller detached the table and flushed
    /// the VMID before.
    pub fn destroy<E: PtMemory, C: PageCache>(self, env: &E, cache: &mut C) -> Pa {
        let level = self.geo.start_level;
        for page in 0..self.geo.root_pages {
            let table = Pa(self.root.0 + page as u64 * PAGE_SIZE);
            for e in env.table(table).iter() {
                let pte = e.load(Ordering::Relaxed);
                if pte != 0 {
                    if is_table(pte, level) {
                        free_subtree(env, cache, oa(pte), Level(level.0 + 1));
                    }
                    e.store(0, Ordering::Relaxed);
                }
            }
            env.refcount(table).store(0, Ordering::Relaxed);
        }
        self.root
    }
}

impl PageTable<Stage2> {
    /// Clears write permission on every valid leaf in the range, in place.
    /// No TLB invalidation inside the range: the caller flushes it once. A
    /// block straddling the range's edge is protected whole and invalidated
    /// here, since the caller's flush does not cover its outside part.
    ///
    /// # Errors
    /// Range/alignment errors.
    pub fn wrprotect<E: PtMemory + TlbOps>(
        &mut self,
        env: &E,
        ipa: Ipa,
        size: u64,
    ) -> Result<(), PtError> {
        let end = self.check_range(ipa.0, size)?;
        let mut v = AttrVisitor {
            set: 0,
            clear: s2::S2AP_W,
            young: false,
            test_af: false,
            flush_partial: true,
        };
        walk_range(env, self.root, &self.geo, ipa.0, end, false, &mut v)
    }

    /// Adds the permissions in `prot` (R/W/X only) to the leaf mapping
    /// `ipa`, in place, with a local TLB invalidation.
    ///
    /// # Errors
    /// [`PtError::Again`] if nothing valid is mapped (the guest retries and
    /// takes a translation fault instead); range errors.
    pub fn relax_perms<E: PtMemory + TlbOps>(
        &mut self,
        env: &E,
        ipa: Ipa,
        prot: S2Prot,
    ) -> Result<(), PtError> {
        relax_perms_impl(self, env, ipa, prot, false)
    }

    /// Sets the access flag of the leaf mapping `ipa`.
    ///
    /// # Errors
    /// [`PtError::Again`] if nothing valid is mapped; range errors.
    pub fn mkyoung<E: PtMemory + TlbOps>(&mut self, env: &E, ipa: Ipa) -> Result<(), PtError> {
        mkyoung_impl(self, env, ipa, false)
    }

    /// Whether any valid leaf in the range has its access flag set;
    /// clears the flags if `clear` (no TLB invalidation, as KVM does for
    /// aging).
    ///
    /// # Errors
    /// Range/alignment errors.
    pub fn test_clear_young<E: PtMemory + TlbOps>(
        &mut self,
        env: &E,
        ipa: Ipa,
        size: u64,
        clear: bool,
    ) -> Result<bool, PtError> {
        test_clear_young_impl(self, env, ipa, size, clear, false)
    }

    /// Splits every block in the range into 4K pages (1 table page per 2M
    /// block, 513 per 1G block). Each subtree is built detached, then the
    /// block is broken and the table installed.
    ///
    /// # Errors
    /// [`PtError::NoMemory`] when the cache cannot cover the next block
    /// (blocks already split stay split); range errors.
    pub fn split<E: PtMemory + TlbOps, C: PageCache>(
        &mut self,
        env: &E,
        ipa: Ipa,
        size: u64,
        cache: &mut C,
    ) -> Result<(), PtError> {
        let end = self.check_range(ipa.0, size)?;
        let mut v = SplitVisitor { cache };
        walk_range(env, self.root, &self.geo, ipa.0, end, false, &mut v)
    }

    /// Replaces whatever maps `[ipa, ipa+size)` with the invalid annotation
    /// `annotation` (an owner or donation record; see
    /// [`pkvm_arch::pte::S2Pte::owner_annotation`]), using the largest
    /// blocks that fit.
    ///
    /// # Errors
    /// [`PtError::InvalidProt`] if `annotation` is valid or zero; range
    /// errors; [`PtError::NoMemory`].
    pub fn annotate<E: PtMemory + TlbOps, C: PageCache>(
        &mut self,
        env: &E,
        ipa: Ipa,
        size: u64,
        annotation: pkvm_arch::pte::S2Pte,
        cache: &mut C,
    ) -> Result<(), PtError> {
        let end = self.check_range(ipa.0, size)?;
        if annotation.0 == 0 || annotation.is_valid() || annotation.is_locked() {
            return Err(PtError::InvalidProt);
        }
        let mut v = AnnotateVisitor {
            value: annotation.0,
            cache,
        };
        walk_range(env, self.root, &self.geo, ipa.0, end, false, &mut v)
    }
}

impl<R: Regime> SharedPageTable<'_, R> {
    /// Shared-walk map: as [`PageTable::map`], but concurrent with other
    /// shared walks (compare-exchange updates; a lost race gives
    /// [`PtError::Again`]), and it never collapses or frees tables: where a
    /// table exists it maps inside it.
    ///
    /// # Errors
    /// As [`PageTable::map`].
    #[allow(clippy::too_many_arguments)]
    pub fn map<E: PtMemory + TlbOps, C: PageCache>(
        &self,
        env: &E,
        addr: R::Addr,
        size: u64,
        pa: Pa,
        prot: R::Prot,
        flags: MapFlags,
        cache: &mut C,
    ) -> Result<(), PtError> {
        self.pt
            .do_map(env, addr, size, pa, prot, flags, cache, true)
    }

    /// See [`PageTable::get_leaf`].
    pub fn get_leaf<E: PtMemory>(&self, env: &E, addr: R::Addr) -> Leaf {
        self.pt.get_leaf(env, addr)
    }

    /// See [`PageTable::translate`].
    pub fn translate<E: PtMemory>(&self, env: &E, addr: R::Addr) -> Option<(Pa, R::Prot, Level)> {
        self.pt.translate(env, addr)
    }
}

impl SharedPageTable<'_, Stage2> {
    /// Shared-walk [`PageTable::relax_perms`].
    ///
    /// # Errors
    /// As [`PageTable::relax_perms`], plus [`PtError::Again`] on a lost race.
    pub fn relax_perms<E: PtMemory + TlbOps>(
        &self,
        env: &E,
        ipa: Ipa,
        prot: S2Prot,
    ) -> Result<(), PtError> {
        relax_perms_impl(self.pt, env, ipa, prot, true)
    }

    /// Shared-walk [`PageTable::mkyoung`].
    ///
    /// # Errors
    /// As [`PageTable::mkyoung`].
    pub fn mkyoung<E: PtMemory + TlbOps>(&self, env: &E, ipa: Ipa) -> Result<(), PtError> {
        mkyoung_impl(self.pt, env, ipa, true)
    }

    /// Shared-walk [`PageTable::test_clear_young`].
    ///
    /// # Errors
    /// As [`PageTable::test_clear_young`].
    pub fn test_clear_young<E: PtMemory + TlbOps>(
        &self,
        env: &E,
        ipa: Ipa,
        size: u64,
        clear: bool,
    ) -> Result<bool, PtError> {
        test_clear_young_impl(self.pt, env, ipa, size, clear, true)
    }
}

/// Maps one page by direct descent when that is all it takes: every level
/// is a table or empty (missing tables are installed from `cache`), and the
/// page entry is empty. Returns `None`, having changed nothing but adding
/// empty tables, when anything else is found (blocks, annotations, an
/// existing page, a lost race): the general walker then decides.
#[allow(clippy::too_many_arguments)]
#[inline]
fn map_page_fast<R: Regime, E: PtMemory + TlbOps, C: PageCache>(
    pt: &PageTable<R>,
    env: &E,
    addr: u64,
    pa: Pa,
    attrs: u64,
    (clean, exec): (bool, bool),
    cache: &mut C,
    shared: bool,
) -> Option<Result<(), PtError>> {
    let mut level = pt.geo.start_level;
    let span = level_size(level) * ENTRIES as u64;
    let mut table = Pa(pt.root.0 + (addr >> span.trailing_zeros()) * PAGE_SIZE);
    loop {
        let entry = &env.table(table)[Granule::Size4K.index(addr, level)];
        let old = entry.load(Ordering::Acquire);
        if level.0 == 3 {
            if old != 0 {
                return None;
            }
            if clean {
                env.dcache_clean_poc(pa, PAGE_SIZE);
            }
            if exec {
                env.icache_inval_pou(pa, PAGE_SIZE);
            }
            let new = make_leaf(pa.0, level, attrs);
            if shared {
                if entry
                    .compare_exchange(0, new, Ordering::Release, Ordering::Relaxed)
                    .is_err()
                {
                    return None;
                }
                env.refcount(table).fetch_add(1, Ordering::Relaxed);
            } else {
                entry.store(new, Ordering::Release);
                let rc = env.refcount(table);
                rc.store(rc.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            return Some(Ok(()));
        }
        if is_table(old, level) {
            table = oa(old);
            level = Level(level.0 + 1);
            continue;
        }
        if old != 0 {
            return None;
        }
        let Some(child) = cache.alloc_table() else {
            return Some(Err(PtError::NoMemory));
        };
        let desc = make_table(child);
        if shared {
            if entry
                .compare_exchange(0, desc, Ordering::Release, Ordering::Relaxed)
                .is_err()
            {
                cache.free_table(child);
                return None;
            }
            env.refcount(table).fetch_add(1, Ordering::Relaxed);
        } else {
            entry.store(desc, Ordering::Release);
            let rc = env.refcount(table);
            rc.store(rc.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        table = child;
        level = Level(level.0 + 1);
    }
}

#[inline]
fn get_leaf_raw<E: PtMemory>(env: &E, root: Pa, geo: &S2Geometry, addr: u64) -> Leaf {
    let mut level = geo.start_level;
    if addr >= geo.ipa_size() {
        return Leaf { pte: 0, level };
    }
    let span = level_size(level) * ENTRIES as u64;
    let page = addr >> span.trailing_zeros();
    let mut table = Pa(root.0 + page * PAGE_SIZE);
    loop {
        let idx = Granule::Size4K.index(addr, level);
        let pte = env.table(table)[idx].load(Ordering::Acquire);
        if !is_table(pte, level) {
            return Leaf { pte, level };
        }
        table = oa(pte);
        level = Level(level.0 + 1);
    }
}

fn update_leaf_in_place<E: PtMemory + TlbOps>(
    pt: &PageTable<Stage2>,
    env: &E,
    ipa: Ipa,
    shared: bool,
    update: impl Fn(u64) -> u64,
) -> Result<(u64, u64, Level), PtError> {
    pt.check_range(ipa.0 & !(PAGE_SIZE - 1), PAGE_SIZE)?;
    let mut level = pt.geo.start_level;
    let span = level_size(level) * ENTRIES as u64;
    let mut table = Pa(pt.root.0 + (ipa.0 >> span.trailing_zeros()) * PAGE_SIZE);
    loop {
        let entry = &env.table(table)[Granule::Size4K.index(ipa.0, level)];
        let pte = entry.load(Ordering::Acquire);
        if is_table(pte, level) {
            table = oa(pte);
            level = Level(level.0 + 1);
            continue;
        }
        if !is_valid_leaf(pte, level) {
            return Err(PtError::Again);
        }
        let new = update(pte);
        if new != pte {
            if shared {
                entry
                    .compare_exchange(pte, new, Ordering::Release, Ordering::Relaxed)
                    .map_err(|_| PtError::Again)?;
            } else {
                entry.store(new, Ordering::Release);
            }
        }
        return Ok((pte, new, level));
    }
}

fn relax_perms_impl<E: PtMemory + TlbOps>(
    pt: &PageTable<Stage2>,
    env: &E,
    ipa: Ipa,
    prot: S2Prot,
    shared: bool,
) -> Result<(), PtError> {
    if prot.intersects(!S2Prot::PERMS) {
        return Err(PtError::InvalidProt);
    }
    let mut set = 0;
    if prot.contains(S2Prot::R) {
        set |= s2::S2AP_R;
    }
    if prot.contains(S2Prot::W) {
        set |= s2::S2AP_W;
    }
    let clear = if prot.contains(S2Prot::X) {
        s2::XN_MASK
    } else {
        0
    };
    let (_, _, level) = update_leaf_in_place(pt, env, ipa, shared, |pte| (pte | set) & !clear)?;
    let size = level_size(level);
    env.tlbi_leaf_local(ipa.0 & !(size - 1), level);
    Ok(())
}

fn mkyoung_impl<E: PtMemory + TlbOps>(
    pt: &PageTable<Stage2>,
    env: &E,
    ipa: Ipa,
    shared: bool,
) -> Result<(), PtError> {
    update_leaf_in_place(pt, env, ipa, shared, |pte| pte | bits::AF).map(|_| ())
}

fn test_clear_young_impl<E: PtMemory + TlbOps>(
    pt: &PageTable<Stage2>,
    env: &E,
    ipa: Ipa,
    size: u64,
    clear: bool,
    shared: bool,
) -> Result<bool, PtError> {
    let end = pt.check_range(ipa.0, size)?;
    let mut v = AttrVisitor {
        set: 0,
        clear: if clear { bits::AF } else { 0 },
        young: false,
        test_af: true,
        flush_partial: false,
    };
    walk_range(env, pt.root, &pt.geo, ipa.0, end, shared, &mut v)?;
    Ok(v.young)
}

// ---------------------------------------------------------------- visitors

struct MapVisitor<'c, R, C> {
    /// `pa - addr` (wrapping): the output address of `addr` is `addr + pa_delta`.
    pa_delta: u64,
    attrs: u64,
    cacheable: bool,
    exec: bool,
    flags: MapFlags,
    cache: &'c mut C,
    _r: PhantomData<R>,
}

impl<R: Regime, C: PageCache> MapVisitor<'_, R, C> {
    #[inline(always)]
    fn leaf_fits<E: PtMemory + TlbOps>(&self, ctx: &VisitCtx<'_, E>) -> bool {
        let size = ctx.size();
        Granule::Size4K.block_allowed(ctx.level)
            && (ctx.level.0 == 3 || !self.flags.contains(MapFlags::FORCE_PAGE))
            && ctx.fully_covered()
            && ctx.addr.wrapping_add(self.pa_delta) & (size - 1) == 0
    }

    #[inline(always)]
    fn maintain<E: PtMemory + TlbOps>(&self, env: &E, pa: u64, size: u64) {
        if self.cacheable && env.needs_dcache_maintenance() {
            env.dcache_clean_poc(Pa(pa), size);
        }
        if self.exec {
            env.icache_inval_pou(Pa(pa), size);
        }
    }

    #[inline(always)]
    fn install_leaf<E: PtMemory + TlbOps>(
        &mut self,
        ctx: &mut VisitCtx<'_, E>,
    ) -> Result<Next, PtError> {
        let pa = ctx.addr.wrapping_add(self.pa_delta);
        let new = make_leaf(pa, ctx.level, self.attrs);
        let old = ctx.old;
        if old == 0 {
            self.maintain(ctx.env, pa, ctx.size());
            ctx.set(new)?;
            return Ok(Next::SkipChildren);
        }
        if old & bits::VALID == 0 {
            if old & walk::LOCKED != 0 {
                return Err(PtError::Again);
            }
            if self.flags.contains(MapFlags::NO_REPLACE) {
                return Err(PtError::AlreadyMapped { addr: ctx.addr });
            }
            self.maintain(ctx.env, pa, ctx.size());
            ctx.set(new)?;
            return Ok(Next::SkipChildren);
        }
        if (old ^ new) & !s2::PERM_MASK == 0 {
            // Same mapping, permissions aside: nothing to do here; a
            // permission upgrade goes through relax_perms.
            return Err(PtError::Again);
        }
        if self.flags.contains(MapFlags::NO_REPLACE) {
            return Err(PtError::AlreadyMapped { addr: ctx.addr });
        }
        self.maintain(ctx.env, pa, ctx.size());
        if is_table(old, ctx.level) {
            // Collapse: unlink the table (break invalidates its whole
            // range), make the block, then free the detached subtree.
            ctx.replace(new)?;
            free_subtree(ctx.env, self.cache, oa(old), Level(ctx.level.0 + 1));
        } else {
            ctx.replace(new)?;
        }
        Ok(Next::SkipChildren)
    }
}

impl<R: Regime, C: PageCache> MapVisitor<'_, R, C> {
    #[inline]
    fn install_page_table<E: PtMemory + TlbOps>(
        &mut self,
        ctx: &mut VisitCtx<'_, E>,
    ) -> Result<Next, PtError> {
        let child = self.cache.alloc_table().ok_or(PtError::NoMemory)?;
        let pa = ctx.addr.wrapping_add(self.pa_delta);
        self.maintain(ctx.env, pa, ctx.size());
        let leaf = make_leaf(pa, Level(3), self.attrs);
        for (i, e) in ctx.env.table(child).iter().enumerate() {
            e.store(leaf + ((i as u64) << 12), Ordering::Relaxed);
        }
        ctx.env
            .refcount(child)
            .store(ENTRIES as u32, Ordering::Relaxed);
        if let Err(e) = ctx.set(make_table(child)) {
            free_subtree(ctx.env, self.cache, child, Level(3));
            return Err(e);
        }
        Ok(Next::SkipChildren)
    }
}

impl<E: PtMemory + TlbOps, R: Regime, C: PageCache> Visitor<E> for MapVisitor<'_, R, C> {
    const LEAF: bool = true;
    const TABLE_PRE: bool = true;
    const TABLE_POST: bool = false;

    #[inline(always)]
    fn table_pre(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        if !ctx.shared && !self.flags.contains(MapFlags::NO_REPLACE) && self.leaf_fits(ctx) {
            return self.install_leaf(ctx);
        }
        Ok(Next::Continue)
    }

    #[inline(always)]
    fn leaf(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        if self.leaf_fits(ctx) {
            return self.install_leaf(ctx);
        }
        // A table is needed at this level.
        let old = ctx.old;
        if old & bits::VALID != 0 {
            // A block that cannot stay: split it so the rest keeps its
            // mapping, unless it already maps exactly what we want.
            let want = ctx.start.wrapping_add(self.pa_delta);
            let have = oa(old).0 + (ctx.start - ctx.addr);
            if want == have
                && (old ^ self.attrs) & !(s2::PERM_MASK | bits::OA_MASK_4K | 3) == 0
                && !grants_more(old, self.attrs)
            {
                return Err(PtError::Again);
            }
            if self.flags.contains(MapFlags::NO_REPLACE) {
                return Err(PtError::AlreadyMapped { addr: ctx.start });
            }
            let child = build_split(ctx.env, self.cache, old, ctx.level, false)?;
            if let Err(e) = ctx.replace(make_table(child)) {
                free_subtree(ctx.env, self.cache, child, Level(ctx.level.0 + 1));
                return Err(e);
            }
            return Ok(Next::Continue);
        }
        if old & walk::LOCKED != 0 && old & s2::INVALID_TYPE_MASK == 0 {
            return Err(PtError::Again);
        }
        if old == 0 && ctx.level.0 == 2 && ctx.fully_covered() {
            // A whole empty 2M range mapped with pages: build the level-3
            // table detached (plain stores, nothing can see it yet), then
            // publish it with one entry update.
            return self.install_page_table(ctx);
        }
        let child = build_annotated(ctx.env, self.cache, old)?;
        if let Err(e) = ctx.set(make_table(child)) {
            free_subtree(ctx.env, self.cache, child, Level(ctx.level.0 + 1));
            return Err(e);
        }
        Ok(Next::Continue)
    }
}

/// Whether leaf attributes `new` allow an access `old` does not (stage-2
/// read/write, or execution where `old` forbids it). A page that needs
/// more than the block around it grants (a write to a block that dirty
/// logging write-protected) splits the block; the page's permissions are
/// then relaxed by the caller's retry.
fn grants_more(old: u64, new: u64) -> bool {
    let rw = s2::S2AP_R | s2::S2AP_W;
    new & rw & !old != 0 || (old & s2::XN_MASK != 0 && new & s2::XN_MASK == 0)
}

struct UnmapVisitor<'c, C> {
    cache: &'c mut C,
}

impl<E: PtMemory + TlbOps, C: PageCache> Visitor<E> for UnmapVisitor<'_, C> {
    const LEAF: bool = true;
    const TABLE_PRE: bool = true;
    const TABLE_POST: bool = true;

    #[inline(always)]
    fn table_pre(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        if ctx.fully_covered() {
            // The whole subtree goes: unlink it with one ranged
            // invalidation, then free it without visiting every leaf.
            let old = ctx.old;
            ctx.replace(0)?;
            free_subtree(ctx.env, self.cache, oa(old), Level(ctx.level.0 + 1));
            return Ok(Next::SkipChildren);
        }
        Ok(Next::Continue)
    }

    #[inline(always)]
    fn leaf(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        let old = ctx.old;
        if old == 0 {
            return Ok(Next::Continue);
        }
        if old & bits::VALID == 0 {
            // An annotation (or a stale lock marker): clear it.
            ctx.set(0)?;
            return Ok(Next::Continue);
        }
        if ctx.fully_covered() {
            ctx.replace(0)?;
            return Ok(Next::Continue);
        }
        // A block straddling the range's edge: split it, keep the part
        // outside the range, and let the walk descend into the new table.
        let child = build_split(ctx.env, self.cache, old, ctx.level, false)?;
        ctx.replace(make_table(child))?;
        Ok(Next::Continue)
    }

    #[inline(always)]
    fn table_post(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<(), PtError> {
        let child = oa(ctx.old);
        if ctx.env.refcount(child).load(Ordering::Relaxed) == 0 {
            ctx.replace(0)?;
            ctx.env.refcount(child).store(0, Ordering::Relaxed);
            self.cache.free_table(child);
        }
        Ok(())
    }
}

struct AttrVisitor {
    set: u64,
    clear: u64,
    young: bool,
    test_af: bool,
    /// Invalidate blocks that straddle the range's edges: they change
    /// beyond the range the caller will flush.
    flush_partial: bool,
}

impl<E: PtMemory + TlbOps> Visitor<E> for AttrVisitor {
    const LEAF: bool = true;
    const TABLE_PRE: bool = true;
    const TABLE_POST: bool = false;

    /// A level-3 table entirely inside the range: update its pages in one
    /// tight loop (same per-entry rules as `leaf`, no TLB maintenance is
    /// needed for fully covered pages).
    #[inline(always)]
    fn table_pre(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        if ctx.level.0 != 2 || !ctx.fully_covered() {
            return Ok(Next::Continue);
        }
        for e in ctx.env.table(oa(ctx.old)).iter() {
            let old = e.load(Ordering::Acquire);
            if !is_valid_leaf(old, Level(3)) {
                continue;
            }
            if self.test_af && old & bits::AF != 0 {
                self.young = true;
            }
            let new = (old | self.set) & !self.clear;
            if new == old {
                continue;
            }
            if ctx.shared {
                e.compare_exchange(old, new, Ordering::Release, Ordering::Relaxed)
                    .map_err(|_| PtError::Again)?;
            } else {
                e.store(new, Ordering::Release);
            }
        }
        Ok(Next::SkipChildren)
    }

    #[inline(always)]
    fn leaf(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        let old = ctx.old;
        if !is_valid_leaf(old, ctx.level) {
            return Ok(Next::Continue);
        }
        if self.test_af && old & bits::AF != 0 {
            self.young = true;
        }
        let new = (old | self.set) & !self.clear;
        if new != old {
            ctx.set(new)?;
            if self.flush_partial && !ctx.fully_covered() {
                ctx.env.tlbi_leaf(ctx.addr, ctx.level);
            }
        }
        Ok(Next::Continue)
    }
}

struct SplitVisitor<'c, C> {
    cache: &'c mut C,
}

impl<E: PtMemory + TlbOps, C: PageCache> Visitor<E> for SplitVisitor<'_, C> {
    const LEAF: bool = true;
    const TABLE_PRE: bool = false;
    const TABLE_POST: bool = false;

    #[inline(always)]
    fn leaf(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        let old = ctx.old;
        if ctx.level.0 == 3 || !is_valid_leaf(old, ctx.level) {
            return Ok(Next::Continue);
        }
        let child = build_split(ctx.env, self.cache, old, ctx.level, true)?;
        ctx.replace(make_table(child))?;
        Ok(Next::SkipChildren)
    }
}

struct AnnotateVisitor<'c, C> {
    value: u64,
    cache: &'c mut C,
}

impl<E: PtMemory + TlbOps, C: PageCache> Visitor<E> for AnnotateVisitor<'_, C> {
    const LEAF: bool = true;
    const TABLE_PRE: bool = true;
    const TABLE_POST: bool = false;

    fn table_pre(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        if ctx.level.0 >= 1 && ctx.fully_covered() {
            let old = ctx.old;
            ctx.replace(self.value)?;
            free_subtree(ctx.env, self.cache, oa(old), Level(ctx.level.0 + 1));
            return Ok(Next::SkipChildren);
        }
        Ok(Next::Continue)
    }

    fn leaf(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        let old = ctx.old;
        if ctx.level.0 >= 1 && ctx.fully_covered() {
            if old == self.value {
                return Ok(Next::Continue);
            }
            if old & bits::VALID != 0 {
                ctx.replace(self.value)?;
            } else {
                ctx.set(self.value)?;
            }
            return Ok(Next::Continue);
        }
        if old & bits::VALID != 0 {
            let c = build_split(ctx.env, self.cache, old, ctx.level, false)?;
            ctx.replace(make_table(c))?;
        } else {
            let c = build_annotated(ctx.env, self.cache, old)?;
            ctx.set(make_table(c))?;
        }
        Ok(Next::Continue)
    }
}

struct ReadVisitor<F> {
    f: F,
}

impl<E: PtMemory + TlbOps, F: FnMut(u64, Level, u64)> Visitor<E> for ReadVisitor<F> {
    const LEAF: bool = true;
    const TABLE_PRE: bool = false;
    const TABLE_POST: bool = false;

    fn leaf(&mut self, ctx: &mut VisitCtx<'_, E>) -> Result<Next, PtError> {
        if ctx.old != 0 {
            (self.f)(ctx.addr, ctx.level, ctx.old);
        }
        Ok(Next::Continue)
    }
}
