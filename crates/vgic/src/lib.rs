//! A GICv3 interrupt controller model for pkvm-rs guests.
//!
//! What it is: the distributor and redistributors a guest sees, as a plain
//! state machine with no hardware access. Events go in (a guest MMIO access
//! to the GIC frames, a device line raised or lowered, a guest write to
//! `ICC_SGI1R_EL1`, the list registers read back at a guest exit); state and
//! actions come out (the value read, the list registers to load, the vCPUs to
//! kick). The same code is meant to run in the simulated tier and in the EL2
//! image, so its logic is tested natively here.
//!
//! What it models:
//! - One security state (`GICD_CTLR.DS` = 1, RAO/WI) with affinity routing
//!   always on (`ARE` RAO/WI): Group 0 and Group 1 interrupts, enabled by
//!   `GICD_CTLR.EnableGrp0/EnableGrp1`.
//! - SGIs (INTID 0-15, always edge), PPIs (16-31) and SPIs (32 up to
//!   `32 + nr_spis`), each with enable, group, priority (5 bits, the low 3
//!   bits RAZ/WI: [`PRIORITY_MASK`]), edge/level configuration, pending
//!   (an edge or software latch, plus the line level for level-sensitive
//!   interrupts) and active state. SPIs are routed by `GICD_IROUTER<n>`
//!   (Aff3..Aff0, or IRM = 1: any vCPU).
//! - The register map of [`REGISTERS`]: every listed register with the
//!   access sizes the architecture allows (32-bit everywhere, byte access to
//!   the priority and target byte arrays, 64-bit or either 32-bit half of
//!   the 64-bit registers); a disallowed size or misaligned access is an
//!   [`AccessError`] the caller turns into an injected abort. Offsets not in
//!   the table are reserved: RAZ/WI at any naturally aligned size.
//! - Injection through list registers ([`Vgic::flush_lrs`] /
//!   [`Vgic::sync_from_lrs`]): an interrupt in a list register is *in
//!   flight* and the list register owns its pending/active state until the
//!   next sync; changes made meanwhile (a new edge, a line change, a guest
//!   of another vCPU writing `ICPENDR`) are kept beside it and merged at the
//!   sync as if they happened after whatever the guest did with the list
//!   register.
//! - A software acknowledge/deactivate path ([`Vgic::ack`],
//!   [`Vgic::deactivate`]) for a CPU interface emulated without list
//!   registers.
//!
//! What it leaves out: LPIs and the ITS (`GICD_TYPER.LPIS` = 0,
//! `GICR_PROPBASER`/`PENDBASER` RAZ/WI), message-based SPIs (`MBIS` = 0),
//! the extended SPI/PPI ranges, GICv2 compatibility (no `ITARGETSR`, no
//! `GICD_SGIR`: RAZ/WI), two security states (`IGRPMODR`, `NSACR` RAZ/WI),
//! GICv4 direct injection, and the CPU interface's priority masking and
//! running priority (the list registers and `ICH_VMCR_EL2`/`ICH_AP*R_EL2`
//! are the hardware's; [`Vgic::ack`] ignores them). Hardware-mapped list
//! registers (`HW` = 1) are representable in [`ListRegister`] but the model
//! does not create them yet.
//!
//! Invariants: nothing a guest or host passes in panics; every INTID, vCPU
//! index and access is checked where it enters. The model holds no locks:
//! callers serialise access to one [`Vgic`] (a VM-wide lock).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod irq;
mod lr;
mod mmio;
mod regs;
mod sgi;
mod vcpuset;

pub use lr::{Flush, ListRegister, LrState, MAX_LRS};
pub use regs::{Frame, RegDesc, RegKind, REGISTERS};
pub use sgi::SgiGroup;
pub use vcpuset::VcpuSet;

use core::fmt;
use irq::{Irq, SpiTarget};

/// The most vCPUs one [`Vgic`] serves (a [`VcpuSet`] is a 32-bit mask).
pub const MAX_VCPUS: usize = 16;
/// The most SPIs one [`Vgic`] serves (INTIDs 32..=1019).
pub const MAX_SPIS: usize = 988;
/// The implemented priority bits (5, as on QEMU's and most GICs' CPU
/// interfaces): writes to `IPRIORITYR` keep only these.
pub const PRIORITY_MASK: u8 = 0xf8;
/// The size of the distributor frame.
pub const GICD_SIZE: u64 = 0x1_0000;
/// The size of one vCPU's redistributor (RD_base frame, then SGI_base).
pub const GICR_STRIDE: u64 = 0x2_0000;
/// The offset of the SGI_base frame inside a redistributor.
pub const GICR_SGI_OFFSET: u64 = 0x1_0000;
/// The distributor base on QEMU's `virt` machine (and pkvm-rs's guests).
pub const QEMU_VIRT_GICD: u64 = 0x0800_0000;
/// The first redistributor on QEMU's `virt` machine (and pkvm-rs's guests).
pub const QEMU_VIRT_GICR: u64 = 0x080a_0000;
/// `GICD_IIDR`/`GICR_IIDR`: ProductID 0x50 ('P'), Variant 0, Revision 0,
/// Implementer 0x43b (the JEP106 code KVM's vGIC reports too).
pub const IIDR: u32 = (0x50 << 24) | 0x43b;
/// `GICD_PIDR2`/`GICR_PIDR2`: ArchRev (7:4) = 3 for GICv3, JEDEC-assigned
/// ID bits as a GIC-500 reports them.
pub const PIDR2: u32 = 0x3b;

/// The number of SGIs and of private (SGI + PPI) interrupts.
const NR_SGIS: u32 = 16;
const NR_PRIVATE: u32 = 32;

/// How to build a [`Vgic`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VgicConfig {
    /// Guest-physical base of the distributor (64 KiB aligned).
    pub gicd_base: u64,
    /// Guest-physical base of vCPU 0's redistributor; vCPU `i`'s is at
    /// `gicr_base + i * GICR_STRIDE` (64 KiB aligned).
    pub gicr_base: u64,
    /// vCPUs, 1..=[`MAX_VCPUS`].
    pub nr_vcpus: usize,
    /// SPIs, 0..=[`MAX_SPIS`] (INTIDs `32..32 + nr_spis`).
    pub nr_spis: usize,
    /// Each vCPU's MPIDR affinity (Aff3 39:32, Aff2 23:16, Aff1 15:8,
    /// Aff0 7:0; other bits ignored). Entries past `nr_vcpus` are ignored.
    pub mpidr: [u64; MAX_VCPUS],
}

impl VgicConfig {
    /// QEMU `virt`'s frame addresses with KVM's affinity layout (vCPU `i`:
    /// Aff0 = `i & 0xf`, Aff1 = `i >> 4`), as pkvm-rs's device tree says.
    pub const fn qemu_virt(nr_vcpus: usize, nr_spis: usize) -> Self {
        let mut mpidr = [0; MAX_VCPUS];
        let mut i = 0;
        while i < MAX_VCPUS {
            mpidr[i] = ((i as u64) & 0xf) | (((i as u64) >> 4) << 8);
            i += 1;
        }
        VgicConfig {
            gicd_base: QEMU_VIRT_GICD,
            gicr_base: QEMU_VIRT_GICR,
            nr_vcpus,
            nr_spis,
            mpidr,
        }
    }
}

/// Why [`Vgic::new`] refused a configuration (the host's mistake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `nr_vcpus` is 0 or above [`MAX_VCPUS`].
    Vcpus(usize),
    /// `nr_spis` is above [`MAX_SPIS`].
    Spis(usize),
    /// A frame base is not 64 KiB aligned, or a frame wraps the address
    /// space.
    Base(u64),
    /// The distributor overlaps the redistributors.
    Overlap,
    /// Two vCPUs have the same affinity.
    DuplicateAffinity(usize, usize),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Vcpus(n) => write!(f, "vGIC: {n} vCPUs (1..={MAX_VCPUS} supported)"),
            ConfigError::Spis(n) => write!(f, "vGIC: {n} SPIs (at most {MAX_SPIS})"),
            ConfigError::Base(b) => write!(f, "vGIC: frame base {b:#x} unaligned or wrapping"),
            ConfigError::Overlap => write!(f, "vGIC: distributor overlaps the redistributors"),
            ConfigError::DuplicateAffinity(a, b) => {
                write!(f, "vGIC: vCPUs {a} and {b} have the same MPIDR affinity")
            }
        }
    }
}

/// Why a guest MMIO access to the GIC frames was refused; the caller injects
/// a synchronous external abort (the guest's fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The address is in none of this vGIC's frames.
    OutOfRange(u64),
    /// The access size is not one the register allows (or not 1/2/4/8).
    BadSize {
        /// The guest-physical address.
        addr: u64,
        /// The access size in bytes.
        size: usize,
    },
    /// The address is not aligned to the access size.
    Misaligned {
        /// The guest-physical address.
        addr: u64,
        /// The access size in bytes.
        size: usize,
    },
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessError::OutOfRange(a) => write!(f, "guest GIC access at {a:#x}: no GIC frame"),
            AccessError::BadSize { addr, size } => {
                write!(
                    f,
                    "guest GIC access at {addr:#x}: {size}-byte access not allowed"
                )
            }
            AccessError::Misaligned { addr, size } => {
                write!(
                    f,
                    "guest GIC access at {addr:#x}: misaligned {size}-byte access"
                )
            }
        }
    }
}

/// Why an interrupt operation from the host side was refused (a caller bug
/// or a stale request; nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// No such vCPU.
    Vcpu(usize),
    /// No such interrupt for this operation (e.g. an SGI given a line, an
    /// SPI beyond `nr_spis`).
    Intid(u32),
    /// The interrupt is in a list register; only [`Vgic::sync_from_lrs`]
    /// may change its state.
    InListRegister(u32),
    /// The interrupt is not active on this vCPU.
    NotActive {
        /// The vCPU.
        vcpu: usize,
        /// The interrupt.
        intid: u32,
    },
}

impl fmt::Display for IrqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IrqError::Vcpu(v) => write!(f, "vGIC: no vCPU {v}"),
            IrqError::Intid(i) => write!(f, "vGIC: INTID {i} not valid here"),
            IrqError::InListRegister(i) => write!(f, "vGIC: INTID {i} is in a list register"),
            IrqError::NotActive { vcpu, intid } => {
                write!(f, "vGIC: INTID {intid} not active on vCPU {vcpu}")
            }
        }
    }
}

/// An interrupt input: what a device model or timer drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A PPI (INTID 16..=31) of one vCPU, e.g. its virtual timer (27).
    Ppi {
        /// The vCPU.
        vcpu: usize,
        /// The INTID, 16..=31.
        intid: u32,
    },
    /// An SPI (INTID 32..32 + nr_spis), e.g. the PL011 (33).
    Spi(u32),
}

/// Which interrupts a lookup addresses: one vCPU's private ones, or the
/// shared SPIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bank {
    Private(usize),
    Shared,
}

/// The GICv3 model of one VM. See the crate documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vgic {
    gicd_base: u64,
    gicr_base: u64,
    nr_vcpus: usize,
    nr_spis: usize,
    /// Packed affinity (Aff3 31:24, Aff2 23:16, Aff1 15:8, Aff0 7:0).
    aff: [u32; MAX_VCPUS],
    /// `GICD_CTLR.EnableGrp0` (bit 0) and `EnableGrp1` (bit 1).
    enables: u32,
    private: [[Irq; NR_PRIVATE as usize]; MAX_VCPUS],
    spis: [Irq; MAX_SPIS],
    /// `GICD_IROUTER<32 + i>` as written (RES0 bits cleared).
    router: [u64; MAX_SPIS],
    /// The vCPU(s) `router[i]` names, resolved when written.
    spi_target: [SpiTarget; MAX_SPIS],
    /// `GICR_WAKER.ProcessorSleep`.
    asleep: [bool; MAX_VCPUS],
    /// Interrupts in flight in each vCPU's list registers.
    in_flight: [u16; MAX_VCPUS],
}

/// Packs an MPIDR or IROUTER affinity (the two share a layout) into
/// Aff3 31:24, Aff2 23:16, Aff1 15:8, Aff0 7:0.
const fn pack_affinity(v: u64) -> u32 {
    ((((v >> 32) & 0xff) << 24) | (v & 0xff_ffff)) as u32
}

impl Vgic {
    /// A vGIC in its reset state.
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration is out of range or
    /// inconsistent.
    pub fn new(cfg: VgicConfig) -> Result<Self, ConfigError> {
        if cfg.nr_vcpus == 0 || cfg.nr_vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(cfg.nr_vcpus));
        }
        if cfg.nr_spis > MAX_SPIS {
            return Err(ConfigError::Spis(cfg.nr_spis));
        }
        let gicr_len = GICR_STRIDE * cfg.nr_vcpus as u64;
        for (base, len) in [(cfg.gicd_base, GICD_SIZE), (cfg.gicr_base, gicr_len)] {
            if !base.is_multiple_of(0x1_0000) || base.checked_add(len).is_none() {
                return Err(ConfigError::Base(base));
            }
        }
        if cfg.gicd_base < cfg.gicr_base + gicr_len && cfg.gicr_base < cfg.gicd_base + GICD_SIZE {
            return Err(ConfigError::Overlap);
        }
        let mut aff = [0; MAX_VCPUS];
        for v in 0..cfg.nr_vcpus {
            aff[v] = pack_affinity(cfg.mpidr[v]);
            if let Some(u) = (0..v).find(|&u| aff[u] == aff[v]) {
                return Err(ConfigError::DuplicateAffinity(u, v));
            }
        }
        let mut vgic = Vgic {
            gicd_base: cfg.gicd_base,
            gicr_base: cfg.gicr_base,
            nr_vcpus: cfg.nr_vcpus,
            nr_spis: cfg.nr_spis,
            aff,
            enables: 0,
            private: [[Irq::reset_spi(); NR_PRIVATE as usize]; MAX_VCPUS],
            spis: [Irq::reset_spi(); MAX_SPIS],
            router: [0; MAX_SPIS],
            spi_target: [SpiTarget::None; MAX_SPIS],
            asleep: [true; MAX_VCPUS],
            in_flight: [0; MAX_VCPUS],
        };
        vgic.reset();
        Ok(vgic)
    }

    /// Puts every register and interrupt back in its reset state, in place
    /// (a VM reset), keeping the configuration. Anything in flight in list
    /// registers is forgotten: the caller clears those too.
    pub fn reset(&mut self) {
        self.enables = 0;
        for bank in self.private.iter_mut() {
            for (intid, irq) in bank.iter_mut().enumerate() {
                *irq = if (intid as u32) < NR_SGIS {
                    Irq::reset_sgi()
                } else {
                    Irq::reset_spi()
                };
            }
        }
        self.spis.fill(Irq::reset_spi());
        self.router.fill(0);
        let route0 = self.resolve_route(0);
        for (i, target) in self.spi_target.iter_mut().enumerate() {
            *target = if i < self.nr_spis {
                route0
            } else {
                SpiTarget::None
            };
        }
        self.asleep.fill(true);
        self.in_flight.fill(0);
    }

    /// The number of vCPUs.
    pub fn nr_vcpus(&self) -> usize {
        self.nr_vcpus
    }

    /// Whether the distributor forwards either group (`GICD_CTLR`
    /// `EnableGrp0` or `EnableGrp1` set): a guest that has not turned it on
    /// can receive no interrupt at all.
    pub fn distributor_enabled(&self) -> bool {
        self.enables & 3 != 0
    }

    /// The number of SPIs.
    pub fn nr_spis(&self) -> usize {
        self.nr_spis
    }

    /// Whether `addr` lies in one of this vGIC's frames (the distributor or
    /// a redistributor), i.e. whether an MMIO exit there belongs to it.
    pub fn contains(&self, addr: u64) -> bool {
        self.decode(addr).is_ok()
    }

    fn check_vcpu(&self, vcpu: usize) -> Result<(), IrqError> {
        if vcpu < self.nr_vcpus {
            Ok(())
        } else {
            Err(IrqError::Vcpu(vcpu))
        }
    }

    /// The bank and validity of `intid` as seen from `vcpu`.
    fn bank_of(&self, vcpu: usize, intid: u32) -> Result<Bank, IrqError> {
        self.check_vcpu(vcpu)?;
        if intid < NR_PRIVATE {
            Ok(Bank::Private(vcpu))
        } else if ((intid - NR_PRIVATE) as usize) < self.nr_spis {
            Ok(Bank::Shared)
        } else {
            Err(IrqError::Intid(intid))
        }
    }

    /// The interrupt `intid` of `bank`, if it exists.
    pub(crate) fn irq(&self, bank: Bank, intid: u32) -> Option<&Irq> {
        match bank {
            Bank::Private(v) if v < self.nr_vcpus => self.private[v].get(intid as usize),
            Bank::Shared if intid >= NR_PRIVATE => {
                let i = (intid - NR_PRIVATE) as usize;
                if i < self.nr_spis {
                    self.spis.get(i)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn irq_mut(&mut self, bank: Bank, intid: u32) -> Option<&mut Irq> {
        match bank {
            Bank::Private(v) if v < self.nr_vcpus => self.private[v].get_mut(intid as usize),
            Bank::Shared if intid >= NR_PRIVATE => {
                let i = (intid - NR_PRIVATE) as usize;
                if i < self.nr_spis {
                    self.spis.get_mut(i)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Whether the distributor forwards interrupts of this group.
    fn group_enabled(&self, irq: &Irq) -> bool {
        let bit = if irq.group1() { 2 } else { 1 };
        self.enables & bit != 0
    }

    /// Pending, enabled and its group enabled (active or not, in a list
    /// register or not): the state a change can make signalable.
    fn signalable(&self, irq: &Irq) -> bool {
        irq.pending() && irq.enabled() && self.group_enabled(irq)
    }

    /// Whether `vcpu` could acknowledge `intid` now (ignoring the CPU
    /// interface's priority mask): pending, not active, enabled, group
    /// enabled, not in a list register, and targeting `vcpu`.
    fn deliverable_to(&self, vcpu: usize, bank: Bank, intid: u32) -> bool {
        let Some(irq) = self.irq(bank, intid) else {
            return false;
        };
        !irq.in_lr()
            && !irq.active()
            && self.signalable(irq)
            && self.targets(bank, intid).contains(vcpu)
    }

    /// The vCPUs `intid` of `bank` is delivered to.
    fn targets(&self, bank: Bank, intid: u32) -> VcpuSet {
        match bank {
            Bank::Private(v) => VcpuSet::single(v),
            Bank::Shared => match self.spi_target[(intid - NR_PRIVATE) as usize] {
                SpiTarget::Vcpu(v) => VcpuSet::single(v as usize),
                SpiTarget::Any => VcpuSet::first(self.nr_vcpus),
                SpiTarget::None => VcpuSet::EMPTY,
            },
        }
    }

    /// Whether a change may make a vCPU take `irq`: signalable and not
    /// active (the model's own active state; a list register's copy does
    /// not count, so changes to an interrupt in flight are reported).
    fn wants_delivery(&self, irq: &Irq) -> bool {
        self.signalable(irq) && !irq.active()
    }

    /// Applies `f` to one interrupt and returns the vCPUs to kick: its
    /// targets when the change made it want delivery, plus the vCPU holding
    /// it in a list register (which must sync to see the change).
    pub(crate) fn update(&mut self, bank: Bank, intid: u32, f: impl FnOnce(&mut Irq)) -> VcpuSet {
        let Some(irq) = self.irq(bank, intid) else {
            return VcpuSet::EMPTY;
        };
        let before = self.wants_delivery(irq);
        let Some(irq) = self.irq_mut(bank, intid) else {
            return VcpuSet::EMPTY;
        };
        f(irq);
        let irq = *irq;
        if before || !self.wants_delivery(&irq) {
            return VcpuSet::EMPTY;
        }
        let mut kick = self.targets(bank, intid);
        if irq.in_lr() {
            kick.insert(irq.owner());
        }
        kick
    }

    /// Resolves an `IROUTER` value to the vCPU(s) it names.
    fn resolve_route(&self, router: u64) -> SpiTarget {
        if router & irq::IROUTER_IRM != 0 {
            return SpiTarget::Any;
        }
        let want = pack_affinity(router);
        match (0..self.nr_vcpus).find(|&v| self.aff[v] == want) {
            Some(v) => SpiTarget::Vcpu(v as u8),
            None => SpiTarget::None,
        }
    }

    /// Drives an interrupt line: for a level-sensitive interrupt the line
    /// level is its pending state (with any software latch); for an
    /// edge-triggered one a rising edge latches it pending.
    ///
    /// Returns the vCPUs to kick.
    ///
    /// # Errors
    /// [`IrqError`] for a vCPU or INTID that does not exist (SGIs have no
    /// line).
    pub fn set_level(&mut self, line: Line, level: bool) -> Result<VcpuSet, IrqError> {
        let (bank, intid) = self.line_bank(line)?;
        Ok(self.update(bank, intid, |irq| irq.set_line(level)))
    }

    /// Latches an interrupt pending, as an edge on its line does (on a
    /// level-sensitive interrupt: as a write to `ISPENDR` does, until it is
    /// acknowledged).
    ///
    /// Returns the vCPUs to kick.
    ///
    /// # Errors
    /// As [`Vgic::set_level`].
    pub fn raise_edge(&mut self, line: Line) -> Result<VcpuSet, IrqError> {
        let (bank, intid) = self.line_bank(line)?;
        Ok(self.update(bank, intid, Irq::latch))
    }

    fn line_bank(&self, line: Line) -> Result<(Bank, u32), IrqError> {
        match line {
            Line::Ppi { vcpu, intid } if (NR_SGIS..NR_PRIVATE).contains(&intid) => {
                Ok((self.bank_of(vcpu, intid)?, intid))
            }
            Line::Spi(intid) if intid >= NR_PRIVATE => Ok((self.bank_of(0, intid)?, intid)),
            Line::Ppi { intid, .. } | Line::Spi(intid) => Err(IrqError::Intid(intid)),
        }
    }

    /// The interrupt `vcpu` would acknowledge next: the deliverable one
    /// with the lowest priority value, then the lowest INTID. Ignores the
    /// CPU interface's priority mask and running priority. Also the wake-up
    /// test for a vCPU in WFI.
    pub fn highest_pending(&self, vcpu: usize) -> Option<u32> {
        if vcpu >= self.nr_vcpus {
            return None;
        }
        let mut best: Option<(u8, u32)> = None;
        for (bank, intid) in self.intids(vcpu) {
            if self.deliverable_to(vcpu, bank, intid) {
                let key = (self.irq(bank, intid).map_or(0, |i| i.priority()), intid);
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
            }
        }
        best.map(|(_, intid)| intid)
    }

    /// Every (bank, INTID) `vcpu` can see: its private interrupts, then the
    /// SPIs.
    fn intids(&self, vcpu: usize) -> impl Iterator<Item = (Bank, u32)> {
        let spis = NR_PRIVATE..NR_PRIVATE + self.nr_spis as u32;
        (0..NR_PRIVATE)
            .map(move |i| (Bank::Private(vcpu), i))
            .chain(spis.map(|i| (Bank::Shared, i)))
    }

    /// Acknowledges the interrupt [`Vgic::highest_pending`] names, as a
    /// CPU interface emulated in software does on a read of `ICC_IAR*`: it
    /// becomes active (and stays pending if its level line is still high,
    /// or a new edge arrives).
    pub fn ack(&mut self, vcpu: usize) -> Option<u32> {
        let intid = self.highest_pending(vcpu)?;
        let bank = self.bank_of(vcpu, intid).ok()?;
        self.update(bank, intid, |irq| irq.acknowledge(vcpu));
        Some(intid)
    }

    /// Deactivates an interrupt `vcpu` holds active (a software CPU
    /// interface's EOI with EOImode 0, or its `ICC_DIR`). Returns the vCPUs
    /// to kick (it may be pending again).
    ///
    /// # Errors
    /// [`IrqError`] when it is not active on `vcpu`, is in a list register,
    /// or does not exist.
    pub fn deactivate(&mut self, vcpu: usize, intid: u32) -> Result<VcpuSet, IrqError> {
        let bank = self.bank_of(vcpu, intid)?;
        let irq = self.irq(bank, intid).ok_or(IrqError::Intid(intid))?;
        if irq.in_lr() {
            return Err(IrqError::InListRegister(intid));
        }
        if !irq.active() || irq.owner() != vcpu {
            return Err(IrqError::NotActive { vcpu, intid });
        }
        Ok(self.update(bank, intid, |irq| irq.set_active(false)))
    }
}
