//! Every offset of every GIC frame against an expectation written from the
//! GICv3 architecture (IHI 0069) in this file: reset value, behaviour
//! (RO, RW, write-1-to-set / write-1-to-clear pairs, RAZ/WI), allowed
//! access sizes. The oracle is this file, never the model's own table.

use pkvm_vgic::{AccessError, Frame, Vgic, VgicConfig, REGISTERS};

const VCPUS: usize = 4;
/// 64 SPIs: INTIDs 32..96, so GICD_TYPER.ITLinesNumber = 2.
const SPIS: usize = 64;
const LAST_INTID: u64 = 32 + SPIS as u64;
const GICD: u64 = 0x0800_0000;
const GICR: u64 = 0x080a_0000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Read-only: writes are ignored.
    Ro,
    /// Read/write in `mask`, the other bits fixed at their reset value.
    Rw(u64),
    /// Write 1 to set bits `mask`; `partner` is the write-1-to-clear offset.
    Set { mask: u64, partner: u32 },
    /// Write 1 to clear; `partner` is the write-1-to-set offset.
    Clear { mask: u64, partner: u32 },
    /// RAZ/WI.
    RazWi,
    /// Reserved space: RAZ/WI at any aligned size.
    Reserved,
}

#[derive(Clone, Copy, Debug)]
struct Expect {
    name: &'static str,
    reset: u64,
    kind: Kind,
    /// Register width (4 or 8).
    width: u32,
    /// Byte access allowed.
    bytes: bool,
}

const fn reg(name: &'static str, reset: u64, kind: Kind) -> Expect {
    Expect {
        name,
        reset,
        kind,
        width: 4,
        bytes: false,
    }
}

const RESERVED: Expect = Expect {
    name: "reserved",
    reset: 0,
    kind: Kind::Reserved,
    width: 4,
    bytes: false,
};

/// Whether the 32 interrupts from `first` hold at least one implemented
/// SPI (distributor arrays: INTIDs 0-31 live in the redistributors).
fn dist_spi_word(first: u64) -> bool {
    (32..LAST_INTID).contains(&first)
}

/// A per-interrupt bit array of the distributor or the SGI frame.
fn bit_array(name: &'static str, n: u32, implemented: bool, base: u32, kind: Kind) -> Expect {
    if !implemented {
        return reg(name, 0, Kind::RazWi);
    }
    let off = base + 4 * n;
    let kind = match kind {
        Kind::Set { mask, .. } => Kind::Set {
            mask,
            partner: off + 0x80,
        },
        Kind::Clear { mask, .. } => Kind::Clear {
            mask,
            partner: off - 0x80,
        },
        k => k,
    };
    let reset = if name.contains("IGROUPR") {
        0xffff_ffff
    } else {
        0
    };
    reg(name, reset, kind)
}

const ONES: u64 = 0xffff_ffff;
const SET: Kind = Kind::Set {
    mask: ONES,
    partner: 0,
};
const CLEAR: Kind = Kind::Clear {
    mask: ONES,
    partner: 0,
};
const PRIO_MASK: u64 = 0xf8f8_f8f8;
const EDGE_BITS: u64 = 0xaaaa_aaaa;
const IROUTER_MASK: u64 = 0xff_8000_0000 | 0xff_ffff;

fn dist(off: u32) -> Expect {
    let word = |base: u32| (off - base) / 4;
    let spi_word = |base: u32| dist_spi_word(u64::from(word(base)) * 32);
    match off {
        0x0 => reg("GICD_CTLR", 0x50, Kind::Rw(0b11)),
        // ITLinesNumber 2, CPUNumber 3 (4 vCPUs), IDbits 9 (10 bits), A3V.
        0x4 => reg("GICD_TYPER", 2 | (3 << 5) | (9 << 19) | (1 << 24), Kind::Ro),
        0x8 => reg("GICD_IIDR", 0x5000_043b, Kind::Ro),
        0xc => reg("GICD_TYPER2", 0, Kind::Ro),
        0x10 => reg("GICD_STATUSR", 0, Kind::RazWi),
        0x80..0x100 => bit_array(
            "GICD_IGROUPR",
            word(0x80),
            spi_word(0x80),
            0x80,
            Kind::Rw(ONES),
        ),
        0x100..0x180 => bit_array("GICD_ISENABLER", word(0x100), spi_word(0x100), 0x100, SET),
        0x180..0x200 => bit_array("GICD_ICENABLER", word(0x180), spi_word(0x180), 0x180, CLEAR),
        0x200..0x280 => bit_array("GICD_ISPENDR", word(0x200), spi_word(0x200), 0x200, SET),
        0x280..0x300 => bit_array("GICD_ICPENDR", word(0x280), spi_word(0x280), 0x280, CLEAR),
        0x300..0x380 => bit_array("GICD_ISACTIVER", word(0x300), spi_word(0x300), 0x300, SET),
        0x380..0x400 => bit_array("GICD_ICACTIVER", word(0x380), spi_word(0x380), 0x380, CLEAR),
        0x400..0x7fc => {
            let first = u64::from(word(0x400)) * 4;
            let kind = if (32..LAST_INTID).contains(&first) {
                Kind::Rw(PRIO_MASK)
            } else {
                Kind::RazWi
            };
            Expect {
                bytes: true,
                ..reg("GICD_IPRIORITYR", 0, kind)
            }
        }
        0x800..0xbfc => Expect {
            bytes: true,
            ..reg("GICD_ITARGETSR", 0, Kind::RazWi)
        },
        0xc00..0xd00 => {
            let first = u64::from(word(0xc00)) * 16;
            let kind = if (32..LAST_INTID).contains(&first) {
                Kind::Rw(EDGE_BITS)
            } else {
                Kind::RazWi
            };
            reg("GICD_ICFGR", 0, kind)
        }
        0xd00..0xd80 => reg("GICD_IGRPMODR", 0, Kind::RazWi),
        0xe00..0xf00 => reg("GICD_NSACR", 0, Kind::RazWi),
        0xf00 => reg("GICD_SGIR", 0, Kind::RazWi),
        0xf10..0xf30 => Expect {
            bytes: true,
            ..reg("GICD_C/SPENDSGIR", 0, Kind::RazWi)
        },
        0x6000..0x7fe0 => {
            let n = u64::from(off - 0x6000) / 8;
            let kind = if (32..LAST_INTID).contains(&n) {
                Kind::Rw(IROUTER_MASK)
            } else {
                Kind::RazWi
            };
            Expect {
                width: 8,
                ..reg("GICD_IROUTER", 0, kind)
            }
        }
        0xffe8 => reg("GICD_PIDR2", 0x3b, Kind::Ro),
        _ => RESERVED,
    }
}

fn rd_base(rd: usize, off: u32) -> Expect {
    match off {
        0x0 => reg("GICR_CTLR", 0, Kind::Ro),
        0x4 => reg("GICR_IIDR", 0x5000_043b, Kind::Ro),
        0x8..0x10 => {
            // KVM affinity layout: vCPU rd has Aff0 = rd (< 16).
            let last = if rd == VCPUS - 1 { 1 << 4 } else { 0 };
            let typer = ((rd as u64) << 32) | ((rd as u64) << 8) | last;
            Expect {
                width: 8,
                ..reg("GICR_TYPER", typer, Kind::Ro)
            }
        }
        0x10 => reg("GICR_STATUSR", 0, Kind::RazWi),
        // ProcessorSleep and ChildrenAsleep set at reset; the latter follows.
        0x14 => reg("GICR_WAKER", 0b110, Kind::Rw(0b110)),
        0x70..0x80 => Expect {
            width: 8,
            ..reg("GICR_PROP/PENDBASER", 0, Kind::RazWi)
        },
        0xffe8 => reg("GICR_PIDR2", 0x3b, Kind::Ro),
        _ => RESERVED,
    }
}

fn sgi_base(off: u32) -> Expect {
    match off {
        0x80 => reg("GICR_IGROUPR0", ONES, Kind::Rw(ONES)),
        0x100 => bit_array("GICR_ISENABLER0", 0, true, 0x100, SET),
        0x180 => bit_array("GICR_ICENABLER0", 0, true, 0x180, CLEAR),
        0x200 => bit_array("GICR_ISPENDR0", 0, true, 0x200, SET),
        0x280 => bit_array("GICR_ICPENDR0", 0, true, 0x280, CLEAR),
        0x300 => bit_array("GICR_ISACTIVER0", 0, true, 0x300, SET),
        0x380 => bit_array("GICR_ICACTIVER0", 0, true, 0x380, CLEAR),
        0x400..0x420 => Expect {
            bytes: true,
            ..reg("GICR_IPRIORITYR", 0, Kind::Rw(PRIO_MASK))
        },
        // SGIs: edge, read-only. PPIs: level at reset, configurable.
        0xc00 => reg("GICR_ICFGR0", EDGE_BITS, Kind::Ro),
        0xc04 => reg("GICR_ICFGR1", 0, Kind::Rw(EDGE_BITS)),
        0xd00 => reg("GICR_IGRPMODR0", 0, Kind::RazWi),
        0xe00 => reg("GICR_NSACR", 0, Kind::RazWi),
        _ => RESERVED,
    }
}

fn frame_base(frame: Frame, rd: usize) -> u64 {
    match frame {
        Frame::Dist => GICD,
        Frame::RdBase => GICR + 0x2_0000 * rd as u64,
        Frame::SgiBase => GICR + 0x2_0000 * rd as u64 + 0x1_0000,
    }
}

fn expect(frame: Frame, rd: usize, off: u32) -> Expect {
    match frame {
        Frame::Dist => dist(off),
        Frame::RdBase => rd_base(rd, off),
        Frame::SgiBase => sgi_base(off),
    }
}

fn new_vgic() -> Vgic {
    Vgic::new(VgicConfig::qemu_virt(VCPUS, SPIS)).expect("valid config")
}

fn mask(size: usize) -> u64 {
    if size == 8 {
        u64::MAX
    } else {
        (1 << (size * 8)) - 1
    }
}

/// Whether the architecture allows a `size`-byte access at byte `off` of a
/// register described by `e` (starting at `start`).
fn size_allowed(e: &Expect, frame: Frame, rd: usize, off: u32, size: usize) -> bool {
    match e.kind {
        Kind::Reserved => {
            // An access from reserved space must not run into a register.
            let end = off + size as u32 - 1;
            size != 8 || matches!(expect(frame, rd, end & !3).kind, Kind::Reserved)
        }
        _ => size as u32 == e.width || (e.width == 8 && size == 4) || (e.bytes && size == 1),
    }
}

/// Reset value and access sizes at every 4-byte offset of `frame`.
fn check_frame_reset_and_sizes(frame: Frame, rd: usize) {
    let v = new_vgic();
    let base = frame_base(frame, rd);
    for off in (0..0x1_0000u32).step_by(4) {
        let e = expect(frame, rd, off);
        let start = if e.width == 8 { off & !7 } else { off };
        for size in [1usize, 2, 4, 8] {
            for sub in (0..4u32).step_by(size.min(4)) {
                let at = off + sub;
                let addr = base + u64::from(at);
                let got = v.mmio_read(addr, size);
                if u64::from(at) % size as u64 != 0 {
                    assert_eq!(
                        got,
                        Err(AccessError::Misaligned { addr, size }),
                        "{} +{at:#x}",
                        e.name
                    );
                    continue;
                }
                if !size_allowed(&e, frame, rd, at, size) {
                    assert_eq!(
                        got,
                        Err(AccessError::BadSize { addr, size }),
                        "{} +{at:#x} size {size}",
                        e.name
                    );
                    continue;
                }
                let want = (e.reset >> ((at - start) * 8)) & mask(size);
                assert_eq!(
                    got,
                    Ok(want),
                    "{} +{at:#x} size {size}: reset value",
                    e.name
                );
            }
        }
    }
}

#[test]
fn distributor_offsets_have_spec_reset_values_and_access_sizes() {
    check_frame_reset_and_sizes(Frame::Dist, 0);
}

#[test]
fn redistributor_offsets_have_spec_reset_values_and_access_sizes() {
    for rd in [0, 1, VCPUS - 1] {
        check_frame_reset_and_sizes(Frame::RdBase, rd);
        check_frame_reset_and_sizes(Frame::SgiBase, rd);
    }
}

fn write(v: &mut Vgic, addr: u64, width: u32, value: u64) {
    v.mmio_write(addr, width as usize, value)
        .expect("allowed write");
}

fn read(v: &Vgic, addr: u64, width: u32) -> u64 {
    v.mmio_read(addr, width as usize).expect("allowed read")
}

/// RO / RW / W1S / W1C / RAZ-WI behaviour at every register of `frame`.
fn check_frame_behaviour(frame: Frame, rd: usize) {
    let fresh = new_vgic();
    let base = frame_base(frame, rd);
    for off in (0..0x1_0000u32).step_by(4) {
        let e = expect(frame, rd, off);
        if e.width == 8 && off % 8 != 0 {
            continue;
        }
        let (addr, w, ones) = (base + u64::from(off), e.width, mask(e.width as usize));
        let mut v = fresh.clone();
        write(&mut v, addr, w, ones);
        let after = read(&v, addr, w);
        match e.kind {
            Kind::Ro => {
                assert_eq!(after, e.reset, "{} +{off:#x}: read-only (ones)", e.name);
                write(&mut v, addr, w, 0);
                assert_eq!(
                    read(&v, addr, w),
                    e.reset,
                    "{} +{off:#x}: read-only (zeros)",
                    e.name
                );
            }
            Kind::RazWi | Kind::Reserved => assert_eq!(after, 0, "{} +{off:#x}: RAZ/WI", e.name),
            Kind::Rw(m) => {
                assert_eq!(
                    after,
                    (e.reset & !m) | m,
                    "{} +{off:#x}: writable bits",
                    e.name
                );
                write(&mut v, addr, w, 0);
                assert_eq!(
                    read(&v, addr, w),
                    e.reset & !m,
                    "{} +{off:#x}: cleared",
                    e.name
                );
            }
            Kind::Set { mask: m, partner } => {
                let p = base + u64::from(partner);
                assert_eq!(after, m, "{} +{off:#x}: write 1 sets", e.name);
                assert_eq!(
                    read(&v, p, w),
                    m,
                    "{} +{off:#x}: partner reads the same",
                    e.name
                );
                write(&mut v, addr, w, 0);
                assert_eq!(
                    read(&v, addr, w),
                    m,
                    "{} +{off:#x}: write 0 has no effect",
                    e.name
                );
                write(&mut v, p, w, ones);
                assert_eq!(read(&v, addr, w), 0, "{} +{off:#x}: partner clears", e.name);
            }
            Kind::Clear { mask: m, partner } => {
                let p = base + u64::from(partner);
                assert_eq!(after, 0, "{} +{off:#x}: write 1 to clear at reset", e.name);
                write(&mut v, p, w, ones);
                assert_eq!(
                    read(&v, addr, w),
                    m,
                    "{} +{off:#x}: reads what the partner set",
                    e.name
                );
                write(&mut v, addr, w, 0);
                assert_eq!(
                    read(&v, addr, w),
                    m,
                    "{} +{off:#x}: write 0 has no effect",
                    e.name
                );
                write(&mut v, addr, w, ones);
                assert_eq!(read(&v, addr, w), 0, "{} +{off:#x}: write 1 clears", e.name);
            }
        }
    }
}

#[test]
fn distributor_registers_behave_as_ro_rw_w1s_w1c_or_raz_wi() {
    check_frame_behaviour(Frame::Dist, 0);
}

#[test]
fn redistributor_registers_behave_as_ro_rw_w1s_w1c_or_raz_wi() {
    for rd in [0, VCPUS - 1] {
        check_frame_behaviour(Frame::RdBase, rd);
        check_frame_behaviour(Frame::SgiBase, rd);
    }
}

#[test]
fn every_modelled_register_row_is_in_the_expectation() {
    for row in REGISTERS {
        for off in [row.offset, row.end() - row.width] {
            let e = expect(row.frame, 0, off);
            assert_ne!(
                e.kind,
                Kind::Reserved,
                "{} at {off:#x} is not in this test's map",
                row.name
            );
            assert_eq!(e.width, row.width, "{} width", row.name);
            assert_eq!(e.bytes, row.bytes, "{} byte access", row.name);
        }
    }
}

#[test]
fn priority_byte_write_changes_one_interrupt_and_keeps_five_bits() {
    let mut v = new_vgic();
    // GICD_IPRIORITYR8 holds INTIDs 32..35; byte 1 is INTID 33.
    v.mmio_write(GICD + 0x421, 1, 0xff).unwrap();
    assert_eq!(v.mmio_read(GICD + 0x420, 4), Ok(0x0000_f800));
    assert_eq!(v.mmio_read(GICD + 0x421, 1), Ok(0xf8));
    // The same in a redistributor's SGI frame (INTID 27, the vtimer).
    let sgi = GICR + 0x1_0000;
    v.mmio_write(sgi + 0x41b, 1, 0xa5).unwrap();
    assert_eq!(v.mmio_read(sgi + 0x418, 4), Ok(0xa000_0000));
}

#[test]
fn irouter_halves_are_written_separately() {
    let mut v = new_vgic();
    let irouter40 = GICD + 0x6000 + 8 * 40;
    v.mmio_write(irouter40 + 4, 4, 0xffff_ffff).unwrap();
    assert_eq!(
        v.mmio_read(irouter40, 8),
        Ok(0xff_0000_0000),
        "only Aff3 of the upper word is kept"
    );
    v.mmio_write(irouter40, 4, 0x8000_0302).unwrap();
    assert_eq!(v.mmio_read(irouter40, 8), Ok(0xff_8000_0302));
    assert_eq!(v.mmio_read(irouter40 + 4, 4), Ok(0xff));
}

#[test]
fn gicr_typer_last_bit_marks_only_the_last_redistributor() {
    let v = new_vgic();
    for rd in 0..VCPUS {
        let typer = v.mmio_read(GICR + 0x2_0000 * rd as u64 + 8, 8).unwrap();
        assert_eq!(
            typer & (1 << 4) != 0,
            rd == VCPUS - 1,
            "GICR_TYPER.Last of {rd}"
        );
        assert_eq!((typer >> 8) & 0xffff, rd as u64, "Processor_Number of {rd}");
    }
    assert_eq!(
        v.mmio_read(GICR + 0x2_0000 * VCPUS as u64, 4),
        Err(AccessError::OutOfRange(GICR + 0x8_0000))
    );
}
