//! Scaled dot-product attention, `softmax(q·kᵀ·scale + mask)·v`, computed over blocks of
//! query rows, with a hand-written backward pass.
//!
//! Why: composed from Candle ops and differentiated by Candle's autograd, a teacher-
//! forced window of 1500 frames keeps several `[B, H, S, S]` score tensors per layer
//! alive (290 MB each for musicgen-small with guidance) and walks them a dozen times.
//! Here at most one block of `BLOCK` query rows is materialised, causal blocks stop at
//! their last visible key (about half the work), and the backward recomputes each
//! block's probabilities instead of storing them — the FlashAttention recipe, with
//! Candle's matmuls inside.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::matmul::{matmul, matmul_f32};
use super::ops::{causal_mask, cpu_storage, cpu_tensor, softmax_last, untracked_f32};

/// Query rows per block.
const BLOCK: usize = 128;

/// `q`: `[B, H, Sq, hd]`, `k`, `v`: `[B, H, Skv, hd]`. With `causal`, the queries sit at
/// the last `Sq` of the `Skv` positions and each sees the keys up to its own position.
/// Differentiable with respect to `q`, `k` and `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (sq, skv) = (q.dim(2)?, k.dim(2)?);
    if causal && sq > skv {
        candle_core::bail!("causal attention with {sq} queries over {skv} keys");
    }
    if q.track_op() || k.track_op() || v.track_op() {
        let op = Attention { scale, causal, block: BLOCK };
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        forward(q, k, v, scale, causal, BLOCK)
    }
}

struct Attention {
    scale: f64,
    causal: bool,
    block: usize,
}

/// The blocks of query rows: `(first row, rows, visible keys)`.
fn blocks(sq: usize, skv: usize, causal: bool, block: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..sq).step_by(block.max(1)).map(move |start| {
        let len = block.min(sq - start);
        let visible = if causal { skv - sq + start + len } else { skv };
        (start, len, visible)
    })
}

/// Attention probabilities of one block of queries `[B, H, len, visible]`.
fn probabilities(q_block: &Tensor, keys: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if let Some((mut scores, shape)) = matmul_f32(q_block, &keys.t()?)? {
        softmax_rows(&mut scores, shape[2], shape[3], scale as f32, causal);
        return Tensor::from_vec(scores, shape, &Device::Cpu);
    }
    let scores = (q_block * scale)?.matmul(&keys.t()?)?;
    let (len, visible) = (scores.dim(2)?, scores.dim(3)?);
    // A single query row sees every visible key: no mask needed.
    let scores = if causal && len > 1 {
        scores.broadcast_add(&causal_mask(len, visible, scores.dtype(), scores.device())?)?
    } else {
        scores
    };
    softmax_last(&scores)
}

/// In place, each row of `len`-row blocks of `visible` scores becomes
/// `softmax(scale·row)`, causally masked (query `i` of a block sees the keys up to
/// `visible − len + i`; the rest get probability 0): scaling, mask, max, exp, sum and
/// division in one pass per row, rows in parallel. Composed from Candle's ops that was
/// six passes over the scores, some on one thread.
fn softmax_rows(scores: &mut [f32], len: usize, visible: usize, scale: f32, causal: bool) {
    // Causal blocks see at least their own rows' keys; cross-attention may see fewer keys
    // than a block has rows.
    let offset = if causal { visible - len } else { 0 };
    scores.par_chunks_mut(visible).with_min_len(16).enumerate().for_each(|(r, row)| {
        let seen = if causal { r % len + offset + 1 } else { visible };
        let (live, masked) = row.split_at_mut(seen);
        let mut max = f32::NEG_INFINITY;
        for x in live.iter_mut() {
            *x *= scale;
            max = max.max(*x);
        }
        let mut sum = 0f32;
        for x in live.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in live.iter_mut() {
            *x /= sum;
        }
        masked.fill(0.0);
    });
}

/// In place, `dp` becomes `scale·dS` with `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, the gradient
/// of the scores through the softmax, one pass per row, rows in parallel.
fn softmax_backward_rows(dp: &mut [f32], p: &[f32], visible: usize, scale: f32) {
    dp.par_chunks_mut(visible).zip(p.par_chunks(visible)).with_min_len(16).for_each(|(d, p)| {
        let dot: f32 = d.iter().zip(p).map(|(&d, &p)| d * p).sum();
        for (d, &p) in d.iter_mut().zip(p) {
            *d = p * (*d - dot) * scale;
        }
    });
}

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool, block: usize) -> Result<Tensor> {
    let (sq, skv) = (q.dim(2)?, k.dim(2)?);
    let outs = blocks(sq, skv, causal, block)
        .map(|(start, len, visible)| {
            let p = probabilities(&q.narrow(2, start, len)?, &k.narrow(2, 0, visible)?, scale, causal)?;
            matmul(&p, &v.narrow(2, 0, visible)?)
        })
        .collect::<Result<Vec<_>>>()?;
    if outs.len() == 1 {
        return Ok(outs.into_iter().next().expect("one block"));
    }
    Tensor::cat(&outs, 2)
}

/// Gradients of `attention(q, k, v, scale, causal)` against `d_out` (`[B, H, Sq, hd]`),
/// without a graph: `(dq, dk, dv)`. Per block of query rows, with `P` recomputed:
/// `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K·scale`,
/// `dK += dSᵀ·Q·scale`.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_in_blocks(q, k, v, scale, causal, d_out, BLOCK)
}

fn backward_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    d_out: &Tensor,
    block: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (sq, skv) = (q.dim(2)?, k.dim(2)?);
    let mut dq = Vec::new();
    let mut dk = k.zeros_like()?;
    let mut dv = v.zeros_like()?;
    for (start, len, visible) in blocks(sq, skv, causal, block) {
        let q_block = q.narrow(2, start, len)?;
        let (keys, values) = (k.narrow(2, 0, visible)?, v.narrow(2, 0, visible)?);
        let p = probabilities(&q_block, &keys, scale, causal)?;
        let d_o = d_out.narrow(2, start, len)?;
        let dv_part = matmul(&p.t()?, &d_o)?;
        // scale·dS in place in dP's buffer, where both are untracked f32.
        let scaled_ds = match matmul_f32(&d_o, &values.t()?)? {
            Some((mut dp, shape)) => untracked_f32(&p, |ps| softmax_backward_rows(&mut dp, ps, visible, scale as f32))?
                .map(|()| Tensor::from_vec(dp, shape, &Device::Cpu))
                .transpose()?,
            None => None,
        };
        let (dq_part, dk_part) = match scaled_ds {
            Some(ds) => (matmul(&ds, &keys)?, matmul(&ds.t()?, &q_block)?),
            None => {
                let dp = matmul(&d_o, &values.t()?)?;
                let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
                ((matmul(&ds, &keys)? * scale)?, (matmul(&ds.t()?, &q_block)? * scale)?)
            }
        };
        dq.push(dq_part);
        let pad = skv - visible;
        dk = (dk + dk_part.pad_with_zeros(2, 0, pad)?)?;
        dv = (dv + dv_part.pad_with_zeros(2, 0, pad)?)?;
    }
    let dq = if dq.len() == 1 { dq.pop().expect("one block") } else { Tensor::cat(&dq, 2)? };
    Ok((dq, dk, dv))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (cpu_tensor(s1, l1)?, cpu_tensor(s2, l2)?, cpu_tensor(s3, l3)?);
        let out = forward(&q, &k, &v, self.scale, self.causal, self.block)?;
        Ok((cpu_storage(&out)?, out.shape().clone()))
    }

    /// See `backward`. Everything is detached: nothing here is recorded into a graph.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, d_out) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let (dq, dk, dv) = backward_in_blocks(&q, &k, &v, self.scale, self.causal, &d_out, self.block)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let data = crate::rng::symmetric_uniforms(seed, shape.iter().product());
        (Tensor::from_vec(data, shape, &Device::Cpu).unwrap() * 2.0).unwrap()
    }

    /// The textbook formula with Candle's own ops over the whole score matrix.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Tensor {
        let mut scores = (q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
        if causal {
            let (sq, skv) = (q.dim(2).unwrap(), k.dim(2).unwrap());
            scores = scores.broadcast_add(&causal_mask(sq, skv, DType::F64, &Device::Cpu).unwrap()).unwrap();
        }
        softmax_last(&scores).unwrap().matmul(v).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn values_and_gradients_match_the_whole_matrix_formula() {
        // Self-attention over a window (Sq = Skv), a cached continuation (Sq < Skv),
        // and cross-attention (not causal); blocks of 3 rows so that rows straddle blocks.
        for &(sq, skv, causal) in &[(7usize, 7usize, true), (4, 9, true), (5, 3, false), (1, 6, true)] {
            let (b, h, hd) = (2, 3, 4);
            let q = Var::from_tensor(&randn(&[b, h, sq, hd], 1)).unwrap();
            let k = Var::from_tensor(&randn(&[b, h, skv, hd], 2)).unwrap();
            let v = Var::from_tensor(&randn(&[b, h, skv, hd], 3)).unwrap();
            let weights = randn(&[b, h, sq, hd], 4);
            let op = Attention { scale: 0.5, causal, block: 3 };
            let ours = q.apply_op3(&k, &v, op).unwrap();
            let theirs = reference(&q, &k, &v, 0.5, causal);
            let plain =
                forward(&q.as_tensor().detach(), &k.as_tensor().detach(), &v.as_tensor().detach(), 0.5, causal, 3)
                    .unwrap();
            assert!(max_abs_diff(&ours, &theirs) < 1e-12, "values ({sq}, {skv}, {causal})");
            assert!(max_abs_diff(&plain, &theirs) < 1e-12, "graph-free values ({sq}, {skv}, {causal})");
            let g_ours = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, e) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
                let scale: f64 = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(scale > 1e-3, "{name}: the reference gradient vanishes");
                assert!(max_abs_diff(a, e) < 1e-12 * (1.0 + scale), "d{name} ({sq}, {skv}, {causal})");
                assert!(!a.track_op(), "d{name} carries a graph");
            }
        }
    }

    /// The f32 path (fused softmax and softmax backward on the product's own memory)
    /// against the f64 whole-matrix formula and its autograd, on the same values.
    #[test]
    fn f32_path_matches_the_f64_formula() {
        let f32_of = |t: &Tensor| t.detach().to_dtype(DType::F32).unwrap();
        // The last case: cross-attention with fewer keys than a block has rows.
        for &(sq, skv, causal) in &[(7usize, 7usize, true), (4, 9, true), (5, 3, false), (1, 6, true), (7, 2, false)] {
            let (b, h, hd) = (2, 3, 4);
            let q = Var::from_tensor(&randn(&[b, h, sq, hd], 1)).unwrap();
            let k = Var::from_tensor(&randn(&[b, h, skv, hd], 2)).unwrap();
            let v = Var::from_tensor(&randn(&[b, h, skv, hd], 3)).unwrap();
            let d_out = randn(&[b, h, sq, hd], 4);
            let theirs = reference(&q, &k, &v, 0.5, causal);
            let grads = (&theirs * &d_out).unwrap().sum_all().unwrap().backward().unwrap();
            let (q32, k32, v32) = (f32_of(q.as_tensor()), f32_of(k.as_tensor()), f32_of(v.as_tensor()));
            let ours = forward(&q32, &k32, &v32, 0.5, causal, 3).unwrap();
            assert_eq!(ours.dtype(), DType::F32);
            let rel = |a: &Tensor, e: &Tensor| {
                let scale: f64 = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                max_abs_diff(&a.to_dtype(DType::F64).unwrap(), e) / (1.0 + scale)
            };
            assert!(rel(&ours, &theirs) < 1e-5, "values ({sq}, {skv}, {causal})");
            let (dq, dk, dv) = backward_in_blocks(&q32, &k32, &v32, 0.5, causal, &f32_of(&d_out), 3).unwrap();
            for (name, a, var) in [("q", dq, &q), ("k", dk, &k), ("v", dv, &v)] {
                assert_eq!(a.dtype(), DType::F32);
                assert!(rel(&a, grads.get(var).unwrap()) < 1e-5, "d{name} ({sq}, {skv}, {causal})");
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (q0, k, v) = (randn(&[1, 2, 5, 3], 11), randn(&[1, 2, 5, 3], 12), randn(&[1, 2, 5, 3], 13));
        let weights = randn(&[1, 2, 5, 3], 14);
        let f = |q: &Tensor| -> f64 {
            let op = Attention { scale: 0.7, causal: true, block: 2 };
            (q.apply_op3(&k, &v, op).unwrap() * &weights).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let q = Var::from_tensor(&q0).unwrap();
        let op = Attention { scale: 0.7, causal: true, block: 2 };
        let grads = (q.apply_op3(&k, &v, op).unwrap() * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let grad: Vec<f64> = grads.get(&q).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = q0.flatten_all().unwrap().to_vec1().unwrap();
        for idx in 0..base.len() {
            let shifted = |d: f64| {
                let mut x = base.clone();
                x[idx] += d;
                Tensor::from_vec(x, q0.dims(), &Device::Cpu).unwrap()
            };
            let fd = (f(&shifted(1e-6)) - f(&shifted(-1e-6))) / 2e-6;
            assert!((fd - grad[idx]).abs() < 1e-7 * (1.0 + fd.abs()), "q[{idx}]: fd {fd} vs {}", grad[idx]);
        }
    }
}
