//! Hostile input: any guest access pattern to the GIC frames (offset, size,
//! alignment, value) gets a value or an `AccessError`, never a panic, and a
//! refused write changes nothing; bad host-side requests are errors.

use pkvm_vgic::{
    AccessError, ConfigError, IrqError, Line, ListRegister, LrState, SgiGroup, Vgic, VgicConfig,
    MAX_SPIS, MAX_VCPUS,
};

const VCPUS: usize = 4;
const GICD: u64 = 0x0800_0000;
const GICR: u64 = 0x080a_0000;

fn vgic() -> Vgic {
    Vgic::new(VgicConfig::qemu_virt(VCPUS, 64)).unwrap()
}

/// A small deterministic generator for write values.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 ^ (self.0 >> 29)
    }
}

/// Every byte offset of every frame (the distributor, and the RD and SGI
/// frames of the first and last redistributor), every size 0..=16: reads
/// and writes of random values never panic, succeed only for sizes 1, 2, 4
/// and 8 at aligned addresses, and a refused write leaves the model as it
/// was.
#[test]
fn every_offset_size_and_alignment_gets_an_answer_not_a_panic() {
    let mut v = vgic();
    let mut rng = Lcg(0x5eed);
    let last = GICR + 0x2_0000 * (VCPUS as u64 - 1);
    for base in [GICD, GICR, GICR + 0x1_0000, last, last + 0x1_0000] {
        for off in 0..0x1_0000u64 {
            let addr = base + off;
            let sampled = off % 0x40 == 0;
            for size in [0usize, 1, 2, 3, 4, 5, 8, 16] {
                let before = sampled.then(|| v.clone());
                let read = v.mmio_read(addr, size);
                let write = v.mmio_write(addr, size, rng.next());
                for result in [read.err(), write.err()] {
                    match result {
                        None => assert!(matches!(size, 1 | 2 | 4 | 8) && addr % size as u64 == 0),
                        Some(AccessError::BadSize { addr: a, size: s })
                        | Some(AccessError::Misaligned { addr: a, size: s }) => {
                            assert_eq!((a, s), (addr, size))
                        }
                        Some(e) => panic!("{addr:#x}/{size}: {e}"),
                    }
                }
                if write.is_err() {
                    if let Some(b) = &before {
                        assert!(
                            &v == b,
                            "refused write at {addr:#x} size {size} changed the model"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn addresses_outside_the_frames_are_out_of_range() {
    let v = vgic();
    let end = GICR + 0x2_0000 * VCPUS as u64;
    for addr in [
        0,
        GICD - 4,
        GICD + 0x1_0000,
        GICR - 4,
        end,
        end + 0x1_0000,
        u64::MAX - 3,
        u64::MAX,
    ] {
        assert_eq!(
            v.mmio_read(addr, 4),
            Err(AccessError::OutOfRange(addr)),
            "{addr:#x}"
        );
        assert!(!v.contains(addr));
    }
    assert!(v.contains(GICD) && v.contains(end - 1));
}

#[test]
fn bad_configurations_are_refused() {
    let ok = VgicConfig::qemu_virt(2, 32);
    assert_eq!(
        Vgic::new(VgicConfig { nr_vcpus: 0, ..ok }).err(),
        Some(ConfigError::Vcpus(0))
    );
    let too_many = MAX_VCPUS + 1;
    assert_eq!(
        Vgic::new(VgicConfig {
            nr_vcpus: too_many,
            ..ok
        })
        .err(),
        Some(ConfigError::Vcpus(too_many))
    );
    let spis = MAX_SPIS + 1;
    assert_eq!(
        Vgic::new(VgicConfig {
            nr_spis: spis,
            ..ok
        })
        .err(),
        Some(ConfigError::Spis(spis))
    );
    assert_eq!(
        Vgic::new(VgicConfig {
            gicd_base: 0x1000,
            ..ok
        })
        .err(),
        Some(ConfigError::Base(0x1000))
    );
    let top: u64 = !0xffff;
    assert_eq!(
        Vgic::new(VgicConfig {
            gicr_base: top,
            ..ok
        })
        .err(),
        Some(ConfigError::Base(top))
    );
    assert_eq!(
        Vgic::new(VgicConfig {
            gicd_base: GICR + 0x1_0000,
            ..ok
        })
        .err(),
        Some(ConfigError::Overlap)
    );
    let mut dup = ok;
    dup.mpidr[1] = dup.mpidr[0] | (1 << 31);
    assert_eq!(
        Vgic::new(dup).err(),
        Some(ConfigError::DuplicateAffinity(0, 1))
    );
    assert!(Vgic::new(VgicConfig {
        nr_spis: MAX_SPIS,
        nr_vcpus: MAX_VCPUS,
        ..ok
    })
    .is_ok());
}

#[test]
fn bad_lines_vcpus_and_intids_are_errors() {
    let mut v = vgic();
    assert_eq!(
        v.set_level(Line::Ppi { vcpu: 0, intid: 3 }, true),
        Err(IrqError::Intid(3))
    );
    assert_eq!(
        v.set_level(
            Line::Ppi {
                vcpu: VCPUS,
                intid: 27
            },
            true
        ),
        Err(IrqError::Vcpu(VCPUS))
    );
    assert_eq!(v.raise_edge(Line::Spi(96)), Err(IrqError::Intid(96)));
    assert_eq!(v.raise_edge(Line::Spi(20)), Err(IrqError::Intid(20)));
    assert_eq!(
        v.raise_edge(Line::Spi(u32::MAX)),
        Err(IrqError::Intid(u32::MAX))
    );
    assert_eq!(
        v.send_sgi(VCPUS, 1 << 40, SgiGroup::Group1),
        Err(IrqError::Vcpu(VCPUS))
    );
    assert_eq!(
        v.deactivate(0, 40),
        Err(IrqError::NotActive { vcpu: 0, intid: 40 })
    );
    assert_eq!(v.deactivate(0, 2000), Err(IrqError::Intid(2000)));
    assert_eq!(v.ack(VCPUS), None);
    assert_eq!(v.highest_pending(usize::MAX), None);
    let mut lrs = [ListRegister::default(); 4];
    assert_eq!(v.flush_lrs(VCPUS, &mut lrs).used, 0);
    assert!(v.sync_from_lrs(VCPUS, &lrs).is_empty());
    assert_eq!(v, vgic(), "refused requests changed nothing");
}

/// List registers handed back by a confused or hostile caller: unknown
/// INTIDs, INTIDs this vCPU never had, duplicates, a short slice. Only what
/// was in flight on this vCPU is folded, once; the rest is put back as
/// loaded.
#[test]
fn sync_ignores_list_registers_it_did_not_load_and_restores_missing_ones() {
    let mut v = vgic();
    v.mmio_write(GICD, 4, 0b10).unwrap();
    let sgi0 = GICR + 0x1_0000;
    v.mmio_write(sgi0 + 0x100, 4, 1 << 27).unwrap();
    v.mmio_write(GICD + 0x104, 4, 0b11).unwrap(); // SPIs 32, 33
    v.set_level(Line::Ppi { vcpu: 0, intid: 27 }, true).unwrap();
    v.raise_edge(Line::Spi(32)).unwrap();
    v.raise_edge(Line::Spi(33)).unwrap();
    let mut lrs = [ListRegister::default(); 4];
    let flush = v.flush_lrs(0, &mut lrs);
    assert_eq!(flush.used, 3);
    let bogus = [
        ListRegister {
            vintid: 9999,
            state: LrState::Active,
            ..lrs[0]
        },
        ListRegister {
            vintid: 40,
            state: LrState::Active,
            ..lrs[0]
        },
        ListRegister {
            state: LrState::Active,
            ..lrs[0]
        },
        ListRegister {
            state: LrState::Invalid,
            ..lrs[0]
        },
    ];
    // vCPU 1 has its own timer PPI in flight; its sync, handed vCPU 0's
    // list registers as if all were deactivated, must not touch vCPU 0's
    // interrupts.
    v.mmio_write(sgi0 + 0x2_0000 + 0x100, 4, 1 << 27).unwrap();
    v.set_level(Line::Ppi { vcpu: 1, intid: 27 }, true).unwrap();
    let mut lrs1 = [ListRegister::default(); 4];
    assert_eq!(v.flush_lrs(1, &mut lrs1).used, 1);
    let mut deactivated = lrs.map(|lr| ListRegister {
        state: LrState::Invalid,
        ..lr
    });
    deactivated[..3].reverse(); // the SPIs first
    v.sync_from_lrs(1, &deactivated);
    assert_eq!(
        v.mmio_read(GICD + 0x204, 4),
        Ok(0b11),
        "vCPU 0's SPIs untouched by vCPU 1's sync"
    );
    assert_eq!(
        v.highest_pending(1),
        Some(27),
        "vCPU 1's own PPI was put back"
    );
    v.sync_from_lrs(0, &bogus);
    // The first real entry (INTID 27 acknowledged) was folded once; the
    // duplicate and the unknown INTIDs were ignored; 32 and 33, missing,
    // are back as they were.
    let active = v.mmio_read(sgi0 + 0x300, 4).unwrap();
    assert_eq!(active, 1 << lrs[0].vintid);
    assert_eq!(v.mmio_read(GICD + 0x304, 4), Ok(0), "SPIs not active");
    assert_eq!(v.mmio_read(GICD + 0x204, 4), Ok(0b11), "SPIs still pending");
    let again = v.flush_lrs(0, &mut lrs);
    assert_eq!(again.used, 3, "everything is loadable again");
}
