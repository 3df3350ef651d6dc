//! One example → one gradient → one k-dimensional embedding.
//!
//! The gradient is `[∇_decoder f_codec, ∇_LM f_LM]`: the codec decoder's stored tensors
//! in model order, then the LM's in model order (see `musicgen::lm` / `musicgen::codec`).
//! Each part is one forward + backward; each parameter's gradient is projected and
//! dropped as soon as it is read.

use std::time::Instant;

use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor, Var};
use indicatif::ProgressBar;

use super::objective::{Example, Objective, Prepared};
use super::projector::ProjectorSpec;
use crate::musicgen::codec::Codec;
use crate::musicgen::lm::Lm;
use crate::musicgen::MusicGen;

/// Wall-clock split of one embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub prepare: f64,
    pub backward: f64,
    pub project: f64,
}

/// The codec decoder's parameters (gradient part 1), in model order.
pub fn decoder_params(model: &MusicGen) -> Vec<(String, Var)> {
    model.codec_params.params().into_iter().filter(|(n, _)| n.starts_with("decoder.")).collect()
}

/// Gradient length D = decoder parameters + LM parameters.
pub fn gradient_dim(model: &MusicGen) -> (usize, usize) {
    let dec: usize = decoder_params(model).iter().map(|(_, v)| v.elem_count()).sum();
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
    // Part 1: codec decoder.
    let t = Instant::now();
    let codec = Codec::new(&model.cfg.codec, model.codec_params.vb(false))?;
    let value = objective.codec_value(model, &codec, prepared)?;
    let mut grads = value.backward()?;
    drop(value);
    drop(codec);
    timings.backward += t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (name, var) in decoder_params(model) {
        let g = grads.remove(var.as_tensor()).ok_or_else(|| missing(&name))?;
        sink(&name, &g)?;
    }
    drop(grads);
    timings.project += t.elapsed().as_secs_f64();

    // Part 2: LM, one window at a time (gradients summed), so that a long piece never
    // holds more than one window's graph.
    let lm = Lm::new(&model.cfg.lm, model.lm_params.vb(false))?;
    let params = model.lm_params.params();
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    for part in 0..objective.lm_parts(prepared) {
        let t = Instant::now();
        let value = objective.lm_value_part(model, &lm, prepared, part)?;
        let mut grads = value.backward()?;
        drop(value);
        timings.backward += t.elapsed().as_secs_f64();
        for ((_, var), slot) in params.iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.remove(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => g,
                    Some(a) => (a + g)?,
                });
            }
        }
    }
    drop(lm);
    let t = Instant::now();
    for ((name, _), g) in params.iter().zip(acc) {
        let g = g.ok_or_else(|| missing(name))?;
        sink(name, &g)?;
    }
    timings.project += t.elapsed().as_secs_f64();
    Ok(())
}

fn missing(name: &str) -> anyhow::Error {
    anyhow!("no gradient reached parameter `{name}`: the differentiable path is broken there")
}

/// Embeds one example: prepare (generate), differentiate, project.
pub fn embed(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    example: &Example,
    progress: Option<&ProgressBar>,
) -> Result<(Vec<f32>, Prepared, Timings)> {
    let mut timings = Timings::default();
    let t = Instant::now();
    let prepared = objective.prepare(model, example, progress)?;
    timings.prepare = t.elapsed().as_secs_f64();
    let mut projection = spec.start();
    let mut offset = 0usize;
    for_each_gradient(model, objective, &prepared, &mut timings, |_, g| {
        let values: Vec<f32> = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        projection.update(offset, &values)?;
        offset += values.len();
        Ok(())
    })?;
    Ok((projection.finish()?, prepared, timings))
}
