//! The machine services of the EL2 image as pkvm-host and pkvm-hyp see
//! them: the real counterpart of `pkvm-machine`'s `SimPlatform`/`SimHyp`.
//!
//! - [`BootPlatform`] implements [`HostPlatform`]: stage-2 environments are
//!   the hardware `TlbOps`/`PtMemory` of [`HwS2`] for a VMID; pages come
//!   from the image's page pool ([`super::pool`]); the hypercall is an
//!   `hvc #0` taken by the EL2 vectors, which call the in-image [`Hyp`]
//!   ([`hyp_call`]); kicks go to the vCPU scheduler
//!   ([`super::run`]): a sleeping vCPU is queued, a running one gets the
//!   kick SGI.
//! - [`HwHyp`] implements [`HypPlatform`] over the EL2 identity map.
//! - [`init_hyp`] sets the hypervisor up over the RAM the image manages,
//!   with the carve-out as its pool, and finalises it through the
//!   `FINALIZE` hypercall.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pkvm_arch::{Pa, Pfn};
use pkvm_host::HostPlatform;
use pkvm_hyp::{Hyp, HypConfig, HypError, HypPlatform, MemMap, MemRegion, PageMeta};
use pkvm_pgtable::env::ENTRIES;
use pkvm_pgtable::PtMemory;
use pkvm_sync::{LockClass, SpinLock};

use super::{pool, vcpurun};
use crate::platform::hw::{HwEl2, HwS2};
// The hypervisor of this boot and the one its HVCs reach: statics in the
// hypervisor's own data (`platform::hypdata`), never host memory.
use crate::platform::hypdata::HVC_TARGET;
use crate::platform::start;
use crate::platform::{hostrun, hvc, hypdata, hypmem, switch};
use pkvm_arch::vtcr::{vtcr, vttbr, S2Geometry, VtcrOptions};

/// The hardware stage-2 environment of `vmid`: TLB maintenance acts on the
/// VMID (the root address is not needed for TLBI).
pub fn s2_env(vmid: u16) -> HwS2 {
    HwS2 {
        vttbr: (vmid as u64) << 48,
    }
}

/// Table pages and page metadata through the EL2 identity map.
static EL2: HwEl2 = HwEl2;

/// The hypervisor's view of the machine.
#[derive(Debug)]
pub struct HwHyp;

impl PtMemory for HwHyp {
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        EL2.table(pa)
    }
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        EL2.refcount(pa)
    }
}

impl HypPlatform for HwHyp {
    type Tlb = HwS2;
    fn tlb(&self, vmid: u16) -> HwS2 {
        s2_env(vmid)
    }
    type El2Tlb = HwEl2;
    fn el2_tlb(&self) -> HwEl2 {
        HwEl2
    }
    fn cpu_id(&self) -> usize {
        start::cpu_index()
    }
}

/// The hypervisor of this boot, once [`init_hyp`] ran.
pub type BootHyp = Hyp<HwHyp>;

/// The VMM's record of the hypervisor it set up (host memory: a handle
/// it passes around, dereferenced only at EL2 or by the VMM at EL2).
static HYP: SpinLock<Option<&'static BootHyp>> = SpinLock::new(None, LockClass::Leaf);

/// Why the hypervisor could not be set up.
#[derive(Clone, Copy, Debug)]
pub enum HypInitError {
    /// `Hyp::new` refused the configuration (a platform bug).
    Init(HypError),
    /// The `FINALIZE` hypercall failed (status).
    Finalize(i64),
    /// A static of the hypervisor lies outside its own data (name,
    /// address): a build bug (a lost `#[link_section]`).
    Static(&'static str, u64),
    /// The `PKVM_INIT` hypercall failed (status).
    Call(i64),
}

impl core::fmt::Display for HypInitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HypInitError::Init(e) => write!(f, "pkvm-hyp init refused: {e}"),
            HypInitError::Finalize(s) => write!(f, "FINALIZE hypercall failed: {s}"),
            HypInitError::Static(name, a) => write!(
                f,
                "the hypervisor's static {name} at {a:#x} is outside its own data (host memory)"
            ),
            HypInitError::Call(s) => write!(f, "PKVM_INIT hypercall failed: {s}"),
        }
    }
}

/// Bytes of the hypervisor's own memory ([`hypmem`]) for RAM
/// `[ram_start, ram_end)`: the page metadata and the `Hyp`, with room for
/// alignment, rounded up to 2 MiB (the host stage-2's block size).
pub fn hyp_heap_bytes(ram: (u64, u64)) -> u64 {
    let pages = (ram.1 - ram.0) / 4096;
    let bytes = pages * size_of::<PageMeta>() as u64
        + size_of::<BootHyp>() as u64
        + vcpurun::table_bytes()
        + crate::platform::pview::bytes()
        + 3 * 4096;
    bytes.next_multiple_of(2 << 20)
}

/// Sets the hypervisor up (once per boot; later calls return the same
/// one): page metadata for all of RAM `[ram_start, ram_end)`, the host's
/// memory `regions`, the image's text and read-only data as code the host
/// may read and run but not write, the carve-out `pool` (base, bytes) as
/// its page pool. A region over its own memory or the image's hypervisor
/// data ([`hypmem::image_parts`]) is refused.
/// The `Hyp` and its metadata are placed in the hypervisor's own memory
/// `heap` (base, bytes; [`hypmem`]), never in the image's global heap
/// (host memory), with the table of protected vCPUs' registers
/// ([`vcpurun`]). At EL2 directly; from the VMM at EL1 by the one-shot
/// [`PKVM_INIT`] hypercall (served at EL2 by [`pkvm_init`]). Then the host
/// issues `FINALIZE`.
///
/// # Errors
/// See [`HypInitError`].
pub fn init_hyp(
    ram: (u64, u64),
    regions: &[MemRegion],
    heap: (Pa, u64),
    pool: (Pa, u64),
) -> Result<&'static BootHyp, HypInitError> {
    let mut slot = HYP.lock();
    if let Some(h) = *slot {
        return Ok(h);
    }
    HYP_POOL.store(pool.0 .0, Ordering::Relaxed);
    let hyp = if crate::platform::el1boot::current_el() == 2 {
        setup_hyp(ram, regions, heap, pool)?
    } else {
        pkvm_init_call(ram, regions, heap, pool)?
    };
    let mut regs = [0u64; 8];
    regs[0] = pkvm_hyp::hvc::id::FINALIZE as u64;
    hyp_call(Some(hyp), start::cpu_index(), &mut regs);
    if regs[0] as i64 != pkvm_hyp::hvc::ret::SUCCESS {
        return Err(HypInitError::Finalize(regs[0] as i64));
    }
    if crate::platform::el1boot::current_el() == 1 {
        if !reserve_denied_until_all() {
            return Err(HypInitError::Finalize(pkvm_hyp::hvc::ret::INTERNAL));
        }
        super::run::finalize_secondaries().map_err(HypInitError::Finalize)?;
    }
    *slot = Some(hyp);
    Ok(hyp)
}

/// The VMM at EL1 after `FINALIZE` on the boot CPU, before the other CPUs
/// put themselves under the host stage-2: `RESERVE_VM` (the first step to
/// a protected VM) must be refused with `DENIED` (a host keeping a CPU
/// out of the host stage-2 would have all of memory there). Whether it
/// was; a reservation that went through is given back.
fn reserve_denied_until_all() -> bool {
    let mut regs = [
        u64::from(pkvm_hyp::hvc::id::RESERVE_VM),
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    hvc::call(&mut regs);
    let status = regs[0] as i64;
    if status == pkvm_hyp::hvc::ret::SUCCESS {
        let mut undo = [
            u64::from(pkvm_hyp::hvc::id::UNRESERVE_VM),
            regs[1],
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        hvc::call(&mut undo);
    }
    let denied = status == pkvm_hyp::hvc::ret::DENIED;
    crate::println!(
        "hyp: RESERVE_VM before every CPU's host is under the host stage-2: {} (status {status})",
        if denied { "refused" } else { "NOT refused" }
    );
    denied
}

/// `PROT_FINALIZE_CPU` (image-level, as pKVM's `__pkvm_prot_finalize` on
/// each CPU): after `FINALIZE`, the VMM at EL1 on every other CPU puts
/// itself under the host stage-2 (`FINALIZE` does it for the CPU that
/// issues it). Until every online CPU has, the hypervisor refuses the
/// calls that create protected VMs or give them memory
/// ([`NEEDS_ALL_CPUS`]) with `DENIED`. Refused (`NOT_SUPPORTED`) before
/// `FINALIZE` or from the VMM at EL2.
pub const PROT_FINALIZE_CPU: u32 = 0xc600_0051;
/// `HYP_INFO` (image-level): the hypervisor's counters for the host, in
/// place of reading its memory: x1 pool pages, x2 free pool pages, x3
/// pages held for VMs, x4 live VMs, x5 bytes of its own memory used, x6
/// host stage-2 faults served for the VMM at EL1, x7 aborts injected.
pub const HYP_INFO: u32 = 0xc600_0052;

/// The hypervisor's counters ([`HYP_INFO`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct HypInfo {
    /// pkvm-hyp's pool and VM counters.
    pub stats: pkvm_hyp::HypStats,
    /// Bytes of its own memory used ([`hypmem::used`]).
    pub mem_used: u64,
    /// Host stage-2 faults of the VMM at EL1 served at EL2.
    pub host_faults: u64,
    /// Aborts injected into the VMM at EL1.
    pub injected: u64,
}

/// The first page of the hypervisor's pool (host-attack's probe).
pub fn hyp_pool_base() -> u64 {
    HYP_POOL.load(Ordering::Relaxed)
}

/// Where the VMM put the hypervisor's pool (host memory: a number).
static HYP_POOL: AtomicU64 = AtomicU64::new(0);

/// The host's side of [`HYP_INFO`]; `None` before the hypervisor is set
/// up.
pub fn hyp_info() -> Option<HypInfo> {
    let mut regs = [u64::from(HYP_INFO), 0, 0, 0, 0, 0, 0, 0];
    hvc::call(&mut regs);
    (regs[0] as i64 == pkvm_hyp::hvc::ret::SUCCESS).then(|| HypInfo {
        stats: pkvm_hyp::HypStats {
            pool_pages: regs[1],
            pool_free: regs[2],
            vm_pages: regs[3],
            live_vms: regs[4],
        },
        mem_used: regs[5],
        host_faults: regs[6],
        injected: regs[7],
    })
}

/// `VCPU_LOADED` (image-level): of the vCPU pkvm-hyp has loaded on this
/// CPU, x1 = its VM's VMID, x2 = the IPA bits of its stage-2 (the VMM's
/// statistics and vGIC need them; its tables stay the hypervisor's).
pub const VCPU_LOADED: u32 = 0xc600_0053;
/// `VCPU_S2_FLUSH` (image-level): cleans and invalidates by VA every page
/// the stage-2 of the vCPU loaded on this CPU maps (a set/way
/// instruction's answer; the host cannot walk the hypervisor's tables).
pub const VCPU_S2_FLUSH: u32 = 0xc600_0054;

/// The host's side of [`VCPU_LOADED`]: (VMID, stage-2 geometry).
pub fn loaded_vcpu() -> Option<(u16, S2Geometry)> {
    let mut regs = [u64::from(VCPU_LOADED), 0, 0, 0, 0, 0, 0, 0];
    hvc::call(&mut regs);
    if regs[0] as i64 != pkvm_hyp::hvc::ret::SUCCESS {
        return None;
    }
    let geo = S2Geometry::new(pkvm_arch::Granule::Size4K, regs[2] as u32).ok()?;
    Some((regs[1] as u16, geo))
}

/// The host's side of [`VCPU_S2_FLUSH`].
pub fn flush_loaded_s2() {
    let mut regs = [u64::from(VCPU_S2_FLUSH), 0, 0, 0, 0, 0, 0, 0];
    hvc::call(&mut regs);
}

/// [`VCPU_LOADED`] and [`VCPU_S2_FLUSH`] at EL2.
fn loaded_answer(h: &BootHyp, cpu: usize, regs: &mut [u64; 8]) {
    let func = regs[0];
    *regs = [0; 8];
    let Some(c) = h.loaded_vcpu_context(cpu) else {
        regs[0] = pkvm_hyp::hvc::ret::NOT_FOUND as u64;
        return;
    };
    if func == u64::from(VCPU_S2_FLUSH) {
        super::backend::flush_stage2(c.s2_root, c.geometry);
    } else {
        regs[1] = u64::from(c.vmid);
        regs[2] = u64::from(c.geometry.ipa_bits);
    }
    regs[0] = pkvm_hyp::hvc::ret::SUCCESS as u64;
}

/// `HYP_PROBE` (image-level): the hypervisor's test hooks, answered only
/// when the boot enabled them (`el1boot::test_hooks`: the `host-attack`
/// scenario; `NOT_SUPPORTED` otherwise): what that scenario checks of the
/// hypervisor's state, which the VMM at EL1 may not read. x1 = the query
/// ([`probe`]), x2 its argument.
pub const HYP_PROBE: u32 = 0xc600_0055;

/// [`HYP_PROBE`]'s queries.
pub mod probe {
    /// The host stage-2 at PA x2: x1 = valid, x2 = writable.
    pub const HOST_PTE: u64 = 0;
    /// x1 = protected vCPUs whose registers the hypervisor holds.
    pub const HELD: u64 = 1;
    /// x1 = the word at PA x2 (any RAM: the victim's secret checks).
    pub const READ: u64 = 2;
    /// The hypervisor prints a line at EL2 (its own console).
    pub const PRINT: u64 = 3;
    /// The hypervisor masks (x2 = 1) or unmasks the virtual-timer PPI of
    /// this CPU at EL2, through its own redistributor record.
    pub const VTIMER_MASK: u64 = 4;
    /// The pin `HOST_RUN` takes on a run block's page: the page at PA x2
    /// is pinned exactly as `HOST_RUN` pins one, the host's
    /// `HOST_UNSHARE_HYP` of it is served meanwhile, and the pin dropped
    /// (nothing left behind): x1 = 1 if the pin was taken, x2 = the
    /// unshare's status (`NOT_SUPPORTED` when not pinned).
    pub const PIN_UNSHARE: u64 = 5;
    /// x1 = pages the host shares with the hypervisor now, x2 = the pins
    /// the hypervisor holds on them.
    pub const SHARED: u64 = 6;
}

/// The host's side of [`HYP_PROBE`]: x1, x2 of the answer, `None` when
/// refused.
pub fn hyp_probe(query: u64, arg: u64) -> Option<(u64, u64)> {
    let mut regs = [u64::from(HYP_PROBE), query, arg, 0, 0, 0, 0, 0];
    hvc::call(&mut regs);
    (regs[0] as i64 == pkvm_hyp::hvc::ret::SUCCESS).then_some((regs[1], regs[2]))
}

/// [`HYP_PROBE`] at EL2.
fn probe_answer(h: &BootHyp, regs: &mut [u64; 8]) {
    use pkvm_arch::pte::{S2Features, S2Prot};
    let (query, arg) = (regs[1], regs[2]);
    *regs = [0; 8];
    let ok = crate::platform::el1boot::test_hooks();
    let out = match query {
        _ if !ok => None,
        probe::HOST_PTE => {
            let p = h.host_pte(Pa(arg)).0;
            let w = p.is_valid() && p.prot(S2Features::default()).contains(S2Prot::W);
            Some((u64::from(p.is_valid()), u64::from(w)))
        }
        probe::HELD => Some((
            vcpurun::held() as u64,
            crate::platform::pview::held() as u64,
        )),
        probe::READ if crate::platform::phys::in_ram(arg & !7, 8) => {
            Some((crate::platform::phys::read_u64(Pa(arg & !7)), 0))
        }
        probe::PRINT => {
            crate::println!(
                "host-attack: image: this line is printed at EL2 (the hypervisor's console)"
            );
            Some((0, 0))
        }
        probe::VTIMER_MASK => {
            crate::platform::gic::set_vtimer_masked(start::cpu_index(), arg == 1);
            Some((0, 0))
        }
        probe::PIN_UNSHARE => Some(pin_unshare(h, start::cpu_index(), arg)),
        probe::SHARED => Some(shared_pages(h)),
        _ => None,
    };
    match out {
        Some((a, b)) => regs[..3].copy_from_slice(&[pkvm_hyp::hvc::ret::SUCCESS as u64, a, b]),
        None => regs[0] = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64,
    }
}

/// The host's side of [`PROT_FINALIZE_CPU`] on this CPU: the status.
pub fn prot_finalize_cpu() -> i64 {
    let mut regs = [u64::from(PROT_FINALIZE_CPU), 0, 0, 0, 0, 0, 0, 0];
    hvc::call(&mut regs);
    regs[0] as i64
}

/// Calls the hypervisor refuses until every online CPU's host is under
/// the host stage-2 ([`PROT_FINALIZE_CPU`]).
pub const NEEDS_ALL_CPUS: [u32; 8] = {
    use pkvm_hyp::hvc::id;
    [
        id::RESERVE_VM,
        id::INIT_VM,
        id::INIT_VCPU,
        id::TOPUP_MEMCACHE,
        id::VCPU_LOAD,
        id::HOST_SHARE_GUEST,
        id::HOST_DONATE_GUEST,
        id::HOST_SHARE_HYP,
    ]
};

/// Puts the VMM at EL1 on this CPU under the host stage-2 (at EL2, after
/// `FINALIZE`): whether it did.
fn protect_host(h: &BootHyp) -> bool {
    let (root, geo) = h.host_stage2();
    let Ok(vtcr) = vtcr(geo.ipa_bits, switch::parange(), VtcrOptions::default()) else {
        return false;
    };
    crate::platform::el1boot::protect_this_cpu(vttbr(root, 0), vtcr)
}

/// The VMM at EL1's host stage-2 faults, at EL2: pkvm-hyp maps what the
/// host owns (or a device) and refuses the rest (an abort is injected).
fn host_abort(ipa: u64, write: bool) -> Result<(), ()> {
    use pkvm_hyp::HostAccess;
    let Some(h) = *HVC_TARGET.lock() else {
        return Err(());
    };
    let access = if write {
        HostAccess::Write
    } else {
        HostAccess::Read
    };
    match h.host_mem_abort(Pa(ipa), access) {
        Ok(()) | Err(HypError::Again) => Ok(()),
        Err(_) => Err(()),
    }
}

/// The hypervisor's set-up at EL2 (see [`init_hyp`]): its hypercall
/// handler serves the host from then on.
fn setup_hyp(
    ram: (u64, u64),
    regions: &[MemRegion],
    heap: (Pa, u64),
    pool: (Pa, u64),
) -> Result<&'static BootHyp, HypInitError> {
    hypdata::audit().map_err(|(name, a)| HypInitError::Static(name, a))?;
    let img = hypmem::image_parts();
    let within = |r: &MemRegion, (s, e): (u64, u64)| r.base.0 < e && s < r.end().0;
    let heap_span = (heap.0 .0, heap.0 .0 + heap.1);
    if let Some(r) = regions
        .iter()
        .find(|r| within(r, heap_span) || within(r, img.hyp))
    {
        return Err(HypInitError::Init(HypError::BadAddress { pa: r.base }));
    }
    // The image's text and read-only data: the host runs that code (and
    // reads its constants), the hypervisor owns it.
    let code = [MemRegion {
        base: Pa(img.code.0),
        size: img.code.1 - img.code.0,
    }];
    hypmem::init(heap.0 .0, heap.1);
    let pages = ((ram.1 - ram.0) / 4096) as usize;
    let meta =
        hypmem::place_slice(pages, PageMeta::new).ok_or(HypInitError::Init(HypError::NoMemory))?;
    let host_ipa_bits = (64 - (ram.1 - 1).leading_zeros()).max(32);
    let cfg = HypConfig {
        mem: MemMap::new(meta, Pfn(ram.0 >> 12)),
        regions,
        host_rx: &code,
        pool_base: pool.0,
        pool_pages: pool.1 / 4096,
        pool_reserved: 0,
        host_ipa_bits,
        features: Default::default(),
    };
    let hyp: &'static BootHyp = hypmem::place(Hyp::new(HwHyp, &cfg).map_err(HypInitError::Init)?)
        .ok_or(HypInitError::Init(HypError::NoMemory))?;
    if !vcpurun::init() || !crate::platform::pview::init() {
        return Err(HypInitError::Init(HypError::NoMemory));
    }
    *HVC_TARGET.lock() = Some(hyp);
    hvc::set_handler(host_hvc);
    crate::platform::el1boot::set_abort_handler(host_abort);
    Ok(hyp)
}

/// `PKVM_INIT` (image-level hypercall, as Linux's `__pkvm_init`): x1 = the
/// address of a block in host memory of [`PKVM_INIT_WORDS`] words: RAM
/// start and end, the hypervisor's own memory (base, bytes), its pool
/// (base, bytes), the number of host regions (1..=[`PKVM_INIT_REGIONS`])
/// and the regions (base, bytes). Served once; refused
/// (`NOT_SUPPORTED`) once the hypervisor is set up.
pub const PKVM_INIT: u32 = 0xc600_0050;
/// Host memory regions a `PKVM_INIT` block carries at most.
pub const PKVM_INIT_REGIONS: usize = 4;
/// Words of a `PKVM_INIT` block.
pub const PKVM_INIT_WORDS: usize = 7 + 2 * PKVM_INIT_REGIONS;

/// The VMM at EL1: [`PKVM_INIT`] over a block in its heap; the hypervisor
/// it set up (step 1: a trusted host still reads the hypervisor's
/// statics).
fn pkvm_init_call(
    ram: (u64, u64),
    regions: &[MemRegion],
    heap: (Pa, u64),
    pool: (Pa, u64),
) -> Result<&'static BootHyp, HypInitError> {
    if regions.is_empty() || regions.len() > PKVM_INIT_REGIONS {
        return Err(HypInitError::Init(HypError::NoMemory));
    }
    let mut block = alloc::vec![0u64; PKVM_INIT_WORDS];
    block[..7].copy_from_slice(&[
        ram.0,
        ram.1,
        heap.0 .0,
        heap.1,
        pool.0 .0,
        pool.1,
        regions.len() as u64,
    ]);
    for (i, r) in regions.iter().enumerate() {
        block[7 + 2 * i] = r.base.0;
        block[8 + 2 * i] = r.size;
    }
    let mut regs = [0u64; 8];
    regs[0] = u64::from(PKVM_INIT);
    regs[1] = block.as_ptr() as u64;
    hvc::call(&mut regs);
    if regs[0] as i64 != pkvm_hyp::hvc::ret::SUCCESS {
        return Err(HypInitError::Call(regs[0] as i64));
    }
    // Before `FINALIZE` (no host stage-2 yet): the handle the host keeps
    // for the calls that take one, dereferenced only at EL2.
    let done = *HVC_TARGET.lock();
    done.ok_or(HypInitError::Call(regs[0] as i64))
}

/// Whether a second [`PKVM_INIT`] with a well-formed block (the same
/// `ram`, `regions`, `heap` and `pool` as the first) is refused with
/// `NOT_SUPPORTED` once the hypervisor is set up, leaving it as it was.
pub fn pkvm_init_refused_again(
    ram: (u64, u64),
    regions: &[MemRegion],
    heap: (Pa, u64),
    pool: (Pa, u64),
) -> bool {
    let used = || hyp_info().map(|i| i.mem_used);
    let before = used();
    let r = pkvm_init_call(ram, regions, heap, pool);
    matches!(r, Err(HypInitError::Call(s)) if s == pkvm_arch::smccc::ret::NOT_SUPPORTED)
        && before.is_some()
        && used() == before
}

/// [`PKVM_INIT`] at EL2: reads the host's block (in RAM, word aligned, at
/// most [`PKVM_INIT_REGIONS`] regions) and sets the hypervisor up; x0 =
/// `SUCCESS`, or `NOT_SUPPORTED` once set up, `INVALID_PARAMETER` for a
/// bad block, `NO_MEMORY` when the set-up failed.
fn pkvm_init(regs: &mut [u64; 8]) {
    use pkvm_hyp::hvc::ret;
    let at = regs[1];
    let bytes = 8 * PKVM_INIT_WORDS as u64;
    let set = |regs: &mut [u64; 8], r: i64| {
        *regs = [r as u64, 0, 0, 0, 0, 0, 0, 0];
    };
    if HVC_TARGET.lock().is_some() {
        return set(regs, pkvm_arch::smccc::ret::NOT_SUPPORTED);
    }
    if !at.is_multiple_of(8) || !crate::platform::phys::in_ram(at, bytes) {
        return set(regs, ret::INVALID_PARAMETER);
    }
    let w = |i: usize| crate::platform::phys::read_u64(Pa(at + 8 * i as u64));
    let n = w(6) as usize;
    if n == 0 || n > PKVM_INIT_REGIONS {
        return set(regs, ret::INVALID_PARAMETER);
    }
    let mut rs = [MemRegion {
        base: Pa(0),
        size: 0,
    }; PKVM_INIT_REGIONS];
    for (i, r) in rs.iter_mut().enumerate().take(n) {
        *r = MemRegion {
            base: Pa(w(7 + 2 * i)),
            size: w(8 + 2 * i),
        };
    }
    let r = setup_hyp((w(0), w(1)), &rs[..n], (Pa(w(2)), w(3)), (Pa(w(4)), w(5)));
    match r {
        Ok(_) => set(regs, ret::SUCCESS),
        Err(HypInitError::Init(e)) => set(regs, pkvm_hyp::hvc::ret_code(&e)),
        Err(_) => set(regs, ret::NO_MEMORY),
    }
}

/// Whether `PKVM_INIT`s with bad blocks (outside RAM, misaligned, no
/// region, more regions than a block holds, the hypervisor's memory
/// overlapping a host region) are each refused with `INVALID_PARAMETER`
/// and leave the hypervisor unset (before [`init_hyp`]; the handler is
/// installed at boot, [`install_hvc_handler`]). `ram`, `regions`, `heap`
/// and `pool` are those of a well-formed block.
pub fn pkvm_init_bad_blocks_refused(
    ram: (u64, u64),
    regions: &[MemRegion],
    heap: (Pa, u64),
    pool: (Pa, u64),
) -> bool {
    let call = |at: u64| {
        let mut regs = [u64::from(PKVM_INIT), at, 0, 0, 0, 0, 0, 0];
        hvc::call(&mut regs);
        regs[0] as i64
    };
    let fill = |b: &mut [u64], n: u64, first: MemRegion| {
        b[..7].copy_from_slice(&[ram.0, ram.1, heap.0 .0, heap.1, pool.0 .0, pool.1, n]);
        b[7] = first.base.0;
        b[8] = first.size;
        for (i, r) in regions.iter().enumerate().skip(1) {
            b[7 + 2 * i] = r.base.0;
            b[8 + 2 * i] = r.size;
        }
    };
    let Some(&first) = regions.first() else {
        return false;
    };
    let mut block = alloc::vec![0u64; PKVM_INIT_WORDS + 1];
    let at = block.as_ptr() as u64;
    let n = regions.len() as u64;
    let bad = pkvm_hyp::hvc::ret::INVALID_PARAMETER;
    let mut ok = call(0) == bad && call(ram.1 - 8) == bad;
    fill(&mut block, n, first);
    ok &= call(at + 4) == bad;
    fill(&mut block, 0, first);
    ok &= call(at) == bad;
    fill(&mut block, PKVM_INIT_REGIONS as u64 + 1, first);
    ok &= call(at) == bad;
    let over = MemRegion {
        base: heap.0,
        size: 4096,
    };
    fill(&mut block, n, over);
    ok &= call(at) == bad;
    ok && HVC_TARGET.lock().is_none()
}

/// Whether [`init_hyp`] has set the hypervisor up.
pub fn hyp_set_up() -> bool {
    HYP.lock().is_some()
}

/// Installs the hypervisor's hypercall handler before the hypervisor is
/// set up (EL2, boot CPU, at boot): until [`PKVM_INIT`] every other
/// call answers `NOT_SUPPORTED`.
pub fn install_hvc_handler() {
    hvc::set_handler(host_hvc);
}

/// The hypervisor's HVC handler ([`hvc::set_handler`]): runs at EL2 on
/// the calling CPU, `cpu` from the hypervisor's own per-CPU data.
fn host_hvc(cpu: usize, regs: &mut [u64; 8]) {
    if regs[0] == u64::from(PKVM_INIT) {
        return pkvm_init(regs);
    }
    if regs[0] == u64::from(super::el1host::NULL_RUN) {
        return super::el1host::null_run(regs);
    }
    let target = *HVC_TARGET.lock();
    let Some(h) = target else {
        regs[0] = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64;
        return;
    };
    let func = regs[0];
    let el1boot = &crate::platform::el1boot::all_cpus_protected;
    let needs_all = NEEDS_ALL_CPUS.iter().any(|&f| u64::from(f) == func)
        || func == u64::from(vcpurun::VCPU_RUN);
    if needs_all && !el1boot() {
        *regs = [pkvm_hyp::hvc::ret::DENIED as u64, 0, 0, 0, 0, 0, 0, 0];
        return;
    }
    match func {
        f if f == u64::from(vcpurun::VCPU_RUN) => vcpurun::vcpu_run(h, cpu, regs),
        f if f == u64::from(vcpurun::VCPU_LRS) => vcpurun::vcpu_lrs(h, cpu, regs),
        f if f == u64::from(HYP_INFO) => hyp_info_answer(h, regs),
        f if f == u64::from(HYP_PROBE) => probe_answer(h, regs),
        f if f == u64::from(VCPU_LOADED) || f == u64::from(VCPU_S2_FLUSH) => {
            loaded_answer(h, cpu, regs)
        }
        f if f == u64::from(PROT_FINALIZE_CPU) => {
            let ok = !hostrun::host_trusted() && protect_host(h);
            *regs = [0; 8];
            regs[0] = if ok {
                pkvm_hyp::hvc::ret::SUCCESS as u64
            } else {
                pkvm_arch::smccc::ret::NOT_SUPPORTED as u64
            };
        }
        _ => {
            let args = [regs[1], regs[2]];
            h.handle_host_hvc(cpu, regs);
            vcpurun::after_host_call(func, args, regs[0]);
            crate::platform::pview::after_host_call(func, args, regs[0]);
            let done = regs[0] as i64 == pkvm_hyp::hvc::ret::SUCCESS;
            if func == pkvm_hyp::hvc::id::FINALIZE as u64 && done {
                hostrun::set_protected(&PROTECTED);
                protect_host(h);
            }
        }
    }
}

/// [`HYP_INFO`] at EL2.
fn hyp_info_answer(h: &BootHyp, regs: &mut [u64; 8]) {
    let s = h.stats();
    let (faults, injected) = crate::platform::el1boot::fault_counts();
    *regs = [
        pkvm_hyp::hvc::ret::SUCCESS as u64,
        s.pool_pages,
        s.pool_free,
        s.vm_pages,
        s.live_vms,
        hypmem::used(),
        faults,
        injected,
    ];
}

/// pkvm-hyp's answers to `HOST_RUN` ([`hostrun::set_protected`], at EL2).
static PROTECTED: hostrun::Protected = hostrun::Protected {
    loaded: loaded_stage2,
    pin: pin_shared,
    unpin: unpin_shared,
    protected_vcpu,
};

/// The vCPU pkvm-hyp has loaded on CPU `cpu`, if its VM is protected:
/// `HOST_RUN` keeps its registers ([`crate::platform::pview`]).
fn protected_vcpu(cpu: usize) -> Option<crate::platform::pview::Key> {
    let h = (*HVC_TARGET.lock())?;
    let c = h.loaded_vcpu_context(cpu)?;
    c.protected.then_some((c.handle, c.vcpu))
}

/// The pages `[pa, pa + len)` touches: first page and count.
fn page_span(pa: u64, len: u64) -> Option<(Pa, u64)> {
    let (first, end) = (pa & !0xfff, pa.checked_add(len)?);
    (end > first).then(|| (Pa(first), (end - first).div_ceil(4096)))
}

/// Pins the pages of `[pa, pa + len)` in pkvm-hyp ([`Hyp::hyp_pin_shared`]):
/// whether they are all shared with the hypervisor by the host.
fn pin_shared(pa: u64, len: u64) -> bool {
    let (Some(h), Some((first, nr))) = (*HVC_TARGET.lock(), page_span(pa, len)) else {
        return false;
    };
    h.hyp_pin_shared(first, nr).is_ok()
}

/// Drops the pins [`pin_shared`] took.
fn unpin_shared(pa: u64, len: u64) {
    let (Some(h), Some((first, nr))) = (*HVC_TARGET.lock(), page_span(pa, len)) else {
        return;
    };
    let r = h.hyp_unpin_shared(first, nr);
    debug_assert!(r.is_ok(), "hyp bug: unpin of {pa:#x}+{len:#x}: {r:?}");
}

/// [`probe::PIN_UNSHARE`] of the page at `pa` on CPU `cpu` (EL2).
fn pin_unshare(h: &BootHyp, cpu: usize, pa: u64) -> (u64, u64) {
    let pa = pa & !0xfff;
    if !pin_shared(pa, 4096) {
        return (0, pkvm_arch::smccc::ret::NOT_SUPPORTED as u64);
    }
    let mut call = [0u64; 8];
    call[0] = u64::from(pkvm_hyp::hvc::id::HOST_UNSHARE_HYP);
    call[1] = pa >> 12;
    h.handle_host_hvc(cpu, &mut call);
    unpin_shared(pa, 4096);
    (1, call[0])
}

/// [`probe::SHARED`] (EL2): pages shared with the hypervisor, pins held.
fn shared_pages(h: &BootHyp) -> (u64, u64) {
    let m = h.memmap();
    (0..m.pages())
        .map(|i| m.pa_of(i))
        .fold((0, 0), |(n, pins), p| {
            let shared = m.hyp_state(p) == pkvm_hyp::PageState::SharedBorrowed;
            (n + u64::from(shared), pins + u64::from(m.hyp_pins(p)))
        })
}

/// The stage-2 (`VTTBR`, `VTCR`) of the vCPU pkvm-hyp has loaded on CPU
/// `cpu`, for `HOST_RUN` of a hyp-managed VM.
fn loaded_stage2(cpu: usize) -> Option<(u64, u64)> {
    let h = (*HVC_TARGET.lock())?;
    let c = h.loaded_vcpu_context(cpu)?;
    let opts = VtcrOptions::default();
    let vtcr = vtcr(c.geometry.ipa_bits, switch::parange(), opts).ok()?;
    Some((vttbr(c.s2_root, c.vmid), vtcr))
}

/// The host -> hypervisor call: the only place the host enters pkvm-hyp,
/// by `hvc #0` with `regs` in x0..x7 ([`hvc::call`]); the EL2 vector
/// calls [`Hyp::handle_host_hvc`] with the CPU index EL2 knows (the
/// caller's `cpu` is not passed). `hyp` = `None` (standard mode): no
/// hypervisor, `NOT_SUPPORTED` without a trap.
pub fn hyp_call(hyp: Option<&BootHyp>, _cpu: usize, regs: &mut [u64; 8]) {
    match hyp {
        Some(_) => hvc::call(regs),
        None => regs[0] = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64,
    }
}

/// Hypercalls timed by [`null_hvc_ns`].
pub const NULL_HVC_CALLS: u32 = 10_000;

/// The mean round trip of a null hypercall in nanoseconds: `GET_SIZES`
/// (decoded, validated and answered without touching any state) issued
/// [`NULL_HVC_CALLS`] times through [`hyp_call`], timed with the physical
/// counter. `None` when a call fails.
pub fn null_hvc_ns(hyp: &'static BootHyp) -> Option<u64> {
    let start = crate::platform::timer::now();
    for _ in 0..NULL_HVC_CALLS {
        let mut regs = [0u64; 8];
        regs[0] = pkvm_hyp::hvc::id::GET_SIZES as u64;
        regs[1] = 40;
        hyp_call(Some(hyp), start::cpu_index(), &mut regs);
        if regs[0] as i64 != pkvm_hyp::hvc::ret::SUCCESS {
            return None;
        }
    }
    let ticks = crate::platform::timer::now() - start;
    let freq = crate::platform::timer::frequency().max(1);
    Some(ticks * 1_000_000_000 / freq / u64::from(NULL_HVC_CALLS))
}

/// The platform the host runs on in the image.
pub struct BootPlatform {
    hyp: Option<&'static BootHyp>,
    /// Scheduler slot of each scheduled vCPU, by (VMID or handle, index).
    slots: SpinLock<BTreeMap<(u16, usize), usize>>,
    /// Hypercalls made.
    pub hvcs: AtomicU64,
}

impl core::fmt::Debug for BootPlatform {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BootPlatform")
            .field("protected", &self.hyp.is_some())
            .finish_non_exhaustive()
    }
}

impl BootPlatform {
    /// Standard mode (the host manages guest stage-2), or protected mode
    /// over `hyp`.
    pub fn new(hyp: Option<&'static BootHyp>) -> Arc<BootPlatform> {
        Arc::new(BootPlatform {
            hyp,
            slots: SpinLock::new(BTreeMap::new(), LockClass::Leaf),
            hvcs: AtomicU64::new(0),
        })
    }

    /// The hypervisor (protected mode).
    pub fn hyp(&self) -> Option<&'static BootHyp> {
        self.hyp
    }

    /// Records that vCPU `index` of the VM `id` (VMID or pKVM handle) runs
    /// in scheduler slot `slot`, for kicks.
    pub fn register_vcpu(&self, id: u16, index: usize, slot: usize) {
        self.slots.lock().insert((id, index), slot);
    }

    /// Forgets a vCPU (its run is over).
    pub fn unregister_vcpu(&self, id: u16, index: usize) {
        self.slots.lock().remove(&(id, index));
    }
}

impl HostPlatform for BootPlatform {
    type S2Env<'a> = HwS2;

    fn s2_env(&self, vmid: u16) -> HwS2 {
        s2_env(vmid)
    }

    fn alloc_pages(&self, order: u32) -> Option<Pa> {
        pool::alloc(order)
    }

    fn free_pages(&self, pa: Pa, order: u32) {
        pool::free(pa, order)
    }

    fn protected_mode(&self) -> bool {
        self.hyp.is_some()
    }

    fn hvc(&self, cpu: usize, regs: &mut [u64; 8]) {
        self.hvcs.fetch_add(1, Ordering::Relaxed);
        hyp_call(self.hyp, cpu, regs)
    }

    /// Forwards to the scheduler ([`super::run::kick`]): a sleeping vCPU
    /// is queued, a running one on another CPU gets the kick SGI (and
    /// leaves the guest). A vCPU not (or no longer) scheduled needs
    /// nothing: it reads its power state before its first entry.
    fn kick_vcpu(&self, vmid: u16, index: usize) {
        let slot = self.slots.lock().get(&(vmid, index)).copied();
        if let Some(s) = slot {
            super::run::kick(s);
        }
    }
}
