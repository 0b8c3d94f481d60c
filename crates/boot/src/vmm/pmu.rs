//! The virtual-PMU scenario (`pmu`): VMs offered a virtual PMUv3 run the
//! external guest file (guest-pmu) in the role the command line names:
//!
//! - `basic`: one VM, 1 vCPU: cycle counter, hypercall/wall ratio,
//!   `SW_INCR`, overflow flag and PPI (guest-pmu role 0).
//! - `migrate`: one VM with the handoff's vCPU count (8 on 2 CPUs in the
//!   tier): per-vCPU configurations kept over yields that move vCPUs
//!   between CPUs (role 1); the migrations per vCPU are printed.
//! - `isolation`: a hostile VM (role 2) and a victim VM (role 3), the
//!   handoff's vCPU count each, on the same CPUs at once: the victim's
//!   registers and counts stay its own.
//!
//! Passes if every VM reports zero failures and powers off.

use alloc::sync::Arc;
use alloc::vec::Vec;

use pkvm_arch::Pa;
use pkvm_sysreg::IdOverrides;

use super::guest::{self, code, GuestVm, ImageSource, VmSpec};
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::{check, finish, run_vms, MIB};
use crate::platform::dt::Platform;
use crate::println;

/// One VM of the scenario: its name and guest-pmu role.
const BASIC: &[(&str, &str)] = &[("pmu", "pmu-role=0")];
const MIGRATE: &[(&str, &str)] = &[("pmu-migrate", "pmu-role=1")];
const ISOLATION: &[(&str, &str)] = &[("hostile", "pmu-role=2"), ("victim", "pmu-role=3")];

/// Runs the `pmu` scenario; whether it passed.
pub fn scenario(process: &Arc<BootProcess>, p: &'static Platform) -> bool {
    let Some(h) = p.handoff.as_ref() else {
        return false;
    };
    let Some((gpa, gsize)) = h.guest else {
        println!("pmu: no guest file (guest-pmu) in the handoff block");
        return false;
    };
    let phase = h.cmdline().trim();
    let (vms, vcpus) = match phase {
        "basic" => (BASIC, 1),
        "migrate" => (MIGRATE, h.smp as usize),
        "isolation" => (ISOLATION, h.smp as usize),
        other => {
            println!("pmu: unknown phase {other:?} (basic, migrate, isolation)");
            return false;
        }
    };
    let host = crate::platform::idregs::host_ids();
    if !host.has(pkvm_sysreg::HostFeature::Pmu) {
        println!("pmu: the CPU has no PMUv3");
        return false;
    }
    let plat = BootPlatform::new(None);
    let mut created: Vec<Arc<GuestVm>> = Vec::new();
    for &(name, bootargs) in vms {
        let spec = VmSpec {
            name,
            mem: 16 * MIB,
            backing: Backing::Page4K,
            image: ImageSource::Phys(Pa(gpa), gsize),
            load_offset: 0,
            vcpus,
            dtb_bootargs: Some(bootargs),
            initrd: None,
            protected: false,
            touch: None,
            x0: None,
        };
        match guest::create_with(&plat, process, &spec, &IdOverrides::new().with_pmu()) {
            Ok(g) => created.push(g),
            Err(e) => {
                println!("pmu: cannot create VM {name}: {e}");
                let _ = super::finish_all(created);
                return false;
            }
        }
    }
    println!(
        "pmu: phase {phase}: {} VM(s) of {vcpus} vCPU(s), each offered a virtual PMUv3 ({} event counters)",
        created.len(),
        host.pmu_counters.min(31)
    );
    let ran = run_vms(&created);
    let mut ok = ran;
    for g in created {
        let migrations: Vec<u64> = (0..vcpus).map(|i| g.vcpu_stats(i).migrations).collect();
        println!(
            "vm {}: vCPU migrations between physical CPUs: {migrations:?} (total {})",
            g.name,
            migrations.iter().sum::<u64>()
        );
        ok &= check(
            "guest-pmu reported no failure",
            g.report(code::DONE) == Some((0, 0)),
        );
        ok &= finish(g);
    }
    ok
}
