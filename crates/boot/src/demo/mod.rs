//! The demo host: safe logic on top of the platform layer. It plays the
//! host (KVM) role and the hypervisor's stage-2 management at once, at EL2;
//! it is what pkvm-host's run loop and pkvm-hyp's hypercalls replace.
//!
//! - [`pool`]: the page pool and per-VM memory caches.
//! - [`vm`]: the VM table, stage-2 faults, the run loop.
//! - [`fdtgen`]: the VM device tree.
//! - this file: secondary-CPU job mailboxes and the scenarios xtask runs
//!   (`demo`, `touch`, `exits`, `guest`).
#![forbid(unsafe_code)]

pub mod fdtgen;
pub mod pool;
pub mod vm;

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pkvm_sync::{LockClass, SpinLock};

use crate::platform::dt::Platform;
use crate::platform::handoff::POOL_START;
use crate::platform::{phys, start, MAX_CPUS};
use crate::println;
use vm::{code, Boot, VcpuEnd, Vm, VmSpec};

static GUEST_TOUCHER: &[u8] =
    include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-toucher.bin"));
static GUEST_MMIO: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-mmio.bin"));
static GUEST_HVC: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-hvc.bin"));
static GUEST_PSCI: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-psci.bin"));

const MIB: u64 = 1 << 20;

/// A vCPU to run on some physical CPU.
#[derive(Clone, Copy)]
struct Job {
    vm: &'static Vm,
    vcpu: usize,
    boot: Boot,
}

#[allow(clippy::declare_interior_mutable_const)]
const NO_JOB: SpinLock<Option<Job>> = SpinLock::new(None, LockClass::Leaf);
#[allow(clippy::declare_interior_mutable_const)]
const NO_END: SpinLock<Option<VcpuEnd>> = SpinLock::new(None, LockClass::Leaf);
static MAILBOX: [SpinLock<Option<Job>>; MAX_CPUS] = [NO_JOB; MAX_CPUS];
static RESULT: [SpinLock<Option<VcpuEnd>>; MAX_CPUS] = [NO_END; MAX_CPUS];
static BUSY: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static NCPUS: AtomicUsize = AtomicUsize::new(1);
static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MAX_RUNNING: AtomicUsize = AtomicUsize::new(0);

fn run_job(cpu: usize, job: Job) {
    let now = RUNNING.fetch_add(1, Ordering::AcqRel) + 1;
    MAX_RUNNING.fetch_max(now, Ordering::AcqRel);
    let end = vm::run_vcpu(job.vm, job.vcpu, job.boot, &cpu_on);
    RUNNING.fetch_sub(1, Ordering::AcqRel);
    *RESULT[cpu].lock() = Some(end);
}

/// PSCI CPU_ON from a guest: run the vCPU on an idle secondary CPU.
fn cpu_on(vm: &'static Vm, vcpu: usize, boot: Boot) -> bool {
    let n = NCPUS.load(Ordering::Relaxed);
    (1..n).any(|cpu| {
        if BUSY[cpu]
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            *MAILBOX[cpu].lock() = Some(Job { vm, vcpu, boot });
            true
        } else {
            false
        }
    })
}

/// The job loop of a secondary CPU.
pub fn secondary(cpu: usize) -> ! {
    loop {
        let job = MAILBOX[cpu].lock().take();
        match job {
            Some(j) => {
                run_job(cpu, j);
                BUSY[cpu].store(false, Ordering::Release);
            }
            None => core::hint::spin_loop(),
        }
    }
}

/// Runs vCPU 0 of each VM, at most one per CPU at a time (CPU `i % n`
/// after the secondaries), and returns how each ended.
fn run_group<const N: usize>(vms: [(&'static Vm, Boot); N]) -> [VcpuEnd; N] {
    let n = NCPUS.load(Ordering::Relaxed);
    let mut ends = [VcpuEnd::Error("not run"); N];
    let mut i = 0;
    while i < N {
        // One wave: secondaries first, then CPU 0.
        let mut wave: [(usize, usize); MAX_CPUS] = [(usize::MAX, 0); MAX_CPUS];
        let mut k = 0;
        while k < n && i < N {
            let cpu = if k + 1 < n { k + 1 } else { 0 };
            wave[k] = (cpu, i);
            k += 1;
            i += 1;
        }
        for &(cpu, j) in &wave[..k] {
            if cpu != 0 {
                BUSY[cpu].store(true, Ordering::Release);
                *MAILBOX[cpu].lock() = Some(Job {
                    vm: vms[j].0,
                    vcpu: 0,
                    boot: vms[j].1,
                });
            }
        }
        for &(cpu, j) in &wave[..k] {
            if cpu == 0 {
                run_job(
                    0,
                    Job {
                        vm: vms[j].0,
                        vcpu: 0,
                        boot: vms[j].1,
                    },
                );
            }
        }
        for &(cpu, j) in &wave[..k] {
            while BUSY[cpu].load(Ordering::Acquire) && cpu != 0 {
                core::hint::spin_loop();
            }
            ends[j] = RESULT[cpu]
                .lock()
                .take()
                .unwrap_or(VcpuEnd::Error("no result"));
        }
    }
    ends
}

/// Entry of the demo on the boot CPU; returns the exit status.
pub fn main(p: &'static Platform) -> i32 {
    pool::POOL.lock().init(POOL_START, p.ram_end);
    let mut online = 1;
    for i in 1..p.ncpus {
        match start::start_secondary(i, p.cpus[i]) {
            Ok(()) => online += 1,
            Err(e) => {
                println!(
                    "cpus: CPU {i} (MPIDR {:#x}) did not start: {e:?}",
                    p.cpus[i]
                );
                break;
            }
        }
    }
    NCPUS.store(online, Ordering::Relaxed);
    let start_free = pool::free_frames();
    println!(
        "cpus: {online} online (secondaries started with PSCI CPU_ON over SMC); pool: {start_free} free frames ({} MiB) at {POOL_START:#x}",
        start_free as u64 * 4096 / MIB
    );
    let scenario = p.handoff.as_ref().map(|h| h.scenario()).unwrap_or("demo");
    println!("scenario {scenario}: start");
    let (ok, code) = match scenario {
        "demo" => bool_code(demo()),
        "touch" => bool_code(touch()),
        "exits" => bool_code(exits()),
        "guest" => guest(p),
        "panic" => panic!("deliberate panic (scenario \"panic\")"),
        other => {
            println!("scenario {other}: unknown (known: demo, touch, exits, guest, panic)");
            (false, 2)
        }
    };
    let end_free = pool::free_frames();
    let pool_ok = end_free == start_free;
    if pool_ok {
        println!("pool: back to starting count ({end_free} free frames)");
    } else {
        println!("pool: NOT back to starting count: {start_free} at start, {end_free} now");
    }
    if ok && pool_ok {
        println!("scenario {scenario}: PASS");
        code
    } else {
        println!("scenario {scenario}: FAIL");
        if code == 0 {
            1
        } else {
            code
        }
    }
}

fn bool_code(ok: bool) -> (bool, i32) {
    (ok, if ok { 0 } else { 1 })
}

fn builtin(
    name: &'static str,
    image: &'static [u8],
    mem: u64,
    blocks: bool,
) -> Option<(&'static Vm, Boot)> {
    if image.is_empty() {
        println!("vm {name}: guest payload missing (build with `cargo xtask`)");
        return None;
    }
    let spec = VmSpec {
        name,
        mem,
        blocks,
        image,
        load_offset: 0,
        vcpus: 1,
        dtb_bootargs: None,
    };
    match vm::create(&spec) {
        Ok(v) => Some(v),
        Err(e) => {
            println!("vm {name}: create failed: {e}");
            None
        }
    }
}

/// Prints the end of a VM, its statistics, destroys it and prints what was
/// returned. Returns whether it powered off normally.
fn finish(vm: &'static Vm, end: VcpuEnd) -> bool {
    let name = vm.info().name;
    let off = end == VcpuEnd::PowerOff;
    match end {
        VcpuEnd::PowerOff => println!("vm {name}: powered off (PSCI SYSTEM_OFF)"),
        other => println!("vm {name}: ended: {other:?}"),
    }
    vm::print_stats(vm);
    let mapped = vm.stats.pages_mapped.load(Ordering::Relaxed);
    vm::destroy(vm);
    let returned = vm.stats.pages_returned.load(Ordering::Relaxed);
    println!("vm {name}: destroyed: pages mapped {mapped}, returned {returned}");
    off && mapped == returned
}

fn check(what: &str, ok: bool) -> bool {
    if !ok {
        println!("check failed: {what}");
    }
    ok
}

fn touch_vm(
    name: &'static str,
    mem: u64,
    base: u64,
    size: u64,
    blocks: bool,
) -> Option<(&'static Vm, Boot)> {
    let (vm, mut boot) = builtin(name, GUEST_TOUCHER, mem, blocks)?;
    boot.args = [base, size, 0, 0];
    Some((vm, boot))
}

fn touch_ok(vm: &Vm, size: u64, faults: u64) -> bool {
    let pages = size / 4096;
    check("touch report", vm.report(code::TOUCH) == Some((0, pages)))
        & check(
            "fault count",
            vm.stats.faults.load(Ordering::Relaxed) == faults,
        )
}

/// Two VMs touch 64 MiB each at once: 4K mappings (16384 faults) and 2M
/// blocks (32 faults).
fn touch() -> bool {
    let size = 64 * MIB;
    let Some(a) = touch_vm("touch-4k", 128 * MIB, 0x4400_0000, size, false) else {
        return false;
    };
    let Some(b) = touch_vm("touch-2m", 128 * MIB, 0x4400_0000, size, true) else {
        return false;
    };
    let ends = run_group([a, b]);
    let ok = touch_ok(a.0, size, size / 4096) & touch_ok(b.0, size, size / (2 * MIB));
    ok & finish(a.0, ends[0]) & finish(b.0, ends[1])
}

/// MMIO, HVC/SMC and PSCI/abort-injection guests at once.
fn exits() -> bool {
    let Some(m) = builtin("mmio", GUEST_MMIO, 4 * MIB, false) else {
        return false;
    };
    let Some(h) = builtin("hvc", GUEST_HVC, 4 * MIB, false) else {
        return false;
    };
    let Some(p) = builtin("psci", GUEST_PSCI, 4 * MIB, false) else {
        return false;
    };
    let ends = run_group([m, h, p]);
    let mut ok = exits_ok(m.0, h.0, p.0);
    ok &= finish(m.0, ends[0]);
    ok &= finish(h.0, ends[1]);
    ok & finish(p.0, ends[2])
}

fn exits_ok(m: &Vm, h: &Vm, p: &Vm) -> bool {
    let l = |c: &core::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let v11 = pkvm_arch::smccc::psci::version(1, 1) as u64;
    let esr = p.report(code::EXCEPTION).map_or(0, |r| r.0);
    check("mmio: unclaimed mmio exit", l(&m.stats.mmio_unclaimed) >= 1)
        & check(
            "mmio: unbacked read value",
            m.report(code::MMIO_READ) == Some((0, 0x0a00_0000)),
        )
        & check(
            "hvc: undefined hvc -> NOT_SUPPORTED",
            h.report(code::HVC_UNDEF).map(|r| r.0 as i64) == Some(-1),
        )
        & check(
            "hvc: PSCI version",
            h.report(code::PSCI_VERSION) == Some((v11, 0)),
        )
        & check("hvc: trapped smc", h.report(code::SMC) == Some((v11, 0)))
        & check(
            "psci: injected instruction abort (EC 0x21, FSC 0x10)",
            esr >> 26 == 0x21 && esr & 0x3f == 0x10,
        )
        & check("psci: wfi trapped", l(&p.stats.wfx) >= 1)
}

/// The default demo: five VMs over the CPUs, two waves.
fn demo() -> bool {
    let size = 32 * MIB;
    let Some(a) = touch_vm("toucher-4k", 64 * MIB, 0x4200_0000, size, false) else {
        return false;
    };
    let Some(b) = touch_vm("toucher-2m", 64 * MIB, 0x4200_0000, size, true) else {
        return false;
    };
    let Some(m) = builtin("mmio", GUEST_MMIO, 4 * MIB, false) else {
        return false;
    };
    let Some(h) = builtin("hvc", GUEST_HVC, 4 * MIB, false) else {
        return false;
    };
    let Some(p) = builtin("psci", GUEST_PSCI, 4 * MIB, false) else {
        return false;
    };
    MAX_RUNNING.store(0, Ordering::Relaxed);
    let ends = run_group([a, b, m, h, p]);
    let all = [a.0, b.0, m.0, h.0, p.0];
    let mut vmids = [0u16; 5];
    let mut cpus = [0usize; 5];
    for (i, v) in all.iter().enumerate() {
        vmids[i] = v.info().vmid;
        cpus[i] = v.info().cpu;
    }
    let distinct_vmids = (0..5).all(|i| (0..i).all(|j| vmids[i] != vmids[j]));
    let wave = NCPUS.load(Ordering::Relaxed).min(5);
    let distinct_cpus = (0..wave).all(|i| (0..i).all(|j| cpus[i] != cpus[j]));
    let max = MAX_RUNNING.load(Ordering::Relaxed);
    println!("demo: at most {max} VMs running at once; VMIDs {vmids:?}; CPUs {cpus:?}");
    let conc = max >= 2 && distinct_vmids && distinct_cpus && wave >= 2;
    if conc {
        println!("demo: concurrent VMs on distinct CPUs with distinct VMIDs");
    }
    let mut ok = check("concurrency", conc)
        & touch_ok(a.0, size, size / 4096)
        & touch_ok(b.0, size, size / (2 * MIB))
        & exits_ok(m.0, h.0, p.0);
    for (v, e) in all.iter().zip(ends) {
        ok &= finish(v, e);
    }
    ok
}

/// An external guest from the handoff block: returns (ok, exit status);
/// status 0 iff the guest powered off with PSCI SYSTEM_OFF.
fn guest(p: &'static Platform) -> (bool, i32) {
    let Some(h) = p.handoff.as_ref() else {
        return (false, 2);
    };
    let Some((gpa, gsize)) = h.guest else {
        println!("guest: no guest file in the handoff block");
        return (false, 2);
    };
    let ncpus = NCPUS.load(Ordering::Relaxed);
    let vcpus = h.smp as usize;
    if vcpus == 0 || vcpus > vm::MAX_VCPUS || vcpus > ncpus {
        println!(
            "guest: {vcpus} vCPUs requested; 1..={} supported here",
            vm::MAX_VCPUS.min(ncpus)
        );
        return (false, 2);
    }
    let mem = h.mem_mib as u64 * MIB;
    let created = phys::with_slice(pkvm_arch::Pa(gpa), gsize, |img| {
        // A Linux arm64 Image has "ARM\x64" at 0x38 and its text offset at 8.
        let is_image = img.len() >= 64 && img[0x38..0x3c] == *b"ARMd";
        let load_offset = if is_image {
            let text = u64::from_le_bytes(img[8..16].try_into().unwrap_or([0; 8]));
            let size = u64::from_le_bytes(img[16..24].try_into().unwrap_or([0; 8]));
            if size == 0 {
                0x8_0000
            } else {
                text
            }
        } else {
            0
        };
        println!(
            "guest: {} of {gsize} bytes, loaded at IPA {:#x}, {vcpus} vCPUs, {} MiB",
            if is_image {
                "Linux arm64 Image"
            } else {
                "flat binary"
            },
            vm::GUEST_RAM + load_offset,
            mem / MIB
        );
        let spec = VmSpec {
            name: "guest",
            mem,
            blocks: false,
            image: img,
            load_offset,
            vcpus,
            dtb_bootargs: Some(h.cmdline()),
        };
        vm::create(&spec)
    });
    let (v, boot) = match created {
        Ok(x) => x,
        Err(e) => {
            println!("guest: cannot create the VM: {e}");
            return (false, 2);
        }
    };
    let end = vm::run_vcpu(v, 0, boot, &cpu_on);
    // Other vCPUs stop at their next exit; wait a bounded time for them.
    let mut spins = 0u64;
    while v.vcpus_running.load(Ordering::Acquire) > 0 && spins < 200_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
    if v.vcpus_running.load(Ordering::Acquire) > 0 {
        println!("vm guest: ended: {end:?}; other vCPUs still running, not destroyed");
        vm::print_stats(v);
        return (
            end == VcpuEnd::PowerOff,
            if end == VcpuEnd::PowerOff { 0 } else { 1 },
        );
    }
    let ok = finish(v, end);
    (ok, if ok { 0 } else { 1 })
}
