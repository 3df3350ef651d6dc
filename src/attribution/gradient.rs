//! One example → one gradient → one k-dimensional embedding.
//!
//! The gradient is `[∇_decoder f_codec, ∇_LM f_LM]`: the codec decoder's stored tensors
//! in model order, then the LM's in model order (see `musicgen::lm` / `musicgen::codec`).
//! Objectives without a codec part (`audio-nll`) give `∇_LM f` alone.
//! Each part is differentiated layer by layer with recomputation (a graph-free forward
//! keeps each layer's input; layers are re-run top-down against the gradient arriving
//! from above), so only one layer's graph is alive at a time. Each parameter's gradient
//! is projected and dropped as soon as its part is done.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use indicatif::ProgressBar;

use super::objective::{Example, Objective, Prepared};
use super::projector::ProjectorSpec;
use crate::musicgen::lm::{LayerSaved, Lm};
use crate::musicgen::ops::{accumulate, with_f32_values};
use crate::musicgen::MusicGen;

/// Memory the LM's backward may spend on keeping layers' intermediates from the forward
/// pass instead of computing them again (about 17 MB per layer for 2 s of musicgen-small
/// with guidance, 85 MB for 10 s: all 24 layers fit; at 30 s some do), and at most a
/// quarter of the memory still available, so that it never turns a run that fits into
/// one that does not. (With 1 GB, half the layers ran twice at 10 s: the LM's part of the
/// guided gradient took 20.6 s against 18.9 s with 4 GB, medians of 4 alternated runs.)
const SAVED_BYTES: u64 = 4 << 30;

fn saved_budget() -> usize {
    let available = crate::memory::available().unwrap_or(0);
    SAVED_BYTES.min(available / 4) as usize
}

/// Wall-clock split of one embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub prepare: f64,
    /// Both backward passes (codec decoder and LM).
    pub backward: f64,
    /// The codec decoder's share of `backward`.
    pub backward_codec: f64,
    pub project: f64,
}

/// The codec decoder's parameters (gradient part 1), in model order.
pub fn decoder_params(model: &MusicGen) -> Vec<(String, Var)> {
    model.codec_params.params().into_iter().filter(|(n, _)| n.starts_with("decoder.")).collect()
}

/// Gradient length D = decoder parameters (when the objective has a codec part) + LM
/// parameters.
pub fn gradient_dim(model: &MusicGen, objective: &dyn Objective) -> (usize, usize) {
    let dec: usize = if objective.differentiates_codec() {
        decoder_params(model).iter().map(|(_, v)| v.elem_count()).sum()
    } else {
        0
    };
    (dec, model.lm_params.num_scalars())
}

/// Runs both backward passes and hands every parameter's gradient, in order, to `sink`.
pub fn for_each_gradient(
    model: &MusicGen,
    objective: &dyn Objective,
    prepared: &Prepared,
    timings: &mut Timings,
    mut sink: impl FnMut(&str, &Tensor) -> Result<()>,
) -> Result<()> {
    if objective.differentiates_codec() {
        codec_gradients(model, objective, prepared, timings, &mut sink)?;
    }

    // Part 2: LM, one window at a time, layer by layer (gradients summed).
    let params = model.lm_params.params();
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    let t = Instant::now();
    lm_gradients(model, objective, prepared, &params, None, &mut |i, g| Ok(accumulate(&mut acc[i], g)?))?;
    timings.backward += t.elapsed().as_secs_f64();
    let t = Instant::now();
    for ((name, _), g) in params.iter().zip(acc) {
        let g = g.ok_or_else(|| missing(name))?;
        sink(name, &g)?;
    }
    timings.project += t.elapsed().as_secs_f64();
    Ok(())
}

/// Part 1: the codec decoder, channel by channel: a forward pass that keeps what the
/// backward pass needs (`CodecDecoder::forward_saved`), the objective's head through
/// autograd, then the decoder differentiated by hand, layer by layer
/// (`CodecDecoder::backward`).
/// Calls `sink(name, gradient)` with each parameter's gradient as soon as it is
/// complete and drops it: the codec decoder's first (when the objective has that part),
/// then the LM's from the top layer down, so ∇θ is never whole in memory. For an
/// objective with one LM part (one window); a sum over windows needs each tensor whole
/// first, which [`for_each_gradient`] does.
pub fn stream_gradients(
    model: &MusicGen,
    objective: &dyn Objective,
    prepared: &Prepared,
    timings: &mut Timings,
    mut sink: impl FnMut(&str, &Tensor) -> Result<()> + Send,
) -> Result<()> {
    let parts = objective.lm_parts(prepared);
    if parts != 1 {
        bail!("streamed gradients need one LM window, this example has {parts}; use for_each_gradient");
    }
    crate::musicgen::on_pool(move || {
        if objective.differentiates_codec() {
            codec_gradients(model, objective, prepared, timings, &mut sink)?;
        }
        let t = Instant::now();
        let params = model.lm_params.params();
        lm_gradients(model, objective, prepared, &params, None, &mut |i, g| sink(&params[i].0, &g))?;
        timings.backward += t.elapsed().as_secs_f64();
        Ok(())
    })
}

fn codec_gradients(
    model: &MusicGen,
    objective: &dyn Objective,
    prepared: &Prepared,
    timings: &mut Timings,
    sink: &mut impl FnMut(&str, &Tensor) -> Result<()>,
) -> Result<()> {
    let t = Instant::now();
    let decoder_params = decoder_params(model);
    let index: HashMap<&str, usize> =
        decoder_params.iter().enumerate().map(|(i, (name, _))| (name.as_str(), i)).collect();
    let mut acc: Vec<Option<Tensor>> = vec![None; decoder_params.len()];
    let decoder = &model.codec.decoder; // no autograd graph
    for z in objective.codec_inputs(model, prepared)? {
        let (audio, tape) = decoder.forward_saved(&z)?;
        let top = Var::from_tensor(&audio)?;
        let mut grads = objective.codec_head_value(model, top.as_tensor(), prepared)?.backward()?;
        let d_audio = grads.remove(top.as_tensor()).ok_or_else(|| anyhow!("no gradient reached the audio"))?.detach();
        drop((grads, top, audio));
        decoder.backward(tape, &d_audio, &mut |name, g| {
            let name = format!("decoder.{name}");
            let &i = index.get(name.as_str()).ok_or_else(|| missing(&name))?;
            Ok(accumulate(&mut acc[i], g)?)
        })?;
    }
    let codec_seconds = t.elapsed().as_secs_f64();
    timings.backward += codec_seconds;
    timings.backward_codec += codec_seconds;
    let t = Instant::now();
    for ((name, _), g) in decoder_params.iter().zip(acc) {
        let g = g.ok_or_else(|| missing(name))?;
        sink(name, &g)?;
    }
    timings.project += t.elapsed().as_secs_f64();
    Ok(())
}

/// Hands the gradients of `params` found in `grads` to `take` (by parameter index).
fn take_param_grads(
    grads: &mut GradStore,
    params: &[(String, Var)],
    take: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    for (i, (_, var)) in params.iter().enumerate() {
        // Detached: a gradient computed from variables carries its own graph, which would
        // keep the layer's activations alive.
        if let Some(g) = grads.remove(var.as_tensor()).map(|g| g.detach()) {
            take(i, g)?;
        }
    }
    Ok(())
}

/// Where the LM's per-parameter gradients go (by index into `params`), and the bar that
/// counts layers done.
struct LayerSink<'a> {
    params: &'a [(String, Var)],
    progress: Option<&'a ProgressBar>,
    take: &'a mut dyn FnMut(usize, Tensor) -> Result<()>,
}

/// Every LM parameter's gradient, window by window (`objective.lm_parts`), each handed
/// to `take(index into params, gradient)` as soon as its layer's backward gives it.
/// Fails, after the last window, when a parameter missed a window.
fn lm_gradients(
    model: &MusicGen,
    objective: &dyn Objective,
    prepared: &Prepared,
    params: &[(String, Var)],
    progress: Option<&ProgressBar>,
    take: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let lm = Lm::new(&model.cfg.lm, model.lm_params.vb(false))?;
    let parts = objective.lm_parts(prepared);
    let mut seen = vec![0usize; params.len()];
    for part in 0..parts {
        let take = &mut |i: usize, g: Tensor| {
            seen[i] += 1;
            take(i, g)
        };
        lm_part_gradients(model, &lm, objective, prepared, part, LayerSink { params, progress, take })?;
    }
    match seen.iter().position(|&n| n != parts) {
        Some(i) => Err(missing(&params[i].0)),
        None => Ok(()),
    }
}

/// Gradient of one LM piece, layer by layer: a forward pass without a graph keeps each
/// layer's input (and, within a budget, the top layers' intermediates); then, from the
/// head down, each layer is differentiated by hand against the gradient arriving from
/// above (`Lm::layer_backward`, re-running the layer when nothing was kept). Peak memory
/// is the kept intermediates plus one layer's, not the whole network's.
fn lm_part_gradients(
    model: &MusicGen,
    lm: &Lm,
    objective: &dyn Objective,
    prepared: &Prepared,
    part: usize,
    sink: LayerSink<'_>,
) -> Result<()> {
    let LayerSink { params, progress, take } = sink;
    let tick = || progress.inspect(|pb| pb.inc(1));
    let (tokens, n_cond) = objective.lm_input(model, prepared, part)?;
    let plain = &model.lm; // same weights, no autograd graph
    let states = plain.project_condition(&prepared.t5)?;
    // Forward. The top layers (differentiated first) keep their intermediates while they
    // fit in `saved_budget()` (sized from layer 0's); the others keep only their input and
    // run again on the way down. Both give the same numbers.
    let layers = plain.num_layers();
    let mut inputs = vec![plain.embed(&tokens, 0)?];
    let mut saved: Vec<Option<LayerSaved>> = (0..layers).map(|_| None).collect();
    let mut keep_from = layers;
    for i in 0..layers {
        let (h, s) = plain.layer_forward_saved(i, &inputs[i], &states, n_cond)?;
        if i == 0 {
            keep_from = layers - (saved_budget() / s.bytes().max(1)).min(layers);
        }
        if i >= keep_from {
            saved[i] = Some(s);
        }
        inputs.push(h);
    }
    tick();
    // Head and objective: the objective through autograd on the logits alone, the head
    // by hand.
    let index: HashMap<&str, usize> = params.iter().enumerate().map(|(i, (name, _))| (name.as_str(), i)).collect();
    let (logits, head_saved) = plain.head_forward_saved(&inputs[layers])?;
    let logits = Var::from_tensor(&logits)?;
    let value = objective.lm_head_value(model, logits.as_tensor(), prepared, part)?;
    let d_logits = value
        .backward()?
        .remove(logits.as_tensor())
        .ok_or_else(|| anyhow!("no gradient reached the LM's logits"))?
        .detach();
    drop((value, logits));
    let (mut upstream, head_grads) = plain.head_backward(head_saved, &d_logits)?;
    drop(d_logits);
    for (name, g) in head_grads {
        let &p = index.get(name.as_str()).ok_or_else(|| missing(&name))?;
        take(p, g)?;
    }
    // Layers, top to bottom, each differentiated by hand (`Lm::layer_backward`).
    let mut d_states: Option<Tensor> = None;
    for i in (0..plain.num_layers()).rev() {
        let grads = match saved[i].take() {
            Some(s) => plain.layer_backward_saved(i, s, &upstream)?,
            None => plain.layer_backward(i, &inputs[i], &states, n_cond, &upstream)?,
        };
        upstream = grads.input;
        if let Some(g) = grads.states {
            accumulate(&mut d_states, g)?;
        }
        for (suffix, g) in grads.params {
            let name = format!("transformer.layers.{i}.{suffix}");
            let &p = index.get(name.as_str()).ok_or_else(|| missing(&name))?;
            take(p, g)?;
        }
        tick();
    }
    // Embeddings, then the conditioning projection.
    let mut grads = (lm.embed(&tokens, 0)? * &upstream)?.sum_all()?.backward()?;
    take_param_grads(&mut grads, params, take)?;
    if let Some(d) = d_states {
        let mut grads = (lm.project_condition(&prepared.t5)? * d)?.sum_all()?.backward()?;
        take_param_grads(&mut grads, params, take)?;
    }
    Ok(())
}

fn missing(name: &str) -> anyhow::Error {
    anyhow!("no gradient reached parameter `{name}`: the differentiable path is broken there")
}

/// Embeds one example: prepare (encode or generate), differentiate, project.
pub fn embed(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    example: &Example,
    progress: Option<&ProgressBar>,
) -> Result<(Vec<f32>, Prepared, Timings)> {
    let t = Instant::now();
    let prepared = objective.prepare(model, example, progress)?;
    let prepare = t.elapsed().as_secs_f64();
    let (embedding, prepared, mut timings) = embed_prepared(model, objective, spec, prepared, progress)
        .map_err(|e| e.context(format!("embedding `{}`", example.name)))?;
    timings.prepare = prepare;
    Ok((embedding, prepared, timings))
}

/// The projected gradient, computed so that ∇θ is never whole in memory: the codec
/// decoder's part (small) is accumulated and projected, then every LM parameter's gradient
/// is projected as soon as its layer's backward gives it, window by window (projection is
/// linear, so the windows' projections add up to the projection of their sum).
pub fn project_gradient(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    prepared: &Prepared,
    timings: &mut Timings,
    progress: Option<&ProgressBar>,
) -> Result<Vec<f32>> {
    let mut projection = spec.start();
    let mut offset = 0usize;
    if objective.differentiates_codec() {
        codec_gradients(model, objective, prepared, timings, &mut |_, g| {
            with_f32_values(g, |values| {
                projection.add(offset, values)?;
                offset += values.len();
                Ok(())
            })
        })?;
    }
    let params = model.lm_params.params();
    let mut offsets = Vec::with_capacity(params.len());
    for (_, v) in &params {
        offsets.push(offset);
        offset += v.elem_count();
    }
    let parts = objective.lm_parts(prepared);
    if let Some(pb) = progress {
        // One step per window for the forward pass, then one per layer going down.
        pb.set_message("differentiating");
        pb.set_length((parts * (model.cfg.lm.num_layers + 1)) as u64);
        pb.set_position(0);
        pb.reset_eta();
    }
    let mut project_seconds = 0.0;
    let t = Instant::now();
    lm_gradients(model, objective, prepared, &params, progress, &mut |i, g| {
        let tp = Instant::now();
        with_f32_values(&g, |values| projection.add(offsets[i], values))?;
        drop(g);
        project_seconds += tp.elapsed().as_secs_f64();
        Ok(())
    })?;
    timings.backward += t.elapsed().as_secs_f64() - project_seconds;
    timings.project += project_seconds;
    // The codec part once, the LM's once per window.
    let codec_len = offsets.first().copied().unwrap_or(offset);
    projection.finish_added(codec_len + (offset - codec_len) * parts)
}

/// Differentiates and projects an example already prepared.
pub fn embed_prepared(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    prepared: Prepared,
    progress: Option<&ProgressBar>,
) -> Result<(Vec<f32>, Prepared, Timings)> {
    let mut timings = Timings::default();
    let (dec, lm) = gradient_dim(model, objective);
    if spec.d != dec + lm {
        bail!(
            "the projection is for D = {} numbers but the `{}` objective's gradient has {}",
            spec.d,
            objective.info().name,
            dec + lm
        );
    }
    let embedding =
        crate::musicgen::on_pool(|| project_gradient(model, objective, spec, &prepared, &mut timings, progress))?;
    if let Some(bad) = embedding.iter().position(|x| !x.is_finite()) {
        bail!("the gradient is not finite (entry {bad} of the embedding): the model or the input holds NaN or infinite values");
    }
    Ok((embedding, prepared, timings))
}
