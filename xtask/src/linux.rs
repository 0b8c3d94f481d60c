//! The Linux tiers: Debian's arm64 kernel with the test initramfs
//! ([`crate::initramfs`]) as an external guest, 4 vCPUs on 2 physical
//! CPUs. `/init` must print `nproc` 4, timer interrupt counts that grew on
//! every CPU, about 1 s of guest uptime around `sleep 1`, and then power
//! off with PSCI SYSTEM_OFF (QEMU exits 0). Skipped, saying why, when the
//! kernel or busybox is missing (`.ci/debian-kernel`, `.ci/busybox`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::initramfs::DONE;
use crate::qemu::{self, Console, RunSpec, Watch};

/// vCPUs of the guest.
pub const VCPUS: u32 = 4;
/// Physical CPUs QEMU emulates.
pub const HOST_CPUS: u32 = 2;
/// Time limit of one boot (the 2-core CI machine boots to /init in about
/// 30 s with 1 vCPU).
pub const TIMEOUT: Duration = Duration::from_secs(150);
/// The guest's command line.
pub const APPEND: &str = "console=ttyAMA0";
/// The line `/init` prints first.
pub const START: &str = "pkvm-init: start";

/// The static busybox the initramfs is built from: `$PKVM_BUSYBOX` or
/// `<target>/debian/busybox`.
pub fn busybox_path() -> PathBuf {
    match std::env::var_os("PKVM_BUSYBOX") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::target_dir().join("debian").join("busybox"),
    }
}

/// The timer interrupt counts per CPU on a `/proc/interrupts` line.
fn timer_counts(line: &str) -> Vec<u64> {
    let after = line.split_once(':').map_or("", |(_, r)| r);
    after
        .split_whitespace()
        .map_while(|w| w.parse::<u64>().ok())
        .collect()
}

/// The values after `key` on the first guest line containing it.
fn guest_field<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console
        .lines()
        .filter(|l| l.starts_with(qemu::GUEST_LINE_PREFIX))
        .find_map(|l| l.split_once(key).map(|(_, r)| r.trim()))
}

/// What is wrong with a console of the initramfs run (empty: nothing).
pub fn problems(console: &str, exit: Option<i32>, vcpus: u32) -> Vec<String> {
    let mut p = Vec::new();
    match guest_field(console, "pkvm-init: nproc") {
        Some(n) if n == vcpus.to_string() => {}
        other => p.push(format!("nproc printed {other:?}, want {vcpus}")),
    }
    let irq0 = guest_field(console, "pkvm-init: irq0").map(timer_counts);
    let irq1 = guest_field(console, "pkvm-init: irq1").map(timer_counts);
    match (irq0, irq1) {
        (Some(a), Some(b)) if a.len() == vcpus as usize && b.len() == a.len() => {
            if a.iter().zip(&b).any(|(x, y)| y <= x) {
                p.push(format!(
                    "timer interrupt counts did not grow on every CPU: {a:?} then {b:?}"
                ));
            }
        }
        other => p.push(format!(
            "no arch_timer counts for {vcpus} CPUs in /proc/interrupts: {other:?}"
        )),
    }
    let slept = guest_field(console, "pkvm-init: slept").and_then(|s| {
        let mut it = s.split_whitespace().map(|w| w.parse::<f64>().ok());
        Some((it.next()??, it.next()??))
    });
    match slept {
        Some((t0, t1)) if (0.9..=1.6).contains(&(t1 - t0)) => {}
        other => p.push(format!(
            "`sleep 1` did not take about 1 s of guest uptime: {other:?}"
        )),
    }
    if guest_field(console, DONE).is_none() {
        p.push(format!("no {DONE:?} line"));
    }
    if exit != Some(0) {
        p.push(format!(
            "QEMU exit {exit:?}, want 0 (PSCI SYSTEM_OFF of the guest)"
        ));
    }
    for f in qemu::FORBIDDEN {
        if qemu::hypervisor_lines(console).any(|l| l.contains(f)) {
            p.push(format!("forbidden console marker {f:?}"));
        }
    }
    p
}

/// The tier: builds the initramfs, boots it, checks the console.
///
/// # Errors
/// A failed check (with the console printed), or QEMU could not start.
pub fn tier(image: &Path, verbose: bool) -> Result<String> {
    let k = crate::tiers::debian_kernel_path();
    let bb = busybox_path();
    for (what, p, script) in [("kernel", &k, "debian-kernel"), ("busybox", &bb, "busybox")] {
        if !p.exists() {
            return Ok(format!(
                "skipped: no Debian {what} at {} (.ci/{script} fetches it)",
                p.display()
            ));
        }
    }
    let dir = crate::image::boot_target_dir().join("linux");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initramfs.cpio");
    crate::initramfs::write(&bb, &initrd)?;
    let spec = RunSpec {
        scenario: "guest".into(),
        guest: Some(k),
        initrd: Some(initrd),
        smp: VCPUS,
        mem_mib: 256,
        append: APPEND.into(),
        host_cpus: HOST_CPUS,
    };
    let w = Watch {
        mark: Some(START),
        ..Watch::default()
    };
    let o = qemu::boot_watched(image, &spec, Console::Capture, Some(TIMEOUT), &w)?;
    let p = problems(&o.console, o.exit_code, VCPUS);
    if !p.is_empty() || verbose {
        println!(
            "---- console of qemu:linux-initramfs ----\n{}---- end of console ----",
            o.console
        );
    }
    if !p.is_empty() {
        bail!("{}", p.join("; "));
    }
    Ok(format!(
        "{VCPUS} vCPUs on {HOST_CPUS} CPUs: /init after {:.1?}, nproc, timers, sleep 1 and SYSTEM_OFF checked in {:.1?}",
        o.mark_at.unwrap_or_default(),
        o.elapsed
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(n: &str, i0: &str, i1: &str, slept: &str) -> String {
        format!(
            "[guest guest vcpu 0] pkvm-init: nproc {n}\n\
             [guest guest vcpu 1] pkvm-init: irq0  11: {i0}  GICv3  27 Level  arch_timer\n\
             [guest guest vcpu 0] pkvm-init: irq1  11: {i1}  GICv3  27 Level  arch_timer\n\
             [guest guest vcpu 2] pkvm-init: slept {slept}\n\
             [guest guest vcpu 2] pkvm-init: done\n"
        )
    }

    #[test]
    fn a_good_console_passes_and_each_bad_field_is_named() {
        let good = console("2", "10 20", "15 30", "3.00 4.01");
        assert!(problems(&good, Some(0), 2).is_empty());
        let p = problems(&good, Some(1), 2);
        assert!(p[0].contains("QEMU exit Some(1)"), "{p:?}");
        let p = problems(&console("1", "10 20", "15 30", "3 4"), Some(0), 2);
        assert!(p[0].contains("nproc"), "{p:?}");
        let p = problems(&console("2", "10 20", "15 20", "3 4"), Some(0), 2);
        assert!(p[0].contains("did not grow"), "{p:?}");
        let p = problems(&console("2", "10 20", "15 30", "3.0 5.5"), Some(0), 2);
        assert!(p[0].contains("sleep 1"), "{p:?}");
        // Only guest lines count: the hypervisor's own do not.
        let fake = good.replace("[guest guest vcpu 0] pkvm-init: nproc", "pkvm-init: nproc");
        assert!(!problems(&fake, Some(0), 2).is_empty());
    }
}
