//! `pkvm sim dirty-log-perf` and `pkvm sim nested-demand-paging`: the
//! dirty-logging and nested-MMU workloads, shaped like KVM's selftests.

use anyhow::{bail, Result};
use pkvm_machine::demand_paging::Backing;
use pkvm_machine::dirty_log_perf::{self, Config, Report};
use pkvm_machine::nested_demand_paging;

use crate::{parse_size, BackingArg, CheckArg};

/// KVM's dirty_log_perf_test.
#[derive(clap::Args, Debug)]
pub struct DirtyLogPerfArgs {
    /// Number of vCPUs (1..=16).
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    vcpus: usize,
    /// Bytes of guest memory per vCPU (suffixes K, M, G).
    #[arg(short = 'b', long = "bytes", default_value = "256M", value_parser = parse_size)]
    bytes: u64,
    /// Backing of guest memory.
    #[arg(short = 's', long = "backing", value_enum, default_value_t = BackingArg::Anonymous)]
    backing: BackingArg,
    /// Iterations.
    #[arg(short = 'i', long = "iterations", default_value_t = 2)]
    iterations: u32,
    /// Manual protect with "initially all set" (KVM_CLEAR_DIRTY_LOG).
    #[arg(short = 'g', long = "manual-protect")]
    manual_protect: bool,
    /// Eager page splitting with this chunk size (4K, 2M or 1G; 0 = split
    /// on fault).
    #[arg(short = 'e', long = "eager-split", default_value = "0", value_parser = parse_chunk)]
    eager_split: u64,
    /// Percent of pages written per iteration (the rest are read).
    #[arg(short = 'w', long = "write-percent", default_value_t = 100)]
    write_percent: u32,
    /// Check every bitmap against the pages the guest wrote.
    #[arg(long)]
    verify: bool,
    /// Migrate and age guest pages (MMU notifiers) while the vCPUs run.
    #[arg(long)]
    notifier_storm: bool,
    /// Also run with splitting on fault and with eager splitting (2M
    /// chunks) side by side, and print the ratio of iteration 1's dirty
    /// memory times.
    #[arg(long)]
    compare_eager: bool,
    /// TLB coherence checking.
    #[arg(long, value_enum, default_value_t = CheckArg::EveryUse)]
    check: CheckArg,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_chunk(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let v = parse_size(s)?;
    if ![4096, 2 << 20, 1 << 30].contains(&v) {
        return Err(format!("`{s}`: the chunk size must be 0, 4K, 2M or 1G"));
    }
    Ok(v)
}

fn coherence(c: CheckArg) -> pkvm_machine::demand_paging::Coherence {
    use pkvm_machine::demand_paging::Coherence;
    match c {
        CheckArg::EveryUse => Coherence::EveryUse,
        CheckArg::Entry => Coherence::Entry,
        CheckArg::Off => Coherence::Off,
    }
}

pub(crate) fn backing(b: BackingArg) -> Backing {
    match b {
        BackingArg::Anonymous => Backing::Anonymous,
        BackingArg::AnonymousThp => Backing::AnonymousThp,
        BackingArg::Hugetlb2m => Backing::Hugetlb2M,
        BackingArg::Hugetlb1g => Backing::Hugetlb1G,
    }
}

fn print(r: &Report) {
    println!(
        "Testing dirty logging: {} vCPU(s), {} MiB each, {:?}, write {}%, manual protect {}, eager split chunk {:#x}",
        r.vcpus,
        r.bytes_per_vcpu >> 20,
        r.backing,
        r.write_percent,
        r.manual_protect,
        r.eager_split_chunk
    );
    println!("Populate memory time: {:.6}s", r.populate_seconds);
    println!("Enabling dirty logging time: {:.6}s", r.enable_seconds);
    for it in &r.iterations {
        println!(
            "Iteration {} dirty memory time: {:.6}s",
            it.n, it.dirty_memory_seconds
        );
        println!(
            "Iteration {} get dirty log time: {:.6}s",
            it.n, it.get_dirty_log_seconds
        );
        println!(
            "Iteration {} clear dirty log time: {:.6}s",
            it.n, it.clear_dirty_log_seconds
        );
        println!(
            "Iteration {}: {} pages written, {} reported dirty, {} missing, {} extra, {} faults",
            it.n, it.pages_written, it.pages_dirty, it.missing, it.extra, it.faults
        );
    }
    println!("Disabling dirty logging time: {:.6}s", r.disable_seconds);
    println!(
        "Bitmaps verified: {}; notifier events: {}; coherence violations: {}; frames leaked: {}",
        r.verified, r.storm_events, r.coherence_violations, r.frames_leaked
    );
}

fn ok(r: &Report) -> bool {
    r.coherence_violations == 0
        && r.frames_leaked == 0
        && r.iterations.iter().all(|i| i.missing == 0 && i.extra == 0)
}

/// Runs `pkvm sim dirty-log-perf`.
pub fn dirty_log_perf(a: DirtyLogPerfArgs) -> Result<bool> {
    let cfg = Config {
        vcpus: a.vcpus,
        bytes_per_vcpu: a.bytes,
        backing: backing(a.backing),
        iterations: a.iterations,
        manual_protect: a.manual_protect,
        eager_split_chunk: a.eager_split,
        write_percent: a.write_percent,
        verify: a.verify,
        notifier_storm: a.notifier_storm,
        coherence: coherence(a.check),
        seed: a.seed,
    };
    if !a.compare_eager {
        let r = dirty_log_perf::run(&cfg)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print(&r);
        }
        return Ok(ok(&r));
    }
    let on_fault = dirty_log_perf::run(&Config {
        eager_split_chunk: 0,
        ..cfg.clone()
    })?;
    let eager = dirty_log_perf::run(&Config {
        eager_split_chunk: if a.eager_split == 0 {
            2 << 20
        } else {
            a.eager_split
        },
        ..cfg
    })?;
    let t = |r: &Report| r.iterations.first().map_or(0.0, |i| i.dirty_memory_seconds);
    let ratio = t(&on_fault) / t(&eager).max(1e-9);
    if a.json {
        let v = serde_json::json!({
            "split_on_fault": on_fault,
            "eager_split": eager,
            "iteration_1_dirty_memory_ratio": ratio,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("== split on fault ==");
        print(&on_fault);
        println!("== eager split ==");
        print(&eager);
        println!(
            "Iteration 1 dirty memory time: split on fault {:.6}s, eager split {:.6}s: {ratio:.2}x lower",
            t(&on_fault),
            t(&eager)
        );
    }
    Ok(ok(&on_fault) && ok(&eager))
}

/// An L2 guest paging in through a shadow stage-2.
#[derive(clap::Args, Debug)]
pub struct NestedDemandPagingArgs {
    /// Bytes of L2 guest memory (suffixes K, M, G).
    #[arg(short = 'b', long = "bytes", default_value = "16M", value_parser = parse_size)]
    bytes: u64,
    /// Backing of L1 memory.
    #[arg(short = 's', long = "backing", value_enum, default_value_t = BackingArg::Anonymous)]
    backing: BackingArg,
    /// MMU-notifier invalidations of L1 memory while L2 runs.
    #[arg(long)]
    notifier_storm: bool,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `pkvm sim nested-demand-paging`.
pub fn nested(a: NestedDemandPagingArgs) -> Result<bool> {
    if a.bytes > 1 << 30 {
        bail!("--bytes: at most 1G of L2 memory");
    }
    let r = nested_demand_paging::run(&nested_demand_paging::Config {
        l2_bytes: a.bytes,
        backing: backing(a.backing),
        notifier_storm: a.notifier_storm,
        seed: a.seed,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "L2 memory: {} MiB; L2 guest time: {:.6}s ({:.0} pages/s)",
            r.l2_bytes >> 20,
            r.seconds,
            r.pages_per_sec
        );
        println!(
            "L2 stage-2 faults: {} (forwarded to the guest hypervisor: {}, retried: {}); shadow unmaps: {}",
            r.shadow_faults, r.forwarded, r.retries, r.shadow_unmaps
        );
        println!(
            "L2 read back what it wrote: {}; shadows created {}, freed {}; coherence violations: {}; frames leaked: {}",
            r.readback_ok, r.shadows_created, r.shadows_freed, r.coherence_violations, r.frames_leaked
        );
        println!(
            "Guest TLBI dropped the unmapped page from the shadow: {}; notifier dropped a migrated L1 page from the shadow: {}",
            r.guest_tlbi_ok, r.notifier_unmap_ok
        );
    }
    Ok(r.readback_ok
        && r.guest_tlbi_ok
        && r.notifier_unmap_ok
        && r.shadows_created == r.shadows_freed
        && r.coherence_violations == 0
        && r.frames_leaked == 0)
}

/// KVM's access_tracking_perf_test.
#[derive(clap::Args, Debug)]
pub struct AccessTrackingArgs {
    /// Number of vCPUs (1..=16).
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    vcpus: usize,
    /// Bytes of guest memory per vCPU (suffixes K, M, G).
    #[arg(short = 'b', long = "bytes", default_value = "64M", value_parser = parse_size)]
    bytes: u64,
    /// Backing of guest memory.
    #[arg(short = 's', long = "backing", value_enum, default_value_t = BackingArg::Anonymous)]
    backing: BackingArg,
    /// Iterations.
    #[arg(short = 'i', long = "iterations", default_value_t = 2)]
    iterations: u32,
    /// Percent of accesses that are writes.
    #[arg(short = 'w', long = "write-percent", default_value_t = 0)]
    write_percent: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `pkvm sim access-tracking`.
pub fn access_tracking(a: AccessTrackingArgs) -> Result<bool> {
    let r = pkvm_machine::access_tracking::run(&Config {
        vcpus: a.vcpus,
        bytes_per_vcpu: a.bytes,
        backing: backing(a.backing),
        iterations: a.iterations,
        write_percent: a.write_percent,
        ..Config::default()
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("Populating memory time: {:.6}s", r.populate_seconds);
        for it in &r.iterations {
            println!(
                "Iteration {}: mark memory idle: {:.6}s ({} of {} pages were young)",
                it.n, it.mark_idle_seconds, it.young_before, r.pages
            );
            println!(
                "Iteration {}: access memory: {:.6}s ({} access-flag faults)",
                it.n, it.access_seconds, it.access_flag_faults
            );
            println!(
                "Iteration {}: count young pages: {:.6}s ({} of {} young)",
                it.n, it.check_seconds, it.young_after, r.pages
            );
        }
        println!(
            "coherence violations: {}; frames leaked: {}",
            r.coherence_violations, r.frames_leaked
        );
    }
    Ok(r.coherence_violations == 0 && r.frames_leaked == 0)
}

/// KVM's memslot_perf_test.
#[derive(clap::Args, Debug)]
pub struct MemslotPerfArgs {
    /// Number of memslots.
    #[arg(short = 's', long = "slots", default_value_t = 32)]
    slots: u32,
    /// Bytes per memslot (suffixes K, M, G).
    #[arg(short = 'b', long = "slot-bytes", default_value = "2M", value_parser = parse_size)]
    slot_bytes: u64,
    /// Iterations of each test.
    #[arg(short = 'i', long = "iterations", default_value_t = 5)]
    iterations: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `pkvm sim memslot-perf`.
pub fn memslot_perf(a: MemslotPerfArgs) -> Result<bool> {
    let r = pkvm_machine::memslot_perf::run(&pkvm_machine::memslot_perf::Config {
        slots: a.slots,
        slot_bytes: a.slot_bytes,
        iterations: a.iterations,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("Memslots: {} of {} KiB", r.slots, r.slot_bytes >> 10);
        for t in &r.tests {
            println!(
                "Test {}: {} iterations, average {:.6}s per iteration ({} memslot changes)",
                t.name, t.iterations, t.average_seconds, t.slot_changes
            );
        }
        println!(
            "read back ok: {}; coherence violations: {}; frames leaked: {}",
            r.readback_ok, r.coherence_violations, r.frames_leaked
        );
    }
    Ok(r.readback_ok && r.coherence_violations == 0 && r.frames_leaked == 0)
}
