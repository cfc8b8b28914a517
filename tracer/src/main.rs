//! `kvmtrace`: parses the command line, runs one subcommand, prints an error once.

mod cli;
mod commands;

use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Record(args) => commands::record::run(args),
        cli::Command::Show(args) => commands::show::run(&args),
        cli::Command::Reasons(args) => commands::reasons::run(&args),
        cli::Command::Diff(args) => commands::diff::run(&args),
        cli::Command::Guest(args) => commands::guest::run(&args),
        cli::Command::Reconcile(args) => commands::reconcile::run(&args),
        cli::Command::Top(args) => commands::top::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(std::io::stderr(), "kvmtrace: {err:#}");
            if err.downcast_ref::<commands::BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A closed pipe (`kvmtrace ... | head`) is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
