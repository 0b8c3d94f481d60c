//! GICv3 guest: interrupts through pkvm-rs's vGIC, for 2 vCPUs.
//!
//! vCPU 0 turns its MMU on (atomics between vCPUs), enables the
//! distributor (Group 1, affinity routing), wakes its redistributor and
//! turns its CPU interface on (system registers: `ICC_SRE_EL1.SRE` must
//! read 1, PMR open, Group 1 on). With interrupts masked in PSTATE (a
//! pending interrupt still ends a WFI) it then:
//!
//! 0. reads `GICD_CTLR` with a 16-bit load, which must come back as an
//!    injected synchronous external data abort at that address;
//! 1. arms the virtual timer 10 ms ahead with PPI 27 enabled, waits in WFI
//!    and acknowledges (`ICC_IAR1_EL1`) until it gets INTID 27, checks the
//!    deadline had passed, masks the timer and EOIs; then the same with the
//!    emulated EL1 physical timer (PPI 30);
//! 2. starts vCPU 1 (PSCI CPU_ON), which sets up its own redistributor and
//!    CPU interface, and plays [`ROUNDS`] rounds of ping-pong: vCPU 0 sends
//!    SGI 1 to vCPU 1, which answers with SGI 2; each side waits in WFI
//!    and acknowledges exactly one SGI per round; at the end neither has
//!    anything pending (no duplicate delivery).
//!
//! Every check prints `gic: ok: ...` or `gic: FAIL: ...`; the result is
//! the number of failures (guest-rt then powers the VM off).
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "../../guest-smp/src/smp.rs"]
mod smp;

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use guest_rt::gic::{wake_redistributor, GICD, SGI_BASE, SPURIOUS};
use guest_rt::wfi;
use guest_rt::{println, sysreg_read as rd, sysreg_write as wr, write32 as mmio_wr};

/// A 16-bit read of `GICD_CTLR` (only 32-bit accesses are allowed): the
/// hypervisor must inject a synchronous external data abort (EC 0x25,
/// FSC 0x10) at that address, and the VM lives on.
fn bad_access() -> u64 {
    guest_rt::skip::install();
    // SAFETY: a load from the GIC's Device memory; the abort it takes is
    // handled by guest-rt's `skip` vectors, which clobber only x9-x11.
    unsafe {
        asm!("ldrh w12, [{a}]", a = in(reg) GICD, out("x9") _, out("x10") _, out("x11") _,
             out("x12") _, options(nostack));
    }
    let t = guest_rt::skip::taken();
    let (esr, far, n) = (t.esr, t.far, t.count);
    println!("gic: 16-bit GICD_CTLR read: {n} exception(s), ESR_EL1 {esr:#x} FAR_EL1 {far:#x}");
    check(
        "a 16-bit GICD_CTLR read takes a synchronous external data abort",
        n == 1 && esr >> 26 == 0x25 && esr & 0x3f == 0x10 && far == GICD as u64,
    )
}

/// Ping-pong rounds.
const ROUNDS: u32 = 200;
const PPI_VTIMER: u64 = 27;
const PPI_PTIMER: u64 = 30;
const SGI_PING: u64 = 1;
const SGI_PONG: u64 = 2;

/// vCPU 1's state: 1 set up, 2 done.
static PEER: AtomicU32 = AtomicU32::new(0);
/// SGIs each vCPU acknowledged.
static GOT: [AtomicU32; 2] = [const { AtomicU32::new(0) }; 2];
/// Acknowledged INTIDs that were not the expected SGI.
static WRONG: AtomicU32 = AtomicU32::new(0);

/// This vCPU's redistributor: awake, SGIs/PPIs in Group 1, `enable`d.
fn redistributor(vcpu: usize, enable: u32) {
    let rd = wake_redistributor(vcpu);
    mmio_wr(rd + SGI_BASE + 0x100, enable);
}

/// The system-register CPU interface on; whether `ICC_SRE_EL1.SRE` reads 1.
fn cpu_interface() -> bool {
    let sre = rd!("icc_sre_el1");
    wr!("icc_pmr_el1", 0xff);
    wr!("icc_igrpen1_el1", 1);
    sre & 1 == 1
}

/// Waits (WFI) until an interrupt can be acknowledged; its INTID.
fn wait_ack() -> u64 {
    loop {
        let intid = rd!("icc_iar1_el1") & 0xff_ffff;
        if intid != SPURIOUS {
            return intid;
        }
        wfi();
    }
}

fn eoi(intid: u64) {
    wr!("icc_eoir1_el1", intid);
}

/// `ICC_SGI1R_EL1` for SGI `intid` to vCPU `target` (Aff0 = index).
fn sgi(intid: u64, target: usize) {
    wr!("icc_sgi1r_el1", (intid << 24) | (1 << target));
}

fn check(what: &str, ok: bool) -> u64 {
    guest_rt::check("gic", what, ok)
}

/// The virtual (`virt`) or emulated physical timer, 10 ms ahead; the
/// failures.
fn timer(virt: bool) -> u64 {
    let freq = rd!("cntfrq_el0");
    let (now, name, ppi) = if virt {
        (rd!("cntvct_el0"), "virtual", PPI_VTIMER)
    } else {
        (rd!("cntpct_el0"), "physical", PPI_PTIMER)
    };
    let deadline = now + freq / 100;
    if virt {
        wr!("cntv_cval_el0", deadline);
        wr!("cntv_ctl_el0", 1);
    } else {
        wr!("cntp_cval_el0", deadline);
        wr!("cntp_ctl_el0", 1);
    }
    let intid = wait_ack();
    let at = if virt {
        rd!("cntvct_el0")
    } else {
        rd!("cntpct_el0")
    };
    // Masked (IMASK) before the EOI, as a timer handler does.
    if virt {
        wr!("cntv_ctl_el0", 3);
    } else {
        wr!("cntp_ctl_el0", 3);
    }
    eoi(intid);
    let late_us = at.saturating_sub(deadline) * 1_000_000 / freq.max(1);
    let mut bad = check(
        &alloc_free_fmt(name, "timer 10 ms ahead: IAR1", intid, ppi),
        intid == ppi,
    );
    bad += check("the interrupt came after the deadline", at >= deadline);
    println!("gic: {name} timer interrupt {late_us} us after its deadline");
    let again = rd!("icc_iar1_el1") & 0xff_ffff;
    bad += check(
        "nothing pending once the timer is masked",
        again == SPURIOUS,
    );
    bad
}

/// "`name` `what` `got` (want `want`)" without an allocator.
fn alloc_free_fmt(name: &str, what: &str, got: u64, want: u64) -> Line {
    let mut l = Line([0; 96], 0);
    let _ = core::fmt::Write::write_fmt(&mut l, format_args!("{name} {what} {got} (want {want})"));
    l
}

struct Line([u8; 96], usize);

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.0.len() - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
        self.1 += n;
        Ok(())
    }
}

impl core::ops::Deref for Line {
    type Target = str;
    fn deref(&self) -> &str {
        core::str::from_utf8(&self.0[..self.1]).unwrap_or("?")
    }
}

/// vCPU 1 (from `smp_secondary_entry`): answers each ping with a pong.
#[no_mangle]
extern "C" fn smp_secondary_main(index: u64) -> ! {
    smp::enable_mmu();
    redistributor(index as usize, 1 << SGI_PING);
    cpu_interface();
    PEER.store(1, Ordering::Release);
    for _ in 0..ROUNDS {
        let intid = wait_ack();
        eoi(intid);
        if intid == SGI_PING {
            GOT[1].fetch_add(1, Ordering::AcqRel);
        } else {
            WRONG.fetch_add(1, Ordering::AcqRel);
        }
        sgi(SGI_PONG, 0);
    }
    let extra = rd!("icc_iar1_el1") & 0xff_ffff;
    if extra != SPURIOUS {
        WRONG.fetch_add(1, Ordering::AcqRel);
    }
    PEER.store(2, Ordering::Release);
    smp::cpu_off();
    loop {
        wfi();
    }
}

fn ping_pong() -> u64 {
    if smp::cpu_on(1) != 0 {
        return check("CPU_ON of vCPU 1", false);
    }
    while PEER.load(Ordering::Acquire) != 1 {
        core::hint::spin_loop();
    }
    for _ in 0..ROUNDS {
        sgi(SGI_PING, 1);
        let intid = wait_ack();
        eoi(intid);
        if intid == SGI_PONG {
            GOT[0].fetch_add(1, Ordering::AcqRel);
        } else {
            WRONG.fetch_add(1, Ordering::AcqRel);
        }
    }
    while PEER.load(Ordering::Acquire) != 2 {
        core::hint::spin_loop();
    }
    let extra = rd!("icc_iar1_el1") & 0xff_ffff;
    let (a, b, w) = (
        GOT[0].load(Ordering::Acquire),
        GOT[1].load(Ordering::Acquire),
        WRONG.load(Ordering::Acquire),
    );
    println!(
        "gic: sgi: {ROUNDS} rounds: vCPU 0 got {a} pongs, vCPU 1 got {b} pings, {w} unexpected"
    );
    check(
        "SGIs: each vCPU received exactly one per round",
        a == ROUNDS && b == ROUNDS && w == 0 && extra == SPURIOUS,
    )
}

/// vCPU 0 (from guest-rt).
#[no_mangle]
pub fn guest_main(_: u64, _: u64, _: u64, _: u64) -> u64 {
    smp::enable_mmu();
    // GICD_CTLR: EnableGrp1 (bit 1), ARE (bit 4, RAO/WI).
    mmio_wr(GICD, (1 << 1) | (1 << 4));
    redistributor(0, (1 << PPI_VTIMER) | (1 << PPI_PTIMER) | (1 << SGI_PONG));
    let mut bad = check("ICC_SRE_EL1.SRE reads 1", cpu_interface());
    bad += check(
        "GICD_CTLR reads EnableGrp1 and ARE",
        guest_rt::read32(GICD) & 0x12 == 0x12,
    );
    bad += bad_access();
    bad += timer(true);
    bad += timer(false);
    bad += ping_pong();
    if bad == 0 {
        println!("gic: all checks passed");
    } else {
        println!("gic: {bad} checks failed");
    }
    bad
}
