//! Nested virtualization's memory side: an L2 guest pages in through a
//! shadow stage-2 built from its guest hypervisor's tables in L1 memory.

use pkvm_machine::demand_paging::Backing;
use pkvm_machine::nested_demand_paging::{run, Config, Report};

fn nested(backing: Backing, storm: bool) -> Report {
    let r = run(&Config {
        l2_bytes: 4 << 20,
        backing,
        notifier_storm: storm,
        seed: 3,
    })
    .unwrap_or_else(|e| panic!("{backing:?}: {e}"));
    assert!(r.readback_ok, "L2 read a value it did not write: {r:?}");
    assert_eq!(r.forwarded, 1024, "L1 filled its tables once per L2 page");
    assert_eq!(r.coherence_violations, 0, "{r:?}");
    assert_eq!(r.frames_leaked, 0, "{r:?}");
    assert_eq!(r.shadows_created, 1);
    assert_eq!(
        r.shadows_freed, r.shadows_created,
        "a shadow outlived teardown"
    );
    r
}

#[test]
fn l2_reads_back_what_it_wrote_and_teardown_frees_every_shadow() {
    for backing in [
        Backing::Anonymous,
        Backing::AnonymousThp,
        Backing::Hugetlb2M,
    ] {
        nested(backing, false);
    }
}

#[test]
fn l2_reads_back_what_it_wrote_under_a_notifier_storm() {
    let r = nested(Backing::Anonymous, true);
    assert!(r.shadow_unmaps > 0);
}

#[test]
fn guest_tlbi_and_mmu_notifiers_unmap_the_shadow() {
    let r = nested(Backing::Anonymous, false);
    assert!(
        r.guest_tlbi_ok,
        "a page the guest hypervisor unmapped stayed in the shadow"
    );
    assert!(
        r.notifier_unmap_ok,
        "a shadow still maps an L1 page the host migrated away"
    );
}
