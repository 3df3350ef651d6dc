//! The binary as a user runs it: outputs, exit codes and one-line errors.

use std::path::Path;
use std::process::{Command, Output};

fn spintrak(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spintrak"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn spintrak")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A failed run: non-zero exit, one `error:` line mentioning every `needle`, no panic.
fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() == 1 || err.contains("Usage"), "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

#[test]
fn generate_audio_writes_a_wav_of_the_right_length() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("calm.wav");
    let o = spintrak(
        &[
            "generate-audio",
            "--prompt",
            "calm piano melody",
            "--duration",
            "1.5",
            "--seed",
            "42",
            "--output",
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let reader = hound::WavReader::open(&out).unwrap();
    let spec = reader.spec();
    assert_eq!(spec.sample_rate, 8000);
    assert_eq!(spec.channels, 1);
    assert_eq!(reader.duration(), 75 * 160);
}

#[test]
fn same_audio_with_one_or_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let run = |threads: &str| {
        let out = dir.path().join(format!("t{threads}.wav"));
        let o = spintrak(
            &[
                "generate-audio",
                "--prompt",
                "salsa",
                "--duration",
                "2",
                "--seed",
                "9",
                "--output",
                out.to_str().unwrap(),
                "--quiet",
            ],
            &[("RAYON_NUM_THREADS", threads)],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    assert_eq!(run("1"), run("2"));
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.wav");
    let out_s = out.to_str().unwrap();
    // Empty prompt, non-positive and non-numeric durations.
    assert_clean_error(
        &spintrak(&["generate-audio", "--prompt", "  ", "--duration", "2", "--output", out_s], &[]),
        &["prompt"],
    );
    for d in ["0", "-3"] {
        let o = spintrak(&["generate-audio", "--prompt", "a", "--duration", d, "--output", out_s], &[]);
        assert!(!o.status.success() && stderr(&o).contains("the duration must be positive"), "{}", stderr(&o));
    }
    let o = spintrak(&["generate-audio", "--prompt", "a", "--duration", "soon", "--output", out_s], &[]);
    assert!(!o.status.success() && stderr(&o).contains("not a number of seconds"), "{}", stderr(&o));
    // Missing model directory.
    assert_clean_error(
        &spintrak(
            &["generate-audio", "--model", "/nonexistent/dir", "--prompt", "a", "--duration", "1", "--output", out_s],
            &[],
        ),
        &["/nonexistent/dir"],
    );
    // A directory that is no model.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_error(
        &spintrak(
            &[
                "generate-audio",
                "--model",
                empty.to_str().unwrap(),
                "--prompt",
                "a",
                "--duration",
                "1",
                "--output",
                out_s,
            ],
            &[],
        ),
        &["state_dict.bin", "config.json"],
    );
    assert!(!out.exists(), "nothing may be written on failure");
}

fn write_tiny(dir: &Path) {
    let o = spintrak(&["init-model", dir.to_str().unwrap(), "--tiny"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn corrupt_and_truncated_checkpoints_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny(&model);
    let out = dir.path().join("x.wav");
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    // Truncated safetensors.
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let args = [
        "generate-audio",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a",
        "--duration",
        "1",
        "--output",
        out.to_str().unwrap(),
    ];
    assert_clean_error(&spintrak(&args, &[]), &["model.safetensors"]);
    // Zero-byte file.
    std::fs::write(&weights, b"").unwrap();
    assert_clean_error(&spintrak(&args, &[]), &["model.safetensors", "empty"]);
    // Broken config.
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::write(model.join("config.json"), b"{\"decoder\": 3").unwrap();
    assert_clean_error(&spintrak(&args, &[]), &["config.json"]);
    // A garbage audiocraft checkpoint.
    let ac = dir.path().join("ac");
    std::fs::create_dir(&ac).unwrap();
    std::fs::write(ac.join("state_dict.bin"), b"PK\x03\x04 not really a zip").unwrap();
    let args = [
        "generate-audio",
        "--model",
        ac.to_str().unwrap(),
        "--prompt",
        "a",
        "--duration",
        "1",
        "--output",
        out.to_str().unwrap(),
    ];
    assert_clean_error(&spintrak(&args, &[]), &["state_dict.bin"]);
    assert!(!out.exists());
}

#[test]
fn unsupported_config_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny(&model);
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["decoder"]["activation_function"] = serde_json::json!("relu");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = dir.path().join("x.wav");
    let o = spintrak(
        &[
            "generate-audio",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a",
            "--duration",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, &["config.json", "relu"]);
}

#[test]
fn outputs_never_destroy_inputs_or_special_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // init-model over an existing model: refused without --force.
    let m = d.join("m");
    let m_s = m.to_str().unwrap();
    assert!(spintrak(&["init-model", m_s, "--tiny"], &[]).status.success());
    let before = std::fs::read(m.join("model.safetensors")).unwrap();
    assert_clean_error(&spintrak(&["init-model", m_s, "--tiny", "--seed", "9"], &[]), &["--force", "m"]);
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), before);
    assert!(spintrak(&["init-model", m_s, "--tiny", "--seed", "9", "--force"], &[]).status.success());
    assert_ne!(std::fs::read(m.join("model.safetensors")).unwrap(), before);
    // finetune --output equal to --model, the walk's --output inside --input.
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let o = spintrak(&["finetune", "--model", m_s, "--input", data.to_str().unwrap(), "--output", m_s], &[]);
    assert_clean_error(&o, &["--output", "--model"]);
    let inside = data.join("out.bin");
    let o = spintrak(
        &[
            "generate-training-dataset-parallel",
            "--input",
            data.to_str().unwrap(),
            "--output",
            inside.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, &["--output", "--input", "inside"]);
    // An embedding written to /dev/null leaves it a character device.
    let o = spintrak(
        &["generate-gradients", "--prompt", "x", "--duration", "0.2", "--output", "/dev/null", "--quiet"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
}

#[test]
fn sizes_are_bounded_and_messages_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("o.wav");
    let o = spintrak(&["generate-audio", "--prompt", "x", "--duration", "1e6", "--output", out.to_str().unwrap()], &[]);
    assert!(!o.status.success() && stderr(&o).contains("limit") && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    // A sidecar saying 1e308 s is refused with the file's name, before any work.
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    spintrak::audio::write_wav(&data.join("a.wav"), &[vec![0.1; 800]], 8000).unwrap();
    std::fs::write(data.join("a.json"), r#"{"description": "x", "duration": 1e308}"#).unwrap();
    let walk = |extra: &[&str]| {
        let out = d.join("t.bin");
        let mut args = vec!["generate-training-dataset-parallel", "--input", data.to_str().unwrap()];
        args.extend(["--output", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        spintrak(&args, &[])
    };
    let o = walk(&["--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("a.json") && stderr(&o).contains("limit"), "{}", stderr(&o));
    // --jobs far beyond the machine's CPUs.
    let o = walk(&["--jobs", "100000"]);
    assert_clean_error(&o, &["--jobs 100000", "CPU"]);
    // A directory given as an embedding file; λ = inf.
    let o = spintrak(&["score", d.to_str().unwrap(), d.to_str().unwrap()], &[]);
    assert_clean_error(&o, &["is a directory"]);
    let emb = d.join("e.bin");
    assert!(spintrak(
        &["generate-gradients", "--prompt", "x", "--duration", "0.2", "--output", emb.to_str().unwrap(), "--quiet"],
        &[]
    )
    .status
    .success());
    let e = emb.to_str().unwrap();
    assert_clean_error(&spintrak(&["score", e, e, "--lambda", "inf"], &[]), &["--lambda", "finite"]);
    // --weight-decay nan is named as such, not as a diverged loss.
    let o = spintrak(
        &[
            "finetune",
            "--input",
            data.to_str().unwrap(),
            "--output",
            d.join("ft").to_str().unwrap(),
            "--weight-decay",
            "nan",
        ],
        &[],
    );
    assert_clean_error(&o, &["--weight-decay"]);
}

#[test]
fn control_characters_from_input_are_shown_not_obeyed() {
    // A prompt carrying a terminal escape (clear screen) and a bell: `score` prints it
    // escaped. The control: the same run with a plain prompt prints it unchanged.
    let dir = tempfile::tempdir().unwrap();
    for (prompt, shown) in [("calm\u{1b}[2Jsea\u{7}", "calm\\u{1b}[2Jsea\\u{7}"), ("calm sea", "calm sea")] {
        let q = dir.path().join("q.bin");
        let o = spintrak(
            &["generate-gradients", "--prompt", prompt, "--duration", "0.2", "--proj-dim", "64", "--quiet", "--output"]
                .iter()
                .copied()
                .chain([q.to_str().unwrap()])
                .collect::<Vec<_>>(),
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let o = spintrak(&["score", q.to_str().unwrap(), q.to_str().unwrap()], &[]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(out.contains(shown), "{out:?}");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
    }
}
