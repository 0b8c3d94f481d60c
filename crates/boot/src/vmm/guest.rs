//! A VM as the VMM sees it: a `pkvm_host::Vm` with its memslots over VMAs
//! of the VMM's process memory, its image (and device tree) loaded, the
//! emulated PL011 (one line buffer per vCPU; guest lines are printed as
//! `[guest NAME vcpu N] ...`), the results guests report,
//! each vCPU's hardware-only state, and the exit handling the scheduler's
//! [`HostRunner`](crate::sched::host::HostRunner) calls around
//! `Vcpu::run` ([`HostVmm`]).
//!
//! # System reset
//! A PSCI `SYSTEM_RESET` or `SYSTEM_RESET2` (warm or vendor reset) restarts
//! the VM the way KVM's VMMs do ([`GuestVm::system_reset`]): pkvm-host has
//! already stopped every vCPU; the VMM waits until none of the VM's other
//! vCPUs is still inside a scheduler run (so none is in the guest), writes
//! the image and its device tree into guest RAM again (guest RAM outside
//! them is left as it is: a guest can leave itself a note), and powers the
//! VM on again with the same [`BootParams`]: vCPU 0 restarts at the entry
//! point, the others stay off until a guest `CPU_ON`. The vCPU that made
//! the call stays in the scheduler. At most [`MAX_RESETS`] resets per VM:
//! the next one ends the VM with an error instead of looping forever. A
//! protected VM's image is not rewritten: its memory was donated and is
//! the guest's, across the reset too. Requests several vCPUs make at once
//! are one reset (pkvm-host merges them into one exit, see
//! `pkvm_host::psci`); a `SYSTEM_OFF` made at the same time wins and the
//! VM powers off.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use pkvm_arch::esr::{ec, Esr, FaultStatus};
use pkvm_arch::{Hva, Ipa, Pa};

use crate::platform::hostrun::RunShadow;
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::psci::{PsciVm, SystemEvent, SystemEventKind};
use pkvm_host::reset::BootParams;
use pkvm_host::{Vcpu, VcpuExit, VmConfig};
use pkvm_sync::{LockClass, SpinLock};
use pkvm_sysreg::IdOverrides;

use pkvm_pl011::Pl011;

use super::backend::{self, HwBackend, VcpuHw};
use super::fdtgen;
use super::irq::{VmIrq, WfiAction};
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::sysregs::{self, VmPolicy};
use crate::println;
use crate::sched::host::HostVmm;
use crate::sched::Outcome;

/// The host VM type in the image.
pub type BootVm = pkvm_host::Vm<BootPlatform, BootProcess>;

/// How every line a guest prints on its emulated PL011 starts on the
/// console (then the VM's name, the vCPU if the VM has several, `] `): the
/// hypervisor's own lines never start with it (xtask's QEMU tests match
/// hypervisor markers only on lines without it).
pub const GUEST_LINE_PREFIX: &str = "[guest ";
/// Guest RAM base IPA.
pub const GUEST_RAM: u64 = 0x4000_0000;
/// IPA size of every VM.
pub const IPA_BITS: u32 = 40;
/// Most vCPUs per VM here (the scheduler's slots).
pub const MAX_VCPUS: usize = crate::sched::MAX_SCHED_VCPUS;
/// The vendor report hypercall of guest-rt.
pub const REPORT_FID: u64 = 0xc600_0100;
/// Most guest system resets one VM may do; the next one ends it.
pub const MAX_RESETS: u32 = 8;
const BLOCK: u64 = 2 << 20;
/// Bytes at the top of guest RAM taken by the device tree (when the VM
/// has one).
pub const DTB_RESERVE: u64 = BLOCK;
const PAGE: u64 = 4096;

/// INTID of the PL011's interrupt (SPI 1, level-high, as on QEMU virt
/// and in the VM's device tree).
pub const UART_INTID: u32 = 33;
/// How often the input-owning VM polls the console input while its vCPUs
/// block in WFI (microseconds): the latency of a key press.
const INPUT_POLL_US: u64 = 10_000;
/// The VM that owns the console input (its [`GuestVm::input_id`]; 0:
/// none).
static INPUT_OWNER: AtomicUsize = AtomicUsize::new(0);

/// Report codes (same numbers as `guest_rt::code`).
pub mod code {
    #![allow(missing_docs)]
    pub const DONE: u64 = 0;
    pub const TOUCH: u64 = 1;
    pub const MMIO_READ: u64 = 2;
    pub const HVC_UNDEF: u64 = 3;
    pub const PSCI_VERSION: u64 = 4;
    pub const EXCEPTION: u64 = 5;
    pub const PANIC: u64 = 6;
    pub const SMC: u64 = 7;
    pub const RESET: u64 = 8;
    pub const COUNT: usize = 9;
}

/// Where the VMM finds a VM's image: at creation and again at each guest
/// system reset, when it is written into guest RAM anew.
#[derive(Clone, Copy, Debug)]
pub enum ImageSource {
    /// Bytes embedded in the EL2 image.
    Embedded(&'static [u8]),
    /// A file QEMU loaded into physical memory outside the page pool (the
    /// handoff's external guest, which stays there): address, bytes.
    Phys(Pa, u64),
}

impl ImageSource {
    /// Bytes of the image.
    pub fn len(&self) -> u64 {
        match *self {
            ImageSource::Embedded(b) => b.len() as u64,
            ImageSource::Phys(_, n) => n,
        }
    }

    /// Whether the image is empty (a guest payload missing from the build).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with the image bytes.
    pub fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match *self {
            ImageSource::Embedded(b) => f(b),
            ImageSource::Phys(pa, n) => crate::platform::phys::with_slice(pa, n, f),
        }
    }
}

/// What to put in a new VM.
pub struct VmSpec<'a> {
    /// Name (console prefix).
    pub name: &'static str,
    /// RAM bytes at [`GUEST_RAM`].
    pub mem: u64,
    /// Backing of its memory.
    pub backing: Backing,
    /// The image, loaded at `GUEST_RAM + load_offset` (and again at each
    /// guest system reset).
    pub image: ImageSource,
    /// Offset of the image in RAM.
    pub load_offset: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Device tree command line (`Some`: generate a DTB, x0 = its IPA).
    pub dtb_bootargs: Option<&'a str>,
    /// An initrd and its offset in RAM (after the image, below the device
    /// tree; announced in the device tree, written again at each reset).
    pub initrd: Option<(ImageSource, u64)>,
    /// A protected VM (protected mode only).
    pub protected: bool,
    /// A region of RAM (IPA, bytes; 2M aligned) in a memslot of its own,
    /// so its faults are counted apart; x0/x1 of the boot vCPU.
    pub touch: Option<(u64, u64)>,
    /// x0 of the boot vCPU (when neither a device tree nor `touch` sets it).
    pub x0: Option<u64>,
}

/// Why a VM could not be created.
#[derive(Debug, Clone, Copy)]
pub enum VmmError {
    /// Bad VM parameters (the caller's request).
    BadConfig(&'static str),
    /// The image does not fit (the caller's request).
    ImageTooBig,
    /// pkvm-host refused.
    Host(pkvm_host::VmError),
    /// Process memory could not be mapped or populated.
    NoMemory,
    /// The VM's ID-register configuration asks for more than the CPU has.
    Features(pkvm_sysreg::IdError),
}

impl core::fmt::Display for VmmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmmError::BadConfig(s) => write!(f, "bad VM configuration: {s}"),
            VmmError::ImageTooBig => write!(f, "the image does not fit in guest RAM"),
            VmmError::Host(e) => write!(f, "pkvm-host: {e}"),
            VmmError::NoMemory => write!(f, "host page pool exhausted"),
            VmmError::Features(e) => write!(f, "{e}"),
        }
    }
}

impl From<pkvm_host::VmError> for VmmError {
    fn from(e: pkvm_host::VmError) -> Self {
        VmmError::Host(e)
    }
}

/// How a VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// PSCI SYSTEM_OFF.
    PowerOff,
    /// The host stopped it after an error.
    Error(&'static str),
}

/// Counters of the VMM loop.
#[derive(Debug, Default)]
pub struct VmmCounters {
    /// `Vcpu::run` returns.
    pub run_exits: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// MMIO exits outside memslots and devices.
    pub mmio_unclaimed: AtomicU64,
    /// WFI exits.
    pub wfi: AtomicU64,
    /// Interrupted exits.
    pub interrupted: AtomicU64,
    /// Sleeps (powered-off vCPU waiting for a kick).
    pub sleeps: AtomicU64,
    /// Reports through the vendor hypercall.
    pub reports: AtomicU64,
    /// Hypercall exits outside PSCI/SMCCC that the VMM did not know
    /// (answered NOT_SUPPORTED).
    pub unknown_calls: AtomicU64,
}

/// A line buffer for the emulated UART.
struct LineBuf {
    buf: [u8; 160],
    n: usize,
}

/// A VM of the VMM.
pub struct GuestVm {
    /// Name.
    pub name: &'static str,
    /// The host VM.
    pub vm: Arc<BootVm>,
    platform: Arc<BootPlatform>,
    process: Arc<BootProcess>,
    /// VMAs behind its memslots.
    vmas: Vec<Hva>,
    touch_vma: Option<Hva>,
    /// Bytes of RAM.
    pub mem: u64,
    /// Backing.
    pub backing: Backing,
    entry: u64,
    /// The image, written again at each system reset.
    image: ImageSource,
    /// The generated device tree (IPA, blob), written again at each reset.
    dtb: Option<(u64, Vec<u8>)>,
    /// The initrd and its IPA, written again at each reset.
    initrd: Option<(ImageSource, u64)>,
    /// How vCPU 0 starts, at creation and after each system reset.
    boot: BootParams,
    /// System resets done (restarts from the entry point).
    resets: AtomicU32,
    reports: SpinLock<[Option<(u64, u64)>; code::COUNT]>,
    /// Per vCPU: the emulated UART's line buffer.
    uart: Vec<SpinLock<LineBuf>>,
    /// The emulated PL011 (registers, RX FIFO, interrupt line).
    pl011: SpinLock<Pl011>,
    /// When the console input was last polled (physical count).
    last_poll: AtomicU64,
    /// Per vCPU: the hardware-only state, lent to its backend.
    hw: Vec<SpinLock<VcpuHw>>,
    /// The system-register policy: sanitised features, trap controls.
    policy: VmPolicy,
    /// The vGIC.
    irq: VmIrq,
    end: SpinLock<Option<VmEnd>>,
    stopping: AtomicBool,
    warned_unclaimed: AtomicBool,
    /// vCPUs of this VM inside a scheduler run right now.
    running: AtomicUsize,
    /// Counters.
    pub counters: VmmCounters,
    /// Per vCPU: physical CPUs it ran on (bit per CPU).
    pub cpus: Vec<AtomicU64>,
    /// Per vCPU: its scheduler slot in the last run (usize::MAX: none).
    pub slots: Vec<AtomicUsize>,
    /// VMID the hardware ran it with (0 until it ran).
    pub hw_vmid: AtomicU16,
}

/// Checks a VM spec before anything is created (checked arithmetic: the
/// load offset can come from a guest file's header).
fn check_spec(spec: &VmSpec<'_>) -> Result<(), VmmError> {
    if spec.mem < 2 * BLOCK || !spec.mem.is_multiple_of(BLOCK) || spec.mem > 1 << 30 {
        return Err(VmmError::BadConfig(
            "memory must be a multiple of 2 MiB, 4 MiB..1 GiB",
        ));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(VmmError::BadConfig("vCPU count"));
    }
    let dtb_reserve = if spec.dtb_bootargs.is_some() {
        DTB_RESERVE
    } else {
        0
    };
    // Checked: the load offset can come from a guest file's header.
    let image_end = spec
        .load_offset
        .checked_add(spec.image.len())
        .and_then(|e| e.checked_add(dtb_reserve));
    if image_end.is_none_or(|e| e > spec.mem) {
        return Err(VmmError::ImageTooBig);
    }
    if let Some((img, off)) = spec.initrd {
        let kernel_end = spec.load_offset + spec.image.len();
        let end = off
            .checked_add(img.len())
            .and_then(|e| e.checked_add(DTB_RESERVE));
        if spec.dtb_bootargs.is_none() || off < kernel_end || end.is_none_or(|e| e > spec.mem) {
            return Err(VmmError::BadConfig(
                "initrd must lie after the image, below the device tree",
            ));
        }
    }
    let ram_end = GUEST_RAM + spec.mem;
    if let Some((t, n)) = spec.touch {
        let end = t.checked_add(n);
        if !t.is_multiple_of(BLOCK)
            || !n.is_multiple_of(BLOCK)
            || t < GUEST_RAM
            || end.is_none_or(|e| e > ram_end)
        {
            return Err(VmmError::BadConfig("touch region"));
        }
    }
    Ok(())
}

/// The VM's memslots as (start, end, is the touch region): RAM, with the
/// touch region (if any) in a slot of its own.
fn memslot_ranges(spec: &VmSpec<'_>) -> Vec<(u64, u64, bool)> {
    let ram_end = GUEST_RAM + spec.mem;
    let mut ranges: Vec<(u64, u64, bool)> = Vec::new();
    match spec.touch {
        Some((t, n)) => {
            ranges.push((GUEST_RAM, t, false));
            ranges.push((t, t + n, true));
            ranges.push((t + n, ram_end, false));
        }
        None => ranges.push((GUEST_RAM, ram_end, false)),
    }
    ranges
}

impl GuestVm {
    /// Maps a VMA of the VMM's process for each memslot range and adds the
    /// memslot; on failure the VMAs mapped so far are released.
    fn add_memslots(&mut self, ranges: &[(u64, u64, bool)]) -> Result<(), VmmError> {
        let cpu = crate::platform::start::cpu_index();
        for (slot, &(s, e, touch)) in ranges.iter().filter(|r| r.1 > r.0).enumerate() {
            let Some(hva) = self.process.mmap(e - s, self.backing) else {
                self.release_vmas();
                return Err(VmmError::BadConfig("memslot size"));
            };
            self.vmas.push(hva);
            if touch {
                self.touch_vma = Some(hva);
            }
            let r = self.vm.set_user_memory_region(
                UserMemoryRegion {
                    slot: slot as u32,
                    flags: 0,
                    guest_phys_addr: s,
                    memory_size: e - s,
                    userspace_addr: hva.0,
                },
                cpu,
            );
            if let Err(e) = r {
                self.release_vmas();
                return Err(e.into());
            }
        }
        Ok(())
    }
}

/// Creates a VM: memslots over fresh VMAs, the image (and device tree)
/// written into them, powered on at the image's entry.
///
/// # Errors
/// See [`VmmError`].
pub fn create(
    platform: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    spec: &VmSpec<'_>,
) -> Result<Arc<GuestVm>, VmmError> {
    create_with(platform, process, spec, &IdOverrides::new())
}

/// [`create`] with the VM's own feature configuration `features` (SVE and
/// its vector length, ID register fields lowered...), checked against the
/// host CPU before anything is created.
///
/// # Errors
/// See [`VmmError`]; [`VmmError::Features`] names the configuration field
/// the CPU cannot give.
pub fn create_with(
    platform: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    spec: &VmSpec<'_>,
    features: &IdOverrides,
) -> Result<Arc<GuestVm>, VmmError> {
    check_spec(spec)?;
    let policy = VmPolicy::new(&crate::platform::idregs::host_ids(), features)
        .map_err(VmmError::Features)?;
    let sve_vl = policy.features.sve_max_vl();
    // The VM's virtual count starts (near) 0 now, the same for every vCPU.
    let voff = crate::platform::timer::now();
    let vm = BootVm::create(
        platform.clone(),
        process.clone(),
        VmConfig {
            ipa_bits: IPA_BITS,
            protected: spec.protected,
            nr_vcpus: spec.vcpus,
            ..VmConfig::default()
        },
        crate::platform::start::cpu_index(),
    )?;
    let ranges = memslot_ranges(spec);
    let mut g = GuestVm {
        name: spec.name,
        vm,
        platform: platform.clone(),
        process: process.clone(),
        vmas: Vec::new(),
        touch_vma: None,
        mem: spec.mem,
        backing: spec.backing,
        entry: GUEST_RAM + spec.load_offset,
        image: spec.image,
        dtb: None,
        initrd: spec.initrd.map(|(img, off)| (img, GUEST_RAM + off)),
        boot: BootParams::default(),
        resets: AtomicU32::new(0),
        reports: SpinLock::new([None; code::COUNT], LockClass::Leaf),
        uart: (0..spec.vcpus)
            .map(|_| {
                SpinLock::new(
                    LineBuf {
                        buf: [0; 160],
                        n: 0,
                    },
                    LockClass::Leaf,
                )
            })
            .collect(),
        // Its lock is held while the vGIC's (a leaf too) is taken to drive
        // the interrupt line; the vGIC's never takes it.
        pl011: SpinLock::new(Pl011::new(), LockClass::Leaf),
        last_poll: AtomicU64::new(0),
        // Taken by the scheduler's runner before any pkvm-host lock.
        hw: (0..spec.vcpus)
            .map(|i| {
                let hw = VcpuHw::new()
                    .named(spec.name, i)
                    .with_sve(sve_vl)
                    .with_voff(voff)
                    .share_with_hyp(platform.hyp())
                    .map_err(|_| VmmError::NoMemory)?;
                Ok(SpinLock::new(hw, LockClass::HostVm))
            })
            .collect::<Result<_, VmmError>>()?,
        policy,
        irq: VmIrq::new(spec.vcpus).map_err(|_| VmmError::BadConfig("vCPU count (vGIC)"))?,
        end: SpinLock::new(None, LockClass::Leaf),
        stopping: AtomicBool::new(false),
        warned_unclaimed: AtomicBool::new(false),
        running: AtomicUsize::new(0),
        counters: VmmCounters::default(),
        cpus: (0..spec.vcpus).map(|_| AtomicU64::new(0)).collect(),
        slots: (0..spec.vcpus)
            .map(|_| AtomicUsize::new(usize::MAX))
            .collect(),
        hw_vmid: AtomicU16::new(0),
    };
    g.add_memslots(&ranges)?;
    if let Err(e) = g.make_device_tree(spec).and_then(|()| g.load()) {
        g.release_vmas();
        return Err(e);
    }
    let mut x0 = g.dtb.as_ref().map_or(0, |d| d.0);
    if let Some(v) = spec.x0 {
        x0 = v;
    }
    if let Some((t, n)) = spec.touch {
        x0 = t;
        g.hw[0].lock().set_boot_args(g.entry, [n, 0, 0]);
    }
    g.boot = BootParams {
        entry: g.entry,
        x0,
        big_endian: false,
    };
    g.vm.power_on(g.boot)?;
    Ok(Arc::new(g))
}

impl GuestVm {
    fn hva_of(&self, ipa: u64) -> Option<Hva> {
        let slots = self.vm.memslots();
        let s = slots.find(Ipa(ipa))?;
        Some(s.hva_of(Ipa(ipa)))
    }

    fn write_guest(&self, ipa: u64, data: &[u8]) -> Result<(), VmmError> {
        // Page by page: a write may cross memslots.
        for (i, chunk) in data.chunks(PAGE as usize).enumerate() {
            let a = ipa + i as u64 * PAGE;
            let hva = self.hva_of(a).ok_or(VmmError::ImageTooBig)?;
            self.process
                .write(hva, chunk)
                .map_err(|_| VmmError::NoMemory)?;
        }
        Ok(())
    }

    /// Generates and checks the VM's device tree (if the spec asks for
    /// one) and keeps it for [`GuestVm::load`].
    fn make_device_tree(&mut self, spec: &VmSpec<'_>) -> Result<(), VmmError> {
        let Some(bootargs) = spec.dtb_bootargs else {
            return Ok(());
        };
        let mut blob = [0u8; 8192];
        let initrd = self.initrd.map(|(img, ipa)| (ipa, ipa + img.len()));
        let (mem, vcpus) = (spec.mem, spec.vcpus);
        let pmu = self.policy.features.has(pkvm_sysreg::Offer::Pmu);
        let write = if pmu {
            fdtgen::vm_device_tree_pmu
        } else {
            fdtgen::vm_device_tree
        };
        let n = write(&mut blob, GUEST_RAM, mem, vcpus, bootargs, initrd)
            .map_err(|_| VmmError::BadConfig("device tree too big (command line?)"))?;
        fdtgen::verify(&blob[..n], GUEST_RAM, mem, vcpus, bootargs, initrd)
            .map_err(VmmError::BadConfig)?;
        if pmu {
            fdtgen::verify_pmu(&blob[..n]).map_err(VmmError::BadConfig)?;
        }
        if let Some((start, end)) = initrd {
            println!(
                "vm {}: initrd at IPA {start:#x}..{end:#x} ({} bytes)",
                spec.name,
                end - start
            );
        }
        let dtb_ipa = GUEST_RAM + spec.mem - BLOCK;
        println!(
            "vm {}: device tree at IPA {dtb_ipa:#x} ({n} bytes, {} vCPUs, bootargs \"{bootargs}\"), checked with the fdt crate",
            spec.name, spec.vcpus
        );
        self.dtb = Some((dtb_ipa, blob[..n].to_vec()));
        Ok(())
    }

    /// Writes the image (and the device tree) into guest RAM: at creation
    /// and at each system reset. Nothing else in guest RAM is touched.
    fn load(&self) -> Result<(), VmmError> {
        self.image.with(|img| self.write_guest(self.entry, img))?;
        if let Some((img, ipa)) = &self.initrd {
            img.with(|b| self.write_guest(*ipa, b))?;
        }
        if let Some((ipa, blob)) = &self.dtb {
            self.write_guest(*ipa, blob)?;
        }
        Ok(())
    }

    /// Guest system resets done so far (restarts from the entry point).
    pub fn resets(&self) -> u32 {
        self.resets.load(Ordering::Relaxed)
    }

    /// PSCI `SYSTEM_RESET` / `SYSTEM_RESET2` from vCPU `index`
    /// (pkvm-host's `SystemEvent` of kind `Reset`: every vCPU is already
    /// `Stopped`): restarts the VM from its entry point, as the module
    /// documentation says, or ends it once it has reset [`MAX_RESETS`]
    /// times.
    ///
    /// Called on the exiting vCPU's CPU inside its scheduler run. However
    /// many vCPUs ask at once, pkvm-host gives one of them the exit and
    /// merges the other requests into its latched event (their vCPUs just
    /// sleep). As pkvm-host requires, this waits until every other vCPU has
    /// left its scheduler run (so every request trapped before the stop is
    /// merged), then acts on the merged event: a `SYSTEM_OFF` made at the
    /// same time wins (the VM powers off), otherwise one restart.
    pub fn system_reset(&self, index: usize, ev: &SystemEvent) {
        // Every vCPU is Stopped and was kicked: wait until the others have
        // left their scheduler runs (and the guest). One that starts a run
        // now finds itself Stopped and goes back to sleep.
        while self.running.load(Ordering::Acquire) > 1 && !self.stopping_now() {
            core::hint::spin_loop();
        }
        let name = self.name;
        if self.stopping_now() {
            println!(
                "vm {name}: {} from vCPU {index}: the VM is stopping; not restarted",
                ResetKind(ev)
            );
            return;
        }
        let ev = &pkvm_host::psci::take_system_event(&*self.vm).unwrap_or(*ev);
        let what = ResetKind(ev);
        if ev.kind == SystemEventKind::Shutdown {
            println!(
                "vm {name}: PSCI system reset from vCPU {index} and a concurrent {what}: the power-off wins"
            );
            self.stop(VmEnd::PowerOff);
            return;
        }
        let n = self.resets.load(Ordering::Relaxed) + 1;
        if n > MAX_RESETS {
            println!(
                "vm {name}: {what} from vCPU {index}: {MAX_RESETS} resets already; the VM is stopped"
            );
            self.stop(VmEnd::Error("too many system resets"));
            return;
        }
        let protected = self.vm.config().protected;
        let loaded = if protected { Ok(()) } else { self.load() };
        if let Err(e) = loaded {
            println!("vm {name}: {what}: reloading the image failed: {e}");
            self.stop(VmEnd::Error("image reload failed at a system reset"));
            return;
        }
        // The guest may have executed the old bytes (or its own changes
        // to them) at the same addresses.
        crate::platform::hw::icache_inval_all();
        // No vCPU is in the guest: nothing is in flight in list registers.
        self.irq.reset();
        self.pl011.lock().reset();
        self.resets.store(n, Ordering::Relaxed);
        let others = self.vcpu_count() - 1;
        println!(
            "vm {name}: {what} from vCPU {index}: restarting the VM at its entry point {:#x} (reset {n} of at most {MAX_RESETS}; {}; vCPU 0 on{})",
            self.boot.entry,
            if protected {
                "image not rewritten: a protected VM's memory is the guest's"
            } else if self.dtb.is_some() {
                "image and device tree reloaded, rest of RAM kept"
            } else {
                "image reloaded, rest of RAM kept"
            },
            if others == 0 {
                String::new()
            } else {
                alloc::format!(", {others} other vCPU(s) off until CPU_ON")
            }
        );
        if let Err(e) = self.vm.power_on(self.boot) {
            println!("vm {name}: {what}: power-on failed: {e}");
            self.stop(VmEnd::Error("power-on failed at a system reset"));
        }
    }

    /// Releases the VMAs (after teardown); returns frames released.
    fn release_vmas(&mut self) -> u64 {
        let mut frames = 0;
        for hva in self.vmas.drain(..) {
            frames += self.process.munmap(hva).map_or(0, |u| u.frames);
        }
        frames
    }

    /// The last report with code `c`.
    pub fn report(&self, c: u64) -> Option<(u64, u64)> {
        self.reports.lock().get(c as usize).copied().flatten()
    }

    /// The VM's SVE vector length in bytes, when it has SVE.
    pub fn sve_max_vl(&self) -> Option<u16> {
        self.policy.features.sve_max_vl()
    }

    /// How it ended (once stopped).
    pub fn end(&self) -> Option<VmEnd> {
        *self.end.lock()
    }

    /// Guest faults resolved in the touch slot (pins of its VMA).
    pub fn touch_faults(&self) -> u64 {
        self.touch_vma.map_or(0, |h| self.process.pins(h))
    }

    /// The physical page at byte `offset` of the touch slot, if the guest
    /// touched it.
    pub fn touch_pa(&self, offset: u64) -> Option<Pa> {
        let hva = self.touch_vma?;
        self.process.populated(Hva(hva.0 + offset))
    }

    /// The VM's VMID (standard mode) or handle (protected mode).
    pub fn kick_id(&self) -> u16 {
        self.vm.vmid().or(self.vm.handle()).unwrap_or(0)
    }

    /// vCPU `index` runs in scheduler slot `slot`: kicks go there.
    pub fn attach(&self, index: usize, slot: usize) {
        if let Some(s) = self.slots.get(index) {
            s.store(slot, Ordering::Relaxed);
            self.platform.register_vcpu(self.kick_id(), index, slot);
        }
    }

    /// The scheduler run is over: kicks no longer go to the slots (which
    /// stay recorded, for the run's statistics).
    pub fn detach(&self) {
        for i in 0..self.slots.len() {
            self.platform.unregister_vcpu(self.kick_id(), i);
        }
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.hw.len()
    }

    /// Whether the VM was stopped.
    pub fn stopping_now(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops the VM: records why (the first reason wins) and kicks every
    /// vCPU, so each leaves the scheduler.
    pub fn stop(&self, why: VmEnd) {
        {
            let mut e = self.end.lock();
            if e.is_none() {
                *e = Some(why);
            }
        }
        self.stopping.store(true, Ordering::Release);
        for i in 0..self.vm.vcpu_count() {
            self.vm.kick_vcpu(i);
        }
    }

    /// Drives the PL011's interrupt line into the vGIC (with its lock held,
    /// so levels are applied in order) and kicks the vCPUs it wakes.
    fn pl011_line(&self, u: &Pl011) {
        let kick = self.irq.set_spi(UART_INTID, u.irq_level());
        for v in kick.iter() {
            self.vm.kick_vcpu(v);
        }
    }

    /// This VM's identity for [`INPUT_OWNER`].
    fn input_id(&self) -> usize {
        self as *const GuestVm as usize
    }

    /// Takes the console input for this VM if no other VM has it, and
    /// says so on the console. Returns whether it has it now.
    pub fn claim_input(&self) -> bool {
        let me = self.input_id();
        match INPUT_OWNER.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                println!(
                    "console: input goes to vm {} (its PL011, ttyAMA0): type here",
                    self.name
                );
                true
            }
            Err(o) => o == me,
        }
    }

    fn owns_input(&self) -> bool {
        INPUT_OWNER.load(Ordering::Acquire) == self.input_id()
    }

    /// Moves typed bytes from the console into the PL011's RX FIFO (as
    /// many as it has room for: the rest wait in the physical UART), at
    /// most every half millisecond; only for the VM owning the input.
    fn poll_input(&self) {
        if !self.owns_input() {
            return;
        }
        let now = crate::platform::timer::now();
        let last = self.last_poll.load(Ordering::Relaxed);
        if now.wrapping_sub(last) < crate::platform::timer::ticks_for_us(500)
            || self
                .last_poll
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let mut u = self.pl011.lock();
        let mut got = false;
        while u.rx_room() {
            let Some(b) = crate::platform::console::getc() else {
                break;
            };
            u.push_rx(b);
            got = true;
        }
        if got {
            self.pl011_line(&u);
        }
    }

    /// A byte the guest wrote to its PL011 data register. Lines are
    /// printed with [`GUEST_LINE_PREFIX`] and the VM's name (and the vCPU's
    /// index if it has several), so a guest cannot print a line that looks
    /// like the hypervisor's own; control characters other than tab (a
    /// terminal escape could erase the prefix) are shown as `?`.
    fn uart_putc(&self, index: usize, c: u8) {
        let Some(u) = self.uart.get(index) else {
            return;
        };
        let mut u = u.lock();
        if c == b'\n' || u.n == u.buf.len() {
            let line = core::str::from_utf8(&u.buf[..u.n]).unwrap_or("<non-utf8 output>");
            if self.uart.len() > 1 {
                println!("{GUEST_LINE_PREFIX}{} vcpu {index}] {line}", self.name);
            } else {
                println!("{GUEST_LINE_PREFIX}{}] {line}", self.name);
            }
            u.n = 0;
            if c == b'\n' {
                return;
            }
        }
        if c == b'\r' {
            return;
        }
        let shown = if (c < 0x20 && c != b'\t') || c == 0x7f {
            b'?'
        } else {
            c
        };
        let n = u.n;
        u.buf[n] = shown;
        u.n += 1;
    }

    /// A guest access to its PL011 at register offset `off` (`write`: the
    /// value stored): the value read (0 for a write) and whether the
    /// UART's interrupt line changed. The line is driven into the vGIC and
    /// a transmitted byte goes to the console.
    fn uart_access(&self, index: usize, off: u64, write: Option<u64>) -> (u64, bool) {
        let mut u = self.pl011.lock();
        let before = u.irq_level();
        let (v, tx) = match write {
            Some(d) => (0, u.write(off, d as u32)),
            None => (u64::from(u.read(off)), None),
        };
        let changed = u.irq_level() != before;
        self.pl011_line(&u);
        drop(u);
        if let Some(b) = tx {
            self.uart_putc(index, b);
        }
        (v, changed)
    }

    /// Emulates an MMIO access: the PL011 at `fdtgen::GUEST_UART`
    /// ([`pkvm_pl011`]: transmitted bytes go to the console, its interrupt
    /// line to the vGIC); anything else reads as 0, writes ignored.
    fn mmio(&self, index: usize, addr: u64, len: u8, write: bool, data: u64) -> u64 {
        self.counters.mmio.fetch_add(1, Ordering::Relaxed);
        if let Some(off) = uart_offset(addr) {
            return self.uart_access(index, off, write.then_some(data)).0;
        }
        self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
        if !self.warned_unclaimed.swap(true, Ordering::Relaxed) {
            println!(
                "vm {}: mmio exit outside memslots at IPA {addr:#x} ({} of {len} bytes): handled by the host ({})",
                self.name,
                if write { "write" } else { "read" },
                if write { "ignored" } else { "reads as 0" }
            );
        }
        0
    }

    fn on_report(&self, c: u64, a: u64, b: u64) {
        if let Some(slot) = self.reports.lock().get_mut(c as usize) {
            *slot = Some((a, b));
        }
        let name = self.name;
        match c {
            code::DONE => {}
            code::TOUCH => {
                let mib = (b * PAGE) >> 20;
                if a == 0 {
                    println!("vm {name}: guest verified {mib} MiB: ok");
                } else {
                    println!("vm {name}: guest verified {mib} MiB: FAILED ({a} wrong values)");
                }
            }
            code::MMIO_READ => println!("vm {name}: guest read {a:#x} from unbacked IPA {b:#x}"),
            code::HVC_UNDEF => {
                if a as i64 == pkvm_arch::smccc::ret::NOT_SUPPORTED {
                    println!("vm {name}: undefined hvc returned NOT_SUPPORTED");
                } else {
                    println!("vm {name}: undefined hvc returned {a:#x}: WRONG");
                }
            }
            code::PSCI_VERSION => println!("vm {name}: guest sees PSCI {}.{}", a >> 16, a & 0xffff),
            code::EXCEPTION => {
                let e = Esr(a);
                let sea = e.ec() == ec::IABT_CUR
                    && FaultStatus::decode((a & 0x3f) as u8) == FaultStatus::ExternalAbort;
                println!(
                    "vm {name}: guest took an injected abort: ESR_EL1 {a:#x} FAR_EL1 {b:#x}{}",
                    if sea {
                        " (synchronous external abort on instruction fetch)"
                    } else {
                        ""
                    }
                );
            }
            code::SMC => {
                if a as i64 == pkvm_arch::smccc::ret::NOT_SUPPORTED {
                    println!("vm {name}: trapped smc returned NOT_SUPPORTED (the VM's PSCI conduit is HVC)");
                } else {
                    println!("vm {name}: trapped smc returned {a:#x}");
                }
            }
            code::PANIC => println!("vm {name}: guest reported a panic"),
            code::RESET => println!(
                "vm {name}: guest boot {a} ({})",
                if b == 1 {
                    "image as loaded"
                } else {
                    "image as the last boot left it"
                }
            ),
            _ => println!("vm {name}: report {c}: {a:#x} {b:#x}"),
        }
    }

    /// A vendor hypercall (pkvm-host's `VcpuExit::Hypercall`, x0 already
    /// NOT_SUPPORTED): guest-rt's report call is answered with x0 = 0.
    fn hypercall(&self, vcpu: &mut Vcpu<BootPlatform, BootProcess>, func: u32, args: &[u64; 6]) {
        if func as u64 != REPORT_FID {
            self.counters.unknown_calls.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.reports.fetch_add(1, Ordering::Relaxed);
        self.on_report(args[0], args[1], args[2]);
        vcpu.context_mut().gprs.x[0] = 0;
    }

    /// The hardware-only state counters of every vCPU, summed.
    fn hw_stats(&self) -> backend::BackendStats {
        let mut t = backend::BackendStats::default();
        for h in &self.hw {
            let s = h.lock().stats;
            t.entries += s.entries;
            t.sysreg += s.sysreg;
            t.sysreg_fast += s.sysreg_fast;
            t.mmio_fast += s.mmio_fast;
            t.mmio_coalesced += s.mmio_coalesced;
            t.mmio_shadow += s.mmio_shadow;
            t.ctr_vector += s.ctr_vector;
            t.undefs += s.undefs;
            t.resets += s.resets;
            t.irq += s.irq;
            t.timer_irqs += s.timer_irqs;
            t.kick_irqs += s.kick_irqs;
            t.gic_mmio += s.gic_mmio;
            t.gic_aborts += s.gic_aborts;
            t.sgis += s.sgis;
            t.guest_irqs += s.guest_irqs;
            t.wfi_blocks += s.wfi_blocks;
            t.sve_lazy_loads += s.sve_lazy_loads;
        }
        t
    }

    /// vCPU `index`'s hardware-side counters (after a run).
    pub fn vcpu_stats(&self, index: usize) -> backend::BackendStats {
        self.hw
            .get(index)
            .map(|h| h.lock().stats)
            .unwrap_or_default()
    }

    /// Prints the VM's statistics (pkvm-host's `VmStats` and the VMM's).
    pub fn print_stats(&self) {
        let s = self.vm.stats().snapshot();
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let hw = self.hw_stats();
        let cpus: Vec<crate::sched::CpuList> = self
            .cpus
            .iter()
            .map(|c| crate::sched::CpuList(c.load(Ordering::Relaxed)))
            .collect();
        println!(
            "vm {}: stats: translation faults {}, permission faults {}, access-flag faults {}, retries {}, maps 4K {} / 2M {} / 1G {}, {} KiB mapped, mmio exits {}, guest calls {}, injected aborts {}",
            self.name,
            s.translation_faults,
            s.permission_faults,
            s.access_flag_faults,
            s.retries,
            s.maps_by_size[0],
            s.maps_by_size[1],
            s.maps_by_size[2],
            s.bytes_mapped >> 10,
            s.mmio_exits,
            s.guest_calls,
            s.injected_aborts,
        );
        println!(
            "vm {}: run loop: {} guest entries ({} after a vCPU reset), {} VM resets, {} exits to the VMM (mmio {} of which outside memslots {}, wfi {}, interrupted {} [timer {}, kick {}], sleeps {}), {} PL011 accesses on the world switch's fast path ({} stores coalesced, {} loads answered by the hypervisor), {} reports, {} unknown hypercalls, {} sysreg traps; {} {}, hw vmid {}, vCPU cpus {:?}, {} MiB {}{}",
            self.name,
            hw.entries,
            hw.resets,
            self.resets(),
            l(&c.run_exits),
            l(&c.mmio),
            l(&c.mmio_unclaimed),
            l(&c.wfi),
            l(&c.interrupted),
            hw.timer_irqs,
            hw.kick_irqs,
            l(&c.sleeps),
            hw.mmio_fast,
            hw.mmio_coalesced,
            hw.mmio_shadow,
            l(&c.reports),
            l(&c.unknown_calls),
            hw.sysreg,
            if self.vm.handle().is_some() { "handle" } else { "vmid" },
            self.vm.handle().map_or(self.vm.vmid().unwrap_or(0) as u64, |h| h as u64),
            self.hw_vmid.load(Ordering::Relaxed),
            cpus,
            self.mem >> 20,
            match self.backing {
                Backing::Page4K => "4K pages",
                Backing::Block2M => "2M blocks",
            },
            if self.vm.config().protected {
                ", protected VM"
            } else {
                ""
            },
        );
        println!(
            "vm {}: vgic: {} GIC register accesses ({} refused with an abort), {} SGIs sent, {} guest interrupt exits (virtual timer, maintenance), {} WFIs blocked",
            self.name, hw.gic_mmio, hw.gic_aborts, hw.sgis, hw.guest_irqs, hw.wfi_blocks
        );
        if let Some(vl) = self.sve_max_vl() {
            println!(
                "vm {}: SVE: vector length {vl} bytes, {} lazy loads of Z/P/FFR (runs in which the guest used SVE) in {} guest entries",
                self.name, hw.sve_lazy_loads, hw.entries
            );
        }
        self.print_sysreg_stats();
    }

    /// Prints the system-register trap statistics: traps, UNDEFs, and the
    /// eight registers trapped most (over all vCPUs).
    fn print_sysreg_stats(&self) {
        let mut sums = alloc::vec![0u64; pkvm_sysreg::REG_COUNT];
        let mut unknown = 0u64;
        for h in &self.hw {
            let h = h.lock();
            sysregs::add_traps(&mut sums, &h.sysregs);
            unknown += u64::from(h.sysregs.unknown_traps());
        }
        let hw = self.hw_stats();
        // The reads the vectors answered are CTR_EL0 traps too.
        if let Some(row) = pkvm_sysreg::lookup(sysregs::CTR_EL0) {
            sums[row] += hw.ctr_vector;
        }
        let mut top = String::new();
        for (row, n) in sysregs::top_traps(&sums, 8) {
            let sep = if top.is_empty() { "" } else { ", " };
            top.push_str(&alloc::format!("{sep}{} {n}", pkvm_sysreg::REGISTERS[row]));
        }
        println!(
            "vm {}: sysreg traps: {} ({} on the world switch's fast path, {} CTR_EL0 reads of which in the EL2 vectors; encodings outside the table {unknown}), UNDEFs injected {}; most trapped: {}",
            self.name,
            hw.sysreg,
            hw.sysreg_fast,
            hw.ctr_vector,
            hw.undefs,
            if top.is_empty() { "none" } else { &top }
        );
    }

    /// Tears the VM down (pkvm-host's single-owner teardown), then unmaps
    /// its VMAs; returns the frames the VMAs released.
    ///
    /// The caller must have finished the scheduler run (its vCPU runners
    /// hold references).
    pub fn destroy(self: Arc<Self>) -> u64 {
        let _ =
            INPUT_OWNER.compare_exchange(self.input_id(), 0, Ordering::AcqRel, Ordering::Acquire);
        self.vm.teardown(crate::platform::start::cpu_index());
        match Arc::try_unwrap(self) {
            Ok(mut g) => g.release_vmas(),
            Err(g) => {
                println!(
                    "vm {}: still referenced after teardown; VMAs not released",
                    g.name
                );
                0
            }
        }
    }
}

/// The offset of `ipa` in the guest's PL011 register page, if it is there.
fn uart_offset(ipa: u64) -> Option<u64> {
    ipa.checked_sub(fdtgen::GUEST_UART)
        .filter(|&off| off < pkvm_pl011::SIZE)
}

/// The PL011 on the world switch's fast path: outside every memslot (the
/// UART page lies below guest RAM, [`GUEST_RAM`]), emulated exactly as on
/// an MMIO exit (counted in the backend's statistics, not as an exit).
impl backend::FastMmio for GuestVm {
    fn fast_mmio(
        &self,
        index: usize,
        ipa: u64,
        _size: usize,
        write: Option<u64>,
    ) -> Option<(u64, bool)> {
        let off = uart_offset(ipa)?;
        Some(self.uart_access(index, off, write))
    }

    /// The data register (`UARTDR`, offset 0): a transmitted byte reaches
    /// the console at the vCPU's next exit (Linux's console polls
    /// `UARTFR`, a load, after each byte, so at once in practice); its
    /// interrupt line then as the other stores'.
    fn coalesced_zone(&self) -> (u64, u64) {
        (fdtgen::GUEST_UART, 4)
    }

    /// `UARTFR` (loads of up to 32 bits; Linux's are 16-bit): the RX FIFO's state (TX is immediate:
    /// TXFE set, TXFF and BUSY never), which only the host's input (which
    /// raises the RX line and kicks the vCPU when RX interrupts are on) or an exit's emulation (a
    /// `UARTDR` load) change; Linux's console polls it before each byte.
    fn load_shadow(&self, _index: usize, out: &mut [RunShadow]) -> usize {
        let Some(slot) = out.first_mut() else {
            return 0;
        };
        let fr = self.pl011.lock().read(pkvm_pl011::reg::FR);
        *slot = RunShadow {
            ipa: fdtgen::GUEST_UART + pkvm_pl011::reg::FR,
            size: 4,
            value: u64::from(fr),
        };
        1
    }
}

const _: () = assert!(fdtgen::GUEST_UART + pkvm_pl011::SIZE <= GUEST_RAM);

impl HostVmm for GuestVm {
    type Platform = BootPlatform;
    type Memory = BootProcess;
    type Backend<'a> = HwBackend<'a>;

    fn backend(&self, cpu: usize, index: usize) -> HwBackend<'_> {
        if let Some(c) = self.cpus.get(index) {
            c.fetch_or(1 << cpu, Ordering::Relaxed);
        }
        if self.running.fetch_add(1, Ordering::AcqRel) == 0 {
            super::run::vm_started_running();
        }
        HwBackend::new(
            cpu,
            self.hw[index].lock(),
            &self.policy,
            self.platform.hyp(),
            (&self.irq, &self.vm, self),
        )
    }

    fn wfi(&self, be: &mut HwBackend<'_>) -> Outcome {
        match be.hw().wait {
            // The input owner wakes to poll the console input.
            WfiAction::Block(deadline) if self.owns_input() => {
                let poll = crate::platform::timer::now()
                    + crate::platform::timer::ticks_for_us(INPUT_POLL_US);
                Outcome::Wait(deadline.map_or(poll, |d| d.min(poll)))
            }
            WfiAction::Block(deadline) => Outcome::Wait(deadline.unwrap_or(u64::MAX)),
            WfiAction::Yield | WfiAction::Resume => Outcome::Yield,
        }
    }

    fn after_run(&self, mut be: HwBackend<'_>) {
        let vmid = be.hw().last_vmid;
        if vmid != 0 {
            self.hw_vmid.store(vmid, Ordering::Relaxed);
        }
        drop(be);
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            super::run::vm_stopped_running();
        }
    }

    /// A reset pending for a `Running` vCPU is applied by pkvm-host before
    /// the next entry: reset the hardware-only state with it.
    fn exit(&self, vcpu: &mut Vcpu<BootPlatform, BootProcess>, exit: &VcpuExit) {
        self.counters.run_exits.fetch_add(1, Ordering::Relaxed);
        self.poll_input();
        let index = vcpu.index();
        match *exit {
            VcpuExit::Mmio {
                addr,
                len,
                write,
                data,
            } => {
                let v = self.mmio(index, addr.0, len, write, data);
                if !write {
                    vcpu.complete_mmio(v);
                }
            }
            VcpuExit::Hypercall { func, ref args, .. } => self.hypercall(vcpu, func, args),
            VcpuExit::SystemEvent(ev) => match ev.kind {
                SystemEventKind::Shutdown => self.stop(VmEnd::PowerOff),
                SystemEventKind::Reset => self.system_reset(index, &ev),
                SystemEventKind::Suspend => self.stop(VmEnd::Error("system suspend (unsupported)")),
            },
            VcpuExit::Sleep => {
                self.counters.sleeps.fetch_add(1, Ordering::Relaxed);
            }
            // The backend decided whether it blocks or yields
            // (`HostVmm::wfi`).
            VcpuExit::Wfi => {
                self.counters.wfi.fetch_add(1, Ordering::Relaxed);
            }
            VcpuExit::Interrupted => {
                self.counters.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            VcpuExit::Halted => self.stop(VmEnd::Error("halted")),
            VcpuExit::InternalError(e) => {
                println!(
                    "vm {}: vCPU {index} stopped: {e:?} (PC {:#x})",
                    self.name,
                    vcpu.context().gprs.pc
                );
                self.stop(VmEnd::Error("internal error"));
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stopping_now()
    }
}

/// How a reset event is named on the console.
struct ResetKind<'a>(&'a SystemEvent);

impl core::fmt::Display for ResetKind<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let ev = self.0;
        if ev.kind == SystemEventKind::Shutdown {
            return if ev.flags & SystemEvent::FLAG_PSCI_OFF2 == 0 {
                write!(f, "PSCI SYSTEM_OFF")
            } else {
                write!(f, "PSCI SYSTEM_OFF2")
            };
        }
        if ev.flags & SystemEvent::FLAG_PSCI_RESET2 == 0 {
            return write!(f, "PSCI SYSTEM_RESET");
        }
        match ev.args[0] {
            0 => write!(f, "PSCI SYSTEM_RESET2 (warm reset)"),
            t => write!(
                f,
                "PSCI SYSTEM_RESET2 (vendor reset type {t:#x}, cookie {:#x}: done as a warm reset)",
                ev.args[1]
            ),
        }
    }
}
