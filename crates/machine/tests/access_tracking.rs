//! Idle-page tracking through the MMU notifier's age callback.

use pkvm_machine::access_tracking::run;
use pkvm_machine::demand_paging::Backing;
use pkvm_machine::dirty_log_perf::Config;

#[test]
fn marking_idle_clears_access_flags_and_accesses_set_them_again() {
    for backing in [Backing::Anonymous, Backing::AnonymousThp] {
        let r = run(&Config {
            vcpus: 2,
            bytes_per_vcpu: 2 << 20,
            backing,
            iterations: 2,
            write_percent: 0,
            ..Config::default()
        })
        .unwrap();
        assert_eq!(r.coherence_violations, 0);
        assert_eq!(r.frames_leaked, 0);
        let first = &r.iterations[0];
        // Aging is per stage-2 entry: a 2M block turns idle with the first
        // page aged, so THP counts one young page per block.
        let entries = match backing {
            Backing::Anonymous => r.pages,
            _ => r.pages / 512,
        };
        assert_eq!(
            first.young_before, entries,
            "{backing:?}: populated pages are young"
        );
        for it in &r.iterations {
            assert!(
                it.access_flag_faults > 0,
                "{backing:?}: idle pages took no AF fault"
            );
            assert!(it.young_after > 0 && it.young_after <= r.pages);
        }
        // With pages, marking idle finds exactly what the count saw.
        if backing == Backing::Anonymous {
            assert_eq!(r.iterations[1].young_before, r.iterations[0].young_after);
        }
    }
}
