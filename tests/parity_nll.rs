//! Parity of the `audio-nll` objective with the PyTorch reference that
//! `scripts/make_fixtures.py` pins: EnCodec encoding of `nll_audio` (encoder and
//! residual quantiser, stereo interleaved), the windowed teacher-forced NLL of the
//! codes, and its gradients with respect to every LM parameter.

mod common;
use common::*;

use std::collections::{BTreeSet, HashMap};

use candle_core::{Device, Tensor};
use spintrak::attribution::objective::prepared_from_codes;
use spintrak::attribution::{AudioNllObjective, Objective};
use spintrak::musicgen::codec::CodecEncoder;
use spintrak::musicgen::lm::Lm;
use spintrak::musicgen::loss::codes_nll_windows;
use spintrak::musicgen::{LoadOptions, MusicGen};

const PROMPT: &str = "calm piano melody with soft drums";
/// 0.08 s at 1000 frames/s, scored as windows of 50 + 30 frames.
const FRAMES: usize = 80;
const WINDOWS: [usize; 2] = [50, 30];

fn check_nll(model: &MusicGen, r: &HashMap<String, Tensor>, label: &str) {
    // Encoding: EnCodec encoder + residual quantiser, channels interleaved.
    let encoder = CodecEncoder::new(&model.cfg.codec, model.codec_params.vb(true).pp("encoder")).unwrap();
    let audio = r["nll_audio"].to_dtype(model.codec_params.dtype()).unwrap();
    assert_eq!(audio.dim(0).unwrap(), model.cfg.audio_channels, "{label}: channels of nll_audio");
    let codes = model.codec.encode(&encoder, &audio, model.cfg.audio_channels).unwrap();
    let frames = ids(&codes);
    let want = ids(&r["nll_codes"]);
    assert_eq!(frames.len(), model.cfg.lm.n_q, "{label}: codebooks");
    assert_eq!(frames[0].len(), FRAMES, "{label}: frames");
    for (k, (ours, theirs)) in frames.iter().zip(&want).enumerate() {
        assert_eq!(ours, theirs, "{label}: codes of row {k}");
    }
    assert_eq!(frames, want, "{label}: encoded codes");

    // The objective's value.
    let objective = AudioNllObjective::default();
    let t5 = model.encode_text(PROMPT).unwrap();
    let prepared = prepared_from_codes(model, frames.clone(), t5).unwrap();
    let windows: Vec<usize> = prepared.generation.windows.iter().map(|w| w.frames[0].len()).collect();
    assert_eq!(windows, WINDOWS.to_vec(), "{label}: windows");
    let lm = Lm::new(&model.cfg.lm, model.lm_params.vb(false)).unwrap();
    let f = objective.lm_value(model, &lm, &prepared).unwrap();
    assert_close(&format!("{label}: f_nll"), &f.reshape(1).unwrap(), &r["nll_f"]);

    // The same numbers from the loss module, per codebook.
    let value = codes_nll_windows(model, &model.lm, &prepared.t5, &frames).unwrap();
    assert_eq!(value.frames, FRAMES, "{label}: frames scored");
    let per_codebook: Vec<f32> = value.per_codebook.iter().map(|&x| x as f32).collect();
    let per_codebook = Tensor::from_vec(per_codebook, model.cfg.lm.n_q, &Device::Cpu).unwrap();
    assert_close(&format!("{label}: per-codebook nll"), &per_codebook, &r["nll_per_codebook"]);
    let nll = Tensor::new(&[value.nll as f32], &Device::Cpu).unwrap();
    assert_close(&format!("{label}: nll"), &nll, &r["nll_f"]);

    // Gradients: the full backward pass of the tracked LM ...
    let grads = f.backward().unwrap();
    // ... and the embedding path (one window at a time, layer by layer).
    let mut layerwise: HashMap<String, Tensor> = HashMap::new();
    spintrak::attribution::for_each_gradient(model, &objective, &prepared, &mut Default::default(), |name, g| {
        assert!(layerwise.insert(name.to_string(), g.clone()).is_none(), "{name} given twice");
        Ok(())
    })
    .unwrap();
    let got: BTreeSet<&str> = layerwise.keys().map(String::as_str).collect();
    assert!(got.iter().all(|n| !n.starts_with("decoder.")), "{label}: codec decoder gradients for audio-nll");
    let lm_names: Vec<String> = model.lm_params.params().into_iter().map(|(n, _)| n).collect();
    let expected: BTreeSet<&str> = lm_names.iter().map(String::as_str).collect();
    assert_eq!(got, expected, "{label}: gradient names are not exactly the LM parameters");

    let mut checked = 0;
    for (key, want) in r.iter().filter(|(k, _)| k.starts_with("grad_nll.")) {
        let hf = key.trim_start_matches("grad_nll.");
        let (name, part) = lm_param_of(hf);
        let var = model.lm_params.var(&name).unwrap_or_else(|| panic!("{label}: no parameter {name}"));
        let full = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
        assert_close(&format!("{label}: ∇f_nll {hf}"), &part_of(full, part), want);
        let lw = layerwise.get(&name).unwrap_or_else(|| panic!("{label}: no layer-wise gradient for {name}"));
        assert_close(&format!("{label}: layer-wise ∇f_nll {hf}"), &part_of(lw, part), want);
        checked += 1;
    }
    assert!(checked > 20, "{label}: only {checked} nll gradients checked");
}

#[test]
fn transformers_mono_audio_nll_matches_reference() {
    let dir = fixtures().join("hf_mono");
    let model = spintrak::musicgen::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(model.cfg.audio_channels, 1);
    check_nll(&model, &reference(&dir), "hf_mono");
}

#[test]
fn transformers_stereo_audio_nll_matches_reference() {
    let dir = fixtures().join("hf_stereo");
    let model = spintrak::musicgen::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(model.cfg.audio_channels, 2);
    let r = reference(&dir);
    // Left and right differ, so the interleaving of the codebooks is checked.
    let audio = &r["nll_audio"];
    let left = audio.narrow(0, 0, 1).unwrap();
    let right = audio.narrow(0, 1, 1).unwrap();
    assert!(rel_err(&left, &right) > 0.1, "the stereo fixture's channels are alike");
    check_nll(&model, &r, "hf_stereo");
}

#[test]
fn audiocraft_exports_audio_nll_match_the_same_reference() {
    let ac = fixtures().join("audiocraft_mono");
    let hub = ac.join("hub");
    let snapshot = |repo: &str| {
        let d = hub.join(repo).join("snapshots");
        std::fs::read_dir(&d).unwrap().next().unwrap().unwrap().path()
    };
    let opts = LoadOptions {
        encodec: Some(snapshot("models--facebook--encodec_32khz")),
        t5: Some(snapshot("models--t5-base")),
        ..Default::default()
    };
    let r = reference(&fixtures().join("hf_mono"));
    // Pointer codec (the hub EnCodec snapshot, encoder included), resolved by explicit paths.
    let model = spintrak::musicgen::load(&ac, &opts, &Device::Cpu).unwrap();
    check_nll(&model, &r, "audiocraft (pointer)");
    // Full codec inline (encoder, decoder and quantiser in compressed_state_dict.bin).
    let full = spintrak::musicgen::load(
        &ac.join("audiocraft_full"),
        &LoadOptions { encodec: None, t5: opts.t5.clone(), ..Default::default() },
        &Device::Cpu,
    )
    .unwrap();
    check_nll(&full, &r, "audiocraft (full codec)");
}
