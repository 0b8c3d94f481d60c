//! The `host-attack` scenario: the host, deprivileged at EL1 under its
//! stage-2 ([`super::el1host`]), attacks what pkvm-hyp protects, and every
//! attempt must be refused.
//!
//! Two protected toucher VMs write their secret pattern (guest-toucher's
//! `pattern(gpa)`) and power off; they stay alive in the hypervisor (their
//! pages donated). The host, at EL1, then: prints its exception level;
//! reads a word of the VMM's heap (host memory, allowed); loads and stores
//! a page of the victim VM and of the other VM, the hypervisor's pool and
//! image, its `Hyp` and page metadata in its own memory (each an abort the
//! hypervisor injects into the host, which its EL1 vector reports; never a
//! mapping); passes the
//! hypervisor's and the VMs' pages and handles in hypercalls (share with
//! the hypervisor, donate to another VM, reclaim while alive, top up a
//! memcache with a guest's page, unshare a protected page, finalize
//! again); tries to load vCPUs it may not run (an unknown handle, a vCPU
//! the VM does not have, a second vCPU on a busy CPU). Each attempt prints
//! one line with "refused". The guest's data is read back by the
//! hypervisor after the attack: unchanged. Then the victim is torn down
//! and the host, at EL1, reads its former pages: zero.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use pkvm_arch::Pa;
use pkvm_hyp::hvc::{id, ret};

use super::el1host::{HostCtx, HostRun};
use super::guest::GuestVm;
use super::platform::BootHyp;
use super::process::{Backing, BootProcess};
use super::{check, finish, protected_platform, run_vms, toucher, Layout, MIB};
use crate::platform::el1host::{op, Cmd};
use crate::platform::phys;
use crate::println;

/// Guest address of the touch slot.
const TOUCH_GPA: u64 = 0x4400_0000;
/// Bytes of each VM's touch slot (a 2 MiB multiple).
const TOUCH_BYTES: u64 = 2 * MIB;
/// Pages of the victim's touch slot whose secret is checked.
const TOUCH_PAGES: u64 = 16;

/// guest-toucher's pattern at guest address `gpa`.
fn secret(gpa: u64) -> u64 {
    gpa.rotate_left(17) ^ 0x5a5a_1234_9876_a5a5
}

pub(super) fn load(addr: u64) -> Cmd {
    Cmd {
        op: op::LOAD,
        addr,
        ..Cmd::default()
    }
}

pub(super) fn store(addr: u64, value: u64) -> Cmd {
    Cmd {
        op: op::STORE,
        addr,
        value,
        ..Cmd::default()
    }
}

fn hvc(func: u32, args: &[u64]) -> Cmd {
    let mut regs = [0u64; 8];
    regs[0] = func as u64;
    regs[1..=args.len()].copy_from_slice(args);
    Cmd {
        op: op::HVC,
        regs,
        ..Cmd::default()
    }
}

/// One attack and how it must be refused.
struct Attack {
    what: String,
    cmd: Cmd,
    /// `true`: an abort injected at EL1; `false`: a hypercall error.
    abort: bool,
}

fn mem_attack(what: String, cmd: Cmd) -> Attack {
    Attack {
        what,
        cmd,
        abort: true,
    }
}

fn hvc_attack(what: &str, cmd: Cmd) -> Attack {
    Attack {
        what: String::from(what),
        cmd,
        abort: false,
    }
}

/// pkvm-hyp's counters ([`super::platform::HYP_INFO`]: the VMM at EL1
/// may not read the hypervisor's memory).
pub(super) fn hyp_stats() -> pkvm_hyp::HypStats {
    super::platform::hyp_info().unwrap_or_default().stats
}

/// Whether the host stage-2 maps `pa` (the hypervisor's test hook).
pub(super) fn host_mapped(pa: u64) -> bool {
    super::platform::hyp_probe(super::platform::probe::HOST_PTE, pa).is_some_and(|(v, _)| v == 1)
}

/// The word at `pa` of memory the host does not own (a guest's), for the
/// checks: read at EL2 by the VMM there, by the hypervisor's test hook for
/// the VMM at EL1 (whose own load would be refused).
fn hyp_read(pa: Pa) -> u64 {
    if crate::platform::el1boot::current_el() == 2 {
        return phys::read_u64(pa);
    }
    super::platform::hyp_probe(super::platform::probe::READ, pa.0).map_or(!0, |(v, _)| v)
}

/// Prints the attack's outcome; `true` if it was refused.
fn report(a: &Attack) -> bool {
    let c = &a.cmd;
    let (refused, how) = if a.abort {
        let ec = c.esr >> 26;
        if c.esr == 0 {
            println!(
                "host-attack: {}: NOT refused (no abort: the access went through, load result {:#x})",
                a.what, c.result
            );
            return false;
        }
        (
            ec == 0x25 && c.esr & 0x3f == 0x10 && c.far == c.addr,
            format!(
                "abort injected into the host at EL1: ESR_EL1 {:#x} (EC {ec:#x}, FSC {:#x}), FAR_EL1 {:#x}",
                c.esr,
                c.esr & 0x3f,
                c.far
            ),
        )
    } else {
        let status = c.regs[0] as i64;
        (
            status != ret::SUCCESS,
            format!("hypercall returned {status}"),
        )
    };
    if refused {
        println!("host-attack: {}: refused ({how})", a.what);
    } else {
        println!("host-attack: {}: NOT refused ({how})", a.what);
    }
    refused
}

/// Two protected toucher VMs, run until they power off (alive after).
fn victims(
    plat: &Arc<super::platform::BootPlatform>,
    process: &Arc<BootProcess>,
) -> Option<[Arc<GuestVm>; 2]> {
    let slot = (TOUCH_GPA, TOUCH_BYTES);
    let mk = |name| toucher(plat, process, name, 128 * MIB, slot, Backing::Page4K, true);
    let vms = [mk("victim")?, mk("other")?];
    run_vms(&vms).then_some(vms)
}

/// The victim's secret words (PA, expected value) at offsets 0 and 4088 of
/// each touched page.
fn secrets(v: &GuestVm) -> Option<alloc::vec::Vec<(Pa, u64)>> {
    let mut out = alloc::vec::Vec::new();
    for p in 0..TOUCH_PAGES {
        let pa = v.touch_pa(p * 4096)?;
        for off in [0u64, 4088] {
            out.push((Pa(pa.0 + off), secret(TOUCH_GPA + p * 4096 + off)));
        }
    }
    Some(out)
}

/// Loads and stores at pages the host does not own: each must end in an
/// abort injected into the host.
fn mem_attacks(secret_pa: Pa, other_pa: Pa, hyp: HypAddrs) -> alloc::vec::Vec<Attack> {
    let image = 0x4020_0000u64;
    let (s, o) = (secret_pa.0, other_pa.0);
    let (hyp_pool, state, meta, heap_end) = (hyp.pool, hyp.state, hyp.heap.0, hyp.heap.1 - 8);
    alloc::vec![
        mem_attack(
            format!("load from the victim VM's donated page {s:#x}"),
            load(s)
        ),
        mem_attack(
            format!("store to the victim VM's donated page {s:#x}"),
            store(s, 0xbad0_bad0_bad0_bad0)
        ),
        mem_attack(
            format!("load from the other VM's donated page {o:#x}"),
            load(o)
        ),
        mem_attack(
            format!("map a hypervisor pool page {hyp_pool:#x} (load)"),
            load(hyp_pool)
        ),
        mem_attack(
            format!("map a hypervisor pool page {hyp_pool:#x} (store)"),
            store(hyp_pool, 0)
        ),
        mem_attack(
            format!("store to the hypervisor's image (its code) {image:#x}"),
            store(crate::platform::el1boot::writable_alias(image), 0)
        ),
        mem_attack(
            format!("load from the hypervisor's state (its Hyp) {state:#x}"),
            load(state)
        ),
        mem_attack(
            format!("store to the hypervisor's state (its Hyp) {state:#x}"),
            store(state, 0)
        ),
        mem_attack(
            format!("store to the hypervisor's page metadata {meta:#x}"),
            store(meta, 0)
        ),
        mem_attack(
            format!("load from the end of the hypervisor's own memory {heap_end:#x}"),
            load(heap_end)
        ),
    ]
}

/// Where the hypervisor's memory is: a pool page, its `Hyp`, and its own
/// memory (`platform::hypmem`, the page metadata at its start).
#[derive(Clone, Copy)]
struct HypAddrs {
    pool: u64,
    state: u64,
    heap: (u64, u64),
}

impl HypAddrs {
    fn of(hyp: &'static BootHyp, lay: &Layout) -> HypAddrs {
        HypAddrs {
            pool: lay.hyp_pool.0,
            state: core::ptr::from_ref(hyp) as u64,
            heap: lay.hyp_heap,
        }
    }
}

/// Hypercalls passing the hypervisor's and the VMs' pages and handles:
/// each must be refused with a status.
fn hvc_attacks(spfn: u64, hyp: HypAddrs, (vh, oh): (u64, u64)) -> alloc::vec::Vec<Attack> {
    let (hyp_pfn, state_pfn) = (hyp.pool >> 12, hyp.state >> 12);
    let gfn = TOUCH_GPA >> 12;
    let code_pfn = crate::platform::hypmem::image_parts().code.0 >> 12;
    let percpu_pfn = crate::platform::start::percpu_addr() >> 12;
    let setup = |what: &str, cmd| Attack {
        what: format!("(setup) {what}"),
        cmd,
        abort: false,
    };
    alloc::vec![
        hvc_attack(
            "HOST_SHARE_HYP of a hypervisor pool page",
            hvc(id::HOST_SHARE_HYP, &[hyp_pfn])
        ),
        hvc_attack(
            "HOST_SHARE_HYP of the hypervisor's state page",
            hvc(id::HOST_SHARE_HYP, &[state_pfn])
        ),
        hvc_attack(
            "TOPUP_MEMCACHE of the victim with the hypervisor's state page",
            hvc(id::TOPUP_MEMCACHE, &[vh, state_pfn, 1])
        ),
        hvc_attack(
            "HOST_SHARE_HYP of the image's code page (hyp-owned, host read-only)",
            hvc(id::HOST_SHARE_HYP, &[code_pfn])
        ),
        hvc_attack(
            "TOPUP_MEMCACHE of the victim with the image's code page",
            hvc(id::TOPUP_MEMCACHE, &[vh, code_pfn, 1])
        ),
        hvc_attack(
            "HOST_SHARE_HYP of the hypervisor's per-CPU data page (.bss.hyp)",
            hvc(id::HOST_SHARE_HYP, &[percpu_pfn])
        ),
        hvc_attack(
            "HOST_SHARE_HYP of the victim's page",
            hvc(id::HOST_SHARE_HYP, &[spfn])
        ),
        hvc_attack(
            "HOST_UNSHARE_HYP of a hypervisor pool page",
            hvc(id::HOST_UNSHARE_HYP, &[hyp_pfn])
        ),
        hvc_attack(
            "TOPUP_MEMCACHE of the other VM with the victim's page",
            hvc(id::TOPUP_MEMCACHE, &[oh, spfn, 1])
        ),
        hvc_attack(
            "HOST_UNSHARE_GUEST of the victim's donated page",
            hvc(id::HOST_UNSHARE_GUEST, &[vh, gfn])
        ),
        hvc_attack(
            "RECLAIM_GUEST_PAGE of the live victim's page",
            hvc(id::RECLAIM_GUEST_PAGE, &[vh, gfn])
        ),
        hvc_attack(
            "START_TEARDOWN of an unknown handle",
            hvc(id::START_TEARDOWN, &[0x7fff])
        ),
        hvc_attack(
            "VCPU_LOAD of an unknown handle",
            hvc(id::VCPU_LOAD, &[0x7fff, 0])
        ),
        hvc_attack(
            "VCPU_LOAD of a vCPU the victim does not have",
            hvc(id::VCPU_LOAD, &[vh, 5])
        ),
        // With the other VM's vCPU loaded on this CPU: the victim's page
        // donated to it, and a second vCPU on the busy CPU.
        setup(
            "VCPU_LOAD of the other VM's vCPU 0",
            hvc(id::VCPU_LOAD, &[oh, 0])
        ),
        hvc_attack(
            "HOST_DONATE_GUEST of the victim's page to the other VM",
            hvc(id::HOST_DONATE_GUEST, &[spfn, gfn + 4096])
        ),
        hvc_attack(
            "VCPU_LOAD of the victim's vCPU 0 on a CPU running another vCPU",
            hvc(id::VCPU_LOAD, &[vh, 0])
        ),
        setup("VCPU_PUT", hvc(id::VCPU_PUT, &[])),
        hvc_attack("FINALIZE again", hvc(id::FINALIZE, &[])),
    ]
}

fn attacks(
    hyp: HypAddrs,
    victim: &GuestVm,
    other: &GuestVm,
    secret_pa: Pa,
) -> Option<alloc::vec::Vec<Attack>> {
    let other_pa = other.touch_pa(0)?;
    let handles = (victim.kick_id() as u64, other.kick_id() as u64);
    let mut v = mem_attacks(secret_pa, other_pa, hyp);
    v.extend(hvc_attacks(secret_pa.0 >> 12, hyp, handles));
    Some(v)
}

fn print_run(what: &str, r: &HostRun) {
    println!(
        "host-attack: {what}: {} hypercalls served as world-switch exits (the rest by the vectors' fast path), {} host stage-2 faults mapped, {} aborts injected, {} interrupts at EL2",
        r.hvcs, r.mapped, r.injected, r.irqs
    );
}

/// Runs the attacks at EL1; `true` if every one was refused and the
/// victim's data is unchanged.
fn attack_phase(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    lay: &Layout,
    vms: &[Arc<GuestVm>; 2],
) -> bool {
    let Some(sec) = secrets(&vms[0]) else {
        return check("host-attack: the victim's touched pages", false);
    };
    let in_place = |s: &[(Pa, u64)]| s.iter().all(|&(pa, v)| hyp_read(pa) == v);
    let mut ok = check(
        "host-attack: the victim's secret is in its pages",
        in_place(&sec),
    );
    let addrs = HypAddrs::of(hyp, lay);
    let Some(mut list) = attacks(addrs, &vms[0], &vms[1], sec[0].0) else {
        return check("host-attack: the other VM's touched page", false);
    };
    if let Some(o) = vms[1].touch_pa(0) {
        ok &= hvc_sweep(hyp, ctx, lay, [sec[0].0 .0, o.0], &sec);
    }
    // A word of the VMM's heap (host memory): the host reads it at EL1.
    let word = alloc::boxed::Box::new(0x4845_4150_u64.rotate_left(29));
    let word_pa = core::ptr::from_ref(&*word) as u64;
    let mut cmds: alloc::vec::Vec<Cmd> = alloc::vec![
        Cmd {
            op: op::CURRENT_EL,
            ..Cmd::default()
        },
        load(word_pa)
    ];
    cmds.extend(list.iter().map(|a| a.cmd));
    let r = match ctx.run(hyp, &mut cmds) {
        Ok(r) => r,
        Err(e) => return check(&format!("host-attack: host run: {e:?}"), false),
    };
    let el = (cmds[0].result >> 2) & 3;
    let sctlr = cmds[0].value;
    println!(
        "host-attack: the host runs at EL{el} (CurrentEL = {:#x}) with its own stage-1 in host memory (SCTLR_EL1 = {sctlr:#x}, M = {})",
        cmds[0].result,
        sctlr & 1
    );
    ok &= check("host-attack: host at EL1", el == 1);
    ok &= check("host-attack: host stage-1 on", sctlr & 1 == 1);
    let heap = &cmds[1];
    println!(
        "host-attack: the host reads the VMM's heap (host memory) at {word_pa:#x}: {:#x} (ESR_EL1 {:#x}); the hypervisor's own memory is {:#x}..{:#x}",
        heap.result, heap.esr, addrs.heap.0, addrs.heap.1
    );
    ok &= check(
        "host-attack: the VMM's heap is host memory",
        heap.esr == 0 && heap.result == *word,
    );
    for (a, c) in list.iter_mut().zip(&cmds[2..]) {
        a.cmd = *c;
        if a.what.starts_with("(setup)") {
            ok &= check(&a.what, c.regs[0] as i64 == ret::SUCCESS);
        } else {
            ok &= report(a);
        }
    }
    print_run("attack run", &r);
    ok &= check("host-attack: the victim's data unchanged", in_place(&sec));
    let mapped = host_mapped;
    ok &= check(
        "host-attack: no host stage-2 mapping of the hypervisor's pool",
        !mapped(addrs.pool),
    );
    ok &= check(
        "host-attack: no host stage-2 mapping of the hypervisor's own memory",
        (addrs.heap.0..addrs.heap.1)
            .step_by(4096)
            .all(|pa| !mapped(pa)),
    );
    let live = hyp_stats().live_vms;
    println!("host-attack: {live} VMs still live in the hypervisor after the attacks");
    ok &= check("host-attack: both VMs live", live == 2);
    ok
}

/// The host takes its own timer interrupt at EL1: PPI 30 (the EL1
/// physical timer) through the GIC CPU interface it owns, while
/// `HCR_EL2.IMO` is clear.
fn own_timer(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let cpu = crate::platform::start::cpu_index();
    let Some(reg) = crate::platform::gic::isenabler0(cpu) else {
        return check("host-attack: the GIC redistributor of this CPU", false);
    };
    let ticks = crate::platform::timer::ticks_for_us(1000);
    let mut cmd = [Cmd {
        op: op::TIMER_IRQ,
        addr: reg,
        value: ticks,
        ..Cmd::default()
    }];
    let r = match ctx.run(hyp, &mut cmd) {
        Ok(r) => r,
        Err(e) => return check(&format!("host-attack: host run: {e:?}"), false),
    };
    let intid = cmd[0].result;
    println!(
        "host-attack: the host took its own timer interrupt at EL1: INTID {intid} acknowledged with ICC_IAR1_EL1 {} ticks after arming CNTP for {ticks} (HCR_EL2.IMO clear; {} interrupts reached EL2)",
        cmd[0].esr, r.irqs
    );
    check(
        "host-attack: the host's timer interrupt taken at EL1",
        intid == u64::from(crate::platform::gic::PPI_EL1_PHYS) && r.irqs == 0,
    )
}

fn smc(func: u32, args: &[u64]) -> Cmd {
    Cmd {
        op: op::SMC,
        ..hvc(func, args)
    }
}

/// PSCI from the host at EL1: its SMCs trap to the hypervisor
/// (`HCR_EL2.TSC`), which forwards `VERSION` to the firmware, answers
/// `CPU_ON` of an online CPU `ALREADY_ON` and refuses `SYSTEM_OFF`.
fn host_psci(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    use pkvm_arch::smccc::psci;
    let mpidr1 = 1u64;
    let mut cmds = [
        smc(psci::VERSION, &[]),
        smc(psci::CPU_ON_64, &[mpidr1, 0x5000_0000, 0]),
        smc(psci::SYSTEM_OFF, &[]),
    ];
    if let Err(e) = ctx.run(hyp, &mut cmds) {
        return check(&format!("host-attack: host run: {e:?}"), false);
    }
    let [v, on, off] = cmds.map(|c| c.regs[0] as i64);
    println!(
        "host-attack: PSCI from the host at EL1 (SMC trapped by HCR_EL2.TSC): VERSION = {v:#x} (from the firmware), CPU_ON of the online CPU 1 = {on} (ALREADY_ON), SYSTEM_OFF = {off}: refused"
    );
    check("host-attack: PSCI VERSION 1.x", v >> 16 == 1)
        & check("host-attack: CPU_ON of an online CPU", on == -4)
        & check(
            "host-attack: SYSTEM_OFF refused",
            off == pkvm_arch::smccc::ret::NOT_SUPPORTED,
        )
}

/// Hostile hypercalls in [`hvc_sweep`].
const SWEEP_CALLS: usize = 2000;

/// Every host hypercall but `RESERVE_VM` (which takes no argument and
/// legitimately succeeds).
const SWEEP_IDS: [u32; 20] = {
    let mut out = [0; 20];
    let (mut i, mut n) = (0, 0);
    while i < id::ALL.len() {
        if id::ALL[i] != id::RESERVE_VM {
            out[n] = id::ALL[i];
            n += 1;
        }
        i += 1;
    }
    out
};

/// Random hypercalls from the host at EL1 (a fixed-seed generator), each
/// argument drawn from values the host may not use: the hypervisor's pool
/// and image frames (its code, its per-CPU data, an EL2 stack), the VMs' donated frames, frames past the ABI's
/// limit, handles never issued, all ones. Every call must be refused and
/// change nothing: the hypervisor's counters and the victim's secret are
/// compared before and after.
fn hvc_sweep(
    hyp: &'static BootHyp,
    ctx: &HostCtx,
    lay: &Layout,
    bad: [u64; 2],
    sec: &[(Pa, u64)],
) -> bool {
    let hostile = [
        lay.hyp_heap.0 >> 12,
        core::ptr::from_ref(hyp) as u64 >> 12,
        lay.hyp_pool.0 >> 12,
        (lay.carveout.1 - 4096) >> 12,
        0x4020_0000 >> 12,
        crate::platform::start::percpu_addr() >> 12,
        crate::platform::start::stack_range(0).0 >> 12,
        bad[0] >> 12,
        bad[1] >> 12,
        1 << 36,
        u64::MAX,
        0x7fff,
        4096 + 63,
        0,
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cmds: alloc::vec::Vec<Cmd> = (0..SWEEP_CALLS)
        .map(|_| {
            let f = SWEEP_IDS[next() as usize % SWEEP_IDS.len()];
            let args: [u64; 4] = core::array::from_fn(|_| hostile[next() as usize % hostile.len()]);
            hvc(f, &args)
        })
        .collect();
    let before = hyp_stats();
    if let Err(e) = ctx.run(hyp, &mut cmds) {
        return check(&format!("host-attack: host run: {e:?}"), false);
    }
    let after = hyp_stats();
    let accepted: alloc::vec::Vec<&Cmd> = cmds
        .iter()
        .filter(|c| c.regs[0] as i64 == ret::SUCCESS)
        .collect();
    for c in accepted.iter().take(4) {
        println!("host-attack: hypercall sweep: NOT refused: {:x?}", c.regs);
    }
    let unchanged = before == after && sec.iter().all(|&(pa, v)| hyp_read(pa) == v);
    println!(
        "host-attack: {} hostile hypercalls from the host at EL1: {} refused; the hypervisor's counters and the victim's data {}",
        cmds.len(),
        cmds.len() - accepted.len(),
        if unchanged { "unchanged" } else { "CHANGED" }
    );
    check(
        "host-attack: every hostile hypercall refused",
        accepted.is_empty(),
    ) & check("host-attack: refused hypercalls change nothing", unchanged)
}

/// A protected guest's MMIO as the host sees it: only the syndrome, the
/// fault's IPA and the one register of the access; none of the secrets
/// in the guest's other registers; the value the host answers a load
/// with lands in the guest's register.
fn protected_view(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let secrets = [
        0x5ec7_e700_0000_0001,
        0x5ec7_e700_0000_0002,
        0x5ec7_e700_0000_0003,
        0x5ec7_e700_0000_0004,
    ];
    let (ipa, value, answer) = (0x0bf0_0010u64, 0x1234_5678u64, 0xfeed_f00du64);
    let Some((seen, x7)) = super::el1host::protected_mmio(hyp, ctx, secrets, (ipa, value, answer))
    else {
        return check("host-attack: protected null guest runs", false);
    };
    let leaked = seen
        .iter()
        .flatten()
        .filter(|w| secrets.contains(w))
        .count();
    let [st, ld, hv] = seen;
    let srt = |r: &[u64; 8]| (r[2] >> 16) & 0x1f;
    println!(
        "host-attack: a protected guest's MMIO as the host at EL1 sees it: store: ESR {:#x} (SRT x{}), IPA {:#x}, value {:#x}; load: ESR {:#x} (SRT x{}), answered {answer:#x}, the guest's x7 now {x7:#x}; then its hvc: ESR {:#x}; guest registers shown: only the stored one, {leaked} of its 4 secret registers",
        st[2],
        srt(&st),
        st[3],
        st[5],
        ld[2],
        srt(&ld),
        hv[2]
    );
    check(
        "host-attack: MMIO store seen with its register",
        st[3] == ipa && st[5] == value && srt(&st) == 5,
    ) & check(
        "host-attack: MMIO load answered",
        srt(&ld) == 7 && x7 == answer,
    ) & check(
        "host-attack: the guest's hvc",
        hv[1] == 8 && hv[2] >> 26 == 0x16,
    ) & check(
        "host-attack: no other guest register shown to the host",
        leaked == 0,
    )
}

/// Device addresses the host faults on in [`device_storm`]: one per 2 MiB
/// of QEMU virt's PCIe MMIO window and above, below RAM (each a new
/// last-level table of the host stage-2).
const STORM_FAULTS: u64 = 384;

/// A hostile host faults on [`STORM_FAULTS`] device addresses, each
/// costing the hypervisor a stage-2 table page: the device-mapping budget
/// must keep the pool's use bounded (the hypervisor unmaps every host
/// device mapping and starts over when it runs out).
fn device_storm(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let before = hyp_stats().pool_free;
    let mut cmds: alloc::vec::Vec<Cmd> = (0..STORM_FAULTS)
        .map(|k| load(0x1000_0000 + k * 2 * MIB))
        .collect();
    let r = match ctx.run(hyp, &mut cmds) {
        Ok(r) => r,
        Err(e) => return check(&format!("host-attack: host run: {e:?}"), false),
    };
    let after = hyp_stats().pool_free;
    let used = before.saturating_sub(after);
    let bound = pkvm_hyp::HOST_DEV_TABLES + 4;
    println!(
        "host-attack: device-fault storm: {} host stage-2 faults on device pages mapped ({} loads ended in an external abort), hyp pool {before} -> {after} free pages ({used} used, budget {}): {}",
        r.mapped,
        cmds.iter().filter(|c| c.esr != 0).count(),
        pkvm_hyp::HOST_DEV_TABLES,
        if used <= bound { "refused to drain" } else { "DRAINED" }
    );
    check(
        "host-attack: device-fault storm mapped",
        r.mapped >= STORM_FAULTS,
    ) & check("host-attack: device-fault storm bounded", used <= bound)
}

/// After the victim's teardown: the host, at EL1, reads its former pages.
fn zeroed_phase(hyp: &'static BootHyp, ctx: &HostCtx, sec: &[(Pa, u64)]) -> bool {
    let words: alloc::vec::Vec<(Pa, u64)> = sec
        .iter()
        .copied()
        .filter(|(pa, _)| !ctx.owns(*pa))
        .collect();
    let mut cmds: alloc::vec::Vec<Cmd> = words.iter().map(|&(pa, _)| load(pa.0)).collect();
    let r = match ctx.run(hyp, &mut cmds) {
        Ok(r) => r,
        Err(e) => return check(&format!("host-attack: host run: {e:?}"), false),
    };
    print_run("read-back run", &r);
    let zero = cmds.iter().all(|c| c.esr == 0 && c.result == 0);
    println!(
        "host-attack: after teardown the host read {} secret words of the victim's first {} pages at EL1: {}",
        cmds.len(),
        TOUCH_PAGES,
        if zero { "all zero" } else { "NOT all zero" }
    );
    check("host-attack: the victim's pages come back zeroed", zero)
}

/// The host is the VMM itself at EL1 under the host stage-2: every
/// attack below runs in place ([`HostCtx::run`]). Its null hypercall is
/// timed; `NULL_RUN`'s null guest (set up by the VMM at EL2 from the
/// hypervisor's state) is not run: `VCPU_RUN` and `HOST_RUN` are.
fn vmm_at_el1(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let Some(ns) = ctx.null_hvc_ns(hyp, true) else {
        return check("host-attack: null hypercalls from EL1 succeed", false);
    };
    let el = crate::platform::el1boot::current_el() << 2;
    let hcr_vm = super::platform::hyp_info().is_some_and(|_| {
        // The VMM's own accesses are translated by the host stage-2: a
        // load of the hypervisor's pool is refused.
        crate::platform::el1boot::probe_load(super::platform::hyp_pool_base()).is_err()
    });
    println!(
        "host-attack: the host is the VMM itself at EL{} (CurrentEL {el:#x}) under the host stage-2 (a probe of the hypervisor's pool {})",
        (el >> 2) & 3,
        if hcr_vm { "refused" } else { "NOT refused" },
    );
    println!(
        "host-attack: null hypercall (GET_SIZES) from the host at EL1: {ns} ns from the VMM itself, served in place at EL2 (mean of {})",
        super::platform::NULL_HVC_CALLS
    );
    check("host-attack: the VMM at EL1", (el >> 2) & 3 == 1)
        & check("host-attack: the VMM under the host stage-2", hcr_vm)
}

/// The host context entered by the world switch from the VMM at EL2: the
/// costs of its hypercalls and null guest runs, and a protected guest's
/// MMIO as it sees it.
fn mini_host(hyp: &'static BootHyp, ctx: &HostCtx) -> bool {
    let (Some(fast), Some(slow)) = (ctx.null_hvc_ns(hyp, true), ctx.null_hvc_ns(hyp, false)) else {
        return check("host-attack: null hypercalls from EL1 succeed", false);
    };
    println!(
        "host-attack: null hypercall (GET_SIZES) from the host at EL1: {fast} ns in place at EL2, {slow} ns through a full world-switch exit (mean of {})",
        super::platform::NULL_HVC_CALLS
    );
    let Some((el2, el1)) = super::el1host::null_run_cost(hyp, ctx) else {
        return check("host-attack: null guest runs", false);
    };
    println!(
        "host-attack: null guest run round trip (enter, hvc #0, exit; mean of {}): {el2} ns by the world switch from EL2 (as the VMM runs vCPUs today), {el1} ns from the host at EL1 by a hypercall that saves and restores the host's EL1 context around it",
        super::el1host::NULL_RUNS
    );
    protected_view(hyp, ctx)
}

/// The scenario.
pub fn host_attack(lay: &Layout, process: &Arc<BootProcess>) -> bool {
    let Some(plat) = protected_platform(lay) else {
        return false;
    };
    let Some(hyp) = plat.hyp() else {
        return false;
    };
    let Some(ctx) = HostCtx::new() else {
        return check("host-attack: two host pages", false);
    };
    let mut ok = if crate::platform::el1boot::current_el() == 1 {
        vmm_at_el1(hyp, &ctx)
    } else {
        mini_host(hyp, &ctx)
    };
    // Before any VM runs: no scheduler tick or kick is pending on this CPU.
    ok &= own_timer(hyp, &ctx);
    ok &= host_psci(hyp, &ctx);
    ok &= super::vcpurun::el1_run(&plat, process, &ctx);
    ok &= super::vcpuexits::el1_exits(&plat, process, &ctx);
    ok &= super::vcpuirq::el1_irq(&plat, process, &ctx);
    ok &= super::pviewrun::pview_phase(&plat, process);
    let Some(vms) = victims(&plat, process) else {
        return false;
    };
    let sec = secrets(&vms[0]);
    ok &= attack_phase(hyp, &ctx, lay, &vms);
    ok &= super::imagemem::image_phase(hyp, &ctx);
    ok &= device_storm(hyp, &ctx);
    let addrs = HypAddrs::of(hyp, lay);
    let not = super::runblock::NotHost {
        hyp_mem: addrs.heap.0,
        hyp_pool: addrs.pool,
        victim: vms[0].touch_pa(0).map_or(0, |p| p.0),
    };
    // A protected vCPU that never ran (the victim's did), initialised in
    // pkvm-hyp: the valid block's reset is its first run, the only one the
    // hypervisor takes from the host whole (`platform::pview`).
    let runner = toucher(
        &plat,
        process,
        "runner",
        128 * MIB,
        (TOUCH_GPA, TOUCH_BYTES),
        Backing::Page4K,
        true,
    );
    let Some(runner) = runner.filter(|g| {
        g.vm.ensure_hyp_init(crate::platform::start::cpu_index())
            .is_ok()
    }) else {
        return check(
            "host-attack: HOST_RUN: a protected VM that never ran",
            false,
        );
    };
    ok &= super::runblock::host_run_phase(hyp, &ctx, not, u64::from(runner.kick_id()));
    runner.destroy();
    let [victim, other] = vms;
    ok &= finish(victim);
    if let Some(sec) = sec {
        ok &= zeroed_phase(hyp, &ctx, &sec);
    }
    ok &= finish(other);
    let s = hyp_stats();
    let shared = super::platform::hyp_probe(super::platform::probe::SHARED, 0);
    println!(
        "host-attack: after teardown: {} live VMs, {} pages held for VMs, pool {} of {} pages free; (pages shared with the hypervisor, pins): {shared:?}",
        s.live_vms, s.vm_pages, s.pool_free, s.pool_pages
    );
    ok & check(
        "host-attack: every VM torn down after the storm",
        s.live_vms == 0 && s.vm_pages == 0,
    ) & check(
        "host-attack: every vCPU's run pages unshared at teardown, no pin left",
        shared == Some((0, 0)),
    )
}
