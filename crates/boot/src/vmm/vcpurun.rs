//! `VCPU_RUN`: the host at EL1 runs a protected vCPU by a hypercall; the
//! hypervisor keeps the vCPU's registers in its own memory and shows the
//! host only what emulation needs (pKVM's hyp vCPU).
//!
//! Hypervisor side ([`vcpu_run`], at EL2 inside the host's `hvc #0`): the
//! vCPU is the one `VCPU_LOAD`ed on this CPU, which must be protected; its
//! [`VcpuState`] lives in a table in the hypervisor's own memory
//! (`platform::hypmem`), keyed by (handle, vCPU index), created empty at
//! `INIT_VCPU` and dropped at `START_TEARDOWN` ([`after_host_call`]), so a
//! new VM never sees an old one's registers. Arguments: x1 = one of
//! [`flags`]: `RESET` (first entry only: PC = x2, x0 = x3),
//! `MMIO_DONE` (complete the last exit's MMIO access: a load's register
//! takes x2, sign-extended and sized as its syndrome says; the PC steps),
//! `CALL_RET` (the last exit's HVC/SMC returns x2..x5 in the guest's
//! x0..x3), `INJECT_ABORT` (the last exit's stage-2 abort becomes a
//! synchronous external abort in the guest, at the address the hypervisor
//! kept); 0 = just run; with any of them `LRS`: x6, x7 = the guest's list
//! registers for the run, validated ([`valid_lrs`]), handed back by
//! [`VCPU_LRS`]. Results: x0 = status, x1 = exit vector, x2 =
//! ESR, x3 = for an abort the fault's IPA (never the guest's VA), for a
//! WFI/WFE the virtual timer's deadline (physical counter ticks,
//! `u64::MAX`: none), x4 = HPFAR; x5 = for an MMIO store the one register
//! stored; for an HVC/SMC, x4..x7 = the guest's x0..x3 (the call's
//! arguments). No other guest register ever reaches the host.
//!
//! The guest runs under its own trap policy (pkvm-sysreg's default
//! `VmPolicy`), and the hypervisor answers what needs no host
//! ([`answer_here`]): trapped system registers from pkvm-sysreg's table
//! over the vCPU's register file (in the hypervisor's own memory, beside
//! the table), UNDEFs; the virtual timer is saved and restored with the
//! vCPU's [`VcpuState`].
//!
//! Host side ([`El1Backend`]): a pkvm-host `VcpuBackend` whose `enter` runs
//! the host context at EL1 for one `VCPU_RUN` and turns the answer into a
//! `GuestExit`, so pkvm-host's own run loop, fault pipeline (donating the
//! faulting pages) and PSCI emulation drive the protected vCPU from EL1.
//! [`el1_run`] is the `host-attack` phase that shows it.

use alloc::sync::Arc;
use alloc::vec::Vec;

use pkvm_arch::vtcr::{vtcr, vttbr, VtcrOptions};
use pkvm_host::fault::GuestFault;
use pkvm_host::{GuestExit, StageTwo, VcpuBackend, VcpuContext, VcpuExit};
use pkvm_hyp::hvc::{id, ret};
use pkvm_sync::{LockClass, SpinLock};

use pkvm_arch::esr::bits::{ISV, WNR};
use pkvm_arch::esr::{ec, Esr};
use pkvm_sysreg::{host_abort_esr, inject_sync, inject_undef, HostFeature, VcpuSysregs};

use super::a64::{adr, ldr_x, movk, movz, str_x, HVC0};
use super::el1host::{host_vm_regs, HostCtx};
use super::platform::{BootHyp, BootPlatform};
use super::process::{Backing, BootProcess};
use super::sysregs::{self, Action, VmPolicy};
use super::{builtin, check, MIB};
use crate::platform::el1host::{op, Cmd};
// The table and, per slot, its vCPU's trapped system registers
// (pkvm-sysreg's register file; only the `VCPU_RUN` holding the slot
// `Busy` uses its entry): both in the hypervisor's own memory once
// [`init`] ran, the pointers in its own data.
use crate::platform::hypdata::{VCPU_SYSREGS as SYSREGS, VCPU_TABLE as TABLE};
use crate::platform::switch::{self, VcpuState, VmRegs, EXIT_IRQ, EXIT_SYNC};
use crate::platform::{gic, hypmem, idregs, start, timer};
use crate::println;

/// The hypercall (vendor-hyp range, above pkvm-hyp's, as `NULL_RUN`).
pub const VCPU_RUN: u32 = 0xc600_0041;

/// `VCPU_RUN`'s x1.
pub mod flags {
    /// First entry: PC = x2, x0 = x3.
    pub const RESET: u64 = 1;
    /// Complete the last exit's MMIO access (a load takes x2).
    pub const MMIO_DONE: u64 = 2;
    /// The last exit's call returns x2..x5 in x0..x3.
    pub const CALL_RET: u64 = 4;
    /// Inject a synchronous external abort for the last exit's stage-2
    /// fault into the guest (at the faulting address the hypervisor kept).
    pub const INJECT_ABORT: u64 = 8;
    /// Combined with any of the above: x6, x7 are the guest's list
    /// registers `ICH_LR0/1_EL2` for this run (the others cleared),
    /// validated first ([`super::valid_lrs`]); a refused list refuses the
    /// call and changes nothing.
    pub const LRS: u64 = 1 << 8;
}

/// The hypercall that hands the host the loaded protected vCPU's list
/// registers as the last run left them (x1..x7 = `ICH_LR0..6_EL2`, zero
/// past this CPU's count): the host's vGIC sees its guest's acks and EOIs.
pub const VCPU_LRS: u32 = 0xc600_0042;

/// `ICH_LR<n>_EL2.State` (bits 63:62; 0 = invalid).
const LR_STATE: u64 = 3 << 62;
/// `ICH_LR<n>_EL2.HW`: the virtual interrupt is tied to a physical one.
const LR_HW: u64 = 1 << 61;
/// `ICH_LR<n>_EL2` RES0 bits (59:56, 47:45).
const LR_RES0: u64 = (0xf << 56) | (0x7 << 45);
/// `ICH_LR<n>_EL2` bits 44:32: pINTID with HW set; with HW clear bit 41 is
/// EOI (a maintenance interrupt on EOI) and the rest RES0.
const LR_PINTID: u64 = 0x1fff << 32;
const LR_EOI: u64 = 1 << 41;
/// `ICH_LR<n>_EL2.vINTID`.
const LR_VINTID: u64 = 0xffff_ffff;
/// The first special INTID (SGIs, PPIs and SPIs lie below; no LPIs).
const INTID_SPECIAL: u64 = 1020;

/// Whether the host's list registers `lrs` may be loaded for a protected
/// guest on a CPU with `n` list registers: each invalid one all zero, each
/// live one a virtual interrupt only (HW clear: the host cannot make the
/// guest deactivate a physical interrupt), reserved bits clear, an INTID
/// below 1020, in a list register the CPU has, no INTID twice.
pub fn valid_lrs(lrs: &[u64], n: usize) -> bool {
    lrs.iter().enumerate().all(|(i, &lr)| {
        if lr & LR_STATE == 0 {
            return lr == 0;
        }
        if lr & LR_HW != 0 {
            return false;
        }
        let vintid = lr & LR_VINTID;
        i < n
            && lr & (LR_RES0 | (LR_PINTID & !LR_EOI)) == 0
            && vintid < INTID_SPECIAL
            && !lrs[..i]
                .iter()
                .any(|&o| o & LR_STATE != 0 && o & LR_VINTID == vintid)
    })
}

/// Exits the hypervisor answers itself (system registers, UNDEFs) in one
/// `VCPU_RUN` before it returns to the host anyway, as an interrupt exit.
const HANDLED_MAX: usize = 64;

/// Protected vCPUs whose registers the hypervisor holds at once.
const SLOTS: usize = 16;

/// What the host must complete before the vCPU goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Last {
    None,
    /// A stage-2 abort (its ESR and the guest's faulting address, which
    /// the host never sees): an MMIO access to complete when the ESR has a
    /// syndrome, or one the host may have injected.
    Abort {
        esr: u64,
        far: u64,
    },
    /// An HVC or SMC.
    Call,
}

/// A protected vCPU as the hypervisor holds it.
pub(crate) struct HypVcpu {
    key: (u16, u8),
    /// `None` until the host's `RESET` run.
    st: Option<VcpuState>,
    /// The vCPU's system-register policy (the default VM configuration
    /// on this CPU), fixed at `RESET`; its register file is the slot's
    /// entry of [`SYSREGS`].
    policy: Option<VmPolicy>,
    last: Last,
}

/// A slot of the table: a vCPU's registers, or taken out by the
/// `VCPU_RUN` running it on some CPU (`Busy`: the slot stays reserved).
/// The registers stay inline: boxing them would put them in the global
/// heap, which is host memory.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Slot {
    Free,
    Busy((u16, u8)),
    Held(HypVcpu),
}

impl Slot {
    fn key(&self) -> Option<(u16, u8)> {
        match self {
            Slot::Free => None,
            Slot::Busy(k) => Some(*k),
            Slot::Held(v) => Some(v.key),
        }
    }
}

/// The table of protected vCPUs.
pub(crate) type Table = SpinLock<[Slot; SLOTS]>;

/// Places the table and the register files in the hypervisor's own memory
/// (`init_hyp`, before `FINALIZE`); `false` if there is no room.
pub fn init() -> bool {
    let mut t = TABLE.lock();
    if t.is_none() {
        *t = hypmem::place(SpinLock::new(
            core::array::from_fn(|_| Slot::Free),
            LockClass::Leaf,
        ));
    }
    let mut s = SYSREGS.lock();
    if s.is_none() {
        *s = hypmem::place_slice(SLOTS, || SpinLock::new(VcpuSysregs::new(), LockClass::Leaf));
    }
    t.is_some() && s.is_some()
}

fn table() -> Option<&'static Table> {
    *TABLE.lock()
}

fn sysregs(slot: usize) -> Option<&'static SpinLock<VcpuSysregs>> {
    SYSREGS.lock().and_then(|s| s.get(slot))
}

/// Protected vCPUs whose registers the hypervisor holds now.
pub fn held() -> usize {
    table().map_or(0, |t| {
        t.lock()
            .iter()
            .filter(|s| matches!(s, Slot::Held(_)))
            .count()
    })
}

/// Bytes [`init`] takes from the hypervisor's own memory.
pub const fn table_bytes() -> u64 {
    (size_of::<Table>() + SLOTS * size_of::<SpinLock<VcpuSysregs>>()) as u64
}

/// Keeps the table in step with pkvm-hyp after a host call `func` with
/// arguments `args` returned `status`: a vCPU just initialised starts with
/// no registers, a VM being torn down loses its vCPUs' registers.
pub fn after_host_call(func: u64, args: [u64; 2], status: u64) {
    if status as i64 != ret::SUCCESS {
        return;
    }
    let drop_if: &dyn Fn(&(u16, u8)) -> bool = match func as u32 {
        id::INIT_VCPU => &|k| u64::from(k.0) == args[0] && u64::from(k.1) == args[1],
        id::START_TEARDOWN => &|k| u64::from(k.0) == args[0],
        _ => return,
    };
    if let Some(t) = table() {
        for s in t.lock().iter_mut() {
            if matches!(s, Slot::Held(v) if drop_if(&v.key)) {
                *s = Slot::Free;
            }
        }
    }
}

/// [`VCPU_RUN`] at EL2 on CPU `cpu` with the host's x0..x7 in `regs`.
pub fn vcpu_run(hyp: &'static BootHyp, cpu: usize, regs: &mut [u64; 8]) {
    *regs = match run(hyp, cpu, regs) {
        Ok(out) => out,
        Err(status) => [status as u64, 0, 0, 0, 0, 0, 0, 0],
    };
}

/// [`VCPU_LRS`] at EL2 on CPU `cpu`.
pub fn vcpu_lrs(hyp: &'static BootHyp, cpu: usize, regs: &mut [u64; 8]) {
    *regs = match lrs_of(hyp, cpu) {
        Ok(l) => {
            let mut out = [ret::SUCCESS as u64, 0, 0, 0, 0, 0, 0, 0];
            let n = switch::gic_lrs().min(7);
            out[1..=n].copy_from_slice(&l[..n]);
            out
        }
        Err(status) => [status as u64, 0, 0, 0, 0, 0, 0, 0],
    };
}

fn lrs_of(hyp: &'static BootHyp, cpu: usize) -> Result<[u64; 16], i64> {
    if !start::el1_host() {
        return Err(ret::DENIED);
    }
    let c = hyp.loaded_vcpu_context(cpu).ok_or(ret::NOT_FOUND)?;
    if !c.protected {
        return Err(ret::DENIED);
    }
    let key = (c.handle, c.vcpu);
    let t = table().ok_or(ret::NOT_SUPPORTED)?;
    let slots = t.lock();
    slots
        .iter()
        .find_map(|s| match s {
            Slot::Held(v) if v.key == key => v.st.as_ref().map(|st| st.gic.lrs),
            _ => None,
        })
        .ok_or(ret::NOT_FOUND)
}

fn run(hyp: &'static BootHyp, cpu: usize, regs: &[u64; 8]) -> Result<[u64; 8], i64> {
    // Only from the host context at EL1: its EL1 registers are put back.
    if !start::el1_host() {
        return Err(ret::DENIED);
    }
    let c = hyp.loaded_vcpu_context(cpu).ok_or(ret::NOT_FOUND)?;
    if !c.protected {
        return Err(ret::DENIED);
    }
    let t = table().ok_or(ret::NOT_SUPPORTED)?;
    let key = (c.handle, c.vcpu);
    let (slot, mut v) = take(t, key)?;
    let out = apply(&mut v, regs, c.vcpu, slot).and_then(|()| {
        let HypVcpu {
            st, policy, last, ..
        } = &mut v;
        match (st.as_mut(), policy.as_ref()) {
            (Some(st), Some(policy)) => {
                let (vm, host) = guest_regs(hyp, (c.s2_root, c.vmid, c.geometry), policy)
                    .ok_or(ret::INTERNAL)?;
                let g = Guest {
                    policy,
                    slot,
                    s2: (c.s2_root, c.geometry),
                };
                Ok(run_guest(&vm, &host, st, &g, last))
            }
            _ => Err(ret::INVALID_PARAMETER),
        }
    });
    put(t, v);
    out
}

/// What the hypervisor answers a running vCPU's traps with.
struct Guest<'a> {
    /// Its system-register policy.
    policy: &'a VmPolicy,
    /// Its slot (its entry of [`SYSREGS`]).
    slot: usize,
    /// Its stage-2 table (root, geometry), for set/way maintenance.
    s2: (pkvm_arch::Pa, pkvm_arch::vtcr::S2Geometry),
}

/// Runs the guest until an exit the host must see: system-register traps
/// and other exceptions the hypervisor answers itself ([`answer_here`])
/// re-enter it at once, up to [`HANDLED_MAX`] of them.
fn run_guest(
    vm: &VmRegs,
    host: &VmRegs,
    st: &mut VcpuState,
    g: &Guest,
    last: &mut Last,
) -> [u64; 8] {
    let cpu = start::cpu_index();
    for _ in 0..HANDLED_MAX {
        // The virtual timer's line high (the guest has not yet seen it)
        // would take the guest out at once, again and again: its PPI is
        // masked until the line drops (as the EL2 VMM's backend does).
        gic::set_vtimer_masked(cpu, vtimer_level(st, timer::now()));
        let e = world_switch(vm, host, st);
        if !answer_here(st, g, &e) {
            return view(st, last, &e);
        }
    }
    *last = Last::None;
    [ret::SUCCESS as u64, EXIT_IRQ, 0, 0, 0, 0, 0, 0]
}

/// `CNTV_CTL_EL0`: ENABLE, IMASK.
const CNTV_ENABLE: u64 = 1;
const CNTV_IMASK: u64 = 2;

/// When the guest's virtual timer fires, in physical counter ticks;
/// `u64::MAX` when it is off or masked.
fn vtimer_deadline(st: &VcpuState) -> u64 {
    let t = &st.timer;
    if t.ctl & (CNTV_ENABLE | CNTV_IMASK) == CNTV_ENABLE {
        t.cval.saturating_add(t.voff)
    } else {
        u64::MAX
    }
}

/// Whether the guest's virtual timer line is high at physical count `now`.
fn vtimer_level(st: &VcpuState, now: u64) -> bool {
    let d = vtimer_deadline(st);
    d != u64::MAX && now >= d
}

/// Answers exit `e` in the hypervisor when the host has no part in it:
/// a trapped system register by pkvm-sysreg's table over the vCPU's
/// register file (an UNDEF injected where the table refuses), any
/// synchronous exception of a class the host does not emulate by an
/// UNDEF. `false`: the host sees the exit.
fn answer_here(st: &mut VcpuState, g: &Guest, e: &switch::Exit) -> bool {
    if e.kind != EXIT_SYNC {
        return false;
    }
    match Esr(e.esr).ec() {
        ec::IABT_LOW | ec::DABT_LOW | ec::HVC64 | ec::SMC64 | ec::WFX => false,
        ec::SYS64 => {
            sysreg(st, g, e.esr);
            true
        }
        _ => {
            let _ = sysregs::other_trap(g.policy, Esr(e.esr));
            inject_undef_into(st);
            true
        }
    }
}

/// A trapped `MRS`/`MSR`/`SYS` (EC 0x18): completed from the table (the
/// sanitised ID registers, the register file, the emulated physical timer
/// and counter; a set/way instruction cleans and invalidates the VM's
/// mapped memory, as the EL2 VMM's backend), or an UNDEF. Not served yet
/// at EL2: the emulated physical timer's interrupt and SGIs the guest sends (the
/// write is dropped); PMU registers UNDEF (no PMU offered).
fn sysreg(st: &mut VcpuState, g: &Guest, esr: u64) {
    let action = match sysregs(g.slot) {
        Some(file) => {
            let mut file = file.lock();
            sysregs::sysreg_trap(&mut file, g.policy, Esr(esr), &st.regs.x, timer::now())
        }
        None => Action::Undef(sysregs::UndefCause::Class(ec::SYS64)),
    };
    match action {
        Action::Complete(out) | Action::TimerWrite(out) => {
            out.complete(&mut st.regs.x, &mut st.regs.pc)
        }
        Action::Undef(_) | Action::Pmu(_) => inject_undef_into(st),
        Action::SetWayFlush => {
            st.regs.pc += 4;
            super::backend::flush_stage2(g.s2.0, g.s2.1);
        }
        Action::Sgi { .. } => st.regs.pc += 4,
    }
}

/// The guest takes an UNDEF at its PC (pkvm-sysreg's [`inject_undef`]).
fn inject_undef_into(st: &mut VcpuState) {
    let mut s = st.el1_state();
    inject_undef(&mut s);
    st.set_el1_state(&s);
}

/// The guest takes a synchronous external abort for its stage-2 fault
/// `esr` at `far` (its virtual address): pkvm-sysreg's
/// [`host_abort_esr`] syndrome (the lower-EL class kept for a guest at
/// EL0), `FAR_EL1` = `far`.
fn inject_abort_into(st: &mut VcpuState, esr: u64, far: u64) {
    let from_el0 = st.regs.pstate & 0xf == 0;
    let mut syn = host_abort_esr(esr);
    if from_el0 {
        syn &= !(1 << 26);
    }
    let mut s = st.el1_state();
    inject_sync(&mut s, syn);
    st.set_el1_state(&s);
    st.sys.far = far;
}

/// Takes the vCPU's registers out of the table (new ones if it has none),
/// leaving its slot `Busy` until [`put`]; with the slot's index.
fn take(t: &Table, key: (u16, u8)) -> Result<(usize, HypVcpu), i64> {
    let mut slots = t.lock();
    let i = slots
        .iter()
        .position(|s| s.key() == Some(key))
        .or_else(|| slots.iter().position(|s| matches!(s, Slot::Free)))
        .ok_or(ret::NO_MEMORY)?;
    match core::mem::replace(&mut slots[i], Slot::Busy(key)) {
        Slot::Held(v) => Ok((i, v)),
        Slot::Free => Ok((
            i,
            HypVcpu {
                key,
                st: None,
                policy: None,
                last: Last::None,
            },
        )),
        // Cannot happen (a vCPU is loaded on one CPU at a time).
        Slot::Busy(_) => Err(ret::BUSY),
    }
}

/// Puts back what [`take`] took (a vCPU never reset frees its slot).
fn put(t: &Table, v: HypVcpu) {
    let mut slots = t.lock();
    if let Some(s) = slots
        .iter_mut()
        .find(|s| matches!(s, Slot::Busy(k) if *k == v.key))
    {
        *s = if v.st.is_some() {
            Slot::Held(v)
        } else {
            Slot::Free
        };
    }
}

/// Applies the host's flags; a refused one changes nothing. `slot`: the
/// vCPU's entry of [`SYSREGS`] (reset with the vCPU).
fn apply(v: &mut HypVcpu, regs: &[u64; 8], vcpu: u8, slot: usize) -> Result<(), i64> {
    let lrs = regs[1] & flags::LRS != 0;
    if lrs && !valid_lrs(&regs[6..8], switch::gic_lrs()) {
        return Err(ret::INVALID_PARAMETER);
    }
    // Only a run with no other flag can fail after changing something:
    // then the vCPU has no registers and nothing changed.
    apply_flags(v, regs[1] & !flags::LRS, regs, vcpu, slot)?;
    if lrs {
        let st = v.st.as_mut().ok_or(ret::INVALID_PARAMETER)?;
        st.gic.lrs = [0; 16];
        st.gic.lrs[..2].copy_from_slice(&regs[6..8]);
    }
    Ok(())
}

fn apply_flags(v: &mut HypVcpu, f: u64, regs: &[u64; 8], vcpu: u8, slot: usize) -> Result<(), i64> {
    match f {
        0 => Ok(()),
        flags::RESET if v.st.is_none() => {
            let policy = VmPolicy::default_for(&idregs::host_ids()).map_err(|_| ret::INTERNAL)?;
            sysregs(slot).ok_or(ret::INTERNAL)?.lock().reset();
            let mut st = VcpuState::new(regs[2], [regs[3], 0, 0, 0], u64::from(vcpu));
            // Its virtual CPU interface is on from the start (the host
            // fills the list registers).
            st.gic.hcr = switch::ICH_HCR_EN;
            v.st = Some(st);
            v.policy = Some(policy);
            Ok(())
        }
        flags::MMIO_DONE => match (v.last, v.st.as_mut()) {
            (Last::Abort { esr, .. }, Some(st)) if is_mmio(esr) => {
                complete_mmio(st, esr, regs[2]);
                v.last = Last::None;
                Ok(())
            }
            _ => Err(ret::INVALID_PARAMETER),
        },
        flags::INJECT_ABORT => match (v.last, v.st.as_mut()) {
            (Last::Abort { esr, far }, Some(st)) => {
                inject_abort_into(st, esr, far);
                v.last = Last::None;
                Ok(())
            }
            _ => Err(ret::INVALID_PARAMETER),
        },
        flags::CALL_RET => match (v.last, v.st.as_mut()) {
            (Last::Call, Some(st)) => {
                st.regs.x[..4].copy_from_slice(&regs[2..6]);
                v.last = Last::None;
                Ok(())
            }
            _ => Err(ret::INVALID_PARAMETER),
        },
        _ => Err(ret::INVALID_PARAMETER),
    }
}

/// Whether a stage-2 abort's `esr` is an MMIO access the host can
/// complete: a data abort with a syndrome.
fn is_mmio(esr: u64) -> bool {
    Esr(esr).ec() == ec::DABT_LOW && esr & ISV != 0
}

/// Completes an MMIO access with syndrome `esr`: a load's register (SRT)
/// takes `value` sized by SAS and sign-extended by SSE to 32 or 64 bits
/// (SF); the PC steps past the instruction.
fn complete_mmio(st: &mut VcpuState, esr: u64, value: u64) {
    let rt = ((esr >> 16) & 0x1f) as usize;
    if esr & WNR == 0 && rt < 31 {
        let bits = 8u32 << ((esr >> 22) & 3);
        let mut v = if bits == 64 {
            value
        } else {
            value & ((1u64 << bits) - 1)
        };
        if esr & (1 << 21) != 0 && bits < 64 && v >> (bits - 1) & 1 == 1 {
            v |= !0u64 << bits;
        }
        if esr & (1 << 15) == 0 {
            v &= 0xffff_ffff;
        }
        st.regs.x[rt] = v;
    }
    st.regs.pc += 4;
}

/// The guest's controls (its stage-2, a protected guest's traps) and the
/// host context's, to put back after.
fn guest_regs(
    hyp: &BootHyp,
    (root, vmid, geo): (pkvm_arch::Pa, u16, pkvm_arch::vtcr::S2Geometry),
    policy: &VmPolicy,
) -> Option<(VmRegs, VmRegs)> {
    let host = host_vm_regs(hyp)?;
    let mut vm = host;
    vm.vttbr = vttbr(root, vmid);
    vm.vtcr = vtcr(geo.ipa_bits, switch::parange(), VtcrOptions::default()).ok()?;
    vm.traps = policy.traps;
    vm.pauth = policy.pauth();
    vm.sme = policy.features.host().has(HostFeature::Sme);
    vm.ras = policy.features.host().has(HostFeature::Ras);
    Some((vm, host))
}

/// Runs the guest once from inside the host's hypercall (as `NULL_RUN`):
/// the host's EL1 registers and the world switch's per-CPU state are set
/// aside and put back, with the host's stage-2 and trap controls.
fn world_switch(vm: &VmRegs, host: &VmRegs, st: &mut VcpuState) -> switch::Exit {
    // The caller's controls as they are (the host context's, or the VMM
    // at EL1's with its host stage-2), with the list-register counts.
    let live = VmRegs {
        lrs: host.lrs,
        aprs: host.aprs,
        ..crate::platform::hostrun::host_controls()
    };
    let mut host_el1 = switch::El1Sysregs::default();
    switch::save_el1(&mut host_el1);
    let saved = start::take_switch_state();
    let exit = switch::run(vm, st, None, &mut |_, _| false);
    start::restore_switch_state(saved);
    switch::load_el1(&host_el1);
    switch::load_vm_controls(&live);
    exit
}

/// What the host learns of exit `e` (see the module's list); records what
/// it must complete in `last`. WFx and SMC are stepped over here; a WFx
/// exit's x3 is the virtual timer's deadline in physical counter ticks
/// (`u64::MAX`: none), for the host to arm its own timer.
fn view(st: &mut VcpuState, last: &mut Last, e: &switch::Exit) -> [u64; 8] {
    let mut out = [ret::SUCCESS as u64, e.kind, e.esr, 0, 0, 0, 0, 0];
    *last = Last::None;
    if e.kind != EXIT_SYNC {
        return out;
    }
    match Esr(e.esr).ec() {
        ec::IABT_LOW | ec::DABT_LOW => {
            out[3] = ((e.hpfar & 0x0000_0fff_ffff_fff0) << 8) | (e.far & 0xfff);
            out[4] = e.hpfar;
            if Esr(e.esr).ec() == ec::DABT_LOW && e.esr & ISV != 0 {
                let rt = ((e.esr >> 16) & 0x1f) as usize;
                if e.esr & WNR != 0 {
                    out[5] = st.regs.x.get(rt).copied().unwrap_or(0);
                }
            }
            *last = Last::Abort {
                esr: e.esr,
                far: e.far,
            };
        }
        ec::HVC64 | ec::SMC64 => {
            if Esr(e.esr).ec() == ec::SMC64 {
                st.regs.pc += 4;
            }
            out[4..8].copy_from_slice(&st.regs.x[..4]);
            *last = Last::Call;
        }
        ec::WFX => {
            st.regs.pc += 4;
            out[3] = vtimer_deadline(st);
        }
        _ => {}
    }
    out
}

// ---- The host side -------------------------------------------------------

/// What the next `VCPU_RUN` passes.
#[derive(Clone, Copy, Debug)]
enum Pending {
    None,
    Reset { pc: u64, x0: u64 },
    Mmio(u64),
    Abort,
}

/// `VCPU_RUN`s one [`El1Backend`] makes at most.
pub const MAX_RUNS: usize = 4096;

/// pkvm-host's backend for a protected vCPU run from the host at EL1 by
/// [`VCPU_RUN`]: `ctx` (pkvm-host's copy) holds only what the hypervisor
/// showed.
pub struct El1Backend<'a> {
    host: &'a HostCtx,
    hyp: &'static BootHyp,
    cpu: usize,
    pending: Pending,
    last_call: bool,
    /// Every answer the host received (x0..x7).
    pub seen: Vec<[u64; 8]>,
    /// A failed run (status or host-context error).
    pub failed: Option<&'static str>,
    /// The guest's virtual-timer deadline of its last WFI/WFE exit, in
    /// physical counter ticks (`None`: no timer armed): when the host's
    /// own timer would wake the vCPU.
    pub wake_at: Option<u64>,
    /// List registers the next run loads (`LRS`).
    pub lrs: Option<[u64; 2]>,
    /// Whether each run is followed by a [`VCPU_LRS`] (into `lrs_back`).
    pub track_lrs: bool,
    /// The guest's list registers after the last run (`track_lrs`).
    pub lrs_back: Option<[u64; 7]>,
}

impl<'a> El1Backend<'a> {
    /// A backend over the host context `host` on this CPU.
    pub fn new(host: &'a HostCtx, hyp: &'static BootHyp) -> Self {
        El1Backend {
            host,
            hyp,
            cpu: start::cpu_index(),
            pending: Pending::None,
            last_call: false,
            seen: Vec::new(),
            failed: None,
            wake_at: None,
            lrs: None,
            track_lrs: false,
            lrs_back: None,
        }
    }

    fn args(&mut self, ctx: &VcpuContext) -> [u64; 8] {
        let mut r = [0u64; 8];
        r[0] = u64::from(VCPU_RUN);
        match core::mem::replace(&mut self.pending, Pending::None) {
            Pending::Reset { pc, x0 } => r[1..4].copy_from_slice(&[flags::RESET, pc, x0]),
            Pending::Mmio(v) => r[1..3].copy_from_slice(&[flags::MMIO_DONE, v]),
            Pending::Abort => r[1] = flags::INJECT_ABORT,
            Pending::None if self.last_call => {
                r[1] = flags::CALL_RET;
                r[2..6].copy_from_slice(&ctx.gprs.x[..4]);
            }
            Pending::None => {}
        }
        self.last_call = false;
        r
    }
}

impl VcpuBackend for El1Backend<'_> {
    fn cpu(&self) -> usize {
        self.cpu
    }

    fn enter(&mut self, ctx: &mut VcpuContext, _s2: &StageTwo) -> GuestExit {
        // pkvm-host re-enters by itself after the exits it handles (a
        // fault resolved, an abort injected): a guest that never stops
        // faulting ends here, not in an ever-growing record.
        if self.seen.len() >= MAX_RUNS {
            self.failed = Some("more than MAX_RUNS VCPU_RUNs");
            return GuestExit::GuestCheckFailed;
        }
        let mut regs = self.args(ctx);
        if let Some(l) = self.lrs.take() {
            regs[1] |= flags::LRS;
            regs[6..8].copy_from_slice(&l);
        }
        let mut cmd = [
            Cmd {
                op: op::HVC,
                regs,
                ..Cmd::default()
            },
            hvc(VCPU_LRS, &[]),
        ];
        let n = if self.track_lrs { 2 } else { 1 };
        if self.host.run(self.hyp, &mut cmd[..n]).is_err() {
            self.failed = Some("host context run");
            return GuestExit::GuestCheckFailed;
        }
        if self.track_lrs && cmd[1].regs[0] as i64 == ret::SUCCESS {
            let mut l = [0; 7];
            l.copy_from_slice(&cmd[1].regs[1..]);
            self.lrs_back = Some(l);
        }
        let r = cmd[0].regs;
        self.seen.push(r);
        if r[0] as i64 != ret::SUCCESS {
            self.failed = Some("VCPU_RUN refused");
            return GuestExit::GuestCheckFailed;
        }
        let (kind, esr) = (r[1], r[2]);
        if kind == EXIT_IRQ || kind == 10 {
            gic::drain();
            return GuestExit::Interrupt;
        }
        if kind != EXIT_SYNC {
            return GuestExit::Unhandled { esr };
        }
        match Esr(esr).ec() {
            ec::IABT_LOW | ec::DABT_LOW => {
                if esr & ISV != 0 && esr & WNR != 0 {
                    let rt = ((esr >> 16) & 0x1f) as usize;
                    if let Some(x) = ctx.gprs.x.get_mut(rt) {
                        *x = r[5];
                    }
                }
                GuestExit::Abort {
                    esr,
                    far: r[3],
                    hpfar: r[4],
                }
            }
            ec::HVC64 | ec::SMC64 => {
                ctx.gprs.x[..4].copy_from_slice(&r[4..8]);
                self.last_call = true;
                GuestExit::Call { esr }
            }
            ec::WFX => {
                self.wake_at = (r[3] != u64::MAX).then_some(r[3]);
                GuestExit::Wfx
            }
            _ => GuestExit::Unhandled { esr },
        }
    }

    fn complete_mmio(&mut self, _ctx: &mut VcpuContext, _fault: &GuestFault, value: u64) {
        self.pending = Pending::Mmio(value);
    }

    fn inject_abort(&mut self, _ctx: &mut VcpuContext, _fault: &GuestFault) {
        self.pending = Pending::Abort;
    }

    fn on_reset(&mut self, ctx: &mut VcpuContext, _start: &pkvm_host::psci::ResetState) {
        self.pending = Pending::Reset {
            pc: ctx.gprs.pc,
            x0: ctx.gprs.x[0],
        };
    }
}

// ---- The host-attack phase -------------------------------------------------

/// Guest-physical address of the test device (no memslot: MMIO).
const DEV_IPA: u64 = 0x0bf0_0000;
/// What the guest stores to the device.
const STORED: u64 = 0x1234;
/// What the host answers the guest's device load with.
const ANSWER: u64 = 0xfeed_f00d;
/// The guest's secret registers x10..x13 (each `0x5ec0 + n` << 48).
const SECRETS: [u64; 4] = [0x5ec1 << 48, 0x5ec2 << 48, 0x5ec3 << 48, 0x5ec4 << 48];

/// The guest: secrets in x10..x13; stores [`STORED`] (x5) to the device
/// and loads x7 from it; stores x7 to its RAM one page on (a stage-2 fault
/// pkvm-host answers by donating the page) and loads it back into x1;
/// then PSCI `SYSTEM_OFF` by `hvc #0` (x1: what it read back), and the
/// `hvc #0` again in a loop ([`run_cost`] times it).
const PROGRAM: [u32; 15] = [
    movz(10, 0x5ec1, 3),
    movz(11, 0x5ec2, 3),
    movz(12, 0x5ec3, 3),
    movz(13, 0x5ec4, 3),
    movz(6, (DEV_IPA >> 16) as u32, 1),
    movz(5, STORED as u32, 0),
    str_x(5, 6, 0),
    ldr_x(7, 6, 8),
    adr(8, 0x1000 - 8 * 4),
    str_x(7, 8, 0),
    ldr_x(1, 8, 0),
    movz(0, 0x0008, 0),
    movk(0, 0x8400, 1),
    HVC0,
    0x17ff_ffff, // b .-4 (the hvc again: the timed loop)
];

const fn program_bytes() -> [u8; 60] {
    let mut b = [0u8; 60];
    let mut i = 0;
    while i < PROGRAM.len() {
        let w = PROGRAM[i].to_le_bytes();
        b[4 * i] = w[0];
        b[4 * i + 1] = w[1];
        b[4 * i + 2] = w[2];
        b[4 * i + 3] = w[3];
        i += 1;
    }
    b
}

static PROGRAM_BYTES: [u8; 60] = program_bytes();

/// What [`el1_run`]'s guest did, as the host saw it.
#[derive(Debug, Default)]
struct Outcome {
    stored: Option<u64>,
    loads: u32,
    end: super::a64::RunEnd,
}

/// Runs the vCPU through pkvm-host's run loop over `be` until it powers
/// off (or something unexpected).
fn drive(vcpu: &mut pkvm_host::Vcpu<BootPlatform, BootProcess>, be: &mut El1Backend) -> Outcome {
    let (mut stored, mut loads) = (None, 0);
    let end = super::a64::run_to_event(
        vcpu,
        be,
        |b| b.failed.is_some(),
        |vcpu, _, exit| match exit {
            VcpuExit::Mmio {
                addr, write, data, ..
            } if addr.0 & !0xfff == DEV_IPA => {
                if write {
                    stored = Some(data);
                } else {
                    loads += 1;
                    vcpu.complete_mmio(ANSWER);
                }
                true
            }
            _ => false,
        },
    );
    Outcome { stored, loads, end }
}

/// A protected VM created by pkvm-host (`INIT_VM`/`INIT_VCPU` on its first
/// run) whose vCPU the host at EL1 runs by [`VCPU_RUN`] through pkvm-host's
/// run loop: its pages donated on its faults, its device store seen as
/// the one register stored, its device load answered, its PSCI
/// `SYSTEM_OFF` emulated; its secret registers never reach the host.
pub fn el1_run(plat: &Arc<BootPlatform>, process: &Arc<BootProcess>, ctx: &HostCtx) -> bool {
    let Some(hyp) = plat.hyp() else {
        return check("vcpu-run: protected mode", false);
    };
    let Some(g) = builtin(
        plat,
        process,
        "el1-run",
        &PROGRAM_BYTES,
        4 * MIB,
        Backing::Page4K,
        true,
        None,
    ) else {
        return check("vcpu-run: VM created", false);
    };
    let mut be = El1Backend::new(ctx, hyp);
    let o = match g.vm.vcpu(0) {
        Ok(mut vcpu) => drive(&mut vcpu, &mut be),
        Err(_) => Outcome {
            end: super::a64::RunEnd {
                off: false,
                other: Some("no vCPU 0"),
            },
            ..Outcome::default()
        },
    };
    let read_back = be.seen.last().map_or(0, |r| r[5]);
    let leaked = SECRETS
        .iter()
        .filter(|s| be.seen.iter().any(|r| r.contains(s)))
        .count();
    let pages = g.vm.hyp_mapped_pages();
    let refused = g.vm.handle().is_some_and(|h| refusals(hyp, ctx, h));
    match g.vm.handle().and_then(|h| run_cost(hyp, ctx, h)) {
        Some(ns) => println!(
            "vcpu-run: VCPU_RUN round trip from the host at EL1 (the guest's hvc #0 returned to the host, mean of {COST_RUNS}): {ns} ns"
        ),
        None => println!("vcpu-run: VCPU_RUN round trip: not measured (a run failed)"),
    }
    println!(
        "vcpu-run: a protected vCPU run from the host at EL1 by VCPU_RUN through pkvm-host's run loop: {} runs; device store {:x?}, {} device load(s) answered {ANSWER:#x}, read back from its donated RAM {read_back:#x}; {pages} pages donated on its faults; powered off: {}; secret registers shown to the host: {leaked} of 4{}",
        be.seen.len(),
        o.stored,
        o.loads,
        o.end.off,
        be.failed.or(o.end.other).map_or(alloc::string::String::new(), |w| alloc::format!("; FAILED: {w}")),
    );
    let ok = check(
        "vcpu-run: run to power-off",
        o.end.off && o.end.other.is_none() && be.failed.is_none(),
    ) & check(
        "vcpu-run: the device store seen",
        o.stored == Some(STORED) && o.loads == 1,
    ) & check(
        "vcpu-run: the answer reached the guest",
        read_back == ANSWER,
    ) & check("vcpu-run: pages donated on faults", pages >= 2)
        & check("vcpu-run: no secret register shown", leaked == 0)
        & check("vcpu-run: every bad VCPU_RUN refused", refused);
    g.destroy();
    let held = held_by_hyp();
    println!(
        "vcpu-run: after teardown the hypervisor holds the registers of {held} protected vCPUs"
    );
    ok & check("vcpu-run: the torn-down VM's registers dropped", held == 0)
}

/// Protected vCPUs whose registers the hypervisor holds: [`held`] at EL2,
/// the test hook's answer for the VMM at EL1.
pub(super) fn held_by_hyp() -> usize {
    if crate::platform::el1boot::current_el() == 2 {
        return held();
    }
    super::platform::hyp_probe(super::platform::probe::HELD, 0)
        .map_or(usize::MAX, |(n, _)| n as usize)
}

pub(super) fn hvc(func: u32, args: &[u64]) -> Cmd {
    let mut regs = [0u64; 8];
    regs[0] = u64::from(func);
    regs[1..=args.len()].copy_from_slice(args);
    Cmd {
        op: op::HVC,
        regs,
        ..Cmd::default()
    }
}

/// `VCPU_RUN`s timed by [`run_cost`].
const COST_RUNS: u64 = 1000;

/// The mean round trip in nanoseconds of a `VCPU_RUN` from the host at EL1
/// whose guest exits at once (its `hvc #0` loop, each call returned with
/// `CALL_RET`): [`COST_RUNS`] calls timed at EL1. `None` if one failed.
fn run_cost(hyp: &'static BootHyp, ctx: &HostCtx, handle: u16) -> Option<u64> {
    let mut cmds = [
        hvc(id::VCPU_LOAD, &[u64::from(handle), 0]),
        Cmd {
            op: op::HVC_LOOP,
            value: COST_RUNS,
            ..hvc(VCPU_RUN, &[flags::CALL_RET])
        },
        hvc(id::VCPU_PUT, &[]),
    ];
    ctx.run(hyp, &mut cmds).ok()?;
    let r = &cmds[1].regs;
    let ok = r[0] as i64 == ret::SUCCESS && r[1] == EXIT_SYNC && Esr(r[2]).ec() == ec::HVC64;
    if !ok || cmds[2].regs[0] as i64 != ret::SUCCESS {
        return None;
    }
    let freq = crate::platform::timer::frequency().max(1);
    Some(cmds[1].result * 1_000_000_000 / freq / COST_RUNS)
}

/// Bad `VCPU_RUN`s on the powered-off vCPU of VM `handle`, each refused
/// with a status (none runs the guest): from EL2; with no vCPU loaded; a
/// second `RESET` (re-entering the protected vCPU at a PC of the host's
/// choice); `MMIO_DONE` with no MMIO access pending; `INJECT_ABORT` with
/// no abort pending (its last exit was the power-off call); unknown flags.
fn refusals(hyp: &'static BootHyp, ctx: &HostCtx, handle: u16) -> bool {
    let h = u64::from(handle);
    let mut from_el2 = [0u64; 8];
    from_el2[0] = u64::from(VCPU_RUN);
    super::platform::hyp_call(Some(hyp), start::cpu_index(), &mut from_el2);
    let mut cmds = [
        hvc(VCPU_RUN, &[]),
        hvc(id::VCPU_LOAD, &[h, 0]),
        hvc(VCPU_RUN, &[flags::RESET, super::guest::GUEST_RAM, 0]),
        hvc(VCPU_RUN, &[flags::MMIO_DONE, 0]),
        hvc(VCPU_RUN, &[flags::INJECT_ABORT]),
        hvc(VCPU_RUN, &[16]),
        hvc(id::VCPU_PUT, &[]),
    ];
    if ctx.run(hyp, &mut cmds).is_err() {
        return false;
    }
    let st = |c: &Cmd| c.regs[0] as i64;
    let statuses = [
        from_el2[0] as i64,
        st(&cmds[0]),
        st(&cmds[2]),
        st(&cmds[3]),
        st(&cmds[4]),
        st(&cmds[5]),
    ];
    println!(
        "vcpu-run: bad VCPU_RUNs (from EL2, no vCPU loaded, a second RESET, MMIO_DONE with no access pending, INJECT_ABORT with no abort pending, unknown flags): statuses {statuses:?}"
    );
    st(&cmds[1]) == ret::SUCCESS
        && st(&cmds[6]) == ret::SUCCESS
        && statuses.iter().all(|&s| s != ret::SUCCESS)
}
