//! Workload descriptions: guest programs generated from a few parameters.
//!
//! A [`Workload`] is a list of [`Phase`]s run in order. Each phase makes
//! `accesses` memory accesses over a region with a [`Pattern`], a size, a
//! store and a fetch fraction, and optionally interleaves HVC calls (e.g.
//! PSCI) and MMIO accesses. Everything random comes from the workload's seed.

use pkvm_arch::Ipa;

use crate::cpu::{GuestProgram, Op};
use crate::mmu::AccessKind;
use crate::rng::SplitMix64;

/// How addresses move through a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// One access after the other, `size` bytes apart, wrapping.
    Sequential,
    /// `stride` bytes apart, wrapping (e.g. 4096: one access per page).
    Strided(u64),
    /// Uniformly random aligned addresses.
    Random,
}

/// An HVC (or SMC) issued periodically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Use SMC instead of HVC.
    pub smc: bool,
    /// The immediate.
    pub imm: u16,
    /// `x0..x3` (x0 is the SMCCC function id).
    pub args: [u64; 4],
}

/// MMIO accesses mixed into a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio {
    /// Region base (not backed by memory: accesses fault to the host).
    pub base: Ipa,
    /// Region size.
    pub size: u64,
    /// One MMIO access every `every` accesses.
    pub every: u64,
}

/// One phase of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    /// Region start.
    pub base: Ipa,
    /// Region size in bytes.
    pub size: u64,
    /// Address pattern.
    pub pattern: Pattern,
    /// Accesses in the phase.
    pub accesses: u64,
    /// Access size (1, 2, 4, 8); 0 = random per access.
    pub access_size: u8,
    /// Stores per thousand accesses.
    pub write_per_mille: u16,
    /// Instruction fetches per thousand accesses.
    pub exec_per_mille: u16,
    /// Verify loads against the last value this CPU wrote.
    pub verify: bool,
    /// A call every `call_every` accesses (0 = never).
    pub call_every: u64,
    /// The call.
    pub call: Call,
    /// Optional MMIO accesses.
    pub mmio: Option<Mmio>,
}

impl Phase {
    /// A phase over `[base, base+size)` with `pattern`: 8-byte verified
    /// loads, no stores, no calls.
    pub fn new(base: Ipa, size: u64, pattern: Pattern) -> Phase {
        Phase {
            base,
            size,
            pattern,
            accesses: size / 8,
            access_size: 8,
            write_per_mille: 0,
            exec_per_mille: 0,
            verify: true,
            call_every: 0,
            call: Call {
                smc: false,
                imm: 0,
                args: [0; 4],
            },
            mmio: None,
        }
    }

    /// Writes every 8-byte word of the region once, in order.
    pub fn fill(base: Ipa, size: u64) -> Phase {
        Phase::new(base, size, Pattern::Sequential).writes(1000)
    }

    /// Touches every page of the region once (one store per page).
    pub fn touch_pages(base: Ipa, size: u64) -> Phase {
        Phase::new(base, size, Pattern::Strided(4096))
            .accesses(size / 4096)
            .writes(1000)
    }

    /// Sets the number of accesses.
    pub fn accesses(mut self, n: u64) -> Phase {
        self.accesses = n;
        self
    }

    /// Sets the store fraction.
    pub fn writes(mut self, per_mille: u16) -> Phase {
        self.write_per_mille = per_mille.min(1000);
        self
    }

    /// Sets the fetch fraction.
    pub fn fetches(mut self, per_mille: u16) -> Phase {
        self.exec_per_mille = per_mille.min(1000);
        self
    }

    /// Sets the access size (0 = random among 1, 2, 4, 8).
    pub fn size(mut self, bytes: u8) -> Phase {
        self.access_size = bytes;
        self
    }

    /// Turns verification on or off.
    pub fn verify(mut self, on: bool) -> Phase {
        self.verify = on;
        self
    }

    /// Issues `call` every `every` accesses.
    pub fn call_every(mut self, every: u64, call: Call) -> Phase {
        self.call_every = every;
        self.call = call;
        self
    }

    /// Mixes in MMIO accesses.
    pub fn mmio(mut self, mmio: Mmio) -> Phase {
        self.mmio = Some(mmio);
        self
    }
}

/// A guest program made of phases.
#[derive(Clone, Debug)]
pub struct Workload {
    phases: Vec<Phase>,
    rng: SplitMix64,
    phase: usize,
    done: u64,
    cursor: u64,
}

impl Workload {
    /// A workload running `phases` in order, seeded with `seed`.
    pub fn new(seed: u64, phases: impl IntoIterator<Item = Phase>) -> Workload {
        Workload {
            phases: phases.into_iter().collect(),
            rng: SplitMix64::new(seed),
            phase: 0,
            done: 0,
            cursor: 0,
        }
    }
}

fn size_of(rng: &mut SplitMix64, p: &Phase) -> u8 {
    match p.access_size {
        1 | 2 | 4 | 8 => p.access_size,
        _ => 1 << rng.below(4),
    }
}

impl GuestProgram for Workload {
    #[inline]
    fn next_op(&mut self, _regs: &[u64; 31]) -> Option<Op> {
        let Workload {
            phases,
            rng,
            phase,
            done,
            cursor,
        } = self;
        loop {
            let p = phases.get(*phase)?;
            if *done >= p.accesses || p.size == 0 {
                *phase += 1;
                *done = 0;
                *cursor = 0;
                continue;
            }
            *done += 1;
            if p.call_every != 0 && *done % p.call_every == 0 {
                let Call { smc, imm, args } = p.call;
                return Some(if smc {
                    Op::Smc { imm, args }
                } else {
                    Op::Hvc { imm, args }
                });
            }
            let size = size_of(rng, p);
            if let Some(m) = p.mmio {
                if m.every != 0 && *done % m.every == 0 && m.size >= 8 {
                    let off = rng.below(m.size / 8) * 8;
                    let kind = if rng.chance(500) {
                        AccessKind::Write
                    } else {
                        AccessKind::Read
                    };
                    return Some(Op::Access {
                        ipa: m.base + off,
                        kind,
                        size: 4,
                        verify: false,
                        plain: true,
                    });
                }
            }
            let off = match p.pattern {
                Pattern::Sequential => {
                    if *cursor >= p.size {
                        *cursor = 0;
                    }
                    let o = *cursor;
                    *cursor += size as u64;
                    o
                }
                Pattern::Strided(stride) => {
                    if *cursor >= p.size {
                        *cursor %= p.size;
                    }
                    let o = *cursor;
                    *cursor += stride.max(1);
                    o
                }
                Pattern::Random => rng.below(p.size),
            };
            let ipa = Ipa((p.base.0 + off) & !(size as u64 - 1));
            let roll = rng.below(1000) as u16;
            let kind = if roll < p.exec_per_mille {
                AccessKind::Exec
            } else if roll < p.exec_per_mille.saturating_add(p.write_per_mille) {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            return Some(match kind {
                AccessKind::Exec => Op::exec(Ipa(ipa.0 & !3)),
                kind => Op::Access {
                    ipa,
                    kind,
                    size,
                    verify: p.verify,
                    plain: true,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(mut w: Workload) -> Vec<Op> {
        std::iter::from_fn(|| w.next_op(&[0; 31])).collect()
    }

    #[test]
    fn sequential_fill_writes_each_word_once() {
        let v = ops(Workload::new(1, [Phase::fill(Ipa(0x1000), 64)]));
        assert_eq!(v.len(), 8);
        for (i, op) in v.iter().enumerate() {
            assert_eq!(
                *op,
                Op::Access {
                    ipa: Ipa(0x1000 + i as u64 * 8),
                    kind: AccessKind::Write,
                    size: 8,
                    verify: true,
                    plain: true
                }
            );
        }
    }

    #[test]
    fn same_seed_same_ops_and_calls_are_interleaved() {
        let call = Call {
            smc: false,
            imm: 0,
            args: [0x8400_0000, 0, 0, 0],
        };
        let ph = Phase::new(Ipa(0), 1 << 20, Pattern::Random)
            .accesses(100)
            .writes(300)
            .size(0)
            .call_every(10, call);
        let a = ops(Workload::new(5, [ph]));
        assert_eq!(a, ops(Workload::new(5, [ph])));
        assert_ne!(a, ops(Workload::new(6, [ph])));
        assert_eq!(a.iter().filter(|o| matches!(o, Op::Hvc { .. })).count(), 10);
        for op in &a {
            if let Op::Access { ipa, size, .. } = op {
                assert_eq!(ipa.0 % *size as u64, 0, "accesses are naturally aligned");
                assert!(ipa.0 < 1 << 20);
            }
        }
    }

    #[test]
    fn strided_touches_one_word_per_page() {
        let v = ops(Workload::new(
            1,
            [Phase::touch_pages(Ipa(0x10_0000), 4 * 4096)],
        ));
        let addrs: Vec<u64> = v
            .iter()
            .map(|o| match o {
                Op::Access { ipa, .. } => ipa.0,
                _ => 0,
            })
            .collect();
        assert_eq!(addrs, vec![0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000]);
    }
}
