//! The end-to-end tests through the built `whittle`: one test binary, a module a file (as
//! ripgrep's tests/ does), so the binary links once and its tests share the machine.

mod common;

mod auto;
mod bad_input;
mod cli_json;
mod compress;
mod deploy_host;
mod deploy_qemu;
mod deploy_serial;
mod deploy_ssh;
mod interrupt;
mod low_rank;
mod merge;
mod plans;
mod profile;
mod quantize;
mod regression;
mod roundtrip;
mod shapes;
mod tasks;
mod text;
mod transformer;
mod verify;

/// A file added to tests/ is a module here, or it would not run.
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    whittle_test_support::assert_every_file_is_a_module(
        &common::repo_root().join("tests"),
        include_str!("main.rs"),
    );
}
