//! `cargo xtask test`: every test tier, in order, with a summary line.
//!
//! A tier is one command (or one QEMU integration test); it passes or fails
//! as a whole. The last line printed is always `xtask: N passed, M failed`.
//!
//! The Rust test tiers (`test`, `loom`) build with cargo and run each test
//! binary under a [`watchdog`]: one that runs longer than its limit
//! (`XTASK_TEST_TIMEOUT` seconds, or the tier's default) is killed and
//! fails the tier with `timed out after Ns: <binary>: still running:
//! <tests>` instead of hanging CI.

mod watchdog;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::qemu::{self, Console, QemuTest, RunSpec};
use crate::{image, prereq, repo_root, target_dir};

/// Crates with loom models (built with `--cfg loom`; every test target,
/// unit and integration, runs its tests named `loom*`). Crates that do not
/// exist yet or contain no loom test are skipped.
pub const LOOM_CRATES: &[(&str, &str)] = &[
    ("pkvm-sync", "crates/sync"),
    ("pkvm-hyp", "crates/hyp"),
    ("pkvm-host", "crates/host"),
];

/// Time limit of one QEMU integration test.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time limit of one test binary (tier `test`).
pub const TEST_BINARY_TIMEOUT: Duration = Duration::from_secs(300);

/// Default time limit of one loom test binary (release build; loom
/// explores every interleaving).
pub const LOOM_BINARY_TIMEOUT: Duration = Duration::from_secs(1200);

/// A test binary's time limit: `XTASK_TEST_TIMEOUT` seconds if set, else
/// `default`.
fn time_limit(default: Duration) -> Duration {
    std::env::var("XTASK_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(default, Duration::from_secs)
}

struct Tally {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Tally {
    fn record(&mut self, name: &str, r: Result<String>) {
        match r {
            Ok(note) => {
                println!(
                    "xtask: tier {name}: ok{}",
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({note})")
                    }
                );
                self.passed.push(name.into());
            }
            Err(e) => {
                println!("xtask: tier {name}: FAILED: {e:#}");
                self.failed.push(name.into());
            }
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo_root());
    c
}

fn run_status(mut c: Command) -> Result<String> {
    let st = c.status().with_context(|| format!("starting {c:?}"))?;
    if !st.success() {
        bail!("{c:?} exited with {st}");
    }
    Ok(String::new())
}

/// Builds the tests of `cargo_test` (a `cargo test ...` command) and runs
/// each test binary with `filter` under the watchdog (`limit` each). Every
/// binary runs even after one failed; the tier fails if any did.
fn run_tests(cargo_test: Command, filter: &[&str], limit: Duration) -> Result<String> {
    let bins = watchdog::build(cargo_test)?;
    let (mut passed, mut ran) = (0u64, 0usize);
    let mut failures = Vec::new();
    for b in &bins {
        let listed = watchdog::list(b, filter)?;
        if listed.is_empty() {
            continue;
        }
        let mut c = Command::new(&b.path);
        c.args(filter)
            .current_dir(&b.dir)
            .env("CARGO_MANIFEST_DIR", &b.dir);
        ran += 1;
        match watchdog::run(c, &b.label, &listed, limit) {
            Ok(seen) => passed += seen.results.iter().map(|r| r.0).sum::<u64>(),
            Err(e) => {
                println!("xtask: FAILED: {e:#}");
                failures.push(format!("{e:#}"));
            }
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(format!("{passed} tests passed in {ran} binaries"))
}

/// The workspace's doc tests, the whole command under the watchdog.
fn doc_tests(limit: Duration) -> Result<String> {
    let mut c = cargo();
    c.args(["test", "--workspace", "--doc"]);
    let seen = watchdog::run(c, "doc tests", &[], limit)?;
    let passed: u64 = seen.results.iter().map(|r| r.0).sum();
    Ok(format!("{passed} doc tests passed"))
}

fn test_tier() -> Result<String> {
    let limit = time_limit(TEST_BINARY_TIMEOUT);
    let mut c = cargo();
    c.args(["test", "--workspace"]);
    let unit = run_tests(c, &[], limit);
    let doc = doc_tests(limit);
    match (unit, doc) {
        (Ok(u), Ok(d)) => Ok(format!("{u}; {d}")),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// Parses `test result: ok. 12 passed; 0 failed; ...` into `(12, 0)`.
pub fn parse_result_line(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num = |key: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(key)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((num(" passed")?, num(" failed")?))
}

fn has_loom_tests(dir: &Path) -> bool {
    fn walk(d: &Path) -> bool {
        let Ok(rd) = std::fs::read_dir(d) else {
            return false;
        };
        rd.flatten().any(|e| {
            let p = e.path();
            if p.is_dir() {
                walk(&p)
            } else {
                p.extension().is_some_and(|x| x == "rs")
                    && std::fs::read_to_string(&p).is_ok_and(|s| s.contains("loom::model"))
            }
        })
    }
    walk(&dir.join("src")) || walk(&dir.join("tests"))
}

fn loom_tier() -> Result<String> {
    let root = repo_root();
    let present: Vec<&str> = LOOM_CRATES
        .iter()
        .filter(|(_, dir)| {
            root.join(dir).join("Cargo.toml").exists() && has_loom_tests(&root.join(dir))
        })
        .map(|(name, _)| *name)
        .collect();
    if present.is_empty() {
        return Ok("no crate has loom tests yet; skipped".into());
    }
    let mut c = cargo();
    c.env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target_dir().join("loom"))
        .args(["test", "--release"]);
    for p in &present {
        c.arg("-p").arg(p);
    }
    // Unit tests and integration tests (`tests/*.rs` loom models).
    c.args(["--lib", "--tests"]);
    run_tests(c, &["loom"], time_limit(LOOM_BINARY_TIMEOUT))
        .map(|n| format!("{n}; crates: {}", present.join(", ")))
}

fn boot_build_tier() -> Result<String> {
    prereq::ensure(false)?;
    let built = image::build_all()?;
    Ok(format!("image {}", built.image.display()))
}

fn boot_lint_tier() -> Result<String> {
    image::fmt_check()?;
    image::clippy()?;
    Ok(String::new())
}

/// The QEMU integration tests.
pub fn qemu_tests() -> Result<Vec<QemuTest>> {
    let gdir = image::boot_target_dir().join("external-guest");
    std::fs::create_dir_all(&gdir)?;
    let gfile = gdir.join("hello.bin");
    std::fs::write(&gfile, crate::asm::external_test_guest())?;
    let offfile = gdir.join("cpu-off.bin");
    std::fs::write(&offfile, crate::asm::cpu_off_guest())?;
    let mut v = scenario_tests();
    v.extend(sched_tests());
    v.extend(reset_tests());
    v.push(sve_test("qemu:sve-switch-4on1", 1));
    v.push(sve_test("qemu:sve-switch-4on2", 2));
    v.extend(external_guest_tests(&gfile, &offfile));
    v.extend(pmu_tests());
    v.extend(debug_tests());
    let legacy = host_el_tests(&mut v);
    v.extend(legacy);
    Ok(v)
}

/// The VMM's exception level. By default it runs at EL1 (the host role
/// deprivileged, reaching the hypervisor only by `hvc #0`; in protected
/// mode under the host stage-2): `qemu:protected`, `qemu:sched-smp-8on2`
/// and `qemu:host-attack` also check what only the EL1 layout prints (the
/// tick and a kick taken at EL1, `PKVM_INIT`'s refusals, the host stage-2
/// on every CPU, the attacks run by the VMM itself), unless the whole run
/// keeps the VMM at EL2 (`cargo xtask test --host-el2`). The legacy layout
/// (the VMM at EL2 next to the hypervisor, handoff flags bit 2) keeps three
/// tiers of its own, `qemu:host-el2-*`, so both stay tested.
fn host_el_tests(v: &mut [QemuTest]) -> Vec<QemuTest> {
    let find = |v: &[QemuTest], name: &str| {
        v.iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} tier"))
            .clone()
    };
    let legacy = |mut t: QemuTest, name: &'static str| {
        t.name = name;
        t.spec.host_el2 = true;
        t.markers.push(
            "el: the VMM runs at EL2 (CurrentEL 0x8) next to the hypervisor (--host-el2: the legacy layout)"
                .to_string(),
        );
        t
    };
    let out = vec![
        legacy(find(v, "qemu:protected"), "qemu:host-el2-protected"),
        legacy(
            find(v, "qemu:sched-smp-8on2"),
            "qemu:host-el2-sched-smp-8on2",
        ),
        legacy(find(v, "qemu:host-attack"), "qemu:host-el2-host-attack"),
    ];
    if qemu::host_el2_everywhere() {
        return out;
    }
    let el1 = [
        "el1: the tick (INTID 30) taken and a kick SGI taken at EL1 on CPU 0",
        "el: the VMM runs at EL1 (CurrentEL 0x4), reaching EL2 by hvc #0 only",
    ];
    let stage2 = [
        "el1: the VMM is under the host stage-2 on 4 CPUs (FINALIZE, then PROT_FINALIZE_CPU on each secondary)",
        "hyp: RESERVE_VM before every CPU's host is under the host stage-2: refused (status -4)",
    ];
    for t in v.iter_mut() {
        match t.name {
            "qemu:protected" => {
                t.markers.extend(strings(&el1));
                t.markers.extend(strings(&stage2));
                t.markers.extend(strings(&[
                    "hyp: PKVM_INIT with bad blocks (outside RAM, misaligned, 0 or 5 regions, a host region over the hypervisor's memory) refused (INVALID_PARAMETER), nothing set up",
                    "hyp: a second PKVM_INIT refused (NOT_SUPPORTED), the hypervisor's memory unchanged",
                ]));
            }
            "qemu:sched-smp-8on2" => t.markers.extend(strings(&el1)),
            // host-attack with the VMM itself as the host at EL1 under the
            // host stage-2 (its attacks run in place, refusals are
            // injected aborts).
            "qemu:host-attack" => {
                t.markers.extend(strings(&el1[1..]));
                t.markers.extend(strings(&stage2));
                t.markers.extend(strings(&[
                    "host-attack: the host is the VMM itself at EL1 (CurrentEL 0x4) under the host stage-2 (a probe of the hypervisor's pool refused)",
                    "host-attack: store to the hypervisor's image (its code) 0x40200000: refused (abort injected into the host at EL1",
                    "host-attack: image: store to the image's code (through a writable alias in the host's stage-1 at EL1) 0x80200000: refused",
                    "ns by HOST_RUN from the VMM at EL1 under the host stage-2",
                ]));
            }
            _ => {}
        }
    }
    out
}

/// Self-hosted debug (guest-debug): breakpoints, watchpoints and
/// single-step on 8 vCPUs migrating between 2 CPUs; isolation from a
/// hostile VM on the same CPUs; a set/way clean/invalidate loop and an
/// unknown exception class.
fn debug_tests() -> Vec<QemuTest> {
    let s = strings;
    vec![
        QemuTest {
            name: "qemu:debug-bp-wp-step-8on2",
            spec: RunSpec::sched("debug", 8, 2),
            exit_code: 0,
            markers: s(&[
                "[guest debug vcpu 0] debug: vCPU 7: 250 rounds, ",
                "[guest debug vcpu 0] debug: all 8 vCPUs: every breakpoint, watchpoint and step hit exactly where expected, no spurious debug exception: ok",
                "debug: PASS: 8 vCPUs on 2 CPUs, 250 rounds each",
                "vm debug: powered off (PSCI SYSTEM_OFF)",
                "pool: back to starting count",
                "scenario debug: PASS",
            ]),
        },
        QemuTest {
            name: "qemu:debug-isolation-2vms-on2",
            spec: RunSpec::sched("debug-isolation", 2, 2),
            exit_code: 0,
            markers: s(&[
                "[guest victim vcpu 0] debug: all 2 vCPUs: every breakpoint, watchpoint and step hit exactly where expected, no spurious debug exception: ok",
                "isolation: PASS: the victim's debug registers, MDSCR_EL1 and physical timer were its own",
                "vm victim: powered off (PSCI SYSTEM_OFF)",
                "vm hostile: powered off (PSCI SYSTEM_OFF)",
                "pool: back to starting count",
                "scenario debug-isolation: PASS",
            ]),
        },
        QemuTest {
            // Also: an exception class the backend does not know (an
            // AArch32 EL0 coprocessor trap) gets an UNDEF and a log line.
            name: "qemu:setway-flush-and-unknown-ec",
            spec: RunSpec::scenario("setway"),
            exit_code: 0,
            markers: s(&[
                "[guest setway] setway: DC CSW, DC ISW (MMU and caches off), DC CISW loops:",
                "[guest setway] setway: the memory survived a full set/way clean/invalidate: ok",
                "[guest setway] unknown class: MRRC CNTPCT from AArch32 EL0 (EC 0x4 at EL2): vector 12 (VBAR_EL1+0x600), ESR_EL1 0x2000000, ELR_EL1 on the MRRC: ok",
                "vm setway: vCPU 0: UNDEF injected for EC 0x4 (not handled by the hypervisor) at PC",
                "setway: PASS:",
                "vm setway: powered off (PSCI SYSTEM_OFF)",
                "pool: back to starting count",
                "scenario setway: PASS",
            ]),
        },
        QemuTest {
            // The host at EL1 under its stage-2 attacks two protected VMs
            // and the hypervisor; the image exits 0 only if every attack
            // is refused and the victim's pages come back zeroed.
            name: "qemu:host-attack",
            spec: RunSpec::scenario("host-attack"),
            exit_code: 0,
            markers: s(&[
                "host-attack: null hypercall (GET_SIZES) from the host at EL1:",
                "secret registers shown to the host: 0 of 4",
                "host-attack: the host took its own timer interrupt at EL1: INTID 30",
                "the guest took INTID Ok(5); the list register back after its EOI 0x10a0000000000005",
                "statuses Some([-3, -3, -3]), the list register after them 0x10a0000000000005",
                "blocks holding a secret of x10..x13/TPIDR_EL1: 0; holding x5 outside its own store: 0; showing a PC: 0;",
                "pview: after teardown HOST_RUN holds the registers of 0 protected vCPUs",
                "(ALREADY_ON), SYSTEM_OFF = -1: refused",
                "host-attack: the host runs at EL1 (CurrentEL = 0x4) with its own stage-1 in host memory",
                "host-attack: load from the victim VM's donated page",
                "host-attack: store to the victim VM's donated page",
                "host-attack: map a hypervisor pool page",
                "host-attack: HOST_DONATE_GUEST of the victim's page to the other VM: refused",
                "host-attack: VCPU_LOAD of the victim's vCPU 0 on a CPU running another vCPU: refused",
                "host-attack: 2 VMs still live in the hypervisor after the attacks",
                "host-attack: image: load of the image's code",
                "host-attack: image: store to the image's code",
                "host-attack: image: store to a VMM static (.bss)",
                "host-attack: image: store to the hypervisor's per-CPU data (.bss.hyp)",
                "host-attack: image: store to CPU 1's EL2 stack",
                "host-attack: image: store to the hypervisor's NULL_RUN guest (.data.hyp)",
                "host-attack: image: host stage-2 after the run: 0 pages of the hypervisor's data and stacks mapped, 0 code pages writable",
                "the hypervisor masked and unmasked the virtual timer: at its own record, nothing written to the host's block",
                "host-attack: image: the hypervisor's console: at its own UART address, nothing written to the host's page",
                "host-attack: 2000 hostile hypercalls from the host at EL1: 2000 refused; the hypervisor's counters and the victim's data unchanged",
                "refused to drain",
                "host-attack: HOST_RUN with block at an unaligned address: refused",
                "host-attack: HOST_RUN with block at a device address (PL011): refused",
                "host-attack: HOST_RUN with block in the hypervisor's own memory: refused",
                "host-attack: HOST_RUN with block in a page of the hypervisor's pool: refused",
                "host-attack: HOST_RUN with block in the victim's donated page: refused",
                "host-attack: TLB_FLUSH_VMID_IPA / TLB_FLUSH_VMID of a host-built stage-2 in protected mode: refused",
                "host-attack: HOST_RUN with PSTATE EL2h: refused",
                "host-attack: HOST_RUN with a list register with the HW bit (physical INTID 27): refused",
                "host-attack: HOST_RUN with a host VTTBR for a hyp-managed VM: refused",
                "host-attack: HOST_RUN with a host-built stage-2 in protected mode: refused",
                "host-attack: HOST_RUN with a coalesced-MMIO zone wrapping around the address space: refused",
                "host-attack: HOST_RUN with more load answers than the block holds: refused",
                "host-attack: HOST_RUN with the valid block (runner's vCPU 0 at IPA 0x1000): status 0, exit kind ",
                "host-attack: guest run round trip (enter, stage-2 instruction abort, exit; mean of 2000):",
                "at EL1: all zero",
                "host-attack: after teardown: 0 live VMs, 0 pages held for VMs",
                "scenario host-attack: PASS",
            ]),
        },
    ]
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The built-in scenarios: touch, exits, demo, protected.
fn scenario_tests() -> Vec<QemuTest> {
    let s = strings;
    vec![
        QemuTest {
            name: "qemu:touch-64m",
            spec: RunSpec::scenario("touch"),
            exit_code: 0,
            markers: s(&[
                "pool: a dirtied 2M folio and 4K frame read as zero after zeroing: ok",
                "vm touch-4k: touched slot: stage-2 faults 16384,",
                "vm touch-2m: touched slot: stage-2 faults 32,",
                "vm touch-4k: guest verified 64 MiB: ok",
                "vm touch-2m: guest verified 64 MiB: ok",
                "pool: back to starting count",
                "scenario touch: PASS",
            ]),
        },
        QemuTest {
            name: "qemu:exits",
            spec: RunSpec::scenario("exits"),
            exit_code: 0,
            markers: s(&[
                "[guest mmio] hello through the emulated PL011",
                "vm mmio: mmio exit outside memslots",
                "vm hvc: undefined hvc returned NOT_SUPPORTED",
                "vm psci: powered off (PSCI SYSTEM_OFF)",
                "[guest off] psci: CPU_OFF of the only vCPU",
                "[guest late] psci: 300 WFIs done, powering off",
                "vm late: powered off (PSCI SYSTEM_OFF)",
                "run: ended with every vCPU left off or suspended",
                "exits: run ended with every vCPU left asleep: true; vm off: Some(Error(\"every vCPU is off or suspended and nothing can wake them\"))",
                "scenario exits: PASS",
            ]),
        },
        QemuTest {
            name: "qemu:demo-smp",
            spec: RunSpec::scenario("demo"),
            exit_code: 0,
            markers: s(&[
                "mode: standard",
                "demo: concurrent VMs on distinct CPUs with distinct VMIDs",
                "mode: protected",
                "vm pvm-2m: guest verified 16 MiB: ok",
                "pool: back to starting count",
                "scenario demo: PASS",
            ]),
        },
        QemuTest {
            name: "qemu:protected",
            spec: RunSpec::scenario("protected"),
            exit_code: 0,
            markers: s(&[
                "mode: protected (pkvm-hyp owns guest stage-2",
                "vm pshare-4k: touched slot: stage-2 faults 16384,",
                "vm pvm-2m: touched slot: stage-2 faults 32,",
                "vm pshare-4k: guest verified 64 MiB: ok",
                "vm pvm-2m: guest verified 64 MiB: ok",
                "[guest pmmio] hello through the emulated PL011",
                "vm pmmio: mmio exit outside memslots",
                "vm phvc: undefined hvc returned NOT_SUPPORTED",
                "vm ppsci: guest took an injected abort",
                "vm ppsci: powered off (PSCI SYSTEM_OFF)",
                "hyp (after teardown): pool",
                "pool: back to starting count",
                "scenario protected: PASS",
            ]),
        },
    ]
}

/// SMP bring-up and scheduling of more vCPUs than CPUs.
fn sched_tests() -> Vec<QemuTest> {
    let s = strings;
    vec![
        sched_smp_test("qemu:sched-smp-4on4", "sched-smp", "smp", 4, 4),
        sched_smp_test("qemu:sched-smp-8on2", "sched-smp", "smp", 8, 2),
        sched_smp_test(
            "qemu:sched-smp-protected-4on2",
            "sched-smp-protected",
            "psmp",
            4,
            2,
        ),
        QemuTest {
            name: "qemu:sched-spin-2cpus",
            spec: RunSpec::sched("sched-spin", 5, 2),
            exit_code: 0,
            markers: s(&[
                "sched: 5 vCPUs on 2 physical CPUs",
                "[guest spin vcpu 2] worker vCPU 2: step 5/5",
                "[guest spin vcpu 3] worker vCPU 3: step 5/5",
                "[guest spin vcpu 4] worker vCPU 4: step 5/5",
                "[guest spin vcpu 0] all 3 workers finished while vCPU 1 spins",
                "vm spin: powered off (PSCI SYSTEM_OFF)",
                "sched: spinning vCPU 1 preempted",
                "pool: back to starting count",
                "scenario sched-spin: PASS",
            ]),
        },
    ]
}

/// PSCI SYSTEM_RESET / SYSTEM_RESET2, standard and protected, and the
/// reset-forever guest loaded from a file.
fn reset_tests() -> Vec<QemuTest> {
    let s = strings;
    vec![
        QemuTest {
            name: "qemu:reset-2on2",
            spec: RunSpec::sched("reset", 2, 2),
            exit_code: 0,
            markers: s(&[
                "[guest reset vcpu 0] reset: first boot",
                "[guest reset vcpu 0] reset: vCPU 1 is spinning in the guest",
                "vm reset: PSCI SYSTEM_RESET from vCPU 0: restarting the VM at its entry point 0x40000000 (reset 1 of at most 8; image reloaded, rest of RAM kept; vCPU 0 on, 1 other vCPU(s) off until CPU_ON)",
                "[guest reset vcpu 0] reset: restarted from the entry point (boot 2)",
                "[guest reset vcpu 0] reset: note from boot 1 found; .data canary back at its initial value (image reloaded)",
                "[guest reset vcpu 0] reset: vCPU 1 is off after the reset",
                "vm reset: powered off (PSCI SYSTEM_OFF)",
                "vm reset2: PSCI SYSTEM_RESET2 (warm reset) from vCPU 0: restarting the VM at its entry point",
                "[guest reset2 vcpu 0] reset: restarted from the entry point (boot 3)",
                "vm reset2: powered off (PSCI SYSTEM_OFF)",
                "vm reset-loop: PSCI SYSTEM_RESET from vCPU 0: 8 resets already; the VM is stopped",
                "vm reset-loop: ended: Some(Error(\"too many system resets\"))",
                "reset: vm reset: 1 restart(s) from the entry point",
                "reset: vm reset2: 2 restart(s) from the entry point",
                "reset: vm reset-loop: 8 restart(s) from the entry point",
                "pool: back to starting count",
                "scenario reset: PASS",
            ]),
        },
        QemuTest {
            // Both vCPUs make each reset call at once: one restart each.
            name: "qemu:reset-concurrent-2on2",
            spec: RunSpec::sched("reset-concurrent", 2, 2),
            exit_code: 0,
            markers: s(&[
                "[guest creset vcpu 0] reset: SYSTEM_RESET (vCPU 1 too, at the same time)",
                "[guest creset vcpu 0] reset: restarted from the entry point (boot 4)",
                "reset: vm creset: 3 restart(s) from the entry point",
                "vm creset: powered off (PSCI SYSTEM_OFF)",
                "scenario reset-concurrent: PASS",
            ]),
        },
        QemuTest {
            name: "qemu:reset-protected-2on2",
            spec: RunSpec::sched("reset-protected", 2, 2),
            exit_code: 0,
            markers: s(&[
                "mode: protected (pkvm-hyp owns guest stage-2",
                "[guest preset vcpu 0] reset: first boot",
                "vm preset: PSCI SYSTEM_RESET from vCPU 0: restarting the VM at its entry point 0x40000000 (reset 1 of at most 8; image not rewritten: a protected VM's memory is the guest's;",
                "[guest preset vcpu 0] reset: restarted from the entry point (boot 2)",
                "[guest preset vcpu 0] reset: note from boot 1 found; .data canary as the previous boot left it (image not reloaded)",
                "[guest preset vcpu 0] reset: restarted from the entry point (boot 3)",
                "vm preset: powered off (PSCI SYSTEM_OFF)",
                "vm pshare-reset: PSCI SYSTEM_RESET from vCPU 0: restarting the VM at its entry point 0x40000000 (reset 1 of at most 8; image reloaded",
                "[guest pshare-reset vcpu 0] reset: restarted from the entry point (boot 2)",
                "vm pshare-reset: powered off (PSCI SYSTEM_OFF)",
                "hyp (after teardown): pool",
                "pool: back to starting count",
                "scenario reset-protected: PASS",
            ]),
        },
        QemuTest {
            // guest-reset as an external file: x0 is the device tree's IPA,
            // so it asks for resets forever; each reset reloads the file and
            // the device tree; the VMM ends it at the limit.
            name: "qemu:external-guest-reset-limit",
            spec: RunSpec {
                scenario: "guest".into(),
                guest: Some(image::boot_target_dir().join("guests").join("guest-reset.bin")),
                initrd: None,
                protected: false,
                smp: 2,
                mem_mib: 32,
                append: String::new(),
                host_cpus: 2,
                sve: None,
                host_el2: false,
            },
            exit_code: 1,
            markers: s(&[
                "vm guest: PSCI SYSTEM_RESET from vCPU 0: restarting the VM at its entry point 0x40000000 (reset 1 of at most 8; image and device tree reloaded",
                "[guest guest vcpu 0] reset: restarted from the entry point (boot 9)",
                "vm guest: PSCI SYSTEM_RESET from vCPU 0: 8 resets already; the VM is stopped",
                "vm guest: ended: Some(Error(\"too many system resets\"))",
                "pool: back to starting count",
                "scenario guest: FAIL",
            ]),
        },
    ]
}

/// SVE with per-VM vector lengths (guest-sve, the image's `sve-switch`
/// scenario): four single-vCPU VMs on `cpus` physical CPUs (with 2 they
/// also move between CPUs, their SVE state with them), 256-bit SVE,
/// 512-bit SVE, the host's largest (the configuration's default: 2048-bit
/// on QEMU's `max` CPU) and none, each filling its registers, yielding and
/// checking them 1,000 times; configurations beyond the CPU refused by
/// name; UNDEF for SVE in the VM without it.
fn sve_test(name: &'static str, cpus: u32) -> QemuTest {
    let mut markers = strings(&[
        "sysreg: the world switch covers pkvm-sysreg's SWITCHED list on this CPU",
        "sve: ok: VM configuration sve_max_vl = 512 refused before the VM exists: VM configuration: sve_max_vl = 512 bytes is more than this CPU supports (at most 256 bytes)",
        "sve: ok: VM configuration sve_max_vl = 48 refused before the VM exists: VM configuration: sve_max_vl = 48 bytes is not a power-of-two multiple of 16 bytes",
        "[guest nosve] sve: ok: ID_AA64PFR0_EL1.SVE 0, ID_AA64ZFR0_EL1 0x0 (SVE not offered)",
        "[guest nosve] sve: ok: RDVL (SVE not offered): UNDEF at VBAR_EL1+0x200 ESR_EL1 0x2000000",
        "[guest nosve] sve: ok: ZCR_EL1 write (SVE not offered): UNDEF at VBAR_EL1+0x200 ESR_EL1 0x2000000",
        "[guest nosve] sve: 1000 rounds of fill/yield/check (q0-q31, no SVE): mismatches=0, wrong VL=0, q31 != low Z31: 0, exceptions 0",
        "[guest nosve] sve: all checks passed",
    ]);
    for (vm, vl) in [("sve-256", 32), ("sve-512", 64), ("sve-max", 256)] {
        markers.extend([
            format!("[guest {vm}] sve: ok: ID_AA64PFR0_EL1.SVE 1"),
            format!("[guest {vm}] sve: ok: RDVL {vl} bytes with ZCR_EL1.LEN 15 (VM configured with {vl}), 16 with ZCR_EL1.LEN 0"),
            format!("[guest {vm}] sve: 1000 rounds of fill/yield/check (Z0-31, P0-15, FFR at VL {vl} and 16): mismatches=0, wrong VL=0, q31 != low Z31: 0, exceptions 0"),
            format!("[guest {vm}] sve: all checks passed"),
            format!("vm {vm}: powered off (PSCI SYSTEM_OFF)"),
        ]);
    }
    markers.extend(strings(&[
        "sve: 4 VMs, 1000 rounds each, ",
        " world switches in, mismatches=0",
        "vm nosve: powered off (PSCI SYSTEM_OFF)",
        "pool: back to starting count",
        "scenario sve-switch: PASS",
    ]));
    QemuTest {
        name,
        spec: RunSpec::sched("sve-switch", 1, cpus),
        exit_code: 0,
        markers,
    }
}

/// Guests loaded from files: the hello guest (`gfile`) and the
/// all-vCPUs-off guest (`offfile`).
fn external_guest_tests(gfile: &Path, offfile: &Path) -> Vec<QemuTest> {
    let s = strings;
    vec![
        QemuTest {
            name: "qemu:external-guest",
            spec: RunSpec {
                scenario: "guest".into(),
                guest: Some(gfile.to_path_buf()),
                initrd: None,
                protected: false,
                smp: 1,
                mem_mib: 32,
                append: "console=ttyAMA0 xtask-test".into(),
                host_cpus: 0,
                sve: None,
                host_el2: false,
            },
            exit_code: 0,
            markers: s(&[
                &format!("[guest guest] {}", crate::asm::GUEST_MESSAGE),
                "vm guest: powered off (PSCI SYSTEM_OFF)",
            ]),
        },
        QemuTest {
            // pkvm-sysreg's policy as a guest sees it: sanitised ID
            // registers, UNDEFs at the guest's vector (unknown register,
            // SVE/SME/PMU not offered, read-only write), emulated
            // registers. The guest turns its vCPU off on any failure.
            name: "qemu:sysreg-undef",
            spec: RunSpec {
                scenario: "guest".into(),
                guest: Some(image::boot_target_dir().join("guests").join("guest-sysreg.bin")),
                initrd: None,
                protected: false,
                smp: 1,
                mem_mib: 32,
                append: String::new(),
                host_cpus: 1,
                sve: None,
                host_el2: false,
            },
            exit_code: 0,
            markers: s(&[
                "sysreg: the world switch covers pkvm-sysreg's SWITCHED list on this CPU",
                "[guest guest] sysreg: ok: ID_AA64PFR0_EL1.SVE:",
                "[guest guest] sysreg: ok: ZCR_EL1 write (SVE not offered): UNDEF at VBAR_EL1+0x200 ESR_EL1 0x2000000",
                "[guest guest] sysreg: ok: IMPLEMENTATION DEFINED read from EL1t: UNDEF at VBAR_EL1+0x0 ESR_EL1 0x2000000",
                "[guest guest] sysreg: ok: CTR_EL0 into x0, x1, x2, x4, x17, x30, xzr (EL2 vectors): 0x",
                "[guest guest] sysreg: all 17 checks passed",
                "vm guest: vCPU 0: UNDEF injected for EC 0x19 (SVE not offered) at PC",
                "vm guest: sysreg traps:",
                "ID_AA64PFR0_EL1 1",
                // Trapped and emulated, not the CPU's: CTR_EL0 (7 reads,
                // answered in the EL2 vectors and counted), debug and
                // physical timer.
                "most trapped: CTR_EL0 7, MDSCR_EL1 3, CSSELR_EL1 3, CNTP_CTL_EL0 3,",
                "vm guest: powered off (PSCI SYSTEM_OFF)",
                "scenario guest: PASS",
            ]),
        },
        gic_test("qemu:gic-timer-sgi-2on2", 2),
        gic_test("qemu:gic-timer-sgi-2on1", 1),
        irq_test("qemu:irq-eoi-timers-wfi-2on1", 2, 1, 1000),
        irq_test("qemu:irq-ipi-pairs-4on4", 4, 4, 1000),
        irq_test("qemu:irq-ipi-pairs-8on2", 8, 2, 1000),
        QemuTest {
            name: "qemu:external-guest-all-vcpus-off",
            spec: RunSpec {
                scenario: "guest".into(),
                guest: Some(offfile.to_path_buf()),
                initrd: None,
                protected: false,
                smp: 2,
                mem_mib: 32,
                append: String::new(),
                host_cpus: 2,
                sve: None,
                host_el2: false,
            },
            exit_code: 1,
            markers: s(&[
                "run: ended with every vCPU left off or suspended",
                "vm guest: ended: Some(Error(\"every vCPU is off or suspended",
                "pool: back to starting count",
                "scenario guest: FAIL",
            ]),
        },
        QemuTest {
            name: "qemu:external-guest-smp8on2",
            spec: RunSpec {
                scenario: "guest".into(),
                guest: Some(gfile.to_path_buf()),
                initrd: None,
                protected: false,
                smp: 8,
                mem_mib: 32,
                append: "console=ttyAMA0 xtask-test".into(),
                host_cpus: 2,
                sve: None,
                host_el2: false,
            },
            exit_code: 0,
            markers: s(&[
                "guest: flat binary",
                "8 vCPUs, 32 MiB",
                &format!("[guest guest vcpu 0] {}", crate::asm::GUEST_MESSAGE),
                "vm guest: powered off (PSCI SYSTEM_OFF)",
                "scenario guest: PASS",
            ]),
        },
    ]
}

/// The GICv3 guest (guest-gic) with 2 vCPUs on `cpus` physical CPUs:
/// virtual and physical timer interrupts after a WFI, SGI ping-pong with
/// each SGI received exactly once; the vGIC's counters at teardown.
fn gic_test(name: &'static str, cpus: u32) -> QemuTest {
    let s = strings;
    QemuTest {
        name,
        spec: RunSpec {
            scenario: "guest".into(),
            guest: Some(image::boot_target_dir().join("guests").join("guest-gic.bin")),
            initrd: None,
            protected: false,
            smp: 2,
            mem_mib: 32,
            append: String::new(),
            host_cpus: cpus,
            sve: None,
            host_el2: false,
        },
        exit_code: 0,
        markers: s(&[
            "[guest guest vcpu 0] gic: ok: ICC_SRE_EL1.SRE reads 1",
            "[guest guest vcpu 0] gic: ok: GICD_CTLR reads EnableGrp1 and ARE",
            "[guest guest vcpu 0] gic: 16-bit GICD_CTLR read: 1 exception(s), ESR_EL1 0x96000010 FAR_EL1 0x8000000",
            "[guest guest vcpu 0] gic: ok: a 16-bit GICD_CTLR read takes a synchronous external data abort",
            "[guest guest vcpu 0] gic: ok: virtual timer 10 ms ahead: IAR1 27 (want 27)",
            "[guest guest vcpu 0] gic: ok: physical timer 10 ms ahead: IAR1 30 (want 30)",
            "[guest guest vcpu 0] gic: sgi: 200 rounds: vCPU 0 got 200 pongs, vCPU 1 got 200 pings, 0 unexpected",
            "[guest guest vcpu 0] gic: ok: SGIs: each vCPU received exactly one per round",
            "[guest guest vcpu 0] gic: all checks passed",
            "vm guest: vgic: ",
            "(1 refused with an abort), 400 SGIs sent",
            "vm guest: powered off (PSCI SYSTEM_OFF)",
            "scenario guest: PASS",
        ]),
    }
}

/// The virtual PMU (image scenario `pmu`, guest-pmu as the guest file):
/// `phase` with `vcpus` vCPUs per VM on `cpus` physical CPUs. Every check
/// of the guest prints its measured values; `markers` are the checks that
/// must pass.
fn pmu_test(name: &'static str, phase: &str, vcpus: u32, cpus: u32, markers: &[&str]) -> QemuTest {
    let mut m = strings(markers);
    m.extend(strings(&[
        "pool: back to starting count",
        "scenario pmu: PASS",
    ]));
    QemuTest {
        name,
        spec: RunSpec {
            scenario: "pmu".into(),
            guest: Some(
                image::boot_target_dir()
                    .join("guests")
                    .join("guest-pmu.bin"),
            ),
            initrd: None,
            protected: false,
            smp: vcpus,
            mem_mib: 16,
            append: phase.into(),
            host_cpus: cpus,
            sve: None,
            host_el2: false,
        },
        exit_code: 0,
        markers: m,
    }
}

/// The virtual-PMU tiers: counting (1 vCPU), migration (8 vCPUs on 2
/// CPUs), isolation (a hostile and a victim VM, 2 vCPUs each on 2 CPUs).
fn pmu_tests() -> Vec<QemuTest> {
    let g = "[guest pmu] pmu: ok: ";
    let counting = [
        format!("{g}cycle counter advances while the guest runs:"),
        format!("{g}cycle counter disabled (PMCNTENCLR bit 31): 0 cycles in 5 ms"),
        format!("{g}filters at EL1: PMCCFILTR.P: 0 cycles in 5 ms; CPU_CYCLES with PMEVTYPER.U: "),
        format!("{g}3000 hypercalls: "),
        format!("{g}SW_INCR: 1000 PMSWINC writes: enabled counter 1000 (PMEVCNTR0_EL0 1000), disabled counter 0"),
        format!("{g}SW_INCR overflow: counter"),
        format!("{g}CPU_CYCLES overflow: counter"),
        "[guest pmu] pmu: all checks passed (role 0)".to_string(),
        "vm pmu: powered off (PSCI SYSTEM_OFF)".to_string(),
    ];
    let counting: Vec<&str> = counting.iter().map(String::as_str).collect();
    vec![
        pmu_test("qemu:pmu-counting", "basic", 1, 1, &counting),
        pmu_test(
            "qemu:pmu-migration-8on2",
            "migrate",
            8,
            2,
            &[
                "[guest pmu-migrate vcpu 0] pmu: ok: migrate: 8 vCPUs x 200 yields: 0 register mismatches; SW_INCR counts [200, 200, 200, 200, 200, 200, 200, 200]",
                "[guest pmu-migrate vcpu 0] pmu: all checks passed (role 1)",
                "vm pmu-migrate: vCPU migrations between physical CPUs:",
                "vm pmu-migrate: powered off (PSCI SYSTEM_OFF)",
            ],
        ),
        pmu_test(
            "qemu:pmu-isolation-2vms",
            "isolation",
            2,
            2,
            &[
                "[guest hostile vcpu 0] pmu: hostile: ",
                "[guest victim vcpu 0] pmu: ok: victim: spinning beside the hostile VM:",
                "[guest victim vcpu 0] pmu: ok: victim: 2 vCPUs x 200 yields: 0 register mismatches; SW_INCR counts [200, 200]",
                "[guest victim vcpu 0] pmu: all checks passed (role 3)",
                "vm hostile: powered off (PSCI SYSTEM_OFF)",
                "vm victim: powered off (PSCI SYSTEM_OFF)",
            ],
        ),
    ]
}

/// The interrupt guest (guest-irq) with `vcpus` vCPUs on `cpus` physical
/// CPUs: EOImode 0/1 and preemption, timer interrupts after and near their
/// deadlines (WFI and spinning), masked timers, WFI throughput, and 1,000
/// `rounds` of IPIs between every pair of vCPUs, each received once.
fn irq_test(name: &'static str, vcpus: usize, cpus: u32, rounds: usize) -> QemuTest {
    let g = "[guest guest vcpu 0] irq: ok: ";
    let mut markers = vec![
        format!("{g}EOImode 0: EOIR1 deactivates: re-pended SGI 8 taken (IAR1 8)"),
        format!("{g}EOImode 1: after EOIR1 SGI 8 stays active: re-pended, not taken (IAR1 1023)"),
        format!("{g}EOImode 1: after DIR SGI 8 is taken again (IAR1 8)"),
        format!("{g}EOImode 1 after the drop: ISACTIVER0 1 ISPENDR0 1 (IAR1 8, 1023); ICACTIVER0 deactivates (8); then 0 0 (1023)"),
        format!("{g}priority: higher SGI 10 (0x40) preempts SGI 9 (IAR1 10)"),
        format!("{g}EOImode 1: SGI 11 waits while 9 runs (9, 1023) and is taken after 9's priority drop"),
        format!("{g}virtual timer level still high after EOI: taken again (27, 27), masked: gone (1023)"),
        format!("{g}physical timer level still high after EOI: taken again (30, 30), masked: gone (1023)"),
        format!("{g}virtual timer masked while active (ISPENDR0 1), then EOI'd: not taken again (27, then 1023)"),
        format!("{g}virtual timer in WFI: 50 interrupts, 0 early or wrong"),
        format!("{g}virtual timer in WFI: late by median "),
        format!("{g}virtual timer spinning: 50 interrupts, 0 early or wrong"),
        format!("{g}physical timer in WFI: 50 interrupts, 0 early or wrong"),
        format!("{g}physical timer spinning: 50 interrupts, 0 early or wrong"),
        format!("{g}masked virtual timer (ISTATUS 1) does not fire in 3x its deadline: got 30 (want 30)"),
        format!("{g}masked physical timer (ISTATUS 1) does not fire in 3x its deadline: got 27 (want 27)"),
        format!("{g}WFI throughput with vCPU 1 in WFI: median "),
        format!("{g}latency: 200 SGI round trips, each answered (0 wrong)"),
        format!(
            "{g}IPIs: {vcpus} vCPUs, {rounds} rounds of every pair, {} SGIs in",
            vcpus * (vcpus - 1) * rounds
        ),
        "[guest guest vcpu 0] irq: all checks passed".to_string(),
    ];
    markers.extend(strings(&[
        "vm guest: powered off (PSCI SYSTEM_OFF)",
        "scenario guest: PASS",
    ]));
    QemuTest {
        name,
        spec: RunSpec {
            scenario: "guest".into(),
            guest: Some(
                image::boot_target_dir()
                    .join("guests")
                    .join("guest-irq.bin"),
            ),
            smp: vcpus as u32,
            mem_mib: 32,
            append: format!("ipi-rounds={rounds}"),
            host_cpus: cpus,
            sve: None,
            initrd: None,
            protected: false,
            host_el2: false,
        },
        exit_code: 0,
        markers,
    }
}

/// The SMP guest (a pkvm-host VM named `vm` in `scenario`) with `vcpus`
/// vCPUs on `cpus` physical CPUs: each secondary must report in twice (once
/// per CPU_ON round) with its MPIDR_EL1 and be reset by pkvm-host twice.
fn sched_smp_test(name: &'static str, scenario: &str, vm: &str, vcpus: u32, cpus: u32) -> QemuTest {
    let mut markers = vec![
        format!("sched: {vcpus} vCPUs on {cpus} physical CPUs"),
        format!("[guest {vm} vcpu 0] boot vCPU: MPIDR_EL1 0x80000000"),
    ];
    for i in 1..vcpus {
        for round in 1..=2 {
            markers.push(format!(
                "[guest {vm} vcpu {i}] secondary vCPU {i}: MPIDR_EL1 {:#x}, reporting in (round {round})",
                0x8000_0000u32 | i
            ));
        }
        markers.push(format!("sched: vCPU {i}: started 2x,"));
    }
    markers.extend([
        format!(
            "[guest {vm} vcpu 0] all {} secondaries reported in twice; SYSTEM_OFF",
            vcpus - 1
        ),
        format!("vm {vm}: powered off (PSCI SYSTEM_OFF)"),
        "pool: back to starting count".to_string(),
        format!("scenario {scenario}: PASS"),
    ]);
    if scenario.contains("protected") {
        markers.push("mode: protected (pkvm-hyp owns guest stage-2".to_string());
        markers.push("hyp (after teardown): pool".to_string());
        // Then a protected VM: its secondaries' second CPU_ON restarts
        // vCPUs that ran (accepted against the guest's own CPU_ON).
        for i in 1..vcpus {
            markers.push(format!(
                "[guest pvsmp vcpu {i}] secondary vCPU {i}: MPIDR_EL1 {:#x}, reporting in (round 2)",
                0x8000_0000u32 | i
            ));
        }
        markers.push(format!(
            "[guest pvsmp vcpu 0] all {} secondaries reported in twice; SYSTEM_OFF",
            vcpus - 1
        ));
        markers.push("vm pvsmp: powered off (PSCI SYSTEM_OFF)".to_string());
    }
    QemuTest {
        name,
        spec: RunSpec::sched(scenario, vcpus, cpus),
        exit_code: 0,
        markers,
    }
}

/// Where `qemu:debian-kernel` looks for Debian's arm64 kernel (an arm64
/// `Image`): `$PKVM_DEBIAN_KERNEL`, else `target/debian/Image` (what
/// `.ci/debian-kernel` writes).
pub fn debian_kernel_path() -> PathBuf {
    match std::env::var_os("PKVM_DEBIAN_KERNEL") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("debian").join("Image"),
    }
}

/// The tier booting Debian's kernel with the test initramfs.
const LINUX_TIER: &str = "qemu:linux-initramfs";

/// The console line the Debian kernel ends on without an initrd or disk.
const DEBIAN_END: &str = "VFS: Unable to mount root fs";

/// Debian's arm64 kernel as an external guest with its default command
/// line (console on the PL011), with 1 vCPU and with 2 vCPUs on 2 CPUs: it
/// must detect its CPU features under the VM's sanitised view, find the
/// vGIC's distributor and its redistributors, run its architected timer
/// on the vGIC's PPI, bring up every CPU (SGIs), and reach the root mount
/// (where, with no disk and no initrd, it panics; QEMU is stopped there).
/// Skipped when the kernel file is missing.
fn debian_kernel_tier(image: &Path, verbose: bool) -> Result<String> {
    let k = debian_kernel_path();
    if !k.exists() {
        return Ok(format!(
            "skipped: no Debian kernel at {} (.ci/debian-kernel fetches it)",
            k.display()
        ));
    }
    let one = debian_kernel_run(image, &k, 1, false, verbose)?;
    let two = debian_kernel_run(image, &k, 2, false, verbose)?;
    let sve = debian_kernel_run(image, &k, 1, true, verbose)?;
    Ok(format!(
        "smp 1: {one}; smp 2: {two}; smp 1 with SVE (host max): {sve}"
    ))
}

/// What the Debian kernel must print with `smp` vCPUs (and `sve`: SVE
/// offered at the host's largest vector length, found and used).
fn debian_markers(smp: u32, sve: bool) -> Vec<String> {
    let mut m: Vec<String> = [
        "Booting Linux on physical CPU",
        "CPU features: detected:",
        "GICv3: CPU0: found redistributor 0 region 0:0x00000000080a0000",
        "arch_timer: cp15 timer(s) running at",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if smp == 1 {
        m.push("smp: Brought up 1 node, 1 CPU".into());
    } else {
        m.push("GICv3: CPU1: found redistributor 1 region 0:0x00000000080c0000".into());
        m.push(format!("smp: Brought up 1 node, {smp} CPUs"));
    }
    if sve {
        m.push("SVE: maximum available vector length".into());
        m.push("CPU features: detected: Scalable Vector Extension".into());
    }
    m.push(DEBIAN_END.into());
    m
}

/// Lines the Debian kernel printed before the vGIC existed; never again.
const DEBIAN_FORBIDDEN: &[&str] = &[
    "GICv3: no distributor detected",
    "arch_timer: No interrupt available",
    "Unable to handle kernel",
];

fn debian_kernel_run(image: &Path, k: &Path, smp: u32, sve: bool, verbose: bool) -> Result<String> {
    let spec = RunSpec {
        scenario: "guest".into(),
        guest: Some(k.to_path_buf()),
        initrd: None,
        protected: false,
        smp,
        mem_mib: 256,
        append: "console=ttyAMA0 earlycon".into(),
        host_cpus: smp,
        sve: sve.then_some(0),
        host_el2: false,
    };
    let o = qemu::boot_until(
        image,
        &spec,
        Console::Capture,
        Some(QEMU_TIMEOUT),
        Some(DEBIAN_END),
    )?;
    let guest = |m: &str| {
        o.console
            .lines()
            .any(|l| l.starts_with("[guest guest") && l.contains(m))
    };
    let mut problems = Vec::new();
    if sve
        && !o
            .console
            .contains("guest: SVE offered, maximum vector length")
    {
        problems.push("the image did not offer SVE".into());
    }
    for m in debian_markers(smp, sve) {
        if !guest(&m) {
            problems.push(format!("no guest line with {m:?}"));
        }
    }
    for m in DEBIAN_FORBIDDEN {
        if guest(m) {
            problems.push(format!("guest line with {m:?}"));
        }
    }
    if !o.stopped_at {
        problems.push(format!(
            "QEMU ended without the kernel reaching the root mount (exit {:?}, timed out {})",
            o.exit_code, o.timed_out
        ));
    }
    for f in qemu::FORBIDDEN {
        if qemu::hypervisor_lines(&o.console).any(|l| l.contains(f)) {
            problems.push(format!("forbidden console marker {f:?}"));
        }
    }
    if !problems.is_empty() || verbose {
        println!(
            "---- console of qemu:debian-kernel (smp {smp}, SVE {sve}) ----\n{}---- end of console ----",
            o.console
        );
    }
    if !problems.is_empty() {
        bail!("smp {smp}, SVE {sve}: {}", problems.join("; "));
    }
    let undefs = qemu::hypervisor_lines(&o.console)
        .filter(|l| l.contains("UNDEF injected"))
        .count();
    Ok(format!(
        "GICv3, arch_timer, all CPUs up, root mount reached in {:.1?}; {undefs} UNDEF log lines",
        o.elapsed
    ))
}

fn qemu_tier(image: &Path, t: &QemuTest, verbose: bool) -> Result<String> {
    let o = qemu::boot(image, &t.spec, Console::Capture, Some(QEMU_TIMEOUT))?;
    let r = qemu::check(t, &o);
    if r.is_err() || verbose {
        println!(
            "---- console of {} ----\n{}---- end of console ----",
            t.name, o.console
        );
    }
    r.map(|()| format!("{:.1?}", o.elapsed))
}

/// Runs every tier (or those matching `only`); returns the exit code.
///
/// # Errors
/// Only for failures of xtask itself; tier failures are counted.
pub fn run_all(only: Option<&str>, verbose: bool) -> Result<i32> {
    let start = Instant::now();
    let mut t = Tally {
        passed: vec![],
        failed: vec![],
    };
    let want = |name: &str| only.is_none_or(|o| name.contains(o));
    if want("fmt") {
        let mut c = cargo();
        c.args(["fmt", "--all", "--check"]);
        t.record("fmt", run_status(c));
    }
    if want("clippy") {
        let mut c = cargo();
        c.args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        t.record("clippy", run_status(c));
    }
    if want("doc") {
        // Every public item documented and every intra-doc link resolving.
        let mut c = cargo();
        c.args(["doc", "--workspace", "--no-deps"]);
        c.env("RUSTDOCFLAGS", "-D warnings");
        t.record("doc", run_status(c));
    }
    if want("test") {
        t.record("test", test_tier());
    }
    if want("loom") {
        t.record("loom", loom_tier());
    }
    let qemu_wanted: Vec<QemuTest> = qemu_tests()?.into_iter().filter(|q| want(q.name)).collect();
    let debian = want("qemu:debian-kernel");
    let linux = want(LINUX_TIER);
    let mut image_ok = true;
    if want("boot") || !qemu_wanted.is_empty() || debian || linux {
        let r = boot_build_tier();
        image_ok = r.is_ok();
        t.record("boot:build", r);
    }
    if want("boot") {
        t.record("boot:fmt+clippy", boot_lint_tier());
    }
    if !qemu_wanted.is_empty() || debian || linux {
        let img = image::boot_target_dir()
            .join(prereq::TARGET)
            .join("release")
            .join(image::IMAGE_PKG);
        let have = prereq::ensure(true);
        for q in &qemu_wanted {
            let r = match (&have, image_ok) {
                (Err(e), _) => Err(anyhow::anyhow!("prerequisites: {e:#}")),
                (_, false) => Err(anyhow::anyhow!("the image did not build")),
                _ => qemu_tier(&img, q, verbose),
            };
            t.record(q.name, r);
        }
        if debian {
            let r = match (&have, image_ok) {
                (Err(e), _) => Err(anyhow::anyhow!("prerequisites: {e:#}")),
                (_, false) => Err(anyhow::anyhow!("the image did not build")),
                _ => debian_kernel_tier(&img, verbose),
            };
            t.record("qemu:debian-kernel", r);
        }
        if linux {
            let r = match (&have, image_ok) {
                (Err(e), _) => Err(anyhow::anyhow!("prerequisites: {e:#}")),
                (_, false) => Err(anyhow::anyhow!("the image did not build")),
                _ => crate::linux::tier(&img, verbose),
            };
            t.record(LINUX_TIER, r);
        }
    }
    println!("xtask: took {:.0?}", start.elapsed());
    if !t.failed.is_empty() {
        println!("xtask: failed tiers: {}", t.failed.join(", "));
    }
    println!(
        "xtask: {} passed, {} failed",
        t.passed.len(),
        t.failed.len()
    );
    Ok(if t.failed.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_line_is_parsed() {
        assert_eq!(
            parse_result_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"),
            Some((12, 0))
        );
        assert_eq!(
            parse_result_line("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}
