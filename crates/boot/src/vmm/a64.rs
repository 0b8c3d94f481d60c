//! A64 instruction encoders for the small guests the `host-attack` phases
//! assemble by hand (`vcpurun`, `vcpuexits`, `vcpuirq`): each is a `const
//! fn`, so a guest program is a `const` array of words; and the loop that
//! drives such a guest to its power-off ([`run_to_event`]).

/// A system register's encoding `(op0, op1, CRn, CRm, op2)`.
pub type SysReg = (u32, u32, u32, u32, u32);

/// `movz xd, #imm, lsl #(16 * hw)`.
pub const fn movz(rd: u32, imm: u32, hw: u32) -> u32 {
    0xd280_0000 | (hw << 21) | (imm << 5) | rd
}

/// `movk xd, #imm, lsl #(16 * hw)`.
pub const fn movk(rd: u32, imm: u32, hw: u32) -> u32 {
    0xf280_0000 | (hw << 21) | (imm << 5) | rd
}

/// `mrs xt, S<op0>_<op1>_C<crn>_C<crm>_<op2>`.
pub const fn mrs(rt: u32, (op0, op1, crn, crm, op2): SysReg) -> u32 {
    0xd530_0000 | ((op0 - 2) << 19) | (op1 << 16) | (crn << 12) | (crm << 8) | (op2 << 5) | rt
}

/// `msr S<op0>_<op1>_C<crn>_C<crm>_<op2>, xt`.
pub const fn msr(rt: u32, enc: SysReg) -> u32 {
    mrs(rt, enc) & !(1 << 21)
}

/// `add xd, xn, #imm`.
pub const fn add_imm(rd: u32, rn: u32, imm: u32) -> u32 {
    0x9100_0000 | (imm << 10) | (rn << 5) | rd
}

/// `str xt, [xn, #off]` (off a multiple of 8).
pub const fn str_x(rt: u32, rn: u32, off: u32) -> u32 {
    0xf900_0000 | ((off / 8) << 10) | (rn << 5) | rt
}

/// `ldr xt, [xn, #off]` (off a multiple of 8).
pub const fn ldr_x(rt: u32, rn: u32, off: u32) -> u32 {
    0xf940_0000 | ((off / 8) << 10) | (rn << 5) | rt
}

/// `adr xd, .+off` (off < 1 MiB, a multiple of 4).
pub const fn adr(rd: u32, off: u32) -> u32 {
    0x1000_0000 | ((off >> 2) << 5) | rd
}

/// `isb`.
pub const ISB: u32 = 0xd503_3fdf;
/// `eret`.
pub const ERET: u32 = 0xd69f_03e0;
/// `wfi`.
pub const WFI: u32 = 0xd503_207f;
/// `hvc #0`.
pub const HVC0: u32 = 0xd400_0002;

/// `VBAR_EL1`.
pub const VBAR_EL1: SysReg = (3, 0, 12, 0, 0);

/// A guest image of `N` bytes: `b main` at byte 0, `vector` (one exception
/// vector entry's code) at `vector_at`, `main` at `main_at`; the rest zero.
pub const fn guest_image<const N: usize>(
    vector_at: usize,
    vector: &[u32],
    main_at: usize,
    main: &[u32],
) -> [u8; N] {
    let mut b = [0u8; N];
    put(&mut b, 0, 0x1400_0000u32 | (main_at as u32 / 4)); // b main
    let mut i = 0;
    while i < vector.len() {
        put(&mut b, vector_at + 4 * i, vector[i]);
        i += 1;
    }
    let mut i = 0;
    while i < main.len() {
        put(&mut b, main_at + 4 * i, main[i]);
        i += 1;
    }
    b
}

const fn put<const N: usize>(b: &mut [u8; N], at: usize, w: u32) {
    let w = w.to_le_bytes();
    b[at] = w[0];
    b[at + 1] = w[1];
    b[at + 2] = w[2];
    b[at + 3] = w[3];
}

/// How a hand-assembled guest's run through pkvm-host's run loop ended
/// ([`run_to_event`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct RunEnd {
    /// The guest powered off (PSCI `SYSTEM_OFF`).
    pub off: bool,
    /// What went wrong instead, if anything.
    pub other: Option<&'static str>,
}

/// Runs `vcpu` over `be` through pkvm-host's run loop, at most 64 exits,
/// until its guest's PSCI system event: `on_exit` sees every exit other
/// than an interruption or the event and says whether it expected it;
/// `failed(be)` ends the run after any exit.
pub fn run_to_event<B: pkvm_host::VcpuBackend>(
    vcpu: &mut pkvm_host::Vcpu<super::platform::BootPlatform, super::process::BootProcess>,
    be: &mut B,
    failed: impl Fn(&B) -> bool,
    mut on_exit: impl FnMut(
        &mut pkvm_host::Vcpu<super::platform::BootPlatform, super::process::BootProcess>,
        &mut B,
        pkvm_host::VcpuExit,
    ) -> bool,
) -> RunEnd {
    use pkvm_host::VcpuExit;
    for _ in 0..64 {
        match vcpu.run(be) {
            VcpuExit::Interrupted => {}
            VcpuExit::SystemEvent(ev) => {
                return RunEnd {
                    off: ev.kind == pkvm_host::psci::SystemEventKind::Shutdown,
                    other: None,
                };
            }
            exit => {
                if !on_exit(vcpu, be, exit) {
                    return RunEnd {
                        off: false,
                        other: Some("an unexpected exit"),
                    };
                }
            }
        }
        if failed(be) {
            return RunEnd::default();
        }
    }
    RunEnd {
        off: false,
        other: Some("no power-off within 64 exits"),
    }
}
