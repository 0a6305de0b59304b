//! The one opsbox binary: `opsbox serve` runs the server; every other subcommand is a
//! client that talks to a server through the `opsbox-client` SDK (or, for `users` and
//! `tokens` with `--data`, acts on a data directory directly).
//!
//! Parsing and dispatch live in [`cli`]; this file only sets up logging and the
//! runtime, and turns the outcome into an exit status and a one-line error.

mod admin;
mod agent;
mod cli;
mod serve;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: a server request allocates and frees many
/// small buffers across tokio's worker threads, and glibc's malloc spent ~16% of the
/// server's CPU doing it in a profile of the queue benchmark (arena locks, consolidation).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.is_serve());
    let runtime = if cli.is_agent() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) if cli::is_broken_pipe(&error) => {
            // The reader went away (`opsbox watch | head`): not worth a message.
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", cli::describe_error(&error));
            ExitCode::from(cli::exit_status(&error))
        }
    }
}

/// The server logs at `info` by default; client commands only show warnings, so their
/// output stays theirs. `RUST_LOG` overrides both.
fn init_logging(serve: bool) {
    let default = if serve { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal, not in journald or a log file.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
