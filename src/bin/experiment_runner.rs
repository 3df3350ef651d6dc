//! `experiment_runner`: the seed document's command name for `spintrak experiment-runner`.
fn main() -> std::process::ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    args[0] = "experiment_runner".into();
    spintrak::cli::app::main_with(args)
}
