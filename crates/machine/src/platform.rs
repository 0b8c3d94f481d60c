//! The platform services on the simulated machine.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use pkvm_arch::{Level, Pa};
use pkvm_hyp::{Hyp, HypConfig, HypPlatform, MemMap, MemRegion, PageMeta};
use pkvm_pgtable::env::ENTRIES;
use pkvm_pgtable::{PtMemory, TlbOps};
use pkvm_sim::{Machine, SimEnv};

/// How the hypervisor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The host manages guest stage-2 itself (KVM's default).
    Standard,
    /// pKVM: the hypervisor owns guest stage-2; the host maps by hypercalls.
    Protected,
}

thread_local! {
    static CURRENT_CPU: Cell<usize> = const { Cell::new(0) };
}

/// A stage-2 environment that brackets one update for the coherence
/// checker: begun when created, ended when dropped (after the update's TLB
/// maintenance).
pub struct UpdatingEnv {
    env: SimEnv,
    vmid: u16,
}

impl UpdatingEnv {
    fn new(machine: &Arc<Machine>, vmid: u16) -> Self {
        machine.begin_update(vmid);
        UpdatingEnv {
            env: machine.env(vmid).on_cpu(CURRENT_CPU.with(Cell::get)),
            vmid,
        }
    }
}

impl Drop for UpdatingEnv {
    fn drop(&mut self) {
        self.env.machine().end_update(self.vmid);
    }
}

impl PtMemory for UpdatingEnv {
    fn table(&self, pa: Pa) -> &[std::sync::atomic::AtomicU64; ENTRIES] {
        self.env.table(pa)
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        self.env.refcount(pa)
    }
}

impl TlbOps for UpdatingEnv {
    fn tlbi_leaf(&self, addr: u64, level: Level) {
        self.env.tlbi_leaf(addr, level)
    }
    fn tlbi_leaf_local(&self, addr: u64, level: Level) {
        self.env.tlbi_leaf_local(addr, level)
    }
    fn tlbi_range(&self, start: u64, end: u64) {
        self.env.tlbi_range(start, end)
    }
    fn tlbi_all(&self) {
        self.env.tlbi_all()
    }
    fn dcache_clean_poc(&self, pa: Pa, size: u64) {
        self.env.dcache_clean_poc(pa, size)
    }
    fn icache_inval_pou(&self, pa: Pa, size: u64) {
        self.env.icache_inval_pou(pa, size)
    }
    fn needs_dcache_maintenance(&self) -> bool {
        false
    }
}

/// The hypervisor's view of the simulated machine.
pub struct SimHyp {
    machine: Arc<Machine>,
}

impl PtMemory for SimHyp {
    fn table(&self, pa: Pa) -> &[std::sync::atomic::AtomicU64; ENTRIES] {
        self.machine.mem().table(pa)
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        self.machine.mem().refcount(pa)
    }
}

impl HypPlatform for SimHyp {
    type Tlb = UpdatingEnv;
    fn tlb(&self, vmid: u16) -> UpdatingEnv {
        UpdatingEnv::new(&self.machine, vmid)
    }
    type El2Tlb = SimEnv;
    fn el2_tlb(&self) -> SimEnv {
        self.machine.el2_env()
    }
    fn cpu_id(&self) -> usize {
        CURRENT_CPU.with(Cell::get)
    }
}

/// A parked vCPU thread and its pending-kick token.
struct KickSlot {
    thread: Thread,
    pending: Arc<std::sync::atomic::AtomicBool>,
}

/// The platform the host runs on in the simulator.
pub struct SimPlatform {
    machine: Arc<Machine>,
    hyp: Option<Hyp<SimHyp>>,
    kicks: Mutex<HashMap<(u16, usize), KickSlot>>,
    /// Hypercalls made.
    pub hvcs: AtomicU64,
}

impl std::fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPlatform")
            .field("protected", &self.hyp.is_some())
            .finish_non_exhaustive()
    }
}

/// The CPU id used for hypercalls made from MMU-notifier context (not a
/// vCPU thread).
pub const NOTIFIER_CPU: usize = pkvm_hyp::MAX_CPUS - 1;

/// Why the platform could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The hypervisor refused its configuration.
    #[error("hypervisor init failed: {0:?}")]
    Hyp(pkvm_hyp::HypError),
}

impl SimPlatform {
    /// The platform on `machine`, with the hypervisor in `mode`. In
    /// protected mode the hypervisor takes the machine's carve-out as its
    /// pool, covers all RAM with page metadata, and is finalised (as the
    /// host does at the end of boot).
    ///
    /// # Errors
    /// The hypervisor's initialisation failed.
    pub fn new(machine: Arc<Machine>, mode: Mode) -> Result<Arc<SimPlatform>, PlatformError> {
        let hyp = match mode {
            Mode::Standard => None,
            Mode::Protected => {
                let cfg = machine.config();
                let pages = (cfg.mem_size / 4096) as usize;
                let meta: &'static [PageMeta] = Box::leak(
                    (0..pages)
                        .map(|_| PageMeta::new())
                        .collect::<Vec<_>>()
                        .into_boxed_slice(),
                );
                let (host_base, host_size) = machine.host_frames().range();
                let regions = [MemRegion {
                    base: host_base,
                    size: host_size,
                }];
                let (pool_base, pool_size) = machine.hyp_carveout();
                let end = cfg.mem_base.0 + cfg.mem_size;
                let host_ipa_bits = (64 - (end - 1).leading_zeros()).max(32);
                let hcfg = HypConfig {
                    mem: MemMap::new(meta, cfg.mem_base.pfn()),
                    regions: &regions,
                    host_rx: &[],
                    pool_base,
                    pool_pages: pool_size / 4096,
                    pool_reserved: 0,
                    host_ipa_bits,
                    features: Default::default(),
                };
                let hyp = Hyp::new(
                    SimHyp {
                        machine: machine.clone(),
                    },
                    &hcfg,
                )
                .map_err(PlatformError::Hyp)?;
                hyp.finalize();
                Some(hyp)
            }
        };
        Ok(Arc::new(SimPlatform {
            machine,
            hyp,
            kicks: Mutex::new(HashMap::new()),
            hvcs: AtomicU64::new(0),
        }))
    }

    /// The machine.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// The hypervisor (protected mode).
    pub fn hyp(&self) -> Option<&Hyp<SimHyp>> {
        self.hyp.as_ref()
    }

    /// Marks the calling thread as running on simulated CPU `cpu`.
    pub fn set_current_cpu(cpu: usize) {
        CURRENT_CPU.with(|c| c.set(cpu));
    }

    /// Registers the calling thread as vCPU `index` of VM `id` (VMID or
    /// handle) for kicks; returns the pending-kick token.
    pub fn register_vcpu_thread(
        &self,
        id: u16,
        index: usize,
    ) -> Arc<std::sync::atomic::AtomicBool> {
        let pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.kicks.lock().unwrap().insert(
            (id, index),
            KickSlot {
                thread: std::thread::current(),
                pending: pending.clone(),
            },
        );
        pending
    }

    /// Forgets a vCPU thread.
    pub fn unregister_vcpu_thread(&self, id: u16, index: usize) {
        self.kicks.lock().unwrap().remove(&(id, index));
    }
}

impl pkvm_host::HostPlatform for SimPlatform {
    type S2Env<'a> = UpdatingEnv;

    fn s2_env(&self, vmid: u16) -> UpdatingEnv {
        UpdatingEnv::new(&self.machine, vmid)
    }

    fn alloc_pages(&self, order: u32) -> Option<Pa> {
        self.machine
            .host_frames()
            .alloc_zeroed(self.machine.mem(), order)
            .ok()
    }

    fn free_pages(&self, pa: Pa, order: u32) {
        let r = self.machine.host_frames().free(pa, order);
        debug_assert!(r.is_ok(), "freeing {pa:?} order {order}: {r:?}");
    }

    fn protected_mode(&self) -> bool {
        self.hyp.is_some()
    }

    fn hvc(&self, cpu: usize, regs: &mut [u64; 8]) {
        self.hvcs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &self.hyp {
            Some(h) => {
                let prev = CURRENT_CPU.with(|c| c.replace(cpu));
                h.handle_host_hvc(cpu, regs);
                CURRENT_CPU.with(|c| c.set(prev));
            }
            None => regs[0] = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64,
        }
    }

    fn kick_vcpu(&self, vmid: u16, index: usize) {
        if let Some(k) = self.kicks.lock().unwrap().get(&(vmid, index)) {
            k.pending.store(true, std::sync::atomic::Ordering::Release);
            k.thread.unpark();
        }
    }
}
