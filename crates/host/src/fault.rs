//! The architectural description of a guest stage-2 abort, decoded once
//! from `ESR_EL2`/`FAR_EL2`/`HPFAR_EL2` and passed by reference, immutable,
//! to every step that needs it (seed 002: never a field of a grab-bag
//! state struct).

use pkvm_arch::esr::{self, AccessSyndrome, Esr, FaultStatus};
use pkvm_arch::{Ipa, Level};

/// What kind of stage-2 fault it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Nothing mapped (translation fault).
    Translation,
    /// Mapped but the access flag is clear.
    AccessFlag,
    /// Mapped without the needed permission.
    Permission,
    /// Address size fault: the IPA is beyond the VM's IPA size.
    AddressSize,
    /// Anything else (external abort, alignment, TLB conflict, ...).
    Other(FaultStatus),
}

/// An immutable stage-2 guest abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFault {
    /// The faulting IPA (page from HPFAR, offset from FAR).
    pub ipa: Ipa,
    /// FAR_EL2: the guest virtual address of the access (for an injected
    /// abort's FAR_EL1); not valid when `fnv`.
    pub far: u64,
    /// FAR not valid.
    pub fnv: bool,
    /// The kind of fault.
    pub kind: FaultKind,
    /// The level the walk stopped at, when the status has one.
    pub level: Option<Level>,
    /// Instruction fetch.
    pub exec: bool,
    /// Data write (or a stage-1 walk needing write permission).
    pub write: bool,
    /// On the guest's own stage-1 table walk.
    pub s1ptw: bool,
    /// Cache maintenance operation.
    pub cm: bool,
    /// The instruction syndrome, for MMIO emulation (ISV=1).
    pub syndrome: Option<AccessSyndrome>,
}

/// Why an exit is not a stage-2 abort we handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotAnAbort(pub Esr);

impl GuestFault {
    /// Decodes a lower-EL data or instruction abort.
    ///
    /// # Errors
    /// [`NotAnAbort`] for any other exception class.
    pub fn decode(esr: u64, far: u64, hpfar: u64) -> Result<GuestFault, NotAnAbort> {
        let e = Esr(esr);
        let abort = e.abort().ok_or(NotAnAbort(e))?;
        let kind = match abort.status {
            FaultStatus::Translation(_) => FaultKind::Translation,
            FaultStatus::AccessFlag(_) => FaultKind::AccessFlag,
            FaultStatus::Permission(_) => FaultKind::Permission,
            FaultStatus::AddressSize(_) => FaultKind::AddressSize,
            other => FaultKind::Other(other),
        };
        // A stage-1 walk only writes the guest's tables (hardware AF/DBM)
        // on a permission fault; otherwise treat it as a read (KVM's rule).
        let write = if abort.s1ptw {
            kind == FaultKind::Permission
        } else {
            abort.write || abort.cm
        };
        Ok(GuestFault {
            ipa: esr::fault_ipa(hpfar, far),
            far,
            fnv: abort.fnv,
            kind,
            level: abort.status.level(),
            exec: abort.instruction,
            write: write && !abort.instruction,
            s1ptw: abort.s1ptw,
            cm: abort.cm,
            syndrome: abort.syndrome,
        })
    }

    /// The IPA's page.
    pub const fn page(&self) -> Ipa {
        self.ipa.align_down(pkvm_arch::PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_qemu_abort() {
        let f = GuestFault::decode(0x93c9_8046, 0x4800_0008, 0x48_0000).unwrap();
        assert_eq!(f.ipa, Ipa(0x4800_0008));
        assert_eq!(f.kind, FaultKind::Translation);
        assert_eq!(f.level, Some(Level(2)));
        assert!(f.write && !f.exec && !f.s1ptw);
        assert_eq!(f.syndrome.unwrap().srt, 9);
    }

    #[test]
    fn s1ptw_is_a_write_only_on_permission_faults() {
        let t = Esr::data_abort(None, false, true, FaultStatus::Translation(Level(3)));
        assert!(!GuestFault::decode(t.0, 0, 0).unwrap().write);
        let p = Esr::data_abort(None, false, true, FaultStatus::Permission(Level(3)));
        assert!(GuestFault::decode(p.0, 0, 0).unwrap().write);
    }

    #[test]
    fn instruction_aborts_and_non_aborts() {
        let i = Esr::instruction_abort(false, FaultStatus::AccessFlag(Level(3)));
        let f = GuestFault::decode(i.0, 0x10, 0x100).unwrap();
        assert!(f.exec && !f.write);
        assert_eq!(f.kind, FaultKind::AccessFlag);
        assert_eq!(f.ipa, Ipa(0x1_0010));
        assert_eq!(
            GuestFault::decode(Esr::hvc(0).0, 0, 0),
            Err(NotAnAbort(Esr::hvc(0)))
        );
    }
}
