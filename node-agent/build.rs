//! Builds the eBPF programs (crate `weir-ebpf`, target bpfel-unknown-none, nightly toolchain
//! with rust-src and bpf-linker — `cargo xtask setup` installs them) into OUT_DIR.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "weir-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    println!(
        "cargo:rerun-if-changed={}/../common/src",
        env!("CARGO_MANIFEST_DIR")
    );
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
