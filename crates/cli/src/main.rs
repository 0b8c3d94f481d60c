//! `pkvm`: run pkvm-rs workloads on the simulated machine.
//!
//! `pkvm sim demand-paging` mirrors KVM's `demand_paging_test`: N vCPUs
//! each touch every page of their memory once, faulting it in through the
//! host's fault pipeline (standard mode) or the hypervisor's share/donate
//! hypercalls (protected mode).
#![forbid(unsafe_code)]

mod bench;
mod hostmem;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use pkvm_machine::demand_paging::{self, Backing, Config, Report};
use pkvm_machine::Mode;

mod mmu_workloads;

/// pkvm-rs: a KVM/arm64-style hypervisor with protected VMs. This command
/// runs workloads on the simulated machine (the real image runs under QEMU
/// through `cargo xtask run`).
#[derive(Parser, Debug)]
#[command(name = "pkvm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Workloads on the simulated machine.
    Sim {
        #[command(subcommand)]
        workload: SimWorkload,
    },
    /// Benchmarks: a demand-paging matrix over backings and system modes,
    /// printed as one table (the page-table, hypervisor and simulator
    /// micro-benchmarks are `cargo bench -p pkvm-pgtable|pkvm-hyp|pkvm-sim`).
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum SimWorkload {
    /// KVM's demand_paging_test: every vCPU touches each page of its
    /// memory once; prints total guest time and pages/second.
    DemandPaging(DemandPagingArgs),
    /// KVM's dirty_log_perf_test: populate, enable dirty logging, then
    /// iterations of dirtying memory and getting/clearing the dirty log.
    DirtyLogPerf(mmu_workloads::DirtyLogPerfArgs),
    /// An L2 guest paging in through a shadow stage-2 built from its guest
    /// hypervisor's tables.
    NestedDemandPaging(mmu_workloads::NestedDemandPagingArgs),
    /// KVM's access_tracking_perf_test: mark guest memory idle through
    /// the age notifier, access it, count the young pages.
    AccessTracking(mmu_workloads::AccessTrackingArgs),
    /// KVM's memslot_perf_test: map, unmap, move inactive/active slots, rw.
    MemslotPerf(mmu_workloads::MemslotPerfArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackingArg {
    /// Anonymous memory, 4K pages.
    Anonymous,
    /// Anonymous memory with transparent huge pages.
    #[value(name = "anonymous_thp")]
    AnonymousThp,
    /// hugetlbfs 2M pages (KVM selftests: anonymous_hugetlb_2mb).
    #[value(name = "hugetlb_2m", alias = "anonymous_hugetlb_2mb")]
    Hugetlb2m,
    /// hugetlbfs 1G pages (KVM selftests: anonymous_hugetlb_1gb).
    #[value(name = "hugetlb_1g", alias = "anonymous_hugetlb_1gb")]
    Hugetlb1g,
}

impl From<BackingArg> for Backing {
    fn from(b: BackingArg) -> Backing {
        match b {
            BackingArg::Anonymous => Backing::Anonymous,
            BackingArg::AnonymousThp => Backing::AnonymousThp,
            BackingArg::Hugetlb2m => Backing::Hugetlb2M,
            BackingArg::Hugetlb1g => Backing::Hugetlb1G,
        }
    }
}

impl From<CheckArg> for demand_paging::Coherence {
    fn from(c: CheckArg) -> demand_paging::Coherence {
        match c {
            CheckArg::EveryUse => demand_paging::Coherence::EveryUse,
            CheckArg::Entry => demand_paging::Coherence::Entry,
            CheckArg::Off => demand_paging::Coherence::Off,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// The host manages guest stage-2 (KVM's default).
    Standard,
    /// pKVM: the hypervisor owns guest stage-2; the host shares or donates
    /// pages by hypercall.
    Protected,
}

#[derive(clap::Args, Debug)]
struct DemandPagingArgs {
    /// Number of vCPUs (1..=16).
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    vcpus: usize,
    /// Bytes of guest memory per vCPU (suffixes K, M, G).
    #[arg(short = 'b', long = "bytes", default_value = "1G", value_parser = parse_size)]
    bytes: u64,
    /// Backing of guest memory.
    #[arg(short = 's', long = "backing", value_enum, default_value_t = BackingArg::Anonymous)]
    backing: BackingArg,
    /// All vCPUs touch the same memory (instead of one partition each).
    #[arg(short = 'o', long = "overlap")]
    overlap: bool,
    /// System mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Standard)]
    mode: ModeArg,
    /// With --mode protected: run a protected VM (memory donated to the
    /// guest, unreachable by the host) instead of sharing.
    #[arg(long)]
    protected_vm: bool,
    /// vCPU 0 starts the other vCPUs with PSCI CPU_ON before they touch
    /// memory, as a real guest boots.
    #[arg(long)]
    psci_boot: bool,
    /// Seed for the guest programs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// TLB coherence checking: `every-use` re-walks the tables on every
    /// TLB hit and scans at guest entry; `entry` only scans at guest entry;
    /// `off` measures the raw fault path.
    #[arg(long, value_enum, default_value_t = CheckArg::EveryUse)]
    check: CheckArg,
    /// Do not back the simulated RAM before the run (then the host
    /// kernel's first-touch faults are part of the measurement).
    #[arg(long)]
    no_prefault: bool,
    /// The guest checks every value it reads back against what it wrote
    /// (costs simulator bookkeeping per write).
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Run even if the host seems to have too little memory available
    /// (the check reads MemAvailable in /proc/meminfo).
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CheckArg {
    /// Check every TLB hit and every guest entry.
    EveryUse,
    /// Check at guest entry only.
    Entry,
    /// No checking (raw speed).
    Off,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 4096, 64M, 1G)"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if v == 0 || !v.is_multiple_of(4096) {
        return Err(format!("`{s}` must be a non-zero multiple of 4K"));
    }
    Ok(v)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

/// The run configuration `a` asks for, reporting progress to `progress`.
///
/// # Errors
/// Contradictory or out-of-range options.
fn config_of(a: &DemandPagingArgs, progress: Arc<AtomicU64>) -> Result<Config> {
    if a.vcpus == 0 || a.vcpus > 16 {
        bail!("--vcpus must be 1..=16 (got {})", a.vcpus);
    }
    let mode = match a.mode {
        ModeArg::Standard => Mode::Standard,
        ModeArg::Protected => Mode::Protected,
    };
    if a.protected_vm && mode != Mode::Protected {
        bail!("--protected-vm needs --mode protected");
    }
    let backing = Backing::from(a.backing);
    Ok(Config {
        vcpus: a.vcpus,
        bytes_per_vcpu: a.bytes,
        backing,
        overlap: a.overlap,
        mode,
        protected_vm: a.protected_vm,
        psci_boot: a.psci_boot,
        seed: a.seed,
        progress: Some(progress),
        coherence: a.check.into(),
        prefault: !a.no_prefault,
        verify: a.verify,
    })
}

/// Checks that the host can hold the run (sizes checked first: bytes x
/// vCPUs must not wrap) before anything is allocated; returns the pages
/// the vCPUs touch in all.
///
/// # Errors
/// Sizes that overflow or do not fit, or too little host memory without
/// `--force`.
fn check_sizes(a: &DemandPagingArgs, cfg: &Config) -> Result<u64> {
    let guest = demand_paging::guest_bytes(cfg)?;
    let needed = demand_paging::host_memory_needed(cfg)?;
    let what = if a.overlap || a.vcpus == 1 {
        format!("guest memory {}", human(guest))
    } else {
        format!("guest memory {} x {} vCPUs", human(a.bytes), a.vcpus)
    };
    hostmem::check(needed, hostmem::available(), a.force, &what)?;
    Ok(if a.overlap {
        (a.bytes / 4096).saturating_mul(a.vcpus as u64)
    } else {
        guest / 4096
    })
}

/// A progress bar on stderr over `total` pages until `done`.
fn progress_bar(
    total: u64,
    progress: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} pages ({per_sec})",
            )
            .expect("valid template"),
        );
        while !done.load(Ordering::Relaxed) {
            bar.set_position(progress.load(Ordering::Relaxed).min(total));
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
    })
}

fn demand_paging(a: DemandPagingArgs) -> Result<bool> {
    let progress = Arc::new(AtomicU64::new(0));
    let cfg = config_of(&a, progress.clone())?;
    let total_pages = check_sizes(&a, &cfg)?;
    let done = Arc::new(AtomicBool::new(false));
    let bar_thread = (!a.json && std::io::stderr().is_terminal())
        .then(|| progress_bar(total_pages, progress, done.clone()));
    let result = demand_paging::run(&cfg);
    done.store(true, Ordering::Relaxed);
    if let Some(t) = bar_thread {
        let _ = t.join();
    }
    let r = result.context("demand-paging run failed")?;
    if a.json {
        let out = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "args": args_json(&a),
            "report": r,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_report(&r);
    }
    Ok(r.coherence_violations == 0 && r.frames_leaked == 0 && r.hyp_pages_leaked == 0)
}

/// Every flag of a demand-paging run, spelled as on the command line.
fn args_json(a: &DemandPagingArgs) -> serde_json::Value {
    fn name(v: impl ValueEnum) -> Option<String> {
        v.to_possible_value().map(|p| p.get_name().to_string())
    }
    serde_json::json!({
        "vcpus": a.vcpus,
        "bytes": a.bytes,
        "backing": name(a.backing),
        "overlap": a.overlap,
        "mode": name(a.mode),
        "protected_vm": a.protected_vm,
        "psci_boot": a.psci_boot,
        "seed": a.seed,
        "check": name(a.check),
        "no_prefault": a.no_prefault,
        "verify": a.verify,
        "force": a.force,
    })
}

fn print_report(r: &Report) {
    println!(
        "demand-paging: {} vCPU(s) x {}, backing {:?}, {}, mode {:?}{}",
        r.vcpus,
        human(r.bytes_per_vcpu),
        r.backing,
        if r.overlap {
            "overlapping"
        } else {
            "partitioned"
        },
        r.mode,
        if r.protected_vm {
            " (protected VM)"
        } else {
            ""
        }
    );
    for v in &r.per_vcpu {
        println!(
            "  vCPU {:>2}: {} pages in {:.3} s: {:.0} pages/s (exits to VMM: {} preempt, {} sleep)",
            v.index, v.pages, v.seconds, v.pages_per_sec, v.exits.interrupted, v.exits.sleep
        );
    }
    // The closing lines of KVM's demand_paging_test, spelled the same.
    let per_vcpu = r.per_vcpu.iter().map(|v| v.pages_per_sec).sum::<f64>() / r.vcpus.max(1) as f64;
    println!("Total guest execution time:\t{:.9}s", r.total_seconds);
    println!("Per-vcpu demand paging rate:\t{per_vcpu:.6} pgs/sec/vcpu");
    println!(
        "Overall demand paging rate:\t{:.6} pgs/sec",
        r.overall_pages_per_sec
    );
    let f = &r.faults;
    println!(
        "faults: translation {}, permission {}, access-flag {}, retried {}; mappings 4K {}, 2M {}, 1G {}",
        f.translation, f.permission, f.access_flag, f.retries, f.maps_4k, f.maps_2m, f.maps_1g
    );
    if r.hypercalls > 0 {
        println!("hypercalls: {}", r.hypercalls);
    }
    let coherence = if r.coherence == "off" {
        format!(
            "TLB coherence violations {} (--check off: one full scan at the end only)",
            r.coherence_violations
        )
    } else {
        format!(
            "TLB coherence violations {} (checker: {}; --check off measures the raw fault path)",
            r.coherence_violations, r.coherence
        )
    };
    println!(
        "checks: {coherence}, host frames leaked {}, hyp VM pages leaked {}",
        r.frames_leaked, r.hyp_pages_leaked
    );
}

/// A reader that closes the pipe early (`pkvm ... | head`) ends the
/// command quietly, as a SIGPIPE would, instead of a panic report.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.contains("failed printing to stdout") && m.contains("Broken pipe"))
        {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Sim {
            workload: SimWorkload::DemandPaging(a),
        } => demand_paging(a),
        Command::Sim {
            workload: SimWorkload::DirtyLogPerf(a),
        } => mmu_workloads::dirty_log_perf(a),
        Command::Sim {
            workload: SimWorkload::NestedDemandPaging(a),
        } => mmu_workloads::nested(a),
        Command::Sim {
            workload: SimWorkload::AccessTracking(a),
        } => mmu_workloads::access_tracking(a),
        Command::Sim {
            workload: SimWorkload::MemslotPerf(a),
        } => mmu_workloads::memslot_perf(a),
        Command::Bench(a) => bench::bench(a),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("pkvm: checks failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pkvm: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_reject_garbage() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("1000").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
