//! The vCPU scheduler: M vCPUs on N physical CPUs (M > N allowed).
//!
//! # Model
//! The scheduler owns the vCPU objects (any type implementing
//! [`SchedVcpu`]: "run until something needs the scheduler"), in slots
//! handed out by [`Scheduler::add`]. One global FIFO run queue holds the
//! slots of runnable vCPUs; every physical CPU runs
//! [`Scheduler::run_cpu`]: pop a vCPU, arm the EL2 timer for one time
//! slice ([`Scheduler::slice_us`]), run it, act on the outcome:
//!
//! | outcome | meaning (pkvm-host `VcpuExit`) | then |
//! |---|---|---|
//! | [`Outcome::Preempted`] | `Interrupted`: physical IRQ (timer tick or kick SGI) | back to the tail of the queue |
//! | [`Outcome::Yield`] | `Wfi` of a WFE, or of a guest whose vGIC is off | tail of the queue |
//! | [`Outcome::Wait`] | `Wfi` with nothing pending (blocked in WFI) | off the queue until [`Scheduler::kick`] or its deadline |
//! | [`Outcome::Sleep`] | `Sleep`: powered off (PSCI CPU_OFF) or suspended | off the queue until [`Scheduler::kick`] |
//! | [`Outcome::Done`] | its VM is over (`SystemEvent` other than a reset the VMM carried out, internal error, VM stopped) | the slot is emptied and the vCPU dropped |
//!
//! A run ([`Scheduler::begin`] .. the last `Done`) ends by itself when no
//! vCPU is left: every CPU then leaves `run_cpu`. Several VMs can share
//! one run; a VM ending only retires its own vCPUs.
//!
//! A vCPU that is `Stopped` in its PSCI power state is never on the queue:
//! the PSCI code (`pkvm_host::psci`) publishes a `CPU_ON` in the target's
//! power state under its lock and then calls `PsciVm::kick_vcpu`, which
//! the VMM's `HostPlatform::kick_vcpu` forwards to [`Scheduler::kick`]:
//! a sleeping vCPU is queued; a running one is sent the kick SGI so it
//! leaves the guest and sees its new requests; a queued one needs nothing.
//!
//! # Lost wake-ups
//! Each vCPU has a state (`SLEEPING`, `QUEUED`, `RUNNING`) and a `kicked`
//! flag. [`Scheduler::kick`] sets `kicked`, then tries `SLEEPING ->
//! QUEUED`. A CPU whose vCPU returned `Sleep` stores `SLEEPING`, then reads
//! `kicked` and tries the same transition. Both sides use sequentially
//! consistent operations, so at least one of them sees the other and
//! exactly one (the CAS winner) queues the vCPU. A kick SGI sent to a CPU
//! about to enter the guest is not lost either: EL2 runs with interrupts
//! masked, so it stays pending and the guest exits at once.
//!
//! # Idle CPUs and deadlines
//! A CPU with nothing to run marks itself idle, re-checks the queue and
//! waits with `wfi` (interrupts masked at EL2; the timer is armed as a
//! backstop). Queuing a vCPU sends the kick SGI to one idle CPU.
//!
//! A vCPU that returned [`Outcome::Wait`] sleeps like one that returned
//! `Sleep`, with a wake-up deadline (a physical count: its earliest guest
//! timer). Every CPU arms its EL2 timer for the end of the slice or the
//! earliest deadline, whichever comes first (idle or running a vCPU), and
//! on each pass through its loop kicks the sleepers whose deadline has
//! passed: the same kick as any other wake-up, so the lost-wake-up
//! argument above holds. A run ends with every vCPU asleep only when none
//! has a deadline: checked when a vCPU goes to sleep and when one is
//! retired (`Done`: a VM that finishes while another VM's vCPUs are all
//! off or blocked in WFI ends the run; those VMs are then stopped with an
//! error).
//!
//! # pkvm-host vCPUs
//! [`host::HostRunner`] adapts a claimed `pkvm_host::Vcpu` to
//! [`SchedVcpu`]; the VMM (`crate::vmm`) provides the backend and the
//! emulation through [`host::HostVmm`].
#![forbid(unsafe_code)]

pub mod host;

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use pkvm_sync::{LockClass, SpinLock};

use crate::platform::{gic, timer, MAX_CPUS};

/// vCPUs one scheduler can hold.
pub const MAX_SCHED_VCPUS: usize = 16;

/// Default time slice: 3 ms. A guest that spins on another vCPU (a
/// lock, `stop_machine`, a cross-call) keeps its physical CPU for the
/// whole slice, since QEMU 7.2's TCG never traps WFE to EL2 and nothing
/// traps a plain spin; with 4 vCPUs on 2 CPUs, Debian's kernel boots to
/// `/init` about 0.5 s (15%) faster with 3 ms than with 10 ms slices, and
/// 1 ms gains nothing more (the preemption exits eat it).
pub const DEFAULT_SLICE_US: u64 = 3_000;

/// Why a vCPU's run returned to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A physical interrupt (preemption tick or kick) took it out of the guest.
    Preempted,
    /// It waits for an interrupt (WFI) or CPU_SUSPEND: let others run.
    Yield,
    /// It is powered off or suspended: not runnable until kicked.
    Sleep,
    /// It waits for an interrupt (WFI, nothing pending): not runnable until
    /// kicked or until the physical count reaches this deadline
    /// (`u64::MAX`: none).
    Wait(u64),
    /// Its VM is over: the vCPU leaves the scheduler (and is dropped).
    Done,
}

/// A vCPU the scheduler can run.
pub trait SchedVcpu: Send {
    /// Runs the vCPU on physical CPU `cpu` until it needs the scheduler.
    /// The EL2 timer is armed for one slice around the call.
    fn run(&mut self, cpu: usize) -> Outcome;
}

/// Something that can make a vCPU notice new requests (the VM's side of
/// `PsciVm::kick_vcpu`).
pub trait Kick: Sync {
    /// Kicks the vCPU in scheduler slot `slot`.
    fn kick(&self, slot: usize);
}

const EMPTY: u8 = 0;
const SLEEPING: u8 = 1;
const QUEUED: u8 = 2;
const RUNNING: u8 = 3;

/// The FIFO run queue (slots of `QUEUED` vCPUs; each at most once).
struct RunQueue {
    ring: [u8; MAX_SCHED_VCPUS],
    head: usize,
    len: usize,
}

impl RunQueue {
    fn push(&mut self, i: usize) {
        // Each vCPU is queued at most once (the state CAS guarantees it),
        // so the ring never overflows.
        assert!(
            self.len < MAX_SCHED_VCPUS,
            "run queue overflow (internal bug)"
        );
        self.ring[(self.head + self.len) % MAX_SCHED_VCPUS] = i as u8;
        self.len += 1;
    }
    fn pop(&mut self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let i = self.ring[self.head] as usize;
        self.head = (self.head + 1) % MAX_SCHED_VCPUS;
        self.len -= 1;
        Some(i)
    }
}

/// Per-vCPU scheduling statistics (reset by [`Scheduler::begin`]).
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Times it was picked to run.
    pub runs: AtomicU64,
    /// `Preempted` outcomes.
    pub preempted: AtomicU64,
    /// `Yield` outcomes.
    pub yields: AtomicU64,
    /// `Sleep` outcomes.
    pub sleeps: AtomicU64,
    /// Physical CPUs it ran on (bit per CPU).
    pub cpus: AtomicU64,
}

impl VcpuStats {
    fn clear(&self) {
        for c in [
            &self.runs,
            &self.preempted,
            &self.yields,
            &self.sleeps,
            &self.cpus,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The scheduler (usually a `static`; `new` is `const`).
pub struct Scheduler<V> {
    slots: [SpinLock<Option<V>>; MAX_SCHED_VCPUS],
    state: [AtomicU8; MAX_SCHED_VCPUS],
    kicked: [AtomicBool; MAX_SCHED_VCPUS],
    on_cpu: [AtomicUsize; MAX_SCHED_VCPUS],
    /// Wake-up deadline of a sleeping vCPU (`u64::MAX`: none).
    wake_at: [AtomicU64; MAX_SCHED_VCPUS],
    queue: SpinLock<RunQueue>,
    idle: AtomicUsize,
    stop: AtomicBool,
    /// vCPUs added and not yet `Done`.
    live: AtomicUsize,
    /// Bumped on every enqueue (the all-asleep check's sequence number).
    activity: AtomicU64,
    /// Set when the run ended because every vCPU left was asleep.
    all_asleep: AtomicBool,
    in_loop: AtomicUsize,
    slice_us: AtomicU64,
    /// Per-slot statistics.
    pub stats: [VcpuStats; MAX_SCHED_VCPUS],
    /// Per physical CPU: vCPU runs.
    pub cpu_runs: [AtomicU64; MAX_CPUS],
    /// Per physical CPU: times it went idle.
    pub cpu_idle: [AtomicU64; MAX_CPUS],
}

impl<V: SchedVcpu> Default for Scheduler<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: SchedVcpu> Scheduler<V> {
    /// An empty scheduler.
    pub const fn new() -> Self {
        Scheduler {
            slots: [const { SpinLock::new(None, LockClass::HostVm) }; MAX_SCHED_VCPUS],
            state: [const { AtomicU8::new(EMPTY) }; MAX_SCHED_VCPUS],
            kicked: [const { AtomicBool::new(false) }; MAX_SCHED_VCPUS],
            on_cpu: [const { AtomicUsize::new(usize::MAX) }; MAX_SCHED_VCPUS],
            wake_at: [const { AtomicU64::new(u64::MAX) }; MAX_SCHED_VCPUS],
            queue: SpinLock::new(
                RunQueue {
                    ring: [0; MAX_SCHED_VCPUS],
                    head: 0,
                    len: 0,
                },
                LockClass::Leaf,
            ),
            idle: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            activity: AtomicU64::new(0),
            all_asleep: AtomicBool::new(false),
            in_loop: AtomicUsize::new(0),
            slice_us: AtomicU64::new(DEFAULT_SLICE_US),
            stats: [const {
                VcpuStats {
                    runs: AtomicU64::new(0),
                    preempted: AtomicU64::new(0),
                    yields: AtomicU64::new(0),
                    sleeps: AtomicU64::new(0),
                    cpus: AtomicU64::new(0),
                }
            }; MAX_SCHED_VCPUS],
            cpu_runs: [const { AtomicU64::new(0) }; MAX_CPUS],
            cpu_idle: [const { AtomicU64::new(0) }; MAX_CPUS],
        }
    }

    /// Sets the time slice (microseconds).
    pub fn set_slice_us(&self, us: u64) {
        self.slice_us.store(us.max(100), Ordering::Relaxed);
    }

    /// The time slice in microseconds.
    pub fn slice_us(&self) -> u64 {
        self.slice_us.load(Ordering::Relaxed)
    }

    /// Starts a new run: clears the stop flag and the statistics. Call it
    /// before [`Scheduler::add`]ing the run's vCPUs, while no CPU is in
    /// [`Scheduler::run_cpu`].
    pub fn begin(&self) {
        self.stop.store(false, Ordering::SeqCst);
        self.all_asleep.store(false, Ordering::SeqCst);
        for s in &self.stats {
            s.clear();
        }
        for c in self.cpu_runs.iter().chain(&self.cpu_idle) {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Hands a vCPU to the scheduler in the first free slot, sleeping (not
    /// runnable until kicked); returns the slot.
    ///
    /// # Errors
    /// `Err(v)` if every slot is taken.
    pub fn add(&self, v: V) -> Result<usize, V> {
        for (i, slot) in self.slots.iter().enumerate() {
            let mut s = slot.lock();
            if s.is_none() && self.state[i].load(Ordering::SeqCst) == EMPTY {
                *s = Some(v);
                self.kicked[i].store(false, Ordering::SeqCst);
                self.wake_at[i].store(u64::MAX, Ordering::SeqCst);
                self.live.fetch_add(1, Ordering::SeqCst);
                self.state[i].store(SLEEPING, Ordering::SeqCst);
                return Ok(i);
            }
        }
        Err(v)
    }

    fn enqueue(&self, slot: usize) {
        self.activity.fetch_add(1, Ordering::SeqCst);
        self.queue.lock().push(slot);
        // Wake one idle CPU, if any.
        let idle = self.idle.load(Ordering::SeqCst);
        if idle != 0 {
            gic::send_sgi(gic::SGI_KICK, idle.trailing_zeros() as usize);
        }
    }

    /// Makes the vCPU in `slot` notice new requests: queue it if it sleeps,
    /// force it out of the guest if it runs.
    pub fn kick(&self, slot: usize) {
        if slot >= MAX_SCHED_VCPUS {
            return;
        }
        self.kicked[slot].store(true, Ordering::SeqCst);
        match self.state[slot].load(Ordering::SeqCst) {
            SLEEPING
                if self.state[slot]
                    .compare_exchange(SLEEPING, QUEUED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok() =>
            {
                self.enqueue(slot);
            }
            RUNNING => {
                let cpu = self.on_cpu[slot].load(Ordering::SeqCst);
                if cpu != crate::platform::start::cpu_index() {
                    gic::send_sgi(gic::SGI_KICK, cpu);
                }
            }
            _ => {}
        }
    }

    /// Ends the run early: every CPU leaves [`Scheduler::run_cpu`] (those
    /// in a guest are kicked out); vCPUs still in slots stay there.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        gic::send_sgi_others(gic::SGI_KICK);
    }

    /// Whether the run is over ([`Scheduler::stop`], or no vCPU left).
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// vCPUs added and not yet done.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// CPUs currently inside [`Scheduler::run_cpu`].
    pub fn cpus_in_loop(&self) -> usize {
        self.in_loop.load(Ordering::SeqCst)
    }

    fn pick(&self) -> Option<usize> {
        self.queue.lock().pop()
    }

    /// Arms the EL2 timer for one slice, or until the earliest deadline
    /// of a waiting vCPU if that comes first.
    fn arm_timer(&self) {
        let slice = timer::ticks_for_us(self.slice_us());
        let next = self
            .wake_at
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .min()
            .unwrap_or(u64::MAX);
        let ticks = match next {
            u64::MAX => slice,
            d => d.saturating_sub(timer::now()).min(slice),
        };
        timer::arm_after(ticks);
    }

    /// Kicks every waiting vCPU whose deadline has passed (the deadline is
    /// taken first, so exactly one CPU kicks it).
    fn wake_expired(&self) {
        let now = timer::now();
        for (i, w) in self.wake_at.iter().enumerate() {
            let d = w.load(Ordering::SeqCst);
            if d <= now
                && w.compare_exchange(d, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                self.kick(i);
            }
        }
    }

    fn idle_wait(&self, cpu: usize) {
        let bit = 1usize << cpu;
        self.idle.fetch_or(bit, Ordering::SeqCst);
        let empty = self.queue.lock().len == 0;
        if empty && !self.stopped() {
            self.cpu_idle[cpu].fetch_add(1, Ordering::Relaxed);
            // Backstop: never sleep longer than a slice (or past a
            // sleeping vCPU's deadline).
            self.arm_timer();
            let _ = gic::wait_for_interrupt();
            timer::disable();
        }
        self.idle.fetch_and(!bit, Ordering::SeqCst);
    }

    /// The scheduling loop of physical CPU `cpu`; returns once the run is
    /// over (every vCPU done, or [`Scheduler::stop`]).
    pub fn run_cpu(&self, cpu: usize) {
        self.in_loop.fetch_add(1, Ordering::SeqCst);
        while !self.stopped() {
            self.wake_expired();
            let Some(i) = self.pick() else {
                self.idle_wait(cpu);
                continue;
            };
            if self.state[i]
                .compare_exchange(QUEUED, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue; // not ours (cannot happen: queued once)
            }
            self.on_cpu[i].store(cpu, Ordering::SeqCst);
            self.kicked[i].store(false, Ordering::SeqCst);
            self.wake_at[i].store(u64::MAX, Ordering::SeqCst);
            let st = &self.stats[i];
            st.runs.fetch_add(1, Ordering::Relaxed);
            st.cpus.fetch_or(1 << cpu, Ordering::Relaxed);
            self.cpu_runs[cpu].fetch_add(1, Ordering::Relaxed);
            let mut retired = None;
            let outcome = {
                let mut slot = self.slots[i].lock();
                let o = match slot.as_mut() {
                    Some(v) => {
                        self.arm_timer();
                        let o = v.run(cpu);
                        timer::disable();
                        o
                    }
                    None => Outcome::Done,
                };
                if o == Outcome::Done {
                    retired = slot.take();
                }
                o
            };
            self.on_cpu[i].store(usize::MAX, Ordering::SeqCst);
            match outcome {
                Outcome::Preempted | Outcome::Yield => {
                    let c = if outcome == Outcome::Preempted {
                        &st.preempted
                    } else {
                        &st.yields
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    self.state[i].store(QUEUED, Ordering::SeqCst);
                    self.enqueue(i);
                }
                Outcome::Sleep | Outcome::Wait(_) => {
                    st.sleeps.fetch_add(1, Ordering::Relaxed);
                    if let Outcome::Wait(d) = outcome {
                        self.wake_at[i].store(d, Ordering::SeqCst);
                    }
                    self.state[i].store(SLEEPING, Ordering::SeqCst);
                    if self.kicked[i].load(Ordering::SeqCst)
                        && self.state[i]
                            .compare_exchange(SLEEPING, QUEUED, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                    {
                        self.enqueue(i);
                    } else if self.everyone_asleep() {
                        // Nothing can wake them (no interrupt sources are
                        // modelled; only a running vCPU's CPU_ON could).
                        self.all_asleep.store(true, Ordering::SeqCst);
                        self.stop();
                    }
                }
                Outcome::Done => {
                    // Dropped outside the slot lock (a pkvm-host vCPU frees
                    // its page cache and VM reference).
                    drop(retired);
                    self.state[i].store(EMPTY, Ordering::SeqCst);
                    if self.live.fetch_sub(1, Ordering::SeqCst) == 1 {
                        self.stop();
                    } else if self.everyone_asleep() {
                        // The last vCPU that could wake the others (with
                        // CPU_ON, an SGI, a device interrupt) has gone.
                        self.all_asleep.store(true, Ordering::SeqCst);
                        self.stop();
                    }
                }
            }
        }
        self.in_loop.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether every vCPU still in the scheduler sleeps, with none queued or
    /// running: a stable snapshot (no enqueue happened during the scan).
    fn everyone_asleep(&self) -> bool {
        let seq = self.activity.load(Ordering::SeqCst);
        let all = self
            .state
            .iter()
            .all(|s| matches!(s.load(Ordering::SeqCst), EMPTY | SLEEPING))
            && self
                .wake_at
                .iter()
                .all(|w| w.load(Ordering::SeqCst) == u64::MAX);
        all && self.live() > 0 && self.activity.load(Ordering::SeqCst) == seq
    }

    /// Whether the run ended because every vCPU left was asleep (a guest
    /// that turned all its vCPUs off without SYSTEM_OFF).
    pub fn ended_all_asleep(&self) -> bool {
        self.all_asleep.load(Ordering::SeqCst)
    }

    /// Takes every vCPU still in a slot out of the scheduler (after a run
    /// that ended with vCPUs left, once no CPU is in
    /// [`Scheduler::run_cpu`]), calling `f` on each.
    pub fn drain(&self, mut f: impl FnMut(V)) {
        for (i, slot) in self.slots.iter().enumerate() {
            let v = slot.lock().take();
            self.state[i].store(EMPTY, Ordering::SeqCst);
            self.wake_at[i].store(u64::MAX, Ordering::SeqCst);
            if let Some(v) = v {
                self.live.fetch_sub(1, Ordering::SeqCst);
                f(v);
            }
        }
        *self.queue.lock() = RunQueue {
            ring: [0; MAX_SCHED_VCPUS],
            head: 0,
            len: 0,
        };
    }

    /// Runs `f` on the vCPU in `slot` (e.g. to read its statistics) when
    /// it is not running.
    pub fn with_vcpu<R>(&self, slot: usize, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.slots.get(slot)?.lock().as_ref().map(f)
    }
}

impl<V: SchedVcpu> Kick for Scheduler<V> {
    fn kick(&self, slot: usize) {
        Scheduler::kick(self, slot)
    }
}

/// A CPU bitmask printed as `{0,1}`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuList(pub u64);

impl core::fmt::Display for CpuList {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{{")?;
        let mut first = true;
        for c in (0..64).filter(|c| self.0 & (1 << c) != 0) {
            if !first {
                write!(f, ",")?;
            }
            write!(f, "{c}")?;
            first = false;
        }
        write!(f, "}}")
    }
}

impl core::fmt::Debug for CpuList {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}
