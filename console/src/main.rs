use clap::Parser;

fn main() -> std::process::ExitCode {
    dunes_console::cli::main(dunes_console::cli::Cli::parse())
}
