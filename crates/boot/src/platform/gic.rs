//! GICv3 at EL2: distributor and redistributor set-up, the CPU interface
//! system registers, acknowledge / end of interrupt and SGIs.
//!
//! Routing (architecture rules, non-VHE, `HCR_EL2.TGE = 0`): with
//! `HCR_EL2.IMO = 1` (set in every VM's trap controls, `pkvm_sysreg::traps::hcr_el2`) a physical IRQ
//! that arrives while a guest runs at EL1/EL0 is taken to EL2 whatever the
//! guest's `PSTATE.I`: it lands in the "IRQ from a lower EL" vector, which
//! leaves the guest like any other exit (`Exit::kind == EXIT_IRQ`). At EL2
//! the image keeps `PSTATE.I` masked, so interrupts are never taken while
//! hypervisor code runs: they stay pending until the next guest entry (or
//! wake a `wfi`, see [`wait_for_interrupt`]) and the run loop acknowledges
//! them with [`drain`].
//!
//! Everything is group 1 (QEMU's virt GIC has security disabled, DS = 1, so
//! group 1 is the only non-secure group we need): `GICR_IGROUPR0` all ones,
//! `ICC_IGRPEN1_EL1 = 1`, `ICC_PMR_EL1 = 0xff`, EOImode 0 (EOI drops the
//! priority and deactivates). Interrupts used:
//! - [`SGI_KICK`] (SGI 0): "leave the guest / look at the run queue".
//! - [`super::timer::PPI_EL2_PHYS`] (INTID 26): the EL2 physical timer, the
//!   preemption tick.
//! - [`PPI_VTIMER`] (INTID 27): the EL1 virtual timer, which only a guest
//!   uses: it fires while the guest runs and takes it out (the world switch
//!   then stops the timer, so the level drops before [`drain`]); the VMM
//!   turns it into the guest's virtual PPI 27 and masks it here
//!   ([`set_vtimer_masked`]) while that virtual line is high, so an
//!   unhandled guest timer does not exit the guest again at once.
//! - [`PPI_MAINTENANCE`] (INTID 25): the virtual CPU interface's maintenance
//!   interrupt (a list register EOI'd, underflow, no pending), which takes a
//!   guest out so its list registers are synced and refilled.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::MAX_CPUS;
use crate::{read_sysreg, write_sysreg};

/// The SGI used to kick a physical CPU (out of a guest or out of `wfi`).
pub const SGI_KICK: u32 = 0;
/// The EL1 virtual timer's PPI (INTID 27 on every GICv3 system with the
/// server base system architecture's layout, QEMU virt's included).
pub const PPI_VTIMER: u32 = 27;
/// The GIC maintenance interrupt (INTID 25 on QEMU virt).
pub const PPI_MAINTENANCE: u32 = 25;
/// INTIDs 1020..=1023 are special (spurious).
const SPURIOUS_MIN: u32 = 1020;

// Distributor registers.
const GICD_CTLR: u64 = 0x0;
const GICD_CTLR_RWP: u32 = 1 << 31;
const GICD_CTLR_ARE: u32 = 1 << 4;
const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
// Redistributor RD_base frame.
const GICR_CTLR: u64 = 0x0;
const GICR_CTLR_RWP: u32 = 1 << 3;
const GICR_TYPER: u64 = 0x8;
const GICR_TYPER_VLPIS: u64 = 1 << 1;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_WAKER: u64 = 0x14;
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
// Redistributor SGI_base frame (RD_base + 64 KiB).
const SGI_BASE: u64 = 0x1_0000;
const GICR_IGROUPR0: u64 = SGI_BASE + 0x80;
const GICR_ISENABLER0: u64 = SGI_BASE + 0x100;
const GICR_ICENABLER0: u64 = SGI_BASE + 0x180;
const GICR_ICPENDR0: u64 = SGI_BASE + 0x280;
const GICR_IPRIORITYR: u64 = SGI_BASE + 0x400;
/// Priority of every interrupt we enable (lower is more urgent; any value
/// below the PMR of 0xff is delivered).
const PRIORITY: u8 = 0xa0;

/// Why the GIC could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicError {
    /// The device tree has no GICv3 (or the image was booted without
    /// `gic-version=3`).
    NotPresent,
    /// No redistributor claims this CPU's affinity (MPIDR value).
    NoRedistributor(u64),
    /// A register write did not complete (RWP / ChildrenAsleep stuck): the
    /// GIC model or our set-up is broken.
    Timeout(&'static str),
}

impl core::fmt::Display for GicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GicError::NotPresent => write!(f, "no GICv3 in the device tree"),
            GicError::NoRedistributor(m) => {
                write!(f, "no GICv3 redistributor for MPIDR affinity {m:#x}")
            }
            GicError::Timeout(what) => write!(f, "GICv3 did not complete: {what}"),
        }
    }
}

static GICD: AtomicU64 = AtomicU64::new(0);
static GICR: AtomicU64 = AtomicU64::new(0);
/// Each CPU's redistributor (RD_base), 0 until [`init_cpu`] ran there.
static RD: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Each CPU's MPIDR affinity (for SGI targeting), valid once RD is set.
static AFF: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Interrupts acknowledged per CPU (statistics).
static ACKED: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

fn rd32(addr: u64) -> u32 {
    // SAFETY: `addr` is a GIC register inside the distributor or a
    // redistributor frame found in the device tree; the EL2 identity map
    // maps everything below RAM as Device-nGnRE.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`; GICR_TYPER allows 64-bit accesses.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn wait(what: &'static str, mut done: impl FnMut() -> bool) -> Result<(), GicError> {
    for _ in 0..10_000_000u32 {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(GicError::Timeout(what))
}

/// Boot CPU, once: records the bases (from the device tree) and enables
/// affinity routing and group 1 in the distributor.
///
/// # Errors
/// [`GicError::NotPresent`] when either base is 0; a timeout.
pub fn init_global(gicd: u64, gicr: u64) -> Result<(), GicError> {
    if gicd == 0 || gicr == 0 {
        return Err(GicError::NotPresent);
    }
    GICD.store(gicd, Ordering::Relaxed);
    GICR.store(gicr, Ordering::Relaxed);
    let ctlr = gicd + GICD_CTLR;
    // ARE first (it may only change while the groups are disabled), then
    // the group enable.
    wr32(ctlr, 0);
    wait("GICD_CTLR.RWP", || rd32(ctlr) & GICD_CTLR_RWP == 0)?;
    wr32(ctlr, GICD_CTLR_ARE);
    wait("GICD_CTLR.RWP", || rd32(ctlr) & GICD_CTLR_RWP == 0)?;
    wr32(ctlr, GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
    wait("GICD_CTLR.RWP", || rd32(ctlr) & GICD_CTLR_RWP == 0)?;
    Ok(())
}

/// The redistributor whose GICR_TYPER affinity is `aff` (MPIDR layout
/// Aff3.Aff2.Aff1.Aff0 in TYPER bits 63:32).
fn find_redistributor(aff: u64) -> Option<u64> {
    let want = ((aff >> 32) & 0xff) << 24 | (aff & 0xff_ffff);
    let mut rd = GICR.load(Ordering::Relaxed);
    for _ in 0..256 {
        let typer = rd64(rd + GICR_TYPER);
        if typer >> 32 == want {
            return Some(rd);
        }
        if typer & GICR_TYPER_LAST != 0 {
            return None;
        }
        rd += if typer & GICR_TYPER_VLPIS != 0 {
            0x4_0000
        } else {
            0x2_0000
        };
    }
    None
}

/// Per CPU (after [`init_global`]): wakes this CPU's redistributor, puts
/// SGIs and PPIs in group 1 with one priority, enables [`SGI_KICK`] and the
/// EL2 physical timer PPI, and turns the CPU interface on (system register
/// interface at EL2 and EL1, PMR open, group 1 enabled).
///
/// # Errors
/// See [`GicError`].
pub fn init_cpu(cpu: usize) -> Result<(), GicError> {
    if GICR.load(Ordering::Relaxed) == 0 || cpu >= MAX_CPUS {
        return Err(GicError::NotPresent);
    }
    let aff = super::sysreg::mpidr();
    let rd = find_redistributor(aff).ok_or(GicError::NoRedistributor(aff))?;
    // Wake the redistributor.
    let waker = rd + GICR_WAKER;
    wr32(waker, rd32(waker) & !WAKER_PROCESSOR_SLEEP);
    wait("GICR_WAKER.ChildrenAsleep", || {
        rd32(waker) & WAKER_CHILDREN_ASLEEP == 0
    })?;
    // SGIs and PPIs: everything off and not pending, group 1, one priority.
    wr32(rd + GICR_ICENABLER0, u32::MAX);
    wait("GICR_CTLR.RWP", || {
        rd32(rd + GICR_CTLR) & GICR_CTLR_RWP == 0
    })?;
    wr32(rd + GICR_ICPENDR0, u32::MAX);
    wr32(rd + GICR_IGROUPR0, u32::MAX);
    let prio = u32::from_ne_bytes([PRIORITY; 4]);
    for i in 0..8 {
        wr32(rd + GICR_IPRIORITYR + 4 * i, prio);
    }
    wr32(
        rd + GICR_ISENABLER0,
        (1 << SGI_KICK) | (1 << super::timer::ppi()) | (1 << PPI_VTIMER) | (1 << PPI_MAINTENANCE),
    );
    // CPU interface: SRE | DFB | DIB | Enable (EL1 may use the system
    // register interface too).
    if super::el1boot::current_el() == 2 {
        // At EL1 the hypervisor set it, and cached the counts, before the
        // drop (`el1boot::enter_host`).
        write_sysreg!("icc_sre_el2", 0xf);
        super::sysreg::isb();
        super::switch::cache_gic_counts();
    }
    write_sysreg!("icc_pmr_el1", 0xff);
    write_sysreg!("icc_bpr1_el1", 0);
    // EOImode 0: a write to ICC_EOIR1_EL1 also deactivates.
    write_sysreg!("icc_ctlr_el1", 0);
    write_sysreg!("icc_igrpen1_el1", 1);
    super::sysreg::isb();
    AFF[cpu].store(aff, Ordering::Relaxed);
    RD[cpu].store(rd, Ordering::Release);
    // The hypervisor's own copy: recorded once, at EL2, by the CPU itself.
    let _ = HYP_RD[cpu].compare_exchange(0, rd, Ordering::AcqRel, Ordering::Acquire);
    Ok(())
}

/// Per CPU: the redistributor the hypervisor masks the virtual timer at
/// ([`set_vtimer_masked`], which `VCPU_RUN` calls at EL2), its own copy
/// in its own data, never the GIC driver's [`RD`] (host memory, which a
/// host could point anywhere to make the hypervisor write there).
#[link_section = ".bss.hyp.gic_rd"]
static HYP_RD: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Per CPU: whether [`PPI_VTIMER`] is masked (disabled at the
/// redistributor) right now (the hypervisor's).
#[link_section = ".bss.hyp.gic_vtimer_masked"]
static VTIMER_MASKED: [core::sync::atomic::AtomicBool; MAX_CPUS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; MAX_CPUS];

/// Per CPU: [`VTIMER_MASKED`]'s counterpart of the VMM at EL1 (host
/// memory).
static HOST_VTIMER_MASKED: [core::sync::atomic::AtomicBool; MAX_CPUS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; MAX_CPUS];

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 2] {
    [
        ("gic::HYP_RD", HYP_RD.as_ptr() as u64),
        ("gic::VTIMER_MASKED", VTIMER_MASKED.as_ptr() as u64),
    ]
}

/// Masks (disables) or unmasks this CPU's virtual-timer PPI at its
/// redistributor (the hypervisor's record of it); a no-op when it is
/// already so or the CPU has none.
pub fn set_vtimer_masked(cpu: usize, masked: bool) {
    // The VMM at EL1 masks it through its own records (host memory: it
    // owns the GIC, and may not read the hypervisor's).
    let (flags, rds) = if super::el1boot::current_el() == 2 {
        (&VTIMER_MASKED, &HYP_RD)
    } else {
        (&HOST_VTIMER_MASKED, &RD)
    };
    let (Some(flag), Some(rd)) = (flags.get(cpu), rds.get(cpu)) else {
        return;
    };
    let rd = rd.load(Ordering::Acquire);
    if rd == 0 || flag.load(Ordering::Relaxed) == masked {
        return;
    }
    if masked {
        wr32(rd + GICR_ICENABLER0, 1 << PPI_VTIMER);
        let _ = wait("GICR_CTLR.RWP", || {
            rd32(rd + GICR_CTLR) & GICR_CTLR_RWP == 0
        });
    } else {
        wr32(rd + GICR_ISENABLER0, 1 << PPI_VTIMER);
    }
    flag.store(masked, Ordering::Relaxed);
}

/// INTID of the EL1 physical timer (the host's timer) on QEMU virt.
pub const PPI_EL1_PHYS: u32 = 30;

/// The address of `cpu`'s `GICR_ISENABLER0` (`GICR_ICENABLER0` is 0x80
/// above), for a host GIC driver that enables its own PPIs.
pub fn isenabler0(cpu: usize) -> Option<u64> {
    cpu_ready(cpu).then(|| RD[cpu].load(Ordering::Acquire) + GICR_ISENABLER0)
}

/// The address of the GIC driver's record of `cpu`'s redistributor (a
/// static in host memory), for `host-attack`, whose host overwrites it.
pub fn rd_record_addr(cpu: usize) -> Option<u64> {
    RD.get(cpu).map(|r| r.as_ptr() as u64)
}

/// Whether [`init_cpu`] succeeded on `cpu`.
pub fn cpu_ready(cpu: usize) -> bool {
    RD.get(cpu).is_some_and(|r| r.load(Ordering::Acquire) != 0)
}

/// Acknowledges the highest-priority pending group-1 interrupt: its INTID,
/// or `None` if nothing is pending (spurious).
pub fn ack() -> Option<u32> {
    let intid = (read_sysreg!("icc_iar1_el1") & 0xff_ffff) as u32;
    (intid < SPURIOUS_MIN).then_some(intid)
}

/// Ends interrupt `intid` (priority drop and deactivation, EOImode 0).
pub fn eoi(intid: u32) {
    write_sysreg!("icc_eoir1_el1", intid as u64);
    super::sysreg::isb();
}

/// What [`drain`] acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// The EL2 timer fired (the preemption tick).
    pub timer: bool,
    /// A kick SGI arrived.
    pub kick: bool,
    /// Any other interrupt (acknowledged and ended, otherwise ignored).
    pub other: u32,
}

impl Drained {
    /// Whether nothing at all was pending.
    pub fn is_empty(&self) -> bool {
        !self.timer && !self.kick && self.other == 0
    }
}

/// Acknowledges and ends every pending interrupt of this CPU. The timer
/// interrupt is level-triggered: its handler ([`super::timer::disable`])
/// stops the timer before the EOI so it does not fire again at once.
pub fn drain() -> Drained {
    let mut d = Drained::default();
    let cpu = super::start::cpu_index();
    for _ in 0..64 {
        let Some(intid) = ack() else { break };
        match intid {
            i if i == super::timer::ppi() => {
                super::timer::disable();
                d.timer = true;
            }
            SGI_KICK => d.kick = true,
            _ => d.other += 1,
        }
        eoi(intid);
        if let Some(c) = ACKED.get(cpu) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    d
}

/// Interrupts acknowledged on `cpu` so far.
pub fn acked(cpu: usize) -> usize {
    ACKED.get(cpu).map_or(0, |c| c.load(Ordering::Relaxed))
}

/// ICC_SGI1R_EL1 value for `intid` to the CPU with affinity `aff`.
fn sgi1r(intid: u32, aff: u64) -> u64 {
    let aff0 = aff & 0xf;
    let aff1 = (aff >> 8) & 0xff;
    let aff2 = (aff >> 16) & 0xff;
    let aff3 = (aff >> 32) & 0xff;
    (1u64 << aff0) | (aff1 << 16) | ((intid as u64 & 0xf) << 24) | (aff2 << 32) | (aff3 << 48)
}

/// Sends SGI `intid` (group 1) to physical CPU `cpu` (ignored if that CPU's
/// interface is not up, or `cpu` is out of range).
pub fn send_sgi(intid: u32, cpu: usize) {
    if !cpu_ready(cpu) {
        return;
    }
    let aff = AFF[cpu].load(Ordering::Relaxed);
    // Make earlier stores (e.g. a run-queue update) visible before the SGI.
    super::sysreg::dsb_ish();
    write_sysreg!("icc_sgi1r_el1", sgi1r(intid, aff));
    super::sysreg::isb();
}

/// Sends SGI `intid` to every other CPU (IRM = 1).
pub fn send_sgi_others(intid: u32) {
    super::sysreg::dsb_ish();
    write_sysreg!("icc_sgi1r_el1", (1 << 40) | ((intid as u64 & 0xf) << 24));
    super::sysreg::isb();
}

/// HCR_EL2 while this CPU idles in the hypervisor: RW, and IMO/FMO so that
/// physical interrupts target EL2 (where PSTATE.I masks them): only then is
/// a pending IRQ architecturally a wake-up event for `wfi` at EL2.
const HCR_IDLE: u64 = (1 << 31) | (1 << 4) | (1 << 3);

/// Waits (`wfi`) until an interrupt is pending for this CPU, then
/// acknowledges everything pending and says what it was. Interrupts stay
/// masked at EL2 throughout.
pub fn wait_for_interrupt() -> Drained {
    // At EL1 (the VMM there, `IMO` clear) interrupts target EL1 already.
    if super::el1boot::current_el() == 2 {
        write_sysreg!("hcr_el2", HCR_IDLE);
        super::sysreg::isb();
    }
    // SAFETY: `wfi` only waits; PSTATE.I is set at EL2, so the wake-up
    // interrupt is not taken and no handler runs.
    unsafe { core::arch::asm!("dsb sy", "wfi", options(nostack, preserves_flags)) };
    drain()
}
