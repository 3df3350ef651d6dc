//! Loading MusicGen checkpoints as audiocraft itself exports them.
//!
//! `tests/fixtures/audiocraft_real_{mono,stereo}` were written by
//! `scripts/make_audiocraft_fixtures.py` with audiocraft's own Hydra configuration, model
//! builders and `audiocraft.utils.export` functions, so their `xp.cfg` is what a user's
//! fine-tune holds: every key audiocraft writes, `transformer_lm.cross_attention: false`
//! (audiocraft's default; its builder switches cross-attention on because
//! `fuser.cross: [description]`), unresolved `${...}` interpolations, and a full EnCodec in
//! `compression_state_dict.bin`. The reference outputs in `reference.safetensors` were
//! computed by audiocraft on the exported folders (definitions in `reference.json`).
//!
//! `audiocraft_real_mono/pretrained_codec` is a mono model trained on the solver's default
//! codec: its `compression_state_dict.bin` is the pointer `{'pretrained':
//! 'facebook/encodec_32khz'}` (`export_pretrained_compression_model`), which audiocraft
//! resolved to the tiny EnCodec of the `audiocraft_mono` hub fixture, passed here with `encodec`.
//!
//! T5 is never part of an export: the tiny `t5-base` of the `audiocraft_mono` hub fixture
//! (d_model 24, the conditioner's input width here) is passed with `t5`.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use spintrak::musicgen::config::PadMode;
use spintrak::musicgen::{LoadOptions, MusicGen};

fn load(name: &str, encodec: Option<PathBuf>) -> (MusicGen, HashMap<String, Tensor>) {
    let dir = fixtures().join(name);
    let opts = LoadOptions { t5: Some(hub_snapshot("models--t5-base")), encodec, ..Default::default() };
    let model = spintrak::musicgen::load(&dir, &opts, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: loading the audiocraft export failed: {e:#}"));
    (model, reference(&dir))
}

/// The configuration read from `xp.cfg` and the weights' shapes.
fn check_config(model: &MusicGen, label: &str, n_q: usize, delays: &[usize], channels: usize, sample_rate: usize) {
    let lm = &model.cfg.lm;
    assert_eq!(lm.n_q, n_q, "{label}: transformer_lm.n_q");
    assert_eq!(lm.delays, delays, "{label}: codebooks_pattern.delay.delays");
    assert_eq!(lm.dim, 32, "{label}: transformer_lm.dim");
    assert_eq!(lm.num_heads, 4, "{label}: transformer_lm.num_heads");
    assert_eq!(lm.num_layers, 2, "{label}: transformer_lm.num_layers");
    assert_eq!(lm.ffn_dim, 128, "{label}: hidden_scale 4 x dim");
    assert_eq!(lm.card, 32, "{label}: transformer_lm.card");
    assert_eq!(lm.cond_dim, 24, "{label}: conditioner output_proj input width (T5 d_model)");
    assert_eq!(lm.special_token(), 32, "{label}: special token = card");
    assert_eq!(model.cfg.audio_channels, channels, "{label}: channels");
    assert_eq!(model.lm.num_layers(), 2, "{label}: LM layers built");
    let codec = &model.cfg.codec;
    assert_eq!(codec.sample_rate, sample_rate, "{label}: codec sample_rate");
    assert_eq!(codec.channels, 1, "{label}: the EnCodec is mono (stereo interleaves two passes)");
    assert_eq!(codec.n_q, 4, "{label}: rvq.n_q");
    assert_eq!(codec.card, 32, "{label}: rvq.bins");
    assert_eq!(codec.dimension, 16, "{label}: seanet.dimension");
    assert_eq!(codec.n_filters, 4, "{label}: seanet.n_filters");
    assert_eq!(codec.ratios, [4, 2], "{label}: seanet.ratios");
    assert_eq!(codec.lstm_layers, 2, "{label}: seanet.lstm");
    assert!(!codec.causal, "{label}: not causal (an export's seanet.causal is the interpolation ${{encodec.causal}})");
    assert_eq!(model.cfg.t5.d_model, 24, "{label}: the tiny T5");
}

/// Conditioning, logits (conditional, null condition, text prompt) and EnCodec decode.
fn check_outputs(model: &MusicGen, r: &HashMap<String, Tensor>, label: &str) {
    // The conditioner's projection of a fixed T5 output.
    let states = model.lm.project_condition(&r["t5_hidden"]).unwrap();
    assert_close(&format!("{label}: cond_states"), &states, &r["cond_states"]);
    // The delay-pattern layout audiocraft built.
    let input = ids(&r["lm_input"]);
    let (k, s) = (input.len(), input[0].len());
    assert_eq!(model.pattern().build(&ids(&r["lm_frames"])), input, "{label}: delay pattern layout");
    // Logits of the LM on that input.
    let tokens = Tensor::from_vec(input.concat(), (1, k, s), &Device::Cpu).unwrap();
    let cond = model.lm.conditioning(&states, 1).unwrap();
    let logits = model.lm.forward(&tokens, &cond, None).unwrap().squeeze(0).unwrap();
    assert_close(&format!("{label}: conditional logits"), &logits, &r["logits"]);
    let null = model.lm.conditioning(&states, 0).unwrap();
    let uncond = model.lm.forward(&tokens, &null, None).unwrap().squeeze(0).unwrap();
    assert_close(&format!("{label}: null-condition logits"), &uncond, &r["logits_uncond"]);
    // The whole text path: tokenizer, T5, projection, logits.
    let prompt = "calm piano melody with soft drums";
    assert_eq!(model.tokenizer.encode(prompt).unwrap(), ids(&r["prompt_ids"])[0], "{label}: prompt token ids");
    let t5 = model.encode_text(prompt).unwrap();
    assert_close(&format!("{label}: prompt T5 states"), &t5, &r["prompt_t5_hidden"]);
    let prompt_states = model.lm.project_condition(&t5).unwrap();
    assert_close(&format!("{label}: prompt conditioning"), &prompt_states, &r["prompt_cond_states"]);
    let prompt_cond = model.lm.conditioning(&prompt_states, 1).unwrap();
    let prompt_logits = model.lm.forward(&tokens, &prompt_cond, None).unwrap().squeeze(0).unwrap();
    assert_close(&format!("{label}: prompt logits"), &prompt_logits, &r["prompt_logits"]);
    // EnCodec decode of fixed codes (stereo: interleaved left/right per codebook).
    let audio = model.decode(&ids(&r["codes"])).unwrap();
    assert_close(&format!("{label}: decoded audio"), &audio, &r["audio"]);
}

#[test]
fn audiocraft_mono_export_loads_and_matches_audiocraft() {
    let (model, r) = load("audiocraft_real_mono", None);
    check_config(&model, "audiocraft_real_mono", 4, &[0, 1, 2, 3], 1, 32000);
    assert_eq!(model.cfg.codec.pad_mode, PadMode::Constant, "audiocraft's seanet.pad_mode");
    check_outputs(&model, &r, "audiocraft_real_mono");
}

#[test]
fn audiocraft_stereo_export_loads_and_matches_audiocraft() {
    let (model, r) = load("audiocraft_real_stereo", None);
    check_config(&model, "audiocraft_real_stereo", 8, &[0, 0, 1, 1, 2, 2, 3, 3], 2, 32000);
    assert_eq!(model.cfg.codec.pad_mode, PadMode::Constant, "audiocraft's seanet.pad_mode");
    check_outputs(&model, &r, "audiocraft_real_stereo");
}

#[test]
fn audiocraft_export_with_pretrained_codec_pointer_matches_audiocraft() {
    let encodec = hub_snapshot("models--facebook--encodec_32khz");
    let (model, r) = load("audiocraft_real_mono/pretrained_codec", Some(encodec));
    check_config(&model, "pretrained_codec", 4, &[0, 1, 2, 3], 1, 8000);
    assert_eq!(model.cfg.codec.pad_mode, PadMode::Reflect, "the hub EnCodec's pad_mode");
    check_outputs(&model, &r, "pretrained_codec");
}

/// What the fixtures pin about `xp.cfg`, so the tests above exercise the real case.
#[test]
fn audiocraft_exports_say_cross_attention_false() {
    for name in ["audiocraft_real_mono", "audiocraft_real_stereo", "audiocraft_real_mono/pretrained_codec"] {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("reference.json")).unwrap())
                .unwrap();
        let xp = &doc["xp_cfg_excerpt"];
        assert_eq!(xp["transformer_lm.cross_attention"], serde_json::json!(false), "{name}");
        assert_eq!(xp["fuser"]["cross"], serde_json::json!(["description"]), "{name}");
        assert_eq!(xp["conditioners"]["description"]["t5"]["name"], serde_json::json!("t5-base"), "{name}");
    }
}
