//! The PL011 console, the `println!` macro and the panic handler.
//!
//! One `SpinLock` (class `Leaf`) serializes whole `println!` calls so lines
//! from different CPUs never interleave. The lock needs atomics, which need
//! the MMU on: nothing prints before [`super::mmu`] enabled it.
//!
//! Two consoles drive the one PL011: code at EL2 (the hypervisor, and the
//! VMM while it still runs there) prints through the hypervisor's, whose
//! lock and UART address are in its own data (`.data.hyp`); code at EL1
//! through the host's, in host memory. A host that rewrites its console's
//! address cannot make the hypervisor write elsewhere.

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
    console().0.lock().getc()
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

/// The host's console (host memory).
static CONSOLE: SpinLock<Pl011> = SpinLock::new(Pl011 { base: 0x0900_0000 }, LockClass::Leaf);
/// The host's UART address for its panic handler (the lock may be held).
static BASE: AtomicUsize = AtomicUsize::new(0x0900_0000);
/// The hypervisor's console (its own data).
#[link_section = ".data.hyp.console"]
static HYP_CONSOLE: SpinLock<Pl011> = SpinLock::new(Pl011 { base: 0x0900_0000 }, LockClass::Leaf);
/// The hypervisor's UART address for its panic handler.
#[link_section = ".data.hyp.console_base"]
static HYP_BASE: AtomicUsize = AtomicUsize::new(0x0900_0000);

/// The hypervisor's statics here, for [`super::hypdata::audit`].
pub(super) fn hyp_statics() -> [(&'static str, u64); 2] {
    [
        (
            "console::HYP_CONSOLE",
            core::ptr::from_ref(&HYP_CONSOLE) as u64,
        ),
        ("console::HYP_BASE", HYP_BASE.as_ptr() as u64),
    ]
}

/// Whether this code runs at EL2 (`CurrentEL`, readable at EL1 and EL2).
fn at_el2() -> bool {
    (crate::read_sysreg!("currentel") >> 2) & 3 == 2
}

/// The console of this exception level and its UART address record.
fn console() -> (&'static SpinLock<Pl011>, &'static AtomicUsize) {
    if at_el2() {
        (&HYP_CONSOLE, &HYP_BASE)
    } else {
        (&CONSOLE, &BASE)
    }
}

/// Points both consoles at the PL011 found in the device tree (at EL2,
/// at boot).
pub fn set_base(base: usize) {
    for (c, b) in [(&HYP_CONSOLE, &HYP_BASE), (&CONSOLE, &BASE)] {
        b.store(base, Ordering::Relaxed);
        c.lock().base = base;
    }
}

/// The address of the host console's record of the UART address (in host
/// memory), for `host-attack`, whose host overwrites it.
pub fn host_base_record_addr() -> u64 {
    core::ptr::from_ref(&CONSOLE.lock().base) as u64
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut c = console().0.lock();
    let _ = c.write_fmt(args);
}

#[doc(hidden)]
pub fn _println(args: fmt::Arguments<'_>) {
    let mut c = console().0.lock();
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
    let (console, base) = console();
    let mut tries = 0u32;
    let guard = loop {
        if let Some(g) = console.try_lock() {
            break Some(g);
        }
        tries += 1;
        if tries > 1_000_000 {
            break None;
        }
        core::hint::spin_loop();
    };
    let mut raw = Pl011 {
        base: base.load(Ordering::Relaxed),
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
