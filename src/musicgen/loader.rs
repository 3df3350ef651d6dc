//! Finding and loading a MusicGen from a directory, offline.
//!
//! Two layouts are read:
//! - **audiocraft export**: `state_dict.bin` (`best_state` + `xp.cfg`) and
//!   `compression_state_dict.bin` (or the seed document's `compressed_state_dict.bin`)
//!   holding either a full codec or a `pretrained` pointer such as `facebook/encodec_32khz`;
//! - **transformers** `MusicgenForConditionalGeneration`: `config.json`, safetensors (or
//!   `pytorch_model.bin`) and `tokenizer.json`.
//!
//! Pointers and the T5 encoder resolve from `--encodec` / `--t5`, else from the local
//! Hugging Face hub cache. Nothing is downloaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde_yaml::Value as Yaml;

use super::checkpoint::{
    dict_has, dict_string, open_hf_weights, open_pickle_tensors, read_json, read_pickle_root, StoredTensor,
};
use super::config::{delay_pattern, CodecConfig, GenerationDefaults, LmConfig, MusicgenConfig, PadMode, T5Config};
use super::model::MusicGen;
use super::params::ParamStore;
use super::t5::TextTokenizer;

/// Where to find the parts a checkpoint only points to.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A transformers EnCodec directory (config.json + weights) for a `pretrained` pointer.
    pub encodec: Option<PathBuf>,
    /// A transformers T5 directory (config.json + weights + tokenizer.json).
    pub t5: Option<PathBuf>,
    /// What the model is loaded for, which sets the memory it needs.
    pub purpose: Purpose,
    /// Load even when the model does not seem to fit in the memory available.
    pub force: bool,
}

/// What a command does with a model, for the memory estimate made before loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Purpose {
    /// Generation, the loss: the weights plus 5%, plus one window's key/value cache
    /// (measured by `spintrak bench --only stereo-large`: 1.005× at 2 s, 1.164× at 30 s).
    #[default]
    Inference,
    /// Gradient embeddings: gradients are projected as they are made, never whole, so
    /// the weights plus 5%, plus one window's worth of activations (the size of its
    /// key/value cache), codec encoder included (measured: 1.05× at 2 s, 1.20× at 30 s).
    Gradients,
    /// Fine-tuning: the weights, their gradients and AdamW's two moments, plus activations.
    Training,
}

impl Purpose {
    fn factor(self) -> f64 {
        match self {
            Purpose::Inference | Purpose::Gradients => 1.05,
            Purpose::Training => 4.3,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Purpose::Inference => "generation",
            Purpose::Gradients => "gradient embeddings",
            Purpose::Training => "fine-tuning",
        }
    }
}

/// Refuses, before any weight is read, a model whose estimated footprint exceeds the
/// memory available (unless `--force`): swapping a 14 GB model would take hours, and an
/// out-of-memory kill loses the run without a word.
fn check_memory(
    origin: &str,
    cfg: &MusicgenConfig,
    parts: &[&HashMap<String, StoredTensor>],
    opts: &LoadOptions,
) -> Result<()> {
    check_memory_against(origin, window_cache_bytes(cfg), parts, opts, crate::memory::available())
}

/// The key/value cache of one full window of guided generation: every layer keeps K and V
/// (dim numbers each) per frame, for the conditional and the unconditional pass. Windows
/// are decoded one after another, so one window is the most it holds.
fn window_cache_bytes(cfg: &MusicgenConfig) -> u64 {
    let frames = (cfg.generation.window_seconds * cfg.frame_rate()).ceil() as u64 + cfg.lm.max_delay() as u64;
    (cfg.lm.num_layers as u64) * 2 * 2 * frames * cfg.lm.dim as u64 * 4
}

fn check_memory_against(
    origin: &str,
    window_bytes: u64,
    parts: &[&HashMap<String, StoredTensor>],
    opts: &LoadOptions,
    available: Option<u64>,
) -> Result<()> {
    let mut weights = 0u64;
    for part in parts {
        for (name, t) in part.iter() {
            // Only gradients (audio-nll) and training encode audio with the codec's encoder.
            if opts.purpose == Purpose::Inference
                && (name.starts_with("encoder.") || name.starts_with("audio_encoder.encoder."))
            {
                continue;
            }
            weights += 4 * t.elem_count().unwrap_or(0) as u64;
        }
    }
    let extra = if opts.purpose == Purpose::Training { 0 } else { window_bytes };
    let need = (weights as f64 * opts.purpose.factor()) as u64 + extra;
    if let Some(available) = available {
        if need > available && !opts.force {
            bail!(
                "{origin}: {} needs about {} of memory ({} of weights in f32 × {} + {} for one window's cache), but this machine has {} available; free memory, use a machine with more, or pass --force to try anyway",
                opts.purpose.what(),
                crate::memory::gb(need),
                crate::memory::gb(weights),
                opts.purpose.factor(),
                crate::memory::gb(extra),
                crate::memory::gb(available)
            );
        }
    }
    Ok(())
}

/// The two checkpoint layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Audiocraft,
    Transformers,
}

/// Tells the layout of a model directory.
pub fn detect_layout(dir: &Path) -> Result<Layout> {
    if !dir.exists() {
        bail!("{}: no such model directory; pass --model DIR with a MusicGen checkpoint, or omit --model for the built-in tiny model", dir.display());
    }
    if !dir.is_dir() {
        bail!("{}: --model expects a directory, not a file", dir.display());
    }
    if dir.join("state_dict.bin").exists() {
        return Ok(Layout::Audiocraft);
    }
    if dir.join("config.json").exists() {
        return Ok(Layout::Transformers);
    }
    bail!(
        "{}: not a MusicGen directory: expected state_dict.bin + compression_state_dict.bin (audiocraft export) or config.json + model.safetensors (transformers)",
        dir.display()
    )
}

/// Loads the MusicGen in `dir`.
pub fn load(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<MusicGen> {
    match detect_layout(dir)? {
        Layout::Audiocraft => load_audiocraft(dir, opts, device),
        Layout::Transformers => load_transformers(dir, opts, device),
    }
}

// ---------------------------------------------------------------------------------------
// Name mapping

/// transformers MusicGen LM names -> audiocraft names (q/k/v handled separately).
pub fn hf_lm_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("enc_to_dec_proj.") {
        return Some(format!("condition_provider.conditioners.description.output_proj.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("decoder.lm_heads.") {
        return Some(format!("linears.{rest}"));
    }
    let rest = name.strip_prefix("decoder.model.decoder.")?;
    if let Some(r) = rest.strip_prefix("embed_tokens.") {
        return Some(format!("emb.{r}"));
    }
    if let Some(r) = rest.strip_prefix("layer_norm.") {
        return Some(format!("out_norm.{r}"));
    }
    let r = rest.strip_prefix("layers.")?;
    let (idx, sub) = r.split_once('.')?;
    let mapped = match sub {
        s if s.starts_with("self_attn_layer_norm.") => s.replacen("self_attn_layer_norm", "norm1", 1),
        s if s.starts_with("encoder_attn_layer_norm.") => s.replacen("encoder_attn_layer_norm", "norm_cross", 1),
        s if s.starts_with("final_layer_norm.") => s.replacen("final_layer_norm", "norm2", 1),
        s if s.starts_with("self_attn.out_proj.") => s.to_string(),
        s if s.starts_with("encoder_attn.out_proj.") => s.replacen("encoder_attn", "cross_attention", 1),
        s if s.starts_with("fc1.") => s.replacen("fc1", "linear1", 1),
        s if s.starts_with("fc2.") => s.replacen("fc2", "linear2", 1),
        _ => return None,
    };
    Some(format!("transformer.layers.{idx}.{mapped}"))
}

/// Maps the LM tensors of a transformers checkpoint onto audiocraft names, packing
/// q/k/v projections into `in_proj_weight` as audiocraft stores them.
fn hf_lm_tensors(all: &HashMap<String, StoredTensor>, layers: usize) -> Result<HashMap<String, StoredTensor>> {
    let mut out = HashMap::new();
    for (name, t) in all {
        if name.contains("_attn.q_proj") || name.contains("_attn.k_proj") || name.contains("_attn.v_proj") {
            continue;
        }
        if name.contains("embed_positions") {
            continue; // sinusoidal table, recomputed
        }
        if let Some(mapped) = hf_lm_name(name) {
            out.insert(mapped, t.clone());
        } else if name.starts_with("decoder.") || name.starts_with("enc_to_dec_proj.") {
            // Unknown LM tensor (e.g. an attention bias): keep it so the model reports it.
            out.insert(name.clone(), t.clone());
        }
    }
    for i in 0..layers {
        for (hf, ac) in [("self_attn", "self_attn"), ("encoder_attn", "cross_attention")] {
            let p = format!("decoder.model.decoder.layers.{i}.{hf}");
            let get = |x: &str| {
                all.get(&format!("{p}.{x}_proj.weight")).ok_or_else(|| anyhow!("missing tensor `{p}.{x}_proj.weight`"))
            };
            // Read later straight into one buffer: the pieces are never held twice.
            let packed = StoredTensor::Stacked(vec![get("q")?.clone(), get("k")?.clone(), get("v")?.clone()]);
            out.insert(format!("transformer.layers.{i}.{ac}.in_proj_weight"), packed);
            for x in ["q", "k", "v"] {
                let bias = format!("{p}.{x}_proj.bias");
                if let Some(t) = all.get(&bias) {
                    out.insert(bias, t.clone());
                }
            }
        }
    }
    Ok(out)
}

/// Codec tensor names of either source -> transformers `EncodecModel` names.
pub fn codec_name(name: &str) -> String {
    let mut n = name.to_string();
    for (from, to) in [
        ("encoder.model.", "encoder.layers."),
        ("decoder.model.", "decoder.layers."),
        (".convtr.convtr.", ".conv."),
        (".conv.conv.", ".conv."),
        ("quantizer.vq.layers.", "quantizer.layers."),
        ("._codebook.", ".codebook."),
        (".parametrizations.weight.original0", ".weight_g"),
        (".parametrizations.weight.original1", ".weight_v"),
    ] {
        n = n.replace(from, to);
    }
    n
}

fn codec_tensors<T>(all: HashMap<String, T>) -> HashMap<String, T> {
    all.into_iter().map(|(k, v)| (codec_name(&k), v)).collect()
}

fn strip_prefix_map<T: Clone>(all: &HashMap<String, T>, prefix: &str) -> HashMap<String, T> {
    all.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|r| (r.to_string(), v.clone()))).collect()
}

// ---------------------------------------------------------------------------------------
// Hugging Face hub cache

/// Hub cache roots, in the order transformers uses them.
pub fn hub_cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        dirs.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HUGGINGFACE_HUB_CACHE") {
        dirs.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        dirs.push(PathBuf::from(p).join("hub"));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        dirs.push(PathBuf::from(p).join("huggingface").join("hub"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache").join("huggingface").join("hub"));
    }
    dirs.dedup();
    dirs
}

/// Finds a snapshot of `repo_id` holding `config.json` in the hub cache.
/// Returns the snapshot directory or the list of places searched.
pub fn find_in_hub(repo_ids: &[&str]) -> std::result::Result<PathBuf, Vec<PathBuf>> {
    let mut searched = Vec::new();
    for root in hub_cache_dirs() {
        for id in repo_ids {
            let repo = root.join(format!("models--{}", id.replace('/', "--")));
            searched.push(repo.clone());
            if let Ok(hash) = std::fs::read_to_string(repo.join("refs").join("main")) {
                let snap = repo.join("snapshots").join(hash.trim());
                if snap.join("config.json").exists() {
                    return Ok(snap);
                }
            }
            if let Ok(entries) = std::fs::read_dir(repo.join("snapshots")) {
                let mut snaps: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.join("config.json").exists())
                    .collect();
                snaps.sort();
                if let Some(s) = snaps.pop() {
                    return Ok(s);
                }
            }
        }
    }
    Err(searched)
}

fn resolve_pretrained(kind: &str, name: &str, explicit: Option<&Path>, flag: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.join("config.json").exists() {
            bail!("{}: {flag} must be a directory with config.json and weights of {kind}", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let mut ids = vec![name.to_string()];
    if name == "t5-base" || name == "t5-large" || name == "t5-small" {
        ids.push(format!("google-t5/{name}"));
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    find_in_hub(&id_refs).map_err(|searched| {
        let places: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
        anyhow!(
            "{kind} `{name}` is not available offline. Looked in: {}. Provide it with {flag} DIR (a transformers directory with config.json, weights{}), or put it in the Hugging Face hub cache (set HF_HUB_CACHE or HF_HOME)",
            places.join(", "),
            if kind == "T5 text encoder" { ", tokenizer.json" } else { "" }
        )
    })
}

// ---------------------------------------------------------------------------------------
// T5

fn load_t5_dir(dir: &Path) -> Result<(T5Config, HashMap<String, StoredTensor>, TextTokenizer)> {
    let cfg = T5Config::from_hf_json(&read_json(&dir.join("config.json"))?)
        .with_context(|| format!("{}: unsupported T5 config", dir.join("config.json").display()))?;
    let weights = open_hf_weights(dir)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{}: missing; the T5 directory needs the fast tokenizer file tokenizer.json", tok_path.display());
    }
    let tokenizer = TextTokenizer::from_file(&tok_path)?;
    Ok((cfg, weights, tokenizer))
}

// ---------------------------------------------------------------------------------------
// transformers layout

fn load_transformers(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<MusicGen> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let gen_path = dir.join("generation_config.json");
    let mut cfg = MusicgenConfig::from_hf_json(&config, None)
        .with_context(|| format!("{}: unsupported MusicGen config", config_path.display()))?;
    if gen_path.exists() {
        let g = read_json(&gen_path)?;
        cfg.generation = crate::musicgen::config::generation_from_hf(&g, cfg.codec.frame_rate())
            .with_context(|| format!("{}: unusable generation settings", gen_path.display()))?;
        cfg.validate()?;
    }
    let all = open_hf_weights(dir)?;
    from_transformers_tensors(cfg, all, dir, None, opts, device)
}

/// Builds a MusicGen from transformers-named tensors (shared with the built-in model).
pub fn from_transformers_tensors(
    cfg: MusicgenConfig,
    all: HashMap<String, StoredTensor>,
    dir: &Path,
    tokenizer: Option<TextTokenizer>,
    opts: &LoadOptions,
    device: &Device,
) -> Result<MusicGen> {
    let origin = dir.display().to_string();
    let lm = hf_lm_tensors(&all, cfg.lm.num_layers).with_context(|| format!("{origin}: LM weights"))?;
    let codec = match &opts.encodec {
        Some(p) => codec_tensors(open_hf_weights(p)?),
        None => codec_tensors(strip_prefix_map(&all, "audio_encoder.")),
    };
    let tok_path = dir.join("tokenizer.json");
    let (t5, t5_origin, tokenizer) = if let Some(p) = &opts.t5 {
        let (_, weights, tok) = load_t5_dir(p)?;
        (weights, p.display().to_string(), tok)
    } else {
        let tok = if let Some(tok) = tokenizer {
            tok
        } else if tok_path.exists() {
            TextTokenizer::from_file(&tok_path)?
        } else {
            let t5_dir = resolve_pretrained("T5 text encoder", "t5-base", None, "--t5")
                .with_context(|| format!("{}: no tokenizer.json next to the weights", dir.display()))?;
            TextTokenizer::from_file(&t5_dir.join("tokenizer.json"))?
        };
        (strip_prefix_map(&all, "text_encoder."), format!("{origin} (text_encoder)"), tok)
    };
    drop(all);
    check_memory(&origin, &cfg, &[&lm, &codec, &t5], opts)?;
    let t5_store = ParamStore::stored(t5, t5_origin, device);
    MusicGen::new(
        cfg,
        tokenizer,
        &t5_store,
        ParamStore::stored(lm, format!("{origin} (LM)"), device),
        ParamStore::stored(codec, format!("{origin} (EnCodec)"), device),
        origin,
    )
}

// ---------------------------------------------------------------------------------------
// audiocraft layout

/// `xp.cfg` keeps OmegaConf interpolations (`${encodec.causal}`) unresolved, as audiocraft
/// writes it; they are resolved against the whole config.
fn yaml_lookup<'a>(root: &'a Yaml, path: &str, depth: usize) -> Option<&'a Yaml> {
    let mut cur = root;
    for key in path.split('.') {
        cur = cur.get(key)?;
    }
    match cur {
        Yaml::Null => None,
        Yaml::String(s) if s.starts_with("${") && s.ends_with('}') && depth < 8 => {
            let target = &s[2..s.len() - 1];
            // Resolvers (`${oc.env:...}`) and relative paths are not followed.
            if target.contains(':') || target.starts_with('.') {
                Some(cur)
            } else {
                yaml_lookup(root, target, depth + 1)
            }
        }
        v => Some(v),
    }
}

fn yaml_get<'a>(v: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    yaml_lookup(v, path, 0)
}

fn yaml_usize(v: &Yaml, path: &str) -> Result<usize> {
    match yaml_get(v, path) {
        None => bail!("xp.cfg: missing integer `{path}`"),
        Some(x) => {
            x.as_u64().map(|x| x as usize).ok_or_else(|| anyhow!("xp.cfg: `{path}` must be an integer, found {x:?}"))
        }
    }
}

fn yaml_usize_or(v: &Yaml, path: &str, default: usize) -> Result<usize> {
    match yaml_get(v, path) {
        None => Ok(default),
        Some(_) => yaml_usize(v, path),
    }
}

fn yaml_f64_or(v: &Yaml, path: &str, default: f64) -> Result<f64> {
    match yaml_get(v, path) {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| anyhow!("xp.cfg: `{path}` must be a number, found {x:?}")),
    }
}

fn yaml_bool_or(v: &Yaml, path: &str, default: bool) -> Result<bool> {
    match yaml_get(v, path) {
        None => Ok(default),
        Some(x) => x.as_bool().ok_or_else(|| anyhow!("xp.cfg: `{path}` must be true or false, found {x:?}")),
    }
}

fn yaml_str<'a>(v: &'a Yaml, path: &str) -> Result<Option<&'a str>> {
    match yaml_get(v, path) {
        None => Ok(None),
        Some(x) => x.as_str().map(Some).ok_or_else(|| anyhow!("xp.cfg: `{path}` must be a string, found {x:?}")),
    }
}

fn parse_xp_cfg(path: &Path, text: &str) -> Result<Yaml> {
    serde_yaml::from_str(text).with_context(|| format!("{}: `xp.cfg` is not valid YAML", path.display()))
}

/// Everything the loader reads from an audiocraft `xp.cfg` (LM or codec), without weights:
/// the settings it would run with, or the error it would stop with.
pub fn read_xp_cfg(text: &str) -> Result<String> {
    let xp = parse_xp_cfg(Path::new("xp.cfg"), text)?;
    let mut out = String::new();
    if xp.get("transformer_lm").is_some() {
        let (lm, channels) = lm_config_from_xp(&xp, 768)?;
        out += &format!("{lm:?} channels={channels} {:?}", generation_from_xp(&xp)?);
    }
    if xp.get("seanet").is_some() {
        out += &format!("{:?}", codec_config_from_xp(&xp)?);
    }
    Ok(out)
}

/// A list of condition names at `path` (absent or null: empty); anything else is an error.
fn yaml_names(xp: &Yaml, path: &str) -> Result<Vec<String>> {
    match yaml_get(xp, path) {
        None => Ok(Vec::new()),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| anyhow!("xp.cfg: `{path}` must list names, found {i:?}"))
            })
            .collect(),
        Some(other) => bail!("xp.cfg: `{path}` must be a list of condition names, found {other:?}"),
    }
}

/// How the text reaches the LM, as audiocraft's model builder decides it
/// (`audiocraft/models/builders.py`, `get_lm_model`): cross-attention is on whenever
/// `fuser.cross` lists a condition, whatever `transformer_lm.cross_attention` says (real
/// exports say `false`). Only what this model cannot run is refused, naming the key.
fn check_conditioning(xp: &Yaml) -> Result<()> {
    let cross = yaml_names(xp, "fuser.cross")?;
    let flag = match yaml_get(xp, "transformer_lm.cross_attention") {
        None => false,
        Some(Yaml::Bool(b)) => *b,
        Some(other) => bail!("xp.cfg: `transformer_lm.cross_attention` must be true or false, found {other:?}"),
    };
    for key in ["fuser.prepend", "fuser.sum", "fuser.input_interpolate"] {
        let names = yaml_names(xp, key)?;
        if !names.is_empty() {
            let what = if names.iter().any(|n| n == "self_wav") { " (melody/chroma conditioning)" } else { "" };
            bail!(
                "xp.cfg: `{key}: [{}]`{what} is not supported: this model conditions on text through cross-attention only",
                names.join(", ")
            );
        }
    }
    if cross.is_empty() && !flag {
        bail!("xp.cfg: `fuser.cross` lists no condition and `transformer_lm.cross_attention` is false: an LM without text conditioning is not supported");
    }
    if let Some(other) = cross.iter().find(|n| n.as_str() != "description") {
        bail!(
            "xp.cfg: `fuser.cross: [{}]`: condition `{other}` is not supported (only `description`)",
            cross.join(", ")
        );
    }
    for key in ["fuser.cross_attention_pos_emb", "transformer_lm.cross_attention_pos_emb"] {
        if let Some(v) = yaml_get(xp, key) {
            if v.as_bool() != Some(false) {
                bail!("xp.cfg: `{key}: {v:?}` is not supported (only false)");
            }
        }
    }
    Ok(())
}

/// LM hyper-parameters from an audiocraft `xp.cfg`.
fn lm_config_from_xp(xp: &Yaml, cond_dim: usize) -> Result<(LmConfig, usize)> {
    let t = "transformer_lm";
    let check = |key: &str, expect: &str| -> Result<()> {
        if let Some(v) = yaml_get(xp, &format!("{t}.{key}")) {
            let s = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Bool(b) => b.to_string(),
                other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
            };
            if s != expect {
                bail!("xp.cfg: `{t}.{key}: {s}` is not supported (only `{expect}`)");
            }
        }
        Ok(())
    };
    check("activation", "gelu")?;
    check("norm", "layer_norm")?;
    check("norm_first", "true")?;
    check("positional_embedding", "sin")?;
    check("bias_attn", "false")?;
    check("bias_ff", "false")?;
    check("qk_layer_norm", "false")?;
    check_conditioning(xp)?;
    let modeling = yaml_str(xp, "codebooks_pattern.modeling")?.unwrap_or("delay");
    if modeling != "delay" {
        bail!("xp.cfg: codebook pattern `{modeling}` is not supported (only `delay`)");
    }
    let dim = yaml_usize(xp, &format!("{t}.dim"))?;
    let n_q = yaml_usize(xp, &format!("{t}.n_q"))?;
    let channels = yaml_usize_or(xp, "channels", 1)?;
    let delays = match yaml_get(xp, "codebooks_pattern.delay.delays").and_then(Yaml::as_sequence) {
        Some(seq) => seq
            .iter()
            .map(|d| d.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("xp.cfg: `codebooks_pattern.delay.delays` must be integers"))?,
        None => delay_pattern(n_q, channels),
    };
    let hidden_scale = yaml_f64_or(xp, &format!("{t}.hidden_scale"), 4.0)?;
    let cfg = LmConfig {
        dim,
        num_heads: yaml_usize(xp, &format!("{t}.num_heads"))?,
        num_layers: yaml_usize(xp, &format!("{t}.num_layers"))?,
        ffn_dim: (hidden_scale * dim as f64) as usize,
        n_q,
        card: yaml_usize(xp, &format!("{t}.card"))?,
        delays,
        cond_dim,
        cond_proj: true,
        norm_eps: 1e-5,
        max_period: yaml_f64_or(xp, &format!("{t}.max_period"), 10_000.0)?,
        scale_embedding: false,
    };
    Ok((cfg, channels))
}

fn generation_from_xp(xp: &Yaml) -> Result<GenerationDefaults> {
    let d = GenerationDefaults::default();
    Ok(GenerationDefaults {
        guidance_scale: yaml_f64_or(xp, "classifier_free_guidance.inference_coef", d.guidance_scale)?,
        top_k: yaml_usize_or(xp, "generate.lm.top_k", d.top_k)?,
        top_p: yaml_f64_or(xp, "generate.lm.top_p", d.top_p)?,
        temperature: yaml_f64_or(xp, "generate.lm.temp", d.temperature)?,
        use_sampling: yaml_bool_or(xp, "generate.lm.use_sampling", d.use_sampling)?,
        window_seconds: yaml_f64_or(xp, "dataset.segment_duration", d.window_seconds)?,
    })
}

/// The keys of audiocraft's `seanet` config (`config/model/encodec/default.yaml`): every
/// one must be there, and nothing else may be, so that a setting this port does not know
/// never passes silently.
const SEANET_KEYS: &[&str] = &[
    "activation",
    "activation_params",
    "causal",
    "channels",
    "compress",
    "decoder",
    "dilation_base",
    "dimension",
    "disable_norm_outer_blocks",
    "encoder",
    "kernel_size",
    "last_kernel_size",
    "lstm",
    "n_filters",
    "n_residual_layers",
    "norm",
    "norm_params",
    "pad_mode",
    "ratios",
    "residual_kernel_size",
    "true_skip",
];

fn check_seanet_keys(xp: &Yaml) -> Result<()> {
    let seanet = xp.get("seanet").and_then(Yaml::as_mapping).ok_or_else(|| anyhow!("xp.cfg: no `seanet` section"))?;
    for k in seanet.keys() {
        let k = k.as_str().ok_or_else(|| anyhow!("xp.cfg: a `seanet` key is not a string: {k:?}"))?;
        if !SEANET_KEYS.contains(&k) {
            bail!("xp.cfg: unknown key `seanet.{k}`: this codec setting is not supported");
        }
    }
    for k in SEANET_KEYS
        .iter()
        .filter(|k| !["encoder", "decoder", "activation_params", "norm_params", "channels"].contains(k))
    {
        if yaml_get(xp, &format!("seanet.{k}")).is_none() && !matches!(seanet.get(*k), Some(Yaml::Null)) {
            bail!("xp.cfg: missing `seanet.{k}`");
        }
    }
    if yaml_usize_or(xp, "seanet.disable_norm_outer_blocks", 0)? != 0 {
        bail!("xp.cfg: `seanet.disable_norm_outer_blocks` other than 0 is not supported");
    }
    if let Some(a) = yaml_get(xp, "seanet.activation_params.alpha") {
        if a.as_f64() != Some(1.0) {
            bail!("xp.cfg: `seanet.activation_params.alpha: {a:?}` is not supported (1.0)");
        }
    }
    if let Some(f) = yaml_get(xp, "seanet.decoder.final_activation") {
        bail!("xp.cfg: `seanet.decoder.final_activation: {f:?}` is not supported (null)");
    }
    Ok(())
}

/// Codec hyper-parameters from an audiocraft compression `xp.cfg`.
fn codec_config_from_xp(xp: &Yaml) -> Result<CodecConfig> {
    let s = "seanet";
    check_seanet_keys(xp)?;
    let ratios = yaml_get(xp, &format!("{s}.ratios"))
        .and_then(Yaml::as_sequence)
        .and_then(|r| r.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| anyhow!("xp.cfg: missing `seanet.ratios`"))?;
    let act = yaml_str(xp, &format!("{s}.activation"))?.unwrap_or("ELU");
    if act != "ELU" {
        bail!("xp.cfg: codec activation `{act}` is not supported (ELU)");
    }
    let norm = yaml_str(xp, &format!("{s}.norm"))?.unwrap_or("weight_norm");
    if norm != "weight_norm" && norm != "none" {
        bail!("xp.cfg: codec norm `{norm}` is not supported (weight_norm)");
    }
    let pad_mode = match yaml_str(xp, &format!("{s}.pad_mode"))?.unwrap_or("reflect") {
        "reflect" => PadMode::Reflect,
        "constant" => PadMode::Constant,
        other => bail!("xp.cfg: codec pad_mode `{other}` is not supported"),
    };
    let dimension = yaml_usize(xp, &format!("{s}.dimension"))?;
    Ok(CodecConfig {
        sample_rate: yaml_usize(xp, "sample_rate")?,
        channels: yaml_usize_or(xp, "channels", 1)?,
        dimension,
        n_filters: yaml_usize(xp, &format!("{s}.n_filters"))?,
        ratios,
        kernel_size: yaml_usize(xp, &format!("{s}.kernel_size"))?,
        last_kernel_size: yaml_usize(xp, &format!("{s}.last_kernel_size"))?,
        residual_kernel_size: yaml_usize(xp, &format!("{s}.residual_kernel_size"))?,
        dilation_base: yaml_usize(xp, &format!("{s}.dilation_base"))?,
        n_residual_layers: yaml_usize(xp, &format!("{s}.n_residual_layers"))?,
        // Required: a missing `lstm` must not silently mean "no LSTM".
        lstm_layers: yaml_usize(xp, &format!("{s}.lstm"))?,
        compress: yaml_usize(xp, &format!("{s}.compress"))?,
        conv_shortcut: !yaml_bool_or(xp, &format!("{s}.true_skip"), true)?,
        pad_mode,
        causal: yaml_bool_or(xp, &format!("{s}.causal"), false)?,
        trim_right_ratio: yaml_f64_or(xp, &format!("{s}.decoder.trim_right_ratio"), 1.0)?,
        n_q: yaml_usize(xp, "rvq.n_q")?,
        card: yaml_usize(xp, "rvq.bins")?,
        codebook_dim: yaml_get(xp, "rvq.dimension").and_then(Yaml::as_u64).map_or(dimension, |x| x as usize),
    })
}

/// The codec of an audiocraft export: (config, transformers-named tensors, origin).
fn load_audiocraft_codec(
    dir: &Path,
    lm_xp: &Yaml,
    opts: &LoadOptions,
) -> Result<(CodecConfig, HashMap<String, StoredTensor>, String)> {
    let candidates = ["compression_state_dict.bin", "compressed_state_dict.bin"];
    let file = candidates.iter().map(|c| dir.join(c)).find(|p| p.exists());
    let pointer = match &file {
        Some(path) => {
            let root = read_pickle_root(path)?;
            if dict_has(&root, "best_state") {
                let xp_text = dict_string(&root, "xp.cfg")
                    .ok_or_else(|| anyhow!("{}: has `best_state` but no `xp.cfg` string", path.display()))?;
                let xp = parse_xp_cfg(path, &xp_text)?;
                let cfg = codec_config_from_xp(&xp).with_context(|| format!("{}: codec config", path.display()))?;
                let tensors = codec_tensors(open_pickle_tensors(path, Some("best_state"))?);
                return Ok((cfg, tensors, path.display().to_string()));
            }
            dict_string(&root, "pretrained").ok_or_else(|| {
                anyhow!("{}: neither a codec (`best_state`) nor a `pretrained` pointer", path.display())
            })?
        }
        None => match yaml_str(lm_xp, "compression_model_checkpoint")? {
            Some(p) => p.trim_start_matches("//pretrained/").to_string(),
            None => bail!(
                "{}: no compression_state_dict.bin (or compressed_state_dict.bin) and no `compression_model_checkpoint` in xp.cfg",
                dir.display()
            ),
        },
    };
    let codec_dir = resolve_pretrained("EnCodec", &pointer, opts.encodec.as_deref(), "--encodec")?;
    let cfg = CodecConfig::from_hf_json(&read_json(&codec_dir.join("config.json"))?)
        .with_context(|| format!("{}: unsupported EnCodec config", codec_dir.join("config.json").display()))?;
    let tensors = codec_tensors(open_hf_weights(&codec_dir)?);
    Ok((cfg, tensors, codec_dir.display().to_string()))
}

fn load_audiocraft(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<MusicGen> {
    let lm_path = dir.join("state_dict.bin");
    let root = read_pickle_root(&lm_path)?;
    let xp_text = dict_string(&root, "xp.cfg").ok_or_else(|| {
        anyhow!("{}: no `xp.cfg` string; expected an audiocraft export (export_lm)", lm_path.display())
    })?;
    if !dict_has(&root, "best_state") {
        bail!("{}: no `best_state`; expected an audiocraft export (export_lm)", lm_path.display());
    }
    let xp = parse_xp_cfg(&lm_path, &xp_text)?;
    let lm_tensors = open_pickle_tensors(&lm_path, Some("best_state"))?;
    let proj = lm_tensors
        .get("condition_provider.conditioners.description.output_proj.weight")
        .ok_or_else(|| anyhow!("{}: no text-conditioning projection (`condition_provider.conditioners.description.output_proj.weight`); only text-conditioned MusicGen is supported", lm_path.display()))?;
    let cond_dim = match proj.dims()?[..] {
        [_, c] => c,
        ref d => {
            bail!("{}: the text-conditioning projection has shape {d:?}, expected 2 dimensions", lm_path.display())
        }
    };
    let (lm_cfg, channels) =
        lm_config_from_xp(&xp, cond_dim).with_context(|| format!("{}: unsupported LM config", lm_path.display()))?;
    let (codec_cfg, codec, codec_origin) = load_audiocraft_codec(dir, &xp, opts)?;
    let t5_name = yaml_str(&xp, "conditioners.description.t5.name")?.unwrap_or("t5-base");
    let t5_dir = resolve_pretrained("T5 text encoder", t5_name, opts.t5.as_deref(), "--t5")?;
    let (t5_cfg, t5, tokenizer) = load_t5_dir(&t5_dir)?;
    let cfg = MusicgenConfig {
        lm: lm_cfg,
        codec: codec_cfg,
        t5: t5_cfg,
        generation: generation_from_xp(&xp)?,
        audio_channels: channels,
    };
    cfg.validate().with_context(|| format!("{}: the LM, codec and T5 do not fit together", dir.display()))?;
    check_memory(&dir.display().to_string(), &cfg, &[&lm_tensors, &codec, &t5], opts)?;
    let t5_store = ParamStore::stored(t5, t5_dir.display().to_string(), device);
    MusicGen::new(
        cfg,
        tokenizer,
        &t5_store,
        ParamStore::stored(lm_tensors, format!("{} (LM)", lm_path.display()), device),
        ParamStore::stored(codec, format!("{codec_origin} (EnCodec)"), device),
        dir.display().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_transformers_lm_names() {
        assert_eq!(
            hf_lm_name("decoder.model.decoder.layers.3.encoder_attn_layer_norm.bias").as_deref(),
            Some("transformer.layers.3.norm_cross.bias")
        );
        assert_eq!(hf_lm_name("decoder.lm_heads.2.weight").as_deref(), Some("linears.2.weight"));
        assert_eq!(hf_lm_name("decoder.model.decoder.embed_tokens.1.weight").as_deref(), Some("emb.1.weight"));
        assert_eq!(
            hf_lm_name("enc_to_dec_proj.bias").as_deref(),
            Some("condition_provider.conditioners.description.output_proj.bias")
        );
        assert_eq!(
            hf_lm_name("decoder.model.decoder.layers.0.fc2.weight").as_deref(),
            Some("transformer.layers.0.linear2.weight")
        );
    }

    #[test]
    fn maps_codec_names_of_both_layouts() {
        assert_eq!(codec_name("decoder.model.3.convtr.convtr.weight_g"), "decoder.layers.3.conv.weight_g");
        assert_eq!(codec_name("decoder.model.4.block.1.conv.conv.weight_v"), "decoder.layers.4.block.1.conv.weight_v");
        assert_eq!(
            codec_name("decoder.layers.0.conv.parametrizations.weight.original0"),
            "decoder.layers.0.conv.weight_g"
        );
        assert_eq!(codec_name("quantizer.vq.layers.2._codebook.embed"), "quantizer.layers.2.codebook.embed");
        assert_eq!(codec_name("decoder.model.1.lstm.weight_ih_l0"), "decoder.layers.1.lstm.weight_ih_l0");
    }

    #[test]
    fn a_model_that_cannot_fit_is_refused_before_loading() {
        let t = |n: usize| {
            StoredTensor::Memory(candle_core::Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap())
        };
        // 4 MB of LM, 1 MB of codec encoder.
        let lm: HashMap<String, StoredTensor> = [("emb.0.weight".to_string(), t(1 << 20))].into();
        let codec: HashMap<String, StoredTensor> = [("encoder.layers.0.conv.weight".to_string(), t(1 << 18))].into();
        let opts = |purpose, force| LoadOptions { purpose, force, ..Default::default() };
        // One window's cache: 1 MB.
        let check = |o: &LoadOptions, avail: u64| check_memory_against("m", 1 << 20, &[&lm, &codec], o, Some(avail));
        // Generation: 4 MB × 1.05 + 1 MB = 5.45 MB (the encoder is not loaded).
        assert!(check(&opts(Purpose::Inference, false), 5_500_000).is_ok());
        let e = format!("{:#}", check(&opts(Purpose::Inference, false), 5_300_000).unwrap_err());
        assert!(e.contains("generation") && e.contains("available") && e.contains("--force"), "{e}");
        // Gradients need the encoder too: 5.24 MB × 1.05 + 1 MB = 6.55 MB.
        assert!(check(&opts(Purpose::Gradients, false), 6_400_000).is_err());
        assert!(check(&opts(Purpose::Gradients, false), 6_700_000).is_ok());
        // Fine-tuning: × 4.3.
        assert!(check(&opts(Purpose::Training, false), 20_000_000).is_err());
        assert!(check(&opts(Purpose::Training, false), 23_000_000).is_ok());
        // --force loads anyway; an unknown amount of memory is not a reason to refuse.
        assert!(check(&opts(Purpose::Training, true), 1).is_ok());
        assert!(check_memory_against("m", 0, &[&lm], &opts(Purpose::Training, false), None).is_ok());
    }

    fn xp(text: &str) -> Yaml {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn conditioning_follows_the_fuser_as_audiocraft_builds_it() {
        // Real exports: cross_attention false, the fuser routes the description to cross-attention.
        let real = "transformer_lm: {cross_attention: false}\nfuser: {cross_attention_pos_emb: false, sum: [], prepend: [], cross: [description], input_interpolate: []}";
        check_conditioning(&xp(real)).unwrap();
        check_conditioning(&xp("transformer_lm: {cross_attention: true}\nfuser: {cross: [description]}")).unwrap();
        let refused = [
            ("transformer_lm: {cross_attention: false}\nfuser: {cross: [description], prepend: [self_wav]}", "melody"),
            ("transformer_lm: {cross_attention: false}\nfuser: {cross: []}", "without text conditioning"),
            ("fuser: {cross: [description], cross_attention_pos_emb: true}", "cross_attention_pos_emb"),
            ("fuser: {cross: [description, genre]}", "genre"),
            ("fuser: {cross: description}", "list"),
            ("transformer_lm: {cross_attention: maybe}\nfuser: {cross: [description]}", "true or false"),
        ];
        for (text, needle) in refused {
            let e = format!("{:#}", check_conditioning(&xp(text)).unwrap_err());
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn interpolations_resolve_and_wrong_types_are_errors() {
        let v =
            xp("encodec: {causal: true}\nseanet: {causal: '${encodec.causal}', lstm: two, ratios: [8, 5]}\nrate: 3.5");
        assert!(yaml_bool_or(&v, "seanet.causal", false).unwrap());
        assert!(format!("{:#}", yaml_usize(&v, "seanet.lstm").unwrap_err()).contains("must be an integer"));
        assert!(format!("{:#}", yaml_bool_or(&v, "rate", false).unwrap_err()).contains("true or false"));
        assert_eq!(yaml_f64_or(&v, "missing.key", 2.0).unwrap(), 2.0);
        // A missing or unknown seanet key is an error, not a default.
        let e = format!("{:#}", check_seanet_keys(&v).unwrap_err());
        assert!(e.contains("missing `seanet."), "{e}");
    }
}
