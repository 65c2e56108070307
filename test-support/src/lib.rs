//! Helpers shared by whittle's tests, a dev-dependency of every crate that has tests: tiny ONNX
//! graphs built in Rust ([`onnx`]), one seeded random number generator ([`Lcg`]), the bundled and
//! shared assets ([`assets`]: a missing one skips a test with a note, or fails it under `CI=true`)
//! and running a model in a runtime ([`runtime`]).
//!
//! Tests take the runtime types from [`runtime`] rather than from the runtime crate itself, so a
//! move of that crate changes this file only.

pub mod assets;
pub mod onnx;
pub mod rng;
pub mod runtime;

pub use assets::{
    CNN_MODELS, asset, in_ci, minilm, ready, repo_root, resnet8, shared_assets, shared_models,
    unavailable, weight_elements,
};
pub use onnx::{
    GraphBuilder, attr_float, attr_int, attr_ints, attr_str, graph, load_fixture, model,
    model_with, node, tensor_external, tensor_f32, value_info, write_model,
};
pub use rng::{Lcg, noise, values};
pub use runtime::{assert_same_outputs, max_abs, max_abs_diff, rel_diff, run_model};
