//! The standing fuzz target: a seeded random driver for the hypercall
//! decoder and dispatcher, the host abort path and the syndrome decoders it
//! is fed through (`ESR_EL2`, `HPFAR_EL2`/`FAR_EL2`).
//!
//! The host is hostile: arguments are biased toward values that look valid
//! (real pfns, live handles, vCPU indices, small gfns) and toward hostile
//! ones (boundary pfns, other VMs' handles, hyp and pool pages, pages in
//! holes between memory regions, the hypervisor's code the host may only
//! read and run, in the first hole of the holey layout), mixed with well-formed VM setups, page
//! gifts, teardowns, and storms of host faults on non-RAM addresses (each
//! device mapping needs table pages from the hyp pool) interleaved with VM
//! creation and teardown. After every call the cheap invariants are checked
//! (no lock held, the handle/loaded-vCPU model, no teardown step refused
//! for lack of memory, host aborts never fail with an internal error or
//! `NoMemory`); every [`FULL_CHECK_EVERY`] calls the full ones
//! ([`check_invariants`]: one consistent owner state per page, page and
//! pool conservation, host stage-2 annotations, EL2 stage-1 maps exactly
//! the hyp's pages). Every few thousand calls everything is torn down and
//! the pool must be back to its starting count (less the host stage-2's
//! table pages).
//!
//! `cargo test -p pkvm-hyp fuzz` runs [`DEFAULT_CALLS`] calls from a fixed
//! seed. Long mode: `PKVM_FUZZ_ITERS=<calls>` and `PKVM_FUZZ_SEED=<n|0xn|random>`.
//! A failure prints the seed to rerun it.

extern crate std;

use std::eprintln;

use pkvm_arch::esr::{self, Esr, FaultStatus};
use pkvm_arch::Ipa;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::malicious_host::{call, run, Model, Op, FUNCS};
use super::*;

/// Calls per run by default (the CI test).
const DEFAULT_CALLS: u64 = 100_000;
/// The default seed (CI runs are reproducible).
const DEFAULT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Full invariant check every this many calls.
const FULL_CHECK_EVERY: u64 = 64;
/// Tear everything down and check the pool every this many calls.
const TEARDOWN_EVERY: u64 = 8_000;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    if v == "random" {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return Some(t ^ u64::from(std::process::id()).rotate_left(32));
    }
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// Prints how to rerun a failing run.
struct SeedReport {
    seed: u64,
    calls: u64,
}

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "hypercall fuzz failed: rerun with PKVM_FUZZ_SEED={:#x} PKVM_FUZZ_ITERS={}",
                self.seed, self.calls
            );
        }
    }
}

struct Fuzz<'h> {
    h: &'h H,
    m: Model,
    rng: SmallRng,
    holey: bool,
    /// Calls made so far (hypercalls, host aborts, syndrome decodes).
    calls: u64,
    /// Next device address index for fault storms.
    dev: u64,
    /// Pool free pages and host stage-2 table pages at the start.
    free0: u64,
    host_tables0: u64,
    el2_tables0: u64,
    /// Most handles live at once.
    max_handles: usize,
    /// Pins the hyp holds ([`Fuzz::pin_step`]): first page, count.
    pins: Vec<(Pa, u64)>,
}

impl Fuzz<'_> {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.random_range(0..from.len())]
    }

    fn one_in(&mut self, n: u32) -> bool {
        self.rng.random_ratio(1, n)
    }

    fn pfn_arg(&mut self) -> u64 {
        match self.rng.random_range(0..20u32) {
            0..=7 => pfn(self.rng.random_range(0..MEM_PAGES)).0,
            8..=10 => pfn(self.rng.random_range(0..64)).0,
            11..=12 => pfn(POOL_FIRST + self.rng.random_range(0..POOL_PAGES)).0,
            13..=14 => {
                let b = boundary_pfns();
                self.pick(&b)
            }
            15..=16 if self.holey => {
                let hole = self.pick(&[100u64, 150, 199, 600, 639]);
                pfn(hole).0
            }
            _ => self.rng.random(),
        }
    }

    fn handle_arg(&mut self) -> u64 {
        let loaded: Vec<u64> = self.m.loaded.values().copied().collect();
        let live: Vec<u64> = self.m.handles.iter().copied().collect();
        match self.rng.random_range(0..10u32) {
            0..=2 if !loaded.is_empty() => self.pick(&loaded),
            0..=4 if !live.is_empty() => self.pick(&live),
            0..=5 => HANDLE_BASE as u64 + self.rng.random_range(0..4),
            6 => HANDLE_BASE as u64 + self.rng.random_range(0..MAX_VMS as u64 + 2),
            7 => self.pick(&[0, HANDLE_BASE as u64 - 1, u64::MAX, 1 << 32 | 0x1000]),
            _ => self.rng.random(),
        }
    }

    fn gfn_arg(&mut self) -> u64 {
        match self.rng.random_range(0..10u32) {
            0..=5 => self.rng.random_range(0..32),
            6 => self.pick(&[(1 << 24) - 1, 1 << 24, (1 << 28) - 1, 1 << 28]),
            7 => self.pick(&[hvc::MAX_FRAME, hvc::MAX_FRAME + 1, 1 << 52]),
            _ => self.rng.random(),
        }
    }

    fn small_arg(&mut self, max: u64) -> u64 {
        match self.rng.random_range(0..10u32) {
            0..=6 => self.rng.random_range(0..max),
            7 => self.pick(&[0, max, max + 1, 512]),
            _ => self.rng.random(),
        }
    }

    fn config_arg(&mut self) -> u64 {
        match self.rng.random_range(0..4u32) {
            0 => np40().encode(),
            1 => prot36().encode(),
            2 => self.rng.random::<u64>() & 0xffff,
            _ => self.rng.random(),
        }
    }

    /// One hypercall with biased arguments for its function.
    fn hvc_call(&mut self) {
        let cpu = if self.one_in(16) {
            self.rng.random_range(0..MAX_CPUS)
        } else {
            self.rng.random_range(0..2)
        };
        let func = if self.one_in(20) {
            self.rng.random::<u32>() | if self.one_in(2) { 0xc600_0000 } else { 0 }
        } else {
            self.pick(FUNCS)
        };
        let (handle, p, gfn) = (self.handle_arg(), self.pfn_arg(), self.gfn_arg());
        let (nr, prot, vcpu) = (self.small_arg(17), self.small_arg(8), self.small_arg(3));
        let args = match func {
            id::GET_SIZES => [self.small_arg(50), 0, 0, 0],
            id::HOST_SHARE_HYP | id::HOST_UNSHARE_HYP => [p, 0, 0, 0],
            id::INIT_VM => [handle, p, self.pfn_arg() & !1, self.config_arg()],
            id::INIT_VCPU => [handle, vcpu, p, 0],
            id::TOPUP_MEMCACHE => [handle, p, nr, 0],
            id::VCPU_LOAD => [handle, vcpu, 0, 0],
            id::HOST_SHARE_GUEST => [p, gfn, prot, 0],
            id::HOST_DONATE_GUEST => [p, gfn, 0, 0],
            id::RELAX_PERMS_GUEST => [gfn, prot, 0, 0],
            id::WRPROTECT_GUEST => [handle, gfn, nr, 0],
            id::TEST_CLEAR_YOUNG_GUEST => [handle, gfn, nr, self.small_arg(2)],
            _ => [handle, gfn, self.rng.random(), self.rng.random()],
        };
        let rc = call(self.h, &mut self.m, cpu, func, args).0;
        check_pfn_refusal(self.h, func, &args, rc);
        self.max_handles = self.max_handles.max(self.m.handles.len());
        self.calls += 1;
    }

    /// A fault address: RAM (pool and holes included), low MMIO, a device
    /// page in a 1 GiB region of its own, or past the host's IPA space.
    fn fault_addr(&mut self) -> Pa {
        let off = self.rng.random_range(0..PAGE_SIZE);
        match self.rng.random_range(0..8u32) {
            0..=3 => pa(self.rng.random_range(0..MEM_PAGES)) + off,
            4 => Pa(0x0900_0000 + self.rng.random_range(0..64) * PAGE_SIZE + off),
            5 | 6 => {
                self.dev += 1;
                device_pa(self.dev)
            }
            _ => Pa(self.rng.random::<u64>() & 0x000f_ffff_ffff_ffff),
        }
    }

    /// A host stage-2 abort as the trap handler sees it: a syndrome (mostly
    /// well-formed, sometimes garbage), decoded and checked; a stage-2
    /// abort from the host then goes to `host_mem_abort`.
    fn abort_call(&mut self) {
        let addr = self.fault_addr();
        let status = FaultStatus::decode(self.rng.random_range(0..0x40));
        let esr = match self.rng.random_range(0..8u32) {
            0..=4 => Esr::data_abort(None, self.rng.random(), false, status),
            5 => Esr::instruction_abort(self.rng.random(), status),
            _ => Esr(self.rng.random()),
        };
        let hpfar = if self.one_in(8) {
            self.rng.random()
        } else {
            esr::hpfar_for(Ipa(addr.0))
        };
        let far = if self.one_in(2) {
            addr.0
        } else {
            self.rng.random()
        };
        check_syndrome(esr, hpfar, far);
        self.calls += 1;
        if let Some(d) = esr.abort() {
            let ipa = esr::fault_ipa(hpfar, far);
            let access = if d.write {
                HostAccess::Write
            } else {
                HostAccess::Read
            };
            host_abort(self.h, Pa(ipa.0), access);
        }
    }

    /// Faults on many fresh device pages in a row.
    fn device_storm(&mut self) {
        for _ in 0..self.rng.random_range(16..128) {
            self.dev += 1;
            host_abort(self.h, device_pa(self.dev), HostAccess::Read);
            self.calls += 1;
        }
    }

    /// A composite step from the malicious-host state machine.
    fn composite(&mut self) {
        let cpu = self.rng.random_range(0..2);
        let op = match self.rng.random_range(0..4u32) {
            0 => Op::Setup {
                cpu,
                first: self.rng.random_range(0..60) * 8,
                protected: self.rng.random(),
            },
            1 => Op::Drain {
                handle: self.handle_arg(),
            },
            _ => Op::Give {
                cpu,
                page: self.rng.random_range(0..640),
                gfn: self.gfn_arg() % 64,
                prot: self.rng.random_range(0..8),
            },
        };
        let before = self.h.hvc_count.load(Relaxed);
        run(self.h, &mut self.m, &op);
        self.calls += self.h.hvc_count.load(Relaxed) - before;
    }

    fn step(&mut self) {
        match self.rng.random_range(0..100u32) {
            0..=49 => self.hvc_call(),
            50..=74 => self.abort_call(),
            75 => self.device_storm(),
            76..=86 => self.composite(),
            87..=89 => self.pin_step(),
            _ => {
                check_syndrome(Esr(self.rng.random()), self.rng.random(), self.rng.random());
                self.calls += 1;
            }
        }
        assert_eq!(pkvm_sync::held_classes(), 0, "a lock is held between calls");
        assert!(!self.h.any_lock_held(), "a lock is held between calls");
        self.check_pins();
    }

    /// The hyp pins pages as `HOST_RUN` does (the direct API) or drops a
    /// pin. A pin is taken only on pages all shared with the hyp (always
    /// on one such page); right after, the host's `HOST_UNSHARE_HYP` of
    /// the page is refused with `BUSY` and its `HOST_DONATE_GUEST` /
    /// `HOST_SHARE_GUEST` are refused.
    fn pin_step(&mut self) {
        if !self.pins.is_empty() && self.one_in(2) {
            let (p, nr) = self
                .pins
                .swap_remove(self.rng.random_range(0..self.pins.len()));
            assert_eq!(self.h.hyp_unpin_shared(p, nr), Ok(()), "unpin {p:?} x {nr}");
            self.calls += 1;
            return;
        }
        let m = self.h.memmap();
        let shared: Vec<u64> = (0..MEM_PAGES)
            .filter(|&i| m.hyp_state(pa(i)) == PageState::SharedBorrowed)
            .collect();
        let page = match shared.is_empty() || self.one_in(3) {
            true => self.pfn_arg(),
            false => pfn(self.pick(&shared)).0,
        };
        let (at, nr) = (Pa(page << 12), self.rng.random_range(1..=2u64));
        let all_shared = (0..nr).all(|i| {
            let p = Pa(at.0.wrapping_add(i * PAGE_SIZE));
            m.index(p).is_some() && m.hyp_state(p) == PageState::SharedBorrowed
        });
        let r = self.h.hyp_pin_shared(at, nr);
        assert!(
            r.is_err() || all_shared,
            "pinned {at:?} x {nr}: not all shared"
        );
        assert!(
            r.is_ok() || !all_shared || nr > 1,
            "{at:?} shared, pin refused: {r:?}"
        );
        self.calls += 1;
        if r.is_err() {
            return;
        }
        self.pins.push((at, nr));
        let cpu = self.rng.random_range(0..2);
        let rc = call(
            self.h,
            &mut self.m,
            cpu,
            id::HOST_UNSHARE_HYP,
            [page, 0, 0, 0],
        )
        .0;
        assert_eq!(rc, ret::BUSY, "unshare of pinned {at:?}");
        for func in [id::HOST_DONATE_GUEST, id::HOST_SHARE_GUEST] {
            let args = [page, self.gfn_arg() % 64, 1, 0];
            let rc = call(self.h, &mut self.m, cpu, func, args).0;
            assert_ne!(rc, ret::SUCCESS, "{func:#x} of pinned {at:?}");
        }
        self.calls += 3;
    }

    /// Every pinned page is still shared with the hyp and carries exactly
    /// the pins taken on it.
    fn check_pins(&self) {
        let m = self.h.memmap();
        let mut want: BTreeMap<Pa, u16> = BTreeMap::new();
        for &(p, nr) in &self.pins {
            for i in 0..nr {
                *want.entry(p + i * PAGE_SIZE).or_default() += 1;
            }
        }
        for (&p, &n) in &want {
            assert_eq!(
                m.hyp_state(p),
                PageState::SharedBorrowed,
                "pinned {p:?} not shared"
            );
            assert_eq!(m.hyp_pins(p), n, "pin count of {p:?}");
        }
    }

    /// Puts every vCPU, tears every VM down (no step may run out of
    /// memory), gives back every page shared with the hyp; then the pool
    /// holds what it held at the start, less the host stage-2's new table
    /// pages, and the hyp's own stage-1 is back to its starting size.
    fn teardown_all(&mut self) {
        for (p, nr) in core::mem::take(&mut self.pins) {
            assert_eq!(self.h.hyp_unpin_shared(p, nr), Ok(()), "unpin {p:?} x {nr}");
        }
        let cpus: Vec<usize> = self.m.loaded.keys().copied().collect();
        for cpu in cpus {
            assert_eq!(
                call(self.h, &mut self.m, cpu, id::VCPU_PUT, [0; 4]).0,
                ret::SUCCESS
            );
        }
        for handle in self.m.handles.clone() {
            let a = [handle, 0, 0, 0];
            if call(self.h, &mut self.m, 0, id::UNRESERVE_VM, a).0 == ret::SUCCESS {
                continue;
            }
            let rc = call(self.h, &mut self.m, 0, id::START_TEARDOWN, a).0;
            assert!(
                rc == ret::SUCCESS || rc == ret::INVALID_PARAMETER,
                "start teardown: {rc}"
            );
            let rc = call(self.h, &mut self.m, 0, id::FINALIZE_TEARDOWN, a).0;
            assert_eq!(rc, ret::SUCCESS, "finalize teardown of {handle:#x}");
        }
        assert!(
            self.m.handles.is_empty(),
            "handles left: {:?}",
            self.m.handles
        );
        for i in 0..MEM_PAGES {
            if self.h.memmap().hyp_state(pa(i)) == PageState::SharedBorrowed {
                let rc = call(
                    self.h,
                    &mut self.m,
                    0,
                    id::HOST_UNSHARE_HYP,
                    [pfn(i).0, 0, 0, 0],
                )
                .0;
                assert_eq!(rc, ret::SUCCESS, "unshare page {i}");
            }
        }
        check_invariants(self.h);
        let (host_tables, el2_tables) = check_pool_conservation(self.h);
        let s = self.h.stats();
        assert_eq!((s.vm_pages, s.live_vms), (0, 0), "{s:?}");
        assert_eq!(el2_tables, self.el2_tables0, "hyp stage-1 tables left over");
        assert_eq!(
            s.pool_free + host_tables - self.host_tables0,
            self.free0,
            "pool not back to its starting count after teardown"
        );
    }
}

/// The pfn arguments of `func`: (argument index, whether x3 counts pages
/// from it).
fn pfn_args(func: u32) -> &'static [(usize, bool)] {
    match func {
        id::HOST_SHARE_HYP | id::HOST_UNSHARE_HYP => &[(0, false)],
        id::HOST_SHARE_GUEST | id::HOST_DONATE_GUEST => &[(0, false)],
        id::INIT_VM => &[(1, false), (2, false)],
        id::INIT_VCPU => &[(2, false)],
        id::TOPUP_MEMCACHE => &[(1, true)],
        _ => &[],
    }
}

/// The oracle for pfn arguments, from the ABI and the memory map alone: a
/// pfn past the largest frame is refused by the decoder; a page (or a
/// top-up range) not inside one memory region is never accepted.
fn check_pfn_refusal(h: &H, func: u32, args: &[u64; 4], rc: i64) {
    for &(i, ranged) in pfn_args(func) {
        let p = args[i];
        if p > hvc::MAX_FRAME {
            assert_eq!(
                rc,
                ret::INVALID_PARAMETER,
                "{func:#x} {args:x?}: pfn past the largest frame"
            );
            continue;
        }
        let nr = if ranged {
            args[2].clamp(1, MAX_TOPUP_PAGES)
        } else {
            1
        };
        let (start, len) = (Pfn(p).addr(), nr * PAGE_SIZE);
        if !h.regions().iter().any(|r| r.contains(start, len)) {
            assert_ne!(
                rc,
                ret::SUCCESS,
                "{func:#x} {args:x?}: a page outside every region accepted"
            );
        }
    }
}

/// `host_mem_abort` may refuse (not the host's page) or ask for a retry,
/// never fail for lack of memory or with an internal error; a write to
/// the hypervisor's code the host runs is always refused.
fn host_abort(h: &H, at: Pa, access: HostAccess) {
    let r = h.host_mem_abort(at, access);
    match r {
        Ok(()) | Err(HypError::HostAccessDenied { .. }) | Err(HypError::Again) => {}
        Err(e) => panic!("host abort at {at:?}: {e:?}"),
    }
    if access == HostAccess::Write && h.rx_region_of(at, 1).is_some() {
        assert_eq!(
            r,
            Err(HypError::HostAccessDenied { pa: at }),
            "a host write to the hypervisor's code at {at:?} not refused"
        );
    }
}

/// The syndrome decoders: an abort is decoded iff the class is an abort
/// from a lower EL; the decoded fields re-encode to a syndrome that decodes
/// the same; the fault status round-trips; the fault IPA keeps FAR's page
/// offset and HPFAR's frame.
fn check_syndrome(e: Esr, hpfar: u64, far: u64) {
    let ec = (e.0 >> 26 & 0x3f) as u8;
    assert_eq!(e.ec(), ec, "{e:x?}");
    let is_abort = ec == esr::ec::DABT_LOW || ec == esr::ec::IABT_LOW;
    assert_eq!(e.abort().is_some(), is_abort, "{e:x?}");
    if let Some(d) = e.abort() {
        assert_eq!(d.status.encode() as u64, e.0 & 0x3f, "{e:x?}");
        assert_eq!(FaultStatus::decode(d.status.encode()), d.status, "{e:x?}");
        assert!(
            !d.instruction || (d.syndrome.is_none() && !d.write && !d.cm),
            "{e:x?}"
        );
        if let Some(s) = d.syndrome {
            assert!(s.sas <= 3 && s.srt <= 31 && s.size() <= 8, "{e:x?}");
        }
        let again = if d.instruction {
            Esr::instruction_abort(d.s1ptw, d.status)
        } else {
            Esr::data_abort(d.syndrome, d.write, d.s1ptw, d.status)
        };
        let plain = esr::DataAbort {
            fnv: false,
            cm: false,
            ea: false,
            ..d
        };
        assert_eq!(
            again.abort(),
            Some(plain),
            "{e:x?} re-encoded as {again:x?}"
        );
    }
    let ipa = esr::fault_ipa(hpfar, far);
    assert_eq!(ipa.0 & 0xfff, far & 0xfff);
    assert!(ipa.0 < 1 << 52, "fault IPA {ipa:?} past 52 bits");
    assert_eq!(esr::hpfar_for(ipa), hpfar & esr::HPFAR_FIPA_MASK);
}

fn run_fuzz(seed: u64, calls: u64) {
    let _report = SeedReport { seed, calls };
    let holey = seed & 1 == 1;
    let h = if holey {
        // The hypervisor's code the host runs in the first hole.
        let code = MemRegion {
            base: pa(100),
            size: 60 * PAGE_SIZE,
        };
        setup_rx(&holey_regions(), &[code]).unwrap()
    } else {
        setup()
    };
    hvc(&h, 0, id::FINALIZE, &[]);
    let (host_tables0, el2_tables0) = check_pool_conservation(&h);
    let mut f = Fuzz {
        h: &h,
        m: Model::default(),
        rng: SmallRng::seed_from_u64(seed),
        holey,
        calls: 0,
        dev: 0,
        free0: h.stats().pool_free,
        host_tables0,
        el2_tables0,
        max_handles: 0,
        pins: Vec::new(),
    };
    let (mut next_full, mut next_teardown) = (FULL_CHECK_EVERY, TEARDOWN_EVERY);
    while f.calls < calls {
        f.step();
        if f.calls >= next_full {
            check_invariants(&h);
            next_full = f.calls + FULL_CHECK_EVERY;
        }
        if f.calls >= next_teardown {
            f.teardown_all();
            next_teardown = f.calls + TEARDOWN_EVERY;
        }
    }
    f.teardown_all();
    eprintln!(
        "fuzz seed {seed:#x}: {} calls, {} device faults, at most {} handles; successful hypercalls by id: {:x?}",
        f.calls, f.dev, f.max_handles, f.m.ok
    );
}

#[test]
fn fuzz_hypercalls_host_aborts_and_syndromes() {
    let seed = env_u64("PKVM_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let calls = env_u64("PKVM_FUZZ_ITERS").unwrap_or(DEFAULT_CALLS);
    run_fuzz(seed, calls);
}

/// The other memory layout (the default seed's parity picks one).
#[test]
fn fuzz_with_the_other_memory_layout() {
    let seed = env_u64("PKVM_FUZZ_SEED").unwrap_or(DEFAULT_SEED) ^ 1;
    let calls = env_u64("PKVM_FUZZ_ITERS").unwrap_or(DEFAULT_CALLS / 4);
    run_fuzz(seed, calls);
}
