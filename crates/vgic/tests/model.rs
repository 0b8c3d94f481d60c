//! Random sequences of raise/lower/enable/disable/priority/route/group/
//! config/pending/active/SGI/ack/deactivate operations and list-register
//! rounds (flush, guest acknowledges and deactivates, other vCPUs' changes
//! meanwhile, sync) against a small reference model written here: after
//! every step both agree on what each vCPU would acknowledge next, on every
//! interrupt's pending and active bits, and the vCPUs the model asks to kick
//! cover every vCPU that gained something to take.

use pkvm_vgic::{Line, ListRegister, LrState, SgiGroup, VcpuSet, Vgic, VgicConfig};
use proptest::prelude::*;

const VCPUS: usize = 3;
const SPIS: usize = 32;
const GICD: u64 = 0x0800_0000;
const GICR: u64 = 0x080a_0000;
/// The interrupts the sequences touch: SGIs, PPIs (incl. the timers), SPIs.
const INTIDS: [u32; 9] = [1, 5, 17, 27, 30, 32, 33, 40, 63];

// ---------------------------------------------------------------- reference

#[derive(Clone, Copy, Debug, Default)]
struct RIrq {
    enabled: bool,
    group1: bool,
    priority: u8,
    edge: bool,
    line: bool,
    latch: bool,
    active: bool,
    owner: usize,
}

impl RIrq {
    fn pending(&self) -> bool {
        self.latch || (!self.edge && self.line)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Vcpu(usize),
    Any,
    Nobody,
}

/// The reference: one record per (vCPU, private INTID) and per SPI, no
/// list registers, every rule spelled out directly.
#[derive(Clone, Debug)]
struct Reference {
    private: [[RIrq; 32]; VCPUS],
    spis: [RIrq; SPIS],
    route: [Route; SPIS],
    en0: bool,
    en1: bool,
}

impl Reference {
    fn new() -> Self {
        let spi = RIrq {
            group1: true,
            ..RIrq::default()
        };
        let mut private = [[spi; 32]; VCPUS];
        for bank in private.iter_mut() {
            for sgi in bank.iter_mut().take(16) {
                sgi.edge = true;
            }
        }
        // IROUTER resets to 0: vCPU 0's affinity.
        Reference {
            private,
            spis: [spi; SPIS],
            route: [Route::Vcpu(0); SPIS],
            en0: false,
            en1: false,
        }
    }

    fn irq(&mut self, vcpu: usize, intid: u32) -> &mut RIrq {
        if intid < 32 {
            &mut self.private[vcpu][intid as usize]
        } else {
            &mut self.spis[intid as usize - 32]
        }
    }

    fn get(&self, vcpu: usize, intid: u32) -> RIrq {
        if intid < 32 {
            self.private[vcpu][intid as usize]
        } else {
            self.spis[intid as usize - 32]
        }
    }

    fn targets(&self, vcpu: usize, intid: u32) -> bool {
        intid < 32
            || match self.route[intid as usize - 32] {
                Route::Vcpu(v) => v == vcpu,
                Route::Any => true,
                Route::Nobody => false,
            }
    }

    fn deliverable(&self, vcpu: usize, intid: u32) -> bool {
        let i = self.get(vcpu, intid);
        let group_on = if i.group1 { self.en1 } else { self.en0 };
        i.pending() && !i.active && i.enabled && group_on && self.targets(vcpu, intid)
    }

    /// What `vcpu` acknowledges next: lowest priority value, then INTID.
    fn best(&self, vcpu: usize) -> Option<u32> {
        INTIDS
            .iter()
            .copied()
            .filter(|&i| self.deliverable(vcpu, i))
            .min_by_key(|&i| (self.get(vcpu, i).priority, i))
    }

    fn ack(&mut self, vcpu: usize, intid: u32) {
        let i = self.irq(vcpu, intid);
        i.latch = false;
        i.active = true;
        i.owner = vcpu;
    }

    /// The list registers `vcpu` should get: what it holds active, then
    /// what it can take, each by (priority, INTID).
    fn lr_plan(&self, vcpu: usize) -> Vec<(u32, LrState, bool, u8)> {
        let mut active: Vec<_> = INTIDS
            .iter()
            .copied()
            .filter(|&i| {
                let r = self.get(vcpu, i);
                r.active && (i < 32 || r.owner == vcpu)
            })
            .collect();
        let mut pending: Vec<_> = INTIDS
            .iter()
            .copied()
            .filter(|&i| self.deliverable(vcpu, i))
            .collect();
        active.sort_by_key(|&i| (self.get(vcpu, i).priority, i));
        pending.sort_by_key(|&i| (self.get(vcpu, i).priority, i));
        active
            .into_iter()
            .chain(pending)
            .map(|i| {
                let r = self.get(vcpu, i);
                // An active level interrupt's line is not loaded as
                // pending: its deactivate (EOI maintenance) resamples it.
                let pending = r.latch || (!r.edge && r.line && !r.active);
                (i, LrState::new(pending, r.active), r.group1, r.priority)
            })
            .collect()
    }
}

// --------------------------------------------------------------- operations

#[derive(Clone, Debug)]
enum Op {
    Line {
        vcpu: usize,
        irq: usize,
        level: bool,
    },
    Edge {
        vcpu: usize,
        irq: usize,
    },
    Enable {
        vcpu: usize,
        irq: usize,
        on: bool,
    },
    Priority {
        vcpu: usize,
        irq: usize,
        prio: u8,
    },
    Config {
        vcpu: usize,
        irq: usize,
        edge: bool,
    },
    Group {
        vcpu: usize,
        irq: usize,
        group1: bool,
    },
    Ctlr {
        en0: bool,
        en1: bool,
    },
    Route {
        spi: usize,
        to: usize,
    },
    Pending {
        vcpu: usize,
        irq: usize,
        set: bool,
    },
    Active {
        vcpu: usize,
        irq: usize,
        set: bool,
    },
    Sgi {
        sender: usize,
        value: u64,
        group1: bool,
    },
    Ack {
        vcpu: usize,
    },
    Deactivate {
        vcpu: usize,
        pick: usize,
    },
    Round {
        vcpu: usize,
        lrs: usize,
        guest: Vec<(usize, bool)>,
        meanwhile: Vec<Op>,
    },
}

fn vcpu() -> impl Strategy<Value = usize> {
    0..VCPUS
}

fn irq() -> impl Strategy<Value = usize> {
    0..INTIDS.len()
}

/// Operations another vCPU or a device may perform while `vcpu` runs.
fn concurrent_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (vcpu(), irq(), any::<bool>()).prop_map(|(vcpu, irq, level)| Op::Line { vcpu, irq, level }),
        (vcpu(), irq()).prop_map(|(vcpu, irq)| Op::Edge { vcpu, irq }),
        (vcpu(), irq(), any::<bool>()).prop_map(|(vcpu, irq, set)| Op::Pending { vcpu, irq, set }),
        (vcpu(), irq()).prop_map(|(vcpu, irq)| Op::Active {
            vcpu,
            irq,
            set: false
        }),
        sgi_op(),
    ]
}

fn sgi_op() -> impl Strategy<Value = Op> {
    (
        vcpu(),
        0u64..16,
        0u64..16,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(sender, intid, list, irm, other_aff, group1)| {
            // INTIDs 1 and 5 are the SGIs the checks look at.
            let intid = if intid % 2 == 0 { 1 } else { 5 };
            let aff1 = if other_aff { 1u64 << 16 } else { 0 };
            let value = (intid << 24) | (list & 0x7) | aff1 | (u64::from(irm) << 40);
            Op::Sgi {
                sender,
                value,
                group1,
            }
        })
}

fn op() -> impl Strategy<Value = Op> {
    let simple = prop_oneof![
        4 => concurrent_op(),
        3 => (vcpu(), irq(), prop::bool::weighted(0.8)).prop_map(|(vcpu, irq, on)| Op::Enable { vcpu, irq, on }),
        2 => (vcpu(), irq(), any::<u8>()).prop_map(|(vcpu, irq, prio)| Op::Priority { vcpu, irq, prio }),
        1 => (vcpu(), irq(), any::<bool>()).prop_map(|(vcpu, irq, edge)| Op::Config { vcpu, irq, edge }),
        1 => (vcpu(), irq(), prop::bool::weighted(0.8)).prop_map(|(vcpu, irq, group1)| Op::Group { vcpu, irq, group1 }),
        1 => (prop::bool::weighted(0.7), prop::bool::weighted(0.9)).prop_map(|(en0, en1)| Op::Ctlr { en0, en1 }),
        2 => (0..4usize, 0..VCPUS + 2).prop_map(|(spi, to)| Op::Route { spi, to }),
        1 => (vcpu(), irq()).prop_map(|(vcpu, irq)| Op::Active { vcpu, irq, set: true }),
        3 => vcpu().prop_map(|vcpu| Op::Ack { vcpu }),
        3 => (vcpu(), 0..4usize).prop_map(|(vcpu, pick)| Op::Deactivate { vcpu, pick }),
    ];
    prop_oneof![
        4 => simple,
        1 => (vcpu(), 0..5usize, prop::collection::vec((0..5usize, any::<bool>()), 0..4),
              prop::collection::vec(concurrent_op(), 0..3))
            .prop_map(|(vcpu, lrs, guest, meanwhile)| Op::Round { vcpu, lrs, guest, meanwhile }),
    ]
}

// ------------------------------------------------------------------ driving

/// The frame holding `intid`'s per-interrupt registers, as vCPU `vcpu`
/// addresses it.
fn frame(vcpu: usize, intid: u32) -> u64 {
    if intid < 32 {
        GICR + 0x2_0000 * vcpu as u64 + 0x1_0000
    } else {
        GICD
    }
}

fn bit_reg(vcpu: usize, intid: u32, base: u64) -> (u64, u64) {
    (
        frame(vcpu, intid) + base + 4 * u64::from(intid / 32),
        1 << (intid % 32),
    )
}

fn mmio(v: &mut Vgic, addr: u64, size: usize, value: u64) -> VcpuSet {
    v.mmio_write(addr, size, value)
        .expect("test writes are architecturally valid")
}

fn line_of(vcpu: usize, intid: u32) -> Line {
    if intid < 32 {
        Line::Ppi { vcpu, intid }
    } else {
        Line::Spi(intid)
    }
}

/// Applies `op` to both; returns the model's kick set.
fn apply(v: &mut Vgic, r: &mut Reference, op: &Op) -> VcpuSet {
    match *op {
        Op::Line { vcpu, irq, level } => {
            let intid = INTIDS[irq];
            let got = v.set_level(line_of(vcpu, intid), level);
            if intid < 16 {
                assert!(got.is_err(), "an SGI has no line");
                return VcpuSet::EMPTY;
            }
            let i = r.irq(vcpu, intid);
            if i.edge && level && !i.line {
                i.latch = true;
            }
            i.line = level;
            got.unwrap()
        }
        Op::Edge { vcpu, irq } => {
            let intid = INTIDS[irq];
            let got = v.raise_edge(line_of(vcpu, intid));
            if intid < 16 {
                assert!(got.is_err(), "an SGI has no line");
                return VcpuSet::EMPTY;
            }
            r.irq(vcpu, intid).latch = true;
            got.unwrap()
        }
        Op::Enable { vcpu, irq, on } => {
            let intid = INTIDS[irq];
            let (addr, bit) = bit_reg(vcpu, intid, if on { 0x100 } else { 0x180 });
            r.irq(vcpu, intid).enabled = on;
            mmio(v, addr, 4, bit)
        }
        Op::Priority { vcpu, irq, prio } => {
            let intid = INTIDS[irq];
            r.irq(vcpu, intid).priority = prio & 0xf8;
            mmio(
                v,
                frame(vcpu, intid) + 0x400 + u64::from(intid),
                1,
                u64::from(prio),
            )
        }
        Op::Config { vcpu, irq, edge } => {
            let intid = INTIDS[irq];
            let addr = frame(vcpu, intid) + 0xc00 + 4 * u64::from(intid / 16);
            let shift = 2 * (intid % 16) + 1;
            let old = v.mmio_read(addr, 4).unwrap();
            let new = (old & !(1 << shift)) | (u64::from(edge) << shift);
            if intid >= 16 {
                r.irq(vcpu, intid).edge = edge;
            }
            mmio(v, addr, 4, new)
        }
        Op::Group { vcpu, irq, group1 } => {
            let intid = INTIDS[irq];
            let (addr, bit) = bit_reg(vcpu, intid, 0x80);
            let old = v.mmio_read(addr, 4).unwrap();
            r.irq(vcpu, intid).group1 = group1;
            mmio(v, addr, 4, if group1 { old | bit } else { old & !bit })
        }
        Op::Ctlr { en0, en1 } => {
            r.en0 = en0;
            r.en1 = en1;
            mmio(v, GICD, 4, u64::from(en0) | (u64::from(en1) << 1))
        }
        Op::Route { spi, to } => {
            let intid = [32u32, 33, 40, 63][spi];
            let (value, route) = match to {
                t if t < VCPUS => (t as u64, Route::Vcpu(t)),
                t if t == VCPUS => (1 << 31, Route::Any),
                _ => (0x0a_0000_0f0f, Route::Nobody),
            };
            r.route[intid as usize - 32] = route;
            mmio(v, GICD + 0x6000 + 8 * u64::from(intid), 8, value)
        }
        Op::Pending { vcpu, irq, set } => {
            let intid = INTIDS[irq];
            let (addr, bit) = bit_reg(vcpu, intid, if set { 0x200 } else { 0x280 });
            r.irq(vcpu, intid).latch = set;
            mmio(v, addr, 4, bit)
        }
        Op::Active { vcpu, irq, set } => apply_active(v, r, vcpu, INTIDS[irq], set),
        Op::Sgi {
            sender,
            value,
            group1,
        } => apply_sgi(v, r, sender, value, group1),
        Op::Ack { vcpu } => {
            let want = r.best(vcpu);
            assert_eq!(v.ack(vcpu), want, "vCPU {vcpu} acknowledges");
            if let Some(intid) = want {
                r.ack(vcpu, intid);
            }
            VcpuSet::EMPTY
        }
        Op::Deactivate { vcpu, pick } => {
            let held: Vec<u32> = INTIDS
                .iter()
                .copied()
                .filter(|&i| r.get(vcpu, i).active && (i < 32 || r.get(vcpu, i).owner == vcpu))
                .collect();
            let Some(&intid) = held.get(pick % held.len().max(1)) else {
                assert!(v.deactivate(vcpu, 40).is_err() || r.get(vcpu, 40).active);
                return VcpuSet::EMPTY;
            };
            r.irq(vcpu, intid).active = false;
            v.deactivate(vcpu, intid)
                .expect("reference says it is active here")
        }
        Op::Round {
            vcpu,
            lrs,
            ref guest,
            ref meanwhile,
        } => round(v, r, vcpu, lrs, guest, meanwhile),
    }
}

fn apply_active(v: &mut Vgic, r: &mut Reference, vcpu: usize, intid: u32, set: bool) -> VcpuSet {
    let (addr, bit) = bit_reg(vcpu, intid, if set { 0x300 } else { 0x380 });
    let owner = match (
        intid < 32,
        intid.checked_sub(32).map(|s| r.route[s as usize]),
    ) {
        (true, _) => vcpu,
        (false, Some(Route::Vcpu(t))) => t,
        _ => 0,
    };
    let i = r.irq(vcpu, intid);
    if set && !i.active {
        i.owner = owner;
    }
    i.active = set;
    mmio(v, addr, 4, bit)
}

fn apply_sgi(v: &mut Vgic, r: &mut Reference, sender: usize, value: u64, group1: bool) -> VcpuSet {
    let intid = ((value >> 24) & 0xf) as u32;
    let irm = value & (1 << 40) != 0;
    let other_aff = value & (0xff << 16) != 0;
    for t in 0..VCPUS {
        let hit = if irm {
            t != sender
        } else {
            !other_aff && value & (1 << t) != 0
        };
        if hit && (group1 || !r.get(t, intid).group1) {
            r.irq(t, intid).latch = true;
        }
    }
    let group = if group1 {
        SgiGroup::Group1
    } else {
        SgiGroup::Group0
    };
    v.send_sgi(sender, value, group).unwrap()
}

/// A world-switch round for `vcpu`: flush, the guest acknowledges or
/// deactivates list registers, others act meanwhile, sync.
fn round(
    v: &mut Vgic,
    r: &mut Reference,
    vcpu: usize,
    n: usize,
    guest: &[(usize, bool)],
    meanwhile: &[Op],
) -> VcpuSet {
    let plan = r.lr_plan(vcpu);
    let mut lrs = [ListRegister::default(); 4];
    let flush = v.flush_lrs(vcpu, &mut lrs[..n]);
    let want: Vec<_> = plan.iter().take(n).copied().collect();
    let got: Vec<_> = lrs[..flush.used]
        .iter()
        .map(|l| (l.vintid, l.state, l.group1, l.priority))
        .collect();
    assert_eq!(got, want, "list registers of vCPU {vcpu}");
    assert_eq!(flush.overflow, plan.len() > n, "overflow");
    for lr in &lrs[..flush.used] {
        assert_eq!(
            ListRegister::from_bits(lr.to_bits()),
            *lr,
            "ICH_LR encoding round-trips"
        );
    }
    // The guest: acknowledge a pending list register, or deactivate an
    // active one, as the CPU interface would.
    let mut guest_refs = Vec::new();
    for &(k, ack) in guest {
        let Some(lr) = lrs[..flush.used].get_mut(k) else {
            continue;
        };
        match (ack, lr.state) {
            (true, LrState::Pending) => {
                lr.state = LrState::Active;
                guest_refs.push((lr.vintid, true));
            }
            (false, LrState::Active | LrState::PendingActive) => {
                lr.state = LrState::new(lr.state.pending(), false);
                guest_refs.push((lr.vintid, false));
            }
            _ => {}
        }
    }
    // Others act while the list registers hold their copies; the reference
    // applies them after the guest's actions (the model's documented order).
    let mut shadow = r.clone();
    let mut kick = VcpuSet::EMPTY;
    for op in meanwhile {
        kick = kick.union(apply(v, &mut shadow, op));
    }
    for (intid, ack) in guest_refs {
        if ack {
            r.ack(vcpu, intid);
        } else {
            r.irq(vcpu, intid).active = false;
        }
    }
    for op in meanwhile {
        apply_reference_only(r, op);
    }
    kick.union(v.sync_from_lrs(vcpu, &lrs[..flush.used]))
}

/// The reference half of [`apply`] for the concurrent operations.
fn apply_reference_only(r: &mut Reference, op: &Op) {
    let mut scratch = Vgic::new(VgicConfig::qemu_virt(VCPUS, SPIS)).unwrap();
    // Ops in `concurrent_op` only read the model for RMW registers, which
    // they do not use, so a scratch model keeps `apply` reusable here.
    let _ = apply(&mut scratch, r, op);
}

fn check(v: &Vgic, r: &Reference, step: usize) {
    for vcpu in 0..VCPUS {
        assert_eq!(
            v.highest_pending(vcpu),
            r.best(vcpu),
            "step {step}: vCPU {vcpu}'s next interrupt"
        );
        for &intid in &INTIDS {
            let want = r.get(vcpu, intid);
            let (pend, bit) = bit_reg(vcpu, intid, 0x200);
            let (act, _) = bit_reg(vcpu, intid, 0x300);
            let pending = v.mmio_read(pend, 4).unwrap() & bit != 0;
            let active = v.mmio_read(act, 4).unwrap() & bit != 0;
            assert_eq!(
                pending,
                want.pending(),
                "step {step}: pending of {intid} on vCPU {vcpu}"
            );
            assert_eq!(
                active, want.active,
                "step {step}: active of {intid} on vCPU {vcpu}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn model_agrees_with_reference_on_what_each_vcpu_takes_next(ops in prop::collection::vec(op(), 1..60)) {
        let mut v = Vgic::new(VgicConfig::qemu_virt(VCPUS, SPIS)).unwrap();
        let mut r = Reference::new();
        for (step, op) in ops.iter().enumerate() {
            let before: Vec<_> = (0..VCPUS).map(|c| r.best(c)).collect();
            let kick = apply(&mut v, &mut r, op);
            check(&v, &r, step);
            for (c, was) in before.iter().enumerate() {
                let skip = matches!(*op, Op::Round { vcpu, .. } if vcpu == c);
                if was.is_none() && r.best(c).is_some() && !skip {
                    prop_assert!(kick.contains(c), "step {}: vCPU {} gained an interrupt but was not kicked ({:?})", step, c, op);
                }
            }
        }
    }
}
