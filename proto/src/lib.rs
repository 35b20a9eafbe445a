//! Generated gRPC services and messages of fmboost (from `proto/fmboost/v1/*.proto`).
//!
//! `v1` is the public API (`Pipeline` service, `JobSpec`, `Tensor`, ...); `internal` holds the
//! messages the coordinator and workers exchange through Redis.

pub mod v1 {
    tonic::include_proto!("fmboost.v1");
}

pub mod internal {
    // Nested like the proto package so generated `super::super::v1` paths resolve.
    pub mod v1 {
        tonic::include_proto!("fmboost.internal.v1");
    }
    pub use v1::*;
}

/// Encoded `FileDescriptorSet` of all fmboost protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fmboost_descriptor.bin"));
