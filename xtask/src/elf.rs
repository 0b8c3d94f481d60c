//! ELF64 -> flat binary, from the program headers (no objcopy needed).
//!
//! The flat image spans from the lowest `PT_LOAD` physical address to the
//! highest `p_paddr + p_memsz`: file bytes are copied, everything else
//! (gaps, `.bss`) is zero, so a guest loaded at the lowest address and
//! entered at byte 0 finds its zeroed `.bss` and stack in place.

use anyhow::{bail, ensure, Result};

const PT_LOAD: u32 = 1;

/// One loadable segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address.
    pub paddr: u64,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (>= filesz).
    pub memsz: u64,
}

/// A parsed ELF64 little-endian file: entry point and loadable segments.
#[derive(Debug)]
pub struct Elf {
    /// `e_entry`.
    pub entry: u64,
    /// `PT_LOAD` segments with a non-zero memory size.
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16> {
    let s = b
        .get(o..o + 2)
        .ok_or_else(|| anyhow::anyhow!("ELF truncated at {o:#x}"))?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], o: usize) -> Result<u32> {
    let s = b
        .get(o..o + 4)
        .ok_or_else(|| anyhow::anyhow!("ELF truncated at {o:#x}"))?;
    Ok(u32::from_le_bytes(s.try_into()?))
}
fn u64_at(b: &[u8], o: usize) -> Result<u64> {
    let s = b
        .get(o..o + 8)
        .ok_or_else(|| anyhow::anyhow!("ELF truncated at {o:#x}"))?;
    Ok(u64::from_le_bytes(s.try_into()?))
}

/// Parses the header and program headers of an ELF64 LE file.
///
/// # Errors
/// Not ELF64 little-endian, or truncated headers.
pub fn parse(b: &[u8]) -> Result<Elf> {
    ensure!(b.len() >= 64 && &b[..4] == b"\x7fELF", "not an ELF file");
    ensure!(b[4] == 2 && b[5] == 1, "not a 64-bit little-endian ELF");
    let entry = u64_at(b, 24)?;
    let phoff = u64_at(b, 32)? as usize;
    let phentsize = u16_at(b, 54)? as usize;
    let phnum = u16_at(b, 56)? as usize;
    ensure!(phentsize >= 56, "bad e_phentsize {phentsize}");
    let mut segments = Vec::new();
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if u32_at(b, o)? != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: u64_at(b, o + 8)?,
            paddr: u64_at(b, o + 24)?,
            filesz: u64_at(b, o + 32)?,
            memsz: u64_at(b, o + 40)?,
        };
        ensure!(seg.memsz >= seg.filesz, "segment {i}: memsz < filesz");
        if seg.memsz > 0 {
            segments.push(seg);
        }
    }
    Ok(Elf { entry, segments })
}

/// Converts an ELF file to a flat image. Returns `(load address, bytes)`.
///
/// # Errors
/// Parse errors, no loadable segment, an entry point not at the start of the
/// image, or an image larger than 256 MiB (a linker-script mistake).
pub fn to_flat(b: &[u8]) -> Result<(u64, Vec<u8>)> {
    let elf = parse(b)?;
    let Some(base) = elf.segments.iter().map(|s| s.paddr).min() else {
        bail!("no loadable segment");
    };
    let end = elf
        .segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(base);
    ensure!(
        end - base <= 256 << 20,
        "flat image would be {} bytes",
        end - base
    );
    ensure!(
        elf.entry == base,
        "entry {:#x} is not the first byte of the image ({base:#x})",
        elf.entry
    );
    let mut out = vec![0u8; (end - base) as usize];
    for s in &elf.segments {
        let src = b
            .get(s.offset as usize..(s.offset + s.filesz) as usize)
            .ok_or_else(|| anyhow::anyhow!("segment at {:#x} outside the file", s.paddr))?;
        let at = (s.paddr - base) as usize;
        out[at..at + src.len()].copy_from_slice(src);
    }
    Ok((base, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with the given (paddr, data, memsz) segments.
    fn make_elf(entry: u64, segs: &[(u64, &[u8], u64)]) -> Vec<u8> {
        let phoff = 64usize;
        let data_off = phoff + 56 * segs.len();
        let mut b = vec![0u8; data_off];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut off = data_off;
        for (i, (paddr, data, memsz)) in segs.iter().enumerate() {
            let p = phoff + 56 * i;
            b[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&(off as u64).to_le_bytes());
            b[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
            off += data.len();
        }
        for (_, data, _) in segs {
            b.extend_from_slice(data);
        }
        b
    }

    #[test]
    fn flat_image_spans_segments_with_zeroed_gap_and_bss() {
        let elf = make_elf(
            0x4000_0000,
            &[(0x4000_0000, &[1, 2, 3], 3), (0x4000_0010, &[9], 8)],
        );
        let (base, flat) = to_flat(&elf).unwrap();
        assert_eq!(base, 0x4000_0000);
        assert_eq!(flat.len(), 0x18);
        assert_eq!(&flat[..4], &[1, 2, 3, 0]);
        assert_eq!(flat[0x10], 9);
        assert!(flat[0x11..].iter().all(|&x| x == 0));
    }

    #[test]
    fn entry_must_be_first_byte() {
        let elf = make_elf(0x4000_0004, &[(0x4000_0000, &[0; 8], 8)]);
        assert!(to_flat(&elf).is_err());
    }

    #[test]
    fn rejects_non_elf_and_truncated_headers() {
        assert!(
            parse(b"not an elf at all, definitely not, no no no no no no no no no no no").is_err()
        );
        let mut elf = make_elf(0, &[(0, &[0; 4], 4)]);
        elf.truncate(80);
        assert!(parse(&elf).is_err());
    }
}
