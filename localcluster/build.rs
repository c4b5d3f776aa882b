//! Generates the client of the Kubernetes Container Runtime Interface (`runtime.v1`, the API
//! kubelet speaks to containerd) from `proto/` without a `protoc` binary: `protox` parses the
//! `.proto` file in Rust and hands the descriptors to tonic's generator. `xtask` depends on
//! this crate and is what installs the machine's packages, so the build must not need one.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = Path::new("proto");
    let file = proto_dir.join("runtime/v1/api.proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let descriptors = protox::compile([&file], [proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
