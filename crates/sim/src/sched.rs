//! The deterministic scheduler.
//!
//! One thread runs every actor: simulated CPUs (each with the exit handler
//! the host provides) and host events (closures: reclaim, migration, an MMU
//! notifier storm, a page-table change). At each step a seeded generator
//! picks the next runnable actor, weighted, and for a CPU a quantum (1 to
//! `max_quantum` operations). Given the same seed, actors and deterministic
//! handlers, the sequence of steps, the [`TraceEntry`]s, is identical, so a
//! failing interleaving replays exactly.

use crate::cpu::{SimCpu, SimExit};
use crate::rng::SplitMix64;

/// What an actor wants after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep scheduling it.
    Continue,
    /// Retire it.
    Stop,
}

/// What happened at one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceWhat {
    /// A CPU ran with `quantum` and exited with `exit` after `accesses`
    /// total completed accesses.
    Cpu {
        /// CPU id.
        cpu: usize,
        /// Budget given.
        quantum: u64,
        /// The exit.
        exit: SimExit,
        /// Accesses completed by the CPU so far.
        accesses: u64,
    },
    /// An event ran.
    Event {
        /// The event's name.
        name: &'static str,
    },
}

/// One step of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// Step number.
    pub step: u64,
    /// What ran.
    pub what: TraceWhat,
}

type CpuHandler<'a> = Box<dyn FnMut(&mut SimCpu, SimExit) -> Control + 'a>;
type EventFn<'a> = Box<dyn FnMut(u64) -> Control + 'a>;

enum Actor<'a> {
    Cpu {
        cpu: &'a mut SimCpu,
        handler: CpuHandler<'a>,
    },
    Event {
        name: &'static str,
        f: EventFn<'a>,
    },
}

struct Slot<'a> {
    actor: Actor<'a>,
    weight: u32,
    live: bool,
}

/// A seeded single-threaded scheduler.
pub struct Scheduler<'a> {
    rng: SplitMix64,
    slots: Vec<Slot<'a>>,
    trace: Vec<TraceEntry>,
    max_quantum: u64,
    step: u64,
}

impl<'a> Scheduler<'a> {
    /// A scheduler seeded with `seed`; CPU quanta are 1..=`max_quantum` ops.
    pub fn new(seed: u64, max_quantum: u64) -> Scheduler<'a> {
        Scheduler {
            rng: SplitMix64::new(seed),
            slots: Vec::new(),
            trace: Vec::new(),
            max_quantum: max_quantum.max(1),
            step: 0,
        }
    }

    /// Adds a CPU; `handler` resolves each exit (it may inspect and change the
    /// CPU: registers, `emulate_pending`, `inject_abort`, ...). The CPU is
    /// retired on [`SimExit::ProgramDone`] or when the handler says stop.
    pub fn add_cpu(
        &mut self,
        cpu: &'a mut SimCpu,
        weight: u32,
        handler: impl FnMut(&mut SimCpu, SimExit) -> Control + 'a,
    ) {
        self.slots.push(Slot {
            actor: Actor::Cpu {
                cpu,
                handler: Box::new(handler),
            },
            weight: weight.max(1),
            live: true,
        });
    }

    /// Adds a host event, run with the step number each time it is picked.
    pub fn add_event(
        &mut self,
        name: &'static str,
        weight: u32,
        f: impl FnMut(u64) -> Control + 'a,
    ) {
        self.slots.push(Slot {
            actor: Actor::Event {
                name,
                f: Box::new(f),
            },
            weight: weight.max(1),
            live: true,
        });
    }

    /// Runs until every CPU is retired (events alone do not keep it going)
    /// or `max_steps` steps ran. Returns the trace so far.
    pub fn run(&mut self, max_steps: u64) -> &[TraceEntry] {
        while self.step < max_steps {
            let cpus_live = self
                .slots
                .iter()
                .any(|s| s.live && matches!(s.actor, Actor::Cpu { .. }));
            if !cpus_live {
                break;
            }
            let total: u64 = self
                .slots
                .iter()
                .filter(|s| s.live)
                .map(|s| s.weight as u64)
                .sum();
            let mut pick = self.rng.below(total);
            let idx = self
                .slots
                .iter()
                .position(|s| {
                    if !s.live {
                        return false;
                    }
                    if pick < s.weight as u64 {
                        true
                    } else {
                        pick -= s.weight as u64;
                        false
                    }
                })
                .expect("pick is below the total weight");
            let step = self.step;
            self.step += 1;
            let quantum = 1 + self.rng.below(self.max_quantum);
            let slot = &mut self.slots[idx];
            let (what, control) = match &mut slot.actor {
                Actor::Cpu { cpu, handler } => {
                    cpu.set_budget(quantum);
                    let exit = cpu.run();
                    let what = TraceWhat::Cpu {
                        cpu: cpu.id(),
                        quantum,
                        exit,
                        accesses: cpu.stats().accesses,
                    };
                    let c = if exit == SimExit::ProgramDone {
                        Control::Stop
                    } else {
                        Control::Continue
                    };
                    let h = handler(cpu, exit);
                    (what, if c == Control::Stop { c } else { h })
                }
                Actor::Event { name, f } => (TraceWhat::Event { name }, f(step)),
            };
            if control == Control::Stop {
                slot.live = false;
            }
            self.trace.push(TraceEntry { step, what });
        }
        &self.trace
    }

    /// The trace so far.
    pub fn trace(&self) -> &[TraceEntry] {
        &self.trace
    }
}
