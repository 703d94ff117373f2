//! Generates the twopc.v1 messages and tonic services into OUT_DIR.
//!
//! protoc comes from protoc-bin-vendored, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/common.proto",
        "proto/participant.proto",
        "proto/coordinator.proto",
        "proto/peer.proto",
        "proto/bank.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
