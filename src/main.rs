//! The `ladle` binary. This file parses arguments, calls into `cli`, and maps the result to an
//! exit status (0 success, 1 a stage failed, 2 usage, input or internal error; a closed pipe is
//! success). It must not grow: put behaviour in `cli/` or the library crates.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A panic is a bug: say so in one line, not with a trace (the stage's task reports it too).
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "error: internal error: {info}\n  hint: this is a bug in ladle; please report it with the pipeline file"
        )
    }));
    let args = cli::Args::parse();
    match cli::dispatch(args) {
        Ok(cli::Outcome::Success) => ExitCode::SUCCESS,
        Ok(cli::Outcome::StageFailed) => ExitCode::from(1),
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
