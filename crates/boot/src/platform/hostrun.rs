//! `HOST_RUN`: every guest run of the VMM is a hypercall, and the
//! hypervisor's side of it (EL2; nothing here is the VMM's).
//!
//! The host (the VMM, at EL2 today and at EL1 once it is deprivileged)
//! fills a page-aligned [`RunBlock`] in its own memory and issues
//! `hvc #0` with x0 = [`HOST_RUN`], x1 = the block's physical address
//! ([`call`]). The hypervisor ([`serve`]):
//!
//! 1. checks the address: page-aligned, RAM, not its own memory (the
//!    [`super::hypmem`] range, the EL2 stacks, its per-CPU buffers), in
//!    protected mode pages the host shared with the hypervisor
//!    (`HOST_SHARE_HYP`), pinned until after the write-back (5.), as is
//!    the SVE area;
//! 2. copies the block into this CPU's buffer in its own memory, so that
//!    the host cannot change what was checked while the guest runs;
//! 3. validates the copy ([`check`]): the guest's PSTATE is AArch64
//!    EL0t/EL1t/EL1h or AArch32 User (EL0); live list registers are virtual only (no HW bit,
//!    RES0 and pINTID clear, INTID < 1020); `ICH_HCR_EL2` only the
//!    enable/maintenance bits; `HCR_EL2` keeps VM, RW, IMO, FMO, AMO and
//!    never has E2H, TGE or NV/NV1/NV2; `CPTR_EL2.TFP` clear (the
//!    hypervisor's own FP/SIMD code) and `TZ` clear for a VM with SVE;
//!    `MDCR_EL2.TDE` clear; pointer authentication and MPAM only on a CPU
//!    with them; the debug registers within the CPU's counts, HMC clear;
//!    the SVE area RAM of the host's, 16-byte aligned, at a vector length
//!    that is a power of two in 16..=256. The stage-2: for a VM whose
//!    stage-2 is pkvm-hyp's ([`stage::HYP`], protected mode) the host
//!    passes no `VTTBR`/`VTCR` and the hypervisor takes them from the vCPU
//!    loaded on this CPU ([`set_protected`]'s lookup); a stage-2 the host
//!    built ([`stage::HOST`], standard mode) is accepted only while the
//!    host is trusted (no host stage-2 yet: nVHE-style, as KVM without
//!    pKVM), and never with VMID 0 (the host's own). The list-register
//!    counts, SME and RAS come from the CPU, never from the block;
//! 4. runs the guest with the world switch ([`switch::run`], from inside
//!    the hypercall as `VCPU_RUN` does: the world switch's per-CPU state
//!    set aside, and, when the host runs at EL1, its EL1 registers,
//!    controls, `VMPIDR_EL2` and `CNTVOFF_EL2` saved and put back) until
//!    its first exit;
//! 5. copies the vCPU's state and the [`RunExit`] back into the host's
//!    block.
//!
//! For a vCPU of a protected VM (pkvm-hyp's loaded vCPU, its VM created
//! protected: [`Protected::protected_vcpu`]) the registers stay in the
//! hypervisor ([`super::pview`]): before step 4 the block's state is
//! replaced by the one the hypervisor kept, with only the host's
//! emulation results merged in (a whole state only at a reset,
//! [`FLAG_RESET`]); after it the block shows only what the exit needs.
//!
//! A refused block gets `INVALID_PARAMETER` in x0 and the [`Refused`]
//! reason in x1, and nothing changes: neither the block nor any register.
//!
//! The host's fast paths (pkvm-sysreg's table, the PL011) complete an exit
//! on the host side and issue `HOST_RUN` again at once; the `CTR_EL0`
//! answer of the EL2 vectors stays inside the run, and so do the stores
//! to the block's coalesced-MMIO zone and the loads of its load answers
//! ([`RunCoalesced`]: the world switch's fast path buffers the former
//! and answers the latter with the host's values, so the PL011's console
//! bytes and status polls need no round trip to the host).
//!
//! [`TLB_FLUSH_VMID_IPA`] and [`TLB_FLUSH_VMID`] are the stage-2 TLB
//! maintenance of a host-built stage-2 from a host at EL1 (the
//! instructions are EL2-only), honoured only while the host is trusted,
//! as nVHE KVM's `__kvm_tlb_flush_vmid_ipa` / `__kvm_tlb_flush_vmid`;
//! [`super::hw::HwS2`] issues them when it finds itself below EL2.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use pkvm_arch::esr::{fault_ipa, AccessSyndrome, Esr, FaultStatus};
use pkvm_arch::smccc::ret;
use pkvm_arch::Level;
use pkvm_pgtable::TlbOps;
use pkvm_sync::{LockClass, SpinLock};
use pkvm_sysreg::traps::{cptr, TrapControls};
use pkvm_sysreg::{HostFeature, MAX_POINTS};

use super::hw::HwS2;
use super::sve::{SveRun, AREA_BYTES};
use super::switch::{self, El1Sysregs, Exit, VcpuState, VmRegs};
use super::{hvc, hypmem, phys, start, MAX_CPUS, STACK_SIZE};
use crate::{read_sysreg, update_sysreg};

/// Runs the vCPU of the run block at x1 (physical address) until its
/// first exit the world switch does not answer itself.
pub const HOST_RUN: u32 = 0xc600_0043;
/// Invalidates the stage-2 TLB entries of IPA x2 for the VM of VTTBR x1
/// (x3 = 1: this CPU only). Host-built stage-2s, trusted host only.
pub const TLB_FLUSH_VMID_IPA: u32 = 0xc600_0048;
/// Invalidates every TLB entry of the VM of VTTBR x1. Host-built
/// stage-2s, trusted host only.
pub const TLB_FLUSH_VMID: u32 = 0xc600_0049;

/// Whose stage-2 the VM runs under ([`RunVm::stage`]).
pub mod stage {
    /// Built by the host (standard mode): `VTTBR`/`VTCR` from the block.
    pub const HOST: u64 = 0;
    /// pkvm-hyp's (protected mode): taken from the vCPU loaded on this CPU.
    pub const HYP: u64 = 1;
}

/// [`RunVm::flags`]: the VM has pointer authentication (its keys are
/// switched).
pub const FLAG_PAUTH: u64 = 1;
/// [`RunVm::flags`]: the vCPU was reset (PSCI `CPU_ON`, VM reset): for a
/// protected vCPU the hypervisor takes the block's whole state once
/// ([`super::pview`]); meaningless otherwise. No other bit is defined.
pub const FLAG_RESET: u64 = 2;

/// The VM's side of a run.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunVm {
    /// [`stage::HOST`] or [`stage::HYP`].
    pub stage: u64,
    /// `VTTBR_EL2` of a host-built stage-2 (0 for [`stage::HYP`]).
    pub vttbr: u64,
    /// `VTCR_EL2` of a host-built stage-2 (0 for [`stage::HYP`]).
    pub vtcr: u64,
    /// The VM's trap controls (pkvm-sysreg's policy for its features).
    pub traps: TrapControls,
    /// [`FLAG_PAUTH`].
    pub flags: u64,
    /// The guest's `PMUSERENR_EL0` for the run.
    pub pmuserenr: u64,
}

/// The vCPU's SVE registers for a VM with SVE.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunSve {
    /// Physical address of the save area ([`super::sve::AREA_BYTES`]);
    /// 0: the VM has no SVE.
    pub area: u64,
    /// The VM's vector length in bytes.
    pub vl: u64,
    /// `ZCR_EL1` (in and out).
    pub zcr_el1: u64,
}

/// Why the guest stopped (out), as [`Exit`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunExit {
    /// Vector index ([`switch::EXIT_SYNC`], [`switch::EXIT_IRQ`], ...).
    pub kind: u64,
    /// `ESR_EL2`.
    pub esr: u64,
    /// `FAR_EL2`.
    pub far: u64,
    /// `HPFAR_EL2`.
    pub hpfar: u64,
    /// The physical count at entry and at exit.
    pub slice: [u64; 2],
    /// 1: the run loaded the vCPU's SVE registers.
    pub sve_loaded: u64,
}

impl RunSve {
    /// The fields for `sve`, a vCPU's SVE registers ([`super::sve::SveRegs`]),
    /// or none.
    pub fn of(sve: Option<&mut super::sve::SveRegs>) -> RunSve {
        match sve.map(|s| s.run_view()) {
            Some(v) => RunSve {
                area: v.area(),
                vl: u64::from(v.vl()),
                zcr_el1: v.zcr_el1,
            },
            None => RunSve {
                area: 0,
                vl: 0,
                zcr_el1: 0,
            },
        }
    }
}

impl RunExit {
    /// As the world switch's [`Exit`].
    pub fn exit(&self) -> Exit {
        Exit {
            kind: self.kind,
            esr: self.esr,
            far: self.far,
            hpfar: self.hpfar,
            slice: (self.slice[0], self.slice[1]),
            sve_loaded: self.sve_loaded != 0,
        }
    }
}

/// The coalesced-MMIO zone of a run (in) and how many writes to it the
/// run buffered in [`RunBlock::ring`] (out).
///
/// As KVM's `KVM_CAP_COALESCED_MMIO`: a guest store to `[base, base +
/// len)` that stage-2 does not map (a data abort the host would get as an
/// MMIO exit, with a valid syndrome) is appended to the ring and stepped
/// over at EL2, without leaving the guest; the run returns at the next
/// exit of any other kind (or when the ring is full, then with that store
/// as an ordinary exit), and the host applies the buffered stores, in
/// order, before it looks at the exit. Loads always exit. The host learns
/// exactly what the MMIO exits would have told it (the address, size and
/// stored value), later; the hypervisor emulates nothing: which device
/// registers tolerate a late store is the host's choice (the PL011's data
/// register: the console's transmitted bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunCoalesced {
    /// First IPA of the zone.
    pub base: u64,
    /// Its length in bytes (0: no zone), at most [`COALESCE_MAX_LEN`].
    pub len: u64,
    /// Entries of [`RunBlock::ring`] written by the run (out; ignored in).
    pub count: u64,
    /// Entries of `shadow` in use (in), at most [`SHADOW_MAX`].
    pub shadows: u64,
    /// Loads the run answered from `shadow` (out; ignored in).
    pub loads: u64,
    /// Load answers for the run (in): a guest load at a `shadow` entry's
    /// IPA, at most its size, that stage-2 leaves unmapped is answered with its value
    /// at EL2, without an exit. The host names only side-effect-free
    /// registers whose value nothing but an event that takes the guest out
    /// (an interrupt, a kick) changes during the run, and none the buffered
    /// stores change (the PL011's `UARTFR`: the RX FIFO's state; its TX is
    /// immediate), refreshing them before each run: the load then reads
    /// the register as it is, as far as the guest can tell.
    pub shadow: [RunShadow; SHADOW_MAX],
}

/// One load answer of [`RunCoalesced::shadow`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunShadow {
    /// The register's IPA (a load at exactly this address).
    pub ipa: u64,
    /// The register's size (1, 2, 4 or 8 bytes): loads of this size or
    /// narrower get its low bytes.
    pub size: u64,
    /// The register's value (cut to `size` on use).
    pub value: u64,
}

/// Entries of [`RunCoalesced::shadow`].
pub const SHADOW_MAX: usize = 2;

/// One buffered store: IPA, size in bytes (1, 2, 4 or 8) and the value,
/// cut to the size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoalescedWrite {
    /// The IPA stored to.
    pub ipa: u64,
    /// Access size in bytes.
    pub size: u64,
    /// The value stored.
    pub value: u64,
}

/// Entries of [`RunBlock::ring`].
pub const COALESCE_RING: usize = 40;
/// The largest zone a run block may name (one page).
pub const COALESCE_MAX_LEN: u64 = 4096;

/// One guest run, in the host's memory: plain integers only (every bit
/// pattern is a valid `RunBlock`, so the hypervisor may copy whatever the
/// host wrote), one page.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
pub struct RunBlock {
    /// The VM (in).
    pub vm: RunVm,
    /// SVE (in; `zcr_el1` in and out).
    pub sve: RunSve,
    /// The exit (out).
    pub exit: RunExit,
    /// The coalesced-MMIO zone (in) and the count of `ring` (out).
    pub coal: RunCoalesced,
    /// The vCPU (in and out).
    pub st: VcpuState,
    /// The stores buffered by the run (out: the first `coal.count`; only
    /// those are copied back).
    pub ring: [CoalescedWrite; COALESCE_RING],
}

/// The bytes of a [`RunBlock`] the hypervisor copies in (the ring is out
/// only).
const USED: usize = core::mem::offset_of!(RunBlock, st) + size_of::<VcpuState>();
const RING_AT: usize = core::mem::offset_of!(RunBlock, ring);
const _: () = assert!(size_of::<RunBlock>() == 4096 && RING_AT >= USED);
const _: () = assert!(RING_AT + COALESCE_RING * size_of::<CoalescedWrite>() <= 4096);

impl RunBlock {
    /// A block for a vCPU in state `st`, no VM yet.
    pub fn new(st: VcpuState) -> RunBlock {
        RunBlock {
            vm: RunVm {
                stage: stage::HOST,
                vttbr: 0,
                vtcr: 0,
                traps: TrapControls {
                    hcr: 0,
                    cptr: 0,
                    mdcr: 0,
                    cnthctl: 0,
                    mpam2: 0,
                },
                flags: 0,
                pmuserenr: 0,
            },
            sve: RunSve {
                area: 0,
                vl: 0,
                zcr_el1: 0,
            },
            exit: RunExit::default(),
            coal: RunCoalesced {
                base: 0,
                len: 0,
                count: 0,
                shadows: 0,
                loads: 0,
                shadow: [RunShadow::default(); SHADOW_MAX],
            },
            st,
            ring: [CoalescedWrite::default(); COALESCE_RING],
        }
    }
}

/// Copies `b` into the page at `page` (host memory the caller owns, e.g. a
/// pool frame: `host-attack` hands such pages to the hypervisor).
///
/// # Panics
/// If the page is not RAM.
pub fn write_block(page: pkvm_arch::Pa, b: &RunBlock) {
    phys::zero(page, 4096);
    assert!(caller_ram(page.0) && page.0.is_multiple_of(4096));
    // SAFETY: the page is RAM identity-mapped read-write, not the
    // hypervisor's memory and owned by the caller (checked and documented
    // above), so no Rust object lives there; an untyped copy of `USED`
    // bytes of a live `RunBlock`.
    unsafe {
        core::ptr::copy_nonoverlapping(core::ptr::from_ref(b).cast::<u8>(), page.0 as *mut u8, USED)
    };
}

/// Whether the page at `pa` is RAM the caller may copy a block to or from
/// (at EL2 not the hypervisor's own; the VMM at EL1 cannot reach that
/// memory at all, and may not read the hypervisor's bounds).
fn caller_ram(pa: u64) -> bool {
    if super::el1boot::current_el() == 2 {
        host_ram(pa, 4096)
    } else {
        phys::in_ram(pa, 4096)
    }
}

/// The block in the page at `page` (see [`write_block`]).
///
/// # Panics
/// If the page is not RAM.
pub fn read_block(page: pkvm_arch::Pa) -> RunBlock {
    assert!(caller_ram(page.0) && page.0.is_multiple_of(4096));
    let mut b = RunBlock::new(VcpuState::new(0, [0; 4], 0));
    // SAFETY: as for `write_block`; every bit pattern is a valid
    // `RunBlock` (plain integers), and `b` is a distinct local.
    unsafe {
        core::ptr::copy_nonoverlapping(
            page.0 as *const u8,
            core::ptr::from_mut(&mut b).cast::<u8>(),
            USED,
        )
    };
    b
}

/// Why a run block was refused (x1 of the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Refused {
    /// The block's address: unaligned, not RAM, or the hypervisor's.
    Address = 1,
    /// PSTATE not AArch64 EL0t/EL1t/EL1h or AArch32 User.
    Pstate = 2,
    /// A live list register with the HW bit, RES0/pINTID bits or a
    /// special INTID.
    ListRegister = 3,
    /// `ICH_HCR_EL2` beyond the enable and maintenance bits.
    GicHcr = 4,
    /// `HCR_EL2` without VM/RW/IMO/FMO/AMO, or with E2H/TGE/NV.
    Hcr = 5,
    /// `CPTR_EL2`/`MDCR_EL2`/`MPAM2_EL2` the hypervisor cannot run with.
    Traps = 6,
    /// Stage-2: a `VTTBR`/`VTCR` for a hyp-managed VM, no vCPU loaded, an
    /// unknown stage, or VMID 0.
    Stage2 = 7,
    /// A host-built stage-2 while the host is not trusted.
    Untrusted = 8,
    /// Pointer authentication on a CPU without it, or an unknown flag.
    Feature = 9,
    /// The SVE area or vector length.
    Sve = 10,
    /// The debug registers (counts, HMC, `on` not 0/1).
    Debug = 11,
    /// The coalesced-MMIO zone: longer than [`COALESCE_MAX_LEN`] or
    /// wrapping around; more than [`SHADOW_MAX`] load answers.
    Coalesce = 12,
    /// A protected vCPU and no free slot for its registers
    /// ([`super::pview`]).
    Slots = 13,
    /// A reset ([`FLAG_RESET`]) of a protected vCPU that ran, and whose
    /// guest asked for no start of it ([`super::pview`]).
    Reset = 14,
    /// Trap controls for a protected vCPU other than those of its first
    /// run ([`super::pview`]).
    TrapsChanged = 15,
}

/// What the hypervisor answers `HOST_RUN` with in protected mode
/// ([`set_protected`]).
#[derive(Debug)]
pub struct Protected {
    /// The stage-2 (`VTTBR`, `VTCR`) of the vCPU pkvm-hyp has loaded on a
    /// CPU.
    pub loaded: fn(cpu: usize) -> Option<(u64, u64)>,
    /// Pins every page of `[pa, pa + len)` for the hypervisor's use
    /// (pkvm-hyp's `hyp_pin_shared`): whether they are all pages the host
    /// shared with the hypervisor (`HOST_SHARE_HYP`), which the host then
    /// cannot unshare (and so never donate) until [`Protected::unpin`].
    pub pin: fn(pa: u64, len: u64) -> bool,
    /// Drops a pin [`Protected::pin`] took.
    pub unpin: fn(pa: u64, len: u64),
    /// The (VM handle, vCPU index) of the vCPU pkvm-hyp has loaded on a
    /// CPU when its VM is protected: its registers stay in the
    /// hypervisor ([`super::pview`]).
    pub protected_vcpu: fn(cpu: usize) -> Option<super::pview::Key>,
}

/// Pages pinned for one run ([`Protected::pin`]), unpinned at drop;
/// standard mode: nothing pinned.
struct Pinned(Option<(&'static Protected, u64, u64)>);

impl Pinned {
    /// Pins `[pa, pa + len)` in protected mode; `None`: not pages the
    /// host shared with the hypervisor.
    fn new(pa: u64, len: u64) -> Option<Pinned> {
        match protected() {
            Some(p) => (p.pin)(pa, len).then_some(Pinned(Some((p, pa, len)))),
            None => Some(Pinned(None)),
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some((p, pa, len)) = self.0 {
            (p.unpin)(pa, len);
        }
    }
}

/// The [`Protected`] answers (null: standard mode).
#[link_section = ".bss.hyp.hostrun_protected"]
static PROTECTED: AtomicPtr<Protected> = AtomicPtr::new(core::ptr::null_mut());
/// Whether the host is trusted with its own stage-2s (until protected mode
/// finalises).
#[link_section = ".data.hyp.hostrun_trusted"]
static TRUSTED: AtomicBool = AtomicBool::new(true);

/// Protected mode has finalised (the hypervisor's own `FINALIZE`): the
/// host is no longer trusted with stage-2s of its own (no more
/// [`stage::HOST`] runs or TLB hypercalls), [`stage::HYP`] runs take their
/// stage-2 from `p.loaded`, and a run block or SVE area must be in pages
/// the host shared with the hypervisor, pinned for the run (`p.pin`). EL2
/// only.
pub fn set_protected(p: &'static Protected) {
    PROTECTED.store(core::ptr::from_ref(p).cast_mut(), Ordering::Release);
    TRUSTED.store(false, Ordering::Release);
}

/// Whether the host is still trusted with its own stage-2s.
pub fn host_trusted() -> bool {
    TRUSTED.load(Ordering::Acquire)
}

fn protected() -> Option<&'static Protected> {
    let p = PROTECTED.load(Ordering::Acquire);
    // SAFETY: PROTECTED only ever holds null or a pointer made from a
    // `&'static Protected` by `set_protected`, never written through.
    unsafe { p.cast_const().as_ref() }
}

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 4] {
    [
        ("hostrun::PROTECTED", core::ptr::from_ref(&PROTECTED) as u64),
        ("hostrun::TRUSTED", core::ptr::from_ref(&TRUSTED) as u64),
        ("hostrun::CAPS", CAPS.as_ptr() as u64),
        ("hostrun::BUFS", BUFS.as_ptr() as u64),
    ]
}

fn loaded_stage2(cpu: usize) -> Option<(u64, u64)> {
    (protected()?.loaded)(cpu)
}

/// What this CPU has, for [`check`] (read once per CPU at EL2).
#[derive(Clone, Copy, Debug)]
struct Caps {
    lrs: usize,
    aprs: usize,
    brps: usize,
    wrps: usize,
    pauth: bool,
    sme: bool,
    ras: bool,
    mpam: bool,
}

const CAPS_VALID: u64 = 1 << 63;
#[link_section = ".bss.hyp.hostrun_caps"]
static CAPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn caps(cpu: usize) -> Caps {
    let mut v = CAPS[cpu].load(Ordering::Relaxed);
    if v & CAPS_VALID == 0 {
        let ids = super::idregs::host_ids();
        let dfr0 = read_sysreg!("id_aa64dfr0_el1");
        v = CAPS_VALID
            | switch::gic_lrs() as u64
            | (switch::gic_aprs() as u64) << 8
            | (((dfr0 >> 12) & 0xf) + 1) << 16
            | (((dfr0 >> 20) & 0xf) + 1) << 24
            | u64::from(ids.has(HostFeature::PAuth)) << 32
            | u64::from(ids.has(HostFeature::Sme)) << 33
            | u64::from(ids.has(HostFeature::Ras)) << 34
            | u64::from(ids.has(HostFeature::Mpam)) << 35;
        CAPS[cpu].store(v, Ordering::Relaxed);
    }
    let byte = |s: u32| ((v >> s) & 0xff) as usize;
    Caps {
        lrs: byte(0),
        aprs: byte(8),
        brps: byte(16),
        wrps: byte(24),
        pauth: v & (1 << 32) != 0,
        sme: v & (1 << 33) != 0,
        ras: v & (1 << 34) != 0,
        mpam: v & (1 << 35) != 0,
    }
}

/// This CPU's copy of the block being run, in the hypervisor's memory.
#[allow(clippy::declare_interior_mutable_const)]
const BUF_INIT: SpinLock<RunBlock> = SpinLock::new(
    // SAFETY: a `RunBlock` is plain integers (and arrays and structs of
    // them) throughout, for which all-zero is a valid value.
    unsafe { core::mem::zeroed() },
    LockClass::Leaf,
);
#[link_section = ".data.hyp.hostrun_bufs"]
static BUFS: [SpinLock<RunBlock>; MAX_CPUS] = [BUF_INIT; MAX_CPUS];

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Whether `[pa, pa + len)` is RAM the host may hand in: not the
/// hypervisor's memory ([`hypmem`], the EL2 stacks, the run buffers). In
/// protected mode the pages must moreover be shared with the hypervisor by
/// the host, and are pinned from before the copy in until after the
/// write-back ([`Pinned`], as pKVM's `hyp_pin_shared_mem`): the host can
/// neither unshare them meanwhile nor donate them to a guest, so the
/// write-back lands in the host's page.
fn host_ram(pa: u64, len: u64) -> bool {
    extern "C" {
        static __stacks_start: u8;
    }
    let Some(end) = pa.checked_add(len) else {
        return false;
    };
    let r = (pa, end);
    let stacks = core::ptr::addr_of!(__stacks_start) as u64;
    let stacks = (stacks, stacks + STACK_SIZE * MAX_CPUS as u64);
    let bufs = BUFS.as_ptr() as u64;
    let bufs = (bufs, bufs + size_of_val(&BUFS) as u64);
    phys::in_ram(pa, len)
        && !overlaps(r, hypmem::range())
        && !overlaps(r, stacks)
        && !overlaps(r, bufs)
}

/// The hypervisor's side of the image-level calls of this module, from
/// the HVC handler ([`super::hvc`]) before anything else sees them;
/// `false`: not one of them.
pub fn serve(cpu: usize, regs: &mut [u64; 8]) -> bool {
    match regs[0] {
        x if x == u64::from(HOST_RUN) => {
            let r = host_run(cpu, regs[1]);
            regs[0] = match r {
                Ok(()) => ret::SUCCESS as u64,
                Err(_) => ret::INVALID_PARAMETER as u64,
            };
            regs[1] = r.err().map_or(0, |w| w as u64);
        }
        x if x == u64::from(TLB_FLUSH_VMID_IPA) || x == u64::from(TLB_FLUSH_VMID) => {
            regs[0] = tlb_flush(regs) as u64;
        }
        _ => return false,
    }
    true
}

/// `HOST_RUN` of the block at `pa` on CPU `cpu`.
fn host_run(cpu: usize, pa: u64) -> Result<(), Refused> {
    if !pa.is_multiple_of(4096) || !host_ram(pa, 4096) || cpu >= MAX_CPUS {
        return Err(Refused::Address);
    }
    let _block = Pinned::new(pa, 4096).ok_or(Refused::Address)?;
    // The SVE area, pinned before this CPU's buffer is locked (pkvm-hyp's
    // lock is never taken under it): the address read here must be the
    // one the copy names.
    let area = sve_area(pa);
    let _area = match area {
        0 => None,
        a => Some(Pinned::new(a, AREA_BYTES).ok_or(Refused::Sve)?),
    };
    let loaded = loaded_stage2(cpu);
    let caps = caps(cpu);
    let mut b = BUFS[cpu].lock();
    // SAFETY: `[pa, pa + 4096)` is RAM identity-mapped at EL2 and not the
    // hypervisor's memory (checked above), so it cannot overlap `b`; a
    // `RunBlock` is plain integers, so whatever bytes are there make a
    // valid one (the host may change them meanwhile: only this copy is
    // checked and used).
    unsafe {
        core::ptr::copy_nonoverlapping(pa as *const u8, &mut *b as *mut RunBlock as *mut u8, USED)
    };
    let (vm, mut sve) = check(&b, &caps, loaded)?;
    if b.sve.area != area {
        return Err(Refused::Sve);
    }
    b.coal.count = 0;
    b.coal.loads = 0;
    let held = match protected().and_then(|p| (p.protected_vcpu)(cpu)) {
        Some(key) => Some(super::pview::enter(key, &mut b)?),
        None => None,
    };
    let exit = run_checked(&mut b, &vm, sve.as_mut());
    b.exit = RunExit {
        kind: exit.kind,
        esr: exit.esr,
        far: exit.far,
        hpfar: exit.hpfar,
        slice: [exit.slice.0, exit.slice.1],
        sve_loaded: u64::from(exit.sve_loaded),
    };
    if let Some(s) = sve {
        b.sve.zcr_el1 = s.zcr_el1;
    }
    if let Some(h) = held {
        super::pview::leave(h, &mut b);
    }
    // Only the ring's entries the run wrote (`count <= COALESCE_RING`,
    // `coalesce` stops there).
    let out = RING_AT + b.coal.count as usize * size_of::<CoalescedWrite>();
    // SAFETY: as above, the other way; `out <= 4096` (the ring's end is
    // within the block, asserted at compile time).
    unsafe {
        core::ptr::copy_nonoverlapping(&*b as *const RunBlock as *const u8, pa as *mut u8, out)
    };
    // The pins go after the write-back (`_area`, `_block` dropped here).
    Ok(())
}

/// The SVE area's address the host's block at `pa` names now (the host
/// may change it: [`host_run`] compares it with its copy's).
fn sve_area(pa: u64) -> u64 {
    const AT: usize = core::mem::offset_of!(RunBlock, sve) + core::mem::offset_of!(RunSve, area);
    // SAFETY: `[pa, pa + 4096)` is RAM identity-mapped at EL2, not the
    // hypervisor's memory (checked by the caller); an aligned u64 of it
    // (`RunBlock` is 4096-aligned, `AT` a multiple of 8), any value valid.
    unsafe { core::ptr::read_volatile((pa + AT as u64) as *const u64) }
}

/// The validation of a copied block: the VM registers to run it with and
/// its SVE view, or why it is refused.
fn check(
    b: &RunBlock,
    caps: &Caps,
    loaded: Option<(u64, u64)>,
) -> Result<(VmRegs, Option<SveRun>), Refused> {
    check_vcpu(&b.st, caps)?;
    let with_sve = b.sve.area != 0;
    check_traps(&b.vm.traps, caps, with_sve)?;
    let (vttbr, vtcr) = stage2(&b.vm, loaded)?;
    let pauth = b.vm.flags & FLAG_PAUTH != 0;
    if b.vm.flags & !(FLAG_PAUTH | FLAG_RESET) != 0 || (pauth && !caps.pauth) {
        return Err(Refused::Feature);
    }
    let z = &b.coal;
    let bad_zone = z.len > COALESCE_MAX_LEN || z.base.checked_add(z.len).is_none();
    if bad_zone || z.shadows > SHADOW_MAX as u64 {
        return Err(Refused::Coalesce);
    }
    let sve = match with_sve {
        false => None,
        true => Some(
            SveRun::checked(b.sve.vl, b.sve.zcr_el1, b.sve.area, host_ram).ok_or(Refused::Sve)?,
        ),
    };
    let vm = VmRegs {
        vttbr,
        vtcr,
        traps: b.vm.traps,
        pauth,
        sme: caps.sme,
        ras: caps.ras,
        lrs: caps.lrs,
        aprs: caps.aprs,
    };
    Ok((vm, sve))
}

/// PSTATE.M: AArch64 EL0t, EL1t, EL1h (bit 4, nRW, clear), and AArch32
/// User (0b10000: EL0; a guest's 32-bit process that an interrupt or a
/// trap took out is entered again there).
const MODE_MASK: u64 = 0x1f;
const MODES: [u64; 4] = [0b00000, 0b00100, 0b00101, 0b10000];
/// `ICH_LR<n>_EL2`: State (63:62), HW (61), the RES0 bits (59:56, 47:45),
/// pINTID (44:32; with HW clear only bit 41, EOI, may be set), vINTID.
const LR_STATE: u64 = 3 << 62;
const LR_HW: u64 = 1 << 61;
const LR_RES0: u64 = (0xf << 56) | (0x7 << 45);
const LR_PINTID_NOT_EOI: u64 = (0x1fff << 32) & !(1 << 41);
const LR_VINTID: u64 = 0xffff_ffff;
/// `ICH_HCR_EL2`: En, UIE, LRENPIE, NPIE, VGrp0EIE/DIE, VGrp1EIE/DIE.
const ICH_HCR_ALLOWED: u64 = 0xff;
/// `DBGBCR/DBGWCR<n>_EL1.HMC`.
const DBG_HMC: u64 = 1 << 13;

fn check_vcpu(st: &VcpuState, caps: &Caps) -> Result<(), Refused> {
    if !MODES.contains(&(st.regs.pstate & MODE_MASK)) {
        return Err(Refused::Pstate);
    }
    let live_ok =
        |lr: u64| lr & (LR_HW | LR_RES0 | LR_PINTID_NOT_EOI) == 0 && lr & LR_VINTID < 1020;
    let lrs = &st.gic.lrs[..caps.lrs.min(16)];
    if !lrs.iter().all(|&lr| lr & LR_STATE == 0 || live_ok(lr)) {
        return Err(Refused::ListRegister);
    }
    if st.gic.hcr & !ICH_HCR_ALLOWED != 0 {
        return Err(Refused::GicHcr);
    }
    let d = &st.debug;
    let points_ok = |n: usize, max: usize, ctl: &[u64; MAX_POINTS]| {
        n <= max.min(MAX_POINTS) && ctl[..n].iter().all(|c| c & DBG_HMC == 0)
    };
    let debug_ok = d.on == 0
        || (d.on == 1
            && points_ok(d.regs.brps, caps.brps, &d.regs.bcr)
            && points_ok(d.regs.wrps, caps.wrps, &d.regs.wcr));
    if !debug_ok {
        return Err(Refused::Debug);
    }
    Ok(())
}

/// `HCR_EL2` bits every guest run keeps (VM, FMO, IMO, AMO, RW) and never
/// has (TGE, E2H, NV, NV1, NV2).
const HCR_REQUIRED: u64 = 1 | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 31);
const HCR_FORBIDDEN: u64 = (1 << 27) | (1 << 34) | (1 << 42) | (1 << 43) | (1 << 45);
/// `MDCR_EL2.TDE` (debug exceptions to EL2).
const MDCR_TDE: u64 = 1 << 8;

fn check_traps(t: &TrapControls, caps: &Caps, with_sve: bool) -> Result<(), Refused> {
    if t.hcr & HCR_REQUIRED != HCR_REQUIRED || t.hcr & HCR_FORBIDDEN != 0 {
        return Err(Refused::Hcr);
    }
    let cptr_ok = t.cptr & cptr::TFP == 0 && !(with_sve && t.cptr & cptr::TZ != 0);
    if !cptr_ok || t.mdcr & MDCR_TDE != 0 || (t.mpam2 != 0 && !caps.mpam) {
        return Err(Refused::Traps);
    }
    Ok(())
}

/// `VTTBR_EL2`/`VTCR_EL2` for the run.
fn stage2(vm: &RunVm, loaded: Option<(u64, u64)>) -> Result<(u64, u64), Refused> {
    match vm.stage {
        stage::HYP if vm.vttbr == 0 && vm.vtcr == 0 => loaded.ok_or(Refused::Stage2),
        stage::HOST if !host_trusted() => Err(Refused::Untrusted),
        stage::HOST if vm.vttbr >> 48 != 0 => Ok((vm.vttbr, vm.vtcr)),
        _ => Err(Refused::Stage2),
    }
}

/// The registers of the host context the hypervisor puts back after a
/// guest run when the host runs at EL1: its EL1 registers, the EL2
/// controls, and what its EL1 reads through EL2 registers (`MPIDR_EL1`
/// is `VMPIDR_EL2` below EL2, the virtual counter is offset by
/// `CNTVOFF_EL2`).
struct HostSide {
    el1: El1Sysregs,
    controls: VmRegs,
    vmpidr: u64,
    cntvoff: u64,
}

fn save_host() -> HostSide {
    let mut el1 = El1Sysregs::default();
    switch::save_el1(&mut el1);
    HostSide {
        el1,
        controls: host_controls(),
        vmpidr: read_sysreg!("vmpidr_el2"),
        cntvoff: read_sysreg!("cntvoff_el2"),
    }
}

/// The host's EL2 controls as they are now (at EL2, inside one of its
/// hypercalls): its stage-2 (`VTTBR_EL2`, `VTCR_EL2`) and trap controls,
/// what a guest run from inside the hypercall must put back (the host
/// stage-2 of a host at EL1 under it included).
pub fn host_controls() -> VmRegs {
    VmRegs {
        vttbr: read_sysreg!("vttbr_el2"),
        vtcr: read_sysreg!("vtcr_el2"),
        traps: TrapControls {
            hcr: read_sysreg!("hcr_el2"),
            cptr: read_sysreg!("cptr_el2"),
            mdcr: read_sysreg!("mdcr_el2"),
            cnthctl: read_sysreg!("cnthctl_el2"),
            mpam2: 0,
        },
        pauth: false,
        sme: false,
        ras: false,
        lrs: 0,
        aprs: 0,
    }
}

/// Runs the checked block's vCPU from inside the hypercall.
fn run_checked(b: &mut RunBlock, vm: &VmRegs, sve: Option<&mut SveRun>) -> Exit {
    let host = start::el1_host().then(save_host);
    switch::load_pmuserenr(b.vm.pmuserenr);
    let saved = start::take_switch_state();
    let zone = b.coal;
    let (ring, count, loads) = (&mut b.ring, &mut b.coal.count, &mut b.coal.loads);
    let exit = switch::run(vm, &mut b.st, sve, &mut |e, regs| {
        coalesce(&zone, (ring, count, loads), e, regs)
    });
    start::restore_switch_state(saved);
    if let Some(h) = host {
        update_sysreg!("vmpidr_el2", h.vmpidr);
        update_sysreg!("cntvoff_el2", h.cntvoff);
        switch::load_el1(&h.el1);
        switch::load_vm_controls(&h.controls);
    }
    exit
}

/// `PSTATE.SS`: cleared when the hypervisor steps over a buffered store,
/// as for any instruction emulated on the guest's behalf (the guest's
/// software step then completes on the next instruction).
const PSTATE_SS: u64 = 1 << 21;

/// The world switch's fast path inside `HOST_RUN` (EL2, the guest's state
/// still loaded), for a data abort with a valid syndrome on an IPA stage-2
/// leaves unmapped (what the host would get as an MMIO exit): a store to
/// the run's coalesced-MMIO zone is appended to `ring`, a load of one of
/// its [`RunCoalesced::shadow`] registers answered with the host's value;
/// either is stepped over. `false` (the exit goes to the host) for
/// anything else, and for a store when the ring is full.
fn coalesce(
    zone: &RunCoalesced,
    (ring, count, loads): (&mut [CoalescedWrite; COALESCE_RING], &mut u64, &mut u64),
    e: &Exit,
    regs: &mut switch::GuestRegs,
) -> bool {
    let Some((ipa, s, write)) = mmio_abort(e) else {
        return false;
    };
    let size = u64::from(s.size());
    let rt = usize::from(s.srt);
    if !write {
        let n = (zone.shadows as usize).min(SHADOW_MAX);
        let Some(r) = zone.shadow[..n]
            .iter()
            .find(|r| r.ipa == ipa && size <= r.size)
        else {
            return false;
        };
        if rt < 31 {
            regs.x[rt] = loaded(r.value, size, s.sse, s.sf);
        }
        *loads += 1;
    } else {
        let n = *count as usize;
        let end = zone.base + zone.len;
        let inside = ipa >= zone.base && ipa.checked_add(size).is_some_and(|e| e <= end);
        if !inside || n >= COALESCE_RING {
            return false;
        }
        let value = if rt < 31 { regs.x[rt] } else { 0 };
        let value = loaded(value, size, false, true);
        ring[n] = CoalescedWrite { ipa, size, value };
        *count += 1;
    }
    regs.pc = regs.pc.wrapping_add(4);
    regs.pstate &= !PSTATE_SS;
    true
}

/// A synchronous exit that would be an MMIO exit for the host: a data
/// abort on a stage-2 translation fault with a valid syndrome, no cache
/// maintenance, no stage-1 walk, FAR valid. Its IPA, syndrome and
/// whether it is a store.
fn mmio_abort(e: &Exit) -> Option<(u64, AccessSyndrome, bool)> {
    if e.kind != switch::EXIT_SYNC {
        return None;
    }
    let a = Esr(e.esr).abort().filter(|a| !a.instruction)?;
    let s = a.syndrome?;
    let translation = matches!(a.status, FaultStatus::Translation(_));
    if a.cm || a.s1ptw || a.fnv || !translation {
        return None;
    }
    Some((fault_ipa(e.hpfar, e.far).0, s, a.write))
}

/// `value` as a load of `size` bytes leaves it in its register:
/// cut to the size, sign-extended (`sse`), cut to 32 bits (`!sf`).
fn loaded(value: u64, size: u64, sse: bool, sf: bool) -> u64 {
    let bits = 8 * size as u32;
    let v = if bits >= 64 {
        value
    } else if sse {
        (((value << (64 - bits)) as i64) >> (64 - bits)) as u64
    } else {
        value & ((1 << bits) - 1)
    };
    if sf {
        v
    } else {
        v & 0xffff_ffff
    }
}

/// `TLB_FLUSH_VMID_IPA` / `TLB_FLUSH_VMID`: SMCCC status.
fn tlb_flush(regs: &[u64; 8]) -> i64 {
    let vttbr = regs[1];
    if !host_trusted() || vttbr >> 48 == 0 {
        return ret::INVALID_PARAMETER;
    }
    let s2 = HwS2 { vttbr };
    match (regs[0] == u64::from(TLB_FLUSH_VMID), regs[3]) {
        (true, _) => s2.tlbi_all(),
        (false, 1) => s2.tlbi_leaf_local(regs[2], Level(3)),
        (false, _) => s2.tlbi_leaf(regs[2], Level(3)),
    }
    ret::SUCCESS
}

/// The host's side of [`HOST_RUN`]: runs `block` (in the host's memory,
/// identity-mapped: its address is its physical address at EL2 and for
/// the host at EL1). `Err`: the SMCCC status and the [`Refused`] reason
/// (x1).
pub fn call(block: &mut RunBlock) -> Result<(), (i64, u64)> {
    let mut regs = [0u64; 8];
    regs[0] = u64::from(HOST_RUN);
    regs[1] = block as *mut RunBlock as u64;
    hvc::call(&mut regs);
    match regs[0] as i64 {
        ret::SUCCESS => Ok(()),
        s => Err((s, regs[1])),
    }
}

/// The host's side of the TLB hypercalls (from [`HwS2`] below EL2).
pub fn call_tlb_flush(func: u32, vttbr: u64, ipa: u64, local: bool) {
    let mut regs = [0u64; 8];
    regs[0] = u64::from(func);
    regs[1] = vttbr;
    regs[2] = ipa;
    regs[3] = u64::from(local);
    hvc::call(&mut regs);
}
