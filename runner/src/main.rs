//! `whittle-runner`: serves whittle's requests on stdin and stdout until stdin closes, or with
//! `--serial DEVICE` on a serial port, for ever (see the `whittle_runner` library and
//! `deploy/proto/runner.proto`).

use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use whittle_runner::Server;

const USAGE: &str = "usage: whittle-runner [--dir UPLOADS] [--serial DEVICE [--baud RATE]]";

/// The command line, checked.
struct Args {
    serial: Option<PathBuf>,
    baud: u32,
    dir: Option<PathBuf>,
}

fn parse(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<Args, String> {
    let mut a = Args {
        serial: None,
        baud: whittle_deploy::target::DEFAULT_BAUD,
        dir: None,
    };
    let mut baud_set = false;
    while let Some(flag) = args.next() {
        let flag = flag.to_string_lossy().into_owned();
        let mut value = || {
            args.next()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))
        };
        match flag.as_str() {
            "--serial" => a.serial = Some(PathBuf::from(value()?)),
            "--dir" => a.dir = Some(PathBuf::from(value()?)),
            "--baud" => {
                let v = value()?.to_string_lossy().into_owned();
                a.baud = v
                    .parse()
                    .ok()
                    .filter(|b| (50..=16_000_000).contains(b))
                    .ok_or_else(|| format!("--baud {v:?} is not a rate from 50 to 16000000"))?;
                baud_set = true;
            }
            "-h" | "--help" => {
                return Err(format!(
                    "{USAGE}\nwithout --serial it reads request frames on stdin and answers on stdout until stdin closes; with --serial it serves the frames on that serial device for ever, reopening it when the link drops; uploaded files go to --dir (default {})",
                    Server::default_upload_dir().display()
                ));
            }
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if baud_set && a.serial.is_none() {
        return Err(format!("--baud is only for --serial; {USAGE}"));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("whittle-runner {}: {e}", env!("CARGO_PKG_VERSION"));
            return ExitCode::from(2);
        }
    };
    let mut server = args.dir.map(Server::new).unwrap_or_default();
    if let Some(device) = &args.serial {
        return match whittle_runner::serve_serial(&mut server, device, args.baud) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("whittle-runner: {e}");
                ExitCode::from(2)
            }
        };
    }
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    match whittle_runner::serve_with(&mut server, &mut input, &mut output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whittle-runner: {e}");
            ExitCode::from(2)
        }
    }
}
