//! Building the guest payloads and the EL2 image (`crates/boot`).
//!
//! Order: the guest crates (`crates/boot/guests/*`) are built as ELF files,
//! converted to flat binaries by [`crate::elf::to_flat`] into
//! `<target>/boot/guests/`, then the image is built with
//! `PKVM_GUESTS_DIR` pointing there (it embeds them with `include_bytes!`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::prereq::TARGET;
use crate::{repo_root, target_dir};

/// The guest payload packages (`crates/boot/guests/<name>`, binary `<name>`),
/// each embedded in the image as `<name>.bin`.
pub const GUESTS: &[&str] = &[
    "guest-toucher",
    "guest-mmio",
    "guest-hvc",
    "guest-psci",
    "guest-smp",
    "guest-spin",
    "guest-reset",
    "guest-sysreg",
    "guest-gic",
    "guest-irq",
    "guest-pmu",
    "guest-sve",
    "guest-debug",
];

/// The image package and binary name.
pub const IMAGE_PKG: &str = "pkvm-boot";

/// Paths of a finished build.
pub struct Built {
    /// The EL2 image (ELF, linked at 0x4020_0000; QEMU `-kernel`).
    pub image: PathBuf,
}

/// `crates/boot`.
pub fn boot_dir() -> PathBuf {
    repo_root().join("crates").join("boot")
}

/// Target directory of the boot workspace.
pub fn boot_target_dir() -> PathBuf {
    target_dir().join("boot")
}

/// A cargo command run from `crates/boot` (so its `.cargo/config.toml`
/// applies) for the bare-metal target.
pub fn boot_cargo(sub: &str) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(boot_dir())
        .arg(sub)
        .arg("--manifest-path")
        .arg(boot_dir().join("Cargo.toml"))
        .arg("--target")
        .arg(TARGET)
        .env("CARGO_TARGET_DIR", boot_target_dir())
        // Flags meant for host builds (e.g. `--cfg loom`) must not leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    c
}

fn run(mut c: Command) -> Result<()> {
    let st = c.status().with_context(|| format!("starting {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed with {st}");
    }
    Ok(())
}

fn guests_dir() -> PathBuf {
    boot_target_dir().join("guests")
}

/// Builds every guest and writes `<name>.bin` flat images.
///
/// # Errors
/// Build failures, or a guest ELF that cannot be flattened.
pub fn build_guests() -> Result<PathBuf> {
    let mut c = boot_cargo("build");
    c.arg("--release");
    for g in GUESTS {
        c.arg("-p").arg(g);
    }
    run(c)?;
    let out = guests_dir();
    std::fs::create_dir_all(&out)?;
    for g in GUESTS {
        let elf = boot_target_dir().join(TARGET).join("release").join(g);
        let bytes = std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?;
        let (base, flat) =
            crate::elf::to_flat(&bytes).with_context(|| format!("flattening {g}"))?;
        if base != 0x4000_0000 {
            bail!("guest {g} is linked at {base:#x}, expected 0x40000000");
        }
        write_if_changed(&out.join(format!("{g}.bin")), &flat)?;
    }
    Ok(out)
}

fn write_if_changed(p: &Path, data: &[u8]) -> Result<()> {
    if std::fs::read(p).ok().as_deref() != Some(data) {
        std::fs::write(p, data).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Builds the guests and the image.
///
/// # Errors
/// Any build failure.
pub fn build_all() -> Result<Built> {
    let gdir = build_guests()?;
    let mut c = boot_cargo("build");
    c.args(["--release", "-p", IMAGE_PKG])
        .env("PKVM_GUESTS_DIR", &gdir);
    run(c)?;
    Ok(Built {
        image: boot_target_dir()
            .join(TARGET)
            .join("release")
            .join(IMAGE_PKG),
    })
}

/// `cargo clippy` over the whole boot workspace with `-D warnings`.
///
/// # Errors
/// Clippy findings or build failures.
pub fn clippy() -> Result<()> {
    let gdir = guests_dir();
    let mut c = boot_cargo("clippy");
    c.args(["--workspace", "--release", "--", "-D", "warnings"])
        .env("PKVM_GUESTS_DIR", &gdir);
    run(c)
}

/// `cargo fmt --check` over the boot workspace's own packages (the image,
/// guest-rt and the guests). Not `--all`: that also reaches the root
/// workspace's crates through path dependencies, which the root `fmt` tier
/// checks.
///
/// # Errors
/// Formatting differences.
pub fn fmt_check() -> Result<()> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(boot_dir())
        .args(["fmt", "--check", "--manifest-path"])
        .arg(boot_dir().join("Cargo.toml"))
        .args(["-p", IMAGE_PKG, "-p", "guest-rt"]);
    for g in GUESTS {
        c.arg("-p").arg(g);
    }
    run(c)
}
