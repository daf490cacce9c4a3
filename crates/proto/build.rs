//! Generates the gRPC code from `proto/` with a vendored protoc, so a fresh machine needs
//! no protoc install. A `PROTOC` already set in the environment wins.

use std::path::PathBuf;

#[allow(unsafe_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: a build script is single-threaded; nothing reads the environment
        // while it is written.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("taskpod_descriptor.bin"))
        .compile_protos(&[root.join("taskpod/v1/taskpod.proto")], &[root])?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
