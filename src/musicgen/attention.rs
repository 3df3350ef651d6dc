//! Scaled dot-product attention, `softmax(q·kᵀ·scale + mask)·v`, computed over blocks of
//! query rows, with a hand-written backward pass.
//!
//! Why: composed from Candle ops and differentiated by Candle's autograd, a teacher-
//! forced window of 1500 frames keeps several `[B, H, S, S]` score tensors per layer
//! alive (290 MB each for musicgen-small with guidance) and walks them a dozen times.
//! Here at most one block of `BLOCK` query rows is materialised, causal blocks stop at
//! their last visible key (about half the work), and the backward recomputes each
//! block's probabilities instead of storing them — the FlashAttention recipe. On f32
//! (the gradient step, decoding) each (batch, head) pair is one task with gemm's
//! products inside (`per_head`); other dtypes take Candle's batched matmul.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::matmul::matmul;
use super::ops::{causal_mask, cpu_storage, cpu_tensor, exp_f32, softmax_last, WideLoop};

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

/// Attention probabilities of one block of queries `[B, H, len, visible]` (the generic
/// path: f64, or tensors on other devices).
fn probabilities(q_block: &Tensor, keys: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
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

/// Keys row `r` of a `len`-row block sees: causal blocks see at least their own rows'
/// keys (query `r` sees up to `visible − len + r`); cross-attention may see fewer keys
/// than a block has rows.
fn seen_keys(r: usize, len: usize, visible: usize, causal: bool) -> usize {
    if causal {
        visible - len + r + 1
    } else {
        visible
    }
}

/// In place, each row of a block of `len` rows of `visible` scores becomes
/// `softmax(scale·row)`, causally masked (row `r` sees [`seen_keys`]; the rest get
/// probability 0), vectorised (`ops::run_wide`).
struct SoftmaxRows<'a> {
    scores: &'a mut [f32],
    len: usize,
    visible: usize,
    scale: f32,
    causal: bool,
}

impl WideLoop for SoftmaxRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let Self { scores, len, visible, scale, causal } = self;
        for (r, row) in scores.chunks_mut(visible).enumerate() {
            softmax_row(row, seen_keys(r, len, visible, causal), scale);
        }
    }
}

/// Sixteen independent lanes for a row's reductions, so that they vectorise.
const LANES: usize = 16;

/// In place, the first `seen` entries of a row of scores become `softmax(scale·x)`, the
/// rest 0.
#[inline(always)]
fn softmax_row(row: &mut [f32], seen: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(seen);
    let mut max = [f32::NEG_INFINITY; LANES];
    for c in live.chunks_mut(LANES) {
        for (m, x) in max.iter_mut().zip(c) {
            *x *= scale;
            *m = m.max(*x);
        }
    }
    let max = max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = [0f32; LANES];
    for c in live.chunks_mut(LANES) {
        for (s, x) in sum.iter_mut().zip(c) {
            *x = exp_f32(*x - max);
            *s += *x;
        }
    }
    let sum: f32 = sum.iter().sum();
    for x in live.iter_mut() {
        *x /= sum;
    }
    masked.fill(0.0);
}

/// In place, each row of `dP` becomes `scale·dS` with `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
/// the gradient of the scores through the softmax (rows of `visible`), vectorised.
struct SoftmaxBackwardRows<'a> {
    dp: &'a mut [f32],
    p: &'a [f32],
    visible: usize,
    scale: f32,
}

impl WideLoop for SoftmaxBackwardRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let Self { dp, p, visible, scale } = self;
        for (d, p) in dp.chunks_mut(visible).zip(p.chunks(visible)) {
            let mut dot = [0f32; LANES];
            for (d, p) in d.chunks(LANES).zip(p.chunks(LANES)) {
                for ((s, &d), &p) in dot.iter_mut().zip(d).zip(p) {
                    *s += d * p;
                }
            }
            let dot: f32 = dot.iter().sum();
            for (d, &p) in d.iter_mut().zip(p) {
                *d = p * (*d - dot) * scale;
            }
        }
    }
}

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool, block: usize) -> Result<Tensor> {
    if let Some(out) = per_head::forward(q, k, v, scale, causal, block)? {
        return Ok(out);
    }
    // Candle's batched matmul needs the heads laid out one after the other.
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
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
    if let Some(grads) = per_head::backward(q, k, v, scale, causal, d_out, block)? {
        return Ok(grads);
    }
    let (q, k, v, d_out) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, &d_out.contiguous()?);
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
        let dp = matmul(&d_o, &values.t()?)?;
        let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
        let (dq_part, dk_part) = ((matmul(&ds, &keys)? * scale)?, (matmul(&ds.t()?, &q_block)? * scale)?);
        dq.push(dq_part);
        let pad = skv - visible;
        dk = (dk + dk_part.pad_with_zeros(2, 0, pad)?)?;
        dv = (dv + dv_part.pad_with_zeros(2, 0, pad)?)?;
    }
    let dq = if dq.len() == 1 { dq.pop().expect("one block") } else { Tensor::cat(&dq, 2)? };
    Ok((dq, dk, dv))
}

/// The f32 CPU path: each (batch, head) pair is one task on the thread pool, its blocks
/// of query rows in turn, every product a single-threaded gemm on blocks that stay in
/// cache, dK and dV summed in place. Composed from batched tensor ops, each product was a
/// gemm call per head split across the threads, and each block's dK and dV were padded
/// to full length and added: attention took about a fifth of the LM's backward pass
/// (10 s of musicgen-small: 0.69 s against 0.19 s of arithmetic at the step's gemm rate).
mod per_head {
    use candle_core::{DType, Device, Result, Storage, Tensor};
    use rayon::prelude::*;

    use super::{blocks, SoftmaxBackwardRows, SoftmaxRows};
    use crate::musicgen::matmul::{gemm_into, View};
    use crate::musicgen::ops::run_wide;

    /// The heads of a `[B, H, S, d]` f32 tensor, in place: rows of each head lie `rs`
    /// apart from `offsets[b·H + h]` (a narrowed key/value cache is not contiguous).
    struct Heads<'a> {
        data: &'a [f32],
        offsets: Vec<usize>,
        rows: usize,
        cols: usize,
        rs: usize,
    }

    impl Heads<'_> {
        fn head(&self, i: usize) -> View<'_> {
            View::rows_apart(&self.data[self.offsets[i]..], self.rows, self.cols, self.rs)
        }
    }

    /// `f` on the heads of each tensor; `None` unless all are untracked f32 CPU tensors
    /// of rank 4, non-empty, with unit stride along their last dimension.
    fn with_heads<R>(ts: &[&Tensor], f: impl FnOnce(&[Heads<'_>]) -> R) -> Result<Option<R>> {
        if ts.iter().any(|t| t.track_op() || t.dtype() != DType::F32 || t.rank() != 4 || t.elem_count() == 0) {
            return Ok(None);
        }
        let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
        let mut heads = Vec::with_capacity(ts.len());
        for (storage, layout) in &guards {
            let Storage::Cpu(cpu) = &**storage else { return Ok(None) };
            let data = cpu.as_slice::<f32>()?;
            let (dims, stride) = (layout.dims(), layout.stride());
            if stride[3] != 1 {
                return Ok(None);
            }
            let offsets: Vec<usize> = (0..dims[0])
                .flat_map(|b| (0..dims[1]).map(move |h| layout.start_offset() + b * stride[0] + h * stride[1]))
                .collect();
            let end = (dims[2] - 1) * stride[2] + dims[3];
            if offsets.iter().any(|&o| o + end > data.len()) {
                return Ok(None);
            }
            heads.push(Heads { data, offsets, rows: dims[2], cols: dims[3], rs: stride[2] });
        }
        Ok(Some(f(&heads)))
    }

    /// See `super::forward`.
    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        causal: bool,
        block: usize,
    ) -> Result<Option<Tensor>> {
        let (b, h, sq, _) = q.dims4()?;
        let dv = v.dim(3)?;
        let out = with_heads(&[q, k, v], |heads| {
            let [qh, kh, vh] = heads else { candle_core::bail!("three operands") };
            let mut out = vec![0f32; b * h * sq * dv];
            out.par_chunks_mut(sq * dv).enumerate().try_for_each_init(Vec::new, |scores, (i, o)| {
                head_forward(qh.head(i), kh.head(i), vh.head(i), o, (scale as f32, causal, block), scores)
            })?;
            Ok(out)
        })?;
        out.transpose()?.map(|out| Tensor::from_vec(out, (b, h, sq, dv), &Device::Cpu)).transpose()
    }

    fn head_forward(
        q: View,
        k: View,
        v: View,
        out: &mut [f32],
        (scale, causal, block): (f32, bool, usize),
        scores: &mut Vec<f32>,
    ) -> Result<()> {
        for (start, len, visible) in blocks(q.rows, k.rows, causal, block) {
            let p = probabilities(q.rows(start, len), k.rows(0, visible), (scale, causal), scores)?;
            gemm_into(&mut out[start * v.cols..], v.cols, p, v.rows(0, visible), false)?;
        }
        Ok(())
    }

    /// `softmax(scale·q·kᵀ)` of one block of `q.rows` queries over the `k.rows` visible
    /// keys, causally masked, in `buffer`.
    fn probabilities<'a>(q: View, k: View, (scale, causal): (f32, bool), buffer: &'a mut Vec<f32>) -> Result<View<'a>> {
        let (len, visible) = (q.rows, k.rows);
        buffer.resize(len * visible, 0.0);
        gemm_into(buffer, visible, q, k.t(), false)?;
        run_wide(SoftmaxRows { scores: buffer, len, visible, scale, causal });
        Ok(View::rows_apart(buffer, len, visible, visible))
    }

    /// See `super::backward`.
    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        causal: bool,
        d_out: &Tensor,
        block: usize,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let (b, h, sq, hd) = q.dims4()?;
        let (skv, dv) = (k.dim(2)?, v.dim(3)?);
        let grads = with_heads(&[q, k, v, d_out], |heads| {
            let [qh, kh, vh, oh] = heads else { candle_core::bail!("four operands") };
            let mut dq = vec![0f32; b * h * sq * hd];
            let mut dk = vec![0f32; b * h * skv * hd];
            let mut d_v = vec![0f32; b * h * skv * dv];
            dq.par_chunks_mut(sq * hd)
                .zip(dk.par_chunks_mut(skv * hd))
                .zip(d_v.par_chunks_mut(skv * dv))
                .enumerate()
                .try_for_each_init(
                || (Vec::new(), Vec::new()),
                |buffers, (i, ((dq, dk), d_v))| {
                    let operands = [qh.head(i), kh.head(i), vh.head(i), oh.head(i)];
                    head_backward(operands, [dq, dk, d_v], (scale as f32, causal, block), buffers)
                },
            )?;
            Ok((dq, dk, d_v))
        })?;
        let Some((dq, dk, d_v)) = grads.transpose()? else { return Ok(None) };
        let cpu = &Device::Cpu;
        Ok(Some((
            Tensor::from_vec(dq, (b, h, sq, hd), cpu)?,
            Tensor::from_vec(dk, (b, h, skv, hd), cpu)?,
            Tensor::from_vec(d_v, (b, h, skv, dv), cpu)?,
        )))
    }

    /// One head's `(dq, dk, dv)`, written into zeroed `grads`, block by block as
    /// `super::backward` gives the formulas.
    fn head_backward(
        [q, k, v, d_out]: [View; 4],
        [dq, dk, dv]: [&mut [f32]; 3],
        (scale, causal, block): (f32, bool, usize),
        (p_buffer, ds): &mut (Vec<f32>, Vec<f32>),
    ) -> Result<()> {
        let (hd, vd) = (q.cols, v.cols);
        for (start, len, visible) in blocks(q.rows, k.rows, causal, block) {
            let (q_block, d_o) = (q.rows(start, len), d_out.rows(start, len));
            let (keys, values) = (k.rows(0, visible), v.rows(0, visible));
            let p = probabilities(q_block, keys, (scale, causal), p_buffer)?;
            gemm_into(dv, vd, p.t(), d_o, true)?;
            ds.resize(len * visible, 0.0);
            gemm_into(ds, visible, d_o, values.t(), false)?;
            run_wide(SoftmaxBackwardRows { dp: ds, p: &p.data[..len * visible], visible, scale });
            let ds = View::rows_apart(ds, len, visible, visible);
            gemm_into(&mut dq[start * hd..], hd, ds, keys, false)?;
            gemm_into(dk, hd, ds.t(), q_block, true)?;
        }
        Ok(())
    }
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
            // Views read in place give the same bits: keys and values narrowed from a
            // longer buffer (a cache), queries as the head split of `[B, S, H, hd]`.
            let cache = |t: &Tensor| Tensor::cat(&[t, &t.zeros_like().unwrap()], 2).unwrap().narrow(2, 0, skv).unwrap();
            let q_view = q32.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
            let (k_view, v_view) = (cache(&k32), cache(&v32));
            assert!(!k_view.is_contiguous() && (sq == 1 || !q_view.is_contiguous()));
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
            };
            let viewed = forward(&q_view, &k_view, &v_view, 0.5, causal, 3).unwrap();
            assert_eq!(bits(&viewed), bits(&ours), "views ({sq}, {skv}, {causal})");
            // These are the per-head kernel's numbers, not the generic path's.
            let direct = per_head::forward(&q_view, &k_view, &v_view, 0.5, causal, 3).unwrap();
            assert_eq!(bits(&direct.expect("the per-head path takes strided f32 views")), bits(&ours));
            let d32 = f32_of(&d_out);
            assert!(per_head::backward(&q_view, &k_view, &v_view, 0.5, causal, &d32, 3).unwrap().is_some());
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
