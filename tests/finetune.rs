//! `spintrak finetune`: audio in any rate and channel count, the loss goes down, the
//! written model loads and only its LM changed; bad input is named.

use std::process::{Command, Output};

use candle_core::Device;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spintrak")).args(args).env_remove("RUST_BACKTRACE").output().unwrap()
}

#[test]
fn finetuning_lowers_the_loss_and_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // 16 kHz stereo: resampled to 8 kHz and mixed down to the tiny model's mono.
    let song = spintrak::demo::salsa_groove(16000, 3.0);
    spintrak::audio::write_wav(&data.join("salsa.wav"), &[song.clone(), song], 16000).unwrap();
    std::fs::write(data.join("salsa.json"), r#"{"description": "Lively salsa groove", "duration": 3}"#).unwrap();
    let out = tmp.path().join("model");
    let o = run(&["finetune", "--input", data.to_str().unwrap(), "--output", out.to_str().unwrap(), "--steps", "40"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let line = err.lines().find(|l| l.contains("loss")).unwrap();
    let nums: Vec<f64> = line
        .split("loss ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .split(" -> ")
        .map(|x| x.trim().parse().unwrap())
        .collect();
    assert!(nums[1] < 0.7 * nums[0], "loss {} -> {}", nums[0], nums[1]);
    let tuned = spintrak::musicgen::load(&out, &Default::default(), &Device::Cpu).unwrap();
    let base = spintrak::musicgen::tiny::build(1234, &Device::Cpu).unwrap();
    let changed = |a: &spintrak::musicgen::params::ParamStore, b: &spintrak::musicgen::params::ParamStore| {
        let (a, b) = (a.all().unwrap(), b.all().unwrap());
        assert_eq!(a.len(), b.len());
        a.iter()
            .filter(|(k, v)| {
                (v.to_owned() - &b[*k]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
            })
            .count()
    };
    assert_eq!(changed(&tuned.codec_params, &base.codec_params), 0, "the codec is not trained");
    assert_eq!(changed(&tuned.t5_params, &base.t5_params), 0, "T5 is frozen");
    assert!(changed(&tuned.lm_params, &base.lm_params) > 10, "the LM is trained");
}

#[test]
fn bad_training_audio_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("broken.wav"), b"RIFF....not a wave file at all").unwrap();
    std::fs::write(data.join("broken.json"), r#"{"description": "x", "duration": 1}"#).unwrap();
    let out = tmp.path().join("m");
    let o = run(&["finetune", "--input", data.to_str().unwrap(), "--output", out.to_str().unwrap(), "--steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("broken.wav") && !err.contains("panicked"), "{err}");
    assert!(!out.exists());
    let o = run(&["finetune", "--input", data.to_str().unwrap(), "--output", out.to_str().unwrap(), "--steps", "0"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--steps"));
}
