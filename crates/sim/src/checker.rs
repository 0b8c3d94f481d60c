//! The TLB coherence checker.
//!
//! # The rule
//! A TLB entry is **stale** when it grants more than the current tables for
//! an address it covers: the tables no longer map the address, map it to a
//! different PA, or no longer allow a write, read or execute the entry
//! allows, or the memory attributes (MemAttr, shareability) changed. The
//! access flag is ignored (clearing AF without a TLBI is architecturally fine
//! and KVM does it for aging), as are the software bits. An entry that
//! grants *less* than the tables (a permission relaxed lazily) is fine.
//!
//! A stale entry is a **violation** only if it is still cached at a
//! *quiescent point* of its VMID: a moment when no page-table update of that
//! VMID is in flight. Updates are bracketed by
//! [`crate::Machine::begin_update`] /
//! [`crate::Machine::end_update`] (or the
//! [`crate::UpdateGuard`]); every stage-2 change, by the host or
//! the hypervisor, must be inside such a bracket, which ends only after its
//! TLB maintenance. Each VMID has one atomic word: an in-flight count and an
//! epoch bumped by every `begin_update`. An evaluation reads the word, walks
//! the tables, checks the entry is still cached, and reads the word again;
//! only if the count was zero and the word unchanged is the verdict final.
//! Otherwise the entry is kept as a *suspect* and re-evaluated at the next
//! quiescent point (the `end_update` that drops the count to zero, the next
//! guest entry on any CPU, or [`crate::Machine::check`]).
//!
//! So the short window in which break-before-make has written the table but
//! not yet issued its TLBI never produces a report, while a change whose
//! update finished without the TLBI always does, as soon as the stale entry
//! is used or the CPU next enters the guest.
//!
//! Where entries are checked: on every TLB hit ([`Coherence::EveryUse`]) and
//! at every guest entry for the entered VMID when an update of that VMID
//! ended since that CPU last looked ([`Coherence::Entry`] and above).

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use pkvm_arch::esr::FaultStatus;
use pkvm_arch::pte::{bits, s2};
use pkvm_arch::Ipa;

use crate::mmu::{walk, S2Leaf, VmContext};
use crate::physmem::PhysMem;
use crate::tlb::Tlb;

/// How much coherence checking the machine does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Coherence {
    /// None (raw speed benchmarks).
    Off,
    /// Scan the entered VMID's cached entries at guest entry after updates.
    Entry,
    /// Also re-walk the tables on every TLB hit.
    #[default]
    EveryUse,
}

/// How a stale entry grants more than the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Staleness {
    /// The tables no longer map the address.
    NoLongerMapped,
    /// The tables map it to a different PA.
    DifferentPa,
    /// The tables no longer allow writes.
    WriteRevoked,
    /// The tables no longer allow reads.
    ReadRevoked,
    /// The tables no longer allow execution.
    ExecRevoked,
    /// Memory type or shareability changed.
    AttributesChanged,
}

/// A stale TLB entry found at a quiescent point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// CPU whose TLB holds the entry.
    pub cpu: usize,
    /// VMID of the entry.
    pub vmid: u16,
    /// The address checked.
    pub ipa: Ipa,
    /// The cached leaf.
    pub cached: S2Leaf,
    /// What the tables say now.
    pub current: Result<S2Leaf, FaultStatus>,
    /// How the entry grants more.
    pub kind: Staleness,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stale TLB entry on cpu {} vmid {} at {:?}: {:?}; cached {:?} at level {}, tables now {:?}",
            self.cpu, self.vmid, self.ipa, self.kind, self.cached.pte, self.cached.level.0, self.current
        )
    }
}

const PERM_AND_ATTR: u64 = s2::MEMATTR_MASK | bits::SH_MASK;

/// How `cached` grants more than `current` for `ipa`, if it does.
pub fn staleness(
    cached: &S2Leaf,
    ipa: u64,
    current: &Result<S2Leaf, FaultStatus>,
) -> Option<Staleness> {
    let cur = match current {
        Err(_) => return Some(Staleness::NoLongerMapped),
        Ok(c) => c,
    };
    let (c, n) = (cached.pte, cur.pte);
    if cached.pa_of(ipa) != cur.pa_of(ipa) {
        Some(Staleness::DifferentPa)
    } else if c.writable() && !n.writable() {
        Some(Staleness::WriteRevoked)
    } else if c.readable() && !n.readable() {
        Some(Staleness::ReadRevoked)
    } else if c.executable() && !n.executable() {
        Some(Staleness::ExecRevoked)
    } else if (c.0 ^ n.0) & PERM_AND_ATTR != 0 {
        Some(Staleness::AttributesChanged)
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug)]
struct Suspect {
    cpu: usize,
    vmid: u16,
    ipa: u64,
    cached: S2Leaf,
}

enum Verdict {
    Fine,
    Unsure,
    Stale(Violation),
}

const COUNT_MASK: u64 = 0xffff_ffff;

/// Per-machine checker state.
pub(crate) struct Checker {
    /// Per VMID: epoch << 32 | in-flight updates.
    vmids: Box<[AtomicU64]>,
    contexts: RwLock<HashMap<u16, VmContext>>,
    suspects: Mutex<Vec<Suspect>>,
    suspect_count: AtomicUsize,
    violations: Mutex<Vec<Violation>>,
    violation_count: AtomicUsize,
}

impl Checker {
    pub(crate) fn new() -> Checker {
        Checker {
            vmids: (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect(),
            contexts: RwLock::new(HashMap::new()),
            suspects: Mutex::new(Vec::new()),
            suspect_count: AtomicUsize::new(0),
            violations: Mutex::new(Vec::new()),
            violation_count: AtomicUsize::new(0),
        }
    }

    /// Every registered VM context.
    pub(crate) fn registered(&self) -> Vec<VmContext> {
        self.contexts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .copied()
            .collect()
    }

    pub(crate) fn register(&self, ctx: VmContext) {
        self.contexts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ctx.vmid, ctx);
    }

    pub(crate) fn retire(&self, vmid: u16) {
        self.contexts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vmid);
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| s.vmid != vmid);
    }

    fn context(&self, vmid: u16) -> Option<VmContext> {
        self.contexts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vmid)
            .copied()
    }

    pub(crate) fn begin_update(&self, vmid: u16) {
        self.vmids[vmid as usize].fetch_add((1 << 32) | 1, Ordering::SeqCst);
    }

    /// Returns true when this call made the VMID quiescent.
    pub(crate) fn end_update(&self, vmid: u16) -> bool {
        let prev = self.vmids[vmid as usize].fetch_sub(1, Ordering::SeqCst);
        assert!(
            prev & COUNT_MASK != 0,
            "end_update for vmid {vmid} without begin_update"
        );
        prev & COUNT_MASK == 1
    }

    /// The update epoch of `vmid` (changes at every `begin_update`).
    pub(crate) fn epoch(&self, vmid: u16) -> u64 {
        self.vmids[vmid as usize].load(Ordering::SeqCst) >> 32
    }

    /// Updates in flight for `vmid`.
    pub(crate) fn in_flight(&self, vmid: u16) -> u32 {
        (self.vmids[vmid as usize].load(Ordering::SeqCst) & COUNT_MASK) as u32
    }

    fn evaluate(&self, mem: &PhysMem, tlbs: &[Tlb], s: &Suspect) -> Verdict {
        let w = &self.vmids[s.vmid as usize];
        let before = w.load(Ordering::SeqCst);
        if before & COUNT_MASK != 0 {
            return Verdict::Unsure;
        }
        let Some(ctx) = self.context(s.vmid) else {
            return Verdict::Fine;
        };
        let current = walk(mem, &ctx, s.ipa);
        let Some(kind) = staleness(&s.cached, s.ipa, &current) else {
            return Verdict::Fine;
        };
        if !tlbs[s.cpu].holds(s.vmid, s.ipa, &s.cached) {
            return Verdict::Fine;
        }
        fence(Ordering::SeqCst);
        if w.load(Ordering::SeqCst) != before {
            return Verdict::Unsure;
        }
        Verdict::Stale(Violation {
            cpu: s.cpu,
            vmid: s.vmid,
            ipa: Ipa(s.ipa),
            cached: s.cached,
            current,
            kind,
        })
    }

    fn record(&self, v: Violation) {
        self.violation_count.fetch_add(1, Ordering::SeqCst);
        self.violations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(v);
    }

    fn add_suspect(&self, s: Suspect) {
        let mut list = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        let same = |o: &Suspect| {
            o.cpu == s.cpu
                && o.vmid == s.vmid
                && o.cached == s.cached
                && (o.ipa ^ s.ipa) < s.cached.size()
        };
        if !list.iter().any(same) {
            list.push(s);
            self.suspect_count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A CPU found `cached` stale against `current` for `ipa` (the tables
    /// as it just walked them). Decides now or keeps a suspect.
    pub(crate) fn report(
        &self,
        mem: &PhysMem,
        tlbs: &[Tlb],
        cpu: usize,
        vmid: u16,
        ipa: u64,
        cached: S2Leaf,
    ) {
        let s = Suspect {
            cpu,
            vmid,
            ipa,
            cached,
        };
        match self.evaluate(mem, tlbs, &s) {
            Verdict::Fine => {}
            Verdict::Unsure => self.add_suspect(s),
            Verdict::Stale(v) => {
                // Report once: the entry is dropped from the TLB so the run
                // continues on the current tables.
                tlbs[cpu].drop_own(vmid, ipa, cached.level);
                self.record(v);
            }
        }
    }

    /// Re-evaluates suspects (of `vmid`, or all). Cheap when there are none.
    pub(crate) fn process_suspects(&self, mem: &PhysMem, tlbs: &[Tlb], vmid: Option<u16>) {
        if self.suspect_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let taken: Vec<Suspect> = {
            let mut list = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest): (Vec<_>, Vec<_>) = list
                .drain(..)
                .partition(|s| vmid.is_none_or(|v| v == s.vmid));
            *list = rest;
            self.suspect_count.fetch_sub(mine.len(), Ordering::SeqCst);
            mine
        };
        for s in taken {
            match self.evaluate(mem, tlbs, &s) {
                Verdict::Fine => {}
                Verdict::Unsure => self.add_suspect(s),
                Verdict::Stale(v) => {
                    tlbs[s.cpu].drop_own(s.vmid, s.ipa, s.cached.level);
                    self.record(v);
                }
            }
        }
    }

    /// Checks every entry `cpu` caches for `ctx.vmid`.
    /// Checks the entries `cpu` caches for `ctx.vmid`. With `full == false`
    /// (the guest-entry scan) an entry whose leaf descriptor still holds
    /// the cached value is taken as fresh without a walk: every change the
    /// page-table code makes to a translation rewrites or zeroes the leaf
    /// descriptor (freed tables are zeroed), so only a stale upper-level
    /// entry over an intact old table escapes it, and that is still caught
    /// on its next use (every-use mode) and by the full scan of
    /// [`Machine::check`](crate::Machine::check).
    pub(crate) fn scan(
        &self,
        mem: &PhysMem,
        tlbs: &[Tlb],
        cpu: usize,
        ctx: &VmContext,
        full: bool,
    ) {
        tlbs[cpu].for_each_entry(ctx.vmid, |ipa, cached| {
            if !full {
                if let Some(t) = mem.try_table(cached.desc.align_down(4096)) {
                    if t[((cached.desc.0 & 0xfff) / 8) as usize].load(Ordering::Acquire)
                        == cached.pte.0
                    {
                        return;
                    }
                }
            }
            // Check each 4K page a block covers only at its first page and
            // at a few probes: a block is stale if any covered address is;
            // blocks are rare in the TLB, so check every page of 2M blocks and
            // every 2M step of 1G blocks.
            let step = if cached.level.0 <= 1 {
                1u64 << 21
            } else {
                1 << 12
            };
            let mut a = ipa;
            while a < ipa + cached.size() {
                let current = walk(mem, ctx, a);
                if staleness(&cached, a, &current).is_some() {
                    self.report(mem, tlbs, cpu, ctx.vmid, a, cached);
                    break;
                }
                a += step;
            }
        });
    }

    pub(crate) fn violations(&self) -> Vec<Violation> {
        self.violations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn violation_count(&self) -> usize {
        self.violation_count.load(Ordering::SeqCst)
    }

    pub(crate) fn pending_suspects(&self) -> usize {
        self.suspect_count.load(Ordering::SeqCst)
    }
}
