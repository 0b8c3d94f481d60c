//! The Linux arm64 `Image` header, and where a guest file goes in guest RAM.
//!
//! A guest file is either a Linux arm64 `Image` (its 64-byte header has the
//! magic `ARM\x64` at offset 56) or a flat binary. The header's fields come
//! from the file, so they are hostile input: [`ImageHeader::parse`] checks
//! them and [`guest_layout`] combines them with the file size and the RAM
//! size with checked arithmetic only, so a field near 2^64 is an error, never
//! a wrapped value that passes a size check.
//!
//! Header layout (little-endian; Linux `Documentation/arch/arm64/booting.rst`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | code0 |
//! | 4 | 4 | code1 |
//! | 8 | 8 | `text_offset`: load offset from a 2 MiB aligned base |
//! | 16 | 8 | `image_size`: bytes the kernel uses from its load address (0: an old kernel; then `text_offset` is 0x80000) |
//! | 24 | 8 | flags |
//! | 32..56 | 24 | reserved |
//! | 56 | 4 | magic `ARM\x64` |
//! | 60 | 4 | reserved (PE header offset) |

use core::fmt;

/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// The magic at offset 56.
pub const MAGIC: [u8; 4] = *b"ARM\x64";
/// The load offset an `Image` with `image_size` 0 (before Linux 3.17) uses.
pub const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// Alignment required of `text_offset` (a page).
pub const TEXT_OFFSET_ALIGN: u64 = 4096;

/// A checked `Image` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// Where the image goes, from the start of guest RAM.
    pub text_offset: u64,
    /// Bytes it uses from there (at least the file; 0 if the header does
    /// not say).
    pub image_size: u64,
    /// The header's flags (endianness, page size, placement).
    pub flags: u64,
}

/// Why a guest file cannot be placed (the file's or the user's fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The file is empty.
    Empty,
    /// `text_offset` is not a multiple of [`TEXT_OFFSET_ALIGN`].
    UnalignedTextOffset(u64),
    /// Load offset + size (+ the space reserved at the top of RAM)
    /// overflows 64 bits: a hostile or corrupt header.
    Overflow {
        /// The load offset.
        offset: u64,
        /// The bytes from there.
        size: u64,
    },
    /// The image does not fit in guest RAM.
    TooBig {
        /// The load offset.
        offset: u64,
        /// The bytes from there (file or `image_size`, the larger).
        size: u64,
        /// Bytes reserved at the top of RAM (the device tree).
        reserved: u64,
        /// Guest RAM bytes.
        mem: u64,
    },
    /// The initrd is larger than guest RAM.
    InitrdLargerThanRam {
        /// Bytes of the initrd.
        initrd: u64,
        /// Guest RAM bytes.
        mem: u64,
    },
    /// Kernel + initrd + device tree do not fit in guest RAM.
    InitrdDoesNotFit {
        /// Guest RAM bytes they need (rounded up to a 2 MiB multiple).
        need: u64,
        /// Guest RAM bytes.
        mem: u64,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ImageError::Empty => write!(f, "the guest file is empty"),
            ImageError::UnalignedTextOffset(t) => write!(
                f,
                "arm64 Image header: text_offset {t:#x} is not a multiple of {TEXT_OFFSET_ALIGN:#x}"
            ),
            ImageError::Overflow { offset, size } => write!(
                f,
                "arm64 Image header: load offset {offset:#x} + size {size:#x} overflows (corrupt header?)"
            ),
            ImageError::TooBig {
                offset,
                size,
                reserved,
                mem,
            } => write!(
                f,
                "the guest needs {size:#x} bytes at offset {offset:#x} plus {reserved:#x} reserved, more than its {mem:#x} bytes of RAM (give it more memory)"
            ),
            ImageError::InitrdLargerThanRam { initrd, mem } => write!(
                f,
                "the initrd is {initrd} bytes, larger than the guest's {} MiB of RAM (use a smaller initrd or more memory)",
                mem >> 20
            ),
            ImageError::InitrdDoesNotFit { need, mem } => write!(
                f,
                "kernel + initrd + device tree need {} MiB of guest RAM, the guest has {} MiB (give it at least {} MiB)",
                need >> 20,
                mem >> 20,
                need >> 20
            ),
        }
    }
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

impl ImageHeader {
    /// The header of `file`: `Ok(None)` if it is not an `Image` (shorter
    /// than the header, or no magic: a flat binary).
    ///
    /// # Errors
    /// [`ImageError::UnalignedTextOffset`] for a `text_offset` that is not
    /// page aligned.
    pub fn parse(file: &[u8]) -> Result<Option<ImageHeader>, ImageError> {
        if file.len() < HEADER_LEN || file[56..60] != MAGIC {
            return Ok(None);
        }
        let image_size = le64(file, 16);
        let text_offset = if image_size == 0 {
            LEGACY_TEXT_OFFSET
        } else {
            le64(file, 8)
        };
        if !text_offset.is_multiple_of(TEXT_OFFSET_ALIGN) {
            return Err(ImageError::UnalignedTextOffset(text_offset));
        }
        Ok(Some(ImageHeader {
            text_offset,
            image_size,
            flags: le64(file, 24),
        }))
    }
}

/// Where a guest file goes in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    /// The `Image` header, `None` for a flat binary.
    pub header: Option<ImageHeader>,
    /// Load offset from the start of guest RAM (the entry point is there).
    pub load_offset: u64,
    /// Bytes used from the load offset: the file, or the header's
    /// `image_size` if larger.
    pub footprint: u64,
}

/// Places `file` in `mem` bytes of guest RAM whose top `reserved` bytes
/// are taken (by the device tree): an `Image` at its `text_offset`, a flat
/// binary at 0.
///
/// # Errors
/// [`ImageError`]: an empty file, a bad header, or a guest that does not
/// fit (computed without overflow).
pub fn guest_layout(file: &[u8], mem: u64, reserved: u64) -> Result<GuestLayout, ImageError> {
    guest_layout_of(file, file.len() as u64, mem, reserved)
}

/// [`guest_layout`] from the file's first bytes `head` (at least
/// [`HEADER_LEN`] of them, or the whole file if it is shorter) and its
/// length `file_len`: for a caller that does not read the whole file.
///
/// # Errors
/// As [`guest_layout`].
pub fn guest_layout_of(
    head: &[u8],
    file_len: u64,
    mem: u64,
    reserved: u64,
) -> Result<GuestLayout, ImageError> {
    if file_len == 0 {
        return Err(ImageError::Empty);
    }
    let header = ImageHeader::parse(head)?;
    let (load_offset, footprint) = match header {
        Some(h) => (h.text_offset, h.image_size.max(file_len)),
        None => (0, file_len),
    };
    let end = load_offset
        .checked_add(footprint)
        .and_then(|e| e.checked_add(reserved))
        .ok_or(ImageError::Overflow {
            offset: load_offset,
            size: footprint,
        })?;
    if end > mem {
        return Err(ImageError::TooBig {
            offset: load_offset,
            size: footprint,
            reserved,
            mem,
        });
    }
    Ok(GuestLayout {
        header,
        load_offset,
        footprint,
    })
}

/// Alignment of the initrd in guest RAM (a page).
pub const INITRD_ALIGN: u64 = 4096;

/// Where an initrd of `initrd_len` bytes goes: the first page after the
/// kernel's footprint (`layout`), below the `reserved` top of RAM (the
/// device tree), so the initrd, the kernel and the device tree share one
/// window of `mem` bytes as the arm64 boot protocol asks. Returns its
/// offset from the start of guest RAM. Checked arithmetic only.
///
/// # Errors
/// [`ImageError::InitrdLargerThanRam`], [`ImageError::InitrdDoesNotFit`]
/// (with the RAM it needs, rounded up to 2 MiB).
pub fn initrd_offset(
    layout: &GuestLayout,
    initrd_len: u64,
    mem: u64,
    reserved: u64,
) -> Result<u64, ImageError> {
    if initrd_len >= mem {
        return Err(ImageError::InitrdLargerThanRam {
            initrd: initrd_len,
            mem,
        });
    }
    let overflow = ImageError::Overflow {
        offset: layout.load_offset,
        size: layout.footprint,
    };
    let start = layout
        .load_offset
        .checked_add(layout.footprint)
        .and_then(|e| e.checked_next_multiple_of(INITRD_ALIGN))
        .ok_or(overflow)?;
    let need = start
        .checked_add(initrd_len)
        .and_then(|e| e.checked_add(reserved))
        .and_then(|e| e.checked_next_multiple_of(2 << 20))
        .ok_or(overflow)?;
    if need > mem {
        return Err(ImageError::InitrdDoesNotFit { need, mem });
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A 256-byte file with an `Image` header.
    fn image(text_offset: u64, image_size: u64) -> [u8; 256] {
        let mut f = [0u8; 256];
        f[8..16].copy_from_slice(&text_offset.to_le_bytes());
        f[16..24].copy_from_slice(&image_size.to_le_bytes());
        f[56..60].copy_from_slice(&MAGIC);
        f
    }

    #[test]
    fn a_sane_image_is_placed_at_its_text_offset() {
        let f = image(0x20_0000, 4 * MIB);
        let l = guest_layout(&f, 64 * MIB, 2 * MIB).unwrap();
        assert_eq!(l.load_offset, 0x20_0000);
        assert_eq!(l.footprint, 4 * MIB);
        assert_eq!(l.header.unwrap().image_size, 4 * MIB);
    }

    #[test]
    fn an_old_image_without_size_uses_the_legacy_offset() {
        let f = image(0x1234_5000, 0);
        let l = guest_layout(&f, 64 * MIB, 0).unwrap();
        assert_eq!(l.load_offset, LEGACY_TEXT_OFFSET);
        assert_eq!(l.footprint, 256);
    }

    /// text_offset near 2^64 used to wrap `offset + size` below the RAM
    /// size and pass the check.
    #[test]
    fn text_offset_near_2_pow_64_is_an_overflow_not_a_wrap() {
        let f = image(u64::MAX - 0xfff, 0x2000);
        assert_eq!(
            guest_layout(&f, 64 * MIB, 2 * MIB),
            Err(ImageError::Overflow {
                offset: u64::MAX - 0xfff,
                size: 0x2000
            })
        );
        // Far out but without a wrap: simply too big.
        let f = image(1 << 63, 0x1000);
        assert!(matches!(
            guest_layout(&f, 64 * MIB, 0),
            Err(ImageError::TooBig { .. })
        ));
    }

    #[test]
    fn huge_image_size_is_refused() {
        let f = image(0, u64::MAX);
        assert!(matches!(
            guest_layout(&f, 64 * MIB, 2 * MIB),
            Err(ImageError::Overflow { .. })
        ));
        let f = image(0, 63 * MIB);
        assert!(matches!(
            guest_layout(&f, 64 * MIB, 2 * MIB),
            Err(ImageError::TooBig { .. })
        ));
        assert!(guest_layout(&f, 64 * MIB, MIB).is_ok());
    }

    #[test]
    fn unaligned_text_offset_is_refused() {
        let f = image(0x80_0001, 0x1000);
        assert_eq!(
            ImageHeader::parse(&f),
            Err(ImageError::UnalignedTextOffset(0x80_0001))
        );
    }

    #[test]
    fn a_truncated_header_or_no_magic_is_a_flat_binary() {
        let f = image(0x20_0000, 4 * MIB);
        // Cut inside the header: no complete magic, so a flat binary at 0.
        assert_eq!(ImageHeader::parse(&f[..60 - 1]), Ok(None));
        let l = guest_layout(&f[..40], 64 * MIB, 0).unwrap();
        assert_eq!((l.header, l.load_offset, l.footprint), (None, 0, 40));
        // Not a kernel: any bytes without the magic.
        let junk = [0xa5u8; 4096];
        let l = guest_layout(&junk, 64 * MIB, 0).unwrap();
        assert_eq!((l.header, l.load_offset), (None, 0));
    }

    #[test]
    fn empty_and_oversized_flat_binaries_are_refused() {
        assert_eq!(guest_layout(&[], 64 * MIB, 0), Err(ImageError::Empty));
        let big = [0u8; 4096];
        assert!(matches!(
            guest_layout(&big, 4096, 1),
            Err(ImageError::TooBig { .. })
        ));
    }

    #[test]
    fn an_initrd_goes_after_the_kernel_and_below_the_device_tree() {
        let f = image(0x20_0000, 4 * MIB + 5);
        let l = guest_layout(&f, 64 * MIB, 2 * MIB).unwrap();
        assert_eq!(
            initrd_offset(&l, MIB, 64 * MIB, 2 * MIB),
            Ok(0x20_0000 + 4 * MIB + 4096)
        );
        // Exactly full: kernel end (page aligned) + initrd + DTB = RAM.
        let start = 0x20_0000 + 4 * MIB + 4096;
        let fits = 64 * MIB - 2 * MIB - start;
        assert_eq!(initrd_offset(&l, fits, 64 * MIB, 2 * MIB), Ok(start));
        assert_eq!(
            initrd_offset(&l, fits + 1, 64 * MIB, 2 * MIB),
            Err(ImageError::InitrdDoesNotFit {
                need: 66 * MIB,
                mem: 64 * MIB
            })
        );
    }

    #[test]
    fn an_initrd_larger_than_ram_or_near_2_pow_64_is_refused() {
        extern crate std;
        use std::string::ToString;
        let l = guest_layout(&image(0x20_0000, MIB), 64 * MIB, 2 * MIB).unwrap();
        assert_eq!(
            initrd_offset(&l, 64 * MIB, 64 * MIB, 2 * MIB),
            Err(ImageError::InitrdLargerThanRam {
                initrd: 64 * MIB,
                mem: 64 * MIB
            })
        );
        assert!(initrd_offset(&l, u64::MAX - 10, u64::MAX, 2 * MIB).is_err());
        let e = initrd_offset(&l, 63 * MIB, 64 * MIB, 2 * MIB).unwrap_err();
        assert!(e.to_string().contains("at least 68 MiB"), "{e}");
    }
}
