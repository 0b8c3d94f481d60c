//! Fault injection on the guest fault pipeline: a wrapper platform whose
//! page allocations and hypercalls can be made to fail, and a wrapper
//! process memory whose pins can be made to fail, around the simulated
//! machine's. After each injected failure: no page reference is leaked (the
//! process's frames are all freed at exit and the pin count is balanced),
//! no lock is held by the vCPU thread, and the VM still works (the next
//! fault maps).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pkvm_arch::pte::S2Features;
use pkvm_arch::{Hva, Ipa, Pa};
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::pipeline::MemFaultError;
use pkvm_host::psci::{PsciVm, ResetState};
use pkvm_host::{
    HostPlatform, PinError, ProcessMemory, RunError, Vcpu, VcpuExit, VmConfig, VmaInfo,
};
use pkvm_hyp::hvc::{id, ret};
use pkvm_machine::platform::UpdatingEnv;
use pkvm_machine::process::SimPin;
use pkvm_machine::{Mode, SimBackend, SimPlatform, SimProcess};
use pkvm_sim::cpu::{Op, Script};
use pkvm_sim::mm::{ProcessMm, VmaKind};
use pkvm_sim::{Machine, SimConfig};

const MB: u64 = 1 << 20;
const RAM: Ipa = Ipa(0x4000_0000);

/// A hypercall failure rule: let `skip` calls of `func` through, then fail
/// `count` of them with `status`.
#[derive(Clone, Copy, Debug)]
struct HvcRule {
    func: u32,
    skip: u64,
    count: u64,
    status: i64,
}

/// The simulated platform with injectable allocation and hypercall failures.
struct Faulty {
    inner: Arc<SimPlatform>,
    /// Allocations let through before `fail_allocs` apply.
    skip_allocs: AtomicU64,
    fail_allocs: AtomicU64,
    hvc_rule: Mutex<Option<HvcRule>>,
}

impl HostPlatform for Faulty {
    type S2Env<'a> = UpdatingEnv;
    fn s2_env(&self, vmid: u16) -> UpdatingEnv {
        self.inner.s2_env(vmid)
    }
    fn s2_features(&self) -> S2Features {
        self.inner.s2_features()
    }
    fn alloc_pages(&self, order: u32) -> Option<Pa> {
        let dec = |a: &AtomicU64| {
            a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        };
        let fail = !dec(&self.skip_allocs) && dec(&self.fail_allocs);
        if fail {
            None
        } else {
            self.inner.alloc_pages(order)
        }
    }
    fn free_pages(&self, pa: Pa, order: u32) {
        self.inner.free_pages(pa, order)
    }
    fn protected_mode(&self) -> bool {
        self.inner.protected_mode()
    }
    fn hvc(&self, cpu: usize, regs: &mut [u64; 8]) {
        {
            let mut rule = self.hvc_rule.lock().unwrap();
            if let Some(r) = rule.as_mut().filter(|r| r.func as u64 == regs[0]) {
                if r.skip > 0 {
                    r.skip -= 1;
                } else if r.count > 0 {
                    r.count -= 1;
                    regs[0] = r.status as u64;
                    return;
                }
            }
        }
        self.inner.hvc(cpu, regs)
    }
    fn kick_vcpu(&self, vmid: u16, index: usize) {
        self.inner.kick_vcpu(vmid, index)
    }
}

/// The simulated process memory with injectable pin failures.
struct FaultyMm {
    inner: SimProcess,
    fail_pins: Mutex<VecDeque<PinError>>,
    pins: AtomicU64,
}

/// More pins than any test needs: a fault that loops forever fails here.
const PIN_LIMIT: u64 = 10_000;

impl ProcessMemory for FaultyMm {
    type Pin = SimPin;
    fn with_vma<R>(&self, hva: Hva, f: impl FnOnce(Option<&dyn VmaInfo>) -> R) -> R {
        self.inner.with_vma(hva, f)
    }
    fn pin(&self, hva: Hva, write: bool) -> Result<SimPin, PinError> {
        if let Some(e) = self.fail_pins.lock().unwrap().pop_front() {
            return Err(e);
        }
        let n = self.pins.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < PIN_LIMIT,
            "{n} pins: the fault path is not making progress"
        );
        self.inner.pin(hva, write)
    }
}

type FVm = pkvm_host::Vm<Faulty, FaultyMm>;

struct Rig {
    machine: Arc<Machine>,
    platform: Arc<Faulty>,
    mm: Arc<ProcessMm>,
    fmm: Arc<FaultyMm>,
    vm: Arc<FVm>,
    vcpu: Vcpu<Faulty, FaultyMm>,
    be: SimBackend,
    frames_before: u64,
}

fn rig(mode: Mode, protected_vm: bool, kind: VmaKind) -> Rig {
    let machine = Machine::new(SimConfig {
        mem_size: 1 << 30,
        hyp_carveout: 64 << 20,
        ncpus: 1,
        ..SimConfig::default()
    })
    .expect("machine");
    let sim = SimPlatform::new(machine.clone(), mode).expect("platform");
    let platform = Arc::new(Faulty {
        inner: sim.clone(),
        skip_allocs: AtomicU64::new(0),
        fail_allocs: AtomicU64::new(0),
        hvc_rule: Mutex::new(None),
    });
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let fmm = Arc::new(FaultyMm {
        inner: SimProcess::new(mm.clone()),
        fail_pins: Mutex::new(VecDeque::new()),
        pins: AtomicU64::new(0),
    });
    let frames_before = machine.host_frames().stats().in_use;
    SimPlatform::set_current_cpu(0);
    let vm = FVm::create(
        platform.clone(),
        fmm.clone(),
        VmConfig {
            ipa_bits: 40,
            protected: protected_vm,
            nr_vcpus: 1,
            ..VmConfig::default()
        },
        0,
    )
    .expect("vm");
    let hva = mm.mmap(4 * MB, kind).expect("mmap");
    vm.set_user_memory_region(
        UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: RAM.0,
            memory_size: 4 * MB,
            userspace_addr: hva.0,
        },
        0,
    )
    .expect("slot");
    vm.vcpu_power(0).lock().power_on(ResetState {
        pc: 0x8_0000,
        context_id: 0,
        big_endian: false,
        reset: true,
    });
    let be = SimBackend::new(machine.cpu(0).expect("cpu"), sim, 1 << 16);
    let vcpu = vm.vcpu(0).expect("vcpu");
    Rig {
        machine,
        platform,
        mm,
        fmm,
        vm,
        vcpu,
        be,
        frames_before,
    }
}

impl Rig {
    fn program(&mut self, ops: impl IntoIterator<Item = Op>) {
        self.be.cpu_mut().set_program(Box::new(Script::new(ops)));
    }

    /// Runs until an exit other than a preemption; checks no lock is held
    /// once `run` returned.
    fn run(&mut self) -> VcpuExit {
        loop {
            let e = self.vcpu.run(&mut self.be);
            assert_eq!(
                pkvm_sync::held_classes(),
                0,
                "a lock is held after run returned {e:?}"
            );
            if e != VcpuExit::Interrupted {
                return e;
            }
        }
    }

    /// Pins currently held on the process's frames: every frame the
    /// process allocated and has not freed, minus what is still resident
    /// unpinned, is visible through exit: after teardown and exit, every
    /// frame must be freed.
    fn finish(self) {
        let Rig {
            machine,
            platform,
            mm,
            fmm,
            vm,
            vcpu,
            be,
            frames_before,
        } = self;
        drop(vcpu);
        drop(be);
        vm.teardown(0);
        drop(vm);
        drop(fmm);
        mm.exit();
        let s = mm.stats();
        assert_eq!(
            s.frames_allocated, s.frames_freed,
            "process frames still referenced: {s:?}"
        );
        drop(mm);
        assert!(machine.check().is_empty(), "coherence violations");
        assert_eq!(
            machine.host_frames().stats().in_use,
            frames_before,
            "host frames leaked"
        );
        if let Some(h) = platform.inner.hyp() {
            let st = h.stats();
            assert_eq!((st.vm_pages, st.live_vms), (0, 0), "{st:?}");
        }
    }
}

const FLAVORS: [(Mode, bool); 3] = [
    (Mode::Standard, false),
    (Mode::Protected, false),
    (Mode::Protected, true),
];

#[test]
fn failed_page_cache_topup_leaks_nothing_and_the_next_fault_maps() {
    // Standard mode tops up the vCPU's table cache before anything else;
    // fail every allocation so the cache stays short.
    let mut r = rig(Mode::Standard, false, VmaKind::Anonymous4K);
    r.platform.fail_allocs.store(u64::MAX, Ordering::Relaxed);
    r.program([Op::write(RAM, 8), Op::read(RAM, 8)]);
    assert_eq!(
        r.run(),
        VcpuExit::InternalError(RunError::Memory(MemFaultError::NoMemory))
    );
    assert_eq!(
        r.fmm.pins.load(Ordering::Relaxed),
        0,
        "nothing pinned before the top-up"
    );
    r.platform.fail_allocs.store(0, Ordering::Relaxed);
    // The access is still pending: running again maps it.
    assert_eq!(r.run(), VcpuExit::Halted, "{:?}", r.be.guest_error);
    assert_eq!(r.vm.stats().snapshot().maps_by_size[0], 1);
    r.finish();
}

#[test]
fn failed_hyp_init_allocation_is_an_error_and_leaks_nothing() {
    // Protected mode: the first run donates the hyp VM's memory (VM state,
    // stage-2 root, then each vCPU); fail the `nth` allocation.
    for protected_vm in [false, true] {
        for nth in 0..4 {
            let mut r = rig(Mode::Protected, protected_vm, VmaKind::Anonymous4K);
            r.program([Op::write(RAM, 8)]);
            r.platform.skip_allocs.store(nth, Ordering::Relaxed);
            r.platform.fail_allocs.store(1, Ordering::Relaxed);
            let e = r.run();
            if e != VcpuExit::Halted {
                assert!(matches!(e, VcpuExit::InternalError(_)), "{e:?}");
                assert_eq!(
                    r.run(),
                    VcpuExit::Halted,
                    "protected_vm {protected_vm} nth {nth}: second run"
                );
            }
            r.finish();
        }
    }
}

#[test]
fn failed_pins_release_everything_and_the_next_fault_maps() {
    for (mode, pvm) in FLAVORS {
        for err in [
            PinError::NoMemory,
            PinError::BadAddress(Hva(0xdead_0000)),
            PinError::Again,
        ] {
            let mut r = rig(mode, pvm, VmaKind::Anonymous4K);
            r.program([Op::write(RAM + 0x5000, 8), Op::read(RAM + 0x5000, 8)]);
            r.fmm.fail_pins.lock().unwrap().push_back(err);
            let e = r.run();
            match err {
                // Transient: the guest retried by itself and completed.
                PinError::Again => {
                    assert_eq!(e, VcpuExit::Halted, "{mode:?}/{pvm}");
                    assert_eq!(r.vm.stats().snapshot().retries, 1);
                }
                PinError::NoMemory => {
                    assert_eq!(
                        e,
                        VcpuExit::InternalError(RunError::Memory(MemFaultError::NoMemory))
                    )
                }
                PinError::BadAddress(a) => assert_eq!(
                    e,
                    VcpuExit::InternalError(RunError::Memory(MemFaultError::BadHostAddress(a))),
                    "{mode:?}/{pvm}"
                ),
            }
            assert_eq!(
                r.run(),
                VcpuExit::Halted,
                "{mode:?}/{pvm}/{err:?}: {:?}",
                r.be.guest_error
            );
            assert_eq!(
                r.vm.stats().snapshot().maps_by_size[0],
                1,
                "{mode:?}/{pvm}/{err:?}"
            );
            r.finish();
        }
    }
}

#[test]
fn hyp_memcache_running_dry_is_topped_up_within_the_fault() {
    // The hypervisor's memcache "runs dry" twice: the host tops it up
    // outside the MMU lock and carries on within the same fault.
    for pvm in [false, true] {
        let mut r = rig(Mode::Protected, pvm, VmaKind::Anonymous4K);
        let func = if pvm {
            id::HOST_DONATE_GUEST
        } else {
            id::HOST_SHARE_GUEST
        };
        *r.platform.hvc_rule.lock().unwrap() = Some(HvcRule {
            func,
            skip: 0,
            count: 2,
            status: ret::NO_MEMORY,
        });
        r.program([Op::write(RAM, 8), Op::read(RAM, 8)]);
        assert_eq!(r.run(), VcpuExit::Halted, "{pvm}: {:?}", r.be.guest_error);
        assert_eq!(r.vm.hyp_mapped_pages(), 1);
        r.finish();
    }
}

#[test]
fn map_no_memory_with_failing_topup_leaks_nothing_and_the_next_fault_maps() {
    // The hypervisor keeps answering NO_MEMORY and the host cannot top its
    // memcache up: the fault fails; pins and the MMU lock are released.
    for pvm in [false, true] {
        let mut r = rig(Mode::Protected, pvm, VmaKind::Anonymous4K);
        r.program([Op::write(RAM, 8)]);
        // Initialise the hyp VM first (it allocates too).
        let func = if pvm {
            id::HOST_DONATE_GUEST
        } else {
            id::HOST_SHARE_GUEST
        };
        *r.platform.hvc_rule.lock().unwrap() = Some(HvcRule {
            func,
            skip: 0,
            count: u64::MAX,
            status: ret::NO_MEMORY,
        });
        let e = r.run();
        assert!(
            matches!(
                e,
                VcpuExit::InternalError(RunError::Memory(MemFaultError::NoMemory))
            ),
            "{pvm}: {e:?}"
        );
        assert_eq!(r.vm.hyp_mapped_pages(), 0);
        *r.platform.hvc_rule.lock().unwrap() = None;
        assert_eq!(r.run(), VcpuExit::Halted, "{pvm}: {:?}", r.be.guest_error);
        assert_eq!(r.vm.hyp_mapped_pages(), 1);
        r.finish();
    }
}

#[test]
fn a_block_mapping_failing_part_way_leaves_the_vm_usable() {
    // A 2M THP block is shared/donated page by page; the hypervisor fails
    // at page 3 for good and the host cannot top up. A shared VM's first
    // pages are unshared again; a protected VM's stay donated (the host
    // cannot take them back) and are recorded for teardown. Either way the
    // guest must be able to use the rest of the block afterwards.
    for pvm in [false, true] {
        let mut r = rig(Mode::Protected, pvm, VmaKind::AnonymousThp);
        let func = if pvm {
            id::HOST_DONATE_GUEST
        } else {
            id::HOST_SHARE_GUEST
        };
        *r.platform.hvc_rule.lock().unwrap() = Some(HvcRule {
            func,
            skip: 3,
            count: u64::MAX,
            status: ret::NO_MEMORY,
        });
        r.program([
            Op::write(RAM + 100 * 4096, 8),
            Op::read(RAM + 100 * 4096, 8),
            Op::write(RAM + 4096, 8),
        ]);
        let e = r.run();
        assert!(
            matches!(e, VcpuExit::InternalError(RunError::Memory(_))),
            "{pvm}: {e:?}"
        );
        // (The hypervisor's own first NO_MEMORY, before any top-up, also
        // counts against `skip`: fewer than 3 pages may have gone.)
        let partial = r.vm.hyp_mapped_pages();
        if pvm {
            assert!(partial > 0 && partial < 512, "{partial}");
        } else {
            assert_eq!(partial, 0, "shares undone");
        }
        *r.platform.hvc_rule.lock().unwrap() = None;
        assert_eq!(r.run(), VcpuExit::Halted, "{pvm}: {:?}", r.be.guest_error);
        r.finish();
    }
}

#[test]
fn concurrent_mapping_again_is_a_retry_not_an_error() {
    // Standard mode: two vCPU threads fault the same pages at once; the
    // loser's shared walk finds the entry taken (Again) and returns to the
    // guest. Nothing leaks, both complete.
    let machine = Machine::new(SimConfig {
        mem_size: 1 << 30,
        hyp_carveout: 64 << 20,
        ncpus: 2,
        ..SimConfig::default()
    })
    .expect("machine");
    let sim = SimPlatform::new(machine.clone(), Mode::Standard).expect("platform");
    let platform = Arc::new(Faulty {
        inner: sim.clone(),
        skip_allocs: AtomicU64::new(0),
        fail_allocs: AtomicU64::new(0),
        hvc_rule: Mutex::new(None),
    });
    let mm = Arc::new(ProcessMm::new(machine.clone()));
    let fmm = Arc::new(FaultyMm {
        inner: SimProcess::new(mm.clone()),
        fail_pins: Mutex::new(VecDeque::new()),
        pins: AtomicU64::new(0),
    });
    let frames_before = machine.host_frames().stats().in_use;
    let vm = FVm::create(
        platform,
        fmm,
        VmConfig {
            nr_vcpus: 2,
            ..VmConfig::default()
        },
        0,
    )
    .expect("vm");
    let hva = mm.mmap(4 * MB, VmaKind::Anonymous4K).unwrap();
    vm.set_user_memory_region(
        UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: RAM.0,
            memory_size: 4 * MB,
            userspace_addr: hva.0,
        },
        0,
    )
    .unwrap();
    for i in 0..2 {
        vm.vcpu_power(i).lock().power_on(ResetState {
            pc: 0,
            context_id: 0,
            big_endian: false,
            reset: true,
        });
    }
    std::thread::scope(|s| {
        for i in 0..2 {
            let (vm, machine, sim) = (&vm, &machine, &sim);
            s.spawn(move || {
                let mut vcpu = vm.vcpu(i).unwrap();
                let mut be = SimBackend::new(machine.cpu(i).unwrap(), sim.clone(), 1 << 16);
                // Reads only (no verification across CPUs needed).
                let ops: Vec<Op> = (0..1024u64)
                    .map(|p| Op::Access {
                        ipa: RAM + p * 4096,
                        kind: pkvm_sim::AccessKind::Read,
                        size: 8,
                        verify: false,
                        plain: true,
                    })
                    .collect();
                be.cpu_mut().set_program(Box::new(Script::new(ops)));
                loop {
                    match vcpu.run(&mut be) {
                        VcpuExit::Halted => break,
                        VcpuExit::Interrupted => {}
                        e => panic!("vCPU {i}: {e:?}"),
                    }
                }
                assert_eq!(pkvm_sync::held_classes(), 0);
            });
        }
    });
    let st = vm.stats().snapshot();
    assert_eq!(st.maps_by_size[0], 1024, "{st:?}");
    assert_eq!(st.translation_faults, 1024 + st.retries, "{st:?}");
    vm.teardown(0);
    drop(vm);
    mm.exit();
    let s = mm.stats();
    assert_eq!(s.frames_allocated, s.frames_freed, "{s:?}");
    assert!(machine.check().is_empty());
    assert_eq!(machine.host_frames().stats().in_use, frames_before);
}
