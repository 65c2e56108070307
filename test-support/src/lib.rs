//! Helpers shared by whittle's tests, a dev-dependency of every crate that has tests: tiny ONNX
//! graphs built in Rust ([`onnx`]), one seeded random number generator ([`Lcg`]), the bundled and
//! shared assets ([`assets`]: a missing one skips a test with a note, or fails it under `CI=true`)
//! and running a model in a runtime ([`runtime`]).
//!
//! Tests take the runtime types from [`runtime`] rather than from the runtime crate itself, so a
//! move of that crate changes this file only.

pub mod assets;
pub mod fixtures;
pub mod onnx;
pub mod rng;
pub mod runtime;

pub use assets::{
    CNN_MODELS, asset, in_ci, minilm, ready, repo_root, resnet8, shared_assets, shared_models,
    unavailable, weight_elements,
};
pub use onnx::{
    GraphBuilder, attr_float, attr_int, attr_ints, attr_str, graph, load_fixture, model,
    model_with, node, op_count, tensor_external, tensor_f32, value_info, write_model,
};
pub use rng::{Lcg, noise, values};
pub use runtime::{assert_same_outputs, max_abs, max_abs_diff, rel_diff, run_model};

/// `Deref` and `DerefMut` to [`GraphBuilder`] for a test's own builder type wrapping one in the
/// field `$field`: `derefs_to_graph_builder!(Net, 0)`, so the wrapper adds its layer helpers and
/// keeps the builder's.
#[macro_export]
macro_rules! derefs_to_graph_builder {
    ($t:ty, $field:tt) => {
        impl ::std::ops::Deref for $t {
            type Target = $crate::GraphBuilder;
            fn deref(&self) -> &$crate::GraphBuilder {
                &self.$field
            }
        }

        impl ::std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut $crate::GraphBuilder {
                &mut self.$field
            }
        }
    };
}

/// Every `*.rs` file directly in `dir` but `main.rs` is declared as a module (`mod <name>;`) in
/// `main` (the text of `dir/main.rs`): a test file added beside a one-binary `main.rs` that is not
/// declared there would not be compiled, and its tests would silently not run.
pub fn assert_every_file_is_a_module(dir: &std::path::Path, main: &str) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if p.extension().is_some_and(|x| x == "rs") && stem != "main" {
            assert!(
                main.lines().any(|l| l.trim() == format!("mod {stem};")),
                "{} is not a module of {}/main.rs: add `mod {stem};` there",
                p.display(),
                dir.display()
            );
        }
    }
}
