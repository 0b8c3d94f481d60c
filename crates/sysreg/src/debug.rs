//! The guest's self-hosted debug state as the world switch loads it.
//!
//! Every debug register access traps (`MDCR_EL2.TDA/TDOSA/TDRA`) and lands
//! in the vCPU's [`VcpuSysregs`]: that file is the only copy, so the state
//! is per vCPU and moves with it between physical CPUs. For breakpoints,
//! watchpoints and single-step to fire, the hardware must hold the values
//! while the guest runs: [`guest_debug`] says what to load for one entry.
//!
//! Policy:
//! - Debug is *active* when the guest's `MDSCR_EL1` has MDE, KDE or SS set
//!   and its OS lock (`OSLSR_EL1.OSLK`) is clear: with the OS lock set the
//!   architecture generates no breakpoint, watchpoint or step exception,
//!   which is what leaving the hardware disabled gives.
//! - Only then does the world switch load `MDSCR_EL1` and the VM's
//!   breakpoints and watchpoints (as many as its ID view shows); on exit it
//!   puts the hypervisor's disabled state back (`MDSCR_EL1` = 0, every
//!   loaded `DBGBCR`/`DBGWCR` disabled), so no other VM runs with them.
//! - Values are masked again when loaded ([`DBGBCR_MASK`]/[`DBGWCR_MASK`]
//!   keep HMC clear, so no guest breakpoint or watchpoint can match at
//!   EL2). Debug exceptions go to the guest's own vectors:
//!   `MDCR_EL2.TDE` stays clear, the debug target is EL1, and EL2 (above
//!   it) takes none.

use crate::dispatch::VcpuSysregs;
use crate::enc::Encoding;
use crate::id::VmFeatures;
use crate::table::{lookup, DBGBCR_MASK, DBGWCR_MASK, MDSCR_MASK, OSLSR_OSLK};

/// `MDSCR_EL1.SS`: software step.
pub const MDSCR_SS: u64 = 1 << 0;
/// `MDSCR_EL1.KDE`: debug exceptions at EL1 (the debug target) itself.
pub const MDSCR_KDE: u64 = 1 << 13;
/// `MDSCR_EL1.MDE`: breakpoint and watchpoint exceptions.
pub const MDSCR_MDE: u64 = 1 << 15;
/// The most breakpoints or watchpoints the architecture has.
pub const MAX_POINTS: usize = 16;

/// One entry's hardware debug state of a vCPU whose debug is active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestDebug {
    /// `MDSCR_EL1`.
    pub mdscr: u64,
    /// Breakpoints to load (`DBGBVR/BCR<n>_EL1` for `n < brps`).
    pub brps: usize,
    /// Watchpoints to load (`DBGWVR/WCR<n>_EL1` for `n < wrps`).
    pub wrps: usize,
    /// `DBGBVR<n>_EL1`.
    pub bvr: [u64; MAX_POINTS],
    /// `DBGBCR<n>_EL1`.
    pub bcr: [u64; MAX_POINTS],
    /// `DBGWVR<n>_EL1`.
    pub wvr: [u64; MAX_POINTS],
    /// `DBGWCR<n>_EL1`.
    pub wcr: [u64; MAX_POINTS],
}

const MDSCR: Encoding = Encoding::new(2, 0, 0, 2, 2);
const OSLSR: Encoding = Encoding::new(2, 0, 1, 1, 4);

fn stored(regs: &VcpuSysregs, enc: Encoding) -> u64 {
    lookup(enc).map_or(0, |row| regs.get(row))
}

/// Whether the guest's debug is active (see the module documentation).
pub fn debug_active(regs: &VcpuSysregs) -> bool {
    let mdscr = stored(regs, MDSCR);
    // OSLSR_EL1.OSLK by encoding (a binary search, not `os_locked`'s scan
    // by name: this runs on every guest entry).
    mdscr & (MDSCR_MDE | MDSCR_KDE | MDSCR_SS) != 0 && stored(regs, OSLSR) & OSLSR_OSLK == 0
}

/// What the world switch loads for one entry of a vCPU with `regs` in a VM
/// with `vm`'s features: `None` when debug is not active (the hardware
/// keeps the hypervisor's disabled state).
pub fn guest_debug(regs: &VcpuSysregs, vm: &VmFeatures) -> Option<GuestDebug> {
    if !debug_active(regs) {
        return None;
    }
    let brps = usize::from(vm.breakpoints()).min(MAX_POINTS);
    let wrps = usize::from(vm.watchpoints()).min(MAX_POINTS);
    let mut d = GuestDebug {
        mdscr: stored(regs, MDSCR) & MDSCR_MASK,
        brps,
        wrps,
        bvr: [0; MAX_POINTS],
        bcr: [0; MAX_POINTS],
        wvr: [0; MAX_POINTS],
        wcr: [0; MAX_POINTS],
    };
    for n in 0..MAX_POINTS {
        let reg = |op2| stored(regs, Encoding::new(2, 0, 0, n as u8, op2));
        if n < brps {
            d.bvr[n] = reg(4);
            d.bcr[n] = reg(5) & DBGBCR_MASK;
        }
        if n < wrps {
            d.wvr[n] = reg(6);
            d.wcr[n] = reg(7) & DBGWCR_MASK;
        }
    }
    Some(d)
}

/// What a trapped data-cache set/way instruction (`DC ISW/CSW/CISW`,
/// `HCR_EL2.TSW`) asks of the hypervisor, as KVM answers it: set/way
/// operations cannot be virtualised (the VM does not own the caches, and
/// its vCPU may run on a different CPU whose caches hold its lines), so
/// every one becomes a clean and invalidate to the point of coherency, by
/// VA, of all the VM's memory mapped at stage 2; then the instruction
/// completes (PC + 4). An invalidate-only `DC ISW` is upgraded to clean and
/// invalidate: discarding dirty lines could lose another owner's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetWay {
    /// Clean and invalidate the VM's stage-2-mapped memory by VA, then
    /// complete the instruction.
    FlushVm,
}

/// The maintenance a [`crate::Hook::SetWay`] call needs: `None` for a
/// read-direction access (no such instruction: the caller injects an
/// UNDEF).
pub fn set_way(call: &crate::HookCall) -> Option<SetWay> {
    (call.hook == crate::Hook::SetWay && call.trap.dir == crate::Direction::Write)
        .then_some(SetWay::FlushVm)
}
