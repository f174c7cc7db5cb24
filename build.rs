//! Generates the Rust types and tonic services from `proto/` with a vendored
//! `protoc`, so building needs no install step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let well_known = protoc_bin_vendored::include_path()?;

    let protos = [
        "proto/build/bazel/remote/execution/v2/remote_execution.proto",
        "proto/google/bytestream/bytestream.proto",
        "proto/provcache/v1/provenance.proto",
        "proto/provcache/v1/storage.proto",
        "proto/provcache/v1/audit.proto",
    ];
    let includes = [std::path::PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        // Blob data is passed around without copies.
        .bytes(".")
        .compile_protos(&protos.iter().map(std::path::PathBuf::from).collect::<Vec<_>>(), &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
