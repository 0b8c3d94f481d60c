//! `cargo xtask`: build, test and run orchestration for pkvm-rs.
//!
//! - `cargo xtask test` runs every test tier (fmt, clippy, host tests, loom,
//!   the EL2 image build + clippy, QEMU integration tests) and ends with the
//!   line `xtask: N passed, M failed` (N, M count tiers); the exit status is
//!   non-zero if any tier failed.
//! - `cargo xtask run [--guest FILE] [--append ARGS] [--smp N] [--mem MIB]
//!   [--cpus N] [--scenario NAME]`
//!   checks and installs prerequisites, builds the guest payloads and the EL2
//!   image, boots it under QEMU, streams the console and exits with the
//!   image's status.
//!
//! The EL2 image (`crates/boot`) is its own cargo workspace for
//! `aarch64-unknown-none`; xtask builds it with cargo run from that
//! directory (so its `.cargo/config.toml` applies) into
//! `<target dir>/boot`.
#![forbid(unsafe_code)]

mod asm;
mod elf;
mod image;
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
    },
    /// Build the guests and the EL2 image and boot it under QEMU.
    Run(RunArgs),
    /// Build the guests and the EL2 image only; print the image path.
    Build,
}

/// Options of `cargo xtask run`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RunArgs {
    /// A raw arm64 kernel image (Linux `Image`) or flat binary to run as a VM.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// The guest's kernel command line (`/chosen/bootargs`).
    #[arg(long)]
    pub append: Option<String>,
    /// Number of vCPUs of the external guest (or of the `sched-*`
    /// scenarios' guest, or of each `reset*` scenario VM); any number up to
    /// 8, whatever `--cpus` is (the image schedules vCPUs on the physical
    /// CPUs).
    #[arg(long, default_value_t = 1)]
    pub smp: u32,
    /// Physical CPUs QEMU emulates (`-smp`), 1..=8.
    #[arg(long, default_value_t = qemu::DEFAULT_HOST_CPUS)]
    pub cpus: u32,
    /// Memory of the external guest in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u32,
    /// Image scenario to run instead of the demo (`demo`, `touch`, `exits`,
    /// `protected`, `sched-smp`, `sched-smp-protected`, `sched-spin`,
    /// `reset`, `reset-protected`);
    /// ignored with `--guest`.
    #[arg(long)]
    pub scenario: Option<String>,
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
        Cmd::Test { only, verbose } => tiers::run_all(only.as_deref(), verbose),
        Cmd::Run(args) => run(&args),
        Cmd::Build => prereq::ensure(true)
            .and_then(|()| image::build_all())
            .map(|img| {
                println!("{}", img.image.display());
                0
            }),
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
    prereq::ensure(true)?;
    let img = image::build_all()?;
    let spec = qemu::RunSpec::from_args(args)?;
    let out = qemu::boot(&img.image, &spec, qemu::Console::Stream, None)?;
    Ok(out.exit_code.unwrap_or(1))
}
