//! MMU tests against hand-built tables: exact ESR/HPFAR/FAR values.

use super::*;
use pkvm_arch::pte::{S2Features, S2Prot};
use pkvm_arch::Granule;
use pkvm_pgtable::PtMemory;

const NOFWB: S2Features = S2Features { fwb: false };
const RAM: u64 = 0x4000_0000;

struct Tables {
    mem: PhysMem,
    next: u64,
}

impl Tables {
    fn new() -> Tables {
        Tables {
            mem: PhysMem::new(Pa(RAM), 64 << 20, &[]).unwrap(),
            next: RAM,
        }
    }

    /// `n` contiguous zeroed pages aligned to `n` pages.
    fn pages(&mut self, n: u64) -> Pa {
        let align = n * 4096;
        let pa = self.next.div_ceil(align) * align;
        self.next = pa + align;
        Pa(pa)
    }

    fn set(&self, table: Pa, idx: usize, pte: S2Pte) {
        self.mem.table(table)[idx].store(pte.0, Ordering::Release);
    }

    fn ctx(&mut self, ipa_bits: u32) -> VmContext {
        let geo = S2Geometry::new(Granule::Size4K, ipa_bits).unwrap();
        let root = self.pages(geo.root_pages as u64);
        VmContext {
            vmid: 1,
            root,
            geo,
            ps_bits: 40,
        }
    }
}

fn page(pa: u64, prot: S2Prot) -> S2Pte {
    S2Pte::leaf(Pa(pa), Level(3), prot, NOFWB)
}

fn idx(ipa: u64, level: u8) -> usize {
    ((ipa >> level_shift(Level(level))) & 511) as usize
}

/// A 39-bit VM (start level 1, one root page) with a 4K page mapped at
/// `ipa` -> `pa` with `prot`; returns (tables, ctx, l2 table, l3 table).
fn with_page(ipa: u64, pa: u64, prot: S2Prot) -> (Tables, VmContext, Pa, Pa) {
    let mut t = Tables::new();
    let ctx = t.ctx(39);
    let l2 = t.pages(1);
    let l3 = t.pages(1);
    t.set(ctx.root, idx(ipa, 1), S2Pte::table(l2));
    t.set(l2, idx(ipa, 2), S2Pte::table(l3));
    t.set(l3, idx(ipa, 3), page(pa, prot));
    (t, ctx, l2, l3)
}

fn fault(t: &Tables, ctx: &VmContext, a: Access) -> Fault {
    translate(&t.mem, ctx, &a).expect_err("access must fault")
}

#[test]
fn page_translation_keeps_the_page_offset() {
    let (t, ctx, ..) = with_page(0x1234_5000, 0x4567_8000, S2Prot::RW);
    let tr = translate(&t.mem, &ctx, &Access::read(Ipa(0x1234_5abc), 8, 1)).unwrap();
    assert_eq!(tr.pa, Pa(0x4567_8abc));
    assert_eq!(tr.leaf.level, Level(3));
    assert!(translate(&t.mem, &ctx, &Access::write(Ipa(0x1234_5ab8), 8, 2)).is_ok());
}

#[test]
fn translation_fault_at_each_level_with_exact_syndrome() {
    let (t, ctx, l2, l3) = with_page(0x1234_5000, 0x4567_8000, S2Prot::RW);
    // Level 1: nothing at root index 2. 8-byte load into x1:
    // EC 0x24, IL, ISV, SAS=3, SRT=1, SF, DFSC 0b000101.
    let f = fault(&t, &ctx, Access::read(Ipa(0x8000_0010), 8, 1));
    assert_eq!(f.esr, Esr(0x93c1_8005));
    assert_eq!(f.far, 0x8000_0010);
    assert_eq!(f.hpfar, 0x80_0000);
    assert_eq!(f.ipa(), Ipa(0x8000_0010));
    // Level 2: the L2 table has nothing at index 0x92. 4-byte store from x2.
    let f = fault(&t, &ctx, Access::write(Ipa(0x1240_0004), 4, 2));
    assert_eq!(f.esr, Esr(0x9382_0046));
    assert_eq!(f.status(), FaultStatus::Translation(Level(2)));
    assert_eq!(f.hpfar, hpfar_for(Ipa(0x1240_0004)));
    // Level 3: neighbour page. 1-byte load into x1 (SAS 0, SF 0).
    let f = fault(&t, &ctx, Access::read(Ipa(0x1234_6001), 1, 1));
    assert_eq!(f.esr, Esr(0x9301_0007));
    assert_eq!(f.ipa(), Ipa(0x1234_6001));
    // A level-3 descriptor with bit 1 clear is reserved: translation fault L3.
    t.set(
        l3,
        idx(0x1234_7000, 3),
        S2Pte(page(0x4000_0000, S2Prot::RW).0 & !2),
    );
    assert_eq!(
        fault(&t, &ctx, Access::read(Ipa(0x1234_7000), 8, 1)).status(),
        FaultStatus::Translation(Level(3))
    );
    let _ = l2;
}

#[test]
fn ipa_beyond_the_input_size_is_a_level_0_translation_fault() {
    let (t, ctx, ..) = with_page(0x1234_5000, 0x4567_8000, S2Prot::RW);
    let f = fault(&t, &ctx, Access::read(Ipa(1 << 39), 8, 1));
    assert_eq!(f.esr, Esr(0x93c1_8004));
    assert_eq!(f.hpfar, hpfar_for(Ipa(1 << 39)));
}

#[test]
fn level_0_faults_with_a_48_bit_ipa() {
    let mut t = Tables::new();
    let mut ctx = t.ctx(48);
    ctx.ps_bits = 48;
    assert_eq!(ctx.geo.start_level, Level(0));
    let f = fault(&t, &ctx, Access::read(Ipa(0x7f_0000_0000), 8, 1));
    assert_eq!(f.status(), FaultStatus::Translation(Level(0)));
    // A block descriptor at level 0 is invalid with 4K pages.
    t.set(ctx.root, 0, S2Pte::leaf(Pa(0), Level(1), S2Prot::RW, NOFWB));
    assert_eq!(
        fault(&t, &ctx, Access::read(Ipa(0x1000), 8, 1)).status(),
        FaultStatus::Translation(Level(0))
    );
}

#[test]
fn access_flag_fault_comes_before_permission_fault() {
    let (t, ctx, _, l3) = with_page(0x1234_5000, 0x4567_8000, S2Prot::R);
    let old = page(0x4567_8000, S2Prot::R);
    t.set(
        l3,
        idx(0x1234_5000, 3),
        S2Pte(old.0 & !pkvm_arch::pte::bits::AF),
    );
    // Store to a read-only page with AF clear: access flag fault, level 3, WnR.
    let f = fault(&t, &ctx, Access::write(Ipa(0x1234_5008), 8, 2));
    assert_eq!(f.esr, Esr(0x93c2_804b));
    assert_eq!(f.status(), FaultStatus::AccessFlag(Level(3)));
}

#[test]
fn permission_faults_for_write_read_and_exec() {
    let (t, ctx, ..) = with_page(0x1234_5000, 0x4567_8000, S2Prot::R);
    // Store to read-only: permission fault level 3, WnR.
    let f = fault(&t, &ctx, Access::write(Ipa(0x1234_5000), 8, 2));
    assert_eq!(f.esr, Esr(0x93c2_804f));
    // Fetch from an XN page: instruction abort, EC 0x20, IFSC 0b001111.
    let f = fault(&t, &ctx, Access::exec(Ipa(0x1234_5100)));
    assert_eq!(f.esr, Esr(0x8200_000f));
    assert_eq!(f.far, 0x1234_5100);
    // Load from a write-only page.
    let (t, ctx, ..) = with_page(0x1234_5000, 0x4567_8000, S2Prot::W);
    let f = fault(&t, &ctx, Access::read(Ipa(0x1234_5000), 4, 1));
    assert_eq!(f.esr, Esr(0x9381_000f));
    // Executable read-only page: fetch works, store does not.
    let (t, ctx, ..) = with_page(0x1234_5000, 0x4567_8000, S2Prot::R | S2Prot::X);
    assert!(translate(&t.mem, &ctx, &Access::exec(Ipa(0x1234_5000))).is_ok());
}

#[test]
fn syndrome_less_and_stage1_walk_faults() {
    let (t, ctx, ..) = with_page(0x1234_5000, 0x4567_8000, S2Prot::R);
    // A store pair (no valid syndrome) to a missing page: ISV = 0.
    let f = fault(
        &t,
        &ctx,
        Access::write(Ipa(0x1234_6000), 8, 2).without_syndrome(),
    );
    assert_eq!(f.esr, Esr(0x9200_0047));
    // The guest's stage-1 walk reading a missing page: S1PTW, ISV = 0, FAR
    // holds the VA being translated, HPFAR the table's IPA.
    let mut a = Access::read(Ipa(0x1234_6000), 8, 1).as_s1ptw();
    a.far = 0xffff_8000_0000_1000;
    let f = fault(&t, &ctx, a);
    assert_eq!(f.esr, Esr(0x9200_0087));
    assert_eq!(f.far, 0xffff_8000_0000_1000);
    assert_eq!(f.hpfar, hpfar_for(Ipa(0x1234_6000)));
    // A stage-1 walk is checked as a read: fine on a read-only page ...
    assert!(translate(
        &t.mem,
        &ctx,
        &Access::read(Ipa(0x1234_5000), 8, 1).as_s1ptw()
    )
    .is_ok());
    // ... but a hardware descriptor update (a write) is a permission fault.
    let f = fault(&t, &ctx, Access::write(Ipa(0x1234_5000), 8, 1).as_s1ptw());
    assert_eq!(f.esr, Esr(0x9200_00cf));
}

#[test]
fn blocks_at_level_1_and_level_2() {
    let mut t = Tables::new();
    let ctx = t.ctx(39);
    // 1G block at IPA 1G -> PA 0x4000_0000.
    t.set(
        ctx.root,
        1,
        S2Pte::leaf(Pa(0x4000_0000), Level(1), S2Prot::RW, NOFWB),
    );
    let tr = translate(&t.mem, &ctx, &Access::read(Ipa(0x7654_3218), 8, 1)).unwrap();
    assert_eq!((tr.pa, tr.leaf.level), (Pa(0x7654_3218), Level(1)));
    // 2M read-only block at IPA 0x8020_0000 -> PA 0x4460_0000.
    let l2 = t.pages(1);
    t.set(ctx.root, 2, S2Pte::table(l2));
    t.set(
        l2,
        1,
        S2Pte::leaf(Pa(0x4460_0000), Level(2), S2Prot::R, NOFWB),
    );
    let tr = translate(&t.mem, &ctx, &Access::read(Ipa(0x802f_fff8), 8, 1)).unwrap();
    assert_eq!((tr.pa, tr.leaf.level), (Pa(0x446f_fff8), Level(2)));
    // Permission fault reported at the block's level.
    let f = fault(&t, &ctx, Access::write(Ipa(0x8020_0000), 8, 2));
    assert_eq!(f.status(), FaultStatus::Permission(Level(2)));
    assert_eq!(f.esr, Esr(0x93c2_804e));
}

#[test]
fn concatenated_roots_40_bit_two_pages() {
    let mut t = Tables::new();
    let ctx = t.ctx(40);
    assert_eq!((ctx.geo.start_level, ctx.geo.root_pages), (Level(1), 2));
    // IPA 0x80_4000_0000: root index 0x201 -> second root page, entry 1.
    let ipa = 0x80_4000_0000u64;
    t.set(
        Pa(ctx.root.0 + 4096),
        1,
        S2Pte::leaf(Pa(0x4000_0000), Level(1), S2Prot::RW, NOFWB),
    );
    let tr = translate(&t.mem, &ctx, &Access::read(Ipa(ipa + 0x10), 8, 1)).unwrap();
    assert_eq!(tr.pa, Pa(0x4000_0010));
    // The same index in the first page is a different IPA: unmapped.
    assert_eq!(
        fault(&t, &ctx, Access::read(Ipa(0x4000_0000), 8, 1)).status(),
        FaultStatus::Translation(Level(1))
    );
}

#[test]
fn concatenated_roots_32_bit_four_pages() {
    let mut t = Tables::new();
    let ctx = t.ctx(32);
    assert_eq!((ctx.geo.start_level, ctx.geo.root_pages), (Level(2), 4));
    // IPA 0xc020_0000: root index 0x601 -> fourth root page, entry 1.
    let l3 = t.pages(1);
    t.set(Pa(ctx.root.0 + 3 * 4096), 1, S2Pte::table(l3));
    t.set(l3, 5, page(0x4123_4000, S2Prot::RW));
    let tr = translate(&t.mem, &ctx, &Access::write(Ipa(0xc020_5ff8), 8, 2)).unwrap();
    assert_eq!(tr.pa, Pa(0x4123_4ff8));
    // Level-2 block in the second root page.
    t.set(
        Pa(ctx.root.0 + 4096),
        0,
        S2Pte::leaf(Pa(0x4080_0000), Level(2), S2Prot::RW, NOFWB),
    );
    let tr = translate(&t.mem, &ctx, &Access::read(Ipa(0x4000_0008), 8, 1)).unwrap();
    assert_eq!((tr.pa, tr.leaf.level), (Pa(0x4080_0008), Level(2)));
    let f = fault(&t, &ctx, Access::read(Ipa(1 << 32), 8, 1));
    assert_eq!(f.status(), FaultStatus::Translation(Level(0)));
}

#[test]
fn output_address_beyond_pa_size_is_an_address_size_fault() {
    let (t, ctx, l2, l3) = with_page(0x1234_5000, 0x4567_8000, S2Prot::RW);
    // Leaf output above 2^40.
    t.set(l3, idx(0x1234_5000, 3), page(1 << 41, S2Prot::RW));
    assert_eq!(
        fault(&t, &ctx, Access::read(Ipa(0x1234_5000), 8, 1)).esr,
        Esr(0x93c1_8003)
    );
    // Table address above 2^40, at level 2.
    t.set(l2, idx(0x1234_5000, 2), S2Pte::table(Pa(1 << 42)));
    assert_eq!(
        fault(&t, &ctx, Access::read(Ipa(0x1234_5000), 8, 1)).status(),
        FaultStatus::AddressSize(Level(2))
    );
}

#[test]
fn table_outside_ram_is_an_external_abort_on_the_walk() {
    let (t, ctx, l2, _) = with_page(0x1234_5000, 0x4567_8000, S2Prot::RW);
    t.set(l2, idx(0x1234_5000, 2), S2Pte::table(Pa(0x1000)));
    let f = fault(&t, &ctx, Access::read(Ipa(0x1234_5000), 8, 1));
    // FSC 0b010111: synchronous external abort on the walk, level 3.
    assert_eq!(f.esr.0 & 0x3f, 0x17);
}
