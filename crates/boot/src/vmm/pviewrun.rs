//! host-attack's `pview` phase: a protected vCPU run by the VMM's own
//! `HOST_RUN` (as [`super::backend::HwBackend`] runs every VM) through
//! pkvm-host's run loop keeps its registers in the hypervisor
//! ([`crate::platform::pview`]): no block the host gets back holds the
//! guest's secret registers (x10..x13, `TPIDR_EL1`; x5 only in the exit
//! of its own store), the PC shown is always 0, and what the host writes
//! to the guest's x5, PC and `SCTLR_EL1` between two runs changes nothing
//! (the guest stores the three to a device afterwards: its own values).
//! With those writes the host also asks for a reset of the vCPU
//! ([`FLAG_RESET`], at the evil PC): the vCPU has run and its guest asked
//! for no start, so `HOST_RUN` refuses it ([`hostrun::Refused::Reset`])
//! and the guest goes on unaffected; so is its request right after the
//! guest's `CPU_ON` of itself (on: no start pending), and a run whose
//! trap controls differ from the first run's (`HCR_EL2.TID3` clear:
//! [`hostrun::Refused::TrapsChanged`]).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use pkvm_host::fault::GuestFault;
use pkvm_host::{GuestExit, StageTwo, VcpuBackend, VcpuContext, VcpuExit};

use pkvm_hyp::hvc::{id, ret};

use super::a64::{adr, movk, movz, str_x, HVC0};
use super::backend::share_call;
use super::guest::GUEST_RAM;
use super::platform::BootPlatform;
use super::process::{Backing, BootProcess};
use super::sysregs::VmPolicy;
use super::{builtin, check, MIB};
use crate::platform::hostrun::{self, stage, Refused, RunBlock, FLAG_RESET};
use crate::platform::switch::{VcpuState, EXIT_IRQ, EXIT_SYNC, ICH_HCR_EN};
use crate::platform::{gic, idregs, start};
use crate::println;
use pkvm_arch::esr::bits::{ISV, WNR};
use pkvm_arch::esr::{ec, Esr};
use pkvm_sysreg::traps::hcr;

/// Guest-physical address of the test device (no memslot: MMIO).
const DEV_IPA: u64 = 0x0bf0_0000;
/// The vendor-hyp call the guest makes once its secrets are set (the host
/// then tampers with the block).
const MARK: u32 = 0xc600_0000;
/// The guest's secret x10..x13 (`TPIDR_EL1` holds x10's too) and x5.
const SECRETS: [u64; 4] = [0x5ec1 << 48, 0x5ec2 << 48, 0x5ec3 << 48, 0x5ec4 << 48];
const SECRET_X5: u64 = 0x5ec5 << 48;
/// What the host writes between runs: x5, the PC (the guest's power-off
/// call, skipping its stores) and `SCTLR_EL1` with UCI (EL0 cache
/// maintenance allowed: harmless to the guest, visible in its stored
/// value).
const EVIL_X5: u64 = 0xbad0_0005;
const EVIL_PC: u64 = GUEST_RAM + 4 * 20;
const SCTLR_UCI: u64 = 1 << 26;
/// Where `adr x9, .` is: the PC the guest stores.
const PC_STORED: u64 = GUEST_RAM + 4 * 18;

/// `msr tpidr_el1, x10`; `mrs x7, sctlr_el1`; `b .`.
const MSR_TPIDR_EL1_X10: u32 = 0xd518_d080 | 10;
const MRS_X7_SCTLR_EL1: u32 = 0xd538_1000 | 7;
const B_SELF: u32 = 0x1400_0000;

/// The guest: secrets in x10..x13, x5 and `TPIDR_EL1`; a PSCI `CPU_ON`
/// of itself (on: `ALREADY_ON`) with [`EVIL_PC`] as entry, which must not
/// let the host restart it there; the vendor call [`MARK`]; then stores
/// x5, `SCTLR_EL1` and its PC to the device and powers off (PSCI
/// `SYSTEM_OFF`).
const PROGRAM: [u32; 24] = [
    movz(10, 0x5ec1, 3),
    movz(11, 0x5ec2, 3),
    movz(12, 0x5ec3, 3),
    movz(13, 0x5ec4, 3),
    movz(5, 0x5ec5, 3),
    MSR_TPIDR_EL1_X10,
    movz(0, 0x0003, 0),
    movk(0, 0xc400, 1),
    movz(1, 0, 0),
    movz(2, (EVIL_PC & 0xffff) as u32, 0),
    movk(2, (EVIL_PC >> 16) as u32, 1),
    HVC0,
    movz(6, (DEV_IPA >> 16) as u32, 1),
    movz(0, MARK >> 16, 1),
    HVC0,
    str_x(5, 6, 0),
    MRS_X7_SCTLR_EL1,
    str_x(7, 6, 8),
    adr(9, 0),
    str_x(9, 6, 16),
    movz(0, 0x0008, 0),
    movk(0, 0x8400, 1),
    HVC0,
    B_SELF,
];

const fn program_bytes() -> [u8; 96] {
    let mut b = [0u8; 96];
    let mut i = 0;
    while i < PROGRAM.len() {
        let w = PROGRAM[i].to_le_bytes();
        let mut j = 0;
        while j < 4 {
            b[4 * i + j] = w[j];
            j += 1;
        }
        i += 1;
    }
    b
}

static PROGRAM_BYTES: [u8; 96] = program_bytes();

/// One `HOST_RUN` as the host saw it.
struct Seen {
    esr: u64,
    /// The block held one of [`SECRETS`] anywhere.
    secret: bool,
    /// The block held [`SECRET_X5`] anywhere.
    x5: bool,
    pc: u64,
}

/// pkvm-host's backend: each entry is one `HOST_RUN` of its block by the
/// VMM (at EL1 under the host stage-2 by default).
struct PviewBackend {
    run: Box<RunBlock>,
    cpu: usize,
    reset: bool,
    last_call: bool,
    /// Write [`EVIL_X5`], [`EVIL_PC`] and `SCTLR_EL1` (its reset value
    /// with [`SCTLR_UCI`]) into the next block.
    tamper: bool,
    reset_sctlr: u64,
    /// What `HOST_RUN` answered the host's reset request at [`EVIL_PC`]
    /// (with the tampering): `None` if not made, `Some(0)` if accepted.
    evil_reset: Option<u64>,
    /// What `HOST_RUN` answered a later run with `HCR_EL2.TID3` clear (the
    /// guest would read the CPU's real ID registers), as `evil_reset`.
    weak_hcr: Option<u64>,
    /// The guest's last exit was its `CPU_ON` of itself.
    after_cpu_on: bool,
    /// What `HOST_RUN` answered the host's reset request right after the
    /// guest's `CPU_ON` of itself (on), as `evil_reset`.
    on_reset: Option<u64>,
    seen: Vec<Seen>,
    failed: Option<String>,
}

impl PviewBackend {
    fn new(policy: &VmPolicy) -> Self {
        let mut run = Box::new(RunBlock::new(VcpuState::new(0, [0; 4], 0)));
        run.vm.stage = stage::HYP;
        run.vm.traps = policy.traps;
        PviewBackend {
            run,
            cpu: start::cpu_index(),
            reset: true,
            last_call: false,
            tamper: false,
            reset_sctlr: 0,
            evil_reset: None,
            weak_hcr: None,
            after_cpu_on: false,
            on_reset: None,
            seen: Vec::new(),
            failed: None,
        }
    }

    /// The block for the next run, from pkvm-host's `ctx`.
    fn prepare(&mut self, ctx: &VcpuContext) {
        let st = &mut self.run.st;
        if core::mem::take(&mut self.reset) {
            let g = &ctx.gprs;
            *st = VcpuState::new(g.pc, [g.x[0], g.x[1], g.x[2], g.x[3]], 0);
            st.regs.pstate = g.pstate;
            st.sys.sctlr = ctx.sys.sctlr_el1;
            st.gic.hcr = ICH_HCR_EN;
            self.reset_sctlr = ctx.sys.sctlr_el1;
            self.run.vm.flags = FLAG_RESET;
        }
        if core::mem::take(&mut self.last_call) {
            st.regs.x[..4].copy_from_slice(&ctx.gprs.x[..4]);
        }
        if core::mem::take(&mut self.tamper) {
            st.regs.x[5] = EVIL_X5;
            st.regs.pc = EVIL_PC;
            st.sys.sctlr = self.reset_sctlr | SCTLR_UCI;
            self.evil_reset = Some(self.attempt("the host's reset at the evil PC", |b| {
                b.vm.flags = FLAG_RESET;
            }));
            self.weak_hcr = Some(self.attempt("a run with HCR_EL2.TID3 clear", |b| {
                b.vm.traps.hcr &= !hcr::TID3;
            }));
        }
        if core::mem::take(&mut self.after_cpu_on) {
            self.on_reset = Some(self.attempt(
                "the host's reset at the guest's CPU_ON entry",
                |b| {
                    b.vm.flags = FLAG_RESET;
                },
            ));
        }
    }

    /// A run the host asks for with its block changed by `change` (the
    /// block's VM registers put back after): the refusal's reason, 0 if
    /// `HOST_RUN` accepted it (then the phase fails: `what` accepted).
    fn attempt(&mut self, what: &str, change: fn(&mut RunBlock)) -> u64 {
        let vm = self.run.vm;
        change(&mut self.run);
        let r = hostrun::call(&mut self.run);
        self.run.vm = vm;
        match r {
            Ok(()) => {
                self.failed = Some(format!(
                    "{what} accepted (exit ESR {:#x})",
                    self.run.exit.esr
                ));
                0
            }
            Err((_, why)) => why,
        }
    }

    /// Records what the block shows after a run.
    fn record(&mut self) {
        let text = format!("{:x?}", self.run);
        let hex = |v: u64| format!("{v:x}");
        self.seen.push(Seen {
            esr: self.run.exit.esr,
            secret: SECRETS.iter().any(|&s| text.contains(&hex(s))),
            x5: text.contains(&hex(SECRET_X5)),
            pc: self.run.st.regs.pc,
        });
    }
}

const CPU_ON_64: u64 = 0xc400_0003;

impl VcpuBackend for PviewBackend {
    fn cpu(&self) -> usize {
        self.cpu
    }

    fn enter(&mut self, ctx: &mut VcpuContext, _s2: &StageTwo) -> GuestExit {
        if self.seen.len() >= 64 {
            self.failed = Some("more than 64 runs".into());
            return GuestExit::GuestCheckFailed;
        }
        self.prepare(ctx);
        if self.failed.is_some() {
            return GuestExit::GuestCheckFailed;
        }
        let r = hostrun::call(&mut self.run);
        self.run.vm.flags = 0;
        if let Err((status, why)) = r {
            self.failed = Some(format!("HOST_RUN refused: {status} (reason {why})"));
            return GuestExit::GuestCheckFailed;
        }
        self.record();
        let (kind, esr) = (self.run.exit.kind, self.run.exit.esr);
        if kind == EXIT_IRQ || kind == 10 {
            gic::drain();
            return GuestExit::Interrupt;
        }
        if kind != EXIT_SYNC {
            return GuestExit::Unhandled { esr };
        }
        let x = &self.run.st.regs.x;
        match Esr(esr).ec() {
            ec::IABT_LOW | ec::DABT_LOW => {
                let rt = ((esr >> 16) & 0x1f) as usize;
                if esr & (ISV | WNR) == ISV | WNR && rt < 31 {
                    ctx.gprs.x[rt] = x[rt];
                }
                GuestExit::Abort {
                    esr,
                    far: self.run.exit.far,
                    hpfar: self.run.exit.hpfar,
                }
            }
            ec::HVC64 | ec::SMC64 => {
                ctx.gprs.x[..4].copy_from_slice(&x[..4]);
                self.last_call = true;
                self.after_cpu_on = x[0] == CPU_ON_64;
                GuestExit::Call { esr }
            }
            _ => GuestExit::Unhandled { esr },
        }
    }

    fn complete_mmio(&mut self, _ctx: &mut VcpuContext, fault: &GuestFault, value: u64) {
        let r = &mut self.run.st.regs;
        if let (false, Some(s)) = (fault.write, fault.syndrome) {
            if s.srt < 31 {
                r.x[s.srt as usize] = value;
            }
        }
        r.pc = r.pc.wrapping_add(4);
    }

    fn inject_abort(&mut self, _ctx: &mut VcpuContext, _fault: &GuestFault) {
        self.failed = Some("an abort injected".into());
    }

    fn on_reset(&mut self, _ctx: &mut VcpuContext, _start: &pkvm_host::psci::ResetState) {
        self.reset = true;
    }
}

/// What the guest did, as the host saw it.
#[derive(Debug, Default)]
struct Outcome {
    marks: u32,
    stores: Vec<u64>,
    end: super::a64::RunEnd,
}

fn drive(vcpu: &mut pkvm_host::Vcpu<BootPlatform, BootProcess>, be: &mut PviewBackend) -> Outcome {
    let (mut marks, mut stores) = (0, Vec::new());
    let end = super::a64::run_to_event(
        vcpu,
        be,
        |b| b.failed.is_some(),
        |_, be, exit| match exit {
            VcpuExit::Hypercall { func: MARK, .. } => {
                marks += 1;
                be.tamper = marks == 1;
                true
            }
            VcpuExit::Mmio {
                addr,
                write: true,
                data,
                ..
            } if addr.0 & !0xfff == DEV_IPA => {
                stores.push(data);
                true
            }
            _ => false,
        },
    );
    Outcome { marks, stores, end }
}

/// The phase (see the module's doc).
pub fn pview_phase(plat: &Arc<BootPlatform>, process: &Arc<BootProcess>) -> bool {
    let Ok(policy) = VmPolicy::default_for(&idregs::host_ids()) else {
        return check("pview: the default policy", false);
    };
    let Some(g) = builtin(
        plat,
        process,
        "pview",
        &PROGRAM_BYTES,
        4 * MIB,
        Backing::Page4K,
        true,
        None,
    ) else {
        return check("pview: VM created", false);
    };
    let mut be = PviewBackend::new(&policy);
    // In protected mode `HOST_RUN` takes a block only in a page the host
    // shared with the hypervisor (and pins it for the run).
    let Some(hyp) = plat.hyp() else {
        return check("pview: protected mode", false);
    };
    let pfn = &*be.run as *const RunBlock as u64 >> 12;
    let (share, unshare) = (id::HOST_SHARE_HYP, id::HOST_UNSHARE_HYP);
    if !check(
        "pview: the run block shared with the hypervisor",
        share_call(hyp, share, pfn) == ret::SUCCESS,
    ) {
        g.destroy();
        return false;
    }
    let o = match g.vm.vcpu(0) {
        Ok(mut vcpu) => drive(&mut vcpu, &mut be),
        Err(_) => Outcome {
            end: super::a64::RunEnd {
                off: false,
                other: Some("no vCPU 0"),
            },
            ..Outcome::default()
        },
    };
    let unshared = share_call(hyp, unshare, pfn) == ret::SUCCESS;
    let own_store = |s: &Seen| Esr(s.esr).ec() == ec::DABT_LOW && (s.esr >> 16) & 0x1f == 5;
    let secret_runs = be.seen.iter().filter(|s| s.secret).count();
    let x5_elsewhere = be.seen.iter().filter(|s| s.x5 && !own_store(s)).count();
    let pcs_shown = be.seen.iter().filter(|s| s.pc != 0).count();
    let want = [SECRET_X5, be.reset_sctlr, PC_STORED];
    let (reset_why, traps_why) = (Refused::Reset as u64, Refused::TrapsChanged as u64);
    let answer = |a: Option<u64>| match a {
        None => String::from("not made"),
        Some(0) => String::from("ACCEPTED"),
        Some(why) => format!("refused, reason {why}"),
    };
    println!(
        "pview: the host's reset request for the vCPU (which ran, and is on) right after its guest's CPU_ON of itself: {}; at PC {EVIL_PC:#x}: {} (want both refused, reason {reset_why}); a later run with HCR_EL2.TID3 clear: {} (want refused, reason {traps_why})",
        answer(be.on_reset),
        answer(be.evil_reset),
        answer(be.weak_hcr),
    );
    println!(
        "pview: a protected vCPU run by HOST_RUN through pkvm-host's run loop: {} runs; blocks holding a secret of x10..x13/TPIDR_EL1: {secret_runs}; holding x5 outside its own store: {x5_elsewhere}; showing a PC: {pcs_shown}; after the host wrote x5 = {EVIL_X5:#x}, PC = {EVIL_PC:#x}, SCTLR_EL1 = {:#x}: the guest stored x5, SCTLR_EL1, PC = {:x?} (want {want:x?}){}",
        be.seen.len(),
        be.reset_sctlr | SCTLR_UCI,
        o.stores,
        be.failed
            .as_deref()
            .or(o.end.other)
            .map_or(String::new(), |w| format!("; FAILED: {w}")),
    );
    let ok = check(
        "pview: run to power-off",
        o.end.off && o.marks == 1 && o.end.other.is_none() && be.failed.is_none(),
    ) & check(
        "pview: no secret register in a block the host got back",
        secret_runs == 0 && x5_elsewhere == 0 && pcs_shown == 0,
    ) & check(
        "pview: the host's reset of a vCPU that ran refused",
        be.evil_reset == Some(reset_why) && be.on_reset == Some(reset_why),
    ) & check(
        "pview: a later run with weakened trap controls refused",
        be.weak_hcr == Some(traps_why),
    ) & check(
        "pview: the host's writes to x5, PC and SCTLR_EL1 had no effect",
        o.stores == want,
    );
    g.destroy();
    let held = held_by_hyp();
    println!("pview: after teardown HOST_RUN holds the registers of {held} protected vCPUs");
    ok & check("pview: the torn-down VM's registers dropped", held == 0)
        & check("pview: the run block unshared", unshared)
}

/// Protected vCPUs whose registers `HOST_RUN` holds.
fn held_by_hyp() -> usize {
    if crate::platform::el1boot::current_el() == 2 {
        return crate::platform::pview::held();
    }
    super::platform::hyp_probe(super::platform::probe::HELD, 0)
        .map_or(usize::MAX, |(_, n)| n as usize)
}
