//! KVM's `access_tracking_perf_test` on the simulated platform: populate
//! guest memory, then each iteration marks every page idle through the
//! MMU notifier's age callback (clearing the stage-2 access flags), lets
//! the vCPUs access their memory, and counts the pages that became young
//! again (test-age, without clearing).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use pkvm_arch::{Hva, PAGE_SIZE};

use crate::demand_paging::RunFailure;
use crate::dirty_log_perf::{self, Config, Round};

/// One iteration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Iteration {
    /// 1-based.
    pub n: u32,
    /// Time to mark every page idle.
    pub mark_idle_seconds: f64,
    /// Pages that were young when marked idle.
    pub young_before: u64,
    /// Slowest vCPU's time to access its memory.
    pub access_seconds: f64,
    /// Time to count young pages.
    pub check_seconds: f64,
    /// Pages young after the access (the vCPUs accessed every page; a page
    /// whose translation stayed in a TLB can be missed, as on hardware).
    pub young_after: u64,
    /// Access-flag faults during the access.
    pub access_flag_faults: u64,
}

/// Results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// vCPUs.
    pub vcpus: usize,
    /// Bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// Guest pages.
    pub pages: u64,
    /// Populate time.
    pub populate_seconds: f64,
    /// Per iteration.
    pub iterations: Vec<Iteration>,
    /// Coherence violations (must be 0).
    pub coherence_violations: usize,
    /// Host frames not returned (must be 0).
    pub frames_leaked: i64,
}

/// Ages (or tests) every page; returns the young ones.
fn sweep(mm: &pkvm_sim::mm::ProcessMm, hva: Hva, bytes: u64, clear: bool) -> u64 {
    (0..bytes / PAGE_SIZE)
        .filter(|p| {
            let s = Hva(hva.0 + p * PAGE_SIZE);
            let e = Hva(s.0 + PAGE_SIZE);
            if clear {
                mm.age(s, e)
            } else {
                mm.test_age(s, e)
            }
        })
        .count() as u64
}

/// Runs the workload (`cfg.write_percent` of the accesses are writes).
///
/// # Errors
/// See [`RunFailure`].
pub fn run(cfg: &Config) -> Result<Report, RunFailure> {
    let b = dirty_log_perf::build(cfg)?;
    let written: Arc<Vec<AtomicU64>> = Arc::new(
        (0..(b.bytes / PAGE_SIZE).div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let round = Round::new(cfg.vcpus);
    let r = std::thread::scope(|scope| {
        for i in 0..cfg.vcpus {
            let (b, round, written) = (&b, &round, &written);
            scope.spawn(move || dirty_log_perf::vcpu_thread(b, cfg, i, round, written));
        }
        let r = (|| -> Result<(f64, Vec<Iteration>), RunFailure> {
            let populate = dirty_log_perf::one_round(&round, 0)?;
            let mut its = Vec::new();
            for n in 1..=cfg.iterations {
                let t = Instant::now();
                let young_before = sweep(&b.mm, b.hva, b.bytes, true);
                let mark_idle_seconds = t.elapsed().as_secs_f64();
                let af0 = b.vm.stats().snapshot().access_flag_faults;
                let access_seconds = dirty_log_perf::one_round(&round, n)?;
                let access_flag_faults = b.vm.stats().snapshot().access_flag_faults - af0;
                let t = Instant::now();
                let young_after = sweep(&b.mm, b.hva, b.bytes, false);
                its.push(Iteration {
                    n,
                    mark_idle_seconds,
                    young_before,
                    access_seconds,
                    check_seconds: t.elapsed().as_secs_f64(),
                    young_after,
                    access_flag_faults,
                });
            }
            Ok((populate, its))
        })();
        round.stop();
        r
    });
    let pages = b.bytes / PAGE_SIZE;
    let (populate_seconds, iterations) = r?;
    let (coherence_violations, frames_leaked) = dirty_log_perf::teardown(b);
    Ok(Report {
        vcpus: cfg.vcpus,
        bytes_per_vcpu: cfg.bytes_per_vcpu,
        pages,
        populate_seconds,
        iterations,
        coherence_violations,
        frames_leaked,
    })
}
