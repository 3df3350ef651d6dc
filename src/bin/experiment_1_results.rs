//! `experiment_1_results`: the seed document's command name for `spintrak experiment-1-results`.
fn main() -> std::process::ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    args[0] = "experiment_1_results".into();
    spintrak::cli::app::main_with(args)
}
