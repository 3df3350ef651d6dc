//! Configs as the public MusicGen checkpoints publish them, and a PyTorch checkpoint whose
//! tensors are views into one shared storage.
//!
//! `tests/fixtures/hf_configs/<repo>/` mirrors `config.json` and `generation_config.json` of
//! the public `facebook/musicgen-*` Hugging Face repositories; its README says where each
//! file's content comes from and which fields are uncertain. The mono configs were written by
//! transformers 4.31 and the stereo ones by 4.35, so they lack keys today's transformers
//! writes: the mono decoders have no `audio_channels`, and no `generation_config.json` has a
//! `top_k`, `temperature` or `top_p`. MusicGen-Melody (`model_type: musicgen_melody`) is a
//! different architecture (chroma conditioning) and must be refused, not parsed as a
//! text-only MusicGen.
//!
//! `tests/fixtures/storage_views/` is written by `scripts/make_storage_view_fixture.py`:
//! `views.pt` holds `{"best_state": {q, k, v, t, col, whole}}`, all views of one fused
//! [24, 8] float32 weight `w` (one `data/` record in the archive): `q = w[0:8]` (offset 0),
//! `k = w[8:16]` (offset 64), `v = w[16:24]` (offset 128), `t = w[8:16].t()` (offset 64,
//! strides (1, 8)), `col = w[:, 3]` (offset 3, stride 8) and `whole = w`.
//! `expected.safetensors` holds the same values as contiguous tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use spintrak::musicgen::checkpoint::read_pickle_tensors;
use spintrak::musicgen::config::{PadMode, T5FeedForward};
use spintrak::musicgen::MusicgenConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `config.json` and, when the repository publishes one, `generation_config.json`.
fn published(repo: &str) -> (Value, Option<Value>) {
    let dir = fixtures().join("hf_configs").join(repo);
    let config = read_json(&dir.join("config.json"));
    let gen_path = dir.join("generation_config.json");
    let generation = gen_path.exists().then(|| read_json(&gen_path));
    (config, generation)
}

/// The LM shape a public checkpoint must give.
struct Lm {
    dim: usize,
    num_layers: usize,
    num_heads: usize,
    ffn_dim: usize,
}

const SMALL: Lm = Lm { dim: 1024, num_layers: 24, num_heads: 16, ffn_dim: 4096 };
const MEDIUM: Lm = Lm { dim: 1536, num_layers: 48, num_heads: 24, ffn_dim: 6144 };
const LARGE: Lm = Lm { dim: 2048, num_layers: 48, num_heads: 32, ffn_dim: 8192 };

fn check_public(repo: &str, want: Lm, stereo: bool) {
    let (config, generation) = published(repo);
    assert!(generation.is_some(), "{repo}: the repository publishes a generation_config.json");
    let cfg = MusicgenConfig::from_hf_json(&config, generation.as_ref())
        .unwrap_or_else(|e| panic!("{repo}: the published config is refused: {e:#}"));
    cfg.validate().unwrap_or_else(|e| panic!("{repo}: validate: {e:#}"));

    // The language model.
    let lm = &cfg.lm;
    assert_eq!(lm.dim, want.dim, "{repo}: dim");
    assert_eq!(lm.num_layers, want.num_layers, "{repo}: num_layers");
    assert_eq!(lm.num_heads, want.num_heads, "{repo}: num_heads");
    assert_eq!(lm.ffn_dim, want.ffn_dim, "{repo}: ffn_dim");
    assert_eq!(lm.head_dim(), 64, "{repo}: head_dim");
    assert_eq!(lm.card, 2048, "{repo}: card");
    assert_eq!(lm.special_token(), 2048, "{repo}: special token");
    if stereo {
        assert_eq!(lm.n_q, 8, "{repo}: n_q");
        assert_eq!(lm.delays, vec![0, 0, 1, 1, 2, 2, 3, 3], "{repo}: delays");
        assert_eq!(cfg.audio_channels, 2, "{repo}: audio_channels");
    } else {
        assert_eq!(lm.n_q, 4, "{repo}: n_q");
        assert_eq!(lm.delays, vec![0, 1, 2, 3], "{repo}: delays");
        assert_eq!(cfg.audio_channels, 1, "{repo}: audio_channels");
    }
    assert_eq!(lm.max_delay(), 3, "{repo}: max_delay");
    assert_eq!(lm.cond_dim, 768, "{repo}: cond_dim (t5-base)");
    assert!(lm.cond_proj, "{repo}: the 768-wide T5 states are projected to the LM width");
    assert!(!lm.scale_embedding, "{repo}: scale_embedding");

    // The text encoder: t5-base for every size, large included.
    let t5 = &cfg.t5;
    assert_eq!(t5.d_model, 768, "{repo}: t5 d_model");
    assert_eq!(t5.num_layers, 12, "{repo}: t5 num_layers");
    assert_eq!(t5.num_heads, 12, "{repo}: t5 num_heads");
    assert_eq!(t5.d_kv, 64, "{repo}: t5 d_kv");
    assert_eq!(t5.d_ff, 3072, "{repo}: t5 d_ff");
    assert_eq!(t5.vocab_size, 32128, "{repo}: t5 vocab_size");
    assert_eq!(t5.relative_attention_num_buckets, 32, "{repo}: t5 buckets");
    assert_eq!(t5.relative_attention_max_distance, 128, "{repo}: t5 max distance");
    assert_eq!(t5.layer_norm_epsilon, 1e-6, "{repo}: t5 eps");
    assert_eq!(t5.feed_forward, T5FeedForward::Relu, "{repo}: t5 feed-forward");

    // The codec: facebook/encodec_32khz, mono even under stereo MusicGen.
    let codec = &cfg.codec;
    assert_eq!(codec.sample_rate, 32000, "{repo}: sample_rate");
    assert_eq!(cfg.sample_rate(), 32000, "{repo}: sample_rate()");
    assert_eq!(codec.hop_length(), 640, "{repo}: hop_length");
    assert_eq!(cfg.frame_rate(), 50.0, "{repo}: frame rate");
    assert_eq!(codec.n_q, 4, "{repo}: codec n_q (from target_bandwidths [2.2])");
    assert_eq!(codec.card, 2048, "{repo}: codec card");
    assert_eq!(codec.channels, 1, "{repo}: codec channels");
    assert_eq!(codec.dimension, 128, "{repo}: codec dimension");
    assert_eq!(codec.codebook_dim, 128, "{repo}: codebook_dim");
    assert_eq!(codec.n_filters, 64, "{repo}: num_filters");
    assert_eq!(codec.ratios, vec![8, 5, 4, 4], "{repo}: upsampling_ratios");
    assert_eq!(codec.kernel_size, 7, "{repo}: kernel_size");
    assert_eq!(codec.last_kernel_size, 7, "{repo}: last_kernel_size");
    assert_eq!(codec.residual_kernel_size, 3, "{repo}: residual_kernel_size");
    assert_eq!(codec.dilation_base, 2, "{repo}: dilation_growth_rate");
    assert_eq!(codec.n_residual_layers, 1, "{repo}: num_residual_layers");
    assert_eq!(codec.lstm_layers, 2, "{repo}: num_lstm_layers");
    assert_eq!(codec.compress, 2, "{repo}: compress");
    assert!(!codec.conv_shortcut, "{repo}: use_conv_shortcut is false in encodec_32khz");
    assert!(!codec.causal, "{repo}: use_causal_conv is false in encodec_32khz");
    assert_eq!(codec.pad_mode, PadMode::Reflect, "{repo}: pad_mode");
    assert_eq!(codec.trim_right_ratio, 1.0, "{repo}: trim_right_ratio");

    // Sampling defaults. generation_config.json has guidance_scale 3.0, do_sample true and
    // max_length 1500 (30 s at 50 Hz) but no top_k / temperature / top_p, so those keep
    // audiocraft's defaults.
    let gen = &cfg.generation;
    assert_eq!(gen.guidance_scale, 3.0, "{repo}: guidance_scale");
    assert_eq!(gen.top_k, 250, "{repo}: top_k");
    assert_eq!(gen.top_p, 0.0, "{repo}: top_p");
    assert_eq!(gen.temperature, 1.0, "{repo}: temperature");
    assert!(gen.use_sampling, "{repo}: do_sample");
    assert_eq!(gen.window_seconds, 30.0, "{repo}: window (max_length 1500 / 50 Hz)");
}

#[test]
fn musicgen_small() {
    check_public("musicgen-small", SMALL, false);
}

#[test]
fn musicgen_medium() {
    check_public("musicgen-medium", MEDIUM, false);
}

#[test]
fn musicgen_large() {
    check_public("musicgen-large", LARGE, false);
}

#[test]
fn musicgen_stereo_small() {
    check_public("musicgen-stereo-small", SMALL, true);
}

#[test]
fn musicgen_stereo_medium() {
    check_public("musicgen-stereo-medium", MEDIUM, true);
}

#[test]
fn musicgen_stereo_large() {
    check_public("musicgen-stereo-large", LARGE, true);
}

/// Guards the fixtures themselves: they keep the older layout the hub files have, so the
/// tests above exercise the parser's defaults for the missing keys.
#[test]
fn fixtures_keep_the_published_layout() {
    for repo in ["musicgen-small", "musicgen-medium", "musicgen-large"] {
        let (config, generation) = published(repo);
        assert_eq!(config["model_type"], "musicgen", "{repo}");
        assert_eq!(config["decoder"]["model_type"], "musicgen_decoder", "{repo}");
        assert!(config["decoder"].get("audio_channels").is_none(), "{repo}: mono decoders publish no audio_channels");
        assert_eq!(config["decoder"]["num_codebooks"], 4, "{repo}");
        assert_eq!(config["text_encoder"]["_name_or_path"], "t5-base", "{repo}");
        assert_eq!(config["audio_encoder"]["_name_or_path"], "facebook/encodec_32khz", "{repo}");
        let generation = generation.expect("generation_config.json");
        assert_eq!(generation["transformers_version"], "4.31.0.dev0", "{repo}");
    }
    for repo in ["musicgen-stereo-small", "musicgen-stereo-medium", "musicgen-stereo-large"] {
        let (config, _) = published(repo);
        assert_eq!(config["model_type"], "musicgen", "{repo}");
        assert_eq!(config["decoder"]["audio_channels"], 2, "{repo}");
        assert_eq!(config["decoder"]["num_codebooks"], 8, "{repo}");
        assert_eq!(config["audio_encoder"]["audio_channels"], 1, "{repo}: the codec stays mono");
    }
    for repo in [
        "musicgen-small",
        "musicgen-medium",
        "musicgen-large",
        "musicgen-stereo-small",
        "musicgen-stereo-medium",
        "musicgen-stereo-large",
        "musicgen-melody",
    ] {
        let (_, generation) = published(repo);
        let generation = generation.expect("generation_config.json");
        for key in ["top_k", "top_p", "temperature"] {
            assert!(generation.get(key).is_none(), "{repo}: generation_config.json publishes no `{key}`");
        }
        assert_eq!(generation["max_length"], 1500, "{repo}");
        assert_eq!(generation["guidance_scale"], 3.0, "{repo}");
        assert_eq!(generation["do_sample"].as_bool(), Some(true), "{repo}");
    }
}

fn assert_melody_refused(what: &str, config: &Value, generation: Option<&Value>) {
    match MusicgenConfig::from_hf_json(config, generation) {
        Ok(cfg) => panic!(
            "{what}: a MusicGen-Melody config must be refused, but it was parsed as a text-only MusicGen \
             (dim {}, {} codebooks)",
            cfg.lm.dim, cfg.lm.n_q
        ),
        Err(e) => {
            let msg = format!("{e:#}");
            let lower = msg.to_lowercase();
            assert!(
                lower.contains("not supported") && lower.contains("melody"),
                "{what}: the refusal should say that melody models are not supported, got: {msg}"
            );
        }
    }
}

#[test]
fn musicgen_melody_is_refused() {
    let (config, generation) = published("musicgen-melody");
    assert_eq!(config["model_type"], "musicgen_melody");
    assert_eq!(config["decoder"]["model_type"], "musicgen_melody_decoder");
    assert_melody_refused("facebook/musicgen-melody", &config, generation.as_ref());

    // facebook/musicgen-melody-large: the same layout with the large decoder.
    let mut large = config.clone();
    large["decoder"]["hidden_size"] = 2048.into();
    large["decoder"]["ffn_dim"] = 8192.into();
    large["decoder"]["num_attention_heads"] = 32.into();
    assert_melody_refused("facebook/musicgen-melody-large", &large, generation.as_ref());

    // facebook/musicgen-stereo-melody: 8 interleaved codebooks, 2 channels.
    let mut stereo = config.clone();
    stereo["decoder"]["num_codebooks"] = 8.into();
    stereo["decoder"]["audio_channels"] = 2.into();
    assert_melody_refused("facebook/musicgen-stereo-melody", &stereo, generation.as_ref());

    // Without its generation_config.json too.
    assert_melody_refused("facebook/musicgen-melody (config.json only)", &config, None);
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn storage_view_fixture_holds_the_described_values() {
    let expected = candle_core::safetensors::load(fixtures().join("storage_views/expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors");
    let w: Vec<f32> = (0..24 * 8).map(|i| i as f32 * 0.25 - 17.0).collect();
    let whole = &expected["whole"];
    assert_eq!(whole.dims(), &[24, 8]);
    assert_eq!(values(whole), w);
    let rows = |a: usize, b: usize| w[a * 8..b * 8].to_vec();
    assert_eq!(values(&expected["q"]), rows(0, 8));
    assert_eq!(values(&expected["k"]), rows(8, 16));
    assert_eq!(values(&expected["v"]), rows(16, 24));
    let t: Vec<f32> = (0..8).flat_map(|c| (8..16).map(move |r| (r, c))).map(|(r, c)| w[r * 8 + c]).collect();
    assert_eq!(values(&expected["t"]), t);
    let col: Vec<f32> = (0..24).map(|r| w[r * 8 + 3]).collect();
    assert_eq!(values(&expected["col"]), col);
}

#[test]
fn pickle_views_of_one_shared_storage_read_their_own_bytes() {
    let dir = fixtures().join("storage_views");
    let ours: HashMap<String, Tensor> =
        read_pickle_tensors(&dir.join("views.pt"), Some("best_state")).unwrap_or_else(|e| panic!("views.pt: {e:#}"));
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).expect("expected.safetensors");

    let mut got_names: Vec<&String> = ours.keys().collect();
    let mut want_names: Vec<&String> = expected.keys().collect();
    got_names.sort();
    want_names.sort();
    assert_eq!(got_names, want_names, "tensor names");

    let mut wrong = Vec::new();
    for name in want_names {
        let (got, want) = (&ours[name], &expected[name]);
        if got.dims() != want.dims() {
            wrong.push(format!("{name}: shape {:?}, expected {:?}", got.dims(), want.dims()));
        } else if got.dtype() != DType::F32 {
            wrong.push(format!("{name}: dtype {:?}, expected F32", got.dtype()));
        } else if values(got) != values(want) {
            wrong.push(format!("{name}: values {:?}, expected {:?}", values(got), values(want)));
        }
    }
    assert!(wrong.is_empty(), "views read from the wrong bytes:\n{}", wrong.join("\n"));
}
