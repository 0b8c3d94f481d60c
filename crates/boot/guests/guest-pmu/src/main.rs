//! PMU guest: the virtual PMUv3 of pkvm-rs as a guest sees it. The role
//! comes from the device tree's command line (`pmu-role=N`):
//!
//! 0. basic (1 vCPU): the cycle counter advances while the guest runs and
//!    not while disabled or filtered out (`PMCCFILTR_EL0.P`; a `CPU_CYCLES`
//!    counter excluding only EL0 counts); a loop of hypercalls counts far fewer cycles
//!    than wall time (the ratio printed beside a spinning loop's);
//!    `SW_INCR` counts exactly one per `PMSWINC_EL0` write; a 32-bit event
//!    counter preset near `0xffffffff` wraps, sets its overflow flag and
//!    raises the PMU PPI (INTID 23), for `SW_INCR` and for `CPU_CYCLES`.
//! 1. migrate (N vCPUs, more than the physical CPUs): every vCPU programs
//!    its own configuration (event types, filters, enables, interrupt
//!    enables, selection, user enable, preset counters), then [`ROUNDS`]
//!    times yields (WFE: the scheduler may move it to another CPU), counts
//!    one `SW_INCR` and checks every register.
//! 2. hostile: programs its PMU as hostile-ly as it can (everything
//!    enabled, counters at their top, overflow flags and interrupts set,
//!    `PMSWINC` with every bit, `PMCR_EL0.P/C` resets) for [`HOSTILE_MS`].
//! 3. victim: first measures its cycle counter against wall time while
//!    the hostile VM spins on the same CPUs, then does the migrate role's
//!    checks on each of its vCPUs.
//!
//! Every check prints `pmu: ok: ...` or `pmu: FAIL: ...`; the result is
//! the number of failures (guest-rt then powers the VM off).
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "../../guest-smp/src/smp.rs"]
mod smp;

use core::sync::atomic::{AtomicU32, Ordering};

use guest_rt::gic::{wake_redistributor, GICD, SGI_BASE, SPURIOUS};
use guest_rt::timer::{freq, vct};
use guest_rt::{hvc, sev, wfe};
use guest_rt::{println, sysreg_read as rd, sysreg_write as wr, write32 as mmio_wr};
use pkvm_arch::smccc::psci;

/// The PMU overflow PPI.
const PPI_PMU: u64 = 23;
/// `PMCR_EL0` bits.
const PMCR_E: u64 = 1;
const PMCR_P: u64 = 1 << 1;
const PMCR_C: u64 = 1 << 2;
const PMCR_D: u64 = 1 << 3;
const PMCR_X: u64 = 1 << 4;
const PMCR_DP: u64 = 1 << 5;
const PMCR_LC: u64 = 1 << 6;
/// The cycle counter's bit in the set/clear registers.
const CYCLE: u64 = 1 << 31;
/// `PMEVTYPER`/`PMCCFILTR` filter bits.
const FILT_P: u64 = 1 << 31;
const FILT_U: u64 = 1 << 30;
/// Events.
const SW_INCR: u64 = 0x00;
const CPU_CYCLES: u64 = 0x11;
/// Hypercalls in the ratio test.
const HVCS: u64 = 3000;
/// Migration rounds per vCPU.
const ROUNDS: u64 = 200;
/// How long the hostile VM keeps at it.
const HOSTILE_MS: u64 = 2500;
/// vCPUs of the migrate role at most.
const MAX_VCPUS: usize = 8;

/// Secondaries' role, and how many finished (with their failure counts).
static ROLE: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);
static BAD: AtomicU32 = AtomicU32::new(0);
static SWINC: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];

fn check(what: core::fmt::Arguments, ok: bool) -> u64 {
    guest_rt::check("pmu", what, ok)
}

/// Wall time in the virtual PMU's cycles (a nominal 1 GHz clock).
fn wall_cycles(ticks: u64) -> u64 {
    ticks * (1_000_000_000 / freq()).max(1)
}

fn ms_ticks(ms: u64) -> u64 {
    freq() * ms / 1000
}

/// `PMCR_EL0.N`.
fn counters() -> u64 {
    (rd!("pmcr_el0") >> 11) & 0x1f
}

fn evcnt(i: u64) -> u64 {
    wr!("pmselr_el0", i);
    rd!("pmxevcntr_el0")
}

fn set_evcnt(i: u64, v: u64) {
    wr!("pmselr_el0", i);
    wr!("pmxevcntr_el0", v);
}

fn evtype(i: u64) -> u64 {
    wr!("pmselr_el0", i);
    rd!("pmxevtyper_el0")
}

fn set_evtype(i: u64, v: u64) {
    wr!("pmselr_el0", i);
    wr!("pmxevtyper_el0", v);
}

/// Spins for `ms` milliseconds of wall time.
fn spin_ms(ms: u64) {
    let end = vct() + ms_ticks(ms);
    while vct() < end {}
}

fn ack() -> u64 {
    rd!("icc_iar1_el1") & 0xff_ffff
}

/// Polls for an interrupt for at most `ms` milliseconds (interrupts stay
/// masked in PSTATE); its INTID or [`SPURIOUS`].
fn poll_ack(ms: u64) -> u64 {
    let end = vct() + ms_ticks(ms);
    loop {
        let i = ack();
        if i != SPURIOUS || vct() >= end {
            return i;
        }
    }
}

/// The distributor, this vCPU's redistributor (PPI 23 enabled) and CPU
/// interface on.
fn gic_on() {
    mmio_wr(GICD, (1 << 1) | (1 << 4));
    let rd = wake_redistributor(0);
    mmio_wr(rd + SGI_BASE + 0x100, 1 << PPI_PMU);
    wr!("icc_sre_el1", rd!("icc_sre_el1") | 1);
    wr!("icc_pmr_el1", 0xff);
    wr!("icc_igrpen1_el1", 1);
}

// ---- 0. basic ----

/// The cycle counter over `ms` of spinning: (cycles, wall cycles).
fn cycles_spinning(ms: u64) -> (u64, u64) {
    let (t0, c0) = (vct(), rd!("pmccntr_el0"));
    spin_ms(ms);
    let (t1, c1) = (vct(), rd!("pmccntr_el0"));
    (c1.wrapping_sub(c0), wall_cycles(t1 - t0))
}

fn cycle_counter() -> u64 {
    wr!("pmcr_el0", PMCR_E | PMCR_C | PMCR_LC);
    wr!("pmcntenset_el0", CYCLE);
    let (c, w) = cycles_spinning(20);
    let spin_pm = c * 1000 / w.max(1);
    let mut bad = check(
        format_args!("cycle counter advances while the guest runs: {c} cycles in {w} wall cycles spinning ({spin_pm} per mille)"),
        c > 0 && c <= w * 11 / 10,
    );
    wr!("pmcntenclr_el0", CYCLE);
    let (c, _) = cycles_spinning(5);
    bad += check(
        format_args!("cycle counter disabled (PMCNTENCLR bit 31): {c} cycles in 5 ms"),
        c == 0,
    );
    bad += filters();
    wr!("pmcntenset_el0", CYCLE);
    let (t0, c0) = (vct(), rd!("pmccntr_el0"));
    for _ in 0..HVCS {
        hvc(psci::VERSION as u64, 0, 0, 0);
    }
    let (t1, c1) = (vct(), rd!("pmccntr_el0"));
    let (c, w) = (c1 - c0, wall_cycles(t1 - t0));
    let hvc_pm = c * 1000 / w.max(1);
    bad += check(
        format_args!("{HVCS} hypercalls: {c} guest cycles in {w} wall cycles: ratio {hvc_pm} per mille (spinning: {spin_pm}); at most 500"),
        hvc_pm <= 500,
    );
    bad
}

/// The guest runs at EL1: `PMCCFILTR_EL0.P` stops the cycle counter, a
/// `CPU_CYCLES` counter with only `U` (EL0 excluded) counts.
fn filters() -> u64 {
    wr!("pmccfiltr_el0", FILT_P);
    set_evtype(0, FILT_U | CPU_CYCLES);
    set_evcnt(0, 0);
    wr!("pmcntenset_el0", CYCLE | 1);
    let (c, _) = cycles_spinning(5);
    let ev = evcnt(0);
    wr!("pmccfiltr_el0", 0);
    wr!("pmcntenclr_el0", 1);
    check(
        format_args!(
            "filters at EL1: PMCCFILTR.P: {c} cycles in 5 ms; CPU_CYCLES with PMEVTYPER.U: {ev}"
        ),
        c == 0 && ev > 0,
    )
}

fn sw_incr(n: u64) -> u64 {
    wr!("pmcr_el0", PMCR_E | PMCR_P | PMCR_LC);
    set_evtype(0, SW_INCR);
    set_evtype(1, SW_INCR);
    wr!("pmcntenclr_el0", 2);
    wr!("pmcntenset_el0", 1);
    for _ in 0..1000 {
        wr!("pmswinc_el0", 0b11);
    }
    let (a, b) = (evcnt(0), evcnt(1));
    let direct = rd!("pmevcntr0_el0");
    let mut bad = check(
        format_args!("SW_INCR: 1000 PMSWINC writes: enabled counter {a} (PMEVCNTR0_EL0 {direct}), disabled counter {b}"),
        a == 1000 && direct == 1000 && b == 0,
    );
    let ceid = rd!("pmceid0_el0");
    bad += check(
        format_args!("PMCR_EL0.N {n}, PMCEID0_EL0 {ceid:#x} (SW_INCR, CPU_CYCLES)"),
        n >= 2 && ceid & 1 != 0 && ceid & (1 << CPU_CYCLES) != 0,
    );
    bad
}

/// Event counter `i` preset near the top with its interrupt enabled:
/// `tick` makes it count until it wraps; the overflow flag and PPI 23.
fn overflow(i: u64, event: u64, preset: u64, what: &str, tick: impl Fn()) -> u64 {
    wr!("pmovsclr_el0", u64::MAX);
    set_evtype(i, event);
    set_evcnt(i, preset);
    wr!("pmintenset_el1", 1 << i);
    wr!("pmcntenset_el0", 1 << i);
    wr!("pmcr_el0", PMCR_E | PMCR_LC);
    let before = ack();
    tick();
    let intid = poll_ack(200);
    let (ovs, value) = (rd!("pmovsset_el0"), evcnt(i));
    wr!("pmovsclr_el0", 1 << i);
    if intid != SPURIOUS {
        wr!("icc_eoir1_el1", intid);
    }
    let after = poll_ack(2);
    wr!("pmintenclr_el1", 1 << i);
    wr!("pmcntenclr_el0", 1 << i);
    check(
        format_args!("{what}: counter {i} preset {preset:#x}: now {value:#x}, PMOVSSET {ovs:#x}, IAR1 {intid} (before {before}), after PMOVSCLR and EOI: {after}"),
        before == SPURIOUS
            && intid == PPI_PMU
            && ovs == 1 << i
            && value < 0x1000_0000
            && after == SPURIOUS,
    )
}

fn basic() -> u64 {
    let dfr0 = rd!("id_aa64dfr0_el1");
    let n = counters();
    println!(
        "pmu: ID_AA64DFR0_EL1.PMUVer {}, PMCR_EL0 {:#x}",
        (dfr0 >> 8) & 0xf,
        rd!("pmcr_el0")
    );
    gic_on();
    let mut bad = cycle_counter();
    bad += sw_incr(n);
    let i = n - 1;
    bad += overflow(i, SW_INCR, 0xffff_fff0, "SW_INCR overflow", || {
        for _ in 0..0x11 {
            wr!("pmswinc_el0", 1 << i);
        }
    });
    // 2 ms of the guest's own cycles before the wrap.
    bad += overflow(
        i,
        CPU_CYCLES,
        0xffff_ffff - 2_000_000,
        "CPU_CYCLES overflow",
        || {},
    );
    bad
}

// ---- 1. migrate, 3. victim ----

/// vCPU `me`'s configuration (distinct per vCPU).
struct Config {
    types: [u64; 31],
    presets: [u64; 31],
    cnten: u64,
    inten: u64,
    selr: u64,
    userenr: u64,
    ccfiltr: u64,
    base: u64,
}

impl Config {
    fn of(me: u64, n: u64) -> Config {
        let mask = (1u64 << n) - 1;
        let mut c = Config {
            types: [0; 31],
            presets: [0; 31],
            cnten: 1 | ((me * 0x15 + 2) & mask & !1),
            inten: (me * 0x2a + 4) & mask & !1,
            selr: me % n,
            userenr: me & 0xf,
            ccfiltr: if me & 1 != 0 { FILT_P } else { FILT_U },
            base: me * 1000,
        };
        for k in 1..n as usize {
            let filt = if (me as usize + k) & 1 != 0 {
                FILT_P
            } else {
                FILT_U
            };
            c.types[k] = filt | (0x100 + me * 16 + k as u64);
            c.presets[k] = 0x1000_0000 * k as u64 + me;
        }
        c.presets[0] = c.base;
        c
    }

    fn load(&self, n: u64) {
        wr!("pmcr_el0", PMCR_P | PMCR_C | PMCR_LC);
        for k in 0..n {
            set_evtype(k, self.types[k as usize]);
            set_evcnt(k, self.presets[k as usize]);
        }
        wr!("pmcntenclr_el0", u64::MAX);
        wr!("pmintenclr_el1", u64::MAX);
        wr!("pmcntenset_el0", self.cnten);
        wr!("pmintenset_el1", self.inten);
        wr!("pmuserenr_el0", self.userenr);
        wr!("pmccfiltr_el0", self.ccfiltr);
        wr!("pmselr_el0", self.selr);
        wr!("pmcr_el0", PMCR_E | PMCR_LC);
    }

    /// Mismatches after `incs` SW_INCRs (PMSELR_EL0 is read first, then
    /// the event registers through the direct `PMEVCNTR0`/`PMEVTYPER0`
    /// and the selection).
    fn mismatches(&self, n: u64, incs: u64) -> u64 {
        let mut bad = u64::from(rd!("pmselr_el0") != self.selr);
        bad += u64::from(rd!("pmevcntr0_el0") != self.base + incs);
        bad += u64::from(rd!("pmevtyper0_el0") != SW_INCR);
        bad += u64::from(rd!("pmcntenset_el0") != self.cnten);
        bad += u64::from(rd!("pmintenset_el1") != self.inten);
        bad += u64::from(rd!("pmuserenr_el0") != self.userenr);
        bad += u64::from(rd!("pmccfiltr_el0") != self.ccfiltr);
        bad += u64::from(rd!("pmovsset_el0") != 0);
        bad += u64::from(rd!("pmcr_el0") & (PMCR_E | PMCR_D | PMCR_LC) != PMCR_E | PMCR_LC);
        for k in 1..n {
            bad += u64::from(evtype(k) != self.types[k as usize]);
            bad += u64::from(evcnt(k) != self.presets[k as usize]);
        }
        wr!("pmselr_el0", self.selr);
        bad
    }
}

/// vCPU `me`: its own configuration, [`ROUNDS`] yields each followed by
/// one SW_INCR and a check of everything. The mismatches.
fn keep_config(me: u64) -> u64 {
    let n = counters();
    let c = Config::of(me, n);
    c.load(n);
    let mut bad = 0;
    for round in 1..=ROUNDS {
        wfe();
        wr!("pmswinc_el0", 1);
        bad += c.mismatches(n, round);
    }
    SWINC[me as usize].store(evcnt(0) as u32 - c.base as u32, Ordering::Release);
    bad
}

/// Starts vCPUs 1.. on `role`, runs [`keep_config`] on vCPU 0, waits.
fn all_vcpus(role: u32, what: &str) -> u64 {
    let mut n = 1;
    while n < MAX_VCPUS && smp::affinity_info(n) >= 0 {
        n += 1;
    }
    ROLE.store(role, Ordering::Release);
    for i in 1..n {
        if smp::cpu_on(i) != 0 {
            return check(format_args!("CPU_ON of vCPU {i}"), false);
        }
    }
    let mine = keep_config(0);
    while DONE.load(Ordering::Acquire) < n as u32 - 1 {
        wfe();
    }
    let bad = mine + u64::from(BAD.load(Ordering::Acquire));
    let mut counts = [0u32; MAX_VCPUS];
    for (c, s) in counts.iter_mut().zip(&SWINC).take(n) {
        *c = s.load(Ordering::Acquire);
    }
    let exact = counts[..n].iter().all(|&c| u64::from(c) == ROUNDS);
    check(
        format_args!("{what}: {n} vCPUs x {ROUNDS} yields: {bad} register mismatches; SW_INCR counts {:?} (want {ROUNDS} each)", &counts[..n]),
        bad == 0 && exact,
    )
}

fn victim() -> u64 {
    wr!("pmcr_el0", PMCR_E | PMCR_C | PMCR_LC);
    wr!("pmcntenset_el0", CYCLE);
    let (c, w) = cycles_spinning(400);
    let pm = c * 1000 / w.max(1);
    let bad = check(
        format_args!("victim: spinning beside the hostile VM: {c} cycles in {w} wall cycles ({pm} per mille, at most 800)"),
        pm <= 800,
    );
    bad + all_vcpus(3, "victim")
}

/// Everything the guest can set, set, until [`HOSTILE_MS`] have passed.
fn hostile() -> u64 {
    let n = counters();
    let end = vct() + ms_ticks(HOSTILE_MS);
    let mut rounds = 0u64;
    while vct() < end {
        wr!(
            "pmcr_el0",
            PMCR_E | PMCR_P | PMCR_C | PMCR_D | PMCR_X | PMCR_DP | PMCR_LC
        );
        wr!("pmcntenset_el0", u64::MAX);
        wr!("pmintenset_el1", u64::MAX);
        wr!("pmovsset_el0", u64::MAX);
        for k in 0..n {
            set_evtype(k, !0xffff);
            set_evcnt(k, u64::MAX);
        }
        wr!("pmccfiltr_el0", u64::MAX);
        wr!("pmccntr_el0", u64::MAX);
        wr!("pmuserenr_el0", u64::MAX);
        wr!("pmswinc_el0", u64::MAX);
        wr!("pmselr_el0", 31);
        rounds += 1;
    }
    println!("pmu: hostile: {rounds} rounds of writes to every PMU register");
    0
}

/// Secondaries (from `smp_secondary_entry`).
#[no_mangle]
extern "C" fn smp_secondary_main(index: u64) -> ! {
    smp::enable_mmu();
    let bad = match ROLE.load(Ordering::Acquire) {
        2 => hostile(),
        _ => keep_config(index),
    };
    BAD.fetch_add(bad as u32, Ordering::AcqRel);
    DONE.fetch_add(1, Ordering::AcqRel);
    sev();
    smp::cpu_off();
    loop {
        smp::wfi();
    }
}

/// The number after `key` in the device tree at `dtb` (byte scan).
fn dtb_param(dtb: u64, key: &[u8]) -> Option<u32> {
    if !(0x4000_0000..0x8000_0000).contains(&dtb) {
        return None;
    }
    // SAFETY: guest RAM (identity-mapped); the header is 40 bytes.
    let head = unsafe { core::slice::from_raw_parts(dtb as *const u8, 8) };
    if head[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
        return None;
    }
    let size = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    // SAFETY: the blob's `totalsize` bytes, in guest RAM.
    let blob = unsafe { core::slice::from_raw_parts(dtb as *const u8, size.min(1 << 20)) };
    let at = blob.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = blob[at..].iter().take_while(|b| b.is_ascii_digit());
    digits.fold(None, |n: Option<u32>, d| {
        Some(n.unwrap_or(0).saturating_mul(10) + u32::from(d - b'0'))
    })
}

/// vCPU 0 (from guest-rt).
#[no_mangle]
pub fn guest_main(x0: u64, _: u64, _: u64, _: u64) -> u64 {
    smp::enable_mmu();
    let role = dtb_param(x0, b"pmu-role=").unwrap_or(0);
    let dfr0 = rd!("id_aa64dfr0_el1");
    if (dfr0 >> 8) & 0xf == 0 {
        return check(
            format_args!("a PMU is offered (ID_AA64DFR0_EL1 {dfr0:#x})"),
            false,
        );
    }
    let bad = match role {
        0 => basic(),
        1 => all_vcpus(1, "migrate"),
        2 => {
            let mut n = 1;
            while n < MAX_VCPUS && smp::affinity_info(n) >= 0 {
                n += 1;
            }
            ROLE.store(2, Ordering::Release);
            for i in 1..n {
                smp::cpu_on(i);
            }
            let b = hostile();
            while DONE.load(Ordering::Acquire) < n as u32 - 1 {
                wfe();
            }
            b
        }
        _ => victim(),
    };
    if bad == 0 {
        println!("pmu: all checks passed (role {role})");
    } else {
        println!("pmu: {bad} checks failed (role {role})");
    }
    bad
}
