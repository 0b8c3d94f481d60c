//! host-attack's `HOST_RUN` phase: the host at EL1 hands the hypervisor
//! hostile run blocks ([`crate::platform::hostrun`]), each of which must
//! be refused with `INVALID_PARAMETER` and the expected reason, the block
//! left as it was; then the valid block they were made from runs (the
//! victim's vCPU, loaded on this CPU, at an IPA its stage-2 does not map:
//! a stage-2 instruction abort comes back as the exit, or an interrupt
//! exit when the scheduler's tick was pending at EL2).
//!
//! Every block lies in its own host page from the pool, shared with the
//! hypervisor (`HOST_SHARE_HYP`, as the VMM shares its vCPUs' run pages);
//! the host issues `HOST_RUN` from EL1 with the page's physical address,
//! with vCPU 0 of `runner` loaded (`VCPU_LOAD`: a protected VM set up in
//! pkvm-hyp that never ran, so the valid block, a reset, is accepted), so
//! that a block for a hyp-managed stage-2 would run if it were valid. A
//! block in a page not
//! shared is refused; the pin `HOST_RUN` holds on a block's page keeps the
//! host from unsharing it ([`pin_phase`]), and a shared page cannot be
//! donated to a guest.

use alloc::boxed::Box;
use alloc::vec::Vec;

use pkvm_arch::vtcr::{vtcr, vttbr, VtcrOptions};
use pkvm_arch::Pa;
use pkvm_hyp::hvc::{id, ret};
use pkvm_sysreg::traps::cptr;

use super::check;
use super::el1host::HostCtx;
use super::platform::BootHyp;
use super::pool;
use super::sysregs::VmPolicy;
use super::vcpurun::hvc;
use crate::platform::el1host::{op, Cmd};
use crate::platform::hostrun::{self, read_block, stage, write_block, Refused, RunBlock, HOST_RUN};
use crate::platform::switch::{self, VcpuState, VmRegs, EXIT_IRQ, EXIT_SYNC};
use crate::platform::{idregs, start, timer};
use crate::println;

/// Where the valid block's vCPU starts: below the victim's RAM, unmapped
/// in its stage-2.
const UNMAPPED_PC: u64 = 0x1000;

/// A mutation of the valid block, the address it is passed at (`None`:
/// its own page) and the reason it must be refused with.
struct Hostile {
    what: &'static str,
    change: fn(&mut RunBlock),
    at: Option<u64>,
    /// An SVE area at this address (vector length 16).
    sve_at: Option<u64>,
    why: Refused,
}

fn hostile(what: &'static str, change: fn(&mut RunBlock), why: Refused) -> Hostile {
    Hostile {
        what,
        change,
        at: None,
        sve_at: None,
        why,
    }
}

/// Addresses the host does not own: in the hypervisor's own memory, a
/// page of its pool, a page the victim VM was donated.
#[derive(Clone, Copy, Debug)]
pub struct NotHost {
    /// In the hypervisor's own memory.
    pub hyp_mem: u64,
    /// A page of the hypervisor's pool.
    pub hyp_pool: u64,
    /// A page donated to the victim.
    pub victim: u64,
}

/// The hostile blocks (`at: Some(0)`: the block's page + 8; `unshared`: a
/// host page not shared with the hypervisor).
fn hostiles(not: NotHost, unshared: u64) -> Vec<Hostile> {
    let at = |what, pa, why| Hostile {
        what,
        change: |_| {},
        at: Some(pa),
        sve_at: None,
        why,
    };
    let mut v = alloc::vec![
        at("block at an unaligned address", 0, Refused::Address),
        at(
            "block at a device address (PL011)",
            0x0900_0000,
            Refused::Address
        ),
        at(
            "block in the hypervisor's own memory",
            not.hyp_mem,
            Refused::Address
        ),
        at(
            "block in a page of the hypervisor's pool",
            not.hyp_pool,
            Refused::Address
        ),
        at(
            "block in the victim's donated page",
            not.victim,
            Refused::Address
        ),
        at(
            "block in a host page not shared with the hypervisor",
            unshared,
            Refused::Address
        ),
        Hostile {
            what: "an SVE area in host pages not shared with the hypervisor",
            change: |_| {},
            at: None,
            sve_at: Some(unshared),
            why: Refused::Sve,
        },
    ];
    v.extend(bad_vcpus());
    v.extend(bad_vms());
    v
}

/// Hostile vCPU state: PSTATE, the GIC CPU interface, debug.
fn bad_vcpus() -> [Hostile; 5] {
    [
        hostile("PSTATE EL2h", |b| b.st.regs.pstate = 0x3c9, Refused::Pstate),
        hostile(
            "PSTATE AArch32",
            |b| b.st.regs.pstate = 0x1d3,
            Refused::Pstate,
        ),
        hostile(
            "a list register with the HW bit (physical INTID 27)",
            |b| b.st.gic.lrs[0] = (1 << 62) | (1 << 61) | (27 << 32) | 27,
            Refused::ListRegister,
        ),
        hostile(
            "ICH_HCR_EL2 with TALL1",
            |b| b.st.gic.hcr = 1 | (1 << 12),
            Refused::GicHcr,
        ),
        hostile(
            "16 breakpoints",
            |b| {
                b.st.debug.on = 1;
                b.st.debug.regs.brps = 16;
            },
            Refused::Debug,
        ),
    ]
}

/// Hostile VM registers: stage-2, trap controls, flags, SVE.
fn bad_vms() -> [Hostile; 11] {
    [
        hostile(
            "a host VTTBR for a hyp-managed VM",
            |b| b.vm.vttbr = (7 << 48) | 0x5000_0000,
            Refused::Stage2,
        ),
        hostile(
            "a host-built stage-2 in protected mode",
            |b| {
                b.vm.stage = stage::HOST;
                b.vm.vttbr = (7 << 48) | 0x5000_0000;
            },
            Refused::Untrusted,
        ),
        hostile(
            "HCR_EL2 with TGE",
            |b| b.vm.traps.hcr |= 1 << 27,
            Refused::Hcr,
        ),
        hostile("HCR_EL2 without VM", |b| b.vm.traps.hcr &= !1, Refused::Hcr),
        hostile(
            "CPTR_EL2 trapping the hypervisor's FP",
            |b| b.vm.traps.cptr |= cptr::TFP,
            Refused::Traps,
        ),
        hostile(
            "MDCR_EL2.TDE",
            |b| b.vm.traps.mdcr |= 1 << 8,
            Refused::Traps,
        ),
        hostile(
            "an unknown flag",
            |b| b.vm.flags |= 1 << 5,
            Refused::Feature,
        ),
        hostile(
            "an SVE area at a device address",
            |b| {
                b.vm.traps.cptr &= !cptr::TZ;
                b.sve.area = 0x0900_0000;
                b.sve.vl = 16;
            },
            Refused::Sve,
        ),
        hostile(
            "a coalesced-MMIO zone wrapping around the address space",
            |b| {
                b.coal.base = u64::MAX - 3;
                b.coal.len = 8;
            },
            Refused::Coalesce,
        ),
        hostile(
            "more load answers than the block holds",
            |b| b.coal.shadows = hostrun::SHADOW_MAX as u64 + 1,
            Refused::Coalesce,
        ),
        hostile(
            "a coalesced-MMIO zone longer than a page",
            |b| {
                b.coal.base = 0x0900_0000;
                b.coal.len = 0x2000;
            },
            Refused::Coalesce,
        ),
    ]
}

/// The valid block: the default policy's trap controls, a hyp-managed
/// stage-2 (no VTTBR/VTCR from the host), EL1h at [`UNMAPPED_PC`], a
/// reset (the victim is protected: the hypervisor takes a whole state
/// from the host only then, see [`crate::platform::pview`]).
fn valid_block() -> Option<RunBlock> {
    let policy = VmPolicy::default_for(&idregs::host_ids()).ok()?;
    let mut b = RunBlock::new(VcpuState::new(UNMAPPED_PC, [0; 4], 0));
    b.vm.stage = stage::HYP;
    b.vm.traps = policy.traps;
    b.vm.flags = hostrun::FLAG_RESET;
    Some(b)
}

/// The valid block without the reset: runs the state the hypervisor kept.
fn kept(valid: RunBlock) -> RunBlock {
    let mut b = valid;
    b.vm.flags = 0;
    b
}

/// A value no exit has: a refused block must keep it in its exit.
const SENTINEL: u64 = 0x5e47_1e1e_0000_0001;

/// Whether the block the hypervisor left in `page` is `b` as written: no
/// exit written back (the sentinel), the vCPU's registers and `ZCR_EL1`
/// as they were.
fn unchanged(page: Pa, b: &RunBlock) -> bool {
    let now = read_block(page);
    now.exit == b.exit
        && now.st.regs.x == b.st.regs.x
        && now.st.regs.pc == b.st.regs.pc
        && now.st.regs.pstate == b.st.regs.pstate
        && now.st.gic.lrs == b.st.gic.lrs
        && now.sve.zcr_el1 == b.sve.zcr_el1
}

/// The phase: `true` when every hostile block was refused with its reason
/// and left unchanged, and the valid one ran.
pub fn host_run_phase(hyp: &'static BootHyp, ctx: &HostCtx, not: NotHost, victim: u64) -> bool {
    let Some(valid) = valid_block() else {
        return check("host-attack: HOST_RUN: the default policy", false);
    };
    let Some(unshared) = pool::alloc(0) else {
        return check("host-attack: HOST_RUN: a page", false);
    };
    let list = hostiles(not, unshared.0);
    let pages: Vec<Pa> = (0..=list.len()).filter_map(|_| pool::alloc(0)).collect();
    let shared = pages
        .iter()
        .take_while(|p| call(hyp, id::HOST_SHARE_HYP, [p.0 >> 12, 0]) == ret::SUCCESS)
        .count();
    let mut ok = check(
        "host-attack: HOST_RUN: block pages shared with the hypervisor",
        pages.len() == list.len() + 1 && shared == pages.len(),
    );
    ok = ok && run_phase(hyp, ctx, &list, &pages, (valid, victim));
    ok = ok && pin_phase(hyp, ctx, (pages[0], unshared), victim);
    ok &= tlb_refused(hyp, ctx);
    if ok {
        let el1_vmm = crate::platform::el1boot::current_el() == 1;
        let costs = if el1_vmm {
            el1_cost(hyp, ctx, (valid, victim), pages[list.len()]).map(|ns| (0, 0, ns))
        } else {
            run_costs(hyp, ctx, (valid, victim), pages[list.len()])
        };
        if let (true, Some((_, _, el1))) = (el1_vmm, costs) {
            println!(
                "host-attack: guest run round trip (enter, stage-2 instruction abort, exit; mean of {COST_RUNS}): {el1} ns by HOST_RUN from the VMM at EL1 under the host stage-2"
            );
        } else if let Some((direct, el2, el1)) = costs {
            println!(
                "host-attack: guest run round trip (enter, stage-2 instruction abort, exit; mean of {COST_RUNS}): {direct} ns by the world switch called directly at EL2 (the VMM's path before HOST_RUN), {el2} ns by HOST_RUN from the VMM at EL2, {el1} ns by HOST_RUN from the host at EL1"
            );
        }
        ok &= check("host-attack: HOST_RUN: run costs measured", costs.is_some());
    }
    let unshare = |p: &Pa| call(hyp, id::HOST_UNSHARE_HYP, [p.0 >> 12, 0]) == ret::SUCCESS;
    ok &= check(
        "host-attack: HOST_RUN: block pages unshared after the runs (no pin left)",
        pages[..shared].iter().all(unshare),
    );
    for &p in pages.iter().chain([&unshared]) {
        pool::free(p, 0);
    }
    ok
}

/// The pin `HOST_RUN` takes on a block's page: with the host's `page`
/// (shared with the hypervisor) pinned as a run pins it
/// ([`super::platform::probe::PIN_UNSHARE`]), the host's
/// `HOST_UNSHARE_HYP` of it is refused (`BUSY`); a page not shared
/// (`unshared`) cannot be pinned; no pin is left after; and
/// `HOST_DONATE_GUEST` of the shared block page to the victim is refused.
fn pin_phase(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    (page, unshared): (Pa, Pa),
    victim: u64,
) -> bool {
    use super::platform::{hyp_probe, probe, HYP_PROBE};
    let mut cmds = [
        hvc(HYP_PROBE, &[probe::PIN_UNSHARE, page.0]),
        hvc(HYP_PROBE, &[probe::PIN_UNSHARE, unshared.0]),
        hvc(id::VCPU_LOAD, &[victim, 0]),
        hvc(id::HOST_DONATE_GUEST, &[page.0 >> 12, UNMAPPED_PC >> 12]),
        hvc(id::VCPU_PUT, &[]),
    ];
    if let Err(e) = ctx.run(hyp, &mut cmds) {
        return check(
            &alloc::format!("host-attack: HOST_RUN pins: host run: {e:?}"),
            false,
        );
    }
    let [pinned, not_shared, load, donate, _] = cmds.map(|c| c.regs);
    let busy = pinned[0] == 0 && pinned[1] == 1 && pinned[2] as i64 == ret::BUSY;
    let no_pin = hyp_probe(probe::SHARED, 0).is_some_and(|(_, pins)| pins == 0);
    println!(
        "host-attack: HOST_UNSHARE_HYP of a run block's page while HOST_RUN has it pinned: {} (pinned {}, status {})",
        if busy { "refused" } else { "NOT refused as expected" },
        pinned[1],
        pinned[2] as i64
    );
    let denied = load[0] == 0 && donate[0] as i64 == ret::DENIED;
    println!(
        "host-attack: HOST_DONATE_GUEST of a run block's page (shared with the hypervisor) to the victim: {} (status {})",
        if denied { "refused" } else { "NOT refused as expected" },
        donate[0] as i64
    );
    check("host-attack: HOST_RUN: unshare refused while pinned", busy)
        & check(
            "host-attack: HOST_RUN: a page not shared with the hypervisor is not pinned",
            not_shared[0] == 0 && not_shared[1] == 0,
        )
        & check(
            "host-attack: HOST_RUN: no pin left after the probes",
            no_pin,
        )
        & check(
            "host-attack: HOST_RUN: a shared block page is not donated",
            denied,
        )
}

fn run_phase(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    list: &[Hostile],
    pages: &[Pa],
    (valid, victim): (RunBlock, u64),
) -> bool {
    let mut blocks = Vec::new();
    let mut cmds = alloc::vec![hvc(id::VCPU_LOAD, &[victim, 0])];
    for (h, &page) in list.iter().zip(pages) {
        let mut b = valid;
        b.exit.kind = SENTINEL;
        b.st.regs.x[7] = SENTINEL;
        (h.change)(&mut b);
        if let Some(area) = h.sve_at {
            b.vm.traps.cptr &= !cptr::TZ;
            b.sve.area = area;
            b.sve.vl = 16;
        }
        write_block(page, &b);
        let pa = match h.at {
            Some(0) => page.0 + 8,
            Some(pa) => pa,
            None => page.0,
        };
        blocks.push(b);
        cmds.push(hvc(HOST_RUN, &[pa]));
    }
    let good = pages[list.len()];
    write_block(good, &valid);
    cmds.push(hvc(HOST_RUN, &[good.0]));
    cmds.push(Cmd {
        op: op::CURRENT_EL,
        ..Cmd::default()
    });
    cmds.push(hvc(id::VCPU_PUT, &[]));
    if let Err(e) = ctx.run(hyp, &mut cmds) {
        return check(
            &alloc::format!("host-attack: HOST_RUN phase: host run: {e:?}"),
            false,
        );
    }
    let mut ok = check(
        "host-attack: HOST_RUN: VCPU_LOAD of runner's vCPU 0",
        cmds[0].regs[0] == 0,
    );
    for ((h, b), (c, &page)) in list.iter().zip(&blocks).zip(cmds[1..].iter().zip(pages)) {
        ok &= report(h, c, unchanged(page, b));
    }
    ok &= valid_ran(&cmds[list.len() + 1], good);
    // The host's EL1 context is back after the guest's run (the guest ran
    // with its MMU off): still at EL1 with its own stage-1.
    let el = &cmds[list.len() + 2];
    ok & check(
        "host-attack: HOST_RUN: the host at EL1 with its stage-1 on after the guest's run",
        (el.result >> 2) & 3 == 1 && el.value & 1 == 1,
    )
}

/// One hostile block's outcome; `true` when refused as it must be.
fn report(h: &Hostile, c: &Cmd, unchanged: bool) -> bool {
    let (status, why) = (c.regs[0] as i64, c.regs[1]);
    let refused = status == ret::INVALID_PARAMETER && why == h.why as u64;
    println!(
        "host-attack: HOST_RUN with {}: {} (status {status}, reason {why}, want {:?} = {}; block {})",
        h.what,
        if refused { "refused" } else { "NOT refused as expected" },
        h.why,
        h.why as u64,
        if unchanged { "unchanged" } else { "CHANGED" }
    );
    refused && unchanged
}

/// Whether `e` is how the valid block's run ends: its stage-2
/// instruction abort at [`UNMAPPED_PC`], or a physical interrupt that was
/// pending at EL2 when it entered (the scheduler's tick, which nothing
/// acknowledges while the host context runs).
fn valid_exit(e: &switch::Exit) -> bool {
    (e.kind == EXIT_SYNC && e.esr >> 26 == 0x20) || e.kind == EXIT_IRQ
}

/// The valid block ran (see [`valid_exit`]): the abort at
/// [`UNMAPPED_PC`] shown as its IPA, the PC of the protected vCPU not
/// shown (0).
fn valid_ran(c: &Cmd, page: Pa) -> bool {
    let b = read_block(page);
    let ec = b.exit.esr >> 26;
    println!(
        "host-attack: HOST_RUN with the valid block (runner's vCPU 0 at IPA {UNMAPPED_PC:#x}): status {}, exit kind {}, ESR_EL2 {:#x} (EC {ec:#x}), fault IPA {:#x}, PC shown {:#x}",
        c.regs[0] as i64, b.exit.kind, b.exit.esr, b.exit.far, b.st.regs.pc
    );
    let at = b.exit.kind != EXIT_SYNC || b.exit.far == UNMAPPED_PC;
    check(
        "host-attack: HOST_RUN: the valid block runs (stage-2 instruction abort, or an interrupt)",
        c.regs[0] == 0 && valid_exit(&b.exit.exit()) && at && b.st.regs.pc == 0,
    )
}

/// Runs timed by [`run_costs`], each way.
const COST_RUNS: u64 = 2000;

/// A hypercall from the VMM at EL2 with x0..x2; the status.
fn call(hyp: &'static BootHyp, func: u32, args: [u64; 2]) -> i64 {
    let mut regs = [u64::from(func), args[0], args[1], 0, 0, 0, 0, 0];
    super::platform::hyp_call(Some(hyp), start::cpu_index(), &mut regs);
    regs[0] as i64
}

/// The mean round trip in nanoseconds of running the valid block's vCPU
/// (runner's vCPU 0, loaded on this CPU) to its stage-2 abort
/// [`COST_RUNS`] times (an interrupt exit counts too, see
/// [`valid_exit`]): by the world switch called directly at EL2, by
/// `HOST_RUN` from the VMM at EL2, by `HOST_RUN` from the host at EL1 (the
/// block in `page`). `None` if a run failed.
fn run_costs(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    (valid, victim): (RunBlock, u64),
    page: Pa,
) -> Option<(u64, u64, u64)> {
    let freq = timer::frequency().max(1);
    let ns = |ticks: u64| ticks * 1_000_000_000 / freq / COST_RUNS;
    if call(hyp, id::VCPU_LOAD, [victim, 0]) != ret::SUCCESS {
        return None;
    }
    let c = hyp.loaded_vcpu_context(start::cpu_index())?;
    let (lrs, aprs) = switch::gic_counts();
    let vm = VmRegs {
        vttbr: vttbr(c.s2_root, c.vmid),
        vtcr: vtcr(
            c.geometry.ipa_bits,
            switch::parange(),
            VtcrOptions::default(),
        )
        .ok()?,
        traps: valid.vm.traps,
        pauth: false,
        sme: false,
        ras: false,
        lrs,
        aprs,
    };
    let mut st = valid.st;
    let t0 = timer::now();
    let direct =
        (0..COST_RUNS).all(|_| valid_exit(&switch::run(&vm, &mut st, None, &mut |_, _| false)));
    let t1 = timer::now();
    let mut b = Box::new(kept(valid));
    let pfn = &*b as *const RunBlock as u64 >> 12;
    let shared = call(hyp, id::HOST_SHARE_HYP, [pfn, 0]) == ret::SUCCESS;
    let el2 = (0..COST_RUNS).all(|_| hostrun::call(&mut b).is_ok() && valid_exit(&b.exit.exit()));
    let t2 = timer::now();
    let unshared = call(hyp, id::HOST_UNSHARE_HYP, [pfn, 0]) == ret::SUCCESS;
    (shared && unshared).then_some(())?;
    let put = call(hyp, id::VCPU_PUT, [0, 0]) == ret::SUCCESS;
    let el1 = el1_cost(hyp, ctx, (valid, victim), page);
    (direct && el2 && put).then_some(())?;
    el1.map(|el1| (ns(t1 - t0), ns(t2 - t1), el1))
}

/// The mean round trip in nanoseconds of [`COST_RUNS`] `HOST_RUN`s of the
/// valid block (in `page`) from the host at EL1 (the host context, or the
/// VMM itself there). `None` if a run failed.
fn el1_cost(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    (valid, victim): (RunBlock, u64),
    page: Pa,
) -> Option<u64> {
    let freq = timer::frequency().max(1);
    write_block(page, &kept(valid));
    let mut cmds = [
        hvc(id::VCPU_LOAD, &[victim, 0]),
        Cmd {
            op: op::HVC_LOOP,
            value: COST_RUNS,
            ..hvc(HOST_RUN, &[page.0])
        },
        hvc(id::VCPU_PUT, &[]),
    ];
    ctx.run(hyp, &mut cmds).ok()?;
    let el1 = cmds.iter().all(|c| c.regs[0] == 0) && valid_exit(&read_block(page).exit.exit());
    el1.then(|| cmds[1].result * 1_000_000_000 / freq / COST_RUNS)
}

/// The TLB hypercalls of a host-built stage-2 from the host at EL1 in
/// protected mode (the host is no longer trusted with stage-2s of its
/// own): both refused.
fn tlb_refused(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let vttbr = (7 << 48) | 0x5000_0000;
    let mut cmds = [
        hvc(hostrun::TLB_FLUSH_VMID_IPA, &[vttbr, 0x4000_0000, 0]),
        hvc(hostrun::TLB_FLUSH_VMID, &[vttbr]),
    ];
    if ctx.run(hyp, &mut cmds).is_err() {
        return check("host-attack: TLB hypercalls: host run", false);
    }
    let st = cmds.map(|c| c.regs[0] as i64);
    let refused = st.iter().all(|&s| s == ret::INVALID_PARAMETER);
    println!(
        "host-attack: TLB_FLUSH_VMID_IPA / TLB_FLUSH_VMID of a host-built stage-2 in protected mode: {} (statuses {st:?})",
        if refused { "refused" } else { "NOT refused" }
    );
    check(
        "host-attack: TLB hypercalls refused in protected mode",
        refused,
    )
}
