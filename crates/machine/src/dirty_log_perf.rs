//! KVM's `dirty_log_perf_test` on the simulated platform: N vCPUs populate
//! their memory, dirty logging starts, and each iteration every vCPU
//! touches every page of its region once (a write with probability
//! `write_percent`, else a read); the VMM then gets (and with manual
//! protect, clears) the dirty log.
//!
//! With `verify`, the guest records every page it writes, and each
//! iteration's bitmap must equal exactly that set (with "initially all
//! set", the first one must be all ones). An optional notifier storm
//! migrates and ages random pages of guest memory while the vCPUs run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use pkvm_arch::{Hva, Ipa, PAGE_SIZE};
use pkvm_host::dirty::{INITIALLY_SET, MANUAL_PROTECT_ENABLE};
use pkvm_host::memslot::{UserMemoryRegion, MEM_LOG_DIRTY_PAGES};
use pkvm_host::psci::{PsciVm, ResetState};
use pkvm_host::{VcpuExit, VmConfig};
use pkvm_sim::cpu::{GuestProgram, Op};
use pkvm_sim::mm::ProcessMm;
use pkvm_sim::{Coherence, Machine, SimConfig};

use crate::backend::SimBackend;
use crate::demand_paging::{Backing, RunFailure, GUEST_BASE};
use crate::platform::{Mode, SimPlatform};
use crate::process::{SimProcess, VmNotifier};
use crate::SimVm;

/// Configuration of a run (the selftest's flags in brackets).
#[derive(Clone, Debug)]
pub struct Config {
    /// vCPUs (`-v`).
    pub vcpus: usize,
    /// Bytes per vCPU (`-b`).
    pub bytes_per_vcpu: u64,
    /// Backing (`-s`).
    pub backing: Backing,
    /// Iterations (`-i`).
    pub iterations: u32,
    /// Manual protect with "initially all set" (`-g`).
    pub manual_protect: bool,
    /// Eager split chunk size, 0 = split on fault (`-e`).
    pub eager_split_chunk: u64,
    /// Percent of pages written per iteration (`-w`).
    pub write_percent: u32,
    /// Check every bitmap against the pages the guest wrote.
    pub verify: bool,
    /// Migrate and age random guest pages while the vCPUs run.
    pub notifier_storm: bool,
    /// TLB coherence checking.
    pub coherence: Coherence,
    /// Seed.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vcpus: 1,
            bytes_per_vcpu: 64 << 20,
            backing: Backing::Anonymous,
            iterations: 2,
            manual_protect: false,
            eager_split_chunk: 0,
            write_percent: 100,
            verify: false,
            notifier_storm: false,
            coherence: Coherence::EveryUse,
            seed: 1,
        }
    }
}

/// One iteration's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Iteration {
    /// 1-based.
    pub n: u32,
    /// Slowest vCPU's time to touch its region.
    pub dirty_memory_seconds: f64,
    /// `get_dirty_log` time.
    pub get_dirty_log_seconds: f64,
    /// `clear_dirty_log` time (manual protect; else 0).
    pub clear_dirty_log_seconds: f64,
    /// Pages the guest wrote.
    pub pages_written: u64,
    /// Pages the bitmap reported.
    pub pages_dirty: u64,
    /// Written but not reported (verify; must be 0).
    pub missing: u64,
    /// Reported but not written (verify; must be 0).
    pub extra: u64,
    /// Stage-2 faults during the iteration.
    pub faults: u64,
}

/// Results of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// vCPUs.
    pub vcpus: usize,
    /// Bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// Backing.
    pub backing: Backing,
    /// Manual protect + initially set.
    pub manual_protect: bool,
    /// Eager split chunk (0 = off).
    pub eager_split_chunk: u64,
    /// Write percent.
    pub write_percent: u32,
    /// Populate time.
    pub populate_seconds: f64,
    /// Enabling dirty logging time.
    pub enable_seconds: f64,
    /// Per iteration.
    pub iterations: Vec<Iteration>,
    /// Disabling dirty logging time.
    pub disable_seconds: f64,
    /// Bitmaps checked against the guest's writes.
    pub verified: bool,
    /// Notifier events the storm caused.
    pub storm_events: u64,
    /// Coherence violations (must be 0).
    pub coherence_violations: usize,
    /// Host frames not returned after teardown (must be 0).
    pub frames_leaked: i64,
}

/// The guest of one iteration: one access per page, a write with
/// probability `write_percent`, recording the pages it writes.
struct DirtyGuest {
    base: Ipa,
    pages: u64,
    next: u64,
    rng: u64,
    write_percent: u32,
    populate: bool,
    /// Bitmap of written pages, indexed from the slot's first page.
    written: Arc<Vec<AtomicU64>>,
    first_page: u64,
}

impl DirtyGuest {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl GuestProgram for DirtyGuest {
    fn next_op(&mut self, _regs: &[u64; 31]) -> Option<Op> {
        if self.next >= self.pages {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let ipa = Ipa(self.base.0 + i * PAGE_SIZE);
        let write = self.populate || (self.rand() % 100) < self.write_percent as u64;
        let op = if write {
            let p = self.first_page + i;
            self.written[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
            Op::write(ipa, 8)
        } else {
            Op::read(ipa, 8)
        };
        Some(match op {
            Op::Access {
                ipa, kind, size, ..
            } => Op::Access {
                ipa,
                kind,
                size,
                verify: false,
                plain: true,
            },
            o => o,
        })
    }
}

pub(crate) struct Built {
    pub machine: Arc<Machine>,
    pub platform: Arc<SimPlatform>,
    pub mm: Arc<ProcessMm>,
    pub process: SimProcess,
    pub vm: Arc<SimVm>,
    pub hva: Hva,
    pub bytes: u64,
    pub frames_before: u64,
}

pub(crate) fn build(cfg: &Config) -> Result<Built, RunFailure> {
    let g = match cfg.backing {
        Backing::Anonymous => PAGE_SIZE,
        Backing::AnonymousThp | Backing::Hugetlb2M => 2 << 20,
        Backing::Hugetlb1G => 1 << 30,
    };
    if cfg.vcpus == 0 || cfg.vcpus > 16 {
        return Err(RunFailure::Config(format!("{} vCPUs: 1..=16", cfg.vcpus)));
    }
    if cfg.bytes_per_vcpu == 0 || !cfg.bytes_per_vcpu.is_multiple_of(g) {
        return Err(RunFailure::Config(format!(
            "bytes per vCPU {:#x}: a non-zero multiple of the backing page size {g:#x}",
            cfg.bytes_per_vcpu
        )));
    }
    if cfg.write_percent > 100 || cfg.iterations == 0 {
        return Err(RunFailure::Config(
            "write percent 0..=100 and at least one iteration".into(),
        ));
    }
    let bytes = cfg.bytes_per_vcpu * cfg.vcpus as u64;
    let gib = 1u64 << 30;
    let machine = Machine::new(SimConfig {
        mem_size: (bytes + g + (512 << 20)).div_ceil(gib) * gib,
        hyp_carveout: 64 << 20,
        ncpus: cfg.vcpus,
        coherence: cfg.coherence,
        ..SimConfig::default()
    })?;
    let platform = SimPlatform::new(machine.clone(), Mode::Standard)?;
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let process = SimProcess::new(mm.clone());
    let frames_before = machine.host_frames().stats().in_use;
    SimPlatform::set_current_cpu(0);
    let vm = SimVm::create(
        platform.clone(),
        Arc::new(process.clone()),
        VmConfig {
            nr_vcpus: cfg.vcpus,
            ..VmConfig::default()
        },
        0,
    )?;
    mm.register_notifier(VmNotifier::new(&vm));
    let bad = |e: pkvm_host::dirty::DirtyLogError| RunFailure::Config(e.to_string());
    vm.set_eager_split_chunk_size(cfg.eager_split_chunk)
        .map_err(bad)?;
    if cfg.manual_protect {
        vm.set_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE | INITIALLY_SET)
            .map_err(bad)?;
    }
    let hva = mm.mmap(bytes, cfg.backing_kind())?;
    set_slot(&vm, hva, bytes, 0)?;
    for i in 0..cfg.vcpus {
        vm.vcpu_power(i).lock().power_on(ResetState {
            pc: 0x8_0000,
            context_id: 0,
            big_endian: false,
            reset: true,
        });
    }
    Ok(Built {
        machine,
        platform,
        mm,
        process,
        vm,
        hva,
        bytes,
        frames_before,
    })
}

impl Config {
    fn backing_kind(&self) -> pkvm_sim::mm::VmaKind {
        use pkvm_sim::mm::VmaKind;
        match self.backing {
            Backing::Anonymous => VmaKind::Anonymous4K,
            Backing::AnonymousThp => VmaKind::AnonymousThp,
            Backing::Hugetlb2M => VmaKind::Hugetlb2M,
            Backing::Hugetlb1G => VmaKind::Hugetlb1G,
        }
    }
}

fn set_slot(vm: &SimVm, hva: Hva, bytes: u64, flags: u32) -> Result<(), RunFailure> {
    vm.set_user_memory_region(
        UserMemoryRegion {
            slot: 0,
            flags,
            guest_phys_addr: GUEST_BASE.0,
            memory_size: bytes,
            userspace_addr: hva.0,
        },
        crate::platform::NOTIFIER_CPU,
    )?;
    Ok(())
}

/// What the main thread tells the vCPU threads.
pub(crate) struct Round {
    /// Iteration number (0 = populate); `u32::MAX` = stop.
    n: AtomicU64,
    start: Barrier,
    done: Barrier,
    seconds: Mutex<Vec<f64>>,
    error: Mutex<Option<String>>,
}

/// Runs a vCPU thread: one guest program per round until told to stop.
pub(crate) fn vcpu_thread(
    b: &Built,
    cfg: &Config,
    i: usize,
    round: &Round,
    written: &Arc<Vec<AtomicU64>>,
) {
    SimPlatform::set_current_cpu(i);
    let setup = || -> Result<_, String> {
        let vcpu = b.vm.vcpu(i).map_err(|e| e.to_string())?;
        let cpu = b.machine.cpu(i).map_err(|e| e.to_string())?;
        Ok((vcpu, SimBackend::new(cpu, b.platform.clone(), 1 << 16)))
    };
    let mut ctx = setup();
    let pages = cfg.bytes_per_vcpu / PAGE_SIZE;
    loop {
        round.start.wait();
        let n = round.n.load(Ordering::Acquire);
        if n == u32::MAX as u64 {
            return;
        }
        let t0 = Instant::now();
        let r = match &mut ctx {
            Err(e) => Err(e.clone()),
            Ok((vcpu, be)) => {
                be.cpu_mut().set_program(Box::new(DirtyGuest {
                    base: Ipa(GUEST_BASE.0 + i as u64 * cfg.bytes_per_vcpu),
                    pages,
                    next: 0,
                    rng: cfg.seed.wrapping_mul(0x9e37_79b9) ^ (n << 32) ^ (i as u64 + 1),
                    write_percent: cfg.write_percent,
                    populate: n == 0,
                    written: written.clone(),
                    first_page: i as u64 * pages,
                }));
                run_to_end(vcpu, be)
            }
        };
        round
            .seconds
            .lock()
            .unwrap()
            .push(t0.elapsed().as_secs_f64());
        if let Err(e) = r {
            round
                .error
                .lock()
                .unwrap()
                .get_or_insert(format!("vcpu {i}: {e}"));
        }
        round.done.wait();
    }
}

fn run_to_end(vcpu: &mut crate::SimVcpu, be: &mut SimBackend) -> Result<(), String> {
    loop {
        match vcpu.run(be) {
            VcpuExit::Halted => return Ok(()),
            VcpuExit::Interrupted | VcpuExit::Wfi => {}
            e => return Err(format!("{e:?} (guest error {:?})", be.guest_error)),
        }
    }
}

/// Migrates and ages random pages of `[hva, hva + bytes)` until `stop`.
fn storm(mm: &ProcessMm, hva: Hva, bytes: u64, seed: u64, stop: &AtomicBool) -> u64 {
    let mut x = seed | 1;
    let mut events = 0;
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = Hva(hva.0 + (x % (bytes / PAGE_SIZE)) * PAGE_SIZE);
        if x & 1 == 0 {
            events += u64::from(mm.migrate(page).is_ok());
        } else {
            mm.age(page, Hva(page.0 + 64 * PAGE_SIZE));
            events += 1;
        }
        std::thread::yield_now();
    }
    events
}

impl Round {
    pub(crate) fn new(vcpus: usize) -> Round {
        Round {
            n: AtomicU64::new(0),
            start: Barrier::new(vcpus + 1),
            done: Barrier::new(vcpus + 1),
            seconds: Mutex::new(Vec::new()),
            error: Mutex::new(None),
        }
    }

    /// Tells the vCPU threads to exit.
    pub(crate) fn stop(&self) {
        self.n.store(u32::MAX as u64, Ordering::Release);
        self.start.wait();
    }
}

/// Tears the VM and the process down; returns (coherence violations,
/// frames leaked).
pub(crate) fn teardown(b: Built) -> (usize, i64) {
    b.vm.teardown(0);
    drop(b.vm);
    b.mm.exit();
    drop(b.process);
    drop(b.mm);
    (
        b.machine.check().len(),
        b.machine.host_frames().stats().in_use as i64 - b.frames_before as i64,
    )
}

/// Runs the workload and tears everything down.
///
/// # Errors
/// See [`RunFailure`]; a verify mismatch is an error too.
pub fn run(cfg: &Config) -> Result<Report, RunFailure> {
    let b = build(cfg)?;
    let npages = b.bytes / PAGE_SIZE;
    let words = npages.div_ceil(64) as usize;
    let written: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
    let round = Round::new(cfg.vcpus);
    let stop = AtomicBool::new(false);
    let mut storm_events = 0;
    let result = std::thread::scope(|scope| {
        for i in 0..cfg.vcpus {
            let (b, round, written) = (&b, &round, &written);
            scope.spawn(move || vcpu_thread(b, cfg, i, round, written));
        }
        let storm_thread = cfg.notifier_storm.then(|| {
            let (mm, hva, bytes, stop) = (&b.mm, b.hva, b.bytes, &stop);
            scope.spawn(move || storm(mm, hva, bytes, cfg.seed, stop))
        });
        let r = drive(&b, cfg, &round, &written);
        round.stop();
        stop.store(true, Ordering::Release);
        if let Some(t) = storm_thread {
            storm_events = t.join().unwrap_or(0);
        }
        r
    });
    let mut report = result?;
    report.storm_events = storm_events;
    finish(b, report)
}

/// Runs one round on every vCPU; returns the slowest vCPU's time.
pub(crate) fn one_round(round: &Round, n: u32) -> Result<f64, RunFailure> {
    round.seconds.lock().unwrap().clear();
    round.n.store(n as u64, Ordering::Release);
    round.start.wait();
    round.done.wait();
    if let Some(e) = round.error.lock().unwrap().take() {
        return Err(RunFailure::Vcpu { index: 0, what: e });
    }
    Ok(round
        .seconds
        .lock()
        .unwrap()
        .iter()
        .copied()
        .fold(0.0, f64::max))
}

fn drive(
    b: &Built,
    cfg: &Config,
    round: &Round,
    written: &[AtomicU64],
) -> Result<Report, RunFailure> {
    let populate_seconds = one_round(round, 0)?;
    let t = Instant::now();
    set_slot(&b.vm, b.hva, b.bytes, MEM_LOG_DIRTY_PAGES)?;
    let enable_seconds = t.elapsed().as_secs_f64();
    let mut bitmap = vec![0u64; written.len()];
    let iterations = (1..=cfg.iterations)
        .map(|n| iteration(b, cfg, round, written, &mut bitmap, n))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    set_slot(&b.vm, b.hva, b.bytes, 0)?;
    let disable_seconds = t.elapsed().as_secs_f64();
    Ok(Report {
        vcpus: cfg.vcpus,
        bytes_per_vcpu: cfg.bytes_per_vcpu,
        backing: cfg.backing,
        manual_protect: cfg.manual_protect,
        eager_split_chunk: cfg.eager_split_chunk,
        write_percent: cfg.write_percent,
        populate_seconds,
        enable_seconds,
        iterations,
        disable_seconds,
        verified: cfg.verify,
        storm_events: 0,
        coherence_violations: 0,
        frames_leaked: 0,
    })
}

/// Iteration `n`: dirty memory, get (and with manual protect, clear) the
/// dirty log, compare the bitmap with the pages the guest wrote.
fn iteration(
    b: &Built,
    cfg: &Config,
    round: &Round,
    written: &[AtomicU64],
    bitmap: &mut [u64],
    n: u32,
) -> Result<Iteration, RunFailure> {
    let npages = b.bytes / PAGE_SIZE;
    written.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    let f0 = faults(&b.vm);
    let dirty_memory_seconds = one_round(round, n)?;
    let faults = faults(&b.vm) - f0;
    let t = Instant::now();
    b.vm.get_dirty_log(0, bitmap, crate::platform::NOTIFIER_CPU)
        .map_err(|e| RunFailure::Config(e.to_string()))?;
    let get_dirty_log_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    if cfg.manual_protect {
        b.vm.clear_dirty_log(0, 0, npages, bitmap, crate::platform::NOTIFIER_CPU)
            .map_err(|e| RunFailure::Config(e.to_string()))?;
    }
    let clear_dirty_log_seconds = t.elapsed().as_secs_f64();
    // With "initially all set", the first bitmap has every page.
    let all_set = cfg.manual_protect && n == 1;
    let c = compare(written, bitmap, npages, all_set);
    if cfg.verify && (c.missing != 0 || c.extra != 0) {
        return Err(RunFailure::Vcpu {
            index: 0,
            what: format!(
                "iteration {n}: dirty bitmap differs from the guest's writes: \
                 {} written pages missing, {} unwritten pages reported",
                c.missing, c.extra
            ),
        });
    }
    Ok(Iteration {
        n,
        dirty_memory_seconds,
        get_dirty_log_seconds,
        clear_dirty_log_seconds,
        pages_written: c.written,
        pages_dirty: c.dirty,
        missing: c.missing,
        extra: c.extra,
        faults,
    })
}

/// A dirty bitmap against the pages the guest recorded writing.
#[derive(Debug, Default, PartialEq, Eq)]
struct Comparison {
    written: u64,
    dirty: u64,
    missing: u64,
    extra: u64,
}

fn compare(written: &[AtomicU64], bitmap: &[u64], npages: u64, all_set: bool) -> Comparison {
    let mut c = Comparison::default();
    for (i, (w, d)) in written.iter().zip(bitmap).enumerate() {
        let left = npages - i as u64 * 64;
        let full = if left >= 64 {
            u64::MAX
        } else {
            (1 << left) - 1
        };
        let w = if all_set {
            full
        } else {
            w.load(Ordering::Relaxed)
        };
        c.written += u64::from(w.count_ones());
        c.dirty += u64::from(d.count_ones());
        c.missing += u64::from((w & !d).count_ones());
        c.extra += u64::from((d & !w).count_ones());
    }
    c
}

fn faults(vm: &SimVm) -> u64 {
    let s = vm.stats().snapshot();
    s.translation_faults + s.permission_faults
}

fn finish(b: Built, mut report: Report) -> Result<Report, RunFailure> {
    (report.coherence_violations, report.frames_leaked) = teardown(b);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_counts_missing_and_extra_pages_and_masks_the_last_word() {
        // 70 pages: the second word has 6 valid bits.
        let written = [AtomicU64::new(0b1011), AtomicU64::new(0b10)];
        let bitmap = [0b0111, 0b10];
        let c = compare(&written, &bitmap, 70, false);
        assert_eq!(
            c,
            Comparison {
                written: 4,
                dirty: 4,
                missing: 1,
                extra: 1
            }
        );
        // "Initially all set": every one of the 70 pages counts as written.
        let all = [u64::MAX, 0b11_1111];
        let c = compare(&written, &all, 70, true);
        assert_eq!((c.written, c.missing, c.extra), (70, 0, 0));
    }
}
