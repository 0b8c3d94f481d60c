//! memslot_perf: slots deleted, re-created and moved (also under a running
//! guest) lose nothing and leave no stale translation.

use pkvm_machine::memslot_perf::{run, Config};

#[test]
fn slot_churn_under_a_running_guest_keeps_memory_coherent() {
    let r = run(&Config {
        slots: 8,
        slot_bytes: 256 << 10,
        iterations: 2,
    })
    .unwrap();
    assert!(r.readback_ok, "the guest read a value it did not write");
    assert_eq!(r.coherence_violations, 0);
    assert_eq!(r.frames_leaked, 0);
    let names: Vec<_> = r.tests.iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        ["map", "unmap", "move inactive", "move active", "rw"]
    );
    assert_eq!(r.tests[1].slot_changes, 2 * 8 * 2);
    assert!(r.tests[2].slot_changes > 0 && r.tests[3].slot_changes > 0);
}
