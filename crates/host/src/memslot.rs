//! Memslots: the guest-physical regions backed by host process memory,
//! with KVM's validation (`KVM_SET_USER_MEMORY_REGION`).

use alloc::vec::Vec;
use core::fmt;

use pkvm_arch::{Gfn, Hva, Ipa, PAGE_SIZE};

/// Memslot flag: log writes (dirty logging; faults map 4K pages only).
pub const MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// Memslot flag: the guest may not write (writes exit to the VMM as MMIO).
pub const MEM_READONLY: u32 = 1 << 1;
const VALID_FLAGS: u32 = MEM_LOG_DIRTY_PAGES | MEM_READONLY;
/// Highest slot id accepted.
pub const MAX_SLOTS: u32 = 512;

/// A user memory region as the VMM describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserMemoryRegion {
    /// Slot id.
    pub slot: u32,
    /// `MEM_*` flags.
    pub flags: u32,
    /// First guest-physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// First host virtual address of the backing.
    pub userspace_addr: u64,
}

/// One memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memslot {
    /// Slot id.
    pub id: u32,
    /// First guest frame.
    pub base_gfn: Gfn,
    /// Number of 4K pages.
    pub npages: u64,
    /// First host virtual address.
    pub userspace_addr: Hva,
    /// `MEM_*` flags.
    pub flags: u32,
}

impl Memslot {
    /// First IPA.
    pub const fn start(&self) -> Ipa {
        self.base_gfn.addr()
    }
    /// One past the last IPA.
    pub const fn end(&self) -> Ipa {
        Ipa(self.base_gfn.addr().0 + self.npages * PAGE_SIZE)
    }
    /// Size in bytes.
    pub const fn size(&self) -> u64 {
        self.npages * PAGE_SIZE
    }
    /// Whether `ipa` is inside the slot.
    pub const fn contains(&self, ipa: Ipa) -> bool {
        ipa.0 >= self.start().0 && ipa.0 < self.end().0
    }
    /// The host address backing `ipa` (which must be inside the slot).
    pub const fn hva_of(&self, ipa: Ipa) -> Hva {
        Hva(self.userspace_addr.0 + (ipa.0 - self.start().0))
    }
    /// Read-only slot.
    pub const fn readonly(&self) -> bool {
        self.flags & MEM_READONLY != 0
    }
    /// Dirty logging enabled.
    pub const fn logging(&self) -> bool {
        self.flags & MEM_LOG_DIRTY_PAGES != 0
    }
    /// The IPA range `[start, end)` of this slot backed by `[hva_start, hva_end)`, if any.
    pub fn ipa_range_of_hva(&self, hva_start: Hva, hva_end: Hva) -> Option<(Ipa, Ipa)> {
        let s = hva_start.0.max(self.userspace_addr.0);
        let e = hva_end.0.min(self.userspace_addr.0 + self.size());
        if s >= e {
            return None;
        }
        let base = self.start().0;
        let s = (s - self.userspace_addr.0) & !(PAGE_SIZE - 1);
        let e = (e - self.userspace_addr.0).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        Some((Ipa(base + s), Ipa(base + e)))
    }
}

/// What a memslot change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    /// A new slot.
    Create(Memslot),
    /// A slot removed (its stage-2 range must be unmapped).
    Delete(Memslot),
    /// A slot moved to another IPA (the old range must be unmapped).
    Move {
        /// Before.
        old: Memslot,
        /// After.
        new: Memslot,
    },
    /// Only the flags changed (e.g. dirty logging toggled).
    FlagsOnly {
        /// Before.
        old: Memslot,
        /// After.
        new: Memslot,
    },
}

/// Why a memslot request was refused. Nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemslotError {
    /// A flag other than READONLY / LOG_DIRTY_PAGES.
    InvalidFlags(u32),
    /// Slot id above the limit.
    InvalidSlot(u32),
    /// A field is not page aligned.
    Misaligned {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The region wraps around or leaves the VM's IPA space.
    OutOfRange {
        /// First IPA.
        gpa: u64,
        /// Size.
        size: u64,
        /// The VM's IPA size in bits.
        ipa_bits: u32,
    },
    /// The host address range wraps around.
    BadUserspaceAddr(u64),
    /// Overlaps another slot.
    Overlap {
        /// The slot it overlaps.
        other: u32,
    },
    /// Deleting or changing a slot that does not exist.
    NoSuchSlot(u32),
    /// An existing slot's size or host address cannot change (delete it first).
    InvalidChange(u32),
    /// READONLY / LOG_DIRTY_PAGES on a protected VM (caller error): its
    /// memory is donated to it, so the host can neither keep it read-only
    /// nor write-protect it (KVM refuses these flags with EPERM too).
    ProtectedVmFlags(u32),
    /// Deleting or moving a slot of a protected VM that has run: its pages
    /// were donated and stay the guest's until the VM is destroyed.
    ProtectedVmStarted(u32),
}

impl fmt::Display for MemslotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemslotError::InvalidFlags(x) => write!(f, "invalid memslot flags {x:#x}"),
            MemslotError::InvalidSlot(s) => write!(f, "slot id {s} exceeds {MAX_SLOTS}"),
            MemslotError::Misaligned { field, value } => {
                write!(f, "{field} {value:#x} is not 4K aligned")
            }
            MemslotError::OutOfRange {
                gpa,
                size,
                ipa_bits,
            } => write!(
                f,
                "region {gpa:#x}+{size:#x} does not fit the VM's {ipa_bits}-bit IPA space"
            ),
            MemslotError::BadUserspaceAddr(a) => write!(f, "userspace address {a:#x} wraps"),
            MemslotError::Overlap { other } => write!(f, "region overlaps slot {other}"),
            MemslotError::NoSuchSlot(s) => write!(f, "slot {s} does not exist"),
            MemslotError::InvalidChange(s) => {
                write!(
                    f,
                    "slot {s}: size and userspace address cannot change; delete it first"
                )
            }
            MemslotError::ProtectedVmFlags(x) => write!(
                f,
                "memslot flags {x:#x}: a protected VM's memory cannot be read-only or dirty-logged"
            ),
            MemslotError::ProtectedVmStarted(s) => write!(
                f,
                "slot {s}: a protected VM that has run cannot delete or move its memory"
            ),
        }
    }
}

/// The VM's memslots, sorted by guest address.
#[derive(Clone, Debug, Default)]
pub struct Memslots {
    slots: Vec<Memslot>,
}

impl Memslots {
    /// No slots.
    pub const fn new() -> Self {
        Memslots { slots: Vec::new() }
    }

    /// The slot containing `ipa`.
    pub fn find(&self, ipa: Ipa) -> Option<&Memslot> {
        let i = self.slots.partition_point(|s| s.end().0 <= ipa.0);
        self.slots.get(i).filter(|s| s.contains(ipa))
    }

    /// Slot by id.
    pub fn get(&self, id: u32) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// All slots, by guest address.
    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }

    /// Validates `r` against the current slots (KVM's rules) and returns
    /// the change it makes, without applying it.
    ///
    /// # Errors
    /// See [`MemslotError`].
    pub fn check(&self, r: &UserMemoryRegion, ipa_bits: u32) -> Result<SlotChange, MemslotError> {
        if r.flags & !VALID_FLAGS != 0 {
            return Err(MemslotError::InvalidFlags(r.flags));
        }
        if r.slot >= MAX_SLOTS {
            return Err(MemslotError::InvalidSlot(r.slot));
        }
        for (field, value) in [
            ("guest_phys_addr", r.guest_phys_addr),
            ("memory_size", r.memory_size),
            ("userspace_addr", r.userspace_addr),
        ] {
            if value & (PAGE_SIZE - 1) != 0 {
                return Err(MemslotError::Misaligned { field, value });
            }
        }
        let existing = self.get(r.slot).copied();
        if r.memory_size == 0 {
            return existing
                .map(SlotChange::Delete)
                .ok_or(MemslotError::NoSuchSlot(r.slot));
        }
        let end = r.guest_phys_addr.checked_add(r.memory_size);
        if end.is_none_or(|e| e > 1u64 << ipa_bits) {
            return Err(MemslotError::OutOfRange {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                ipa_bits,
            });
        }
        if r.userspace_addr.checked_add(r.memory_size).is_none() {
            return Err(MemslotError::BadUserspaceAddr(r.userspace_addr));
        }
        let new = Memslot {
            id: r.slot,
            base_gfn: Ipa(r.guest_phys_addr).gfn(),
            npages: r.memory_size / PAGE_SIZE,
            userspace_addr: Hva(r.userspace_addr),
            flags: r.flags,
        };
        if let Some(other) = self
            .slots
            .iter()
            .find(|s| s.id != r.slot && s.start().0 < new.end().0 && new.start().0 < s.end().0)
        {
            return Err(MemslotError::Overlap { other: other.id });
        }
        match existing {
            None => Ok(SlotChange::Create(new)),
            Some(old) => {
                if old.npages != new.npages || old.userspace_addr != new.userspace_addr {
                    return Err(MemslotError::InvalidChange(r.slot));
                }
                if old.base_gfn != new.base_gfn {
                    Ok(SlotChange::Move { old, new })
                } else {
                    Ok(SlotChange::FlagsOnly { old, new })
                }
            }
        }
    }

    /// Applies a change returned by [`Memslots::check`].
    pub fn apply(&mut self, change: SlotChange) {
        match change {
            SlotChange::Create(s) => self.slots.push(s),
            SlotChange::Delete(s) => self.slots.retain(|x| x.id != s.id),
            SlotChange::Move { new, .. } | SlotChange::FlagsOnly { new, .. } => {
                if let Some(x) = self.slots.iter_mut().find(|x| x.id == new.id) {
                    *x = new;
                }
            }
        }
        self.slots.sort_unstable_by_key(|s| s.base_gfn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: u32) -> UserMemoryRegion {
        UserMemoryRegion {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        }
    }

    #[test]
    fn create_find_move_and_delete() {
        let mut m = Memslots::new();
        let c = m
            .check(&region(0, 0x4000_0000, 0x20_0000, 0x7000_0000, 0), 40)
            .unwrap();
        m.apply(c);
        let c = m
            .check(&region(1, 0x1000, 0x1000, 0x9000_0000, MEM_READONLY), 40)
            .unwrap();
        m.apply(c);
        assert_eq!(m.find(Ipa(0x4000_1234)).unwrap().id, 0);
        assert_eq!(m.find(Ipa(0x1000)).unwrap().id, 1);
        assert!(m.find(Ipa(0x2000)).is_none());
        assert_eq!(
            m.find(Ipa(0x4000_1234)).unwrap().hva_of(Ipa(0x4000_1234)),
            Hva(0x7000_1234)
        );
        let mv = m
            .check(&region(1, 0x8000, 0x1000, 0x9000_0000, MEM_READONLY), 40)
            .unwrap();
        assert!(matches!(mv, SlotChange::Move { .. }));
        m.apply(mv);
        assert_eq!(m.find(Ipa(0x8000)).unwrap().id, 1);
        let flags = m
            .check(
                &region(0, 0x4000_0000, 0x20_0000, 0x7000_0000, MEM_LOG_DIRTY_PAGES),
                40,
            )
            .unwrap();
        assert!(matches!(flags, SlotChange::FlagsOnly { .. }));
        let del = m.check(&region(0, 0, 0, 0, 0), 40).unwrap();
        m.apply(del);
        assert!(m.find(Ipa(0x4000_0000)).is_none());
    }

    #[test]
    fn every_invalid_request_is_refused_by_name() {
        let mut m = Memslots::new();
        m.apply(
            m.check(&region(0, 0x10_0000, 0x10_0000, 0x7000_0000, 0), 32)
                .unwrap(),
        );
        let cases = [
            (region(1, 0, 0x1000, 0, 4), MemslotError::InvalidFlags(4)),
            (
                region(MAX_SLOTS, 0, 0x1000, 0, 0),
                MemslotError::InvalidSlot(MAX_SLOTS),
            ),
            (
                region(1, 0x123, 0x1000, 0, 0),
                MemslotError::Misaligned {
                    field: "guest_phys_addr",
                    value: 0x123,
                },
            ),
            (
                region(1, 0, 0x1001, 0, 0),
                MemslotError::Misaligned {
                    field: "memory_size",
                    value: 0x1001,
                },
            ),
            (
                region(1, 0, 0x1000, 0x10, 0),
                MemslotError::Misaligned {
                    field: "userspace_addr",
                    value: 0x10,
                },
            ),
            (
                region(1, 0xffff_f000, 0x2000, 0, 0),
                MemslotError::OutOfRange {
                    gpa: 0xffff_f000,
                    size: 0x2000,
                    ipa_bits: 32,
                },
            ),
            (
                region(1, 0, 0x1000, !0xfffu64, 0),
                MemslotError::BadUserspaceAddr(!0xfffu64),
            ),
            (
                region(1, 0x1f_f000, 0x2000, 0, 0),
                MemslotError::Overlap { other: 0 },
            ),
            (region(7, 0, 0, 0, 0), MemslotError::NoSuchSlot(7)),
            (
                region(0, 0x10_0000, 0x20_0000, 0x7000_0000, 0),
                MemslotError::InvalidChange(0),
            ),
        ];
        for (r, e) in cases {
            assert_eq!(m.check(&r, 32), Err(e), "{r:?}");
        }
        assert_eq!(m.iter().count(), 1, "nothing changed");
    }

    #[test]
    fn hva_ranges_map_back_to_ipas() {
        let s = Memslot {
            id: 0,
            base_gfn: Gfn(0x40000),
            npages: 512,
            userspace_addr: Hva(0x7000_0000),
            flags: 0,
        };
        assert_eq!(
            s.ipa_range_of_hva(Hva(0x7000_1800), Hva(0x7000_2001)),
            Some((Ipa(0x4000_1000), Ipa(0x4000_3000)))
        );
        assert_eq!(s.ipa_range_of_hva(Hva(0x6000_0000), Hva(0x7000_0000)), None);
        assert_eq!(
            s.ipa_range_of_hva(Hva(0), Hva(u64::MAX)),
            Some((Ipa(0x4000_0000), Ipa(0x4020_0000)))
        );
    }
}
