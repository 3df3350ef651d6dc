//! What is differentiated. An objective prepares an example (e.g. generates it) and
//! then gives two scalars: one that depends on the codec decoder's parameters and one
//! on the LM's. New objectives (audio NLL, ...) are one more implementation of the trait.

use anyhow::Result;
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::musicgen::codec::Codec;
use crate::musicgen::lm::Lm;
use crate::musicgen::sampling::Sampler;
use crate::musicgen::{GenerateOptions, Generation, MusicGen};
use crate::store::embedding_file::ObjectiveInfo;

/// One example to embed.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub name: String,
    pub prompt: String,
    pub duration: f64,
    pub seed: u64,
    pub source: Option<String>,
}

impl Example {
    /// The example a stored row describes.
    pub fn from_record(r: &crate::store::Record) -> Self {
        Self {
            name: r.name.clone(),
            prompt: r.prompt.clone(),
            duration: r.duration,
            seed: r.seed,
            source: r.source.clone(),
        }
    }
}

/// What an objective computed before differentiating: the codes and the text states.
pub struct Prepared {
    pub generation: Generation,
    /// Frozen T5 states `[1, L, cond_dim]`.
    pub t5: Tensor,
}

/// A differentiable objective over MusicGen.
pub trait Objective: Send + Sync {
    /// Name and every setting the embedding depends on (stored in file headers).
    fn info(&self) -> ObjectiveInfo;
    /// Work done without gradients (generation, encoding).
    fn prepare(&self, model: &MusicGen, example: &Example, progress: Option<&ProgressBar>) -> Result<Prepared>;
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

impl GenerationObjective {
    fn window<'a>(&self, prepared: &'a Prepared, part: usize) -> Result<&'a crate::musicgen::model::Window> {
        prepared
            .generation
            .windows
            .get(part)
            .ok_or_else(|| anyhow::anyhow!("window {part} of {}", prepared.generation.windows.len()))
    }
}

impl Objective for GenerationObjective {
    fn info(&self) -> ObjectiveInfo {
        ObjectiveInfo {
            name: "generation".into(),
            settings: serde_json::to_value(&self.settings).unwrap_or(serde_json::Value::Null),
        }
    }

    fn prepare(&self, model: &MusicGen, example: &Example, progress: Option<&ProgressBar>) -> Result<Prepared> {
        let generation = model.generate(&example.prompt, example.duration, &self.options(example.seed), progress)?;
        Ok(Prepared { generation, t5: model.encode_text(&example.prompt)? })
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
        let window = self.window(prepared, part)?;
        let steps = model.pattern().build(&window.frames);
        let s_len = steps[0].len();
        // Teacher forcing: the logits at position s−1 are those that sampled step s. The
        // guided pair is one batch: row 0 with the text, row 1 with the null condition.
        Ok((step_tensor(&steps, 0..s_len - 1, if guided { 2 } else { 1 }, &model.device)?, 1))
    }

    fn lm_head_value(&self, model: &MusicGen, logits: &Tensor, prepared: &Prepared, part: usize) -> Result<Tensor> {
        let cfg = &model.cfg.lm;
        let pattern = model.pattern();
        let window = self.window(prepared, part)?;
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
