//! The host's "process memory" on bare metal: a table of VMAs (guest
//! memory regions at made-up host addresses) backed by frames from the
//! page pool, the real counterpart of the simulator's `ProcessMm`.
//!
//! - A [`Backing::Page4K`] VMA allocates a zeroed 4K frame on the first pin
//!   of each page (anonymous memory).
//! - A [`Backing::Block2M`] VMA allocates a zeroed, 2M-aligned 2M folio on
//!   the first pin inside each 2M chunk and reports itself as hugetlb-2M,
//!   so faults map 2M blocks.
//! - A pin ([`BootPin`]) is a folio reference (the pool's per-frame
//!   count); the VMA holds one reference per populated folio, dropped by
//!   [`BootProcess::munmap`]; a folio is freed with its last reference.
//!
//! Locking: the VMA table is a `RwSpinLock` (class `HostSlots`, taken
//! before any MMU lock, like `mmap_lock`); pins and `with_vma` take it for
//! reading, `mmap`/`munmap` for writing, so a pin never races an unmap.
//! MMU notifiers are not wired: the VMM unmaps a VMA only after the VMs
//! using it are torn down.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::{Hva, Pa, PAGE_SIZE};
use pkvm_host::{PinError, PinnedPage, ProcessMemory, VmaInfo};
use pkvm_sync::{LockClass, RwSpinLock};

use super::pool;

const G2M: u64 = 2 << 20;
/// VMAs start 1 GiB aligned, so an IPA range that is 2M aligned is
/// congruent with its host addresses.
const VMA_ALIGN: u64 = 1 << 30;
/// The first host address handed out.
const HVA_BASE: u64 = 0x10_0000_0000;

/// How a VMA is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// 4K frames allocated on first touch.
    Page4K,
    /// 2M folios allocated on first touch (hugetlb-2M).
    Block2M,
}

impl Backing {
    /// Bytes per folio.
    pub const fn granule(self) -> u64 {
        match self {
            Backing::Page4K => PAGE_SIZE,
            Backing::Block2M => G2M,
        }
    }
    /// Pool order of a folio.
    pub const fn order(self) -> u32 {
        match self {
            Backing::Page4K => 0,
            Backing::Block2M => 9,
        }
    }
}

struct Vma {
    start: Hva,
    size: u64,
    backing: Backing,
    /// Folio PA per granule (0: not populated yet).
    folios: Vec<AtomicU64>,
    /// Pins taken (one per resolved guest fault in this VMA).
    pins: AtomicU64,
}

impl Vma {
    fn contains(&self, hva: Hva) -> bool {
        hva.0 >= self.start.0 && hva.0 - self.start.0 < self.size
    }
}

impl VmaInfo for Vma {
    fn start(&self) -> Hva {
        self.start
    }
    fn end(&self) -> Hva {
        Hva(self.start.0 + self.size)
    }
    fn mapping_size(&self) -> u64 {
        self.backing.granule()
    }
    fn is_hugetlb(&self) -> bool {
        self.backing == Backing::Block2M
    }
    fn is_thp(&self) -> bool {
        false
    }
    fn is_pfnmap(&self) -> bool {
        false
    }
    fn writable(&self) -> bool {
        true
    }
}

/// What [`BootProcess::munmap`] released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unmapped {
    /// 4K frames the VMA had populated.
    pub frames: u64,
    /// Pins taken over its life (resolved guest faults).
    pub pins: u64,
}

/// The VMM's address space of guest memory.
pub struct BootProcess {
    vmas: RwSpinLock<Vec<Vma>>,
    next: AtomicU64,
}

impl core::fmt::Debug for BootProcess {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BootProcess").finish_non_exhaustive()
    }
}

impl Default for BootProcess {
    fn default() -> Self {
        Self::new()
    }
}

impl BootProcess {
    /// An empty address space.
    pub fn new() -> Self {
        BootProcess {
            vmas: RwSpinLock::new(Vec::new(), LockClass::HostSlots),
            next: AtomicU64::new(HVA_BASE),
        }
    }

    /// Maps `size` bytes (a multiple of the backing's granule) of zero-fill
    /// memory; returns its host address (1 GiB aligned).
    pub fn mmap(&self, size: u64, backing: Backing) -> Option<Hva> {
        if size == 0 || !size.is_multiple_of(backing.granule()) {
            return None;
        }
        let start = self
            .next
            .fetch_add(size.next_multiple_of(VMA_ALIGN), Ordering::Relaxed);
        let n = (size / backing.granule()) as usize;
        let mut folios = Vec::with_capacity(n);
        folios.resize_with(n, || AtomicU64::new(0));
        self.vmas.write().push(Vma {
            start: Hva(start),
            size,
            backing,
            folios,
            pins: AtomicU64::new(0),
        });
        Some(Hva(start))
    }

    /// Unmaps the VMA starting at `start`, dropping its folio references
    /// (folios still pinned live on until their pins go).
    pub fn munmap(&self, start: Hva) -> Option<Unmapped> {
        let vma = {
            let mut v = self.vmas.write();
            let i = v.iter().position(|m| m.start == start)?;
            v.swap_remove(i)
        };
        let mut frames = 0;
        for f in &vma.folios {
            let pa = f.load(Ordering::Acquire);
            if pa != 0 {
                pool::put_folio(Pa(pa), vma.backing.order());
                frames += 1u64 << vma.backing.order();
            }
        }
        Some(Unmapped {
            frames,
            pins: vma.pins.load(Ordering::Relaxed),
        })
    }

    /// Pins taken so far in the VMA at `start` (its resolved guest faults).
    pub fn pins(&self, start: Hva) -> u64 {
        self.vmas
            .read()
            .iter()
            .find(|m| m.start == start)
            .map_or(0, |m| m.pins.load(Ordering::Relaxed))
    }

    /// The physical page behind `hva` if it is populated (takes no
    /// reference and populates nothing).
    pub fn populated(&self, hva: Hva) -> Option<Pa> {
        let vmas = self.vmas.read();
        let vma = vmas.iter().find(|m| m.contains(hva))?;
        let g = vma.backing.granule();
        let idx = ((hva.0 - vma.start.0) / g) as usize;
        let folio = vma.folios[idx].load(Ordering::Acquire);
        (folio != 0).then(|| Pa(folio + (((hva.0 - vma.start.0) % g) & !(PAGE_SIZE - 1))))
    }

    /// Copies `data` into the memory at `hva` (the VMM loading an image),
    /// populating pages as needed, and cleans it to the point of coherency
    /// (the guest starts with its MMU and caches off).
    ///
    /// # Errors
    /// As [`ProcessMemory::pin`].
    pub fn write(&self, hva: Hva, data: &[u8]) -> Result<(), PinError> {
        let mut off = 0usize;
        while off < data.len() {
            let a = Hva(hva.0 + off as u64);
            let in_page = (PAGE_SIZE - (a.0 & (PAGE_SIZE - 1))) as usize;
            let n = in_page.min(data.len() - off);
            let pin = self.pin_inner(a, false)?;
            let pa = Pa(pin.pa().0 + (a.0 & (PAGE_SIZE - 1)));
            crate::platform::phys::write(pa, &data[off..off + n]);
            crate::platform::hw::dcache_clean_range(pa.0, n as u64);
            off += n;
        }
        Ok(())
    }

    fn pin_inner(&self, hva: Hva, count: bool) -> Result<BootPin, PinError> {
        let vmas = self.vmas.read();
        let vma = vmas
            .iter()
            .find(|m| m.contains(hva))
            .ok_or(PinError::BadAddress(hva))?;
        let g = vma.backing.granule();
        let order = vma.backing.order();
        let idx = ((hva.0 - vma.start.0) / g) as usize;
        let slot = &vma.folios[idx];
        let mut folio = slot.load(Ordering::Acquire);
        if folio == 0 {
            let pa = pool::alloc_folio(order).ok_or(PinError::NoMemory)?;
            match slot.compare_exchange(0, pa.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => folio = pa.0,
                Err(other) => {
                    // Another CPU populated it first.
                    pool::put_folio(pa, order);
                    folio = other;
                }
            }
        }
        // The VMA's reference keeps the folio alive while we hold the read
        // lock, so taking another one here is safe.
        pool::get_folio(Pa(folio));
        if count {
            vma.pins.fetch_add(1, Ordering::Relaxed);
        }
        let folio_hva = vma.start.0 + idx as u64 * g;
        Ok(BootPin {
            folio: Pa(folio),
            folio_hva: Hva(folio_hva),
            page: Pa(folio + ((hva.0 - folio_hva) & !(PAGE_SIZE - 1))),
            backing: vma.backing,
        })
    }
}

/// A folio reference, released when dropped.
#[derive(Debug)]
pub struct BootPin {
    folio: Pa,
    folio_hva: Hva,
    page: Pa,
    backing: Backing,
}

impl Drop for BootPin {
    fn drop(&mut self) {
        pool::put_folio(self.folio, self.backing.order());
    }
}

impl PinnedPage for BootPin {
    fn pa(&self) -> Pa {
        self.page
    }
    fn folio_pa(&self) -> Pa {
        self.folio
    }
    fn folio_hva(&self) -> Hva {
        self.folio_hva
    }
    fn size(&self) -> u64 {
        self.backing.granule()
    }
    fn writable(&self) -> bool {
        true
    }
    fn is_device(&self) -> bool {
        false
    }
}

impl ProcessMemory for BootProcess {
    type Pin = BootPin;

    fn with_vma<R>(&self, hva: Hva, f: impl FnOnce(Option<&dyn VmaInfo>) -> R) -> R {
        let vmas = self.vmas.read();
        match vmas.iter().find(|m| m.contains(hva)) {
            Some(v) => f(Some(v)),
            None => f(None),
        }
    }

    fn pin(&self, hva: Hva, _write: bool) -> Result<BootPin, PinError> {
        self.pin_inner(hva, true)
    }
}
