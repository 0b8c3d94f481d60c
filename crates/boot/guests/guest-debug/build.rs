//! Links the guest at IPA 0x40000000 with the shared guest linker script.
fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let ld = dir.join("..").join("guest.ld");
    println!("cargo:rustc-link-arg-bins=-T{}", ld.display());
    println!("cargo:rerun-if-changed={}", ld.display());
}
