//! SVE under the world switch: a VM's Z/P/FFR registers and vector length
//! survive while other VMs (with another vector length, or without SVE)
//! run on the same physical CPU.
//!
//! `x0` (from the host's scenario): bits 15:0 the vector length the VM was
//! configured with, in bytes (0: the VM has no SVE), bits 23:16 a tag that
//! makes this VM's patterns its own, bits 63:32 the number of rounds.
//!
//! With SVE: checks `ID_AA64PFR0_EL1.SVE`, then that `RDVL` gives the
//! configured length when `ZCR_EL1.LEN` asks for the architecture's maximum
//! (the hypervisor's `ZCR_EL2` limits it) and 16 bytes with `ZCR_EL1.LEN`
//! = 0. Each round sets `ZCR_EL1.LEN` (the VM's full length and 16 bytes
//! in turn, in the opposite phase to the other SVE VM), fills Z0-Z31,
//! P0-P15 and FFR with a pattern of its own (tag, round), yields the CPU with a trapped `WFI` (the guest's
//! distributor is off, so the hypervisor yields instead of blocking; QEMU
//! 7.2 does not trap WFE) and the scheduler runs the other VMs, then
//! copies V29 to V30 with FP/SIMD (before any SVE instruction: the
//! hypervisor's lazy SVE load must merge the new V30 into Z30 and zero
//! its upper bits), reads everything back, with `RDVL` and q31 (the low
//! 128 bits of Z31 seen through FP/SIMD), and counts differences.
//!
//! Without SVE: `ID_AA64PFR0_EL1.SVE` and `ID_AA64ZFR0_EL1` read 0, and
//! `RDVL` and a `ZCR_EL1` write each take an UNDEF at `VBAR_EL1` + 0x200
//! with `ESR_EL1` EC 0, IL 1; each round does the same with q0-q31.
//!
//! Prints its counts; returns the number of failures (0: all passed).
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

use guest_rt::skip;
use guest_rt::{println, sysreg_read, sysreg_write};

/// Bytes of one save image for the largest vector length (256 bytes):
/// 32 Z of VL, 16 P and FFR of VL / 8.
const AREA_MAX: usize = 32 * 256 + 17 * 32;

global_asm!(
    r#"
.section .bss.sve_areas, "aw"
.balign 16
.global sve_want
sve_want:
    .zero 8736
.global sve_got
sve_got:
    .zero 8736
"#
);

const _: () = assert!(AREA_MAX == 8736);

extern "C" {
    static mut sve_want: [u8; AREA_MAX];
    static mut sve_got: [u8; AREA_MAX];
}

/// The last exception the vectors recorded: (entry, ESR_EL1, ELR_EL1, count).
fn taken() -> [u64; 4] {
    let t = skip::taken();
    [t.entry, t.esr, t.elr, t.count]
}

/// `ESR_EL1` of an UNDEF: EC 0, IL 1.
const ESR_UNDEF: u64 = 1 << 25;
/// Vector entry of a synchronous exception from EL1 with SP_EL1 (+0x200).
const ENTRY_CURRENT_SPX: u64 = 4;

/// A pattern byte source for (tag, round): splitmix64.
struct Pattern(u64);

impl Pattern {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Fills `want` for vector length `vl`: Z and P random, FFR a monotonic
/// predicate (the first `k` byte lanes true, as a first-fault load leaves
/// it; WRFFR need not take anything else).
fn fill(want: &mut [u8], vl: usize, tag: u64, round: u64) {
    let mut p = Pattern((tag << 40) ^ round);
    let zp = 34 * vl;
    for chunk in want[..zp].chunks_mut(8) {
        let w = p.next().to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    let k = ((round * 7 + tag * 13) % (vl as u64 + 1)) as usize;
    for (i, b) in want[zp..zp + vl / 8].iter_mut().enumerate() {
        let lanes = k.saturating_sub(i * 8).min(8);
        *b = ((1u16 << lanes) - 1) as u8;
    }
}

/// Loads Z/P/FFR from `want`, yields the CPU (WFI traps to the
/// hypervisor), copies V29 to V30 with FP/SIMD (see [`fp_write_z30`]),
/// stores Z/P/FFR to `got`; returns (RDVL, q31) after the yield.
fn sve_round(want: *const u8, got: *mut u8) -> (u64, u128) {
    let vl: u64;
    let (lo, hi): (u64, u64);
    // SAFETY: `want` and `got` point at AREA_MAX-byte buffers, enough for
    // 32 Z of VL, 16 P and FFR at any VL; every SIMD/SVE register written
    // is declared clobbered (P and FFR are not used by Rust code).
    unsafe {
        asm!(
            ".arch_extension sve",
            "addvl {t}, {w}, #16",
            "addvl {t}, {t}, #16",
            "addpl {t}, {t}, #16",
            "ldr p0, [{t}]",
            "wrffr p0.b",
            "addvl {t}, {w}, #16",
            "addvl {t}, {t}, #16",
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "ldr p\\n, [{t}, #\\n, mul vl]",
            ".endr",
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            "ldr z\\n, [{w}, #\\n, mul vl]",
            ".endr",
            "wfi",
            // An FP/SIMD write before the run's first SVE instruction
            // (which takes the hypervisor's lazy load): Z30 becomes the
            // low 128 bits of Z29, its upper bits zero.
            "mov v30.16b, v29.16b",
            "rdvl {vl}, #1",
            "mov {lo}, v31.d[0]",
            "mov {hi}, v31.d[1]",
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            "str z\\n, [{g}, #\\n, mul vl]",
            ".endr",
            "addvl {t}, {g}, #16",
            "addvl {t}, {t}, #16",
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "str p\\n, [{t}, #\\n, mul vl]",
            ".endr",
            "addpl {t}, {t}, #16",
            "rdffr p0.b",
            "str p0, [{t}]",
            w = in(reg) want,
            g = in(reg) got,
            t = out(reg) _,
            vl = out(reg) vl,
            lo = out(reg) lo,
            hi = out(reg) hi,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _,
            out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            out("v24") _, out("v25") _, out("v26") _, out("v27") _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            options(nostack)
        )
    };
    (vl, (u128::from(hi) << 64) | u128::from(lo))
}

/// What `want` expects of Z30 after [`sve_round`]'s FP/SIMD write
/// `MOV V30.16B, V29.16B` at vector length `vl`: Z29's low 128 bits, zero
/// above (an FP/SIMD write zeroes the upper bits of the Z register).
fn fp_write_z30(want: &mut [u8], vl: usize) {
    want.copy_within(29 * vl..29 * vl + 16, 30 * vl);
    want[30 * vl + 16..31 * vl].fill(0);
}

/// Loads q0-q31 from `want`, yields, stores them to `got`.
fn fp_round(want: *const u8, got: *mut u8) {
    // SAFETY: `want` and `got` point at AREA_MAX-byte buffers (512 used);
    // every FP/SIMD register written is declared clobbered.
    unsafe {
        asm!(
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            "ldr q\\n, [{w}, #(\\n * 16)]",
            ".endr",
            "wfi",
            ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            "str q\\n, [{g}, #(\\n * 16)]",
            ".endr",
            w = in(reg) want,
            g = in(reg) got,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _,
            out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            out("v24") _, out("v25") _, out("v26") _, out("v27") _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            options(nostack)
        )
    };
}

/// `RDVL` now.
fn rdvl() -> u64 {
    let v: u64;
    // SAFETY: reads the vector length; SVE access is enabled (or the
    // vectors resume after an UNDEF, leaving `v` = 0).
    unsafe {
        asm!(".arch_extension sve", "mov {0}, #0", "rdvl {0}, #1", out(reg) v,
             out("x9") _, out("x10") _, out("x11") _, options(nostack))
    };
    v
}

/// Writes `ZCR_EL1` (x9-x11 clobbered: the vectors use them on an UNDEF).
fn zcr_write(v: u64) {
    // SAFETY: writes this vCPU's own ZCR_EL1 (or UNDEFs and resumes).
    unsafe {
        asm!("msr S3_0_C1_C2_0, {0}", "isb", in(reg) v,
             out("x9") _, out("x10") _, out("x11") _, options(nostack))
    };
}

fn field(v: u64, shift: u32) -> u64 {
    (v >> shift) & 0xf
}

/// The ID registers and the vector length the VM's configuration gives.
fn identity(vl: u64) -> u64 {
    let pfr0 = sysreg_read!("id_aa64pfr0_el1");
    let zfr0 = sysreg_read!("S3_0_C0_C4_4");
    let sve = field(pfr0, 32);
    let ok_id = if vl != 0 {
        sve == 1
    } else {
        sve == 0 && zfr0 == 0
    };
    println!(
        "sve: {}: ID_AA64PFR0_EL1.SVE {sve}, ID_AA64ZFR0_EL1 {zfr0:#x} (SVE {})",
        if ok_id { "ok" } else { "FAILED" },
        if vl != 0 { "offered" } else { "not offered" }
    );
    let mut failed = u64::from(!ok_id);
    if vl == 0 {
        return failed;
    }
    zcr_write(0);
    let min = rdvl();
    zcr_write(0xf);
    let max = rdvl();
    let ok = min == 16 && max == vl && taken()[3] == 0;
    println!(
        "sve: {}: RDVL {max} bytes with ZCR_EL1.LEN 15 (VM configured with {vl}), {min} with ZCR_EL1.LEN 0",
        if ok { "ok" } else { "FAILED" }
    );
    failed += u64::from(!ok);
    failed
}

/// Without SVE: `RDVL` and a `ZCR_EL1` write UNDEF at the guest's vector.
fn undefs() -> u64 {
    let mut failed = 0;
    for (name, zcr) in [("RDVL", false), ("ZCR_EL1 write", true)] {
        let before = taken()[3];
        if zcr {
            zcr_write(0xf);
        } else {
            rdvl();
        }
        let [entry, esr, _elr, count] = taken();
        let ok = count == before + 1 && entry == ENTRY_CURRENT_SPX && esr == ESR_UNDEF;
        println!(
            "sve: {}: {name} (SVE not offered): UNDEF at VBAR_EL1+{:#x} ESR_EL1 {esr:#x}",
            if ok { "ok" } else { "FAILED" },
            entry * 0x80
        );
        failed += u64::from(!ok);
    }
    failed
}

/// Bytes that differ.
fn diff(a: &[u8], b: &[u8]) -> u64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

/// The vector length of round `r` in bytes and the `ZCR_EL1.LEN` that
/// asks for it: the VM's full length (`ZCR_EL1.LEN` 15, limited by the
/// hypervisor's `ZCR_EL2`) and 16 bytes (`ZCR_EL1.LEN` 0) in turn, in
/// opposite phases for odd and even tags, so that two VMs taking turns
/// need their own `ZCR_EL1` (and the hypervisor's `ZCR_EL2` for each).
fn round_vl(vl: usize, tag: u64, r: u64) -> (usize, u64) {
    if (r + tag).is_multiple_of(2) {
        (vl, 0xf)
    } else {
        (16, 0)
    }
}

/// The rounds: (image mismatches, VL mismatches, q31 mismatches).
fn rounds(vl: usize, tag: u64, n: u64) -> (u64, u64, u64) {
    // SAFETY: the buffers are this single-vCPU guest's own .bss, used only
    // here (the asm reaches them through the raw pointers derived below,
    // while these references are not used).
    let (want, got) = unsafe { (&mut *addr_of_mut!(sve_want), &mut *addr_of_mut!(sve_got)) };
    let (mut bad, mut vl_bad, mut q_bad) = (0, 0, 0);
    for r in 0..n {
        got.fill(0);
        let len = if vl == 0 {
            fill(want, 16, tag, r);
            fp_round(want.as_ptr(), got.as_mut_ptr());
            512
        } else {
            let (cur, len_field) = round_vl(vl, tag, r);
            zcr_write(len_field);
            fill(want, cur, tag, r);
            let (now, q31) = sve_round(want.as_ptr(), got.as_mut_ptr());
            fp_write_z30(want, cur);
            vl_bad += u64::from(now != cur as u64);
            let z31 = &want[31 * cur..31 * cur + 16];
            q_bad += u64::from(q31.to_le_bytes() != z31);
            34 * cur + cur / 8
        };
        bad += u64::from(diff(&want[..len], &got[..len]) != 0);
    }
    (bad, vl_bad, q_bad)
}

/// The registers the rounds check, for the VM's vector length (0: no SVE).
struct Regs(u64);

impl core::fmt::Display for Regs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            0 => write!(f, "q0-q31, no SVE"),
            vl => write!(f, "Z0-31, P0-15, FFR at VL {vl} and 16"),
        }
    }
}

/// Entry called by guest-rt.
#[no_mangle]
pub fn guest_main(cfg: u64, _: u64, _: u64, _: u64) -> u64 {
    let vl = cfg & 0xffff;
    let tag = (cfg >> 16) & 0xff;
    let n = cfg >> 32;
    skip::install();
    // CPACR_EL1.ZEN on (FPEN is on from guest-rt): SVE reaches CPTR_EL2.
    sysreg_write!("cpacr_el1", sysreg_read!("cpacr_el1") | (3 << 16));
    let mut failed = identity(vl);
    if vl == 0 {
        failed += undefs();
    }
    let exc_before = taken()[3];
    let (bad, vl_bad, q_bad) = rounds(vl as usize, tag, n);
    let exc = taken()[3] - exc_before;
    println!(
        "sve: {n} rounds of fill/yield/check ({}): mismatches={bad}, wrong VL={vl_bad}, q31 != low Z31: {q_bad}, exceptions {exc}",
        Regs(vl)
    );
    failed += u64::from(bad != 0 || vl_bad != 0 || q_bad != 0 || exc != 0);
    println!(
        "sve: {}",
        if failed == 0 {
            "all checks passed"
        } else {
            "FAILED"
        }
    );
    failed
}
