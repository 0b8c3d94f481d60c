//! `cargo xtask`: build, test and run orchestration for pkvm-rs.
//!
//! - `cargo xtask test` runs every test tier (fmt, clippy, host tests, loom,
//!   the EL2 image build + clippy, QEMU integration tests) and ends with the
//!   line `xtask: N passed, M failed` (N, M count tiers); the exit status is
//!   non-zero if any tier failed.
//! - `cargo xtask run [--guest FILE [--initrd FILE] [--protected]] [--append ARGS] [--smp N] [--mem MIB]
//!   [--cpus N] [--scenario NAME] [--timeout SECS] [--host-el2]`
//!   checks its arguments and the guest file, checks and installs
//!   prerequisites, builds the guest payloads and the EL2 image, boots it
//!   under QEMU, streams the console, prints a one-line verdict
//!   (`xtask: verdict: ...`: the guest powered off, or why it failed: a
//!   hypervisor panic, an EL2 exception, a vCPU's internal error, a VM
//!   that did not power off) and exits 0 only on success (non-zero, with
//!   a message, if `--timeout` killed QEMU).
//!
//! The EL2 image (`crates/boot`) is its own cargo workspace for
//! `aarch64-unknown-none`; xtask builds it with cargo run from that
//! directory (so its `.cargo/config.toml` applies) into
//! `<target dir>/boot`.
#![forbid(unsafe_code)]

mod asm;
mod elf;
mod image;
mod initramfs;
mod latency;
mod linux;
mod prereq;
mod qemu;
mod tiers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "pkvm-rs build/test/run orchestration")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every test tier and print `xtask: N passed, M failed`.
    Test {
        /// Run only the tiers whose name contains this string (e.g. `qemu`).
        #[arg(long)]
        only: Option<String>,
        /// Print the full QEMU console of passing tests too.
        #[arg(long)]
        verbose: bool,
        /// Keep the VMM at EL2 next to the hypervisor in every QEMU tier
        /// (handoff flags bit 2; the legacy layout, for comparisons; by
        /// default the VMM runs at EL1).
        #[arg(long)]
        host_el2: bool,
    },
    /// Build the guests and the EL2 image and boot it under QEMU.
    Run(RunArgs),
    /// Build the guests and the EL2 image only; print the image path.
    Build,
    /// Run the interrupt guest under pkvm-rs and bare on QEMU's own
    /// GICv3; print SGI round-trip and timer-wakeup medians and ratios.
    IrqLatency,
    /// Boot Debian's kernel with the test initramfs to `/init` under
    /// bare QEMU and under pkvm-rs, `--repeat` times each; print the
    /// times and the median ratio (what `qemu:linux-initramfs` measures
    /// once).
    BootRatio {
        /// Pairs of boots.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Boot without SVE (by default the guest is offered SVE at the
        /// host's largest vector length, as in `qemu:linux-initramfs`).
        #[arg(long)]
        no_sve: bool,
        /// Keep the VMM at EL2 (handoff flags bit 2; the legacy layout).
        #[arg(long)]
        host_el2: bool,
    },
    /// Write the test initramfs (newc cpio: a static arm64 busybox and an
    /// `/init` that checks nproc, timer interrupts and `sleep 1`, then
    /// powers off; `pkvm.shell` on the command line leaves a shell).
    Initramfs {
        /// The static arm64 busybox binary.
        #[arg(long)]
        busybox: PathBuf,
        /// The archive to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Options of `cargo xtask run`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RunArgs {
    /// A raw arm64 kernel image (Linux `Image`) or flat binary to run as a
    /// VM: a non-empty regular file, checked (with its `Image` header)
    /// before QEMU starts.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// An initrd / initramfs for the `--guest` kernel: loaded into guest
    /// RAM after the kernel, announced in `/chosen` (`linux,initrd-start`,
    /// `linux,initrd-end`); checked against `--mem` before QEMU starts.
    #[arg(long, requires = "guest")]
    pub initrd: Option<PathBuf>,
    /// Run the `--guest` as a protected VM (the image in protected mode:
    /// pkvm-hyp owns the guest's memory, donated on fault).
    #[arg(long, requires = "guest")]
    pub protected: bool,
    /// Offer SVE to the `--guest` with a maximum vector length of BYTES (a
    /// power of two in 16..=256; without a value, the host CPU's largest).
    /// Off by default.
    #[arg(long, requires = "guest", value_name = "BYTES", num_args = 0..=1)]
    pub sve: Option<Option<u32>>,
    /// The guest's kernel command line (`/chosen/bootargs`).
    #[arg(long)]
    pub append: Option<String>,
    /// Number of vCPUs of the external guest (or of the `sched-*`
    /// scenarios' guest, or of each `reset*` scenario VM), whatever
    /// `--cpus` is (the image schedules vCPUs on the physical CPUs).
    /// Default: the scenario's (1 for `--guest`).
    #[arg(long)]
    pub smp: Option<u32>,
    /// Physical CPUs QEMU emulates (`-smp`), 1..=8.
    #[arg(long, default_value_t = qemu::DEFAULT_HOST_CPUS)]
    pub cpus: u32,
    /// Memory of the external guest in MiB (4..=512, even).
    #[arg(long, default_value_t = 128)]
    pub mem: u32,
    /// Image scenario to run instead of the demo; ignored with `--guest`.
    #[arg(long, value_enum)]
    pub scenario: Option<qemu::Scenario>,
    /// Kill QEMU and fail after this many seconds (0: never). Default: 300
    /// for scenarios, none for `--guest` (interactive).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Keep the VMM (the host role: VMM, scheduler, console, GIC driver)
    /// at EL2 next to the hypervisor (handoff flags bit 2; the legacy
    /// layout, for comparisons). By default it runs at EL1, reaching the
    /// hypervisor only by `hvc #0`.
    #[arg(long)]
    pub host_el2: bool,
}

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The host target directory: `$CARGO_TARGET_DIR` or `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                repo_root().join(p)
            }
        }
        _ => repo_root().join("target"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Test {
            only,
            verbose,
            host_el2,
        } => {
            qemu::set_host_el2(host_el2);
            tiers::run_all(only.as_deref(), verbose)
        }
        Cmd::Run(args) => run(&args),
        Cmd::IrqLatency => latency::run(),
        Cmd::BootRatio {
            repeat,
            no_sve,
            host_el2,
        } => prereq::ensure(true)
            .inspect(|()| qemu::set_host_el2(host_el2))
            .and_then(|()| image::build_all())
            .and_then(|img| linux::ratio(&img.image, repeat, !no_sve)),
        Cmd::Build => prereq::ensure(true)
            .and_then(|()| image::build_all())
            .map(|img| {
                println!("{}", img.image.display());
                0
            }),
        Cmd::Initramfs { busybox, out } => initramfs::write(&busybox, &out).map(|()| 0),
    };
    match res {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<i32> {
    // Arguments and the guest file first: a bad one fails before any build.
    let spec = qemu::RunSpec::from_args(args)?;
    let timeout = qemu::run_timeout(args);
    prereq::ensure(true)?;
    let img = image::build_all()?;
    let out = qemu::boot(&img.image, &spec, qemu::Console::Stream, timeout)?;
    let (ok, line) = qemu::verdict(&spec, &out);
    println!("{line}");
    if out.timed_out {
        anyhow::bail!(
            "QEMU killed after {:.0?} (--timeout {}): the guest did not finish; \
             raise --timeout, or pass --timeout 0 to wait forever",
            out.elapsed,
            timeout.map_or(0, |t| t.as_secs())
        );
    }
    Ok(match (ok, out.exit_code) {
        (true, _) => 0,
        (false, Some(c)) if c != 0 => c,
        (false, _) => 1,
    })
}
