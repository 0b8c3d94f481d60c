//! The VM's stage-2 MMU as the host sees it: who owns the tables, the MMU
//! lock, the invalidation sequence, MMU-notifier handling and teardown.
//!
//! - Standard mode: the host owns a [`PageTable<Stage2>`]. Guest faults map
//!   under the MMU read lock with shared walks; notifiers, memslot changes
//!   and teardown take the write lock.
//! - Protected mode: the hypervisor owns the tables; the host maps by
//!   hypercalls under the MMU read lock and its chunk's shard lock
//!   ([`ProtectedMaps`]) and remembers, per mapping, the host page
//!   reference it holds (released when the mapping goes); notifiers and
//!   teardown take the write lock.
//!
//! Teardown has one owner: the state lives in an `Option` under the MMU
//! write lock and whoever takes it (VM destroy or the mm-exit notifier,
//! whichever runs first) frees everything; the other finds `None` (seed
//! 003: no double free).

use crate::loom_shim::{AtomicU64, Ordering};
use alloc::collections::BTreeMap;

use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Gfn, Ipa, PAGE_SIZE};
use pkvm_pgtable::{PageTable, Stage2};
use pkvm_sync::{LockClass, RwSpinLock, SpinGuard, SpinLock};

use crate::hypcall::{self, HypCallError};
use crate::platform::HostPlatform;

/// A host page reference held for a range of guest frames mapped through
/// the hypervisor (protected mode). A block whose sharing stopped part-way
/// (the hypervisor's memcache ran dry) is recorded with the pages done so
/// far, so the MMU notifier unshares them and the next fault on the block
/// resumes it.
pub(crate) struct HypMapping<Pin> {
    /// Guest frames mapped, from the key.
    pub npages: u64,
    /// Host physical address of the first frame.
    pub pa: pkvm_arch::Pa,
    /// Keeps the host pages alive while the guest maps them.
    pub _pin: Pin,
}

/// Pages kept for eager page splitting (KVM's `split_page_cache`):
/// filled outside the MMU lock, handed in under it, and used by splits
/// under it. It belongs to the VM's stage-2 ([`HostS2`]) and lives exactly
/// as long as it: no memslot change frees it, only the stage-2 teardown,
/// which runs once (seed 003).
#[derive(Debug, Default)]
pub(crate) struct SplitStash {
    pages: alloc::vec::Vec<pkvm_arch::Pa>,
}

impl SplitStash {
    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }
    /// Adds pages allocated outside the lock.
    pub fn refill(&mut self, pages: impl IntoIterator<Item = pkvm_arch::Pa>) {
        self.pages.extend(pages);
    }
    /// Empties the stash into `free` (teardown, by the stage-2's owner).
    pub fn drain(mut self, mut free: impl FnMut(pkvm_arch::Pa)) {
        self.pages.drain(..).for_each(&mut free);
    }
}

impl pkvm_pgtable::PageCache for SplitStash {
    fn alloc_table(&mut self) -> Option<pkvm_arch::Pa> {
        self.pages.pop()
    }
    fn free_table(&mut self, pa: pkvm_arch::Pa) {
        self.pages.push(pa);
    }
}

impl Drop for SplitStash {
    fn drop(&mut self) {
        debug_assert!(
            self.pages.is_empty(),
            "split page cache dropped with {} pages: only the stage-2 teardown may free it",
            self.pages.len()
        );
    }
}

/// The host-managed stage-2 and everything that lives exactly as long as
/// it: the split page cache and the nested shadow MMUs. One value, under
/// the MMU lock, taken once by teardown. Derefs to the table.
pub(crate) struct HostS2 {
    pub pt: PageTable<Stage2>,
    /// Eager-split page cache.
    pub split: SplitStash,
    /// Shadow stage-2 MMUs for a guest hypervisor's guests.
    pub nested: crate::nested::ShadowMmus,
}

impl HostS2 {
    pub fn new(pt: PageTable<Stage2>) -> Self {
        HostS2 {
            pt,
            split: SplitStash::default(),
            nested: crate::nested::ShadowMmus::default(),
        }
    }
}

impl core::ops::Deref for HostS2 {
    type Target = PageTable<Stage2>;
    fn deref(&self) -> &PageTable<Stage2> {
        &self.pt
    }
}

impl core::ops::DerefMut for HostS2 {
    fn deref_mut(&mut self) -> &mut PageTable<Stage2> {
        &mut self.pt
    }
}

/// Who owns the stage-2 and what it maps.
pub(crate) enum S2State<Pin> {
    /// Host-managed tables (with their split cache and shadow MMUs).
    Standard(HostS2),
    /// Hypervisor-managed tables: the mappings the host asked for.
    Protected(ProtectedMaps<Pin>),
}

/// Guest frames in one chunk of [`ProtectedMaps`] (2M): no hypervisor
/// mapping the host asks for crosses a chunk boundary (blocks are at most
/// 2M, as pKVM's host_share_guest allows), so every entry that can cover a
/// frame is in its chunk's shard.
pub(crate) const CHUNK_PAGES: u64 = 512;

/// Shards of [`ProtectedMaps`].
const MAP_SHARDS: usize = 64;

/// A protected-mode VM's mappings through the hypervisor, by first gfn,
/// in shards picked by a hash of the 2M chunk: a fault takes the MMU lock
/// for reading and only its chunk's shard lock, so vCPUs faulting in
/// different chunks share no lock for writing. Whoever holds the MMU write
/// lock (invalidation, teardown) excludes every fault.
pub(crate) struct ProtectedMaps<Pin> {
    shards: alloc::boxed::Box<[MapShard<Pin>]>,
}

/// One shard, on cache lines of its own.
#[repr(align(128))]
struct MapShard<Pin>(SpinLock<BTreeMap<u64, HypMapping<Pin>>>);

impl<Pin> ProtectedMaps<Pin> {
    pub fn new() -> Self {
        ProtectedMaps {
            shards: (0..MAP_SHARDS)
                .map(|_| MapShard(SpinLock::new(BTreeMap::new(), LockClass::HostMmuShard)))
                .collect(),
        }
    }

    fn index(gfn: Gfn) -> usize {
        // Fibonacci hashing of the chunk number: vCPUs whose regions are a
        // multiple of 64 chunks apart do not walk the shards in lockstep.
        let chunk = gfn.0 / CHUNK_PAGES;
        (chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % MAP_SHARDS
    }

    /// Locks the shard holding every entry that can cover `gfn`.
    pub fn shard(&self, gfn: Gfn) -> SpinGuard<'_, BTreeMap<u64, HypMapping<Pin>>> {
        self.shards[Self::index(gfn)].0.lock()
    }

    /// Every shard, exclusively (the caller holds the MMU write lock).
    pub fn shards_mut(&mut self) -> impl Iterator<Item = &mut BTreeMap<u64, HypMapping<Pin>>> {
        self.shards.iter_mut().map(|s| s.0.get_mut())
    }

    /// Every entry, by value (teardown: the state's one owner).
    pub fn into_entries(self) -> impl Iterator<Item = (u64, HypMapping<Pin>)> {
        self.shards
            .into_vec()
            .into_iter()
            .flat_map(|s| s.0.into_inner())
    }

    /// Guest frames mapped.
    pub fn pages(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.lock().values().map(|m| m.npages).sum::<u64>())
            .sum()
    }
}

/// The MMU lock and what it protects. `None` once torn down.
pub(crate) struct Mmu<Pin> {
    pub state: RwSpinLock<Option<S2State<Pin>>>,
    /// Bumped at the end of every invalidation.
    seq: AtomicU64,
    /// Invalidations in progress (between start and end).
    in_progress: AtomicU64,
    /// Union of the in-progress invalidation ranges (IPA), valid while
    /// `in_progress > 0`; written under the write lock.
    range: RwSpinLock<(u64, u64)>,
}

impl<Pin> Mmu<Pin> {
    pub fn new(state: S2State<Pin>) -> Self {
        Mmu {
            state: RwSpinLock::new(Some(state), LockClass::HostMmu),
            seq: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            range: RwSpinLock::new((0, 0), LockClass::Leaf),
        }
    }

    /// The invalidation sequence, sampled before pinning a page.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Whether a fault that sampled `seq` must retry because an
    /// invalidation of `ipa` ran or is running since. Called under the MMU
    /// lock.
    pub fn retry(&self, seq: u64, ipa: Ipa) -> bool {
        if self.in_progress.load(Ordering::Acquire) != 0 {
            let (s, e) = *self.range.read();
            if ipa.0 >= s && ipa.0 < e {
                return true;
            }
        }
        self.seq.load(Ordering::Acquire) != seq
    }

    pub fn invalidate_begin(&self, start: Ipa, end: Ipa) {
        let mut r = self.range.write();
        if self.in_progress.fetch_add(1, Ordering::AcqRel) == 0 {
            *r = (start.0, end.0);
        } else {
            *r = (r.0.min(start.0), r.1.max(end.0));
        }
    }

    pub fn invalidate_end(&self) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Unmaps `[start, end)` from host-managed tables, widened to whole blocks
/// at the edges so that no table page is needed; returns emptied tables to
/// the platform.
pub(crate) fn unmap_standard<P: HostPlatform>(
    p: &alloc::sync::Arc<P>,
    vmid: u16,
    pt: &mut PageTable<Stage2>,
    start: Ipa,
    end: Ipa,
) {
    let env = p.s2_env(vmid);
    let widen = |ipa: Ipa, up: bool| {
        let leaf = pt.get_leaf(&env, ipa);
        let size = pkvm_arch::Granule::Size4K.level_size(leaf.level);
        if pkvm_pgtable::walk::is_valid_leaf(leaf.pte, leaf.level) && size > PAGE_SIZE {
            if up {
                Ipa(ipa.0.div_ceil(size) * size)
            } else {
                ipa.align_down(size)
            }
        } else {
            ipa
        }
    };
    let s = widen(start, false);
    let e = if end.0 == 0 {
        end
    } else {
        widen(Ipa(end.0 - 1), true).max(end)
    };
    let mut cache = crate::platform::HostPageCache::new(p.clone());
    // Whole blocks at the edges: the walk never splits, so it never
    // allocates; it only frees emptied tables into `cache`.
    let r = pt.unmap(&env, s, e.0 - s.0, &mut cache);
    debug_assert!(r.is_ok(), "unmap of whole blocks failed: {r:?}");
}

/// Unshares (non-protected VM) the hypervisor mappings overlapping
/// `[start, end)` and drops their page references. Donated pages of a
/// protected VM stay with the guest: the host cannot take them back.
pub(crate) fn unmap_protected<P: HostPlatform, Pin>(
    p: &P,
    cpu: usize,
    handle: u16,
    maps: &mut ProtectedMaps<Pin>,
    start: Ipa,
    end: Ipa,
) -> Result<(), HypCallError> {
    for shard in maps.shards_mut() {
        unmap_protected_shard(p, cpu, handle, shard, start, end)?;
    }
    Ok(())
}

fn unmap_protected_shard<P: HostPlatform, Pin>(
    p: &P,
    cpu: usize,
    handle: u16,
    maps: &mut BTreeMap<u64, HypMapping<Pin>>,
    start: Ipa,
    end: Ipa,
) -> Result<(), HypCallError> {
    // Entries are disjoint, so those overlapping the range are adjacent
    // in key order (also with other chunks' entries in the shard).
    let (sg, eg) = (start.gfn().0, end.0.div_ceil(PAGE_SIZE));
    let keys: alloc::vec::Vec<u64> = maps
        .range(..eg)
        .rev()
        .take_while(|(k, m)| **k + m.npages > sg)
        .map(|(k, _)| *k)
        .collect();
    for k in keys {
        let m = &maps[&k];
        for g in k..k + m.npages {
            hypcall::unshare_guest(p, cpu, handle, Gfn(g))?;
        }
        maps.remove(&k);
    }
    Ok(())
}

/// Tears the stage-2 state down (standard mode): every shadow MMU, the
/// split page cache, then the table, destroyed without TLB maintenance
/// after one whole-VMID flush. Takes the state by value: its one owner.
/// Returns the number of shadow MMUs freed.
pub(crate) fn destroy_standard<P: HostPlatform>(
    p: &alloc::sync::Arc<P>,
    vmid: u16,
    s2: HostS2,
    geo: &S2Geometry,
) -> u64 {
    let HostS2 { pt, split, nested } = s2;
    let shadows = nested.destroy_all(p);
    split.drain(|pa| p.free_pages(pa, 0));
    let env = p.s2_env(vmid);
    pkvm_pgtable::TlbOps::tlbi_all(&env);
    let mut cache = crate::platform::HostPageCache::new(p.clone());
    let root = pt.destroy(&env, &mut cache);
    drop(env);
    p.free_pages(root, root_order(geo));
    shadows
}

/// Allocation order of the concatenated root.
pub(crate) fn root_order(geo: &S2Geometry) -> u32 {
    geo.root_pages.trailing_zeros()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn entry(npages: u64) -> HypMapping<()> {
        HypMapping {
            npages,
            pa: pkvm_arch::Pa(0),
            _pin: (),
        }
    }

    /// Every frame of a 2M chunk finds the chunk's entries (whatever their
    /// size) in its shard: that is what lets a fault decide under one
    /// shard lock.
    #[test]
    fn every_frame_of_a_chunk_sees_the_chunks_entries() {
        let maps = ProtectedMaps::<()>::new();
        let base = 7 * CHUNK_PAGES;
        maps.shard(Gfn(base + 5)).insert(base + 5, entry(1));
        maps.shard(Gfn(base + CHUNK_PAGES))
            .insert(base + CHUNK_PAGES, entry(CHUNK_PAGES));
        for g in base..base + CHUNK_PAGES {
            assert!(maps.shard(Gfn(g)).contains_key(&(base + 5)), "gfn {g:#x}");
            let next = Gfn(g + CHUNK_PAGES);
            assert!(maps.shard(next).contains_key(&(base + CHUNK_PAGES)));
        }
        assert_eq!(maps.pages(), 1 + CHUNK_PAGES);
    }

    /// vCPUs paging in regions 512M apart (a multiple of 64 chunks) do not
    /// share a shard at every step.
    #[test]
    fn chunks_a_multiple_of_the_shard_count_apart_mostly_use_different_shards() {
        let same = (0..256u64)
            .filter(|c| {
                let a = ProtectedMaps::<()>::index(Gfn(c * CHUNK_PAGES));
                let b = ProtectedMaps::<()>::index(Gfn((c + 256) * CHUNK_PAGES));
                a == b
            })
            .count();
        assert!(same < 32, "{same} of 256 chunk pairs share a shard");
    }
}
