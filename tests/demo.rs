//! The demo's result is the check: with the fine-tuned tiny model, every rock-prompt
//! generation scores higher on the rock song than on the salsa song, and every
//! salsa-prompt generation the other way round.

use std::process::Command;

#[test]
fn attribution_separates_the_two_songs_for_every_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_spintrak"))
        .args(["demo", dir.to_str().unwrap(), "--steps", "200", "--duration", "4", "--song-seconds", "8", "--quiet"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let runs = dir.join("runs");
    let run = std::fs::read_dir(&runs).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("experiment_3_scores.json")).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10, "two prompts × five seeds");
    for case in cases {
        let score = |song: &str| {
            case["scores"].as_array().unwrap().iter().find(|s| s["training"] == song).unwrap()["score"]
                .as_f64()
                .unwrap()
        };
        let (rock, salsa) = (score("rock_ballad.wav"), score("salsa_groove.wav"));
        let prompt = case["prompt"].as_str().unwrap();
        if prompt.starts_with("Moody alternative rock") {
            assert!(rock > salsa, "{}: rock {rock} should exceed salsa {salsa}", case["case"]);
        } else {
            assert!(prompt.starts_with("Lively salsa"));
            assert!(salsa > rock, "{}: salsa {salsa} should exceed rock {rock}", case["case"]);
        }
    }
    // Everything was written under the demo folder, figure included.
    assert!(dir.join("model/model.safetensors").exists());
    assert!(dir.join("training_gradients_4.bin").exists());
    assert!(run.join("experiment_3.png").exists() && run.join("experiment_3.svg").exists());
}
