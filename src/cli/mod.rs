//! Command-line interface: one module per subcommand, sharing argument groups.

pub mod app;
pub mod bench;
mod bench_peer;
mod bench_scoring;
pub mod demo;
pub mod experiments;
pub mod finetune;
pub mod generate_audio;
pub mod generate_gradients;
pub mod index;
pub mod init_model;
pub mod loss;
pub mod merge;
pub mod training;
pub mod validate;

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;

use crate::attribution::objective::{objective_of, AudioInput, ObjectiveKind};
use crate::attribution::{gradient_dim, Objective, ProjectorKind, ProjectorSpec};
use crate::musicgen::sampling::Sampler;
use crate::musicgen::{tiny, GenerateOptions, LoadOptions, MusicGen, Purpose};

/// Prints what the user should know about an example (e.g. padding) on stderr.
pub fn warn_all(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// Seed of the built-in tiny model.
pub const TINY_SEED: u64 = 1234;

/// Which model to run.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// MusicGen directory: an audiocraft export (state_dict.bin + compression_state_dict.bin)
    /// or a transformers directory (config.json + model.safetensors). Omit it, or pass
    /// `builtin:tiny`, for the built-in tiny model.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// transformers EnCodec directory for a checkpoint that only points to its codec
    /// (e.g. `facebook/encodec_32khz`); default: the Hugging Face hub cache.
    #[arg(long, value_name = "DIR")]
    pub encodec: Option<PathBuf>,
    /// transformers T5 directory (config.json, weights, tokenizer.json); default: the
    /// Hugging Face hub cache (`t5-base`).
    #[arg(long, value_name = "DIR")]
    pub t5: Option<PathBuf>,
    /// Load the model even when its estimated memory need exceeds what this machine has
    /// available (the estimate is checked before any weight is read).
    #[arg(long)]
    pub force: bool,
}

impl ModelArgs {
    /// Loads the model for inference (generation, the loss).
    pub fn load(&self) -> Result<MusicGen> {
        self.load_for(Purpose::Inference)
    }

    /// Loads the model, first checking that it fits in memory for `purpose`.
    pub fn load_for(&self, purpose: Purpose) -> Result<MusicGen> {
        let device = Device::Cpu;
        match &self.model {
            None => tiny::build(TINY_SEED, &device),
            Some(p) if p.as_os_str() == "builtin:tiny" => tiny::build(TINY_SEED, &device),
            Some(dir) => {
                let opts =
                    LoadOptions { encodec: self.encodec.clone(), t5: self.t5.clone(), purpose, force: self.force };
                crate::musicgen::load(dir, &opts, &device)
            }
        }
    }
}

/// What to generate: prompt, length, seed.
#[derive(Debug, Clone, Args)]
pub struct ExampleArgs {
    /// Text description of the music.
    #[arg(long)]
    pub prompt: String,
    /// Seconds of audio; beyond the model's window the piece is extended window by window.
    /// With --input-audio: seconds of the file to score (default: to its end).
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<f64>,
    /// Random seed of the generation: the same seed gives the same tokens.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl ExampleArgs {
    /// The duration of a track to generate (required then).
    pub fn generate_seconds(&self) -> Result<f64> {
        self.duration.ok_or_else(|| anyhow::anyhow!("--duration is required: how many seconds to generate"))
    }
}

/// An audio file to score instead of generating a track.
#[derive(Debug, Clone, Args)]
pub struct AudioArgs {
    /// Score this audio file (wav, mp3, flac, m4a, aac) with the --prompt as its
    /// description, instead of generating a track. Needs the audio-nll objective.
    #[arg(long, value_name = "FILE")]
    pub input_audio: Option<PathBuf>,
    /// Seconds into --input-audio where the excerpt starts.
    #[arg(long, default_value_t = 0.0, value_parser = parse_offset)]
    pub offset: f64,
}

impl AudioArgs {
    /// The audio input of `--input-audio` (with `duration` seconds, default: to the end).
    pub fn input(&self, duration: Option<f64>) -> Result<Option<AudioInput>> {
        match &self.input_audio {
            None if self.offset != 0.0 => bail!("--offset applies to --input-audio, which is not given"),
            None => Ok(None),
            Some(p) => {
                if !p.is_file() {
                    bail!("{}: --input-audio is not a readable file", p.display());
                }
                Ok(Some(AudioInput { path: p.clone(), offset: self.offset, duration }))
            }
        }
    }
}

/// Parses a non-negative offset in seconds.
pub fn parse_offset(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("the offset must be ≥ 0 seconds, got {s}"));
    }
    Ok(v)
}

/// Which function of the model is differentiated.
#[derive(Debug, Clone, Args)]
pub struct ObjectiveArgs {
    /// `audio-nll` (default): MusicGen's training loss on the example's own audio (or on
    /// a generated track's codes), so that a score measures how training on a song changed
    /// the track's likelihood. `generation`: the earlier tool's objective (gradient of a
    /// fresh generation's guided logits; never reads training audio), to reproduce it.
    #[arg(long, value_enum, default_value_t = ObjectiveKind::AudioNll)]
    pub objective: ObjectiveKind,
}

impl ObjectiveArgs {
    /// The objective; `generate` says how tracks are generated where one is needed.
    pub fn build(&self, generate: &GenerateOptions) -> Box<dyn Objective> {
        objective_of(self.objective, generate)
    }
}

/// Sampling options shared by every command that generates.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Keep the k most likely tokens at each step (default: the checkpoint's, 250). `--top-k 1` is greedy.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens with this probability (0 = off).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Softmax temperature (default: the checkpoint's, 1.0); 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Classifier-free guidance coefficient (default: the checkpoint's, 3.0).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Seconds each extension window advances by beyond the model's window (default 18 s
    /// for a 30 s window).
    #[arg(long)]
    pub extend_stride: Option<f64>,
}

impl SamplingArgs {
    pub fn options(&self, model: &MusicGen, seed: u64) -> Result<GenerateOptions> {
        let g = &model.cfg.generation;
        let temperature = self.temperature.unwrap_or(g.temperature);
        let top_p = self.top_p.unwrap_or(g.top_p);
        let guidance = self.guidance.unwrap_or(g.guidance_scale);
        if temperature.is_nan() || temperature < 0.0 || !temperature.is_finite() {
            bail!("--temperature must be ≥ 0, got {temperature}");
        }
        if !(0.0..=1.0).contains(&top_p) {
            bail!("--top-p must be between 0 and 1, got {top_p}");
        }
        if !guidance.is_finite() {
            bail!("--guidance must be a number, got {guidance}");
        }
        let extend_stride = self.extend_stride.unwrap_or_else(|| model.default_extend_stride());
        if extend_stride.is_nan() || extend_stride <= 0.0 {
            bail!("--extend-stride must be positive, got {extend_stride}");
        }
        Ok(GenerateOptions {
            sampler: Sampler {
                use_sampling: g.use_sampling,
                temperature,
                top_k: self.top_k.unwrap_or(g.top_k),
                top_p,
                seed,
            },
            guidance_scale: guidance,
            extend_stride,
        })
    }
}

/// `--jobs` between 1 and the machine's CPUs: the jobs share the CPU threads, so more jobs
/// than CPUs cannot go faster, and each holds an example's activations and gradients.
pub fn check_jobs(jobs: usize) -> Result<()> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if jobs > cpus {
        bail!("--jobs {jobs}: this machine has {cpus} CPU(s); more jobs than CPUs only multiplies the memory used (use --jobs {cpus} or fewer)");
    }
    Ok(())
}

/// `--batch N`: tracks generated together, 1 to 8 (with guidance, 16 rows per forward
/// pass: the most the few-row kernel takes, which keeps every row's numbers those it
/// gets alone).
pub fn parse_batch(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=8).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to 8, got `{s}`")),
    }
}

/// A progress bar on stderr (hidden when `quiet` or when stderr is not a terminal).
pub fn progress_bar(quiet: bool, message: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps · {per_sec} · ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(message.to_string());
    pb
}

pub use crate::musicgen::model::MAX_SECONDS;

/// Parses a positive duration in seconds.
pub fn parse_duration(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_nan() || v <= 0.0 || !v.is_finite() {
        return Err(format!("the duration must be positive, got {s}"));
    }
    if v > MAX_SECONDS {
        return Err(format!(
            "{s} s is longer than the {MAX_SECONDS} s limit (at 50 frames/s, {:.0} decoding steps); split the audio",
            v * 50.0
        ));
    }
    Ok(v)
}

/// How gradients are projected.
#[derive(Debug, Clone, Args)]
pub struct ProjectionArgs {
    /// Projection: `sparse` (default: O(D·s), fast on a CPU), `normal` (dense Gaussian, the
    /// earlier tool's and TRAK's: O(D·k), about a day per example for musicgen-small at
    /// k = 8192 on 2 cores), `rademacher` (dense ±1), `identity` (the raw gradient, k = D).
    #[arg(long, value_enum, default_value_t = ProjectorKind::Sparse)]
    pub projector: ProjectorKind,
    /// Output dimension k (default: 512·floor(JL(D, 0.15)/512), about 8192 for 3.3B parameters).
    #[arg(long)]
    pub proj_dim: Option<usize>,
    /// Seed of the random projection (all embeddings that are compared must share it).
    #[arg(long, default_value_t = 42)]
    pub proj_seed: u64,
    /// Non-zeros per column of the sparse projection.
    #[arg(long, default_value_t = 8)]
    pub proj_sparsity: usize,
}

impl ProjectionArgs {
    pub fn spec(&self, model: &MusicGen, objective: &dyn Objective) -> Result<ProjectorSpec> {
        let (dec, lm) = gradient_dim(model, objective);
        ProjectorSpec::new(self.projector, self.proj_seed, self.proj_dim, dec + lm, self.proj_sparsity)
    }
}

pub use crate::store::embedding_file::{model_info, single_file};

/// Fails early (before hours of work) when an output's directory does not exist.
pub fn check_output_dir(path: &std::path::Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        bail!("{}: the directory {} does not exist; create it or choose another output", path.display(), dir.display());
    }
    if path.is_dir() {
        bail!("{}: is a directory; give a file name", path.display());
    }
    Ok(())
}

/// A path made absolute and free of `..` and symbolic links where it exists (its parent
/// otherwise), so that two spellings of one file compare equal.
fn resolved(p: &std::path::Path) -> std::path::PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir };
            dir.canonicalize().map(|d| d.join(name)).unwrap_or_else(|_| p.to_path_buf())
        }
        _ => p.to_path_buf(),
    }
}

/// Refuses, before any work, an output that is one of the command's inputs or (with
/// `inside`) lies within an input folder, naming both flags.
pub fn refuse_overlap(
    output: &std::path::Path,
    out_flag: &str,
    input: &std::path::Path,
    in_flag: &str,
    inside: bool,
) -> Result<()> {
    let (o, i) = (resolved(output), resolved(input));
    if o == i || (inside && o.starts_with(&i)) {
        bail!(
            "{out_flag} {} {} {in_flag} {}: it would overwrite what it reads; choose another output",
            output.display(),
            if o == i { "is" } else { "is inside" },
            input.display()
        );
    }
    Ok(())
}

/// A progress bar over examples, showing the current file (hidden when `quiet`).
pub fn progress_bar_examples(quiet: bool, total: u64) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} examples · ETA {eta} · {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}
