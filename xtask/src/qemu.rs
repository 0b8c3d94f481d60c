//! Booting the EL2 image under QEMU.
//!
//! The image learns what to do from a *handoff block*: one 4 KiB page that
//! xtask writes to a file and QEMU loads at [`HANDOFF_PA`] with
//! `-device loader,file=..,addr=..,force-raw=on`. An external guest file is
//! loaded the same way at [`GUEST_PA`] (right after the block), and an
//! initrd on the next page after it ([`initrd_pa`]). Without a
//! handoff block (plain `qemu -kernel image`) the image runs its demo.
//!
//! Handoff layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `PKVMHOF1` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | flags: bit 0 = run the external guest as a protected VM; bit 1 = offer it SVE; bit 2 = keep the VMM at EL2, the legacy layout (`--host-el2`; by default it runs at EL1) |
//! | 16 | 32 | scenario name, NUL-padded |
//! | 48 | 8 | guest load address (0 if none) |
//! | 56 | 8 | guest size in bytes |
//! | 64 | 4 | guest vCPUs |
//! | 68 | 4 | guest memory in MiB |
//! | 72 | 4 | command-line length |
//! | 76 | 4 | reserved |
//! | 80 | 1024 | command line (not NUL-terminated) |
//! | 1104 | 8 | initrd load address (0 if none) |
//! | 1112 | 8 | initrd size in bytes |
//! | 1120 | 4 | SVE maximum vector length in bytes (flags bit 1; 0: the host CPU's largest) |

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::RunArgs;

/// Physical address of the handoff block (see the module docs).
pub const HANDOFF_PA: u64 = 0x4800_0000;
/// Physical address an external guest file is loaded at.
pub const GUEST_PA: u64 = HANDOFF_PA + 0x1000;
/// Largest external guest file: up to the page pool at 0x5000_0000.
pub const GUEST_MAX: u64 = 0x5000_0000 - GUEST_PA;
/// Handoff magic.
pub const MAGIC: &[u8; 8] = b"PKVMHOF1";
const CMDLINE_MAX: usize = 1024;

/// What to ask the image to do.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// Scenario name (`demo` when empty).
    pub scenario: String,
    /// External guest file, its vCPU count, memory and command line.
    pub guest: Option<PathBuf>,
    /// Its initrd.
    pub initrd: Option<PathBuf>,
    /// Run it as a protected VM (pkvm-hyp owns its memory).
    pub protected: bool,
    /// Guest vCPUs.
    pub smp: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Guest command line.
    pub append: String,
    /// Physical CPUs QEMU emulates (`-smp`); 0 means [`DEFAULT_HOST_CPUS`].
    pub host_cpus: u32,
    /// Offer the external guest SVE with this maximum vector length in
    /// bytes (0: the host CPU's largest); `None`: no SVE.
    pub sve: Option<u32>,
    /// Keep the VMM (the host role) at EL2 (handoff flags bit 2), for this
    /// run only; [`set_host_el2`] turns it on for every run.
    pub host_el2: bool,
}

/// `cargo xtask test --host-el2`: every run of this process asks for the
/// VMM at EL2.
static HOST_EL2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every later run of this process ask for the VMM at EL2.
pub fn set_host_el2(on: bool) {
    HOST_EL2.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether every run of this process keeps the VMM at EL2
/// (`cargo xtask test --host-el2`).
pub fn host_el2_everywhere() -> bool {
    HOST_EL2.load(std::sync::atomic::Ordering::Relaxed)
}

/// Checks `--sve BYTES`: a vector length the architecture allows (a power
/// of two in 16..=256 bytes). Whether the CPU has it is the image's check
/// (its policy refuses a length above the CPU's, naming `sve_max_vl`).
///
/// # Errors
/// The value and what is allowed.
pub fn validate_sve(bytes: u32) -> Result<u32> {
    ensure!(
        bytes.is_power_of_two() && (16..=256).contains(&bytes),
        "--sve {bytes}: the maximum vector length must be a power of two in 16..=256 bytes (128..=2048 bits); leave the value out for the host CPU's largest"
    );
    Ok(bytes)
}

/// Physical CPUs of a QEMU run unless a spec asks otherwise.
pub const DEFAULT_HOST_CPUS: u32 = 4;
/// Default `--timeout` of a scenario run (seconds).
pub const DEFAULT_SCENARIO_TIMEOUT_S: u64 = 300;
/// Bytes the image reserves at the top of an external guest's RAM for its
/// device tree (`crates/boot/src/vmm/guest.rs`, `DTB_RESERVE`).
pub const DTB_RESERVE: u64 = 2 << 20;

/// The image's scenarios (`cargo xtask run --scenario`); the names are the
/// ones the image dispatches on (`crates/boot/src/vmm/mod.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Standard-mode VMs, then the hypervisor with shared and donated memory.
    Demo,
    /// Demand paging of a touch region.
    Touch,
    /// MMIO, hypercall and PSCI exits.
    Exits,
    /// Protected mode (pkvm-hyp owns guest stage-2).
    Protected,
    /// SMP guest on the vCPU scheduler (standard mode).
    SchedSmp,
    /// SMP guest on the vCPU scheduler (protected mode).
    SchedSmpProtected,
    /// A spinning vCPU cannot starve the others (needs >= 3 vCPUs).
    SchedSpin,
    /// Guest system resets (three VMs).
    Reset,
    /// Guest system resets of a protected VM (two VMs).
    ResetProtected,
    /// Two vCPUs reset the VM at the same moment (needs >= 2 vCPUs).
    ResetConcurrent,
    /// SVE state and per-VM vector lengths across world switches (three
    /// VMs: 256-bit, 512-bit, no SVE).
    SveSwitch,
    /// Hardware breakpoints, watchpoints and single-step on migrating vCPUs.
    Debug,
    /// A hostile VM's debug and timer state does not reach another VM.
    DebugIsolation,
    /// A full set/way clean/invalidate loop: trapped, the VM's memory flushed by VA.
    Setway,
    /// The host at EL1 under its stage-2 attacks protected VMs and the
    /// hypervisor; every attempt must be refused.
    HostAttack,
    /// A deliberate panic of the image (tests the panic path).
    Panic,
}

impl Scenario {
    /// The name the image knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Demo => "demo",
            Scenario::Touch => "touch",
            Scenario::Exits => "exits",
            Scenario::Protected => "protected",
            Scenario::SchedSmp => "sched-smp",
            Scenario::SchedSmpProtected => "sched-smp-protected",
            Scenario::SchedSpin => "sched-spin",
            Scenario::Reset => "reset",
            Scenario::ResetProtected => "reset-protected",
            Scenario::ResetConcurrent => "reset-concurrent",
            Scenario::SveSwitch => "sve-switch",
            Scenario::Debug => "debug",
            Scenario::DebugIsolation => "debug-isolation",
            Scenario::Setway => "setway",
            Scenario::HostAttack => "host-attack",
            Scenario::Panic => "panic",
        }
    }

    /// vCPUs per VM: (default, least, most) for `--smp`. The `reset*`
    /// scenarios run several VMs in the image's 16 scheduler slots.
    pub fn smp_range(self) -> (u32, u32, u32) {
        match self {
            Scenario::SchedSmp | Scenario::SchedSmpProtected => (4, 1, 8),
            Scenario::SchedSpin => (3, 3, 8),
            Scenario::Reset => (2, 1, 5),
            Scenario::ResetProtected => (2, 1, 8),
            Scenario::ResetConcurrent => (2, 2, 8),
            Scenario::Debug => (8, 1, 8),
            Scenario::DebugIsolation => (2, 1, 8),
            _ => (1, 1, 8),
        }
    }
}

/// The `--timeout` of `cargo xtask run`: as given (0: none), else
/// [`DEFAULT_SCENARIO_TIMEOUT_S`] for a scenario and none with `--guest`.
pub fn run_timeout(a: &RunArgs) -> Option<Duration> {
    let secs = match (a.timeout, &a.guest) {
        (Some(s), _) => s,
        (None, Some(_)) => 0,
        (None, None) => DEFAULT_SCENARIO_TIMEOUT_S,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Checks a `--guest` file before anything starts: a readable, non-empty
/// regular file of at most [`GUEST_MAX`] bytes that fits in `mem_mib` MiB
/// of guest RAM with its device tree (an arm64 `Image` at its header's
/// `text_offset`, checked without overflow). Returns its size.
///
/// # Errors
/// What is wrong with the file, naming it.
pub fn validate_guest(path: &Path, mem_mib: u32) -> Result<u64> {
    guest_layout(path, mem_mib).map(|(len, _)| len)
}

/// [`validate_guest`], returning the file's size and its placement.
fn guest_layout(path: &Path, mem_mib: u32) -> Result<(u64, pkvm_arch::image::GuestLayout)> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("guest file {shown}"))?;
    ensure!(
        meta.is_file(),
        "guest file {shown} is not a regular file{}",
        if meta.is_dir() {
            " (it is a directory)"
        } else {
            ""
        }
    );
    let len = meta.len();
    ensure!(len > 0, "guest file {shown} is empty");
    ensure!(
        len <= GUEST_MAX,
        "guest file {shown} is {len} bytes, larger than the {GUEST_MAX} bytes QEMU can load below the image's page pool"
    );
    let mut head = Vec::with_capacity(pkvm_arch::image::HEADER_LEN);
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(pkvm_arch::image::HEADER_LEN as u64)
                .read_to_end(&mut head)
        })
        .with_context(|| format!("guest file {shown} cannot be read"))?;
    let mem = u64::from(mem_mib) << 20;
    let layout = pkvm_arch::image::guest_layout_of(&head, len, mem, DTB_RESERVE)
        .map_err(|e| anyhow::anyhow!("guest file {shown}: {e} (--mem {mem_mib})"))?;
    Ok((len, layout))
}

/// Where QEMU loads an initrd when the guest file has `guest_len` bytes:
/// the next page after it.
pub fn initrd_pa(guest_len: u64) -> u64 {
    (GUEST_PA + guest_len).next_multiple_of(4096)
}

/// Checks an `--initrd` file for the `--guest` file `guest` and `--mem`
/// before anything starts: a non-empty regular file that QEMU can load
/// after the guest file below the page pool, and that fits in guest RAM
/// after the kernel and below the device tree. Returns (guest file size,
/// initrd size).
///
/// # Errors
/// What is wrong, naming the file and what to change.
pub fn validate_initrd(initrd: &Path, guest: &Path, mem_mib: u32) -> Result<(u64, u64)> {
    let (glen, layout) = guest_layout(guest, mem_mib)?;
    ensure!(
        layout.header.is_some(),
        "--initrd needs a Linux arm64 Image as --guest: {} has no Image header (magic \"ARM\\x64\" at byte 56); pass the kernel's Image (not vmlinuz or a flat binary)",
        guest.display()
    );
    let shown = initrd.display();
    let meta = std::fs::metadata(initrd).with_context(|| format!("initrd {shown}"))?;
    ensure!(meta.is_file(), "initrd {shown} is not a regular file");
    let len = meta.len();
    ensure!(len > 0, "initrd {shown} is empty");
    let room = 0x5000_0000 - initrd_pa(glen);
    ensure!(
        len <= room,
        "initrd {shown} is {len} bytes; with the {glen}-byte guest file QEMU can load at most {room} bytes of it below the image's page pool"
    );
    let mem = u64::from(mem_mib) << 20;
    pkvm_arch::image::initrd_offset(&layout, len, mem, DTB_RESERVE)
        .map_err(|e| anyhow::anyhow!("initrd {shown}: {e} (--mem {mem_mib})"))?;
    Ok((glen, len))
}

impl RunSpec {
    /// The spec for `cargo xtask run` options (the guest file checked with
    /// [`validate_guest`]).
    ///
    /// # Errors
    /// Out-of-range `--smp`/`--cpus`/`--mem` (for the scenario), an
    /// over-long `--append`, or an unusable guest file.
    pub fn from_args(a: &RunArgs) -> Result<RunSpec> {
        ensure!(
            (1..=8).contains(&a.cpus),
            "--cpus must be 1..=8, got {}",
            a.cpus
        );
        ensure!(
            (4..=512).contains(&a.mem) && a.mem.is_multiple_of(2),
            "--mem must be an even number of MiB in 4..=512, got {}",
            a.mem
        );
        let append = a.append.clone().unwrap_or_default();
        ensure!(
            append.len() <= CMDLINE_MAX,
            "--append is longer than {CMDLINE_MAX} bytes"
        );
        let (scenario, (default_smp, min, max)) = match (&a.guest, a.scenario) {
            (Some(_), _) => ("guest", (1, 1, 8)),
            (None, Some(s)) => (s.name(), s.smp_range()),
            (None, None) => ("demo", Scenario::Demo.smp_range()),
        };
        let smp = a.smp.unwrap_or(default_smp);
        ensure!(
            (min..=max).contains(&smp),
            "--smp must be {min}..={max} for {}, got {smp}",
            if a.guest.is_some() {
                "--guest".to_string()
            } else {
                format!("scenario {scenario}")
            }
        );
        let sve = match a.sve {
            Some(Some(bytes)) => Some(validate_sve(bytes)?),
            Some(None) => Some(0),
            None => None,
        };
        if let Some(g) = &a.guest {
            validate_guest(g, a.mem)?;
            if let Some(i) = &a.initrd {
                validate_initrd(i, g, a.mem)?;
            }
        }
        Ok(RunSpec {
            scenario: scenario.to_string(),
            guest: a.guest.clone(),
            initrd: a.initrd.clone().filter(|_| a.guest.is_some()),
            protected: a.protected,
            smp,
            mem_mib: a.mem,
            append,
            host_cpus: a.cpus,
            sve: sve.filter(|_| a.guest.is_some()),
            host_el2: a.host_el2,
        })
    }

    /// A built-in scenario.
    pub fn scenario(name: &str) -> RunSpec {
        RunSpec {
            scenario: name.into(),
            smp: 1,
            mem_mib: 64,
            ..RunSpec::default()
        }
    }

    /// A scheduler scenario (`sched-*`): `vcpus` guest vCPUs on
    /// `host_cpus` physical CPUs.
    pub fn sched(name: &str, vcpus: u32, host_cpus: u32) -> RunSpec {
        RunSpec {
            smp: vcpus,
            host_cpus,
            ..RunSpec::scenario(name)
        }
    }
}

/// Encodes the handoff block for `spec` with a guest of `guest_size` bytes
/// and an initrd of `initrd_size` bytes (0: none).
pub fn handoff_block(spec: &RunSpec, guest_size: u64, initrd_size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    let ext = spec.guest.is_some();
    let host_el2 = spec.host_el2 || HOST_EL2.load(std::sync::atomic::Ordering::Relaxed);
    let flags = u32::from(spec.protected && ext)
        | (u32::from(spec.sve.is_some() && ext) << 1)
        | (u32::from(host_el2) << 2);
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    let name = spec.scenario.as_bytes();
    let n = name.len().min(31);
    b[16..16 + n].copy_from_slice(&name[..n]);
    if spec.guest.is_some() {
        b[48..56].copy_from_slice(&GUEST_PA.to_le_bytes());
        b[56..64].copy_from_slice(&guest_size.to_le_bytes());
    }
    b[64..68].copy_from_slice(&spec.smp.to_le_bytes());
    b[68..72].copy_from_slice(&spec.mem_mib.to_le_bytes());
    let cmd = spec.append.as_bytes();
    let n = cmd.len().min(CMDLINE_MAX);
    b[72..76].copy_from_slice(&(n as u32).to_le_bytes());
    b[80..80 + n].copy_from_slice(&cmd[..n]);
    if spec.guest.is_some() && initrd_size > 0 {
        b[1104..1112].copy_from_slice(&initrd_pa(guest_size).to_le_bytes());
        b[1112..1120].copy_from_slice(&initrd_size.to_le_bytes());
    }
    if let Some(vl) = spec.sve.filter(|_| ext) {
        b[1120..1124].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

/// How to treat the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// Print every line as it arrives (and keep it).
    Stream,
    /// Only keep it (tests print it on failure).
    Capture,
}

/// What a QEMU run produced.
#[derive(Debug)]
pub struct Outcome {
    /// QEMU's exit code (`None`: killed by the timeout or a signal).
    pub exit_code: Option<i32>,
    /// The console transcript.
    pub console: String,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Whether it was stopped because the console showed the `until`
    /// line of [`boot_until`] (a guest that never powers off).
    pub stopped_at: bool,
    /// When the first line with [`Watch::mark`] arrived.
    pub mark_at: Option<Duration>,
    /// Wall time.
    pub elapsed: Duration,
}

/// The QEMU command line of this project (the issue's) with `cpus`
/// physical CPUs, plus the loader devices for the handoff block and guest.
pub fn qemu_command(
    image: &Path,
    handoff: Option<&Path>,
    guest: Option<&Path>,
    initrd: Option<(&Path, u64)>,
    cpus: u32,
) -> Command {
    let mut c = Command::new(crate::prereq::QEMU);
    c.args([
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        &cpus.to_string(),
        "-m",
        "1G",
        "-nographic",
        "-semihosting",
        "-no-reboot",
        "-kernel",
    ])
    .arg(image);
    if let Some(h) = handoff {
        c.arg("-device").arg(format!(
            "loader,file={},addr={HANDOFF_PA:#x},force-raw=on",
            h.display()
        ));
    }
    if let Some(g) = guest {
        c.arg("-device").arg(format!(
            "loader,file={},addr={GUEST_PA:#x},force-raw=on",
            g.display()
        ));
    }
    if let Some((i, pa)) = initrd {
        c.arg("-device").arg(format!(
            "loader,file={},addr={pa:#x},force-raw=on",
            i.display()
        ));
    }
    c
}

/// Boots `image` with `spec`; kills QEMU after `timeout` (if given).
///
/// # Errors
/// QEMU cannot be started, or the guest file is unusable.
pub fn boot(
    image: &Path,
    spec: &RunSpec,
    console: Console,
    timeout: Option<Duration>,
) -> Result<Outcome> {
    boot_until(image, spec, console, timeout, None)
}

/// [`boot`], and QEMU is also stopped as soon as a console line contains
/// `until` (for a guest that ends in a loop, such as a kernel's panic).
///
/// # Errors
/// As [`boot`].
pub fn boot_until(
    image: &Path,
    spec: &RunSpec,
    console: Console,
    timeout: Option<Duration>,
    until: Option<&str>,
) -> Result<Outcome> {
    let w = Watch {
        until,
        ..Watch::default()
    };
    boot_watched(image, spec, console, timeout, &w)
}

/// What [`boot_watched`] looks for on the console as lines arrive.
#[derive(Clone, Copy, Debug, Default)]
pub struct Watch<'a> {
    /// Stop QEMU at the first line containing this.
    pub until: Option<&'a str>,
    /// Record when the first line containing this arrived
    /// ([`Outcome::mark_at`]).
    pub mark: Option<&'a str>,
    /// When a line contains `.0`, write `.1` to QEMU's serial input (the
    /// EL2 image's UART, which feeds the guest's PL011): once.
    pub send: Option<(&'a str, &'a [u8])>,
}

/// [`boot`] with a [`Watch`] on the console.
///
/// # Errors
/// As [`boot`].
pub fn boot_watched(
    image: &Path,
    spec: &RunSpec,
    console: Console,
    timeout: Option<Duration>,
    watch: &Watch<'_>,
) -> Result<Outcome> {
    let (guest_size, initrd_size) = match (&spec.guest, &spec.initrd) {
        (Some(g), Some(i)) => validate_initrd(i, g, spec.mem_mib)?,
        (Some(g), None) => (validate_guest(g, spec.mem_mib)?, 0),
        (None, _) => (0, 0),
    };
    let dir = crate::image::boot_target_dir().join("handoff");
    std::fs::create_dir_all(&dir)?;
    let handoff = dir.join(format!(
        "handoff-{}-{}.bin",
        std::process::id(),
        spec.scenario
    ));
    std::fs::write(&handoff, handoff_block(spec, guest_size, initrd_size))?;
    let canon = |g: &PathBuf| std::fs::canonicalize(g).unwrap_or_else(|_| g.clone());
    let guest = spec.guest.as_ref().map(canon);
    let initrd = spec.initrd.as_ref().filter(|_| initrd_size > 0).map(canon);
    let cpus = if spec.host_cpus == 0 {
        DEFAULT_HOST_CPUS
    } else {
        spec.host_cpus
    };
    let initrd_at = initrd.as_deref().map(|i| (i, initrd_pa(guest_size)));
    let mut cmd = qemu_command(image, Some(&handoff), guest.as_deref(), initrd_at, cpus);
    let r = run_command(&mut cmd, console, timeout, watch);
    let _ = std::fs::remove_file(&handoff);
    r
}

/// Runs a QEMU command line (`cmd`) to its end, the timeout or
/// `watch.until`, streaming or capturing its console.
///
/// # Errors
/// QEMU cannot be started.
pub fn run_command(
    cmd: &mut Command,
    console: Console,
    timeout: Option<Duration>,
    watch: &Watch<'_>,
) -> Result<Outcome> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if watch.send.is_some() {
        cmd.stdin(Stdio::piped());
    } else if console == Console::Capture {
        cmd.stdin(Stdio::null());
    }
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut stdin = child.stdin.take();
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().context("qemu stdout")?;
    let err = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    let t_out = std::thread::spawn(move || pump(out, tx, console));
    let t_err = std::thread::spawn(move || pump(err, tx2, console));
    let mut timed_out = false;
    let mut stopped_at = false;
    let mut mark_at = None;
    let mut sent = false;
    let mut console_text = String::new();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        let mut stop = false;
        for line in rx.try_iter() {
            let has = |m: Option<&str>| m.is_some_and(|m| line.contains(m));
            if mark_at.is_none() && has(watch.mark) {
                mark_at = Some(start.elapsed());
            }
            if let (Some((on, bytes)), Some(inp), false) = (watch.send, stdin.as_mut(), sent) {
                if line.contains(on) {
                    use std::io::Write;
                    let _ = inp.write_all(bytes).and_then(|()| inp.flush());
                    sent = true;
                }
            }
            stop |= has(watch.until);
            console_text.push_str(&line);
        }
        if stop {
            stopped_at = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let _ = t_out.join();
    let _ = t_err.join();
    console_text.extend(rx.try_iter());
    Ok(Outcome {
        exit_code: status.and_then(|s| s.code()),
        console: console_text,
        timed_out,
        stopped_at,
        mark_at,
        elapsed: start.elapsed(),
    })
}

fn pump(r: impl Read, tx: mpsc::Sender<String>, console: Console) {
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let s = String::from_utf8_lossy(&line).replace('\r', "");
                if console == Console::Stream {
                    print!("{s}");
                }
                let _ = tx.send(s);
            }
        }
    }
}

/// A QEMU integration test: a scenario, and what the console and exit
/// status must show.
#[derive(Clone)]
pub struct QemuTest {
    /// Test name.
    pub name: &'static str,
    /// What to boot.
    pub spec: RunSpec,
    /// Expected QEMU exit code.
    pub exit_code: i32,
    /// Lines that must appear (substring match), in any order.
    pub markers: Vec<String>,
}

/// Markers that fail any test when the hypervisor prints them.
pub const FORBIDDEN: &[&str] = &["PANIC", "panicked at", "EL2 exception"];

/// How the image starts every line a guest prints (its emulated PL011):
/// `[guest NAME vcpu N] ...` (`crates/boot/src/vmm/guest.rs`,
/// `GUEST_LINE_PREFIX`).
pub const GUEST_LINE_PREFIX: &str = "[guest ";

/// The console lines the hypervisor printed itself (not a guest's).
pub fn hypervisor_lines(console: &str) -> impl Iterator<Item = &str> {
    console
        .lines()
        .filter(|l| !l.starts_with(GUEST_LINE_PREFIX))
}

/// Whether marker `m` is on the console: a marker that starts with
/// [`GUEST_LINE_PREFIX`] is guest output and may be anywhere; any other
/// marker must be on a line the hypervisor printed, so a guest cannot fake
/// it.
fn has_marker(console: &str, m: &str) -> bool {
    if m.starts_with(GUEST_LINE_PREFIX) {
        console.contains(m)
    } else {
        hypervisor_lines(console).any(|l| l.contains(m))
    }
}

/// Runs one test; `Ok(())` when exit status and markers are as expected.
///
/// # Errors
/// A description of what was wrong (the console is printed by the caller).
pub fn check(t: &QemuTest, o: &Outcome) -> Result<()> {
    if o.timed_out {
        bail!("timed out after {:.1?}", o.elapsed);
    }
    let mut problems = Vec::new();
    if o.exit_code != Some(t.exit_code) {
        problems.push(format!(
            "exit code {:?}, expected {}",
            o.exit_code, t.exit_code
        ));
    }
    for m in &t.markers {
        if !has_marker(&o.console, m) {
            problems.push(format!("missing console marker {m:?}"));
        }
    }
    for f in FORBIDDEN {
        if hypervisor_lines(&o.console).any(|l| l.contains(f)) {
            problems.push(format!("forbidden console marker {f:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// The one-line verdict of `cargo xtask run`: (success, line). Success
/// is QEMU's exit status 0 with the image's `scenario NAME: PASS` (for a
/// `--guest`: the guest powered off with PSCI SYSTEM_OFF); otherwise the
/// line names the first cause the console shows (a hypervisor panic, an
/// EL2 exception, a vCPU's internal error, how the guest ended), only from
/// the hypervisor's own lines (a guest cannot fake them).
pub fn verdict(spec: &RunSpec, o: &Outcome) -> (bool, String) {
    let who = if spec.guest.is_some() {
        "guest".to_string()
    } else {
        format!("scenario {}", spec.scenario)
    };
    let find = |m: &str| hypervisor_lines(&o.console).find(|l| l.contains(m));
    let pass = format!("scenario {}: PASS", spec.scenario);
    if o.exit_code == Some(0) && find(&pass).is_some() {
        let how = if spec.guest.is_some() {
            "powered off (PSCI SYSTEM_OFF)"
        } else {
            "PASS"
        };
        return (true, format!("xtask: verdict: {who} {how}, exit 0"));
    }
    let cause = if let Some(l) = find("PANIC on CPU") {
        format!("hypervisor panic: {}", l.trim())
    } else if let Some(l) = find("EL2 exception") {
        format!("unhandled EL2 exception: {}", l.trim())
    } else if let Some(l) = find(": vCPU ").filter(|l| l.contains(" stopped: ")) {
        format!("internal error: {}", l.trim())
    } else if let Some(l) = find(": ended: ") {
        format!("the VM did not power off: {}", l.trim())
    } else if o.timed_out {
        "QEMU killed by --timeout".to_string()
    } else {
        match o.exit_code {
            Some(c) => format!("QEMU exit status {c}"),
            None => "QEMU killed by a signal".to_string(),
        }
    };
    (
        false,
        format!(
            "xtask: verdict: {who} FAILED ({cause}), exit {:?}",
            o.exit_code
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_block_encodes_fields_at_documented_offsets() {
        let spec = RunSpec {
            scenario: "guest".into(),
            guest: Some(PathBuf::from("/x")),
            initrd: Some(PathBuf::from("/y")),
            protected: false,
            smp: 2,
            mem_mib: 96,
            append: "console=ttyAMA0".into(),
            host_cpus: 0,
            sve: None,
            host_el2: false,
        };
        let b = handoff_block(&spec, 1234, 77);
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..8], MAGIC);
        assert_eq!(&b[16..21], b"guest");
        assert_eq!(b[21], 0);
        assert_eq!(u64::from_le_bytes(b[48..56].try_into().unwrap()), GUEST_PA);
        assert_eq!(u64::from_le_bytes(b[56..64].try_into().unwrap()), 1234);
        assert_eq!(u32::from_le_bytes(b[64..68].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[68..72].try_into().unwrap()), 96);
        assert_eq!(u32::from_le_bytes(b[72..76].try_into().unwrap()), 15);
        assert_eq!(&b[80..95], b"console=ttyAMA0");
        let at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(at(1104), GUEST_PA + 0x1000);
        assert_eq!(at(1112), 77);
    }

    /// `--host-el2` is flags bit 2, on its own or with the guest's flags.
    #[test]
    fn host_el2_is_handoff_flags_bit_2() {
        let flags = |s: &RunSpec| {
            let b = handoff_block(s, 0, 0);
            u32::from_le_bytes(b[12..16].try_into().unwrap())
        };
        let mut s = RunSpec::scenario("demo");
        assert_eq!(flags(&s), 0);
        s.host_el2 = true;
        assert_eq!(flags(&s), 4);
        let run =
            RunSpec::from_args(&parse(&["--host-el2", "--scenario", "touch"]).unwrap()).unwrap();
        assert!(run.host_el2);
        assert_eq!(flags(&run), 4);
    }

    #[test]
    fn sched_spec_sets_vcpus_and_host_cpus() {
        let s = RunSpec::sched("sched-smp", 8, 2);
        assert_eq!(
            (s.scenario.as_str(), s.smp, s.host_cpus),
            ("sched-smp", 8, 2)
        );
        let b = handoff_block(&s, 0, 0);
        assert_eq!(u32::from_le_bytes(b[64..68].try_into().unwrap()), 8);
        let cmd = qemu_command(Path::new("img"), None, None, None, s.host_cpus);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let i = args.iter().position(|a| a == "-smp").unwrap();
        assert_eq!(args[i + 1], "2");
    }

    fn args(smp: Option<u32>, mem: u32, cpus: u32) -> RunArgs {
        RunArgs {
            smp,
            mem,
            cpus,
            ..RunArgs::default()
        }
    }

    #[test]
    fn run_args_are_validated() {
        assert!(RunSpec::from_args(&args(Some(0), 64, 4)).is_err());
        assert!(RunSpec::from_args(&args(Some(1), 0, 4)).is_err());
        assert!(RunSpec::from_args(&args(Some(1), 3, 4)).is_err());
        assert!(RunSpec::from_args(&args(Some(1), 63, 4)).is_err());
        assert!(RunSpec::from_args(&args(Some(1), 64, 0)).is_err());
        let spec = RunSpec::from_args(&args(Some(8), 64, 2)).unwrap();
        assert_eq!(
            (spec.scenario.as_str(), spec.smp, spec.host_cpus),
            ("demo", 8, 2)
        );
    }

    /// The `cargo xtask run` command line, parsed as clap does.
    fn parse(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut v = vec!["run"];
        v.extend_from_slice(argv);
        <Cmd as clap::Parser>::try_parse_from(v).map(|c| c.run)
    }

    /// `--scenario` used to be checked only by the image, after QEMU had
    /// booted.
    #[test]
    fn unknown_scenario_is_rejected_by_the_parser() {
        let e = parse(&["--scenario", "sched-spinn"]).expect_err("rejected");
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(e.to_string().contains("sched-spin"), "{e}");
        let a = parse(&["--scenario", "reset-concurrent"]).unwrap();
        assert_eq!(a.scenario, Some(Scenario::ResetConcurrent));
        assert_eq!(RunSpec::from_args(&a).unwrap().scenario, "reset-concurrent");
    }

    /// `sched-spin` failed with the default `--smp 1`.
    #[test]
    fn scenarios_default_to_a_vcpu_count_they_work_with() {
        let a = parse(&["--scenario", "sched-spin"]).unwrap();
        assert_eq!(RunSpec::from_args(&a).unwrap().smp, 3);
        let a = parse(&["--scenario", "sched-spin", "--smp", "1"]).unwrap();
        let e = RunSpec::from_args(&a).unwrap_err().to_string();
        assert!(
            e.contains("--smp must be 3..=8 for scenario sched-spin"),
            "{e}"
        );
        let a = parse(&["--scenario", "reset", "--smp", "6"]).unwrap();
        assert!(RunSpec::from_args(&a).is_err());
        let a = parse(&[]).unwrap();
        assert_eq!(RunSpec::from_args(&a).unwrap().smp, 1);
    }

    #[test]
    fn timeout_defaults_to_none_for_a_guest_and_is_available() {
        let a = parse(&["--scenario", "reset"]).unwrap();
        assert_eq!(
            run_timeout(&a),
            Some(Duration::from_secs(DEFAULT_SCENARIO_TIMEOUT_S))
        );
        let a = parse(&["--guest", "/x"]).unwrap();
        assert_eq!(run_timeout(&a), None);
        let a = parse(&["--guest", "/x", "--timeout", "5"]).unwrap();
        assert_eq!(run_timeout(&a), Some(Duration::from_secs(5)));
        let a = parse(&["--timeout", "0"]).unwrap();
        assert_eq!(run_timeout(&a), None);
    }

    /// `--sve [BYTES]`: off by default; without a value the host's
    /// largest (0 in the block); a length the architecture does not allow
    /// is refused before QEMU starts, naming the value and the range.
    #[test]
    fn sve_flag_is_validated_and_carried_in_the_handoff_block() {
        let d = scratch("guest-sve");
        let flat = d.join("flat.bin");
        std::fs::write(&flat, [0xd5u8; 8192]).unwrap();
        let g = flat.to_str().unwrap();
        let spec = |argv: &[&str]| {
            let mut v = vec!["--guest", g];
            v.extend_from_slice(argv);
            RunSpec::from_args(&parse(&v).unwrap())
        };
        let sve_of = |s: &RunSpec| {
            let b = handoff_block(s, 8192, 0);
            let flags = u32::from_le_bytes(b[12..16].try_into().unwrap());
            let vl = u32::from_le_bytes(b[1120..1124].try_into().unwrap());
            (flags & 2 != 0, vl)
        };
        let off = spec(&[]).unwrap();
        assert_eq!((off.sve, sve_of(&off)), (None, (false, 0)));
        let max = spec(&["--sve"]).unwrap();
        assert_eq!((max.sve, sve_of(&max)), (Some(0), (true, 0)));
        let v64 = spec(&["--sve", "64"]).unwrap();
        assert_eq!((v64.sve, sve_of(&v64)), (Some(64), (true, 64)));
        for bad in ["0", "8", "48", "512"] {
            let e = spec(&["--sve", bad]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("--sve {bad}: the maximum vector length must be a power of two in 16..=256 bytes")),
                "{e}"
            );
        }
        assert!(parse(&["--sve", "64"]).is_err(), "--sve needs --guest");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A scratch directory for guest files of one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `--guest DIR` passed the check and QEMU failed later.
    #[test]
    fn guest_that_is_a_directory_or_empty_or_missing_is_refused_before_qemu() {
        let d = scratch("guest-kinds");
        let e = validate_guest(&d, 64).unwrap_err().to_string();
        assert!(e.contains("not a regular file (it is a directory)"), "{e}");
        let empty = d.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        let e = validate_guest(&empty, 64).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        assert!(validate_guest(&d.join("missing.bin"), 64).is_err());
        let flat = d.join("flat.bin");
        std::fs::write(&flat, [0xd5u8; 8192]).unwrap();
        assert_eq!(validate_guest(&flat, 64).unwrap(), 8192);
        // The same checks when the spec is built from the command line.
        let a = parse(&["--guest", d.to_str().unwrap()]).unwrap();
        assert!(RunSpec::from_args(&a).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// An arm64 `Image` header with `text_offset` near 2^64, or an
    /// `image_size` beyond guest RAM, is refused with a clear error.
    #[test]
    fn guest_image_with_hostile_header_is_refused() {
        let d = scratch("guest-headers");
        let img = |text: u64, size: u64| {
            let mut f = vec![0u8; 4096];
            f[8..16].copy_from_slice(&text.to_le_bytes());
            f[16..24].copy_from_slice(&size.to_le_bytes());
            f[56..60].copy_from_slice(b"ARM\x64");
            f
        };
        let p = d.join("Image");
        std::fs::write(&p, img(u64::MAX - 0xfff, 0x10_0000)).unwrap();
        let e = validate_guest(&p, 64).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        std::fs::write(&p, img(0, 1 << 40)).unwrap();
        let e = validate_guest(&p, 64).unwrap_err().to_string();
        assert!(e.contains("give it more memory"), "{e}");
        std::fs::write(&p, img(0x20_0000, 0x40_0000)).unwrap();
        assert!(validate_guest(&p, 64).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// An initrd larger than guest RAM, or one that does not fit with the
    /// kernel and the device tree, is refused before QEMU starts with the
    /// `--mem` to use.
    #[test]
    fn initrd_that_does_not_fit_is_refused_with_the_memory_it_needs() {
        let d = scratch("initrd");
        let mut k = vec![0u8; 4096];
        k[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
        k[16..24].copy_from_slice(&(8u64 << 20).to_le_bytes());
        k[56..60].copy_from_slice(b"ARM\x64");
        let kp = d.join("Image");
        std::fs::write(&kp, &k).unwrap();
        let ip = d.join("initrd");
        std::fs::File::create(&ip)
            .unwrap()
            .set_len(20 << 20)
            .unwrap();
        let e = validate_initrd(&ip, &kp, 16).unwrap_err().to_string();
        assert!(e.contains("larger than the guest's 16 MiB"), "{e}");
        let e = validate_initrd(&ip, &kp, 24).unwrap_err().to_string();
        assert!(e.contains("give it at least 32 MiB"), "{e}");
        assert_eq!(validate_initrd(&ip, &kp, 32).unwrap(), (4096, 20 << 20));
        std::fs::write(&ip, b"").unwrap();
        let e = validate_initrd(&ip, &kp, 64).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        // Not a kernel: an initrd needs an Image to go with.
        let flat = d.join("flat.bin");
        std::fs::write(&flat, [0u8; 4096]).unwrap();
        let e = validate_initrd(&kp, &flat, 64).unwrap_err().to_string();
        assert!(e.contains("no Image header"), "{e}");
        // The same check from the command line; --initrd needs --guest.
        std::fs::File::create(&ip)
            .unwrap()
            .set_len(20 << 20)
            .unwrap();
        let (g, i) = (kp.to_str().unwrap(), ip.to_str().unwrap());
        let a = parse(&["--guest", g, "--initrd", i, "--mem", "24"]).unwrap();
        assert!(RunSpec::from_args(&a).is_err());
        assert!(parse(&["--initrd", i]).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    fn outcome(code: Option<i32>, console: &str) -> Outcome {
        Outcome {
            exit_code: code,
            console: console.into(),
            timed_out: false,
            stopped_at: false,
            mark_at: None,
            elapsed: Duration::ZERO,
        }
    }

    /// `cargo xtask run --guest` said PASS (exit 0) for a crashed guest.
    #[test]
    fn verdict_fails_on_errors_panics_and_traps_and_passes_system_off() {
        let spec = RunSpec {
            scenario: "guest".into(),
            guest: Some(PathBuf::from("/k")),
            ..RunSpec::default()
        };
        let off = "vm guest: powered off (PSCI SYSTEM_OFF)\nscenario guest: PASS\n";
        let (ok, line) = verdict(&spec, &outcome(Some(0), off));
        assert!(ok, "{line}");
        assert!(line.contains("powered off (PSCI SYSTEM_OFF)"), "{line}");
        let cases = [
            (
                "vm guest: vCPU 0 stopped: Unhandled(..) (PC 0x1)\nvm guest: ended: Some(Error(\"internal error\"))\nscenario guest: FAIL\n",
                Some(1),
                "internal error: vm guest: vCPU 0 stopped",
            ),
            (
                "vm guest: ended: Some(Error(\"halted\"))\nscenario guest: FAIL\n",
                Some(1),
                "did not power off",
            ),
            ("\nPANIC on CPU 1: oops\n", Some(101), "hypervisor panic: PANIC on CPU 1"),
            ("EL2 exception (vector 3) ESR_EL2=0x0\n", Some(3), "unhandled EL2 exception"),
            // Exit 0 without the image's PASS line is no success either.
            ("[guest guest] scenario guest: PASS\n", Some(0), "QEMU exit status 0"),
        ];
        for (console, code, want) in cases {
            let (ok, line) = verdict(&spec, &outcome(code, console));
            assert!(!ok && line.contains(want), "{console:?}: {line}");
        }
        let mut t = outcome(None, "");
        t.timed_out = true;
        assert!(verdict(&spec, &t).1.contains("--timeout"));
    }

    #[test]
    fn check_reports_missing_and_forbidden_markers() {
        let t = QemuTest {
            name: "t",
            spec: RunSpec::scenario("demo"),
            exit_code: 0,
            markers: vec!["all good".into()],
        };
        let mk = |code, console: &str| Outcome {
            exit_code: Some(code),
            console: console.into(),
            timed_out: false,
            stopped_at: false,
            mark_at: None,
            elapsed: Duration::ZERO,
        };
        assert!(check(&t, &mk(0, "x\nall good\n")).is_ok());
        assert!(check(&t, &mk(1, "all good\n")).is_err());
        assert!(check(&t, &mk(0, "nothing\n")).is_err());
        assert!(check(&t, &mk(0, "all good\nPANIC at foo\n")).is_err());
    }

    /// A guest printing the hypervisor's success line must not make a
    /// test pass; its own lines still match guest markers.
    #[test]
    fn guest_output_cannot_fake_hypervisor_markers() {
        let t = QemuTest {
            name: "t",
            spec: RunSpec::scenario("demo"),
            exit_code: 0,
            markers: vec![
                "scenario demo: PASS".into(),
                "[guest vm0 vcpu 0] hello".into(),
            ],
        };
        let mk = |console: &str| Outcome {
            exit_code: Some(0),
            console: console.into(),
            timed_out: false,
            stopped_at: false,
            mark_at: None,
            elapsed: Duration::ZERO,
        };
        let faked = "[guest vm0 vcpu 0] hello\n[guest vm0 vcpu 0] scenario demo: PASS\n";
        let e = check(&t, &mk(faked)).unwrap_err().to_string();
        assert!(e.contains("scenario demo: PASS"), "{e}");
        let real = "[guest vm0 vcpu 0] hello\nscenario demo: PASS\n";
        assert!(check(&t, &mk(real)).is_ok());
        // A guest printing "PANIC" is the guest's business.
        let guest_panic = "[guest vm0 vcpu 0] hello PANIC\nscenario demo: PASS\n";
        assert!(check(&t, &mk(guest_panic)).is_ok());
    }
}
