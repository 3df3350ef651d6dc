//! `spintrak bench --section scoring`: scoring a catalogue through the files a user has:
//! a training file of n rows written to disk, `spintrak index` on it, then queries read
//! through `Ensemble::load` (the path `score`, `attribute` and `experiment-N-results`
//! take), next to the same scores computed in memory without the index.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;

use crate::attribution::projector::{ProjectorKind, ProjectorSpec};
use crate::attribution::score::scores;
use crate::experiments::results::Ensemble;
use crate::memory::{peak_rss, reset_peak_rss};
use crate::store::embedding_file::{write_rows, FORMAT_VERSION};
use crate::store::{EmbeddingFile, Header, Record};

/// Row `i` of a reproducible random matrix (uniform in [-1, 1)).
fn random_row(seed: u64, i: usize, k: usize) -> Vec<f32> {
    let mut s = crate::rng::Stream::new(crate::rng::hash(seed, &[i as u64]));
    (0..k).map(|_| (s.uniform() * 2.0 - 1.0) as f32).collect()
}

fn header(rows: usize, k: usize, what: &str) -> Result<Header> {
    Ok(Header {
        format_version: FORMAT_VERSION,
        model: crate::store::embedding_file::ModelInfo {
            fingerprint: "bench".into(),
            source: "bench".into(),
            decoder_parameters: 0,
            lm_parameters: k,
        },
        objective: crate::store::embedding_file::ObjectiveInfo {
            name: "audio-nll".into(),
            settings: serde_json::json!({}),
        },
        generated_with: None,
        projector: ProjectorSpec::new(ProjectorKind::Identity, 0, None, k, k)?,
        shard: None,
        records: (0..rows)
            .map(|i| Record {
                name: format!("{what}_{i:06}"),
                prompt: format!("a {what} song, number {i}"),
                duration: 30.0,
                seed: i as u64,
                source: Some(format!("songs/{what}_{i:06}.wav")),
                offset: Some(0.0),
            })
            .collect(),
    })
}

fn query_file(dir: &Path, m: usize, k: usize) -> Result<PathBuf> {
    let path = dir.join(format!("query_{m}.bin"));
    let data = (0..m).flat_map(|i| random_row(1, i, k)).collect();
    EmbeddingFile { header: header(m, k, "query")?, data }.write(&path)?;
    Ok(path)
}

/// Minimum and median of a few timings.
fn min_median(mut t: Vec<f64>) -> serde_json::Value {
    t.sort_by(f64::total_cmp);
    serde_json::json!({"min": t[0], "median": t[t.len() / 2], "runs": t})
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn bench_scoring(n: usize) -> Result<serde_json::Value> {
    let (k, lambda, reps) = (8192usize, 1.0, 3);
    let scratch = Scratch(std::env::temp_dir().join(format!("spintrak-bench-scoring-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)?;
    let dir = scratch.0.as_path();
    let mut out = serde_json::Map::new();
    out.insert("n".into(), n.into());
    out.insert("k".into(), k.into());

    // 1. The training file, written row by row as a sharded run's merge would.
    let training = dir.join("training.bin");
    let start = Instant::now();
    write_rows(&training, &header(n, k, "training")?, |i| random_row(2, i, k))?;
    out.insert("write_seconds".into(), start.elapsed().as_secs_f64().into());
    out.insert("file_bytes".into(), std::fs::metadata(&training)?.len().into());

    // 2. The index (its cost is also what one query costs without it).
    reset_peak_rss();
    let start = Instant::now();
    let (_, ih, bytes) = crate::store::index::build(&training, lambda, &|_| {})?;
    out.insert(
        "index".into(),
        serde_json::json!({"seconds": start.elapsed().as_secs_f64(), "bytes": bytes, "method": ih.method, "peak_rss_bytes": peak_rss()}),
    );

    // 3. Queries through the files and the index, as `spintrak score` reads them.
    for m in [1usize, 100] {
        let q = query_file(dir, m, k)?;
        let mut times = Vec::new();
        reset_peak_rss();
        for _ in 0..reps {
            let start = Instant::now();
            let ensemble = Ensemble::load(std::slice::from_ref(&q), std::slice::from_ref(&training))?;
            let rows: Vec<usize> = (0..m).collect();
            std::hint::black_box(ensemble.scores(&rows, lambda)?);
            times.push(start.elapsed().as_secs_f64());
        }
        let mut r = min_median(times);
        r["peak_rss_bytes"] = peak_rss().into();
        out.insert(format!("query_m{m}"), r);
    }

    // 4. The indexed file path gives the in-memory scores (both forms of the system).
    let mut worst = 0f64;
    for (rows, kc) in [(3000usize, 512usize), (300, 512)] {
        let t = dir.join(format!("check_{rows}.bin"));
        write_rows(&t, &header(rows, kc, "check")?, |i| random_row(3, i, kc))?;
        crate::store::index::build(&t, lambda, &|_| {})?;
        let q = query_file(dir, 4, kc)?;
        let ensemble = Ensemble::load(std::slice::from_ref(&q), std::slice::from_ref(&t))?;
        let got = ensemble.scores(&[0, 1, 2, 3], lambda)?;
        let phi: Vec<f32> = (0..rows).flat_map(|i| random_row(3, i, kc)).collect();
        let g = EmbeddingFile::read(&q)?.data;
        let (want, _) = scores(&g, 4, &phi, rows, kc, lambda)?;
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        worst = got.iter().zip(&want).fold(worst, |a, (x, y)| a.max((x - y).abs() / scale));
    }
    out.insert("indexed_vs_in_memory_max_relative_difference".into(), worst.into());
    Ok(serde_json::Value::Object(out))
}

pub fn print_scoring(sc: &serde_json::Value) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "\nscoring through files: n = {} training rows, k = {} ({:.2} GB file, written in {:.1} s)",
        sc["n"],
        sc["k"],
        f(&sc["file_bytes"]) / 1e9,
        f(&sc["write_seconds"])
    );
    let ix = &sc["index"];
    println!(
        "  spintrak index: {:.1} s, {:.0} MB ({}), peak RSS {:.2} GB  (= the cost of one query without an index)",
        f(&ix["seconds"]),
        f(&ix["bytes"]) / 1e6,
        ix["method"].as_str().unwrap_or(""),
        f(&ix["peak_rss_bytes"]) / 1e9
    );
    for m in [1, 100] {
        let r = &sc[format!("query_m{m}")];
        println!(
            "  query, m = {m:>3}: min {:.2} s, median {:.2} s (read both files + score), peak RSS {:.2} GB",
            f(&r["min"]),
            f(&r["median"]),
            f(&r["peak_rss_bytes"]) / 1e9
        );
    }
    println!(
        "  indexed file path vs in-memory scores: max relative difference {:.1e}",
        f(&sc["indexed_vs_in_memory_max_relative_difference"])
    );
}
