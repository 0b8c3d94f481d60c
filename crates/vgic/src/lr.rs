//! The list-register view: what the world switch loads into `ICH_LR<n>_EL2`
//! before entering a vCPU, and folds back after it exits.

use crate::{Bank, VcpuSet, Vgic, NR_PRIVATE};

/// The most list registers the architecture has (`ICH_VTR_EL2.ListRegs` is
/// 4 bits: 1..=16).
pub const MAX_LRS: usize = 16;

/// A list register's state field (`ICH_LR<n>_EL2[63:62]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LrState {
    /// Empty (or the guest has deactivated it).
    #[default]
    Invalid,
    /// Pending.
    Pending,
    /// Active (the guest acknowledged it).
    Active,
    /// Active and pending.
    PendingActive,
}

impl LrState {
    /// The state for `(pending, active)`.
    pub const fn new(pending: bool, active: bool) -> Self {
        match (pending, active) {
            (false, false) => LrState::Invalid,
            (true, false) => LrState::Pending,
            (false, true) => LrState::Active,
            (true, true) => LrState::PendingActive,
        }
    }
    /// Whether the pending bit is set.
    pub const fn pending(self) -> bool {
        matches!(self, LrState::Pending | LrState::PendingActive)
    }
    /// Whether the active bit is set.
    pub const fn active(self) -> bool {
        matches!(self, LrState::Active | LrState::PendingActive)
    }
}

/// One list register, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListRegister {
    /// The virtual INTID the guest acknowledges.
    pub vintid: u32,
    /// Pending/active state.
    pub state: LrState,
    /// Group 1 (IRQ) rather than Group 0 (FIQ).
    pub group1: bool,
    /// Priority (all 8 bits; the CPU interface compares its implemented
    /// high bits).
    pub priority: u8,
    /// `HW` = 1 with this physical INTID: the guest's deactivate also
    /// deactivates the physical interrupt.
    pub hw_pintid: Option<u16>,
    /// With `HW` = 0: ask for a maintenance interrupt when the guest
    /// deactivates it (`EOI`, bit 41), so a level-sensitive interrupt whose
    /// line is still high is re-sampled promptly.
    pub eoi_maintenance: bool,
}

const LR_PINTID_SHIFT: u32 = 32;
const LR_PINTID_MASK: u64 = 0x1fff;
const LR_EOI: u64 = 1 << 41;
const LR_PRIORITY_SHIFT: u32 = 48;
const LR_GROUP: u64 = 1 << 60;
const LR_HW: u64 = 1 << 61;
const LR_STATE_SHIFT: u32 = 62;

impl ListRegister {
    /// The `ICH_LR<n>_EL2` value: vINTID 31:0, pINTID 44:32 (HW = 1) or
    /// EOI 41 (HW = 0), Priority 55:48, Group 60, HW 61, State 63:62.
    pub const fn to_bits(self) -> u64 {
        let state = match self.state {
            LrState::Invalid => 0,
            LrState::Pending => 1,
            LrState::Active => 2,
            LrState::PendingActive => 3,
        };
        let mut v = self.vintid as u64
            | ((self.priority as u64) << LR_PRIORITY_SHIFT)
            | (state << LR_STATE_SHIFT);
        if self.group1 {
            v |= LR_GROUP;
        }
        match self.hw_pintid {
            Some(p) => v |= LR_HW | ((p as u64 & LR_PINTID_MASK) << LR_PINTID_SHIFT),
            None if self.eoi_maintenance => v |= LR_EOI,
            None => {}
        }
        v
    }

    /// Decodes an `ICH_LR<n>_EL2` value (see [`ListRegister::to_bits`]).
    pub const fn from_bits(v: u64) -> Self {
        let state = (v >> LR_STATE_SHIFT) & 3;
        let hw = v & LR_HW != 0;
        ListRegister {
            vintid: v as u32,
            state: LrState::new(state & 1 != 0, state & 2 != 0),
            group1: v & LR_GROUP != 0,
            priority: (v >> LR_PRIORITY_SHIFT) as u8,
            hw_pintid: if hw {
                Some(((v >> LR_PINTID_SHIFT) & LR_PINTID_MASK) as u16)
            } else {
                None
            },
            eoi_maintenance: !hw && v & LR_EOI != 0,
        }
    }
}

/// What [`Vgic::flush_lrs`] loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flush {
    /// List registers filled (from index 0); the rest were set invalid.
    pub used: usize,
    /// More interrupts wanted a list register than there were: the caller
    /// asks for a maintenance interrupt when the list registers drain
    /// (`ICH_HCR_EL2.UIE`/`NPIE`) so the rest get their turn.
    pub overflow: bool,
}

impl Vgic {
    /// Chooses what vCPU `vcpu`'s list registers should hold and marks it in
    /// flight: first the interrupts it holds active (so the guest can
    /// deactivate them), then its deliverable pending interrupts, each group
    /// by priority and then INTID. Fills `out` from index 0 (at most
    /// [`MAX_LRS`] entries) and sets the rest invalid.
    ///
    /// Call only with no interrupt of `vcpu` in flight (after
    /// [`Vgic::sync_from_lrs`]); interrupts still in flight stay where they
    /// are and are not chosen again.
    pub fn flush_lrs(&mut self, vcpu: usize, out: &mut [ListRegister]) -> Flush {
        out.iter_mut().for_each(|lr| *lr = ListRegister::default());
        if vcpu >= self.nr_vcpus {
            return Flush::default();
        }
        let cap = out.len().min(MAX_LRS);
        // Sorted best-first by (class, priority, INTID); class 0 = active.
        let mut chosen = [(0u8, 0u8, 0u32); MAX_LRS];
        let (mut n, mut overflow) = (0, false);
        for (bank, intid) in self.intids(vcpu) {
            let Some(irq) = self.irq(bank, intid) else {
                continue;
            };
            let key = if !irq.in_lr() && irq.active() && irq.owner() == vcpu {
                (0, irq.priority(), intid)
            } else if self.deliverable_to(vcpu, bank, intid) {
                (1, irq.priority(), intid)
            } else {
                continue;
            };
            if n == cap && (cap == 0 || key >= chosen[cap - 1]) {
                overflow = true;
                continue;
            }
            if n == cap {
                overflow = true;
                n -= 1;
            }
            let pos = chosen[..n].partition_point(|c| *c < key);
            chosen.copy_within(pos..n, pos + 1);
            chosen[pos] = key;
            n += 1;
        }
        for (slot, &(_, _, intid)) in out.iter_mut().zip(&chosen[..n]) {
            *slot = self.load(vcpu, intid);
        }
        Flush { used: n, overflow }
    }

    fn load(&mut self, vcpu: usize, intid: u32) -> ListRegister {
        let bank = if intid < NR_PRIVATE {
            Bank::Private(vcpu)
        } else {
            Bank::Shared
        };
        let Some(irq) = self.irq_mut(bank, intid) else {
            debug_assert!(false, "flush chose INTID {intid} that does not exist");
            return ListRegister::default();
        };
        let (pending, active) = irq.load_lr(vcpu);
        let lr = ListRegister {
            vintid: intid,
            state: LrState::new(pending, active),
            group1: irq.group1(),
            priority: irq.priority(),
            hw_pintid: None,
            eoi_maintenance: !irq.edge(),
        };
        self.in_flight[vcpu] += 1;
        lr
    }

    /// Folds back vCPU `vcpu`'s list registers as read at its exit: what
    /// the guest acknowledged is active (its latch consumed), what it
    /// deactivated is not, and level-sensitive interrupts are pending again
    /// if their line is still high. Entries that name nothing this vCPU has
    /// in flight are ignored; anything in flight that no entry names is put
    /// back unchanged. Returns the vCPUs to kick (an interrupt that became
    /// deliverable elsewhere).
    pub fn sync_from_lrs(&mut self, vcpu: usize, lrs: &[ListRegister]) -> VcpuSet {
        if vcpu >= self.nr_vcpus {
            return VcpuSet::EMPTY;
        }
        let mut kick = VcpuSet::EMPTY;
        for lr in lrs {
            if self.in_flight[vcpu] == 0 {
                break;
            }
            let bank = if lr.vintid < NR_PRIVATE {
                Bank::Private(vcpu)
            } else {
                Bank::Shared
            };
            let ours = self
                .irq(bank, lr.vintid)
                .is_some_and(|i| i.in_lr() && i.owner() == vcpu);
            if ours {
                let (p, a) = (lr.state.pending(), lr.state.active());
                kick = kick.union(self.unload(vcpu, bank, lr.vintid, |irq| irq.fold_lr(p, a)));
            }
        }
        if self.in_flight[vcpu] != 0 {
            for intid in 0..NR_PRIVATE + self.nr_spis as u32 {
                let bank = if intid < NR_PRIVATE {
                    Bank::Private(vcpu)
                } else {
                    Bank::Shared
                };
                let ours = self
                    .irq(bank, intid)
                    .is_some_and(|i| i.in_lr() && i.owner() == vcpu);
                if ours {
                    kick = kick.union(self.unload(vcpu, bank, intid, |irq| irq.unload_unchanged()));
                }
            }
        }
        kick
    }

    fn unload(
        &mut self,
        vcpu: usize,
        bank: Bank,
        intid: u32,
        f: impl FnOnce(&mut crate::Irq),
    ) -> VcpuSet {
        self.in_flight[vcpu] -= 1;
        let mut kick = self.update(bank, intid, f);
        // Pending again and deliverable (e.g. a level line still high after
        // the guest's deactivate): the targets must be told even though
        // `update` saw it signalable before (its list register copy).
        if self
            .irq(bank, intid)
            .is_some_and(|i| !i.active() && i.pending())
        {
            let targets = self.targets(bank, intid);
            if targets.iter().any(|v| self.deliverable_to(v, bank, intid)) {
                kick = kick.union(targets);
            }
        }
        kick
    }
}
