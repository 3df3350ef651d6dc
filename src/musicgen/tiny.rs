//! The built-in tiny MusicGen: made deterministically from a seed, with no download.
//! It has every part of a real one (T5 + tokenizer, LM, EnCodec) at toy sizes, and is
//! what the tests, the benchmarks and the README's first command run on.
//!
//! `spintrak init-model DIR --tiny` writes it in the transformers layout, so Python's
//! `MusicgenForConditionalGeneration.from_pretrained(DIR)` can open it too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::checkpoint::StoredTensor;
use super::codec::Codec;
use super::config::{
    delay_pattern, CodecConfig, GenerationDefaults, LmConfig, MusicgenConfig, PadMode, T5Config, T5FeedForward,
};
use super::lm::Lm;
use super::loader::{from_transformers_tensors, LoadOptions};
use super::model::MusicGen;
use super::params::{Initializer, ParamStore};
use super::t5::{T5Encoder, TextTokenizer};
use crate::rng;

/// Words the tiny tokenizer knows whole (with the sentencepiece word-start mark).
const WORDS: &[&str] = &[
    "rock",
    "salsa",
    "piano",
    "guitar",
    "guitars",
    "drums",
    "bass",
    "calm",
    "melody",
    "slow",
    "fast",
    "happy",
    "sad",
    "groove",
    "techno",
    "ballad",
    "moody",
    "alternative",
    "lively",
    "horns",
    "electric",
    "steady",
    "warm",
    "soft",
    "bright",
    "indie",
    "riff",
    "melancholic",
    "music",
    "song",
    "with",
    "and",
    "the",
    "a",
    "no",
    "vocals",
    "ocean",
    "waves",
    "chord",
    "beat",
    "jazz",
    "pop",
    "ambient",
    "strings",
    "synth",
];

/// The tiny model's tokenizer.json: a T5-style unigram tokenizer over characters and
/// a few music words, ending every sequence with `</s>`.
pub fn tokenizer_json() -> String {
    let mut vocab: Vec<(String, f64)> =
        vec![("<pad>".into(), 0.0), ("</s>".into(), 0.0), ("<unk>".into(), 0.0), ("▁".into(), -2.0)];
    for w in WORDS {
        vocab.push((format!("▁{w}"), -6.0));
    }
    let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.;:'-!?()";
    for c in chars.chars() {
        vocab.push((format!("▁{c}"), -9.0));
        vocab.push((c.to_string(), -10.0));
    }
    let vocab: Vec<serde_json::Value> = vocab.into_iter().map(|(p, s)| serde_json::json!([p, s])).collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let metaspace =
        serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
        ]},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
    })
    .to_string()
}

/// The tiny model's configuration.
pub fn config(vocab_size: usize) -> MusicgenConfig {
    let t5 = T5Config {
        vocab_size,
        d_model: 32,
        d_kv: 8,
        d_ff: 64,
        num_layers: 2,
        num_heads: 4,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward: T5FeedForward::Relu,
    };
    let codec = CodecConfig {
        sample_rate: 8000,
        channels: 1,
        dimension: 32,
        n_filters: 8,
        ratios: vec![8, 5, 4],
        kernel_size: 7,
        last_kernel_size: 7,
        residual_kernel_size: 3,
        dilation_base: 2,
        n_residual_layers: 1,
        lstm_layers: 2,
        compress: 2,
        conv_shortcut: false,
        pad_mode: PadMode::Reflect,
        causal: false,
        trim_right_ratio: 1.0,
        n_q: 4,
        card: 64,
        codebook_dim: 32,
    };
    let lm = LmConfig {
        dim: 64,
        num_heads: 4,
        num_layers: 2,
        ffn_dim: 128,
        n_q: 4,
        card: 64,
        delays: delay_pattern(4, 1),
        cond_dim: 32,
        cond_proj: true,
        norm_eps: 1e-5,
        max_period: 10_000.0,
        scale_embedding: false,
    };
    let generation = GenerationDefaults { window_seconds: 10.0, ..GenerationDefaults::default() };
    MusicgenConfig { lm, codec, t5, generation, audio_channels: 1 }
}

/// Deterministic initial values, keyed by the tensor's name (not by construction order).
fn initializer(seed: u64) -> Initializer {
    Arc::new(move |name: &str, shape: &[usize]| -> Result<Tensor> {
        let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let normal =
            |std: f64| -> Vec<f32> { (0..n).map(|i| (rng::normal(seed ^ key, i as u64, 0) * std) as f32).collect() };
        let data = if (shape.len() == 1 && name.ends_with(".weight")) || name.ends_with("weight_g") {
            vec![1.0f32; n] // layer-norm gains; weight-norm gains (W = v / ‖v‖)
        } else if name.contains(".lstm.") {
            let h = shape[0] as f64 / 4.0;
            normal(1.0 / h.sqrt())
        } else if shape.len() == 1 {
            normal(0.02) // biases
        } else if name.ends_with("codebook.embed") || name.contains("shared.weight") {
            normal(1.0)
        } else if name.starts_with("emb.") || name.contains("relative_attention_bias") {
            normal(0.5)
        } else {
            normal(1.0 / (fan_in as f64).sqrt())
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    })
}

/// Audiocraft LM names -> transformers names (splitting the packed q/k/v).
fn lm_to_transformers(lm: HashMap<String, Tensor>, dim: usize) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in lm {
        let hf = if let Some(r) = name.strip_prefix("condition_provider.conditioners.description.output_proj.") {
            format!("enc_to_dec_proj.{r}")
        } else if let Some(r) = name.strip_prefix("linears.") {
            format!("decoder.lm_heads.{r}")
        } else if let Some(r) = name.strip_prefix("emb.") {
            format!("decoder.model.decoder.embed_tokens.{r}")
        } else if let Some(r) = name.strip_prefix("out_norm.") {
            format!("decoder.model.decoder.layer_norm.{r}")
        } else if let Some(r) = name.strip_prefix("transformer.layers.") {
            let (idx, sub) = r.split_once('.').context("layer name")?;
            let base = format!("decoder.model.decoder.layers.{idx}");
            if let Some(attn) = sub.strip_suffix(".in_proj_weight") {
                let hf_attn = if attn == "self_attn" { "self_attn" } else { "encoder_attn" };
                for (i, x) in ["q", "k", "v"].iter().enumerate() {
                    out.insert(format!("{base}.{hf_attn}.{x}_proj.weight"), t.narrow(0, i * dim, dim)?.contiguous()?);
                }
                continue;
            }
            let sub = sub
                .replacen("norm1.", "self_attn_layer_norm.", 1)
                .replacen("norm_cross.", "encoder_attn_layer_norm.", 1)
                .replacen("norm2.", "final_layer_norm.", 1)
                .replacen("cross_attention.", "encoder_attn.", 1)
                .replacen("linear1.", "fc1.", 1)
                .replacen("linear2.", "fc2.", 1);
            format!("{base}.{sub}")
        } else {
            anyhow::bail!("unexpected LM tensor {name}");
        };
        out.insert(hf, t);
    }
    Ok(out)
}

/// The tiny model's weights in transformers naming, its config and its tokenizer.
pub fn build_tensors(seed: u64) -> Result<(MusicgenConfig, HashMap<String, Tensor>, String)> {
    let tok_json = tokenizer_json();
    let tokenizer = TextTokenizer::from_json(&tok_json)?;
    let cfg = config(tokenizer.vocab_size());
    let dev = Device::Cpu;
    let init = initializer(seed);
    let t5 = ParamStore::initializing(init.clone(), "tiny T5", &dev);
    T5Encoder::new(&cfg.t5, t5.vb(true))?;
    let lm = ParamStore::initializing(init.clone(), "tiny LM", &dev);
    Lm::new(&cfg.lm, lm.vb(true))?;
    let codec = ParamStore::initializing(init, "tiny EnCodec", &dev);
    Codec::new(&cfg.codec, codec.vb(true))?;
    super::codec::CodecEncoder::new(&cfg.codec, codec.vb(true).pp("encoder"))?;
    let mut codec_tensors = codec.claimed();
    fit_codebooks(&cfg, &codec, &mut codec_tensors)?;
    let mut all: HashMap<String, Tensor> = HashMap::new();
    all.extend(t5.claimed().into_iter().map(|(k, v)| (format!("text_encoder.{k}"), v)));
    all.extend(codec_tensors.into_iter().map(|(k, v)| (format!("audio_encoder.{k}"), v)));
    all.extend(lm_to_transformers(lm.claimed(), cfg.lm.dim)?);
    Ok((cfg, all, tok_json))
}

/// Varied test signals at `sr` (tones, chirps, noise bursts, clicks, mixtures), one
/// second each: what the tiny codec's codebooks are fitted to.
fn codebook_signals(sr: usize) -> Vec<Vec<f32>> {
    use std::f64::consts::TAU;
    (0..24u64)
        .map(|i| {
            let u = |j: u64| rng::uniform(0xc0de, &[i, j]);
            let f = 60.0 * 2f64.powf(u(0) * 5.5);
            let amp = 0.1 + 0.8 * u(1);
            (0..sr)
                .map(|n| {
                    let t = n as f64 / sr as f64;
                    let noise = rng::uniform(0xc0de ^ i, &[n as u64]) * 2.0 - 1.0;
                    let v = match i % 6 {
                        0 => (TAU * f * t).sin(),
                        1 => (TAU * (f + 400.0 * t) * t).sin(),
                        2 => noise * (-(t * 8.0).fract() * 6.0).exp(),
                        3 => f64::from(u8::from((t * 10.0).fract() < 0.01)) * 2.0 - 0.1,
                        4 => ((TAU * f * t).sin() + (TAU * 1.5 * f * t).sin()) * 0.5 * (TAU * 3.0 * t).sin(),
                        _ => (TAU * f * t).sin().signum() * 0.5 + 0.3 * noise,
                    };
                    (amp * v) as f32
                })
                .collect()
        })
        .collect()
}

/// Deterministic k-means (farthest-point start, Lloyd iterations) of `points` (rows of
/// `dim`) into `k` centres.
fn kmeans(points: &[Vec<f32>], k: usize, iterations: usize) -> Vec<Vec<f32>> {
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
    let mut centres: Vec<Vec<f32>> = vec![points[0].clone()];
    let mut nearest: Vec<f32> = points.iter().map(|p| dist(p, &centres[0])).collect();
    while centres.len() < k {
        let far = (0..points.len()).max_by(|&a, &b| nearest[a].total_cmp(&nearest[b])).unwrap_or(0);
        centres.push(points[far].clone());
        for (d, p) in nearest.iter_mut().zip(points) {
            *d = d.min(dist(p, &points[far]));
        }
    }
    for _ in 0..iterations {
        let mut sums = vec![vec![0f64; points[0].len()]; k];
        let mut counts = vec![0usize; k];
        for p in points {
            let c = (0..k).min_by(|&a, &b| dist(p, &centres[a]).total_cmp(&dist(p, &centres[b]))).unwrap_or(0);
            counts[c] += 1;
            for (s, x) in sums[c].iter_mut().zip(p) {
                *s += *x as f64;
            }
        }
        for ((c, s), n) in centres.iter_mut().zip(sums).zip(counts) {
            if n > 0 {
                *c = s.iter().map(|x| (x / n as f64) as f32).collect();
            }
        }
    }
    centres
}

/// Random codebooks send every frame of any audio to the same codes; fit them to the
/// encoder's outputs on varied signals instead (residual by residual, as EnCodec's are
/// learnt), so that codes follow the audio.
fn fit_codebooks(cfg: &MusicgenConfig, codec: &ParamStore, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    let encoder = super::codec::CodecEncoder::new(&cfg.codec, codec.vb(true).pp("encoder"))?;
    let mut frames: Vec<Vec<f32>> = Vec::new();
    for sig in codebook_signals(cfg.codec.sample_rate) {
        let len = sig.len();
        let z = encoder.forward(&Tensor::from_vec(sig, (1, 1, len), &Device::Cpu)?)?; // [1, D, T]
        let z: Vec<Vec<f32>> = z.squeeze(0)?.t()?.contiguous()?.to_vec2()?;
        frames.extend(z);
    }
    for q in 0..cfg.codec.n_q {
        let centres = kmeans(&frames, cfg.codec.card, 12);
        for f in frames.iter_mut() {
            let c = centres
                .iter()
                .min_by(|a, b| {
                    let da: f32 = a.iter().zip(f.iter()).map(|(x, y)| (x - y) * (x - y)).sum();
                    let db: f32 = b.iter().zip(f.iter()).map(|(x, y)| (x - y) * (x - y)).sum();
                    da.total_cmp(&db)
                })
                .ok_or_else(|| anyhow::anyhow!("no codebook entries"))?;
            for (x, y) in f.iter_mut().zip(c) {
                *x -= y;
            }
        }
        let dim = cfg.codec.codebook_dim;
        let name = format!("quantizer.layers.{q}.codebook.embed");
        let flat: Vec<f32> = centres.concat();
        tensors.insert(name, Tensor::from_vec(flat, (cfg.codec.card, dim), &Device::Cpu)?);
    }
    Ok(())
}

/// The built-in tiny MusicGen, in memory.
pub fn build(seed: u64, device: &Device) -> Result<MusicGen> {
    let (cfg, tensors, tok) = build_tensors(seed)?;
    let tokenizer = TextTokenizer::from_json(&tok)?;
    let mut model = from_transformers_tensors(
        cfg,
        tensors.into_iter().map(|(n, t)| (n, StoredTensor::Memory(t))).collect(),
        Path::new("<built-in tiny model>"),
        Some(tokenizer),
        &LoadOptions::default(),
        device,
    )?;
    model.source = format!("builtin:tiny:{seed}");
    Ok(model)
}

/// Writes the tiny model as a transformers directory.
pub fn write(dir: &Path, seed: u64) -> Result<()> {
    save_transformers(&build(seed, &Device::Cpu)?, dir)
}

/// Writes any loaded MusicGen as a transformers `MusicgenForConditionalGeneration`
/// directory (config.json, generation_config.json, model.safetensors, tokenizer.json),
/// which both spintrak and Python's transformers load. Every tensor is kept, used or not.
pub fn save_transformers(model: &MusicGen, dir: &Path) -> Result<()> {
    let cfg = &model.cfg;
    let mut all: HashMap<String, Tensor> = HashMap::new();
    all.extend(model.t5_params.all()?.into_iter().map(|(k, v)| (format!("text_encoder.{k}"), v)));
    all.extend(model.codec_params.all()?.into_iter().map(|(k, v)| (format!("audio_encoder.{k}"), v)));
    all.extend(lm_to_transformers(model.lm_params.all()?, cfg.lm.dim)?);
    let (config, generation) = cfg.to_hf_json();
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    crate::io::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    crate::io::write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )?;
    crate::io::write_atomic(&dir.join("tokenizer.json"), model.tokenizer.to_json()?.as_bytes())?;
    crate::io::write_atomic(&dir.join("model.safetensors"), &safetensors_bytes(&all)?)?;
    Ok(())
}

/// Serialises f32 tensors to safetensors bytes (sorted names: deterministic output).
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::with_capacity(names.len());
    for name in names {
        let t = &tensors[name];
        let v: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), bytes, t.dims().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Writes a MusicGen of any shape with random weights as a sharded transformers
/// directory (`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, as the
/// hub publishes large models), one tensor at a time: the model is never whole in memory,
/// so a model of musicgen-stereo-large's 3.5 B parameters is written on a 24 GB machine.
/// Names and shapes come from a one-layer model of the same widths built by the model's
/// own constructors; its layer's tensors repeat for every layer. Returns the bytes written.
pub fn write_random_transformers(cfg: &MusicgenConfig, seed: u64, dir: &Path, shard_bytes: u64) -> Result<u64> {
    use std::io::Write;
    let mut one = cfg.clone();
    one.lm.num_layers = 1;
    let model = random_model(one, seed, candle_core::DType::F32, &Device::Cpu)?;
    // The encoder is built on demand; build it so that its weights are written too.
    super::codec::CodecEncoder::new(&model.cfg.codec, model.codec_params.vb(true).pp("encoder"))?;
    // (name, shape, values known now or drawn when written)
    let mut entries: Vec<(String, Vec<usize>, Option<Tensor>)> = Vec::new();
    for (k, v) in model.t5_params.all()? {
        entries.push((format!("text_encoder.{k}"), v.dims().to_vec(), Some(v)));
    }
    for (k, v) in model.codec_params.all()? {
        entries.push((format!("audio_encoder.{k}"), v.dims().to_vec(), Some(v)));
    }
    let layer0 = "decoder.model.decoder.layers.0.";
    for (k, v) in lm_to_transformers(model.lm_params.all()?, cfg.lm.dim)? {
        match k.strip_prefix(layer0) {
            Some(sub) => {
                for i in 0..cfg.lm.num_layers {
                    entries.push((format!("decoder.model.decoder.layers.{i}.{sub}"), v.dims().to_vec(), None));
                }
            }
            None => entries.push((k, v.dims().to_vec(), Some(v))),
        }
    }
    drop(model);
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    // Shards of at most `shard_bytes` (a tensor larger than that gets a shard of its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut filled = 0u64;
    for (i, (_, shape, _)) in entries.iter().enumerate() {
        let bytes = 4 * shape.iter().product::<usize>() as u64;
        if filled > 0 && filled + bytes > shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        filled += bytes;
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (s, members) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{count:05}.safetensors", s + 1);
        let mut header = serde_json::Map::new();
        let mut at = 0u64;
        for &i in members {
            let (name, shape, _) = &entries[i];
            let bytes = 4 * shape.iter().product::<usize>() as u64;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [at, at + bytes]}),
            );
            weight_map.insert(name.clone(), file_name.clone().into());
            at += bytes;
        }
        let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
        // The data section starts 8-aligned, as the reference writer pads it.
        while !(8 + json.len()).is_multiple_of(8) {
            json.push(b' ');
        }
        let path = dir.join(&file_name);
        let file = std::fs::File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        for &i in members {
            let (name, shape, known) = &entries[i];
            let values: Vec<f32> = match known {
                Some(t) => t.flatten_all()?.to_vec1()?,
                None => random_values(seed, name, shape),
            };
            out.write_all(bytemuck::cast_slice(&values))?;
        }
        out.flush().with_context(|| format!("{}: cannot write", path.display()))?;
        total += at;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let (config, generation) = cfg.to_hf_json();
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        crate::io::write_atomic(&dir.join(name), serde_json::to_string_pretty(v)?.as_bytes())
    };
    write("model.safetensors.index.json", &index)?;
    write("config.json", &config)?;
    write("generation_config.json", &generation)?;
    crate::io::write_atomic(&dir.join("tokenizer.json"), tokenizer_json().as_bytes())?;
    Ok(total)
}

/// Random values for one LM layer tensor, drawn in parallel: layer-norm gains 1, biases
/// small, matrices uniform with a 1/√fan-in standard deviation (fast to draw; the
/// distribution does not matter to speed or memory, only finiteness and scale do).
fn random_values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    use rayon::prelude::*;
    let key = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let n: usize = shape.iter().product();
    if shape.len() == 1 && name.ends_with(".weight") {
        return vec![1.0; n];
    }
    let std = if shape.len() == 1 { 0.02 } else { 1.0 / (shape[1..].iter().product::<usize>().max(1) as f64).sqrt() };
    // Uniform on [−√3σ, √3σ) has standard deviation σ.
    let half_width = (3.0f64.sqrt() * std) as f32;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut s = rng::Stream::new(rng::hash(key, &[c as u64]));
        for x in chunk.iter_mut() {
            let u = (s.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
            *x = (2.0 * u - 1.0) * half_width;
        }
    });
    v
}

/// A MusicGen of any shape with deterministic random weights, built directly (no files).
/// Its weights equal those of the tiny model (`build`) when given the tiny config and seed.
pub fn random_model(cfg: MusicgenConfig, seed: u64, dtype: candle_core::DType, device: &Device) -> Result<MusicGen> {
    let tokenizer = TextTokenizer::from_json(&tokenizer_json())?;
    let init = initializer(seed);
    let t5 = ParamStore::initializing(init.clone(), "random T5", device).with_dtype(dtype);
    let lm = ParamStore::initializing(init.clone(), "random LM", device).with_dtype(dtype);
    let codec = ParamStore::initializing(init, "random EnCodec", device).with_dtype(dtype);
    let mut model = MusicGen::new(cfg, tokenizer, &t5, lm, codec, format!("random:{seed}"))?;
    model.source = format!("random:{seed}");
    Ok(model)
}

/// The tiny model's stereo sibling: 8 interleaved codebooks, 2-channel audio.
pub fn stereo_config(vocab_size: usize) -> MusicgenConfig {
    let mut cfg = config(vocab_size);
    cfg.lm.n_q = 8;
    cfg.lm.delays = delay_pattern(8, 2);
    cfg.audio_channels = 2;
    cfg
}

/// musicgen-small's shape (LM 1024 wide, 24 layers, 16 heads, 4 × 2048 codes; about
/// 300M LM parameters) with facebook/encodec_32khz's codec and a one-layer T5 of
/// t5-base's width: for benchmarks.
pub fn small_shape_config(vocab_size: usize) -> MusicgenConfig {
    let mut cfg = config(vocab_size);
    cfg.t5 = T5Config {
        vocab_size,
        d_model: 768,
        d_kv: 64,
        d_ff: 3072,
        num_layers: 1,
        num_heads: 12,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward: T5FeedForward::Relu,
    };
    cfg.codec = CodecConfig {
        sample_rate: 32000,
        dimension: 128,
        n_filters: 64,
        ratios: vec![8, 5, 4, 4],
        card: 2048,
        codebook_dim: 128,
        ..cfg.codec
    };
    cfg.lm = LmConfig { dim: 1024, num_heads: 16, num_layers: 24, ffn_dim: 4096, card: 2048, cond_dim: 768, ..cfg.lm };
    cfg.generation.window_seconds = 30.0;
    cfg
}

#[cfg(test)]
mod codebook_tests {
    use super::*;

    #[test]
    fn tiny_codes_follow_the_audio() {
        let model = build(1234, &Device::Cpu).unwrap();
        let encoder =
            crate::musicgen::codec::CodecEncoder::new(&model.cfg.codec, model.codec_params.vb(true).pp("encoder"))
                .unwrap();
        let sr = model.cfg.sample_rate();
        let enc = |x: Vec<f32>| -> Vec<Vec<u32>> {
            let n = x.len();
            model
                .codec
                .encode(&encoder, &Tensor::from_vec(x, (1, n), &Device::Cpu).unwrap(), 1)
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        // Signals unlike the fitting set: a low tone and white-ish noise, 2 s.
        let tone: Vec<f32> = (0..2 * sr).map(|i| 0.5 * (i as f32 * 0.05).sin()).collect();
        let noise: Vec<f32> = (0..2 * sr).map(|i| (rng::uniform(99, &[i as u64]) as f32 - 0.5) * 0.8).collect();
        let (a, b) = (enc(tone), enc(noise));
        for q in 0..model.cfg.codec.n_q {
            let distinct: std::collections::HashSet<u32> = a[q].iter().chain(&b[q]).copied().collect();
            assert!(distinct.len() > 4, "codebook {q}: only {} distinct codes", distinct.len());
        }
        let differ = a[0].iter().zip(&b[0]).filter(|(x, y)| x != y).count();
        assert!(differ * 2 > a[0].len(), "tone and noise share most codes ({differ} of {} differ)", a[0].len());
        // Control: the random codebooks the model had before (N(0, 1) entries) send both
        // signals' frames to a handful of codes, and the checks above would fail on them.
        let (card, dim) = (model.cfg.codec.card, model.cfg.codec.codebook_dim);
        let random: Vec<Vec<f32>> =
            (0..card).map(|c| (0..dim).map(|j| rng::normal(7, c as u64, j as u64) as f32).collect()).collect();
        let nearest = |x: Vec<f32>| -> Vec<usize> {
            let n = x.len();
            let z = encoder.forward(&Tensor::from_vec(x, (1, 1, n), &Device::Cpu).unwrap()).unwrap();
            let z: Vec<Vec<f32>> = z.squeeze(0).unwrap().t().unwrap().contiguous().unwrap().to_vec2().unwrap();
            z.iter()
                .map(|f| {
                    let d = |c: &Vec<f32>| c.iter().zip(f).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
                    (0..card).min_by(|&i, &j| d(&random[i]).total_cmp(&d(&random[j]))).unwrap()
                })
                .collect()
        };
        let tone: Vec<f32> = (0..2 * sr).map(|i| 0.5 * (i as f32 * 0.05).sin()).collect();
        let noise: Vec<f32> = (0..2 * sr).map(|i| (rng::uniform(99, &[i as u64]) as f32 - 0.5) * 0.8).collect();
        let (ra, rb) = (nearest(tone), nearest(noise));
        let distinct: std::collections::HashSet<usize> = ra.iter().chain(&rb).copied().collect();
        let differ = ra.iter().zip(&rb).filter(|(x, y)| x != y).count();
        assert!(
            distinct.len() <= 4 || differ * 2 <= ra.len(),
            "random codebooks: {} codes, {differ} differ",
            distinct.len()
        );
    }
}
