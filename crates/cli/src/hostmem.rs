//! The host-memory check before a run: a simulated machine backs all of its
//! RAM with host memory, so a run that needs more than the host has
//! available is refused before anything is allocated (`--force` skips it).

use anyhow::{bail, Result};

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut f = line.split_whitespace().skip(1);
    let n: u64 = f.next()?.parse().ok()?;
    match f.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The host's available memory (`MemAvailable` of `/proc/meminfo`), if
/// the host says.
pub fn available() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Refuses a run that needs `needed` bytes of host memory (the estimate
/// for `what`) when only `available` are available, unless `force`. An
/// unknown amount available is not checked.
///
/// # Errors
/// The run does not fit, with what to change.
pub fn check(needed: u64, available: Option<u64>, force: bool, what: &str) -> Result<()> {
    let Some(avail) = available else {
        return Ok(());
    };
    if force || needed <= avail {
        return Ok(());
    }
    bail!(
        "this run needs about {:.1} GiB of host memory ({what} plus the simulator's overhead) \
         but only {:.1} GiB is available: use a smaller --bytes or fewer --vcpus \
         (or pass --force to try anyway)",
        gib(needed),
        gib(avail)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_available_is_read_in_bytes() {
        let t = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   23886040 kB\n";
        assert_eq!(parse_meminfo(t), Some(23_886_040 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn a_run_larger_than_available_memory_is_refused_unless_forced() {
        let e = check(32 << 30, Some(8 << 30), false, "guest memory 32 GiB")
            .unwrap_err()
            .to_string();
        assert!(e.contains("32.0 GiB") && e.contains("8.0 GiB"), "{e}");
        assert!(e.contains("--bytes") && e.contains("--force"), "{e}");
        assert!(check(32 << 30, Some(8 << 30), true, "x").is_ok());
        assert!(check(4 << 30, Some(8 << 30), false, "x").is_ok());
        assert!(check(u64::MAX, None, false, "x").is_ok());
    }
}
