//! `kvmtrace`: parses the command line, runs one subcommand, prints an error once.

mod cli;
mod commands;
mod exit_status;

use std::{io::Write as _, process::ExitCode};

use clap::{
    CommandFactory as _, Parser as _,
    error::{ContextKind, ContextValue, ErrorKind},
};

use crate::exit_status::Status;

fn main() -> ExitCode {
    // Packaging's `kvmtrace dist-files DIR`: kept out of the command line users see, so
    // that it is in neither its help nor the man pages and completions it writes.
    if let Some(code) = commands::dist_files::run_if_asked() {
        return code;
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    // A service logs what it does; the one-shot commands only what went wrong.
    let level = match cli.command {
        cli::Command::Export(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let result = match cli.command {
        cli::Command::Record(args) => commands::record::run(*args),
        cli::Command::Show(args) => commands::show::run(&args),
        cli::Command::Reasons(args) => commands::reasons::run(&args),
        cli::Command::Diff(args) => commands::diff::run(&args),
        cli::Command::Guest(args) => commands::guest::run(&args),
        cli::Command::Reconcile(args) => commands::reconcile::run(&args),
        cli::Command::Top(args) => commands::top::run(&args),
        cli::Command::Export(args) => commands::export::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(std::io::stderr(), "kvmtrace: {err:#}");
            error_status(&err).into()
        }
    }
}

/// The exit status of an error: bad input, one with a status of its own, or an error.
fn error_status(err: &anyhow::Error) -> Status {
    if let Some(f) = err.downcast_ref::<commands::Failure>() {
        f.status
    } else if err.downcast_ref::<commands::BadInput>().is_some() {
        Status::BadInput
    } else {
        Status::Error
    }
}

/// A closed pipe (`kvmtrace ... | head`) is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// clap's errors as one line, like every other error: `kvmtrace: invalid value 'abc' for
/// '--duration <SECONDS>': ... (see `kvmtrace record --help`)`, exit status 2
/// ([`Status::BadInput`]). Help and version (and the help shown for a bare `kvmtrace`)
/// print as clap renders them.
fn usage_error(err: &clap::Error) -> ExitCode {
    let code = |c: i32| ExitCode::from(u8::try_from(c).unwrap_or(2));
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        // A closed pipe (`kvmtrace --help | head`) is not an error.
        let _ = err.print();
        return code(err.exit_code());
    }
    let _ = writeln!(std::io::stderr(), "kvmtrace: {}", one_line(err));
    Status::BadInput.into()
}

/// The message of a clap error without its usage and tips: the lines up to the first
/// blank one (a list of missing arguments or possible values is indented under it),
/// a suggestion if clap has one, and where to read more.
fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let mut msg = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(rest) = msg.strip_prefix("error: ") {
        msg = rest.to_owned();
    }
    for kind in [
        ContextKind::SuggestedSubcommand,
        ContextKind::SuggestedArg,
        ContextKind::SuggestedValue,
    ] {
        match err.get(kind) {
            Some(ContextValue::String(s)) => msg.push_str(&format!("; did you mean '{s}'?")),
            Some(ContextValue::Strings(v)) if !v.is_empty() => {
                msg.push_str(&format!("; did you mean '{}'?", v.join("' or '")));
            }
            _ => {}
        }
    }
    let command = subcommand_in_args()
        .map(|name| format!("kvmtrace {name}"))
        .unwrap_or_else(|| "kvmtrace".to_owned());
    format!("{msg} (see `{command} --help`)")
}

/// The subcommand named on the command line, if any: the first word that is not an
/// option, when it names one.
fn subcommand_in_args() -> Option<String> {
    let word = std::env::args_os()
        .skip(1)
        .find(|a| !a.as_encoded_bytes().starts_with(b"-"))?
        .into_string()
        .ok()?;
    cli::Cli::command()
        .get_subcommands()
        .any(|c| c.get_name() == word)
        .then_some(word)
}
