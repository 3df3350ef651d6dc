//! The experiment commands end to end on the tiny model: runner (with resume), results
//! of experiments 1, 3 and 4, score and attribute, the seed's command names, bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn exe(name: &str) -> PathBuf {
    let main = PathBuf::from(env!("CARGO_BIN_EXE_spintrak"));
    main.with_file_name(name)
}

fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(exe(prog)).args(args).current_dir(dir).env_remove("RUST_BACKTRACE").output().expect("spawn")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn two_songs(dir: &Path) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let sr = 8000;
    let rock = spintrak::demo::rock_ballad(sr, 2.0);
    spintrak::audio::write_wav(&dir.join("data/rock.wav"), &[rock], sr).unwrap();
    std::fs::write(dir.join("data/rock.json"), r#"{"description": "Moody alternative rock ballad", "duration": 30}"#)
        .unwrap();
    let salsa = spintrak::demo::salsa_groove(sr, 2.0);
    spintrak::audio::write_wav(&dir.join("data/salsa.wav"), &[salsa], sr).unwrap();
    std::fs::write(dir.join("data/salsa.json"), r#"{"description": "Lively salsa groove", "duration": 30}"#).unwrap();
}

fn config(dir: &Path, name: &str, prompts: &[&str], seeds: &[u64], durations: &[f64]) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    let text = format!(
        "experiment:\n  name: {name}\n  models: [\"builtin:tiny\"]\n  gpu_id: null\ninput:\n  prompts: {}\n  seeds: {:?}\n  durations: {:?}\n",
        serde_json::to_string(prompts).unwrap(),
        seeds,
        durations
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn training(dir: &Path, seconds: &str) -> PathBuf {
    let out = dir.join(format!("train_{seconds}.bin"));
    ok(&run_in(
        dir,
        "spintrak",
        &[
            "generate-training-dataset-parallel",
            "--input",
            "data",
            "--duration",
            seconds,
            "--output",
            out.to_str().unwrap(),
            "--quiet",
            "--proj-dim",
            "512",
        ],
    ));
    out
}

fn runner(dir: &Path, cfg: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--config", cfg.to_str().unwrap(), "--quiet", "--proj-dim", "512"];
    args.extend_from_slice(extra);
    let out = ok(&run_in(dir, "experiment_runner", &args));
    dir.join(out.trim())
}

#[test]
fn experiment_3_end_to_end_with_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    two_songs(d);
    let train = training(d, "0.5");
    let cfg = config(d, "experiment_3", &["Moody alternative rock ballad", "Lively salsa groove"], &[42, 43], &[0.5]);
    let agg = runner(d, &cfg, &["--jobs", "2"]);
    let run_dir = agg.parent().unwrap().to_path_buf();
    assert!(run_dir.file_name().unwrap().to_string_lossy().starts_with("experiment_3_"));
    assert!(run_dir.join("config_experiment_3.yml").exists());
    for case in ["Moody_alternative_rock_0.5_42", "Lively_salsa_groove_0.5_43"] {
        assert!(run_dir.join(format!("{case}.wav")).exists() && run_dir.join(format!("{case}.bin")).exists(), "{case}");
    }
    let f = spintrak::store::EmbeddingFile::read(&agg).unwrap();
    let names: Vec<&str> = f.header.records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Moody_alternative_rock_0.5_42",
            "Moody_alternative_rock_0.5_43",
            "Lively_salsa_groove_0.5_42",
            "Lively_salsa_groove_0.5_43"
        ]
    );
    // Resume: delete a case, rerun into the same folder: identical aggregate.
    let before = std::fs::read(&agg).unwrap();
    std::fs::remove_file(run_dir.join("Lively_salsa_groove_0.5_42.bin")).unwrap();
    std::fs::remove_file(&agg).unwrap();
    let again = runner(d, &cfg, &["--resume-from", run_dir.to_str().unwrap()]);
    assert_eq!(again, agg);
    assert_eq!(std::fs::read(&agg).unwrap(), before);
    // The four cases generated together: the same tracks and the same aggregate.
    std::fs::create_dir_all(d.join("batched")).unwrap();
    let batched = runner(d, &cfg, &["--batch", "4", "--output-dir", "batched"]);
    assert_eq!(std::fs::read(&batched).unwrap(), before, "--batch changed the embeddings");
    for case in ["Moody_alternative_rock_0.5_42", "Lively_salsa_groove_0.5_43"] {
        let wav = format!("{case}.wav");
        let (a, b) = (run_dir.join(&wav), batched.parent().unwrap().join(&wav));
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "--batch changed {wav}");
    }
    // Resuming with other sampling settings is refused, naming the setting, instead of
    // mixing settings in the aggregate file.
    let mut args = vec!["--config", cfg.to_str().unwrap(), "--quiet", "--proj-dim", "512"];
    args.extend(["--resume-from", run_dir.to_str().unwrap(), "--top-k", "5"]);
    let e = err(&run_in(d, "experiment_runner", &args));
    assert!(e.contains("generated_with") && e.contains("run_experiment_3.json"), "{e}");
    assert_eq!(std::fs::read(&agg).unwrap(), before);
    // Results, through the seed's command name and its `.pt` aggregate name.
    let pt = agg.with_extension("pt");
    let out = ok(&run_in(
        d,
        "experiment_3_results",
        &[pt.to_str().unwrap(), train.to_str().unwrap(), "--label", "rock.wav=Rock"],
    ));
    assert!(out.contains("| Rock") && out.contains("salsa"), "{out}");
    for f in ["experiment_3_scores.csv", "experiment_3_scores.json", "experiment_3.svg", "experiment_3.png"] {
        assert!(run_dir.join(f).exists(), "{f}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("experiment_3_scores.json")).unwrap()).unwrap();
    assert_eq!(json["lambda"], 1.0);
    let cases = json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    // Percentages of a case sum (in absolute value) to 100.
    let total: f64 =
        cases[0]["scores"].as_array().unwrap().iter().map(|s| s["percentage"].as_f64().unwrap().abs()).sum();
    assert!((total - 100.0).abs() < 1e-9);
    let svg = std::fs::read_to_string(run_dir.join("experiment_3.svg")).unwrap();
    assert!(svg.contains("Rock") && svg.contains("seed 43") && svg.contains("Moody alternative rock ballad"));
    let csv = std::fs::read_to_string(run_dir.join("experiment_3_scores.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4 * 2);

    // `score` on the same files gives the same numbers as the results table.
    let out = ok(&run_in(
        d,
        "spintrak",
        &["score", agg.to_str().unwrap(), train.to_str().unwrap(), "--json", "--top-k", "2"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first = &v[0]["top"][0];
    let from_results = cases[0]["scores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["training"] == first["name"].as_str().unwrap().rsplit('/').next().unwrap())
        .unwrap();
    assert!((first["score"].as_f64().unwrap() - from_results["score"].as_f64().unwrap()).abs() < 1e-12);
    // `attribute` re-generates case 0 and finds the same scores.
    let out = ok(&run_in(
        d,
        "spintrak",
        &[
            "attribute",
            "--prompt",
            "Moody alternative rock ballad",
            "--duration",
            "0.5",
            "--seed",
            "42",
            "--training",
            train.to_str().unwrap(),
            "--json",
            "--quiet",
        ],
    ));
    let a: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a[0]["top"][0]["name"], first["name"]);
    assert!((a[0]["top"][0]["score"].as_f64().unwrap() - first["score"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn experiment_1_pairs_durations_and_experiment_4_orders_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    two_songs(d);
    let t1 = training(d, "0.4");
    let t2 = training(d, "0.6");
    let cfg = config(d, "experiment_1", &["Moody alternative rock ballad"], &[42, 43], &[0.4, 0.6]);
    let agg = runner(d, &cfg, &[]);
    let out =
        ok(&run_in(d, "experiment_1_results", &[agg.to_str().unwrap(), t2.to_str().unwrap(), t1.to_str().unwrap()]));
    assert!(out.contains("Mean of the test embeddings") && out.contains("0.4 s") && out.contains("seed 43"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(agg.parent().unwrap().join("experiment_1_scores.json")).unwrap())
            .unwrap();
    assert_eq!(json["lambda"], 10.0);
    // A duration without training embeddings is named, with the command that makes them.
    let e = err(&run_in(d, "experiment_1_results", &[agg.to_str().unwrap(), t1.to_str().unwrap()]));
    assert!(e.contains("0.6 s") && e.contains("--duration 0.6"), "{e}");

    let cfg4 = config(
        d,
        "experiment_4",
        &["Slow, melancholic salsa groove", "Dysrhytmic techno", "Fast, happy indie rock riff"],
        &[1],
        &[0.4],
    );
    let agg4 = runner(d, &cfg4, &[]);
    ok(&run_in(d, "experiment_4_results", &[agg4.to_str().unwrap(), t1.to_str().unwrap()]));
    let svg = std::fs::read_to_string(agg4.parent().unwrap().join("experiment_4.svg")).unwrap();
    let pos = |s: &str| svg.find(s).unwrap_or_else(|| panic!("{s} missing"));
    // Rows top to bottom in config order: y of the labels increases.
    assert!(pos("Slow, melancholic") < pos("Dysrhytmic") && pos("Dysrhytmic") < pos("Fast, happy"));
}

#[test]
fn bad_experiment_inputs_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    two_songs(d);
    let bad = d.join("bad.yaml");
    std::fs::write(&bad, "experiment:\n  name: x\n  models: [m]\ninput:\n  prompts: [a\n  seeds: [1]\n").unwrap();
    let e = err(&run_in(d, "experiment_runner", &["--config", bad.to_str().unwrap()]));
    assert!(e.contains("bad.yaml") && e.contains("line"), "{e}");
    std::fs::write(
        &bad,
        "experiment: {name: x, models: [m], colour: red}\ninput: {prompts: [a], seeds: [1], durations: [1]}\n",
    )
    .unwrap();
    let e = err(&run_in(d, "experiment_runner", &["--config", bad.to_str().unwrap()]));
    assert!(e.contains("colour"), "{e}");
    std::fs::write(&bad, "experiment: {name: x, models: [m]}\ninput: {prompts: [a], seeds: [], durations: [1]}\n")
        .unwrap();
    let e = err(&run_in(d, "experiment_runner", &["--config", bad.to_str().unwrap()]));
    assert!(e.contains("grid is empty"), "{e}");
    assert_eq!(
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("x_"))
            .count(),
        0
    );

    let t = training(d, "0.4");
    let cfg = config(d, "experiment_3", &["rock"], &[1], &[0.4]);
    let agg = runner(d, &cfg, &[]);
    // Not an embedding file; a truncated one; different projections.
    let junk = d.join("junk.bin");
    std::fs::write(&junk, b"hello").unwrap();
    let e = err(&run_in(d, "experiment_3_results", &[agg.to_str().unwrap(), junk.to_str().unwrap()]));
    assert!(e.contains("junk.bin") && e.contains("not an embedding file"), "{e}");
    let bytes = std::fs::read(&t).unwrap();
    let trunc = d.join("trunc.bin");
    std::fs::write(&trunc, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(&run_in(d, "experiment_3_results", &[agg.to_str().unwrap(), trunc.to_str().unwrap()]));
    assert!(e.contains("trunc.bin") && e.contains("truncated"), "{e}");
    let other = d.join("other.bin");
    ok(&run_in(
        d,
        "spintrak",
        &[
            "generate-training-dataset-parallel",
            "--input",
            "data",
            "--duration",
            "0.4",
            "--output",
            other.to_str().unwrap(),
            "--quiet",
            "--proj-dim",
            "1024",
        ],
    ));
    let e = err(&run_in(d, "experiment_3_results", &[agg.to_str().unwrap(), other.to_str().unwrap()]));
    assert!(e.contains("projector k"), "{e}");
    let e = err(&run_in(d, "spintrak", &["score", agg.to_str().unwrap(), d.join("missing.bin").to_str().unwrap()]));
    assert!(e.contains("missing.bin"), "{e}");
}
