//! The Linux tiers: Debian's arm64 kernel with the test initramfs
//! ([`crate::initramfs`]) as an external guest, 4 vCPUs on 2 physical
//! CPUs. `/init` must print `nproc` 4, timer interrupt counts that grew on
//! every CPU, about 1 s of guest uptime around `sleep 1`, and then power
//! off with PSCI SYSTEM_OFF (QEMU exits 0); in standard mode and as a
//! protected VM. Then a shell session through the serial input, and the
//! boot time against bare QEMU ([`tier`]). Skipped, saying why, when the
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
/// What Linux prints when it enables SVE (the standard boot offers it).
const SVE_FOUND: &str = "CPU features: detected: Scalable Vector Extension";
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

/// One boot of the kernel with the initramfs: `protected` or not, with
/// SVE offered at the host's largest vector length or not (`sve`), with
/// `append`, `input` typed into the serial input once a line contains
/// `.0`. Returns the outcome.
fn boot(
    image: &Path,
    files: &(PathBuf, PathBuf),
    (protected, sve): (bool, bool),
    smp: u32,
    append: &str,
    input: Option<(&str, &[u8])>,
) -> Result<qemu::Outcome> {
    let spec = RunSpec {
        scenario: "guest".into(),
        guest: Some(files.0.clone()),
        initrd: Some(files.1.clone()),
        protected,
        smp,
        mem_mib: 256,
        append: append.into(),
        host_cpus: HOST_CPUS,
        sve: sve.then_some(0),
        host_el2: false,
    };
    let w = Watch {
        mark: Some(START),
        send: input,
        ..Watch::default()
    };
    qemu::boot_watched(image, &spec, Console::Capture, Some(TIMEOUT), &w)
}

fn fail_or(name: &str, o: &qemu::Outcome, p: Vec<String>, verbose: bool) -> Result<()> {
    if !p.is_empty() || verbose {
        println!(
            "---- console of qemu:linux-initramfs ({name}) ----\n{}---- end of console ----",
            o.console
        );
    }
    if !p.is_empty() {
        bail!("{name}: {}", p.join("; "));
    }
    Ok(())
}

/// The kernel and the initramfs (built into the boot target directory),
/// or why the tier is skipped.
fn inputs() -> Result<std::result::Result<(PathBuf, PathBuf), String>> {
    let k = crate::tiers::debian_kernel_path();
    let bb = busybox_path();
    for (what, p, script) in [("kernel", &k, "debian-kernel"), ("busybox", &bb, "busybox")] {
        if !p.exists() {
            return Ok(Err(format!(
                "skipped: no Debian {what} at {} (.ci/{script} fetches it)",
                p.display()
            )));
        }
    }
    let dir = crate::image::boot_target_dir().join("linux");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initramfs.cpio");
    crate::initramfs::write(&bb, &initrd)?;
    Ok(Ok((k, initrd)))
}

/// The tier: builds the initramfs; boots it in standard mode, then the
/// same kernel and initramfs directly under the same QEMU (same CPU model,
/// same vCPU count), then as a protected VM ([`problems`] checked for
/// both pkvm-rs boots); boots it once more with a shell and types
/// `echo $((6*7))` and `poweroff -f` into the serial input (the answer 42
/// must come back). Reports the times to the `/init` marker and the ratio
/// of the standard boot's to bare QEMU's (reported, not asserted: no
/// timing assertions; `cargo xtask boot-ratio` takes medians).
///
/// # Errors
/// A failed check (with the console printed), or QEMU could not start.
pub fn tier(image: &Path, verbose: bool) -> Result<String> {
    let files = match inputs()? {
        Ok(f) => f,
        Err(skip) => return Ok(skip),
    };
    let mut times = Vec::new();
    let mut bare = None;
    // The standard boot with SVE offered (the host's largest vector
    // length; Linux finds and enables it), the protected one without.
    for (name, protected) in [("standard", false), ("protected VM", true)] {
        let o = boot(image, &files, (protected, !protected), VCPUS, APPEND, None)?;
        let mut p = problems(&o.console, o.exit_code, VCPUS);
        if !protected && !o.console.contains(SVE_FOUND) {
            p.push(format!("SVE offered, but no guest line {SVE_FOUND:?}"));
        }
        fail_or(name, &o, p, verbose)?;
        times.push(o.mark_at.unwrap_or(o.elapsed));
        if bare.is_none() {
            // Right after the standard boot, so both see the same load
            // on the (shared) host.
            bare = Some(bare_qemu(&files)?);
        }
    }
    let typed: &[u8] = b"echo $((6*7))\npoweroff -f\n";
    let shell = format!("{APPEND} pkvm.shell");
    let o = boot(
        image,
        &files,
        (false, false),
        2,
        &shell,
        Some(("pkvm-init: shell", typed)),
    )?;
    fail_or("interactive", &o, interactive_problems(&o), verbose)?;
    let ratio = match bare.as_ref().map(|o| (o.mark_at, o.exit_code)) {
        Some((Some(b), _)) if !b.is_zero() => format!(
            "{:.2}x bare QEMU ({:.2?}, booted right after it; goal <= 1.2x)",
            times[0].as_secs_f64() / b.as_secs_f64(),
            b
        ),
        other => format!("bare QEMU never reached /init: {other:?}"),
    };
    Ok(format!(
        "{VCPUS} vCPUs on {HOST_CPUS} CPUs, nproc/timers/sleep 1/SYSTEM_OFF checked: /init after {:.2?} standard ({ratio}), {:.2?} protected VM; shell answered `echo $((6*7))` with 42 through the PL011's RX",
        times[0], times[1]
    ))
}

/// `cargo xtask boot-ratio`: `repeat` pairs of boots to the `/init`
/// marker, bare QEMU then pkvm-rs (standard mode, [`VCPUS`] vCPUs on
/// [`HOST_CPUS`] CPUs, SVE offered when `sve`, as in the tier), each pair
/// back to back so both see the same load;
/// prints every pair and the medians. Returns the exit code (1 when a boot
/// never reached `/init`).
///
/// # Errors
/// The kernel or busybox is missing, or QEMU could not start.
pub fn ratio(image: &Path, repeat: u32, sve: bool) -> Result<i32> {
    let files = match inputs()? {
        Ok(f) => f,
        Err(skip) => bail!("boot-ratio: {skip}"),
    };
    let (mut bare, mut pkvm, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=repeat.max(1) {
        let b = bare_qemu(&files)?;
        let p = boot(image, &files, (false, sve), VCPUS, APPEND, None)?;
        let (Some(b), Some(p)) = (b.mark_at, p.mark_at) else {
            println!(
                "boot-ratio: run {i}: a boot never reached /init (bare {:?}, pkvm-rs {:?})",
                b.exit_code, p.exit_code
            );
            return Ok(1);
        };
        let r = p.as_secs_f64() / b.as_secs_f64();
        println!("boot-ratio: run {i}: bare QEMU {b:.2?}, pkvm-rs {p:.2?}: {r:.2}x");
        bare.push(b.as_secs_f64());
        pkvm.push(p.as_secs_f64());
        ratios.push(r);
    }
    println!(
        "boot-ratio: median of {} runs to /init: bare QEMU {:.2}s, pkvm-rs {:.2}s, ratio {:.2}x (goal <= 1.2x)",
        ratios.len(),
        median(&mut bare),
        median(&mut pkvm),
        median(&mut ratios)
    );
    Ok(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What is wrong with the interactive run: the shell must print 42 on a
/// line of its own and the guest must power off.
fn interactive_problems(o: &qemu::Outcome) -> Vec<String> {
    let mut p = Vec::new();
    let answered = o
        .console
        .lines()
        .filter(|l| l.starts_with(qemu::GUEST_LINE_PREFIX))
        .filter_map(|l| l.split_once("] ").map(|(_, r)| r.trim()))
        .any(|r| r == "42" || (r.ends_with("# 42") && !r.contains("$((")));
    if !answered {
        p.push("no guest line \"42\" after typing `echo $((6*7))`".to_string());
    }
    if o.exit_code != Some(0) {
        p.push(format!(
            "QEMU exit {:?} after typing `poweroff -f`, want 0",
            o.exit_code
        ));
    }
    p
}

/// The same kernel and initramfs booted directly by QEMU (no EL2 image):
/// same machine and CPU model, [`VCPUS`] CPUs.
fn bare_qemu(files: &(PathBuf, PathBuf)) -> Result<qemu::Outcome> {
    let mut c = std::process::Command::new(crate::prereq::QEMU);
    c.args([
        "-M",
        "virt,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        &VCPUS.to_string(),
        "-m",
        "256M",
        "-nographic",
        "-no-reboot",
        "-append",
        APPEND,
        "-kernel",
    ])
    .arg(&files.0)
    .arg("-initrd")
    .arg(&files.1);
    let w = Watch {
        mark: Some(START),
        ..Watch::default()
    };
    qemu::run_command(&mut c, Console::Capture, Some(TIMEOUT), &w)
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
