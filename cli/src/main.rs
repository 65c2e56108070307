//! The `whittle` command line: parses arguments, calls the library crates, prints.
//!
//! stdout carries results only (a table, or one JSON object with `--json`); logs and progress
//! bars go to stderr. Exit codes: 0 success, 1 a check not met, 2 an error.

/// Print to stdout; a closed pipe (`whittle ... | head`) ends the program quietly.
macro_rules! out {
    ($($t:tt)*) => { $crate::emit(&format!($($t)*)) };
}

/// [`out!`] with a newline.
macro_rules! outln {
    () => { $crate::emit("\n") };
    ($($t:tt)*) => { $crate::emit(&format!("{}\n", format!($($t)*))) };
}

mod cmd;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
// `crate::table`: the text tables every command prints are the ones deploy's reports quote.
use whittle_deploy::table;

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
    /// Measure each layer's latency at several widths on one runtime (for `--target latency=`).
    Profile(cmd::profile::Args),
    /// Compress a model (channel pruning with least-squares repair) and write it.
    Compress(Box<cmd::compress::Args>),
    /// Search recipes for the fastest model that keeps a fidelity floor, measured here.
    Auto(Box<cmd::auto::Args>),
    /// Read a model into the IR and write it back (optionally with external data).
    Convert(cmd::convert::Args),
    /// Measure a model on a target: inspect, bench each runtime, verify, one table.
    Deploy(cmd::deploy::Args),
    /// Tokenise sentences into an .npz of encoder inputs (calibration data for text models).
    Tokenize(cmd::tokenize::Args),
}

/// What a command reports back: success, or a check that was not met.
pub enum Outcome {
    /// Everything asked for holds.
    Ok,
    /// A check (`--min-agreement`, ...) was not met; the message says which.
    CheckFailed(String),
}

/// Write results to stdout. When the reader has gone (broken pipe), exit with success: the
/// output was not wanted any more.
pub fn emit(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(2);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    whittle_export::remove_partial_files_on_interrupt();
    let result = match cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Profile(a) => cmd::profile::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Deploy(a) => cmd::deploy::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Compress(a) => cmd::compress::run(*a),
        Command::Auto(a) => cmd::auto::run(*a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
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

#[cfg(test)]
mod tests {
    /// Every method's flags join `whittle compress`'s: their ids and names must not collide.
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
