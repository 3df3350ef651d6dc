//! Provenance of copies: six clearly different songs share one description; an excerpt
//! of any of them, starting off the codec's frame grid (and one with faint noise added),
//! is attributed to its source first by `attribute --input-audio`. The earlier tool's
//! `generation` objective never reads the audio and gives the six songs one embedding.

use std::path::Path;
use std::process::Command;

use spintrak::demo::{song, Style, Variant};

const DESCRIPTION: &str = "instrumental track";

fn spintrak(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spintrak")).args(args).env_remove("RUST_BACKTRACE").output().unwrap()
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn excerpts_are_attributed_to_their_source_song() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dataset");
    std::fs::create_dir_all(&data).unwrap();
    let sr = 8000;
    let styles = [Style::Ballad, Style::Salsa, Style::Techno, Style::Ambient, Style::Ballad, Style::Techno];
    let mut songs = Vec::new();
    for (i, &style) in styles.iter().enumerate() {
        let audio = song(style, &Variant::nth(20 + i as u64), sr, 6.0);
        let name = format!("song_{i}");
        spintrak::audio::write_wav(&data.join(format!("{name}.wav")), std::slice::from_ref(&audio), sr).unwrap();
        std::fs::write(
            data.join(format!("{name}.json")),
            format!(r#"{{"description": "{DESCRIPTION}", "duration": 6}}"#),
        )
        .unwrap();
        songs.push((name, audio));
    }
    let training = tmp.path().join("training.bin");
    let t = training.to_str().unwrap();
    ok(&spintrak(&["generate-training-dataset-parallel", "--input", data.to_str().unwrap(), "--output", t, "--quiet"]));
    let f = spintrak::store::EmbeddingFile::read(&training).unwrap();
    assert_eq!(f.header.objective.name, "audio-nll");
    assert_eq!(f.rows(), 6);
    // Queries: 3 s excerpts 0.3 s in (off the 20 ms frame grid), and 0.5 s in with noise.
    for (i, (name, audio)) in songs.iter().enumerate() {
        for (offset, noise) in [(0.3f32, 0.0f32), (0.5, 0.01)] {
            let start = (offset * sr as f32) as usize;
            let clip: Vec<f32> = audio[start..start + 3 * sr as usize]
                .iter()
                .enumerate()
                .map(|(j, x)| x + noise * (spintrak::rng::uniform(i as u64, &[j as u64]) as f32 * 2.0 - 1.0))
                .collect();
            let q = tmp.path().join(format!("query_{i}_{offset}.wav"));
            spintrak::audio::write_wav(&q, &[clip], sr).unwrap();
            let o = spintrak(&[
                "attribute",
                "--input-audio",
                q.to_str().unwrap(),
                "--prompt",
                DESCRIPTION,
                "--training",
                t,
                "--json",
                "--quiet",
            ]);
            ok(&o);
            let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let top = &out[0]["top"][0];
            assert_eq!(top["name"].as_str().unwrap(), format!("{name}.wav"), "query {i} at {offset} s: {out}");
            assert!(top["score"].as_f64().unwrap() > 0.0, "{out}");
        }
    }
    // The generation objective gives the six songs identical rows: it never reads them.
    let gen = tmp.path().join("generation.bin");
    ok(&spintrak(&[
        "generate-training-dataset-parallel",
        "--input",
        data.to_str().unwrap(),
        "--output",
        gen.to_str().unwrap(),
        "--objective",
        "generation",
        "--quiet",
    ]));
    let g = spintrak::store::EmbeddingFile::read(&gen).unwrap();
    assert!((1..6).all(|i| g.row(i) == g.row(0)), "generation rows should be identical");
    assert!((1..6).all(|i| f.row(i) != f.row(0)), "audio-nll rows should differ");
    // Mixing objectives is refused.
    let o = spintrak(&["score", t, gen.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("objective"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn loss_prints_the_objective_and_names_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = tmp.path().join("a.wav");
    // 44.1 kHz stereo: resampled to the tiny model's 8 kHz and mixed to mono.
    let left = song(Style::Salsa, &Variant::nth(3), 44_100, 2.0);
    let right = song(Style::Techno, &Variant::nth(4), 44_100, 2.0);
    spintrak::audio::write_wav(&wav, &[left, right], 44_100).unwrap();
    let w = wav.to_str().unwrap();
    let o = spintrak(&["loss", "--input-audio", w, "--prompt", "salsa", "--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let per: Vec<f64> = v["nll_per_codebook"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(per.len(), 4);
    assert_eq!(v["frames"].as_u64().unwrap(), 100, "2 s at 50 frames/s");
    let mean = per.iter().sum::<f64>() / 4.0;
    assert!((v["nll"].as_f64().unwrap() - mean).abs() < 1e-9);
    // A random model is near log(card) = log 64 per code, not 0 and not wildly off.
    assert!(mean > 1.0 && mean < 10.0, "{mean}");
    // One second from 0.5 s: 50 frames, and a different value.
    let o =
        spintrak(&["loss", "--input-audio", w, "--prompt", "salsa", "--offset", "0.5", "--duration", "1", "--json"]);
    ok(&o);
    let v2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v2["frames"].as_u64().unwrap(), 50);
    assert_ne!(v2["nll"], v["nll"]);
    // Offset beyond the end: an error naming the file.
    let o = spintrak(&["loss", "--input-audio", w, "--prompt", "salsa", "--offset", "5"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("a.wav") && err.contains("beyond the end"), "{err}");
    // A text file named .wav.
    let bad = tmp.path().join("b.wav");
    std::fs::write(&bad, b"this is not audio at all, just some text").unwrap();
    let o = spintrak(&["loss", "--input-audio", bad.to_str().unwrap(), "--prompt", "salsa"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("b.wav"));
    assert!(Path::new(w).exists());
}
