//! Builds the eBPF programs (ztunnel-ebpf) with the nightly toolchain; the daemon embeds them.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "ztunnel-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ztunnel-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
