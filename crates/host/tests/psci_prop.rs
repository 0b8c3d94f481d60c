//! Property tests: AFFINITY_INFO and CPU_ON against a reference model of
//! MPIDR affinity fields.
#![cfg(not(loom))]

mod psci_common;

use pkvm_arch::smccc::psci as f;
use pkvm_host::psci::{handle_psci, Conduit, PowerState, PsciCaller, PsciConfig, PsciOutcome};
use pkvm_host::vcpu_state::GuestGprs;
use proptest::prelude::*;
use psci_common::TestVm;

/// Reference: vCPU `i`'s affinity fields [Aff0, Aff1, Aff2, Aff3].
fn fields(i: usize) -> [u64; 4] {
    [
        (i & 0xf) as u64,
        ((i >> 4) & 0xff) as u64,
        ((i >> 12) & 0xff) as u64,
        0,
    ]
}

/// Reference: MPIDR value -> fields, or None if bits outside the fields.
fn split(v: u64) -> Option<[u64; 4]> {
    let f = [
        v & 0xff,
        (v >> 8) & 0xff,
        (v >> 16) & 0xff,
        (v >> 32) & 0xff,
    ];
    let back = f[0] | f[1] << 8 | f[2] << 16 | f[3] << 32;
    (back == v).then_some(f)
}

fn affinity_info_model(n: usize, running: &[bool], target: u64, level: u64) -> i64 {
    let Some(t) = split(target) else { return -2 };
    if level > 3 || t[..level as usize].iter().any(|&x| x != 0) {
        return -2;
    }
    let l = level as usize;
    let matching: Vec<usize> = (0..n).filter(|&i| fields(i)[l..] == t[l..]).collect();
    if matching.is_empty() {
        -2
    } else if matching.iter().any(|&i| running[i]) {
        0
    } else {
        1
    }
}

/// A target value: mostly a real vCPU's affinity with low fields cleared,
/// sometimes an arbitrary value.
fn target() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0usize..48, 0usize..4).prop_map(|(i, clear)| {
            let fl = fields(i);
            let v = fl[0] | fl[1] << 8 | fl[2] << 16 | fl[3] << 32;
            v & !((1u64 << (8 * clear)) - 1)
        }),
        1 => any::<u64>(),
        1 => (0u64..4, 0u64..0x300).prop_map(|(b, v)| v | (b << 32)),
    ]
}

fn setup(running: &[bool]) -> TestVm {
    let on: Vec<usize> = (0..running.len()).filter(|&i| running[i]).collect();
    TestVm::with_running(PsciConfig::default(), running.len(), &on)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn affinity_info_matches_the_reference_model(
        running in proptest::collection::vec(any::<bool>(), 1..40),
        target in target(),
        level in prop_oneof![4 => 0u64..4, 1 => any::<u64>()],
        smc32 in any::<bool>(),
    ) {
        let vm = setup(&running);
        let mut regs = GuestGprs::default();
        let fid = if smc32 { f::AFFINITY_INFO_32 } else { f::AFFINITY_INFO_64 };
        regs.x[..3].copy_from_slice(&[u64::from(fid), target, level]);
        let out = handle_psci(&vm, &PsciCaller::new(0, Conduit::Hvc), &mut regs).unwrap();
        prop_assert_eq!(out, PsciOutcome::Continue);
        let (t, l) = if smc32 { (target & 0xffff_ffff, level & 0xffff_ffff) } else { (target, level) };
        prop_assert_eq!(regs.x[0] as i64, affinity_info_model(running.len(), &running, t, l));
    }

    #[test]
    fn cpu_on_matches_the_reference_model(
        running in proptest::collection::vec(any::<bool>(), 1..40),
        target in target(),
    ) {
        let vm = setup(&running);
        let mut regs = GuestGprs::default();
        regs.x[..4].copy_from_slice(&[u64::from(f::CPU_ON_64), target, 0x1000, 7]);
        let _ = handle_psci(&vm, &PsciCaller::new(0, Conduit::Hvc), &mut regs).unwrap();
        let idx = split(target).and_then(|t| (0..running.len()).find(|&i| fields(i) == t));
        let want = match idx {
            None => -2,
            Some(i) if running[i] => -4,
            Some(_) => 0,
        };
        prop_assert_eq!(regs.x[0] as i64, want);
        for (i, &was_on) in running.iter().enumerate() {
            let on = vm.state(i) == PowerState::Running;
            prop_assert_eq!(on, was_on || idx == Some(i));
        }
    }
}
