//! The per-CPU TLB model.
//!
//! Three direct-mapped arrays (4K pages, 2M blocks, 1G blocks) of
//! `(tag, descriptor)` slots, tagged by VMID. Only the owning CPU fills
//! slots; any thread may invalidate them (broadcast TLBI) with a
//! compare-exchange on the tag. The hit path is two relaxed/acquire loads per
//! probe, no lock, no allocation.
//!
//! Fill/invalidate race: a TLBI bumps the TLB's generation before clearing
//! slots; a fill samples the generation before its walk and re-checks it
//! after publishing the slot (with `SeqCst` fences on both sides), dropping
//! the fill if any TLBI ran meanwhile. So an entry filled from a descriptor
//! read before a TLBI can never survive that TLBI, as on hardware, where the
//! DSB after a TLBI waits for in-flight walks.
//!
//! TLBI by IPA honours the level hint strictly (FEAT_TTL semantics): with a
//! hint of level 1..=3 only entries of that size are invalidated, since the
//! architecture does not require a wrongly-hinted TLBI to invalidate
//! anything. Any other hint invalidates every size covering the address.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use pkvm_arch::pte::S2Pte;
use pkvm_arch::{Level, Pa};

use crate::mmu::{level_shift, S2Leaf};

/// Slots for 4K entries.
pub const L3_SLOTS: usize = 512;
/// Slots for 2M entries.
pub const L2_SLOTS: usize = 64;
/// Slots for 1G entries.
pub const L1_SLOTS: usize = 16;

#[derive(Default)]
struct Slot {
    tag: AtomicU64,
    pte: AtomicU64,
    /// Physical address of the descriptor the entry was filled from.
    desc: AtomicU64,
}

const IPA_MASK: u64 = (1 << 48) - 1;

#[inline(always)]
const fn make_tag(vmid: u16, ipa_aligned: u64) -> u64 {
    ((vmid as u64) << 48) | (ipa_aligned & IPA_MASK) | 1
}

#[inline(always)]
const fn tag_vmid(tag: u64) -> u16 {
    (tag >> 48) as u16
}

#[inline(always)]
const fn tag_ipa(tag: u64) -> u64 {
    tag & IPA_MASK & !1
}

/// One CPU's TLB.
pub(crate) struct Tlb {
    l3: Box<[Slot]>,
    l2: Box<[Slot]>,
    l1: Box<[Slot]>,
    gen: AtomicU64,
    tlbis: AtomicU64,
    /// Odd while the owner CPU is inside an access (lookup to memory
    /// operation done). A TLBI waits for such an access to finish, as the
    /// DSB after a hardware TLBI waits for accesses using old translations.
    active: AtomicU64,
}

/// Marks the owner CPU inside one access; ends it on drop.
pub(crate) struct AccessGuard<'a> {
    tlb: &'a Tlb,
    seq: u64,
}

impl Drop for AccessGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.tlb.active.store(self.seq + 1, Ordering::Release);
    }
}

fn slots(n: usize) -> Box<[Slot]> {
    (0..n).map(|_| Slot::default()).collect()
}

impl Tlb {
    pub(crate) fn new() -> Tlb {
        Tlb {
            l3: slots(L3_SLOTS),
            l2: slots(L2_SLOTS),
            l1: slots(L1_SLOTS),
            gen: AtomicU64::new(0),
            tlbis: AtomicU64::new(0),
            active: AtomicU64::new(0),
        }
    }

    #[inline(always)]
    fn array(&self, level: u8) -> &[Slot] {
        match level {
            1 => &self.l1,
            2 => &self.l2,
            _ => &self.l3,
        }
    }

    #[inline(always)]
    fn slot(&self, level: u8, vmid: u16, ipa: u64) -> &Slot {
        let a = self.array(level);
        // Mix the VMID in so two VMs using the same IPAs do not evict each
        // other.
        let i = (ipa >> level_shift(Level(level))) as usize ^ (vmid as usize).wrapping_mul(37);
        &a[i & (a.len() - 1)]
    }

    /// The cached leaf translating `ipa` for `vmid` (owner CPU only).
    #[inline(always)]
    pub(crate) fn lookup(&self, vmid: u16, ipa: u64) -> Option<S2Leaf> {
        for level in [3u8, 2, 1] {
            let size_mask = (1u64 << level_shift(Level(level))) - 1;
            let s = self.slot(level, vmid, ipa);
            if s.tag.load(Ordering::Acquire) == make_tag(vmid, ipa & !size_mask) {
                return Some(S2Leaf {
                    pte: S2Pte(s.pte.load(Ordering::Relaxed)),
                    level: Level(level),
                    desc: Pa(s.desc.load(Ordering::Relaxed)),
                });
            }
        }
        None
    }

    /// The generation to sample before a walk whose result will be filled.
    #[inline(always)]
    pub(crate) fn generation(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    /// Caches `leaf` for `(vmid, ipa)` (owner CPU only), unless a TLBI ran
    /// since `gen` was sampled. Level-0 leaves do not exist with 4K pages.
    #[inline]
    pub(crate) fn fill(&self, vmid: u16, ipa: u64, leaf: S2Leaf, gen: u64) {
        if !(1..=3).contains(&leaf.level.0) {
            return;
        }
        let s = self.slot(leaf.level.0, vmid, ipa);
        let tag = make_tag(vmid, ipa & !(leaf.size() - 1));
        s.tag.store(0, Ordering::Relaxed);
        s.pte.store(leaf.pte.0, Ordering::Relaxed);
        s.desc.store(leaf.desc.0, Ordering::Relaxed);
        s.tag.store(tag, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.gen.load(Ordering::SeqCst) != gen {
            let _ = s
                .tag
                .compare_exchange(tag, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Drops the entry this CPU itself holds for `(vmid, ipa)` at `level`.
    pub(crate) fn drop_own(&self, vmid: u16, ipa: u64, level: Level) {
        let s = self.slot(level.0, vmid, ipa);
        let tag = make_tag(vmid, ipa & !((1u64 << level_shift(level)) - 1));
        let _ = s
            .tag
            .compare_exchange(tag, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Starts an access on the owner CPU (before the TLB lookup).
    #[inline(always)]
    pub(crate) fn enter_access(&self) -> AccessGuard<'_> {
        let seq = self.active.load(Ordering::Relaxed) + 1;
        // SeqCst store: ordered before the TLB lookup's loads, pairing with
        // the fence in `finish_inval`.
        self.active.store(seq, Ordering::SeqCst);
        AccessGuard { tlb: self, seq }
    }

    /// Waits until an access that may have looked up an entry before the
    /// invalidation has finished (called after clearing slots).
    pub(crate) fn finish_inval(&self) {
        fence(Ordering::SeqCst);
        let a = self.active.load(Ordering::SeqCst);
        if a & 1 == 1 {
            while self.active.load(Ordering::Acquire) == a {
                std::hint::spin_loop();
            }
        }
    }

    fn begin_inval(&self) {
        self.tlbis.fetch_add(1, Ordering::Relaxed);
        self.gen.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    fn clear_if(&self, s: &Slot, pred: impl Fn(u64) -> bool) {
        let t = s.tag.load(Ordering::Acquire);
        if t != 0 && pred(t) {
            let _ = s
                .tag
                .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// TLBI by IPA with a level hint.
    pub(crate) fn invalidate_leaf(&self, vmid: u16, ipa: u64, level: Level) {
        self.begin_inval();
        let levels: &[u8] = match level.0 {
            1 => &[1],
            2 => &[2],
            3 => &[3],
            _ => &[1, 2, 3],
        };
        for &l in levels {
            let aligned = ipa & !((1u64 << level_shift(Level(l))) - 1);
            let want = make_tag(vmid, aligned);
            self.clear_if(self.slot(l, vmid, ipa), |t| t == want);
        }
    }

    /// TLBI of every entry of `vmid` overlapping `[start, end)`.
    pub(crate) fn invalidate_range(&self, vmid: u16, start: u64, end: u64) {
        self.begin_inval();
        if end <= start {
            return;
        }
        for l in [1u8, 2, 3] {
            let size = 1u64 << level_shift(Level(l));
            let first = start & !(size - 1);
            let count = (end - first).div_ceil(size);
            let arr = self.array(l);
            if count <= arr.len() as u64 {
                for i in 0..count {
                    let a = first + i * size;
                    let want = make_tag(vmid, a);
                    self.clear_if(self.slot(l, vmid, a), |t| t == want);
                }
            } else {
                for s in arr.iter() {
                    self.clear_if(s, |t| {
                        tag_vmid(t) == vmid && tag_ipa(t) >= first && tag_ipa(t) < end
                    });
                }
            }
        }
    }

    /// TLBI of every entry of `vmid`.
    pub(crate) fn invalidate_vmid(&self, vmid: u16) {
        self.begin_inval();
        for l in [1u8, 2, 3] {
            for s in self.array(l).iter() {
                self.clear_if(s, |t| tag_vmid(t) == vmid);
            }
        }
    }

    /// TLBI of everything.
    pub(crate) fn invalidate_everything(&self) {
        self.begin_inval();
        for l in [1u8, 2, 3] {
            for s in self.array(l).iter() {
                self.clear_if(s, |_| true);
            }
        }
    }

    /// TLBIs this TLB received.
    pub(crate) fn tlbis_received(&self) -> u64 {
        self.tlbis.load(Ordering::Relaxed)
    }

    /// A consistent read of a slot from any thread.
    fn read_slot(s: &Slot) -> Option<(u64, S2Pte, Pa)> {
        let t = s.tag.load(Ordering::Acquire);
        if t == 0 {
            return None;
        }
        let p = s.pte.load(Ordering::Acquire);
        let d = s.desc.load(Ordering::Acquire);
        (s.tag.load(Ordering::Acquire) == t).then_some((t, S2Pte(p), Pa(d)))
    }

    /// Calls `f` for every entry cached for `vmid` (block-aligned IPA,
    /// leaf), without allocating.
    #[inline]
    pub(crate) fn for_each_entry(&self, vmid: u16, mut f: impl FnMut(u64, S2Leaf)) {
        for l in [1u8, 2, 3] {
            for s in self.array(l).iter() {
                let t = s.tag.load(Ordering::Acquire);
                if t == 0 || tag_vmid(t) != vmid {
                    continue;
                }
                let pte = s.pte.load(Ordering::Acquire);
                let desc = s.desc.load(Ordering::Acquire);
                if s.tag.load(Ordering::Acquire) == t {
                    f(
                        tag_ipa(t),
                        S2Leaf {
                            pte: S2Pte(pte),
                            level: Level(l),
                            desc: Pa(desc),
                        },
                    );
                }
            }
        }
    }

    /// Whether the TLB still holds exactly `leaf` for `(vmid, ipa)`.
    pub(crate) fn holds(&self, vmid: u16, ipa: u64, leaf: &S2Leaf) -> bool {
        let s = self.slot(leaf.level.0, vmid, ipa);
        let want = make_tag(vmid, ipa & !(leaf.size() - 1));
        matches!(Self::read_slot(s), Some((t, pte, _)) if t == want && pte == leaf.pte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkvm_arch::pte::S2Features;
    use pkvm_arch::pte::S2Prot;

    fn leaf(pa: u64, level: u8) -> S2Leaf {
        S2Leaf {
            pte: S2Pte::leaf(Pa(pa), Level(level), S2Prot::RW, S2Features::default()),
            level: Level(level),
            desc: Pa(0),
        }
    }

    #[test]
    fn entries_are_tagged_by_vmid_and_size() {
        let t = Tlb::new();
        t.fill(1, 0x20_1000, leaf(0x4000_0000, 3), t.generation());
        t.fill(1, 0x40_0000, leaf(0x4020_0000, 2), t.generation());
        assert_eq!(t.lookup(1, 0x20_1abc).unwrap().level, Level(3));
        assert!(t.lookup(2, 0x20_1abc).is_none());
        assert_eq!(t.lookup(1, 0x5f_f000).unwrap().level, Level(2));
        assert!(t.lookup(1, 0x60_0000).is_none());
    }

    #[test]
    fn leaf_tlbi_honours_the_level_hint() {
        let t = Tlb::new();
        t.fill(1, 0x40_0000, leaf(0x4020_0000, 2), t.generation());
        t.invalidate_leaf(1, 0x40_0000, Level(3));
        assert!(
            t.lookup(1, 0x40_0000).is_some(),
            "a wrongly hinted TLBI need not invalidate"
        );
        t.invalidate_leaf(1, 0x40_0000, Level(2));
        assert!(t.lookup(1, 0x40_0000).is_none());
        assert_eq!(t.tlbis_received(), 2);
    }

    #[test]
    fn range_and_vmid_invalidation() {
        let t = Tlb::new();
        for i in 0..8u64 {
            t.fill(1, i << 12, leaf(0x4000_0000 + (i << 12), 3), t.generation());
        }
        t.fill(2, 0, leaf(0x4000_0000, 3), t.generation());
        t.invalidate_range(1, 0x2000, 0x4000);
        assert!(t.lookup(1, 0x1000).is_some());
        assert!(t.lookup(1, 0x2000).is_none() && t.lookup(1, 0x3000).is_none());
        assert!(t.lookup(1, 0x4000).is_some());
        // A huge range scans the arrays instead.
        t.invalidate_range(1, 0, 1 << 40);
        assert!(t.lookup(1, 0x1000).is_none());
        assert!(t.lookup(2, 0).is_some());
        t.invalidate_vmid(2);
        assert!(t.lookup(2, 0).is_none());
    }

    #[test]
    fn a_fill_racing_with_a_tlbi_is_dropped() {
        let t = Tlb::new();
        let g = t.generation();
        t.invalidate_everything(); // a TLBI lands while the walk runs
        t.fill(1, 0x1000, leaf(0x4000_0000, 3), g);
        assert!(t.lookup(1, 0x1000).is_none());
    }
}
