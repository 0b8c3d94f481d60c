//! The stage-2 MMU: a software walk of the real descriptors in simulated
//! RAM, and the exact fault syndrome a CPU reports when it fails.
//!
//! What the walk implements (VMSAv8-64, 4K granule, no LPA2):
//! - any start level and up to 16 concatenated root pages, from
//!   [`S2Geometry`];
//! - an IPA at or above `2^ipa_bits` is a **Translation fault at level 0**:
//!   this is what the architecture's `AArch64.S2Translate` pseudocode does
//!   (`AArch64.IPAIsOutOfRange` -> `Fault_Translation`, level 0), and what
//!   KVM's abort handler expects to see before it injects an abort;
//! - invalid descriptors, level-0 block descriptors and level-3 descriptors
//!   with bit 1 clear are Translation faults at their level;
//! - an output address (table or leaf) above the configured PA size is an
//!   Address size fault at that level; a table address outside RAM is a
//!   synchronous external abort on the table walk (FSC `0b0101LL`);
//! - on a leaf: AF clear is an Access flag fault (checked before
//!   permissions, as `AArch64.S2Translate` does), then S2AP/XN permission
//!   faults: data reads need S2AP read, writes S2AP write, instruction
//!   fetches only XN clear; a stage-1 table walk access (`s1ptw`) is checked
//!   as a read unless it is a hardware descriptor update (a write).
//!
//! Fault reporting: `ESR_EL2` EC 0x24 (data) / 0x20 (instruction) from a
//! lower EL with IL set; for data aborts ISV and SAS/SSE/SRT/SF/AR when the
//! instruction was a plain single-register load or store (never for
//! `s1ptw`), WnR for writes, S1PTW, and the DFSC type and level.
//! `HPFAR_EL2` holds IPA\[47:12\] in FIPA (always valid here: hardware may
//! leave it UNKNOWN for permission faults, which this model never does) and
//! `FAR_EL2` holds the faulting virtual address (the IPA for a guest running
//! without stage 1, unless the access says otherwise).

use std::sync::atomic::Ordering;

use pkvm_arch::esr::hpfar_for;
use pkvm_arch::esr::{AccessSyndrome, Esr, FaultStatus};
use pkvm_arch::pte::{PteKind, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Ipa, Level, Pa};

use crate::physmem::PhysMem;

/// The stage-2 translation context a CPU runs with (what `VTTBR_EL2` and
/// `VTCR_EL2` hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmContext {
    /// The VMID tagging TLB entries.
    pub vmid: u16,
    /// First root table page (`geo.root_pages` contiguous pages).
    pub root: Pa,
    /// Start level, IPA size, concatenation.
    pub geo: S2Geometry,
    /// Physical address size (`VTCR_EL2.PS`), for address size faults.
    pub ps_bits: u32,
}

impl VmContext {
    /// A context with a 48-bit output size.
    pub const fn new(vmid: u16, root: Pa, geo: S2Geometry) -> VmContext {
        VmContext {
            vmid,
            root,
            geo,
            ps_bits: 48,
        }
    }
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Data load.
    Read,
    /// Data store.
    Write,
    /// Instruction fetch.
    Exec,
}

/// One memory access as the MMU sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Input address.
    pub ipa: Ipa,
    /// The virtual address reported in `FAR_EL2` on a fault.
    pub far: u64,
    /// Load, store or fetch.
    pub kind: AccessKind,
    /// Bytes (1, 2, 4, 8).
    pub size: u8,
    /// Instruction syndrome for a plain single-register load/store
    /// (`ISV = 1`); `None` for pairs, atomics, writeback forms (`ISV = 0`).
    pub syndrome: Option<AccessSyndrome>,
    /// The access is the guest's stage-1 table walk.
    pub s1ptw: bool,
}

impl Access {
    fn plain(ipa: Ipa, kind: AccessKind, size: u8, srt: u8) -> Access {
        let sas = size.trailing_zeros() as u8;
        Access {
            ipa,
            far: ipa.0,
            kind,
            size,
            syndrome: (kind != AccessKind::Exec).then_some(AccessSyndrome {
                sas,
                sse: false,
                srt,
                sf: size == 8,
                ar: false,
            }),
            s1ptw: false,
        }
    }

    /// `ldr` of `size` bytes into register `srt`.
    pub fn read(ipa: Ipa, size: u8, srt: u8) -> Access {
        Access::plain(ipa, AccessKind::Read, size, srt)
    }

    /// `str` of `size` bytes from register `srt`.
    pub fn write(ipa: Ipa, size: u8, srt: u8) -> Access {
        Access::plain(ipa, AccessKind::Write, size, srt)
    }

    /// A 4-byte instruction fetch.
    pub fn exec(ipa: Ipa) -> Access {
        Access::plain(ipa, AccessKind::Exec, 4, 0)
    }

    /// The same access without a valid instruction syndrome.
    pub fn without_syndrome(mut self) -> Access {
        self.syndrome = None;
        self
    }

    /// The same access as part of the guest's stage-1 table walk.
    pub fn as_s1ptw(mut self) -> Access {
        self.s1ptw = true;
        self.syndrome = None;
        self
    }
}

/// A stage-2 leaf found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct S2Leaf {
    /// The descriptor.
    pub pte: S2Pte,
    /// Its level.
    pub level: Level,
    /// Physical address of the descriptor in its table (0 if unknown).
    pub desc: Pa,
}

impl S2Leaf {
    /// Bytes the leaf maps.
    #[inline(always)]
    pub fn size(&self) -> u64 {
        1u64 << level_shift(self.level)
    }

    /// The physical address `ipa` translates to through this leaf.
    #[inline(always)]
    pub fn pa_of(&self, ipa: u64) -> Pa {
        Pa(self.pte.oa().0 | (ipa & (self.size() - 1)))
    }
}

#[inline(always)]
pub(crate) const fn level_shift(level: Level) -> u32 {
    12 + 9 * (3 - level.0 as u32)
}

/// A fault as the CPU reports it to EL2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `ESR_EL2`.
    pub esr: Esr,
    /// `FAR_EL2`.
    pub far: u64,
    /// `HPFAR_EL2`.
    pub hpfar: u64,
}

impl Fault {
    /// The fault status code decoded.
    pub fn status(&self) -> FaultStatus {
        FaultStatus::decode((self.esr.0 & 0x3f) as u8)
    }

    /// The reported faulting IPA (HPFAR page | FAR offset).
    pub fn ipa(&self) -> Ipa {
        pkvm_arch::esr::fault_ipa(self.hpfar, self.far)
    }

    /// Builds the report for `access` failing with `status`.
    pub fn for_access(access: &Access, status: FaultStatus) -> Fault {
        let esr = match access.kind {
            AccessKind::Exec => Esr::instruction_abort(access.s1ptw, status),
            kind => Esr::data_abort(
                if access.s1ptw { None } else { access.syndrome },
                kind == AccessKind::Write,
                access.s1ptw,
                status,
            ),
        };
        Fault {
            esr,
            far: access.far,
            hpfar: hpfar_for(access.ipa),
        }
    }
}

/// The FSC of a synchronous external abort on a table walk at `level`.
pub const fn walk_external_abort(level: Level) -> FaultStatus {
    FaultStatus::Other(0x14 | (level.0 & 3))
}

/// Walks the stage-2 tables of `ctx` for `ipa`, without permission checks.
///
/// # Errors
/// The fault status the walk ends with (translation, address size, or
/// external abort on the walk).
#[inline]
pub fn walk(mem: &PhysMem, ctx: &VmContext, ipa: u64) -> Result<S2Leaf, FaultStatus> {
    if ipa >> ctx.geo.ipa_bits != 0 {
        return Err(FaultStatus::Translation(Level(0)));
    }
    let mut level = ctx.geo.start_level;
    let root_idx = (ipa >> level_shift(level)) as usize & (ctx.geo.root_entries() - 1);
    let mut table = Pa(ctx.root.0 + (root_idx / 512) as u64 * 4096);
    let mut idx = root_idx % 512;
    let oa_limit = if ctx.ps_bits >= 64 {
        u64::MAX
    } else {
        1u64 << ctx.ps_bits
    };
    loop {
        let Some(t) = mem.try_table(table) else {
            return Err(walk_external_abort(level));
        };
        let pte = S2Pte(t[idx].load(Ordering::Acquire));
        match pte.kind(level) {
            PteKind::Invalid => return Err(FaultStatus::Translation(level)),
            PteKind::Block if level.0 == 0 => return Err(FaultStatus::Translation(level)),
            PteKind::Table => {
                if pte.oa().0 >= oa_limit {
                    return Err(FaultStatus::AddressSize(level));
                }
                table = pte.oa();
                level = Level(level.0 + 1);
                idx = ((ipa >> level_shift(level)) & 511) as usize;
            }
            PteKind::Block | PteKind::Page => {
                if pte.oa().0 >= oa_limit {
                    return Err(FaultStatus::AddressSize(level));
                }
                return Ok(S2Leaf {
                    pte,
                    level,
                    desc: Pa(table.0 + idx as u64 * 8),
                });
            }
        }
    }
}

/// Checks the access flag and permissions of `leaf` for `access`.
///
/// # Errors
/// Access flag or permission fault at the leaf's level.
#[inline(always)]
pub fn check_leaf(leaf: &S2Leaf, access: &Access) -> Result<(), FaultStatus> {
    let pte = leaf.pte;
    if !pte.young() {
        return Err(FaultStatus::AccessFlag(leaf.level));
    }
    let ok = match (access.kind, access.s1ptw) {
        (AccessKind::Write, _) => pte.writable(),
        (AccessKind::Read, _) | (AccessKind::Exec, true) => pte.readable(),
        (AccessKind::Exec, false) => pte.executable(),
    };
    if ok {
        Ok(())
    } else {
        Err(FaultStatus::Permission(leaf.level))
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output address of the access.
    pub pa: Pa,
    /// The leaf used.
    pub leaf: S2Leaf,
}

/// Walks and checks: the translation of `access`, or the fault a CPU reports.
///
/// # Errors
/// The [`Fault`] as `ESR_EL2`/`FAR_EL2`/`HPFAR_EL2`.
pub fn translate(mem: &PhysMem, ctx: &VmContext, access: &Access) -> Result<Translation, Fault> {
    let leaf = walk(mem, ctx, access.ipa.0).map_err(|s| Fault::for_access(access, s))?;
    check_leaf(&leaf, access).map_err(|s| Fault::for_access(access, s))?;
    Ok(Translation {
        pa: leaf.pa_of(access.ipa.0),
        leaf,
    })
}

#[cfg(test)]
mod tests;
