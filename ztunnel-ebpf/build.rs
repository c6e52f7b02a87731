//! bpf-linker is found by rustc through PATH; rebuild when it changes.
fn main() {
    let linker = which::which("bpf-linker")
        .expect("bpf-linker not found on PATH: run `cargo xtask setup` to install it");
    println!("cargo:rerun-if-changed={}", linker.display());
}
