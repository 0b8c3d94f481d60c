//! MMIO client: prints through the emulated PL011 (every byte is an MMIO
//! exit the host turns into console output), polls the UART flag register,
//! then reads an address outside its memslots and reports the value
//! (code MMIO_READ): the host must handle that as an MMIO exit.
#![no_std]
#![no_main]

use guest_rt::{code, println, read32, report};

/// Outside every memslot and every emulated device.
const UNBACKED: usize = 0x0a00_0000;

/// Entry called by guest-rt.
#[no_mangle]
pub fn guest_main(_: u64, _: u64, _: u64, _: u64) -> u64 {
    println!("hello through the emulated PL011");
    let fr = read32(0x0900_0018);
    println!("PL011 FR reads {fr:#x}");
    let v = read32(UNBACKED);
    report(code::MMIO_READ, v as u64, UNBACKED as u64);
    0
}
