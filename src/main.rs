//! The `beltad` command line: fit, predict, eval and run.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
