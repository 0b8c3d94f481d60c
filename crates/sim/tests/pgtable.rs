//! pkvm-pgtable's stage-2 tables, built in simulated RAM through `SimEnv`,
//! walked by the simulated MMU.

mod common;

use common::machine;
use pkvm_arch::esr::FaultStatus;
use pkvm_arch::pte::{S2Features, S2Prot};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level};
use pkvm_pgtable::{MapFlags, PageTable, Stage2};
use pkvm_sim::{Coherence, Op, Pattern, Phase, SimExit, Workload};

#[test]
fn guest_runs_on_tables_built_by_pgtable_and_changes_stay_coherent() {
    let m = machine(Coherence::EveryUse);
    let geo = S2Geometry::new(Granule::Size4K, 40).unwrap();
    let root = m.host_frames().alloc_zeroed(m.mem(), 1).unwrap(); // 2 concatenated pages
    let mut pt = PageTable::<Stage2>::new(root, geo, S2Features::default());
    let env = m.env(5).on_cpu(0);
    let mut cache = m.page_cache();
    let mem2m = m.host_frames().alloc_zeroed(m.mem(), 9).unwrap();
    let pages = m.host_frames().alloc_zeroed(m.mem(), 4).unwrap();
    cache.topup(8).unwrap();
    {
        let _u = m.update(5);
        // A 2M block and 16 pages in the upper half of the 40-bit space
        // (second root page).
        pt.map(
            &env,
            Ipa(0x80_0020_0000),
            2 << 20,
            mem2m,
            S2Prot::RW,
            MapFlags::NONE,
            &mut cache,
        )
        .unwrap();
        pt.map(
            &env,
            Ipa(0x80_1000_0000),
            16 * 4096,
            pages,
            S2Prot::RW,
            MapFlags::NONE,
            &mut cache,
        )
        .unwrap();
    }
    let mut cpu = m.cpu(0).unwrap();
    cpu.load(m.vm_context(5, root, geo));
    cpu.set_program(Box::new(Workload::new(
        9,
        [
            Phase::fill(Ipa(0x80_0020_0000), 64 * 1024),
            Phase::touch_pages(Ipa(0x80_1000_0000), 16 * 4096),
            Phase::new(Ipa(0x80_0020_0000), 64 * 1024, Pattern::Random)
                .accesses(5000)
                .writes(200),
        ],
    )));
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert!(cpu.stats().verified_reads > 1000);
    assert_eq!(
        cpu.stats().tlb_misses,
        1 + 16,
        "one walk for the block, one per page"
    );

    // Unmap a page with pgtable (break-before-make + TLBI inside).
    {
        let _u = m.update(5);
        pt.unmap(&env, Ipa(0x80_1000_3000), 4096, &mut cache)
            .unwrap();
    }
    cpu.set_program(Box::new(pkvm_sim::Script::new([Op::read(
        Ipa(0x80_1000_3000),
        8,
    )])));
    let f = cpu.run().fault().expect("unmapped page faults");
    assert_eq!(f.status(), FaultStatus::Translation(Level(3)));
    assert_eq!(f.ipa(), Ipa(0x80_1000_3000));
    cpu.inject_abort();

    // Remap the block's first page elsewhere: pgtable splits the block
    // (break-before-make), the cached block entry must be gone.
    let other = m.host_frames().alloc_zeroed(m.mem(), 0).unwrap();
    cache.topup(4).unwrap();
    {
        let _u = m.update(5);
        pt.map(
            &env,
            Ipa(0x80_0020_0000),
            4096,
            other,
            S2Prot::RW,
            MapFlags::NONE,
            &mut cache,
        )
        .unwrap();
    }
    m.mem().write_u64(other, 0x5151).unwrap();
    cpu.forget_writes(Ipa(0x80_0020_0000), 4096);
    cpu.set_program(Box::new(pkvm_sim::Script::new([
        Op::read(Ipa(0x80_0020_0000), 8),
        Op::read(Ipa(0x80_0020_1000), 8),
    ])));
    assert_eq!(cpu.run(), SimExit::ProgramDone);
    assert_eq!(cpu.stats().exits_guest_error, 0);
    assert!(m.check().is_empty(), "{:?}", m.violations());

    // Write-protect the range and flush once, as dirty logging does.
    {
        let _u = m.update(5);
        pt.wrprotect(&env, Ipa(0x80_0020_0000), 2 << 20).unwrap();
        pkvm_pgtable::TlbOps::tlbi_all(&env);
    }
    cpu.set_program(Box::new(pkvm_sim::Script::new([Op::write(
        Ipa(0x80_0020_1000),
        8,
    )])));
    let f = cpu.run().fault().unwrap();
    assert_eq!(f.status().level().map(|l| l.0), Some(3));
    assert!(matches!(f.status(), FaultStatus::Permission(_)));
    assert!(m.check().is_empty(), "{:?}", m.violations());
    cpu.inject_abort();
    drop(cpu);

    let freed_root = {
        let _u = m.update(5);
        pt.destroy(&env, &mut cache)
    };
    assert_eq!(freed_root, root);
}
