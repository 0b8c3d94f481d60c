//! The `host-attack` phase for the exits `VCPU_RUN`'s hypervisor answers
//! itself or hands the host in a form its run loop understands: a
//! protected guest, run from the host at EL1 through pkvm-host's run loop
//! ([`super::vcpurun::El1Backend`]), reads an ID register (pkvm-sysreg's
//! sanitised value, answered at EL2), writes a register it is not offered
//! (`LORC_EL1`: an UNDEF injected by the hypervisor, which its vectors
//! step over), cleans a cache line by set/way (trapped: the hypervisor
//! flushes the VM's memory, no UNDEF), branches to an address outside its memslots (pkvm-host's fault
//! pipeline asks for a prefetch abort, the hypervisor injects it at the
//! guest's faulting address, which the host never sees), loads from
//! beyond its IPA size (a data abort, injected the same way), arms its virtual timer and waits in WFI (the host gets the
//! timer's deadline, waits for it and runs the vCPU again), and powers
//! off with what it saw in x1..x3; its secret registers, one of them
//! written to a trapped register (`CNTP_CVAL_EL0`, kept in the vCPU's
//! register file at EL2) and read back, never reach the host.

use alloc::sync::Arc;

use pkvm_host::VcpuExit;
use pkvm_sysreg::IdReg;

use super::a64::{add_imm, guest_image, movk, movz, mrs, msr, ERET, HVC0, ISB, VBAR_EL1, WFI};
use super::el1host::HostCtx;
use super::guest::IPA_BITS;
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::sysregs::VmPolicy;
use super::vcpurun::El1Backend;
use super::{builtin, check, MIB};
use crate::platform::{idregs, timer};
use crate::println;

/// Guest-physical address outside the guest's memslots: the guest branches
/// there (an instruction fetch, which pkvm-host answers with an abort, as
/// KVM does; a data access without a syndrome there is an error for the
/// VMM, KVM's `-ENOSYS`).
const HOLE_IPA: u64 = 0x0be0_0000;
/// The guest's virtual timer, in counter ticks after it arms it.
const TIMER_TICKS: u32 = 0x4000;

const ESR_EL1: (u32, u32, u32, u32, u32) = (3, 0, 5, 2, 0);
const ELR_EL1: (u32, u32, u32, u32, u32) = (3, 0, 4, 0, 1);
const ID_AA64PFR0_EL1: (u32, u32, u32, u32, u32) = (3, 0, 0, 4, 0);
/// `LORC_EL1`: trapped (`HCR_EL2.TLOR`), refused by the table (LOR
/// hidden). (An IMPLEMENTATION DEFINED register would do on hardware with
/// `HCR_EL2.TIDCP`; QEMU 7.2 UNDEFs it at EL1 without trapping.)
const LORC_EL1: (u32, u32, u32, u32, u32) = (3, 0, 10, 4, 3);
const CNTV_TVAL_EL0: (u32, u32, u32, u32, u32) = (3, 3, 14, 3, 0);
const CNTV_CTL_EL0: (u32, u32, u32, u32, u32) = (3, 3, 14, 3, 1);
/// Trapped (`CNTHCTL_EL2.EL1PCEN` clear), kept in the vCPU's register file.
const CNTP_CVAL_EL0: (u32, u32, u32, u32, u32) = (3, 3, 14, 2, 2);

/// The guest's vectors at its first byte (`b main` there); the current-EL
/// synchronous entry (+0x200) counts an UNDEF (EC 0) in x20, an injected
/// abort in x21; it resumes after the instruction, or for a prefetch abort
/// (EC 0x21) at x30 (the caller of the branch outside memory).
const VECTOR: [u32; 13] = [
    mrs(9, ESR_EL1),
    0xd35a_fd29, // lsr x9, x9, #26
    0xb400_00c9, // cbz x9, .+24 (the UNDEF count)
    add_imm(21, 21, 1),
    0xf100_853f, // cmp x9, #0x21
    0x5400_0081, // b.ne .+16 (a data abort: the step over)
    msr(30, ELR_EL1),
    ERET,
    add_imm(20, 20, 1),
    mrs(9, ELR_EL1),
    add_imm(9, 9, 4),
    msr(9, ELR_EL1),
    ERET,
];

/// The guest's main program (at +0x800); powers off by PSCI `SYSTEM_OFF`
/// (`hvc #0`) with x1 = its ID_AA64PFR0_EL1, x2 = UNDEFs | aborts << 32
/// taken, x3 = its `CNTV_CTL_EL0` after the WFI loop, with bit 8 set if
/// its secret x13, written to `CNTP_CVAL_EL0` first thing (a trap the
/// hypervisor answers into the vCPU's register file), read back intact.
const MAIN: [u32; 37] = [
    0x1000_0000 | (0x7_fe00 << 5), // adr x0, .-0x800 (the vectors)
    msr(0, VBAR_EL1),
    ISB,
    movz(10, 0x5ec1, 3),
    movz(11, 0x5ec2, 3),
    movz(12, 0x5ec3, 3),
    movz(13, 0x5ec4, 3),
    msr(13, CNTP_CVAL_EL0),
    mrs(14, CNTP_CVAL_EL0),
    movz(20, 0, 0),
    movz(21, 0, 0),
    mrs(1, ID_AA64PFR0_EL1),
    msr(5, LORC_EL1),
    0xd508_7e40, // dc cisw, x0 (set/way: trapped, the VM's memory flushed)
    movz(6, (HOLE_IPA >> 16) as u32, 1),
    0xd63f_00c0, // blr x6
    movz(6, 1 << (IPA_BITS - 32), 2),
    0xf940_00c7, // ldr x7, [x6] (beyond the VM's IPA size)
    movz(6, TIMER_TICKS, 0),
    msr(6, CNTV_TVAL_EL0),
    movz(6, 1, 0),
    msr(6, CNTV_CTL_EL0),
    ISB,
    WFI,
    mrs(3, CNTV_CTL_EL0),
    0x3617_ffc3, // tbz x3, #2, .-8 (the WFI again until ISTATUS)
    movz(6, 0, 0),
    msr(6, CNTV_CTL_EL0),
    0xeb0d_01df, // cmp x14, x13
    0x9a9f_17ef, // cset x15, eq
    0xaa0f_2063, // orr x3, x3, x15, lsl #8 (the secret kept by EL2)
    0x8b15_8282, // add x2, x20, x21, lsl #32
    movz(0, 0x0008, 0),
    movk(0, 0x8400, 1),
    HVC0,
    0x17ff_ffff, // b .-4
    0,
];

const MAIN_AT: usize = 0x800;
const IMAGE_BYTES: usize = MAIN_AT + MAIN.len() * 4;

static IMAGE: [u8; IMAGE_BYTES] = guest_image(0x200, &VECTOR, MAIN_AT, &MAIN);

/// The guest's secret registers x10..x13.
const SECRETS: [u64; 4] = [0x5ec1 << 48, 0x5ec2 << 48, 0x5ec3 << 48, 0x5ec4 << 48];

/// What the run showed the host.
#[derive(Debug, Default)]
struct Seen {
    /// x1..x3 of the guest's power-off call.
    off: Option<[u64; 3]>,
    /// WFI exits, and those with a timer deadline the host waited for.
    wfis: u32,
    woken: u32,
    other: Option<&'static str>,
}

/// Runs the vCPU through pkvm-host's run loop until it powers off; a WFI
/// exit waits (spinning on the counter) for the deadline the hypervisor
/// returned.
fn drive(vcpu: &mut pkvm_host::Vcpu<BootPlatform, BootProcess>, be: &mut El1Backend) -> Seen {
    let mut s = Seen::default();
    for _ in 0..64 {
        match vcpu.run(be) {
            VcpuExit::Wfi => {
                s.wfis += 1;
                if let Some(d) = be.wake_at.take() {
                    // Bounded: a deadline more than a second away is a bug.
                    let limit = timer::now() + timer::frequency();
                    while timer::now() < d.min(limit) {
                        core::hint::spin_loop();
                    }
                    s.woken += 1;
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::SystemEvent(ev) => {
                if ev.kind == pkvm_host::psci::SystemEventKind::Shutdown {
                    s.off = be.seen.last().map(|r| [r[5], r[6], r[7]]);
                } else {
                    s.other = Some("a system event other than power-off");
                }
                return s;
            }
            e => {
                let tail = &be.seen[be.seen.len().saturating_sub(4)..];
                println!("vcpu-exits: unexpected exit {e:?}; the host's last answers {tail:x?}");
                s.other = Some("an unexpected exit");
                return s;
            }
        }
        if be.failed.is_some() {
            return s;
        }
    }
    s.other = Some("no power-off within 64 exits");
    s
}

/// The phase (see the module's documentation).
pub fn el1_exits(plat: &Arc<BootPlatform>, process: &Arc<BootProcess>, ctx: &HostCtx) -> bool {
    let Some(hyp) = plat.hyp() else {
        return check("vcpu-exits: protected mode", false);
    };
    let host = idregs::host_ids();
    let policy = VmPolicy::default_for(&host);
    let Some(g) = builtin(
        plat,
        process,
        "el1-exits",
        &IMAGE,
        4 * MIB,
        Backing::Page4K,
        true,
        None,
    ) else {
        return check("vcpu-exits: VM created", false);
    };
    let mut be = El1Backend::new(ctx, hyp);
    let s = match g.vm.vcpu(0) {
        Ok(mut vcpu) => drive(&mut vcpu, &mut be),
        Err(_) => Seen {
            other: Some("no vCPU 0"),
            ..Seen::default()
        },
    };
    g.destroy();
    let leaked = SECRETS
        .iter()
        .filter(|x| be.seen.iter().any(|r| r.contains(x)))
        .count();
    let raw = host.get(IdReg::Pfr0);
    let want = policy.map_or(0, |p| p.features.id(IdReg::Pfr0));
    let [pfr0, taken, ctl] = s.off.unwrap_or([0; 3]);
    let (undefs, aborts) = (taken & 0xffff_ffff, taken >> 32);
    println!(
        "vcpu-exits: a protected guest run from the host at EL1 by VCPU_RUN: {} runs; ID_AA64PFR0_EL1 read {pfr0:#x} (sanitised {want:#x}, hardware {raw:#x}); UNDEFs taken {undefs}, aborts taken {aborts}; {} WFI exits, {} woken at the virtual timer's deadline, CNTV_CTL_EL0 after {ctl:#x}; secret registers shown to the host: {leaked} of 4{}",
        be.seen.len(),
        s.wfis,
        s.woken,
        be.failed
            .or(s.other)
            .map_or(alloc::string::String::new(), |w| alloc::format!("; FAILED: {w}")),
    );
    check(
        "vcpu-exits: run to power-off",
        s.off.is_some() && s.other.is_none() && be.failed.is_none(),
    ) & check(
        "vcpu-exits: the ID register read answered with the sanitised value",
        policy.is_ok() && pfr0 == want,
    ) & check(
        "vcpu-exits: an UNDEF injected for the refused register",
        undefs == 1,
    ) & check(
        "vcpu-exits: aborts injected for the fetch outside memslots and the load beyond the IPA size",
        aborts == 2,
    ) & check(
        "vcpu-exits: WFI returned to the host with the timer's deadline, the guest woken",
        s.wfis >= 1 && s.woken >= 1 && ctl & 0b101 == 0b101,
    ) & check(
        "vcpu-exits: a trapped register kept by the hypervisor (written, read back)",
        ctl & 0x100 != 0,
    ) & check("vcpu-exits: no secret register shown", leaked == 0)
}
