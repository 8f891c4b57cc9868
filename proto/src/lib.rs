//! The coordinator's gRPC API (`proto/coordinator.proto`, package `cohort.v1`),
//! generated at build time with protox and tonic-prost-build (no protoc).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cohort.v1");
}
