//! The vCPU's emulated register file and the trap dispatcher.

use pkvm_arch::esr::{ec, Esr};

use crate::enc::{Direction, SysregTrap, RT_XZR};
use crate::id::{Offer, VmFeatures};
use crate::table::{lookup, Handler, Hook, SysReg, Visibility, OSLSR_OSLK, REGISTERS, REG_COUNT};

/// One vCPU's emulated system registers (one slot per table row, used by
/// [`Handler::Storage`] and [`Handler::ReadOnly`] rows and free for the
/// hooks' use) and its per-register trap counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuSysregs {
    values: [u64; REG_COUNT],
    traps: [u32; REG_COUNT],
    unknown: u32,
}

impl Default for VcpuSysregs {
    fn default() -> Self {
        VcpuSysregs::new()
    }
}

impl VcpuSysregs {
    /// A vCPU at reset: every row holds its reset value, counters zero.
    pub fn new() -> VcpuSysregs {
        let mut v = VcpuSysregs {
            values: [0; REG_COUNT],
            traps: [0; REG_COUNT],
            unknown: 0,
        };
        v.reset();
        v
    }

    /// Puts every register back to its reset value (vCPU reset). The trap
    /// counters are statistics and survive.
    pub fn reset(&mut self) {
        for (v, r) in self.values.iter_mut().zip(REGISTERS.iter()) {
            *v = r.reset;
        }
    }

    /// The stored value of row `row`.
    ///
    /// # Panics
    /// If `row >= REG_COUNT` (a row index comes from [`crate::lookup`]: a
    /// bad one is a bug in the caller).
    pub fn get(&self, row: usize) -> u64 {
        self.values[row]
    }

    /// Stores `value` in row `row` as is (for the hooks and the world switch).
    ///
    /// # Panics
    /// If `row >= REG_COUNT`.
    pub fn set(&mut self, row: usize, value: u64) {
        self.values[row] = value;
    }

    /// How many traps row `row` has taken.
    pub fn trap_count(&self, row: usize) -> u32 {
        self.traps.get(row).copied().unwrap_or(0)
    }

    /// How many traps named an encoding outside the table.
    pub fn unknown_traps(&self) -> u32 {
        self.unknown
    }

    /// Whether the guest's OS lock is set (`OSLSR_EL1.OSLK`).
    pub fn os_locked(&self) -> bool {
        self.named("OSLSR_EL1") & OSLSR_OSLK != 0
    }

    fn named(&self, name: &str) -> u64 {
        REGISTERS
            .iter()
            .position(|r| r.name == name)
            .map_or(0, |i| self.values[i])
    }
}

/// A trap completed by the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Write `value` to `X<rt>` (nothing for XZR), then advance the PC by 4.
    Read {
        /// The general register.
        rt: u8,
        /// The value read.
        value: u64,
    },
    /// The write took effect; advance the PC by 4.
    Write,
}

/// A trap for a device model outside this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookCall {
    /// Which model.
    pub hook: Hook,
    /// The table row (for the register's name and its storage slot).
    pub row: usize,
    /// The decoded access.
    pub trap: SysregTrap,
    /// For a write, the value of Rt (0 for XZR).
    pub value: u64,
}

/// What the world switch does after a trapped access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Handled: complete it ([`Outcome::complete`]) and resume the guest.
    Handled(Done),
    /// The guest gets an UNDEF ([`crate::inject_undef`]); the PC is not advanced.
    InjectUndef,
    /// A device model must answer (PMU, physical timer, set/way, SGI).
    Hook(HookCall),
}

impl Outcome {
    /// Applies a [`Outcome::Handled`] to the guest's registers: the read
    /// value into `x[rt]` (unless XZR) and PC + 4. Other outcomes change nothing.
    pub fn complete(&self, x: &mut [u64; 31], pc: &mut u64) {
        if let Outcome::Handled(done) = *self {
            if let Done::Read { rt, value } = done {
                if let Some(r) = x.get_mut(usize::from(rt)) {
                    *r = value;
                }
            }
            *pc = pc.wrapping_add(4);
        }
    }
}

/// Whether the VM can see row `r`.
pub fn visible(r: &SysReg, vm: &VmFeatures) -> bool {
    match r.vis {
        Visibility::Always => true,
        Visibility::If(o) => vm.has(o),
        Visibility::Breakpoint(n) => n < vm.breakpoints(),
        Visibility::Watchpoint(n) => n < vm.watchpoints(),
        Visibility::PmuCounter(n) => vm.has(Offer::Pmu) && n < vm.pmu_counters(),
        Visibility::Ccidx => (vm.id(crate::IdReg::Mmfr2) >> 20) & 0xf != 0,
        Visibility::Hidden => false,
    }
}

/// Answers a trapped `MSR`/`MRS`/`SYS` (EC 0x18) from the table.
///
/// `x` holds the guest's general registers (for a write's value). An
/// encoding outside the table, a register the VM cannot see, a write to a
/// read-only register or a read of a write-only one is an
/// [`Outcome::InjectUndef`], as on real hardware; so is an `esr` of any
/// other exception class (the caller should not pass one). Never panics.
pub fn handle_sysreg_trap(
    regs: &mut VcpuSysregs,
    vm: &VmFeatures,
    esr: Esr,
    x: &[u64; 31],
) -> Outcome {
    let Some(trap) = SysregTrap::decode(esr) else {
        return Outcome::InjectUndef;
    };
    let Some(row) = lookup(trap.enc) else {
        regs.unknown = regs.unknown.saturating_add(1);
        return Outcome::InjectUndef;
    };
    regs.traps[row] = regs.traps[row].saturating_add(1);
    let r = &REGISTERS[row];
    if !visible(r, vm) {
        return Outcome::InjectUndef;
    }
    let wval = if trap.rt == RT_XZR {
        0
    } else {
        x[usize::from(trap.rt)]
    };
    let read = |value| Outcome::Handled(Done::Read { rt: trap.rt, value });
    match (r.handler, trap.dir) {
        // System instructions (op0 = 1) have no read form here (SYSL).
        (_, Direction::Read) if r.enc.op0 == 1 => Outcome::InjectUndef,
        (Handler::RazWi, Direction::Read) | (Handler::Raz, Direction::Read) => read(0),
        (Handler::RazWi, Direction::Write) => Outcome::Handled(Done::Write),
        (Handler::Id(id), Direction::Read) => read(vm.id(id)),
        (Handler::Clidr, Direction::Read) => read(vm.clidr()),
        (Handler::Ccsidr, Direction::Read) => {
            let csselr = crate::lookup_named("CSSELR_EL1").map_or(0, |i| regs.values[i]);
            read(vm.ccsidr(csselr))
        }
        (Handler::Storage { .. }, Direction::Read) | (Handler::ReadOnly, Direction::Read) => {
            read(regs.values[row])
        }
        (Handler::Storage { mask }, Direction::Write) => {
            regs.values[row] = (r.reset & !mask) | (wval & mask);
            Outcome::Handled(Done::Write)
        }
        (Handler::Oslar, Direction::Write) => {
            if let Some(i) = crate::lookup_named("OSLSR_EL1") {
                let lk = if wval & 1 != 0 { OSLSR_OSLK } else { 0 };
                regs.values[i] = (regs.values[i] & !OSLSR_OSLK) | lk;
            }
            Outcome::Handled(Done::Write)
        }
        (Handler::Hook(hook), _) => Outcome::Hook(HookCall {
            hook,
            row,
            trap,
            value: if trap.dir == Direction::Write {
                wval
            } else {
                0
            },
        }),
        // Writes to read-only registers, reads of write-only ones, Undef rows.
        (Handler::Raz, Direction::Write)
        | (Handler::Id(_), Direction::Write)
        | (Handler::Clidr, Direction::Write)
        | (Handler::Ccsidr, Direction::Write)
        | (Handler::ReadOnly, Direction::Write)
        | (Handler::Oslar, Direction::Read)
        | (Handler::Undef, _) => Outcome::InjectUndef,
    }
}

/// Answers the feature traps that are not EC 0x18: an SVE access (EC 0x19)
/// or SME access (EC 0x1D) the VM was not offered, a pointer-authentication
/// instruction (EC 0x09) without pointer authentication, an unknown
/// instruction (EC 0x00): all UNDEF. `None` for any other class (not a
/// feature trap: aborts, HVC, WFx... are the caller's).
///
/// An SVE trap from a VM that has SVE means the world switch deferred the
/// SVE state (lazy switching): `None`, the caller loads it and resumes.
pub fn handle_feature_trap(vm: &VmFeatures, esr: Esr) -> Option<Outcome> {
    const SME: u8 = 0x1d;
    match esr.ec() {
        ec::UNKNOWN | SME => Some(Outcome::InjectUndef),
        ec::SVE if !vm.has(Offer::Sve) => Some(Outcome::InjectUndef),
        ec::PAC if !vm.has(Offer::PAuth) => Some(Outcome::InjectUndef),
        _ => None,
    }
}
