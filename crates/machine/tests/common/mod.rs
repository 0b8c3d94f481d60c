//! A small harness for end-to-end tests on the simulated machine: one
//! machine, platform (standard or protected mode), host process and VM;
//! vCPU runners; and a closing check that everything the VM used came
//! back (host frames, hyp pages) with zero coherence violations.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use pkvm_arch::{Hva, Ipa};
use pkvm_host::memslot::UserMemoryRegion;
use pkvm_host::psci::{PsciVm, ResetState};
use pkvm_host::{VcpuExit, VmConfig};
use pkvm_machine::{Mode, SimBackend, SimPlatform, SimProcess, SimVcpu, SimVm, VmNotifier};
use pkvm_sim::cpu::{FnProgram, GuestProgram, Op};
use pkvm_sim::mm::{ProcessMm, VmaKind};
use pkvm_sim::{Machine, SimConfig};

/// The three ways a VM can run: standard mode, protected mode with a
/// non-protected VM (pages shared), protected mode with a protected VM
/// (pages donated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Standard,
    ProtectedShared,
    ProtectedDonated,
}

impl Flavor {
    pub const ALL: [Flavor; 3] = [
        Flavor::Standard,
        Flavor::ProtectedShared,
        Flavor::ProtectedDonated,
    ];

    pub fn mode(self) -> Mode {
        match self {
            Flavor::Standard => Mode::Standard,
            _ => Mode::Protected,
        }
    }

    pub fn protected_vm(self) -> bool {
        self == Flavor::ProtectedDonated
    }
}

/// Machine, platform, process and VM.
pub struct Env {
    pub flavor: Flavor,
    pub machine: Arc<Machine>,
    pub platform: Arc<SimPlatform>,
    pub mm: Arc<ProcessMm>,
    pub vm: Arc<SimVm>,
    pub frames_before: u64,
}

/// Guest RAM base used by the tests.
pub const RAM: Ipa = Ipa(0x4000_0000);
/// An IPA range with no memslot (MMIO).
pub const MMIO: Ipa = Ipa(0x0900_0000);

impl Env {
    /// A 1 GiB machine with `ncpus` CPUs and a VM with `ncpus` vCPUs, all
    /// powered on; no memslot yet.
    pub fn new(flavor: Flavor, ncpus: usize) -> Env {
        Env::with_ipa_bits(flavor, ncpus, 40)
    }

    pub fn with_ipa_bits(flavor: Flavor, ncpus: usize, ipa_bits: u32) -> Env {
        let machine = Machine::new(SimConfig {
            mem_size: 1 << 30,
            hyp_carveout: 64 << 20,
            ncpus,
            ..SimConfig::default()
        })
        .expect("machine");
        let platform = SimPlatform::new(machine.clone(), flavor.mode()).expect("platform");
        let mm = Arc::new(ProcessMm::new(machine.clone()));
        let frames_before = machine.host_frames().stats().in_use;
        SimPlatform::set_current_cpu(0);
        let vm = SimVm::create(
            platform.clone(),
            Arc::new(SimProcess::new(mm.clone())),
            VmConfig {
                ipa_bits,
                protected: flavor.protected_vm(),
                nr_vcpus: ncpus,
                ..VmConfig::default()
            },
            0,
        )
        .expect("vm");
        mm.register_notifier(VmNotifier::new(&vm));
        for i in 0..ncpus {
            vm.vcpu_power(i).lock().power_on(ResetState {
                pc: 0x8_0000,
                context_id: 0,
                big_endian: false,
                reset: true,
            });
        }
        Env {
            flavor,
            machine,
            platform,
            mm,
            vm,
            frames_before,
        }
    }

    /// Maps `size` bytes of `kind` in the process and makes it memslot
    /// `slot` at `ipa` with `flags`; returns the host address.
    pub fn add_slot(&self, slot: u32, ipa: Ipa, size: u64, kind: VmaKind, flags: u32) -> Hva {
        let hva = self.mm.mmap(size, kind).expect("mmap");
        self.set_slot(slot, ipa, size, hva, flags);
        hva
    }

    /// `KVM_SET_USER_MEMORY_REGION` (hypercalls, if any, from the
    /// notifier CPU: no vCPU is loaded there, so any thread may do it).
    pub fn set_slot(&self, slot: u32, ipa: Ipa, size: u64, hva: Hva, flags: u32) {
        self.vm
            .set_user_memory_region(
                UserMemoryRegion {
                    slot,
                    flags,
                    guest_phys_addr: ipa.0,
                    memory_size: size,
                    userspace_addr: hva.0,
                },
                pkvm_machine::platform::NOTIFIER_CPU,
            )
            .expect("set_user_memory_region");
    }

    /// Claims vCPU `i` with `program` on simulated CPU `i`.
    pub fn runner(&self, i: usize, program: Box<dyn GuestProgram>) -> Runner {
        SimPlatform::set_current_cpu(i);
        let cpu = self.machine.cpu(i).expect("cpu");
        let mut be = SimBackend::new(cpu, self.platform.clone(), 1 << 16);
        be.cpu_mut().set_program(program);
        Runner {
            vcpu: self.vm.vcpu(i).expect("vcpu"),
            be,
        }
    }

    /// Whether anything at `ipa` is mapped in stage-2. Standard mode: the
    /// host's tables. Protected mode: the hypervisor owns the tables, so
    /// this is the host's record of shared/donated pages (tests using it map
    /// one range at a time).
    pub fn mapped(&self, ipa: Ipa) -> bool {
        match self.flavor {
            Flavor::Standard => self.vm.s2_translate(ipa).is_some(),
            _ => self.vm.hyp_mapped_pages() > 0,
        }
    }

    /// Tears everything down and checks: zero coherence violations, every
    /// host frame back (process pages, stage-2 tables and root, pages
    /// donated to the hypervisor), and the hypervisor holds no VM page.
    pub fn finish(self) {
        let Env {
            flavor,
            machine,
            platform,
            mm,
            vm,
            frames_before,
        } = self;
        vm.teardown(0);
        assert_eq!(
            Arc::strong_count(&vm),
            1,
            "{flavor:?}: someone still holds the VM"
        );
        drop(vm);
        mm.exit();
        let ms = mm.stats();
        drop(mm);
        let v = machine.check();
        assert!(v.is_empty(), "{flavor:?}: coherence violations: {v:?}");
        let after = machine.host_frames().stats().in_use;
        assert_eq!(
            after, frames_before,
            "{flavor:?}: host frames leaked (process memory: {ms:?})"
        );
        if let Some(h) = platform.hyp() {
            let s = h.stats();
            assert_eq!(s.vm_pages, 0, "{flavor:?}: hyp still holds VM pages: {s:?}");
            assert_eq!(s.live_vms, 0, "{flavor:?}: hyp VM still live: {s:?}");
        }
    }
}

/// A claimed vCPU and its simulated CPU.
pub struct Runner {
    pub vcpu: SimVcpu,
    pub be: SimBackend,
}

impl Runner {
    /// Runs until an exit other than a preemption.
    pub fn run(&mut self) -> VcpuExit {
        loop {
            match self.vcpu.run(&mut self.be) {
                VcpuExit::Interrupted => continue,
                e => return e,
            }
        }
    }

    /// Runs to the end of the program, answering MMIO reads with 0; panics
    /// on anything else.
    pub fn run_to_end(&mut self) {
        loop {
            match self.run() {
                VcpuExit::Halted => return,
                VcpuExit::Mmio { write: false, .. } => self.vcpu.complete_mmio(0),
                VcpuExit::Mmio { write: true, .. } => {}
                e => panic!(
                    "unexpected exit {e:?} (guest error: {:?})",
                    self.be.guest_error
                ),
            }
        }
    }
}

/// A program running `ops` in order that records `x1` (the load register)
/// as seen before each operation and at the end: `seen[i]` is `x1` after
/// op `i - 1` completed.
pub fn recording(ops: Vec<Op>) -> (Box<dyn GuestProgram>, Arc<Mutex<Vec<u64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut it = ops.into_iter();
    let prog = FnProgram(move |regs: &[u64; 31]| {
        s.lock()
            .unwrap()
            .push(regs[pkvm_sim::cpu::LOAD_REG as usize]);
        it.next()
    });
    (Box::new(prog), seen)
}

/// The value simulated CPU `cpu` stores with its `seq`-th store (1-based).
pub fn store_value(cpu: usize, seq: u64) -> u64 {
    (0xa5 << 56) | ((cpu as u64 & 0xff) << 48) | (seq & 0xffff_ffff_ffff)
}
