//! Per-page metadata: one [`PageMeta`] per 4K page of the managed physical
//! range, in a fixed array the platform hands the hypervisor at init.
//!
//! Fields are atomics so the array can be shared (`&'static [PageMeta]`)
//! without `unsafe`, but each field is owned by one lock and only accessed
//! with that lock held (relaxed ordering is enough, the lock orders them):
//! - `refcount`, `order`, `next`, `prev`: the page pool's lock;
//! - `host_state`, `hyp_state`, `guest_shares`, `hyp_pins`: the host MMU lock.

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering::Relaxed};

use pkvm_arch::{Pa, Pfn, PAGE_SIZE};

/// The ownership state of a page from one component's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Exclusively owned and accessible.
    Owned = 0,
    /// Owned, and shared with another component.
    SharedOwned = 1,
    /// Borrowed from the owner (accessible, not owned).
    SharedBorrowed = 2,
    /// Not accessible at all.
    NoPage = 3,
}

impl PageState {
    const fn from_raw(v: u8) -> PageState {
        match v & 3 {
            0 => PageState::Owned,
            1 => PageState::SharedOwned,
            2 => PageState::SharedBorrowed,
            _ => PageState::NoPage,
        }
    }
}

/// Order value of a page that is not the head of a buddy block.
pub const NO_ORDER: u8 = 0xff;
/// Free-list link meaning "none".
pub(crate) const NIL: u32 = u32::MAX;

/// Metadata of one physical page. All-zero metadata means: host OWNED, hyp
/// NOPAGE, not in any pool (the state of ordinary host memory).
#[derive(Debug)]
pub struct PageMeta {
    pub(crate) refcount: AtomicU16,
    pub(crate) order: AtomicU8,
    host_state: AtomicU8,
    /// Stored as `state ^ NOPAGE` so that zero reads NOPAGE.
    hyp_state: AtomicU8,
    guest_shares: AtomicU16,
    hyp_pins: AtomicU16,
    pub(crate) next: AtomicU32,
    pub(crate) prev: AtomicU32,
}

impl PageMeta {
    /// Metadata of a host-owned page outside any pool.
    pub const fn new() -> PageMeta {
        PageMeta {
            refcount: AtomicU16::new(0),
            order: AtomicU8::new(0),
            host_state: AtomicU8::new(0),
            hyp_state: AtomicU8::new(0),
            guest_shares: AtomicU16::new(0),
            hyp_pins: AtomicU16::new(0),
            next: AtomicU32::new(0),
            prev: AtomicU32::new(0),
        }
    }
}

impl Default for PageMeta {
    fn default() -> Self {
        PageMeta::new()
    }
}

/// The metadata array and the physical range it covers.
#[derive(Clone, Copy, Debug)]
pub struct MemMap {
    meta: &'static [PageMeta],
    base: Pfn,
}

impl MemMap {
    /// Metadata `meta[i]` describes page `base + i`.
    pub fn new(meta: &'static [PageMeta], base: Pfn) -> MemMap {
        MemMap { meta, base }
    }

    /// First byte of the managed range.
    pub fn start(&self) -> Pa {
        self.base.addr()
    }

    /// One past the last byte of the managed range.
    pub fn end(&self) -> Pa {
        Pa(self.base.addr().0 + self.meta.len() as u64 * PAGE_SIZE)
    }

    /// Number of pages covered.
    pub fn pages(&self) -> usize {
        self.meta.len()
    }

    /// Index of `pa`'s page, if managed.
    pub fn index(&self, pa: Pa) -> Option<usize> {
        let pfn = pa.pfn().0.checked_sub(self.base.0)?;
        if pfn < self.meta.len() as u64 {
            Some(pfn as usize)
        } else {
            None
        }
    }

    /// Whether every page of `[pa, pa + nr pages)` is managed.
    pub fn contains(&self, pa: Pa, nr: u64) -> bool {
        let Some(len) = nr.checked_mul(PAGE_SIZE) else {
            return false;
        };
        match pa.checked_add(len) {
            Some(end) => pa >= self.start() && end <= self.end() && nr > 0,
            None => false,
        }
    }

    /// Address of the page at `idx`.
    pub fn pa_of(&self, idx: usize) -> Pa {
        Pa((self.base.0 + idx as u64) * PAGE_SIZE)
    }

    /// Metadata of a managed page.
    ///
    /// # Panics
    /// If `pa` is not managed: callers validate host-provided addresses
    /// first, so this is a hypervisor bug.
    pub fn get(&self, pa: Pa) -> &'static PageMeta {
        match self.index(pa) {
            Some(i) => &self.meta[i],
            None => panic!("page metadata lookup outside the managed range: {pa:?}"),
        }
    }

    pub(crate) fn at(&self, idx: usize) -> &'static PageMeta {
        &self.meta[idx]
    }

    /// Host state of a page (read-only snapshot, for checks and tests).
    pub fn host_state(&self, pa: Pa) -> PageState {
        PageState::from_raw(self.get(pa).host_state.load(Relaxed))
    }

    /// Hyp state of a page.
    pub fn hyp_state(&self, pa: Pa) -> PageState {
        PageState::from_raw(self.get(pa).hyp_state.load(Relaxed) ^ PageState::NoPage as u8)
    }

    /// Number of guest mappings of a host page shared with guests.
    pub fn guest_shares(&self, pa: Pa) -> u16 {
        self.get(pa).guest_shares.load(Relaxed)
    }

    /// Number of hyp pins on a page the host shared with the hyp.
    pub fn hyp_pins(&self, pa: Pa) -> u16 {
        self.get(pa).hyp_pins.load(Relaxed)
    }

    /// Pool reference count of a page.
    pub fn refcount(&self, pa: Pa) -> u16 {
        self.get(pa).refcount.load(Relaxed)
    }

    // Writers: only the host MMU module calls these, with its lock held.
    pub(crate) fn set_host_state(&self, pa: Pa, s: PageState) {
        self.get(pa).host_state.store(s as u8, Relaxed);
    }
    pub(crate) fn set_hyp_state(&self, pa: Pa, s: PageState) {
        self.get(pa)
            .hyp_state
            .store(s as u8 ^ PageState::NoPage as u8, Relaxed);
    }
    pub(crate) fn set_guest_shares(&self, pa: Pa, n: u16) {
        self.get(pa).guest_shares.store(n, Relaxed);
    }
    pub(crate) fn set_hyp_pins(&self, pa: Pa, n: u16) {
        self.get(pa).hyp_pins.store(n, Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    extern crate std;

    fn map(n: usize) -> MemMap {
        let v: std::vec::Vec<PageMeta> = (0..n).map(|_| PageMeta::new()).collect();
        MemMap::new(std::boxed::Box::leak(v.into_boxed_slice()), Pfn(0x40000))
    }

    #[test]
    fn zeroed_metadata_reads_host_owned_hyp_nopage() {
        let m = map(4);
        assert_eq!(m.host_state(Pa(0x4000_0000)), PageState::Owned);
        assert_eq!(m.hyp_state(Pa(0x4000_0000)), PageState::NoPage);
        m.set_hyp_state(Pa(0x4000_1000), PageState::Owned);
        assert_eq!(m.hyp_state(Pa(0x4000_1000)), PageState::Owned);
        m.set_hyp_state(Pa(0x4000_1000), PageState::SharedBorrowed);
        assert_eq!(m.hyp_state(Pa(0x4000_1000)), PageState::SharedBorrowed);
    }

    #[test]
    fn range_checks_reject_overflow_and_outside() {
        let m = map(4);
        assert!(m.contains(Pa(0x4000_0000), 4));
        assert!(!m.contains(Pa(0x4000_0000), 5));
        assert!(!m.contains(Pa(0x3fff_f000), 1));
        assert!(!m.contains(Pa(0x4000_0000), 0));
        assert!(!m.contains(Pa(u64::MAX - 0xfff), 1));
        assert!(!m.contains(Pa(0x4000_0000), u64::MAX));
        assert_eq!(m.index(Pa(0x4000_3fff)), Some(3));
        assert_eq!(m.index(Pa(0x4000_4000)), None);
    }
}
