//! The demo's checks. Its training descriptions are worded unlike the experiment's
//! prompts, so shared text cannot make an attribution; what it shows is the
//! counterfactual check (`validate --quick`): scores of the fine-tuned model predict
//! what training on half-subsets of a catalogue does to generated tracks, better than
//! the same scores with rows shuffled, the earlier tool's `generation` objective, or an
//! untrained model's scores.

use std::process::Command;

#[test]
fn demo_runs_the_flow_and_its_scores_predict_training() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_spintrak"))
        .args(["demo", dir.to_str().unwrap(), "--steps", "200", "--duration", "4", "--song-seconds", "8", "--quiet"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The training descriptions are not the experiment's prompts.
    let desc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dataset/rock_ballad.json")).unwrap()).unwrap();
    assert!(!desc["description"].as_str().unwrap().starts_with("Moody alternative rock"));
    let runs = dir.join("runs");
    let run = std::fs::read_dir(&runs).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("experiment_3_scores.json")).unwrap()).unwrap();
    assert_eq!(json["cases"].as_array().unwrap().len(), 10, "two prompts × five seeds");
    let training = spintrak::store::EmbeddingFile::read(&dir.join("training_gradients_4.bin")).unwrap();
    assert_eq!(training.header.objective.name, "audio-nll");
    assert_eq!(training.header.model.decoder_parameters, 0, "audio-nll's gradient is the LM's alone");
    assert!(run.join("experiment_3.png").exists() && run.join("experiment_3.svg").exists());
    // The counterfactual check.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("validate/validate.json")).unwrap()).unwrap();
    let lds = |objective: &str, shuffled: bool| -> f64 {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["objective"] == objective
                    && r["models"] == 1
                    && r["shuffled"] == shuffled
                    && r["projector"] == "sparse"
            })
            .unwrap()["lds"]
            .as_f64()
            .unwrap()
    };
    let (ours, control, generation) = (lds("audio-nll", false), lds("audio-nll", true), lds("generation", false));
    let untrained = report["untrained_lds"].as_f64().unwrap();
    assert!(control.abs() < 0.15, "shuffled control should be ≈ 0, got {control}");
    assert!(ours > control + 0.2, "audio-nll LDS {ours} vs shuffled {control}");
    assert!(ours > generation + 0.2, "audio-nll LDS {ours} vs generation {generation}");
    assert!(ours > untrained, "fine-tuned LDS {ours} vs untrained {untrained}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("untrained model's"), "{stdout}");
}
