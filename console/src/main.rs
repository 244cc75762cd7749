fn main() -> std::process::ExitCode {
    match dunes_console::cli::parse_args() {
        Ok(cli) => dunes_console::cli::main(cli),
        Err(code) => code,
    }
}
