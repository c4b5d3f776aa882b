//! Code generated from `proto/weir/v1/node_state.proto` (package `weir.v1`).

tonic::include_proto!("weir.v1");
