//! `spintrak bench`: speed next to the bound the hardware sets, measured in one run.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::Args;

use crate::attribution::{embed, gradient_dim, Example, GenerationObjective, ProjectorKind, ProjectorSpec};
use crate::musicgen::sampling::Sampler;
use crate::musicgen::{tiny, GenerateOptions, MusicGen};

/// Measure speed and memory next to hardware bounds measured in the same run:
/// generation (frames/s vs the weight-read bound), gradient embeddings (generate /
/// backward / project split, peak memory) and projection throughput (GB/s vs memcpy).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spintrak bench                               # everything, tiny and musicgen-small-shaped models\n  spintrak bench --section generation --only tiny --json\n  spintrak bench --section gradients --only small --grad-seconds 10\n  spintrak bench --peer                        # next to PyTorch; writes bench/RESULTS.md\n  spintrak bench --peer --python /path/to/venv/bin/python --peer-models tiny --peer-seconds 2"
)]
pub struct Bench {
    /// What to measure: generation, gradients, projection, or all.
    #[arg(long, default_value = "all")]
    pub section: String,
    /// Training rows of the scoring benchmark (k = 8192; written to a temporary file
    /// of n × 32 KB, indexed, then queried with m = 1 and 100).
    #[arg(long, default_value_t = 100_000)]
    pub score_rows: usize,
    /// Seconds of audio per gradient example.
    #[arg(long, default_value_t = 2.0)]
    pub grad_seconds: f64,
    /// Run only this model: `tiny`, `small` (musicgen-small's shape, random weights) or
    /// `stereo-large` (musicgen-stereo-large's published shape, 3.5 B random weights written
    /// to disk; each measurement in a fresh process: load, generation, both embeddings).
    #[arg(long)]
    pub only: Option<String>,
    /// Where `--only stereo-large` writes its model (about 14 GB; reused when it already
    /// holds it). Default: a temporary directory, removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<std::path::PathBuf>,
    /// The measurements of `--only stereo-large`, comma-separated: load, generate,
    /// audio-nll, generation (the last two are embeddings of --grad-seconds of audio).
    #[arg(long, value_delimiter = ',', default_value = "load,generate,audio-nll,generation")]
    pub runs: Vec<String>,
    /// One measurement in this process (used by `--only stereo-large`): load, generate,
    /// audio-nll or generation.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
    /// Seconds of audio to generate per model.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Side by side with PyTorch/transformers (bench/peer.py) on the same weights:
    /// generation, both gradients, projection and scoring, each checked to be the same
    /// computation; writes --results.
    #[arg(long)]
    pub peer: bool,
    /// The Python of the peer (default: bench/.venv, set up with pip when missing).
    #[arg(long, value_name = "PATH")]
    pub python: Option<std::path::PathBuf>,
    /// The peer script.
    #[arg(long, default_value = "bench/peer.py", value_name = "PATH")]
    pub peer_script: std::path::PathBuf,
    /// Runs of each side per figure (alternated).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Where --peer writes its table.
    #[arg(long, default_value = "bench/RESULTS.md", value_name = "PATH")]
    pub results: std::path::PathBuf,
    /// Models of --peer: tiny, small.
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    pub peer_models: Vec<String>,
    /// Seconds of audio of --peer's generation and gradients.
    #[arg(long, value_delimiter = ',', default_value = "2,10")]
    pub peer_seconds: Vec<f64>,
    /// Training rows of --peer's scoring figure (k = 8192, m = 100; 0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub peer_score_rows: usize,
}

/// Memory bandwidth from copying a buffer much larger than the caches (bytes copied per
/// second): the best of several passes, each split across the pool's threads, as the work
/// it is the bound of (generation, projection) runs on all of them. One single-threaded
/// sample understates what the machine can do, and varied by 1.7× between runs.
pub fn memcpy_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 512 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let piece = n.div_ceil(rayon::current_num_threads().max(1));
    let copy = |dst: &mut [u8]| {
        dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy(&mut dst); // fault the pages in
    let mut best = f64::INFINITY;
    for i in 0..6 {
        let start = Instant::now();
        copy(&mut dst);
        std::hint::black_box(&dst[i]);
        best = best.min(start.elapsed().as_secs_f64());
    }
    n as f64 / best
}

fn bench_generation(model: &MusicGen, seconds: f64, bandwidth: f64) -> Result<serde_json::Value> {
    let opts = GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 250, top_p: 0.0, seed: 1 },
        guidance_scale: 3.0,
        extend_stride: model.default_extend_stride(),
    };
    // Warm-up (allocations, caches).
    model.generate("warm up", 0.1_f64.max(2.0 / model.cfg.frame_rate()), &opts, None)?;
    let start = Instant::now();
    let gen = model.generate("lively salsa groove with bright horns", seconds, &opts, None)?;
    let secs = start.elapsed().as_secs_f64();
    let steps = gen.num_frames() + model.cfg.lm.max_delay();
    let weight_bytes = (model.lm_params.num_scalars() * 4) as f64;
    // Each step reads every LM weight once (the guided pair shares the read).
    let bound_steps = bandwidth / weight_bytes;
    let start = Instant::now();
    model.decode(&gen.frames)?;
    let decode_secs = start.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "lm_parameters": model.lm_params.num_scalars(),
        "frames": gen.num_frames(),
        "frames_per_second": gen.num_frames() as f64 / secs,
        "steps_per_second": steps as f64 / secs,
        "weight_read_bound_steps_per_second": bound_steps,
        "fraction_of_bound": (steps as f64 / secs) / bound_steps,
        "decode_seconds": decode_secs,
        "audio_seconds": gen.num_frames() as f64 / model.cfg.frame_rate(),
    }))
}

/// Tracks of `seconds` per second of wall time when generated `n` at a time
/// (`generate_batch`): one forward pass per step for the whole batch.
fn bench_batched_generation(model: &MusicGen, seconds: f64) -> Result<serde_json::Value> {
    let prompts = [
        "lively salsa groove with bright horns",
        "moody alternative rock ballad",
        "calm piano melody",
        "fast techno beat with a rolling bassline",
        "folk guitar and fiddle",
        "ambient drones over a slow pulse",
        "jazz trio with brushes",
        "orchestral film score with brass",
    ];
    let mut out = serde_json::Map::new();
    for n in [1usize, 4, 8] {
        let opts: Vec<GenerateOptions> = (0..n)
            .map(|i| GenerateOptions {
                sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 250, top_p: 0.0, seed: i as u64 },
                guidance_scale: 3.0,
                extend_stride: model.default_extend_stride(),
            })
            .collect();
        let start = Instant::now();
        let gens = model.generate_batch(&prompts[..n], seconds, &opts, None)?;
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(&gens);
        out.insert(n.to_string(), serde_json::json!({"seconds": secs, "examples_per_second": n as f64 / secs}));
    }
    Ok(serde_json::Value::Object(out))
}

impl Bench {
    pub fn run(&self) -> Result<()> {
        let sections = ["generation", "gradients", "projection", "dataset", "scoring", "all"];
        if !sections.contains(&self.section.as_str()) {
            anyhow::bail!("--section takes one of {sections:?}, got `{}`", self.section);
        }
        if self.peer {
            return super::bench_peer::run(&super::bench_peer::PeerOptions {
                python: self.python.clone(),
                script: self.peer_script.clone(),
                reps: self.reps.max(1),
                results: self.results.clone(),
                models: self.peer_models.clone(),
                seconds: self.peer_seconds.clone(),
                score_rows: self.peer_score_rows,
            });
        }
        if let Some(task) = &self.worker {
            let dir = self.model_dir.as_deref().ok_or_else(|| anyhow::anyhow!("--worker needs --model-dir"))?;
            println!("{}", worker(task, dir, self.seconds, self.grad_seconds)?);
            return Ok(());
        }
        if let Some(o) = &self.only {
            if o == "stereo-large" {
                return self.stereo_large();
            }
            if o != "tiny" && o != "small" {
                anyhow::bail!("--only takes `tiny`, `small` or `stereo-large`, got `{o}`");
            }
        }
        let section = |s: &str| self.section == "all" || self.section == s;
        let want = |name: &str| self.only.as_deref().is_none_or(|o| o == name);
        let bandwidth = memcpy_bandwidth();
        let mut results = serde_json::Map::new();
        let mut grads = serde_json::Map::new();
        let models = [("tiny", "tiny"), ("small", "musicgen_small_shape")];
        for (key, name) in models {
            if !want(key) || !(section("generation") || section("gradients")) {
                continue;
            }
            // One model in memory at a time, so that each peak-RSS reading is its own.
            let model = if key == "tiny" {
                tiny::build(super::TINY_SEED, &Device::Cpu)?
            } else {
                let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json())?.vocab_size();
                tiny::random_model(tiny::small_shape_config(vocab), 7, candle_core::DType::F32, &Device::Cpu)?
            };
            if section("generation") {
                let mut r = bench_generation(&model, self.seconds, bandwidth)?;
                r["batched"] = bench_batched_generation(&model, self.seconds)?;
                results.insert(name.to_string(), r);
            }
            if section("gradients") {
                grads.insert(name.to_string(), bench_gradients(&model, self.grad_seconds)?);
            }
        }
        let projection = if section("projection") { Some(bench_projection(bandwidth)?) } else { None };
        let dataset = if section("dataset") && want("tiny") { Some(bench_dataset()?) } else { None };
        let scoring =
            if section("scoring") { Some(super::bench_scoring::bench_scoring(self.score_rows)?) } else { None };
        let out = serde_json::json!({
            "memcpy_bandwidth_gb_per_s": bandwidth / 1e9,
            "threads": candle_core::utils::get_num_threads(),
            "generation": results,
            "gradients": grads,
            "projection": projection,
            "dataset": dataset,
            "scoring": scoring,
        });
        if self.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "memcpy bandwidth: {:.2} GB/s (best of 6 passes on {} threads)",
                bandwidth / 1e9,
                candle_core::utils::get_num_threads()
            );
            print_gradients(&grads);
            if let Some(p) = &projection {
                print_projection(p);
            }
            if let Some(sc) = &scoring {
                super::bench_scoring::print_scoring(sc);
            }
            if let Some(d) = &dataset {
                println!(
                    "\ntraining-set embedding, tiny model ({} examples of {} s):",
                    d["examples"], d["seconds_each"]
                );
                for jobs in ["1", "2"] {
                    println!(
                        "  --jobs {jobs}: {:.2} examples/s",
                        d[jobs]["examples_per_second"].as_f64().unwrap_or(0.0)
                    );
                }
            }
            if results.is_empty() {
                return Ok(());
            }
            println!("\ngeneration:");
            println!(
                "{:<22} {:>12} {:>10} {:>12} {:>14} {:>9} {:>10}",
                "model", "LM params", "frames/s", "steps/s", "bound steps/s", "of bound", "decode s"
            );
            for (name, r) in &results {
                println!(
                    "{:<22} {:>12} {:>10.2} {:>12.2} {:>14.2} {:>8.1}% {:>10.2}",
                    name,
                    r["lm_parameters"],
                    r["frames_per_second"].as_f64().unwrap_or(0.0),
                    r["steps_per_second"].as_f64().unwrap_or(0.0),
                    r["weight_read_bound_steps_per_second"].as_f64().unwrap_or(0.0),
                    100.0 * r["fraction_of_bound"].as_f64().unwrap_or(0.0),
                    r["decode_seconds"].as_f64().unwrap_or(0.0),
                );
            }
            println!("\ngeneration, tracks of {} s generated N at a time (examples/s):", self.seconds);
            for (name, r) in &results {
                let b = |n: &str| r["batched"][n]["examples_per_second"].as_f64().unwrap_or(0.0);
                println!(
                    "{:<22} N=1 {:.3}   N=4 {:.3} ({:.2}×)   N=8 {:.3} ({:.2}×)",
                    name,
                    b("1"),
                    b("4"),
                    b("4") / b("1"),
                    b("8"),
                    b("8") / b("1")
                );
            }
        }
        Ok(())
    }
}

use crate::memory::{current_rss, peak_rss, reset_peak_rss};

/// musicgen-stereo-large's config as the hub publishes it.
const STEREO_LARGE_CONFIG: &str = include_str!("../../tests/fixtures/hf_configs/musicgen-stereo-large/config.json");

impl Bench {
    /// `--only stereo-large`: a random-weight model of musicgen-stereo-large's shape,
    /// written to disk once, then loaded, run and differentiated by fresh processes so that
    /// each peak-RSS reading is that of one command as a user runs it.
    fn stereo_large(&self) -> Result<()> {
        use crate::memory::gb;
        let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json())?.vocab_size();
        let published: serde_json::Value = serde_json::from_str(STEREO_LARGE_CONFIG)?;
        let mut cfg = crate::musicgen::MusicgenConfig::from_hf_json(&published, None)?;
        // The built-in tokenizer stands in for t5-base's (same model, fewer rows used).
        cfg.t5.vocab_size = cfg.t5.vocab_size.max(vocab);
        let (dir, temporary) = match &self.model_dir {
            Some(d) => (d.clone(), false),
            None => (std::env::temp_dir().join(format!("spintrak-bench-stereo-large-{}", std::process::id())), true),
        };
        let index = dir.join("model.safetensors.index.json");
        let written = std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["metadata"]["total_size"].as_u64());
        let (weight_bytes, write_seconds) = match written {
            Some(total) => {
                eprintln!("using the model already in {} ({})", dir.display(), gb(total));
                (total, None)
            }
            None => {
                eprintln!("writing a random-weight musicgen-stereo-large to {} ...", dir.display());
                let start = Instant::now();
                let total = tiny::write_random_transformers(&cfg, 11, &dir, 4 << 30)?;
                (total, Some(start.elapsed().as_secs_f64()))
            }
        };
        let bandwidth = memcpy_bandwidth();
        let exe = std::env::current_exe()?;
        let mut runs = serde_json::Map::new();
        let known = ["load", "generate", "audio-nll", "generation"];
        if let Some(bad) = self.runs.iter().find(|r| !known.contains(&r.as_str())) {
            anyhow::bail!("--runs takes some of {known:?}, got `{bad}`");
        }
        for task in known.iter().filter(|t| self.runs.iter().any(|r| r == *t)) {
            eprintln!("measuring: {task} ...");
            let out = std::process::Command::new(&exe)
                .args(["bench", "--worker", task, "--seconds", &self.seconds.to_string()])
                .args(["--grad-seconds", &self.grad_seconds.to_string(), "--model-dir"])
                .arg(&dir)
                .stderr(std::process::Stdio::inherit())
                .output()?;
            if !out.status.success() {
                anyhow::bail!("the `{task}` measurement failed ({})", out.status);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))?;
            runs.insert(task.to_string(), v);
        }
        if temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let none = serde_json::Value::Null;
        let gen = runs.get("generate").unwrap_or(&none);
        let lm_bytes = gen["lm_bytes"].as_f64().unwrap_or(0.0);
        let steps_per_s = gen["steps_per_second"].as_f64().unwrap_or(0.0);
        let bound = bandwidth / lm_bytes.max(1.0);
        let ratio = |r: &serde_json::Value| r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / weight_bytes as f64;
        let out = serde_json::json!({
            "model": "musicgen-stereo-large shape (random weights), transformers layout, 4 GB shards",
            "weight_bytes": weight_bytes,
            "write_seconds": write_seconds,
            "memcpy_bandwidth_gb_per_s": bandwidth / 1e9,
            "threads": candle_core::utils::get_num_threads(),
            "generation_fraction_of_weight_read_bound": steps_per_s / bound,
            "weight_read_bound_steps_per_second": bound,
            "peak_over_weights": runs.iter().map(|(k, r)| (k.clone(), ratio(r).into())).collect::<serde_json::Map<_, _>>(),
            "runs": runs,
        });
        if self.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        println!(
            "musicgen-stereo-large shape, random weights: {} of f32 weights; memcpy {:.1} GB/s, {} threads",
            gb(weight_bytes),
            bandwidth / 1e9,
            candle_core::utils::get_num_threads()
        );
        println!(
            "{:<12} {:>9} {:>11} {:>11} {:>12} {:>10}",
            "run", "load s", "loaded", "peak RSS", "peak/weights", "goal"
        );
        for (task, goal) in [("load", 1.15), ("generate", 1.15), ("audio-nll", 1.3), ("generation", 1.3)] {
            let Some(r) = runs.get(task) else { continue };
            println!(
                "{:<12} {:>9.1} {:>11} {:>11} {:>12.3} {:>9}×",
                task,
                r["load_seconds"].as_f64().unwrap_or(0.0),
                gb(r["loaded_bytes"].as_u64().unwrap_or(0)),
                gb(r["peak_rss_bytes"].as_u64().unwrap_or(0)),
                ratio(r),
                goal
            );
        }
        println!(
            "\ngeneration: {:.3} frames/s ({:.3} steps/s; weight-read bound {:.3} steps/s: {:.0}%)",
            gen["frames_per_second"].as_f64().unwrap_or(0.0),
            steps_per_s,
            bound,
            100.0 * steps_per_s / bound
        );
        for task in ["audio-nll", "generation"] {
            let Some(r) = runs.get(task) else { continue };
            let s = &r["seconds"];
            println!(
                "{task} embedding of {} s: prepare {:.1} s, backward {:.1} s, project {:.1} s",
                self.grad_seconds,
                s["prepare"].as_f64().unwrap_or(0.0),
                s["backward"].as_f64().unwrap_or(0.0),
                s["project"].as_f64().unwrap_or(0.0)
            );
        }
        Ok(())
    }
}

/// One measurement of `bench --only stereo-large`, in a process of its own: loads the
/// model in `dir` as the commands do, then generates or embeds. Returns a JSON line.
fn worker(task: &str, dir: &std::path::Path, seconds: f64, grad_seconds: f64) -> Result<String> {
    use crate::attribution::{AudioNllObjective, Objective};
    use crate::musicgen::{LoadOptions, Purpose};
    let purpose = if task == "load" || task == "generate" { Purpose::Inference } else { Purpose::Gradients };
    reset_peak_rss();
    let start = Instant::now();
    let model = crate::musicgen::load(dir, &LoadOptions { purpose, ..Default::default() }, &Device::Cpu)?;
    let load_seconds = start.elapsed().as_secs_f64();
    let peak_after_load = peak_rss();
    let lm_bytes = model.lm_params.claimed_bytes();
    let mut out = serde_json::json!({"task": task, "load_seconds": load_seconds, "lm_bytes": lm_bytes,
        "peak_rss_after_load_bytes": peak_after_load});
    let opts = GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 250, top_p: 0.0, seed: 1 },
        guidance_scale: 3.0,
        extend_stride: model.default_extend_stride(),
    };
    match task {
        "load" => {}
        "generate" => {
            let start = Instant::now();
            let gen = model.generate("lively salsa groove with bright horns", seconds, &opts, None)?;
            let secs = start.elapsed().as_secs_f64();
            let steps = gen.num_frames() + model.cfg.lm.max_delay();
            out["frames"] = gen.num_frames().into();
            out["seconds"] = serde_json::json!({"generate": secs});
            out["frames_per_second"] = (gen.num_frames() as f64 / secs).into();
            out["steps_per_second"] = (steps as f64 / secs).into();
        }
        "audio-nll" | "generation" => {
            let objective: Box<dyn Objective> = if task == "audio-nll" {
                Box::new(AudioNllObjective::default())
            } else {
                Box::new(GenerationObjective::from_options(&opts))
            };
            let (dec, lm) = gradient_dim(&model, objective.as_ref());
            let spec = ProjectorSpec::new(ProjectorKind::Sparse, 42, Some(8192), dec + lm, 8)?;
            let start = Instant::now();
            let prepared = if task == "audio-nll" {
                song_prepared(&model, grad_seconds)?.0
            } else {
                let example = Example::generated("bench", "lively salsa groove", grad_seconds, 1);
                objective.prepare(&model, &example, None)?
            };
            let prepare = start.elapsed().as_secs_f64();
            let (embedding, _, t) =
                crate::attribution::gradient::embed_prepared(&model, objective.as_ref(), &spec, prepared, None)?;
            out["gradient_numbers"] = (dec + lm).into();
            out["embedding_norm"] = embedding.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().into();
            out["seconds"] = serde_json::json!({"prepare": prepare, "backward": t.backward, "project": t.project});
        }
        other => anyhow::bail!("unknown worker task `{other}`"),
    }
    out["loaded_bytes"] = model.loaded_bytes().into();
    out["peak_rss_bytes"] = peak_rss().into();
    Ok(out.to_string())
}

fn bench_gradients(model: &MusicGen, seconds: f64) -> Result<serde_json::Value> {
    let opts = GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 250, top_p: 0.0, seed: 1 },
        guidance_scale: 3.0,
        extend_stride: model.default_extend_stride(),
    };
    let objective = GenerationObjective::from_options(&opts);
    let (dec, lm) = gradient_dim(model, &objective);
    let d = dec + lm;
    let spec = ProjectorSpec::new(ProjectorKind::Sparse, 42, Some(8192.min(d / 8 * 8)), d, 8)?;
    let example = Example::generated("bench", "lively salsa groove", seconds, 1);
    let before = current_rss().unwrap_or(0);
    reset_peak_rss();
    let (_, _, t) = embed(model, &objective, &spec, &example, None)?;
    let peak = peak_rss().unwrap_or(0);
    let param_bytes = (d as u64) * 4;
    // audio-nll on `seconds` of a synthesised song: encode, backward (LM only), project.
    let audio_nll = {
        let nll = crate::attribution::AudioNllObjective::default();
        let (_, lm_d) = gradient_dim(model, &nll);
        let spec = ProjectorSpec::new(ProjectorKind::Sparse, 42, Some(8192.min(lm_d / 8 * 8)), lm_d, 8)?;
        reset_peak_rss();
        let (prepared, encode) = song_prepared(model, seconds)?;
        let (_, _, t) = crate::attribution::gradient::embed_prepared(model, &nll, &spec, prepared, None)?;
        serde_json::json!({"gradient_numbers": lm_d, "seconds": {"encode": encode, "backward": t.backward, "project": t.project,
            "total": encode + t.backward + t.project}, "peak_rss_bytes": peak_rss().unwrap_or(0)})
    };
    Ok(serde_json::json!({
        "audio_nll": audio_nll,
        "audio_seconds": seconds,
        "gradient_numbers": d,
        "seconds": {"generate": t.prepare, "backward": t.backward, "backward_codec": t.backward_codec, "project": t.project, "total": t.prepare + t.backward + t.project},
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "parameters_plus_gradients_bytes": 2 * param_bytes,
        "peak_over_parameters_plus_gradients": peak as f64 / (2 * param_bytes) as f64,
    }))
}

/// `seconds` of a synthesised salsa song, encoded by the model's codec and ready for the
/// audio-nll backward; with the encoding's seconds.
fn song_prepared(model: &MusicGen, seconds: f64) -> Result<(crate::attribution::Prepared, f64)> {
    use crate::attribution::objective::{encode_audio, prepared_from_codes};
    let sr = model.cfg.sample_rate() as u32;
    let song = crate::demo::song(crate::demo::Style::Salsa, &crate::demo::Variant::nth(1), sr, seconds as f32);
    let start = Instant::now();
    let codes = encode_audio(model, &vec![song; model.cfg.audio_channels])?;
    let encode = start.elapsed().as_secs_f64();
    Ok((prepared_from_codes(model, codes, model.encode_text("lively salsa groove")?)?, encode))
}

fn print_gradients(grads: &serde_json::Map<String, serde_json::Value>) {
    if grads.is_empty() {
        return;
    }
    println!("\ngradient embedding (sparse projection); budget: peak RSS under 2×(θ+∇θ) plus activations");
    println!(
        "{:<22} {:>8} {:>12} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "model", "audio s", "D", "generate", "backward", "(codec)", "project", "peak RSS", "θ+∇θ", "peak/(θ+∇θ)"
    );
    for (name, r) in grads {
        let s = &r["seconds"];
        println!(
            "{:<22} {:>8.1} {:>12} {:>9.2}s {:>9.2}s {:>9.2}s {:>9.2}s {:>10.0}MB {:>10.0}MB {:>12.2}",
            name,
            r["audio_seconds"].as_f64().unwrap_or(0.0),
            r["gradient_numbers"],
            s["generate"].as_f64().unwrap_or(0.0),
            s["backward"].as_f64().unwrap_or(0.0),
            s["backward_codec"].as_f64().unwrap_or(0.0),
            s["project"].as_f64().unwrap_or(0.0),
            r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["parameters_plus_gradients_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["peak_over_parameters_plus_gradients"].as_f64().unwrap_or(0.0),
        );
    }
    println!("\naudio-nll embedding of the same length (LM only): encode / backward / project");
    println!("{:<22} {:>12} {:>10} {:>10} {:>10} {:>12}", "model", "D", "encode", "backward", "project", "peak RSS");
    for (name, r) in grads {
        let a = &r["audio_nll"];
        let s = &a["seconds"];
        println!(
            "{:<22} {:>12} {:>9.2}s {:>9.2}s {:>9.2}s {:>10.0}MB",
            name,
            a["gradient_numbers"],
            s["encode"].as_f64().unwrap_or(0.0),
            s["backward"].as_f64().unwrap_or(0.0),
            s["project"].as_f64().unwrap_or(0.0),
            a["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        );
    }
}

/// Projection throughput in GB/s of gradient (f32) per kind, next to memcpy. The fast
/// kinds take tens of milliseconds per pass, so each is timed several times (the first
/// pass is a warm-up) and the median and best are reported.
fn bench_projection(bandwidth: f64) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    let k = 8192;
    for (kind, d, reps) in [
        (ProjectorKind::Identity, 8 << 20, 7),
        (ProjectorKind::Sparse, 64 << 20, 7),
        (ProjectorKind::Rademacher, 1 << 18, 1),
        (ProjectorKind::Normal, 1 << 15, 1),
    ] {
        let spec = ProjectorSpec::new(kind, 42, if kind == ProjectorKind::Identity { None } else { Some(k) }, d, 8)?;
        let values: Vec<f32> = (0..d).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
        // On the pool, as an embedding's projection runs (inside `project_gradient`).
        let pass = || -> Result<f64> {
            crate::musicgen::on_pool(|| {
                let start = Instant::now();
                let mut p = spec.start();
                for (c, chunk) in values.chunks(1 << 20).enumerate() {
                    p.update(c << 20, chunk)?;
                }
                std::hint::black_box(p.finish()?);
                Ok(start.elapsed().as_secs_f64())
            })
        };
        if reps > 1 {
            pass()?;
        }
        let mut times = (0..reps).map(|_| pass()).collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        let gb_per_s = |secs: f64| (d * 4) as f64 / secs / 1e9;
        let (median, best) = (times[times.len() / 2], times[0]);
        let gbps = gb_per_s(median);
        out.insert(
            format!("{kind:?}").to_lowercase(),
            serde_json::json!({"k": spec.k, "d": d, "repetitions": reps, "seconds": median, "best_seconds": best,
                "gb_per_s": gbps, "best_gb_per_s": gb_per_s(best), "fraction_of_memcpy": gbps * 1e9 / bandwidth,
                "seconds_per_musicgen_small_gradient": 449e6 * 4.0 / (gbps * 1e9)}),
        );
    }
    Ok(serde_json::Value::Object(out))
}

fn print_projection(p: &serde_json::Value) {
    println!("\nprojection to k = 8192 (GB/s of f32 gradient; median of the repetitions, and the best):");
    println!(
        "{:<12} {:>12} {:>5} {:>10} {:>10} {:>11} {:>22}",
        "kind", "D tested", "reps", "GB/s", "best", "of memcpy", "s per 449M gradient"
    );
    if let Some(map) = p.as_object() {
        for (name, r) in map {
            println!(
                "{:<12} {:>12} {:>5} {:>10.3} {:>10.3} {:>10.1}% {:>22.1}",
                name,
                r["d"].as_u64().unwrap_or(0),
                r["repetitions"].as_u64().unwrap_or(0),
                r["gb_per_s"].as_f64().unwrap_or(0.0),
                r["best_gb_per_s"].as_f64().unwrap_or(0.0),
                100.0 * r["fraction_of_memcpy"].as_f64().unwrap_or(0.0),
                r["seconds_per_musicgen_small_gradient"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

/// Examples/second of `generate-training-dataset-parallel` on the tiny model, --jobs 1 and 2.
fn bench_dataset() -> Result<serde_json::Value> {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        inner: super::training::GenerateTrainingDataset,
    }
    let tmp = std::env::temp_dir().join(format!("spintrak-bench-{}", std::process::id()));
    let data = tmp.join("data");
    std::fs::create_dir_all(&data)?;
    // Enough work (several seconds per run) that model loading and start-up do not dominate.
    let (n, seconds) = (48usize, 4.0f64);
    for i in 0..n {
        crate::audio::write_wav(&data.join(format!("s{i:02}.wav")), &[vec![0.1f32; 3200]], 32000)?;
        std::fs::write(
            data.join(format!("s{i:02}.json")),
            format!(r#"{{"description": "song {i}", "duration": {seconds}}}"#),
        )?;
    }
    let mut out = serde_json::Map::new();
    for jobs in ["1", "2"] {
        let output = tmp.join(format!("out{jobs}.bin"));
        let args = [
            "x",
            "--input",
            data.to_str().unwrap_or(""),
            "--output",
            output.to_str().unwrap_or(""),
            "--jobs",
            jobs,
            "--quiet",
        ];
        let cmd = Wrapper::try_parse_from(args)?.inner;
        let start = Instant::now();
        cmd.run()?;
        let secs = start.elapsed().as_secs_f64();
        out.insert(jobs.into(), serde_json::json!({"seconds": secs, "examples_per_second": n as f64 / secs}));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    out.insert("examples".into(), n.into());
    out.insert("seconds_each".into(), seconds.into());
    Ok(serde_json::Value::Object(out))
}
