//! A whole MusicGen: T5 conditioning, the LM, EnCodec, and generation as audiocraft
//! does it (classifier-free guidance, delay pattern, KV cache, windowed extension).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;

use super::codec::Codec;
use super::config::MusicgenConfig;
use super::lm::Lm;
use super::params::ParamStore;
use super::pattern::DelayPattern;
use super::sampling::Sampler;
use super::t5::{T5Encoder, TextTokenizer};

/// Longest piece any command handles, seconds: beyond it the step count (and the time)
/// is out of reach on any machine this runs on (50 frames/s: 180,000 decoding steps).
pub const MAX_SECONDS: f64 = 3600.0;

/// Options of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub sampler: Sampler,
    pub guidance_scale: f64,
    /// Seconds the next window advances by when extending beyond the model's window.
    pub extend_stride: f64,
}

/// One window of a (possibly extended) generation: the frames it saw as prompt and the
/// frames it produced, all `[K][prompt_len + new]`. Enough to replay the window
/// teacher-forced.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub prompt_len: usize,
    pub frames: Vec<Vec<u32>>,
}

/// Generated codes.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// `[K][T]` frames of the whole piece.
    pub frames: Vec<Vec<u32>>,
    pub windows: Vec<Window>,
}

impl Generation {
    pub fn num_frames(&self) -> usize {
        self.frames.first().map_or(0, Vec::len)
    }
    pub fn frames_tensor(&self, device: &Device) -> Result<Tensor> {
        let k = self.frames.len();
        let t = self.num_frames();
        let flat: Vec<u32> = self.frames.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (k, t), device)?)
    }
}

/// Planned windows: `(offset, prompt_len, total_len)` in frames, audiocraft's loop.
pub fn plan_windows(total: usize, window: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    if total <= window {
        return vec![(0, 0, total)];
    }
    let mut plan = Vec::new();
    let (mut offset, mut prompt) = (0usize, 0usize);
    while offset + prompt < total {
        let len = (total - offset).min(window);
        plan.push((offset, prompt, len));
        prompt = len.saturating_sub(stride);
        offset += stride;
    }
    plan
}

/// A loaded MusicGen.
pub struct MusicGen {
    pub cfg: MusicgenConfig,
    pub tokenizer: TextTokenizer,
    pub t5: T5Encoder,
    /// LM parameters (audiocraft names, model order).
    pub lm_params: ParamStore,
    /// Codec tensors; its parameters are the decoder's.
    pub codec_params: ParamStore,
    /// The frozen T5's tensors.
    pub t5_params: ParamStore,
    /// Inference copies (no autograd graph is built through them).
    pub lm: Lm,
    pub codec: Codec,
    pub device: Device,
    /// Where the model came from, for messages and provenance.
    pub source: String,
}

impl MusicGen {
    pub fn new(
        cfg: MusicgenConfig,
        tokenizer: TextTokenizer,
        t5_params: &ParamStore,
        lm_params: ParamStore,
        codec_params: ParamStore,
        source: String,
    ) -> Result<Self> {
        cfg.validate()?;
        let device = lm_params.device().clone();
        let t5 = T5Encoder::new(&cfg.t5, t5_params.vb(true))?;
        let lm = Lm::new(&cfg.lm, lm_params.vb(true))?;
        lm_params.ensure_all_claimed(&[])?;
        let codec = Codec::new(&cfg.codec, codec_params.vb(true))?;
        if tokenizer.vocab_size() > cfg.t5.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the T5 embedding only {} rows; tokenizer and T5 weights do not belong together",
                tokenizer.vocab_size(),
                cfg.t5.vocab_size
            );
        }
        Ok(Self {
            cfg,
            tokenizer,
            t5,
            lm_params,
            codec_params,
            t5_params: t5_params.clone(),
            lm,
            codec,
            device,
            source,
        })
    }

    pub fn pattern(&self) -> DelayPattern {
        DelayPattern::new(self.cfg.lm.delays.clone(), self.cfg.lm.special_token())
    }

    /// T5 states `[1, L, cond_dim]` of a prompt (frozen, outside any gradient).
    pub fn encode_text(&self, prompt: &str) -> Result<Tensor> {
        if prompt.trim().is_empty() {
            bail!("the prompt is empty: describe the music to generate, e.g. --prompt \"calm piano melody\"");
        }
        let ids = self.tokenizer.encode(prompt)?;
        // T5's cost grows with the square of the length; t5-base was trained on 512 tokens.
        if ids.len() > 512 {
            bail!("the prompt is {} tokens long; at most 512 are supported (T5's length)", ids.len());
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.t5.vocab_size) {
            bail!("token id {bad} is outside the T5 vocabulary ({})", self.cfg.t5.vocab_size);
        }
        self.t5.forward(&ids)
    }

    /// Frames for `duration` seconds.
    pub fn frames_for(&self, duration: f64) -> usize {
        (duration * self.cfg.frame_rate()).floor() as usize
    }

    pub fn default_extend_stride(&self) -> f64 {
        // audiocraft's 18 s for its 30 s window; smaller windows keep the same proportion.
        let w = self.cfg.generation.window_seconds;
        if w >= 30.0 {
            18.0
        } else {
            w * 0.6
        }
    }

    /// Generates the codes of `duration` seconds of audio for `prompt`.
    pub fn generate(
        &self,
        prompt: &str,
        duration: f64,
        opts: &GenerateOptions,
        progress: Option<&ProgressBar>,
    ) -> Result<Generation> {
        let mut one = self.generate_batch(&[prompt], duration, std::slice::from_ref(opts), progress)?;
        one.pop().ok_or_else(|| anyhow::anyhow!("no generation"))
    }

    /// Generates several tracks of one duration together: each decoding step is one
    /// forward pass over all of them, so the weights are read once per step for the
    /// batch. Track `i` uses `prompts[i]` and `opts[i]` (which may differ only in the
    /// sampling seed), and its codes are exactly those `generate` gives it alone: every
    /// row goes through the same per-row arithmetic (see `gemv` and `Lm::conditioning_each`).
    pub fn generate_batch(
        &self,
        prompts: &[&str],
        duration: f64,
        opts: &[GenerateOptions],
        progress: Option<&ProgressBar>,
    ) -> Result<Vec<Generation>> {
        if duration.is_nan() || duration <= 0.0 || !duration.is_finite() {
            bail!("the duration must be a positive number of seconds, got {duration}");
        }
        if duration > MAX_SECONDS {
            bail!(
                "{duration} s is longer than the {MAX_SECONDS} s limit ({:.0} decoding steps); split the piece",
                duration * self.cfg.frame_rate()
            );
        }
        let Some(first) = opts.first() else { bail!("nothing to generate") };
        if opts.len() != prompts.len() {
            bail!("{} prompts with {} sets of options", prompts.len(), opts.len());
        }
        let same = |o: &GenerateOptions| {
            o.guidance_scale == first.guidance_scale
                && o.extend_stride == first.extend_stride
                && Sampler { seed: first.sampler.seed, ..o.sampler.clone() } == first.sampler
        };
        if !opts.iter().all(same) {
            bail!("a batch of generations shares its sampling settings (only the seeds may differ)");
        }
        let total = self.frames_for(duration);
        if total == 0 {
            bail!("{duration} s is shorter than one frame ({} frames per second)", self.cfg.frame_rate());
        }
        let window = self.frames_for(self.cfg.generation.window_seconds).max(1);
        let stride = (self.cfg.frame_rate() * first.extend_stride).floor() as usize;
        if total > window && (stride == 0 || stride >= window) {
            bail!(
                "the extend stride ({} s) must be positive and shorter than the model's window ({} s)",
                first.extend_stride,
                self.cfg.generation.window_seconds
            );
        }
        let states =
            prompts.iter().map(|p| self.lm.project_condition(&self.encode_text(p)?)).collect::<Result<Vec<_>>>()?;
        let plan = plan_windows(total, window, stride);
        let pattern = self.pattern();
        if let Some(pb) = progress {
            let steps: usize =
                plan.iter().map(|&(_, p, len)| pattern.num_steps(len) - pattern.first_step_after_prompt(p)).sum();
            pb.set_length(steps as u64);
        }
        let guided = first.guidance_scale != 1.0;
        let cond = self.lm.conditioning_each(&states)?;
        let n_q = self.cfg.lm.n_q;
        let mut out: Vec<Generation> = prompts
            .iter()
            .map(|_| Generation {
                frames: vec![Vec::with_capacity(total); n_q],
                windows: Vec::with_capacity(plan.len()),
            })
            .collect();
        let mut prompt_frames: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); n_q]; prompts.len()];
        for (wi, &(_, prompt_len, len)) in plan.iter().enumerate() {
            let frames =
                super::on_pool(|| self.generate_window(&cond, guided, &prompt_frames, len, wi as u64, opts, progress))?;
            for ((gen, frames), next) in out.iter_mut().zip(frames).zip(prompt_frames.iter_mut()) {
                for (k, row) in frames.iter().enumerate() {
                    gen.frames[k].extend_from_slice(&row[prompt_len..]);
                }
                // The next window is prompted with this one minus its first `stride` frames.
                *next = frames.iter().map(|r| r[stride.min(r.len())..].to_vec()).collect();
                gen.windows.push(Window { prompt_len, frames });
            }
        }
        Ok(out)
    }

    /// One window of every track in the batch: `len` frames, the first `prompt[i]` ones
    /// given. Rows of the forward pass: the tracks with their text, then (guided) the
    /// same tracks with the null condition.
    #[allow(clippy::too_many_arguments)]
    fn generate_window(
        &self,
        cond: &super::lm::Conditioning,
        guided: bool,
        prompts: &[Vec<Vec<u32>>],
        len: usize,
        window_index: u64,
        opts: &[GenerateOptions],
        progress: Option<&ProgressBar>,
    ) -> Result<Vec<Vec<Vec<u32>>>> {
        const UNKNOWN: u32 = u32::MAX;
        let pattern = self.pattern();
        let k_n = pattern.n_q();
        let tracks = prompts.len();
        let prompt_len = prompts.first().and_then(|p| p.first()).map_or(0, Vec::len);
        let s_len = pattern.num_steps(len);
        // Each track's step sequence: known prompt frames, special tokens where no frame exists.
        let mut seqs: Vec<Vec<Vec<u32>>> = prompts
            .iter()
            .map(|prompt| {
                (0..k_n)
                    .map(|k| {
                        (0..s_len)
                            .map(|s| match pattern.frame_at(k, s, len) {
                                None => pattern.special,
                                Some(t) if t < prompt_len => prompt[k][t],
                                Some(_) => UNKNOWN,
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let rows = if guided { 2 * tracks } else { tracks };
        let mut cache = self.lm.new_cache(s_len);
        let start = pattern.first_step_after_prompt(prompt_len);
        let mut prev = 0;
        let card = self.cfg.lm.card;
        for offset in start..s_len {
            // Feed steps prev..offset (the whole prefix on the first call).
            let width = offset - prev;
            let mut input = Vec::with_capacity(rows * k_n * width);
            for r in 0..rows {
                for row in &seqs[r % tracks] {
                    input.extend_from_slice(&row[prev..offset]);
                }
            }
            let input = Tensor::from_vec(input, (rows, k_n, width), &self.device)?;
            let logits = self.lm.forward(&input, cond, Some(&mut cache))?; // [rows, K, w, card]
            let last = logits.narrow(2, width - 1, 1)?.squeeze(2)?; // [rows, K, card]
            for (t, seq) in seqs.iter_mut().enumerate() {
                let guided_logits = if guided {
                    let c = last.get(t)?;
                    let u = last.get(tracks + t)?;
                    (&u + ((c - &u)? * opts[t].guidance_scale)?)?
                } else {
                    last.get(t)?
                };
                let logit_rows: Vec<Vec<f32>> = guided_logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
                for (k, row) in logit_rows.iter().enumerate() {
                    debug_assert_eq!(row.len(), card);
                    if seq[k][offset] == UNKNOWN {
                        seq[k][offset] = if pattern.frame_at(k, offset, len).is_some() {
                            opts[t].sampler.sample(row, &[window_index, offset as u64, k as u64])
                        } else {
                            pattern.special
                        };
                    }
                }
            }
            prev = offset;
            if let Some(pb) = progress {
                pb.inc(1);
            }
        }
        Ok(seqs.iter().map(|seq| pattern.revert(seq, len)).collect())
    }

    /// Decodes frames `[K][T]` into audio `[channels, samples]` (before loudness normalisation).
    pub fn decode(&self, frames: &[Vec<u32>]) -> Result<Tensor> {
        let k = frames.len();
        let t = frames.first().map_or(0, Vec::len);
        let flat: Vec<u32> = frames.iter().flatten().copied().collect();
        if let Some(&bad) = flat.iter().find(|&&c| c as usize >= self.cfg.codec.card) {
            bail!("code {bad} is not a codebook entry (card {})", self.cfg.codec.card);
        }
        let codes = Tensor::from_vec(flat, (k, t), &self.device)?;
        self.codec.decode(&codes, self.cfg.audio_channels)
    }
}

impl MusicGen {
    /// Bytes of the weights loaded so far (T5, LM, codec; the codec's encoder once built).
    pub fn loaded_bytes(&self) -> u64 {
        [&self.t5_params, &self.lm_params, &self.codec_params].iter().map(|s| s.claimed_bytes()).sum()
    }

    /// A hash of everything that shapes a gradient embedding: the model config (minus
    /// sampling defaults), and every tensor of the codec decoder, the LM, the codebooks
    /// and the T5 encoder, in canonical names and order. The same weights give the same
    /// fingerprint whichever checkpoint layout they were loaded from.
    pub fn fingerprint(&self) -> Result<String> {
        use xxhash_rust::xxh3::Xxh3;
        let mut h = Xxh3::new();
        let shape = serde_json::json!({
            "lm": self.cfg.lm, "codec": self.cfg.codec, "t5": self.cfg.t5, "audio_channels": self.cfg.audio_channels,
        });
        h.update(shape.to_string().as_bytes());
        let mut feed = |name: &str, t: &Tensor| -> Result<()> {
            h.update(name.as_bytes());
            for d in t.dims() {
                h.update(&(*d as u64).to_le_bytes());
            }
            let v: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            for x in v {
                h.update(&x.to_le_bytes());
            }
            Ok(())
        };
        for store in [&self.codec_params, &self.lm_params, &self.t5_params] {
            let claimed = store.claimed();
            let mut names: Vec<&String> = claimed.keys().collect();
            names.sort();
            // The codec's encoder never enters an embedding: leave it out, so that building
            // it (to encode training audio) does not change the fingerprint.
            for n in names.into_iter().filter(|n| !n.starts_with("encoder.")) {
                feed(n, &claimed[n])?;
            }
        }
        Ok(format!("xxh3:{:032x}", h.digest128()))
    }
}

#[cfg(test)]
mod tests {
    use super::plan_windows;

    #[test]
    fn windows_follow_audiocraft() {
        // 50 fps, 30 s window, 18 s stride, 60 s: windows at 0, 18 and 36 s.
        let plan = plan_windows(3000, 1500, 900);
        assert_eq!(plan, vec![(0, 0, 1500), (900, 600, 1500), (1800, 600, 1200)]);
        let new: usize = plan.iter().map(|&(_, p, l)| l - p).sum();
        assert_eq!(new, 3000);
        assert_eq!(plan_windows(100, 1500, 900), vec![(0, 0, 100)]);
    }
}
