//! Process memory: fault-in sizes per VMA kind, pins, events and notifier
//! ordering.

use super::*;
use crate::{Coherence, SimConfig};
use std::sync::atomic::AtomicBool;
use std::sync::Barrier;

fn small() -> Arc<Machine> {
    Machine::new(SimConfig {
        mem_size: 64 << 20,
        hyp_carveout: 4 << 20,
        ncpus: 1,
        coherence: Coherence::Off,
        ..SimConfig::default()
    })
    .unwrap()
}

fn big() -> Arc<Machine> {
    Machine::new(SimConfig {
        ncpus: 1,
        ..SimConfig::default()
    })
    .unwrap()
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(&'static str, Option<InvalidateRange>)>>,
    young: AtomicBool,
}

impl Recorder {
    fn push(&self, what: &'static str, r: Option<InvalidateRange>) {
        self.events.lock().unwrap().push((what, r));
    }
    fn take(&self) -> Vec<(&'static str, Option<InvalidateRange>)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, r: &InvalidateRange) {
        self.push("start", Some(*r));
    }
    fn invalidate_range_end(&self, r: &InvalidateRange) {
        self.push("end", Some(*r));
    }
    fn clear_young(&self, _: Hva, _: Hva) -> bool {
        self.young.swap(false, Ordering::SeqCst)
    }
    fn test_young(&self, _: Hva, _: Hva) -> bool {
        self.young.load(Ordering::SeqCst)
    }
    fn release(&self) {
        self.push("release", None);
    }
}

#[test]
fn fault_in_size_and_writability_per_vma_kind() {
    let m = big();
    let mm = ProcessMm::new(m.clone());
    let cases = [
        (VmaKind::Anonymous4K, 8 << 20, PageSize::Size4K, true),
        (VmaKind::AnonymousThp, 8 << 20, PageSize::Size2M, true),
        (VmaKind::Hugetlb2M, 8 << 20, PageSize::Size2M, true),
        (VmaKind::Hugetlb1G, 1 << 30, PageSize::Size1G, true),
        (
            VmaKind::ReadOnlyFile { file_id: 3 },
            8 << 20,
            PageSize::Size4K,
            false,
        ),
    ];
    for (kind, len, size, writable) in cases {
        let hva = mm.mmap(len, kind).unwrap();
        assert!(hva.is_aligned(kind.granule()), "{kind:?}");
        let p = mm.fault_in(hva + 0x3008, false).unwrap();
        assert_eq!(
            (p.size(), p.writable(), p.refcounted()),
            (size, writable, true),
            "{kind:?}"
        );
        assert!(p.folio_pa().is_aligned(size.bytes()), "{kind:?}");
        assert_eq!(p.folio_hva(), (hva + 0x3008).align_down(size.bytes()));
        assert_eq!(p.pa(), p.folio_pa() + ((hva.0 + 0x3000) - p.folio_hva().0));
        mm.with_vma(hva, |v| assert_eq!(v.unwrap().kind(), kind));
    }
    // A read-only file: contents from the file, writes refused.
    let f = mm
        .mmap(4 * 4096, VmaKind::ReadOnlyFile { file_id: 9 })
        .unwrap();
    let p = mm.fault_in(f + 4096, false).unwrap();
    assert_eq!(
        m.mem().read_u64(p.pa() + 16).unwrap(),
        file_word(9, 4096 + 16)
    );
    assert_eq!(mm.fault_in(f, true).unwrap_err(), MmError::ReadOnly(f));
    // PFNMAP: the device frame itself, not refcounted.
    let dev = m.config().devices[0].base;
    let d = mm.mmap(64 << 10, VmaKind::PfnMap { pa: dev }).unwrap();
    let p = mm.fault_in(d + 0x2010, true).unwrap();
    assert_eq!(
        (p.pa(), p.size(), p.refcounted()),
        (dev + 0x2000, PageSize::Size4K, false)
    );
    mm.with_vma(d, |v| {
        assert_eq!(v.unwrap().pfnmap_pa(d + 0x5000), Some(dev + 0x5000))
    });
    // No VMA.
    assert_eq!(
        mm.fault_in(Hva(0x10), false).unwrap_err(),
        MmError::NoVma(Hva(0x10))
    );
    assert!(matches!(
        mm.mmap(4096, VmaKind::Hugetlb2M),
        Err(MmError::BadLength { .. })
    ));
}

#[test]
fn anonymous_pages_are_zero_on_first_touch() {
    let m = small();
    // Leave garbage in a frame, then free it: it will be reused first.
    let g = m.host_frames().alloc(0).unwrap();
    m.mem().fill(g, PAGE_SIZE, 0xee).unwrap();
    m.host_frames().free(g, 0).unwrap();
    let mm = ProcessMm::new(m.clone());
    let hva = mm.mmap(4096, VmaKind::Anonymous4K).unwrap();
    let p = mm.fault_in(hva, true).unwrap();
    assert_eq!(p.pa(), g);
    assert!(m.mem().is_zero(p.pa(), PAGE_SIZE).unwrap());
    assert_eq!(mm.stats().frames_allocated, 1);
}

#[test]
fn munmap_notifies_first_and_a_pinned_frame_outlives_it() {
    let m = small();
    let mm = ProcessMm::new(m.clone());
    let rec = Arc::new(Recorder::default());
    mm.register_notifier(rec.clone());
    let hva = mm.mmap(2 * 4096, VmaKind::Anonymous4K).unwrap();
    let pin = mm.fault_in(hva, true).unwrap();
    drop(mm.fault_in(hva + 4096, true).unwrap());
    let in_use = m.host_frames().stats().in_use;
    mm.munmap(hva, 2 * 4096).unwrap();
    let r = InvalidateRange {
        start: hva,
        end: hva + 2 * 4096,
        event: MmEvent::Unmap,
    };
    assert_eq!(rec.take(), vec![("start", Some(r)), ("end", Some(r))]);
    // The unpinned page is gone, the pinned one stays until unpinned.
    assert_eq!(m.host_frames().stats().in_use, in_use - 1);
    assert!(m.host_frames().is_allocated(pin.pa()));
    let pa = pin.pa();
    drop(pin);
    assert!(!m.host_frames().is_allocated(pa));
    assert_eq!(mm.stats().frames_freed, 2);
    assert_eq!(mm.fault_in(hva, false).unwrap_err(), MmError::NoVma(hva));
    assert!(matches!(mm.munmap(hva, 4096), Err(MmError::NotAVma { .. })));
}

#[test]
fn reclaim_skips_pinned_pages_and_swapped_contents_come_back() {
    let m = small();
    let mm = ProcessMm::new(m.clone());
    let rec = Arc::new(Recorder::default());
    mm.register_notifier(rec.clone());
    let hva = mm.mmap(4 * 4096, VmaKind::Anonymous4K).unwrap();
    for i in 0..4 {
        let p = mm.fault_in(hva + i * 4096, true).unwrap();
        m.mem().write_u64(p.pa() + 8, 0x1000 + i).unwrap();
    }
    let pinned = mm.fault_in(hva + 4096, false).unwrap();
    assert_eq!(mm.reclaim(hva, 4 * 4096), 3);
    assert_eq!(rec.take().len(), 6, "start/end for each reclaimed page");
    assert_eq!(mm.stats().swapped, 3);
    assert_eq!(mm.resident(hva + 4096).map(|r| r.0), Some(pinned.pa()));
    assert!(mm.resident(hva).is_none());
    for i in 0..4 {
        let p = mm.fault_in(hva + i * 4096, false).unwrap();
        assert_eq!(m.mem().read_u64(p.pa() + 8).unwrap(), 0x1000 + i);
    }
    assert_eq!(mm.stats().swapped, 0);
}

/// Blocks inside `invalidate_range_start` until the test lets it go.
struct Gate {
    machine: Arc<Machine>,
    old: Pa,
    entered: Barrier,
    go: Barrier,
    frame_intact_at_start: AtomicBool,
}

impl MmuNotifier for Gate {
    fn invalidate_range_start(&self, _: &InvalidateRange) {
        let intact = self.machine.host_frames().is_allocated(self.old)
            && self.machine.mem().read_u64(self.old).unwrap() == 0xfeed;
        self.frame_intact_at_start.store(intact, Ordering::SeqCst);
        self.entered.wait();
        self.go.wait();
    }
    fn invalidate_range_end(&self, _: &InvalidateRange) {}
}

#[test]
fn migration_does_not_reuse_the_frame_before_every_listener_returned_from_start() {
    let m = small();
    let mm = Arc::new(ProcessMm::new(m.clone()));
    let hva = mm.mmap(4096, VmaKind::Anonymous4K).unwrap();
    let old = {
        let p = mm.fault_in(hva, true).unwrap();
        m.mem().write_u64(p.pa(), 0xfeed).unwrap();
        p.pa()
    };
    let rec = Arc::new(Recorder::default());
    let gate = Arc::new(Gate {
        machine: m.clone(),
        old,
        entered: Barrier::new(2),
        go: Barrier::new(2),
        frame_intact_at_start: AtomicBool::new(false),
    });
    mm.register_notifier(rec.clone());
    mm.register_notifier(gate.clone());
    let mm2 = mm.clone();
    let t = std::thread::spawn(move || mm2.migrate(hva));
    gate.entered.wait();
    // The first listener has returned from start, the second is inside it:
    // every free frame can be taken and the old frame is not among them.
    let frames = m.host_frames();
    let mut taken = Vec::new();
    while let Ok(pa) = frames.alloc(0) {
        taken.push(pa);
    }
    assert!(!taken.contains(&old));
    assert_eq!(m.mem().read_u64(old).unwrap(), 0xfeed);
    for pa in taken {
        frames.free(pa, 0).unwrap();
    }
    gate.go.wait();
    let new = t.join().unwrap().unwrap();
    assert!(gate.frame_intact_at_start.load(Ordering::SeqCst));
    assert_ne!(new, old);
    assert!(
        !frames.is_allocated(old),
        "old frame freed after the listeners"
    );
    assert_eq!(m.mem().read_u64(new).unwrap(), 0xfeed, "contents moved");
    assert_eq!(mm.resident(hva).unwrap().0, new);
    let ev: Vec<_> = rec
        .take()
        .into_iter()
        .map(|(w, r)| (w, r.unwrap().event))
        .collect();
    assert_eq!(
        ev,
        vec![("start", MmEvent::Migrate), ("end", MmEvent::Migrate)]
    );
    // A pinned page is not migrated and nobody is told.
    let _pin = mm.fault_in(hva, false).unwrap();
    mm.unregister_notifier(NotifierId(1));
    assert_eq!(mm.migrate(hva), Err(MmError::Pinned(hva)));
    assert!(rec.take().is_empty());
}

#[test]
fn thp_split_notifies_the_huge_range_then_faults_in_4k() {
    let m = small();
    let mm = ProcessMm::new(m.clone());
    let rec = Arc::new(Recorder::default());
    mm.register_notifier(rec.clone());
    let hva = mm.mmap(4 << 20, VmaKind::AnonymousThp).unwrap();
    let p = mm.fault_in(hva + 0x1000, true).unwrap();
    assert_eq!(p.size(), PageSize::Size2M);
    assert_eq!(mm.split_thp(hva), Err(MmError::Pinned(hva)));
    let base = p.folio_pa();
    drop(p);
    mm.split_thp(hva).unwrap();
    let r = InvalidateRange {
        start: hva,
        end: hva + (2 << 20),
        event: MmEvent::ThpSplit,
    };
    assert_eq!(rec.take(), vec![("start", Some(r)), ("end", Some(r))]);
    let p = mm.fault_in(hva + 0x5000, true).unwrap();
    assert_eq!((p.size(), p.pa()), (PageSize::Size4K, base + 0x5000));
    // The split pages are freed one by one at munmap.
    drop(p);
    mm.munmap(hva, 4 << 20).unwrap();
    assert_eq!(m.host_frames().stats().in_use, 0);
}

#[test]
fn exit_releases_listeners_before_freeing_and_ages_through_them() {
    let m = small();
    let mm = ProcessMm::new(m.clone());
    let rec = Arc::new(Recorder::default());
    mm.register_notifier(rec.clone());
    let hva = mm.mmap(4096, VmaKind::Anonymous4K).unwrap();
    drop(mm.fault_in(hva, true).unwrap());
    assert!(mm.test_age(hva, hva + 4096));
    assert!(mm.age(hva, hva + 4096));
    assert!(!mm.age(hva, hva + 4096), "aging cleared the accessed state");
    rec.young.store(true, Ordering::SeqCst);
    assert!(
        mm.test_age(hva, hva + 4096),
        "a listener's accessed state counts"
    );
    assert!(mm.age(hva, hva + 4096));
    mm.exit();
    assert_eq!(rec.take(), vec![("release", None)]);
    assert_eq!(m.host_frames().stats().in_use, 0);
    assert_eq!(mm.fault_in(hva, false).unwrap_err(), MmError::Exited);
    assert_eq!(mm.stats().frames_allocated, mm.stats().frames_freed);
}

/// Reclaim, migration and THP split racing munmap and exit: every frame is
/// freed exactly once (the allocator would report a double free) and
/// nothing panics; afterwards the allocator is back where it started.
#[test]
fn reclaim_migrate_split_racing_munmap_free_each_frame_once() {
    let m = small();
    let before = m.host_frames().stats().in_use;
    for round in 0..20u64 {
        let mm = Arc::new(ProcessMm::new(m.clone()));
        let len = 8 << 20;
        let hva = mm.mmap(len, VmaKind::AnonymousThp).unwrap();
        for off in (0..len).step_by(2 << 20) {
            drop(mm.fault_in(hva + off, true).unwrap());
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let storm = |kind: u64| {
                let mm = &mm;
                let stop = &stop;
                move || {
                    let mut i = kind;
                    while !stop.load(Ordering::Relaxed) {
                        let a = hva + (i % (len / 4096)) * 4096;
                        match (i + round) % 3 {
                            0 => {
                                mm.reclaim(a, 2 << 20);
                            }
                            1 => {
                                let _ = mm.migrate(a);
                            }
                            _ => {
                                let _ = mm.split_thp(a);
                            }
                        }
                        i = i
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407)
                            >> 7;
                    }
                }
            };
            s.spawn(storm(1));
            s.spawn(storm(2));
            std::thread::sleep(std::time::Duration::from_millis(2));
            if round % 2 == 0 {
                mm.munmap(hva, len).unwrap();
            } else {
                mm.exit();
            }
            stop.store(true, Ordering::Relaxed);
        });
        mm.exit();
    }
    assert_eq!(
        m.host_frames().stats().in_use,
        before,
        "frames leaked or freed twice"
    );
}

/// Range operations see every folio of a range however it falls across the
/// folio map's shards: ranges of one chunk, a few chunks, and more chunks
/// than there are shards (where several chunks share a shard), with folios
/// at chunk edges and a range starting inside a folio.
#[test]
fn range_operations_cover_every_shard_of_the_folio_map() {
    let m = big();
    let mm = ProcessMm::new(m.clone());
    let chunks = FOLIO_SHARDS as u64 * 2 + 3;
    let len = chunks << 21;
    let base = mm.mmap(len, VmaKind::Anonymous4K).unwrap();
    // The first and last 4K page of every 2M chunk.
    let mut resident = Vec::new();
    for c in 0..chunks {
        for off in [0, (2 << 20) - PAGE_SIZE] {
            let hva = base + (c << 21) + off;
            drop(mm.fault_in(hva, true).unwrap());
            resident.push(hva);
        }
    }
    let count = |lo: Hva, hi: Hva| {
        resident
            .iter()
            .filter(|h| h.0 >= lo.0 && h.0 < hi.0)
            .count()
    };
    // Every range's reclaim frees exactly the resident pages inside it.
    let ranges = [
        (base + PAGE_SIZE, 2 << 20),                          // inside one chunk
        (base + ((3 << 21) - PAGE_SIZE), 3 << 21),            // across 3 chunks
        (base + (10 << 21), (FOLIO_SHARDS as u64 + 5) << 21), // more chunks than shards
    ];
    for (start, n) in ranges {
        assert!(mm.test_age(start, start + n) || count(start, start + n) == 0);
        let want = resident
            .iter()
            .filter(|h| h.0 >= start.0 && h.0 < start.0 + n && mm.resident(**h).is_some())
            .count() as u64;
        assert_eq!(mm.reclaim(start, n), want, "reclaim of {start:?} + {n:#x}");
        for h in &resident {
            if h.0 >= start.0 && h.0 < start.0 + n {
                assert_eq!(mm.resident(*h), None, "{h:?} left resident");
            }
        }
    }
    // Aging clears every young folio, in every shard, exactly once.
    assert!(mm.age(base, base + len));
    assert!(!mm.test_age(base, base + len));
    assert!(!mm.age(base, base + len));
    mm.munmap(base, len).unwrap();
    // A range that starts inside a huge folio still covers it.
    let thp = mm.mmap(8 << 20, VmaKind::AnonymousThp).unwrap();
    drop(mm.fault_in(thp + (2 << 20), true).unwrap());
    assert_eq!(
        mm.resident(thp + (3 << 20)).map(|r| r.1),
        Some(PageSize::Size2M)
    );
    assert!(mm.test_age(thp + (3 << 20), thp + (5 << 20)));
    assert_eq!(mm.reclaim(thp + (3 << 20), 2 << 20), 512);
    assert_eq!(mm.resident(thp + (2 << 20)), None);
    mm.munmap(thp, 8 << 20).unwrap();
    assert_eq!(mm.stats().frames_allocated, mm.stats().frames_freed);
}

/// The per-thread VMA cache never outlives its VMA or address space: after
/// munmap the range faults as unmapped, after exit as exited, and another
/// address space on the same thread never uses the first one's VMA, even at
/// the same address.
#[test]
fn the_per_thread_vma_cache_follows_munmap_exit_and_address_spaces() {
    let m = small();
    let a = ProcessMm::new(m.clone());
    let b = ProcessMm::new(m.clone());
    let va = a.mmap(4 << 20, VmaKind::Anonymous4K).unwrap();
    let vb = b.mmap(4 << 20, VmaKind::Anonymous4K).unwrap();
    assert_eq!(va, vb, "both address spaces start at the same address");
    let pa = a.fault_in(va, true).unwrap(); // `a`'s VMA is now cached
    let pb = b.fault_in(vb, true).unwrap();
    assert_ne!(pa.pa(), pb.pa());
    assert_eq!(b.resident(vb).map(|r| r.0), Some(pb.pa()));
    assert_eq!(a.resident(va).map(|r| r.0), Some(pa.pa()));
    drop((pa, pb));
    drop(a.fault_in(va + PAGE_SIZE, true).unwrap());
    a.munmap(va, 4 << 20).unwrap();
    assert!(matches!(
        a.fault_in(va + 2 * PAGE_SIZE, true),
        Err(MmError::NoVma(_))
    ));
    let ro = a
        .mmap(2 << 20, VmaKind::ReadOnlyFile { file_id: 7 })
        .unwrap();
    drop(a.fault_in(ro, false).unwrap());
    // Cached, but a write to a read-only VMA is still refused.
    assert!(matches!(
        a.fault_in(ro + PAGE_SIZE, true),
        Err(MmError::ReadOnly(_))
    ));
    a.exit();
    assert!(matches!(a.fault_in(ro, false), Err(MmError::Exited)));
    b.exit();
    for s in [a.stats(), b.stats()] {
        assert_eq!(s.frames_allocated, s.frames_freed);
    }
}
