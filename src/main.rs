//! The `kiln` command line: parses arguments and runs one command (`src/cli/`).

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    // Errors are for users: no library backtraces unless asked for with KILN_BACKTRACE=1.
    if std::env::var_os("KILN_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let parsed = cli::Cli::parse();
    match cli::exec(parsed.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match kiln::distributed::World::from_env()
                .ok()
                .flatten()
                .map(|w| w.rank)
            {
                Some(rank) => eprintln!("error: rank {rank}: {e}"),
                None => eprintln!("error: {e}"),
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
