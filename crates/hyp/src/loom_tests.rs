//! Loom models of the VM table's lifecycle under the real `SpinLock`
//! (`RUSTFLAGS="--cfg loom" cargo test -p pkvm-hyp --release --lib loom`).

use loom::sync::Arc;
use loom::thread;
use pkvm_sync::{LockClass, SpinLock};

use crate::vm::{Slot, VmTable};
use crate::HypError;

type Table = SpinLock<VmTable<2>>;

/// One CPU reserves and initialises a VM (two separate hypercalls, so two
/// lock holds) while a hostile host on another CPU tries to unreserve and
/// tear down the handle it expects. Lookups never see the reserved slot,
/// teardown only applies to a published VM, and init fails cleanly (keeping
/// nothing) if the reservation was withdrawn.
#[test]
fn loom_reserve_and_init_race_teardown() {
    loom::model(|| {
        let t: Arc<Table> = Arc::new(SpinLock::new(VmTable::new(), LockClass::HypVmTable));
        let t1 = t.clone();
        let creator = thread::spawn(move || {
            let h = t1.lock().reserve().expect("table has room");
            let mut g = t1.lock();
            let init = g.reserved_index(h as u64).map(|idx| g.publish(idx, 1));
            (h, init)
        });
        let unreserved = t.lock().unreserve(0x1000);
        let teardown = t.lock().start_teardown(0x1000);
        let (h, init) = creator.join().unwrap();
        assert_eq!(h, 0x1000, "first free slot");
        match (&init, &unreserved) {
            (Ok(()), Err(HypError::NotReserved { .. })) => {}
            (Err(HypError::NotReserved { .. }), Ok(())) => {}
            other => panic!("init and unreserve both won or both lost: {other:?}"),
        }
        let g = t.lock();
        match (init, teardown) {
            (Ok(()), Ok(_)) => assert!(matches!(g.slot(0), Slot::Live(l) if l.dying)),
            (Ok(()), Err(HypError::NoSuchVm { .. })) => {
                assert!(matches!(g.slot(0), Slot::Live(l) if !l.dying))
            }
            (Err(_), Err(HypError::NoSuchVm { .. })) => assert_eq!(g.slot(0), Slot::Free),
            other => panic!("unexpected outcome {other:?}"),
        }
    });
}

/// Two CPUs load the same vCPU: at most one holds it at a time, the load
/// holds a VM reference, and teardown is refused while it is loaded.
#[test]
fn loom_two_cpus_load_the_same_vcpu() {
    loom::model(|| {
        let mut tbl = VmTable::<1>::new();
        let h = tbl.reserve().unwrap() as u64;
        tbl.publish(0, 1);
        tbl.mark_vcpu_init(0, 0);
        let t = Arc::new(SpinLock::new(tbl, LockClass::HypVmTable));
        let cpu = |t: Arc<SpinLock<VmTable<1>>>, c: usize| {
            move || {
                let loaded = {
                    let mut g = t.lock();
                    match g.load(c, h, 0) {
                        Ok(_) => {
                            let l = *g.live(0).unwrap();
                            assert_eq!(l.loaded[0], c as u8 + 1);
                            assert_eq!(l.refs, 1, "one load, one reference");
                            true
                        }
                        Err(HypError::VcpuLoaded { .. }) => false,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                };
                if loaded {
                    assert!(matches!(
                        t.lock().start_teardown(h),
                        Err(HypError::VmBusy { .. })
                    ));
                    t.lock().put_vcpu(c).unwrap();
                }
                loaded
            }
        };
        let other = thread::spawn(cpu(t.clone(), 1));
        let mine = cpu(t.clone(), 0)();
        let theirs = other.join().unwrap();
        assert!(mine || theirs, "someone loads the vCPU");
        let g = t.lock();
        let l = g.live(0).unwrap();
        assert_eq!((l.refs, l.loaded[0]), (0, 0));
    });
}
