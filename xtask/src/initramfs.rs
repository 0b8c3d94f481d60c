//! A small initramfs for the Linux tiers: a newc cpio archive (written
//! here, no `cpio` tool) holding a static busybox and an `/init` script.
//!
//! newc: per entry a 110-byte ASCII header (`070701`, then 13 fields of 8
//! hex digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
//! devminor, rdevmajor, rdevminor, namesize (with the NUL), check), the
//! name and its NUL padded to 4 bytes, the data padded to 4 bytes; the
//! archive ends with the entry `TRAILER!!!`. Linux unpacks an uncompressed
//! archive as is.

use std::path::Path;

use anyhow::{Context, Result};

/// The line `/init` prints last, before `poweroff -f`.
pub const DONE: &str = "pkvm-init: done";

/// The `/init` of the test initramfs (a busybox `sh` script): mounts
/// /proc, prints `nproc`, the timer lines of /proc/interrupts twice with a
/// pause, the guest uptime around `sleep 1`, then [`DONE`] and powers off.
/// With `pkvm.shell` on the command line it starts a shell instead of
/// powering off.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
echo "pkvm-init: start $(cut -d' ' -f1 /proc/uptime)"
echo "pkvm-init: nproc $(nproc)"
grep arch_timer /proc/interrupts | sed 's/^/pkvm-init: irq0 /'
sleep 1
grep arch_timer /proc/interrupts | sed 's/^/pkvm-init: irq1 /'
t0=$(cut -d' ' -f1 /proc/uptime)
sleep 1
t1=$(cut -d' ' -f1 /proc/uptime)
echo "pkvm-init: slept $t0 $t1"
echo "pkvm-init: done"
if grep -q pkvm.shell /proc/cmdline; then
    echo "pkvm-init: shell"
    exec setsid cttyhack sh
fi
poweroff -f
"#;

/// One archive entry.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    CharDev(&'a str, u32, u32),
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        size as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Writes `entries` as a newc archive (with its trailer).
fn newc(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (name, mode, data, rdev): (&str, u32, &[u8], _) = match *e {
            Entry::Dir(n) => (n, 0o040_755, &[], (0, 0)),
            Entry::File(n, perm, d) => (n, 0o100_000 | perm, d, (0, 0)),
            Entry::Symlink(n, target) => (n, 0o120_777, target.as_bytes(), (0, 0)),
            Entry::CharDev(n, ma, mi) => (n, 0o020_600, &[], (ma, mi)),
        };
        header(&mut out, ino, mode, data.len(), rdev, name);
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    header(&mut out, 0, 0, 0, (0, 0), "TRAILER!!!");
    out
}

/// The test initramfs: `busybox` (a static arm64 busybox) as /bin/busybox,
/// `/bin/sh` linked to it, /proc, /sys, /dev/console and [`INIT`].
pub fn build(busybox: &[u8]) -> Vec<u8> {
    newc(&[
        Entry::Dir("bin"),
        Entry::Dir("dev"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("tmp"),
        Entry::CharDev("dev/console", 5, 1),
        Entry::File("bin/busybox", 0o755, busybox),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::File("init", 0o755, INIT.as_bytes()),
    ])
}

/// Writes the test initramfs for the busybox at `busybox` to `out`.
///
/// # Errors
/// The busybox cannot be read or the archive cannot be written.
pub fn write(busybox: &Path, out: &Path) -> Result<()> {
    let bb = std::fs::read(busybox).with_context(|| format!("busybox {}", busybox.display()))?;
    std::fs::write(out, build(&bb)).with_context(|| format!("initramfs {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a newc archive back: (name, mode, data) per entry.
    fn parse(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&a[..6], b"070701", "magic at offset {off}");
            let mode = hex(&a[14..22]);
            let size = hex(&a[54..62]) as usize;
            let nsz = hex(&a[94..102]) as usize;
            let name = std::str::from_utf8(&a[110..110 + nsz - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[110 + nsz - 1], 0);
            let data_at = (110 + nsz).next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            off += next;
            a = &a[next..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn the_archive_reads_back_with_names_modes_and_data() {
        let a = build(b"\x7fELF-busybox");
        assert!(a.len().is_multiple_of(4));
        let e = parse(&a);
        let find = |n: &str| e.iter().find(|x| x.0 == n).unwrap();
        assert_eq!(find("bin/busybox").2, b"\x7fELF-busybox");
        assert_eq!(find("bin/busybox").1, 0o100_755);
        assert_eq!(find("bin/sh").2, b"busybox");
        assert_eq!(find("bin/sh").1 & 0o170_000, 0o120_000);
        assert_eq!(find("init").2, INIT.as_bytes());
        assert_eq!(find("dev").1, 0o040_755);
        assert!(INIT.contains(DONE) && INIT.contains("poweroff -f"));
    }
}
