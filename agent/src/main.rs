use clap::Parser;

fn main() -> std::process::ExitCode {
    dunes_agent::cli::main(dunes_agent::cli::Cli::parse())
}
