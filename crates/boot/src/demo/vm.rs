//! VMs of the demo host: a static VM table, stage-2 tables filled on
//! faults from the page pool, and the vCPU run loop (aborts, MMIO with an
//! emulated PL011, HVC/SMC with PSCI and the report call, WFx, sysreg
//! traps, IRQ exits).

use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use pkvm_arch::esr::{ec, fault_ipa, AccessSyndrome, Esr, FaultStatus};
use pkvm_arch::pte::S2Features;
use pkvm_arch::pte::S2Prot;
use pkvm_arch::smccc::{arch, psci};
use pkvm_arch::vtcr::{vtcr, vttbr, S2Geometry, VtcrOptions};
use pkvm_arch::{Granule, Ipa, Pa};
use pkvm_pgtable::{MapFlags, PageTable, PtError, Stage2, TlbOps};
use pkvm_sync::{LockClass, SpinLock};

use super::fdtgen;
use super::pool::{self, MemCache};
use crate::platform::hw::HwS2;
use crate::platform::phys;
use crate::platform::switch::{self, Exit, VcpuState, VmRegs, EXIT_IRQ, EXIT_SYNC, HCR_GUEST};
use crate::println;

/// VM slots.
pub const MAX_VMS: usize = 8;
/// vCPUs per VM.
pub const MAX_VCPUS: usize = 4;
/// Guest RAM base IPA.
pub const GUEST_RAM: u64 = 0x4000_0000;
/// IPA size of every VM.
pub const IPA_BITS: u32 = 40;
/// The vendor report hypercall (see guest-rt).
pub const REPORT_FID: u32 = 0xc600_0100;
const BLOCK: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Report codes (same numbers as `guest_rt::code`).
pub mod code {
    #![allow(missing_docs)]
    pub const DONE: u64 = 0;
    pub const TOUCH: u64 = 1;
    pub const MMIO_READ: u64 = 2;
    pub const HVC_UNDEF: u64 = 3;
    pub const PSCI_VERSION: u64 = 4;
    pub const EXCEPTION: u64 = 5;
    pub const PANIC: u64 = 6;
    pub const SMC: u64 = 7;
    pub const COUNT: usize = 8;
}

/// Per-VM counters.
#[derive(Default)]
#[allow(missing_docs)]
pub struct VmStats {
    pub faults: AtomicU64,
    pub exits: AtomicU64,
    pub hvc: AtomicU64,
    pub smc: AtomicU64,
    pub mmio: AtomicU64,
    pub mmio_unclaimed: AtomicU64,
    pub wfx: AtomicU64,
    pub irq: AtomicU64,
    pub sysreg: AtomicU64,
    pub undef_hvc: AtomicU64,
    pub injected_aborts: AtomicU64,
    pub pages_mapped: AtomicU64,
    pub pages_returned: AtomicU64,
}

/// Immutable facts about a created VM.
#[derive(Clone, Copy, Debug)]
pub struct VmInfo {
    /// Name (console prefix).
    pub name: &'static str,
    /// Guest RAM size in bytes (at [`GUEST_RAM`]).
    pub mem: u64,
    /// Map 2 MiB blocks on faults when possible.
    pub blocks: bool,
    /// VMID.
    pub vmid: u16,
    /// Stage-2 registers.
    pub regs: VmRegs,
    /// vCPU count.
    pub vcpus: usize,
    /// Physical CPU each vCPU last ran on.
    pub cpu: usize,
}

/// A line buffer for the emulated UART.
pub struct LineBuf {
    buf: [u8; 160],
    n: usize,
}

/// Power state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VmState {
    /// Slot unused.
    Free = 0,
    /// Created / running.
    Live = 1,
    /// Powered off by the guest (PSCI SYSTEM_OFF).
    Off = 2,
    /// Reset requested by the guest.
    Reset = 3,
    /// Stopped by the host after an error.
    Failed = 4,
}

/// A VM.
pub struct Vm {
    mmu: SpinLock<Option<PageTable<Stage2>>>,
    info: SpinLock<Option<VmInfo>>,
    uart: SpinLock<LineBuf>,
    reports: SpinLock<[Option<(u64, u64)>; code::COUNT]>,
    /// Counters.
    pub stats: VmStats,
    state: AtomicU8,
    vcpu_on: [AtomicBool; MAX_VCPUS],
    /// vCPUs currently inside the run loop.
    pub vcpus_running: AtomicUsize,
    warned_unclaimed: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const VM_INIT: Vm = Vm {
    mmu: SpinLock::new(None, LockClass::HypVm),
    info: SpinLock::new(None, LockClass::Leaf),
    uart: SpinLock::new(
        LineBuf {
            buf: [0; 160],
            n: 0,
        },
        LockClass::Leaf,
    ),
    reports: SpinLock::new([None; code::COUNT], LockClass::Leaf),
    stats: VmStats {
        faults: AtomicU64::new(0),
        exits: AtomicU64::new(0),
        hvc: AtomicU64::new(0),
        smc: AtomicU64::new(0),
        mmio: AtomicU64::new(0),
        mmio_unclaimed: AtomicU64::new(0),
        wfx: AtomicU64::new(0),
        irq: AtomicU64::new(0),
        sysreg: AtomicU64::new(0),
        undef_hvc: AtomicU64::new(0),
        injected_aborts: AtomicU64::new(0),
        pages_mapped: AtomicU64::new(0),
        pages_returned: AtomicU64::new(0),
    },
    state: AtomicU8::new(0),
    vcpu_on: [const { AtomicBool::new(false) }; MAX_VCPUS],
    vcpus_running: AtomicUsize::new(0),
    warned_unclaimed: AtomicBool::new(false),
};

/// The VM table.
pub static VMS: [Vm; MAX_VMS] = [VM_INIT; MAX_VMS];
static NEXT_VMID: AtomicU16 = AtomicU16::new(1);

/// Why a VM could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmError {
    /// Every slot is in use.
    NoSlot,
    /// The page pool ran out (host resources).
    NoMemory,
    /// The guest image does not fit in its memory (caller's request).
    ImageTooBig {
        /// Image size.
        size: u64,
        /// Memory size.
        mem: u64,
    },
    /// Bad VM parameters (caller's request).
    BadConfig(&'static str),
    /// A page-table error (internal).
    Pt(PtError),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmError::NoSlot => write!(f, "no free VM slot"),
            VmError::NoMemory => write!(f, "host page pool exhausted"),
            VmError::ImageTooBig { size, mem } => write!(
                f,
                "image of {size} bytes does not fit in {mem} bytes of guest RAM"
            ),
            VmError::BadConfig(s) => write!(f, "bad VM configuration: {s}"),
            VmError::Pt(e) => write!(f, "stage-2 error: {e}"),
        }
    }
}

impl From<PtError> for VmError {
    fn from(e: PtError) -> Self {
        VmError::Pt(e)
    }
}

/// What to put in a new VM.
pub struct VmSpec<'a> {
    /// Name.
    pub name: &'static str,
    /// RAM bytes.
    pub mem: u64,
    /// 2 MiB blocks on faults.
    pub blocks: bool,
    /// Image bytes, loaded at `GUEST_RAM + load_offset`.
    pub image: &'a [u8],
    /// Offset of the image in RAM.
    pub load_offset: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Device tree command line (`Some`: generate a DTB, x0 = its IPA).
    pub dtb_bootargs: Option<&'a str>,
}

/// How a VM starts: entry PC and x0..x3.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// Entry IPA.
    pub pc: u64,
    /// Initial x0..x3.
    pub args: [u64; 4],
}

impl Vm {
    /// Facts about the VM.
    ///
    /// # Panics
    /// On an unused slot (internal bug).
    pub fn info(&self) -> VmInfo {
        self.info.lock().expect("VM slot not in use")
    }

    /// Power state.
    pub fn state(&self) -> VmState {
        match self.state.load(Ordering::Acquire) {
            0 => VmState::Free,
            1 => VmState::Live,
            2 => VmState::Off,
            3 => VmState::Reset,
            _ => VmState::Failed,
        }
    }

    fn set_state(&self, s: VmState) {
        // Only the first stop reason counts.
        let _ = self.state.compare_exchange(
            VmState::Live as u8,
            s as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The last report with `code`.
    pub fn report(&self, c: u64) -> Option<(u64, u64)> {
        self.reports.lock().get(c as usize).copied().flatten()
    }

    fn env(&self) -> HwS2 {
        HwS2 {
            vttbr: self.info().regs.vttbr,
        }
    }

    /// Maps one frame run (4K page or 2M block) at `ipa` with its content.
    fn map_new(
        &self,
        ipa: u64,
        size: u64,
        cache: &mut MemCache,
        content: Option<&[u8]>,
    ) -> Result<(), VmError> {
        let n = (size / PAGE) as usize;
        let pa = pool::alloc_zeroed(n).ok_or(VmError::NoMemory)?;
        if let Some(c) = content {
            phys::write(pa, c);
        }
        let env = self.env();
        env.dcache_clean_poc(pa, size);
        cache.topup().map_err(|()| {
            pool::free(pa, n);
            VmError::NoMemory
        })?;
        let flags = if size == PAGE {
            MapFlags::FORCE_PAGE
        } else {
            MapFlags::NONE
        };
        let r = {
            let mut mmu = self.mmu.lock();
            let pt = mmu
                .as_mut()
                .ok_or(VmError::BadConfig("VM has no stage-2"))?;
            pt.map(
                &env,
                Ipa(ipa),
                size,
                pa,
                S2Prot::RWX,
                flags | MapFlags::NO_REPLACE,
                cache,
            )
        };
        match r {
            Ok(()) => {
                self.stats
                    .pages_mapped
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(PtError::Again) | Err(PtError::AlreadyMapped { .. }) => {
                // Another vCPU mapped it first: the guest retries.
                pool::free(pa, n);
                Ok(())
            }
            Err(e) => {
                pool::free(pa, n);
                Err(e.into())
            }
        }
    }

    /// Resolves a stage-2 fault at `ipa` inside guest RAM.
    fn handle_fault(&self, info: &VmInfo, ipa: u64, cache: &mut MemCache) -> Result<(), VmError> {
        let block = ipa & !(BLOCK - 1);
        let use_block =
            info.blocks && block >= GUEST_RAM && block + BLOCK <= GUEST_RAM + info.mem && {
                // Only where nothing is mapped at 4K granularity yet.
                let env = self.env();
                let mmu = self.mmu.lock();
                mmu.as_ref()
                    .is_some_and(|pt| pt.get_leaf(&env, Ipa(block)).level.0 < 3)
            };
        if use_block {
            self.map_new(block, BLOCK, cache, None)
        } else {
            self.map_new(ipa & !(PAGE - 1), PAGE, cache, None)
        }
    }

    fn uart_putc(&self, name: &str, c: u8) {
        let mut u = self.uart.lock();
        if c == b'\n' || u.n == u.buf.len() {
            let line = core::str::from_utf8(&u.buf[..u.n]).unwrap_or("<non-utf8 output>");
            println!("[{name}] {line}");
            u.n = 0;
            if c == b'\n' {
                return;
            }
        }
        if c != b'\r' {
            let n = u.n;
            u.buf[n] = c;
            u.n += 1;
        }
    }
}

/// Creates a VM in a free slot, loads its image (and device tree) and
/// returns it with its boot registers.
///
/// # Errors
/// See [`VmError`].
pub fn create(spec: &VmSpec<'_>) -> Result<(&'static Vm, Boot), VmError> {
    if spec.mem < 2 * BLOCK || !spec.mem.is_multiple_of(BLOCK) || spec.mem > 1 << 30 {
        return Err(VmError::BadConfig(
            "memory must be a multiple of 2 MiB, 4 MiB..1 GiB",
        ));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(VmError::BadConfig("vCPU count"));
    }
    let dtb_reserve = if spec.dtb_bootargs.is_some() {
        BLOCK
    } else {
        0
    };
    let img_end = spec.load_offset + spec.image.len() as u64;
    if img_end + dtb_reserve > spec.mem {
        return Err(VmError::ImageTooBig {
            size: spec.image.len() as u64,
            mem: spec.mem,
        });
    }
    let (slot, vm) = VMS
        .iter()
        .enumerate()
        .find(|(_, v)| {
            v.state
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
        .ok_or(VmError::NoSlot)?;
    let _ = slot;
    let geo =
        S2Geometry::new(Granule::Size4K, IPA_BITS).map_err(|_| VmError::BadConfig("IPA size"))?;
    let Some(root) = pool::alloc_zeroed(geo.root_pages) else {
        vm.state.store(0, Ordering::Release);
        return Err(VmError::NoMemory);
    };
    let vmid = NEXT_VMID.fetch_add(1, Ordering::Relaxed) as u8 as u16;
    let vt = vtcr(IPA_BITS, switch::parange(), VtcrOptions::default())
        .map_err(|_| VmError::BadConfig("VTCR"))?;
    let regs = VmRegs {
        vttbr: vttbr(root, vmid),
        vtcr: vt,
        hcr: HCR_GUEST,
    };
    *vm.mmu.lock() = Some(PageTable::new(root, geo, S2Features::default()));
    *vm.info.lock() = Some(VmInfo {
        name: spec.name,
        mem: spec.mem,
        blocks: spec.blocks,
        vmid,
        regs,
        vcpus: spec.vcpus,
        cpu: 0,
    });
    reset_stats(vm);
    HwS2 { vttbr: regs.vttbr }.tlbi_all();

    let mut cache = MemCache::new();
    let r = load(vm, spec, &mut cache);
    cache.drain();
    let boot = match r {
        Ok(b) => b,
        Err(e) => {
            destroy(vm);
            return Err(e);
        }
    };
    Ok((vm, boot))
}

fn reset_stats(vm: &Vm) {
    let s = &vm.stats;
    for c in [
        &s.faults,
        &s.exits,
        &s.hvc,
        &s.smc,
        &s.mmio,
        &s.mmio_unclaimed,
        &s.wfx,
        &s.irq,
        &s.sysreg,
        &s.undef_hvc,
        &s.injected_aborts,
        &s.pages_mapped,
        &s.pages_returned,
    ] {
        c.store(0, Ordering::Relaxed);
    }
    *vm.reports.lock() = [None; code::COUNT];
    vm.uart.lock().n = 0;
    vm.warned_unclaimed.store(false, Ordering::Relaxed);
    for v in &vm.vcpu_on {
        v.store(false, Ordering::Relaxed);
    }
}

fn load(vm: &Vm, spec: &VmSpec<'_>, cache: &mut MemCache) -> Result<Boot, VmError> {
    // The image: page by page (the host copies it into frames it maps).
    let base = GUEST_RAM + spec.load_offset;
    for (i, chunk) in spec.image.chunks(PAGE as usize).enumerate() {
        vm.map_new(base + i as u64 * PAGE, PAGE, cache, Some(chunk))?;
    }
    let mut args = [0u64; 4];
    if let Some(bootargs) = spec.dtb_bootargs {
        let mut blob = [0u8; 8192];
        let n = fdtgen::vm_device_tree(&mut blob, GUEST_RAM, spec.mem, spec.vcpus, bootargs)
            .map_err(|_| VmError::BadConfig("device tree too big (command line?)"))?;
        fdtgen::verify(&blob[..n], GUEST_RAM, spec.mem, spec.vcpus, bootargs)
            .map_err(VmError::BadConfig)?;
        let dtb_ipa = GUEST_RAM + spec.mem - BLOCK;
        for (i, chunk) in blob[..n].chunks(PAGE as usize).enumerate() {
            vm.map_new(dtb_ipa + i as u64 * PAGE, PAGE, cache, Some(chunk))?;
        }
        println!(
            "vm {}: device tree at IPA {dtb_ipa:#x} ({n} bytes, {} vCPUs, bootargs \"{bootargs}\"), checked with the fdt crate",
            spec.name, spec.vcpus
        );
        args[0] = dtb_ipa;
    }
    Ok(Boot { pc: base, args })
}

/// Tears a VM down: flushes its VMID, returns every guest frame and table
/// page to the pool, frees the slot.
pub fn destroy(vm: &Vm) {
    let info = vm.info();
    let env = HwS2 {
        vttbr: info.regs.vttbr,
    };
    let Some(pt) = vm.mmu.lock().take() else {
        return;
    };
    env.tlbi_all();
    let mut returned = 0u64;
    let _ = pt.for_each_leaf(&env, Ipa(GUEST_RAM), info.mem, |_, level, pte| {
        if pte & 1 == 0 {
            return;
        }
        let pa = Pa(pte & 0x0000_ffff_ffff_f000);
        let n = 1usize << (9 * (3 - level.0 as u32));
        pool::free(pa, n);
        returned += n as u64;
    });
    let mut cache = MemCache::new();
    let root = pt.destroy(&env, &mut cache);
    cache.drain();
    pool::free(root, pt_root_pages());
    vm.stats.pages_returned.store(returned, Ordering::Relaxed);
    env.tlbi_all();
    *vm.info.lock() = None;
    vm.state.store(VmState::Free as u8, Ordering::Release);
}

fn pt_root_pages() -> usize {
    S2Geometry::new(Granule::Size4K, IPA_BITS)
        .map(|g| g.root_pages)
        .unwrap_or(1)
}

/// How a vCPU's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The VM powered off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The VM asked for a reset.
    Reset,
    /// This vCPU called PSCI CPU_OFF.
    CpuOff,
    /// Another vCPU stopped the VM.
    VmStopped,
    /// The host stopped the VM (message says why).
    Error(&'static str),
}

enum Step {
    Continue,
    Stop(VcpuEnd),
}

/// A request to start a secondary vCPU (PSCI CPU_ON).
pub type CpuOnHook<'a> = &'a dyn Fn(&'static Vm, usize, Boot) -> bool;

/// Runs vCPU `idx` of `vm` on this CPU until it stops.
pub fn run_vcpu(vm: &'static Vm, idx: usize, boot: Boot, cpu_on: CpuOnHook<'_>) -> VcpuEnd {
    let mut info = vm.info();
    info.cpu = crate::platform::start::cpu_index();
    if let Some(i) = vm.info.lock().as_mut() {
        i.cpu = info.cpu;
    }
    vm.vcpu_on[idx].store(true, Ordering::Release);
    vm.vcpus_running.fetch_add(1, Ordering::AcqRel);
    let mut st = VcpuState::new(boot.pc, boot.args, idx as u64);
    let pauth = switch::has_pauth();
    let mut cache = MemCache::new();
    let end = loop {
        if vm.state() != VmState::Live {
            break VcpuEnd::VmStopped;
        }
        let exit = switch::run(&info.regs, &mut st, pauth);
        vm.stats.exits.fetch_add(1, Ordering::Relaxed);
        let step = match exit.kind {
            EXIT_SYNC => handle_sync(vm, &info, idx, &mut st, &exit, &mut cache, cpu_on),
            EXIT_IRQ | 10 => {
                vm.stats.irq.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            11 => Step::Stop(VcpuEnd::Error("SError from the guest")),
            _ => Step::Stop(VcpuEnd::Error("exception from AArch32 (unsupported)")),
        };
        if let Step::Stop(e) = step {
            match e {
                VcpuEnd::PowerOff => vm.set_state(VmState::Off),
                VcpuEnd::Reset => vm.set_state(VmState::Reset),
                VcpuEnd::Error(msg) => {
                    println!(
                        "vm {}: vCPU {idx} stopped: {msg} (ESR_EL2 {:#x}, PC {:#x}, FAR {:#x})",
                        info.name, exit.esr, st.regs.pc, exit.far
                    );
                    vm.set_state(VmState::Failed)
                }
                VcpuEnd::CpuOff | VcpuEnd::VmStopped => {}
            }
            break e;
        }
    };
    cache.drain();
    vm.vcpu_on[idx].store(false, Ordering::Release);
    vm.vcpus_running.fetch_sub(1, Ordering::AcqRel);
    end
}

#[allow(clippy::too_many_arguments)]
fn handle_sync(
    vm: &'static Vm,
    info: &VmInfo,
    idx: usize,
    st: &mut VcpuState,
    exit: &Exit,
    cache: &mut MemCache,
    cpu_on: CpuOnHook<'_>,
) -> Step {
    let esr = Esr(exit.esr);
    match esr.ec() {
        ec::DABT_LOW | ec::IABT_LOW => {
            let Some(da) = esr.abort() else {
                return Step::Stop(VcpuEnd::Error("undecodable abort"));
            };
            let ipa = fault_ipa(exit.hpfar, exit.far).0;
            let in_ram = (GUEST_RAM..GUEST_RAM + info.mem).contains(&ipa);
            if in_ram {
                match da.status {
                    FaultStatus::Translation(_) | FaultStatus::AccessFlag(_) => {
                        vm.stats.faults.fetch_add(1, Ordering::Relaxed);
                        match vm.handle_fault(info, ipa, cache) {
                            Ok(()) => Step::Continue,
                            Err(VmError::NoMemory) => {
                                Step::Stop(VcpuEnd::Error("host out of memory"))
                            }
                            Err(_) => Step::Stop(VcpuEnd::Error("stage-2 map failed")),
                        }
                    }
                    _ => Step::Stop(VcpuEnd::Error("unexpected stage-2 fault in guest RAM")),
                }
            } else if da.instruction {
                // Executing from an IPA with no memory: synchronous
                // external abort, as KVM injects.
                inject_abort(vm, st, exit.far, true);
                Step::Continue
            } else if let Some(syn) = da.syndrome {
                mmio(vm, info, st, ipa, da.write, syn);
                st.regs.pc += 4;
                Step::Continue
            } else {
                inject_abort(vm, st, exit.far, false);
                Step::Continue
            }
        }
        ec::HVC64 => {
            vm.stats.hvc.fetch_add(1, Ordering::Relaxed);
            smccc(vm, info, idx, st, cpu_on)
        }
        ec::SMC64 => {
            // Trapped SMC (HCR_EL2.TSC): same services; ELR points at the SMC.
            vm.stats.smc.fetch_add(1, Ordering::Relaxed);
            st.regs.pc += 4;
            smccc(vm, info, idx, st, cpu_on)
        }
        ec::WFX => {
            vm.stats.wfx.fetch_add(1, Ordering::Relaxed);
            st.regs.pc += 4;
            Step::Continue
        }
        ec::SYS64 => {
            // Trapped system register access: reads as zero, writes ignored.
            vm.stats.sysreg.fetch_add(1, Ordering::Relaxed);
            let iss = esr.iss();
            let rt = ((iss >> 5) & 0x1f) as usize;
            if iss & 1 == 1 && rt < 31 {
                st.regs.x[rt] = 0;
            }
            st.regs.pc += 4;
            Step::Continue
        }
        _ => Step::Stop(VcpuEnd::Error("unhandled exception class")),
    }
}

/// Injects a synchronous external abort into the guest (KVM's
/// `inject_abt64`): ESR_EL1/FAR_EL1/ELR_EL1/SPSR_EL1 set, PC at the
/// matching VBAR_EL1 vector, PSTATE EL1h with DAIF masked.
fn inject_abort(vm: &Vm, st: &mut VcpuState, far: u64, instruction: bool) {
    vm.stats.injected_aborts.fetch_add(1, Ordering::Relaxed);
    let mode = st.regs.pstate & 0xf;
    let (ec, off) = match (mode, instruction) {
        (0, true) => (ec::IABT_LOW, 0x400),
        (0, false) => (ec::DABT_LOW, 0x400),
        (4, true) => (ec::IABT_CUR, 0x000),
        (4, false) => (ec::DABT_CUR, 0x000),
        (_, true) => (ec::IABT_CUR, 0x200),
        (_, false) => (ec::DABT_CUR, 0x200),
    };
    st.sys.esr = ((ec as u64) << 26) | (1 << 25) | FaultStatus::ExternalAbort.encode() as u64;
    st.sys.far = far;
    st.sys.elr = st.regs.pc;
    st.sys.spsr = st.regs.pstate;
    st.regs.pstate = switch::PSTATE_EL1H_MASKED;
    st.regs.pc = st.sys.vbar + off;
}

/// PL011 identification registers (0xfe0..0xffc) so drivers probe it.
const PL011_ID: [u32; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

fn mmio(vm: &Vm, info: &VmInfo, st: &mut VcpuState, ipa: u64, write: bool, syn: AccessSyndrome) {
    vm.stats.mmio.fetch_add(1, Ordering::Relaxed);
    let rt = syn.srt as usize;
    let wval = if rt < 31 { st.regs.x[rt] } else { 0 };
    let uart = fdtgen::GUEST_UART;
    let rval: u64 = if (uart..uart + 0x1000).contains(&ipa) {
        let off = ipa - uart;
        match (write, off) {
            (true, 0) => {
                vm.uart_putc(info.name, wval as u8);
                0
            }
            (true, _) => 0,
            (false, 0x18) => 0x90, // FR: TX empty, RX empty
            (false, 0xfe0..=0xffc) => PL011_ID[((off - 0xfe0) / 4) as usize] as u64,
            (false, _) => 0,
        }
    } else {
        vm.stats.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
        if !vm.warned_unclaimed.swap(true, Ordering::Relaxed) {
            println!(
                "vm {}: mmio exit outside memslots at IPA {ipa:#x} ({} of {} bytes): handled by the host ({})",
                info.name,
                if write { "write" } else { "read" },
                syn.size(),
                if write { "ignored" } else { "reads as 0" }
            );
        }
        0
    };
    if !write && rt < 31 {
        let bits = 8 * syn.size() as u32;
        let mut v = if bits >= 64 {
            rval
        } else {
            rval & ((1u64 << bits) - 1)
        };
        if syn.sse && bits < 64 && v & (1 << (bits - 1)) != 0 {
            v |= !((1u64 << bits) - 1);
        }
        if !syn.sf {
            v &= 0xffff_ffff;
        }
        st.regs.x[rt] = v;
    }
}

fn smccc(
    vm: &'static Vm,
    info: &VmInfo,
    idx: usize,
    st: &mut VcpuState,
    cpu_on: CpuOnHook<'_>,
) -> Step {
    let fid = st.regs.x[0] as u32;
    let a = [st.regs.x[1], st.regs.x[2], st.regs.x[3]];
    let ret = |v: i64| v as u64;
    let r0 = match fid {
        psci::VERSION => psci::version(1, 1) as u64,
        psci::SYSTEM_OFF => return Step::Stop(VcpuEnd::PowerOff),
        psci::SYSTEM_RESET => return Step::Stop(VcpuEnd::Reset),
        psci::CPU_OFF => return Step::Stop(VcpuEnd::CpuOff),
        psci::CPU_ON_64 | psci::CPU_ON_32 => {
            let target = (a[0] & 0xff_00ff_ffff) as usize;
            if target >= info.vcpus {
                ret(psci::RET_INVALID_PARAMETERS)
            } else if vm.vcpu_on[target].load(Ordering::Acquire) {
                ret(psci::RET_ALREADY_ON)
            } else if cpu_on(
                vm,
                target,
                Boot {
                    pc: a[1],
                    args: [a[2], 0, 0, 0],
                },
            ) {
                ret(psci::RET_SUCCESS)
            } else {
                ret(psci::RET_INTERNAL_FAILURE)
            }
        }
        psci::AFFINITY_INFO_64 | psci::AFFINITY_INFO_32 => {
            let target = (a[0] & 0xff_00ff_ffff) as usize;
            if target >= info.vcpus {
                ret(psci::RET_INVALID_PARAMETERS)
            } else if vm.vcpu_on[target].load(Ordering::Acquire) {
                ret(psci::AFFINITY_ON)
            } else {
                ret(psci::AFFINITY_OFF)
            }
        }
        psci::MIGRATE_INFO_TYPE => ret(psci::TOS_NOT_PRESENT_MP),
        psci::PSCI_FEATURES => match a[0] as u32 {
            psci::VERSION
            | psci::SYSTEM_OFF
            | psci::SYSTEM_RESET
            | psci::CPU_OFF
            | psci::CPU_ON_64
            | psci::AFFINITY_INFO_64
            | psci::MIGRATE_INFO_TYPE
            | psci::PSCI_FEATURES => 0,
            _ => ret(psci::RET_NOT_SUPPORTED),
        },
        arch::SMCCC_VERSION => arch::VERSION_1_1 as u64,
        REPORT_FID => {
            report(vm, info, idx, a[0], a[1], a[2]);
            0
        }
        _ => {
            vm.stats.undef_hvc.fetch_add(1, Ordering::Relaxed);
            ret(pkvm_arch::smccc::ret::NOT_SUPPORTED)
        }
    };
    st.regs.x[0] = r0;
    Step::Continue
}

fn report(vm: &Vm, info: &VmInfo, idx: usize, c: u64, a: u64, b: u64) {
    if let Some(slot) = vm.reports.lock().get_mut(c as usize) {
        *slot = Some((a, b));
    }
    let name = info.name;
    match c {
        code::DONE => {}
        code::TOUCH => {
            let mib = (b * PAGE) >> 20;
            if a == 0 {
                println!("vm {name}: guest verified {mib} MiB: ok");
            } else {
                println!("vm {name}: guest verified {mib} MiB: FAILED ({a} wrong values)");
            }
        }
        code::MMIO_READ => println!("vm {name}: guest read {a:#x} from unbacked IPA {b:#x}"),
        code::HVC_UNDEF => {
            if a as i64 == pkvm_arch::smccc::ret::NOT_SUPPORTED {
                println!("vm {name}: undefined hvc returned NOT_SUPPORTED");
            } else {
                println!("vm {name}: undefined hvc returned {a:#x}: WRONG");
            }
        }
        code::PSCI_VERSION => println!("vm {name}: guest sees PSCI {}.{}", a >> 16, a & 0xffff),
        code::EXCEPTION => {
            let e = Esr(a);
            let sea = e.ec() == ec::IABT_CUR
                && FaultStatus::decode((a & 0x3f) as u8) == FaultStatus::ExternalAbort;
            println!(
                "vm {name}: guest took an injected abort: ESR_EL1 {a:#x} FAR_EL1 {b:#x}{}",
                if sea {
                    " (synchronous external abort on instruction fetch)"
                } else {
                    ""
                }
            );
        }
        code::SMC => println!("vm {name}: trapped smc returned {a:#x}"),
        code::PANIC => println!("vm {name}: vCPU {idx} reported a guest panic"),
        _ => println!("vm {name}: vCPU {idx} report {c}: {a:#x} {b:#x}"),
    }
}

/// Prints the VM's statistics line.
pub fn print_stats(vm: &Vm) {
    let i = vm.info();
    let s = &vm.stats;
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "vm {}: stage-2 faults {}, exits {} (hvc {}, smc {}, mmio {} of which outside memslots {}, wfx {}, irq {}, sysreg {}, undefined hvc {}, injected aborts {}), pages mapped {}, vmid {}, cpu {}, {} MiB, {}",
        i.name,
        l(&s.faults),
        l(&s.exits),
        l(&s.hvc),
        l(&s.smc),
        l(&s.mmio),
        l(&s.mmio_unclaimed),
        l(&s.wfx),
        l(&s.irq),
        l(&s.sysreg),
        l(&s.undef_hvc),
        l(&s.injected_aborts),
        l(&s.pages_mapped),
        i.vmid,
        i.cpu,
        i.mem >> 20,
        if i.blocks { "2M blocks" } else { "4K pages" }
    );
}
