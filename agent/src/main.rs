fn main() -> std::process::ExitCode {
    match dunes_agent::cli::parse_args() {
        Ok(cli) => dunes_agent::cli::main(cli),
        Err(code) => code,
    }
}
