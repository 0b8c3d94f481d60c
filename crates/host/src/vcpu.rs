//! vCPUs and the run loop: enter the guest through a [`VcpuBackend`],
//! handle what the host can (stage-2 faults, PSCI, SMCCC), and return to
//! the VMM with a [`VcpuExit`] for the rest.

use alloc::sync::Arc;
use core::sync::atomic::Ordering;

use pkvm_arch::esr::{ec, Esr};
use pkvm_arch::smccc;
use pkvm_arch::{Ipa, PAGE_SIZE};

use crate::fault::{FaultKind, GuestFault};
use crate::hypcall;
use crate::memslot::{Memslot, Memslots};
use crate::mmu::{HypMapping, S2State};
use crate::pipeline::{self, Mapped, MemFaultError, Route};
use crate::platform::{
    GuestExit, HostPageCache, HostPlatform, ProcessMemory, VcpuBackend, VcpuContext,
};
use crate::psci::{self, PsciCaller, PsciOutcome, SystemEvent};
use crate::reset::{self, Readiness};
use crate::vm::{Stat, Vm, VmError};

/// Why `run` returned to the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// A guest access to emulated memory. For a read, the VMM passes the
    /// value to [`Vcpu::complete_mmio`] before the next run.
    Mmio {
        /// Guest-physical address.
        addr: Ipa,
        /// Access size in bytes.
        len: u8,
        /// Write.
        write: bool,
        /// The value written (writes only).
        data: u64,
    },
    /// The guest asked for a shutdown, reset or suspend.
    SystemEvent(SystemEvent),
    /// An HVC/SMC outside the PSCI/SMCCC-architecture ranges the host
    /// emulates (e.g. a vendor call), forwarded to the VMM (KVM's
    /// `KVM_EXIT_HYPERCALL`). x0 is already `NOT_SUPPORTED` and an SMC was
    /// stepped over, so a VMM that does not know the call can simply run
    /// again; one that does writes its results into
    /// [`Vcpu::context_mut`]`().gprs.x[0..4]`.
    Hypercall {
        /// The SMCCC function id (x0 at the call).
        func: u32,
        /// Arguments x1..x6.
        args: [u64; 6],
        /// SMC (else HVC).
        smc: bool,
        /// The instruction's immediate.
        imm: u16,
    },
    /// The vCPU is powered off or suspended: wait for a kick, then run again.
    Sleep,
    /// WFI/WFE: nothing pending to deliver (no interrupt controller model).
    Wfi,
    /// A physical interrupt / preemption: the VMM may run again.
    Interrupted,
    /// The simulated guest program finished.
    Halted,
    /// The host could not handle an exit; the guest cannot continue.
    InternalError(RunError),
}

/// An exit the host cannot handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunError {
    /// A device access without a valid syndrome (KVM_EXIT_ARM_NISV).
    MmioWithoutSyndrome(Ipa),
    /// A fault status the host does not handle.
    UnsupportedFault(u64),
    /// A trap the host does not emulate (ESR).
    UnhandledTrap(u64),
    /// Memory fault handling failed.
    Memory(MemFaultError),
    /// The VM failed (torn down, hypervisor refusal, no memory).
    Vm(VmError),
    /// The simulated guest detected corrupted memory.
    GuestCheckFailed,
}

/// A claimed vCPU: owns its context and its page cache. One thread runs it.
pub struct Vcpu<P: HostPlatform, M: ProcessMemory> {
    vm: Arc<Vm<P, M>>,
    index: usize,
    ctx: VcpuContext,
    cache: HostPageCache<P>,
    /// This vCPU's copy of the VM's memslots and the change generation it
    /// was taken at (see [`Vcpu::slot_of`]).
    slots: Option<(u64, Memslots)>,
    /// The MMIO read waiting for the VMM's data.
    pending_mmio: Option<GuestFault>,
    pending_mmio_value: Option<u64>,
}

impl<P: HostPlatform, M: ProcessMemory> core::fmt::Debug for Vcpu<P, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Pages a fault may need for tables: one per level below the root.
fn cache_min<P: HostPlatform, M: ProcessMemory>(vm: &Vm<P, M>) -> usize {
    (3 - vm.geometry().start_level.0) as usize
}

/// Puts a loaded vCPU (protected mode) on every exit path.
struct Loaded<'a, P: HostPlatform> {
    platform: &'a P,
    cpu: usize,
}

impl<P: HostPlatform> Drop for Loaded<'_, P> {
    fn drop(&mut self) {
        let r = hypcall::vcpu_put(self.platform, self.cpu);
        debug_assert!(r.is_ok(), "vcpu_put: {r:?}");
    }
}

impl<P: HostPlatform, M: ProcessMemory> Vcpu<P, M> {
    pub(crate) fn new(vm: Arc<Vm<P, M>>, index: usize) -> Self {
        let cache = HostPageCache::new(vm.platform.clone());
        Vcpu {
            vm,
            index,
            ctx: VcpuContext::default(),
            cache,
            slots: None,
            pending_mmio: None,
            pending_mmio_value: None,
        }
    }

    /// The vCPU index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm<P, M>> {
        &self.vm
    }

    /// The architectural context.
    pub fn context(&self) -> &VcpuContext {
        &self.ctx
    }

    /// The architectural context, mutable (for the VMM's register setup).
    pub fn context_mut(&mut self) -> &mut VcpuContext {
        &mut self.ctx
    }

    /// Gives the VMM's result of an MMIO read; the next [`Vcpu::run`]
    /// completes the guest's load with it.
    pub fn complete_mmio(&mut self, value: u64) {
        if self.pending_mmio.is_some() {
            self.pending_mmio_value = Some(value);
        }
    }

    /// Runs the vCPU until something needs the VMM.
    pub fn run<B: VcpuBackend>(&mut self, be: &mut B) -> VcpuExit {
        let cpu = be.cpu();
        if let Some(f) = self.pending_mmio.take() {
            let v = self.pending_mmio_value.take().unwrap_or(0);
            be.complete_mmio(&mut self.ctx, &f, v);
        }
        let vm = self.vm.clone();
        if let Err(e) = vm.ensure_hyp_init(cpu) {
            return VcpuExit::InternalError(RunError::Vm(e));
        }
        let _loaded = match vm.handle() {
            Some(h) => match hypcall::vcpu_load(&*vm.platform, cpu, h, self.index) {
                Ok(_) => Some(Loaded {
                    platform: &*vm.platform,
                    cpu,
                }),
                Err(e) => return VcpuExit::InternalError(RunError::Vm(e.into())),
            },
            None => None,
        };
        loop {
            match reset::prepare_to_run(&*vm, self.index, &mut self.ctx.gprs, &mut self.ctx.sys) {
                Ok(Readiness::Run { reset: Some(start) }) => be.on_reset(&mut self.ctx, &start),
                Ok(Readiness::Run { reset: None }) => {}
                Ok(Readiness::Sleep(_)) => return VcpuExit::Sleep,
                Err(_) => {
                    return VcpuExit::InternalError(RunError::Vm(VmError::NoSuchVcpu(self.index)))
                }
            }
            let s2 = match vm.stage_two() {
                Ok(s) => s,
                Err(e) => return VcpuExit::InternalError(RunError::Vm(e)),
            };
            let exit = be.enter(&mut self.ctx, &s2);
            match exit {
                GuestExit::Abort { esr, far, hpfar } => match GuestFault::decode(esr, far, hpfar) {
                    Ok(fault) => {
                        if let Some(exit) = self.handle_abort(&vm, be, cpu, &fault) {
                            return exit;
                        }
                    }
                    Err(_) => return VcpuExit::InternalError(RunError::UnhandledTrap(esr)),
                },
                GuestExit::Call { esr } => {
                    vm.stats.add(Some(self.index), Stat::GuestCalls, 1);
                    if let Some(exit) = self.handle_call(Esr(esr)) {
                        return exit;
                    }
                }
                GuestExit::Wfx => return VcpuExit::Wfi,
                GuestExit::Interrupt => return VcpuExit::Interrupted,
                GuestExit::ProgramDone => return VcpuExit::Halted,
                GuestExit::GuestCheckFailed => {
                    return VcpuExit::InternalError(RunError::GuestCheckFailed)
                }
                GuestExit::Unhandled { esr } => {
                    return VcpuExit::InternalError(RunError::UnhandledTrap(esr))
                }
            }
        }
    }

    /// An HVC/SMC from the guest: PSCI and SMCCC arch calls are emulated;
    /// anything else gets SMCCC NOT_SUPPORTED in x0 (and a trapped SMC is
    /// stepped over), from the PSCI module.
    fn handle_call(&mut self, esr: Esr) -> Option<VcpuExit> {
        let vm = &*self.vm;
        let big_endian = self.ctx.sys.is_big_endian();
        let caller = PsciCaller::from_esr(self.index, esr, big_endian)?;
        let func = self.ctx.gprs.x[0] as u32;
        let owner = smccc::FunctionId(func).owner();
        if owner != smccc::OWNER_ARCH && owner != smccc::OWNER_STANDARD {
            let x = &mut self.ctx.gprs.x;
            let args = [x[1], x[2], x[3], x[4], x[5], x[6]];
            x[0] = smccc::ret::NOT_SUPPORTED as u64;
            let smc = esr.ec() == ec::SMC64;
            if smc {
                // A trapped SMC returns to the SMC itself: step over it.
                self.ctx.gprs.pc = self.ctx.gprs.pc.wrapping_add(4);
            }
            return Some(VcpuExit::Hypercall {
                func,
                args,
                smc,
                imm: esr.imm16(),
            });
        }
        match psci::handle_psci(vm, &caller, &mut self.ctx.gprs) {
            Ok(PsciOutcome::Continue) => None,
            Ok(PsciOutcome::WaitForInterrupt) => Some(VcpuExit::Wfi),
            Ok(PsciOutcome::PowerOff) | Ok(PsciOutcome::Suspended) => Some(VcpuExit::Sleep),
            Ok(PsciOutcome::Exit(ev)) => Some(VcpuExit::SystemEvent(ev)),
            Err(_) => Some(VcpuExit::InternalError(RunError::Vm(VmError::NoSuchVcpu(
                self.index,
            )))),
        }
    }

    /// `vm` is the run loop's reference to this vCPU's VM: the fault path
    /// takes no reference of its own (a shared refcount every vCPU would
    /// bounce on each fault).
    /// The memslot holding `ipa`, from this vCPU's copy of the memslots,
    /// refreshed under the memslots lock only when a memslot change bumped
    /// the generation: the fault path writes nothing other vCPUs share. As
    /// with a copy taken under the lock, a slot deleted or moved after the
    /// invalidation sequence was sampled makes the fault retry.
    fn slot_of(&mut self, vm: &Vm<P, M>, ipa: Ipa) -> Option<Memslot> {
        let gen = vm.slots_gen.load(Ordering::Acquire);
        if self.slots.as_ref().map(|(g, _)| *g) != Some(gen) {
            let slots = vm.slots.read();
            // Stable while the read lock is held (changes bump it under
            // the write lock).
            let gen = vm.slots_gen.load(Ordering::Acquire);
            self.slots = Some((gen, slots.clone()));
        }
        self.slots.as_ref().and_then(|(_, s)| s.find(ipa).copied())
    }

    fn handle_abort<B: VcpuBackend>(
        &mut self,
        vm: &Vm<P, M>,
        be: &mut B,
        cpu: usize,
        fault: &GuestFault,
    ) -> Option<VcpuExit> {
        // The invalidation sequence is sampled before the memslot lookup:
        // a slot deleted after this point bumps it (see Vm::invalidate_ipa).
        let seq = vm.mmu.seq();
        let slot = self.slot_of(vm, fault.ipa);
        match pipeline::classify(fault, vm.geometry().ipa_size(), slot.as_ref()) {
            Route::InjectAbort => {
                vm.stats.add(Some(self.index), Stat::InjectedAborts, 1);
                be.inject_abort(&mut self.ctx, fault);
                None
            }
            Route::Mmio => {
                vm.stats.add(Some(self.index), Stat::MmioExits, 1);
                let s = fault.syndrome.expect("Route::Mmio has a syndrome");
                let data = if fault.write {
                    let v = if s.srt == 31 {
                        0
                    } else {
                        self.ctx.gprs.x[s.srt as usize]
                    };
                    let bits = 8 * s.size() as u32;
                    if bits == 64 {
                        v
                    } else {
                        v & ((1u64 << bits) - 1)
                    }
                } else {
                    0
                };
                if fault.write {
                    // Nothing to wait for: step past the store now.
                    be.complete_mmio(&mut self.ctx, fault, 0);
                } else {
                    self.pending_mmio = Some(*fault);
                }
                Some(VcpuExit::Mmio {
                    addr: fault.ipa,
                    len: s.size(),
                    write: fault.write,
                    data,
                })
            }
            Route::MmioNoSyndrome => Some(VcpuExit::InternalError(RunError::MmioWithoutSyndrome(
                fault.ipa,
            ))),
            Route::SkipCacheMaintenance => {
                be.complete_mmio(&mut self.ctx, fault, 0);
                None
            }
            Route::Unsupported => Some(VcpuExit::InternalError(RunError::UnsupportedFault(
                fault.ipa.0,
            ))),
            Route::AccessFlag(_) => {
                vm.stats.add(Some(self.index), Stat::AccessFlagFaults, 1);
                self.handle_access_flag(cpu, fault);
                None
            }
            Route::Memory(slot) => match self.memory_fault(vm, cpu, fault, &slot, seq) {
                Ok(_) => None,
                Err(e) => Some(VcpuExit::InternalError(RunError::Memory(e))),
            },
        }
    }

    fn handle_access_flag(&mut self, cpu: usize, fault: &GuestFault) {
        let vm = &*self.vm;
        let state = vm.mmu.state.read();
        match state.as_ref() {
            Some(S2State::Standard(pt)) => {
                let env = vm.platform.s2_env(vm.vmid().unwrap_or(0));
                // Not mapped any more: the guest retries and faults again.
                let _ = pt.shared().mkyoung(&env, fault.page());
            }
            Some(S2State::Protected(_)) => {
                if let Some(h) = vm.handle() {
                    let _ = hypcall::mkyoung_guest(&*vm.platform, cpu, h, fault.page().gfn());
                }
            }
            None => {}
        }
    }

    /// The memory fault pipeline.
    fn memory_fault(
        &mut self,
        vm: &Vm<P, M>,
        cpu: usize,
        fault: &GuestFault,
        slot: &crate::memslot::Memslot,
        seq: u64,
    ) -> Result<Mapped, MemFaultError> {
        match fault.kind {
            FaultKind::Permission => vm.stats.add(Some(self.index), Stat::PermissionFaults, 1),
            _ => vm.stats.add(Some(self.index), Stat::TranslationFaults, 1),
        };
        // Step 2: before any lock.
        // A permission fault on a block may split it (a write to a block
        // that dirty logging write-protected): that needs a table page.
        let may_split = fault.level.is_some_and(|l| l.0 < 3);
        if vm.handle().is_none() && (fault.kind != FaultKind::Permission || may_split) {
            pipeline::topup(&mut self.cache, cache_min(vm))?;
        }
        // Step 3: the VMA snapshot; the VMA itself never leaves this call.
        let hva = slot.hva_of(fault.page());
        let vma = pipeline::snapshot_vma(&*vm.mm, hva)?;
        // Steps 4-6: pin (RAII) and decide.
        let Some(target) = pipeline::pin_target(&*vm.mm, fault, slot, &vma)? else {
            vm.stats.add(Some(self.index), Stat::Retries, 1);
            return Ok(Mapped::Retry);
        };
        // Step 7.
        let result = match vm.handle() {
            None => {
                let state = vm.mmu.state.read();
                let Some(S2State::Standard(pt)) = state.as_ref() else {
                    return Err(MemFaultError::Dead);
                };
                if vm.mmu.retry(seq, fault.ipa) {
                    Ok(Mapped::Retry)
                } else {
                    pipeline::map_standard(
                        &*vm.platform,
                        vm.vmid().unwrap_or(0),
                        pt,
                        fault,
                        &target,
                        &mut self.cache,
                    )
                }
                // `target.pin` drops after the lock: the page reference is
                // released on every path.
            }
            Some(_) => self.map_protected(vm, cpu, fault, target, seq),
        };
        if fault.write && matches!(result, Ok(Mapped::Map(_) | Mapped::Relaxed)) {
            // After the page is mapped writable (see the dirty module).
            vm.mark_page_dirty(slot, fault.page());
        }
        match result {
            Ok(Mapped::Map(size)) => {
                vm.stats.add(Some(self.index), Stat::BytesMapped, size);
                let stat = match size {
                    PAGE_SIZE => Stat::Maps4K,
                    s if s == 2 << 20 => Stat::Maps2M,
                    _ => Stat::Maps1G,
                };
                vm.stats.add(Some(self.index), stat, 1);
            }
            Ok(Mapped::Retry) => {
                vm.stats.add(Some(self.index), Stat::Retries, 1);
            }
            _ => {}
        }
        result
    }

    /// Step 7 (protected mode). The hypervisor's memcache running dry is
    /// not the guest's business: it is topped up outside the MMU lock and
    /// the block resumed within this fault. While the lock is dropped the
    /// pages shared so far are recorded (see [`map_protected_locked`]), so
    /// the MMU notifier unshares them and another vCPU faulting on the
    /// block resumes it rather than sharing its first pages again.
    fn map_protected(
        &mut self,
        vm: &Vm<P, M>,
        cpu: usize,
        fault: &GuestFault,
        t: pipeline::Target<M::Pin>,
        seq: u64,
    ) -> Result<Mapped, MemFaultError> {
        let block = pipeline::Block::of(&t).within_chunk(fault.page().gfn());
        let mut pin = Some(t.pin);
        for _ in 0..MAX_HYP_TOPUPS {
            match map_protected_locked(vm, cpu, fault, &block, t.prot, &mut pin, seq) {
                Ok(m) => return Ok(m),
                Err(Stop::NoMemory) => {
                    let need = (block.npages / 512 + 4) as usize;
                    if vm.topup_hyp_memcache(cpu, need).is_err() {
                        break;
                    }
                }
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
        // Out of memory for good: a non-protected VM's partial block is
        // taken back; a protected VM's donations cannot be, and stay
        // recorded (with the page reference) for teardown to reclaim.
        let state = vm.mmu.state.read();
        if let (Some(S2State::Protected(maps)), Some(h)) = (state.as_ref(), vm.handle()) {
            if !vm.config().protected {
                undo_partial(&*vm.platform, cpu, h, &mut maps.shard(block.gfn), &block);
            }
        }
        Err(MemFaultError::NoMemory)
    }
}

/// How many times one fault tops the hypervisor's memcache up.
const MAX_HYP_TOPUPS: usize = 4;

/// Why [`map_protected_locked`] stopped without a result for the guest.
enum Stop {
    /// The hypervisor's memcache ran dry: top it up and try again.
    NoMemory,
    /// The fault fails.
    Failed(MemFaultError),
}

/// One attempt at step 7 (protected mode) under the MMU read lock and the
/// mapping table shard of the block's chunk:
/// re-checks the invalidation sequence (also after a top-up dropped the
/// lock), decides ([`pipeline::plan_protected`]), shares or donates, and
/// records the pages done in the mapping table before the lock goes, the
/// page reference `pin` moving into a new entry.
fn map_protected_locked<P: HostPlatform, M: ProcessMemory>(
    vm: &Vm<P, M>,
    cpu: usize,
    fault: &GuestFault,
    target: &pipeline::Block,
    prot: pkvm_arch::pte::S2Prot,
    pin: &mut Option<M::Pin>,
    seq: u64,
) -> Result<Mapped, Stop> {
    let state = vm.mmu.state.read();
    let (Some(S2State::Protected(maps)), Some(h)) = (state.as_ref(), vm.handle()) else {
        return Err(Stop::Failed(MemFaultError::Dead));
    };
    if vm.mmu.retry(seq, fault.ipa) {
        return Ok(Mapped::Retry);
    }
    // Every entry that can cover the block is in its chunk's shard; the
    // decision and the record of what was mapped are made under it.
    let maps = &mut *maps.shard(target.gfn);
    let permission = fault.kind == FaultKind::Permission;
    let (block, from) = match pipeline::plan_protected(maps, fault.page().gfn(), permission, target)
    {
        pipeline::ProtectedPlan::Mapped if permission => {
            return hypcall::relax_perms_guest(&*vm.platform, cpu, fault.page().gfn(), prot)
                .map(|_| Mapped::Relaxed)
                .map_err(|e| Stop::Failed(MemFaultError::Hyp(e)));
        }
        pipeline::ProtectedPlan::Mapped => return Ok(Mapped::Retry),
        pipeline::ProtectedPlan::Map { block, from } => (block, from),
    };
    if from == 0 && pin.is_none() {
        // Our reference went with an entry that was taken back since:
        // the guest faults again and pins afresh.
        return Ok(Mapped::Retry);
    }
    let mut done = from;
    let protected = vm.config().protected;
    let r = pipeline::map_protected(&*vm.platform, cpu, protected, &block, prot, &mut done);
    if from > 0 {
        if let Some(m) = maps.get_mut(&block.gfn.0) {
            m.npages = done;
        }
    } else if done > 0 {
        let _pin = pin.take().expect("checked above");
        let (npages, pa) = (done, block.pa);
        maps.insert(block.gfn.0, HypMapping { npages, pa, _pin });
    }
    match r {
        Ok(()) => Ok(Mapped::Map(block.npages * PAGE_SIZE)),
        Err(e) if e.is_no_memory() => Err(Stop::NoMemory),
        Err(e) => {
            if !protected {
                undo_partial(&*vm.platform, cpu, h, maps, &block);
            }
            Err(Stop::Failed(MemFaultError::Hyp(e)))
        }
    }
}

/// Takes back the recorded part of `block` if sharing it stopped part-way
/// (a non-protected VM), so no guest mapping outlives the host reference
/// and nothing half-done stays behind. Called with the MMU lock and the
/// block's shard of the mapping table held.
fn undo_partial<P: HostPlatform + ?Sized, Pin>(
    p: &P,
    cpu: usize,
    handle: u16,
    maps: &mut alloc::collections::BTreeMap<u64, HypMapping<Pin>>,
    block: &pipeline::Block,
) {
    let key = block.gfn.0;
    let partial = |m: &HypMapping<Pin>| m.pa == block.pa && m.npages < block.npages;
    if !maps.get(&key).is_some_and(partial) {
        return;
    }
    if let Some(m) = maps.remove(&key) {
        for g in key..key + m.npages {
            let _ = hypcall::unshare_guest(p, cpu, handle, pkvm_arch::Gfn(g));
        }
        // `m` (the page reference) drops only now that the guest lost
        // the pages.
    }
}

impl<P: HostPlatform, M: ProcessMemory> Drop for Vcpu<P, M> {
    fn drop(&mut self) {
        self.vm.vcpus[self.index]
            .claimed
            .store(false, Ordering::Release);
    }
}
