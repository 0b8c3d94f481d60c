//! Simulated CPUs running guest programs.
//!
//! A [`SimCpu`] loads a [`VmContext`] and a [`GuestProgram`], then
//! [`SimCpu::run`] executes the program's operations until one needs the
//! host: a stage-2 fault, HVC, SMC, WFI, the end of the program or the end of
//! the run budget. A faulting access stays pending and is retried by the
//! next `run` unless the handler completed it ([`SimCpu::emulate_pending`],
//! MMIO) or the guest took an abort ([`SimCpu::inject_abort`]).
//!
//! Loads go to `x1`, stores come from `x2` (so MMIO emulation finds the
//! value in the register the syndrome names). A store writes a recognisable
//! value: `0xA5` in the top byte, the CPU id, then a sequence number. Each
//! CPU remembers what it last wrote at each address (by IPA, byte-exact) and
//! checks its later verified reads against it: a mismatch is
//! [`SimExit::GuestError`]. Addresses written by other CPUs or the host are
//! not known and not checked; give each CPU its own verified region.

use std::collections::{HashMap, VecDeque};

use pkvm_arch::esr::{Esr, FaultStatus};
use pkvm_arch::{Ipa, Pa};

use crate::checker::{staleness, Coherence};
use crate::mmu::{check_leaf, walk, Access, AccessKind, Fault, VmContext};
use crate::Machine;
use std::sync::Arc;

/// Register loads target.
pub const LOAD_REG: u8 = 1;
/// Register stores take their value from.
pub const STORE_REG: u8 = 2;

/// One guest operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A memory access.
    Access {
        /// Address (naturally aligned for `size`).
        ipa: Ipa,
        /// Load, store or fetch.
        kind: AccessKind,
        /// 1, 2, 4 or 8 bytes.
        size: u8,
        /// Check the loaded value against what this CPU last wrote.
        verify: bool,
        /// A plain single-register load/store (valid syndrome, ISV=1).
        plain: bool,
    },
    /// `hvc #imm` with `x0..x3` set to `args`.
    Hvc {
        /// The immediate.
        imm: u16,
        /// `x0..x3`.
        args: [u64; 4],
    },
    /// `smc #imm` with `x0..x3` set to `args`.
    Smc {
        /// The immediate.
        imm: u16,
        /// `x0..x3`.
        args: [u64; 4],
    },
    /// `wfi`.
    Wfi,
}

impl Op {
    /// A verified plain load.
    pub fn read(ipa: Ipa, size: u8) -> Op {
        Op::Access {
            ipa,
            kind: AccessKind::Read,
            size,
            verify: true,
            plain: true,
        }
    }
    /// A plain store.
    pub fn write(ipa: Ipa, size: u8) -> Op {
        Op::Access {
            ipa,
            kind: AccessKind::Write,
            size,
            verify: true,
            plain: true,
        }
    }
    /// An instruction fetch.
    pub fn exec(ipa: Ipa) -> Op {
        Op::Access {
            ipa,
            kind: AccessKind::Exec,
            size: 4,
            verify: false,
            plain: false,
        }
    }
}

/// What a guest runs: a source of operations. `regs` are the CPU's
/// registers (results of HVCs are visible there).
pub trait GuestProgram: Send {
    /// The next operation, or `None` when the program is done.
    fn next_op(&mut self, regs: &[u64; 31]) -> Option<Op>;
}

/// A fixed list of operations.
#[derive(Clone, Debug, Default)]
pub struct Script(pub VecDeque<Op>);

impl Script {
    /// A script of `ops`.
    pub fn new(ops: impl IntoIterator<Item = Op>) -> Script {
        Script(ops.into_iter().collect())
    }
}

impl GuestProgram for Script {
    fn next_op(&mut self, _regs: &[u64; 31]) -> Option<Op> {
        self.0.pop_front()
    }
}

/// A program from a closure (tests use it to act in the middle of a run).
pub struct FnProgram<F>(pub F);

impl<F: FnMut(&[u64; 31]) -> Option<Op> + Send> GuestProgram for FnProgram<F> {
    fn next_op(&mut self, regs: &[u64; 31]) -> Option<Op> {
        (self.0)(regs)
    }
}

/// Something the guest did wrong, or saw that it should not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// A verified read did not return what this CPU last wrote there.
    #[error("cpu {cpu}: read of {size} bytes at {ipa:?} (pa {pa:?}) returned {found:#x}, last written {expected:#x}")]
    ReadMismatch {
        /// The CPU.
        cpu: usize,
        /// Guest address.
        ipa: Ipa,
        /// Physical address the read went to.
        pa: Pa,
        /// Access size.
        size: u8,
        /// What the CPU last wrote (known bytes only).
        expected: u64,
        /// What the read returned (same bytes).
        found: u64,
    },
    /// `run` was called with no VM context loaded (host error).
    #[error("cpu {0} has no VM context loaded")]
    NoContext(usize),
}

/// Why [`SimCpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimExit {
    /// A stage-2 fault (or external abort); the access is pending.
    Abort {
        /// `ESR_EL2`.
        esr: Esr,
        /// `FAR_EL2`.
        far: u64,
        /// `HPFAR_EL2`.
        hpfar: u64,
    },
    /// `hvc #imm`; `x0..` hold the arguments, the handler writes results.
    Hvc {
        /// The immediate.
        imm: u16,
    },
    /// `smc #imm`.
    Smc {
        /// The immediate.
        imm: u16,
    },
    /// `wfi`.
    Wfi,
    /// The program has no more operations.
    ProgramDone,
    /// The run budget is used up (scheduler preemption).
    Preempted,
    /// The guest saw something wrong (or the CPU was misused).
    GuestError(GuestError),
}

impl SimExit {
    /// A short name, for traces.
    pub fn name(&self) -> &'static str {
        match self {
            SimExit::Abort { .. } => "abort",
            SimExit::Hvc { .. } => "hvc",
            SimExit::Smc { .. } => "smc",
            SimExit::Wfi => "wfi",
            SimExit::ProgramDone => "done",
            SimExit::Preempted => "preempt",
            SimExit::GuestError(_) => "guest-error",
        }
    }

    /// For an abort exit: the fault.
    pub fn fault(&self) -> Option<Fault> {
        match *self {
            SimExit::Abort { esr, far, hpfar } => Some(Fault { esr, far, hpfar }),
            _ => None,
        }
    }
}

/// Per-CPU statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuStats {
    /// Accesses completed.
    pub accesses: u64,
    /// Loads completed.
    pub reads: u64,
    /// Stores completed.
    pub writes: u64,
    /// Fetches completed.
    pub fetches: u64,
    /// TLB hits.
    pub tlb_hits: u64,
    /// TLB misses (table walks).
    pub tlb_misses: u64,
    /// Abort exits.
    pub exits_abort: u64,
    /// HVC exits.
    pub exits_hvc: u64,
    /// SMC exits.
    pub exits_smc: u64,
    /// WFI exits.
    pub exits_wfi: u64,
    /// Budget exits.
    pub exits_preempt: u64,
    /// Guest-error exits.
    pub exits_guest_error: u64,
    /// Accesses completed by host emulation (MMIO).
    pub emulated: u64,
    /// Aborts injected into the guest.
    pub injected_aborts: u64,
    /// Verified reads that matched.
    pub verified_reads: u64,
    /// TLB invalidations this CPU's TLB received.
    pub tlbis_received: u64,
}

struct ShadowPage {
    vals: Box<[u64; 512]>,
    known: Box<[u8; 512]>,
}

/// What this CPU last wrote, per byte, by IPA.
#[derive(Default)]
struct Shadow {
    index: HashMap<u64, usize>,
    pages: Vec<ShadowPage>,
    last: Option<(u64, usize)>,
}

impl Shadow {
    fn page(&mut self, page: u64, create: bool) -> Option<&mut ShadowPage> {
        let idx = match self.last {
            Some((p, i)) if p == page => i,
            _ => {
                let i = match self.index.get(&page) {
                    Some(&i) => i,
                    None if create => {
                        self.pages.push(ShadowPage {
                            vals: Box::new([0; 512]),
                            known: Box::new([0; 512]),
                        });
                        self.index.insert(page, self.pages.len() - 1);
                        self.pages.len() - 1
                    }
                    None => return None,
                };
                self.last = Some((page, i));
                i
            }
        };
        Some(&mut self.pages[idx])
    }

    #[inline]
    fn split(ipa: u64, size: u8) -> Option<(u64, usize, u32, u8)> {
        (ipa & (size as u64 - 1) == 0).then_some((
            ipa >> 12,
            ((ipa & 0xfff) >> 3) as usize,
            (ipa & 7) as u32,
            size,
        ))
    }

    fn byte_mask(off: u32, size: u8) -> u8 {
        (((1u16 << size) - 1) << off) as u8
    }

    fn record(&mut self, ipa: u64, size: u8, val: u64) {
        let Some((page, w, off, size)) = Self::split(ipa, size) else {
            return;
        };
        let p = self.page(page, true).expect("created");
        let bits = if size == 8 {
            u64::MAX
        } else {
            ((1u64 << (size * 8)) - 1) << (off * 8)
        };
        p.vals[w] = (p.vals[w] & !bits) | ((val << (off * 8)) & bits);
        p.known[w] |= Self::byte_mask(off, size);
    }

    /// `(expected, compare mask)` over the bytes this CPU knows, if any.
    fn expected(&mut self, ipa: u64, size: u8) -> Option<(u64, u64)> {
        let (page, w, off, size) = Self::split(ipa, size)?;
        let p = self.page(page, false)?;
        let known = (p.known[w] & Self::byte_mask(off, size)) >> off;
        if known == 0 {
            return None;
        }
        let mut mask = 0u64;
        for b in 0..size as u32 {
            if known & (1 << b) != 0 {
                mask |= 0xff << (b * 8);
            }
        }
        let v = if size == 8 {
            p.vals[w]
        } else {
            p.vals[w] >> (off * 8)
        };
        Some((v & mask, mask))
    }

    fn forget(&mut self, ipa: u64, len: u64) {
        let mut a = ipa & !7;
        while a < ipa + len {
            if let Some(p) = self.page(a >> 12, false) {
                p.known[((a & 0xfff) >> 3) as usize] = 0;
            }
            a += 8;
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    op: Op,
    /// The value a store writes (fixed across retries).
    value: u64,
}

/// A simulated CPU.
pub struct SimCpu {
    id: usize,
    machine: Arc<Machine>,
    ctx: Option<VmContext>,
    regs: [u64; 31],
    program: Option<Box<dyn GuestProgram>>,
    pending: Option<Pending>,
    budget: u64,
    stats: CpuStats,
    shadow: Shadow,
    write_seq: u64,
    scanned_epoch: Option<u64>,
}

impl std::fmt::Debug for SimCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCpu")
            .field("id", &self.id)
            .field("ctx", &self.ctx)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Drop for SimCpu {
    fn drop(&mut self) {
        self.machine.release_cpu(self.id);
    }
}

impl SimCpu {
    pub(crate) fn new(machine: Arc<Machine>, id: usize) -> SimCpu {
        SimCpu {
            id,
            machine,
            ctx: None,
            regs: [0; 31],
            program: None,
            pending: None,
            budget: u64::MAX,
            stats: CpuStats::default(),
            shadow: Shadow::default(),
            write_seq: 0,
            scanned_epoch: None,
        }
    }

    /// The CPU index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The machine.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// Loads a VM context (VTTBR/VTCR). Entries of other VMIDs stay in the
    /// TLB, tagged. Also registers the context with the checker.
    pub fn load(&mut self, ctx: VmContext) {
        self.machine.register_vm(ctx);
        self.ctx = Some(ctx);
        self.scanned_epoch = None;
    }

    /// Unloads the VM context.
    pub fn unload(&mut self) {
        self.ctx = None;
    }

    /// The loaded context.
    pub fn context(&self) -> Option<VmContext> {
        self.ctx
    }

    /// Sets the program (dropping any pending access).
    pub fn set_program(&mut self, program: Box<dyn GuestProgram>) {
        self.program = Some(program);
        self.pending = None;
    }

    /// Operations one `run` may complete before [`SimExit::Preempted`].
    pub fn set_budget(&mut self, ops: u64) {
        self.budget = ops;
    }

    /// The registers `x0..x30`.
    pub fn regs(&self) -> &[u64; 31] {
        &self.regs
    }

    /// The registers, for exit handlers.
    pub fn regs_mut(&mut self) -> &mut [u64; 31] {
        &mut self.regs
    }

    /// The access that faulted and will be retried, if any.
    pub fn pending_access(&self) -> Option<Access> {
        match self.pending?.op {
            Op::Access {
                ipa,
                kind,
                size,
                plain,
                ..
            } => {
                let a = match kind {
                    AccessKind::Read => Access::read(ipa, size, LOAD_REG),
                    AccessKind::Write => Access::write(ipa, size, STORE_REG),
                    AccessKind::Exec => Access::exec(ipa),
                };
                Some(if plain { a } else { a.without_syndrome() })
            }
            _ => None,
        }
    }

    /// Completes the pending access by emulation (MMIO): a load receives
    /// `read_value` in its register; a store is considered done (its value is
    /// in `x2`). The guest forgets what it knew about those bytes.
    pub fn emulate_pending(&mut self, read_value: u64) {
        if let Some(Pending {
            op: Op::Access {
                ipa, kind, size, ..
            },
            ..
        }) = self.pending.take()
        {
            if kind == AccessKind::Read {
                self.regs[LOAD_REG as usize] = read_value;
            }
            self.shadow.forget(ipa.0, size as u64);
            self.stats.emulated += 1;
        }
    }

    /// The guest takes an abort for the pending access: it is dropped and the
    /// program continues with its next operation.
    pub fn inject_abort(&mut self) {
        if let Some(p) = self.pending.take() {
            if let Op::Access { ipa, size, .. } = p.op {
                self.shadow.forget(ipa.0, size as u64);
            }
            self.stats.injected_aborts += 1;
        }
    }

    /// Forgets what this CPU wrote in `[ipa, ipa+len)` (the host legitimately
    /// changed that memory, e.g. a page given back zeroed).
    pub fn forget_writes(&mut self, ipa: Ipa, len: u64) {
        self.shadow.forget(ipa.0, len);
    }

    /// Statistics.
    pub fn stats(&self) -> CpuStats {
        CpuStats {
            tlbis_received: self.machine.tlb(self.id).tlbis_received(),
            ..self.stats
        }
    }

    /// Runs the program until an exit.
    pub fn run(&mut self) -> SimExit {
        let Some(ctx) = self.ctx else {
            self.stats.exits_guest_error += 1;
            return SimExit::GuestError(GuestError::NoContext(self.id));
        };
        let coherence = self.machine.config().coherence;
        if coherence >= Coherence::Entry {
            self.entry_check(&ctx);
        }
        let check_use = coherence >= Coherence::EveryUse;
        let mut done = 0u64;
        loop {
            if done >= self.budget {
                self.stats.exits_preempt += 1;
                return SimExit::Preempted;
            }
            let Some(p) = self.pending.take().or_else(|| self.fetch()) else {
                return SimExit::ProgramDone;
            };
            let Op::Access {
                ipa,
                kind,
                size,
                verify,
                plain,
            } = p.op
            else {
                return self.exit_op(p.op);
            };
            match self.access(&ctx, ipa, kind, size, verify, plain, p.value, check_use) {
                Ok(()) => done += 1,
                Err(Stop::Fault(f)) => {
                    self.pending = Some(p);
                    self.stats.exits_abort += 1;
                    return SimExit::Abort {
                        esr: f.esr,
                        far: f.far,
                        hpfar: f.hpfar,
                    };
                }
                Err(Stop::Guest(e)) => {
                    self.stats.exits_guest_error += 1;
                    return SimExit::GuestError(e);
                }
            }
        }
    }

    /// The program's next operation, with the value a write stores (CPU
    /// id and a per-CPU sequence number, so the checker can tell stores
    /// apart); `None` when the program is done.
    fn fetch(&mut self) -> Option<Pending> {
        let op = self.program.as_mut()?.next_op(&self.regs)?;
        let value = if matches!(
            op,
            Op::Access {
                kind: AccessKind::Write,
                ..
            }
        ) {
            self.write_seq += 1;
            (0xa5 << 56) | ((self.id as u64 & 0xff) << 48) | (self.write_seq & 0xffff_ffff_ffff)
        } else {
            0
        };
        Some(Pending { op, value })
    }

    /// The exit of an operation other than a memory access.
    fn exit_op(&mut self, op: Op) -> SimExit {
        match op {
            Op::Hvc { imm, args } => {
                self.regs[..4].copy_from_slice(&args);
                self.stats.exits_hvc += 1;
                SimExit::Hvc { imm }
            }
            Op::Smc { imm, args } => {
                self.regs[..4].copy_from_slice(&args);
                self.stats.exits_smc += 1;
                SimExit::Smc { imm }
            }
            Op::Wfi => {
                self.stats.exits_wfi += 1;
                SimExit::Wfi
            }
            Op::Access { .. } => unreachable!("accesses are run, not exits"),
        }
    }

    fn entry_check(&mut self, ctx: &VmContext) {
        let m = &*self.machine;
        let ck = m.checker();
        ck.process_suspects(m.mem(), m.tlbs(), Some(ctx.vmid));
        let epoch = ck.epoch(ctx.vmid);
        if self.scanned_epoch != Some(epoch) {
            ck.scan(m.mem(), m.tlbs(), self.id, ctx, false);
            // Only a scan with no update in flight covers this epoch fully.
            if ck.in_flight(ctx.vmid) == 0 && ck.epoch(ctx.vmid) == epoch {
                self.scanned_epoch = Some(epoch);
            }
        }
    }

    /// The leaf mapping `ipa`: from this CPU's TLB (checked against the
    /// tables with `check_use`) or a walk that fills it.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn translate(
        m: &Machine,
        stats: &mut CpuStats,
        id: usize,
        ctx: &VmContext,
        ipa: Ipa,
        access: &Access,
        check_use: bool,
    ) -> Result<crate::mmu::S2Leaf, Stop> {
        let tlb = m.tlb(id);
        if let Some(leaf) = tlb.lookup(ctx.vmid, ipa.0) {
            stats.tlb_hits += 1;
            if check_use {
                let current = walk(m.mem(), ctx, ipa.0);
                if staleness(&leaf, ipa.0, &current).is_some() {
                    m.checker()
                        .report(m.mem(), m.tlbs(), id, ctx.vmid, ipa.0, leaf);
                }
            }
            return Ok(leaf);
        }
        stats.tlb_misses += 1;
        let gen = tlb.generation();
        let leaf =
            walk(m.mem(), ctx, ipa.0).map_err(|s| Stop::Fault(Fault::for_access(access, s)))?;
        // Entries with AF clear are never cached.
        if leaf.pte.young() {
            tlb.fill(ctx.vmid, ipa.0, leaf, gen);
        }
        Ok(leaf)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn access(
        &mut self,
        ctx: &VmContext,
        ipa: Ipa,
        kind: AccessKind,
        size: u8,
        verify: bool,
        plain: bool,
        value: u64,
        check_use: bool,
    ) -> Result<(), Stop> {
        let m = &*self.machine;
        let tlb = m.tlb(self.id);
        let mut access = match kind {
            AccessKind::Read => Access::read(ipa, size, LOAD_REG),
            AccessKind::Write => Access::write(ipa, size, STORE_REG),
            AccessKind::Exec => Access::exec(ipa),
        };
        if !plain {
            access = access.without_syndrome();
        }
        if kind == AccessKind::Write {
            self.regs[STORE_REG as usize] = value;
        }
        let _in_access = tlb.enter_access();
        let leaf = Self::translate(m, &mut self.stats, self.id, ctx, ipa, &access, check_use)?;
        check_leaf(&leaf, &access).map_err(|s| Stop::Fault(Fault::for_access(&access, s)))?;
        let pa = leaf.pa_of(ipa.0);
        let mem = m.mem();
        let ext = |_| Stop::Fault(Fault::for_access(&access, FaultStatus::ExternalAbort));
        match kind {
            AccessKind::Write => {
                mem.write(pa, size, value).map_err(ext)?;
                self.stats.writes += 1;
                if verify {
                    self.shadow.record(ipa.0, size, value);
                }
            }
            AccessKind::Read => {
                let v = mem.read(pa, size).map_err(ext)?;
                self.regs[LOAD_REG as usize] = v;
                self.stats.reads += 1;
                if verify {
                    if let Some((expected, mask)) = self.shadow.expected(ipa.0, size) {
                        if v & mask != expected {
                            self.stats.accesses += 1;
                            return Err(Stop::Guest(GuestError::ReadMismatch {
                                cpu: self.id,
                                ipa,
                                pa,
                                size,
                                expected,
                                found: v & mask,
                            }));
                        }
                        self.stats.verified_reads += 1;
                    }
                }
            }
            AccessKind::Exec => {
                mem.read(pa, 4).map_err(ext)?;
                self.stats.fetches += 1;
            }
        }
        self.stats.accesses += 1;
        Ok(())
    }
}

enum Stop {
    Fault(Fault),
    Guest(GuestError),
}
