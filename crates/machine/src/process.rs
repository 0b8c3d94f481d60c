//! The simulated process memory as the host's `ProcessMemory`, and the
//! MMU-notifier bridge from it to a VM.

use std::sync::{Arc, Weak};

use pkvm_arch::{Hva, Pa};
use pkvm_host::{PinError, PinnedPage, ProcessMemory, VmaInfo};
use pkvm_sim::mm::{InvalidateRange, MmError, MmuNotifier, Pin, ProcessMm, Vma, VmaKind};

use crate::platform::NOTIFIER_CPU;
use crate::SimVm;

/// The host process memory behind the VMs' memslots.
#[derive(Clone, Debug)]
pub struct SimProcess {
    mm: Arc<ProcessMm>,
}

impl SimProcess {
    /// Wraps a simulated process address space.
    pub fn new(mm: Arc<ProcessMm>) -> Self {
        SimProcess { mm }
    }

    /// The simulated address space.
    pub fn mm(&self) -> &Arc<ProcessMm> {
        &self.mm
    }
}

struct VmaView<'a>(&'a Vma);

impl VmaInfo for VmaView<'_> {
    fn start(&self) -> Hva {
        self.0.start()
    }
    fn end(&self) -> Hva {
        self.0.end()
    }
    fn mapping_size(&self) -> u64 {
        self.0.kind().granule()
    }
    fn is_hugetlb(&self) -> bool {
        matches!(self.0.kind(), VmaKind::Hugetlb2M | VmaKind::Hugetlb1G)
    }
    fn is_thp(&self) -> bool {
        matches!(self.0.kind(), VmaKind::AnonymousThp)
    }
    fn is_pfnmap(&self) -> bool {
        matches!(self.0.kind(), VmaKind::PfnMap { .. })
    }
    fn writable(&self) -> bool {
        self.0.writable()
    }
}

/// A pinned simulated page.
#[derive(Debug)]
pub struct SimPin(Pin);

impl PinnedPage for SimPin {
    fn pa(&self) -> Pa {
        self.0.pa()
    }
    fn folio_pa(&self) -> Pa {
        self.0.folio_pa()
    }
    fn folio_hva(&self) -> Hva {
        self.0.folio_hva()
    }
    fn size(&self) -> u64 {
        self.0.size().bytes()
    }
    fn writable(&self) -> bool {
        self.0.writable()
    }
    fn is_device(&self) -> bool {
        !self.0.refcounted()
    }
}

impl ProcessMemory for SimProcess {
    type Pin = SimPin;

    fn with_vma<R>(&self, hva: Hva, f: impl FnOnce(Option<&dyn VmaInfo>) -> R) -> R {
        self.mm.with_vma(hva, |v| match v {
            Some(v) => f(Some(&VmaView(v))),
            None => f(None),
        })
    }

    fn pin(&self, hva: Hva, write: bool) -> Result<SimPin, PinError> {
        match self.mm.fault_in(hva, write) {
            Ok(p) => Ok(SimPin(p)),
            Err(MmError::OutOfMemory) => Err(PinError::NoMemory),
            Err(_) => Err(PinError::BadAddress(hva)),
        }
    }
}

/// Routes MMU-notifier events of a process to a VM (weakly held: a
/// destroyed VM simply stops listening).
pub struct VmNotifier {
    vm: Weak<SimVm>,
}

impl VmNotifier {
    /// A notifier for `vm`.
    pub fn new(vm: &Arc<SimVm>) -> Arc<VmNotifier> {
        Arc::new(VmNotifier {
            vm: Arc::downgrade(vm),
        })
    }
}

impl MmuNotifier for VmNotifier {
    fn invalidate_range_start(&self, r: &InvalidateRange) {
        if let Some(vm) = self.vm.upgrade() {
            vm.mmu_notifier_invalidate_start(r.start, r.end, NOTIFIER_CPU);
        }
    }
    fn invalidate_range_end(&self, _r: &InvalidateRange) {
        if let Some(vm) = self.vm.upgrade() {
            vm.mmu_notifier_invalidate_end();
        }
    }
    fn clear_young(&self, start: Hva, end: Hva) -> bool {
        self.vm
            .upgrade()
            .is_some_and(|vm| vm.mmu_notifier_age(start, end, true, NOTIFIER_CPU))
    }
    fn test_young(&self, start: Hva, end: Hva) -> bool {
        self.vm
            .upgrade()
            .is_some_and(|vm| vm.mmu_notifier_age(start, end, false, NOTIFIER_CPU))
    }
    fn release(&self) {
        if let Some(vm) = self.vm.upgrade() {
            vm.mmu_notifier_release(NOTIFIER_CPU);
        }
    }
}
