//! `spintrak index`: scores through the index equal scores without it, the index is
//! really what answers (a tampered factor changes the scores), and an index that does
//! not fit (another λ, changed rows, another header) is never used.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use spintrak::attribution::projector::{ProjectorKind, ProjectorSpec};
use spintrak::store::embedding_file::{ModelInfo, ObjectiveInfo, FORMAT_VERSION};
use spintrak::store::{EmbeddingFile, Header, Record};

fn spintrak(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spintrak")).args(args).output().unwrap()
}

fn file(rows: usize, k: usize, seed: u64, prefix: &str) -> EmbeddingFile {
    file_of(rows, k, seed, prefix, 2.0)
}

fn file_of(rows: usize, k: usize, seed: u64, prefix: &str, duration: f64) -> EmbeddingFile {
    let records = (0..rows)
        .map(|i| Record {
            name: format!("{prefix}{i}"),
            prompt: format!("song {i}"),
            duration,
            seed: i as u64,
            source: None,
            offset: Some(0.0),
        })
        .collect();
    let header = Header {
        format_version: FORMAT_VERSION,
        model: ModelInfo { fingerprint: "m".into(), source: "m".into(), decoder_parameters: 0, lm_parameters: 64 },
        objective: ObjectiveInfo { name: "audio-nll".into(), settings: serde_json::json!({}) },
        generated_with: None,
        projector: ProjectorSpec::new(ProjectorKind::Sparse, 3, Some(k), 64, 2).unwrap(),
        shard: None,
        records,
    };
    let data = (0..rows * k).map(|i| spintrak::rng::normal(seed, i as u64, 0) as f32).collect();
    EmbeddingFile { header, data }
}

/// `score --json`: (query, training) -> score.
fn scores(q: &Path, t: &Path, lambda: &str) -> (HashMap<(String, String), f64>, String) {
    let out =
        spintrak(&["score", q.to_str().unwrap(), t.to_str().unwrap(), "--json", "--top-k", "1000", "--lambda", lambda]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut map = HashMap::new();
    for q in v.as_array().unwrap() {
        for t in q["top"].as_array().unwrap() {
            map.insert(
                (q["query"]["name"].as_str().unwrap().to_string(), t["name"].as_str().unwrap().to_string()),
                t["score"].as_f64().unwrap(),
            );
        }
    }
    (map, stderr)
}

fn max_rel(a: &HashMap<(String, String), f64>, b: &HashMap<(String, String), f64>, factor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.values().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().map(|(key, x)| (x - factor * b[key]).abs() / scale).fold(0.0, f64::max)
}

/// The index file with its factor multiplied by `by` (header kept): what a wrong factor
/// would give.
fn tamper(index: &Path, by: f64) {
    let bytes = std::fs::read(index).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let t = st.tensor("cholesky").unwrap();
    let scaled: Vec<u8> =
        t.data().chunks_exact(8).flat_map(|c| (f64::from_le_bytes(c.try_into().unwrap()) * by).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, t.shape().to_vec(), &scaled).unwrap();
    let out = safetensors::serialize([("cholesky", view)], meta.metadata().clone()).unwrap();
    std::fs::write(index, out).unwrap();
}

#[test]
fn scores_through_the_index_equal_scores_without_it_and_come_from_it() {
    let dir = tempfile::tempdir().unwrap();
    // Both systems: more rows than k (ΦᵀΦ + λI), and fewer (ΦΦᵀ + λI).
    for (rows, k) in [(40, 12), (7, 12)] {
        let t = dir.path().join(format!("train_{rows}.bin"));
        let q = dir.path().join(format!("query_{rows}.bin"));
        let index = dir.path().join(format!("train_{rows}.bin.index"));
        file(rows, k, 1, "song").write(&t).unwrap();
        file(3, k, 2, "query").write(&q).unwrap();
        let (plain, _) = scores(&q, &t, "1");

        let out = spintrak(&["index", t.to_str().unwrap(), "--quiet"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(index.is_file());
        let (indexed, stderr) = scores(&q, &t, "1");
        assert!(max_rel(&indexed, &plain, 1.0) < 1e-10, "indexed scores differ: {}", max_rel(&indexed, &plain, 1.0));
        assert!(!stderr.contains("index"), "{stderr}");

        // The factor is what answers: L scaled by 2 makes (LLᵀ)⁻¹ four times smaller.
        tamper(&index, 2.0);
        let (tampered, _) = scores(&q, &t, "1");
        assert!(max_rel(&tampered, &plain, 0.25) < 1e-10, "the index was not used");

        // Another λ: the index is left aside, and the user is told.
        let (other_lambda, stderr) = scores(&q, &t, "3");
        assert!(stderr.contains("made for λ = 1"), "{stderr}");
        std::fs::remove_file(&index).unwrap();
        let (fresh, _) = scores(&q, &t, "3");
        assert!(max_rel(&other_lambda, &fresh, 1.0) < 1e-12);

        // Rows changed under the same header: the checksum catches it.
        assert!(spintrak(&["index", t.to_str().unwrap(), "--quiet"]).status.success());
        file(rows, k, 9, "song").write(&t).unwrap();
        let (changed, stderr) = scores(&q, &t, "1");
        assert!(stderr.contains("other numbers"), "{stderr}");
        std::fs::remove_file(&index).unwrap();
        let (changed_fresh, _) = scores(&q, &t, "1");
        assert!(max_rel(&changed, &changed_fresh, 1.0) < 1e-12);

        // Another header (a song renamed): the index is stale.
        assert!(spintrak(&["index", t.to_str().unwrap(), "--quiet"]).status.success());
        file(rows, k, 9, "track").write(&t).unwrap();
        let (_, stderr) = scores(&q, &t, "1");
        assert!(stderr.contains("another version"), "{stderr}");
    }
}

#[test]
fn index_never_replaces_a_file_that_is_not_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("train.bin");
    file(20, 8, 1, "song").write(&t).unwrap();
    let index = dir.path().join("train.bin.index");
    std::fs::write(&index, b"my notes").unwrap();
    let out = spintrak(&["index", t.to_str().unwrap(), "--quiet"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a spintrak index") && stderr.contains("left alone"), "{stderr}");
    assert_eq!(std::fs::read(&index).unwrap(), b"my notes");
    // Not an embedding file: named, nothing written.
    let bogus = dir.path().join("notes.bin");
    std::fs::write(&bogus, b"hello").unwrap();
    let out = spintrak(&["index", bogus.to_str().unwrap(), "--quiet"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("notes.bin"));
    assert!(!dir.path().join("notes.bin.index").exists());
}

#[test]
fn experiment_1_uses_the_index_of_each_durations_file() {
    use spintrak::experiments::results::Ensemble;
    let dir = tempfile::tempdir().unwrap();
    let (t2, t5, q) = (dir.path().join("t2.bin"), dir.path().join("t5.bin"), dir.path().join("q.bin"));
    file_of(30, 8, 1, "a", 2.0).write(&t2).unwrap();
    file_of(25, 8, 2, "b", 5.0).write(&t5).unwrap();
    file(2, 8, 3, "q").write(&q).unwrap();
    let scores = |d: f64| {
        let e = Ensemble::load(std::slice::from_ref(&q), &[t2.clone(), t5.clone()]).unwrap();
        e.with_duration(d).scores(&[0, 1], 10.0).unwrap()
    };
    let (plain2, plain5) = (scores(2.0), scores(5.0));
    assert_eq!(plain2.len(), 2 * 30);
    for t in [&t2, &t5] {
        let out = spintrak(&["index", t.to_str().unwrap(), "--lambda", "10", "--quiet"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let rel = |a: &[f64], b: &[f64], f: f64| {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        a.iter().zip(b).map(|(x, y)| (x - f * y).abs() / scale).fold(0.0, f64::max)
    };
    assert!(rel(&scores(2.0), &plain2, 1.0) < 1e-10);
    // The 5 s file's factor scaled: only the 5 s scores change, by the factor's square.
    tamper(&dir.path().join("t5.bin.index"), 2.0);
    assert!(rel(&scores(5.0), &plain5, 0.25) < 1e-10, "the 5 s file's index was not used");
    assert!(rel(&scores(2.0), &plain2, 1.0) < 1e-10);
}
