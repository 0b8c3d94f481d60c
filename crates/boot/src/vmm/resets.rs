//! The guest system-reset scenarios (the handoff's vCPU count is each VM's;
//! guest-reset: see its crate documentation): a PSCI `SYSTEM_RESET` or
//! `SYSTEM_RESET2` restarts the VM from its entry point
//! ([`GuestVm::system_reset`]).
//!
//! - `reset` (standard mode), three VMs in one run: `reset` asks for one
//!   `SYSTEM_RESET`, `reset2` for a `SYSTEM_RESET2` warm reset after it,
//!   and `reset-loop` resets forever. Passes if the first two powered off
//!   after exactly 1 and 2 restarts, each boot found the note it left in
//!   RAM and a reloaded image, vCPU 0 was started once per boot and vCPU 1
//!   once per CPU_ON (never by a reset), and `reset-loop` was ended with an
//!   error after [`MAX_RESETS`] restarts.
//! - `reset-concurrent` (standard mode): one VM asks for three resets with
//!   vCPU 1 making the same reset call as vCPU 0 at the same moment. Two
//!   concurrent requests are one reset: passes as `reset` (exactly three
//!   restarts, then SYSTEM_OFF). (A SYSTEM_OFF racing a reset is tested in
//!   pkvm-host, natively and with loom: from the guest, whether the second
//!   call reaches the hypervisor before its vCPU is stopped cannot be
//!   forced, so a QEMU test of it could not be deterministic.)
//! - `reset-protected` (protected mode): a protected VM asks for two
//!   resets, a non-protected VM under pkvm-hyp for one. The protected VM's
//!   image is not rewritten (its memory was donated: the guest sees its
//!   `.data` as it left it); the other's is. Passes as above, and with no
//!   VM state left in the hypervisor after teardown.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::guest::{self, code, GuestVm, ImageSource, VmEnd, VmSpec, MAX_RESETS};
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::{check, finish, print_hyp, protected_platform, run_vms, Layout, MIB};
use crate::platform::dt::Platform;
use crate::println;
use crate::sched::MAX_SCHED_VCPUS;

static GUEST_RESET: &[u8] = include_bytes!(concat!(env!("PKVM_GUESTS_DIR"), "/guest-reset.bin"));

/// x0 of a VM that resets forever.
const FOREVER: u64 = u32::MAX as u64;

/// One VM of a scenario and what it must show.
struct Case {
    name: &'static str,
    /// Resets the guest asks for (its x0).
    ask: u64,
    protected: bool,
    /// Restarts expected.
    resets: u32,
    /// Whether its image must have been reloaded at each reset.
    reloaded: bool,
    /// vCPU 1 makes each reset call too, at the same moment.
    concurrent: bool,
}

/// x0 bit asking guest-reset for concurrent reset calls.
const CONCURRENT: u64 = 1 << 32;

fn create(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    c: &Case,
    vcpus: usize,
) -> Option<Arc<GuestVm>> {
    if GUEST_RESET.is_empty() {
        println!(
            "vm {}: guest payload missing (build with `cargo xtask`)",
            c.name
        );
        return None;
    }
    let spec = VmSpec {
        name: c.name,
        mem: 16 * MIB,
        backing: Backing::Page4K,
        image: ImageSource::Embedded(GUEST_RESET),
        load_offset: 0,
        vcpus,
        dtb_bootargs: None,
        initrd: None,
        protected: c.protected,
        touch: None,
        x0: Some(c.ask | if c.concurrent { CONCURRENT } else { 0 }),
    };
    match guest::create(plat, process, &spec) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("vm {}: create failed: {e}", c.name);
            None
        }
    }
}

/// Checks one VM after the run: how it ended, its restarts, the guest's
/// last boot report, and how often each vCPU was started.
fn case_ok(g: &GuestVm, c: &Case) -> bool {
    let name = c.name;
    let boots = c.resets as u64 + 1;
    let ended = if c.ask == FOREVER {
        g.end() == Some(VmEnd::Error("too many system resets"))
    } else {
        g.end() == Some(VmEnd::PowerOff)
    };
    let mut ok = check(&alloc::format!("vm {name}: how it ended"), ended)
        & check(
            &alloc::format!("vm {name}: {} restarts", c.resets),
            g.resets() == c.resets,
        )
        & check(
            &alloc::format!("vm {name}: last boot report"),
            g.report(code::RESET) == Some((boots, c.reloaded as u64)),
        );
    // vCPU 0: once per boot. vCPU 1: once per CPU_ON, which every boot
    // that resets again makes (the last one of `reset-loop` too).
    let v0 = g.vcpu_stats(0).resets;
    ok &= check(
        &alloc::format!("vm {name}: vCPU 0 started {v0}x, expected {boots}"),
        v0 == boots,
    );
    if g.vcpu_count() > 1 {
        let want = if c.ask == FOREVER { boots } else { boots - 1 };
        let v1 = g.vcpu_stats(1).resets;
        ok &= check(
            &alloc::format!("vm {name}: vCPU 1 started {v1}x, expected {want}"),
            v1 == want,
        );
    }
    if ok {
        println!(
            "reset: vm {name}: {} restart(s) from the entry point, {}{}",
            c.resets,
            if c.reloaded {
                "image reloaded each time, note kept"
            } else {
                "image and note kept (protected VM)"
            },
            if c.ask == FOREVER {
                ", then stopped at the reset limit"
            } else {
                ", then SYSTEM_OFF"
            }
        );
    }
    ok
}

fn vcpus_of(p: &Platform, nvms: usize) -> Option<usize> {
    let n = p.handoff.as_ref().map_or(2, |h| h.smp as usize);
    if n == 0 || n * nvms > MAX_SCHED_VCPUS {
        println!(
            "reset: {n} vCPUs per VM for {nvms} VMs: 1..={} supported",
            MAX_SCHED_VCPUS / nvms
        );
        return None;
    }
    Some(n)
}

fn run_cases(
    plat: &Arc<BootPlatform>,
    process: &Arc<BootProcess>,
    cases: &[Case],
    p: &Platform,
) -> bool {
    let Some(vcpus) = vcpus_of(p, cases.len()) else {
        return false;
    };
    println!(
        "reset: {} VMs of {vcpus} vCPUs; at most {MAX_RESETS} system resets per VM",
        cases.len()
    );
    let mut vms: Vec<Arc<GuestVm>> = Vec::new();
    for c in cases {
        let Some(g) = create(plat, process, c, vcpus) else {
            return false;
        };
        vms.push(g);
    }
    let mut ok = run_vms(&vms);
    for (g, c) in vms.iter().zip(cases) {
        ok &= case_ok(g, c);
    }
    for (g, c) in vms.into_iter().zip(cases) {
        // `finish` says whether it powered off; the endless one must not.
        let off = finish(g);
        if c.ask != FOREVER {
            ok &= off;
        }
    }
    ok
}

/// `reset`: standard mode.
pub fn reset(process: &Arc<BootProcess>, p: &Platform) -> bool {
    println!("mode: standard (the host manages guest stage-2 with pkvm-pgtable)");
    let plat = BootPlatform::new(None);
    let cases = [
        Case {
            name: "reset",
            ask: 1,
            protected: false,
            resets: 1,
            reloaded: true,
            concurrent: false,
        },
        Case {
            name: "reset2",
            ask: 2,
            protected: false,
            resets: 2,
            reloaded: true,
            concurrent: false,
        },
        Case {
            name: "reset-loop",
            ask: FOREVER,
            protected: false,
            resets: MAX_RESETS,
            reloaded: true,
            concurrent: false,
        },
    ];
    run_cases(&plat, process, &cases, p)
}

/// `reset-concurrent`: both vCPUs make each reset call at once.
pub fn reset_concurrent(process: &Arc<BootProcess>, p: &Platform) -> bool {
    println!("mode: standard (the host manages guest stage-2 with pkvm-pgtable)");
    let plat = BootPlatform::new(None);
    let cases = [Case {
        name: "creset",
        ask: 3,
        protected: false,
        resets: 3,
        reloaded: true,
        concurrent: true,
    }];
    run_cases(&plat, process, &cases, p)
}

/// `reset-protected`: a protected VM and a non-protected one under
/// pkvm-hyp.
pub fn reset_protected(lay: &Layout, process: &Arc<BootProcess>, p: &Platform) -> bool {
    let Some(plat) = protected_platform(lay) else {
        return false;
    };
    print_hyp(&plat, "before the VMs");
    let cases = [
        Case {
            name: "preset",
            ask: 2,
            protected: true,
            resets: 2,
            reloaded: false,
            concurrent: false,
        },
        Case {
            name: "pshare-reset",
            ask: 1,
            protected: false,
            resets: 1,
            reloaded: true,
            concurrent: false,
        },
    ];
    let mut ok = run_cases(&plat, process, &cases, p);
    let after = print_hyp(&plat, "after teardown");
    ok &= check(
        "hyp: no VM state left",
        after.vm_pages == 0 && after.live_vms == 0,
    );
    ok
}
