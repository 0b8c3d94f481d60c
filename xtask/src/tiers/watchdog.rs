//! Test binaries under a watchdog. `cargo test` has no time limit, so one
//! livelocked test hangs CI for good. Here cargo only builds the tests;
//! each test binary then runs on its own with a time limit, and one that
//! overruns is killed (with everything it started) and fails with
//! `timed out after Ns: <binary>: still running: <tests>` (the tests it
//! listed and did not finish).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A test executable cargo built.
#[derive(Debug)]
pub struct TestBinary {
    /// Package directory, target kind and name (for messages).
    pub label: String,
    /// The executable.
    pub path: PathBuf,
    /// Its package's directory (cargo runs tests there).
    pub dir: PathBuf,
}

/// Builds what `cargo` (a `cargo test ...` command) would run, without
/// running it; returns the test executables.
///
/// # Errors
/// The build failed, or cargo's output could not be read.
pub fn build(mut cargo: Command) -> Result<Vec<TestBinary>> {
    cargo
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped());
    let out = cargo
        .spawn()
        .with_context(|| format!("starting {cargo:?}"))?
        .wait_with_output()?;
    if !out.status.success() {
        bail!("{cargo:?} exited with {}", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(manifest)) = (v["executable"].as_str(), v["manifest_path"].as_str())
        else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let dir = PathBuf::from(manifest)
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let pkg = dir.file_name().unwrap_or_default().to_string_lossy();
        let kind = v["target"]["kind"][0].as_str().unwrap_or("?");
        let name = v["target"]["name"].as_str().unwrap_or("?");
        bins.push(TestBinary {
            label: format!("{pkg}: {kind} {name}"),
            path: exe.into(),
            dir,
        });
    }
    Ok(bins)
}

/// The tests `bin` would run with `filter`.
///
/// # Errors
/// The binary could not be run.
pub fn list(bin: &TestBinary, filter: &[&str]) -> Result<Vec<String>> {
    let out = Command::new(&bin.path)
        .args(["--list", "--format", "terse"])
        .args(filter)
        .current_dir(&bin.dir)
        .output()
        .with_context(|| format!("listing {}", bin.label))?;
    if !out.status.success() {
        bail!("listing the tests of {} failed: {}", bin.label, out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(String::from)
        .collect())
}

/// What a watched run saw of libtest's output.
#[derive(Debug, Default)]
pub struct Seen {
    /// Tests that finished (any outcome).
    pub finished: BTreeSet<String>,
    /// `test result:` lines: (passed, failed).
    pub results: Vec<(u64, u64)>,
}

impl Seen {
    fn line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, _)) = rest.split_once(" ... ") {
                self.finished.insert(name.to_string());
            }
        }
        if let Some(r) = super::parse_result_line(line) {
            self.results.push(r);
        }
    }
}

/// Kills `child` and every process it started (its process group).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` (echoing its output) in its own process group, killed after
/// `limit`. `listed` are the tests it was going to run: those it had not
/// finished are named in the timeout error.
///
/// # Errors
/// It timed out, could not start, or exited unsuccessfully.
pub fn run(mut cmd: Command, label: &str, listed: &[String], limit: Duration) -> Result<Seen> {
    cmd.stdout(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("starting {label}"))?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut seen = Seen::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                seen.line(&line);
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                kill_group(&mut child);
                let running: Vec<&str> = listed
                    .iter()
                    .filter(|t| !seen.finished.contains(*t))
                    .map(String::as_str)
                    .collect();
                bail!(
                    "timed out after {}s: {label}: still running: {}",
                    limit.as_secs(),
                    if running.is_empty() {
                        "(unknown)".to_string()
                    } else {
                        running.join(", ")
                    }
                );
            }
        }
    }
    let st = child.wait()?;
    if !st.success() {
        let failed: u64 = seen.results.iter().map(|r| r.1).sum();
        bail!("{label} exited with {st} ({failed} tests failed)");
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake test binary: finishes `fast`, then hangs in `stuck`.
    fn hanging() -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'test fast ... ok'; exec sleep 600"]);
        c
    }

    #[test]
    fn a_hanging_binary_is_killed_and_its_unfinished_tests_named() {
        let listed = ["fast".to_string(), "stuck".to_string()];
        let e =
            run(hanging(), "fake/bin", &listed, Duration::from_secs(1)).expect_err("must time out");
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("timed out after 1s: fake/bin: still running: stuck"),
            "{msg}"
        );
    }

    #[test]
    fn a_binary_that_finishes_is_read_to_the_end() {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo 'test a ... ok'; echo 'test result: ok. 1 passed; 0 failed; 0 ignored'",
        ]);
        let seen = run(c, "fake/ok", &["a".into()], Duration::from_secs(60)).expect("ok");
        assert_eq!(seen.results, vec![(1, 0)]);
        assert!(seen.finished.contains("a"));
    }

    #[test]
    fn a_failing_binary_fails() {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo 'test result: FAILED. 0 passed; 2 failed;'; exit 101",
        ]);
        let e = run(c, "fake/bad", &[], Duration::from_secs(60)).expect_err("fails");
        assert!(format!("{e:#}").contains("2 tests failed"), "{e:#}");
    }
}
