//! The passes on tiny built graphs and on the shared models: one test binary, a module a file.

mod blocks;
mod cleanup_passes;
mod fixtures;
mod lowrank;
mod merge;
mod prune_assets;
mod refit;

/// A file added to tests/ is a module here, or it would not run.
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    whittle_test_support::assert_every_file_is_a_module(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"),
        include_str!("main.rs"),
    );
}
