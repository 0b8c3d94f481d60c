//! The PL011 console, the `println!` macro and the panic handler.
//!
//! One `SpinLock` (class `Leaf`) serializes whole `println!` calls so lines
//! from different CPUs never interleave. The lock needs atomics, which need
//! the MMU on: nothing prints before [`super::mmu`] enabled it.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use pkvm_sync::{LockClass, SpinLock};

/// A PL011 UART at a physical (identity-mapped) address.
pub struct Pl011 {
    base: usize,
}

const DR: usize = 0x00;
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;
const CR: usize = 0x30;
/// CR: UARTEN, TXE, RXE.
const CR_ON: u32 = 0x301;

impl Pl011 {
    fn putc(&mut self, c: u8) {
        // SAFETY: `base` is the PL011 from the device tree, mapped as
        // Device memory in the EL2 stage-1; FR and DR are its registers.
        unsafe {
            while core::ptr::read_volatile((self.base + FR) as *const u32) & FR_TXFF != 0 {}
            core::ptr::write_volatile((self.base + DR) as *mut u32, c as u32);
        }
    }
}

impl Pl011 {
    fn getc(&mut self) -> Option<u8> {
        // SAFETY: as in `putc`; FR, CR and DR are its registers.
        unsafe {
            let cr = (self.base + CR) as *mut u32;
            // QEMU's PL011 only receives with UARTEN and RXE set.
            if core::ptr::read_volatile(cr) & CR_ON != CR_ON {
                core::ptr::write_volatile(cr, core::ptr::read_volatile(cr) | CR_ON);
            }
            if core::ptr::read_volatile((self.base + FR) as *const u32) & FR_RXFE != 0 {
                return None;
            }
            Some(core::ptr::read_volatile((self.base + DR) as *const u32) as u8)
        }
    }
}

/// A byte typed on the console (QEMU's serial input), if one is waiting;
/// never blocks.
pub fn getc() -> Option<u8> {
    CONSOLE.lock().getc()
}

impl Write for Pl011 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.putc(b'\r');
            }
            self.putc(b);
        }
        Ok(())
    }
}

static CONSOLE: SpinLock<Pl011> = SpinLock::new(Pl011 { base: 0x0900_0000 }, LockClass::Leaf);
static BASE: AtomicUsize = AtomicUsize::new(0x0900_0000);

/// Points the console at the PL011 found in the device tree.
pub fn set_base(base: usize) {
    BASE.store(base, Ordering::Relaxed);
    CONSOLE.lock().base = base;
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut c = CONSOLE.lock();
    let _ = c.write_fmt(args);
}

#[doc(hidden)]
pub fn _println(args: fmt::Arguments<'_>) {
    let mut c = CONSOLE.lock();
    let _ = c.write_fmt(args);
    let _ = c.write_str("\n");
}

/// Prints to the console (whole call under the console lock).
#[macro_export]
macro_rules! print {
    ($($a:tt)*) => { $crate::platform::console::_print(format_args!($($a)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::platform::console::_print(format_args!("\n")) };
    ($($a:tt)*) => { $crate::platform::console::_println(format_args!($($a)*)) };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Take the lock if we can; if another CPU (or this one, mid-print)
    // holds it, print anyway rather than hang.
    let mut tries = 0u32;
    let guard = loop {
        if let Some(g) = CONSOLE.try_lock() {
            break Some(g);
        }
        tries += 1;
        if tries > 1_000_000 {
            break None;
        }
        core::hint::spin_loop();
    };
    let mut raw = Pl011 {
        base: BASE.load(Ordering::Relaxed),
    };
    let cpu = super::start::cpu_index();
    match guard {
        Some(mut g) => {
            let _ = writeln!(g, "\nPANIC on CPU {cpu}: {info}");
        }
        None => {
            let _ = writeln!(raw, "\nPANIC on CPU {cpu} (console lock busy): {info}");
        }
    }
    super::exit::exit(super::exit::PANIC_EXIT_CODE)
}
