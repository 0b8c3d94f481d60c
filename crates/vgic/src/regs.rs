//! The register map: one row per register (or array of registers) of the
//! distributor and the redistributor frames.

/// A 64 KiB GIC frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The distributor (`GICD_*`).
    Dist,
    /// A redistributor's RD_base frame (`GICR_*` control registers).
    RdBase,
    /// A redistributor's SGI_base frame (`GICR_*` registers of INTIDs 0-31).
    SgiBase,
}

/// What a register does (how [`crate::Vgic`] reads and writes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegKind {
    /// `GICD_CTLR`: EnableGrp0 (0), EnableGrp1 (1) RW; ARE (4) and DS (6)
    /// RAO/WI; RWP (31) RAZ.
    DistCtlr,
    /// `GICD_TYPER`: read-only.
    DistTyper,
    /// `GICD_TYPER2`: read-only 0.
    DistTyper2,
    /// `GICD_IIDR`/`GICR_IIDR`: read-only [`crate::IIDR`].
    Iidr,
    /// `GICD_PIDR2`/`GICR_PIDR2`: read-only [`crate::PIDR2`].
    Pidr2,
    /// `IGROUPR`: one RW bit per interrupt.
    Group,
    /// `ISENABLER`: reads the enables, writing 1 enables.
    SetEnable,
    /// `ICENABLER`: reads the enables, writing 1 disables.
    ClearEnable,
    /// `ISPENDR`: reads pending, writing 1 latches pending.
    SetPending,
    /// `ICPENDR`: reads pending, writing 1 clears the latch.
    ClearPending,
    /// `ISACTIVER`: reads active, writing 1 activates.
    SetActive,
    /// `ICACTIVER`: reads active, writing 1 deactivates.
    ClearActive,
    /// `IPRIORITYR`: one byte per interrupt ([`crate::PRIORITY_MASK`]).
    Priority,
    /// `ICFGR`: two bits per interrupt, bit 1 = edge (SGIs RO edge).
    Config,
    /// `GICD_IROUTER<n>`: Aff3..Aff0 and IRM.
    Router,
    /// `GICR_CTLR`: RAZ/WI (no LPIs, writes complete at once).
    RdCtlr,
    /// `GICR_TYPER`: read-only.
    RdTyper,
    /// `GICR_WAKER`: ProcessorSleep (1) RW, ChildrenAsleep (2) follows it.
    Waker,
    /// Architected but not implemented here: RAZ/WI at the listed sizes.
    RazWi,
}

/// One row of the register map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegDesc {
    /// The architecture's name (`<n>` for an array).
    pub name: &'static str,
    /// The frame.
    pub frame: Frame,
    /// Offset of the first register in the frame.
    pub offset: u32,
    /// Registers in the array (1 for a single register).
    pub count: u32,
    /// Register width in bytes (4 or 8; 32-bit halves of an 8-byte register
    /// are accessible too).
    pub width: u32,
    /// Whether byte accesses are allowed.
    pub bytes: bool,
    /// Behaviour.
    pub kind: RegKind,
}

impl RegDesc {
    /// The offset just past the last register.
    pub const fn end(&self) -> u32 {
        self.offset + self.count * self.width
    }
}

const fn row(name: &'static str, frame: Frame, offset: u32, count: u32, kind: RegKind) -> RegDesc {
    let (width, bytes) = match kind {
        RegKind::Router | RegKind::RdTyper => (8, false),
        RegKind::Priority => (4, true),
        _ => (4, false),
    };
    RegDesc {
        name,
        frame,
        offset,
        count,
        width,
        bytes,
        kind,
    }
}

const fn raz(
    name: &'static str,
    frame: Frame,
    offset: u32,
    count: u32,
    width: u32,
    bytes: bool,
) -> RegDesc {
    RegDesc {
        name,
        frame,
        offset,
        count,
        width,
        bytes,
        kind: RegKind::RazWi,
    }
}

use Frame::{Dist, RdBase, SgiBase};
use RegKind::*;

/// The register map. Offsets in no row are reserved (RAZ/WI at any
/// naturally aligned size). In the distributor, the entries for INTIDs
/// 0-31 of the per-interrupt arrays are RAZ/WI (affinity routing: they live
/// in the redistributors), as are entries past the last SPI.
pub const REGISTERS: &[RegDesc] = &[
    row("GICD_CTLR", Dist, 0x0, 1, DistCtlr),
    row("GICD_TYPER", Dist, 0x4, 1, DistTyper),
    row("GICD_IIDR", Dist, 0x8, 1, Iidr),
    row("GICD_TYPER2", Dist, 0xc, 1, DistTyper2),
    raz("GICD_STATUSR", Dist, 0x10, 1, 4, false),
    row("GICD_IGROUPR<n>", Dist, 0x80, 32, Group),
    row("GICD_ISENABLER<n>", Dist, 0x100, 32, SetEnable),
    row("GICD_ICENABLER<n>", Dist, 0x180, 32, ClearEnable),
    row("GICD_ISPENDR<n>", Dist, 0x200, 32, SetPending),
    row("GICD_ICPENDR<n>", Dist, 0x280, 32, ClearPending),
    row("GICD_ISACTIVER<n>", Dist, 0x300, 32, SetActive),
    row("GICD_ICACTIVER<n>", Dist, 0x380, 32, ClearActive),
    row("GICD_IPRIORITYR<n>", Dist, 0x400, 255, Priority),
    raz("GICD_ITARGETSR<n>", Dist, 0x800, 255, 4, true),
    row("GICD_ICFGR<n>", Dist, 0xc00, 64, Config),
    raz("GICD_IGRPMODR<n>", Dist, 0xd00, 32, 4, false),
    raz("GICD_NSACR<n>", Dist, 0xe00, 64, 4, false),
    raz("GICD_SGIR", Dist, 0xf00, 1, 4, false),
    raz("GICD_CPENDSGIR<n>", Dist, 0xf10, 4, 4, true),
    raz("GICD_SPENDSGIR<n>", Dist, 0xf20, 4, 4, true),
    row("GICD_IROUTER<n>", Dist, 0x6000, 1020, Router),
    row("GICD_PIDR2", Dist, 0xffe8, 1, Pidr2),
    row("GICR_CTLR", RdBase, 0x0, 1, RdCtlr),
    row("GICR_IIDR", RdBase, 0x4, 1, Iidr),
    row("GICR_TYPER", RdBase, 0x8, 1, RdTyper),
    raz("GICR_STATUSR", RdBase, 0x10, 1, 4, false),
    row("GICR_WAKER", RdBase, 0x14, 1, Waker),
    raz("GICR_PROPBASER", RdBase, 0x70, 1, 8, false),
    raz("GICR_PENDBASER", RdBase, 0x78, 1, 8, false),
    row("GICR_PIDR2", RdBase, 0xffe8, 1, Pidr2),
    row("GICR_IGROUPR0", SgiBase, 0x80, 1, Group),
    row("GICR_ISENABLER0", SgiBase, 0x100, 1, SetEnable),
    row("GICR_ICENABLER0", SgiBase, 0x180, 1, ClearEnable),
    row("GICR_ISPENDR0", SgiBase, 0x200, 1, SetPending),
    row("GICR_ICPENDR0", SgiBase, 0x280, 1, ClearPending),
    row("GICR_ISACTIVER0", SgiBase, 0x300, 1, SetActive),
    row("GICR_ICACTIVER0", SgiBase, 0x380, 1, ClearActive),
    row("GICR_IPRIORITYR<n>", SgiBase, 0x400, 8, Priority),
    row("GICR_ICFGR<n>", SgiBase, 0xc00, 2, Config),
    raz("GICR_IGRPMODR0", SgiBase, 0xd00, 1, 4, false),
    raz("GICR_NSACR", SgiBase, 0xe00, 1, 4, false),
];

/// The row holding byte `offset` of `frame`, and the register's index in
/// it.
pub(crate) fn find(frame: Frame, offset: u32) -> Option<(&'static RegDesc, u32)> {
    REGISTERS
        .iter()
        .find(|r| r.frame == frame && (r.offset..r.end()).contains(&offset))
        .map(|r| (r, (offset - r.offset) / r.width))
}
