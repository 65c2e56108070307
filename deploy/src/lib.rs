//! whittle's deployment to boards: target descriptions (`targets/*.toml`), the runner protocol,
//! and the transports that start a runner and exchange frames with it (local, emulated, ssh,
//! serial).
//!
//! The runtimes themselves (the `Session` trait, ONNX Runtime, tract, benchmarking) are in
//! `whittle-runtime`.

#![warn(missing_docs)]

pub mod protocol;
pub mod serial;
pub mod target;
pub mod transport;
