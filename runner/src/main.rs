//! `whittle-runner`: serves whittle's requests on stdin and stdout until stdin closes
//! (see the `whittle_runner` library and `deploy/proto/runner.proto`).

use std::io::{BufReader, BufWriter};
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().len() > 1 {
        eprintln!(
            "whittle-runner {}: takes no arguments; it reads request frames on stdin and answers on stdout",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::from(2);
    }
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    match whittle_runner::serve(&mut input, &mut output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whittle-runner: {e}");
            ExitCode::from(2)
        }
    }
}
