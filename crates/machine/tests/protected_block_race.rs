//! A protected-mode block (2 MiB, mapped page by page through the real
//! hypervisor) whose sharing stops part-way because the hypervisor's
//! memcache ran dry, while a second vCPU faults on the same block during
//! the first one's top-up (the MMU lock dropped). Deterministic: the
//! second vCPU runs from inside the first one's top-up allocation.
//!
//! Before the fix the pages already shared were not recorded while the
//! lock was dropped: the second vCPU shared the block again from its
//! first page, the hypervisor answered EXISTS (DENIED for a protected VM)
//! and the VM stopped (`pkvm sim demand-paging ... -s hugetlb_2m --mode
//! protected`, a few runs in a hundred).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pkvm_arch::pte::S2Features;
use pkvm_arch::{Ipa, Pa};
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::psci::{PsciVm, ResetState};
use pkvm_host::{HostPlatform, VcpuExit, VmConfig};
use pkvm_hyp::hvc::{id, ret};
use pkvm_machine::platform::UpdatingEnv;
use pkvm_machine::{Mode, SimBackend, SimPlatform, SimProcess};
use pkvm_sim::cpu::{Op, Script};
use pkvm_sim::mm::{ProcessMm, VmaKind};
use pkvm_sim::{Machine, SimConfig};

const MB: u64 = 1 << 20;
const RAM: Ipa = Ipa(0x4000_0000);

type Hook = Box<dyn FnOnce() + Send>;

/// The simulated platform, with the hypervisor's memcache "running dry"
/// after `budget` shares/donations, and a hook run at the host's next
/// allocation after that (its memcache top-up, outside the MMU lock).
struct Dry {
    inner: Arc<SimPlatform>,
    budget: Mutex<Option<u64>>,
    dry: AtomicBool,
    on_topup: Mutex<Option<Hook>>,
}

impl HostPlatform for Dry {
    type S2Env<'a> = UpdatingEnv;
    fn s2_env(&self, vmid: u16) -> UpdatingEnv {
        self.inner.s2_env(vmid)
    }
    fn s2_features(&self) -> S2Features {
        self.inner.s2_features()
    }
    fn alloc_pages(&self, order: u32) -> Option<Pa> {
        if self.dry.swap(false, Ordering::AcqRel) {
            let hook = self.on_topup.lock().unwrap().take();
            if let Some(f) = hook {
                f();
            }
        }
        self.inner.alloc_pages(order)
    }
    fn free_pages(&self, pa: Pa, order: u32) {
        self.inner.free_pages(pa, order)
    }
    fn protected_mode(&self) -> bool {
        true
    }
    fn hvc(&self, cpu: usize, regs: &mut [u64; 8]) {
        let f = regs[0] as u32;
        if f == id::HOST_SHARE_GUEST || f == id::HOST_DONATE_GUEST {
            let mut b = self.budget.lock().unwrap();
            match *b {
                Some(0) => {
                    *b = None;
                    self.dry.store(true, Ordering::Release);
                    regs[0] = ret::NO_MEMORY as u64;
                    return;
                }
                Some(n) => *b = Some(n - 1),
                None => {}
            }
        }
        self.inner.hvc(cpu, regs)
    }
    fn kick_vcpu(&self, vmid: u16, index: usize) {
        self.inner.kick_vcpu(vmid, index)
    }
}

type DryVm = pkvm_host::Vm<Dry, SimProcess>;

fn backend(machine: &Arc<Machine>, sim: &Arc<SimPlatform>, cpu: usize, ipa: Ipa) -> SimBackend {
    let mut be = SimBackend::new(machine.cpu(cpu).expect("cpu"), sim.clone(), 1 << 16);
    be.cpu_mut()
        .set_program(Box::new(Script::new([Op::write(ipa, 8), Op::read(ipa, 8)])));
    be
}

/// vCPU 0 writes page 200 of a 2 MiB hugetlb block; the memcache runs dry
/// after 100 pages; during the top-up vCPU 1 writes page `second`.
fn race(protected_vm: bool, second: u64) {
    let machine = Machine::new(SimConfig {
        mem_size: 1 << 30,
        hyp_carveout: 64 << 20,
        ncpus: 2,
        ..SimConfig::default()
    })
    .expect("machine");
    let sim = SimPlatform::new(machine.clone(), Mode::Protected).expect("platform");
    let platform = Arc::new(Dry {
        inner: sim.clone(),
        budget: Mutex::new(None),
        dry: AtomicBool::new(false),
        on_topup: Mutex::new(None),
    });
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let frames_before = machine.host_frames().stats().in_use;
    SimPlatform::set_current_cpu(0);
    let cfg = VmConfig {
        protected: protected_vm,
        nr_vcpus: 2,
        ..VmConfig::default()
    };
    let vm = DryVm::create(
        platform.clone(),
        Arc::new(SimProcess::new(mm.clone())),
        cfg,
        0,
    )
    .expect("vm");
    let hva = mm.mmap(4 * MB, VmaKind::Hugetlb2M).expect("mmap");
    let region = UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM.0,
        memory_size: 4 * MB,
        userspace_addr: hva.0,
    };
    vm.set_user_memory_region(region, 0).expect("slot");
    for i in 0..2 {
        vm.vcpu_power(i).lock().power_on(ResetState {
            pc: 0x8_0000,
            context_id: 0,
            big_endian: false,
            reset: true,
        });
    }
    let exit1 = Arc::new(Mutex::new(None));
    {
        let (vm, machine, sim, exit1) = (vm.clone(), machine.clone(), sim.clone(), exit1.clone());
        *platform.on_topup.lock().unwrap() = Some(Box::new(move || {
            SimPlatform::set_current_cpu(1);
            let mut vcpu = vm.vcpu(1).expect("vcpu 1");
            let mut be = backend(&machine, &sim, 1, RAM + second * 4096);
            let e = loop {
                match vcpu.run(&mut be) {
                    VcpuExit::Interrupted => {}
                    e => break e,
                }
            };
            *exit1.lock().unwrap() = Some(e);
            SimPlatform::set_current_cpu(0);
        }));
    }
    *platform.budget.lock().unwrap() = Some(100);
    let mut vcpu = vm.vcpu(0).expect("vcpu 0");
    let mut be = backend(&machine, &sim, 0, RAM + 200 * 4096);
    let exit0 = loop {
        match vcpu.run(&mut be) {
            VcpuExit::Interrupted => {}
            e => break e,
        }
    };
    let what = format!("protected_vm {protected_vm}, second vCPU on page {second}");
    assert_eq!(
        *exit1.lock().unwrap(),
        Some(VcpuExit::Halted),
        "{what}: vCPU 1"
    );
    assert_eq!(exit0, VcpuExit::Halted, "{what}: vCPU 0");
    assert_eq!(vm.hyp_mapped_pages(), 512, "{what}: the block, once");
    drop((vcpu, be));
    vm.teardown(0);
    drop(vm);
    mm.exit();
    let s = mm.stats();
    assert_eq!(s.frames_allocated, s.frames_freed, "{what}: {s:?}");
    assert!(machine.check().is_empty(), "{what}: coherence violations");
    assert_eq!(
        machine.host_frames().stats().in_use,
        frames_before,
        "{what}: leak"
    );
}

#[test]
fn memcache_dry_mid_block_with_a_second_vcpu_on_the_block_completes() {
    for protected_vm in [false, true] {
        for second in [150, 511] {
            race(protected_vm, second);
        }
    }
}
