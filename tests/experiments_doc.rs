//! Every command of EXPERIMENTS.md's tiny-model section, run as written (through bash,
//! globs included) with the configs of `experiments_configs/` pointed at the tiny model.

use std::path::{Path, PathBuf};
use std::process::Command;

fn doc_commands() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("EXPERIMENTS.md")).unwrap();
    let section = doc.split("## The same flow on the built-in tiny model").nth(1).expect("tiny section");
    let block = section.split("```bash").nth(1).unwrap().split("```").next().unwrap();
    block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

fn tiny_config(n: u32, durations: &str, dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments_configs/experiment_{n}.yaml"));
    let text = std::fs::read_to_string(src).unwrap();
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.trim_start().starts_with("models:") {
            out.push_str("  models: [\"tiny/model\"]\n");
            continue;
        }
        if line.trim_start().starts_with("durations:") {
            out.push_str(&format!("  durations: {durations}\n"));
            skipping = true;
            continue;
        }
        if skipping && line.trim_start().starts_with('-') {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    std::fs::write(dir.join(format!("experiment_{n}.yaml")), out).unwrap();
}

#[test]
fn every_tiny_command_of_experiments_md_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tiny_config(1, "[2, 3]", dir);
    tiny_config(3, "[3]", dir);
    tiny_config(4, "[3]", dir);
    let bin_dir: PathBuf = PathBuf::from(env!("CARGO_BIN_EXE_spintrak")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let commands = doc_commands();
    assert!(commands.len() >= 10, "{commands:?}");
    for line in &commands {
        let o = Command::new("bash")
            .arg("-c")
            .arg(line)
            .current_dir(dir)
            .env("PATH", &path)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "`{line}` failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
    }
    for n in [1, 3, 4] {
        let run = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with(&format!("experiment_{n}_")))
            .unwrap();
        assert!(run.join(format!("experiment_{n}.png")).exists(), "experiment {n} figure");
    }
}
