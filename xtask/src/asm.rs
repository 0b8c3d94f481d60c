//! A tiny AArch64 encoder, enough to build the external-guest test payload
//! without any toolchain: a flat binary entered at byte 0 with the MMU off
//! and x0 = DTB address, which checks the DTB magic, prints a message
//! through the PL011 at 0x0900_0000 and powers off with PSCI SYSTEM_OFF
//! over HVC.

/// `movz xd, #imm, lsl #(16*hw)`.
pub fn movz(rd: u32, imm: u16, hw: u32) -> u32 {
    0xd280_0000 | (hw << 21) | ((imm as u32) << 5) | rd
}
/// `movk xd, #imm, lsl #(16*hw)`.
pub fn movk(rd: u32, imm: u16, hw: u32) -> u32 {
    0xf280_0000 | (hw << 21) | ((imm as u32) << 5) | rd
}
/// `mov xd, xm` (`orr xd, xzr, xm`).
pub fn mov(rd: u32, rm: u32) -> u32 {
    0xaa00_03e0 | (rm << 16) | rd
}
/// `ldr wt, [xn]`.
pub fn ldr_w(rt: u32, rn: u32) -> u32 {
    0xb940_0000 | (rn << 5) | rt
}
/// `ldrb wt, [xn], #1` (post-increment).
pub fn ldrb_post1(rt: u32, rn: u32) -> u32 {
    0x3840_1400 | (rn << 5) | rt
}
/// `strb wt, [xn]`.
pub fn strb(rt: u32, rn: u32) -> u32 {
    0x3900_0000 | (rn << 5) | rt
}
/// `cmp wn, wm`.
pub fn cmp_w(rn: u32, rm: u32) -> u32 {
    0x6b00_001f | (rm << 16) | (rn << 5)
}
/// `cbz wt, pc+off` (off in bytes, multiple of 4).
pub fn cbz_w(rt: u32, off: i32) -> u32 {
    0x3400_0000 | ((((off >> 2) as u32) & 0x7ffff) << 5) | rt
}
/// `b.ne pc+off`.
pub fn b_ne(off: i32) -> u32 {
    0x5400_0001 | ((((off >> 2) as u32) & 0x7ffff) << 5)
}
/// `b pc+off`.
pub fn b(off: i32) -> u32 {
    0x1400_0000 | (((off >> 2) as u32) & 0x03ff_ffff)
}
/// `adr xd, pc+off`.
pub fn adr(rd: u32, off: i32) -> u32 {
    let o = off as u32;
    0x1000_0000 | ((o & 3) << 29) | (((o >> 2) & 0x7ffff) << 5) | rd
}
/// `hvc #imm`.
pub fn hvc(imm: u16) -> u32 {
    0xd400_0002 | ((imm as u32) << 5)
}

/// The message the external test guest prints on success.
pub const GUEST_MESSAGE: &str = "hello from an external flat guest (dtb ok)";

/// Builds the external test guest (see the module docs).
pub fn external_test_guest() -> Vec<u8> {
    // Layout: code, then "ok" message, then "bad dtb" message.
    let ok_msg = format!("{GUEST_MESSAGE}\n\0");
    let bad_msg = "external guest: x0 does not point at a device tree\n\0";
    // x5 = x0 (DTB); w3 = *x5; w4 = 0xedfe0dd0 (FDT magic read little-endian)
    let mut c: Vec<u32> = vec![
        mov(5, 0),          // 0
        ldr_w(3, 5),        // 4
        movz(4, 0x0dd0, 0), // 8   (movz x4 zeroes the top; cmp uses w4)
        movk(4, 0xedfe, 1), // 12
        cmp_w(3, 4),        // 16
        movz(0, 0x0900, 1), // 20  x0 = 0x0900_0000 (PL011 DR)
    ];
    // 24: b.ne bad  (patched below), 28: adr x1, ok
    let bne_at = c.len();
    c.push(0);
    let adr_ok_at = c.len();
    c.push(0);
    // print loop at 32
    let print = c.len();
    c.push(ldrb_post1(2, 1)); // ldrb w2, [x1], #1
    c.push(cbz_w(2, 12)); // -> done
    c.push(strb(2, 0)); // strb w2, [x0]
    c.push(b(-12)); // -> print
                    // done: x0 = PSCI SYSTEM_OFF; hvc #0; spin
    c.push(movz(0, 0x0008, 0));
    c.push(movk(0, 0x8400, 1));
    c.push(hvc(0));
    c.push(b(0));
    // bad: adr x1, bad_msg; b print
    let bad = c.len();
    let adr_bad_at = c.len();
    c.push(0);
    let b_at = c.len();
    c.push(b((print as i32 - b_at as i32) * 4));
    let code_len = c.len() * 4;
    let ok_off = code_len;
    let bad_off = ok_off + ok_msg.len();
    c[bne_at] = b_ne((bad as i32 - bne_at as i32) * 4);
    c[adr_ok_at] = adr(1, ok_off as i32 - (adr_ok_at * 4) as i32);
    c[adr_bad_at] = adr(1, bad_off as i32 - (adr_bad_at * 4) as i32);
    let mut out: Vec<u8> = c.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.extend_from_slice(ok_msg.as_bytes());
    out.extend_from_slice(bad_msg.as_bytes());
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out
}

/// A flat guest whose boot vCPU turns itself off with PSCI CPU_OFF (and
/// never powers the VM off): with every vCPU off nothing can wake the VM,
/// so the image must end it with an error instead of hanging.
pub fn cpu_off_guest() -> Vec<u8> {
    [movz(0, 0x0002, 0), movk(0, 0x8400, 1), hvc(0), b(0)]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_architecture_manual() {
        // Reference values from `llvm-mc -triple=aarch64 -show-encoding`.
        assert_eq!(hvc(0), 0xd400_0002);
        assert_eq!(movz(0, 0x0900, 1), 0xd2a1_2000); // mov x0, #0x9000000
        assert_eq!(movk(0, 0x8400, 1), 0xf2b0_8000); // movk x0, #0x8400, lsl #16
        assert_eq!(mov(5, 0), 0xaa00_03e5);
        assert_eq!(ldr_w(3, 5), 0xb940_00a3);
        assert_eq!(ldrb_post1(2, 1), 0x3840_1422);
        assert_eq!(strb(2, 0), 0x3900_0002);
        assert_eq!(cmp_w(3, 4), 0x6b04_007f);
        assert_eq!(cbz_w(2, 12), 0x3400_0062);
        assert_eq!(b(-12), 0x17ff_fffd);
        assert_eq!(b(0), 0x1400_0000);
        assert_eq!(b_ne(8), 0x5400_0041);
        assert_eq!(adr(1, 16), 0x1000_0081);
        assert_eq!(adr(1, 5), 0x3000_0021);
    }

    #[test]
    fn cpu_off_guest_calls_psci_cpu_off() {
        let g = cpu_off_guest();
        let w = |i: usize| u32::from_le_bytes(g[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(g.len(), 16);
        assert_eq!(w(0), 0xd280_0040); // mov x0, #2
        assert_eq!(w(1), 0xf2b0_8000); // movk x0, #0x8400, lsl #16
        assert_eq!(w(2), hvc(0));
    }

    #[test]
    fn external_guest_contains_message_after_code() {
        let g = external_test_guest();
        assert_eq!(g.len() % 4, 0);
        let text = String::from_utf8_lossy(&g);
        assert!(text.contains(GUEST_MESSAGE));
        assert_eq!(u32::from_le_bytes(g[..4].try_into().unwrap()), mov(5, 0));
    }
}
