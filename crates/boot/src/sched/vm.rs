//! A minimal VM for the scheduler scenarios, standing in for pkvm-host's
//! `Vm`/`Vcpu` until the image's run loop is pkvm-host's (see the module
//! docs of [`super`]).
//!
//! - Memory: guest RAM at [`GUEST_RAM`], backed by one physically
//!   contiguous, 2 MiB-aligned range taken from a bump allocator over the
//!   page pool area, mapped eagerly with 2 MiB stage-2 blocks (no faults).
//! - Devices: the PL011 data/flag registers at [`GUEST_UART`] (MMIO exits),
//!   one line buffer per vCPU; output lines are printed as
//!   `[<vm> vcpu <i>] <line>`.
//! - PSCI over HVC, PSCI 1.1: `pkvm_host::psci::handle_psci`; vCPU reset:
//!   `pkvm_host::reset::{power_on_vm, prepare_to_run}` — the same code the
//!   simulator tier runs. vCPU affinities follow
//!   `pkvm_host::vcpu_state::mpidr_affinity`.
//! - Interrupts: an IRQ exit is acknowledged with `gic::drain` and becomes
//!   [`Outcome::Preempted`].

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use pkvm_arch::esr::{ec, fault_ipa, Esr};
use pkvm_arch::pte::{S2Features, S2Prot};
use pkvm_arch::vtcr::{vtcr, vttbr, S2Geometry, VtcrOptions};
use pkvm_arch::{Granule, Ipa, Pa};
use pkvm_host::psci::{
    handle_psci, Conduit, PowerState, PsciCaller, PsciConfig, PsciOutcome, PsciVersion, PsciVm,
    SystemEventKind, VcpuPower,
};
use pkvm_host::reset::{self, BootParams, Readiness};
use pkvm_host::vcpu_state::{El1SysRegs, GuestGprs};
use pkvm_pgtable::{MapFlags, PageCache, PageTable, Stage2, TlbOps};
use pkvm_sync::{LockClass, SpinLock};

use super::{Kick, Outcome, SchedVcpu, VmEnd, MAX_SCHED_VCPUS};
use crate::platform::hw::{dcache_clean_range, HwS2};
use crate::platform::switch::{self, VcpuState, VmRegs, EXIT_IRQ, EXIT_SYNC, HCR_GUEST};
use crate::platform::{gic, phys};
use crate::println;

/// Guest RAM base IPA.
pub const GUEST_RAM: u64 = 0x4000_0000;
/// The emulated PL011.
pub const GUEST_UART: u64 = 0x0900_0000;
const IPA_BITS: u32 = 40;
const BLOCK: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Why the VM could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedVmError {
    /// Physical memory ran out (host resources).
    NoMemory,
    /// Bad request from the scenario (message says what).
    BadConfig(&'static str),
    /// Stage-2 mapping failed (internal).
    Map,
}

impl core::fmt::Display for SchedVmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SchedVmError::NoMemory => write!(f, "out of physical memory"),
            SchedVmError::BadConfig(s) => write!(f, "bad VM configuration: {s}"),
            SchedVmError::Map => write!(f, "stage-2 mapping failed"),
        }
    }
}

/// Physical memory for the VM: a bump allocator over `[start, end)`.
/// Nothing is freed (the image exits after the scenario).
pub struct Frames {
    next: AtomicU64,
    end: AtomicU64,
}

impl Frames {
    /// An empty allocator.
    pub const fn new() -> Self {
        Frames {
            next: AtomicU64::new(0),
            end: AtomicU64::new(0),
        }
    }

    /// Sets the range.
    pub fn init(&self, start: u64, end: u64) {
        self.next.store(start, Ordering::Relaxed);
        self.end.store(end, Ordering::Relaxed);
    }

    /// `size` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc(&self, size: u64, align: u64) -> Option<Pa> {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = cur.next_multiple_of(align);
            let end = start.checked_add(size)?;
            if end > self.end.load(Ordering::Relaxed) {
                return None;
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    phys::zero(Pa(start), size);
                    return Some(Pa(start));
                }
                Err(c) => cur = c,
            }
        }
    }
}

impl Default for Frames {
    fn default() -> Self {
        Self::new()
    }
}

struct FrameCache<'a>(&'a Frames);

impl PageCache for FrameCache<'_> {
    fn alloc_table(&mut self) -> Option<Pa> {
        self.0.alloc(PAGE, PAGE)
    }
    fn free_table(&mut self, _pa: Pa) {}
}

/// The VM (usually a `static`; `new` is `const`).
pub struct SchedVm {
    name: &'static str,
    kicker: &'static dyn Kick,
    vcpus: AtomicUsize,
    power: [SpinLock<VcpuPower>; MAX_SCHED_VCPUS],
    regs: SpinLock<Option<VmRegs>>,
    uart: [SpinLock<LineBuf>; MAX_SCHED_VCPUS],
    /// Per vCPU: times a pending reset was applied (boot + each CPU_ON).
    pub starts: [AtomicU64; MAX_SCHED_VCPUS],
    /// Per vCPU: IRQ exits whose interrupt was the EL2 timer tick.
    pub timer_exits: [AtomicU64; MAX_SCHED_VCPUS],
    /// Per vCPU: IRQ exits caused by a kick SGI.
    pub kick_exits: [AtomicU64; MAX_SCHED_VCPUS],
    /// Per vCPU: guest exits of any kind.
    pub exits: [AtomicU64; MAX_SCHED_VCPUS],
}

struct LineBuf {
    buf: [u8; 160],
    n: usize,
}

impl SchedVm {
    /// A VM named `name` whose vCPU kicks go to `kicker` (its scheduler).
    pub const fn new(name: &'static str, kicker: &'static dyn Kick) -> Self {
        SchedVm {
            name,
            kicker,
            vcpus: AtomicUsize::new(0),
            power: [const { SpinLock::new(VcpuPower::new(PowerState::Stopped), LockClass::HostVcpu) };
                MAX_SCHED_VCPUS],
            regs: SpinLock::new(None, LockClass::Leaf),
            uart: [const {
                SpinLock::new(
                    LineBuf {
                        buf: [0; 160],
                        n: 0,
                    },
                    LockClass::Leaf,
                )
            }; MAX_SCHED_VCPUS],
            starts: [const { AtomicU64::new(0) }; MAX_SCHED_VCPUS],
            timer_exits: [const { AtomicU64::new(0) }; MAX_SCHED_VCPUS],
            kick_exits: [const { AtomicU64::new(0) }; MAX_SCHED_VCPUS],
            exits: [const { AtomicU64::new(0) }; MAX_SCHED_VCPUS],
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Builds the VM: `mem` bytes of RAM (multiple of 2 MiB) from `frames`,
    /// `image` copied to the start of RAM, `vcpus` vCPUs. Then
    /// [`SchedVm::power_on`] starts it.
    ///
    /// # Errors
    /// See [`SchedVmError`].
    pub fn create(
        &self,
        frames: &Frames,
        vmid: u16,
        mem: u64,
        image: &[u8],
        vcpus: usize,
    ) -> Result<(), SchedVmError> {
        if vcpus == 0 || vcpus > MAX_SCHED_VCPUS {
            return Err(SchedVmError::BadConfig("vCPU count"));
        }
        if mem == 0 || !mem.is_multiple_of(BLOCK) || image.len() as u64 > mem {
            return Err(SchedVmError::BadConfig("memory size or image size"));
        }
        if image.is_empty() {
            return Err(SchedVmError::BadConfig(
                "guest payload missing (build with `cargo xtask`)",
            ));
        }
        let geo = S2Geometry::new(Granule::Size4K, IPA_BITS)
            .map_err(|_| SchedVmError::BadConfig("IPA size"))?;
        let root_bytes = geo.root_pages as u64 * PAGE;
        let root = frames
            .alloc(root_bytes, root_bytes)
            .ok_or(SchedVmError::NoMemory)?;
        let ram = frames.alloc(mem, BLOCK).ok_or(SchedVmError::NoMemory)?;
        phys::write(ram, image);
        dcache_clean_range(ram.0, image.len() as u64);
        let vt = vtcr(IPA_BITS, switch::parange(), VtcrOptions::default())
            .map_err(|_| SchedVmError::BadConfig("VTCR"))?;
        let regs = VmRegs {
            vttbr: vttbr(root, vmid),
            vtcr: vt,
            hcr: HCR_GUEST,
        };
        let env = HwS2 { vttbr: regs.vttbr };
        let mut pt: PageTable<Stage2> = PageTable::new(root, geo, S2Features::default());
        pt.map(
            &env,
            Ipa(GUEST_RAM),
            mem,
            ram,
            S2Prot::RWX,
            MapFlags::NONE,
            &mut FrameCache(frames),
        )
        .map_err(|_| SchedVmError::Map)?;
        env.tlbi_all();
        // `pt` goes out of scope; its pages stay the VM's stage-2 for the
        // image's lifetime (the VM is never torn down: the image exits
        // after the scenario).
        self.vcpus.store(vcpus, Ordering::Release);
        *self.regs.lock() = Some(regs);
        println!(
            "vm {}: {} MiB at PA {:#x} (2M stage-2 blocks, VMID {vmid}), {} byte image, {vcpus} vCPUs, PSCI 1.1 over HVC",
            self.name,
            mem >> 20,
            ram.0,
            image.len()
        );
        Ok(())
    }

    /// Powers the VM on: vCPU 0 at `entry` with x0 = `x0`, the others off
    /// until a guest CPU_ON (`pkvm_host::reset::power_on_vm`).
    ///
    /// # Errors
    /// The VM has no vCPUs.
    pub fn power_on(&self, entry: u64, x0: u64) -> Result<(), SchedVmError> {
        reset::power_on_vm(
            self,
            &BootParams {
                entry,
                x0,
                big_endian: false,
            },
        )
        .map_err(|_| SchedVmError::BadConfig("power on"))
    }

    fn uart_putc(&self, idx: usize, c: u8) {
        let mut u = self.uart[idx].lock();
        if c == b'\n' || u.n == u.buf.len() {
            let line = core::str::from_utf8(&u.buf[..u.n]).unwrap_or("<non-utf8 output>");
            println!("[{} vcpu {idx}] {line}", self.name);
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

impl PsciVm for SchedVm {
    fn psci_config(&self) -> PsciConfig {
        PsciConfig {
            version: PsciVersion::V1_1,
            conduit: Conduit::Hvc,
            system_suspend: false,
        }
    }
    fn vcpu_count(&self) -> usize {
        self.vcpus.load(Ordering::Acquire)
    }
    fn vcpu_power(&self, index: usize) -> &SpinLock<VcpuPower> {
        &self.power[index]
    }
    fn kick_vcpu(&self, index: usize) {
        self.kicker.kick(index);
    }
}

/// One vCPU of a [`SchedVm`].
pub struct SchedVmVcpu {
    vm: &'static SchedVm,
    index: usize,
    st: VcpuState,
    pauth: bool,
}

impl SchedVmVcpu {
    /// vCPU `index` of `vm` (registers are set by its first reset).
    pub fn new(vm: &'static SchedVm, index: usize) -> Self {
        SchedVmVcpu {
            vm,
            index,
            st: VcpuState::new(0, [0; 4], 0),
            pauth: switch::has_pauth(),
        }
    }

    fn to_host(&self) -> (GuestGprs, El1SysRegs) {
        let r = &self.st.regs;
        let s = &self.st.sys;
        let g = GuestGprs {
            x: r.x,
            sp: s.sp_el0,
            pc: r.pc,
            pstate: r.pstate,
        };
        let sys = El1SysRegs {
            sctlr_el1: s.sctlr,
            cpacr_el1: s.cpacr,
            ttbr0_el1: s.ttbr0,
            ttbr1_el1: s.ttbr1,
            tcr_el1: s.tcr,
            mair_el1: s.mair,
            amair_el1: s.amair,
            vbar_el1: s.vbar,
            contextidr_el1: s.contextidr,
            esr_el1: s.esr,
            far_el1: s.far,
            afsr0_el1: s.afsr0,
            afsr1_el1: s.afsr1,
            par_el1: s.par,
            tpidr_el0: s.tpidr_el0,
            tpidrro_el0: s.tpidrro_el0,
            tpidr_el1: s.tpidr_el1,
            sp_el1: s.sp_el1,
            elr_el1: s.elr,
            spsr_el1: s.spsr,
            cntkctl_el1: s.cntkctl,
            mdscr_el1: s.mdscr,
            csselr_el1: s.csselr,
            mpidr_el1: self.st.vmpidr,
            cntv_ctl_el0: self.st.timer.ctl,
            cntv_cval_el0: self.st.timer.cval,
        };
        (g, sys)
    }

    fn load_host(&mut self, g: &GuestGprs, sys: &El1SysRegs) {
        let r = &mut self.st.regs;
        r.x = g.x;
        r.pc = g.pc;
        r.pstate = g.pstate;
        let s = &mut self.st.sys;
        s.sp_el0 = g.sp;
        s.sctlr = sys.sctlr_el1;
        s.cpacr = sys.cpacr_el1;
        s.ttbr0 = sys.ttbr0_el1;
        s.ttbr1 = sys.ttbr1_el1;
        s.tcr = sys.tcr_el1;
        s.mair = sys.mair_el1;
        s.amair = sys.amair_el1;
        s.vbar = sys.vbar_el1;
        s.contextidr = sys.contextidr_el1;
        s.esr = sys.esr_el1;
        s.far = sys.far_el1;
        s.afsr0 = sys.afsr0_el1;
        s.afsr1 = sys.afsr1_el1;
        s.par = sys.par_el1;
        s.tpidr_el0 = sys.tpidr_el0;
        s.tpidrro_el0 = sys.tpidrro_el0;
        s.tpidr_el1 = sys.tpidr_el1;
        s.sp_el1 = sys.sp_el1;
        s.elr = sys.elr_el1;
        s.spsr = sys.spsr_el1;
        s.cntkctl = sys.cntkctl_el1;
        s.mdscr = sys.mdscr_el1;
        s.csselr = sys.csselr_el1;
        self.st.vmpidr = sys.mpidr_el1;
        self.st.timer.ctl = sys.cntv_ctl_el0;
        self.st.timer.cval = sys.cntv_cval_el0;
    }

    /// PL011 MMIO; anything else outside RAM reads as zero, writes ignored.
    fn mmio(&mut self, ipa: u64, esr: Esr) -> Result<(), &'static str> {
        let da = esr.abort().ok_or("undecodable abort")?;
        if da.instruction {
            return Err("instruction fetch outside guest RAM");
        }
        let syn = da.syndrome.ok_or("MMIO access without a valid syndrome")?;
        let rt = syn.srt as usize;
        let off = ipa.wrapping_sub(GUEST_UART);
        if da.write {
            if off == 0 && rt < 31 {
                self.vm.uart_putc(self.index, self.st.regs.x[rt] as u8);
            }
        } else if rt < 31 {
            self.st.regs.x[rt] = if off == 0x18 { 0x90 } else { 0 };
        }
        self.st.regs.pc += 4;
        Ok(())
    }
}

impl SchedVcpu for SchedVmVcpu {
    fn run(&mut self, _cpu: usize) -> Outcome {
        let vm = self.vm;
        let i = self.index;
        let Some(regs) = *vm.regs.lock() else {
            return Outcome::VmEnd(VmEnd::Error("VM not created"));
        };
        loop {
            let (mut g, mut sys) = self.to_host();
            match reset::prepare_to_run(vm, i, &mut g, &mut sys) {
                Ok(Readiness::Run { reset: None }) => {}
                Ok(Readiness::Run { reset: Some(_) }) => {
                    self.load_host(&g, &sys);
                    self.st.regs.v = [0; 32];
                    self.st.regs.fpsr = 0;
                    self.st.regs.fpcr = 0;
                    vm.starts[i].fetch_add(1, Ordering::Relaxed);
                }
                Ok(Readiness::Sleep(_)) => return Outcome::Sleep,
                Err(_) => return Outcome::VmEnd(VmEnd::Error("reset of a vCPU out of range")),
            }
            let exit = switch::run(&regs, &mut self.st, self.pauth);
            vm.exits[i].fetch_add(1, Ordering::Relaxed);
            match exit.kind {
                EXIT_IRQ => {
                    let d = gic::drain();
                    if d.timer {
                        vm.timer_exits[i].fetch_add(1, Ordering::Relaxed);
                    }
                    if d.kick {
                        vm.kick_exits[i].fetch_add(1, Ordering::Relaxed);
                    }
                    return Outcome::Preempted;
                }
                EXIT_SYNC => {}
                _ => return Outcome::VmEnd(VmEnd::Error("unexpected exception vector")),
            }
            let esr = Esr(exit.esr);
            match esr.ec() {
                ec::HVC64 | ec::SMC64 => {
                    let (mut g, sys) = self.to_host();
                    let Some(caller) = PsciCaller::from_esr(i, esr, sys.is_big_endian()) else {
                        return Outcome::VmEnd(VmEnd::Error("not a call"));
                    };
                    let r = handle_psci(vm, &caller, &mut g);
                    self.load_host(&g, &sys);
                    match r {
                        Ok(PsciOutcome::Continue) | Ok(PsciOutcome::PowerOff) => {}
                        Ok(PsciOutcome::WaitForInterrupt) => return Outcome::Yield,
                        Ok(PsciOutcome::Suspended) => return Outcome::Sleep,
                        Ok(PsciOutcome::Exit(ev)) => {
                            return Outcome::VmEnd(match ev.kind {
                                SystemEventKind::Shutdown => VmEnd::PowerOff,
                                SystemEventKind::Reset => VmEnd::Reset,
                                SystemEventKind::Suspend => {
                                    VmEnd::Error("SYSTEM_SUSPEND (not offered)")
                                }
                            })
                        }
                        Err(_) => return Outcome::VmEnd(VmEnd::Error("PSCI caller out of range")),
                    }
                }
                ec::DABT_LOW | ec::IABT_LOW => {
                    let ipa = fault_ipa(exit.hpfar, exit.far).0;
                    if let Err(e) = self.mmio(ipa, esr) {
                        println!(
                            "vm {}: vCPU {i}: {e} at IPA {ipa:#x} (PC {:#x}, ESR {:#x})",
                            vm.name, self.st.regs.pc, exit.esr
                        );
                        return Outcome::VmEnd(VmEnd::Error("guest abort"));
                    }
                }
                ec::WFX => {
                    self.st.regs.pc += 4;
                    return Outcome::Yield;
                }
                ec::SYS64 => {
                    let iss = esr.iss();
                    let rt = ((iss >> 5) & 0x1f) as usize;
                    if iss & 1 == 1 && rt < 31 {
                        self.st.regs.x[rt] = 0;
                    }
                    self.st.regs.pc += 4;
                }
                _ => {
                    println!(
                        "vm {}: vCPU {i}: unhandled exit ESR {:#x} at PC {:#x}",
                        vm.name, exit.esr, self.st.regs.pc
                    );
                    return Outcome::VmEnd(VmEnd::Error("unhandled exception class"));
                }
            }
        }
    }
}
