//! Hyper-parameters of a MusicGen: the language model, the EnCodec codec, the T5 text
//! encoder and the generation defaults, read from either checkpoint layout.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The transformer language model over codebook tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    pub dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub ffn_dim: usize,
    /// Number of codebooks the LM models (4 mono, 8 for interleaved stereo).
    pub n_q: usize,
    /// Codebook size; token `card` is the special (start / pad) token.
    pub card: usize,
    /// Delay of each codebook in the "delay" interleaving pattern.
    pub delays: Vec<usize>,
    /// Width of the text-encoder states fed to the conditioning projection.
    pub cond_dim: usize,
    /// Whether a learned projection maps text states to `dim` (always in audiocraft).
    pub cond_proj: bool,
    pub norm_eps: f64,
    pub max_period: f64,
    /// Multiply summed embeddings by sqrt(dim) (transformers' `scale_embedding`).
    pub scale_embedding: bool,
}

impl LmConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }
    pub fn max_delay(&self) -> usize {
        self.delays.iter().copied().max().unwrap_or(0)
    }
    pub fn special_token(&self) -> u32 {
        self.card as u32
    }
}

/// How convolutions pad their input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadMode {
    Reflect,
    Constant,
}

/// The EnCodec codec (SEANet decoder + residual vector quantiser).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodecConfig {
    pub sample_rate: usize,
    /// Channels of the codec itself (1 for encodec_32khz, also under stereo MusicGen).
    pub channels: usize,
    /// Width of the latent space (`hidden_size` / SEANet `dimension`).
    pub dimension: usize,
    pub n_filters: usize,
    /// Upsampling ratios in decoder order.
    pub ratios: Vec<usize>,
    pub kernel_size: usize,
    pub last_kernel_size: usize,
    pub residual_kernel_size: usize,
    pub dilation_base: usize,
    pub n_residual_layers: usize,
    pub lstm_layers: usize,
    pub compress: usize,
    /// A 1×1 convolution on the residual shortcut (audiocraft `true_skip: false`).
    pub conv_shortcut: bool,
    pub pad_mode: PadMode,
    pub causal: bool,
    pub trim_right_ratio: f64,
    pub n_q: usize,
    pub card: usize,
    pub codebook_dim: usize,
}

impl CodecConfig {
    pub fn hop_length(&self) -> usize {
        self.ratios.iter().product()
    }
    /// Frames per second (ceil, as transformers computes it).
    pub fn frame_rate(&self) -> f64 {
        (self.sample_rate as f64 / self.hop_length() as f64).ceil()
    }
}

/// Feed-forward kind of a T5 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum T5FeedForward {
    Relu,
    GatedGelu,
}

/// The T5 text encoder (frozen; conditioning only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward: T5FeedForward,
}

/// Sampling defaults stored with the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationDefaults {
    pub guidance_scale: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub temperature: f64,
    pub use_sampling: bool,
    /// The longest piece the LM generates at once (audiocraft `segment_duration`).
    pub window_seconds: f64,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self { guidance_scale: 3.0, top_k: 250, top_p: 0.0, temperature: 1.0, use_sampling: true, window_seconds: 30.0 }
    }
}

/// Everything needed to build a MusicGen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MusicgenConfig {
    pub lm: LmConfig,
    pub codec: CodecConfig,
    pub t5: T5Config,
    pub generation: GenerationDefaults,
    /// Channels of the generated audio: 1, or 2 for interleaved-stereo MusicGen.
    pub audio_channels: usize,
}

impl MusicgenConfig {
    pub fn sample_rate(&self) -> usize {
        self.codec.sample_rate
    }
    pub fn frame_rate(&self) -> f64 {
        self.codec.frame_rate()
    }

    /// Checks that the parts fit together, so that a bad config fails at load time with
    /// a message instead of deep inside a matmul.
    pub fn validate(&self) -> Result<()> {
        let lm = &self.lm;
        if lm.dim == 0 || lm.num_heads == 0 || !lm.dim.is_multiple_of(lm.num_heads) {
            bail!("LM width {} is not divisible by its {} heads", lm.dim, lm.num_heads);
        }
        if lm.delays.len() != lm.n_q {
            bail!("the LM has {} codebooks but {} codebook delays", lm.n_q, lm.delays.len());
        }
        if self.audio_channels == 0 || self.audio_channels > 2 {
            bail!("{} audio channels are not supported (1 = mono, 2 = stereo)", self.audio_channels);
        }
        if lm.n_q != self.codec.n_q * self.audio_channels {
            bail!(
                "the LM models {} codebooks but the codec has {} codebooks × {} channel(s)",
                lm.n_q,
                self.codec.n_q,
                self.audio_channels
            );
        }
        if lm.card != self.codec.card {
            bail!("LM card {} differs from the codec's codebook size {}", lm.card, self.codec.card);
        }
        if self.codec.ratios.is_empty() || self.codec.ratios.contains(&0) {
            bail!("codec upsampling ratios {:?} are invalid", self.codec.ratios);
        }
        if self.codec.channels != 1 {
            bail!("only mono codecs are supported (stereo MusicGen interleaves two mono streams)");
        }
        if self.t5.num_heads == 0 || self.t5.num_layers == 0 {
            bail!("the T5 config has no heads or no layers");
        }
        if lm.cond_dim != self.t5.d_model {
            bail!("the LM expects {}-wide text states but T5 gives {}", lm.cond_dim, self.t5.d_model);
        }
        Ok(())
    }
}

/// Bits of one code: `ceil(log2(card))`.
fn bits_per_code(card: usize) -> f64 {
    (card.max(2) as f64).log2().ceil()
}

/// Reads a field of a JSON object as an unsigned integer.
pub(crate) fn json_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .with_context(|| format!("missing or non-integer field `{key}`"))
}

fn json_usize_or(v: &Value, key: &str, default: usize) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_u64().map(|x| x as usize).with_context(|| format!("field `{key}` is not an integer")),
    }
}

fn json_f64_or(v: &Value, key: &str, default: f64) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_f64().with_context(|| format!("field `{key}` is not a number")),
    }
}

fn json_bool_or(v: &Value, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_bool().with_context(|| format!("field `{key}` is not a boolean")),
    }
}

fn json_usizes(v: &Value, key: &str) -> Result<Vec<usize>> {
    let arr = v.get(key).and_then(Value::as_array).with_context(|| format!("missing list field `{key}`"))?;
    arr.iter().map(|x| x.as_u64().map(|x| x as usize).with_context(|| format!("`{key}` holds a non-integer"))).collect()
}

impl T5Config {
    /// From a transformers `T5Config` JSON object.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let ff = v.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu");
        let feed_forward = match ff {
            "relu" => T5FeedForward::Relu,
            "gated-gelu" => T5FeedForward::GatedGelu,
            other => bail!("T5 feed_forward_proj `{other}` is not supported (relu or gated-gelu)"),
        };
        Ok(Self {
            vocab_size: json_usize(v, "vocab_size")?,
            d_model: json_usize(v, "d_model")?,
            d_kv: json_usize(v, "d_kv")?,
            d_ff: json_usize(v, "d_ff")?,
            num_layers: json_usize(v, "num_layers")?,
            num_heads: json_usize(v, "num_heads")?,
            relative_attention_num_buckets: json_usize_or(v, "relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: json_usize_or(v, "relative_attention_max_distance", 128)?,
            layer_norm_epsilon: json_f64_or(v, "layer_norm_epsilon", 1e-6)?,
            feed_forward,
        })
    }

    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "model_type": "t5",
            "architectures": ["T5EncoderModel"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": match self.feed_forward { T5FeedForward::Relu => "relu", T5FeedForward::GatedGelu => "gated-gelu" },
            "dropout_rate": 0.0,
        })
    }
}

impl CodecConfig {
    /// From a transformers `EncodecConfig` JSON object.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let sample_rate = json_usize(v, "sampling_rate")?;
        if sample_rate == 0 || sample_rate > 768_000 {
            bail!("`sampling_rate: {sample_rate}` is not a usable sample rate (1..=768000 Hz)");
        }
        let ratios = json_usizes(v, "upsampling_ratios")?;
        if ratios.is_empty() || ratios.contains(&0) {
            bail!("`upsampling_ratios: {ratios:?}` must be positive integers");
        }

        let dimension = json_usize_or(v, "hidden_size", 128)?;
        let hop: usize = ratios.iter().product::<usize>().max(1);
        let frame_rate = (sample_rate as f64 / hop as f64).ceil();
        // transformers: num_quantizers = int(1000·bw // (frame_rate · ceil(log2(codebook_size)))).
        let card = json_usize_or(v, "codebook_size", 1024)?;
        if !(2..=65_536).contains(&card) {
            bail!("`codebook_size: {card}` is outside 2..=65536");
        }
        let bandwidths = v.get("target_bandwidths").and_then(Value::as_array);
        let n_q = match bandwidths.and_then(|b| b.last()).and_then(Value::as_f64) {
            // (+1e-9: a bandwidth written as n_q·rate·bits/1000 must give n_q back.)
            Some(bw) => ((1000.0 * bw) / (frame_rate * bits_per_code(card)) + 1e-9).floor() as usize,
            None => bail!("missing `target_bandwidths` (it fixes the number of codebooks)"),
        };
        let pad_mode = match v.get("pad_mode").and_then(Value::as_str).unwrap_or("reflect") {
            "reflect" => PadMode::Reflect,
            "constant" => PadMode::Constant,
            other => bail!("EnCodec pad_mode `{other}` is not supported (reflect or constant)"),
        };
        let norm = v.get("norm_type").and_then(Value::as_str).unwrap_or("weight_norm");
        if norm != "weight_norm" && norm != "none" {
            bail!("EnCodec norm_type `{norm}` is not supported (weight_norm)");
        }
        if json_bool_or(v, "normalize", false)? {
            bail!("EnCodec with `normalize: true` (the 48 kHz model) is not supported by MusicGen");
        }
        Ok(Self {
            sample_rate,
            channels: json_usize_or(v, "audio_channels", 1)?,
            dimension,
            n_filters: json_usize_or(v, "num_filters", 32)?,
            ratios,
            kernel_size: json_usize_or(v, "kernel_size", 7)?,
            last_kernel_size: json_usize_or(v, "last_kernel_size", 7)?,
            residual_kernel_size: json_usize_or(v, "residual_kernel_size", 3)?,
            dilation_base: json_usize_or(v, "dilation_growth_rate", 2)?,
            n_residual_layers: json_usize_or(v, "num_residual_layers", 1)?,
            lstm_layers: json_usize_or(v, "num_lstm_layers", 2)?,
            compress: json_usize_or(v, "compress", 2)?,
            conv_shortcut: json_bool_or(v, "use_conv_shortcut", true)?,
            pad_mode,
            causal: json_bool_or(v, "use_causal_conv", true)?,
            trim_right_ratio: json_f64_or(v, "trim_right_ratio", 1.0)?,
            n_q,
            card,
            codebook_dim: json_usize_or(v, "codebook_dim", dimension)?,
        })
    }

    pub fn to_hf_json(&self) -> Value {
        // Pick a bandwidth that gives back exactly n_q codebooks.
        let bw = self.n_q as f64 * self.frame_rate() * bits_per_code(self.card) / 1000.0;
        serde_json::json!({
            "model_type": "encodec",
            "sampling_rate": self.sample_rate,
            "audio_channels": self.channels,
            "hidden_size": self.dimension,
            "num_filters": self.n_filters,
            "upsampling_ratios": self.ratios,
            "kernel_size": self.kernel_size,
            "last_kernel_size": self.last_kernel_size,
            "residual_kernel_size": self.residual_kernel_size,
            "dilation_growth_rate": self.dilation_base,
            "num_residual_layers": self.n_residual_layers,
            "num_lstm_layers": self.lstm_layers,
            "compress": self.compress,
            "use_conv_shortcut": self.conv_shortcut,
            "pad_mode": match self.pad_mode { PadMode::Reflect => "reflect", PadMode::Constant => "constant" },
            "use_causal_conv": self.causal,
            "trim_right_ratio": self.trim_right_ratio,
            "norm_type": "weight_norm",
            "normalize": false,
            "codebook_size": self.card,
            "codebook_dim": self.codebook_dim,
            "target_bandwidths": [bw],
        })
    }
}

impl MusicgenConfig {
    /// From a transformers `MusicgenConfig` (config.json) plus optional generation_config.json.
    pub fn from_hf_json(config: &Value, generation: Option<&Value>) -> Result<Self> {
        if let Some(kind) = config.get("model_type").and_then(Value::as_str) {
            if kind.contains("melody") {
                bail!(
                    "`model_type: {kind}` (MusicGen Melody, conditioned on a chroma of reference audio) is not supported; use a text-only MusicGen (musicgen-small/medium/large or musicgen-stereo-*)"
                );
            }
            if kind != "musicgen" {
                bail!("`model_type: {kind}` is not a MusicGen (expected `musicgen`)");
            }
        }
        let dec = config.get("decoder").context("config.json has no `decoder` section")?;
        let text = config.get("text_encoder").context("config.json has no `text_encoder` section")?;
        let audio = config.get("audio_encoder").context("config.json has no `audio_encoder` section")?;
        let t5 = T5Config::from_hf_json(text).context("in `text_encoder`")?;
        let codec = CodecConfig::from_hf_json(audio).context("in `audio_encoder`")?;
        let n_q = json_usize(dec, "num_codebooks").context("in `decoder`")?;
        let audio_channels = json_usize_or(dec, "audio_channels", 1)?;
        let act = dec.get("activation_function").and_then(Value::as_str).unwrap_or("gelu");
        if act != "gelu" {
            bail!("decoder activation `{act}` is not supported (gelu)");
        }
        let dim = json_usize(dec, "hidden_size").context("in `decoder`")?;
        let delays = delay_pattern(n_q, audio_channels);
        let lm = LmConfig {
            dim,
            num_heads: json_usize(dec, "num_attention_heads").context("in `decoder`")?,
            num_layers: json_usize(dec, "num_hidden_layers").context("in `decoder`")?,
            ffn_dim: json_usize(dec, "ffn_dim").context("in `decoder`")?,
            n_q,
            card: json_usize(dec, "vocab_size").context("in `decoder`")?,
            delays,
            cond_dim: t5.d_model,
            cond_proj: t5.d_model != dim || dec.get("cross_attention_hidden_size").is_some_and(|v| !v.is_null()),
            norm_eps: 1e-5,
            max_period: 10_000.0,
            scale_embedding: json_bool_or(dec, "scale_embedding", false)?,
        };
        let gen = match generation {
            Some(g) => generation_from_hf(g, codec.frame_rate()).context("in generation_config.json")?,
            None => GenerationDefaults::default(),
        };
        let cfg = Self { lm, codec, t5, generation: gen, audio_channels };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Sampling defaults from a transformers generation_config.json (`frame_rate` turns its
/// `max_length` into the window).
pub fn generation_from_hf(g: &Value, frame_rate: f64) -> Result<GenerationDefaults> {
    let mut gen = GenerationDefaults::default();
    gen.guidance_scale = json_f64_or(g, "guidance_scale", gen.guidance_scale)?;
    gen.top_k = json_usize_or(g, "top_k", gen.top_k)?;
    gen.top_p = json_f64_or(g, "top_p", 0.0)?;
    if gen.top_p >= 1.0 {
        gen.top_p = 0.0;
    }
    gen.temperature = json_f64_or(g, "temperature", gen.temperature)?;
    gen.use_sampling = json_bool_or(g, "do_sample", gen.use_sampling)?;
    if let Some(max_len) = g.get("max_length").and_then(Value::as_u64) {
        gen.window_seconds = max_len as f64 / frame_rate;
    }
    if !(gen.guidance_scale.is_finite() && gen.temperature.is_finite() && gen.temperature >= 0.0) {
        bail!("`guidance_scale` and `temperature` must be finite numbers (temperature ≥ 0)");
    }
    Ok(gen)
}

impl MusicgenConfig {
    /// The transformers-style config.json and generation_config.json for this model.
    pub fn to_hf_json(&self) -> (Value, Value) {
        let lm = &self.lm;
        let config = serde_json::json!({
            "model_type": "musicgen",
            "architectures": ["MusicgenForConditionalGeneration"],
            "decoder": {
                "model_type": "musicgen_decoder",
                "vocab_size": lm.card,
                "num_codebooks": lm.n_q,
                "audio_channels": self.audio_channels,
                "hidden_size": lm.dim,
                "num_hidden_layers": lm.num_layers,
                "num_attention_heads": lm.num_heads,
                "ffn_dim": lm.ffn_dim,
                "activation_function": "gelu",
                "max_position_embeddings": 2048,
                "scale_embedding": lm.scale_embedding,
                "pad_token_id": lm.card,
                "bos_token_id": lm.card,
            },
            "text_encoder": self.t5.to_hf_json(),
            "audio_encoder": self.codec.to_hf_json(),
        });
        let gen = &self.generation;
        let generation = serde_json::json!({
            "guidance_scale": gen.guidance_scale,
            "top_k": gen.top_k,
            "temperature": gen.temperature,
            "do_sample": gen.use_sampling,
            "max_length": (gen.window_seconds * self.frame_rate()).round() as u64,
            "decoder_start_token_id": lm.card,
            "pad_token_id": lm.card,
        });
        (config, generation)
    }
}

/// MusicGen's delay pattern: codebook `k` of each channel is delayed by `k` steps;
/// stereo interleaves [1L, 1R, 2L, 2R, ...], hence delays 0,0,1,1,2,2,3,3.
pub fn delay_pattern(n_q: usize, audio_channels: usize) -> Vec<usize> {
    let ch = audio_channels.max(1);
    (0..n_q).map(|k| k / ch).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stereo_delays_interleave() {
        assert_eq!(delay_pattern(4, 1), vec![0, 1, 2, 3]);
        assert_eq!(delay_pattern(8, 2), vec![0, 0, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn encodec_32khz_codebooks_from_bandwidth() {
        // facebook/encodec_32khz: 32 kHz, hop 640, 50 fps, 2.2 kbps -> 4 codebooks.
        let v = serde_json::json!({
            "sampling_rate": 32000, "upsampling_ratios": [8, 5, 4, 4], "hidden_size": 128,
            "target_bandwidths": [2.2], "codebook_size": 2048, "num_filters": 64,
            "use_causal_conv": false, "use_conv_shortcut": false, "pad_mode": "reflect"
        });
        let c = CodecConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.n_q, 4);
        assert_eq!(c.frame_rate(), 50.0);
        let back = CodecConfig::from_hf_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
    }
}
