//! `host-attack`'s image phase: the host, at EL1 under its stage-2, and
//! the image's memory (`link.ld`, `platform::hypmem::image_parts`).
//!
//! - the image's code (text and read-only data) is the hypervisor's, but
//!   the host runs it: a load goes through (mapped read-only and
//!   executable), a store ends in an injected abort and changes nothing;
//! - the VMM's statics (`.data`/`.bss`) are host memory: a load and a
//!   store of a static here go through;
//! - the hypervisor's statics (`.data.hyp`, `.bss.hyp`) and the EL2 stacks
//!   are never mapped for the host: loads and stores there end in an
//!   injected abort.
//!
//! Afterwards no page of the hypervisor's part of the image is mapped in
//! the host stage-2 and no page of its code is mapped writable. Last, the
//! host rewrites a VMM static the hypervisor once read to decide where to
//! write (the GIC driver's redistributor record, the console's UART
//! address): the hypervisor keeps its own ([`gic_record`],
//! [`console_record`]).

use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use pkvm_arch::Pa;

use super::attack::{load, store};
use super::check;
use super::el1host::HostCtx;
use super::platform::BootHyp;
use crate::platform::el1host::Cmd;
use crate::platform::hypdata::{HVC_TARGET, NULL_GUEST};
use crate::platform::{console, gic, hypmem, phys, start};
use crate::println;

/// A VMM static (in the host's `.bss`) the host reads and writes at EL1.
static HOST_WORD: AtomicU64 = AtomicU64::new(0);

/// What the host writes to [`HOST_WORD`].
const HOST_VALUE: u64 = 0x486f_7374_5772_6974;

/// One access and whether it must go through.
struct Access {
    what: &'static str,
    cmd: Cmd,
    allowed: bool,
}

/// The accesses, in order (the first two are the code and read-only
/// data loads [`image_phase`] compares, the fifth the VMM static's load).
fn accesses(word: u64) -> Vec<Access> {
    let img = hypmem::image_parts();
    let code = img.code.0;
    // The last non-zero word of the read-only data (its end is padding).
    let rodata = (1..=(img.code.1 - img.code.0) / 8)
        .map(|i| img.code.1 - 8 * i)
        .find(|&a| phys::read_u64(Pa(a)) != 0)
        .unwrap_or(img.code.0);
    let percpu = start::percpu_addr();
    let target = core::ptr::from_ref(&HVC_TARGET) as u64;
    let null_guest = core::ptr::from_ref(&NULL_GUEST) as u64;
    let live_stack = start::stack_range(0).1 - 64;
    let other_stack = start::stack_range(1).0;
    let a = |what, cmd, allowed| Access { what, cmd, allowed };
    alloc::vec![
        a("load of the image's code", load(code), true),
        a("load of the image's read-only data", load(rodata), true),
        a(
            "store to the image's code (through a writable alias in the host's stage-1 at EL1)",
            store(crate::platform::el1boot::writable_alias(code), 0),
            false
        ),
        a(
            "store to the image's read-only data",
            store(rodata, 0),
            false
        ),
        a("load of a VMM static (.bss)", load(word), true),
        a(
            "store to a VMM static (.bss)",
            store(word, HOST_VALUE),
            true
        ),
        a(
            "load of the hypervisor's per-CPU data (.bss.hyp)",
            load(percpu),
            false
        ),
        a(
            "store to the hypervisor's per-CPU data (.bss.hyp)",
            store(percpu, 0),
            false
        ),
        a(
            "load of the hypervisor's HVC target (.data.hyp)",
            load(target),
            false
        ),
        a(
            "store to the hypervisor's HVC target (.data.hyp)",
            store(target, 0),
            false
        ),
        a(
            "store to the hypervisor's NULL_RUN guest (.data.hyp)",
            store(null_guest, 0),
            false
        ),
        a(
            "load of CPU 0's EL2 stack (in use)",
            load(live_stack),
            false
        ),
        a("store to CPU 1's EL2 stack", store(other_stack, 0), false),
    ]
}

/// Prints and checks one access's outcome: an allowed one took no
/// exception, a refused one an injected abort (EC 0x25) at its address.
fn outcome(a: &Access) -> bool {
    let c = &a.cmd;
    let went_through = c.esr == 0;
    // The hypervisor's answer: a synchronous external abort (FSC 0x10),
    // not a fault of the host's own stage-1.
    let refused = c.esr >> 26 == 0x25 && c.esr & 0x3f == 0x10 && c.far == c.addr;
    let ok = if a.allowed { went_through } else { refused };
    let how = if went_through {
        format!("went through (load result {:#x})", c.result)
    } else {
        format!(
            "abort injected (ESR_EL1 {:#x}, FAR_EL1 {:#x})",
            c.esr, c.far
        )
    };
    let verdict = match (a.allowed, ok) {
        (true, true) => "allowed",
        (false, true) => "refused",
        (true, false) => "NOT allowed",
        (false, false) => "NOT refused",
    };
    println!(
        "host-attack: image: {} {:#x}: {verdict}: {how}",
        a.what, c.addr
    );
    ok
}

/// The phase; `true` if every access went as it must.
pub fn image_phase(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let img = hypmem::image_parts();
    let word = core::ptr::from_ref(&HOST_WORD) as u64;
    HOST_WORD.store(!HOST_VALUE, Ordering::Relaxed);
    let mut ok = check(
        "host-attack: image: the VMM's static is in the host's part",
        img.host.0 <= word && word < img.host.1,
    );
    let mut list = accesses(word);
    let (code, rodata) = (list[0].cmd.addr, list[1].cmd.addr);
    let before = [phys::read_u64(Pa(code)), phys::read_u64(Pa(rodata))];
    let mut cmds: Vec<Cmd> = list.iter().map(|a| a.cmd).collect();
    let r = match ctx.run(hyp, &mut cmds) {
        Ok(r) => r,
        Err(e) => return check(&format!("host-attack: image: host run: {e:?}"), false),
    };
    println!(
        "host-attack: image: code {:#x}..{:#x} (read-only for the host), hypervisor data and EL2 stacks {:#x}..{:#x}, VMM statics {:#x}..{:#x}; {} host stage-2 faults mapped, {} aborts injected",
        img.code.0, img.code.1, img.hyp.0, img.hyp.1, img.host.0, img.host.1, r.mapped, r.injected
    );
    for (a, c) in list.iter_mut().zip(&cmds) {
        a.cmd = *c;
        ok &= outcome(a);
    }
    ok &= check(
        "host-attack: image: the host read the code as it is",
        cmds[0].result == before[0] && cmds[1].result == before[1],
    );
    ok &= check(
        "host-attack: image: the code unchanged",
        [phys::read_u64(Pa(code)), phys::read_u64(Pa(rodata))] == before,
    );
    ok &= check(
        "host-attack: image: the host read and wrote the VMM's static",
        cmds[4].result == !HOST_VALUE && HOST_WORD.load(Ordering::Relaxed) == HOST_VALUE,
    );
    ok &= gic_record(hyp, ctx);
    ok &= console_record(hyp, ctx);
    ok & mappings(hyp, img)
}

/// The host points its console's UART address (host `.bss`) at a page of
/// its own memory; a line printed at EL2 (the hypervisor's console, its
/// own lock and address in `.data.hyp`) still reaches the UART, nothing
/// is written to that page. The host puts the address back after.
fn console_record(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let rec = console::host_base_record_addr();
    let Some(fake) = super::pool::alloc(0) else {
        return check("host-attack: image: a host page", false);
    };
    phys::zero(fake, 4096);
    let mut cmds = [load(rec), store(rec, fake.0)];
    let run = ctx.run(hyp, &mut cmds);
    let el2 = start_el() == 2;
    if el2 {
        println!(
            "host-attack: image: the host pointed its console's UART address {rec:#x} at its own memory {:#x} (was {:#x}); this line is printed at EL2 after it",
            fake.0,
            cmds[0].result
        );
    } else {
        // The VMM at EL1 prints through the console it repointed: only the
        // hypervisor prints until it is put back.
        let _ = super::platform::hyp_probe(super::platform::probe::PRINT, 0);
    }
    let mut back = [store(rec, cmds[0].result)];
    let run2 = ctx.run(hyp, &mut back);
    if !el2 {
        println!(
            "host-attack: image: the host pointed its console's UART address {rec:#x} at its own memory {:#x} (was {:#x}); the hypervisor printed a line at EL2 meanwhile (above)",
            fake.0,
            cmds[0].result
        );
    }
    let clean = (0..512u64).all(|i| phys::read_u64(Pa(fake.0 + 8 * i)) == 0);
    super::pool::free(fake, 0);
    println!(
        "host-attack: image: the hypervisor's console: {}",
        if clean {
            "at its own UART address, nothing written to the host's page"
        } else {
            "WROTE to the host's page"
        }
    );
    check(
        "host-attack: image: host runs for the console record",
        run.is_ok() && run2.is_ok() && cmds.iter().chain(&back).all(|c| c.esr == 0),
    ) & check(
        "host-attack: image: the hypervisor ignores the host's console address",
        clean,
    )
}

/// The host points the GIC driver's record of this CPU's redistributor
/// (host `.bss`) at a block of its own memory; the hypervisor's masking
/// of the virtual-timer PPI (what `VCPU_RUN` does at EL2) must still go
/// to the real redistributor (its own record, `.bss.hyp`), writing
/// nothing in that block. The host puts the record back after.
fn gic_record(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let cpu = start::cpu_index();
    let (Some(rec), Some(fake)) = (gic::rd_record_addr(cpu), super::pool::alloc(5)) else {
        return check(
            "host-attack: image: the GIC record and a 128 KiB host block",
            false,
        );
    };
    phys::zero(fake, 128 * 1024);
    hyp_vtimer_masked(cpu, false);
    let mut cmds = [load(rec), store(rec, fake.0)];
    let run = ctx.run(hyp, &mut cmds);
    hyp_vtimer_masked(cpu, true);
    hyp_vtimer_masked(cpu, false);
    let mut back = [store(rec, cmds[0].result)];
    let run2 = ctx.run(hyp, &mut back);
    // GICR_ISENABLER0 and GICR_ICENABLER0 (SGI frame + 0x100 / + 0x180)
    // relative to the fake redistributor.
    let written: Vec<u64> = [0x1_0100u64, 0x1_0180]
        .iter()
        .map(|o| phys::read_u64(Pa(fake.0 + o)))
        .collect();
    let clean = written.iter().all(|w| *w == 0);
    super::pool::free(fake, 5);
    println!(
        "host-attack: image: the host pointed the GIC driver's redistributor record {rec:#x} of CPU {cpu} at its own memory {:#x} (was {:#x}); the hypervisor masked and unmasked the virtual timer: {}",
        fake.0,
        cmds[0].result,
        if clean { "at its own record, nothing written to the host's block" } else { "WROTE to the host's block" }
    );
    check(
        "host-attack: image: host runs for the GIC record",
        run.is_ok() && run2.is_ok() && cmds.iter().chain(&back).all(|c| c.esr == 0),
    ) & check(
        "host-attack: image: the hypervisor ignores the host's redistributor record",
        clean,
    )
}

/// `CurrentEL`'s level.
fn start_el() -> u64 {
    crate::platform::el1boot::current_el()
}

/// The hypervisor masks or unmasks this CPU's virtual-timer PPI at EL2
/// (as `VCPU_RUN` does): called there by the VMM at EL2, by the test hook
/// for the VMM at EL1.
fn hyp_vtimer_masked(cpu: usize, masked: bool) {
    if start_el() == 2 {
        gic::set_vtimer_masked(cpu, masked);
    } else {
        let _ = super::platform::hyp_probe(super::platform::probe::VTIMER_MASK, u64::from(masked));
    }
}

/// After the run: the host stage-2 maps no page of the hypervisor's part
/// of the image and none of its code writable.
fn mappings(hyp: &'static BootHyp, img: hypmem::ImageParts) -> bool {
    let _ = hyp;
    let pte = |pa: u64| {
        super::platform::hyp_probe(super::platform::probe::HOST_PTE, pa)
            .map_or((true, true), |(v, w)| (v == 1, w == 1))
    };
    let hyp_mapped = (img.hyp.0..img.hyp.1)
        .step_by(4096)
        .filter(|&pa| pte(pa).0)
        .count();
    let code_writable = (img.code.0..img.code.1)
        .step_by(4096)
        .filter(|&pa| pte(pa).1)
        .count();
    println!(
        "host-attack: image: host stage-2 after the run: {hyp_mapped} pages of the hypervisor's data and stacks mapped, {code_writable} code pages writable"
    );
    check(
        "host-attack: image: no host mapping of the hypervisor's data and stacks",
        hyp_mapped == 0,
    ) & check(
        "host-attack: image: no writable host mapping of the code",
        code_writable == 0,
    )
}
