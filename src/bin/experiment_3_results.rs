//! `experiment_3_results`: the seed document's command name for `spintrak experiment-3-results`.
fn main() -> std::process::ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    args[0] = "experiment_3_results".into();
    spintrak::cli::app::main_with(args)
}
