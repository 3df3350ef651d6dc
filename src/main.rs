fn main() -> std::process::ExitCode {
    spintrak::cli::app::main_with(std::env::args_os().collect())
}
