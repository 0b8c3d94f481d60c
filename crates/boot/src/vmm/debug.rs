//! The self-hosted debug scenarios (guest-debug; the handoff's vCPU count
//! is each VM's, QEMU's `-smp` the physical CPUs):
//!
//! - `debug`: one VM whose vCPUs program breakpoints, watchpoints and
//!   single-step, yield between programming and the hit, and count their
//!   debug exceptions (exactly where expected, none in a quiet phase with
//!   debug off). Passes if the guest reports success and powered off, every
//!   vCPU migrated between physical CPUs at least [`MIN_MIGRATIONS`]
//!   times, and entered with its debug state loaded.
//! - `debug-isolation`: the same tester VM (`victim`) beside a `hostile`
//!   VM that programs every breakpoint and watchpoint on the victim's
//!   addresses (with HMC set), `MDSCR_EL1` and its physical timer, on the
//!   same CPUs. Passes if the victim saw its own register values and timer
//!   back and no spurious debug exception, and each of its vCPUs ran at
//!   least [`MIN_AFTER_OTHER`] times right after the hostile VM on a CPU.
//! - `setway`: one vCPU runs full `DC CSW`/`ISW`/`CISW` loops (caches on,
//!   off, on) over a pattern: each operation traps (`HCR_EL2.TSW`) and
//!   becomes a clean and invalidate of the VM's memory by VA, the guest
//!   continues with its memory intact and no exception. Then it makes an
//!   exception class the backend does not handle (an AArch32 EL0 `MRRC`
//!   trapped with EC 0x4) and must take an UNDEF at its AArch32 vector.
//!   Passes if it says so and the backend counted the flushes.

use alloc::sync::Arc;

use super::guest::{self, code, GuestVm, VmEnd, VmSpec};
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::{check, finish, ncpus, run_vms, MIB};
use crate::platform::dt::Platform;
use crate::println;

static GUEST_DEBUG: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-debug.bin"));

/// Least migrations per vCPU in `debug`.
pub const MIN_MIGRATIONS: u64 = 100;
/// Least runs right after the hostile VM per victim vCPU.
pub const MIN_AFTER_OTHER: u64 = 100;
/// guest-debug's roles.
const ROLE_TESTER: u64 = 0;
const ROLE_HOSTILE: u64 = 2;
const ROLE_SETWAY: u64 = 3;
/// Rounds of the tester (`debug`, `debug-isolation`) and of the hostile VM
/// (more: it should outlast the victim).
const ROUNDS: u64 = 250;
const VICTIM_ROUNDS: u64 = 150;
const HOSTILE_ROUNDS: u64 = 600;

fn create(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    name: &'static str,
    vcpus: usize,
    role: u64,
    rounds: u64,
) -> Option<Arc<GuestVm>> {
    if GUEST_DEBUG.is_empty() {
        println!("vm {name}: guest payload missing (build with `cargo xtask`)");
        return None;
    }
    let spec = VmSpec {
        name,
        mem: 16 * MIB,
        backing: Backing::Page4K,
        image: guest::ImageSource::Embedded(GUEST_DEBUG),
        load_offset: 0,
        vcpus,
        dtb_bootargs: None,
        initrd: None,
        protected: false,
        touch: None,
        x0: Some(vcpus as u64 | role << 8 | rounds << 16),
    };
    match guest::create(plat, process, &spec) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("vm {name}: create failed: {e}");
            None
        }
    }
}

/// Whether the tester VM `g` reported success and powered off.
fn tester_ok(g: &GuestVm) -> bool {
    let done = g.report(code::DONE);
    check(
        &alloc::format!("vm {}: guest-debug reported success", g.name),
        done.map(|d| d.0) == Some(0) && g.end() == Some(VmEnd::PowerOff),
    )
}

/// `debug`: see the module documentation.
pub fn debug(process: &Arc<BootProcess>, p: &Platform) -> bool {
    let vcpus = p.handoff.as_ref().map_or(8, |h| h.smp as usize);
    let plat = BootPlatform::new(None);
    let Some(g) = create(&plat, process, "debug", vcpus, ROLE_TESTER, ROUNDS) else {
        return false;
    };
    if !run_vms(core::slice::from_ref(&g)) {
        return false;
    }
    let mut ok = tester_ok(&g);
    let mut least = u64::MAX;
    for i in 0..vcpus {
        let s = g.vcpu_stats(i);
        println!(
            "debug: vCPU {i}: {} migrations between physical CPUs, {} of {} guest entries with its debug state loaded",
            s.migrations, s.debug_entries, s.exits
        );
        least = least.min(s.migrations);
        ok &= s.debug_entries > 0;
    }
    let cpus = ncpus();
    ok &= check(
        &alloc::format!(
            "debug: {vcpus} vCPUs on {cpus} CPUs, at least {MIN_MIGRATIONS} migrations each (least {least})"
        ),
        least >= MIN_MIGRATIONS,
    );
    if ok {
        println!("debug: PASS: {vcpus} vCPUs on {cpus} CPUs, {ROUNDS} rounds each, least {least} migrations per vCPU");
    }
    ok & finish(g)
}

/// `debug-isolation`: see the module documentation.
pub fn isolation(process: &Arc<BootProcess>, p: &Platform) -> bool {
    let vcpus = p.handoff.as_ref().map_or(2, |h| h.smp as usize);
    let plat = BootPlatform::new(None);
    let victim = create(&plat, process, "victim", vcpus, ROLE_TESTER, VICTIM_ROUNDS);
    let hostile = create(
        &plat,
        process,
        "hostile",
        vcpus,
        ROLE_HOSTILE,
        HOSTILE_ROUNDS,
    );
    let (Some(v), Some(h)) = (victim, hostile) else {
        return false;
    };
    if !run_vms(&[v.clone(), h.clone()]) {
        return false;
    }
    let mut ok = tester_ok(&v);
    let mut least = u64::MAX;
    for i in 0..vcpus {
        let s = v.vcpu_stats(i);
        println!(
            "isolation: victim vCPU {i}: {} runs right after the hostile VM on the same CPU, {} migrations",
            s.after_other_vm, s.migrations
        );
        least = least.min(s.after_other_vm);
    }
    ok &= check(
        &alloc::format!(
            "isolation: each victim vCPU ran at least {MIN_AFTER_OTHER} times right after the hostile VM (least {least})"
        ),
        least >= MIN_AFTER_OTHER,
    );
    if ok {
        println!("isolation: PASS: the victim's debug registers, MDSCR_EL1 and physical timer were its own, no spurious debug exception; least {least} runs after the hostile VM per vCPU");
    }
    ok &= finish(v);
    ok & finish(h)
}

/// `setway`: see the module documentation.
pub fn setway(process: &Arc<BootProcess>) -> bool {
    let plat = BootPlatform::new(None);
    let Some(g) = create(&plat, process, "setway", 1, ROLE_SETWAY, 0) else {
        return false;
    };
    if !run_vms(core::slice::from_ref(&g)) {
        return false;
    }
    let mut ok = tester_ok(&g);
    let flushes = g.vcpu_stats(0).setway;
    ok &= check(
        &alloc::format!(
            "setway: the backend flushed the VM's memory for each set/way operation ({flushes})"
        ),
        flushes >= 3,
    );
    if ok {
        println!("setway: PASS: {flushes} set/way operations trapped, each a clean and invalidate of the VM's mapped memory by VA");
    }
    ok & finish(g)
}
