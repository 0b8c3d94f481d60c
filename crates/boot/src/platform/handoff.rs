//! The handoff block xtask loads at [`HANDOFF_PA`] (QEMU
//! `-device loader,...,force-raw=on`): which scenario to run and, for
//! `cargo xtask run --guest`, where QEMU loaded the guest file, its vCPU
//! count, memory size and command line. Layout: see `xtask/src/qemu.rs`.
//! Every field is validated here: a bad block means "no block".

use pkvm_arch::Pa;

use super::phys;

/// Physical address of the block.
pub const HANDOFF_PA: u64 = 0x4800_0000;
/// Where QEMU loads an external guest file.
pub const GUEST_PA: u64 = HANDOFF_PA + 0x1000;
/// Start of the page pool (end of the guest file area).
pub const POOL_START: u64 = 0x5000_0000;
const MAGIC: u64 = u64::from_le_bytes(*b"PKVMHOF1");

/// A validated handoff block.
#[derive(Debug, Clone)]
pub struct Handoff {
    /// Scenario name.
    pub scenario: [u8; 32],
    /// External guest: (physical address, size) of the file.
    pub guest: Option<(u64, u64)>,
    /// Guest vCPUs.
    pub smp: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Guest command line.
    pub cmdline: [u8; 1024],
    /// Its length.
    pub cmdline_len: usize,
    /// Run the external guest as a protected VM (flags bit 0).
    pub protected: bool,
    /// The guest's initrd: (physical address, size), on the page after
    /// the guest file, below the pool.
    pub initrd: Option<(u64, u64)>,
    /// Offer the external guest SVE (flags bit 1) with this maximum vector
    /// length in bytes (0: the host CPU's largest). Not checked here: the
    /// VM's feature policy refuses a bad length by name.
    pub sve: Option<u32>,
    /// Keep the VMM at EL2 next to the hypervisor (flags bit 2; the
    /// legacy layout, for comparisons: by default the VMM runs at EL1,
    /// `platform::el1boot`).
    pub host_el2: bool,
}

impl Handoff {
    /// The scenario name.
    pub fn scenario(&self) -> &str {
        let n = self.scenario.iter().position(|&b| b == 0).unwrap_or(32);
        core::str::from_utf8(&self.scenario[..n]).unwrap_or("")
    }
    /// The command line.
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}

/// Reads the block, if a valid one is there.
pub fn read() -> Option<Handoff> {
    let w = |off: u64| phys::read_u64(Pa(HANDOFF_PA + off));
    if w(0) != MAGIC || (w(8) & 0xffff_ffff) != 1 {
        return None;
    }
    let mut scenario = [0u8; 32];
    let mut cmdline = [0u8; 1024];
    phys::with_slice(Pa(HANDOFF_PA + 16), 32, |s| scenario.copy_from_slice(s));
    let (gpa, gsize) = (w(48), w(56));
    let guest =
        (gpa == GUEST_PA && gsize > 0 && gsize <= POOL_START - GUEST_PA).then_some((gpa, gsize));
    let smp = (w(64) & 0xffff_ffff) as u32;
    let mem_mib = (w(64) >> 32) as u32;
    let cmdline_len = ((w(72) & 0xffff_ffff) as usize).min(1024);
    phys::with_slice(Pa(HANDOFF_PA + 80), 1024, |s| cmdline.copy_from_slice(s));
    let (ipa, isize) = (w(1104), w(1112));
    let initrd = guest.and_then(|(g, n)| {
        let at = (g + n).next_multiple_of(4096);
        (ipa == at && isize > 0 && isize <= POOL_START - at).then_some((ipa, isize))
    });
    Some(Handoff {
        protected: (w(8) >> 32) & 1 != 0,
        host_el2: (w(8) >> 34) & 1 != 0,
        sve: ((w(8) >> 33) & 1 != 0).then_some((w(1120) & 0xffff_ffff) as u32),
        initrd,
        scenario,
        guest,
        smp,
        mem_mib,
        cmdline,
        cmdline_len,
    })
}
