//! A set of vCPU indices (the vCPUs to kick).

/// A set of vCPU indices below [`crate::MAX_VCPUS`]: the vCPUs whose
/// deliverable state changed and that the caller should kick (wake from WFI,
/// or make exit to pick up new list registers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VcpuSet(u32);

impl VcpuSet {
    /// No vCPU.
    pub const EMPTY: VcpuSet = VcpuSet(0);

    /// The set `{v}`.
    pub(crate) fn single(v: usize) -> Self {
        let mut s = Self::EMPTY;
        s.insert(v);
        s
    }

    /// The set `{0, .., n - 1}`.
    pub(crate) fn first(n: usize) -> Self {
        let n = n.min(crate::MAX_VCPUS);
        VcpuSet(((1u64 << n) - 1) as u32)
    }

    /// Adds `v` (ignored when `v >= MAX_VCPUS`).
    pub(crate) fn insert(&mut self, v: usize) {
        if v < crate::MAX_VCPUS {
            self.0 |= 1 << v;
        }
    }

    /// The union of two sets.
    pub fn union(self, other: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 | other.0)
    }

    /// Whether `v` is in the set.
    pub fn contains(self, v: usize) -> bool {
        v < crate::MAX_VCPUS && self.0 & (1 << v) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The set as a bit mask (bit `v` for vCPU `v`).
    pub fn bits(self) -> u32 {
        self.0
    }

    /// The members, lowest first.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..crate::MAX_VCPUS).filter(move |&v| self.contains(v))
    }
}
