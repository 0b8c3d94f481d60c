//! The simulated machine on which every pkvm-rs host and hypervisor test and
//! benchmark runs at native speed.
//!
//! # The machine
//! - [`PhysMem`]: one RAM arena (a lazily backed `MAP_NORESERVE` mapping, 4
//!   GiB by default at PA `0x4000_0000`) plus small device regions. Page
//!   tables and guest pages live in it: `pkvm-pgtable` writes real
//!   descriptors into it through [`PtMemory`], and
//!   the MMU walks them. Memory is only ever accessed through atomics;
//!   nothing hands out `&[u8]` over it. The only `unsafe` is in `raw.rs`.
//! - RAM is carved by [`SimConfig`]: host memory managed by a buddy
//!   [`FrameAllocator`] (process pages, host page tables through
//!   [`SimPageCache`]), and a carve-out at the top reserved for the
//!   hypervisor, which manages it itself ([`Machine::hyp_carveout`]).
//! - [`mmu`]: a software stage-2 walk producing a translation or the exact
//!   `ESR_EL2`/`FAR_EL2`/`HPFAR_EL2` a CPU reports.
//! - One TLB per simulated CPU, tagged by VMID, filled on walks and dropped
//!   only by TLBIs issued through [`SimEnv`] (the `TlbOps` the page-table
//!   code uses), which broadcasts them to every CPU.
//! - [`SimCpu`]: runs a [`GuestProgram`] (e.g. a [`Workload`]) access by
//!   access through its TLB and the MMU; a fault, HVC, SMC or WFI returns a
//!   [`SimExit`] to the caller (the run loop lives in `pkvm-host`) and the
//!   faulting access is retried on the next [`SimCpu::run`]. Guest writes
//!   store recognisable values and reads of addresses the vCPU wrote are
//!   verified against what it last wrote.
//! - [`mm::ProcessMm`]: the host process memory behind memslots: VMAs of each
//!   kind, fault-in returning a [`mm::Pin`], reclaim / migration / munmap /
//!   THP split / exit events delivered to MMU-notifier listeners before the
//!   frame is reused.
//! - [`sched::Scheduler`]: a seeded scheduler interleaving vCPUs and host
//!   events on one thread, reproducibly.
//!
//! # The coherence checker
//! See [`checker`] for the exact rule. In short: a TLB entry
//! that grants more than the current tables (different PA, write/read/exec
//! the tables no longer allow, no mapping, changed attributes; the access
//! flag is ignored) is a violation if it is still cached once no update of
//! its VMID is in flight. Every stage-2 change must be bracketed by
//! [`Machine::begin_update`]/[`Machine::end_update`] (or
//! [`Machine::update`]), ending after its TLB maintenance. Violations are
//! counted and listed ([`Machine::violations`]); a test run fails on any.
//! Lazily relaxed permissions (an entry granting less) are allowed.
//!
//! # Determinism
//! Everything that chooses (workload addresses, values, the scheduler) draws
//! from seeded [`rng::SplitMix64`] generators, and the frame allocator hands
//! out the lowest free block first. Run the vCPUs and events through one
//! [`sched::Scheduler`] on one thread and the same seed gives the same trace,
//! so a failing interleaving is replayed by rerunning with its seed. With one
//! thread per vCPU the machine is fully concurrent and not reproducible.

#![deny(missing_docs)]
// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

mod raw;

pub mod alloc;
pub mod checker;
pub mod cpu;
pub mod mm;
pub mod mmu;
mod percpu;
pub mod physmem;
pub mod rng;
pub mod sched;
mod tlb;
pub mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Level, Pa};
use pkvm_pgtable::env::{PtMemory, TlbOps, ENTRIES};

pub use alloc::{AllocError, AllocStats, FrameAllocator, SimPageCache};
pub use checker::{Coherence, Staleness, Violation};
pub use cpu::{CpuStats, FnProgram, GuestError, GuestProgram, Op, Script, SimCpu, SimExit};
pub use mmu::{Access, AccessKind, Fault, S2Leaf, Translation, VmContext};
pub use physmem::{DeviceSpec, MemError, PhysMem};
pub use workload::{Pattern, Phase, Workload};

use tlb::Tlb;

/// Machine configuration.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// First RAM address.
    pub mem_base: Pa,
    /// RAM size (reserved lazily).
    pub mem_size: u64,
    /// Bytes at the top of RAM reserved for the hypervisor's own pool.
    pub hyp_carveout: u64,
    /// Number of simulated CPUs (each with its TLB).
    pub ncpus: usize,
    /// Physical address size (`VTCR_EL2.PS`) used for address size faults.
    pub pa_bits: u32,
    /// Device regions outside RAM (PFNMAP targets, MMIO).
    pub devices: Vec<DeviceSpec>,
    /// Coherence checking level.
    pub coherence: Coherence,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            mem_base: Pa(0x4000_0000),
            mem_size: 4 << 30,
            hyp_carveout: 64 << 20,
            ncpus: 4,
            pa_bits: 40,
            devices: vec![DeviceSpec {
                base: Pa(0x1000_0000),
                size: 2 << 20,
            }],
            coherence: Coherence::EveryUse,
        }
    }
}

/// Machine-level errors.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration is unusable (caller error).
    #[error("bad configuration: {0}")]
    Config(&'static str),
    /// The host refused the arena mapping (the cause is the error's
    /// source, not repeated in its message).
    #[error("mapping simulated memory failed")]
    Map(#[from] std::io::Error),
    /// CPU index out of range or already taken (caller error).
    #[error("cpu {0} does not exist or is already in use")]
    Cpu(usize),
}

/// Global TLBI counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbiStats {
    /// By-IPA broadcast invalidations.
    pub leaf: u64,
    /// Local by-IPA invalidations.
    pub leaf_local: u64,
    /// Range invalidations.
    pub range: u64,
    /// Whole-VMID invalidations.
    pub all: u64,
}

/// The simulated machine: memory, allocators, TLBs, checker.
pub struct Machine {
    config: SimConfig,
    mem: Arc<PhysMem>,
    host_frames: Arc<FrameAllocator>,
    hyp: (Pa, u64),
    tlbs: Box<[Tlb]>,
    checker: checker::Checker,
    taken: Mutex<Vec<bool>>,
    tlbi: [AtomicU64; 4],
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("config", &self.config)
            .finish()
    }
}

impl Machine {
    /// Builds a machine.
    ///
    /// # Errors
    /// [`SimError::Config`] for unaligned or too small sizes, no CPUs or a
    /// base above the PA size; [`SimError::Map`] if the arena cannot be mapped.
    pub fn new(config: SimConfig) -> Result<Arc<Machine>, SimError> {
        const MB2: u64 = 2 << 20;
        if !config.mem_base.is_aligned(MB2)
            || config.mem_size % MB2 != 0
            || config.hyp_carveout % MB2 != 0
        {
            return Err(SimError::Config(
                "memory base and sizes must be 2 MiB aligned",
            ));
        }
        if config.hyp_carveout >= config.mem_size {
            return Err(SimError::Config(
                "hypervisor carve-out must be smaller than memory",
            ));
        }
        if config.ncpus == 0 {
            return Err(SimError::Config("need at least one cpu"));
        }
        let Some(mem_end) = config.mem_base.0.checked_add(config.mem_size) else {
            return Err(SimError::Config("memory base + size overflows 64 bits"));
        };
        if config.pa_bits < 64 && mem_end > 1u64 << config.pa_bits {
            return Err(SimError::Config("memory lies above the PA size"));
        }
        let mem = Arc::new(PhysMem::new(
            config.mem_base,
            config.mem_size,
            &config.devices,
        )?);
        let host_size = config.mem_size - config.hyp_carveout;
        let host_frames = Arc::new(FrameAllocator::new("host", config.mem_base, host_size));
        let hyp = (config.mem_base + host_size, config.hyp_carveout);
        Ok(Arc::new(Machine {
            tlbs: (0..config.ncpus).map(|_| Tlb::new()).collect(),
            taken: Mutex::new(vec![false; config.ncpus]),
            config,
            mem,
            host_frames,
            hyp,
            checker: checker::Checker::new(),
            tlbi: Default::default(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Physical memory.
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// The host memory allocator.
    pub fn host_frames(&self) -> &Arc<FrameAllocator> {
        &self.host_frames
    }

    /// The hypervisor's carve-out `(base, size)`; nothing else allocates there.
    pub fn hyp_carveout(&self) -> (Pa, u64) {
        self.hyp
    }

    /// A new, empty page cache over host memory.
    pub fn page_cache(&self) -> SimPageCache {
        SimPageCache::new(self.mem.clone(), self.host_frames.clone())
    }

    /// Number of CPUs.
    pub fn ncpus(&self) -> usize {
        self.tlbs.len()
    }

    /// Takes CPU `id` (each once until its [`SimCpu`] is dropped).
    ///
    /// # Errors
    /// [`SimError::Cpu`] if out of range or taken.
    pub fn cpu(self: &Arc<Self>, id: usize) -> Result<SimCpu, SimError> {
        let mut t = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        match t.get_mut(id) {
            Some(x) if !*x => {
                *x = true;
                Ok(SimCpu::new(self.clone(), id))
            }
            _ => Err(SimError::Cpu(id)),
        }
    }

    pub(crate) fn release_cpu(&self, id: usize) {
        if let Some(x) = self
            .taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
        {
            *x = false;
        }
    }

    pub(crate) fn tlb(&self, cpu: usize) -> &Tlb {
        &self.tlbs[cpu]
    }

    pub(crate) fn tlbs(&self) -> &[Tlb] {
        &self.tlbs
    }

    pub(crate) fn checker(&self) -> &checker::Checker {
        &self.checker
    }

    /// A VM context with this machine's PA size.
    pub fn vm_context(&self, vmid: u16, root: Pa, geo: S2Geometry) -> VmContext {
        VmContext {
            vmid,
            root,
            geo,
            ps_bits: self.config.pa_bits,
        }
    }

    /// Makes `ctx` the tables the checker compares `ctx.vmid`'s entries
    /// with. [`SimCpu::load`] does this too.
    pub fn register_vm(&self, ctx: VmContext) {
        self.checker.register(ctx);
    }

    /// Forgets a VMID's tables (VM destroyed). Entries still cached for it are
    /// no longer checked; if the VMID is reused without a TLBI they are
    /// compared with the new VM's tables.
    pub fn retire_vm(&self, vmid: u16) {
        self.checker.retire(vmid);
    }

    /// Marks the start of a stage-2 change of `vmid` (see [`checker`]).
    ///
    /// With [`Coherence::Off`] nothing is checked during the run, so the
    /// bookkeeping (two read-modify-writes of a word every CPU of the VM
    /// shares, per update) is skipped; the final [`Machine::check`] scan
    /// needs none of it.
    pub fn begin_update(&self, vmid: u16) {
        if self.config.coherence != Coherence::Off {
            self.checker.begin_update(vmid);
        }
    }

    /// Marks the end of a stage-2 change of `vmid`, after its TLB maintenance.
    ///
    /// # Panics
    /// Without a matching [`Machine::begin_update`] (a bug in the caller).
    pub fn end_update(&self, vmid: u16) {
        if self.config.coherence != Coherence::Off && self.checker.end_update(vmid) {
            self.checker
                .process_suspects(&self.mem, &self.tlbs, Some(vmid));
        }
    }

    /// [`Machine::begin_update`] with the end on drop.
    pub fn update(&self, vmid: u16) -> UpdateGuard<'_> {
        self.begin_update(vmid);
        UpdateGuard {
            machine: self,
            vmid,
        }
    }

    /// Updates of `vmid` in flight.
    pub fn updates_in_flight(&self, vmid: u16) -> u32 {
        self.checker.in_flight(vmid)
    }

    /// Re-evaluates every pending suspect and returns all violations so far.
    /// Call at the end of a run, with no update in flight.
    pub fn check(&self) -> Vec<Violation> {
        // A full scan of every CPU's cached entries of every live VM, with
        // complete table walks (no fast path).
        for ctx in self.checker.registered() {
            if self.checker.in_flight(ctx.vmid) == 0 {
                for cpu in 0..self.tlbs.len() {
                    self.checker.scan(&self.mem, &self.tlbs, cpu, &ctx, true);
                }
            }
        }
        self.checker.process_suspects(&self.mem, &self.tlbs, None);
        self.checker.violations()
    }

    /// Violations recorded so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.checker.violations()
    }

    /// Number of violations recorded so far.
    pub fn violation_count(&self) -> usize {
        self.checker.violation_count()
    }

    /// Suspects not yet decided (updates were in flight).
    pub fn pending_suspects(&self) -> usize {
        self.checker.pending_suspects()
    }

    /// Checks every entry `cpu` caches for `ctx.vmid` now (also done at guest
    /// entry).
    pub fn scan_tlb(&self, cpu: usize, ctx: &VmContext) {
        if cpu < self.tlbs.len() {
            self.checker.scan(&self.mem, &self.tlbs, cpu, ctx, true);
        }
    }

    /// An environment for `pkvm-pgtable` operations on `vmid`'s stage-2.
    pub fn env(self: &Arc<Self>, vmid: u16) -> SimEnv {
        SimEnv {
            machine: self.clone(),
            scope: Scope::Stage2(vmid),
            local_cpu: None,
        }
    }

    /// An environment for the hypervisor's EL2 stage-1 tables (its TLBIs touch
    /// no stage-2 entry; they are only counted).
    pub fn el2_env(self: &Arc<Self>) -> SimEnv {
        SimEnv {
            machine: self.clone(),
            scope: Scope::El2,
            local_cpu: None,
        }
    }

    /// Global TLBI counters.
    pub fn tlbi_stats(&self) -> TlbiStats {
        let l = |i: usize| self.tlbi[i].load(Ordering::Relaxed);
        TlbiStats {
            leaf: l(0),
            leaf_local: l(1),
            range: l(2),
            all: l(3),
        }
    }

    /// Drops every TLB entry on every CPU (e.g. VMID rollover).
    pub fn tlbi_everything(&self) {
        for t in self.tlbs.iter() {
            t.invalidate_everything();
        }
        self.finish_inval();
    }

    /// Waits for accesses that may use invalidated entries (the DSB).
    fn finish_inval(&self) {
        for t in self.tlbs.iter() {
            t.finish_inval();
        }
    }
}

/// The end of a stage-2 update, on drop.
#[derive(Debug)]
pub struct UpdateGuard<'a> {
    machine: &'a Machine,
    vmid: u16,
}

impl Drop for UpdateGuard<'_> {
    fn drop(&mut self) {
        self.machine.end_update(self.vmid);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Stage2(u16),
    El2,
}

/// The [`PtMemory`] + [`TlbOps`] environment `pkvm-pgtable` runs with on the
/// simulated machine, for one translation context.
#[derive(Clone, Debug)]
pub struct SimEnv {
    machine: Arc<Machine>,
    scope: Scope,
    local_cpu: Option<usize>,
}

impl SimEnv {
    /// The same environment, with `tlbi_leaf_local` acting on `cpu` only (the
    /// CPU the caller handles a fault for). Without it, local TLBIs broadcast.
    pub fn on_cpu(mut self, cpu: usize) -> SimEnv {
        self.local_cpu = (cpu < self.machine.ncpus()).then_some(cpu);
        self
    }

    /// The machine.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    fn count(&self, i: usize) {
        self.machine.tlbi[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl PtMemory for SimEnv {
    fn table(&self, pa: Pa) -> &[std::sync::atomic::AtomicU64; ENTRIES] {
        self.machine.mem.table(pa)
    }
    fn refcount(&self, pa: Pa) -> &std::sync::atomic::AtomicU32 {
        self.machine.mem.refcount(pa)
    }
}

impl TlbOps for SimEnv {
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        self.count(0);
        if let Scope::Stage2(vmid) = self.scope {
            for t in self.machine.tlbs.iter() {
                t.invalidate_leaf(vmid, addr, level);
            }
            self.machine.finish_inval();
        }
    }

    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        self.count(1);
        if let Scope::Stage2(vmid) = self.scope {
            match self.local_cpu {
                Some(c) => {
                    self.machine.tlbs[c].invalidate_leaf(vmid, addr, level);
                    self.machine.tlbs[c].finish_inval();
                }
                None => {
                    for t in self.machine.tlbs.iter() {
                        t.invalidate_leaf(vmid, addr, level);
                    }
                    self.machine.finish_inval();
                }
            }
        }
    }

    fn tlbi_range(&self, start: u64, end: u64) {
        self.count(2);
        if let Scope::Stage2(vmid) = self.scope {
            for t in self.machine.tlbs.iter() {
                t.invalidate_range(vmid, start, end);
            }
            self.machine.finish_inval();
        }
    }

    fn tlbi_all(&self) {
        self.count(3);
        if let Scope::Stage2(vmid) = self.scope {
            for t in self.machine.tlbs.iter() {
                t.invalidate_vmid(vmid);
            }
            self.machine.finish_inval();
        }
    }

    fn dcache_clean_poc(&self, _pa: Pa, _size: u64) {}

    fn icache_inval_pou(&self, _pa: Pa, _size: u64) {}

    fn needs_dcache_maintenance(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    /// A base + size past 2^64 used to overflow (a panic in debug builds,
    /// a wrapped end that passed the PA check in release builds).
    #[test]
    fn memory_end_past_u64_is_a_config_error() {
        let e = Machine::new(SimConfig {
            mem_base: Pa(1 << 62),
            mem_size: u64::MAX - (2 << 20) + 1,
            pa_bits: 64,
            ..SimConfig::default()
        })
        .unwrap_err();
        assert!(
            matches!(e, SimError::Config(m) if m.contains("overflows")),
            "{e}"
        );
    }

    #[test]
    fn map_error_keeps_the_io_error_as_its_source_only() {
        let e = SimError::Map(std::io::Error::other("no memory for you"));
        let src = std::error::Error::source(&e).expect("source");
        assert!(!e.to_string().contains(&src.to_string()), "{e}");
    }
}
