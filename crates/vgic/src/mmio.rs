//! Guest MMIO accesses to the distributor and redistributor frames.

use crate::irq::{Irq, SpiTarget, IROUTER_MASK};
use crate::regs::{find, Frame, RegDesc, RegKind};
use crate::{
    AccessError, Bank, VcpuSet, Vgic, GICD_SIZE, GICR_SGI_OFFSET, GICR_STRIDE, IIDR, NR_PRIVATE,
    PIDR2,
};

/// `GICD_CTLR` bits.
const CTLR_ENABLE_MASK: u32 = 0b11;
const CTLR_ARE: u32 = 1 << 4;
const CTLR_DS: u32 = 1 << 6;
/// `GICD_TYPER` fields.
const TYPER_CPUNUMBER_SHIFT: u32 = 5;
const TYPER_IDBITS_SHIFT: u32 = 19;
const TYPER_A3V: u32 = 1 << 24;
/// 10 INTID bits (SPIs up to 1019, no LPIs).
const ID_BITS: u32 = 10;
/// `GICR_TYPER` fields.
const RD_TYPER_LAST: u64 = 1 << 4;
const RD_TYPER_PROC_SHIFT: u32 = 8;
const RD_TYPER_AFF_SHIFT: u32 = 32;
/// `GICR_WAKER` bits.
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

/// A decoded access: which frame, which redistributor.
#[derive(Clone, Copy)]
struct Target {
    frame: Frame,
    rd: usize,
}

/// How an access maps onto a register row.
enum Slot {
    /// Register `index` of `row`; the access covers bytes
    /// `[shift / 8, shift / 8 + size)` of it.
    Reg {
        row: &'static RegDesc,
        index: u32,
        shift: u32,
    },
    /// Reserved space: RAZ/WI.
    Reserved,
}

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

impl Vgic {
    pub(crate) fn decode(&self, addr: u64) -> Result<(Frame, usize, u32), AccessError> {
        let d = addr.wrapping_sub(self.gicd_base);
        if d < GICD_SIZE {
            return Ok((Frame::Dist, 0, d as u32));
        }
        let r = addr.wrapping_sub(self.gicr_base);
        if r < GICR_STRIDE * self.nr_vcpus as u64 {
            let (rd, within) = ((r / GICR_STRIDE) as usize, r % GICR_STRIDE);
            let frame = if within < GICR_SGI_OFFSET {
                Frame::RdBase
            } else {
                Frame::SgiBase
            };
            return Ok((frame, rd, (within % GICR_SGI_OFFSET) as u32));
        }
        Err(AccessError::OutOfRange(addr))
    }

    /// Checks address, size and alignment and finds the register.
    fn resolve(&self, addr: u64, size: usize) -> Result<(Target, Slot), AccessError> {
        let (frame, rd, offset) = self.decode(addr)?;
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(AccessError::BadSize { addr, size });
        }
        if !addr.is_multiple_of(size as u64) {
            return Err(AccessError::Misaligned { addr, size });
        }
        let target = Target { frame, rd };
        let Some((row, index)) = find(frame, offset) else {
            // Reserved, unless the access runs into a register.
            if find(frame, offset + size as u32 - 1).is_some() {
                return Err(AccessError::BadSize { addr, size });
            }
            return Ok((target, Slot::Reserved));
        };
        let allowed =
            size as u32 == row.width || (row.width == 8 && size == 4) || (row.bytes && size == 1);
        if !allowed {
            return Err(AccessError::BadSize { addr, size });
        }
        let shift = (offset - row.offset - index * row.width) * 8;
        Ok((target, Slot::Reg { row, index, shift }))
    }

    /// A guest read of `size` bytes (1, 2, 4 or 8) at guest-physical
    /// `addr` in the GIC frames.
    ///
    /// # Errors
    /// [`AccessError`] for an address outside the frames, a size the
    /// register does not allow, or a misaligned access: the caller injects
    /// an abort.
    pub fn mmio_read(&self, addr: u64, size: usize) -> Result<u64, AccessError> {
        match self.resolve(addr, size)? {
            (_, Slot::Reserved) => Ok(0),
            (t, Slot::Reg { row, index, shift }) => {
                Ok((self.read_reg(t, row.kind, index) >> shift) & size_mask(size))
            }
        }
    }

    /// A guest write of the low `size` bytes of `value` at guest-physical
    /// `addr` in the GIC frames. Returns the vCPUs to kick (an interrupt
    /// became deliverable to them).
    ///
    /// # Errors
    /// As [`Vgic::mmio_read`]; nothing changes on an error.
    pub fn mmio_write(
        &mut self,
        addr: u64,
        size: usize,
        value: u64,
    ) -> Result<VcpuSet, AccessError> {
        match self.resolve(addr, size)? {
            (_, Slot::Reserved) => Ok(VcpuSet::EMPTY),
            (t, Slot::Reg { row, index, shift }) => {
                let mut full = value & size_mask(size);
                if size as u32 != row.width {
                    // A byte or a 32-bit half: merge with the rest. Only
                    // plain read/write registers allow partial access.
                    let mask = size_mask(size) << shift;
                    full = (self.read_reg(t, row.kind, index) & !mask) | (full << shift);
                }
                Ok(self.write_reg(t, row.kind, index, full))
            }
        }
    }

    /// The bank a per-interrupt register of `t` addresses.
    fn bank(t: Target) -> Bank {
        match t.frame {
            Frame::Dist => Bank::Shared,
            Frame::RdBase | Frame::SgiBase => Bank::Private(t.rd),
        }
    }

    /// Gathers `per` bits per interrupt from `n` interrupts from `first`.
    fn gather(
        &self,
        bank: Bank,
        first: u32,
        n: u32,
        per: u32,
        f: impl Fn(&Irq, u32) -> u64,
    ) -> u64 {
        (0..n).fold(0, |acc, i| match self.irq(bank, first + i) {
            Some(irq) => acc | (f(irq, first + i) << (i * per)),
            None => acc,
        })
    }

    fn read_reg(&self, t: Target, kind: RegKind, index: u32) -> u64 {
        let bank = Self::bank(t);
        let bit = |on: bool| on as u64;
        match kind {
            RegKind::DistCtlr => u64::from(self.enables | CTLR_ARE | CTLR_DS),
            RegKind::DistTyper => u64::from(self.dist_typer()),
            RegKind::DistTyper2 | RegKind::RdCtlr | RegKind::RazWi => 0,
            RegKind::Iidr => u64::from(IIDR),
            RegKind::Pidr2 => u64::from(PIDR2),
            RegKind::Group => self.gather(bank, index * 32, 32, 1, |i, _| bit(i.group1())),
            RegKind::SetEnable | RegKind::ClearEnable => {
                self.gather(bank, index * 32, 32, 1, |i, _| bit(i.enabled()))
            }
            RegKind::SetPending | RegKind::ClearPending => {
                self.gather(bank, index * 32, 32, 1, |i, _| bit(i.pending_view()))
            }
            RegKind::SetActive | RegKind::ClearActive => {
                self.gather(bank, index * 32, 32, 1, |i, _| bit(i.active_view()))
            }
            RegKind::Priority => self.gather(bank, index * 4, 4, 8, |i, _| u64::from(i.priority())),
            RegKind::Config => self.gather(bank, index * 16, 16, 2, |i, _| bit(i.edge()) << 1),
            RegKind::Router => match index.checked_sub(NR_PRIVATE) {
                Some(spi) if (spi as usize) < self.nr_spis => self.router[spi as usize],
                _ => 0,
            },
            RegKind::RdTyper => {
                let last = if t.rd + 1 == self.nr_vcpus {
                    RD_TYPER_LAST
                } else {
                    0
                };
                (u64::from(self.aff[t.rd]) << RD_TYPER_AFF_SHIFT)
                    | ((t.rd as u64) << RD_TYPER_PROC_SHIFT)
                    | last
            }
            RegKind::Waker => {
                let sleep = self.asleep[t.rd];
                u64::from(if sleep {
                    WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP
                } else {
                    0
                })
            }
        }
    }

    fn dist_typer(&self) -> u32 {
        let it_lines = (NR_PRIVATE + self.nr_spis as u32).div_ceil(32) - 1;
        let cpus = self.nr_vcpus.min(8) as u32 - 1;
        it_lines
            | (cpus << TYPER_CPUNUMBER_SHIFT)
            | ((ID_BITS - 1) << TYPER_IDBITS_SHIFT)
            | TYPER_A3V
    }

    /// Applies `f` to each interrupt from `first` whose bit is set in
    /// `bits` (`per` bits per interrupt).
    fn scatter(
        &mut self,
        bank: Bank,
        first: u32,
        n: u32,
        per: u32,
        bits: u64,
        f: impl Fn(&mut Irq, u64),
    ) -> VcpuSet {
        let mut kick = VcpuSet::EMPTY;
        for i in 0..n {
            let field = (bits >> (i * per)) & ((1 << per) - 1);
            kick = kick.union(self.update(bank, first + i, |irq| f(irq, field)));
        }
        kick
    }

    /// Like [`Vgic::scatter`] for the write-1-to-act registers: only the
    /// interrupts whose bit is 1.
    fn scatter_ones(&mut self, bank: Bank, first: u32, bits: u64, f: impl Fn(&mut Irq)) -> VcpuSet {
        let mut kick = VcpuSet::EMPTY;
        for i in (0..32).filter(|i| bits & (1 << i) != 0) {
            kick = kick.union(self.update(bank, first + i, &f));
        }
        kick
    }

    fn write_reg(&mut self, t: Target, kind: RegKind, index: u32, v: u64) -> VcpuSet {
        let bank = Self::bank(t);
        let first = index * 32;
        match kind {
            RegKind::DistCtlr => self.write_ctlr(v as u32),
            RegKind::Group => self.scatter(bank, first, 32, 1, v, |i, b| i.set_group1(b != 0)),
            RegKind::SetEnable => self.scatter_ones(bank, first, v, |i| i.set_enabled(true)),
            RegKind::ClearEnable => self.scatter_ones(bank, first, v, |i| i.set_enabled(false)),
            RegKind::SetPending => self.scatter_ones(bank, first, v, Irq::latch),
            RegKind::ClearPending => self.scatter_ones(bank, first, v, Irq::clear_pending),
            RegKind::SetActive => {
                let mut kick = VcpuSet::EMPTY;
                for intid in (0..32).filter(|i| v & (1 << i) != 0).map(|i| first + i) {
                    let owner = self.active_owner(bank, intid);
                    kick = kick.union(self.update(bank, intid, |i| i.set_active_by(true, owner)));
                }
                kick
            }
            RegKind::ClearActive => self.scatter_ones(bank, first, v, |i| i.set_active(false)),
            RegKind::Priority => {
                self.scatter(bank, index * 4, 4, 8, v, |i, p| i.set_priority(p as u8))
            }
            // ICFGR0 holds the SGIs: always edge-triggered, read-only.
            RegKind::Config if index == 0 => VcpuSet::EMPTY,
            RegKind::Config => {
                self.scatter(bank, index * 16, 16, 2, v, |i, c| i.set_edge(c & 2 != 0))
            }
            RegKind::Router => self.write_router(index, v),
            RegKind::Waker => {
                self.asleep[t.rd] = v as u32 & WAKER_PROCESSOR_SLEEP != 0;
                VcpuSet::EMPTY
            }
            RegKind::DistTyper
            | RegKind::DistTyper2
            | RegKind::Iidr
            | RegKind::Pidr2
            | RegKind::RdCtlr
            | RegKind::RdTyper
            | RegKind::RazWi => VcpuSet::EMPTY,
        }
    }

    /// Who holds an interrupt the guest activates through `ISACTIVER`: its
    /// redistributor's vCPU, or an SPI's routed vCPU (vCPU 0 when it routes
    /// to none or to any).
    fn active_owner(&self, bank: Bank, intid: u32) -> usize {
        match bank {
            Bank::Private(v) => v,
            Bank::Shared => match intid
                .checked_sub(NR_PRIVATE)
                .map(|i| self.spi_target.get(i as usize))
            {
                Some(Some(SpiTarget::Vcpu(v))) => *v as usize,
                _ => 0,
            },
        }
    }

    fn write_ctlr(&mut self, v: u32) -> VcpuSet {
        let newly = v & CTLR_ENABLE_MASK & !self.enables;
        self.enables = v & CTLR_ENABLE_MASK;
        let mut kick = VcpuSet::EMPTY;
        if newly != 0 {
            for vcpu in (0..self.nr_vcpus).filter(|&c| self.highest_pending(c).is_some()) {
                kick.insert(vcpu);
            }
        }
        kick
    }

    fn write_router(&mut self, intid: u32, v: u64) -> VcpuSet {
        let Some(spi) = intid.checked_sub(NR_PRIVATE).map(|s| s as usize) else {
            return VcpuSet::EMPTY;
        };
        if spi >= self.nr_spis {
            return VcpuSet::EMPTY;
        }
        self.router[spi] = v & IROUTER_MASK;
        self.spi_target[spi] = self.resolve_route(self.router[spi]);
        let targets = self.targets(Bank::Shared, intid);
        let mut kick = VcpuSet::EMPTY;
        for vcpu in targets
            .iter()
            .filter(|&c| self.deliverable_to(c, Bank::Shared, intid))
        {
            kick.insert(vcpu);
        }
        kick
    }
}
