//! The `kvstore` command: parses the command line and prints what `kvstore_cli::run` returns.
#![deny(missing_docs)]

use std::io::{ErrorKind, Write};
use std::process::ExitCode;

use clap::Parser;
use kvstore_cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match run(&cli) {
        Ok(output) => output,
        Err(e) => {
            eprintln!("kvstore: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::io::stdout().lock().write_all(output.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        // `kvstore list | head -1`: the reader is gone, which is not an error of ours.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvstore: cannot write the output: {e}");
            ExitCode::FAILURE
        }
    }
}
