//! One interrupt's state, packed in four bytes.

/// `GICD_IROUTER.IRM`: route to any participating PE (1 of N).
pub(crate) const IROUTER_IRM: u64 = 1 << 31;
/// The `GICD_IROUTER` bits that hold state: Aff3 39:32, IRM 31, Aff2..Aff0
/// 23:0. The rest is RES0.
pub(crate) const IROUTER_MASK: u64 = 0xff_8000_0000 | 0xff_ffff;

/// Where an SPI's `IROUTER` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SpiTarget {
    /// The vCPU whose affinity matches.
    Vcpu(u8),
    /// IRM = 1: any vCPU may take it.
    Any,
    /// No vCPU has that affinity: not delivered.
    None,
}

const ENABLED: u16 = 1 << 0;
const GROUP1: u16 = 1 << 1;
const EDGE: u16 = 1 << 2;
/// The edge / software pending latch.
const LATCH: u16 = 1 << 3;
/// The input line's level.
const LINE: u16 = 1 << 4;
const ACTIVE: u16 = 1 << 5;
/// In a list register of vCPU `owner`.
const IN_LR: u16 = 1 << 6;
/// In flight: the list register was loaded with the pending latch set.
const LR_LATCH: u16 = 1 << 7;
/// In flight: the list register was loaded active.
const LR_ACTIVE: u16 = 1 << 8;
/// In flight: the pending state was cleared (`ICPENDR`) since the load.
const CLR_PEND: u16 = 1 << 9;
/// In flight: the active state was cleared (`ICACTIVER`) since the load.
const CLR_ACT: u16 = 1 << 10;

/// One interrupt.
///
/// While it is in a list register (`IN_LR`) the list register holds the
/// pending latch and active state it was loaded with (`LR_LATCH`,
/// `LR_ACTIVE`); `LATCH`/`ACTIVE` then record only what was set since, and
/// `CLR_PEND`/`CLR_ACT` what was cleared since, to merge at the sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Irq {
    flags: u16,
    priority: u8,
    /// The vCPU holding it active or in a list register.
    owner: u8,
}

impl Irq {
    /// An SPI or PPI at reset: disabled, Group 1, level, priority 0.
    pub(crate) const fn reset_spi() -> Self {
        Irq {
            flags: GROUP1,
            priority: 0,
            owner: 0,
        }
    }

    /// An SGI at reset: as [`Irq::reset_spi`] but edge-triggered (fixed).
    pub(crate) const fn reset_sgi() -> Self {
        Irq {
            flags: GROUP1 | EDGE,
            priority: 0,
            owner: 0,
        }
    }

    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    fn put(&mut self, f: u16, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.has(ENABLED)
    }
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.put(ENABLED, on);
    }
    pub(crate) fn group1(&self) -> bool {
        self.has(GROUP1)
    }
    pub(crate) fn set_group1(&mut self, on: bool) {
        self.put(GROUP1, on);
    }
    pub(crate) fn edge(&self) -> bool {
        self.has(EDGE)
    }
    pub(crate) fn set_edge(&mut self, on: bool) {
        self.put(EDGE, on);
    }
    pub(crate) fn priority(&self) -> u8 {
        self.priority
    }
    pub(crate) fn set_priority(&mut self, p: u8) {
        self.priority = p & crate::PRIORITY_MASK;
    }
    pub(crate) fn owner(&self) -> usize {
        self.owner as usize
    }
    pub(crate) fn in_lr(&self) -> bool {
        self.has(IN_LR)
    }
    /// Active in the model (not counting a list register's copy).
    pub(crate) fn active(&self) -> bool {
        self.has(ACTIVE)
    }

    /// Pending in the model (not counting a list register's copy): the
    /// latch, or the line for a level-sensitive interrupt.
    pub(crate) fn pending(&self) -> bool {
        self.has(LATCH) || (!self.edge() && self.has(LINE))
    }

    /// Pending as `ISPENDR` reports it: the model's state plus the
    /// list register's latch as loaded, unless cleared since.
    pub(crate) fn pending_view(&self) -> bool {
        self.pending() || (self.in_lr() && self.has(LR_LATCH) && !self.has(CLR_PEND))
    }

    /// Active as `ISACTIVER` reports it (see [`Irq::pending_view`]).
    pub(crate) fn active_view(&self) -> bool {
        self.active() || (self.in_lr() && self.has(LR_ACTIVE) && !self.has(CLR_ACT))
    }

    /// Sets the pending latch (an edge, `ISPENDR`, an SGI).
    pub(crate) fn latch(&mut self) {
        self.put(LATCH, true);
    }

    /// Clears the pending latch (`ICPENDR`); a level line stays.
    pub(crate) fn clear_pending(&mut self) {
        self.put(LATCH, false);
        if self.in_lr() {
            self.put(CLR_PEND, true);
        }
    }

    /// Sets (`ISACTIVER`) or clears (`ICACTIVER`, deactivate) the active
    /// state; `owner` is who holds it when set.
    pub(crate) fn set_active_by(&mut self, on: bool, owner: usize) {
        if on && !self.active() && !self.in_lr() {
            self.owner = owner as u8;
        }
        self.put(ACTIVE, on);
        if !on && self.in_lr() {
            self.put(CLR_ACT, true);
        }
    }

    pub(crate) fn set_active(&mut self, on: bool) {
        let owner = self.owner();
        self.set_active_by(on, owner);
    }

    /// Drives the input line; a rising edge latches an edge-triggered
    /// interrupt.
    pub(crate) fn set_line(&mut self, level: bool) {
        if self.edge() && level && !self.has(LINE) {
            self.put(LATCH, true);
        }
        self.put(LINE, level);
    }

    /// The acknowledge: pending -> active, consuming the latch; a level
    /// line still high keeps it pending.
    pub(crate) fn acknowledge(&mut self, vcpu: usize) {
        self.put(LATCH, false);
        self.put(ACTIVE, true);
        self.owner = vcpu as u8;
    }

    /// Moves the pending latch and active state into a list register of
    /// `vcpu`; returns the (pending, active) state to load.
    ///
    /// An active level-sensitive interrupt pending only by its line is
    /// loaded active, not pending and active: the guest can drop the line
    /// without an exit (masking its virtual timer), and a list register's
    /// pending copy would then outlive it and be taken after the EOI. The
    /// list register's EOI maintenance interrupt brings the guest out at the
    /// deactivate, when [`Vgic::sync_from_lrs`] samples the line again.
    ///
    /// [`Vgic::sync_from_lrs`]: crate::Vgic::sync_from_lrs
    pub(crate) fn load_lr(&mut self, vcpu: usize) -> (bool, bool) {
        let by_line_only = !self.edge() && !self.has(LATCH);
        let pending = self.pending() && !(self.active() && by_line_only);
        let state = (pending, self.active());
        let latch = self.has(LATCH);
        self.put(LR_LATCH, latch);
        self.put(LR_ACTIVE, state.1);
        self.put(LATCH | ACTIVE | CLR_PEND | CLR_ACT, false);
        self.put(IN_LR, true);
        self.owner = vcpu as u8;
        state
    }

    /// Folds a list register's state back: the guest's acknowledge consumed
    /// the latch if the register is no longer pending; changes made since
    /// the load apply after it.
    pub(crate) fn fold_lr(&mut self, pending: bool, active: bool) {
        let keep_latch = pending && self.has(LR_LATCH) && !self.has(CLR_PEND);
        let keep_active = active && !self.has(CLR_ACT);
        if keep_latch {
            self.put(LATCH, true);
        }
        if keep_active {
            self.put(ACTIVE, true);
        }
        self.put(IN_LR | LR_LATCH | LR_ACTIVE | CLR_PEND | CLR_ACT, false);
    }

    /// Folds back as if the guest did nothing with the list register.
    pub(crate) fn unload_unchanged(&mut self) {
        let (latch, active) = (self.has(LR_LATCH), self.has(LR_ACTIVE));
        self.fold_lr(latch, active);
    }
}
