//! Builds the XDP object (`lb-ebpf`, binary `lb`) for bpfel-unknown-none with nightly and
//! `-Z build-std=core`, and leaves it in OUT_DIR for `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the XDP object failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker",
    )
}
