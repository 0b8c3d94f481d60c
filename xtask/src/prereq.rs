//! Prerequisites: the `aarch64-unknown-none` Rust target and
//! `qemu-system-aarch64`. Installed when possible, otherwise a clear message.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The bare-metal target the EL2 image and guests are built for.
pub const TARGET: &str = "aarch64-unknown-none";
/// The emulator binary.
pub const QEMU: &str = "qemu-system-aarch64";

fn have_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == TARGET)
        })
        .unwrap_or(false)
}

/// Whether `qemu-system-aarch64` can be started.
pub fn have_qemu() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run_loud(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

/// Makes sure the Rust target (always) and QEMU (if `need_qemu`) are there,
/// installing them where possible.
///
/// # Errors
/// When a prerequisite is missing and cannot be installed (e.g. QEMU when
/// not running as root), with the command the user should run.
pub fn ensure(need_qemu: bool) -> Result<()> {
    if !have_target() {
        run_loud(Command::new("rustup").args(["target", "add", TARGET])).with_context(|| {
            format!("the Rust target {TARGET} is missing; run `rustup target add {TARGET}`")
        })?;
    }
    if need_qemu && !have_qemu() {
        if is_root() {
            run_loud(Command::new("apt-get").arg("update"))?;
            run_loud(Command::new("apt-get").args(["install", "-y", "qemu-system-arm"]))?;
        }
        if !have_qemu() {
            bail!(
                "{QEMU} is not installed and xtask cannot install it (not root). \
                 Install it with: sudo apt-get update && sudo apt-get install -y qemu-system-arm"
            );
        }
    }
    Ok(())
}
