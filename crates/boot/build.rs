//! Links the image with `link.ld` and provides the guest payload directory
//! (`PKVM_GUESTS_DIR`, set by `cargo xtask`; empty placeholders otherwise so
//! a plain `cargo check` works).
use std::path::PathBuf;

const GUESTS: &[&str] = &[
    "guest-toucher",
    "guest-mmio",
    "guest-hvc",
    "guest-psci",
    "guest-smp",
    "guest-spin",
    "guest-reset",
    "guest-sysreg",
    "guest-gic",
    "guest-debug",
];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!(
        "cargo:rustc-link-arg-bins=-T{}",
        dir.join("link.ld").display()
    );
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-env-changed=PKVM_GUESTS_DIR");
    let gdir = match std::env::var("PKVM_GUESTS_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("no-guests");
            std::fs::create_dir_all(&out).unwrap();
            for g in GUESTS {
                let p = out.join(format!("{g}.bin"));
                if !p.exists() {
                    std::fs::write(&p, []).unwrap();
                }
            }
            out
        }
    };
    for g in GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            gdir.join(format!("{g}.bin")).display()
        );
    }
    println!("cargo:rustc-env=PKVM_GUESTS_DIR={}", gdir.display());
}
