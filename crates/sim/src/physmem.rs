//! Simulated physical memory: one lazily backed RAM arena plus small device
//! regions, addressed by [`Pa`].
//!
//! Nothing here hands out `&[u8]` or `&mut` over memory: every access is an
//! atomic operation on the 64-bit word that contains it (sub-word writes are
//! compare-exchange loops on that word), so concurrent simulated CPUs, page
//! table updates and host copies never race in the Rust memory model.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pkvm_arch::{Pa, PAGE_SIZE};
use pkvm_pgtable::env::{PtMemory, ENTRIES};

use crate::raw::Mapping;

/// Why a physical memory access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// No RAM or device backs the range (the caller used a bad address).
    #[error("no memory at {pa:?} (+{len:#x})")]
    Unbacked {
        /// Start of the access.
        pa: Pa,
        /// Its length.
        len: u64,
    },
    /// The address is not aligned as the operation needs (caller bug).
    #[error("{pa:?} is not aligned to {align:#x}")]
    Misaligned {
        /// The address.
        pa: Pa,
        /// Required alignment.
        align: u64,
    },
    /// An access size other than 1, 2, 4 or 8 (caller bug).
    #[error("unsupported access size {0}")]
    Size(u8),
}

/// A device (MMIO) region outside RAM: plain zero-initialised storage, so
/// PFNMAP mappings and MMIO emulation have something to point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// First byte (4K aligned).
    pub base: Pa,
    /// Size in bytes (4K multiple).
    pub size: u64,
}

struct Device {
    spec: DeviceSpec,
    words: Box<[AtomicU64]>,
}

/// Simulated physical memory.
pub struct PhysMem {
    base: u64,
    size: u64,
    ram: Mapping,
    /// Per-frame table refcount ([`PtMemory::refcount`]).
    refcounts: Mapping,
    /// Per-frame pin count used by process memory (`mm`).
    pins: Mapping,
    devices: Vec<Device>,
    /// RAM was backed up front ([`PhysMem::populate`]): zeroing then writes
    /// zeroes instead of giving pages back to the host kernel (which would
    /// make the next touch fault and zero them again).
    populated: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysMem")
            .field("base", &Pa(self.base))
            .field("size", &self.size)
            .field(
                "devices",
                &self.devices.iter().map(|d| d.spec).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PhysMem {
    /// Creates RAM `[base, base+size)` and the given device regions.
    ///
    /// # Errors
    /// The host refused the mapping.
    pub fn new(base: Pa, size: u64, devices: &[DeviceSpec]) -> std::io::Result<PhysMem> {
        let frames = (size / PAGE_SIZE) as usize;
        Ok(PhysMem {
            base: base.0,
            size,
            ram: Mapping::new(size as usize)?,
            refcounts: Mapping::new(frames * 4)?,
            pins: Mapping::new(frames * 4)?,
            populated: std::sync::atomic::AtomicBool::new(false),
            devices: devices
                .iter()
                .map(|&spec| Device {
                    spec,
                    words: (0..spec.size / 8).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
        })
    }

    /// First RAM address.
    pub fn base(&self) -> Pa {
        Pa(self.base)
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `[pa, pa+len)` is RAM.
    #[inline]
    pub fn is_ram(&self, pa: Pa, len: u64) -> bool {
        pa.0 >= self.base
            && pa
                .0
                .checked_add(len)
                .is_some_and(|e| e <= self.base + self.size)
    }

    /// Whether `[pa, pa+len)` is inside one device region.
    pub fn is_device(&self, pa: Pa, len: u64) -> bool {
        self.devices.iter().any(|d| {
            pa.0 >= d.spec.base.0
                && pa
                    .0
                    .checked_add(len)
                    .is_some_and(|e| e <= d.spec.base.0 + d.spec.size)
        })
    }

    /// The words backing `pa` and the index of the word containing `pa`, if
    /// `[pa, pa+len)` is backed by one region.
    #[inline(always)]
    fn locate(&self, pa: u64, len: u64) -> Option<(&[AtomicU64], usize)> {
        let off = pa.wrapping_sub(self.base);
        if off < self.size && len <= self.size - off {
            return Some((self.ram.words(), (off / 8) as usize));
        }
        self.devices.iter().find_map(|d| {
            let off = pa.wrapping_sub(d.spec.base.0);
            (off < d.spec.size && len <= d.spec.size - off)
                .then(|| (&d.words[..], (off / 8) as usize))
        })
    }

    /// Reads `size` (1, 2, 4 or 8) bytes at `pa`, little-endian.
    ///
    /// # Errors
    /// [`MemError::Unbacked`] or [`MemError::Size`].
    #[inline]
    pub fn read(&self, pa: Pa, size: u8) -> Result<u64, MemError> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(MemError::Size(size));
        }
        let (words, idx) = self.locate(pa.0, size as u64).ok_or(MemError::Unbacked {
            pa,
            len: size as u64,
        })?;
        let shift = (pa.0 & 7) * 8;
        if (pa.0 & 7) + size as u64 <= 8 {
            let w = words[idx].load(Ordering::Relaxed);
            return Ok(if size == 8 {
                w
            } else {
                (w >> shift) & ((1u64 << (size * 8)) - 1)
            });
        }
        // Straddles two words.
        let lo = words[idx].load(Ordering::Relaxed) >> shift;
        let hi = words[idx + 1].load(Ordering::Relaxed) << (64 - shift);
        let v = lo | hi;
        Ok(if size == 8 {
            v
        } else {
            v & ((1u64 << (size * 8)) - 1)
        })
    }

    /// Writes the low `size` (1, 2, 4 or 8) bytes of `val` at `pa`.
    ///
    /// # Errors
    /// [`MemError::Unbacked`] or [`MemError::Size`].
    #[inline]
    pub fn write(&self, pa: Pa, size: u8, val: u64) -> Result<(), MemError> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(MemError::Size(size));
        }
        let (words, idx) = self.locate(pa.0, size as u64).ok_or(MemError::Unbacked {
            pa,
            len: size as u64,
        })?;
        let off = pa.0 & 7;
        if off == 0 && size == 8 {
            words[idx].store(val, Ordering::Relaxed);
            return Ok(());
        }
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        };
        let val = val & mask;
        let shift = off * 8;
        Self::merge(&words[idx], mask << shift, val << shift);
        if off + size as u64 > 8 {
            let back = 64 - shift;
            Self::merge(&words[idx + 1], mask >> back, val >> back);
        }
        Ok(())
    }

    #[inline(always)]
    fn merge(word: &AtomicU64, mask: u64, bits: u64) {
        let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some((w & !mask) | bits)
        });
    }

    /// Reads a u8.
    ///
    /// # Errors
    /// See [`PhysMem::read`].
    pub fn read_u8(&self, pa: Pa) -> Result<u8, MemError> {
        self.read(pa, 1).map(|v| v as u8)
    }
    /// Reads a u16.
    ///
    /// # Errors
    /// See [`PhysMem::read`].
    pub fn read_u16(&self, pa: Pa) -> Result<u16, MemError> {
        self.read(pa, 2).map(|v| v as u16)
    }
    /// Reads a u32.
    ///
    /// # Errors
    /// See [`PhysMem::read`].
    pub fn read_u32(&self, pa: Pa) -> Result<u32, MemError> {
        self.read(pa, 4).map(|v| v as u32)
    }
    /// Reads a u64.
    ///
    /// # Errors
    /// See [`PhysMem::read`].
    pub fn read_u64(&self, pa: Pa) -> Result<u64, MemError> {
        self.read(pa, 8)
    }
    /// Writes a u8.
    ///
    /// # Errors
    /// See [`PhysMem::write`].
    pub fn write_u8(&self, pa: Pa, v: u8) -> Result<(), MemError> {
        self.write(pa, 1, v as u64)
    }
    /// Writes a u16.
    ///
    /// # Errors
    /// See [`PhysMem::write`].
    pub fn write_u16(&self, pa: Pa, v: u16) -> Result<(), MemError> {
        self.write(pa, 2, v as u64)
    }
    /// Writes a u32.
    ///
    /// # Errors
    /// See [`PhysMem::write`].
    pub fn write_u32(&self, pa: Pa, v: u32) -> Result<(), MemError> {
        self.write(pa, 4, v as u64)
    }
    /// Writes a u64.
    ///
    /// # Errors
    /// See [`PhysMem::write`].
    pub fn write_u64(&self, pa: Pa, v: u64) -> Result<(), MemError> {
        self.write(pa, 8, v)
    }

    fn page_words(&self, pa: Pa, len: u64) -> Result<&[AtomicU64], MemError> {
        if pa.0 % 8 != 0 || len % 8 != 0 {
            return Err(MemError::Misaligned { pa, align: 8 });
        }
        let (words, idx) = self
            .locate(pa.0, len)
            .ok_or(MemError::Unbacked { pa, len })?;
        Ok(&words[idx..idx + (len / 8) as usize])
    }

    /// Fills `[pa, pa+len)` with `byte` (8-byte aligned range).
    ///
    /// # Errors
    /// Unbacked or misaligned range.
    pub fn fill(&self, pa: Pa, len: u64, byte: u8) -> Result<(), MemError> {
        let v = u64::from_ne_bytes([byte; 8]);
        for w in self.page_words(pa, len)? {
            w.store(v, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Backs `[pa, pa+len)` of RAM with host memory now, as real RAM is
    /// there before anything runs: benchmarks then measure the simulated
    /// work, not the host kernel's first-touch faults.
    ///
    /// # Errors
    /// Not RAM, or the host kernel refused.
    pub fn populate(&self, pa: Pa, len: u64) -> Result<(), MemError> {
        if !self.is_ram(pa, len) {
            return Err(MemError::Unbacked { pa, len });
        }
        self.ram
            .populate((pa.0 - self.base) as usize, len as usize)
            .map_err(|_| MemError::Unbacked { pa, len })?;
        self.populated.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Zeroes `[pa, pa+len)`. Large page-aligned RAM ranges are given back to
    /// the host kernel instead (they read as zero and stop costing memory);
    /// only use this on frames nobody else is accessing.
    ///
    /// # Errors
    /// Unbacked or misaligned range.
    pub fn zero(&self, pa: Pa, len: u64) -> Result<(), MemError> {
        if len >= 16 * PAGE_SIZE
            && !self.populated.load(Ordering::Relaxed)
            && pa.is_aligned(PAGE_SIZE)
            && len % PAGE_SIZE == 0
            && self.is_ram(pa, len)
        {
            self.ram.discard((pa.0 - self.base) as usize, len as usize);
            return Ok(());
        }
        self.fill(pa, len, 0)
    }

    /// Zeroes the 4K page at `pa`.
    ///
    /// # Errors
    /// Unbacked or misaligned page.
    pub fn zero_page(&self, pa: Pa) -> Result<(), MemError> {
        self.check_page(pa)?;
        self.fill(pa, PAGE_SIZE, 0)
    }

    fn check_page(&self, pa: Pa) -> Result<(), MemError> {
        if !pa.is_aligned(PAGE_SIZE) {
            return Err(MemError::Misaligned {
                pa,
                align: PAGE_SIZE,
            });
        }
        Ok(())
    }

    /// Copies `len` bytes (8-byte multiple) from `src` to `dst`, word by word.
    ///
    /// # Errors
    /// Unbacked or misaligned ranges.
    pub fn copy(&self, dst: Pa, src: Pa, len: u64) -> Result<(), MemError> {
        let s = self.page_words(src, len)?;
        let d = self.page_words(dst, len)?;
        for (d, s) in d.iter().zip(s) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies the 4K page at `src` to `dst`.
    ///
    /// # Errors
    /// Unbacked or misaligned pages.
    pub fn copy_page(&self, dst: Pa, src: Pa) -> Result<(), MemError> {
        self.check_page(dst)?;
        self.check_page(src)?;
        self.copy(dst, src, PAGE_SIZE)
    }

    /// Whether `[a, a+len)` and `[b, b+len)` hold the same bytes.
    ///
    /// # Errors
    /// Unbacked or misaligned ranges.
    pub fn compare(&self, a: Pa, b: Pa, len: u64) -> Result<bool, MemError> {
        let x = self.page_words(a, len)?;
        let y = self.page_words(b, len)?;
        Ok(x.iter()
            .zip(y)
            .all(|(x, y)| x.load(Ordering::Relaxed) == y.load(Ordering::Relaxed)))
    }

    /// Whether `[pa, pa+len)` is all zero.
    ///
    /// # Errors
    /// Unbacked or misaligned range.
    pub fn is_zero(&self, pa: Pa, len: u64) -> Result<bool, MemError> {
        Ok(self
            .page_words(pa, len)?
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0))
    }

    /// Copies `[pa, pa+out.len())` into `out` (8-byte aligned, multiple of 8).
    ///
    /// # Errors
    /// Unbacked or misaligned range.
    pub fn read_words(&self, pa: Pa, out: &mut [u64]) -> Result<(), MemError> {
        let w = self.page_words(pa, out.len() as u64 * 8)?;
        for (o, w) in out.iter_mut().zip(w) {
            *o = w.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes `data` at `pa` (8-byte aligned).
    ///
    /// # Errors
    /// Unbacked or misaligned range.
    pub fn write_words(&self, pa: Pa, data: &[u64]) -> Result<(), MemError> {
        let w = self.page_words(pa, data.len() as u64 * 8)?;
        for (d, w) in data.iter().zip(w) {
            w.store(*d, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The entries of the table page at `pa`, or `None` if `pa` is not a
    /// 4K-aligned RAM page (what the MMU reports as an external abort on the
    /// table walk).
    #[inline(always)]
    pub fn try_table(&self, pa: Pa) -> Option<&[AtomicU64; ENTRIES]> {
        let off = pa.0.wrapping_sub(self.base);
        if off >= self.size || off % PAGE_SIZE != 0 {
            return None;
        }
        let i = (off / 8) as usize;
        self.ram.words()[i..i + ENTRIES].try_into().ok()
    }

    fn frame_index(&self, pa: Pa) -> Option<usize> {
        let off = pa.0.wrapping_sub(self.base);
        (off < self.size).then_some((off / PAGE_SIZE) as usize)
    }

    /// The pin count word of the RAM frame containing `pa` (process memory).
    pub(crate) fn pin_word(&self, pa: Pa) -> Option<&AtomicU32> {
        self.frame_index(pa).map(|i| &self.pins.u32s()[i])
    }
}

impl PtMemory for PhysMem {
    /// # Panics
    /// If `pa` is not a 4K-aligned RAM page: a bug in the page-table user
    /// (table pages only come from this memory's allocators).
    fn table(&self, pa: Pa) -> &[AtomicU64; ENTRIES] {
        match self.try_table(pa) {
            Some(t) => t,
            None => panic!("page-table page {pa:?} is not a 4K-aligned RAM page"),
        }
    }

    /// # Panics
    /// If `pa` is not in RAM (a bug in the page-table user).
    fn refcount(&self, pa: Pa) -> &AtomicU32 {
        match self.frame_index(pa) {
            Some(i) => &self.refcounts.u32s()[i],
            None => panic!("page-table page {pa:?} is not in RAM"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> PhysMem {
        PhysMem::new(
            Pa(0x4000_0000),
            64 << 20,
            &[DeviceSpec {
                base: Pa(0x0900_0000),
                size: 0x1000,
            }],
        )
        .unwrap()
    }

    #[test]
    fn sized_reads_see_little_endian_bytes_of_writes() {
        let m = mem();
        let pa = Pa(0x4000_1000);
        m.write_u64(pa, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(m.read_u8(pa).unwrap(), 0x88);
        assert_eq!(m.read_u16(pa + 2).unwrap(), 0x5566);
        assert_eq!(m.read_u32(pa + 4).unwrap(), 0x1122_3344);
        m.write_u16(pa + 6, 0xabcd).unwrap();
        assert_eq!(m.read_u64(pa).unwrap(), 0xabcd_3344_5566_7788);
        // Straddling two words.
        m.write_u32(pa + 6, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(pa + 6).unwrap(), 0xdead_beef);
        assert_eq!(m.read_u16(pa + 8).unwrap(), 0xdead);
    }

    #[test]
    fn unbacked_and_bad_sizes_are_errors_not_panics() {
        let m = mem();
        assert_eq!(
            m.read(Pa(0x1000), 8),
            Err(MemError::Unbacked {
                pa: Pa(0x1000),
                len: 8
            })
        );
        assert_eq!(m.read(Pa(0x4000_0000), 3), Err(MemError::Size(3)));
        assert!(m.write(Pa(0x4000_0000 + (64 << 20) - 4), 8, 0).is_err());
        assert!(m.try_table(Pa(0x4000_0008)).is_none());
    }

    #[test]
    fn device_regions_are_backed() {
        let m = mem();
        m.write_u32(Pa(0x0900_0010), 7).unwrap();
        assert_eq!(m.read_u32(Pa(0x0900_0010)).unwrap(), 7);
        assert!(m.is_device(Pa(0x0900_0000), 0x1000));
        assert!(!m.is_ram(Pa(0x0900_0000), 8));
    }

    #[test]
    fn page_helpers_copy_compare_and_zero() {
        let m = mem();
        let (a, b) = (Pa(0x4000_2000), Pa(0x4000_3000));
        m.fill(a, PAGE_SIZE, 0x5a).unwrap();
        assert!(!m.compare(a, b, PAGE_SIZE).unwrap());
        m.copy_page(b, a).unwrap();
        assert!(m.compare(a, b, PAGE_SIZE).unwrap());
        m.zero_page(a).unwrap();
        assert!(m.is_zero(a, PAGE_SIZE).unwrap());
        // Large zeroing discards the pages.
        m.fill(Pa(0x4010_0000), 64 * PAGE_SIZE, 1).unwrap();
        m.zero(Pa(0x4010_0000), 64 * PAGE_SIZE).unwrap();
        assert!(m.is_zero(Pa(0x4010_0000), 64 * PAGE_SIZE).unwrap());
    }

    #[test]
    fn table_view_aliases_memory() {
        let m = mem();
        let t = m.table(Pa(0x4000_5000));
        t[3].store(0xabc, Ordering::Relaxed);
        assert_eq!(m.read_u64(Pa(0x4000_5018)).unwrap(), 0xabc);
        m.refcount(Pa(0x4000_5000)).fetch_add(1, Ordering::Relaxed);
        assert_eq!(m.refcount(Pa(0x4000_5000)).load(Ordering::Relaxed), 1);
    }
}
