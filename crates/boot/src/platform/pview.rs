//! `HOST_RUN` for a vCPU of a protected VM: the hypervisor keeps its
//! registers and shows the host only what the exit needs (pKVM's hyp
//! vCPU; [`super::hostrun`] calls [`enter`] and [`leave`] around the run).
//!
//! The state of each protected vCPU the host runs lives in a slot in the
//! hypervisor's own memory ([`super::hypmem`]), keyed by (VM handle, vCPU
//! index), created at its first run and dropped when pkvm-hyp initialises
//! the vCPU again or tears its VM down ([`after_host_call`]), so no VM
//! inherits another's registers.
//!
//! What the host gets back in the run block ([`hide`]): the exit's ESR,
//! the fault's IPA in place of `FAR_EL2` (never the guest's VA) and
//! `HPFAR_EL2`; for an MMIO store (data abort with a syndrome, WnR) the
//! one register stored; for a trapped system-register write (EC 0x18) its
//! Rt; for an HVC/SMC x0..x3 (PSCI and report arguments); the virtual
//! timer and the GIC CPU interface (the host's vGIC and timer emulation
//! own those, as pKVM shares them); its own inputs (`CTR_EL0`'s fast
//! value, the debug slot it computed); zeros everywhere else, the PC
//! included.
//!
//! What the next run takes from the host ([`merge`]): the GIC CPU
//! interface (validated by `hostrun::check`), `CNTVOFF`, the debug slot,
//! `CTR_EL0`'s fast value; and, for the exit it was shown, the emulation's
//! results: a PC of 4 (the shown 0 stepped once, as the host's emulation
//! does) steps the guest's PC past an MMIO access, system-register access,
//! SMC or WFI/WFE, and then an MMIO load's or system-register read's Rt
//! takes the host's value; an HVC/SMC's x0..x3 take the host's x0..x3; an
//! `ESR_EL1` the host set (its exception injection on the shown state) is
//! a request: an UNDEF (EC 0) or, after a stage-2 abort, a synchronous
//! external abort at the faulting address the hypervisor kept, both
//! injected by the hypervisor into the real state. Everything else the
//! host writes is ignored. A whole state is taken from the host only at a
//! reset: a vCPU's first run, or a run with [`super::hostrun::FLAG_RESET`]
//! (the host's PSCI `CPU_ON` or VM reset; pKVM too takes a protected
//! vCPU's initial state from the host), which replaces everything.

use pkvm_arch::esr::bits::{ISV, WNR};
use pkvm_arch::esr::{ec, fault_ipa, Esr};
use pkvm_sync::{LockClass, SpinLock};
use pkvm_sysreg::traps::TrapControls;
use pkvm_sysreg::{host_abort_esr, inject_sync, inject_undef};

use super::hostrun::{Refused, RunBlock, FLAG_RESET};
use super::hypmem;
use super::switch::{El1Sysregs, Exit, VcpuState, EXIT_SYNC, PSTATE_EL1H_MASKED, SCTLR_EL1_RESET};

/// Protected vCPUs whose registers `HOST_RUN` holds at once.
pub const SLOTS: usize = 32;

/// (VM handle, vCPU index).
pub type Key = (u16, u8);

/// `PSTATE.SS` (software step), cleared with a PC step.
const PSTATE_SS: u64 = 1 << 21;

/// The exit the host was last shown and may complete.
#[derive(Clone, Copy, Debug)]
struct Last {
    kind: u64,
    esr: u64,
    far: u64,
}

/// Where the guest lets a vCPU (re)start: a PC, x0..x3 and `SCTLR_EL1`
/// (only its reset value and the endianness bit differ between starts).
#[derive(Clone, Copy, Debug, Default)]
struct Start {
    pc: u64,
    x: [u64; 4],
    sctlr: u64,
}

/// A protected vCPU as `HOST_RUN` holds it.
#[derive(Debug)]
pub struct PVcpu {
    st: VcpuState,
    last: Option<Last>,
    /// Its first run's start (the VM's `SYSTEM_RESET` goes back to it).
    init: Start,
    /// A start the guest asked for (a sibling's `CPU_ON` naming this vCPU,
    /// or a `SYSTEM_RESET` of its VM): the only reset the host may run.
    pending: Option<Start>,
    /// `pending` came from a `CPU_ON`: dropped if the vCPU runs without
    /// that reset (it was on: the host did not honour the call).
    pending_on: bool,
    /// Off as its guest saw it: since its own `CPU_OFF` or its VM's
    /// `SYSTEM_RESET`, until its next run. Only then may a `CPU_ON` name
    /// it (pKVM's power state of a protected vCPU).
    off: bool,
    /// Its first run's trap controls (`HCR`/`CPTR`/`MDCR`/`CNTHCTL`/
    /// `MPAM2`): every later run must pass the same.
    traps: Option<TrapControls>,
}

/// The slots' owners (index = slot).
#[link_section = ".data.hyp.pview_keys"]
static KEYS: SpinLock<[Option<Key>; SLOTS]> = SpinLock::new([None; SLOTS], LockClass::Leaf);
/// The slots, in the hypervisor's own memory once [`init`] placed them.
#[link_section = ".data.hyp.pview_slots"]
static VCPUS: SpinLock<Option<&'static [SpinLock<PVcpu>]>> = SpinLock::new(None, LockClass::Leaf);

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 2] {
    [
        ("pview::KEYS", core::ptr::from_ref(&KEYS) as u64),
        ("pview::VCPUS", core::ptr::from_ref(&VCPUS) as u64),
    ]
}

/// Places the slots in the hypervisor's own memory (`init_hyp`, before
/// `FINALIZE`); `false` if there is no room.
pub fn init() -> bool {
    let mut v = VCPUS.lock();
    if v.is_none() {
        *v = hypmem::place_slice(SLOTS, || {
            SpinLock::new(
                PVcpu {
                    st: VcpuState::new(0, [0; 4], 0),
                    last: None,
                    init: Start::default(),
                    pending: None,
                    pending_on: false,
                    off: false,
                    traps: None,
                },
                LockClass::Leaf,
            )
        });
    }
    v.is_some()
}

/// Bytes [`init`] takes from the hypervisor's own memory.
pub const fn bytes() -> u64 {
    (SLOTS * size_of::<SpinLock<PVcpu>>()) as u64
}

fn slots() -> Option<&'static [SpinLock<PVcpu>]> {
    *VCPUS.lock()
}

/// Protected vCPUs whose registers `HOST_RUN` holds now.
pub fn held() -> usize {
    KEYS.lock().iter().filter(|k| k.is_some()).count()
}

/// After pkvm-hyp answered host call `func` (arguments `args`) with
/// `status`: a vCPU initialised again, or the vCPUs of a VM being torn
/// down, lose their slot (its registers are wiped when it is next taken).
pub fn after_host_call(func: u64, args: [u64; 2], status: u64) {
    use pkvm_hyp::hvc::{id, ret};
    if status as i64 != ret::SUCCESS {
        return;
    }
    let gone: &dyn Fn(&Key) -> bool = match func as u32 {
        id::INIT_VCPU => &|k| u64::from(k.0) == args[0] && u64::from(k.1) == args[1],
        id::START_TEARDOWN => &|k| u64::from(k.0) == args[0],
        _ => return,
    };
    for k in KEYS.lock().iter_mut() {
        if k.as_ref().is_some_and(gone) {
            *k = None;
        }
    }
}

/// A slot taken for one run.
#[derive(Debug)]
pub struct Held {
    key: Key,
    slot: usize,
}

/// Before the run of the protected vCPU `key` (the one pkvm-hyp has
/// loaded on this CPU) with the host's checked block `b` (in the
/// hypervisor's buffer): replaces `b.st` with the vCPU's real state, the
/// host's allowed inputs merged in ([`merge`]), or at a reset takes the
/// host's state whole. Refused (nothing changed) when no slot is free.
///
/// # Errors
/// [`Refused::Slots`]: every slot is held by another vCPU;
/// [`Refused::Reset`]: a reset ([`FLAG_RESET`]) of a vCPU that ran and
/// whose guest asked for no start of it; [`Refused::TrapsChanged`]: trap
/// controls other than its first run's.
pub fn enter(key: Key, b: &mut RunBlock) -> Result<Held, Refused> {
    let slots = slots().ok_or(Refused::Slots)?;
    let (slot, fresh) = {
        let mut keys = KEYS.lock();
        match keys.iter().position(|k| *k == Some(key)) {
            Some(i) => (i, false),
            None => {
                let i = keys
                    .iter()
                    .position(Option::is_none)
                    .ok_or(Refused::Slots)?;
                keys[i] = Some(key);
                (i, true)
            }
        }
    };
    let mut v = slots[slot].lock();
    if !fresh && v.traps != Some(b.vm.traps) {
        // The host may not weaken (or change) them after the first run.
        return Err(Refused::TrapsChanged);
    }
    if fresh {
        // The host's state, whole: the vCPU's first run (as pKVM takes a
        // protected vCPU's initial state from the host).
        v.last = None;
        v.pending = None;
        v.off = false;
        v.traps = Some(b.vm.traps);
        v.init = Start {
            pc: b.st.regs.pc,
            x: [
                b.st.regs.x[0],
                b.st.regs.x[1],
                b.st.regs.x[2],
                b.st.regs.x[3],
            ],
            sctlr: b.st.sys.sctlr,
        };
    } else if b.vm.flags & FLAG_RESET != 0 {
        // A vCPU that ran restarts only where its guest asked.
        let start = v.pending.ok_or(Refused::Reset)?;
        v.pending = None;
        v.off = false;
        v.last = None;
        let host = Input::of(&b.st);
        b.st = reset_state(&start, v.st.vmpidr, &host);
    } else {
        v.off = false;
        if v.pending_on {
            v.pending = None;
        }
        let last = v.last.take();
        let host = Input::of(&b.st);
        b.st = v.st;
        merge(&mut b.st, &host, last);
    }
    Ok(Held { key, slot })
}

/// After the run: keeps the vCPU's state and the exit in its slot and
/// leaves in `b` only the host's view of it ([`hide`]).
pub fn leave(h: Held, b: &mut RunBlock) {
    let exit = b.exit.exit();
    if let Some(slots) = slots() {
        // Dropped meanwhile (a teardown on another CPU): nothing to keep.
        if KEYS.lock()[h.slot] == Some(h.key) {
            let mut v = slots[h.slot].lock();
            v.st = b.st;
            v.last = Some(Last {
                kind: exit.kind,
                esr: exit.esr,
                far: exit.far,
            });
        }
        if exit.kind == EXIT_SYNC && matches!(Esr(exit.esr).ec(), ec::HVC64 | ec::SMC64) {
            guest_psci(slots, h.key, &b.st);
        }
    }
    hide(&mut b.st, &exit);
    if exit.kind == EXIT_SYNC && matches!(Esr(exit.esr).ec(), ec::IABT_LOW | ec::DABT_LOW) {
        b.exit.far = fault_ipa(exit.hpfar, exit.far).0;
    } else {
        b.exit.far = 0;
    }
}

/// PSCI function IDs whose starts the hypervisor records.
mod fnid {
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON_32: u32 = 0x8400_0003;
    pub const CPU_ON_64: u32 = 0xc400_0003;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const SYSTEM_RESET2_32: u32 = 0x8400_0012;
    pub const SYSTEM_RESET2_64: u32 = 0xc400_0012;
}

/// `MPIDR_EL1`'s affinity fields (Aff3, Aff2..Aff0).
const MPIDR_AFF: u64 = 0xff_00ff_ffff;
/// `SCTLR_EL1.EE`: a `CPU_ON` target starts with its caller's endianness.
const SCTLR_EE: u64 = 1 << 25;

/// The guest's HVC/SMC with registers `st` from the vCPU `key`: its
/// `CPU_OFF` marks it off; a `CPU_ON` records a pending start (its entry,
/// its context in x0) for the VM's vCPU with that affinity if it is off;
/// a `SYSTEM_RESET`/`RESET2` marks every vCPU of the VM off with its
/// first run's start pending. Whether the host then honours the call is
/// its business; it may restart those vCPUs only there ([`enter`]).
fn guest_psci(slots: &[SpinLock<PVcpu>], key: Key, st: &VcpuState) {
    enum Call {
        Off,
        On(Start, u64),
        Reset,
    }
    let x = &st.regs.x;
    let f = x[0] as u32;
    let narrow = |v: u64| {
        if f & 0x4000_0000 == 0 {
            v & 0xffff_ffff
        } else {
            v
        }
    };
    let call = match f {
        fnid::CPU_OFF => Call::Off,
        fnid::CPU_ON_32 | fnid::CPU_ON_64 => Call::On(
            Start {
                pc: narrow(x[2]),
                x: [narrow(x[3]), 0, 0, 0],
                sctlr: SCTLR_EL1_RESET | (st.sys.sctlr & SCTLR_EE),
            },
            narrow(x[1]) & MPIDR_AFF,
        ),
        fnid::SYSTEM_RESET | fnid::SYSTEM_RESET2_32 | fnid::SYSTEM_RESET2_64 => Call::Reset,
        _ => return,
    };
    let keys: [Option<Key>; SLOTS] = *KEYS.lock();
    for (slot, k) in slots.iter().zip(keys) {
        let Some(k) = k.filter(|k| k.0 == key.0) else {
            continue;
        };
        let mut v = slot.lock();
        match call {
            Call::Off if k == key => v.off = true,
            Call::On(start, aff) if v.off && v.st.vmpidr & MPIDR_AFF == aff => {
                v.pending = Some(start);
                v.pending_on = true;
            }
            Call::Reset => {
                v.pending = Some(v.init);
                v.pending_on = false;
                v.off = true;
            }
            _ => {}
        }
    }
}

/// A restarted vCPU's state: `start`'s PC, x0..x3 and `SCTLR_EL1`, its
/// kept `vmpidr`, the host's GIC CPU interface, timer offset, debug slot
/// and `CTR_EL0` fast value (as every run takes them), EL1h with DAIF
/// masked and every other register at its reset value.
fn reset_state(start: &Start, vmpidr: u64, host: &Input) -> VcpuState {
    let mut st = VcpuState::new(start.pc, start.x, 0);
    st.vmpidr = vmpidr;
    st.regs.pstate = PSTATE_EL1H_MASKED;
    st.sys.sctlr = start.sctlr;
    st.gic = host.gic;
    st.timer.voff = host.voff;
    st.debug = host.debug;
    st.regs.ctr_el0 = host.ctr_el0;
    st.regs.ctr_reads = host.ctr_reads;
    st
}

/// Turns the vCPU's state `st` after `exit` into what the host sees of
/// it (in place: the hypervisor's buffer, copied to the host's block
/// next): the GIC CPU interface, the timer, the debug slot and the
/// `CTR_EL0` fast value and count stay; of the general registers only
/// those the exit needs; everything else zero.
pub fn hide(st: &mut VcpuState, exit: &Exit) {
    let x = st.regs.x;
    let r = &mut st.regs;
    r.x = [0; 31];
    r.pc = 0;
    r.pstate = 0;
    r.v = [0; 32];
    r.fpsr = 0;
    r.fpcr = 0;
    st.sys = El1Sysregs::default();
    st.pac = Default::default();
    st.vmpidr = 0;
    st.opt = Default::default();
    if exit.kind != EXIT_SYNC {
        return;
    }
    let rt = ((exit.esr >> 16) & 0x1f) as usize;
    let sys_rt = ((exit.esr >> 5) & 0x1f) as usize;
    let r = &mut st.regs;
    match Esr(exit.esr).ec() {
        ec::DABT_LOW if exit.esr & (ISV | WNR) == ISV | WNR && rt < 31 => r.x[rt] = x[rt],
        // ISS bit 0 (Direction) clear: a write, the host needs Rt's value.
        ec::SYS64 if exit.esr & 1 == 0 && sys_rt < 31 => r.x[sys_rt] = x[sys_rt],
        ec::HVC64 | ec::SMC64 => r.x[..4].copy_from_slice(&x[..4]),
        _ => {}
    }
}

/// What the next run may take from the host's edited view.
struct Input {
    gic: super::switch::GicCpu,
    voff: u64,
    debug: super::switch::DebugSlot,
    ctr_el0: u64,
    ctr_reads: u64,
    x: [u64; 31],
    pc: u64,
    esr_el1: u64,
}

impl Input {
    fn of(st: &VcpuState) -> Input {
        Input {
            gic: st.gic,
            voff: st.timer.voff,
            debug: st.debug,
            ctr_el0: st.regs.ctr_el0,
            ctr_reads: st.regs.ctr_reads,
            x: st.regs.x,
            pc: st.regs.pc,
            esr_el1: st.sys.esr,
        }
    }
}

/// Merges into the vCPU's real state `st` what the host may set in its
/// edited view `host` after the exit `last` it was shown.
fn merge(st: &mut VcpuState, host: &Input, last: Option<Last>) {
    st.gic = host.gic;
    st.timer.voff = host.voff;
    st.debug = host.debug;
    st.regs.ctr_el0 = host.ctr_el0;
    st.regs.ctr_reads = host.ctr_reads;
    let Some(last) = last.filter(|l| l.kind == EXIT_SYNC) else {
        return;
    };
    if host.esr_el1 != 0 {
        inject(st, host.esr_el1, &last);
        return;
    }
    let class = Esr(last.esr).ec();
    if matches!(class, ec::HVC64 | ec::SMC64) {
        st.regs.x[..4].copy_from_slice(&host.x[..4]);
    }
    let steppable = match class {
        ec::DABT_LOW => last.esr & ISV != 0,
        ec::SYS64 | ec::SMC64 | ec::WFX => true,
        _ => false,
    };
    if !steppable || host.pc != 4 {
        return;
    }
    let rt = ((last.esr >> 16) & 0x1f) as usize;
    let sys_rt = ((last.esr >> 5) & 0x1f) as usize;
    match class {
        ec::DABT_LOW if last.esr & WNR == 0 && rt < 31 => {
            st.regs.x[rt] = loaded(last.esr, host.x[rt]);
        }
        ec::SYS64 if last.esr & 1 == 1 && sys_rt < 31 => st.regs.x[sys_rt] = host.x[sys_rt],
        _ => {}
    }
    st.regs.pc = st.regs.pc.wrapping_add(4);
    st.regs.pstate &= !PSTATE_SS;
}

/// The value an MMIO load with syndrome `esr` leaves in its register:
/// sized by SAS, sign-extended by SSE, cut to 32 bits unless SF.
fn loaded(esr: u64, value: u64) -> u64 {
    let bits = 8u32 << ((esr >> 22) & 3);
    let mut v = if bits == 64 {
        value
    } else {
        value & ((1u64 << bits) - 1)
    };
    if esr & (1 << 21) != 0 && bits < 64 && (v >> (bits - 1)) & 1 == 1 {
        v |= !0u64 << bits;
    }
    if esr & (1 << 15) == 0 {
        v &= 0xffff_ffff;
    }
    v
}

/// The host's injection request (`ESR_EL1` it set on the view): an UNDEF
/// (EC 0), or after a stage-2 abort an external abort (an abort class);
/// anything else is ignored. Done on the real state by the hypervisor.
fn inject(st: &mut VcpuState, host_esr: u64, last: &Last) {
    let mut s = st.el1_state();
    let abort_exit = matches!(Esr(last.esr).ec(), ec::IABT_LOW | ec::DABT_LOW);
    match Esr(host_esr).ec() {
        ec::UNKNOWN => inject_undef(&mut s),
        ec::IABT_LOW | ec::IABT_CUR | ec::DABT_LOW | ec::DABT_CUR if abort_exit => {
            let mut syn = host_abort_esr(last.esr);
            if st.regs.pstate & 0xf == 0 {
                syn &= !(1 << 26);
            }
            inject_sync(&mut s, syn);
            st.sys.far = last.far;
        }
        _ => return,
    }
    st.set_el1_state(&s);
}
