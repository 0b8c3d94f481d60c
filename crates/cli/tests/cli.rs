//! The `pkvm` command on bad input: a clear error and a non-zero status,
//! before anything is allocated.

use std::process::{Command, Output};

fn pkvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pkvm"))
        .args(args)
        .output()
        .expect("run pkvm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `-v 2 -b 9007199254740992K` (2^63 bytes per vCPU) wrapped to "guest
/// memory 0x0" and ran in release builds (and panicked in debug builds).
#[test]
fn bytes_times_vcpus_overflow_is_an_error_not_a_run() {
    let o = pkvm(&["sim", "demand-paging", "-v", "2", "-b", "9007199254740992K"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("overflows 64 bits"), "{e}");
    assert!(!e.contains("panicked") && !e.contains("0x0"), "{e}");
    assert!(o.stdout.is_empty(), "it must not run");
}

#[test]
fn guest_memory_beyond_the_ipa_space_is_an_error() {
    let o = pkvm(&["sim", "demand-paging", "-b", "2000G"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("IPA space"), "{e}");
}

/// The host's MemAvailable, from /proc/meminfo.
fn mem_available() -> Option<u64> {
    let t = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
    l.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// A run larger than the host's available memory is refused before it
/// allocates, naming what to change; `--force` is the way around.
#[test]
fn run_larger_than_available_host_memory_is_refused() {
    let Some(avail) = mem_available() else {
        eprintln!("no /proc/meminfo MemAvailable: nothing to check against");
        return;
    };
    // Twice what is available, in GiB, within the VM's IPA space.
    let gib = (avail >> 30) * 2 + 2;
    if gib > 1000 {
        eprintln!("host has too much memory for this check");
        return;
    }
    let size = format!("{gib}G");
    let o = pkvm(&["sim", "demand-paging", "-b", &size]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("of host memory"), "{e}");
    assert!(e.contains("--bytes") && e.contains("--force"), "{e}");
    let o = pkvm(&["bench", "-b", &size]);
    assert!(stderr(&o).contains("of host memory"), "{}", stderr(&o));
}

/// The error chain names each cause once: a machine whose RAM ends above
/// the PA size printed "machine: bad configuration: memory lies above the
/// PA size: bad configuration: memory lies above the PA size" (anyhow's
/// `{:#}` printed the source the outer message already contained). The
/// machine is refused before its RAM is allocated.
#[test]
fn error_messages_do_not_repeat_themselves() {
    let o = pkvm(&["sim", "demand-paging", "-b", "1023G", "--force"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.matches("PA size").count(), 1, "{e}");
    let first = e.trim().trim_start_matches("pkvm: ");
    for part in first.split(": ") {
        assert_eq!(e.matches(part).count(), 1, "`{part}` repeated in `{e}`");
    }
}

#[test]
fn bad_size_and_vcpu_arguments_are_rejected() {
    let o = pkvm(&["sim", "demand-paging", "-b", "1000"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("multiple of 4K"), "{}", stderr(&o));
    let o = pkvm(&["sim", "demand-paging", "-v", "0"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--vcpus must be 1..=16"),
        "{}",
        stderr(&o)
    );
}
