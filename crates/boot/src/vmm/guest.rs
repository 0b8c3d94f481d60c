//! A VM as the VMM sees it: a `pkvm_host::Vm` with its memslots over VMAs
//! of the VMM's process memory, its image (and device tree) loaded, the
//! emulated PL011, the results guests report, and the vCPU thread loop
//! around `Vcpu::run`.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};

use pkvm_arch::esr::{ec, Esr, FaultStatus};
use pkvm_arch::{Hva, Ipa};
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::psci::{PsciVm, SystemEventKind};
use pkvm_host::reset::BootParams;
use pkvm_host::{VcpuExit, VmConfig};
use pkvm_sync::{LockClass, SpinLock};

use super::backend::{self, HwBackend};
use super::fdtgen;
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use crate::println;

/// The host VM type in the image.
pub type BootVm = pkvm_host::Vm<BootPlatform, BootProcess>;

/// Guest RAM base IPA.
pub const GUEST_RAM: u64 = 0x4000_0000;
/// IPA size of every VM.
pub const IPA_BITS: u32 = 40;
/// Most vCPUs per VM here (one physical CPU each).
pub const MAX_VCPUS: usize = 8;
/// The vendor report hypercall of guest-rt.
pub const REPORT_FID: u64 = 0xc600_0100;
const BLOCK: u64 = 2 << 20;
const PAGE: u64 = 4096;

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
    pub const COUNT: usize = 8;
}

/// What to put in a new VM.
pub struct VmSpec<'a> {
    /// Name (console prefix).
    pub name: &'static str,
    /// RAM bytes at [`GUEST_RAM`].
    pub mem: u64,
    /// Backing of its memory.
    pub backing: Backing,
    /// Image bytes, loaded at `GUEST_RAM + load_offset`.
    pub image: &'a [u8],
    /// Offset of the image in RAM.
    pub load_offset: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Device tree command line (`Some`: generate a DTB, x0 = its IPA).
    pub dtb_bootargs: Option<&'a str>,
    /// A protected VM (protected mode only).
    pub protected: bool,
    /// A region of RAM (IPA, bytes; 2M aligned) in a memslot of its own,
    /// so its faults are counted apart; x0/x1 of the boot vCPU.
    pub touch: Option<(u64, u64)>,
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
}

impl core::fmt::Display for VmmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmmError::BadConfig(s) => write!(f, "bad VM configuration: {s}"),
            VmmError::ImageTooBig => write!(f, "the image does not fit in guest RAM"),
            VmmError::Host(e) => write!(f, "pkvm-host: {e}"),
            VmmError::NoMemory => write!(f, "host page pool exhausted"),
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
    /// PSCI SYSTEM_RESET (not restarted here).
    Reset,
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
    /// Guest entries (all vCPUs).
    pub entries: AtomicU64,
    /// Reports through the vendor hypercall.
    pub reports: AtomicU64,
    /// Trapped sysreg accesses (RAZ/WI in the backend).
    pub sysreg: AtomicU64,
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
    boot_args: [u64; 3],
    entry: u64,
    reports: SpinLock<[Option<(u64, u64)>; code::COUNT]>,
    uart: SpinLock<LineBuf>,
    end: SpinLock<Option<VmEnd>>,
    stopping: AtomicBool,
    warned_unclaimed: AtomicBool,
    /// Counters.
    pub counters: VmmCounters,
    /// Physical CPU of each vCPU's thread (usize::MAX: never ran).
    pub cpus: [AtomicUsize; MAX_VCPUS],
    /// VMID the hardware ran it with (0 until it ran).
    pub hw_vmid: AtomicU16,
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
    if spec.mem < 2 * BLOCK || !spec.mem.is_multiple_of(BLOCK) || spec.mem > 1 << 30 {
        return Err(VmmError::BadConfig(
            "memory must be a multiple of 2 MiB, 4 MiB..1 GiB",
        ));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(VmmError::BadConfig("vCPU count"));
    }
    let dtb_reserve = if spec.dtb_bootargs.is_some() {
        BLOCK
    } else {
        0
    };
    if spec.load_offset + spec.image.len() as u64 + dtb_reserve > spec.mem {
        return Err(VmmError::ImageTooBig);
    }
    let ram_end = GUEST_RAM + spec.mem;
    if let Some((t, n)) = spec.touch {
        if !t.is_multiple_of(BLOCK) || !n.is_multiple_of(BLOCK) || t < GUEST_RAM || t + n > ram_end
        {
            return Err(VmmError::BadConfig("touch region"));
        }
    }
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
    // Memslots: RAM, with the touch region (if any) in a slot of its own.
    let mut ranges: Vec<(u64, u64, bool)> = Vec::new();
    match spec.touch {
        Some((t, n)) => {
            ranges.push((GUEST_RAM, t, false));
            ranges.push((t, t + n, true));
            ranges.push((t + n, ram_end, false));
        }
        None => ranges.push((GUEST_RAM, ram_end, false)),
    }
    let mut g = GuestVm {
        name: spec.name,
        vm,
        platform: platform.clone(),
        process: process.clone(),
        vmas: Vec::new(),
        touch_vma: None,
        mem: spec.mem,
        backing: spec.backing,
        boot_args: [0; 3],
        entry: GUEST_RAM + spec.load_offset,
        reports: SpinLock::new([None; code::COUNT], LockClass::Leaf),
        uart: SpinLock::new(
            LineBuf {
                buf: [0; 160],
                n: 0,
            },
            LockClass::Leaf,
        ),
        end: SpinLock::new(None, LockClass::Leaf),
        stopping: AtomicBool::new(false),
        warned_unclaimed: AtomicBool::new(false),
        counters: VmmCounters::default(),
        cpus: [const { AtomicUsize::new(usize::MAX) }; MAX_VCPUS],
        hw_vmid: AtomicU16::new(0),
    };
    let cpu = crate::platform::start::cpu_index();
    for (slot, &(s, e, touch)) in ranges.iter().filter(|r| r.1 > r.0).enumerate() {
        let Some(hva) = process.mmap(e - s, spec.backing) else {
            g.release_vmas();
            return Err(VmmError::BadConfig("memslot size"));
        };
        g.vmas.push(hva);
        if touch {
            g.touch_vma = Some(hva);
        }
        let r = g.vm.set_user_memory_region(
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
            g.release_vmas();
            return Err(e.into());
        }
    }
    let mut x0 = 0;
    if let Err(e) = g.load(spec, &mut x0) {
        g.release_vmas();
        return Err(e);
    }
    if let Some((t, n)) = spec.touch {
        x0 = t;
        g.boot_args = [n, 0, 0];
    }
    g.vm.power_on(BootParams {
        entry: g.entry,
        x0,
        big_endian: false,
    })?;
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

    fn load(&self, spec: &VmSpec<'_>, x0: &mut u64) -> Result<(), VmmError> {
        self.write_guest(self.entry, spec.image)?;
        if let Some(bootargs) = spec.dtb_bootargs {
            let mut blob = [0u8; 8192];
            let n = fdtgen::vm_device_tree(&mut blob, GUEST_RAM, spec.mem, spec.vcpus, bootargs)
                .map_err(|_| VmmError::BadConfig("device tree too big (command line?)"))?;
            fdtgen::verify(&blob[..n], GUEST_RAM, spec.mem, spec.vcpus, bootargs)
                .map_err(VmmError::BadConfig)?;
            let dtb_ipa = GUEST_RAM + spec.mem - BLOCK;
            self.write_guest(dtb_ipa, &blob[..n])?;
            println!(
                "vm {}: device tree at IPA {dtb_ipa:#x} ({n} bytes, {} vCPUs, bootargs \"{bootargs}\"), checked with the fdt crate",
                spec.name, spec.vcpus
            );
            *x0 = dtb_ipa;
        }
        Ok(())
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

    /// How it ended (once stopped).
    pub fn end(&self) -> Option<VmEnd> {
        *self.end.lock()
    }

    /// Guest faults resolved in the touch slot (pins of its VMA).
    pub fn touch_faults(&self) -> u64 {
        self.touch_vma.map_or(0, |h| self.process.pins(h))
    }

    /// The VM's VMID (standard mode) or handle (protected mode).
    pub fn kick_id(&self) -> u16 {
        self.vm.vmid().or(self.vm.handle()).unwrap_or(0)
    }

    /// Stops the VM: records why (the first reason wins) and kicks every
    /// vCPU thread.
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

    fn uart_putc(&self, c: u8) {
        let mut u = self.uart.lock();
        if c == b'\n' || u.n == u.buf.len() {
            let line = core::str::from_utf8(&u.buf[..u.n]).unwrap_or("<non-utf8 output>");
            println!("[{}] {line}", self.name);
            u.n = 0;
            if c == b'\n' {
                return;
            }
        }
        if c != b'\r' {
            let n = u.n;
            u.buf[n] = c;
            u.n += 1;
        }
    }

    /// Emulates an MMIO access: the PL011 at `fdtgen::GUEST_UART` (data
    /// register writes go to the console, FR reads "TX empty", ID
    /// registers for probing); anything else reads as 0, writes ignored.
    fn mmio(&self, addr: u64, len: u8, write: bool, data: u64) -> u64 {
        self.counters.mmio.fetch_add(1, Ordering::Relaxed);
        const PL011_ID: [u64; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
        let uart = fdtgen::GUEST_UART;
        if (uart..uart + 0x1000).contains(&addr) {
            return match (write, addr - uart) {
                (true, 0) => {
                    self.uart_putc(data as u8);
                    0
                }
                (true, _) => 0,
                (false, 0x18) => 0x90,
                (false, off @ 0xfe0..=0xffc) => PL011_ID[((off - 0xfe0) / 4) as usize],
                (false, _) => 0,
            };
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

    /// The VMM's hypercall filter: guest-rt's report call.
    fn filter(&self, x: &mut [u64; 31]) -> bool {
        if x[0] != REPORT_FID {
            return false;
        }
        self.counters.reports.fetch_add(1, Ordering::Relaxed);
        self.on_report(x[1], x[2], x[3]);
        x[0] = 0;
        true
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
            _ => println!("vm {name}: report {c}: {a:#x} {b:#x}"),
        }
    }

    /// The vCPU thread: claims vCPU `index` and runs it on this physical
    /// CPU until the VM stops.
    pub fn vcpu_thread(&self, index: usize) {
        let cpu = crate::platform::start::cpu_index();
        if let Some(c) = self.cpus.get(index) {
            c.store(cpu, Ordering::Relaxed);
        }
        let mut vcpu = match self.vm.vcpu(index) {
            Ok(v) => v,
            Err(e) => {
                println!("vm {}: vCPU {index}: {e}", self.name);
                self.stop(VmEnd::Error("vCPU claim failed"));
                return;
            }
        };
        let id = self.kick_id();
        let kick = self.platform.register_vcpu(id, index, cpu);
        let filter = |x: &mut [u64; 31]| self.filter(x);
        let mut hw = backend::new_hw_state();
        let mut be = HwBackend::new(cpu, &mut hw, kick.clone(), self.platform.hyp(), &filter);
        if index == 0 && self.boot_args != [0; 3] {
            be.set_boot_args(self.entry, self.boot_args);
        }
        while !self.stopping.load(Ordering::Acquire) {
            let exit = vcpu.run(&mut be);
            self.counters.run_exits.fetch_add(1, Ordering::Relaxed);
            if be.last_vmid != 0 {
                self.hw_vmid.store(be.last_vmid, Ordering::Relaxed);
            }
            match exit {
                VcpuExit::Mmio {
                    addr,
                    len,
                    write,
                    data,
                } => {
                    let v = self.mmio(addr.0, len, write, data);
                    if !write {
                        vcpu.complete_mmio(v);
                    }
                }
                VcpuExit::SystemEvent(ev) => {
                    let why = match ev.kind {
                        SystemEventKind::Shutdown => VmEnd::PowerOff,
                        SystemEventKind::Reset => VmEnd::Reset,
                        SystemEventKind::Suspend => VmEnd::Error("system suspend (unsupported)"),
                    };
                    self.stop(why);
                }
                VcpuExit::Sleep => {
                    self.counters.sleeps.fetch_add(1, Ordering::Relaxed);
                    while !kick.swap(false, Ordering::AcqRel)
                        && !self.stopping.load(Ordering::Acquire)
                    {
                        core::hint::spin_loop();
                    }
                }
                // No interrupt controller model yet: nothing to wait for.
                VcpuExit::Wfi => {
                    self.counters.wfi.fetch_add(1, Ordering::Relaxed);
                }
                // Hook for the scheduler (GIC/timer work): return here on
                // a physical interrupt, then re-enter.
                VcpuExit::Interrupted => {
                    self.counters.interrupted.fetch_add(1, Ordering::Relaxed);
                }
                VcpuExit::Halted => self.stop(VmEnd::Error("halted")),
                VcpuExit::InternalError(e) => {
                    let ctx = vcpu.context();
                    println!(
                        "vm {}: vCPU {index} stopped: {e:?} (PC {:#x})",
                        self.name, ctx.gprs.pc
                    );
                    self.stop(VmEnd::Error("internal error"));
                }
            }
        }
        self.platform.unregister_vcpu(id, index);
        let s = be.stats;
        self.counters
            .entries
            .fetch_add(s.entries, Ordering::Relaxed);
        self.counters.sysreg.fetch_add(s.sysreg, Ordering::Relaxed);
    }

    /// Prints the VM's statistics (pkvm-host's `VmStats` and the VMM's).
    pub fn print_stats(&self) {
        let s = self.vm.stats().snapshot();
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let cpus: Vec<usize> = (0..self.vm.vcpu_count())
            .map(|i| self.cpus[i].load(Ordering::Relaxed))
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
            "vm {}: run loop: {} guest entries, {} exits to the VMM (mmio {} of which outside memslots {}, wfi {}, interrupted {}, sleeps {}), {} reports, {} sysreg traps; {} {}, hw vmid {}, cpus {:?}, {} MiB {}{}",
            self.name,
            l(&c.entries),
            l(&c.run_exits),
            l(&c.mmio),
            l(&c.mmio_unclaimed),
            l(&c.wfi),
            l(&c.interrupted),
            l(&c.sleeps),
            l(&c.reports),
            l(&c.sysreg),
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
    }

    /// Tears the VM down (pkvm-host's single-owner teardown), then unmaps
    /// its VMAs; returns the frames the VMAs released.
    ///
    /// The caller must have joined every vCPU thread.
    pub fn destroy(self: Arc<Self>) -> u64 {
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
