//! `cargo xtask irq-latency`: the interrupt guest (guest-irq) run under
//! pkvm-rs (2 vCPUs on 2 CPUs) and bare on QEMU's own GICv3 at EL1
//! (`-M virt,gic-version=3 -cpu max -smp 2 -kernel <guest ELF>`, no
//! hypervisor), each printing its `irq: lat:` medians (SGI round trip,
//! timer wakeup from WFI); this prints both and their ratios.
//!
//! Bare, the guest runs the same code: QEMU's PSCI (over HVC) starts the
//! secondary vCPU and powers off, its GICv3 and timers answer, the PL011
//! prints. The ELF is loaded at its link address (the guests' RAM base,
//! 0x4000_0000); no device tree is passed, so the IPI test runs its
//! default 1,000 rounds.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::image;
use crate::prereq::{self, TARGET};
use crate::qemu::{self, Console, RunSpec};

/// The guest payload measured.
const GUEST: &str = "guest-irq";
/// How long either run may take.
const TIMEOUT: Duration = Duration::from_secs(180);

/// The `irq: lat: <name> <ns>` lines of a console: (name, ns).
fn lat_lines(console: &str) -> Vec<(String, u64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("irq: lat: ")? + "irq: lat: ".len()..];
            let (name, v) = rest.trim().split_once(' ')?;
            Some((name.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The guest under pkvm-rs: its console.
fn under_pkvm() -> Result<String> {
    let img = image::build_all()?;
    let spec = RunSpec {
        scenario: "guest".into(),
        guest: Some(
            image::boot_target_dir()
                .join("guests")
                .join(format!("{GUEST}.bin")),
        ),
        smp: 2,
        mem_mib: 32,
        append: String::new(),
        host_cpus: 2,
        sve: None,
        initrd: None,
        protected: false,
        host_el2: false,
    };
    let out = qemu::boot(&img.image, &spec, Console::Capture, Some(TIMEOUT))?;
    if out.timed_out {
        bail!("pkvm-rs run timed out:\n{}", out.console);
    }
    Ok(out.console)
}

/// The guest ELF bare on QEMU: its console.
fn bare() -> Result<String> {
    let elf = image::boot_target_dir()
        .join(TARGET)
        .join("release")
        .join(GUEST);
    let out = Command::new(prereq::QEMU)
        .args([
            "-M",
            "virt,gic-version=3",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1G",
        ])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&elf)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} bare", elf.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}

/// Runs both and prints the medians and ratios; 1 if either failed a check.
///
/// # Errors
/// A build or QEMU could not run, or a run printed no `lat:` lines.
pub fn run() -> Result<i32> {
    prereq::ensure(true)?;
    let pk = under_pkvm()?;
    let bare = bare()?;
    let (lp, lb) = (lat_lines(&pk), lat_lines(&bare));
    for (who, console) in [("pkvm-rs", &pk), ("bare QEMU", &bare)] {
        for l in console.lines().filter(|l| l.contains("irq: ")) {
            println!("{who}: {}", l.trim());
        }
    }
    if lp.is_empty() || lb.is_empty() {
        bail!(
            "no 'irq: lat:' lines (pkvm-rs {}, bare {})",
            lp.len(),
            lb.len()
        );
    }
    for (name, p) in &lp {
        if let Some((_, b)) = lb.iter().find(|(n, _)| n == name) {
            let ratio = *p as f64 / (*b).max(1) as f64;
            println!("irq-latency: {name}: pkvm-rs {p} ns, bare QEMU {b} ns, ratio {ratio:.2}");
        }
    }
    let ok = |c: &str| c.contains("irq: all checks passed");
    Ok(if ok(&pk) && ok(&bare) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lat_lines_parse_name_and_value() {
        let c = "x\n[guest guest vcpu 0] irq: lat: sgi-rtt-median-ns 120640\nirq: lat: t 5\nirq: lat: bad x\n";
        assert_eq!(
            lat_lines(c),
            vec![
                ("sgi-rtt-median-ns".to_string(), 120_640),
                ("t".to_string(), 5)
            ]
        );
    }
}
