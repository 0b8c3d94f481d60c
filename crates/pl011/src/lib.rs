//! A model of the Arm PL011 UART as a VM's emulated console, complete
//! enough for Linux's `amba-pl011` driver (probe, interrupts, RX and TX).
//!
//! The VMM feeds it guest MMIO accesses ([`Pl011::read`], [`Pl011::write`])
//! and bytes from the user's terminal ([`Pl011::push_rx`]); it returns
//! bytes the guest transmitted and the level of its interrupt line
//! ([`Pl011::irq_level`], `RIS & IMSC != 0`), which the VMM drives into
//! the VM's interrupt controller (SPI 1, INTID 33, level-high on QEMU
//! virt).
//!
//! Registers (offsets in the 4 KiB frame; PL011 TRM, DDI 0183):
//!
//! | offset | name | here |
//! |---|---|---|
//! | 0x000 | DR | write: transmit a byte (at once: the TX FIFO is always empty); read: pop the RX FIFO (0 when empty) |
//! | 0x004 | RSR/ECR | reads 0 (no errors), writes clear |
//! | 0x018 | FR | TXFE, RXFE, RXFF from the FIFO; TXFF and BUSY never set |
//! | 0x020 | ILPR | stored |
//! | 0x024/0x028 | IBRD/FBRD | stored (no baud rate is modelled) |
//! | 0x02c | LCR_H | stored; FEN (bit 4) selects the 32-byte FIFO, else a 1-byte holding register |
//! | 0x030 | CR | stored (reset 0x300) |
//! | 0x034 | IFLS | stored (reset 0x12); its RX level sets the RX interrupt threshold |
//! | 0x038 | IMSC | interrupt mask (1: enabled) |
//! | 0x03c | RIS | raw status |
//! | 0x040 | MIS | RIS & IMSC |
//! | 0x044 | ICR | write 1 to clear |
//! | 0x048 | DMACR | stored (no DMA) |
//! | 0xfe0..0xffc | PeriphID0-3, PCellID0-3 | 0x00141011 / 0xb105f00d as QEMU's |
//!
//! Interrupts: TX is raised when the guest writes DR (the byte left at
//! once, so the FIFO is below any trigger level) and at reset, cleared by
//! ICR. RX is the level "FIFO at or above the IFLS level", RT ("receive
//! timeout") is "FIFO not empty": a model with an instant timeout, so a
//! single typed key interrupts at once. Both follow the FIFO (reading DR
//! lowers them); ICR clears them until the next byte arrives.

#![no_std]
#![forbid(unsafe_code)]

/// The UART frame size.
pub const SIZE: u64 = 0x1000;
/// RX FIFO depth with FEN set (PL011 r1p5: 32; Linux uses 16 for rev 1 IDs
/// and reads FR, so a deeper FIFO only helps).
pub const FIFO_DEPTH: usize = 32;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const DR: u64 = 0x000;
    pub const RSR: u64 = 0x004;
    pub const FR: u64 = 0x018;
    pub const ILPR: u64 = 0x020;
    pub const IBRD: u64 = 0x024;
    pub const FBRD: u64 = 0x028;
    pub const LCR_H: u64 = 0x02c;
    pub const CR: u64 = 0x030;
    pub const IFLS: u64 = 0x034;
    pub const IMSC: u64 = 0x038;
    pub const RIS: u64 = 0x03c;
    pub const MIS: u64 = 0x040;
    pub const ICR: u64 = 0x044;
    pub const DMACR: u64 = 0x048;
}

/// FR bits.
pub mod fr {
    #![allow(missing_docs)]
    pub const BUSY: u32 = 1 << 3;
    pub const RXFE: u32 = 1 << 4;
    pub const TXFF: u32 = 1 << 5;
    pub const RXFF: u32 = 1 << 6;
    pub const TXFE: u32 = 1 << 7;
}

/// Interrupt bits (IMSC, RIS, MIS, ICR).
pub mod int {
    #![allow(missing_docs)]
    pub const RX: u32 = 1 << 4;
    pub const TX: u32 = 1 << 5;
    pub const RT: u32 = 1 << 6;
    /// Every interrupt bit of the PL011 (modem, RX, TX, RT, errors).
    pub const ALL: u32 = 0x7ff;
}

const LCR_H_FEN: u32 = 1 << 4;
/// PeriphID0..3 then PCellID0..3, one byte per register (QEMU virt's).
const ID: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// One emulated PL011.
#[derive(Clone, Debug)]
pub struct Pl011 {
    rx: [u8; FIFO_DEPTH],
    rx_head: usize,
    rx_len: usize,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    /// Latched interrupt bits (TX, and RX/RT cleared by ICR).
    latched: u32,
    /// RX/RT bits ICR cleared, until the next byte arrives.
    rx_acked: u32,
    ibrd: u32,
    fbrd: u32,
    ilpr: u32,
    dmacr: u32,
}

impl Default for Pl011 {
    fn default() -> Self {
        Self::new()
    }
}

impl Pl011 {
    /// A PL011 in its reset state (TX interrupt raw status set, all
    /// masked).
    pub const fn new() -> Self {
        Pl011 {
            rx: [0; FIFO_DEPTH],
            rx_head: 0,
            rx_len: 0,
            lcr_h: 0,
            cr: 0x300,
            ifls: 0x12,
            imsc: 0,
            latched: int::TX,
            rx_acked: 0,
            ibrd: 0,
            fbrd: 0,
            ilpr: 0,
            dmacr: 0,
        }
    }

    /// Back to the reset state (a VM reset); queued input is dropped.
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// Bytes the RX FIFO holds now (1 without FEN).
    fn depth(&self) -> usize {
        if self.lcr_h & LCR_H_FEN != 0 {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// The RX interrupt threshold from IFLS bits 5:3 (1/8 .. 7/8 of the
    /// FIFO; 1 byte without FEN).
    fn rx_trigger(&self) -> usize {
        if self.lcr_h & LCR_H_FEN == 0 {
            return 1;
        }
        let eighths = match (self.ifls >> 3) & 7 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 6,
            _ => 7,
        };
        (FIFO_DEPTH * eighths / 8).max(1)
    }

    /// Whether the RX FIFO can take another byte.
    pub fn rx_room(&self) -> bool {
        self.rx_len < self.depth()
    }

    /// Bytes waiting in the RX FIFO.
    pub fn rx_pending(&self) -> usize {
        self.rx_len
    }

    /// A byte from the terminal: queued if the FIFO has room (returns
    /// whether it was taken; a full FIFO leaves it with the caller, which
    /// keeps it for later: nothing is lost).
    pub fn push_rx(&mut self, b: u8) -> bool {
        if !self.rx_room() {
            return false;
        }
        let tail = (self.rx_head + self.rx_len) % FIFO_DEPTH;
        self.rx[tail] = b;
        self.rx_len += 1;
        self.rx_acked = 0;
        true
    }

    fn pop_rx(&mut self) -> u8 {
        if self.rx_len == 0 {
            return 0;
        }
        let b = self.rx[self.rx_head];
        self.rx_head = (self.rx_head + 1) % FIFO_DEPTH;
        self.rx_len -= 1;
        b
    }

    /// The raw interrupt status (RIS).
    pub fn ris(&self) -> u32 {
        let mut rx = 0;
        if self.rx_len > 0 {
            rx |= int::RT;
        }
        if self.rx_len >= self.rx_trigger() {
            rx |= int::RX;
        }
        self.latched | (rx & !self.rx_acked)
    }

    /// The interrupt line: some unmasked raw status bit is set.
    pub fn irq_level(&self) -> bool {
        self.ris() & self.imsc != 0
    }

    fn fr(&self) -> u32 {
        let mut f = fr::TXFE;
        if self.rx_len == 0 {
            f |= fr::RXFE;
        }
        if !self.rx_room() {
            f |= fr::RXFF;
        }
        f
    }

    /// A guest read of the 32-bit register at `off`.
    pub fn read(&mut self, off: u64) -> u32 {
        match off {
            reg::DR => u32::from(self.pop_rx()),
            reg::FR => self.fr(),
            reg::ILPR => self.ilpr,
            reg::IBRD => self.ibrd,
            reg::FBRD => self.fbrd,
            reg::LCR_H => self.lcr_h,
            reg::CR => self.cr,
            reg::IFLS => self.ifls,
            reg::IMSC => self.imsc,
            reg::RIS => self.ris(),
            reg::MIS => self.ris() & self.imsc,
            0xfe0..=0xffc if off.is_multiple_of(4) => u32::from(ID[((off - 0xfe0) / 4) as usize]),
            _ => 0,
        }
    }

    /// A guest write of `v` to the register at `off`: returns the byte to
    /// transmit (a DR write).
    pub fn write(&mut self, off: u64, v: u32) -> Option<u8> {
        match off {
            reg::DR => {
                self.latched |= int::TX;
                return Some(v as u8);
            }
            reg::ILPR => self.ilpr = v & 0xff,
            reg::IBRD => self.ibrd = v & 0xffff,
            reg::FBRD => self.fbrd = v & 0x3f,
            reg::LCR_H => {
                // Changing FEN flushes nothing in hardware; a byte beyond
                // the new depth stays readable (the FIFO drains).
                self.lcr_h = v & 0xff;
            }
            reg::CR => self.cr = v & 0xffff,
            reg::IFLS => self.ifls = v & 0x3f,
            reg::IMSC => self.imsc = v & int::ALL,
            reg::ICR => {
                self.latched &= !v;
                self.rx_acked |= v & (int::RX | int::RT);
            }
            reg::DMACR => self.dmacr = v & 7,
            _ => {} // RSR/ECR (clear errors: none), read-only, reserved
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's pl011 start-up: FIFO on, RX level 1/2, RX and RT unmasked.
    fn linux_started() -> Pl011 {
        let mut u = Pl011::new();
        u.write(reg::ICR, int::ALL);
        u.write(reg::LCR_H, 0x70); // 8N1, FEN
        u.write(reg::IFLS, 0x12);
        u.write(reg::CR, 0x301);
        u.write(reg::IMSC, int::RX | int::RT);
        u
    }

    #[test]
    fn ids_are_qemu_virts_and_fr_says_tx_empty() {
        let mut u = Pl011::new();
        let id = |u: &mut Pl011, base: u64| {
            (0..4).fold(0u32, |a, i| a | (u.read(base + 4 * i) << (8 * i)))
        };
        assert_eq!(id(&mut u, 0xfe0), 0x0014_1011);
        assert_eq!(id(&mut u, 0xff0), 0xb105_f00d);
        let f = u.read(reg::FR);
        assert_eq!(f & (fr::TXFE | fr::RXFE), fr::TXFE | fr::RXFE);
        assert_eq!(f & (fr::TXFF | fr::BUSY), 0);
        assert_eq!(u.read(reg::CR), 0x300);
    }

    #[test]
    fn a_typed_byte_raises_rt_until_read_then_the_line_drops() {
        let mut u = linux_started();
        assert!(!u.irq_level());
        assert!(u.push_rx(b'a'));
        assert!(u.irq_level(), "one byte below the RX level raises RT");
        assert_eq!(u.read(reg::MIS), int::RT);
        assert_eq!(u.read(reg::FR) & fr::RXFE, 0);
        assert_eq!(u.read(reg::DR), u32::from(b'a'));
        assert_eq!(u.read(reg::FR) & fr::RXFE, fr::RXFE);
        assert!(!u.irq_level());
    }

    #[test]
    fn rx_level_follows_ifls_and_the_fifo_keeps_order() {
        let mut u = linux_started();
        for b in 0..16u8 {
            assert!(u.push_rx(b));
        }
        assert_eq!(u.ris() & int::RX, int::RX, "16 of 32 is the 1/2 level");
        assert_eq!(u.read(reg::DR), 0);
        assert_eq!(u.ris() & int::RX, 0);
        for b in 16..33u8 {
            assert!(u.push_rx(b));
        }
        assert!(!u.push_rx(99), "full: the byte stays with the caller");
        assert_eq!(u.read(reg::FR) & fr::RXFF, fr::RXFF);
        for want in 1..=32u32 {
            assert_eq!(u.read(reg::DR), want);
        }
        assert_eq!(u.read(reg::DR), 0, "empty reads 0");
    }

    #[test]
    fn without_fen_the_fifo_is_one_byte() {
        let mut u = Pl011::new();
        assert!(u.push_rx(1));
        assert!(!u.push_rx(2));
        assert_eq!(u.ris() & (int::RX | int::RT), int::RX | int::RT);
    }

    #[test]
    fn tx_interrupt_is_raised_by_writes_and_cleared_by_icr() {
        let mut u = linux_started();
        u.write(reg::ICR, int::TX);
        assert_eq!(u.ris() & int::TX, 0);
        assert_eq!(u.write(reg::DR, u32::from(b'x')), Some(b'x'));
        assert_eq!(u.ris() & int::TX, int::TX);
        assert!(!u.irq_level(), "TX masked");
        u.write(reg::IMSC, int::RX | int::RT | int::TX);
        assert!(u.irq_level());
        u.write(reg::ICR, int::TX);
        assert!(!u.irq_level());
    }

    #[test]
    fn icr_acks_rx_until_the_next_byte() {
        let mut u = linux_started();
        u.push_rx(b'a');
        u.write(reg::ICR, int::RT | int::RX);
        assert!(!u.irq_level());
        u.push_rx(b'b');
        assert!(u.irq_level());
        u.reset();
        assert_eq!(u.rx_pending(), 0);
        assert!(!u.irq_level());
    }
}
