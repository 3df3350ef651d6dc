//! Fine-tuning a MusicGen's LM on audio with descriptions, as MusicGen trains: EnCodec
//! codes of the audio laid out in the delay pattern, teacher-forced cross-entropy per
//! codebook over the pattern's valid positions (averaged over codebooks), the text
//! condition dropped now and then (so guidance keeps working), AdamW.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressBar;

use crate::attribution::objective::{codec_encoder, encode_with};
use crate::audio::{read_audio, to_model_format};
use crate::dataset::walk;
use crate::musicgen::lm::Lm;
use crate::musicgen::MusicGen;
use crate::rng;

/// Training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneOptions {
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Longest training segment in seconds (default: the model's window).
    pub segment: Option<f64>,
    /// Probability of replacing the description by the null condition.
    pub cond_dropout: f64,
    /// Every step on the mean loss of all examples (deterministic: no order, no segment
    /// choice) instead of one example per step.
    pub full_batch: bool,
}

/// One encoded training example.
#[derive(Clone)]
pub struct EncodedExample {
    pub name: String,
    pub t5: Tensor,
    /// `[K][T]` codes.
    pub codes: Vec<Vec<u32>>,
}

/// Reads, converts and EnCodec-encodes every example of a dataset folder.
pub fn encode_dataset(model: &MusicGen, input: &std::path::Path) -> Result<Vec<EncodedExample>> {
    let ds = walk(input)?;
    if ds.examples.is_empty() {
        bail!("{}: no training examples (audio files with a same-stem .json description)", input.display());
    }
    let encoder = codec_encoder(model)?;
    let mut out = Vec::with_capacity(ds.examples.len());
    for ex in &ds.examples {
        let (description, _) = ex.read_description(None)?;
        let (channels, rate) = read_audio(&ex.audio)?;
        let channels = to_model_format(channels, rate, model.cfg.sample_rate() as u32, model.cfg.audio_channels)
            .with_context(|| ex.rel_path.clone())?;
        let codes = encode_with(model, &encoder, &channels)?;
        if codes[0].len() < 2 {
            bail!("{}: too short to train on", ex.rel_path);
        }
        out.push(EncodedExample { name: ex.rel_path.clone(), t5: model.encode_text(&description)?, codes });
    }
    Ok(out)
}

/// Mean per-codebook cross-entropy of `frames` under the LM (MusicGen's training loss,
/// `musicgen::loss`); `conditioned` picks the text or the null condition.
pub fn nll(model: &MusicGen, lm: &Lm, t5: &Tensor, frames: &[Vec<u32>], conditioned: bool) -> Result<Tensor> {
    Ok(crate::musicgen::loss::window_nll(model, lm, t5, frames, conditioned)?.0)
}

/// Trains the LM in place; returns the loss of every step.
pub fn finetune(
    model: &MusicGen,
    data: &[EncodedExample],
    opts: &FinetuneOptions,
    pb: &ProgressBar,
) -> Result<Vec<f64>> {
    if data.is_empty() {
        bail!("nothing to train on");
    }
    let lm = Lm::new(&model.cfg.lm, model.lm_params.vb(false))?;
    let vars: Vec<candle_core::Var> = model.lm_params.params().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW { lr: opts.lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: opts.weight_decay },
    )?;
    let window = model.frames_for(model.cfg.generation.window_seconds).max(2);
    let segment = opts.segment.map_or(window, |s| model.frames_for(s).clamp(2, window));
    pb.set_length(opts.steps as u64);
    let mut losses = Vec::new();
    for step in 0..opts.steps {
        let loss = if opts.full_batch {
            let mut total: Option<Tensor> = None;
            for (i, ex) in data.iter().enumerate() {
                let len = segment.min(ex.codes[0].len());
                let frames: Vec<Vec<u32>> = ex.codes.iter().map(|r| r[..len].to_vec()).collect();
                let conditioned = rng::uniform(opts.seed, &[step as u64, 2, i as u64]) >= opts.cond_dropout;
                let l = nll(model, &lm, &ex.t5, &frames, conditioned)?;
                total = Some(match total {
                    None => l,
                    Some(t) => (t + l)?,
                });
            }
            (total.ok_or_else(|| anyhow::anyhow!("nothing to train on"))? / data.len() as f64)?
        } else {
            let ex = &data[step % data.len()];
            let t = ex.codes[0].len();
            let len = segment.min(t);
            let offset = ((rng::uniform(opts.seed, &[step as u64, 1]) * (t - len + 1) as f64) as usize).min(t - len);
            let frames: Vec<Vec<u32>> = ex.codes.iter().map(|r| r[offset..offset + len].to_vec()).collect();
            let conditioned = rng::uniform(opts.seed, &[step as u64, 2]) >= opts.cond_dropout;
            nll(model, &lm, &ex.t5, &frames, conditioned)?
        };
        opt.backward_step(&loss)?;
        let l = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !l.is_finite() {
            bail!("the loss diverged at step {step}; lower --lr");
        }
        losses.push(l);
        pb.set_message(format!("loss {l:.3}"));
        pb.inc(1);
    }
    Ok(losses)
}
