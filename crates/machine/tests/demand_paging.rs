//! End-to-end demand paging on the simulated machine, both system modes.

use pkvm_machine::demand_paging::{run, Backing, Config};
use pkvm_machine::Mode;

const MB: u64 = 1 << 20;

fn check(cfg: Config, want_faults: u64, want_size_counts: (u64, u64, u64)) {
    let r = run(&cfg).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    assert_eq!(r.coherence_violations, 0, "coherence violations");
    assert_eq!(r.frames_leaked, 0, "host frames leaked");
    assert_eq!(r.hyp_pages_leaked, 0, "hyp pool pages leaked");
    assert_eq!(r.faults.translation, want_faults, "{:?}", r.faults);
    assert_eq!(
        (r.faults.maps_4k, r.faults.maps_2m, r.faults.maps_1g),
        want_size_counts,
        "{:?}",
        r.faults
    );
    let pages: u64 = r.per_vcpu.iter().map(|v| v.pages).sum();
    assert_eq!(pages, cfg.bytes_per_vcpu / 4096 * cfg.vcpus as u64);
}

#[test]
fn standard_anonymous_faults_once_per_page() {
    check(
        Config {
            bytes_per_vcpu: 64 * MB,
            ..Config::default()
        },
        16384,
        (16384, 0, 0),
    );
}

#[test]
fn standard_thp_faults_once_per_2m() {
    check(
        Config {
            bytes_per_vcpu: 64 * MB,
            backing: Backing::AnonymousThp,
            ..Config::default()
        },
        32,
        (0, 32, 0),
    );
}

#[test]
fn standard_hugetlb_1g_faults_once() {
    check(
        Config {
            bytes_per_vcpu: 1 << 30,
            backing: Backing::Hugetlb1G,
            ..Config::default()
        },
        1,
        (0, 0, 1),
    );
}

#[test]
fn standard_two_vcpus_partitioned() {
    check(
        Config {
            vcpus: 2,
            bytes_per_vcpu: 16 * MB,
            ..Config::default()
        },
        8192,
        (8192, 0, 0),
    );
}

#[test]
fn protected_shared_anonymous_faults_once_per_page() {
    check(
        Config {
            bytes_per_vcpu: 16 * MB,
            mode: Mode::Protected,
            ..Config::default()
        },
        4096,
        (4096, 0, 0),
    );
}

#[test]
fn protected_vm_donated_thp_faults_once_per_2m() {
    check(
        Config {
            bytes_per_vcpu: 16 * MB,
            backing: Backing::AnonymousThp,
            mode: Mode::Protected,
            protected_vm: true,
            ..Config::default()
        },
        8,
        (0, 8, 0),
    );
}

#[test]
fn psci_boot_brings_up_secondaries_before_they_touch_memory() {
    check(
        Config {
            vcpus: 3,
            bytes_per_vcpu: 4 * MB,
            psci_boot: true,
            ..Config::default()
        },
        3072,
        (3072, 0, 0),
    );
}
