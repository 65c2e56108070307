//! whittle's runtimes and benchmarking: load an ONNX model into ONNX Runtime (CPU, CUDA, TensorRT)
//! or tract (cargo feature `tract`, on by default) behind one [`Session`] trait, run it on
//! [`Value`]s, and measure latency and memory.
//!
//! ```no_run
//! use whittle_runtime::{BenchConfig, RuntimeKind, RuntimeOptions, bench, load, synthetic_inputs};
//! # fn main() -> Result<(), whittle_runtime::Error> {
//! let bytes = std::fs::read("model.onnx").expect("model");
//! let mut session = load(RuntimeKind::OrtCpu, &bytes, &RuntimeOptions::default())?;
//! let inputs = synthetic_inputs(session.inputs(), &[])?;
//! let outputs = session.run(&inputs)?;
//! let stats = bench(session.as_mut(), &inputs, &BenchConfig::default(), &mut |_, _| {})?;
//! println!("{} outputs, p50 {:.3} ms", outputs.len(), stats.p50_ms);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod error;
pub mod ort_lib;
mod ort_session;
pub mod rss;
pub mod session;
#[cfg(feature = "tract")]
mod tract_session;

pub use bench::{
    BenchConfig, BenchReport, BenchStats, bench, probe_tensor, probe_value, synthetic_inputs,
};
pub use error::Error;
pub use ort_lib::{ORT_VERSION, init_ort, init_ort_from, locate_ort_library};
pub use ort_session::{is_quantized, ort_cpu_kernels, runs_in_float};
pub use rss::peak_rss_bytes;
pub use session::{
    Dim, IoInfo, ProviderInfo, RuntimeKind, RuntimeOptions, Session, declared_inputs, load,
};
pub use whittle_core::Value;
