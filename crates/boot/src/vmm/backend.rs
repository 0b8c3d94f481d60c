//! pkvm-host's [`VcpuBackend`] over the hardware world switch
//! ([`crate::platform::switch`]): the real counterpart of the simulator's
//! `SimBackend`. Every guest run is a `HOST_RUN` hypercall
//! ([`hostrun`]): the backend keeps the vCPU's [`RunBlock`] in the VMM's
//! memory and the hypervisor validates, runs and copies it back; nothing
//! here calls the world switch or touches an EL2 register.
//!
//! The vCPU's architectural state the host owns ([`VcpuContext`]: GPRs, PC,
//! PSTATE, EL1 system registers, virtual timer) is copied into the world
//! switch's [`VcpuState`] before each entry and back after it (not
//! `MDSCR_EL1`/`CSSELR_EL1`: the policy traps them, their only copy is the
//! emulated register file); the state only the hardware layer needs
//! (FP/SIMD, timer offset, pointer-authentication keys, SME/RAS extras,
//! the emulated system registers of [`VcpuSysregs`]) is not in
//! `VcpuContext`, so it lives in a
//! per-vCPU [`VcpuHw`] the VMM owns (one lock per vCPU) and lends to the
//! backend for one scheduler run ([`HwBackend::new`] takes the guard): a
//! vCPU that moves between physical CPUs keeps it, and two vCPUs never
//! share it.
//!
//! Exit mapping: stage-2 data/instruction aborts -> `Abort` (ESR, FAR,
//! HPFAR); HVC -> `Call` (ELR is already past the HVC); SMC -> `Call` with
//! the PC still on the SMC (pkvm-host's PSCI code steps a trapped SMC);
//! WFI/WFE -> `Wfx` with the PC stepped and [`VcpuHw::wait`] saying
//! whether the vCPU yields or blocks (a WFI with an interrupt pending
//! resumes the guest without leaving the backend); IRQ/FIQ -> `Interrupt`
//! after acknowledging what is pending ([`gic::drain`]) when it was the
//! scheduler's timer tick or kick SGI, handled here when it was the
//! guest's own (virtual timer, maintenance); SError and AArch32 exits ->
//! `Unhandled`. Around every world switch the VM's vGIC is flushed into
//! the list registers and synced back ([`VmIrq`]); stage-2 data aborts in
//! the GIC frames are emulated here (a bad access gets an injected data
//! abort) and `ICC_SGI*R_EL1` writes go to the vGIC. Trapped
//! system-register accesses (EC 0x18) never leave the backend: they are
//! answered from pkvm-sysreg's table over the vCPU's [`VcpuSysregs`]
//! ([`super::sysregs`]; PMU registers by the vCPU's [`VirtPmu`], which
//! counts the cycles of the guest's run slices as the world switch stamps
//! them and drives the overflow PPI), and every other synchronous exception class
//! (SVE/SME/PAC not offered, unknown) gets an UNDEF injected at the
//! guest's vector with a rate-limited log line: the VM lives. Vendor
//! hypercalls (guest-rt's report) reach the VMM as pkvm-host's
//! `VcpuExit::Hypercall`.

use core::sync::atomic::{AtomicU16, Ordering};

use pkvm_arch::esr::{ec, Esr, FaultStatus};
use pkvm_arch::pte::{S2Features, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::vtcr::{vtcr, vttbr, VtcrOptions};
use pkvm_arch::{Ipa, Pa};
use pkvm_host::fault::GuestFault;
use pkvm_host::vcpu_state::pstate;
use pkvm_host::{GuestExit, StageTwo, VcpuBackend, VcpuContext};
use pkvm_pgtable::{PageTable, Stage2};
use pkvm_sync::SpinGuard;
use pkvm_sysreg::pmu::GuestEl;
use pkvm_sysreg::{guest_debug, handle_pmu_trap, inject_undef, Offer, Outcome};
use pkvm_sysreg::{VcpuSysregs, VirtPmu, PMU_PPI};

use pkvm_host::psci::PsciVm;
use pkvm_vgic::VcpuSet;

use super::guest::BootVm;
use super::irq::{TimerLine, VmIrq, WfiAction};
use super::platform::BootHyp;
use super::sysregs::{self, Action, UndefCause, VmPolicy};
use crate::platform::hostrun::{self, RunBlock, RunShadow, RunSve, RunVm};
use crate::platform::sve::SveRegs;
use crate::platform::switch::{
    self, DebugSlot, GicCpu, OptRegs, VcpuState, VmRegs, EXIT_IRQ, EXIT_SYNC,
};
use crate::platform::MAX_CPUS;
use crate::platform::{gic, hw, timer};
use crate::println;
use alloc::boxed::Box;

/// Exit counts seen by the backend (including those it handles itself),
/// accumulated over the vCPU's life.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendStats {
    /// Guest entries.
    pub entries: u64,
    /// Exits of any kind.
    pub exits: u64,
    /// Stage-2 aborts.
    pub aborts: u64,
    /// HVC/SMC.
    pub calls: u64,
    /// WFI/WFE.
    pub wfx: u64,
    /// IRQ/FIQ exits.
    pub irq: u64,
    /// IRQ exits on which the EL2 timer (the preemption tick) was pending.
    pub timer_irqs: u64,
    /// IRQ exits on which a kick SGI was pending.
    pub kick_irqs: u64,
    /// Trapped system-register accesses (EC 0x18), however answered.
    pub sysreg: u64,
    /// Of those, completed on the world switch's fast path (no full exit).
    pub sysreg_fast: u64,
    /// Accesses to a [`FastMmio`] device (the PL011) completed on the
    /// world switch's fast path.
    pub mmio_fast: u64,
    /// Of those, stores the hypervisor buffered without an exit
    /// (`HOST_RUN`'s coalesced MMIO), applied at the next exit.
    pub mmio_coalesced: u64,
    /// Of those, loads the hypervisor answered from the host's load
    /// answers (`HOST_RUN`'s shadow registers) without an exit.
    pub mmio_shadow: u64,
    /// `CTR_EL0` reads answered by the EL2 vectors themselves (counted in
    /// `sysreg` and `sysreg_fast` too).
    pub ctr_vector: u64,
    /// UNDEFs injected (refused registers, features not offered, unknown
    /// exception classes).
    pub undefs: u64,
    /// Resets applied before an entry (boot, each PSCI CPU_ON, each VM
    /// reset).
    pub resets: u64,
    /// Guest accesses to the vGIC's frames (emulated in the backend).
    pub gic_mmio: u64,
    /// Of those, refused with an injected data abort.
    pub gic_aborts: u64,
    /// SGIs the guest sent (`ICC_SGI*R_EL1` writes).
    pub sgis: u64,
    /// IRQ exits for the guest's own interrupts (its virtual timer, the
    /// maintenance interrupt), handled without leaving the backend.
    pub guest_irqs: u64,
    /// WFIs that blocked the vCPU (nothing pending).
    pub wfi_blocks: u64,
    /// Scheduler runs that started on a different physical CPU than the
    /// vCPU's previous run.
    pub migrations: u64,
    /// Entries with the guest's debug state loaded (its debug active).
    pub debug_entries: u64,
    /// Set/way instructions answered by a flush of the VM's memory.
    pub setway: u64,
    /// Scheduler runs that entered the guest on a CPU whose previous guest
    /// was another VM.
    pub after_other_vm: u64,
    /// Scheduler runs of a vCPU of a VM with SVE whose guest used SVE, so
    /// that the world switch loaded its Z/P/FFR (lazily, at the first SVE
    /// trap of the run; runs without SVE use move only q0-q31).
    pub sve_lazy_loads: u64,
}

/// PSTATE.SS (software step). An instruction the hypervisor emulates and
/// steps over (PC + 4) completes as far as the guest can tell: as KVM
/// does, PSTATE.SS is cleared so that a guest single-stepping it takes its
/// step exception right after it (active-pending), not one instruction
/// later.
const PSTATE_SS: u64 = 1 << 21;

/// What the backend makes of a run block the hypervisor refused (a VMM
/// bug, logged): an exit of no known kind, which pkvm-host sees as
/// `Unhandled`.
const REFUSED_EXIT: switch::Exit = switch::Exit {
    kind: u64::MAX,
    esr: 0,
    far: 0,
    hpfar: 0,
    slice: (0, 0),
    sve_loaded: false,
};

/// The VMID of the last guest entered on each CPU (0: none yet).
static LAST_VMID_ON: [AtomicU16; MAX_CPUS] = [const { AtomicU16::new(0) }; MAX_CPUS];

/// The hardware-only state of one vCPU, lent to its backend while it runs.
#[derive(Debug)]
pub struct VcpuHw {
    /// The `HOST_RUN` block ([`hostrun`]): the world switch's view of the
    /// vCPU in `st` (FP/SIMD, PAC keys, timer offset live only there; the
    /// rest is loaded from `VcpuContext` at each entry), the VM's registers
    /// and the exit. In the VMM's memory, handed to the hypervisor by
    /// physical address for each run.
    pub run: Box<RunBlock>,
    /// Counters.
    pub stats: BackendStats,
    /// x1..x3 whenever the vCPU is reset to start at the given PC (the
    /// boot at creation and each VM reset; pkvm-host's `BootParams` only
    /// sets x0).
    boot_args: Option<(u64, [u64; 3])>,
    /// VMID of the last entry (as loaded in VTTBR_EL2).
    pub last_vmid: u16,
    /// The emulated system registers and per-register trap counts (the
    /// only copy of the registers the policy traps: `ACTLR_EL1`,
    /// `CSSELR_EL1`, `MDSCR_EL1`, the debug and EL1 physical-timer registers).
    pub sysregs: VcpuSysregs,
    /// For the log lines: the VM's name and the vCPU's index.
    who: (&'static str, usize),
    /// What the last WFI/WFE exit asks of the scheduler.
    pub wait: WfiAction,
    /// The virtual PMU (when the VM is offered one): all of its state, so
    /// it moves with the vCPU and no two vCPUs share it.
    pub pmu: VirtPmu,
    /// The SVE registers (Z/P/FFR, `ZCR_EL1`) of a vCPU of a VM with SVE.
    pub sve: Option<SveRegs>,
    /// The physical CPU of the previous scheduler run.
    last_cpu: Option<usize>,
    /// A hyp-managed VM's (handle, VMID, stage-2 geometry), as the
    /// hypervisor answered [`super::platform::VCPU_LOADED`] once.
    hyp_vm: Option<(u16, u16, S2Geometry)>,
    /// The hypervisor the run block's and the SVE area's pages are shared
    /// with ([`VcpuHw::share_with_hyp`]; unshared at drop).
    shared: Option<SharedWith>,
    /// The vCPU was reset since its last run: the next `HOST_RUN` says so
    /// ([`hostrun::FLAG_RESET`]; a protected vCPU's state is then taken
    /// from the block whole, otherwise only the exit's results are).
    reset_pending: bool,
}

/// The hypervisor a vCPU's run pages are shared with.
struct SharedWith(&'static BootHyp);

impl core::fmt::Debug for SharedWith {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SharedWith(hyp)")
    }
}

impl VcpuHw {
    /// A new vCPU's hardware-only state: FP/SIMD zero, PAC keys zero, timer
    /// offset 0.
    pub fn new() -> Self {
        VcpuHw {
            run: Box::new(RunBlock::new(VcpuState::new(0, [0; 4], 0))),
            stats: BackendStats::default(),
            boot_args: None,
            last_vmid: 0,
            hyp_vm: None,
            sysregs: VcpuSysregs::new(),
            who: ("?", 0),
            wait: WfiAction::Yield,
            pmu: VirtPmu::new(0),
            sve: None,
            last_cpu: None,
            shared: None,
            reset_pending: false,
        }
    }

    /// The pages the hypervisor copies from and to on each `HOST_RUN`:
    /// the run block's (a whole page: `RunBlock` is one aligned page) and
    /// the SVE save area's (whole pages of their own), as page frame
    /// numbers.
    fn hyp_pages(&self) -> impl Iterator<Item = u64> {
        let run = &*self.run as *const RunBlock as u64 >> 12;
        let (area, n) = self.sve.as_ref().map_or((0, 0), |s| s.pages());
        core::iter::once(run).chain((0..n as u64).map(move |i| (area >> 12) + i))
    }

    /// In protected mode (`hyp`), shares the vCPU's run pages
    /// ([`VcpuHw::hyp_pages`]) with the hypervisor (`HOST_SHARE_HYP`):
    /// `HOST_RUN` refuses pages not shared and pins them for each run, so
    /// that they stay the host's while the hypervisor writes them. Once,
    /// after [`VcpuHw::with_sve`]; they are unshared when the `VcpuHw` is
    /// dropped. Standard mode: nothing to do.
    ///
    /// # Errors
    /// The hypercall's status when a page cannot be shared (none stays
    /// shared then).
    pub fn share_with_hyp(mut self, hyp: Option<&'static BootHyp>) -> Result<Self, i64> {
        let Some(h) = hyp else {
            return Ok(self);
        };
        debug_assert!(self.shared.is_none(), "run pages shared twice");
        let pages: alloc::vec::Vec<u64> = self.hyp_pages().collect();
        for (i, &pfn) in pages.iter().enumerate() {
            let st = share_call(h, pkvm_hyp::hvc::id::HOST_SHARE_HYP, pfn);
            if st != pkvm_hyp::hvc::ret::SUCCESS {
                for &done in &pages[..i] {
                    share_call(h, pkvm_hyp::hvc::id::HOST_UNSHARE_HYP, done);
                }
                return Err(st);
            }
        }
        self.shared = Some(SharedWith(h));
        Ok(self)
    }

    /// Gives the vCPU SVE registers for a vector length of `vl` bytes (its
    /// VM's, from the policy), or none.
    pub fn with_sve(mut self, vl: Option<u16>) -> Self {
        self.sve = vl.map(SveRegs::new);
        self
    }

    /// Sets the VM's `CNTVOFF_EL2` (one per VM: all its vCPUs read the
    /// same virtual time, which starts near 0 when the VM is created).
    pub fn with_voff(mut self, voff: u64) -> Self {
        self.run.st.timer.voff = voff;
        self
    }

    /// Names the vCPU in its log lines: vCPU `index` of VM `name`.
    pub fn named(mut self, name: &'static str, index: usize) -> Self {
        self.who = (name, index);
        self
    }

    /// Sets x1..x3 for every reset that starts the vCPU at `pc` (the boot
    /// and each VM reset).
    pub fn set_boot_args(&mut self, pc: u64, args: [u64; 3]) {
        self.boot_args = Some((pc, args));
    }

    /// pkvm-host has just applied a reset to `ctx` (boot, PSCI CPU_ON, VM
    /// reset): the state pkvm-host does not know about goes back to its
    /// reset value too (FP/SIMD registers, FPSR, FPCR, the emulated system
    /// registers), and a start at the boot PC gets the boot arguments x1..x3.
    pub fn on_reset(&mut self, ctx: &mut VcpuContext) {
        self.stats.resets += 1;
        self.reset_pending = true;
        self.sysregs.reset();
        self.run.st.opt = OptRegs::default();
        self.run.st.gic = GicCpu::default();
        let r = &mut self.run.st.regs;
        r.v = [0; 32];
        r.fpsr = 0;
        r.fpcr = 0;
        if let Some(s) = &mut self.sve {
            s.reset();
        }
        if let Some((pc, args)) = self.boot_args {
            if ctx.gprs.pc == pc {
                ctx.gprs.x[1..4].copy_from_slice(&args);
            }
        }
    }
}

impl Default for VcpuHw {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for VcpuHw {
    /// The vCPU's teardown: its run pages go back to the host alone
    /// (`HOST_UNSHARE_HYP`) before their memory is freed, so that every
    /// page is accounted for (none left shared with the hypervisor).
    fn drop(&mut self) {
        let Some(SharedWith(h)) = self.shared.take() else {
            return;
        };
        for pfn in self.hyp_pages() {
            let st = share_call(h, pkvm_hyp::hvc::id::HOST_UNSHARE_HYP, pfn);
            if st != pkvm_hyp::hvc::ret::SUCCESS {
                println!(
                    "vmm: {} vCPU {}: HOST_UNSHARE_HYP of run page {:#x} failed: {st}",
                    self.who.0,
                    self.who.1,
                    pfn << 12
                );
            }
        }
    }
}

/// `func` (`HOST_SHARE_HYP`/`HOST_UNSHARE_HYP`) of page `pfn`: the status.
pub(crate) fn share_call(h: &'static BootHyp, func: u32, pfn: u64) -> i64 {
    let mut regs = [u64::from(func), pfn, 0, 0, 0, 0, 0, 0];
    super::platform::hyp_call(Some(h), crate::platform::start::cpu_index(), &mut regs);
    regs[0] as i64
}

/// A vCPU's hardware side on one physical CPU, for one scheduler run.
pub struct HwBackend<'a> {
    cpu: usize,
    hw: SpinGuard<'a, VcpuHw>,
    policy: &'a VmPolicy,
    parange: u8,
    hyp: Option<&'static BootHyp>,
    irq: &'a VmIrq,
    vm: &'a BootVm,
    /// The stage-2 table of the current entry (root, geometry), for
    /// set/way flushes.
    s2: Option<(Pa, S2Geometry)>,
    dev: &'a dyn FastMmio,
}

/// A device the VMM emulates whose registers the backend may access on
/// the fast path (no full backend exit), like KVM's in-kernel MMIO devices: the
/// access needs nothing of the vCPU but the loaded or stored value, so it
/// is completed without a full exit and without pkvm-host's fault path.
/// Only for addresses outside every memslot (the VMM's layout puts its
/// devices below guest RAM), so a fault there is MMIO whatever the
/// stage-2 state.
pub trait FastMmio: Sync {
    /// An access by vCPU `index` of `size` bytes at `ipa` (`write`: the
    /// value stored, cut to `size`), if `ipa` is one of the device's
    /// registers: the value read (0 for a write) and whether the device's
    /// interrupt line changed (the vGIC then needs the full exit path to
    /// update the list registers). `None`: not such a device.
    fn fast_mmio(
        &self,
        index: usize,
        ipa: u64,
        size: usize,
        write: Option<u64>,
    ) -> Option<(u64, bool)>;

    /// The IPA range (base, length; length 0: none) whose stores the
    /// hypervisor may buffer instead of exiting (`HOST_RUN`'s coalesced
    /// MMIO, [`hostrun::RunCoalesced`]): registers for which a store that
    /// reaches the device at the vCPU's next exit, in order with the
    /// others, is as good as one emulated at once. At most one page.
    fn coalesced_zone(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Fills `out` with load answers for the next run of vCPU `index`
    /// ([`hostrun::RunCoalesced::shadow`]: registers whose loads have no
    /// side effect and whose value only changes by an event that takes the
    /// guest out, or by the device's emulation of an exit, after which
    /// this is asked again); how many it filled.
    fn load_shadow(&self, _index: usize, _out: &mut [RunShadow]) -> usize {
        0
    }
}

impl<'a> HwBackend<'a> {
    /// A backend on physical CPU `cpu` (the calling CPU) for the vCPU whose
    /// hardware-only state is `hw` (held for the backend's life), of the VM
    /// `vm` with system-register policy `policy` and interrupts `irq`;
    /// `hyp` is the hypervisor in protected mode; `dev` the VMM's
    /// [`FastMmio`] devices.
    pub fn new(
        cpu: usize,
        mut hw: SpinGuard<'a, VcpuHw>,
        policy: &'a VmPolicy,
        hyp: Option<&'static BootHyp>,
        (irq, vm, dev): (&'a VmIrq, &'a BootVm, &'a dyn FastMmio),
    ) -> Self {
        if hw.last_cpu.is_some_and(|c| c != cpu) {
            hw.stats.migrations += 1;
        }
        hw.last_cpu = Some(cpu);
        HwBackend {
            cpu,
            hw,
            policy,
            parange: switch::parange(),
            hyp,
            irq,
            vm,
            s2: None,
            dev,
        }
    }

    /// The vCPU's hardware-only state.
    pub fn hw(&mut self) -> &mut VcpuHw {
        &mut self.hw
    }

    /// The VM's registers for this scheduler run, also written to the run
    /// block ([`RunVm`]): a hyp-managed stage-2 passes no `VTTBR`/`VTCR`
    /// (the hypervisor takes them from the vCPU loaded on this CPU). The
    /// returned `VmRegs` is the host's view (VMID for the statistics, the
    /// list-register counts cached at boot for the vGIC).
    fn vm_regs(&mut self, s2: &StageTwo) -> Option<VmRegs> {
        let (root, vmid, geo, stage) = match *s2 {
            StageTwo::Host { vmid, root, geo } => (root, vmid, geo, hostrun::stage::HOST),
            StageTwo::Hyp { handle } => {
                self.hyp?;
                let (vmid, geo) = match self.hw.hyp_vm {
                    Some((h, v, g)) if h == handle => (v, g),
                    _ => {
                        let (v, g) = super::platform::loaded_vcpu()?;
                        self.hw.hyp_vm = Some((handle, v, g));
                        (v, g)
                    }
                };
                (Pa(0), vmid, geo, hostrun::stage::HYP)
            }
        };
        // A hyp-managed stage-2 is flushed by the hypervisor (its tables
        // are in its memory).
        self.s2 = (stage == hostrun::stage::HOST).then_some((root, geo));
        let (lrs, aprs) = switch::gic_counts();
        let vm = VmRegs {
            vttbr: vttbr(root, vmid),
            vtcr: vtcr(geo.ipa_bits, self.parange, VtcrOptions::default()).ok()?,
            traps: self.policy.traps,
            pauth: self.policy.pauth(),
            sme: false,
            ras: false,
            lrs,
            aprs,
        };
        let host_built = stage == hostrun::stage::HOST;
        self.hw.run.vm = RunVm {
            stage,
            vttbr: if host_built { vm.vttbr } else { 0 },
            vtcr: if host_built { vm.vtcr } else { 0 },
            traps: vm.traps,
            flags: if vm.pauth { hostrun::FLAG_PAUTH } else { 0 },
            pmuserenr: self.hw.run.vm.pmuserenr,
        };
        Some(vm)
    }

    fn load(&mut self, ctx: &VcpuContext) {
        let (g, s) = (&ctx.gprs, &ctx.sys);
        let st = &mut self.hw.run.st;
        st.regs.x = g.x;
        st.regs.pc = g.pc;
        st.regs.pstate = g.pstate;
        st.sys.sp_el0 = g.sp;
        st.sys.sctlr = s.sctlr_el1;
        st.sys.cpacr = s.cpacr_el1;
        st.sys.ttbr0 = s.ttbr0_el1;
        st.sys.ttbr1 = s.ttbr1_el1;
        st.sys.tcr = s.tcr_el1;
        st.sys.mair = s.mair_el1;
        st.sys.amair = s.amair_el1;
        st.sys.vbar = s.vbar_el1;
        st.sys.contextidr = s.contextidr_el1;
        st.sys.esr = s.esr_el1;
        st.sys.far = s.far_el1;
        st.sys.afsr0 = s.afsr0_el1;
        st.sys.afsr1 = s.afsr1_el1;
        st.sys.par = s.par_el1;
        st.sys.tpidr_el0 = s.tpidr_el0;
        st.sys.tpidrro_el0 = s.tpidrro_el0;
        st.sys.tpidr_el1 = s.tpidr_el1;
        st.sys.sp_el1 = s.sp_el1;
        st.sys.elr = s.elr_el1;
        st.sys.spsr = s.spsr_el1;
        st.sys.cntkctl = s.cntkctl_el1;
        st.vmpidr = s.mpidr_el1;
        st.timer.ctl = s.cntv_ctl_el0;
        st.timer.cval = s.cntv_cval_el0;
    }

    fn save(&self, ctx: &mut VcpuContext) {
        let st = &self.hw.run.st;
        let (g, s) = (&mut ctx.gprs, &mut ctx.sys);
        g.x = st.regs.x;
        g.pc = st.regs.pc;
        g.pstate = st.regs.pstate;
        g.sp = st.sys.sp_el0;
        s.sctlr_el1 = st.sys.sctlr;
        s.cpacr_el1 = st.sys.cpacr;
        s.ttbr0_el1 = st.sys.ttbr0;
        s.ttbr1_el1 = st.sys.ttbr1;
        s.tcr_el1 = st.sys.tcr;
        s.mair_el1 = st.sys.mair;
        s.amair_el1 = st.sys.amair;
        s.vbar_el1 = st.sys.vbar;
        s.contextidr_el1 = st.sys.contextidr;
        s.esr_el1 = st.sys.esr;
        s.far_el1 = st.sys.far;
        s.afsr0_el1 = st.sys.afsr0;
        s.afsr1_el1 = st.sys.afsr1;
        s.par_el1 = st.sys.par;
        s.tpidr_el0 = st.sys.tpidr_el0;
        s.tpidrro_el0 = st.sys.tpidrro_el0;
        s.tpidr_el1 = st.sys.tpidr_el1;
        s.sp_el1 = st.sys.sp_el1;
        s.elr_el1 = st.sys.elr;
        s.spsr_el1 = st.sys.spsr;
        s.cntkctl_el1 = st.sys.cntkctl;
        s.mpidr_el1 = st.vmpidr;
        s.cntv_ctl_el0 = st.timer.ctl;
        s.cntv_cval_el0 = st.timer.cval;
    }

    /// The vCPU's timers as interrupt lines now.
    fn timers(&self) -> (TimerLine, TimerLine) {
        let (ctl, cval) = sysregs::ptimer_regs(&self.hw.sysregs);
        let now = timer::now();
        (
            TimerLine::virt(&self.hw.run.st.timer, now),
            TimerLine::phys(ctl, cval, now),
        )
    }

    /// Kicks the vCPUs of `set` other than this one (which syncs with the
    /// vGIC at its next entry anyway).
    fn kick(&self, set: VcpuSet) {
        let me = self.hw.who.1;
        for v in set.iter().filter(|&v| v != me) {
            self.vm.kick_vcpu(v);
        }
    }

    /// One world switch with the vGIC around it; `None` when the backend
    /// handled the exit itself.
    fn run_once(&mut self, vm: &VmRegs) -> Option<GuestExit> {
        let index = self.hw.who.1;
        self.before_entry(vm, index);
        let (exit, deferred, done) = self.switch(index);
        self.pmu_after_exit(exit.slice);
        let (vt, pt) = self.timers();
        let kick = self
            .irq
            .sync(index, &self.hw.run.st.gic, vm.lrs, vt.level, pt.level);
        self.kick(kick);
        match exit.kind {
            // Completed by the fast path; the vGIC sync above saw the
            // device's new line.
            EXIT_SYNC if done => None,
            EXIT_SYNC => {
                let pc = self.hw.run.st.regs.pc;
                let out = self.sync_exit(&exit, deferred);
                let r = &mut self.hw.run.st.regs;
                if r.pc == pc.wrapping_add(4) {
                    r.pstate &= !PSTATE_SS;
                }
                out
            }
            EXIT_IRQ | 10 => self.irq_exit(),
            _ => Some(GuestExit::Unhandled { esr: exit.esr }),
        }
    }

    /// Before an entry: the vGIC's list registers, the timers' lines and
    /// deadlines, the virtual PMU.
    fn before_entry(&mut self, vm: &VmRegs, index: usize) {
        let (vt, pt) = self.timers();
        let kick = self
            .irq
            .flush(index, &mut self.hw.run.st.gic, vm.lrs, vt.level, pt.level);
        self.kick(kick);
        // An unhandled virtual-timer level would take the guest out again
        // at once: mask the physical PPI until the virtual line drops.
        gic::set_vtimer_masked(self.cpu, vt.level);
        if let Some(d) = pt.deadline {
            timer::pull_in(d);
        }
        self.pmu_before_entry();
    }

    /// `HOST_RUN` with the fast path's loop; returns the exit, the answer
    /// the fast path computed for a register access it left to the full
    /// path, and whether it completed an MMIO access whose interrupt line
    /// changed.
    fn switch(&mut self, index: usize) -> (switch::Exit, Option<Action>, bool) {
        let hw = &mut *self.hw;
        let debug = guest_debug(&hw.sysregs, &self.policy.features);
        hw.stats.debug_entries += u64::from(debug.is_some());
        // A guest using self-hosted debug takes every exit on the full
        // path: the fast paths neither reload its breakpoints after an
        // emulated write nor clear PSTATE.SS after an emulated instruction.
        let on = debug.is_some();
        hw.run.st.debug = DebugSlot::new(debug);
        hw.run.st.regs.ctr_el0 = if on { 0 } else { self.policy.ctr_fast() };
        hw.run.sve = RunSve::of(hw.sve.as_mut());
        let mut fast = Fast {
            sysregs: &mut hw.sysregs,
            stats: &mut hw.stats,
            policy: self.policy,
            dev: self.dev,
            index,
            enabled: !on,
            deferred: None,
            done: false,
        };
        let (mut entered, mut sve_loaded) = (None, false);
        // The fast paths' loop: an exit they complete issues `HOST_RUN`
        // again at once.
        let exit = loop {
            publish_coalesced(self.dev, &mut hw.run, index, !on);
            if hw.reset_pending {
                hw.run.vm.flags |= hostrun::FLAG_RESET;
            }
            let r = hostrun::call(&mut hw.run);
            hw.run.vm.flags &= !hostrun::FLAG_RESET;
            if let Err((status, why)) = r {
                println!(
                    "vm {}: vCPU {index}: HOST_RUN refused: {status} (reason {why})",
                    hw.who.0
                );
                break REFUSED_EXIT;
            }
            hw.reset_pending = false;
            let e = hw.run.exit.exit();
            let first = *entered.get_or_insert(e.slice.0);
            sve_loaded |= e.sve_loaded;
            // The stores the run buffered happened before the exit.
            let line_changed = fast.drain(&hw.run);
            let completed = fast.exit(&e, &mut hw.run.st.regs);
            // A device line the stores changed needs the vGIC sync of the
            // full path; an exit the fast path completed is done there.
            fast.done |= completed && line_changed;
            if !completed || line_changed {
                break switch::Exit {
                    slice: (first, e.slice.1),
                    sve_loaded,
                    ..e
                };
            }
        };
        let (deferred, done) = (fast.deferred, fast.done);
        if let Some(s) = hw.sve.as_mut() {
            s.after_run(hw.run.sve.zcr_el1);
        }
        let ctr = core::mem::take(&mut hw.run.st.regs.ctr_reads);
        let s = &mut hw.stats;
        s.ctr_vector += ctr;
        s.sysreg += ctr;
        s.sysreg_fast += ctr;
        s.exits += 1 + ctr;
        s.sve_lazy_loads += u64::from(exit.sve_loaded);
        (exit, deferred, done)
    }

    /// A physical IRQ took the guest out.
    fn irq_exit(&mut self) -> Option<GuestExit> {
        let hw = &mut *self.hw;
        hw.stats.irq += 1;
        // Acknowledge and end what is pending: the scheduler's
        // preemption tick and kick SGI only need the exit itself; the
        // guest's own (virtual timer, maintenance) only the vGIC sync.
        if gic::cpu_ready(self.cpu) {
            let d = gic::drain();
            hw.stats.timer_irqs += d.timer as u64;
            hw.stats.kick_irqs += d.kick as u64;
            if !d.timer && !d.kick {
                hw.stats.guest_irqs += 1;
                return None;
            }
        }
        Some(GuestExit::Interrupt)
    }

    /// Whether the VM has a virtual PMU.
    fn has_pmu(&self) -> bool {
        self.policy.features.has(Offer::Pmu)
    }

    /// Before an entry: the guest's `PMUSERENR_EL0` in the hardware (EN
    /// for a VM without a PMU: its EL0 accesses reach EL2 and the table's
    /// UNDEF, whatever another VM left there), and, with a PMU, an early
    /// exit at the first predicted overflow of a counter whose interrupt
    /// is enabled, so the PPI is not late.
    fn pmu_before_entry(&mut self) {
        if !self.has_pmu() {
            self.hw.run.vm.pmuserenr = 1;
            return;
        }
        let hw = &mut *self.hw;
        hw.run.vm.pmuserenr = hw.pmu.userenr();
        let pmu = &hw.pmu;
        if let Some(cycles) = pmu.cycles_to_overflow() {
            let ticks = cycles.div_ceil(cycles_per_tick());
            timer::pull_in(timer::now().saturating_add(ticks));
        }
    }

    /// After an exit: the run slice (`slice`: the physical counts at entry
    /// and exit) is counted by the vCPU's PMU, attributed to the level the
    /// guest left from, and the overflow PPI follows the PMU's line. Time
    /// outside the slice (the hypervisor, other vCPUs and VMs) never counts.
    fn pmu_after_exit(&mut self, slice: (u64, u64)) {
        if !self.has_pmu() {
            return;
        }
        let index = self.hw.who.1;
        let hw = &mut *self.hw;
        let cycles = slice
            .1
            .wrapping_sub(slice.0)
            .saturating_mul(cycles_per_tick());
        hw.pmu
            .advance(cycles, GuestEl::of_pstate(hw.run.st.regs.pstate));
        let kick = self.irq.set_ppi(index, PMU_PPI, hw.pmu.irq_level());
        self.kick(kick);
    }

    /// A trapped PMU register access, answered by the vCPU's PMU.
    fn pmu_access(&mut self, call: &pkvm_sysreg::HookCall) {
        let hw = &mut *self.hw;
        let out = handle_pmu_trap(&mut hw.pmu, call);
        let r = &mut hw.run.st.regs;
        match out {
            Outcome::Handled(_) => out.complete(&mut r.x, &mut r.pc),
            _ => return self.undef(UndefCause::Pmu(call.row)),
        }
        // A write may have raised or dropped the overflow line.
        let kick = self.irq.set_ppi(hw.who.1, PMU_PPI, hw.pmu.irq_level());
        self.kick(kick);
    }

    /// A synchronous exit; `None` when the backend handled it. `deferred`:
    /// the answer [`fast_exit`] already computed for a trapped register
    /// access it left to this path.
    fn sync_exit(&mut self, exit: &switch::Exit, deferred: Option<Action>) -> Option<GuestExit> {
        let esr = Esr(exit.esr);
        let ipa = pkvm_arch::esr::fault_ipa(exit.hpfar, exit.far).0;
        match esr.ec() {
            ec::DABT_LOW if self.irq.contains(ipa) => {
                self.gic_mmio(esr, ipa, exit.far);
                None
            }
            ec::DABT_LOW | ec::IABT_LOW => {
                self.hw.stats.aborts += 1;
                Some(GuestExit::Abort {
                    esr: exit.esr,
                    far: exit.far,
                    hpfar: exit.hpfar,
                })
            }
            ec::HVC64 | ec::SMC64 => {
                self.hw.stats.calls += 1;
                Some(GuestExit::Call { esr: exit.esr })
            }
            ec::WFX => self.wfx(esr),
            ec::SYS64 => {
                let hw = &mut *self.hw;
                let r = &mut hw.run.st.regs;
                let action = deferred.unwrap_or_else(|| {
                    hw.stats.sysreg += 1;
                    sysregs::sysreg_trap(&mut hw.sysregs, self.policy, esr, &r.x, timer::now())
                });
                match action {
                    Action::Complete(out) | Action::TimerWrite(out) => {
                        out.complete(&mut r.x, &mut r.pc)
                    }
                    Action::Undef(why) => self.undef(why),
                    Action::Pmu(call) => self.pmu_access(&call),
                    Action::SetWayFlush => {
                        r.pc += 4;
                        hw.stats.setway += 1;
                        self.flush_vm();
                    }
                    Action::Sgi { value, group1 } => {
                        r.pc += 4;
                        hw.stats.sgis += 1;
                        let kick = self.irq.send_sgi(hw.who.1, value, group1);
                        self.kick(kick);
                    }
                }
                None
            }
            _ => {
                let why = sysregs::other_trap(self.policy, esr);
                self.undef(why);
                None
            }
        }
    }

    /// WFI/WFE (PC stepped): WFE yields; WFI resumes at once when an
    /// interrupt is pending, yields when the guest's distributor is off,
    /// and otherwise blocks the vCPU until a kick or its earliest timer
    /// deadline ([`VcpuHw::wait`] tells the scheduler).
    fn wfx(&mut self, esr: Esr) -> Option<GuestExit> {
        self.hw.stats.wfx += 1;
        self.hw.run.st.regs.pc += 4;
        let wfe = esr.iss() & 1 != 0;
        let action = if wfe {
            WfiAction::Yield
        } else {
            let (vt, pt) = self.timers();
            let deadline = match (vt.deadline, pt.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.irq.wfi(self.hw.who.1, deadline)
        };
        if action == WfiAction::Resume {
            return None;
        }
        if let WfiAction::Block(_) = action {
            self.hw.stats.wfi_blocks += 1;
        }
        self.hw.wait = action;
        Some(GuestExit::Wfx)
    }

    /// A guest access to the vGIC's frames: emulated, or refused with an
    /// injected synchronous external abort (no syndrome, a size or
    /// alignment the register does not allow).
    fn gic_mmio(&mut self, esr: Esr, ipa: u64, far: u64) {
        self.hw.stats.gic_mmio += 1;
        let syn = esr.abort().and_then(|a| a.syndrome.map(|s| (a.write, s)));
        let Some((write, s)) = syn else {
            return self.inject_dabt(far);
        };
        let r = &mut self.hw.run.st.regs;
        let rt = |x: &[u64; 31]| if s.srt < 31 { x[s.srt as usize] } else { 0 };
        let size = s.size() as usize;
        let res = self.irq.mmio(ipa, size, write.then(|| rt(&r.x)));
        match res {
            Ok((value, kick)) => {
                if !write && s.srt < 31 {
                    r.x[s.srt as usize] = extend(value, size, s.sse, s.sf);
                }
                r.pc += 4;
                self.kick(kick);
            }
            Err(_) => self.inject_dabt(far),
        }
    }

    /// Injects a synchronous external data abort at `far` (as the
    /// architecture's exception entry: [`pkvm_sysreg::inject_undef`]'s,
    /// with the abort's syndrome).
    fn inject_dabt(&mut self, far: u64) {
        self.hw.stats.gic_aborts += 1;
        let from_el0 = self.hw.run.st.regs.pstate & pstate::MODE_MASK == pstate::MODE_EL0T;
        let st = &mut self.hw.run.st;
        let mut el1 = st.el1_state();
        inject_undef(&mut el1);
        let class = if from_el0 { ec::DABT_LOW } else { ec::DABT_CUR };
        el1.esr_el1 =
            ((class as u64) << 26) | (1 << 25) | FaultStatus::ExternalAbort.encode() as u64;
        st.set_el1_state(&el1);
        st.sys.far = far;
    }

    /// A set/way instruction's answer (pkvm-sysreg's `set_way`, KVM's
    /// policy): clean and invalidate to the point of coherency, by VA
    /// through the EL2 identity map, every page the VM's stage-2 table maps
    /// now (a read-only walk; a page unmapped meanwhile is still RAM, and
    /// cleaning it is harmless).
    fn flush_vm(&self) {
        match self.s2 {
            Some((root, geo)) => flush_stage2(root, geo),
            None if self.hyp.is_some() => super::platform::flush_loaded_s2(),
            None => {}
        }
    }

    /// Injects an UNDEF into the guest (its PC on the refused instruction)
    /// and logs it, rate-limited ([`sysregs::undef_logged`]).
    fn undef(&mut self, why: UndefCause) {
        let hw = &mut *self.hw;
        hw.stats.undefs += 1;
        let n = hw.stats.undefs;
        if sysregs::undef_logged(n) {
            let (name, index) = hw.who;
            println!(
                "vm {name}: vCPU {index}: UNDEF injected for {why} at PC {:#x} ({n} so far)",
                hw.run.st.regs.pc
            );
        }
        let mut el1 = hw.run.st.el1_state();
        inject_undef(&mut el1);
        hw.run.st.set_el1_state(&el1);
    }
}

/// Virtual PMU cycles per physical counter tick: the virtual PMU's clock
/// is a nominal 1 GHz (as QEMU's own PMU under TCG), so a guest converts
/// `CNTVCT_EL0` ticks to cycles with `CNTFRQ_EL0` alone.
fn cycles_per_tick() -> u64 {
    (1_000_000_000 / timer::frequency().max(1)).max(1)
}

/// Before each `HOST_RUN` of vCPU `index`: the device's coalesced-MMIO
/// zone and its load answers as the device is now (after the last exit's
/// emulation and the stores drained with it); neither while the guest
/// debugs itself (`enabled` false: every exit on the full path).
fn publish_coalesced(dev: &dyn FastMmio, run: &mut RunBlock, index: usize, enabled: bool) {
    let c = &mut run.coal;
    (c.base, c.len) = if enabled {
        dev.coalesced_zone()
    } else {
        (0, 0)
    };
    c.shadows = if enabled {
        dev.load_shadow(index, &mut c.shadow) as u64
    } else {
        0
    };
}

/// The host-side fast path: an exit it completes issues `HOST_RUN` again at
/// once, without the rest of the backend path ([`HwBackend::switch`]),
/// for the exits that need nothing of the vCPU's EL1 state, its timers or
/// the vGIC:
///
/// - a trapped system-register access whose answer only touches the
///   guest's general registers and the vCPU's emulated register file (the
///   table's registers: ID and cache registers such as `CTR_EL0`, which
///   Linux reads in every cache-maintenance loop, the emulated
///   `CSSELR_EL1`, `ACTLR_EL1`, debug registers; reads of the emulated
///   physical timer). Anything else (an UNDEF, which needs the guest's EL1
///   state; an SGI, which needs the vGIC; a physical-timer write, whose
///   deadline and line the full path re-evaluates) is left in `deferred`
///   for the full path, counted and dispatched once;
/// - a data abort with a valid syndrome on a [`FastMmio`] device's
///   register (the PL011: two accesses per console character): emulated
///   and completed; when the device's interrupt line changed, the exit
///   still takes the full path (`done`), which updates the list registers.
struct Fast<'b> {
    sysregs: &'b mut VcpuSysregs,
    stats: &'b mut BackendStats,
    policy: &'b VmPolicy,
    dev: &'b dyn FastMmio,
    index: usize,
    /// False while the guest's self-hosted debug is active.
    enabled: bool,
    deferred: Option<Action>,
    done: bool,
}

impl Fast<'_> {
    /// Applies the stores `run` buffered in its coalesced-MMIO ring, in
    /// order; whether one changed the device's interrupt line.
    fn drain(&mut self, run: &RunBlock) -> bool {
        let n = (run.coal.count as usize).min(run.ring.len());
        let mut changed = false;
        for w in &run.ring[..n] {
            let size = w.size as usize;
            if let Some((_, c)) = self.dev.fast_mmio(self.index, w.ipa, size, Some(w.value)) {
                changed |= c;
            }
        }
        let loads = run.coal.loads;
        self.stats.mmio_fast += n as u64 + loads;
        self.stats.mmio_coalesced += n as u64;
        self.stats.mmio_shadow += loads;
        changed
    }

    /// `true`: completed, enter the guest again.
    fn exit(&mut self, e: &switch::Exit, regs: &mut switch::GuestRegs) -> bool {
        let esr = Esr(e.esr);
        if !self.enabled || e.kind != EXIT_SYNC {
            return false;
        }
        let done = match esr.ec() {
            ec::SYS64 => self.sysreg(esr, regs),
            ec::DABT_LOW => self.mmio(e, esr, regs),
            _ => false,
        };
        if done {
            self.stats.exits += 1;
        }
        done
    }

    fn sysreg(&mut self, esr: Esr, regs: &mut switch::GuestRegs) -> bool {
        self.stats.sysreg += 1;
        match sysregs::sysreg_trap(self.sysregs, self.policy, esr, &regs.x, timer::now()) {
            Action::Complete(out) => {
                out.complete(&mut regs.x, &mut regs.pc);
                self.stats.sysreg_fast += 1;
                true
            }
            other => {
                self.deferred = Some(other);
                false
            }
        }
    }

    /// A stage-2 translation fault with a valid syndrome (no cache
    /// maintenance, no stage-1 walk, FAR valid) on a device register.
    fn mmio(&mut self, e: &switch::Exit, esr: Esr, regs: &mut switch::GuestRegs) -> bool {
        let Some(a) = esr.abort() else {
            return false;
        };
        let Some(s) = a.syndrome else {
            return false;
        };
        if a.cm || a.s1ptw || a.fnv || !matches!(a.status, FaultStatus::Translation(_)) {
            return false;
        }
        let ipa = pkvm_arch::esr::fault_ipa(e.hpfar, e.far).0;
        let size = s.size() as usize;
        let rt = |x: &[u64; 31]| if s.srt < 31 { x[s.srt as usize] } else { 0 };
        let stored = a.write.then(|| extend(rt(&regs.x), size, false, true));
        let Some((value, line_changed)) = self.dev.fast_mmio(self.index, ipa, size, stored) else {
            return false;
        };
        if !a.write && s.srt < 31 {
            regs.x[s.srt as usize] = extend(value, size, s.sse, s.sf);
        }
        regs.pc += 4;
        self.stats.mmio_fast += 1;
        self.done = line_changed;
        !line_changed
    }
}

/// A loaded value of `size` bytes as the load instruction leaves it in its
/// register: sign-extended (SSE) and cut to 32 bits (!SF).
fn extend(value: u64, size: usize, sse: bool, sf: bool) -> u64 {
    let bits = 8 * size as u32;
    let mut v = if bits >= 64 {
        value
    } else {
        value & ((1u64 << bits) - 1)
    };
    if sse && bits < 64 && v & (1 << (bits - 1)) != 0 {
        v |= !((1u64 << bits) - 1);
    }
    if !sf {
        v &= 0xffff_ffff;
    }
    v
}

impl VcpuBackend for HwBackend<'_> {
    fn cpu(&self) -> usize {
        self.cpu
    }

    fn on_reset(&mut self, ctx: &mut VcpuContext, _start: &pkvm_host::psci::ResetState) {
        self.hw.on_reset(ctx);
        self.hw.pmu = VirtPmu::new(self.policy.features.pmu_counters());
    }

    fn enter(&mut self, ctx: &mut VcpuContext, s2: &StageTwo) -> GuestExit {
        let Some(vm) = self.vm_regs(s2) else {
            return GuestExit::Unhandled { esr: 0 };
        };
        let hw = &mut *self.hw;
        hw.last_vmid = (vm.vttbr >> 48) as u16;
        if let Some(last) = LAST_VMID_ON.get(self.cpu) {
            let prev = last.swap(hw.last_vmid, Ordering::Relaxed);
            hw.stats.after_other_vm += u64::from(prev != 0 && prev != hw.last_vmid);
        }
        hw.stats.entries += 1;
        self.load(ctx);
        let exit = loop {
            if let Some(e) = self.run_once(&vm) {
                break e;
            }
        };
        self.save(ctx);
        exit
    }

    fn complete_mmio(&mut self, ctx: &mut VcpuContext, fault: &GuestFault, value: u64) {
        if let (false, Some(s)) = (fault.write, fault.syndrome) {
            if s.srt < 31 {
                ctx.gprs.x[s.srt as usize] = extend(value, s.size() as usize, s.sse, s.sf);
            }
        }
        ctx.gprs.pc += 4;
        ctx.gprs.pstate &= !PSTATE_SS;
    }

    /// KVM's `inject_abt64`: ESR_EL1 (EC by source EL, IL, FSC external
    /// abort), FAR_EL1 (the faulting VA), ELR_EL1/SPSR_EL1 from the
    /// interrupted context, PSTATE EL1h with DAIF masked, PC at VBAR_EL1 +
    /// 0x000 (from EL1t), 0x200 (from EL1h) or 0x400 (from EL0).
    fn inject_abort(&mut self, ctx: &mut VcpuContext, fault: &GuestFault) {
        let mode = ctx.gprs.pstate & pstate::MODE_MASK;
        let from_el0 = mode == pstate::MODE_EL0T;
        let off = match mode {
            pstate::MODE_EL0T => 0x400,
            0b00100 => 0x000,
            _ => 0x200,
        };
        let ec = match (fault.exec, from_el0) {
            (true, true) => ec::IABT_LOW,
            (true, false) => ec::IABT_CUR,
            (false, true) => ec::DABT_LOW,
            (false, false) => ec::DABT_CUR,
        };
        let s = &mut ctx.sys;
        s.esr_el1 = ((ec as u64) << 26) | (1 << 25) | FaultStatus::ExternalAbort.encode() as u64;
        s.far_el1 = if fault.fnv { 0 } else { fault.far };
        s.elr_el1 = ctx.gprs.pc;
        s.spsr_el1 = ctx.gprs.pstate;
        ctx.gprs.pstate = pstate::RESET;
        ctx.gprs.pc = s.vbar_el1 + off;
    }
}

/// Cleans and invalidates to the point of coherency, by VA through the EL2
/// identity map, every page the stage-2 table at `root` maps now (a
/// read-only walk; a page unmapped meanwhile is still RAM, and cleaning it
/// is harmless): a set/way instruction's answer for its VM.
pub(crate) fn flush_stage2(root: Pa, geo: S2Geometry) {
    let pt = PageTable::<Stage2>::new(root, geo, S2Features::default());
    let env = super::platform::s2_env(0);
    let _ = pt.for_each_leaf(&env, Ipa(0), geo.ipa_size(), |_, level, pte| {
        let pte = S2Pte(pte);
        if pte.is_valid() {
            hw::dcache_clean_inval_range(pte.oa().0, geo.granule.level_size(level));
        }
    });
}
