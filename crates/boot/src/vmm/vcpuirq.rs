//! The `host-attack` phase for interrupts into a protected vCPU run from
//! the host at EL1: the host, which emulates the vGIC distributor, hands
//! the hypervisor a list register with `VCPU_RUN`'s `LRS` flag; the
//! hypervisor validates it and loads it into the virtual CPU interface
//! for the run; the guest (its own vectors, `ICC_*_EL1`) acknowledges and
//! EOIs the virtual SGI and powers off with the INTID it took; the host
//! reads the list register back ([`VCPU_LRS`]) inactive. List registers
//! with the HW bit set (the host's timer PPI 30, SGI 0: a guest EOI would
//! deactivate the physical interrupt), or naming a special INTID, are
//! refused and change nothing.

use alloc::sync::Arc;

use pkvm_host::VcpuExit;
use pkvm_hyp::hvc::{id, ret};

use super::a64::{guest_image, movk, movz, mrs, msr, HVC0, ISB, VBAR_EL1, WFI};
use super::el1host::HostCtx;
use super::platform::{BootHyp, BootPlatform};
use super::process::{Backing, BootProcess};
use super::vcpurun::{flags, hvc, El1Backend, VCPU_LRS, VCPU_RUN};
use super::{builtin, check, MIB};
use crate::platform::el1host::Cmd;
use crate::println;

/// The virtual SGI the host injects.
const SGI: u64 = 5;
/// Its list register: pending (state 1), group 1, priority 0xa0.
const LR_SGI: u64 = (1 << 62) | (1 << 60) | (0xa0 << 48) | SGI;
/// A hostile list register: HW set, the host's timer PPI 30 as pINTID.
const LR_HW_TIMER: u64 = (1 << 62) | (1 << 61) | (1 << 60) | (0xa0 << 48) | (30 << 32) | 30;
/// A hostile list register: HW set, physical SGI 0.
const LR_HW_SGI: u64 = (1 << 62) | (1 << 61) | (1 << 60) | (0xa0 << 48) | 7;
/// A malformed list register: the special INTID 1023.
const LR_SPECIAL: u64 = (1 << 62) | (1 << 60) | (0xa0 << 48) | 1023;

const ICC_PMR_EL1: (u32, u32, u32, u32, u32) = (3, 0, 4, 6, 0);
const ICC_IAR1_EL1: (u32, u32, u32, u32, u32) = (3, 0, 12, 12, 0);
const ICC_EOIR1_EL1: (u32, u32, u32, u32, u32) = (3, 0, 12, 12, 1);
const ICC_IGRPEN1_EL1: (u32, u32, u32, u32, u32) = (3, 0, 12, 12, 7);
const DAIFCLR_I: u32 = 0xd503_42ff;

/// The guest's IRQ entry (current EL, SPx: +0x280): acknowledges (x1 =
/// the INTID), EOIs, powers off by PSCI `SYSTEM_OFF` with x1, and calls
/// again on every later run.
const IRQ: [u32; 6] = [
    mrs(1, ICC_IAR1_EL1),
    msr(1, ICC_EOIR1_EL1),
    movz(0, 0x0008, 0),
    movk(0, 0x8400, 1),
    HVC0,
    0x17ff_ffff, // b .-4
];

/// The guest's main program (+0x800): its vectors, priority mask open,
/// group 1 on, IRQs unmasked; then WFI forever.
const MAIN: [u32; 11] = [
    0x1000_0000 | (0x7_fe00 << 5), // adr x0, .-0x800 (the vectors)
    msr(0, VBAR_EL1),
    ISB,
    movz(0, 0xff, 0),
    msr(0, ICC_PMR_EL1),
    movz(0, 1, 0),
    msr(0, ICC_IGRPEN1_EL1),
    ISB,
    DAIFCLR_I,
    WFI,
    0x17ff_ffff, // b .-4
];

const IRQ_AT: usize = 0x280;
const MAIN_AT: usize = 0x800;
const IMAGE_BYTES: usize = MAIN_AT + MAIN.len() * 4;

static IMAGE: [u8; IMAGE_BYTES] = guest_image(IRQ_AT, &IRQ, MAIN_AT, &MAIN);

/// Runs the vCPU until it powers off; its first WFI exit gets the SGI's
/// list register on the next run. The INTID the guest took, or why not.
fn drive(
    vcpu: &mut pkvm_host::Vcpu<BootPlatform, BootProcess>,
    be: &mut El1Backend,
) -> Result<u64, &'static str> {
    let mut injected = false;
    for _ in 0..16 {
        match vcpu.run(be) {
            VcpuExit::Wfi if !injected => {
                be.lrs = Some([LR_SGI, 0]);
                injected = true;
            }
            VcpuExit::Wfi | VcpuExit::Interrupted => {}
            VcpuExit::SystemEvent(ev) if ev.kind == pkvm_host::psci::SystemEventKind::Shutdown => {
                return be.seen.last().map(|r| r[5]).ok_or("no answer");
            }
            e => {
                println!("vcpu-irq: unexpected exit {e:?}");
                return Err("an unexpected exit");
            }
        }
        if let Some(w) = be.failed {
            return Err(w);
        }
    }
    Err("no power-off within 16 exits")
}

/// `VCPU_RUN`s of the powered-off vCPU of VM `handle` with hostile list
/// registers: their statuses, and its list registers after them.
fn hostile(hyp: &'static BootHyp, ctx: &HostCtx, handle: u16) -> Option<([i64; 3], u64)> {
    let run = |lr: u64| hvc(VCPU_RUN, &[flags::LRS, 0, 0, 0, 0, lr, 0]);
    let mut cmds = [
        hvc(id::VCPU_LOAD, &[u64::from(handle), 0]),
        run(LR_HW_TIMER),
        run(LR_HW_SGI),
        run(LR_SPECIAL),
        hvc(VCPU_LRS, &[]),
        hvc(id::VCPU_PUT, &[]),
    ];
    ctx.run(hyp, &mut cmds).ok()?;
    let st = |c: &Cmd| c.regs[0] as i64;
    let ok = [&cmds[0], &cmds[4], &cmds[5]]
        .iter()
        .all(|c| st(c) == ret::SUCCESS);
    ok.then(|| ([st(&cmds[1]), st(&cmds[2]), st(&cmds[3])], cmds[4].regs[1]))
}

/// The phase (see the module's documentation).
pub fn el1_irq(plat: &Arc<BootPlatform>, process: &Arc<BootProcess>, ctx: &HostCtx) -> bool {
    let Some(hyp) = plat.hyp() else {
        return check("vcpu-irq: protected mode", false);
    };
    let Some(g) = builtin(
        plat,
        process,
        "el1-irq",
        &IMAGE,
        4 * MIB,
        Backing::Page4K,
        true,
        None,
    ) else {
        return check("vcpu-irq: VM created", false);
    };
    let mut be = El1Backend::new(ctx, hyp);
    be.track_lrs = true;
    let taken = match g.vm.vcpu(0) {
        Ok(mut vcpu) => drive(&mut vcpu, &mut be),
        Err(_) => Err("no vCPU 0"),
    };
    let back = be.lrs_back.map_or(u64::MAX, |l| l[0]);
    let bad = g.vm.handle().and_then(|h| hostile(hyp, ctx, h));
    g.destroy();
    println!(
        "vcpu-irq: the host injected virtual SGI {SGI} by a list register ({LR_SGI:#x}); the guest took INTID {:?}; the list register back after its EOI {back:#x}; hostile list registers (HW with pINTID 30, HW with pINTID 0, INTID 1023): statuses {:?}, the list register after them {:#x}",
        taken,
        bad.map(|b| b.0),
        bad.map_or(u64::MAX, |b| b.1),
    );
    check(
        "vcpu-irq: the guest acknowledged the injected SGI",
        taken == Ok(SGI),
    ) & check(
        "vcpu-irq: the list register came back inactive",
        back == LR_SGI & !(3 << 62),
    ) & check(
        "vcpu-irq: list registers with HW set or a special INTID refused, nothing changed",
        bad.is_some_and(|(s, lr)| s.iter().all(|&s| s != ret::SUCCESS) && lr == back),
    )
}
