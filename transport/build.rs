//! Generates the gRPC messages and service from `proto/` without a `protoc` binary:
//! `protox` parses the `.proto` files in Rust and hands the descriptors to tonic's generator.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = Path::new("proto");
    let file = proto_dir.join("weir/v1/node_state.proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let descriptors = protox::compile([&file], [proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
