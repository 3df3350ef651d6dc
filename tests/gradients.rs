//! Gradients of the `generation` objective: central finite differences on the tiny
//! model (in f64), completeness (every parameter gets a non-zero gradient), and the
//! embedding file as Python sees it.

use candle_core::{DType, Device, Tensor};
use spintrak::attribution::{for_each_gradient, Example, GenerationObjective, Objective, Timings};
use spintrak::musicgen::codec::Codec;
use spintrak::musicgen::lm::Lm;
use spintrak::musicgen::sampling::Sampler;
use spintrak::musicgen::{tiny, GenerateOptions, MusicGen};

fn tiny_f64(window_seconds: f64) -> MusicGen {
    let vocab = spintrak::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
    let mut cfg = tiny::config(vocab);
    cfg.generation.window_seconds = window_seconds;
    tiny::random_model(cfg, 1234, DType::F64, &Device::Cpu).unwrap()
}

fn objective(extend_stride: f64) -> GenerationObjective {
    GenerationObjective::from_options(&GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k: 250, top_p: 0.0, seed: 0 },
        guidance_scale: 3.0,
        extend_stride,
    })
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn gradients_match_central_finite_differences_over_windows() {
    // A 0.4 s window (20 frames) and 0.7 s of audio: three windows, so the per-window
    // teacher forcing and the 1/T normalisation are both exercised.
    let model = tiny_f64(0.4);
    let obj = objective(0.24);
    let ex = Example::generated("x", "slow sad piano", 0.7, 3);
    let prepared = obj.prepare(&model, &ex, None).unwrap();
    assert_eq!(prepared.generation.windows.len(), 3); // windows at 0, 0.24 and 0.48 s
    let mut grads: Vec<(String, Vec<f64>)> = Vec::new();
    let mut timings = Timings::default();
    for_each_gradient(&model, &obj, &prepared, &mut timings, |name, g| {
        grads.push((name.to_string(), g.flatten_all()?.to_vec1::<f64>()?));
        Ok(())
    })
    .unwrap();
    let f_lm =
        |m: &MusicGen| scalar(&obj.lm_value(m, &Lm::new(&m.cfg.lm, m.lm_params.vb(true)).unwrap(), &prepared).unwrap());
    let f_codec = |m: &MusicGen| {
        scalar(&obj.codec_value(m, &Codec::new(&m.cfg.codec, m.codec_params.vb(true)).unwrap(), &prepared).unwrap())
    };
    let mut checked = 0;
    for (name, var) in model.codec_params.params().into_iter().chain(model.lm_params.params()) {
        let is_lm = model.lm_params.var(&name).is_some();
        let g = &grads.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no gradient for {name}")).1;
        assert!(g.iter().any(|x| *x != 0.0), "gradient of {name} is identically zero");
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        // Two entries per tensor: the largest-gradient one and a fixed pseudo-random one.
        let argmax = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        for idx in [argmax, (name.len() * 7919) % base.len()] {
            let eps = 1e-5 * base[idx].abs().max(1.0);
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let f = if is_lm { f_lm(&model) } else { f_codec(&model) };
                var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
                f
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let scale = g.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(
                (fd - g[idx]).abs() <= 1e-6 * scale + 1e-9,
                "{name}[{idx}]: finite difference {fd} vs autograd {} (tensor max {scale})",
                g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} entries checked");
}

#[test]
fn gradient_order_is_decoder_then_lm_and_covers_every_parameter() {
    let model = tiny::build(1234, &Device::Cpu).unwrap();
    let obj = objective(6.0);
    let ex = Example::generated("x", "rock", 0.3, 1);
    let prepared = obj.prepare(&model, &ex, None).unwrap();
    let mut names = Vec::new();
    let mut total = 0;
    for_each_gradient(&model, &obj, &prepared, &mut Timings::default(), |n, g| {
        names.push(n.to_string());
        total += g.elem_count();
        Ok(())
    })
    .unwrap();
    let (dec, lm) = spintrak::attribution::gradient_dim(&model, &obj);
    assert_eq!(total, dec + lm);
    let first_lm = names.iter().position(|n| !n.starts_with("decoder.")).unwrap();
    assert!(names[..first_lm].iter().all(|n| n.starts_with("decoder.")));
    assert!(names[first_lm..].iter().all(|n| !n.starts_with("decoder.")));
    assert_eq!(names.len(), model.lm_params.params().len() + first_lm);
    // Weight-norm tensors are leaves as stored: g and v, not W.
    assert!(names.iter().any(|n| n.ends_with("weight_g")) && names.iter().any(|n| n.ends_with("weight_v")));
    assert!(names.iter().any(|n| n.ends_with("in_proj_weight")));
}

#[test]
fn streamed_projection_equals_projecting_the_whole_gradient() {
    // Three windows: the LM's per-window gradients are projected as they come (in layer
    // order, top down) and added; that must equal projecting the summed, ordered gradient.
    use spintrak::attribution::{AudioNllObjective, ProjectorKind, ProjectorSpec};
    let model = tiny_f64(0.4);
    let generation = objective(0.24);
    let ex = Example::generated("x", "slow sad piano", 0.7, 3);
    let nll = AudioNllObjective::default();
    let gen_prepared = generation.prepare(&model, &ex, None).unwrap();
    let codes = gen_prepared.generation.frames.clone();
    let t5 = model.encode_text("slow sad piano").unwrap();
    let nll_prepared = spintrak::attribution::objective::prepared_from_codes(&model, codes, t5).unwrap();
    assert_eq!(nll_prepared.generation.windows.len(), 2); // 35 frames in windows of 20
    let cases: [(&dyn Objective, &spintrak::attribution::Prepared); 2] =
        [(&generation, &gen_prepared), (&nll, &nll_prepared)];
    for (obj, prepared) in cases {
        let (dec, lm) = spintrak::attribution::gradient_dim(&model, obj);
        for kind in [ProjectorKind::Sparse, ProjectorKind::Normal] {
            let spec = ProjectorSpec::new(kind, 5, Some(64), dec + lm, 8).unwrap();
            let mut whole = spec.start();
            let mut offset = 0;
            for_each_gradient(&model, obj, prepared, &mut Timings::default(), |_, g| {
                let v: Vec<f32> = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                whole.update(offset, &v)?;
                offset += v.len();
                Ok(())
            })
            .unwrap();
            let want = whole.finish().unwrap();
            let got = spintrak::attribution::gradient::project_gradient(
                &model,
                obj,
                &spec,
                prepared,
                &mut Timings::default(),
                None,
            )
            .unwrap();
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5 * scale, "{} {kind:?}: {err} vs scale {scale}", obj.info().name);
        }
    }
}

#[test]
fn streamed_gradients_are_the_ordered_ones_bit_for_bit() {
    // One window: `stream_gradients` hands over each tensor as it is complete (top layer
    // first); every one must be `for_each_gradient`'s, bit for bit, none missing or twice.
    use spintrak::attribution::gradient::stream_gradients;
    use std::collections::HashMap;
    let model = tiny::build(1234, &Device::Cpu).unwrap();
    let generation = objective(6.0);
    let ex = Example::generated("x", "rock", 0.3, 1);
    let gen_prepared = generation.prepare(&model, &ex, None).unwrap();
    let nll = spintrak::attribution::AudioNllObjective::default();
    let t5 = model.encode_text("rock").unwrap();
    let nll_prepared =
        spintrak::attribution::objective::prepared_from_codes(&model, gen_prepared.generation.frames.clone(), t5)
            .unwrap();
    let bits = |g: &Tensor| -> Vec<u64> {
        g.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let cases: [(&dyn Objective, &spintrak::attribution::Prepared); 2] =
        [(&generation, &gen_prepared), (&nll, &nll_prepared)];
    for (obj, prepared) in cases {
        let mut want = HashMap::new();
        for_each_gradient(&model, obj, prepared, &mut Timings::default(), |n, g| {
            want.insert(n.to_string(), bits(g));
            Ok(())
        })
        .unwrap();
        let mut got = HashMap::new();
        stream_gradients(&model, obj, prepared, &mut Timings::default(), |n, g| {
            assert!(got.insert(n.to_string(), bits(g)).is_none(), "{n} handed over twice");
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), want.len(), "{}", obj.info().name);
        for (name, w) in &want {
            assert_eq!(got.get(name), Some(w), "{}: {name}", obj.info().name);
        }
    }
    // Several windows need each tensor summed first: refused, not half-streamed.
    let model = tiny_f64(0.4);
    let ex = Example::generated("x", "slow sad piano", 0.7, 3);
    let many = objective(0.24);
    let prepared = many.prepare(&model, &ex, None).unwrap();
    let err = stream_gradients(&model, &many, &prepared, &mut Timings::default(), |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("one LM window"), "{err}");
}
