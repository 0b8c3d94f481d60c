//! PSCI and SMCCC emulation for AArch64 guests, and the per-vCPU power state
//! it drives.
//!
//! # What a guest sees
//! The VM's [`PsciConfig`] fixes the PSCI version (0.2, 1.0, 1.1 or 1.3;
//! default 1.1), the conduit (HVC or SMC) and whether `SYSTEM_SUSPEND` is
//! offered. The function set follows the version:
//!
//! | version | functions |
//! |---------|-----------|
//! | 0.2 | `PSCI_VERSION`, `CPU_SUSPEND`, `CPU_OFF`, `CPU_ON`, `AFFINITY_INFO`, `MIGRATE_INFO_TYPE`, `SYSTEM_OFF`, `SYSTEM_RESET` |
//! | 1.0 | + `PSCI_FEATURES`, `SYSTEM_SUSPEND` (only if enabled) |
//! | 1.1 | + `SYSTEM_RESET2` |
//! | 1.3 | + `SYSTEM_OFF2` |
//!
//! `SMCCC_VERSION` (answers 1.1) and `SMCCC_ARCH_FEATURES` are answered at
//! every PSCI version, as KVM does. Everything else (including `MIGRATE`,
//! `MIGRATE_INFO_UP_CPU`, vendor hypercalls and the Spectre workaround
//! calls, which `SMCCC_ARCH_FEATURES` reports as not supported) returns
//! `NOT_SUPPORTED`. Functions with both SMC32 and SMC64 ids are offered in
//! both; for an SMC32 id only the low 32 bits of the arguments count.
//!
//! Choices where KVM or the specification leave room (documented, tested):
//! - A call on the wrong conduit (an SMC on an HVC VM or the reverse) or
//!   with a non-zero immediate is answered `NOT_SUPPORTED` in x0 (no
//!   exception is injected), like any unknown function.
//! - `CPU_SUSPEND` is emulated as WFI and returns `SUCCESS`; `CPU_ON` never
//!   returns `ON_PENDING`.
//! - `AFFINITY_INFO` rejects (`INVALID_PARAMETERS`) affinity fields set
//!   below `lowest_affinity_level` (KVM ignores them).
//! - `SYSTEM_RESET2` accepts type 0 (warm reset) and the vendor range
//!   `0x8000_0000..=0xffff_ffff`; any bit above 31 is `INVALID_PARAMETERS`.
//! - `SYSTEM_OFF2` accepts type 0 or `HIBERNATE_OFF` (0 means hibernate-off,
//!   as in KVM) with cookie 0.
//! - Every system event presets x0 = `INTERNAL_FAILURE` in case the VMM
//!   resumes the caller, `SYSTEM_SUSPEND` included; the event itself carries
//!   the call's arguments.
//!
//! # Concurrent system events
//! A VM has one [`SystemEventLatch`] ([`PsciVm::system_event_latch`]). The
//! first `SYSTEM_OFF`/`SYSTEM_OFF2`/`SYSTEM_RESET`/`SYSTEM_RESET2` latches
//! its event, then stops every vCPU, and only its caller gets
//! [`PsciOutcome::Exit`]. A system event request made while
//! one is latched (another vCPU trapped its call before it was stopped) is
//! merged into it and its caller gets [`PsciOutcome::PowerOff`] (it is
//! stopped): however many vCPUs ask at once, the VMM sees one exit, so a
//! VM is restarted exactly once. Merge rule, whatever the order: a
//! shutdown wins over a reset (a guest that asked to be off is never
//! restarted, as QEMU's main loop also puts a shutdown request before a
//! reset request); otherwise the first request stays (its flags and
//! arguments).
//!
//! The VMM acting on the exit must, before it acts: wait until every other
//! vCPU of the VM has left the guest and its run loop (so any call trapped
//! before the stop has been merged), then take the final event with
//! [`take_system_event`] and act on *its* kind. [`crate::reset::power_on_vm`]
//! clears the latch (a VMM that never takes it, or a restart, starts clean).
//! `SYSTEM_SUSPEND` is not latched (no vCPU changes state).
//!
//! # Locking
//! Each vCPU's [`VcpuPower`] lives in a `SpinLock` of class
//! [`LockClass::HostVcpu`] owned by the VM ([`PsciVm::vcpu_power`]). Every
//! read or write goes through its guard; this module never holds two vCPU
//! locks at once (system events stop the vCPUs one after another), and it
//! calls [`PsciVm::kick_vcpu`] only after releasing the lock. The system
//! event latch is a [`LockClass::Leaf`] lock: nothing is taken while it is
//! held. Callers of [`handle_psci`] must not hold a `HostVcpu` lock (or a
//! later class).

use core::fmt;
use core::ops::BitOr;

use pkvm_arch::esr::{ec, Esr};
use pkvm_arch::smccc::{arch, psci as fnid, FunctionId};
use pkvm_sync::{LockClass, SpinLock};

use crate::vcpu_state::{mpidr_affinity, GuestGprs, MPIDR_HWID_MASK};

/// A PSCI version a VM can be configured with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PsciVersion {
    /// PSCI 0.2.
    V0_2,
    /// PSCI 1.0.
    V1_0,
    /// PSCI 1.1 (the default).
    #[default]
    V1_1,
    /// PSCI 1.3 (adds `SYSTEM_OFF2`).
    V1_3,
}

impl PsciVersion {
    /// The value `PSCI_VERSION` returns (major in 31:16, minor in 15:0).
    pub const fn encoded(self) -> u32 {
        match self {
            PsciVersion::V0_2 => fnid::version(0, 2),
            PsciVersion::V1_0 => fnid::version(1, 0),
            PsciVersion::V1_1 => fnid::version(1, 1),
            PsciVersion::V1_3 => fnid::version(1, 3),
        }
    }

    /// The version whose encoding is `v`.
    ///
    /// # Errors
    /// [`PsciConfigError::UnsupportedVersion`] if the VMM asked for a version
    /// we do not emulate (0.1, 1.2, ...).
    pub const fn from_encoded(v: u32) -> Result<Self, PsciConfigError> {
        match v {
            0x0_0002 => Ok(PsciVersion::V0_2),
            0x1_0000 => Ok(PsciVersion::V1_0),
            0x1_0001 => Ok(PsciVersion::V1_1),
            0x1_0003 => Ok(PsciVersion::V1_3),
            _ => Err(PsciConfigError::UnsupportedVersion(v)),
        }
    }
}

/// How a VM's guest calls PSCI: the device tree's `/psci` `method`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Conduit {
    /// `HVC #0` (the default, as KVM).
    #[default]
    Hvc,
    /// `SMC #0`, trapped to EL2 by HCR_EL2.TSC.
    Smc,
}

impl Conduit {
    /// The device tree `method` string.
    pub const fn dt_method(self) -> &'static str {
        match self {
            Conduit::Hvc => "hvc",
            Conduit::Smc => "smc",
        }
    }
}

/// A VM's PSCI configuration, chosen by the VMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PsciConfig {
    /// The PSCI version the guest sees.
    pub version: PsciVersion,
    /// The conduit PSCI calls must use.
    pub conduit: Conduit,
    /// Whether `SYSTEM_SUSPEND` is offered (PSCI >= 1.0 only).
    pub system_suspend: bool,
}

/// A PSCI configuration the VMM asked for that we cannot provide (the
/// VMM's fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConfigError {
    /// The VMM asked for this encoded PSCI version.
    UnsupportedVersion(u32),
}

impl fmt::Display for PsciConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PsciConfigError::UnsupportedVersion(v) => write!(
                f,
                "VMM requested PSCI version {}.{}: only 0.2, 1.0, 1.1 and 1.3 are emulated",
                v >> 16,
                v & 0xffff
            ),
        }
    }
}

/// A vCPU's power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PowerState {
    /// Powered on: may run (when not waiting for an interrupt).
    Running,
    /// Powered off: must not run until a `CPU_ON` (or the VMM) powers it on.
    Stopped,
    /// Accepted `SYSTEM_SUSPEND`: waits for a wake-up interrupt, then
    /// restarts from the suspend entry point
    /// ([`VcpuPower::wake_from_suspend`]).
    Suspended,
}

/// Where and how a vCPU starts when its pending reset is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResetState {
    /// Entry point (PC).
    pub pc: u64,
    /// Context id, placed in x0.
    pub context_id: u64,
    /// Start with big-endian data accesses (SCTLR_EL1.EE/E0E).
    pub big_endian: bool,
    /// Whether this state is pending (consumed by the reset).
    pub reset: bool,
}

/// Pending vCPU requests, consumed by the vCPU's run loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Requests(u8);

impl Requests {
    /// No request.
    pub const NONE: Requests = Requests(0);
    /// Apply the pending [`ResetState`] before the next guest entry.
    pub const RESET: Requests = Requests(1 << 0);
    /// The vCPU was stopped: do not enter the guest until it is `Running`.
    pub const SLEEP: Requests = Requests(1 << 1);
    /// The vCPU was made `Running`: a sleeping run loop re-checks its state.
    pub const WAKE: Requests = Requests(1 << 2);

    /// Whether every request in `other` is set.
    pub const fn contains(self, other: Requests) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether no request is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    fn insert(&mut self, other: Requests) {
        self.0 |= other.0;
    }
    fn remove(&mut self, other: Requests) {
        self.0 &= !other.0;
    }
}

impl BitOr for Requests {
    type Output = Requests;
    fn bitor(self, rhs: Requests) -> Requests {
        Requests(self.0 | rhs.0)
    }
}

/// A vCPU's power state, pending reset state and pending requests: the data
/// behind its `SpinLock` (class [`LockClass::HostVcpu`], KVM's
/// `mp_state_lock`). Only reachable through the lock's guard.
///
/// Invariant: `Requests::RESET` is pending only together with a
/// [`ResetState`] whose `reset` flag is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuPower {
    state: PowerState,
    reset: ResetState,
    requests: Requests,
}

impl VcpuPower {
    /// A vCPU in `state` with nothing pending.
    pub const fn new(state: PowerState) -> Self {
        VcpuPower {
            state,
            reset: ResetState {
                pc: 0,
                context_id: 0,
                big_endian: false,
                reset: false,
            },
            requests: Requests::NONE,
        }
    }

    /// A powered-off vCPU's lock, of the right class. VMs create one per
    /// vCPU; [`crate::reset::power_on_vm`] then starts the boot vCPU.
    pub fn new_lock() -> SpinLock<VcpuPower> {
        SpinLock::new(VcpuPower::new(PowerState::Stopped), LockClass::HostVcpu)
    }

    /// The power state.
    pub const fn state(&self) -> PowerState {
        self.state
    }

    /// Whether the vCPU is powered off (KVM's `kvm_arm_vcpu_stopped`).
    pub const fn is_stopped(&self) -> bool {
        matches!(self.state, PowerState::Stopped)
    }

    /// The pending requests, without consuming them.
    pub const fn requests(&self) -> Requests {
        self.requests
    }

    /// The reset state (pending or not), without consuming it.
    pub const fn reset_state(&self) -> ResetState {
        self.reset
    }

    /// Takes and clears every pending request except `RESET`, which stays
    /// pending until [`VcpuPower::take_reset_state`] consumes it.
    pub fn take_requests(&mut self) -> Requests {
        let r = self.requests;
        self.requests = Requests(r.0 & Requests::RESET.0);
        r
    }

    /// Takes and clears the pending reset state (and the `RESET` request);
    /// `None` if no reset is pending.
    pub fn take_reset_state(&mut self) -> Option<ResetState> {
        self.requests.remove(Requests::RESET);
        if !self.reset.reset {
            return None;
        }
        let taken = self.reset;
        self.reset.reset = false;
        Some(taken)
    }

    /// Powers the vCPU on at `start`: stores it as the pending reset state
    /// (with `reset` set), requests `RESET` and `WAKE`, and makes it
    /// `Running`. The caller kicks the vCPU after dropping the guard.
    pub fn power_on(&mut self, start: ResetState) {
        self.reset = ResetState {
            reset: true,
            ..start
        };
        self.requests.insert(Requests::RESET | Requests::WAKE);
        self.state = PowerState::Running;
    }

    /// Powers the vCPU off: `Stopped`, with `SLEEP` requested. A pending
    /// reset state stays pending (it is overwritten by the next power-on).
    pub fn power_off(&mut self) {
        self.state = PowerState::Stopped;
        self.requests.insert(Requests::SLEEP);
    }

    /// Suspends the vCPU (an accepted `SYSTEM_SUSPEND`): on wake-up it
    /// restarts at `resume`.
    pub fn suspend(&mut self, resume: ResetState) {
        self.reset = ResetState {
            reset: true,
            ..resume
        };
        self.state = PowerState::Suspended;
    }

    /// A wake-up interrupt arrived: a `Suspended` vCPU becomes `Running`
    /// with its resume state pending as a reset (returns `true`); any other
    /// state is left alone (returns `false`).
    pub fn wake_from_suspend(&mut self) -> bool {
        if self.state != PowerState::Suspended {
            return false;
        }
        self.state = PowerState::Running;
        self.requests.insert(Requests::RESET | Requests::WAKE);
        true
    }
}

/// The VM as PSCI needs it. Implemented by the host's VM type (and by test
/// doubles).
///
/// vCPU indices are `0..vcpu_count()`; this module never passes an index
/// outside that range to the methods below.
pub trait PsciVm {
    /// The VM's PSCI configuration.
    fn psci_config(&self) -> PsciConfig;

    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;

    /// vCPU `index`'s power-state lock (class [`LockClass::HostVcpu`]).
    fn vcpu_power(&self, index: usize) -> &SpinLock<VcpuPower>;

    /// The VM's system event latch (class [`LockClass::Leaf`], made with
    /// [`SystemEventLatch::new_lock`]); see the module documentation.
    fn system_event_latch(&self) -> &SpinLock<SystemEventLatch>;

    /// Makes vCPU `index` notice new requests soon: wake it if it sleeps,
    /// force an exit if it runs guest code. Called without any vCPU lock
    /// held, after the request was published under the lock; it must not
    /// lose a wake-up that races with the target checking its state (use
    /// token semantics such as `Thread::unpark`, or an event counter).
    fn kick_vcpu(&self, index: usize);

    /// The affinity (MPIDR_EL1 & [`MPIDR_HWID_MASK`]) of vCPU `index`.
    /// Default: [`mpidr_affinity`], the layout the device tree also uses.
    fn vcpu_affinity(&self, index: usize) -> u64 {
        mpidr_affinity(index)
    }

    /// The vCPU whose affinity is `affinity` (already checked to have no
    /// bits outside [`MPIDR_HWID_MASK`]). Default: a linear search.
    fn vcpu_by_affinity(&self, affinity: u64) -> Option<usize> {
        (0..self.vcpu_count()).find(|&i| self.vcpu_affinity(i) == affinity)
    }
}

/// Who made a PSCI/SMCCC call, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PsciCaller {
    /// The calling vCPU's index.
    pub index: usize,
    /// The instruction used.
    pub conduit: Conduit,
    /// The instruction's 16-bit immediate (SMCCC requires 0).
    pub imm: u16,
    /// The caller's current data endianness (SCTLR_EL1.EE, see
    /// [`crate::vcpu_state::El1SysRegs::is_big_endian`]): a vCPU it powers
    /// on starts with the same endianness.
    pub big_endian: bool,
}

impl PsciCaller {
    /// A little-endian caller using `conduit` with immediate 0.
    pub const fn new(index: usize, conduit: Conduit) -> Self {
        PsciCaller {
            index,
            conduit,
            imm: 0,
            big_endian: false,
        }
    }

    /// The call described by a trap syndrome: `Some` for EC 0x16 (HVC from
    /// AArch64) and 0x17 (SMC from AArch64), `None` otherwise.
    pub const fn from_esr(index: usize, esr: Esr, big_endian: bool) -> Option<Self> {
        let conduit = match esr.ec() {
            ec::HVC64 => Conduit::Hvc,
            ec::SMC64 => Conduit::Smc,
            _ => return None,
        };
        Some(PsciCaller {
            index,
            conduit,
            imm: esr.imm16(),
            big_endian,
        })
    }
}

/// A system event: the VM asks its VMM to shut down, reset or suspend it.
/// The values follow KVM's `KVM_SYSTEM_EVENT_*` ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemEvent {
    /// What the guest asked for.
    pub kind: SystemEventKind,
    /// Flags qualifying `kind`: [`SystemEvent::FLAG_PSCI_RESET2`] on a
    /// `Reset`, [`SystemEvent::FLAG_PSCI_OFF2`] on a `Shutdown`.
    pub flags: u64,
    /// The call's arguments x1 and x2 (narrowed for SMC32 ids):
    /// `SYSTEM_RESET2` type and cookie; `SYSTEM_OFF2` type and cookie;
    /// `SYSTEM_SUSPEND` entry point and context id; zero otherwise.
    pub args: [u64; 2],
}

impl SystemEvent {
    /// On a `Reset`: the guest used `SYSTEM_RESET2` (type in `args[0]`).
    pub const FLAG_PSCI_RESET2: u64 = 1 << 0;
    /// On a `Shutdown`: the guest used `SYSTEM_OFF2` (hibernate-off).
    pub const FLAG_PSCI_OFF2: u64 = 1 << 0;
}

impl SystemEvent {
    /// The event that stands when `self` was latched first and `later`
    /// was requested while it was pending: a shutdown wins over a reset;
    /// otherwise `self` stays.
    pub const fn merged(self, later: SystemEvent) -> SystemEvent {
        match (self.kind, later.kind) {
            (SystemEventKind::Reset, SystemEventKind::Shutdown) => later,
            _ => self,
        }
    }
}

/// A VM's pending system event: the first of concurrent `SYSTEM_OFF*` /
/// `SYSTEM_RESET*` requests, merged with the ones that followed before
/// the VMM took it (see the module documentation). Lives in a `SpinLock`
/// of class [`LockClass::Leaf`] (nothing is taken while it is held).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemEventLatch {
    pending: Option<SystemEvent>,
    merged: u32,
}

impl SystemEventLatch {
    /// Nothing pending.
    pub const fn new() -> Self {
        SystemEventLatch {
            pending: None,
            merged: 0,
        }
    }

    /// An empty latch's lock, of the right class (one per VM).
    pub fn new_lock() -> SpinLock<SystemEventLatch> {
        SpinLock::new(SystemEventLatch::new(), LockClass::Leaf)
    }

    /// The pending event, without taking it.
    pub const fn pending(&self) -> Option<SystemEvent> {
        self.pending
    }

    /// Requests merged into the pending event so far (not counting the
    /// first).
    pub const fn merged_requests(&self) -> u32 {
        self.merged
    }

    /// Latches `ev`: `true` if nothing was pending (the caller owns the
    /// event and exits to the VMM), `false` if it was merged into the
    /// pending one.
    fn request(&mut self, ev: SystemEvent) -> bool {
        match self.pending {
            None => {
                self.pending = Some(ev);
                true
            }
            Some(first) => {
                self.pending = Some(first.merged(ev));
                self.merged += 1;
                false
            }
        }
    }

    /// Takes the pending event (merged), leaving the latch empty.
    pub fn take(&mut self) -> Option<SystemEvent> {
        self.merged = 0;
        self.pending.take()
    }
}

/// Takes `vm`'s pending system event: what the VMM must act on once the
/// vCPU that got [`PsciOutcome::Exit`] is its only vCPU still in a run
/// loop. `None` if none is pending (already taken, or the VM was powered on
/// again since).
pub fn take_system_event<V: PsciVm + ?Sized>(vm: &V) -> Option<SystemEvent> {
    vm.system_event_latch().lock().take()
}

/// The kind of a [`SystemEvent`] (KVM's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SystemEventKind {
    /// `SYSTEM_OFF` / `SYSTEM_OFF2`.
    Shutdown = 1,
    /// `SYSTEM_RESET` / `SYSTEM_RESET2`.
    Reset = 2,
    /// `SYSTEM_SUSPEND`: the VMM decides (see [`complete_system_suspend`]).
    Suspend = 5,
}

/// What the caller's run loop does after a PSCI/SMCCC call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the run loop must act on the outcome"]
pub enum PsciOutcome {
    /// Re-enter the guest; x0..x3 hold the results.
    Continue,
    /// `CPU_SUSPEND`: x0 = `SUCCESS`; treat as WFI (wait for an interrupt
    /// or a kick, then re-enter).
    WaitForInterrupt,
    /// `CPU_OFF`, or a system event request merged into the VM's pending
    /// one (x0 = `INTERNAL_FAILURE` then): the caller is `Stopped` with
    /// `SLEEP` requested. Re-enter only once its state is `Running` again
    /// (a `CPU_ON` may already have happened, so decide by the state, not
    /// by this outcome).
    PowerOff,
    /// Exit to the VMM with this event. For all but `Suspend`, every vCPU
    /// is now `Stopped` with `SLEEP` requested, the event is latched, and
    /// the VMM acts on [`take_system_event`] (requests from other vCPUs
    /// may have been merged into it). The caller's x0 is
    /// `INTERNAL_FAILURE` in case the VMM resumes it.
    Exit(SystemEvent),
    /// [`complete_system_suspend`] accepted the suspend: the caller is
    /// `Suspended`; wait for a wake-up interrupt, then call
    /// [`VcpuPower::wake_from_suspend`] and apply the reset.
    Suspended,
}

/// A PSCI call the host itself got wrong (a host bug, never the guest's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciError {
    /// The caller index is not a vCPU of this VM.
    CallerOutOfRange {
        /// The index passed in.
        caller: usize,
        /// The VM's vCPU count.
        vcpu_count: usize,
    },
}

impl fmt::Display for PsciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PsciError::CallerOutOfRange { caller, vcpu_count } => write!(
                f,
                "host bug: PSCI call from vCPU {caller} but the VM has {vcpu_count} vCPUs"
            ),
        }
    }
}

/// PSCI return codes as `i64` (the `RET_` prefix dropped).
mod r {
    pub use pkvm_arch::smccc::psci::{
        AFFINITY_OFF, AFFINITY_ON, RET_ALREADY_ON as ALREADY_ON, RET_DENIED as DENIED,
        RET_INTERNAL_FAILURE as INTERNAL_FAILURE, RET_INVALID_PARAMETERS as INVALID_PARAMETERS,
        RET_NOT_SUPPORTED as NOT_SUPPORTED, RET_SUCCESS as SUCCESS, TOS_NOT_PRESENT_MP,
    };
}

/// The functions we emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Version,
    CpuSuspend,
    CpuOff,
    CpuOn,
    AffinityInfo,
    MigrateInfoType,
    SystemOff,
    SystemReset,
    Features,
    SystemSuspend,
    SystemReset2,
    SystemOff2,
    SmcccVersion,
    SmcccArchFeatures,
}

/// The function `id` names on a VM configured with `cfg`, `None` if the VM
/// does not offer it.
fn decode(id: u32, cfg: &PsciConfig) -> Option<Call> {
    use PsciVersion::*;
    let v = cfg.version;
    let (call, since) = match id {
        fnid::VERSION => (Call::Version, V0_2),
        fnid::CPU_SUSPEND_32 | fnid::CPU_SUSPEND_64 => (Call::CpuSuspend, V0_2),
        fnid::CPU_OFF => (Call::CpuOff, V0_2),
        fnid::CPU_ON_32 | fnid::CPU_ON_64 => (Call::CpuOn, V0_2),
        fnid::AFFINITY_INFO_32 | fnid::AFFINITY_INFO_64 => (Call::AffinityInfo, V0_2),
        fnid::MIGRATE_INFO_TYPE => (Call::MigrateInfoType, V0_2),
        fnid::SYSTEM_OFF => (Call::SystemOff, V0_2),
        fnid::SYSTEM_RESET => (Call::SystemReset, V0_2),
        fnid::PSCI_FEATURES => (Call::Features, V1_0),
        fnid::SYSTEM_SUSPEND_32 | fnid::SYSTEM_SUSPEND_64 if cfg.system_suspend => {
            (Call::SystemSuspend, V1_0)
        }
        fnid::SYSTEM_RESET2_32 | fnid::SYSTEM_RESET2_64 => (Call::SystemReset2, V1_1),
        fnid::SYSTEM_OFF2_32 | fnid::SYSTEM_OFF2_64 => (Call::SystemOff2, V1_3),
        arch::SMCCC_VERSION => (Call::SmcccVersion, V0_2),
        arch::SMCCC_ARCH_FEATURES => (Call::SmcccArchFeatures, V0_2),
        _ => return None,
    };
    (v >= since).then_some(call)
}

impl PsciConfig {
    /// Whether a guest of this VM may call function `id` (anything else is
    /// answered `NOT_SUPPORTED`).
    pub fn offers(&self, id: u32) -> bool {
        decode(id, self).is_some()
    }
}

/// Handles the PSCI/SMCCC call vCPU `caller.index` made with `regs` (x0 =
/// function id in its low 32 bits, x1..x3 = arguments), writing the results
/// to x0..x3 and telling the run loop what to do next.
///
/// For a trapped SMC (whose ELR_EL2 points at the SMC itself) this advances
/// `regs.pc` by 4 first; after an HVC the PC already points past it. On
/// `Continue` and `WaitForInterrupt`, x0 holds the result and x1..x3 are 0;
/// on `Exit`, x0 = `INTERNAL_FAILURE` and x1..x3 are unchanged.
///
/// Must be called without any `HostVcpu` lock (or a later class) held.
///
/// # Errors
/// [`PsciError::CallerOutOfRange`] if `caller.index` is not a vCPU of `vm`
/// (a host bug; `regs` are left untouched). Nothing the guest passes is an
/// error: bad arguments are PSCI error codes in x0.
pub fn handle_psci<V: PsciVm + ?Sized>(
    vm: &V,
    caller: &PsciCaller,
    regs: &mut GuestGprs,
) -> Result<PsciOutcome, PsciError> {
    let vcpu_count = vm.vcpu_count();
    if caller.index >= vcpu_count {
        return Err(PsciError::CallerOutOfRange {
            caller: caller.index,
            vcpu_count,
        });
    }
    if caller.conduit == Conduit::Smc {
        regs.pc = regs.pc.wrapping_add(4);
    }
    let cfg = vm.psci_config();
    let id = regs.x[0] as u32;
    let call = if caller.conduit != cfg.conduit || caller.imm != 0 {
        None
    } else {
        decode(id, &cfg)
    };
    let Some(call) = call else {
        return Ok(ret(regs, r::NOT_SUPPORTED));
    };
    // SMCCC: an SMC32/HVC32 function only sees the low 32 bits of its
    // arguments (KVM's kvm_psci_narrow_to_32bit).
    let narrow = |v: u64| {
        if FunctionId(id).is_64() {
            v
        } else {
            v & 0xffff_ffff
        }
    };
    let a = [narrow(regs.x[1]), narrow(regs.x[2]), narrow(regs.x[3])];

    let outcome = match call {
        Call::Version => ret(regs, i64::from(cfg.version.encoded())),
        Call::CpuSuspend => {
            set_ret(regs, r::SUCCESS);
            PsciOutcome::WaitForInterrupt
        }
        Call::CpuOff => {
            vm.vcpu_power(caller.index).lock().power_off();
            set_ret(regs, r::SUCCESS);
            PsciOutcome::PowerOff
        }
        Call::CpuOn => {
            let v = cpu_on(vm, caller, a[0], a[1], a[2]);
            ret(regs, v)
        }
        Call::AffinityInfo => {
            let v = affinity_info(vm, a[0], a[1]);
            ret(regs, v)
        }
        Call::MigrateInfoType => ret(regs, r::TOS_NOT_PRESENT_MP),
        Call::SystemOff
        | Call::SystemReset
        | Call::SystemReset2
        | Call::SystemOff2
        | Call::SystemSuspend => system_call(vm, caller, regs, call, a),
        Call::Features => {
            let v = psci_features(&cfg, a[0]);
            ret(regs, v)
        }
        Call::SmcccVersion => ret(regs, i64::from(arch::VERSION_1_1)),
        Call::SmcccArchFeatures => {
            // Only the two architecture calls we implement; no firmware
            // workaround (WORKAROUND_1/2/3) is offered, so a guest does not
            // rely on one that would do nothing.
            let v = match a[0] as u32 {
                arch::SMCCC_VERSION | arch::SMCCC_ARCH_FEATURES if a[0] >> 32 == 0 => r::SUCCESS,
                _ => r::NOT_SUPPORTED,
            };
            ret(regs, v)
        }
    };
    Ok(outcome)
}

/// The system calls: `SYSTEM_OFF`, `SYSTEM_RESET`, `SYSTEM_RESET2`,
/// `SYSTEM_OFF2` (checked arguments, then [`system_event`]) and
/// `SYSTEM_SUSPEND` (an exit for the VMM to decide). `a` holds the call's
/// (narrowed) x1..x3.
fn system_call<V: PsciVm + ?Sized>(
    vm: &V,
    caller: &PsciCaller,
    regs: &mut GuestGprs,
    call: Call,
    a: [u64; 3],
) -> PsciOutcome {
    match call {
        Call::SystemOff => system_event(vm, caller, regs, SystemEventKind::Shutdown, 0, [0, 0]),
        Call::SystemReset => system_event(vm, caller, regs, SystemEventKind::Reset, 0, [0, 0]),
        Call::SystemReset2 => {
            let ty = a[0];
            let valid = ty == u64::from(fnid::RESET2_SYSTEM_WARM_RESET)
                || (u64::from(fnid::RESET2_VENDOR)..=0xffff_ffff).contains(&ty);
            if !valid {
                return ret(regs, r::INVALID_PARAMETERS);
            }
            let flags = SystemEvent::FLAG_PSCI_RESET2;
            system_event(
                vm,
                caller,
                regs,
                SystemEventKind::Reset,
                flags,
                [a[0], a[1]],
            )
        }
        Call::SystemOff2 => {
            let ty = a[0];
            if (ty != 0 && ty != u64::from(fnid::OFF2_HIBERNATE_OFF)) || a[1] != 0 {
                return ret(regs, r::INVALID_PARAMETERS);
            }
            let flags = SystemEvent::FLAG_PSCI_OFF2;
            system_event(
                vm,
                caller,
                regs,
                SystemEventKind::Shutdown,
                flags,
                [a[0], a[1]],
            )
        }
        Call::SystemSuspend => {
            // As KVM: no vCPU changes state here; the VMM decides
            // (complete_system_suspend is the standard decision).
            regs.x[0] = r::INTERNAL_FAILURE as u64;
            let kind = SystemEventKind::Suspend;
            PsciOutcome::Exit(SystemEvent {
                kind,
                flags: 0,
                args: [a[0], a[1]],
            })
        }
        // handle_psci passes only the calls above.
        _ => ret(regs, r::NOT_SUPPORTED),
    }
}

/// `PSCI_FEATURES(func)`.
fn psci_features(cfg: &PsciConfig, func: u64) -> i64 {
    let Ok(func) = u32::try_from(func) else {
        return r::NOT_SUPPORTED;
    };
    match decode(func, cfg) {
        // PSCI_FEATURES covers PSCI functions and SMCCC_VERSION only.
        None | Some(Call::SmcccArchFeatures) => r::NOT_SUPPORTED,
        // Bitmask of supported SYSTEM_OFF2 types: hibernate-off.
        Some(Call::SystemOff2) => i64::from(fnid::OFF2_HIBERNATE_OFF),
        // CPU_SUSPEND: original power_state format, platform-coordinated
        // mode only (flags 0); everything else: supported (0).
        Some(_) => r::SUCCESS,
    }
}

/// `CPU_ON(target_cpu, entry_point, context_id)`.
fn cpu_on<V: PsciVm + ?Sized>(vm: &V, caller: &PsciCaller, target: u64, pc: u64, ctx: u64) -> i64 {
    if target & !MPIDR_HWID_MASK != 0 {
        return r::INVALID_PARAMETERS;
    }
    let Some(t) = vm.vcpu_by_affinity(target).filter(|&t| t < vm.vcpu_count()) else {
        return r::INVALID_PARAMETERS;
    };
    {
        let mut p = vm.vcpu_power(t).lock();
        if !p.is_stopped() {
            return r::ALREADY_ON;
        }
        p.power_on(ResetState {
            pc,
            context_id: ctx,
            big_endian: caller.big_endian,
            reset: true,
        });
    }
    vm.kick_vcpu(t);
    r::SUCCESS
}

/// The affinity fields at and above `level`, `None` for a level above 3.
const fn affinity_mask(level: u64) -> Option<u64> {
    match level {
        0 => Some(MPIDR_HWID_MASK),
        1 => Some(MPIDR_HWID_MASK & !0xff),
        2 => Some(MPIDR_HWID_MASK & !0xffff),
        3 => Some(0xff_0000_0000),
        _ => None,
    }
}

/// `AFFINITY_INFO(target_affinity, lowest_affinity_level)`.
fn affinity_info<V: PsciVm + ?Sized>(vm: &V, target: u64, level: u64) -> i64 {
    let Some(mask) = affinity_mask(level) else {
        return r::INVALID_PARAMETERS;
    };
    if target & !mask != 0 {
        return r::INVALID_PARAMETERS;
    }
    let mut matching = false;
    for i in 0..vm.vcpu_count() {
        if vm.vcpu_affinity(i) & mask != target {
            continue;
        }
        matching = true;
        if !vm.vcpu_power(i).lock().is_stopped() {
            return r::AFFINITY_ON;
        }
    }
    if matching {
        r::AFFINITY_OFF
    } else {
        r::INVALID_PARAMETERS
    }
}

/// Latches the event. The first request then stops every vCPU (each under
/// its own lock, one at a time), kicks the others and produces the exit; a
/// request merged into a pending event only makes sure its own caller is
/// stopped (the first one's stop covers the rest). Presets the caller's x0
/// either way.
fn system_event<V: PsciVm + ?Sized>(
    vm: &V,
    caller: &PsciCaller,
    regs: &mut GuestGprs,
    kind: SystemEventKind,
    flags: u64,
    args: [u64; 2],
) -> PsciOutcome {
    let ev = SystemEvent { kind, flags, args };
    regs.x[0] = r::INTERNAL_FAILURE as u64;
    let first = vm.system_event_latch().lock().request(ev);
    if !first {
        vm.vcpu_power(caller.index).lock().power_off();
        return PsciOutcome::PowerOff;
    }
    let n = vm.vcpu_count();
    for i in 0..n {
        vm.vcpu_power(i).lock().power_off();
    }
    for i in (0..n).filter(|&i| i != caller.index) {
        vm.kick_vcpu(i);
    }
    PsciOutcome::Exit(ev)
}

/// The VMM's standard answer to a `Suspend` event from vCPU `caller`
/// (what a simple VMM does with KVM's `KVM_SYSTEM_EVENT_SUSPEND`).
///
/// If any other vCPU is not stopped, the call fails: x0 = `DENIED`
/// (x1..x3 = 0) and the outcome is `Continue`. Otherwise the caller becomes
/// `Suspended` with the event's entry point and context id as its resume
/// state (x0 = `SUCCESS` for the record; the resume resets it), and the
/// outcome is `Suspended`.
///
/// # Errors
/// [`PsciError::CallerOutOfRange`] for a caller index outside the VM.
pub fn complete_system_suspend<V: PsciVm + ?Sized>(
    vm: &V,
    caller: &PsciCaller,
    event: &SystemEvent,
    regs: &mut GuestGprs,
) -> Result<PsciOutcome, PsciError> {
    let vcpu_count = vm.vcpu_count();
    if caller.index >= vcpu_count {
        return Err(PsciError::CallerOutOfRange {
            caller: caller.index,
            vcpu_count,
        });
    }
    // A stopped vCPU stays stopped unless a running one powers it on, and
    // the only running one is the caller, which is here: checking one lock
    // at a time is enough.
    for i in (0..vcpu_count).filter(|&i| i != caller.index) {
        if !vm.vcpu_power(i).lock().is_stopped() {
            return Ok(ret(regs, r::DENIED));
        }
    }
    let resume = ResetState {
        pc: event.args[0],
        context_id: event.args[1],
        big_endian: caller.big_endian,
        reset: true,
    };
    vm.vcpu_power(caller.index).lock().suspend(resume);
    set_ret(regs, r::SUCCESS);
    Ok(PsciOutcome::Suspended)
}

/// SMCCC results: x0 = `v`, x1..x3 = 0.
fn set_ret(regs: &mut GuestGprs, v: i64) {
    regs.x[0] = v as u64;
    regs.x[1] = 0;
    regs.x[2] = 0;
    regs.x[3] = 0;
}

fn ret(regs: &mut GuestGprs, v: i64) -> PsciOutcome {
    set_ret(regs, v);
    PsciOutcome::Continue
}
