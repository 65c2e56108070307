//! The `whittle` command line: parses arguments, calls the library crates, prints.
//!
//! stdout carries results only (a table, or one JSON object with `--json`); logs and progress
//! bars go to stderr. Exit codes: 0 success, 1 a check not met, 2 an error.

mod cmd;
mod progress;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Compress ONNX models without retraining and measure them where they will run.
#[derive(Parser)]
#[command(
    name = "whittle",
    version,
    about = "Compress ONNX models without retraining and measure them where they will run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show inputs, outputs, ops, params and MACs of a model.
    Inspect(cmd::inspect::Args),
    /// Measure a model's latency in one runtime.
    Bench(cmd::bench::Args),
    /// Compare a candidate model with a reference on real data.
    Verify(cmd::verify::Args),
    /// Read a model into the IR and write it back (optionally with external data).
    Convert(cmd::convert::Args),
    /// Measure a model on a target: inspect, bench each runtime, verify, one table.
    Deploy(cmd::deploy::Args),
}

/// What a command reports back: success, or a check that was not met.
pub enum Outcome {
    /// Everything asked for holds.
    Ok,
    /// A check (`--min-agreement`, ...) was not met; the message says which.
    CheckFailed(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Deploy(a) => cmd::deploy::run(a),
        Command::Convert(a) => cmd::convert::run(a),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::CheckFailed(msg)) => {
            eprintln!("check failed: {msg}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
