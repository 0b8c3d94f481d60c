//! Helpers shared by the integration tests: a small machine and a VM whose
//! stage-2 tables are written by hand.
#![allow(dead_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pkvm_arch::pte::{S2Features, S2Prot, S2Pte};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Granule, Ipa, Level, Pa};
use pkvm_pgtable::PtMemory;
use pkvm_sim::cpu::Script;
use pkvm_sim::{Coherence, Machine, Op, SimConfig, SimCpu, SimExit, VmContext};

pub const BASE_IPA: u64 = 0x10_0000;

pub fn machine(coherence: Coherence) -> Arc<Machine> {
    Machine::new(SimConfig {
        mem_size: 64 << 20,
        hyp_carveout: 4 << 20,
        ncpus: 2,
        coherence,
        ..SimConfig::default()
    })
    .unwrap()
}

pub struct Vm {
    pub ctx: VmContext,
    pub l2: Pa,
    pub l3: Pa,
    pub data: Vec<Pa>,
}

pub fn leaf(pa: Pa, level: u8, prot: S2Prot) -> S2Pte {
    S2Pte::leaf(pa, Level(level), prot, S2Features::default())
}

pub fn set(m: &Machine, table: Pa, idx: usize, pte: S2Pte) {
    m.mem().table(table)[idx].store(pte.0, Ordering::Release);
}

pub fn get(m: &Machine, table: Pa, idx: usize) -> S2Pte {
    S2Pte(m.mem().table(table)[idx].load(Ordering::Acquire))
}

/// Index of the L3 entry for page `i` of the VM's data.
pub fn l3_idx(i: usize) -> usize {
    (BASE_IPA >> 12) as usize % 512 + i
}

/// A 39-bit VM with `pages` 4K pages at BASE_IPA mapped RW to fresh frames.
pub fn vm(m: &Machine, vmid: u16, pages: usize) -> Vm {
    let f = m.host_frames();
    let z = |o| f.alloc_zeroed(m.mem(), o).unwrap();
    let geo = S2Geometry::new(Granule::Size4K, 39).unwrap();
    let (root, l2, l3) = (z(0), z(0), z(0));
    set(m, root, 0, S2Pte::table(l2));
    set(m, l2, 0, S2Pte::table(l3));
    let data: Vec<Pa> = (0..pages).map(|_| z(0)).collect();
    for (i, pa) in data.iter().enumerate() {
        set(m, l3, l3_idx(i), leaf(*pa, 3, S2Prot::RW));
    }
    Vm {
        ctx: m.vm_context(vmid, root, geo),
        l2,
        l3,
        data,
    }
}

pub fn ipa(page: u64) -> Ipa {
    Ipa(BASE_IPA + page * 4096)
}

/// Runs `ops` to completion, returning every exit except the final
/// `ProgramDone`; aborts are left pending, so callers only pass programs
/// that do not fault, or handle the exits themselves.
pub fn run(cpu: &mut SimCpu, ops: impl IntoIterator<Item = Op>) -> Vec<SimExit> {
    cpu.set_program(Box::new(Script::new(ops)));
    let mut exits = Vec::new();
    loop {
        match cpu.run() {
            SimExit::ProgramDone => return exits,
            e @ SimExit::Abort { .. } => {
                exits.push(e);
                return exits;
            }
            e => exits.push(e),
        }
    }
}
