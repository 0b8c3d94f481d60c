//! The virtual PMUv3 of one vCPU: a plain state machine behind
//! [`crate::Hook::Pmu`], shared by both tiers.
//!
//! Every PMU register access traps (`MDCR_EL2.TPM`/`TPMCR`), so the
//! guest only ever sees this model, never the physical PMU. Events in: a
//! trapped access ([`VirtPmu::read`], [`VirtPmu::write`], or
//! [`handle_pmu_trap`] for a [`HookCall`]) and a guest run slice
//! ([`VirtPmu::advance`]: the cycles the vCPU spent at EL1/EL0 between one
//! entry and the next exit). Out: register values and the overflow
//! interrupt line ([`VirtPmu::irq_level`], PPI [`PMU_PPI`]).
//!
//! What counts:
//! - The cycle counter (`PMCCNTR_EL0`, 64 bits; overflow at bit 32 or, with
//!   `PMCR_EL0.LC`, bit 64; `PMCR_EL0.D` divides by 64) and event counters
//!   programmed with `CPU_CYCLES` (0x11) count only the cycles of their own
//!   vCPU's run slices, so time spent in the hypervisor, in another vCPU
//!   or in another VM is never counted; counting at EL2 never happens
//!   (`NSH` is RES0: the VM has no EL2).
//! - `SW_INCR` (0x00) counters count exactly one per `PMSWINC_EL0` write
//!   with their bit set, when enabled (`PMCR_EL0.E` and `PMCNTENSET`).
//! - Other events are stored as programmed and do not count (`PMCEID0/1`
//!   advertise only `SW_INCR` and `CPU_CYCLES`).
//! - Event counters are 32 bits (PMUv3 up to v3p4, no `PMCR_EL0.LP`); a
//!   wrap sets the counter's `PMOVSSET` bit.
//! - Filters: `PMEVTYPER<n>_EL0.P`/`U` and `PMCCFILTR_EL0.P`/`U` apply to
//!   a slice by the exception level the vCPU was at when it exited (a
//!   sample: the model is not told how a slice divided between EL1 and
//!   EL0); `NSK`, `NSU`, `NSH`, `M`, `MT` are RES0.
//!
//! Invariants: a counter or flag beyond `PMCR_EL0.N` (other than the
//! cycle counter's bit 31) is never set; every guest value is masked to
//! its register's writable bits; nothing a guest passes panics.

use crate::dispatch::{Done, HookCall, Outcome};
use crate::enc::{Direction, Encoding};
use crate::table::REGISTERS;

/// The PMU overflow interrupt: PPI 7 (INTID 23), as on QEMU virt and in
/// the VM's device tree.
pub const PMU_PPI: u32 = 23;

/// The cycle counter's bit in `PMCNTENSET/CLR`, `PMOVSSET/CLR`, `PMINTENSET/CLR`.
pub const CYCLE_BIT: u32 = 1 << 31;

/// Event numbers the model counts.
pub mod event {
    /// Software increment: one per `PMSWINC_EL0` write.
    pub const SW_INCR: u16 = 0x00;
    /// Instructions architecturally executed (stored, not counted).
    pub const INST_RETIRED: u16 = 0x08;
    /// Cycles.
    pub const CPU_CYCLES: u16 = 0x11;
}

/// `PMCR_EL0` bits.
pub mod pmcr {
    /// Enable.
    pub const E: u64 = 1 << 0;
    /// Event counter reset (write-only, reads as zero).
    pub const P: u64 = 1 << 1;
    /// Cycle counter reset (write-only, reads as zero).
    pub const C: u64 = 1 << 2;
    /// Clock divider: the cycle counter counts every 64th cycle.
    pub const D: u64 = 1 << 3;
    /// Disable cycle counting where event counting is prohibited.
    pub const DP: u64 = 1 << 5;
    /// Long cycle counter: overflow at bit 64 instead of bit 32.
    pub const LC: u64 = 1 << 6;
    /// N (15:11): the number of event counters.
    pub const N_SHIFT: u32 = 11;
    /// The bits a guest writes and reads back (X, export, is RAZ/WI).
    pub const WRITABLE: u64 = E | D | DP | LC;
}

/// `PMEVTYPER<n>_EL0` / `PMCCFILTR_EL0` bits.
pub mod evtyper {
    /// Do not count at EL1.
    pub const P: u64 = 1 << 31;
    /// Do not count at EL0.
    pub const U: u64 = 1 << 30;
    /// The event number (PMUv3p1: 16 bits).
    pub const EVENT: u64 = 0xffff;
    /// The bits a guest writes and reads back in `PMEVTYPER<n>_EL0`.
    pub const WRITABLE: u64 = P | U | EVENT;
    /// The bits a guest writes and reads back in `PMCCFILTR_EL0`.
    pub const CCFILTR_WRITABLE: u64 = P | U;
}

/// `PMUSERENR_EL0` bits the guest may set: EN, SW, CR, ER.
pub const PMUSERENR_WRITABLE: u64 = 0xf;

/// `PMCEID0_EL0`: the common events counted (`SW_INCR`, `CPU_CYCLES`).
pub const PMCEID0: u64 = (1 << event::SW_INCR) | (1 << event::CPU_CYCLES);

/// The most event counters of a PMUv3.
pub const MAX_COUNTERS: usize = 31;

/// A PMU register, decoded from its encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmuReg {
    /// `PMCR_EL0`.
    Pmcr,
    /// `PMCNTENSET_EL0` (write 1 to set).
    CntenSet,
    /// `PMCNTENCLR_EL0` (write 1 to clear).
    CntenClr,
    /// `PMOVSCLR_EL0` (write 1 to clear).
    OvsClr,
    /// `PMSWINC_EL0` (write-only).
    SwInc,
    /// `PMSELR_EL0`.
    Selr,
    /// `PMCEID0_EL0` (read-only).
    Ceid0,
    /// `PMCEID1_EL0` (read-only).
    Ceid1,
    /// `PMCCNTR_EL0`.
    Ccntr,
    /// `PMXEVTYPER_EL0`: the type of the counter `PMSELR_EL0` selects.
    XevTyper,
    /// `PMXEVCNTR_EL0`: the counter `PMSELR_EL0` selects.
    XevCntr,
    /// `PMUSERENR_EL0`.
    UserEnr,
    /// `PMINTENSET_EL1` (write 1 to set).
    IntenSet,
    /// `PMINTENCLR_EL1` (write 1 to clear).
    IntenClr,
    /// `PMOVSSET_EL0` (write 1 to set).
    OvsSet,
    /// `PMMIR_EL1` (read-only).
    Mmir,
    /// `PMCCFILTR_EL0`.
    CcFiltr,
    /// `PMEVCNTR<n>_EL0`.
    EvCntr(u8),
    /// `PMEVTYPER<n>_EL0`.
    EvTyper(u8),
}

impl PmuReg {
    /// The PMU register with encoding `enc`, if it is one.
    pub const fn decode(enc: Encoding) -> Option<PmuReg> {
        if enc.op0 != 3 {
            return None;
        }
        let n = ((enc.crm & 3) << 3) | enc.op2;
        Some(match (enc.op1, enc.crn, enc.crm, enc.op2) {
            (3, 9, 12, 0) => PmuReg::Pmcr,
            (3, 9, 12, 1) => PmuReg::CntenSet,
            (3, 9, 12, 2) => PmuReg::CntenClr,
            (3, 9, 12, 3) => PmuReg::OvsClr,
            (3, 9, 12, 4) => PmuReg::SwInc,
            (3, 9, 12, 5) => PmuReg::Selr,
            (3, 9, 12, 6) => PmuReg::Ceid0,
            (3, 9, 12, 7) => PmuReg::Ceid1,
            (3, 9, 13, 0) => PmuReg::Ccntr,
            (3, 9, 13, 1) => PmuReg::XevTyper,
            (3, 9, 13, 2) => PmuReg::XevCntr,
            (3, 9, 14, 0) => PmuReg::UserEnr,
            (0, 9, 14, 1) => PmuReg::IntenSet,
            (0, 9, 14, 2) => PmuReg::IntenClr,
            (3, 9, 14, 3) => PmuReg::OvsSet,
            (0, 9, 14, 6) => PmuReg::Mmir,
            (3, 14, 15, 7) => PmuReg::CcFiltr,
            (3, 14, 8..=11, _) => PmuReg::EvCntr(n),
            (3, 14, 12..=15, _) => PmuReg::EvTyper(n),
            _ => return None,
        })
    }
}

/// An access the architecture answers with an UNDEF (a write to a
/// read-only register, a read of `PMSWINC_EL0`, a counter index at or
/// beyond `PMCR_EL0.N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Undef;

/// The exception level a run slice is attributed to (for the filters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEl {
    /// EL0.
    El0,
    /// EL1.
    El1,
}

impl GuestEl {
    /// The level of a saved `PSTATE`/`SPSR` (M\[3:2\]: 0 is EL0).
    pub const fn of_pstate(pstate: u64) -> GuestEl {
        if (pstate >> 2) & 3 == 0 {
            GuestEl::El0
        } else {
            GuestEl::El1
        }
    }
}

/// One vCPU's virtual PMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtPmu {
    /// Event counters (`PMCR_EL0.N`), at most [`MAX_COUNTERS`].
    n: u8,
    /// `PMCR_EL0`'s stored bits ([`pmcr::WRITABLE`]).
    pmcr: u64,
    cnten: u32,
    inten: u32,
    ovs: u32,
    selr: u64,
    userenr: u64,
    ccfiltr: u64,
    ccnt: u64,
    evtype: [u64; MAX_COUNTERS],
    evcnt: [u32; MAX_COUNTERS],
    /// Cycles not yet counted under `PMCR_EL0.D` (0..64).
    prescale: u64,
}

impl VirtPmu {
    /// A PMU with `n` event counters (capped at [`MAX_COUNTERS`]), at reset.
    pub fn new(n: u8) -> VirtPmu {
        VirtPmu {
            n: n.min(MAX_COUNTERS as u8),
            pmcr: pmcr::LC,
            cnten: 0,
            inten: 0,
            ovs: 0,
            selr: 0,
            userenr: 0,
            ccfiltr: 0,
            ccnt: 0,
            evtype: [0; MAX_COUNTERS],
            evcnt: [0; MAX_COUNTERS],
            prescale: 0,
        }
    }

    /// Back to reset (vCPU reset): counters, flags and controls zero,
    /// `PMCR_EL0.LC` set (the VM has no AArch32, as KVM resets it).
    pub fn reset(&mut self) {
        *self = VirtPmu::new(self.n);
    }

    /// `PMCR_EL0.N`.
    pub fn counters(&self) -> u8 {
        self.n
    }

    /// The bits of the implemented counters in the set/clear registers.
    pub fn counter_mask(&self) -> u32 {
        CYCLE_BIT | ((1u32 << self.n) - 1)
    }

    fn enabled(&self) -> bool {
        self.pmcr & pmcr::E != 0
    }

    /// `PMUSERENR_EL0` as the guest set it (the world switch loads it into
    /// the hardware register, which only gates EL0 accesses: they trap to
    /// the guest's EL1 as it asked, or on to EL2 and this model).
    pub fn userenr(&self) -> u64 {
        self.userenr
    }

    /// Reads `reg`.
    ///
    /// # Errors
    /// [`Undef`] for a write-only register or a counter index at or beyond N.
    pub fn read(&self, reg: PmuReg) -> Result<u64, Undef> {
        Ok(match reg {
            PmuReg::Pmcr => self.pmcr | (u64::from(self.n) << pmcr::N_SHIFT),
            PmuReg::CntenSet | PmuReg::CntenClr => u64::from(self.cnten),
            PmuReg::IntenSet | PmuReg::IntenClr => u64::from(self.inten),
            PmuReg::OvsSet | PmuReg::OvsClr => u64::from(self.ovs),
            PmuReg::SwInc => return Err(Undef),
            PmuReg::Selr => self.selr,
            PmuReg::Ceid0 => PMCEID0,
            PmuReg::Ceid1 | PmuReg::Mmir => 0,
            PmuReg::Ccntr => self.ccnt,
            PmuReg::XevTyper => self.read(self.selected_type()?)?,
            PmuReg::XevCntr => self.read(PmuReg::EvCntr(self.selected_counter()?))?,
            PmuReg::UserEnr => self.userenr,
            PmuReg::CcFiltr => self.ccfiltr,
            PmuReg::EvCntr(i) => u64::from(self.evcnt[self.index(i)?]),
            PmuReg::EvTyper(i) => self.evtype[self.index(i)?],
        })
    }

    /// Writes `value` to `reg`.
    ///
    /// # Errors
    /// [`Undef`] for a read-only register or a counter index at or beyond N.
    pub fn write(&mut self, reg: PmuReg, value: u64) -> Result<(), Undef> {
        let bits = (value as u32) & self.counter_mask();
        match reg {
            PmuReg::Pmcr => self.write_pmcr(value),
            PmuReg::CntenSet => self.cnten |= bits,
            PmuReg::CntenClr => self.cnten &= !bits,
            PmuReg::IntenSet => self.inten |= bits,
            PmuReg::IntenClr => self.inten &= !bits,
            PmuReg::OvsSet => self.ovs |= bits,
            PmuReg::OvsClr => self.ovs &= !bits,
            PmuReg::SwInc => self.sw_incr(value),
            PmuReg::Selr => self.selr = value & 0x1f,
            PmuReg::Ceid0 | PmuReg::Ceid1 | PmuReg::Mmir => return Err(Undef),
            PmuReg::Ccntr => self.ccnt = value,
            PmuReg::XevTyper => return self.write(self.selected_type()?, value),
            PmuReg::XevCntr => return self.write(PmuReg::EvCntr(self.selected_counter()?), value),
            PmuReg::UserEnr => self.userenr = value & PMUSERENR_WRITABLE,
            PmuReg::CcFiltr => self.ccfiltr = value & evtyper::CCFILTR_WRITABLE,
            // Bits 63:32 are RES0 (32-bit event counters).
            PmuReg::EvCntr(i) => self.evcnt[self.index(i)?] = value as u32,
            PmuReg::EvTyper(i) => self.evtype[self.index(i)?] = value & evtyper::WRITABLE,
        }
        Ok(())
    }

    fn index(&self, i: u8) -> Result<usize, Undef> {
        if i < self.n {
            Ok(usize::from(i))
        } else {
            Err(Undef)
        }
    }

    /// The type register `PMSELR_EL0.SEL` selects (31: `PMCCFILTR_EL0`).
    fn selected_type(&self) -> Result<PmuReg, Undef> {
        match self.selr as u8 {
            31 => Ok(PmuReg::CcFiltr),
            s if s < self.n => Ok(PmuReg::EvTyper(s)),
            _ => Err(Undef),
        }
    }

    /// The event counter `PMSELR_EL0.SEL` selects (31, the cycle counter,
    /// is CONSTRAINED UNPREDICTABLE for `PMXEVCNTR_EL0`: UNDEF, as KVM).
    fn selected_counter(&self) -> Result<u8, Undef> {
        let s = self.selr as u8;
        if s < self.n {
            Ok(s)
        } else {
            Err(Undef)
        }
    }

    fn write_pmcr(&mut self, value: u64) {
        if value & pmcr::P != 0 {
            self.evcnt = [0; MAX_COUNTERS];
        }
        if value & pmcr::C != 0 {
            self.ccnt = 0;
        }
        self.pmcr = value & pmcr::WRITABLE;
    }

    /// Whether event counter `i` counts `event` (enabled and programmed so).
    fn counts(&self, i: usize, ev: u16) -> bool {
        self.enabled() && self.cnten & (1 << i) != 0 && self.evtype[i] as u16 == ev
    }

    /// Adds `by` to event counter `i`; a wrap of its 32 bits sets its
    /// overflow flag.
    fn add_event(&mut self, i: usize, by: u64) {
        let sum = u64::from(self.evcnt[i]).wrapping_add(by);
        if sum > u64::from(u32::MAX) || by > u64::from(u32::MAX) {
            self.ovs |= 1 << i;
        }
        self.evcnt[i] = sum as u32;
    }

    /// A `PMSWINC_EL0` write: every enabled `SW_INCR` counter whose bit is
    /// set counts one.
    fn sw_incr(&mut self, value: u64) {
        for i in 0..usize::from(self.n) {
            if value & (1 << i) != 0 && self.counts(i, event::SW_INCR) {
                self.add_event(i, 1);
            }
        }
    }

    /// A guest run slice of `cycles` cycles, attributed to `el`: the cycle
    /// counter and the `CPU_CYCLES` counters advance (when enabled and not
    /// filtered out at `el`), setting overflow flags on a wrap.
    pub fn advance(&mut self, cycles: u64, el: GuestEl) {
        if !self.enabled() || cycles == 0 {
            return;
        }
        if self.cnten & CYCLE_BIT != 0 && !filtered(self.ccfiltr, el) {
            let ticks = if self.pmcr & pmcr::D != 0 {
                let t = self.prescale + cycles;
                self.prescale = t % 64;
                t / 64
            } else {
                cycles
            };
            self.add_cycles(ticks);
        }
        for i in 0..usize::from(self.n) {
            if self.counts(i, event::CPU_CYCLES) && !filtered(self.evtype[i], el) {
                self.add_event(i, cycles);
            }
        }
    }

    fn add_cycles(&mut self, ticks: u64) {
        let old = self.ccnt;
        let new = old.wrapping_add(ticks);
        let wrapped = if self.pmcr & pmcr::LC != 0 {
            new < old
        } else {
            (old & 0xffff_ffff) + (ticks & 0xffff_ffff) > 0xffff_ffff || ticks >> 32 != 0
        };
        if wrapped {
            self.ovs |= CYCLE_BIT;
        }
        self.ccnt = new;
    }

    /// The overflow interrupt request: `PMCR_EL0.E` and a counter with both
    /// its overflow flag and its interrupt enable set.
    pub fn irq_level(&self) -> bool {
        self.enabled() && self.ovs & self.inten != 0
    }

    /// The fewest guest cycles after which a counting counter with its
    /// interrupt enabled overflows (for an early timer exit so the
    /// interrupt is not late); `None` when none can.
    pub fn cycles_to_overflow(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        let mut best: Option<u64> = None;
        let mut take = |c: u64| best = Some(best.map_or(c, |b: u64| b.min(c)));
        let armed = self.inten & !self.ovs;
        if armed & self.cnten & CYCLE_BIT != 0 {
            let left = if self.pmcr & pmcr::LC != 0 {
                u64::MAX - self.ccnt
            } else {
                0xffff_ffff - (self.ccnt & 0xffff_ffff)
            };
            let per = if self.pmcr & pmcr::D != 0 { 64 } else { 1 };
            take(left.saturating_add(1).saturating_mul(per));
        }
        for i in 0..usize::from(self.n) {
            if armed & (1 << i) != 0 && self.counts(i, event::CPU_CYCLES) {
                take(u64::from(u32::MAX - self.evcnt[i]) + 1);
            }
        }
        best
    }

    /// The architectural state, for a save/restore (or a migration between
    /// machines).
    pub fn save(&self) -> PmuSnapshot {
        let mut s = PmuSnapshot {
            pmcr: self.pmcr,
            cnten: self.cnten,
            inten: self.inten,
            ovs: self.ovs,
            selr: self.selr,
            userenr: self.userenr,
            ccfiltr: self.ccfiltr,
            ccnt: self.ccnt,
            evtype: [0; MAX_COUNTERS],
            evcnt: [0; MAX_COUNTERS],
            prescale: self.prescale,
        };
        let n = usize::from(self.n);
        s.evtype[..n].copy_from_slice(&self.evtype[..n]);
        s.evcnt[..n].copy_from_slice(&self.evcnt[..n]);
        s
    }

    /// Loads `s` through the architectural registers (as a VMM restoring a
    /// vCPU would: `PMCR_EL0` last, the set/clear pairs clear-all then set).
    pub fn restore(&mut self, s: &PmuSnapshot) {
        let all = u64::from(self.counter_mask());
        let w = |p: &mut VirtPmu, r, v| {
            let _ = p.write(r, v);
        };
        w(self, PmuReg::Pmcr, 0);
        for i in 0..self.n {
            w(self, PmuReg::EvTyper(i), s.evtype[usize::from(i)]);
            w(self, PmuReg::EvCntr(i), u64::from(s.evcnt[usize::from(i)]));
        }
        w(self, PmuReg::Ccntr, s.ccnt);
        w(self, PmuReg::CcFiltr, s.ccfiltr);
        w(self, PmuReg::Selr, s.selr);
        w(self, PmuReg::UserEnr, s.userenr);
        for (clr, set, v) in [
            (PmuReg::CntenClr, PmuReg::CntenSet, s.cnten),
            (PmuReg::IntenClr, PmuReg::IntenSet, s.inten),
            (PmuReg::OvsClr, PmuReg::OvsSet, s.ovs),
        ] {
            w(self, clr, all);
            w(self, set, u64::from(v));
        }
        w(self, PmuReg::Pmcr, s.pmcr);
        self.prescale = s.prescale % 64;
    }
}

/// Whether a filter (`PMEVTYPER`/`PMCCFILTR`) excludes `el`.
fn filtered(typer: u64, el: GuestEl) -> bool {
    match el {
        GuestEl::El1 => typer & evtyper::P != 0,
        GuestEl::El0 => typer & evtyper::U != 0,
    }
}

/// A [`VirtPmu`]'s architectural state ([`VirtPmu::save`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmuSnapshot {
    /// `PMCR_EL0` (stored bits).
    pub pmcr: u64,
    /// `PMCNTENSET_EL0`.
    pub cnten: u32,
    /// `PMINTENSET_EL1`.
    pub inten: u32,
    /// `PMOVSSET_EL0`.
    pub ovs: u32,
    /// `PMSELR_EL0`.
    pub selr: u64,
    /// `PMUSERENR_EL0`.
    pub userenr: u64,
    /// `PMCCFILTR_EL0`.
    pub ccfiltr: u64,
    /// `PMCCNTR_EL0`.
    pub ccnt: u64,
    /// `PMEVTYPER<n>_EL0`.
    pub evtype: [u64; MAX_COUNTERS],
    /// `PMEVCNTR<n>_EL0`.
    pub evcnt: [u32; MAX_COUNTERS],
    /// Cycles pending under `PMCR_EL0.D`.
    pub prescale: u64,
}

/// Answers a [`crate::Hook::Pmu`] access from `pmu`: the read value or the
/// write's effect, or an UNDEF as the architecture gives it.
pub fn handle_pmu_trap(pmu: &mut VirtPmu, call: &HookCall) -> Outcome {
    let Some(reg) = REGISTERS.get(call.row).and_then(|r| PmuReg::decode(r.enc)) else {
        return Outcome::InjectUndef;
    };
    let rt = call.trap.rt;
    match call.trap.dir {
        Direction::Read => match pmu.read(reg) {
            Ok(value) => Outcome::Handled(Done::Read { rt, value }),
            Err(Undef) => Outcome::InjectUndef,
        },
        Direction::Write => match pmu.write(reg, call.value) {
            Ok(()) => Outcome::Handled(Done::Write),
            Err(Undef) => Outcome::InjectUndef,
        },
    }
}
