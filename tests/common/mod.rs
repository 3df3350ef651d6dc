//! Helpers shared by the tests that compare with reference fixtures.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use spintrak::musicgen::loader::hf_lm_name;

/// Relative tolerance of every comparison with a reference.
pub const TOL: f32 = 1e-4;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tensors of `dir/reference.safetensors`.
pub fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// Max absolute difference over max absolute reference value.
pub fn rel_err(ours: &Tensor, theirs: &Tensor) -> f32 {
    let ours = ours.to_dtype(DType::F32).unwrap();
    let theirs = theirs.to_dtype(DType::F32).unwrap();
    assert_eq!(ours.dims(), theirs.dims(), "shapes differ");
    let diff =
        (&ours - &theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = theirs.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}

pub fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor) {
    let e = rel_err(ours, theirs);
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
}

/// An integer tensor `[K, T]` as code rows.
pub fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// The snapshot folder of a repository in the `audiocraft_mono` hub-cache fixture.
pub fn hub_snapshot(repo: &str) -> PathBuf {
    let snapshots = fixtures().join("audiocraft_mono/hub").join(repo).join("snapshots");
    std::fs::read_dir(snapshots).unwrap().next().unwrap().unwrap().path()
}

/// Our parameter name for a transformers LM parameter, and which third of a fused
/// `in_proj_weight` it is (q, k, v).
pub fn lm_param_of(hf: &str) -> (String, Option<usize>) {
    if let Some(pos) = ["q_proj", "k_proj", "v_proj"].iter().position(|p| hf.contains(p)) {
        let layer = hf.split('.').nth(4).unwrap();
        let attn = if hf.contains("encoder_attn") { "cross_attention" } else { "self_attn" };
        (format!("transformer.layers.{layer}.{attn}.in_proj_weight"), Some(pos))
    } else {
        (hf_lm_name(hf).unwrap_or_else(|| panic!("unmapped {hf}")), None)
    }
}

/// The rows of a fused q/k/v gradient that belong to `part` (the whole tensor if `None`).
pub fn part_of(g: &Tensor, part: Option<usize>) -> Tensor {
    match part {
        Some(p) => {
            let d = g.dim(1).unwrap();
            g.narrow(0, p * d, d).unwrap()
        }
        None => g.clone(),
    }
}
