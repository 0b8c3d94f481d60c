//! A VM's system registers in the EL2 image: pkvm-sysreg's policy (the
//! VM's sanitised features and the trap controls they give) and what the
//! backend does with a trapped access.
//!
//! - EC 0x18 (`MSR`/`MRS`/`SYS`): [`pkvm_sysreg::handle_sysreg_trap`] over
//!   the vCPU's [`VcpuSysregs`]: `Handled` completes the access (Rt written,
//!   PC + 4); `InjectUndef` makes the guest take an UNDEF; `Hook`: the EL1
//!   physical timer and counter are emulated here ([`ptimer`]), SGI
//!   generation goes to the VM's vGIC ([`Action::Sgi`]), PMU registers
//!   (visible only to a VM offered a PMU) to the vCPU's virtual PMU
//!   ([`Action::Pmu`], pkvm-sysreg's `VirtPmu`, held by the backend), a
//!   data-cache set/way instruction becomes a clean and invalidate of the
//!   VM's stage-2-mapped memory by VA ([`Action::SetWayFlush`], KVM's
//!   answer).
//! - Any other synchronous exception class the backend does not handle
//!   (SVE/SME/PAC traps of a VM not offered them, EC 0, classes this code
//!   does not know): an UNDEF ([`pkvm_sysreg::handle_feature_trap`]), the VM
//!   lives.
//!
//! The UNDEF itself is [`pkvm_sysreg::inject_undef`] over the vCPU's saved
//! EL1 state (the backend does it, it holds the state).

use pkvm_arch::esr::{ec, Esr};
use pkvm_sysreg::traps::TrapControls;
use pkvm_sysreg::{
    handle_feature_trap, handle_sysreg_trap, lookup, set_way, Direction, Done, Encoding, Handler,
    Hook, HookCall, HostFeature, HostIds, IdError, IdOverrides, IdReg, Offer, Outcome, SetWay,
    VcpuSysregs, Via, Visibility, VmFeatures, When, REGISTERS, SWITCHED,
};

/// A VM's system-register policy, fixed at creation and shared by its vCPUs.
#[derive(Clone, Copy, Debug)]
pub struct VmPolicy {
    /// The VM's sanitised ID registers and offered features.
    pub features: VmFeatures,
    /// `HCR_EL2`, `CPTR_EL2`, `MDCR_EL2`, `CNTHCTL_EL2`, `MPAM2_EL2` for it.
    pub traps: TrapControls,
}

impl VmPolicy {
    /// The policy for a VM configured with `cfg` on a CPU identified by `host`.
    ///
    /// # Errors
    /// The configuration asks for more than the host has (the error names
    /// the field or feature).
    pub fn new(host: &HostIds, cfg: &IdOverrides) -> Result<VmPolicy, IdError> {
        let features = VmFeatures::new(host, cfg)?;
        Ok(VmPolicy {
            traps: TrapControls::new(&features),
            features,
        })
    }

    /// The default VM configuration: no SVE (a VM gets it when its
    /// configuration asks, [`IdOverrides::with_sve`]), no PMU (no virtual
    /// PMU yet), pointer authentication as the host has it.
    pub fn default_for(host: &HostIds) -> Result<VmPolicy, IdError> {
        VmPolicy::new(host, &IdOverrides::new())
    }

    /// Whether the VM has pointer authentication (keys switched, not trapped).
    pub fn pauth(&self) -> bool {
        self.features.has(Offer::PAuth)
    }

    /// The value the EL2 vectors answer a trapped `CTR_EL0` read with
    /// (`GuestRegs::ctr_el0`): the table's own answer (the row always
    /// visible, read from the VM's sanitised ID registers), or 0 — every
    /// read then takes the table's path — should the table ever answer it
    /// otherwise.
    pub fn ctr_fast(&self) -> u64 {
        let row = lookup(CTR_EL0).map(|r| (REGISTERS[r].vis, REGISTERS[r].handler));
        match row {
            Some((Visibility::Always, Handler::Id(IdReg::Ctr))) => self.features.id(IdReg::Ctr),
            _ => 0,
        }
    }
}

/// `CTR_EL0`.
pub const CTR_EL0: Encoding = Encoding::new(3, 3, 0, 0, 1);

/// Why an UNDEF was injected (for the log line and the statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UndefCause {
    /// A system-register access the table refuses (row, or `None`: an
    /// encoding outside the table).
    Sysreg(Option<usize>, Encoding),
    /// A hook without a model here.
    Hook(Hook, usize),
    /// A PMU access the virtual PMU refuses (row): a write-only or
    /// read-only register, a counter beyond `PMCR_EL0.N`.
    Pmu(usize),
    /// Another exception class (SVE, SME, PAC, unknown...).
    Class(u8),
}

impl core::fmt::Display for UndefCause {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            UndefCause::Sysreg(Some(row), _) => write!(f, "EC 0x18, {}", REGISTERS[row]),
            UndefCause::Sysreg(None, enc) => write!(f, "EC 0x18, {enc} (not in the table)"),
            UndefCause::Hook(h, row) => {
                write!(f, "EC 0x18, {} ({h:?}: no model yet)", REGISTERS[row])
            }
            UndefCause::Pmu(row) => write!(f, "EC 0x18, {} (virtual PMU)", REGISTERS[row]),
            UndefCause::Class(c) => write!(f, "EC {c:#x} ({})", class_name(c)),
        }
    }
}

fn class_name(c: u8) -> &'static str {
    match c {
        ec::UNKNOWN => "unknown",
        ec::SVE => "SVE not offered",
        0x1d => "SME not offered",
        ec::PAC => "pointer authentication not offered",
        _ => "not handled by the hypervisor",
    }
}

/// What the backend does after a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Complete the access: this outcome applied to the guest's registers.
    Complete(Outcome),
    /// A write to the emulated EL1 physical timer: complete it like
    /// [`Action::Complete`], then its interrupt line and deadline need a
    /// fresh look (the backend's full exit path, not the fast one).
    TimerWrite(Outcome),
    /// Inject an UNDEF.
    Undef(UndefCause),
    /// A data-cache set/way instruction (pkvm-sysreg's [`set_way`]):
    /// clean and invalidate the VM's stage-2-mapped memory by VA, then
    /// complete it (PC + 4).
    SetWayFlush,
    /// A write to `ICC_SGI1R_EL1` (`group1`), `ICC_SGI0R_EL1` or
    /// `ICC_ASGI1R_EL1` (with one security state, KVM's vGIC and this one
    /// treat ASGI1R as generating Group 0 SGIs): the vGIC sends it, then the
    /// access completes (PC + 4).
    Sgi {
        /// The value written.
        value: u64,
        /// `ICC_SGI1R_EL1`.
        group1: bool,
    },
    /// A PMU register access: the vCPU's virtual PMU answers it.
    Pmu(HookCall),
}

/// An EC 0x18 trap: the table's answer, with the timer hook applied.
/// `now` is the physical counter.
pub fn sysreg_trap(
    regs: &mut VcpuSysregs,
    policy: &VmPolicy,
    esr: Esr,
    x: &[u64; 31],
    now: u64,
) -> Action {
    let out = handle_sysreg_trap(regs, &policy.features, esr, x);
    match out {
        Outcome::Handled(_) => Action::Complete(out),
        Outcome::InjectUndef => {
            let enc = pkvm_sysreg::SysregTrap::decode(esr).map(|t| t.enc);
            let enc = enc.unwrap_or(Encoding::new(0, 0, 0, 0, 0));
            Action::Undef(UndefCause::Sysreg(lookup(enc), enc))
        }
        Outcome::Hook(call) if call.hook == Hook::Timer => match ptimer(regs, &call, now) {
            Some(done @ Done::Write) => Action::TimerWrite(Outcome::Handled(done)),
            Some(done) => Action::Complete(Outcome::Handled(done)),
            None => Action::Undef(UndefCause::Hook(call.hook, call.row)),
        },
        Outcome::Hook(call) if call.hook == Hook::Sgi && call.trap.dir == Direction::Write => {
            Action::Sgi {
                value: call.value,
                group1: REGISTERS[call.row].enc == ICC_SGI1R,
            }
        }
        Outcome::Hook(call) if call.hook == Hook::Pmu => Action::Pmu(call),
        Outcome::Hook(call) if set_way(&call) == Some(SetWay::FlushVm) => Action::SetWayFlush,
        Outcome::Hook(call) => Action::Undef(UndefCause::Hook(call.hook, call.row)),
    }
}

/// `ICC_SGI1R_EL1`.
const ICC_SGI1R: Encoding = Encoding::new(3, 0, 12, 11, 5);

/// The emulated EL1 physical timer's `CNTP_CTL_EL0` (ENABLE, IMASK) and
/// `CNTP_CVAL_EL0` from the vCPU's register file.
pub fn ptimer_regs(regs: &VcpuSysregs) -> (u64, u64) {
    match (lookup(CNTP_CTL), lookup(CNTP_CVAL)) {
        (Some(c), Some(v)) => (regs.get(c) & CTL_WRITABLE, regs.get(v)),
        _ => (0, 0),
    }
}

/// A synchronous exception of a class the backend does not handle itself.
pub fn other_trap(policy: &VmPolicy, esr: Esr) -> UndefCause {
    // `None` (an SVE trap of a VM that has SVE, lazily switched) cannot
    // happen: the world switch switches SVE eagerly and leaves
    // CPTR_EL2.TZ clear for such a VM. Should it, an UNDEF too.
    let _ = handle_feature_trap(&policy.features, esr);
    UndefCause::Class(esr.ec())
}

const CNTP_CTL: Encoding = Encoding::new(3, 3, 14, 2, 1);
const CNTP_CVAL: Encoding = Encoding::new(3, 3, 14, 2, 2);
const CNTP_TVAL: Encoding = Encoding::new(3, 3, 14, 2, 0);
/// `CNTP_CTL_EL0`: ENABLE and IMASK are writable; ISTATUS (bit 2) is computed.
const CTL_WRITABLE: u64 = 0b11;
const CTL_ISTATUS: u64 = 0b100;

/// The EL1 physical timer and counter, minimally: the VM's physical count
/// is the machine's (no offset), `CNTP_CTL`/`CNTP_CVAL` are kept in the
/// vCPU's register file and ISTATUS is computed on read. Its interrupt
/// (PPI 30) is driven by the backend after each exit ([`ptimer_regs`]). `None`: an access the architecture UNDEFs (a
/// write to the counter).
pub fn ptimer(regs: &mut VcpuSysregs, call: &HookCall, now: u64) -> Option<Done> {
    let rt = call.trap.rt;
    let read = |value| Some(Done::Read { rt, value });
    let enc = REGISTERS[call.row].enc;
    let ctl_row = lookup(CNTP_CTL)?;
    let cval_row = lookup(CNTP_CVAL)?;
    let cval = regs.get(cval_row);
    match (call.trap.dir, enc) {
        (Direction::Read, e) if e == CNTP_CTL => {
            let ctl = regs.get(ctl_row) & CTL_WRITABLE;
            let fired = ctl & 1 != 0 && now >= cval;
            read(ctl | if fired { CTL_ISTATUS } else { 0 })
        }
        (Direction::Write, e) if e == CNTP_CTL => {
            regs.set(ctl_row, call.value & CTL_WRITABLE);
            Some(Done::Write)
        }
        (Direction::Read, e) if e == CNTP_CVAL => read(cval),
        (Direction::Write, e) if e == CNTP_CVAL => {
            regs.set(cval_row, call.value);
            Some(Done::Write)
        }
        // TimerValue: the low 32 bits of CVAL - count, signed on write.
        (Direction::Read, e) if e == CNTP_TVAL => read(cval.wrapping_sub(now) & 0xffff_ffff),
        (Direction::Write, e) if e == CNTP_TVAL => {
            let tval = call.value as u32 as i32 as i64 as u64;
            regs.set(cval_row, now.wrapping_add(tval));
            Some(Done::Write)
        }
        // CNTPCT_EL0, CNTPCTSS_EL0.
        (Direction::Read, _) => read(now),
        (Direction::Write, _) => None,
    }
}

/// Rate limit of the UNDEF log lines: the first 4 of a vCPU, then the
/// 8th, 16th, 32nd... (no clock involved).
pub fn undef_logged(n: u64) -> bool {
    n <= 4 || n.is_power_of_two()
}

/// Adds a vCPU's per-row trap counts to `sums` (one slot per table row).
pub fn add_traps(sums: &mut [u64], v: &VcpuSysregs) {
    for (row, s) in sums.iter_mut().enumerate() {
        *s += u64::from(v.trap_count(row));
    }
}

/// The `count` rows with the most traps in `sums` (from [`add_traps`]),
/// most first (row, traps); rows without traps are left out.
pub fn top_traps(sums: &[u64], count: usize) -> alloc::vec::Vec<(usize, u64)> {
    let mut rows: alloc::vec::Vec<(usize, u64)> = sums
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, n)| n > 0)
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    rows.truncate(count);
    rows
}

/// The registers a world switch handles, by lower-case architectural name.
#[derive(Clone, Copy, Debug)]
pub struct WorldSwitchCover<'a> {
    /// Guest registers saved and restored on every switch.
    pub guest: &'a [&'a str],
    /// Pointer-authentication keys, switched when the VM has them.
    pub pac_keys: &'a [&'a str],
    /// EL2 registers loaded per vCPU or per VM.
    pub el2: &'a [&'a str],
    /// Registers switched for a VM with SVE (besides Z/P/FFR).
    pub sve: &'a [&'a str],
}

/// Checks pkvm-sysreg's [`SWITCHED`] list against what the world switch
/// covers on a host with `host`'s features: every register a guest uses
/// without a trap must be switched (or reach an EL2 stand-in the switch
/// loads), or the VM could see or change another's value. Returns how many
/// entries apply to this host.
///
/// Not checked here: the GIC CPU interface (the vGIC's), constants and
/// host read-only registers.
///
/// # Errors
/// The name of the first register the world switch misses.
pub fn check_switched(host: &HostIds, cover: &WorldSwitchCover<'_>) -> Result<usize, &'static str> {
    let has = |list: &[&str], name: &str| list.iter().any(|n| n.eq_ignore_ascii_case(name));
    let mut n = 0;
    for s in SWITCHED {
        let list = match s.when {
            When::Always => cover.guest,
            When::Host(f) if host.has(f) => cover.guest,
            When::Host(_) => continue,
            When::Offered(Offer::Sve) if host.has(HostFeature::Sve) => cover.sve,
            When::Offered(Offer::Sve) => continue,
            When::Offered(Offer::PAuth) => cover.pac_keys,
            When::Offered(_) => cover.guest,
        };
        let ok = match s.via {
            Via::WorldSwitch => has(list, s.name),
            Via::El2Register(r) => has(cover.el2, r),
            Via::GicCpuInterface | Via::Constant | Via::HostReadOnly => true,
        };
        if !ok {
            return Err(s.name);
        }
        n += 1;
    }
    Ok(n)
}
