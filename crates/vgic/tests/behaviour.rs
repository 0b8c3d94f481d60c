//! Scenario tests of the interrupt state machine, SGIs, routing and the
//! list-register round trip, each pinning one architectural behaviour.

use pkvm_vgic::{Line, ListRegister, LrState, SgiGroup, VcpuSet, Vgic, VgicConfig};

const GICD: u64 = 0x0800_0000;
const GICR: u64 = 0x080a_0000;

fn sgi_frame(vcpu: usize) -> u64 {
    GICR + 0x2_0000 * vcpu as u64 + 0x1_0000
}

/// A vGIC with Group 1 enabled and `enable` SPIs/PPIs enabled on every
/// vCPU.
fn vgic(vcpus: usize, enable_spis: u64, enable_private: u64) -> Vgic {
    let mut v = Vgic::new(VgicConfig::qemu_virt(vcpus, 64)).unwrap();
    v.mmio_write(GICD, 4, 0b10).unwrap();
    v.mmio_write(GICD + 0x104, 4, enable_spis).unwrap();
    for c in 0..vcpus {
        v.mmio_write(sgi_frame(c) + 0x100, 4, enable_private)
            .unwrap();
    }
    v
}

#[test]
fn sgi_with_irm_targets_every_vcpu_but_the_sender() {
    let mut v = vgic(4, 0, 1 << 3);
    let kick = v
        .send_sgi(1, (1 << 40) | (3 << 24), SgiGroup::Group1)
        .unwrap();
    assert_eq!(kick.bits(), 0b1101);
    for c in 0..4 {
        assert_eq!(v.highest_pending(c), (c != 1).then_some(3), "vCPU {c}");
    }
}

#[test]
fn sgi_target_list_selects_aff0_within_the_named_aff3_aff2_aff1_and_range() {
    let mut cfg = VgicConfig::qemu_virt(4, 0);
    // vCPU 0: 0.0.0.0, 1: 0.0.1.1, 2: 1.2.1.1, 3: 0.0.1.17 (RS = 1).
    cfg.mpidr[..4].copy_from_slice(&[0, 0x101, 0x01_0002_0101, 0x111]);
    let v = Vgic::new(cfg).unwrap();
    let aff1 = 1u64 << 16;
    assert_eq!(v.sgi_targets(0, aff1 | 0b10).bits(), 0b0010);
    assert_eq!(
        v.sgi_targets(0, (1 << 48) | (2 << 32) | aff1 | 0b10).bits(),
        0b0100
    );
    assert_eq!(
        v.sgi_targets(0, (1 << 44) | aff1 | 0b10).bits(),
        0b1000,
        "RS = 1 names Aff0 16..31"
    );
    assert_eq!(
        v.sgi_targets(0, aff1 | 0b01).bits(),
        0,
        "no vCPU at Aff0 0 of cluster 1"
    );
    assert_eq!(v.sgi_targets(2, 1 << 40).bits(), 0b1011);
}

#[test]
fn sgi0r_pends_only_group0_sgis_and_sgi1r_either_group() {
    let mut v = vgic(2, 0, 0b11);
    v.mmio_write(GICD, 4, 0b11).unwrap();
    // SGI 0 is Group 0 on vCPU 1, SGI 1 stays Group 1.
    v.mmio_write(sgi_frame(1) + 0x80, 4, !1u64 & 0xffff_ffff)
        .unwrap();
    assert_eq!(
        v.send_sgi(0, 0b10 | (1 << 24), SgiGroup::Group0).unwrap(),
        VcpuSet::EMPTY
    );
    assert_eq!(v.highest_pending(1), None);
    assert_eq!(v.send_sgi(0, 0b10, SgiGroup::Group0).unwrap().bits(), 0b10);
    assert_eq!(v.ack(1), Some(0));
    assert_eq!(
        v.send_sgi(0, 0b10 | (1 << 24), SgiGroup::Group1)
            .unwrap()
            .bits(),
        0b10
    );
    assert_eq!(v.ack(1), Some(1));
}

#[test]
fn sgi_to_a_vcpu_with_the_sgi_disabled_pends_but_kicks_nobody() {
    let mut v = vgic(2, 0, 0);
    assert_eq!(
        v.send_sgi(0, 0b10 | (2 << 24), SgiGroup::Group1).unwrap(),
        VcpuSet::EMPTY
    );
    assert_eq!(v.mmio_read(sgi_frame(1) + 0x200, 4), Ok(1 << 2), "pending");
    assert_eq!(
        v.mmio_write(sgi_frame(1) + 0x100, 4, 1 << 2)
            .unwrap()
            .bits(),
        0b10,
        "enabling it kicks"
    );
}

#[test]
fn level_interrupt_lowered_before_acknowledge_is_not_taken_but_an_edge_stays_latched() {
    let mut v = vgic(1, 0b11, 0);
    // SPI 33 edge-triggered (ICFGR2 bit 3), SPI 32 level.
    v.mmio_write(GICD + 0xc08, 4, 0b1000).unwrap();
    v.set_level(Line::Spi(32), true).unwrap();
    v.set_level(Line::Spi(33), true).unwrap();
    v.set_level(Line::Spi(32), false).unwrap();
    v.set_level(Line::Spi(33), false).unwrap();
    assert_eq!(v.ack(0), Some(33));
    assert_eq!(v.ack(0), None);
}

#[test]
fn acknowledged_level_interrupt_with_line_high_is_active_and_pending() {
    let mut v = vgic(1, 0b1, 0);
    v.set_level(Line::Spi(32), true).unwrap();
    assert_eq!(v.ack(0), Some(32));
    assert_eq!(v.mmio_read(GICD + 0x204, 4), Ok(1), "still pending");
    assert_eq!(v.mmio_read(GICD + 0x304, 4), Ok(1), "active");
    assert_eq!(v.ack(0), None, "an active interrupt is not taken again");
    assert_eq!(
        v.deactivate(0, 32).unwrap().bits(),
        1 << 0,
        "pending again: kick"
    );
    assert_eq!(v.ack(0), Some(32));
}

#[test]
fn list_register_round_trip_resamples_a_level_line_after_the_guest_deactivates() {
    let mut v = vgic(1, 0, 1 << 27);
    let vtimer = Line::Ppi { vcpu: 0, intid: 27 };
    v.set_level(vtimer, true).unwrap();
    let mut lrs = [ListRegister::default(); 2];
    let flush = v.flush_lrs(0, &mut lrs);
    assert_eq!(flush.used, 1);
    assert_eq!((lrs[0].vintid, lrs[0].state), (27, LrState::Pending));
    assert!(lrs[0].eoi_maintenance, "level: EOI maintenance to resample");
    // The guest acknowledges and deactivates; the timer line is still high.
    lrs[0].state = LrState::Invalid;
    assert_eq!(v.sync_from_lrs(0, &lrs[..1]).bits(), 1 << 0);
    assert_eq!(v.highest_pending(0), Some(27));
    // Once the line drops the interrupt is gone.
    let flush = v.flush_lrs(0, &mut lrs);
    assert_eq!(flush.used, 1);
    v.set_level(vtimer, false).unwrap();
    v.sync_from_lrs(0, &lrs[..1]);
    assert_eq!(v.highest_pending(0), None);
}

#[test]
fn active_level_interrupt_is_loaded_without_its_line_pending_so_a_dropped_line_is_not_taken() {
    let mut v = vgic(1, 0, 1 << 27);
    let vtimer = Line::Ppi { vcpu: 0, intid: 27 };
    v.set_level(vtimer, true).unwrap();
    let mut lrs = [ListRegister::default(); 2];
    assert_eq!(v.flush_lrs(0, &mut lrs).used, 1);
    // The guest acknowledges; an exit follows with the line still high.
    lrs[0].state = LrState::Active;
    v.sync_from_lrs(0, &lrs[..1]);
    assert_eq!(v.mmio_read(sgi_frame(0) + 0x200, 4), Ok(1 << 27), "pending");
    assert_eq!(v.mmio_read(sgi_frame(0) + 0x300, 4), Ok(1 << 27), "active");
    assert_eq!(v.flush_lrs(0, &mut lrs).used, 1);
    assert_eq!(
        (lrs[0].vintid, lrs[0].state),
        (27, LrState::Active),
        "not pending and active: the line may drop without an exit"
    );
    assert!(lrs[0].eoi_maintenance, "the deactivate resamples the line");
    // The guest masks its timer (no exit) and deactivates.
    v.set_level(vtimer, false).unwrap();
    lrs[0].state = LrState::Invalid;
    v.sync_from_lrs(0, &lrs[..1]);
    assert_eq!(v.highest_pending(0), None);
    // With the line still high at the deactivate it is pending again.
    v.set_level(vtimer, true).unwrap();
    assert_eq!(v.flush_lrs(0, &mut lrs).used, 1);
    lrs[0].state = LrState::Active;
    v.sync_from_lrs(0, &lrs[..1]);
    assert_eq!(v.flush_lrs(0, &mut lrs).used, 1);
    lrs[0].state = LrState::Invalid;
    assert_eq!(v.sync_from_lrs(0, &lrs[..1]).bits(), 1 << 0, "kick");
    assert_eq!(v.highest_pending(0), Some(27));
}

#[test]
fn edge_arriving_while_the_guest_holds_it_active_makes_it_active_and_pending() {
    let mut v = vgic(2, 1 << 8, 0); // SPI 40
    v.mmio_write(GICD + 0xc08, 4, 1 << 17).unwrap(); // SPI 40 edge
    v.mmio_write(GICD + 0x6000 + 8 * 40, 8, 1).unwrap(); // to vCPU 1
    assert_eq!(v.raise_edge(Line::Spi(40)).unwrap().bits(), 1 << 1);
    let mut lrs = [ListRegister::default(); 4];
    assert_eq!(v.flush_lrs(1, &mut lrs).used, 1);
    lrs[0].state = LrState::Active; // the guest acknowledged it
    assert_eq!(
        v.raise_edge(Line::Spi(40)).unwrap().bits(),
        1 << 1,
        "kick the vCPU holding it"
    );
    v.sync_from_lrs(1, &lrs[..1]);
    assert_eq!(v.flush_lrs(1, &mut lrs).used, 1);
    assert_eq!((lrs[0].vintid, lrs[0].state), (40, LrState::PendingActive));
}

#[test]
fn spi_is_offered_only_to_the_vcpu_its_irouter_names() {
    let mut v = vgic(4, 1 << 8, 0);
    v.mmio_write(GICD + 0x6000 + 8 * 40, 8, 2).unwrap();
    assert_eq!(v.raise_edge(Line::Spi(40)).unwrap().bits(), 1 << 2);
    for c in 0..4 {
        assert_eq!(v.highest_pending(c), (c == 2).then_some(40), "vCPU {c}");
    }
    // Re-routed to an affinity no vCPU has: nobody takes it.
    assert_eq!(
        v.mmio_write(GICD + 0x6000 + 8 * 40, 8, 0x0505).unwrap(),
        VcpuSet::EMPTY
    );
    assert!((0..4).all(|c| v.highest_pending(c).is_none()));
    // IRM = 1: any vCPU may, but once in one's list registers no other.
    assert_eq!(
        v.mmio_write(GICD + 0x6000 + 8 * 40, 8, 1 << 31)
            .unwrap()
            .bits(),
        0b1111
    );
    let mut lrs = [ListRegister::default(); 1];
    assert_eq!(v.flush_lrs(3, &mut lrs).used, 1);
    assert_eq!(v.flush_lrs(0, &mut lrs).used, 0);
}

#[test]
fn more_interrupts_than_list_registers_overflow_and_go_by_priority() {
    let mut v = vgic(1, 0b1111, 0);
    for (intid, prio) in [(32, 0x80), (33, 0x40), (34, 0x40), (35, 0x10)] {
        v.mmio_write(GICD + 0x400 + intid, 1, prio).unwrap();
        v.raise_edge(Line::Spi(intid as u32)).unwrap();
    }
    let mut lrs = [ListRegister::default(); 2];
    let flush = v.flush_lrs(0, &mut lrs);
    assert!(flush.overflow);
    assert_eq!([lrs[0].vintid, lrs[1].vintid], [35, 33]);
    v.sync_from_lrs(0, &lrs);
    let flush = v.flush_lrs(0, &mut lrs[..1]);
    assert!(flush.overflow);
    assert_eq!(lrs[0].vintid, 35, "untaken interrupts are offered again");
}

#[test]
fn list_register_encoding_follows_ich_lr_el2() {
    // vINTID 27, pending, Group 1, priority 0xa0, EOI maintenance:
    // State 63:62 = 01, Group 60, Priority 55:48, EOI 41.
    let lr = ListRegister {
        vintid: 27,
        state: LrState::Pending,
        group1: true,
        priority: 0xa0,
        hw_pintid: None,
        eoi_maintenance: true,
    };
    assert_eq!(lr.to_bits(), 0x50a0_0200_0000_001b);
    // HW = 1 with pINTID 27, active, Group 0: HW 61, pINTID 44:32.
    let hw = ListRegister {
        state: LrState::Active,
        group1: false,
        hw_pintid: Some(27),
        eoi_maintenance: false,
        ..lr
    };
    assert_eq!(hw.to_bits(), 0xa0a0_001b_0000_001b);
    assert_eq!(ListRegister::from_bits(hw.to_bits()), hw);
}

#[test]
fn gicr_waker_children_asleep_follows_processor_sleep() {
    let mut v = vgic(2, 0, 0);
    let waker = GICR + 0x2_0000 + 0x14;
    assert_eq!(v.mmio_read(waker, 4), Ok(0b110));
    v.mmio_write(waker, 4, 0).unwrap();
    assert_eq!(v.mmio_read(waker, 4), Ok(0));
    assert_eq!(v.mmio_read(GICR + 0x14, 4), Ok(0b110), "per redistributor");
}

#[test]
fn enabling_group1_in_gicd_ctlr_kicks_vcpus_with_something_pending() {
    let mut v = vgic(3, 1 << 8, 0);
    v.mmio_write(GICD, 4, 0).unwrap();
    v.mmio_write(GICD + 0x6000 + 8 * 40, 8, 1).unwrap();
    assert_eq!(
        v.raise_edge(Line::Spi(40)).unwrap(),
        VcpuSet::EMPTY,
        "group disabled"
    );
    assert_eq!(v.mmio_write(GICD, 4, 0b10).unwrap().bits(), 1 << 1);
}

#[test]
fn reset_after_activity_equals_a_fresh_vgic() {
    let fresh = vgic(4, 0, 0);
    let mut v = fresh.clone();
    let mut x = 0x1234_5678_9abc_def0u64;
    for frame in [GICD, GICR, sgi_frame(0), GICR + 0x6_0000, sgi_frame(3)] {
        for off in (0..0x1_0000).step_by(4) {
            x = x.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let _ = v.mmio_write(frame + off, 4, x);
        }
    }
    v.raise_edge(Line::Spi(40)).unwrap();
    v.set_level(Line::Ppi { vcpu: 2, intid: 27 }, true).unwrap();
    let mut lrs = [ListRegister::default(); 4];
    v.flush_lrs(2, &mut lrs);
    assert!(v != fresh);
    v.reset();
    v.mmio_write(GICD, 4, 0b10).unwrap(); // as `vgic()` set it up
    assert!(v == fresh, "reset left state behind");
}

#[test]
fn distributor_enabled_follows_gicd_ctlr_group_enables_and_reset() {
    let mut v = Vgic::new(VgicConfig::qemu_virt(1, 64)).unwrap();
    assert!(!v.distributor_enabled(), "off at reset");
    v.mmio_write(GICD, 4, 0b01).unwrap();
    assert!(v.distributor_enabled(), "EnableGrp0 alone turns it on");
    v.mmio_write(GICD, 4, 0b10).unwrap();
    assert!(v.distributor_enabled(), "EnableGrp1 alone turns it on");
    v.mmio_write(GICD, 4, 0).unwrap();
    assert!(!v.distributor_enabled(), "both groups off");
    v.mmio_write(GICD, 4, 0b11).unwrap();
    v.reset();
    assert!(!v.distributor_enabled(), "a VM reset turns it off");
}
