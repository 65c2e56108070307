//! whittle's deployment to boards: target descriptions (`targets/*.toml`), the runner protocol,
//! the transports that start a runner and exchange frames with it (local, emulated, ssh, serial),
//! and the reports of a deployment (results table, `report.md`, plots).
//!
//! The runtimes themselves (the `Session` trait, ONNX Runtime, tract, benchmarking) are in
//! `whittle-runtime`.

#![warn(missing_docs)]

pub mod plot;
pub mod protocol;
pub mod report;
pub mod serial;
pub mod table;
pub mod target;
pub mod transport;
