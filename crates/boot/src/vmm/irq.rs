//! A VM's interrupts in the VMM: its pkvm-vgic [`Vgic`] (distributor and
//! redistributors, host-side code as in pKVM) and the glue between it and
//! the world switch, which only copies the virtual CPU interface
//! (`ICH_*_EL2`, [`GicCpu`]).
//!
//! Per guest entry of vCPU `i` the backend calls [`VmIrq::flush`] (the
//! timer lines driven: the virtual timer as the level-sensitive PPI
//! [`PPI_VTIMER`] from the `CNTV_CTL_EL0`/`CVAL` the world switch saved,
//! the emulated EL1 physical timer as [`PPI_PTIMER`]; then the vGIC
//! chooses what goes into the list registers; `ICH_HCR_EL2.En`, with
//! `UIE`/`NPIE` when more is waiting than there are list registers), and
//! after the exit [`VmIrq::sync`] (list registers folded back, the timer
//! lines driven again). Guest accesses to the
//! GIC frames go to [`VmIrq::mmio`], `ICC_SGI*R_EL1` writes to
//! [`VmIrq::send_sgi`]. Every call returns the vCPUs to kick; the caller
//! kicks them with the lock dropped.
//!
//! One lock per VM over the vGIC (a leaf: nothing is taken under it).

use alloc::boxed::Box;

use pkvm_sync::{LockClass, SpinLock};
use pkvm_vgic::{
    AccessError, ConfigError, Line, ListRegister, SgiGroup, VcpuSet, Vgic, VgicConfig, GICD_SIZE,
    GICR_STRIDE, MAX_LRS,
};

use crate::platform::switch::{GicCpu, TimerState, ICH_HCR_EN, ICH_HCR_NPIE, ICH_HCR_UIE};

/// The guest's virtual-timer PPI.
pub const PPI_VTIMER: u32 = 27;
/// The guest's EL1 physical-timer PPI.
pub const PPI_PTIMER: u32 = 30;
/// SPIs of every VM (QEMU virt's PL011 is SPI 1; room for more devices).
pub const NR_SPIS: usize = 64;

/// `CNT*_CTL_EL0` bits.
const CTL_ENABLE: u64 = 1;
const CTL_IMASK: u64 = 2;
const CTL_ISTATUS: u64 = 4;

/// A timer's state as the interrupt logic needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerLine {
    /// The output line: enabled, not masked, condition met.
    pub level: bool,
    /// Enabled and not masked, condition not yet met: fires at this
    /// physical count.
    pub deadline: Option<u64>,
}

impl TimerLine {
    /// The virtual timer from the `CNTV_CTL_EL0`/`CVAL` the world switch
    /// saved, at physical count `now`: the condition is met if the hardware
    /// said so at the exit (ISTATUS) or the deadline has passed since (a
    /// vCPU woken from WFI at its deadline). The virtual count is the
    /// physical one minus `CNTVOFF_EL2`.
    pub fn virt(t: &TimerState, now: u64) -> TimerLine {
        let armed = t.ctl & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE;
        let met = t.ctl & CTL_ISTATUS != 0 || now.wrapping_sub(t.voff) >= t.cval;
        TimerLine {
            level: armed && met,
            deadline: (armed && !met).then(|| t.cval.wrapping_add(t.voff)),
        }
    }

    /// The emulated EL1 physical timer (`ctl` without ISTATUS, `cval`), at
    /// physical count `now`.
    pub fn phys(ctl: u64, cval: u64, now: u64) -> TimerLine {
        let armed = ctl & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE;
        TimerLine {
            level: armed && now >= cval,
            deadline: (armed && now < cval).then_some(cval),
        }
    }
}

/// What a vCPU that executed WFI should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WfiAction {
    /// An interrupt is pending for it: resume the guest at once.
    Resume,
    /// Its distributor is off (a guest that never enabled its GIC, like
    /// the simple payloads): nothing could wake it, so WFI only yields.
    Yield,
    /// Block until kicked, or until this physical count (a timer deadline).
    Block(Option<u64>),
}

/// The interrupt state of one VM.
pub struct VmIrq {
    vgic: SpinLock<Box<Vgic>>,
    gicd: u64,
    gicr: (u64, u64),
}

impl VmIrq {
    /// A vGIC for `nr_vcpus` vCPUs at QEMU virt's addresses (the VM device
    /// tree's), in its reset state.
    ///
    /// # Errors
    /// The vGIC refused the configuration (too many vCPUs).
    pub fn new(nr_vcpus: usize) -> Result<VmIrq, ConfigError> {
        let cfg = VgicConfig::qemu_virt(nr_vcpus, NR_SPIS);
        let vgic = Box::new(Vgic::new(cfg)?);
        Ok(VmIrq {
            vgic: SpinLock::new(vgic, LockClass::Leaf),
            gicd: cfg.gicd_base,
            gicr: (cfg.gicr_base, cfg.gicr_base + nr_vcpus as u64 * GICR_STRIDE),
        })
    }

    /// Whether `ipa` is in the distributor or a redistributor of this VM.
    pub fn contains(&self, ipa: u64) -> bool {
        (self.gicd..self.gicd + GICD_SIZE).contains(&ipa)
            || (self.gicr.0..self.gicr.1).contains(&ipa)
    }

    /// A guest access of `size` bytes at `ipa` (a write of `value`): the
    /// value read (0 for a write) and the vCPUs to kick.
    ///
    /// # Errors
    /// The vGIC's [`AccessError`]: the caller injects a data abort.
    pub fn mmio(
        &self,
        ipa: u64,
        size: usize,
        write: Option<u64>,
    ) -> Result<(u64, VcpuSet), AccessError> {
        let mut g = self.vgic.lock();
        match write {
            Some(v) => g.mmio_write(ipa, size, v).map(|k| (0, k)),
            None => g.mmio_read(ipa, size).map(|v| (v, VcpuSet::EMPTY)),
        }
    }

    /// Before an entry of `vcpu`: drives its timer PPIs (`vtimer`,
    /// `ptimer`: the lines now), then fills its list registers (the first
    /// `nr_lrs`) and `ICH_HCR_EL2`. Returns the vCPUs to kick.
    pub fn flush(
        &self,
        vcpu: usize,
        gic: &mut GicCpu,
        nr_lrs: usize,
        vtimer: bool,
        ptimer: bool,
    ) -> VcpuSet {
        let mut lrs = [ListRegister::default(); MAX_LRS];
        let n = nr_lrs.min(MAX_LRS);
        let mut g = self.vgic.lock();
        let kick = Self::timer_lines(&mut g, vcpu, vtimer, ptimer);
        let f = g.flush_lrs(vcpu, &mut lrs[..n]);
        drop(g);
        for (dst, lr) in gic.lrs.iter_mut().zip(&lrs[..n]) {
            *dst = lr.to_bits();
        }
        gic.hcr = ICH_HCR_EN
            | if f.overflow {
                ICH_HCR_UIE | ICH_HCR_NPIE
            } else {
                0
            };
        kick
    }

    fn timer_lines(g: &mut Vgic, vcpu: usize, vtimer: bool, ptimer: bool) -> VcpuSet {
        let mut kick = VcpuSet::EMPTY;
        for (intid, level) in [(PPI_VTIMER, vtimer), (PPI_PTIMER, ptimer)] {
            if let Ok(k) = g.set_level(Line::Ppi { vcpu, intid }, level) {
                kick = kick.union(k);
            }
        }
        kick
    }

    /// After an exit of `vcpu`: folds its list registers back, then drives
    /// its timer PPIs. Returns the vCPUs to kick.
    pub fn sync(
        &self,
        vcpu: usize,
        gic: &GicCpu,
        nr_lrs: usize,
        vtimer: bool,
        ptimer: bool,
    ) -> VcpuSet {
        let mut lrs = [ListRegister::default(); MAX_LRS];
        let n = nr_lrs.min(MAX_LRS);
        for (lr, &bits) in lrs.iter_mut().zip(&gic.lrs[..n]) {
            *lr = ListRegister::from_bits(bits);
        }
        let mut g = self.vgic.lock();
        let kick = g.sync_from_lrs(vcpu, &lrs[..n]);
        kick.union(Self::timer_lines(&mut g, vcpu, vtimer, ptimer))
    }

    /// What a WFI of `vcpu` does, with its timers' earliest deadline.
    pub fn wfi(&self, vcpu: usize, deadline: Option<u64>) -> WfiAction {
        let g = self.vgic.lock();
        if g.highest_pending(vcpu).is_some() {
            WfiAction::Resume
        } else if !g.distributor_enabled() && deadline.is_none() {
            WfiAction::Yield
        } else {
            WfiAction::Block(deadline)
        }
    }

    /// A guest write of `value` to `ICC_SGI1R_EL1` (`group1`) or
    /// `ICC_SGI0R_EL1`/`ICC_ASGI1R_EL1` by `sender`: the vCPUs to kick.
    pub fn send_sgi(&self, sender: usize, value: u64, group1: bool) -> VcpuSet {
        let group = if group1 {
            SgiGroup::Group1
        } else {
            SgiGroup::Group0
        };
        self.vgic
            .lock()
            .send_sgi(sender, value, group)
            .unwrap_or(VcpuSet::EMPTY)
    }

    /// Drives PPI `intid` of `vcpu` (a per-vCPU device's output, such as
    /// the virtual PMU's overflow line): the vCPUs to kick.
    pub fn set_ppi(&self, vcpu: usize, intid: u32, level: bool) -> VcpuSet {
        self.vgic
            .lock()
            .set_level(Line::Ppi { vcpu, intid }, level)
            .unwrap_or(VcpuSet::EMPTY)
    }

    /// Drives the line of SPI `intid` (a device model's interrupt output,
    /// such as the PL011's): the vCPUs to kick.
    pub fn set_spi(&self, intid: u32, level: bool) -> VcpuSet {
        self.vgic
            .lock()
            .set_level(Line::Spi(intid), level)
            .unwrap_or(VcpuSet::EMPTY)
    }

    /// A VM reset: every register and interrupt back to its reset state.
    pub fn reset(&self) {
        self.vgic.lock().reset();
    }
}
