//! taskpod's gRPC contract, generated from `proto/taskpod/v1/taskpod.proto`, and the
//! conversions between its messages and the domain.
//!
//! Generated code lives only here; the API server and the CLI convert at their edge
//! with [`convert`], so the domain never sees a proto type.
//!
//! Layout:
//! - [`v1`]: the generated messages, client and server;
//! - [`convert`]: domain <-> proto, JSON <-> `google.protobuf.Value`, timestamps.

pub mod convert;

/// The generated `taskpod.v1` package.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("taskpod.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("taskpod_descriptor");
