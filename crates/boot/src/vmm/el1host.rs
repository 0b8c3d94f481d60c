//! The host at EL1, as the hypervisor runs it: [`HostCtx::run`] enters
//! the `platform::el1host` program at EL1h under the host's stage-2
//! (pkvm-hyp's identity map, VMID 0, mapped lazily on the host's faults)
//! through the world switch, and serves its exits the way pKVM's
//! `handle_trap` does:
//!
//! - `hvc #0`: served in place by the vectors' fast path
//!   (`PerCpu::el1_host`), or here, as an exit, by
//!   [`BootHyp::handle_host_hvc`] on the host's x0..x7 (the CPU index is
//!   the hypervisor's own);
//! - a stage-2 data or instruction abort: [`BootHyp::host_mem_abort`]; a
//!   page the host does not own (a guest's, the hypervisor's) is never
//!   mapped: a synchronous external abort is injected into the host at
//!   EL1 ([`inject_abort`]), whose own vector reports it and goes on;
//! - `smc` (trapped, `HCR_EL2.TSC`): PSCI as [`host_psci`] answers it,
//!   stepped over;
//! - a physical interrupt: none should come (`HCR_EL2.IMO`/`FMO` are clear
//!   for the host, which takes its own at EL1); one that does is
//!   acknowledged and ended, the host resumed.
//!
//! [`NULL_RUN`] is the shape of a `VCPU_RUN` hypercall: the host at EL1
//! asks the hypervisor to run a (null) guest, which saves the host's EL1
//! registers around the world switch and returns the exit, for a
//! protected guest only `protected_view` of it.

use alloc::vec::Vec;

use pkvm_arch::pte::{El2Prot, S2Features};
use pkvm_arch::vtcr::{vtcr, vttbr, VtcrOptions};
use pkvm_arch::{Pa, Va};
use pkvm_hyp::{HostAccess, HypError};
use pkvm_pgtable::{El2, MapFlags, PageCache, PageTable};
use pkvm_sysreg::{host_abort_esr, inject_sync};

use super::platform::{BootHyp, NULL_HVC_CALLS};
use super::pool;
use crate::platform::el1host::{self, Cmd, CMDS_OFFSET, CMD_WORDS, HVC_DONE};
use crate::platform::hw::HwEl2;
use crate::platform::hypdata::NULL_GUEST;
use crate::platform::switch::{self, VcpuState, VmRegs, EXIT_IRQ, EXIT_SYNC};
use crate::platform::{gic, phys, start};

/// What the hypervisor did for one host run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostRun {
    /// Host hypercalls served.
    pub hvcs: u64,
    /// Host stage-2 faults resolved by a mapping.
    pub mapped: u64,
    /// Aborts injected into the host.
    pub injected: u64,
    /// Physical interrupts taken while the host ran.
    pub irqs: u64,
}

/// Why a host run stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRunError {
    /// The host took an exception at EL1 it does not handle (vector offset).
    Unexpected(u64),
    /// An exit the hypervisor does not serve for the host (vector, ESR).
    Exit(u64, u64),
    /// `host_mem_abort` failed other than by refusing (a hypervisor bug).
    Hyp(HypError),
    /// The program did not finish within the exit budget.
    Runaway,
}

/// Exits one host run may take.
const MAX_EXITS: u64 = 100_000;

/// A host context: the page holding the EL1 program, its mailbox and its
/// own stage-1 tables (an identity map: devices below RAM, RAM read-write,
/// the program's page read-only and executable), all host memory from
/// the pool (given back when dropped).
#[derive(Debug)]
pub struct HostCtx {
    code: Pa,
    mailbox: Pa,
    /// Root of the host's stage-1 and every table page of it.
    s1: (Pa, Vec<Pa>),
}

/// Table pages from the image's pool, remembered for [`HostCtx`]'s drop.
struct PoolCache(Vec<Pa>);

impl PageCache for PoolCache {
    fn alloc_table(&mut self) -> Option<Pa> {
        let p = pool::alloc(0)?;
        self.0.push(p);
        Some(p)
    }
    fn free_table(&mut self, pa: Pa) {
        self.0.retain(|p| *p != pa);
        pool::free(pa, 0);
    }
}

/// Builds the host's stage-1 identity map (EL2-format descriptors, which
/// EL1 reads the same way: `AP[1]`, RES1 at EL2, makes every page
/// EL0-accessible and so its RW pages privileged-execute-never; EL2's XN
/// is EL1's UXN; PXN is 0) with `code` read-only and executable.
fn host_stage1(code: Pa) -> Option<(Pa, Vec<Pa>)> {
    let mut cache = PoolCache(Vec::new());
    let root = cache.alloc_table()?;
    let geo = pkvm_pgtable::table::el2_geometry(crate::platform::mmu::VA_BITS as u32).ok()?;
    let mut pt: PageTable<El2> = PageTable::new(root, geo, S2Features::default());
    let ram = crate::platform::RAM_BASE;
    let top = 1u64 << 32;
    let maps = [
        (0, ram, El2Prot::RW.union(El2Prot::DEVICE)),
        (ram, code.0, El2Prot::RW),
        (code.0, code.0 + 4096, El2Prot::RX),
        (code.0 + 4096, top, El2Prot::RW),
    ];
    for (start, end, prot) in maps {
        let r = pt.map(
            &HwEl2,
            Va(start),
            end - start,
            Pa(start),
            prot,
            MapFlags::NONE,
            &mut cache,
        );
        if r.is_err() {
            for p in cache.0.drain(..) {
                pool::free(p, 0);
            }
            return None;
        }
    }
    crate::platform::sysreg::dsb_ish();
    Some((root, cache.0))
}

impl HostCtx {
    /// Takes the host pages and builds the host's stage-1; `None` when the
    /// pool is empty.
    pub fn new() -> Option<HostCtx> {
        let code = pool::alloc(0)?;
        if crate::platform::el1boot::current_el() == 1 {
            // The VMM at EL1 is the host: its commands run in place, with
            // its own stage-1 (no program page or tables used).
            return Some(HostCtx {
                code,
                mailbox: code,
                s1: (Pa(0), Vec::new()),
            });
        }
        let Some(mailbox) = pool::alloc(0) else {
            pool::free(code, 0);
            return None;
        };
        let Some(s1) = host_stage1(code) else {
            pool::free(mailbox, 0);
            pool::free(code, 0);
            return None;
        };
        // No EL1&0 translation of an earlier host context may linger
        // (VMID 0, global entries).
        pkvm_pgtable::TlbOps::tlbi_all(&super::platform::s2_env(0));
        Some(HostCtx { code, mailbox, s1 })
    }

    /// Whether `pa` is one of this context's own pages.
    pub fn owns(&self, pa: Pa) -> bool {
        let page = Pa(pa.0 & !0xfff);
        page == self.code || page == self.mailbox
    }

    /// Runs `cmds` in the host context at EL1 on this CPU and stores the
    /// results back into them.
    ///
    /// # Errors
    /// See [`HostRunError`].
    /// The commands run in batches of what the mailbox page holds, each
    /// batch one entry into the host. The host's `hvc #0` takes the
    /// vectors' fast path (served at EL2 without leaving the world
    /// switch).
    pub fn run(&self, hyp: &'static BootHyp, cmds: &mut [Cmd]) -> Result<HostRun, HostRunError> {
        self.run_with(hyp, cmds, true)
    }

    /// The mean round trip in nanoseconds of [`NULL_HVC_CALLS`] null
    /// hypercalls (`GET_SIZES`) from the host at EL1, timed there: by the
    /// vectors' fast path (`fast`), or each one leaving the world switch
    /// and served by `serve_sync` as any other host exit. `None` if a
    /// call failed.
    pub fn null_hvc_ns(&self, hyp: &'static BootHyp, fast: bool) -> Option<u64> {
        let mut regs = [0u64; 8];
        regs[0] = pkvm_hyp::hvc::id::GET_SIZES as u64;
        regs[1] = 40;
        let mut cmd = [Cmd {
            op: el1host::op::HVC_LOOP,
            value: u64::from(NULL_HVC_CALLS),
            regs,
            ..Cmd::default()
        }];
        self.run_with(hyp, &mut cmd, fast).ok()?;
        if cmd[0].regs[0] as i64 != pkvm_hyp::hvc::ret::SUCCESS {
            return None;
        }
        let freq = crate::platform::timer::frequency().max(1);
        Some(cmd[0].result * 1_000_000_000 / freq / u64::from(NULL_HVC_CALLS))
    }

    fn run_with(
        &self,
        hyp: &'static BootHyp,
        cmds: &mut [Cmd],
        fast: bool,
    ) -> Result<HostRun, HostRunError> {
        if crate::platform::el1boot::current_el() == 1 {
            return Ok(run_in_place(cmds));
        }
        let cap = ((4096 - CMDS_OFFSET) / (CMD_WORDS as u64 * 8)) as usize;
        let mut total = HostRun::default();
        for batch in cmds.chunks_mut(cap) {
            write_mailbox(self.mailbox, batch);
            start::set_el1_host(fast);
            let r = enter(hyp, self.code, self.mailbox, self.s1.0);
            start::set_el1_host(false);
            read_mailbox(self.mailbox, batch);
            let r = r?;
            total.hvcs += r.hvcs;
            total.mapped += r.mapped;
            total.injected += r.injected;
            total.irqs += r.irqs;
        }
        Ok(total)
    }
}

/// The VMM at EL1 under the host stage-2 is the host itself: `cmds` run
/// here, in place, with the VMM's own stage-1, vectors and probes (an
/// abort the hypervisor injects ends the access with its `ESR_EL1` and
/// `FAR_EL1` in the command, as the EL1 program's vector records them);
/// its `hvc #0` and `smc #0` go straight to EL2. The counts of host
/// stage-2 faults mapped and aborts injected are the hypervisor's
/// ([`super::platform::HYP_INFO`]); no hypercall leaves the world switch
/// and no interrupt reaches EL2 (the VMM owns them).
fn run_in_place(cmds: &mut [Cmd]) -> HostRun {
    let before = super::platform::hyp_info().unwrap_or_default();
    for c in cmds.iter_mut() {
        run_one(c);
    }
    let after = super::platform::hyp_info().unwrap_or_default();
    let injected = after.injected - before.injected;
    HostRun {
        hvcs: 0,
        mapped: (after.host_faults - before.host_faults).saturating_sub(injected),
        injected,
        irqs: 0,
    }
}

/// One command of [`run_in_place`].
fn run_one(c: &mut Cmd) {
    use crate::platform::el1boot::{probe_load, probe_store};
    use crate::platform::{hvc, timer};
    let fault = |c: &mut Cmd, e: crate::platform::el1boot::Refused| {
        c.esr = e.esr;
        c.far = e.far;
    };
    match c.op {
        el1host::op::LOAD => match probe_load(c.addr) {
            Ok(v) => c.result = v,
            Err(e) => fault(c, e),
        },
        el1host::op::STORE => {
            if let Err(e) = probe_store(c.addr, c.value) {
                fault(c, e);
            }
        }
        el1host::op::HVC => hvc::call(&mut c.regs),
        el1host::op::SMC => {
            c.regs[0] =
                crate::platform::exit::psci_call(c.regs[0] as u32, c.regs[1], c.regs[2], c.regs[3])
                    as u64;
        }
        el1host::op::CURRENT_EL => {
            c.result = crate::platform::el1boot::current_el() << 2;
            c.value = crate::platform::el1boot::sctlr_el1();
        }
        el1host::op::HVC_LOOP => {
            let t0 = timer::now();
            let (x0, x1) = (c.regs[0], c.regs[1]);
            for _ in 0..c.value {
                let mut r = [x0, x1, 0, 0, 0, 0, 0, 0];
                hvc::call(&mut r);
                c.regs = r;
            }
            c.result = timer::now() - t0;
        }
        el1host::op::TIMER_IRQ => {
            // The VMM's own tick: the EL1 physical timer, PPI 30, taken
            // at EL1 through the GIC CPU interface it owns.
            let t0 = timer::now();
            let got = (0..16).any(|_| {
                timer::arm_after(c.value);
                let d = gic::wait_for_interrupt();
                timer::disable();
                d.timer
            });
            c.result = if got {
                u64::from(crate::platform::gic::PPI_EL1_PHYS)
            } else {
                0
            };
            c.esr = timer::now() - t0;
        }
        _ => {}
    }
}

impl Drop for HostCtx {
    fn drop(&mut self) {
        if self.mailbox == self.code {
            pool::free(self.code, 0);
            return;
        }
        pkvm_pgtable::TlbOps::tlbi_all(&super::platform::s2_env(0));
        for p in self.s1.1.drain(..) {
            pool::free(p, 0);
        }
        pool::free(self.mailbox, 0);
        pool::free(self.code, 0);
    }
}

fn write_mailbox(mailbox: Pa, cmds: &[Cmd]) {
    let mut bytes: Vec<u8> = Vec::with_capacity(4096);
    bytes.extend_from_slice(&(cmds.len() as u64).to_le_bytes());
    bytes.resize(CMDS_OFFSET as usize, 0);
    for c in cmds {
        for w in c.to_words() {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
    }
    phys::write(mailbox, &bytes);
}

fn read_mailbox(mailbox: Pa, cmds: &mut [Cmd]) {
    for (i, c) in cmds.iter_mut().enumerate() {
        let base = mailbox.0 + CMDS_OFFSET + (i * CMD_WORDS * 8) as u64;
        let mut w = [0u64; CMD_WORDS];
        for (k, v) in w.iter_mut().enumerate() {
            *v = phys::read_u64(Pa(base + k as u64 * 8));
        }
        *c = Cmd::from_words(&w);
    }
}

/// The registers of the host context: its stage-2 and trap controls.
pub(crate) fn host_vm_regs(hyp: &BootHyp) -> Option<VmRegs> {
    let (root, geo) = hyp.host_stage2();
    Some(VmRegs {
        vttbr: vttbr(root, 0),
        vtcr: vtcr(geo.ipa_bits, switch::parange(), VtcrOptions::default()).ok()?,
        traps: el1host::host_traps(),
        pauth: false,
        sme: false,
        ras: false,
        lrs: switch::gic_lrs(),
        aprs: switch::gic_aprs(),
    })
}

fn enter(
    hyp: &'static BootHyp,
    code: Pa,
    mailbox: Pa,
    s1_root: Pa,
) -> Result<HostRun, HostRunError> {
    let vm = host_vm_regs(hyp).ok_or(HostRunError::Exit(0, 0))?;
    let (vbar, entry) = el1host::install(code);
    let mut st = VcpuState::new(entry, [mailbox.0, 0, 0, 0], switch::this_mpidr());
    st.sys.vbar = vbar;
    st.sys.ttbr0 = s1_root.0;
    st.sys.tcr = el1host::host_tcr_el1();
    st.sys.mair = el1host::HOST_MAIR_EL1;
    st.sys.sctlr = el1host::HOST_SCTLR_EL1_MMU;
    let cpu = start::cpu_index();
    let mut out = HostRun::default();
    for _ in 0..MAX_EXITS {
        let exit = switch::run(&vm, &mut st, None, &mut |_, _| false);
        match exit.kind {
            EXIT_SYNC => {
                if serve_sync(hyp, cpu, &mut st, &exit, &mut out)? {
                    return Ok(out);
                }
            }
            EXIT_IRQ | 10 => {
                gic::drain();
                out.irqs += 1;
            }
            k => return Err(HostRunError::Exit(k, exit.esr)),
        }
    }
    Err(HostRunError::Runaway)
}

/// Serves one synchronous exit of the host; `true` when the program is
/// done.
fn serve_sync(
    hyp: &'static BootHyp,
    cpu: usize,
    st: &mut VcpuState,
    exit: &switch::Exit,
    out: &mut HostRun,
) -> Result<bool, HostRunError> {
    const EC_HVC64: u64 = 0x16;
    const EC_SMC64: u64 = 0x17;
    const EC_IABT_LOW: u64 = 0x20;
    const EC_DABT_LOW: u64 = 0x24;
    match exit.esr >> 26 {
        EC_HVC64 => match exit.esr & 0xffff {
            0 => {
                let mut regs = [0u64; 8];
                regs.copy_from_slice(&st.regs.x[..8]);
                hyp.handle_host_hvc(cpu, &mut regs);
                super::vcpurun::after_host_call(
                    st.regs.x[0],
                    [st.regs.x[1], st.regs.x[2]],
                    regs[0],
                );
                crate::platform::pview::after_host_call(
                    st.regs.x[0],
                    [st.regs.x[1], st.regs.x[2]],
                    regs[0],
                );
                st.regs.x[..8].copy_from_slice(&regs);
                out.hvcs += 1;
            }
            imm if imm == u64::from(HVC_DONE) => return Ok(true),
            _ => return Err(HostRunError::Unexpected(st.regs.x[0])),
        },
        EC_SMC64 => {
            let x = &st.regs.x;
            st.regs.x[0] = host_psci(x[0] as u32, x[1], x[2], x[3]) as u64;
            st.regs.pc += 4;
        }
        EC_IABT_LOW | EC_DABT_LOW => {
            let ipa = ((exit.hpfar & 0x0000_0fff_ffff_fff0) << 8) | (exit.far & 0xfff);
            // ESR_EL2.WnR (bit 6) of a data abort; a fetch is a read.
            let write = exit.esr >> 26 == EC_DABT_LOW && exit.esr & (1 << 6) != 0;
            let access = if write {
                HostAccess::Write
            } else {
                HostAccess::Read
            };
            match hyp.host_mem_abort(Pa(ipa), access) {
                Ok(()) => out.mapped += 1,
                Err(HypError::Again) => {}
                Err(HypError::HostAccessDenied { .. }) => {
                    inject_abort(st, exit.esr, exit.far);
                    out.injected += 1;
                }
                Err(e) => return Err(HostRunError::Hyp(e)),
            }
        }
        _ => return Err(HostRunError::Exit(exit.kind, exit.esr)),
    }
    Ok(false)
}

/// PSCI `ALREADY_ON`.
const PSCI_ALREADY_ON: i64 = -4;
/// PSCI `DENIED`.
const PSCI_DENIED: i64 = -3;
/// PSCI `FEATURES`.
const PSCI_FEATURES: u32 = 0x8400_000a;

/// The host's SMC (trapped by `HCR_EL2.TSC`), as the hypervisor answers
/// it: PSCI `VERSION`, `FEATURES` and `AFFINITY_INFO` go on to the
/// firmware; `CPU_ON` of a CPU that is on answers `ALREADY_ON` (the
/// hypervisor asks the firmware), of one that is off `DENIED` (starting a
/// CPU for the host, at EL2 and then into the host at EL1, is not done
/// here yet); everything else, `CPU_OFF`, `SYSTEM_OFF`/`RESET`, suspend
/// and non-PSCI calls, `NOT_SUPPORTED`: the host context cannot stop the
/// machine under the hypervisor.
pub fn host_psci(func: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    use crate::platform::exit::psci_call;
    use pkvm_arch::smccc::psci;
    match func {
        psci::VERSION | PSCI_FEATURES => psci_call(func, a1, a2, a3),
        psci::AFFINITY_INFO_32 | psci::AFFINITY_INFO_64 => psci_call(func, a1, a2, 0),
        psci::CPU_ON_32 | psci::CPU_ON_64 => {
            if psci_call(psci::AFFINITY_INFO_64, a1, 0, 0) == 0 {
                PSCI_ALREADY_ON
            } else {
                PSCI_DENIED
            }
        }
        _ => pkvm_arch::smccc::ret::NOT_SUPPORTED,
    }
}

/// Injects a synchronous external abort into the host at EL1 for the
/// stage-2 fault `esr` at `far` (as pKVM's `host_inject_abort`): the
/// syndrome is pkvm-sysreg's [`host_abort_esr`] (same-EL class, FSC
/// "synchronous external abort", the rest of the ISS kept), `FAR_EL1` =
/// `far`, and the exception entry is pkvm-sysreg's [`inject_sync`]
/// (`ELR_EL1`/`SPSR_EL1` from the interrupted PC and PSTATE, the vector
/// of the host's EL and SP, D, A, I, F masked).
pub fn inject_abort(st: &mut VcpuState, esr: u64, far: u64) {
    let mut s = st.el1_state();
    inject_sync(&mut s, host_abort_esr(esr));
    st.set_el1_state(&s);
    st.sys.far = far;
}

/// An image-level hypercall (vendor-hyp range, above pkvm-hyp's): run the
/// null guest prepared by [`null_run_cost`] once and return its exit (x1 =
/// vector, x2 = ESR, x3 = FAR, x4 = HPFAR); `NOT_SUPPORTED` when none is
/// prepared.
pub const NULL_RUN: u32 = 0xc600_0040;

/// The guest [`NULL_RUN`] runs: one page of code under the host stage-2,
/// and the host context's controls to put back. The hypervisor keeps it
/// in its own data (`platform::hypdata::NULL_GUEST`): its registers decide
/// how the guest runs (its stage-2, its traps).
pub(crate) struct NullGuest {
    vm: VmRegs,
    st: VcpuState,
    host: VmRegs,
    /// Protected: the host sees only [`protected_view`] of an exit.
    protected: bool,
    /// The register an MMIO load the host is to answer goes to.
    pending_read: Option<usize>,
}

/// [`NULL_RUN`], at EL2 inside the host's hypercall: the hypervisor saves
/// the host's EL1 registers and the world switch's per-CPU state, runs the
/// guest until it exits, and puts the host's EL1 registers, stage-2 and
/// trap controls back before returning to it, the way a `VCPU_RUN`
/// hypercall would. x1 answers the guest's pending MMIO load, if any.
pub fn null_run(regs: &mut [u64; 8]) {
    let mut slot = NULL_GUEST.lock();
    let Some(g) = slot.as_mut() else {
        regs[0] = pkvm_arch::smccc::ret::NOT_SUPPORTED as u64;
        return;
    };
    if let Some(rt) = g.pending_read.take() {
        if rt < 31 {
            g.st.regs.x[rt] = regs[1];
        }
    }
    let mut host_el1 = switch::El1Sysregs::default();
    switch::save_el1(&mut host_el1);
    let saved = start::take_switch_state();
    let exit = switch::run(&g.vm, &mut g.st, None, &mut |_, _| false);
    start::restore_switch_state(saved);
    switch::load_el1(&host_el1);
    switch::load_vm_controls(&g.host);
    *regs = if g.protected {
        protected_view(g, &exit)
    } else {
        [0, exit.kind, exit.esr, exit.far, exit.hpfar, 0, 0, 0]
    };
}

/// What the host learns of a protected guest's exit (as pKVM's hyp
/// vCPU): x1 = vector, x2 = ESR, x3 = the fault's IPA (never the guest's
/// virtual address), x4 = HPFAR, x5 = for an MMIO store, the one register
/// stored; no other guest register. An MMIO access is completed by the
/// hypervisor: the PC steps over it, and a load's register takes the
/// value the host passes in x1 of its next [`NULL_RUN`].
fn protected_view(g: &mut NullGuest, e: &switch::Exit) -> [u64; 8] {
    const ISV: u64 = 1 << 24;
    const WNR: u64 = 1 << 6;
    let ipa = ((e.hpfar & 0x0000_0fff_ffff_fff0) << 8) | (e.far & 0xfff);
    let mut out = [0, e.kind, e.esr, 0, e.hpfar, 0, 0, 0];
    if e.kind == EXIT_SYNC && e.esr >> 26 == 0x24 && e.esr & ISV != 0 {
        out[3] = ipa;
        let rt = ((e.esr >> 16) & 0x1f) as usize;
        if e.esr & WNR != 0 {
            out[5] = g.st.regs.x.get(rt).copied().unwrap_or(0);
        } else {
            g.pending_read = Some(rt);
        }
        g.st.regs.pc += 4;
    }
    out
}

/// Calls timed by [`null_run_cost`].
pub const NULL_RUNS: u64 = 2000;

/// A null guest in a host page: `None` if the pool is empty or the
/// hypervisor would not map its page for the host.
struct NullPage(Pa);

impl NullPage {
    fn new(hyp: &'static BootHyp) -> Option<NullPage> {
        let code = pool::alloc(0)?;
        el1host::install_null_guest(code);
        if hyp.host_mem_abort(code, HostAccess::Read).is_err() {
            pool::free(code, 0);
            return None;
        }
        Some(NullPage(code))
    }

    /// The guest entering at `offset` with `x` in x0..x7.
    fn guest(&self, hyp: &BootHyp, offset: u64, x: [u64; 8], protected: bool) -> Option<NullGuest> {
        let host = host_vm_regs(hyp)?;
        let mut vm = host;
        vm.traps = null_guest_traps();
        let mut st = VcpuState::new(self.0 .0 + offset, [0; 4], switch::this_mpidr());
        st.regs.x[..8].copy_from_slice(&x);
        Some(NullGuest {
            vm,
            st,
            host,
            protected,
            pending_read: None,
        })
    }
}

impl Drop for NullPage {
    fn drop(&mut self) {
        *NULL_GUEST.lock() = None;
        pool::free(self.0, 0);
    }
}

/// The mean round trip in nanoseconds of running a null guest (enter,
/// `hvc #0`, exit) [`NULL_RUNS`] times: (from the hypervisor at EL2 by the
/// world switch directly, as the VMM does today; from the host at EL1 by
/// the [`NULL_RUN`] hypercall). `None` if something failed.
pub fn null_run_cost(hyp: &'static BootHyp, ctx: &HostCtx) -> Option<(u64, u64)> {
    let page = NullPage::new(hyp)?;
    let mut g = page.guest(hyp, 0, [0; 8], false)?;
    let freq = crate::platform::timer::frequency().max(1);
    // From EL2, as the VMM runs vCPUs today.
    let t0 = crate::platform::timer::now();
    for _ in 0..NULL_RUNS {
        let e = switch::run(&g.vm, &mut g.st, None, &mut |_, _| false);
        if e.kind != EXIT_SYNC || e.esr >> 26 != 0x16 {
            return None;
        }
    }
    let el2 = (crate::platform::timer::now() - t0) * 1_000_000_000 / freq / NULL_RUNS;
    *NULL_GUEST.lock() = Some(g);
    // From the host at EL1.
    let mut regs = [0u64; 8];
    regs[0] = NULL_RUN as u64;
    let mut cmd = [Cmd {
        op: el1host::op::HVC_LOOP,
        value: NULL_RUNS,
        regs,
        ..Cmd::default()
    }];
    ctx.run(hyp, &mut cmd).ok()?;
    let r = &cmd[0].regs;
    if r[0] != 0 || r[1] != EXIT_SYNC || r[2] >> 26 != 0x16 {
        return None;
    }
    let el1 = cmd[0].result * 1_000_000_000 / freq / NULL_RUNS;
    Some((el2, el1))
}

/// A protected null guest's MMIO as the host at EL1 sees it: the guest,
/// with `secrets` in x1..x4, stores x5 = `value` to `ipa` and loads x7
/// from it. The host runs it three times by [`NULL_RUN`]: to the store,
/// to the load, and on with `answer` for the load to the guest's
/// `hvc #0`. Returns
/// what the host received (x0..x7 of each run) and the guest's x7 after,
/// read by the hypervisor. `None` if something failed.
pub fn protected_mmio(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    secrets: [u64; 4],
    (ipa, value, answer): (u64, u64, u64),
) -> Option<([[u64; 8]; 3], u64)> {
    let page = NullPage::new(hyp)?;
    let x = [
        0, secrets[0], secrets[1], secrets[2], secrets[3], value, ipa, 0,
    ];
    *NULL_GUEST.lock() = Some(page.guest(hyp, el1host::NULL_GUEST_MMIO, x, true)?);
    let run = |x1: u64| hvc_cmd(NULL_RUN, x1);
    let mut cmds = [run(0), run(0), run(answer)];
    ctx.run(hyp, &mut cmds).ok()?;
    let x7 = NULL_GUEST.lock().as_ref()?.st.regs.x[7];
    Some((cmds.map(|c| c.regs), x7))
}

fn hvc_cmd(func: u32, x1: u64) -> Cmd {
    let mut regs = [0u64; 8];
    regs[0] = func as u64;
    regs[1] = x1;
    Cmd {
        op: el1host::op::HVC,
        regs,
        ..Cmd::default()
    }
}

/// The null guest's trap controls: a guest's interrupt routing
/// (`IMO`/`FMO`/`AMO`), SMCs trapped, no EL1 timer access.
pub(crate) fn null_guest_traps() -> pkvm_sysreg::traps::TrapControls {
    use pkvm_sysreg::traps::hcr;
    let mut t = el1host::host_traps();
    t.hcr |= hcr::IMO | hcr::FMO | hcr::AMO;
    t.cnthctl = 0;
    t
}
