//! Host process memory: the userspace mapping behind memslots.
//!
//! A [`ProcessMm`] holds VMAs ([`VmaKind`]: anonymous 4K, anonymous THP,
//! hugetlb 2M/1G, read-only file, PFNMAP device region). [`ProcessMm::fault_in`]
//! resolves a host virtual address to a frame, allocating it on first touch
//! (anonymous memory zeroed, file pages filled with the file's contents,
//! swapped-out pages restored), and returns a [`Pin`]: a reference on the
//! frame, released on drop.
//!
//! # Events and notifiers
//! Page reclaim, migration, munmap, THP split and mm exit are delivered to
//! registered [`MmuNotifier`] listeners *before* the frame is reused or
//! freed: `invalidate_range_start` returns from every listener before the
//! mm frees, copies or remaps anything, then `invalidate_range_end` follows.
//! A pinned frame is never reclaimed, migrated or split (the operation skips
//! it or fails with [`MmError::Pinned`], as Linux does with elevated
//! refcounts); munmap and exit of a pinned frame detach it and the last
//! [`Pin`] drop frees it. Listeners must not call back into the mm's locked
//! operations (munmap and exit hold the mm lock for write while notifying).
//!
//! # Locking
//! The mm lock (a `RwLock`) guards the VMA tree; each VMA's frames are under
//! a per-VMA mutex. [`ProcessMm::with_vma`] runs a closure under the read
//! lock with a `&Vma` that cannot escape it: the host snapshots what it needs
//! there, then drops the lock before pinning pages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use pkvm_arch::{Hva, Pa, PAGE_SIZE};

use crate::Machine;

const ORPHAN: u32 = 1 << 31;
const HVA_BASE: u64 = 0x1_0000_0000;

/// A host mapping size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB.
    Size4K,
    /// 2 MiB.
    Size2M,
    /// 1 GiB.
    Size1G,
}

impl PageSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size2M => 2 << 20,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// Buddy order.
    pub const fn order(self) -> u32 {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => 9,
            PageSize::Size1G => 18,
        }
    }
}

/// What backs a VMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmaKind {
    /// Anonymous memory in 4K pages.
    Anonymous4K,
    /// Anonymous memory backed by 2M pages where a whole aligned 2M chunk
    /// is inside the VMA and untouched, else 4K.
    AnonymousThp,
    /// hugetlbfs, 2M pages.
    Hugetlb2M,
    /// hugetlbfs, 1G pages.
    Hugetlb1G,
    /// A read-only private file mapping; contents are [`file_word`].
    ReadOnlyFile {
        /// Identifies the file's contents.
        file_id: u64,
    },
    /// A PFNMAP of physical memory with no page structs: not refcounted,
    /// never reclaimed or migrated.
    PfnMap {
        /// Physical address mapped at the VMA start.
        pa: Pa,
    },
}

impl VmaKind {
    /// Alignment and length granule `mmap` requires.
    pub const fn granule(self) -> u64 {
        match self {
            VmaKind::AnonymousThp | VmaKind::Hugetlb2M => 2 << 20,
            VmaKind::Hugetlb1G => 1 << 30,
            _ => PAGE_SIZE,
        }
    }
}

/// The 64-bit word at byte `offset` (8-aligned) of file `file_id`.
pub const fn file_word(file_id: u64, offset: u64) -> u64 {
    (file_id.rotate_left(40) ^ offset ^ 0xf11e_0000_0000_0000).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A VMA. Only seen through [`ProcessMm::with_vma`].
#[derive(Debug)]
pub struct Vma {
    start: Hva,
    len: u64,
    kind: VmaKind,
}

impl Vma {
    /// First address.
    pub fn start(&self) -> Hva {
        self.start
    }
    /// One past the last address.
    pub fn end(&self) -> Hva {
        self.start + self.len
    }
    /// Length.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the VMA is empty (never: mmap rejects empty lengths).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Kind.
    pub fn kind(&self) -> VmaKind {
        self.kind
    }
    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        !matches!(self.kind, VmaKind::ReadOnlyFile { .. })
    }
    /// Whether `hva` is inside.
    pub fn contains(&self, hva: Hva) -> bool {
        hva.0 >= self.start.0 && hva.0 < self.start.0 + self.len
    }
    /// The hugetlb page size, if this is a hugetlb VMA.
    pub fn hugetlb_size(&self) -> Option<PageSize> {
        match self.kind {
            VmaKind::Hugetlb2M => Some(PageSize::Size2M),
            VmaKind::Hugetlb1G => Some(PageSize::Size1G),
            _ => None,
        }
    }
    /// For PFNMAP: the physical address behind `hva`.
    pub fn pfnmap_pa(&self, hva: Hva) -> Option<Pa> {
        match self.kind {
            VmaKind::PfnMap { pa } if self.contains(hva) => Some(pa + (hva.0 - self.start.0)),
            _ => None,
        }
    }
}

/// Why an mm operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmError {
    /// No VMA covers the address (caller error, like a SIGSEGV).
    #[error("no mapping at {0:?}")]
    NoVma(Hva),
    /// Write fault on a read-only VMA.
    #[error("{0:?} is mapped read-only")]
    ReadOnly(Hva),
    /// Length or alignment unsuitable for the VMA kind (caller error).
    #[error("bad length {len:#x} for {kind:?}")]
    BadLength {
        /// Requested length.
        len: u64,
        /// Kind.
        kind: VmaKind,
    },
    /// A PFNMAP of memory that does not exist (caller error).
    #[error("pfnmap target {0:?} is not backed")]
    BadPfnMap(Pa),
    /// The range does not exactly match one VMA (partial munmap is unsupported).
    #[error("{start:?}+{len:#x} is not exactly one mapping")]
    NotAVma {
        /// Start.
        start: Hva,
        /// Length.
        len: u64,
    },
    /// Out of host memory.
    #[error("out of host memory")]
    OutOfMemory,
    /// The frame is pinned (migration / split refused).
    #[error("page at {0:?} is pinned")]
    Pinned(Hva),
    /// Nothing is resident at the address.
    #[error("nothing resident at {0:?}")]
    NotResident(Hva),
    /// Not a transparent huge page.
    #[error("{0:?} is not a transparent huge page")]
    NotThp(Hva),
    /// The operation does not apply to this VMA kind.
    #[error("operation not supported on {0:?}")]
    Unsupported(VmaKind),
    /// The mm has exited.
    #[error("the process has exited")]
    Exited,
}

/// What caused an invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MmEvent {
    /// munmap.
    Unmap,
    /// Page reclaim (swap-out / file page drop).
    Reclaim,
    /// Page migration (compaction, NUMA).
    Migrate,
    /// A transparent huge page split into 4K pages.
    ThpSplit,
    /// Process exit (after `release`).
    Exit,
}

/// An invalidated range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidateRange {
    /// First address.
    pub start: Hva,
    /// One past the last.
    pub end: Hva,
    /// Why.
    pub event: MmEvent,
}

/// A listener for changes to the mm's mappings (Linux MMU notifiers).
pub trait MmuNotifier: Send + Sync {
    /// The frames behind `range` are about to change; stop using them
    /// before returning.
    fn invalidate_range_start(&self, range: &InvalidateRange);
    /// The change announced by the matching start is done.
    fn invalidate_range_end(&self, range: &InvalidateRange);
    /// Clears the listener's accessed state for `[start, end)`; whether any
    /// was set.
    fn clear_young(&self, _start: Hva, _end: Hva) -> bool {
        false
    }
    /// Whether the listener's accessed state is set anywhere in the range.
    fn test_young(&self, _start: Hva, _end: Hva) -> bool {
        false
    }
    /// The mm is exiting: drop every use of it.
    fn release(&self) {}
}

/// Handle returned by [`ProcessMm::register_notifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

/// Counters of a [`ProcessMm`], in 4K pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmStats {
    /// Pages allocated for the process.
    pub frames_allocated: u64,
    /// Pages freed.
    pub frames_freed: u64,
    /// Pages swapped out and not yet back.
    pub swapped: u64,
}

#[derive(Clone, Copy, Debug)]
struct Folio {
    pa: Pa,
    size: PageSize,
    young: bool,
    busy: bool,
}

thread_local! {
    /// The folio VMA this thread last faulted on, with its address space's
    /// id (see [`ProcessMm::fault_in`]).
    static LAST_VMA: std::cell::RefCell<Option<(u64, Arc<VmaNode>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Shards of a VMA's folio map (a power of two).
const FOLIO_SHARDS: usize = 1 << FOLIO_SHARD_BITS;
const FOLIO_SHARD_BITS: u32 = 6;

/// One shard of a [`FolioMap`]: its folios and the condition variable
/// waiters on its busy folios sleep on. Aligned so that shards do not share
/// cache lines.
#[repr(align(128))]
struct Shard {
    map: Mutex<BTreeMap<u64, Folio>>,
    cv: Condvar,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Folio>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(
        &self,
        g: MutexGuard<'a, BTreeMap<u64, Folio>>,
    ) -> MutexGuard<'a, BTreeMap<u64, Folio>> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// A VMA's resident folios, sharded by chunks of the address space (2M, or
/// 1G for hugetlb 1G VMAs), like Linux's split page-table locks: a folio
/// never crosses a chunk edge (folios are aligned to their size, which is
/// at most the chunk), so it lives in the shard of any address it covers,
/// and faults in different chunks take different locks.
struct FolioMap {
    shift: u32,
    shards: Box<[Shard]>,
}

impl FolioMap {
    fn new(kind: VmaKind) -> FolioMap {
        FolioMap {
            shift: if kind == VmaKind::Hugetlb1G { 30 } else { 21 },
            shards: (0..FOLIO_SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(BTreeMap::new()),
                    cv: Condvar::new(),
                })
                .collect(),
        }
    }

    /// The shard holding the folio that covers `hva`, if any.
    ///
    /// Chunks are spread by a multiplicative hash, not taken modulo the
    /// shard count: vCPUs working on partitions a multiple of 64 chunks
    /// apart would otherwise walk the same shards in lockstep.
    fn shard(&self, hva: u64) -> &Shard {
        let chunk = hva >> self.shift;
        let i = chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FOLIO_SHARD_BITS);
        &self.shards[i as usize]
    }

    /// The first address a folio overlapping `[start, ..)` can start at.
    fn floor(&self, start: u64) -> u64 {
        start & !((1u64 << self.shift) - 1)
    }

    /// The shards that may hold folios overlapping `[start, end)`.
    fn shards_for(&self, start: u64, end: u64) -> Vec<&Shard> {
        let (first, last) = (start >> self.shift, end.saturating_sub(1) >> self.shift);
        if last.saturating_sub(first) < FOLIO_SHARDS as u64 {
            let mut v: Vec<&Shard> = (first..=last)
                .map(|c| self.shard(c << self.shift))
                .collect();
            v.sort_unstable_by_key(|s| *s as *const Shard as usize);
            v.dedup_by_key(|s| *s as *const Shard as usize);
            v
        } else {
            self.shards.iter().collect()
        }
    }
}

struct VmaNode {
    vma: Vma,
    folios: FolioMap,
    /// Set once munmap/exit starts dropping the folios, before any shard is
    /// emptied: a fault-in that found the node before sees it under its
    /// shard's lock and must not populate it again (the new folio would
    /// never be freed).
    dead: std::sync::atomic::AtomicBool,
}

/// What `fault_vma` found.
enum FaultVma {
    /// A PFN map: its frame, pinned (no folio to fault in).
    Pinned(Pin),
    /// A VMA with folios.
    Folios(Arc<VmaNode>),
}

/// The size of a new folio for a fault at `hva`: the VMA's huge page size,
/// a 2M THP where the aligned 2M chunk lies inside the VMA and nothing in
/// it is resident yet, else 4K.
fn folio_size(vma: &Vma, folios: &BTreeMap<u64, Folio>, hva: Hva) -> PageSize {
    match vma.kind {
        VmaKind::Hugetlb2M => PageSize::Size2M,
        VmaKind::Hugetlb1G => PageSize::Size1G,
        VmaKind::AnonymousThp => {
            let chunk = hva.0 & !((2 << 20) - 1);
            let inside = chunk >= vma.start.0 && chunk + (2 << 20) <= vma.end().0;
            let untouched = folios.range(chunk..chunk + (2 << 20)).next().is_none();
            if inside && untouched {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            }
        }
        _ => PageSize::Size4K,
    }
}

/// The folio covering `hva`, for update.
fn find_mut(folios: &mut BTreeMap<u64, Folio>, hva: u64) -> Option<(&u64, &mut Folio)> {
    folios
        .range_mut(..=hva)
        .next_back()
        .filter(|(s, f)| hva < **s + f.size.bytes())
}

fn find(folios: &BTreeMap<u64, Folio>, hva: u64) -> Option<(u64, Folio)> {
    folios
        .range(..=hva)
        .next_back()
        .filter(|(s, f)| hva < *s + f.size.bytes())
        .map(|(s, f)| (*s, *f))
}

struct MmCore {
    machine: Arc<Machine>,
    allocated: crate::percpu::Counter,
    freed: crate::percpu::Counter,
}

impl MmCore {
    fn pin_word(&self, pa: Pa) -> &AtomicU32 {
        self.machine
            .mem()
            .pin_word(pa)
            .expect("process frames are RAM")
    }

    fn free_folio(&self, pa: Pa, size: PageSize) {
        if let Err(e) = self.machine.host_frames().free(pa, size.order()) {
            debug_assert!(false, "process frame free failed: {e}");
        }
        self.freed.add(size.bytes() / PAGE_SIZE);
    }

    /// Detaches a folio from the mm: freed now if unpinned, else by the
    /// last unpin.
    fn orphan(&self, f: &Folio) {
        let prev = self.pin_word(f.pa).fetch_or(ORPHAN, Ordering::AcqRel);
        if prev & !ORPHAN == 0 {
            self.pin_word(f.pa).store(0, Ordering::Release);
            self.free_folio(f.pa, f.size);
        }
    }

    fn unpin(&self, pa: Pa, size: PageSize) {
        let w = self.pin_word(pa);
        let prev = w.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev & !ORPHAN != 0, "unpin of an unpinned frame {pa:?}");
        if prev == ORPHAN | 1 {
            w.store(0, Ordering::Release);
            self.free_folio(pa, size);
        }
    }
}

/// A pinned reference to the frame behind a host address.
#[must_use = "dropping the pin releases the frame reference"]
pub struct Pin {
    core: Option<Arc<MmCore>>,
    hva: Hva,
    folio_hva: Hva,
    folio_pa: Pa,
    size: PageSize,
    writable: bool,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin")
            .field("hva", &self.hva)
            .field("pa", &self.pa())
            .field("size", &self.size)
            .field("writable", &self.writable)
            .field("refcounted", &self.refcounted())
            .finish()
    }
}

impl Pin {
    /// The 4K frame behind the faulting address.
    pub fn pa(&self) -> Pa {
        Pa(self.folio_pa.0 + ((self.hva.0 - self.folio_hva.0) & !(PAGE_SIZE - 1)))
    }
    /// The host address faulted in.
    pub fn hva(&self) -> Hva {
        self.hva
    }
    /// First frame of the host mapping containing the address.
    pub fn folio_pa(&self) -> Pa {
        self.folio_pa
    }
    /// First address of the host mapping containing the address.
    pub fn folio_hva(&self) -> Hva {
        self.folio_hva
    }
    /// Size of the host mapping (4K, 2M or 1G).
    pub fn size(&self) -> PageSize {
        self.size
    }
    /// Whether the page may be mapped writable.
    pub fn writable(&self) -> bool {
        self.writable
    }
    /// Whether the frame is refcounted (false for PFNMAP).
    pub fn refcounted(&self) -> bool {
        self.core.is_some()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(core) = &self.core {
            core.unpin(self.folio_pa, self.size);
        }
    }
}

struct MmInner {
    vmas: BTreeMap<u64, Arc<VmaNode>>,
    next: u64,
    exited: bool,
}

impl MmInner {
    fn find(&self, hva: Hva) -> Option<&Arc<VmaNode>> {
        self.vmas
            .range(..=hva.0)
            .next_back()
            .map(|(_, n)| n)
            .filter(|n| n.vma.contains(hva))
    }
}

type Listeners = Vec<(NotifierId, Arc<dyn MmuNotifier>)>;

/// A host process's memory.
pub struct ProcessMm {
    /// Unique among all address spaces of the process (keys the per-thread
    /// VMA cache).
    id: u64,
    core: Arc<MmCore>,
    inner: RwLock<MmInner>,
    listeners: Mutex<Listeners>,
    next_id: AtomicU64,
    swap: Mutex<HashMap<u64, Vec<u64>>>,
    /// Number of swapped-out pages (lets fault-in skip the swap lock when
    /// nothing is swapped). Updated under the swap lock.
    swapped: AtomicU64,
}

impl std::fmt::Debug for ProcessMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessMm")
            .field("stats", &self.stats())
            .finish()
    }
}

impl ProcessMm {
    /// An empty address space allocating from `machine`'s host memory.
    pub fn new(machine: Arc<Machine>) -> ProcessMm {
        static NEXT_MM: AtomicU64 = AtomicU64::new(1);
        ProcessMm {
            id: NEXT_MM.fetch_add(1, Ordering::Relaxed),
            core: Arc::new(MmCore {
                machine,
                allocated: Default::default(),
                freed: Default::default(),
            }),
            inner: RwLock::new(MmInner {
                vmas: BTreeMap::new(),
                next: HVA_BASE,
                exited: false,
            }),
            listeners: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            swap: Mutex::new(HashMap::new()),
            swapped: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, MmInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MmInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn listeners(&self) -> Listeners {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Registers a listener.
    pub fn register_notifier(&self, n: Arc<dyn MmuNotifier>) -> NotifierId {
        let id = NotifierId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, n));
        id
    }

    /// Unregisters a listener.
    pub fn unregister_notifier(&self, id: NotifierId) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
    }

    fn notify_start(&self, r: &InvalidateRange) -> Listeners {
        let l = self.listeners();
        for (_, n) in &l {
            n.invalidate_range_start(r);
        }
        l
    }

    fn notify_end(l: &Listeners, r: &InvalidateRange) {
        for (_, n) in l {
            n.invalidate_range_end(r);
        }
    }

    /// Maps `len` bytes of `kind`, aligned as the kind needs.
    ///
    /// # Errors
    /// [`MmError::BadLength`] if `len` is zero or not a multiple of the
    /// kind's granule; [`MmError::BadPfnMap`] for an unbacked PFNMAP target;
    /// [`MmError::Exited`].
    pub fn mmap(&self, len: u64, kind: VmaKind) -> Result<Hva, MmError> {
        let g = kind.granule();
        if len == 0 || len % g != 0 {
            return Err(MmError::BadLength { len, kind });
        }
        if let VmaKind::PfnMap { pa } = kind {
            let mem = self.core.machine.mem();
            if !pa.is_aligned(PAGE_SIZE) || !(mem.is_device(pa, len) || mem.is_ram(pa, len)) {
                return Err(MmError::BadPfnMap(pa));
            }
        }
        let mut inner = self.write();
        if inner.exited {
            return Err(MmError::Exited);
        }
        let start = inner.next.div_ceil(g) * g;
        // Leave a guard gap so VMAs never touch.
        inner.next = start + len + (2 << 20);
        let node = VmaNode {
            vma: Vma {
                start: Hva(start),
                len,
                kind,
            },
            folios: FolioMap::new(kind),
            dead: std::sync::atomic::AtomicBool::new(false),
        };
        inner.vmas.insert(start, Arc::new(node));
        Ok(Hva(start))
    }

    /// Runs `f` on the VMA containing `hva` (or `None`): the VMA this
    /// thread last faulted on when it covers `hva` and is alive (no mm
    /// lock, as [`ProcessMm::fault_in`]), else the one found under the mm
    /// read lock. A VMA's description never changes; one unmapped while `f`
    /// runs stays readable for the call (its pins then fail, and the MMU
    /// notifier's invalidation makes a fault that used it retry).
    pub fn with_vma<R>(&self, hva: Hva, f: impl FnOnce(Option<&Vma>) -> R) -> R {
        let mut f = Some(f);
        let cached = LAST_VMA.with(|c| match &*c.borrow() {
            Some((id, node))
                if *id == self.id
                    && node.vma.contains(hva)
                    && !node.dead.load(Ordering::Acquire) =>
            {
                f.take().map(|f| f(Some(&node.vma)))
            }
            _ => None,
        });
        if let Some(r) = cached {
            return r;
        }
        let inner = self.read();
        let f = f.take().expect("not called on the fast path");
        f(inner.find(hva).map(|n| &n.vma))
    }

    /// Faults `hva` in (for writing if `write`) and pins its frame.
    ///
    /// Steps: find the VMA (`fault_vma`; a PFN map pins its
    /// frame directly); then, under the VMA's folio lock, pin a resident
    /// folio (`pin_folio`) or make one: choose its size
    /// (`folio_size`), allocate and fill a frame with the lock dropped
    /// (`new_folio`), and install it unless another fault or
    /// munmap won the race meanwhile (`install_folio`); then
    /// look again.
    ///
    /// # Errors
    /// [`MmError::NoVma`], [`MmError::ReadOnly`], [`MmError::OutOfMemory`],
    /// [`MmError::Exited`].
    pub fn fault_in(&self, hva: Hva, write: bool) -> Result<Pin, MmError> {
        // Fast path: the VMA this thread last faulted on, still alive (like
        // Linux's per-VMA lock lookup): no mm-wide lock and no reference
        // count, which every vCPU would write. A VMA that munmap/exit took
        // away is dead, and the slow path looks again.
        let cached = LAST_VMA.with(|c| match &*c.borrow() {
            Some((id, node))
                if *id == self.id
                    && node.vma.contains(hva)
                    && !node.dead.load(Ordering::Acquire) =>
            {
                Some(self.fault_in_node(node, hva, write))
            }
            _ => None,
        });
        if let Some(r) = cached {
            return r;
        }
        let node = match self.fault_vma(hva, write)? {
            FaultVma::Pinned(pin) => return Ok(pin),
            FaultVma::Folios(node) => node,
        };
        LAST_VMA.with(|c| *c.borrow_mut() = Some((self.id, node.clone())));
        self.fault_in_node(&node, hva, write)
    }

    /// [`ProcessMm::fault_in`] on the folio VMA `node` found for `hva`.
    fn fault_in_node(&self, node: &VmaNode, hva: Hva, write: bool) -> Result<Pin, MmError> {
        let vma = &node.vma;
        if write && !vma.writable() {
            return Err(MmError::ReadOnly(hva));
        }
        let shard = node.folios.shard(hva.0);
        let mut folios = shard.lock();
        loop {
            // munmap/exit ran since the VMA lookup.
            if node.dead.load(Ordering::Acquire) {
                return Err(MmError::NoVma(hva));
            }
            if let Some((&start, f)) = find_mut(&mut folios, hva.0) {
                if f.busy {
                    folios = shard.wait(folios);
                    continue;
                }
                f.young = true;
                return Ok(self.pin_folio(vma, hva, start, *f));
            }
            let size = folio_size(vma, &folios, hva);
            // Allocate and fill the frame without the VMA's lock, so faults
            // on other pages of the VMA (other vCPUs) proceed meanwhile.
            drop(folios);
            let (start, pa, size) = self.new_folio(vma, hva, size)?;
            folios = shard.lock();
            if let Some(f) = self.install_folio(node, &mut folios, start, pa, size) {
                // Installed (young) and covering `hva`: pin it right away.
                return Ok(self.pin_folio(vma, hva, start, f));
            }
        }
    }

    /// The VMA `hva` faults on, checked for the access: a PFN map's frame
    /// pinned at once, or the VMA node whose folios the fault looks up.
    fn fault_vma(&self, hva: Hva, write: bool) -> Result<FaultVma, MmError> {
        let node = {
            let inner = self.read();
            if inner.exited {
                return Err(MmError::Exited);
            }
            inner.find(hva).ok_or(MmError::NoVma(hva))?.clone()
        };
        let vma = &node.vma;
        if write && !vma.writable() {
            return Err(MmError::ReadOnly(hva));
        }
        if let VmaKind::PfnMap { pa } = vma.kind {
            let page = hva.align_down(PAGE_SIZE);
            return Ok(FaultVma::Pinned(Pin {
                core: None,
                hva,
                folio_hva: page,
                folio_pa: pa + (page.0 - vma.start.0),
                size: PageSize::Size4K,
                writable: true,
            }));
        }
        Ok(FaultVma::Folios(node))
    }

    /// Pins the resident folio `f` at `start`. Called with its shard's lock
    /// held (a reclaim checks the pin count under that lock); the caller
    /// has marked it young.
    fn pin_folio(&self, vma: &Vma, hva: Hva, start: u64, f: Folio) -> Pin {
        self.core.pin_word(f.pa).fetch_add(1, Ordering::AcqRel);
        Pin {
            core: Some(self.core.clone()),
            hva,
            folio_hva: Hva(start),
            folio_pa: f.pa,
            size: f.size,
            writable: vma.writable(),
        }
    }

    /// Allocates a frame for a folio of `size` around `hva` (a THP falls
    /// back to a small page, like Linux) and fills it; no lock held.
    /// Returns the folio's start, frame and size.
    fn new_folio(
        &self,
        vma: &Vma,
        hva: Hva,
        size: PageSize,
    ) -> Result<(u64, Pa, PageSize), MmError> {
        let frames = self.core.machine.host_frames();
        let (pa, size) = match frames.alloc(size.order()) {
            Ok(pa) => (pa, size),
            Err(_) if vma.kind == VmaKind::AnonymousThp && size != PageSize::Size4K => (
                frames.alloc(0).map_err(|_| MmError::OutOfMemory)?,
                PageSize::Size4K,
            ),
            Err(_) => return Err(MmError::OutOfMemory),
        };
        let start = hva.0 & !(size.bytes() - 1);
        self.populate(vma, start, pa, size);
        Ok((start, pa, size))
    }

    /// Installs the new folio (with its swapped-out data, if any) under the
    /// VMA's folio lock, unless someone else populated (part of) its range
    /// meanwhile or the VMA went away: then the frame goes back.
    fn install_folio(
        &self,
        node: &VmaNode,
        folios: &mut BTreeMap<u64, Folio>,
        start: u64,
        pa: Pa,
        size: PageSize,
    ) -> Option<Folio> {
        let taken = folios
            .range(..start + size.bytes())
            .next_back()
            .is_some_and(|(s, f)| s + f.size.bytes() > start);
        if taken || node.dead.load(Ordering::Acquire) {
            let frames = self.core.machine.host_frames();
            if let Err(e) = frames.free(pa, size.order()) {
                debug_assert!(false, "freeing an unused fresh frame failed: {e}");
            }
            return None;
        }
        self.swap_in(&node.vma, start, pa, size);
        self.core.allocated.add(size.bytes() / PAGE_SIZE);
        // Young: the fault installing it is an access.
        let f = Folio {
            pa,
            size,
            young: true,
            busy: false,
        };
        folios.insert(start, f);
        Some(f)
    }

    /// Fills a newly allocated folio with its initial contents: zeroes, or
    /// the file's. Swapped-out data comes in later, with
    /// [`ProcessMm::swap_in`], once the folio is sure to be installed.
    fn populate(&self, vma: &Vma, start: u64, pa: Pa, size: PageSize) {
        let mem = self.core.machine.mem();
        mem.zero(pa, size.bytes()).expect("host frames are RAM");
        if let VmaKind::ReadOnlyFile { file_id } = vma.kind {
            let base = start - vma.start.0;
            let words: Vec<u64> = (0..size.bytes() / 8)
                .map(|i| file_word(file_id, base + i * 8))
                .collect();
            mem.write_words(pa, &words).expect("host frames are RAM");
        }
    }

    /// Restores swapped-out pages of `[start, start + size)` into the folio
    /// at `pa` (called with the VMA's folio lock held, just before the folio
    /// is installed, so no racing fault can take the data first and lose it).
    fn swap_in(&self, vma: &Vma, start: u64, pa: Pa, size: PageSize) {
        if matches!(vma.kind, VmaKind::ReadOnlyFile { .. })
            || self.swapped.load(Ordering::Acquire) == 0
        {
            return;
        }
        let mem = self.core.machine.mem();
        let mut swap = self.swap.lock().unwrap_or_else(|e| e.into_inner());
        let mut page = start;
        while page < start + size.bytes() {
            if let Some(data) = swap.remove(&page) {
                mem.write_words(pa + (page - start), &data)
                    .expect("host frames are RAM");
            }
            page += PAGE_SIZE;
        }
        self.swapped.store(swap.len() as u64, Ordering::Release);
    }

    /// The frame and size resident at `hva`, without pinning (for tests).
    pub fn resident(&self, hva: Hva) -> Option<(Pa, PageSize)> {
        let inner = self.read();
        let node = inner.find(hva)?;
        let folios = node.folios.shard(hva.0).lock();
        find(&folios, hva.0).map(|(s, f)| (f.pa + ((hva.0 - s) & !(PAGE_SIZE - 1)), f.size))
    }

    /// Unmaps the VMA `[start, start+len)` (exactly one VMA). Listeners are
    /// told first; pinned frames are freed when their last pin drops.
    ///
    /// # Errors
    /// [`MmError::NotAVma`].
    pub fn munmap(&self, start: Hva, len: u64) -> Result<(), MmError> {
        let mut inner = self.write();
        match inner.vmas.get(&start.0) {
            Some(n) if n.vma.len == len => {}
            _ => return Err(MmError::NotAVma { start, len }),
        }
        let r = InvalidateRange {
            start,
            end: start + len,
            event: MmEvent::Unmap,
        };
        let l = self.notify_start(&r);
        let node = inner.vmas.remove(&start.0).expect("checked above");
        self.drop_folios(&node);
        {
            let mut swap = self.swap.lock().unwrap_or_else(|e| e.into_inner());
            swap.retain(|&k, _| k < start.0 || k >= start.0 + len);
            self.swapped.store(swap.len() as u64, Ordering::Release);
        }
        drop(inner);
        Self::notify_end(&l, &r);
        Ok(())
    }

    fn drop_folios(&self, node: &VmaNode) {
        if matches!(node.vma.kind, VmaKind::PfnMap { .. }) {
            return;
        }
        // Dead before any shard is emptied: a fault-in that takes a shard's
        // lock after this sees it and installs nothing.
        node.dead.store(true, Ordering::Release);
        for shard in node.folios.shards.iter() {
            let folios = {
                let mut g = shard.lock();
                // A reclaim, migration or THP split in flight owns its (busy)
                // folio until it is done with it: wait, so the frame is freed
                // exactly once, by whoever holds it last.
                while g.values().any(|f| f.busy) {
                    g = shard.wait(g);
                }
                std::mem::take(&mut *g)
            };
            for f in folios.values() {
                self.core.orphan(f);
            }
        }
    }

    /// Marks the unpinned folios of `node` in `[start, end)` busy.
    fn take_unpinned(&self, node: &VmaNode, start: u64, end: u64) -> Vec<(u64, Folio)> {
        let mut out = Vec::new();
        if end <= start {
            return out;
        }
        let lo = node.folios.floor(start);
        for shard in node.folios.shards_for(start, end) {
            let mut folios = shard.lock();
            for (&s, f) in folios.range_mut(lo..end) {
                if s + f.size.bytes() <= start || f.busy {
                    continue;
                }
                if self.core.pin_word(f.pa).load(Ordering::Acquire) == 0 {
                    f.busy = true;
                    out.push((s, *f));
                }
            }
        }
        out.sort_unstable_by_key(|&(s, _)| s);
        out
    }

    /// Reclaims every unpinned resident page in `[start, start+len)`:
    /// anonymous pages are swapped out (their contents come back on the next
    /// fault-in), file pages dropped. Hugetlb and PFNMAP are never reclaimed.
    /// Returns the number of 4K pages freed.
    pub fn reclaim(&self, start: Hva, len: u64) -> u64 {
        let nodes: Vec<Arc<VmaNode>> = {
            let inner = self.read();
            inner
                .vmas
                .values()
                .filter(|n| n.vma.start.0 < start.0 + len && n.vma.end().0 > start.0)
                .filter(|n| {
                    matches!(
                        n.vma.kind,
                        VmaKind::Anonymous4K | VmaKind::AnonymousThp | VmaKind::ReadOnlyFile { .. }
                    )
                })
                .cloned()
                .collect()
        };
        let mem = self.core.machine.mem();
        let mut pages = 0;
        for node in nodes {
            for (s, f) in self.take_unpinned(&node, start.0, start.0 + len) {
                let r = InvalidateRange {
                    start: Hva(s),
                    end: Hva(s + f.size.bytes()),
                    event: MmEvent::Reclaim,
                };
                let l = self.notify_start(&r);
                if !matches!(node.vma.kind, VmaKind::ReadOnlyFile { .. }) {
                    let mut swap = self.swap.lock().unwrap_or_else(|e| e.into_inner());
                    for i in 0..f.size.bytes() / PAGE_SIZE {
                        let mut data = vec![0u64; 512];
                        mem.read_words(f.pa + i * PAGE_SIZE, &mut data)
                            .expect("host frames are RAM");
                        swap.insert(s + i * PAGE_SIZE, data);
                    }
                    self.swapped.store(swap.len() as u64, Ordering::Release);
                }
                let shard = node.folios.shard(s);
                shard.lock().remove(&s);
                self.core.free_folio(f.pa, f.size);
                pages += f.size.bytes() / PAGE_SIZE;
                shard.cv.notify_all();
                Self::notify_end(&l, &r);
            }
        }
        pages
    }

    fn folio_at(&self, hva: Hva) -> Result<(Arc<VmaNode>, u64, Folio), MmError> {
        let inner = self.read();
        if inner.exited {
            return Err(MmError::Exited);
        }
        let node = inner.find(hva).ok_or(MmError::NoVma(hva))?.clone();
        drop(inner);
        let folios = node.folios.shard(hva.0).lock();
        let (s, f) = find(&folios, hva.0).ok_or(MmError::NotResident(hva))?;
        drop(folios);
        Ok((node, s, f))
    }

    /// Migrates the page (or huge page) at `hva` to a new frame: listeners
    /// are told, then contents copied, the new frame installed and the old
    /// one freed. Returns the new frame of the folio.
    ///
    /// # Errors
    /// [`MmError::Pinned`] if the frame is pinned; [`MmError::NotResident`],
    /// [`MmError::NoVma`], [`MmError::OutOfMemory`], [`MmError::Unsupported`]
    /// for PFNMAP.
    pub fn migrate(&self, hva: Hva) -> Result<Pa, MmError> {
        let (node, s, _) = self.folio_at(hva)?;
        if let VmaKind::PfnMap { .. } = node.vma.kind {
            return Err(MmError::Unsupported(node.vma.kind));
        }
        let taken = self.take_unpinned(&node, s, s + 1);
        let Some(&(_, f)) = taken.first() else {
            return Err(MmError::Pinned(hva));
        };
        let new = match self.core.machine.host_frames().alloc(f.size.order()) {
            Ok(pa) => pa,
            Err(_) => {
                let shard = node.folios.shard(s);
                if let Some(x) = shard.lock().get_mut(&s) {
                    x.busy = false;
                }
                shard.cv.notify_all();
                return Err(MmError::OutOfMemory);
            }
        };
        self.core.allocated.add(f.size.bytes() / PAGE_SIZE);
        let r = InvalidateRange {
            start: Hva(s),
            end: Hva(s + f.size.bytes()),
            event: MmEvent::Migrate,
        };
        let l = self.notify_start(&r);
        let mem = self.core.machine.mem();
        mem.copy(new, f.pa, f.size.bytes())
            .expect("host frames are RAM");
        let shard = node.folios.shard(s);
        if let Some(x) = shard.lock().get_mut(&s) {
            x.pa = new;
            x.busy = false;
        }
        self.core.free_folio(f.pa, f.size);
        shard.cv.notify_all();
        Self::notify_end(&l, &r);
        Ok(new)
    }

    /// Splits the transparent huge page at `hva` into 4K pages (same frames).
    ///
    /// # Errors
    /// [`MmError::NotThp`], [`MmError::Pinned`], [`MmError::NotResident`],
    /// [`MmError::NoVma`].
    pub fn split_thp(&self, hva: Hva) -> Result<(), MmError> {
        let (node, s, f) = self.folio_at(hva)?;
        if node.vma.kind != VmaKind::AnonymousThp || f.size != PageSize::Size2M {
            return Err(MmError::NotThp(hva));
        }
        let taken = self.take_unpinned(&node, s, s + 1);
        if taken.is_empty() {
            return Err(MmError::Pinned(hva));
        }
        let r = InvalidateRange {
            start: Hva(s),
            end: Hva(s + f.size.bytes()),
            event: MmEvent::ThpSplit,
        };
        let l = self.notify_start(&r);
        self.core
            .machine
            .host_frames()
            .split_allocation(f.pa, f.size.order())
            .expect("THP frames are allocated");
        let shard = node.folios.shard(s);
        {
            let mut folios = shard.lock();
            folios.remove(&s);
            for i in 0..512 {
                folios.insert(
                    s + i * PAGE_SIZE,
                    Folio {
                        pa: f.pa + i * PAGE_SIZE,
                        size: PageSize::Size4K,
                        young: f.young,
                        busy: false,
                    },
                );
            }
        }
        shard.cv.notify_all();
        Self::notify_end(&l, &r);
        Ok(())
    }

    fn young_in(&self, start: Hva, end: Hva, clear: bool) -> bool {
        let inner = self.read();
        let mut young = false;
        if end.0 <= start.0 {
            return false;
        }
        for n in inner
            .vmas
            .values()
            .filter(|n| n.vma.start.0 < end.0 && n.vma.end().0 > start.0)
        {
            let lo = n.folios.floor(start.0);
            for shard in n.folios.shards_for(start.0, end.0) {
                for (s, f) in shard.lock().range_mut(lo..end.0) {
                    if s + f.size.bytes() > start.0 && f.young {
                        young = true;
                        if clear {
                            f.young = false;
                        }
                    }
                }
            }
        }
        young
    }

    /// Ages `[start, end)`: clears the mm's and every listener's accessed
    /// state; whether any was set.
    pub fn age(&self, start: Hva, end: Hva) -> bool {
        let mut young = self.young_in(start, end, true);
        for (_, n) in self.listeners() {
            young |= n.clear_young(start, end);
        }
        young
    }

    /// Whether `[start, end)` was accessed (mm or any listener), without
    /// clearing.
    pub fn test_age(&self, start: Hva, end: Hva) -> bool {
        let mut young = self.young_in(start, end, false);
        for (_, n) in self.listeners() {
            young |= n.test_young(start, end);
        }
        young
    }

    /// Process exit: listeners' `release` first, then every VMA is torn down
    /// (pinned frames freed by their last unpin). Idempotent.
    pub fn exit(&self) {
        let mut inner = self.write();
        if inner.exited {
            return;
        }
        inner.exited = true;
        for (_, n) in self.listeners() {
            n.release();
        }
        let vmas = std::mem::take(&mut inner.vmas);
        for node in vmas.values() {
            self.drop_folios(node);
        }
        self.swap.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.swapped.store(0, Ordering::Release);
    }

    /// Whether [`ProcessMm::exit`] ran.
    pub fn exited(&self) -> bool {
        self.read().exited
    }

    /// Counters.
    pub fn stats(&self) -> MmStats {
        MmStats {
            frames_allocated: self.core.allocated.sum(),
            frames_freed: self.core.freed.sum(),
            swapped: self.swap.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
        }
    }
}

impl Drop for ProcessMm {
    fn drop(&mut self) {
        self.exit();
    }
}

#[cfg(test)]
mod tests;
