//! The host hypercall interface: function ids, typed argument decoding,
//! return codes and the one dispatcher, [`Hyp::handle_host_hvc`].
//!
//! # ABI
//! HVC #0 with the function id in x0 (SMCCC fast call, SMC64, owner
//! vendor-hyp: `0xc600_0000 | n`) and arguments in x1..x7. On return x0 is
//! a status from [`ret`] (0 = success) and x1..x3 hold results (zero when
//! unused). Ids fall in three bands: `0x01..=0x0f` only before
//! finalisation, `0x10..=0x1f` always, `0x20..=0x3f` only after
//! finalisation (the `FINALIZE` call switches). A call outside its band, or
//! an unknown id, returns [`ret::NOT_SUPPORTED`] and changes nothing.
//!
//! # Decoding
//! Each call has a decoder that takes [`HvcArgs`] by value; each register
//! is an [`Arg`] that is consumed when read, so reading one register twice
//! does not compile:
//!
//! ```compile_fail,E0382
//! use pkvm_hyp::hvc::HvcArgs;
//! fn decode(a: HvcArgs) -> u64 {
//!     let handle = a.x1.raw();
//!     let again = a.x1.raw(); // error[E0382]: use of moved value
//!     handle + again
//! }
//! ```

use pkvm_arch::pte::S2Prot;
use pkvm_arch::smccc::{self, call_val, OWNER_VENDOR_HYP};
use pkvm_arch::vtcr::S2Geometry;
use pkvm_arch::{Gfn, Granule, Pfn};

use crate::error::HypError;
use crate::hyp::{Hyp, MAX_TOPUP_PAGES, VCPU_PAGES, VM_PAGES};
use crate::platform::HypPlatform;
use crate::vm::VmConfig;

/// Registers passed to [`Hyp::handle_host_hvc`] (x0..x7).
pub const HVC_REGS: usize = 8;

const fn hyp_id(n: u16) -> u32 {
    call_val(true, true, OWNER_VENDOR_HYP, n)
}

/// Host hypercall function ids.
pub mod id {
    use super::hyp_id;
    /// Before finalisation: switch to the protected band (no arguments).
    pub const FINALIZE: u32 = hyp_id(0x01);
    /// Always: x1 = guest IPA bits -> x1 = VM pages, x2 = vCPU pages,
    /// x3 = stage-2 root pages (also their alignment, in pages).
    pub const GET_SIZES: u32 = hyp_id(0x10);
    /// x1 = pfn: share a host page with the hyp.
    pub const HOST_SHARE_HYP: u32 = hyp_id(0x20);
    /// x1 = pfn: take a page back from the hyp.
    pub const HOST_UNSHARE_HYP: u32 = hyp_id(0x21);
    /// -> x1 = handle.
    pub const RESERVE_VM: u32 = hyp_id(0x22);
    /// x1 = handle (still only reserved).
    pub const UNRESERVE_VM: u32 = hyp_id(0x23);
    /// x1 = handle, x2 = VM state pfn, x3 = stage-2 root pfn, x4 = config
    /// (see [`crate::VmConfig`]).
    pub const INIT_VM: u32 = hyp_id(0x24);
    /// x1 = handle, x2 = vCPU index, x3 = vCPU state pfn.
    pub const INIT_VCPU: u32 = hyp_id(0x25);
    /// x1 = handle, x2 = first pfn, x3 = number of pages (1..=16).
    pub const TOPUP_MEMCACHE: u32 = hyp_id(0x26);
    /// x1 = handle, x2 = vCPU index: load on the calling CPU.
    pub const VCPU_LOAD: u32 = hyp_id(0x27);
    /// Put the vCPU loaded on the calling CPU.
    pub const VCPU_PUT: u32 = hyp_id(0x28);
    /// x1 = pfn, x2 = gfn, x3 = prot (bit 0 R, 1 W, 2 X): loaded
    /// non-protected VM.
    pub const HOST_SHARE_GUEST: u32 = hyp_id(0x29);
    /// x1 = handle, x2 = gfn.
    pub const HOST_UNSHARE_GUEST: u32 = hyp_id(0x2a);
    /// x1 = pfn, x2 = gfn: loaded protected VM.
    pub const HOST_DONATE_GUEST: u32 = hyp_id(0x2b);
    /// x1 = gfn, x2 = prot: loaded non-protected VM.
    pub const RELAX_PERMS_GUEST: u32 = hyp_id(0x2c);
    /// x1 = handle, x2 = gfn, x3 = number of pages.
    pub const WRPROTECT_GUEST: u32 = hyp_id(0x2d);
    /// x1 = handle, x2 = gfn, x3 = number of pages, x4 = mkold (0/1)
    /// -> x1 = young (0/1).
    pub const TEST_CLEAR_YOUNG_GUEST: u32 = hyp_id(0x2e);
    /// x1 = handle, x2 = gfn.
    pub const MKYOUNG_GUEST: u32 = hyp_id(0x2f);
    /// x1 = handle.
    pub const START_TEARDOWN: u32 = hyp_id(0x30);
    /// x1 = handle, x2 = gfn.
    pub const RECLAIM_GUEST_PAGE: u32 = hyp_id(0x31);
    /// x1 = handle.
    pub const FINALIZE_TEARDOWN: u32 = hyp_id(0x32);

    /// Every function above, in this order (for sweeps and fuzzers).
    pub const ALL: [u32; 21] = [
        FINALIZE,
        GET_SIZES,
        HOST_SHARE_HYP,
        HOST_UNSHARE_HYP,
        RESERVE_VM,
        UNRESERVE_VM,
        INIT_VM,
        INIT_VCPU,
        TOPUP_MEMCACHE,
        VCPU_LOAD,
        VCPU_PUT,
        HOST_SHARE_GUEST,
        HOST_UNSHARE_GUEST,
        HOST_DONATE_GUEST,
        RELAX_PERMS_GUEST,
        WRPROTECT_GUEST,
        TEST_CLEAR_YOUNG_GUEST,
        MKYOUNG_GUEST,
        START_TEARDOWN,
        RECLAIM_GUEST_PAGE,
        FINALIZE_TEARDOWN,
    ];
}

/// Status codes returned in x0.
pub mod ret {
    use pkvm_arch::smccc::ret as s;
    /// Success.
    pub const SUCCESS: i64 = s::SUCCESS;
    /// Unknown function id, or not available in the current phase.
    pub const NOT_SUPPORTED: i64 = s::NOT_SUPPORTED;
    /// A malformed argument (alignment, range, unknown bits, not memory).
    pub const INVALID_PARAMETER: i64 = s::INVALID_PARAMETER;
    /// Ownership or VM state does not allow the call.
    pub const DENIED: i64 = -4;
    /// Out of memory (hyp pool, memcache, VM table).
    pub const NO_MEMORY: i64 = -5;
    /// In use (loaded vCPU, pinned page, reference held).
    pub const BUSY: i64 = -6;
    /// No such VM, vCPU or guest mapping.
    pub const NOT_FOUND: i64 = -7;
    /// Transient: retry.
    pub const AGAIN: i64 = -8;
    /// Already exists (mapped gfn, initialised vCPU).
    pub const EXISTS: i64 = -9;
    /// Hypervisor bug detected; nothing changed.
    pub const INTERNAL: i64 = -10;
}

/// The status code for an error.
pub fn ret_code(e: &HypError) -> i64 {
    use HypError::*;
    match e {
        BadAddress { .. }
        | BadArgument { .. }
        | NotReserved { .. }
        | VmDying { .. }
        | VmNotDying { .. } => ret::INVALID_PARAMETER,
        WrongState { .. } | WrongVmKind { .. } | HostAccessDenied { .. } | TooManyShares { .. } => {
            ret::DENIED
        }
        NoMemory | TableFull => ret::NO_MEMORY,
        Pinned { .. } | VmBusy { .. } | VcpuLoaded { .. } | CpuBusy { .. } => ret::BUSY,
        GfnNotMapped { .. } | NoSuchVm { .. } | NoSuchVcpu { .. } | NothingLoaded { .. } => {
            ret::NOT_FOUND
        }
        GfnMapped { .. } | VcpuExists { .. } => ret::EXISTS,
        Again => ret::AGAIN,
        Internal(_) => ret::INTERNAL,
    }
}

/// When a call is available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Band {
    /// Only before `FINALIZE`.
    BeforeFinalize,
    /// Always.
    Always,
    /// Only after `FINALIZE`.
    AfterFinalize,
}

/// The band of a host function id, `None` if it is not a host hypercall.
pub fn band_of(func: u64) -> Option<Band> {
    let f = u32::try_from(func).ok()?;
    if f & !0xffff != hyp_id(0) {
        return None;
    }
    match f & 0xffff {
        0x01..=0x0f => Some(Band::BeforeFinalize),
        0x10..=0x1f => Some(Band::Always),
        0x20..=0x3f => Some(Band::AfterFinalize),
        _ => None,
    }
}

/// Argument register `xN`, consumed when read.
#[derive(Debug)]
pub struct Arg<const N: usize>(u64);

/// Largest physical/guest frame number (48-bit addresses). A larger frame
/// number is refused before it is shifted into an address: `pfn << 12`
/// would drop its high bits and alias a real page.
pub const MAX_FRAME: u64 = (1 << 36) - 1;

impl<const N: usize> Arg<N> {
    /// The raw value.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// A physical frame number (48-bit address space).
    ///
    /// # Errors
    /// [`HypError::BadArgument`].
    pub fn pfn(self) -> Result<Pfn, HypError> {
        if self.0 > MAX_FRAME {
            return Err(HypError::BadArgument {
                what: "pfn",
                value: self.0,
            });
        }
        Ok(Pfn(self.0))
    }

    /// A guest frame number (48-bit IPA space; the VM checks its own size).
    ///
    /// # Errors
    /// [`HypError::BadArgument`].
    pub fn gfn(self) -> Result<Gfn, HypError> {
        if self.0 > MAX_FRAME {
            return Err(HypError::BadArgument {
                what: "gfn",
                value: self.0,
            });
        }
        Ok(Gfn(self.0))
    }

    /// Stage-2 permissions: bit 0 R, bit 1 W, bit 2 X, nothing else.
    ///
    /// # Errors
    /// [`HypError::BadArgument`].
    pub fn prot(self) -> Result<S2Prot, HypError> {
        if self.0 & !7 != 0 {
            return Err(HypError::BadArgument {
                what: "prot",
                value: self.0,
            });
        }
        Ok(S2Prot::from_bits_truncate(self.0 as u32) & S2Prot::PERMS)
    }

    /// A boolean: 0 or 1.
    ///
    /// # Errors
    /// [`HypError::BadArgument`].
    pub fn flag(self) -> Result<bool, HypError> {
        match self.0 {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(HypError::BadArgument {
                what: "flag",
                value: v,
            }),
        }
    }
}

/// The argument registers x1..x7 of one call.
#[derive(Debug)]
pub struct HvcArgs {
    /// x1.
    pub x1: Arg<1>,
    /// x2.
    pub x2: Arg<2>,
    /// x3.
    pub x3: Arg<3>,
    /// x4.
    pub x4: Arg<4>,
    /// x5.
    pub x5: Arg<5>,
    /// x6.
    pub x6: Arg<6>,
    /// x7.
    pub x7: Arg<7>,
}

impl HvcArgs {
    /// Snapshots x1..x7.
    pub fn from_regs(regs: &[u64; HVC_REGS]) -> HvcArgs {
        HvcArgs {
            x1: Arg(regs[1]),
            x2: Arg(regs[2]),
            x3: Arg(regs[3]),
            x4: Arg(regs[4]),
            x5: Arg(regs[5]),
            x6: Arg(regs[6]),
            x7: Arg(regs[7]),
        }
    }
}

/// A decoded host call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCall {
    /// [`id::FINALIZE`].
    Finalize,
    /// [`id::GET_SIZES`].
    GetSizes {
        /// Guest IPA bits.
        ipa_bits: u32,
    },
    /// [`id::HOST_SHARE_HYP`].
    HostShareHyp {
        /// The page.
        pfn: Pfn,
    },
    /// [`id::HOST_UNSHARE_HYP`].
    HostUnshareHyp {
        /// The page.
        pfn: Pfn,
    },
    /// [`id::RESERVE_VM`].
    ReserveVm,
    /// [`id::UNRESERVE_VM`].
    UnreserveVm {
        /// The handle.
        handle: u64,
    },
    /// [`id::INIT_VM`].
    InitVm {
        /// The handle.
        handle: u64,
        /// VM state pages.
        vm_pfn: Pfn,
        /// Stage-2 root pages.
        pgd_pfn: Pfn,
        /// Configuration.
        config: VmConfig,
    },
    /// [`id::INIT_VCPU`].
    InitVcpu {
        /// The handle.
        handle: u64,
        /// vCPU index.
        vcpu: u64,
        /// vCPU state page.
        pfn: Pfn,
    },
    /// [`id::TOPUP_MEMCACHE`].
    TopupMemcache {
        /// The handle.
        handle: u64,
        /// First page.
        pfn: Pfn,
        /// Number of pages.
        nr: u64,
    },
    /// [`id::VCPU_LOAD`].
    VcpuLoad {
        /// The handle.
        handle: u64,
        /// vCPU index.
        vcpu: u64,
    },
    /// [`id::VCPU_PUT`].
    VcpuPut,
    /// [`id::HOST_SHARE_GUEST`].
    HostShareGuest {
        /// Host page.
        pfn: Pfn,
        /// Guest frame.
        gfn: Gfn,
        /// Permissions.
        prot: S2Prot,
    },
    /// [`id::HOST_UNSHARE_GUEST`].
    HostUnshareGuest {
        /// The handle.
        handle: u64,
        /// Guest frame.
        gfn: Gfn,
    },
    /// [`id::HOST_DONATE_GUEST`].
    HostDonateGuest {
        /// Host page.
        pfn: Pfn,
        /// Guest frame.
        gfn: Gfn,
    },
    /// [`id::RELAX_PERMS_GUEST`].
    RelaxPermsGuest {
        /// Guest frame.
        gfn: Gfn,
        /// Permissions to add.
        prot: S2Prot,
    },
    /// [`id::WRPROTECT_GUEST`].
    WrprotectGuest {
        /// The handle.
        handle: u64,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: u64,
    },
    /// [`id::TEST_CLEAR_YOUNG_GUEST`].
    TestClearYoungGuest {
        /// The handle.
        handle: u64,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: u64,
        /// Clear the access flags.
        mkold: bool,
    },
    /// [`id::MKYOUNG_GUEST`].
    MkyoungGuest {
        /// The handle.
        handle: u64,
        /// Guest frame.
        gfn: Gfn,
    },
    /// [`id::START_TEARDOWN`].
    StartTeardown {
        /// The handle.
        handle: u64,
    },
    /// [`id::RECLAIM_GUEST_PAGE`].
    ReclaimGuestPage {
        /// The handle.
        handle: u64,
        /// Guest frame.
        gfn: Gfn,
    },
    /// [`id::FINALIZE_TEARDOWN`].
    FinalizeTeardown {
        /// The handle.
        handle: u64,
    },
}

impl HostCall {
    /// Decodes call `func` from its arguments, each register read once.
    /// `Ok(None)` for an unknown id.
    ///
    /// # Errors
    /// [`HypError::BadArgument`] for a malformed argument.
    pub fn decode(func: u32, a: HvcArgs) -> Result<Option<HostCall>, HypError> {
        use HostCall::*;
        Ok(Some(match func {
            id::FINALIZE => Finalize,
            id::GET_SIZES => {
                let raw = a.x1.raw();
                if !(32..=48).contains(&raw) {
                    return Err(HypError::BadArgument {
                        what: "IPA bits",
                        value: raw,
                    });
                }
                GetSizes {
                    ipa_bits: raw as u32,
                }
            }
            id::HOST_SHARE_HYP => HostShareHyp { pfn: a.x1.pfn()? },
            id::HOST_UNSHARE_HYP => HostUnshareHyp { pfn: a.x1.pfn()? },
            id::RESERVE_VM => ReserveVm,
            id::UNRESERVE_VM => UnreserveVm { handle: a.x1.raw() },
            id::INIT_VM => InitVm {
                handle: a.x1.raw(),
                vm_pfn: a.x2.pfn()?,
                pgd_pfn: a.x3.pfn()?,
                config: VmConfig::decode(a.x4.raw())?,
            },
            id::INIT_VCPU => InitVcpu {
                handle: a.x1.raw(),
                vcpu: a.x2.raw(),
                pfn: a.x3.pfn()?,
            },
            id::TOPUP_MEMCACHE => {
                let (handle, pfn, nr) = (a.x1.raw(), a.x2.pfn()?, a.x3.raw());
                if nr == 0 || nr > MAX_TOPUP_PAGES {
                    return Err(HypError::BadArgument {
                        what: "page count",
                        value: nr,
                    });
                }
                TopupMemcache { handle, pfn, nr }
            }
            id::VCPU_LOAD => VcpuLoad {
                handle: a.x1.raw(),
                vcpu: a.x2.raw(),
            },
            id::VCPU_PUT => VcpuPut,
            id::HOST_SHARE_GUEST => HostShareGuest {
                pfn: a.x1.pfn()?,
                gfn: a.x2.gfn()?,
                prot: a.x3.prot()?,
            },
            id::HOST_UNSHARE_GUEST => HostUnshareGuest {
                handle: a.x1.raw(),
                gfn: a.x2.gfn()?,
            },
            id::HOST_DONATE_GUEST => HostDonateGuest {
                pfn: a.x1.pfn()?,
                gfn: a.x2.gfn()?,
            },
            id::RELAX_PERMS_GUEST => RelaxPermsGuest {
                gfn: a.x1.gfn()?,
                prot: a.x2.prot()?,
            },
            id::WRPROTECT_GUEST => WrprotectGuest {
                handle: a.x1.raw(),
                gfn: a.x2.gfn()?,
                nr: a.x3.raw(),
            },
            id::TEST_CLEAR_YOUNG_GUEST => TestClearYoungGuest {
                handle: a.x1.raw(),
                gfn: a.x2.gfn()?,
                nr: a.x3.raw(),
                mkold: a.x4.flag()?,
            },
            id::MKYOUNG_GUEST => MkyoungGuest {
                handle: a.x1.raw(),
                gfn: a.x2.gfn()?,
            },
            id::START_TEARDOWN => StartTeardown { handle: a.x1.raw() },
            id::RECLAIM_GUEST_PAGE => ReclaimGuestPage {
                handle: a.x1.raw(),
                gfn: a.x2.gfn()?,
            },
            id::FINALIZE_TEARDOWN => FinalizeTeardown { handle: a.x1.raw() },
            _ => return Ok(None),
        }))
    }
}

impl<P: HypPlatform> Hyp<P> {
    /// The host hypercall entry point: `regs` are x0..x7 on entry (x0 the
    /// function id) and on exit (x0 the status, x1..x3 results).
    pub fn handle_host_hvc(&self, cpu: usize, regs: &mut [u64; HVC_REGS]) {
        self.hvc_count
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let func = regs[0];
        let args = HvcArgs::from_regs(regs);
        let out = self.dispatch(cpu, func, args);
        *regs = [0; HVC_REGS];
        match out {
            Ok(vals) => {
                regs[0] = ret::SUCCESS as u64;
                regs[1..4].copy_from_slice(&vals);
            }
            Err(code) => regs[0] = code as u64,
        }
    }

    fn dispatch(&self, cpu: usize, func: u64, args: HvcArgs) -> Result<[u64; 3], i64> {
        let allowed = match band_of(func) {
            Some(Band::Always) => true,
            Some(Band::BeforeFinalize) => !self.is_finalized(),
            Some(Band::AfterFinalize) => self.is_finalized(),
            None => false,
        };
        if !allowed {
            return Err(ret::NOT_SUPPORTED);
        }
        let call = match HostCall::decode(func as u32, args) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(smccc::ret::NOT_SUPPORTED),
            Err(e) => return Err(ret_code(&e)),
        };
        self.execute(cpu, call).map_err(|e| ret_code(&e))
    }

    /// Runs a decoded call for `cpu`; returns the values for x1..x3.
    ///
    /// # Errors
    /// The operation's error.
    pub fn execute(&self, cpu: usize, call: HostCall) -> Result<[u64; 3], HypError> {
        use HostCall::*;
        let none = |r: Result<(), HypError>| r.map(|()| [0; 3]);
        match call {
            Finalize => {
                self.finalize();
                Ok([0; 3])
            }
            GetSizes { ipa_bits } => {
                let geo = S2Geometry::new(Granule::Size4K, ipa_bits).map_err(|_| {
                    HypError::BadArgument {
                        what: "IPA bits",
                        value: ipa_bits as u64,
                    }
                })?;
                Ok([VM_PAGES, VCPU_PAGES, geo.root_pages as u64])
            }
            HostShareHyp { pfn } => none(self.host_share_hyp(pfn)),
            HostUnshareHyp { pfn } => none(self.host_unshare_hyp(pfn)),
            ReserveVm => self.reserve_vm().map(|h| [h as u64, 0, 0]),
            UnreserveVm { handle } => none(self.unreserve_vm(handle)),
            InitVm {
                handle,
                vm_pfn,
                pgd_pfn,
                config,
            } => none(self.init_vm(handle, vm_pfn, pgd_pfn, config)),
            InitVcpu { handle, vcpu, pfn } => none(self.init_vcpu(handle, vcpu, pfn)),
            TopupMemcache { handle, pfn, nr } => none(self.topup_memcache(handle, pfn, nr)),
            VcpuLoad { handle, vcpu } => none(self.vcpu_load(cpu, handle, vcpu)),
            VcpuPut => none(self.vcpu_put(cpu)),
            HostShareGuest { pfn, gfn, prot } => none(self.host_share_guest(cpu, pfn, gfn, prot)),
            HostUnshareGuest { handle, gfn } => none(self.host_unshare_guest(handle, gfn)),
            HostDonateGuest { pfn, gfn } => none(self.host_donate_guest(cpu, pfn, gfn)),
            RelaxPermsGuest { gfn, prot } => none(self.relax_perms_guest(cpu, gfn, prot)),
            WrprotectGuest { handle, gfn, nr } => none(self.wrprotect_guest(handle, gfn, nr)),
            TestClearYoungGuest {
                handle,
                gfn,
                nr,
                mkold,
            } => self
                .test_clear_young_guest(handle, gfn, nr, mkold)
                .map(|y| [y as u64, 0, 0]),
            MkyoungGuest { handle, gfn } => none(self.mkyoung_guest(handle, gfn)),
            StartTeardown { handle } => none(self.start_teardown(handle)),
            ReclaimGuestPage { handle, gfn } => none(self.reclaim_guest_page(handle, gfn)),
            FinalizeTeardown { handle } => none(self.finalize_teardown(handle)),
        }
    }
}
