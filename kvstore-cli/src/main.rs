//! The `kvstore` command: parses the command line, runs it with `kvstore_cli::run`, then prints
//! what it returns and exits with its status.
#![deny(missing_docs)]

use std::io::{ErrorKind, Write};
use std::process::ExitCode;

use clap::Parser;
use kvstore_cli::{run, Cli, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    kvstore_cli::logging::install();
    let output = match run(&cli) {
        Ok(Outcome::Print(output)) => output,
        Ok(Outcome::Exit { code, message }) => {
            kvstore_cli::logging::to_stderr(format_args!("kvstore: {message}"));
            return ExitCode::from(code);
        }
        Err(e) => {
            kvstore_cli::logging::to_stderr(format_args!("kvstore: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match std::io::stdout().lock().write_all(output.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        // `kvstore list | head -1`: the reader is gone, which is not an error of ours.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            kvstore_cli::logging::to_stderr(format_args!("kvstore: cannot write the output: {e}"));
            ExitCode::FAILURE
        }
    }
}
