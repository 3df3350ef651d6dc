//! `spintrak bench`: speed next to the bound the hardware sets, measured in one run.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::Args;

use crate::musicgen::sampling::Sampler;
use crate::musicgen::{tiny, GenerateOptions, MusicGen};

/// Measure generation speed (frames/s) against the weight-read bound.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spintrak bench                 # tiny and musicgen-small-shaped models\n  spintrak bench --only tiny --json"
)]
pub struct Bench {
    /// Run only this model: `tiny` or `small` (musicgen-small's shape, random weights).
    #[arg(long)]
    pub only: Option<String>,
    /// Seconds of audio to generate per model.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Memory bandwidth from copying a buffer much larger than the caches (bytes/s).
pub fn memcpy_bandwidth() -> f64 {
    let n = 512 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // fault the pages in
    let reps = 4;
    let start = Instant::now();
    for i in 0..reps {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst[i]);
    }
    (n * reps) as f64 / start.elapsed().as_secs_f64()
}

fn bench_generation(model: &MusicGen, seconds: f64, bandwidth: f64) -> Result<serde_json::Value> {
    let opts = GenerateOptions {
        sampler: Sampler {
            use_sampling: true,
            temperature: 1.0,
            top_k: 250,
            top_p: 0.0,
            seed: 1,
        },
        guidance_scale: 3.0,
        extend_stride: model.default_extend_stride(),
    };
    // Warm-up (allocations, caches).
    model.generate(
        "warm up",
        0.1_f64.max(2.0 / model.cfg.frame_rate()),
        &opts,
        None,
    )?;
    let start = Instant::now();
    let gen = model.generate(
        "lively salsa groove with bright horns",
        seconds,
        &opts,
        None,
    )?;
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

impl Bench {
    pub fn run(&self) -> Result<()> {
        let bandwidth = memcpy_bandwidth();
        let mut results = serde_json::Map::new();
        let want = |name: &str| self.only.as_deref().is_none_or(|o| o == name);
        if let Some(o) = &self.only {
            if o != "tiny" && o != "small" {
                anyhow::bail!("--only takes `tiny` or `small`, got `{o}`");
            }
        }
        if want("tiny") {
            let model = tiny::build(super::TINY_SEED, &Device::Cpu)?;
            results.insert(
                "tiny".into(),
                bench_generation(&model, self.seconds, bandwidth)?,
            );
        }
        if want("small") {
            let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json())?
                .vocab_size();
            let model = tiny::random_model(
                tiny::small_shape_config(vocab),
                7,
                candle_core::DType::F32,
                &Device::Cpu,
            )?;
            results.insert(
                "musicgen_small_shape".into(),
                bench_generation(&model, self.seconds, bandwidth)?,
            );
        }
        let out = serde_json::json!({
            "memcpy_bandwidth_gb_per_s": bandwidth / 1e9,
            "threads": candle_core::utils::get_num_threads(),
            "generation": results,
        });
        if self.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "memcpy bandwidth: {:.2} GB/s, {} threads",
                bandwidth / 1e9,
                candle_core::utils::get_num_threads()
            );
            println!(
                "{:<22} {:>12} {:>10} {:>12} {:>14} {:>9} {:>10}",
                "model",
                "LM params",
                "frames/s",
                "steps/s",
                "bound steps/s",
                "of bound",
                "decode s"
            );
            for (name, r) in &results {
                println!(
                    "{:<22} {:>12} {:>10.2} {:>12.2} {:>14.2} {:>8.1}% {:>10.2}",
                    name,
                    r["lm_parameters"],
                    r["frames_per_second"].as_f64().unwrap_or(0.0),
                    r["steps_per_second"].as_f64().unwrap_or(0.0),
                    r["weight_read_bound_steps_per_second"]
                        .as_f64()
                        .unwrap_or(0.0),
                    100.0 * r["fraction_of_bound"].as_f64().unwrap_or(0.0),
                    r["decode_seconds"].as_f64().unwrap_or(0.0),
                );
            }
        }
        Ok(())
    }
}
