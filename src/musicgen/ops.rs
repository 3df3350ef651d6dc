//! Differentiable building blocks.
//!
//! Candle's fused kernels (`candle_nn::ops::layer_norm`, `softmax_last_dim`, ...) have
//! no backward pass. Everything on the LM and codec-decoder path is therefore composed
//! here from primitive ops that Candle can differentiate, so that a gradient never
//! silently goes missing.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Module, Result, Tensor, WithDType, D};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Layer normalisation over the last dimension, composed from primitive ops.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = normed.broadcast_mul(weight)?;
    match bias {
        Some(b) => out.broadcast_add(b),
        None => Ok(out),
    }
}

/// T5's layer norm: root-mean-square scaling, no mean subtraction, no bias.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Softmax over the last dimension (max-subtracted, differentiable).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Logistic sigmoid written through `tanh`, which is stable for large |x| and differentiable.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// A plain linear layer `x · Wᵀ (+ b)` for weights stored PyTorch-style as `[out, in]`.
/// Inputs of a few rows outside autograd (incremental decoding) take a kernel that
/// reads the weights once (`gemv`).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = match super::gemv::matmul_t(x, weight)? {
        Some(y) => y,
        None => {
            let w = weight.t()?;
            match x.rank() {
                2 => super::matmul::matmul(x, &w)?,
                // Rows of a contiguous input are one matrix: one product, no broadcast copy of W.
                r if r > 2 && x.is_contiguous() => {
                    let n = x.dim(candle_core::D::Minus1)?;
                    let y = super::matmul::matmul(&x.reshape((x.elem_count() / n.max(1), n))?, &w)?;
                    let mut shape = x.dims().to_vec();
                    shape[r - 1] = w.dim(1)?;
                    y.reshape(shape)?
                }
                _ => x.broadcast_matmul(&w)?,
            }
        }
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Sinusoidal positional embedding `[cos(p·ω_i), sin(p·ω_i)]` with
/// `ω_i = max_period^(−i/(half−1))`, as audiocraft and transformers' MusicGen use.
pub fn sinusoidal_positions(
    offset: usize,
    len: usize,
    dim: usize,
    max_period: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut data = vec![0f64; len * dim];
    for p in 0..len {
        let pos = (offset + p) as f64;
        for i in 0..half {
            let denom = if half > 1 { (half - 1) as f64 } else { 1.0 };
            let freq = (-(max_period.ln()) * i as f64 / denom).exp();
            let phase = pos * freq;
            data[p * dim + i] = phase.cos();
            data[p * dim + half + i] = phase.sin();
        }
    }
    Tensor::from_vec(data, (len, dim), device)?.to_dtype(dtype)
}

/// An embedding lookup that stays differentiable with respect to the table.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let dims = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let rows = table.contiguous()?.index_select(&flat, 0)?;
    let mut shape = dims;
    shape.push(table.dim(1)?);
    rows.reshape(shape)
}

/// Identity module, handy where a layer is optional.
pub struct Identity;
impl Module for Identity {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.clone())
    }
}

/// Upper-triangular additive mask (−inf above the diagonal), `[q_len, kv_len]`, for
/// queries that sit at the last `q_len` positions of `kv_len`.
pub fn causal_mask(q_len: usize, kv_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let data: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..kv_len).map(move |j| if j > i + offset { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (q_len, kv_len), device)?.to_dtype(dtype)
}

/// A CPU storage region viewed as a tensor of its own (copied), for custom ops whose
/// forward is written with tensor ops. The region must be contiguous.
pub(crate) fn cpu_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    fn view<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("custom op: input is not contiguous".into()))?;
        Tensor::from_slice(&s.as_slice::<T>()?[start..end], l.shape(), &candle_core::Device::Cpu)
    }
    match s.dtype() {
        DType::F32 => view::<f32>(s, l),
        DType::F64 => view::<f64>(s, l),
        DType::F16 => view::<half::f16>(s, l),
        DType::BF16 => view::<half::bf16>(s, l),
        dt => candle_core::bail!("custom op: unsupported dtype {dt:?}"),
    }
}

/// A tensor's values as an owned CPU storage (a custom op's output).
pub(crate) fn cpu_storage(t: &Tensor) -> Result<CpuStorage> {
    fn take<T: WithDType>(t: &Tensor) -> Result<CpuStorage> {
        Ok(T::to_cpu_storage_owned(t.flatten_all()?.to_vec1::<T>()?))
    }
    match t.dtype() {
        DType::F32 => take::<f32>(t),
        DType::F64 => take::<f64>(t),
        DType::F16 => take::<half::f16>(t),
        DType::BF16 => take::<half::bf16>(t),
        dt => candle_core::bail!("custom op: unsupported dtype {dt:?}"),
    }
}

/// `f` on the values of a contiguous f32 CPU tensor, borrowed in place; `Err(f)` (the
/// closure handed back) for any other tensor.
fn in_place_f32<R, F: FnOnce(&[f32]) -> R>(t: &Tensor, f: F) -> std::result::Result<R, F> {
    if t.dtype() != DType::F32 {
        return Err(f);
    }
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((a, b))) => match cpu.as_slice::<f32>() {
            Ok(values) => Ok(f(&values[a..b])),
            Err(_) => Err(f),
        },
        _ => Err(f),
    }
}

/// `f` on the values of a contiguous f32 CPU tensor that carries no autograd graph, in
/// place; `None` for any other tensor, which then takes Candle's generic (differentiable)
/// ops.
pub(crate) fn untracked_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.track_op() {
        return Ok(None);
    }
    Ok(in_place_f32(t, f).ok())
}

/// Rows of a layer norm's backward handled by one task: the weight and bias gradients
/// are summed per block, then the blocks in order, so the bits do not depend on the
/// thread count.
const NORM_ROWS: usize = 16;

/// The backward of a layer norm `y = x̂·w + b` over the last dimension, from the forward
/// pass's x̂ and 1/σ (one per row): `(dx, dw, db)` with `dx̂ = dy·w`,
/// `dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂))/σ`, `dw = Σ_rows dy·x̂`, `db = Σ_rows dy`.
/// One pass per row, rows in parallel, sums in f64 (Candle's ops take ten passes over
/// the activations, the reductions on one thread). `None` unless `dy` and `x̂` are
/// untracked f32 tensors of the same shape, whose last dimension is `w`'s.
pub fn layer_norm_backward_f32(
    x_hat: &Tensor,
    inv_std: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let n = weight.elem_count();
    let f32s = [x_hat, inv_std, weight, dy].iter().all(|t| t.dtype() == DType::F32);
    if !f32s || n == 0 || dy.shape() != x_hat.shape() || dy.dim(D::Minus1)? != n {
        return Ok(None);
    }
    let rows = dy.elem_count() / n;
    if inv_std.elem_count() != rows {
        return Ok(None);
    }
    let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let inv: Vec<f32> = inv_std.flatten_all()?.to_vec1()?;
    let (x_hat, dy) = (x_hat.contiguous()?, dy.contiguous()?);
    let out = untracked_f32(&dy, |dys| {
        untracked_f32(&x_hat, |xhs| {
            let mut dx = vec![0f32; dys.len()];
            let sums: Vec<(Vec<f64>, Vec<f64>)> = dx
                .par_chunks_mut(NORM_ROWS * n)
                .zip(dys.par_chunks(NORM_ROWS * n).zip(xhs.par_chunks(NORM_ROWS * n)))
                .zip(inv.par_chunks(NORM_ROWS))
                .map(|((dx, (dy, xh)), inv)| {
                    let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
                    for (((dx, dy), xh), &inv) in dx.chunks_mut(n).zip(dy.chunks(n)).zip(xh.chunks(n)).zip(inv) {
                        let (mut mean, mut mean_x) = (0f64, 0f64);
                        for (((&g, &x), &w), (dw, db)) in
                            dy.iter().zip(xh).zip(&w).zip(dw.iter_mut().zip(db.iter_mut()))
                        {
                            let (g, x) = (g as f64, x as f64);
                            let d = g * w as f64;
                            mean += d;
                            mean_x += d * x;
                            *dw += g * x;
                            *db += g;
                        }
                        let (mean, mean_x) = (mean / n as f64, mean_x / n as f64);
                        for ((o, (&g, &x)), &w) in dx.iter_mut().zip(dy.iter().zip(xh)).zip(&w) {
                            *o = ((g as f64 * w as f64 - mean - x as f64 * mean_x) * inv as f64) as f32;
                        }
                    }
                    (dw, db)
                })
                .collect();
            let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
            for (pw, pb) in &sums {
                for (a, b) in dw.iter_mut().zip(pw) {
                    *a += b;
                }
                for (a, b) in db.iter_mut().zip(pb) {
                    *a += b;
                }
            }
            let narrow = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            (dx, narrow(dw), narrow(db))
        })
    })?;
    match out.transpose()?.flatten() {
        Some((dx, dw, db)) => Ok(Some((
            Tensor::from_vec(dx, dy.shape(), dy.device())?,
            Tensor::from_vec(dw, weight.shape(), dy.device())?,
            Tensor::from_vec(db, weight.shape(), dy.device())?,
        ))),
        None => Ok(None),
    }
}

/// GELU, erf form: `x·Φ(x)`. On untracked f32 tensors in parallel, vectorised, with
/// Φ from [`normal_cdf_pdf`] (within 1 ulp of the f64 formula; libm's `erff`, one value
/// at a time, was 0.2 s of a 10 s audio-nll step); Candle's `gelu_erf` otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    match map_chunks_f32(x, x, Gelu)? {
        Some([y]) => Ok(y),
        None => x.gelu_erf(),
    }
}

/// [`gelu_erf`] at `u` and its slope `Φ(u) + u·φ(u)` (the gradient through it is
/// `dy·slope`): the forward pass keeps the slope instead of `u`, so the backward pass
/// needs neither `erf` nor `exp`. `y` has [`gelu_erf`]'s bits.
pub fn gelu_erf_with_slope(u: &Tensor) -> Result<(Tensor, Tensor)> {
    use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
    if let Some([y, slope]) = map_chunks_f32(u, u, GeluAndSlope)? {
        return Ok((y, slope));
    }
    // 1/√(2π), exactly (Candle's own GELU backward rounds it to 0.398942).
    let inv_sqrt_2pi = 0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2;
    let cdf = ((u * FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = ((u.sqr()? * -0.5)?.exp()? * inv_sqrt_2pi)?;
    Ok((gelu_erf(u)?, (cdf? + (u * pdf)?)?))
}

#[derive(Clone, Copy)]
struct Gelu;

// SAFETY: `run` writes every element of its output (zipped with the equally long input).
unsafe impl ChunkLoop<1> for Gelu {
    #[inline(always)]
    fn run(self, u: &[f32], _: &[f32], [y]: [&mut [MaybeUninit<f32>]; 1]) {
        for (y, &u) in y.iter_mut().zip(u) {
            y.write((u as f64 * normal_cdf_pdf(u).0) as f32);
        }
    }
}

#[derive(Clone, Copy)]
struct GeluAndSlope;

// SAFETY: `run` writes every element of both outputs (zipped with the input).
unsafe impl ChunkLoop<2> for GeluAndSlope {
    #[inline(always)]
    fn run(self, u: &[f32], _: &[f32], [y, slope]: [&mut [MaybeUninit<f32>]; 2]) {
        for ((y, s), &u) in y.iter_mut().zip(slope.iter_mut()).zip(u) {
            let (cdf, pdf_term) = normal_cdf_pdf(u);
            y.write((u as f64 * cdf) as f32);
            s.write((cdf + pdf_term) as f32);
        }
    }
}

/// `ln(erfc(z)/t) + z²` as a polynomial in `t = 1/(1 + z/2)` over `z ∈ [0, 14]`, lowest
/// degree first, fitted for this crate (weighted least squares on Chebyshev nodes of
/// `t ∈ [1/8, 1]`): `erfc(z) = t·exp(−z² + P(t))` within 3.2e-10 relative there. The form
/// is the one of Numerical Recipes' `erfcc`; past z = 14, erfc is below f32's range.
const ERFC_POLY: [f64; 13] = [
    -1.2655079244358314,
    0.9998376122103773,
    0.3777644748009878,
    0.055925189772504304,
    0.09041591079069514,
    -0.9195590028668927,
    2.2968938117847952,
    -5.1293610358604305,
    7.787715841217938,
    -7.257442966939459,
    4.057497078937864,
    -1.2643489584944796,
    0.17016996876941004,
];

/// The standard normal `Φ(u)` and `u·φ(u)`, in f64 for an f32 `u`, in branch-free
/// arithmetic that the compiler vectorises: both within 1e-9 relative of the exact
/// values, so each rounds to f32 within an ulp.
#[inline(always)]
fn normal_cdf_pdf(u: f32) -> (f64, f64) {
    use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
    let u = u as f64;
    let z = (u * FRAC_1_SQRT_2).abs().min(14.0);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = ERFC_POLY.iter().rev().fold(0.0, |acc: f64, &c| acc.mul_add(t, c));
    // Past z = 14 the polynomial no longer holds and erfc is below f32's range: 0 (then
    // GELU(−∞) is NaN, as Candle's and PyTorch's).
    let half_erfc = if z < 14.0 { 0.5 * t * exp_f64(poly - z * z) } else { 0.0 };
    let cdf = if u < 0.0 { half_erfc } else { 1.0 - half_erfc };
    // u·φ(u) is below f32's range past |u| = 37; clamped, it stays finite at ±∞.
    let uc = u.clamp(-37.0, 37.0);
    (cdf, uc * exp_f64(-0.5 * uc * uc) * (0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2))
}

/// `1/k!` for k = 0..=13.
const TAYLOR_EXP: [f64; 14] = {
    let mut c = [1.0; 14];
    let mut k = 1;
    while k < 14 {
        c[k] = c[k - 1] / k as f64;
        k += 1;
    }
    c
};

/// `eˣ` in f64 for `−708 ≤ x ≤ 0` (smaller `x` give e⁻⁷⁰⁸), within 2 ulps, branch-free:
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor series to `r¹³` (remainder
/// below 2⁻⁵²), times `2ⁿ` built in the exponent bits.
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with 21 trailing zero bits so that n·LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1.5·2⁵²: adding it rounds to an integer held in the low bits of the mantissa.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let x = x.max(-708.0);
    let shifted = x * std::f64::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = TAYLOR_EXP.iter().rev().fold(0.0, |acc: f64, &c| acc.mul_add(r, c));
    // 2ⁿ: n + 1023 in the exponent field (n ≥ −1022 for x ≥ −708).
    let scale = f64::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(1023) << 52);
    scale * p
}

/// ELU with α = 1, `x` for `x > 0`, `eˣ − 1` below; in parallel on untracked f32
/// tensors, with [`expm1_f32`] (libm's `expm1f`, one value at a time, was a third of
/// the codec decoder's backward pass), Candle's ops otherwise.
pub fn elu(x: &Tensor) -> Result<Tensor> {
    match map_chunks_f32(x, x, Elu)? {
        Some([y]) => Ok(y),
        None => x.elu(1.0),
    }
}

/// The gradient through [`elu`] at `x`: `dy·exp(min(x, 0))` (1 above zero).
pub fn elu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    match map_chunks_f32(x, dy, EluBackward)? {
        Some([g]) => Ok(g),
        None => dy * x.minimum(0.0)?.exp()?,
    }
}

#[derive(Clone, Copy)]
struct Elu;

// SAFETY: `run` writes every element of its output (zipped with the equally long input).
unsafe impl ChunkLoop<1> for Elu {
    #[inline(always)]
    fn run(self, x: &[f32], _: &[f32], [out]: [&mut [MaybeUninit<f32>]; 1]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(if v > 0.0 { v } else { expm1_f32(v) });
        }
    }
}

/// [`elu`] at `x` and its slope, `exp(min(x, 0))` (the gradient through it is
/// `dy·slope`, the numbers of [`elu_backward`]), from one evaluation of `eˣ − 1`: a
/// backward pass that needs both runs the exponential once.
pub fn elu_with_slope(x: &Tensor) -> Result<(Tensor, Tensor)> {
    match map_chunks_f32(x, x, EluAndSlope)? {
        Some([y, slope]) => Ok((y, slope)),
        None => Ok((x.elu(1.0)?, x.minimum(0.0)?.exp()?)),
    }
}

#[derive(Clone, Copy)]
struct EluAndSlope;

// SAFETY: `run` writes every element of both outputs (zipped with the input).
unsafe impl ChunkLoop<2> for EluAndSlope {
    #[inline(always)]
    fn run(self, x: &[f32], _: &[f32], [y, slope]: [&mut [MaybeUninit<f32>]; 2]) {
        for ((y, s), &v) in y.iter_mut().zip(slope.iter_mut()).zip(x) {
            let e = expm1_f32(v);
            y.write(if v > 0.0 { v } else { e });
            s.write(if v > 0.0 { 1.0 } else { e + 1.0 });
        }
    }
}

#[derive(Clone, Copy)]
struct EluBackward;

// SAFETY: `run` writes every element of its output (zipped with the equally long inputs).
unsafe impl ChunkLoop<1> for EluBackward {
    #[inline(always)]
    fn run(self, x: &[f32], dy: &[f32], [out]: [&mut [MaybeUninit<f32>]; 1]) {
        for ((o, &v), &d) in out.iter_mut().zip(x).zip(dy) {
            o.write(if v > 0.0 { d } else { d * (expm1_f32(v) + 1.0) });
        }
    }
}

/// A loop written to vectorise, for [`run_wide`]: implementations mark `run`
/// `inline(always)`, so that it is compiled inside `run_wide`'s AVX functions (a
/// function item or closure passed instead goes through a call shim that is not always
/// inlined, and its loop then runs without AVX2 and FMA).
pub(crate) trait WideLoop {
    type Output;
    fn run(self) -> Self::Output;
}

/// `l.run()` compiled for AVX-512F, or AVX2 and FMA, where the CPU has them.
#[inline]
pub(crate) fn run_wide<L: WideLoop>(l: L) -> L::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn wide<L: WideLoop>(l: L) -> L::Output {
            l.run()
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn wider<L: WideLoop>(l: L) -> L::Output {
            l.run()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU reports AVX-512F, AVX2 and FMA.
                return unsafe { wider(l) };
            }
            // SAFETY: the CPU reports AVX2 and FMA.
            return unsafe { wide(l) };
        }
    }
    l.run()
}

/// An elementwise loop over matching chunks of two inputs and `N` outputs, for
/// [`map_chunks_f32`] (`run` marked `inline(always)`, as [`WideLoop`]'s). The outputs
/// are not initialised (zero-filling them first was a serial pass, 2% of a gradient
/// step's time).
///
/// # Safety
/// `run` must write every element of every output chunk: they are read afterwards.
unsafe trait ChunkLoop<const N: usize>: Copy + Sync {
    fn run(self, x: &[f32], y: &[f32], outs: [&mut [MaybeUninit<f32>]; N]);
}

/// One chunk of [`map_chunks_f32`].
struct Chunk<'a, const N: usize, F> {
    f: F,
    x: &'a [f32],
    y: &'a [f32],
    outs: [&'a mut [MaybeUninit<f32>]; N],
}

impl<const N: usize, F: ChunkLoop<N>> WideLoop for Chunk<'_, N, F> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        self.f.run(self.x, self.y, self.outs)
    }
}

/// `f.run(x, y, outs)` over matching chunks of two same-shaped untracked f32 tensors and
/// of `N` outputs, chunks in parallel, vectorised ([`run_wide`]); `None` when either is
/// not such a tensor.
fn map_chunks_f32<const N: usize, F: ChunkLoop<N>>(x: &Tensor, y: &Tensor, f: F) -> Result<Option<[Tensor; N]>> {
    const CHUNK: usize = 1 << 14;
    if x.shape() != y.shape() {
        return Ok(None);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let outs = untracked_f32(&x, |xs| {
        untracked_f32(&y, |ys| {
            let n = xs.len();
            let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
            for o in &mut outs {
                o.try_reserve_exact(n).map_err(|e| candle_core::Error::Msg(format!("{n} numbers: {e}")))?;
            }
            // The i-th chunk of every output, together.
            let mut parts: Vec<_> = outs.iter_mut().map(|o| o.spare_capacity_mut()[..n].chunks_mut(CHUNK)).collect();
            let chunks: Vec<[&mut [MaybeUninit<f32>]; N]> =
                (0..n.div_ceil(CHUNK)).map(|_| std::array::from_fn(|j| parts[j].next().unwrap_or_default())).collect();
            chunks
                .into_par_iter()
                .zip(xs.par_chunks(CHUNK).zip(ys.par_chunks(CHUNK)))
                .for_each(|(outs, (x, y))| run_wide(Chunk { f, x, y, outs }));
            for o in &mut outs {
                // SAFETY: the chunks cover the first n elements of every output, and
                // `ChunkLoop::run` wrote each of them.
                unsafe { o.set_len(n) };
            }
            Ok::<_, candle_core::Error>(outs)
        })
    })?;
    match outs.transpose()?.flatten().transpose()? {
        Some(outs) => {
            let mut tensors = Vec::with_capacity(N);
            for v in outs {
                tensors.push(Tensor::from_vec(v, x.shape(), x.device())?);
            }
            Ok(tensors.try_into().ok())
        }
        None => Ok(None),
    }
}

/// `eˣ − 1` in f32 for `x ≤ 0` (and NaN), within a few units in the last place, in
/// plain arithmetic that the compiler vectorises (see [`exp_parts`]):
/// `2ⁿ(eʳ − 1) + (2ⁿ − 1)`, which keeps full relative precision near zero (`n = 0`).
/// Below −87, `eˣ − 1` is −1 in f32.
#[inline(always)]
fn expm1_f32(x: f32) -> f32 {
    let (s, p) = exp_parts(x);
    s * p + (s - 1.0)
}

/// `eˣ` in f32 for `x ≤ 0` (and NaN), within a few units in the last place, vectorised
/// as [`expm1_f32`]: `2ⁿ(eʳ − 1) + 2ⁿ`. Below −87 it gives e⁻⁸⁷ (1.6e-38), not less.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let (s, p) = exp_parts(x);
    s * p + s
}

/// `(2ⁿ, eʳ − 1)` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, for `x ≤ 0` clamped at −87:
/// `eʳ − 1` by its Taylor series to `r⁸` (remainder below 2⁻²⁷ relative).
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split for an exact n·LN2_HI
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = if x < -87.0 { -87.0 } else { x };
    // Round to nearest by adding and removing 1.5·2²³ (|x·log₂e| < 2²²): one add each
    // way, where `round_ties_even` is a libm call that stops the loop vectorising.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = r + r
        * r
        * (1.0 / 2.0
            + r * (1.0 / 6.0
                + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r / 40320.0))))));
    // 2ⁿ, n ≥ −126. Clamped in floats: a vectorised caller may evaluate this for
    // positive x too (and discard it); NaN casts to 0, and the result stays NaN.
    let s = f32::from_bits(((n + 127.0).clamp(1.0, 254.0) as u32) << 23);
    (s, p)
}

/// `slot += g`, `slot` starting empty: a sum of tensors that arrive one by one
/// (gradients over windows or over a convolution's parts).
pub fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        None => g,
        Some(a) => (a + g)?,
    });
    Ok(())
}

/// Whether `t` is an f32 tensor without an autograd graph: what the parallel f32 loops
/// (here and in `conv`) take, once contiguous.
pub(crate) fn is_untracked_f32(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && !t.track_op()
}

/// Calls `f` on a CPU tensor's values as f32, borrowed in place when they already are
/// contiguous f32 (a gradient of the model's size is not copied), converted otherwise.
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> anyhow::Result<R>) -> anyhow::Result<R> {
    match in_place_f32(t, f) {
        Ok(r) => r,
        Err(f) => f(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_closed_form() {
        let x = Tensor::from_vec(vec![1f32, 2., 3., 6.], (1, 4), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(vec![1f32, 2., 1., 1.], 4, &Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![0f32, 0., 1., 0.], 4, &Device::Cpu).unwrap();
        let y: Vec<f32> = layer_norm(&x, &w, Some(&b), 0.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // mean 3, variance (4+1+0+9)/4 = 3.5
        let sd = 3.5f32.sqrt();
        let expect = [-2.0 / sd, -2.0 / sd, 1.0, 3.0 / sd];
        for (a, e) in y.iter().zip(expect) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
    }

    /// The fused f32 layer-norm backward against Candle's autograd through `layer_norm` in
    /// f64 (independent of the formula the fused pass implements), with rows that do not
    /// fill the last block.
    #[test]
    fn fused_layer_norm_backward_matches_autograd() {
        let (rows, n, eps) = (2 * NORM_ROWS + 5, 48, 1e-5);
        let uniforms = |seed: u64, shape: &[usize]| {
            let len = shape.iter().product();
            Tensor::from_vec(crate::rng::symmetric_uniforms(seed, len), shape, &Device::Cpu).unwrap()
        };
        let x = ((uniforms(1, &[1, rows, n]) * 3.0).unwrap() + 0.5).unwrap();
        let (w, b, dy) = (uniforms(2, &[n]), uniforms(3, &[n]), uniforms(4, &[1, rows, n]));
        // The reference: autograd of ⟨layer_norm(x), dy⟩.
        let vars = [&x, &w, &b].map(|t| candle_core::Var::from_tensor(t).unwrap());
        let y = layer_norm(vars[0].as_tensor(), vars[1].as_tensor(), Some(vars[2].as_tensor()), eps).unwrap();
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        // The fused pass's inputs: x̂ and 1/σ as the forward pass keeps them.
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let std = (centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let inputs = [f32(&centered.broadcast_div(&std).unwrap()), f32(&std.recip().unwrap()), f32(&w), f32(&dy)];
        let (dx, dw, db) =
            layer_norm_backward_f32(&inputs[0], &inputs[1], &inputs[2], &inputs[3]).unwrap().expect("the f32 path");
        let ours = [dx, dw, db].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for ((what, ours), var) in ["dx", "dw", "db"].iter().zip(&ours).zip(&vars) {
            let want = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = ours.iter().zip(&want).fold(0f64, |m, (&a, b)| m.max((a as f64 - b).abs()));
            assert!(err <= 1e-6 * scale, "{what}: error {err:e}, scale {scale:e}");
        }
        // Other dtypes take Candle's ops.
        assert!(layer_norm_backward_f32(&inputs[0].to_dtype(DType::F64).unwrap(), &inputs[1], &inputs[2], &inputs[3])
            .unwrap()
            .is_none());
    }

    #[test]
    fn only_untracked_contiguous_f32_takes_the_loops() {
        // The other tests compare the f32 loops with Candle's ops; they would also pass if
        // the loops were never taken, or taken for a tracked tensor (whose gradient would
        // then be lost). This pins down which path each tensor takes.
        let plain = Tensor::from_vec(vec![1f32, -2.0, 3.0, -4.0], (2, 2), &Device::Cpu).unwrap();
        let sum = |t: &Tensor| untracked_f32(t, |v| v.iter().sum::<f32>()).unwrap();
        assert_eq!(sum(&plain), Some(-2.0));
        assert_eq!(sum(&plain.narrow(0, 1, 1).unwrap()), Some(-1.0), "a contiguous view is read in place");
        assert_eq!(sum(&plain.t().unwrap()), None, "a transposed view is not contiguous");
        assert_eq!(sum(&plain.to_dtype(DType::F64).unwrap()), None);
        let var = candle_core::Var::from_tensor(&plain).unwrap();
        assert_eq!(sum(&(var.as_tensor() * 2.0).unwrap()), None, "a tracked tensor keeps its graph");
        // ELU of a tracked input still reaches the input through autograd.
        let grads = elu(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(var.as_tensor()).is_some());
        // with_f32_values reads any tensor, in place or converted.
        let total = |t: &Tensor| with_f32_values(t, |v| Ok(v.iter().sum::<f32>())).unwrap();
        assert_eq!(total(&plain.t().unwrap()), -2.0);
        assert_eq!(total(&plain.to_dtype(DType::F64).unwrap()), -2.0);
    }

    #[test]
    fn elu_and_its_gradient_match_closed_forms() {
        let xs = [-30.0f32, -2.5, -1e-3, 0.0, 1e-3, 0.7, 40.0];
        let dys = [0.3f32, -1.2, 2.0, 0.5, -0.25, 1.5, -3.0];
        // Long enough for several parallel chunks; f32 takes the loops, f64 Candle's ops.
        let n = 3 * (1 << 14) + 5;
        let x: Vec<f32> = (0..n).map(|i| xs[i % xs.len()]).collect();
        let dy: Vec<f32> = (0..n).map(|i| dys[i % dys.len()]).collect();
        for dtype in [DType::F32, DType::F64] {
            let xt = Tensor::from_vec(x.clone(), n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let dt = Tensor::from_vec(dy.clone(), n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let y: Vec<f64> = elu(&xt).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            let g: Vec<f64> = elu_backward(&xt, &dt).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            // The pair from one pass: the same numbers as `elu` and `elu_backward`.
            let (y2, slope) = elu_with_slope(&xt).unwrap();
            let g2: Vec<f64> = (&dt * slope).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            assert_eq!(y2.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(), y, "{dtype:?}: elu_with_slope's y");
            let exact = dtype == DType::F32; // Candle's f64 path orders the products its own way
            for i in 0..n {
                let (x, d) = (x[i] as f64, dy[i] as f64);
                assert!(if exact { g2[i] == g[i] } else { (g2[i] - g[i]).abs() <= 1e-15 * (1.0 + g[i].abs()) });
                let (want_y, want_g) = if x > 0.0 { (x, d) } else { (x.exp() - 1.0, d * x.exp()) };
                assert!((y[i] - want_y).abs() <= 1e-6 * (1.0 + want_y.abs()), "{dtype:?} elu({x}) = {}", y[i]);
                assert!((g[i] - want_g).abs() <= 1e-6 * (1.0 + want_g.abs()), "{dtype:?} elu'({x})·{d} = {}", g[i]);
            }
        }
    }

    #[test]
    fn expm1_is_within_a_few_ulps_of_double_precision() {
        // Every 97th f32 from −0 down to −90 (about 11 million values), the edges of the
        // reduction's intervals, and the limits.
        let mut worst = 0f64;
        let mut check = |x: f32| {
            let got = expm1_f32(x) as f64;
            let want = (x as f64).exp_m1();
            let ulp = (want as f32).abs().max(f32::MIN_POSITIVE) as f64 * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp);
        };
        let mut bits = (-0.0f32).to_bits();
        while f32::from_bits(bits) >= -90.0 {
            check(f32::from_bits(bits));
            bits += 97;
        }
        for k in -130..=1 {
            let edge = (k as f32 + 0.5) * std::f32::consts::LN_2;
            for x in [edge, f32::from_bits(edge.to_bits() + 1), f32::from_bits(edge.to_bits().saturating_sub(1))] {
                if x <= 0.0 {
                    check(x);
                }
            }
        }
        for x in [0.0f32, -0.0, -1e-30, -1e-7, -f32::MIN_POSITIVE, -87.0, -87.5, -1e30, f32::NEG_INFINITY] {
            check(x);
        }
        assert!(worst <= 4.0, "expm1_f32 is {worst} ulps from exp_m1");
        assert!(expm1_f32(f32::NAN).is_nan(), "NaN must stay NaN");
        assert_eq!(expm1_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(expm1_f32(-0.0), 0.0);
    }

    /// GELU and its slope on f32 tensors against the f64 formula (Φ from libm's `erfc`):
    /// within an ulp (and 1e-44 absolute, f32's subnormals), y the same bits with and
    /// without the slope; the slope against the f64 tensor path (Candle's ops).
    #[test]
    fn gelu_and_its_slope_are_the_double_precision_formula() {
        use std::f64::consts::{PI, SQRT_2};
        let n = 3 * (1 << 14) + 7;
        let mut u: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 80.0).collect();
        u.extend([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 0.5, -0.5, 6.0, -6.0, 19.7, -19.7, 1e30, -1e30]);
        u.extend([f32::INFINITY, f32::NEG_INFINITY]);
        let ut = Tensor::from_vec(u.clone(), u.len(), &Device::Cpu).unwrap();
        let (y, slope) = gelu_erf_with_slope(&ut).unwrap();
        let (y, slope): (Vec<f32>, Vec<f32>) = (y.to_vec1().unwrap(), slope.to_vec1().unwrap());
        let alone: Vec<f32> = gelu_erf(&ut).unwrap().to_vec1().unwrap();
        assert!(alone.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "gelu_erf and the pair differ");
        let within_an_ulp = |ours: f32, want: f64| {
            (ours as f64 - want).abs() <= want.abs() * f32::EPSILON as f64 + 1e-44
                || ours as f64 == want
                || (ours.is_nan() && want.is_nan())
        };
        for ((&u, &y), &s) in u.iter().zip(&y).zip(&slope) {
            let x = u as f64;
            let cdf = 0.5 * libm::erfc(-x / SQRT_2);
            let pdf = (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
            let want_s = if x.is_infinite() { cdf } else { cdf + x * pdf };
            assert!(within_an_ulp(y, x * cdf), "y at u = {u}: {y} against {}", x * cdf);
            assert!(within_an_ulp(s, want_s), "slope at u = {u}: {s} against {want_s}");
        }
        assert!(
            gelu_erf(&Tensor::new(&[f32::NAN], &Device::Cpu).unwrap()).unwrap().to_vec1::<f32>().unwrap()[0].is_nan()
        );
        // The f64 path (Candle's ops) agrees with the f32 loop.
        let (_, slope64) = gelu_erf_with_slope(&ut.narrow(0, 0, n).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
        let slope64: Vec<f64> = slope64.to_vec1().unwrap();
        for i in 0..n {
            assert!(
                (slope64[i] - slope[i] as f64).abs() <= 1e-6 * (1.0 + slope64[i].abs()),
                "f64 slope at u = {}",
                u[i]
            );
        }
    }

    #[test]
    fn exp_f64_is_within_two_ulps() {
        for i in 0..=200_000 {
            let x = -708.0 * i as f64 / 200_000.0;
            let (ours, want) = (exp_f64(x), x.exp());
            assert!((ours - want).abs() <= 2.0 * f64::EPSILON * want, "exp({x}): {ours} against {want}");
        }
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-1000.0), exp_f64(-708.0), "below −708 the result is e⁻⁷⁰⁸");
    }

    #[test]
    fn sigmoid_is_logistic() {
        let x = Tensor::from_vec(vec![-30f32, -1., 0., 2.5, 40.], 5, &Device::Cpu).unwrap();
        let y: Vec<f32> = sigmoid(&x).unwrap().to_vec1().unwrap();
        for (v, xv) in y.iter().zip([-30f32, -1., 0., 2.5, 40.]) {
            let e = 1.0 / (1.0 + (-xv).exp());
            assert!((v - e).abs() < 1e-6);
        }
    }
}
