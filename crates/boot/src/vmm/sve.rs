//! The `sve-switch` scenario: SVE for VMs with a per-VM vector length.
//!
//! - Configurations the CPU cannot give are refused before a VM exists,
//!   with an error naming the field (`sve_max_vl` above the CPU's largest,
//!   and not a power-of-two multiple of 16 bytes).
//! - Four single-vCPU VMs of guest-sve share the physical CPUs (the tier
//!   runs them on one): `sve-256` (256-bit vectors), `sve-512` (512-bit),
//!   `sve-max` (the configuration's default, the host's largest: 2048-bit
//!   on QEMU's `max` CPU) and `nosve` (SVE not offered). Each round, every VM fills its
//!   registers (Z/P/FFR, or q0-q31 without SVE) with its own pattern,
//!   yields the CPU with a trapped WFI so the scheduler runs another VM,
//!   and checks its registers and vector length afterwards (after an
//!   FP/SIMD write to V30: the first SVE instruction after the yield takes
//!   the world switch's lazy load, which must merge V into Z); `nosve`
//!   also checks that `RDVL` and `ZCR_EL1` UNDEF at its vector.
//!
//! Passes when every VM reports no failure, each VM ran at least once per
//! round (every run of a round is a world switch from another VM while
//! the others are runnable), each SVE VM took a lazy SVE load per round
//! (none for `nosve`) and the VMs power off.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use pkvm_sysreg::{IdError, IdOverrides};

use super::guest::{self, code, GuestVm, ImageSource, VmSpec, VmmError};
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::run::SCHED;
use super::{check, finish_all, run_vms, MIB};
use crate::println;

static GUEST_SVE: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-sve.bin"));

/// Rounds of fill / yield / check per VM.
const ROUNDS: u64 = 1000;

/// A VM's SVE configuration in the scenario.
#[derive(Clone, Copy, Debug)]
enum Sve {
    /// Not offered.
    Off,
    /// This vector length in bytes.
    Vl(u16),
    /// The configuration's default: the largest the host allows.
    HostMax,
}

/// The scenario's VMs: (name, SVE, tag).
const VMS: [(&str, Sve, u64); 4] = [
    ("sve-256", Sve::Vl(32), 1),
    ("sve-512", Sve::Vl(64), 2),
    ("sve-max", Sve::HostMax, 3),
    ("nosve", Sve::Off, 4),
];

fn spec(name: &'static str, x0: u64) -> VmSpec<'static> {
    VmSpec {
        name,
        mem: 4 * MIB,
        backing: Backing::Page4K,
        image: ImageSource::Embedded(GUEST_SVE),
        load_offset: 0,
        vcpus: 1,
        dtb_bootargs: None,
        initrd: None,
        protected: false,
        touch: None,
        x0: Some(x0),
    }
}

/// `x0` of guest-sve: vector length, tag, rounds.
fn guest_arg(vl: Option<u16>, tag: u64) -> u64 {
    u64::from(vl.unwrap_or(0)) | (tag << 16) | (ROUNDS << 32)
}

/// Configurations the CPU cannot give: refused before anything exists.
fn refusals(plat: &Arc<BootPlatform>, process: &Arc<BootProcess>, limit: u16) -> bool {
    let mut ok = true;
    for vl in [limit.saturating_mul(2), 48] {
        let cfg = IdOverrides::new().with_sve(vl);
        match guest::create_with(plat, process, &spec("sve-bad", 0), &cfg) {
            Err(e @ VmmError::Features(IdError::SveVectorLength { .. })) => {
                println!(
                    "sve: ok: VM configuration sve_max_vl = {vl} refused before the VM exists: {e}"
                );
            }
            Err(e) => {
                println!("sve: FAILED: sve_max_vl = {vl} refused for another reason: {e}");
                ok = false;
            }
            Ok(g) => {
                println!("sve: FAILED: sve_max_vl = {vl} accepted");
                g.stop(guest::VmEnd::Error("should have been refused"));
                finish_all(alloc::vec![g]);
                ok = false;
            }
        }
    }
    ok
}

/// Creates the scenario's VMs.
fn create(plat: &Arc<BootPlatform>, process: &Arc<BootProcess>) -> Option<Vec<Arc<GuestVm>>> {
    let host = crate::platform::idregs::host_ids();
    let mut vms = Vec::new();
    for (name, sve, tag) in VMS {
        let cfg = match sve {
            Sve::Off => IdOverrides::new(),
            Sve::Vl(vl) => IdOverrides::new().with_sve(vl),
            Sve::HostMax => IdOverrides::new().with_sve_host_max(&host),
        };
        // The guest checks RDVL against the configured length.
        let vl = cfg.sve_max_vl;
        match guest::create_with(plat, process, &spec(name, guest_arg(vl, tag)), &cfg) {
            Ok(g) => vms.push(g),
            Err(e) => {
                println!("vm {name}: create failed: {e}");
                finish_all(vms);
                return None;
            }
        }
    }
    Some(vms)
}

/// Runs `sve-switch`.
pub fn sve_switch(process: &Arc<BootProcess>) -> bool {
    let host = crate::platform::idregs::host_ids();
    let limit = host.sve_vl_limit();
    println!(
        "sve: host CPU: max VL {} bytes ({} bits); a VM may have a power of two of 16..={limit} bytes, default (host max) {limit}",
        host.sve_max_vl,
        u32::from(host.sve_max_vl) * 8
    );
    if limit < 64 {
        println!("sve: the scenario needs SVE with 512-bit vectors");
        return false;
    }
    if GUEST_SVE.is_empty() {
        println!("sve: guest payload missing (build with `cargo xtask`)");
        return false;
    }
    let plat = BootPlatform::new(None);
    let mut ok = refusals(&plat, process, limit);
    let Some(vms) = create(&plat, process) else {
        return false;
    };
    ok &= run_vms(&vms);
    let mut runs_total = 0;
    for (g, (name, _, _)) in vms.iter().zip(VMS) {
        let slot = g.slots[0].load(Ordering::Relaxed);
        let runs = SCHED
            .stats
            .get(slot)
            .map_or(0, |s| s.runs.load(Ordering::Relaxed));
        runs_total += runs;
        let st = g.vcpu_stats(0);
        println!(
            "sve: vm {name}: VL {} bytes, {runs} scheduler runs, {} guest entries, {} WFx exits, {} UNDEFs injected, {} lazy SVE loads",
            g.sve_max_vl().unwrap_or(0),
            st.entries,
            st.wfx,
            st.undefs,
            st.sve_lazy_loads
        );
        ok &= check("sve: guest result", g.report(code::DONE) == Some((0, 0)));
        ok &= check("sve: a run per round", runs >= ROUNDS);
        // Each round's fill after a yield is the first SVE use of a run:
        // a lazy load per round (none without SVE).
        ok &= check(
            "sve: lazy loads",
            match g.sve_max_vl() {
                Some(_) => st.sve_lazy_loads >= ROUNDS,
                None => st.sve_lazy_loads == 0,
            },
        );
    }
    let mismatches = vms
        .iter()
        .filter(|g| g.report(code::DONE) != Some((0, 0)))
        .count();
    println!(
        "sve: {} VMs, {ROUNDS} rounds each, {runs_total} world switches in, mismatches={mismatches}",
        vms.len()
    );
    ok & finish_all(vms)
}
