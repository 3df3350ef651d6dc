//! Parity with the PyTorch reference (transformers' MusicGen; audiocraft's layout),
//! pinned by the fixtures `scripts/make_fixtures.py` made: T5 states, conditioning,
//! LM logits with and without guidance, EnCodec decode, greedy generation, and the
//! gradients of both parts of the `generation` objective.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use spintrak::attribution::{GenerationObjective, Objective, Prepared};
use spintrak::musicgen::codec::Codec;
use spintrak::musicgen::lm::Lm;
use spintrak::musicgen::loader::codec_name;
use spintrak::musicgen::model::Window;
use spintrak::musicgen::sampling::Sampler;
use spintrak::musicgen::{GenerateOptions, Generation, LoadOptions, MusicGen};

fn check_model(model: &MusicGen, r: &HashMap<String, Tensor>, label: &str) {
    let prompt = "calm piano melody with soft drums";
    // Tokenizer and T5.
    let want: Vec<u32> = ids(&r["input_ids"])[0].clone();
    assert_eq!(model.tokenizer.encode(prompt).unwrap(), want, "{label}: token ids");
    let t5 = model.encode_text(prompt).unwrap();
    assert_close(&format!("{label}: T5 states"), &t5, &r["t5_hidden"]);
    let states = model.lm.project_condition(&t5).unwrap();
    assert_close(&format!("{label}: conditioning"), &states, &r["cond_states"]);
    // Logits with and without the text, and guided.
    let input = ids(&r["lm_input"]);
    let (k, s) = (input.len(), input[0].len());
    let pattern = model.pattern();
    assert_eq!(pattern.build(&ids(&r["lm_frames"])), input, "{label}: delay pattern layout");
    let tokens = Tensor::from_vec(input.concat(), (1, k, s), &Device::Cpu).unwrap();
    let cond = model.lm.conditioning(&states, 1).unwrap();
    let null = model.lm.conditioning(&states, 0).unwrap();
    let lc = model.lm.forward(&tokens, &cond, None).unwrap().squeeze(0).unwrap();
    let lu = model.lm.forward(&tokens, &null, None).unwrap().squeeze(0).unwrap();
    assert_close(&format!("{label}: conditional logits"), &lc, &r["logits_cond"]);
    assert_close(&format!("{label}: unconditional logits"), &lu, &r["logits_uncond"]);
    let lg = (&lu + ((&lc - &lu).unwrap() * 3.0).unwrap()).unwrap();
    assert_close(&format!("{label}: guided logits"), &lg, &r["logits_guided"]);
    // KV-cached decoding step by step gives the same logits as the full pass.
    let mut cache = model.lm.new_cache(s);
    for step in 0..s {
        let t = tokens.narrow(2, step, 1).unwrap();
        let l = model.lm.forward(&t, &cond, Some(&mut cache)).unwrap().squeeze(0).unwrap();
        let want = r["logits_cond"].narrow(1, step, 1).unwrap();
        assert_close(&format!("{label}: cached step {step}"), &l, &want);
    }
    // EnCodec.
    let audio = model.decode(&ids(&r["codes"])).unwrap();
    assert_close(&format!("{label}: decoded audio"), &audio, &r["audio"]);
    // Greedy generation with guidance.
    let frames = r["greedy_frames"].dim(1).unwrap();
    let opts = GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 1, top_p: 0.0, seed: 0 },
        guidance_scale: 3.0,
        extend_stride: model.default_extend_stride(),
    };
    let duration = (frames as f64 + 0.5) / model.cfg.frame_rate();
    let gen = model.generate(prompt, duration, &opts, None).unwrap();
    assert_eq!(gen.frames, ids(&r["greedy_frames"]), "{label}: greedy tokens");
    assert_close(&format!("{label}: greedy audio"), &model.decode(&gen.frames).unwrap(), &r["greedy_audio"]);
    check_gradients(model, r, label, &t5);
}

fn prepared(frames: Vec<Vec<u32>>, t5: &Tensor) -> Prepared {
    Prepared::new(
        Generation { frames: frames.clone(), windows: vec![Window { prompt_len: 0, frames }] },
        t5.clone(),
        0.0,
    )
}

fn check_gradients(model: &MusicGen, r: &HashMap<String, Tensor>, label: &str, t5: &Tensor) {
    let objective = GenerationObjective::from_options(&GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 250, top_p: 0.0, seed: 0 },
        guidance_scale: 3.0,
        extend_stride: 1.0,
    });
    // f_LM on the fixture's frames, teacher-forced.
    let lm = Lm::new(&model.cfg.lm, model.lm_params.vb(false)).unwrap();
    let f = objective.lm_value(model, &lm, &prepared(ids(&r["lm_frames"]), t5)).unwrap();
    assert_close(&format!("{label}: f_LM"), &f.reshape(1).unwrap(), &r["f_lm"]);
    let grads = f.backward().unwrap();
    let mut checked = 0;
    for (key, want) in r.iter().filter(|(k, _)| k.starts_with("grad_lm.")) {
        let hf = key.trim_start_matches("grad_lm.");
        let (name, part) = lm_param_of(hf);
        let var = model.lm_params.var(&name).unwrap_or_else(|| panic!("{label}: no parameter {name}"));
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
        let g = part_of(g, part);
        assert_close(&format!("{label}: ∇f_LM {hf}"), &g, want);
        checked += 1;
    }
    assert!(checked > 20, "{label}: only {checked} LM gradients checked");
    // The embedding path (layer-wise recomputation, one window at a time) agrees too.
    let mut layerwise = HashMap::new();
    spintrak::attribution::for_each_gradient(
        model,
        &objective,
        &prepared(ids(&r["lm_frames"]), t5),
        &mut Default::default(),
        |name, g| {
            layerwise.insert(name.to_string(), g.clone());
            Ok(())
        },
    )
    .unwrap();
    for (name, var) in model.lm_params.params() {
        let full = grads.get(var.as_tensor()).unwrap();
        assert_close(&format!("{label}: layer-wise ∇f_LM {name}"), &layerwise[&name], full);
    }
    // f_codec on the fixture's codes.
    let codec = Codec::new(&model.cfg.codec, model.codec_params.vb(false)).unwrap();
    let f = objective.codec_value(model, &codec, &prepared(ids(&r["codes"]), t5)).unwrap();
    assert_close(&format!("{label}: f_codec"), &f.reshape(1).unwrap(), &r["f_codec"]);
    let grads = f.backward().unwrap();
    let mut checked = 0;
    for (key, want) in r.iter().filter(|(k, _)| k.starts_with("grad_codec.")) {
        let name = codec_name(key.trim_start_matches("grad_codec.").trim_start_matches("audio_encoder."));
        let var = model.codec_params.var(&name).unwrap_or_else(|| panic!("{label}: no parameter {name}"));
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
        assert_close(&format!("{label}: ∇f_codec {name}"), g, want);
        checked += 1;
    }
    assert!(checked > 10, "{label}: only {checked} codec gradients checked");
    // The embedding path (layer-wise recomputation, channel by channel) agrees too.
    let mut layerwise = HashMap::new();
    spintrak::attribution::for_each_gradient(
        model,
        &objective,
        &prepared(ids(&r["codes"]), t5),
        &mut Default::default(),
        |name, g| {
            layerwise.insert(name.to_string(), g.clone());
            Ok(())
        },
    )
    .unwrap();
    for (name, var) in spintrak::attribution::gradient::decoder_params(model) {
        let full = grads.get(var.as_tensor()).unwrap();
        assert_close(&format!("{label}: layer-wise ∇f_codec {name}"), &layerwise[&name], full);
    }
}

#[test]
fn transformers_mono_matches_reference() {
    let dir = fixtures().join("hf_mono");
    let model = spintrak::musicgen::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(model.cfg.codec.n_q, 4);
    check_model(&model, &reference(&dir), "hf_mono");
}

#[test]
fn transformers_stereo_matches_reference() {
    let dir = fixtures().join("hf_stereo");
    let model = spintrak::musicgen::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(model.cfg.audio_channels, 2);
    assert_eq!(model.cfg.lm.delays, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    check_model(&model, &reference(&dir), "hf_stereo");
}

#[test]
fn audiocraft_exports_match_the_same_reference() {
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
    // Pointer codec, resolved by explicit paths.
    let model = spintrak::musicgen::load(&ac, &opts, &Device::Cpu).unwrap();
    check_model(&model, &r, "audiocraft (pointer)");
    // Full codec under the seed document's file name.
    let full = spintrak::musicgen::load(
        &ac.join("audiocraft_full"),
        &LoadOptions { encodec: None, t5: opts.t5.clone(), ..Default::default() },
        &Device::Cpu,
    )
    .unwrap();
    check_model(&full, &r, "audiocraft (full codec)");
    // The same weights in both layouts: the same fingerprint.
    let hf = spintrak::musicgen::load(&fixtures().join("hf_mono"), &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(model.fingerprint().unwrap(), hf.fingerprint().unwrap());
}

#[test]
fn hub_cache_resolves_pointers_offline_and_explains_misses() {
    let ac = fixtures().join("audiocraft_mono");
    let run = |envs: &[(&str, &Path)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_spintrak"));
        c.args([
            "generate-audio",
            "--model",
            ac.to_str().unwrap(),
            "--prompt",
            "calm piano",
            "--duration",
            "0.02",
            "--quiet",
        ])
        .arg("--output")
        .arg(std::env::temp_dir().join(format!("spintrak-hub-{}.wav", std::process::id())))
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", "/nonexistent-home");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = run(&[("HF_HUB_CACHE", &ac.join("hub"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("facebook/encodec_32khz")
            && e.contains("--encodec")
            && e.contains("HF_HUB_CACHE"),
        "{e}"
    );
}
