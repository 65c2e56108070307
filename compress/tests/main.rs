//! The passes on tiny built graphs and on the shared models: one test binary, a module a file.

mod blocks;
mod cleanup_passes;
mod fixtures;
mod lowrank;
mod merge;
mod prune_assets;
mod refit;
