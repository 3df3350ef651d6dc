//! What is differentiated. An objective prepares an example (encodes its audio, or
//! generates it) and then gives two scalars: one that depends on the codec decoder's
//! parameters and one on the LM's.
//!
//! - `audio-nll` (the default): MusicGen's training loss on the example's own codes,
//!   conditioned on its description (`musicgen::loss`). Its gradient is what a training
//!   step on the example would follow, so TRAK scores built on it say how training on a
//!   song changed the likelihood of a track. Only the LM takes part.
//! - `generation`: the earlier tool's objective (guided logits of a fresh generation,
//!   mean of the decoded audio), kept to reproduce it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::record::{ObjectiveInfo, Record};
use crate::musicgen::codec::{Codec, CodecEncoder};
use crate::musicgen::lm::Lm;
use crate::musicgen::loss::{consecutive_windows, window_frames, TeacherForced};
use crate::musicgen::model::Window;
use crate::musicgen::sampling::Sampler;
use crate::musicgen::{GenerateOptions, Generation, MusicGen};

/// The objectives, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ObjectiveKind {
    /// MusicGen's training loss on the example's own audio (or generated codes).
    #[serde(rename = "audio-nll")]
    #[value(name = "audio-nll")]
    AudioNll,
    /// The earlier tool's: guided logits of a generation and the mean decoded audio.
    #[serde(rename = "generation")]
    #[value(name = "generation")]
    Generation,
}

impl ObjectiveKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::AudioNll => "audio-nll",
            Self::Generation => "generation",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "audio-nll" => Ok(Self::AudioNll),
            "generation" => Ok(Self::Generation),
            other => bail!("unknown objective `{other}` (audio-nll, generation)"),
        }
    }
}

/// An excerpt of an audio file to score.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioInput {
    pub path: PathBuf,
    /// Seconds into the file.
    pub offset: f64,
    /// Seconds to read (default: to the end of the file).
    pub duration: Option<f64>,
}

/// One example to embed: an audio excerpt with its description, or a track to generate
/// from (prompt, seed, duration).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub name: String,
    pub prompt: String,
    pub duration: f64,
    pub seed: u64,
    pub source: Option<String>,
    /// The audio to score; `None`: generate it.
    pub audio: Option<AudioInput>,
}

impl Example {
    /// A track to generate.
    pub fn generated(name: impl Into<String>, prompt: impl Into<String>, duration: f64, seed: u64) -> Self {
        Self { name: name.into(), prompt: prompt.into(), duration, seed, source: None, audio: None }
    }

    /// The stored row of this example, embedded over `duration` seconds.
    pub fn record(&self, duration: f64) -> Record {
        Record {
            name: self.name.clone(),
            prompt: self.prompt.clone(),
            duration,
            seed: self.seed,
            source: self.source.clone(),
            offset: self.audio.as_ref().map(|a| a.offset),
        }
    }
}

/// What an objective computed before differentiating: the codes and the text states.
pub struct Prepared {
    /// The codes (`frames`) and the windows the LM scalar is taken over.
    pub generation: Generation,
    /// Frozen T5 states `[1, L, cond_dim]`.
    pub t5: Tensor,
    /// Seconds of audio the codes stand for.
    pub duration: f64,
    /// What the user should know (e.g. an excerpt padded with silence).
    pub warnings: Vec<String>,
}

impl Prepared {
    pub fn new(generation: Generation, t5: Tensor, duration: f64) -> Self {
        Self { generation, t5, duration, warnings: Vec::new() }
    }
}

/// A differentiable objective over MusicGen.
pub trait Objective: Send + Sync {
    /// Name and every setting the embedding depends on (stored in file headers).
    fn info(&self) -> ObjectiveInfo;
    /// Whether the codec decoder's parameters are part of the gradient.
    fn differentiates_codec(&self) -> bool {
        true
    }
    /// How examples without audio are generated, when that is not part of `info`.
    fn generated_with(&self) -> Option<serde_json::Value> {
        None
    }
    /// Work done without gradients (generation, encoding).
    fn prepare(&self, model: &MusicGen, example: &Example, progress: Option<&ProgressBar>) -> Result<Prepared>;
    /// How examples without audio are generated (`None`: they are refused).
    fn generation_settings(&self) -> Option<&GenerationSettings>;
    /// The preparation of `example` (no audio) from its generation, as `prepare` makes it.
    fn prepared_from_generation(&self, model: &MusicGen, example: &Example, generation: Generation)
        -> Result<Prepared>;
    /// The decoder inputs (`[1, D, T]`, one per audio channel) of the codec scalar.
    fn codec_inputs(&self, model: &MusicGen, prepared: &Prepared) -> Result<Vec<Tensor>>;
    /// The codec scalar's share from one channel's decoded audio `[1, 1, samples]`.
    fn codec_head_value(&self, model: &MusicGen, audio: &Tensor, prepared: &Prepared) -> Result<Tensor>;
    /// The scalar whose gradient is taken w.r.t. the codec decoder (`codec` is tracked).
    fn codec_value(&self, model: &MusicGen, codec: &Codec, prepared: &Prepared) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for z in self.codec_inputs(model, prepared)? {
            let v = self.codec_head_value(model, &codec.decoder.forward(&z)?, prepared)?;
            total = Some(match total {
                None => v,
                Some(t) => (t + v)?,
            });
        }
        total.ok_or_else(|| anyhow::anyhow!("no audio to decode"))
    }
    /// How many independent pieces the LM scalar is a sum of (one per generation window):
    /// each piece is differentiated on its own, so only one window's graph is alive at a time.
    fn lm_parts(&self, prepared: &Prepared) -> usize;
    /// The teacher-forced LM input of piece `part`: tokens `[B, K, S]`, and how many
    /// leading batch rows carry the text condition (the rest get the null condition).
    fn lm_input(&self, model: &MusicGen, prepared: &Prepared, part: usize) -> Result<(Tensor, usize)>;
    /// Piece `part` of the LM scalar from the logits of its input.
    fn lm_head_value(&self, model: &MusicGen, logits: &Tensor, prepared: &Prepared, part: usize) -> Result<Tensor>;
    /// Piece `part` of the LM scalar (`lm` is tracked), in one forward pass.
    fn lm_value_part(&self, model: &MusicGen, lm: &Lm, prepared: &Prepared, part: usize) -> Result<Tensor> {
        let (tokens, n_cond) = self.lm_input(model, prepared, part)?;
        let cond = lm.conditioning(&lm.project_condition(&prepared.t5)?, n_cond)?;
        self.lm_head_value(model, &lm.forward(&tokens, &cond, None)?, prepared, part)
    }
    /// The whole LM scalar: the sum of its pieces.
    fn lm_value(&self, model: &MusicGen, lm: &Lm, prepared: &Prepared) -> Result<Tensor> {
        let mut total = self.lm_value_part(model, lm, prepared, 0)?;
        for part in 1..self.lm_parts(prepared) {
            total = (total + self.lm_value_part(model, lm, prepared, part)?)?;
        }
        Ok(total)
    }
}

/// Sampling settings of the `generation` objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSettings {
    pub use_sampling: bool,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub guidance_scale: f64,
    pub extend_stride: f64,
}

/// The earlier tool's objective, defined precisely and without its accumulation bug.
/// For (prompt, seed, duration): generate; then, with the tokens fixed,
/// - `f_LM = (1/T) Σ_s mean(L_s)`, `L_s` (K × card) the guided logits
///   `L_uncond + cfg·(L_cond − L_uncond)` at every sampling step `s` of the delay-pattern
///   sequence (teacher-forced, per window), `T` the number of generated frames;
/// - `f_codec = mean` of the decoded waveform (all samples and channels, before
///   loudness normalisation).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationObjective {
    pub settings: GenerationSettings,
}

impl GenerationObjective {
    pub fn from_options(opts: &GenerateOptions) -> Self {
        Self {
            settings: GenerationSettings {
                use_sampling: opts.sampler.use_sampling,
                temperature: opts.sampler.temperature,
                top_k: opts.sampler.top_k,
                top_p: opts.sampler.top_p,
                guidance_scale: opts.guidance_scale,
                extend_stride: opts.extend_stride,
            },
        }
    }

    pub fn options(&self, seed: u64) -> GenerateOptions {
        let s = &self.settings;
        GenerateOptions {
            sampler: Sampler {
                use_sampling: s.use_sampling,
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                seed,
            },
            guidance_scale: s.guidance_scale,
            extend_stride: s.extend_stride,
        }
    }
}

/// `[B, K, S]` u32 tensor of `batch` copies of the step rows `steps[k][range]`.
fn step_tensor(steps: &[Vec<u32>], range: std::ops::Range<usize>, batch: usize, device: &Device) -> Result<Tensor> {
    let k = steps.len();
    let width = range.len();
    let mut flat = Vec::with_capacity(batch * k * width);
    for _ in 0..batch {
        for row in steps {
            flat.extend_from_slice(&row[range.clone()]);
        }
    }
    Ok(Tensor::from_vec(flat, (batch, k, width), device)?)
}

impl Objective for GenerationObjective {
    fn info(&self) -> ObjectiveInfo {
        ObjectiveInfo {
            name: "generation".into(),
            settings: serde_json::to_value(&self.settings).unwrap_or(serde_json::Value::Null),
        }
    }

    fn prepare(&self, model: &MusicGen, example: &Example, progress: Option<&ProgressBar>) -> Result<Prepared> {
        if let Some(a) = &example.audio {
            bail!(
                "{}: the `generation` objective generates its own audio and cannot score a file; use --objective audio-nll",
                a.path.display()
            );
        }
        let generation = model.generate(&example.prompt, example.duration, &self.options(example.seed), progress)?;
        self.prepared_from_generation(model, example, generation)
    }

    fn generation_settings(&self) -> Option<&GenerationSettings> {
        Some(&self.settings)
    }

    fn prepared_from_generation(
        &self,
        model: &MusicGen,
        example: &Example,
        generation: Generation,
    ) -> Result<Prepared> {
        let duration = generation.num_frames() as f64 / model.cfg.frame_rate();
        Ok(Prepared::new(generation, model.encode_text(&example.prompt)?, duration))
    }

    fn codec_inputs(&self, model: &MusicGen, prepared: &Prepared) -> Result<Vec<Tensor>> {
        model.codec.latents(&prepared.generation.frames_tensor(&model.device)?, model.cfg.audio_channels)
    }

    fn codec_head_value(&self, model: &MusicGen, audio: &Tensor, _: &Prepared) -> Result<Tensor> {
        // The mean over all channels' samples: each channel adds its sum / (channels · samples).
        let n = audio.elem_count() * model.cfg.audio_channels;
        Ok((audio.sum_all()? / n as f64)?)
    }

    fn lm_parts(&self, prepared: &Prepared) -> usize {
        prepared.generation.windows.len()
    }

    fn lm_input(&self, model: &MusicGen, prepared: &Prepared, part: usize) -> Result<(Tensor, usize)> {
        let guided = self.settings.guidance_scale != 1.0;
        let window = window(prepared, part)?;
        let steps = model.pattern().build(&window.frames);
        let s_len = steps[0].len();
        // Teacher forcing: the logits at position s−1 are those that sampled step s. The
        // guided pair is one batch: row 0 with the text, row 1 with the null condition.
        Ok((step_tensor(&steps, 0..s_len - 1, if guided { 2 } else { 1 }, &model.device)?, 1))
    }

    fn lm_head_value(&self, model: &MusicGen, logits: &Tensor, prepared: &Prepared, part: usize) -> Result<Tensor> {
        let cfg = &model.cfg.lm;
        let pattern = model.pattern();
        let window = window(prepared, part)?;
        let s_len = pattern.num_steps(window.frames[0].len());
        let start = pattern.first_step_after_prompt(window.prompt_len);
        let logits = if self.settings.guidance_scale != 1.0 {
            let c = logits.get(0)?;
            let u = logits.get(1)?;
            (&u + ((c - &u)? * self.settings.guidance_scale)?)?
        } else {
            logits.get(0)?
        };
        let sampled = logits.narrow(1, start - 1, s_len - start)?;
        // (1/T) Σ_s mean_{k,c} L_s over this window's sampling steps.
        let scale = (cfg.n_q * cfg.card * prepared.generation.num_frames()) as f64;
        Ok((sampled.sum_all()? / scale)?)
    }
}

/// Settings of the `audio-nll` objective (constants of this implementation, stored so
/// that files made another way are told apart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioNllSettings {
    /// What f is.
    pub loss: String,
    /// How the text enters.
    pub condition: String,
    /// How pieces longer than the model's window are scored.
    pub windows: String,
    /// How audio files reach the model's rate.
    pub resampler: String,
}

impl Default for AudioNllSettings {
    fn default() -> Self {
        Self {
            loss: "mean over codebooks of the mean -log p(code) over each codebook's frames, teacher-forced over the delay pattern".into(),
            condition: "description, no guidance, no dropout".into(),
            windows: "consecutive windows of the model's length, averaged weighted by frames".into(),
            resampler: "Kaiser-windowed sinc, beta 10, 48 zero crossings, cut-off 0.95 of the lower Nyquist".into(),
        }
    }
}

/// MusicGen's training loss on an example's codes: `f = Σ_w (T_w/T) · nll_w`, the
/// frame-weighted mean over consecutive windows of the per-codebook-averaged negative
/// log-likelihood (`musicgen::loss`). Codes come from the example's audio (EnCodec
/// encoder and residual quantiser) or, for a track to generate, from the generation
/// itself (no re-encoding).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AudioNllObjective {
    pub settings: AudioNllSettings,
    /// How tracks without audio are generated (`None`: such examples are refused).
    pub generation: Option<GenerationSettings>,
}

impl AudioNllObjective {
    /// The objective for commands that also generate their queries.
    pub fn generating(opts: &GenerateOptions) -> Self {
        Self {
            settings: AudioNllSettings::default(),
            generation: Some(GenerationObjective::from_options(opts).settings),
        }
    }
}

/// The audio-nll preparation of known codes `[K][T]`: consecutive windows of the model's
/// length, conditioned on `t5`.
pub fn prepared_from_codes(model: &MusicGen, frames: Vec<Vec<u32>>, t5: Tensor) -> Result<Prepared> {
    let total = frames.first().map_or(0, Vec::len);
    if total == 0 || frames.len() != model.cfg.lm.n_q {
        bail!("expected {} codebooks of at least one frame", model.cfg.lm.n_q);
    }
    let windows = consecutive_windows(total, window_frames(model))
        .into_iter()
        .map(|(a, b)| Window { prompt_len: 0, frames: frames.iter().map(|r| r[a..b].to_vec()).collect() })
        .collect();
    let duration = total as f64 / model.cfg.frame_rate();
    Ok(Prepared::new(Generation { frames, windows }, t5, duration))
}

/// The checkpoint's EnCodec encoder (needed to score or train on audio).
pub fn codec_encoder(model: &MusicGen) -> Result<CodecEncoder> {
    CodecEncoder::new(&model.cfg.codec, model.codec_params.vb(true).pp("encoder"))
        .context("the checkpoint has no EnCodec encoder weights, which scoring or training on audio needs")
}

/// EnCodec codes `[K][T]` of audio `[channels][samples]` at the model's rate.
pub fn encode_with(model: &MusicGen, encoder: &CodecEncoder, channels: &[Vec<f32>]) -> Result<Vec<Vec<u32>>> {
    let len = channels.first().map_or(0, Vec::len);
    let audio = Tensor::from_vec(channels.concat(), (channels.len(), len), &Device::Cpu)?
        .to_dtype(model.codec_params.dtype())?;
    Ok(model.codec.encode(encoder, &audio, model.cfg.audio_channels)?.to_vec2()?)
}

/// `encode_with` the checkpoint's encoder, for one piece.
pub fn encode_audio(model: &MusicGen, channels: &[Vec<f32>]) -> Result<Vec<Vec<u32>>> {
    encode_with(model, &codec_encoder(model)?, channels)
}

impl Objective for AudioNllObjective {
    fn info(&self) -> ObjectiveInfo {
        ObjectiveInfo {
            name: ObjectiveKind::AudioNll.name().into(),
            settings: serde_json::to_value(&self.settings).unwrap_or(serde_json::Value::Null),
        }
    }

    fn differentiates_codec(&self) -> bool {
        false
    }

    fn generated_with(&self) -> Option<serde_json::Value> {
        self.generation.as_ref().and_then(|g| serde_json::to_value(g).ok())
    }

    fn prepare(&self, model: &MusicGen, example: &Example, progress: Option<&ProgressBar>) -> Result<Prepared> {
        match &example.audio {
            Some(a) => {
                let t5 = model.encode_text(&example.prompt)?;
                let rate = model.cfg.sample_rate() as u32;
                let excerpt =
                    crate::audio::read_excerpt(&a.path, rate, model.cfg.audio_channels, a.offset, a.duration)?;
                let frames = encode_audio(model, &excerpt.channels)
                    .with_context(|| format!("{}: encoding", a.path.display()))?;
                if frames.first().is_none_or(Vec::is_empty) {
                    bail!(
                        "{}: the excerpt is shorter than one codec frame ({:.4} s)",
                        a.path.display(),
                        1.0 / model.cfg.frame_rate()
                    );
                }
                let mut prepared = prepared_from_codes(model, frames, t5)?;
                prepared.duration = excerpt.channels[0].len() as f64 / rate as f64;
                prepared.warnings = excerpt.warnings;
                Ok(prepared)
            }
            None => {
                let settings = self.generation.as_ref().context(
                    "this example has no audio, and the audio-nll objective was not given generation settings",
                )?;
                let gen = GenerationObjective { settings: settings.clone() };
                let generation =
                    model.generate(&example.prompt, example.duration, &gen.options(example.seed), progress)?;
                self.prepared_from_generation(model, example, generation)
            }
        }
    }

    fn generation_settings(&self) -> Option<&GenerationSettings> {
        self.generation.as_ref()
    }

    fn prepared_from_generation(
        &self,
        model: &MusicGen,
        example: &Example,
        generation: Generation,
    ) -> Result<Prepared> {
        let mut prepared = prepared_from_codes(model, generation.frames, model.encode_text(&example.prompt)?)?;
        prepared.duration = example.duration;
        Ok(prepared)
    }

    fn codec_inputs(&self, _: &MusicGen, _: &Prepared) -> Result<Vec<Tensor>> {
        Ok(Vec::new())
    }

    fn codec_head_value(&self, _: &MusicGen, _: &Tensor, _: &Prepared) -> Result<Tensor> {
        bail!("the audio-nll objective does not involve the codec decoder")
    }

    fn lm_parts(&self, prepared: &Prepared) -> usize {
        prepared.generation.windows.len()
    }

    fn lm_input(&self, model: &MusicGen, prepared: &Prepared, part: usize) -> Result<(Tensor, usize)> {
        let w = window(prepared, part)?;
        Ok((TeacherForced::new(&model.pattern(), &w.frames, model.lm_params.dtype(), &model.device)?.input, 1))
    }

    fn lm_head_value(&self, model: &MusicGen, logits: &Tensor, prepared: &Prepared, part: usize) -> Result<Tensor> {
        let w = window(prepared, part)?;
        let tf = TeacherForced::new(&model.pattern(), &w.frames, model.lm_params.dtype(), &model.device)?;
        let weight = w.frames[0].len() as f64 / prepared.generation.num_frames() as f64;
        Ok((tf.per_codebook_nll(logits)?.mean_all()? * weight)?)
    }
}

/// Prepares several examples, generating those without audio together (`generate_batch`:
/// one forward pass per decoding step for a run of examples of one duration). Each
/// preparation is exactly what `objective.prepare` gives the example alone; a batch that
/// fails is retried one example at a time, so that each failure is the example's own.
pub fn prepare_batch(
    objective: &dyn Objective,
    model: &MusicGen,
    examples: &[Example],
    progress: Option<&ProgressBar>,
) -> Vec<Result<Prepared>> {
    let batchable = |e: &Example| e.audio.is_none();
    if let (Some(settings), true) = (objective.generation_settings(), examples.len() > 1) {
        if examples.iter().all(batchable) && examples.iter().all(|e| e.duration == examples[0].duration) {
            let gen = GenerationObjective { settings: settings.clone() };
            let prompts: Vec<&str> = examples.iter().map(|e| e.prompt.as_str()).collect();
            let opts: Vec<GenerateOptions> = examples.iter().map(|e| gen.options(e.seed)).collect();
            if let Ok(generations) = model.generate_batch(&prompts, examples[0].duration, &opts, progress) {
                return examples
                    .iter()
                    .zip(generations)
                    .map(|(e, g)| objective.prepared_from_generation(model, e, g))
                    .collect();
            }
        }
    }
    examples.iter().map(|e| objective.prepare(model, e, progress)).collect()
}

fn window(prepared: &Prepared, part: usize) -> Result<&Window> {
    prepared
        .generation
        .windows
        .get(part)
        .ok_or_else(|| anyhow::anyhow!("window {part} of {}", prepared.generation.windows.len()))
}

/// The objective of `kind`; `generate` says how tracks without audio are generated.
pub fn objective_of(kind: ObjectiveKind, generate: &GenerateOptions) -> Box<dyn Objective> {
    match kind {
        ObjectiveKind::AudioNll => Box::new(AudioNllObjective::generating(generate)),
        ObjectiveKind::Generation => Box::new(GenerationObjective::from_options(generate)),
    }
}
