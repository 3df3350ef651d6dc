//! Differentiable building blocks.
//!
//! Candle's fused kernels (`candle_nn::ops::layer_norm`, `softmax_last_dim`, ...) have
//! no backward pass and `conv_transpose1d` refuses to differentiate. Everything on the
//! LM and codec-decoder path is therefore composed here from primitive ops that
//! Candle can differentiate, so that a gradient never silently goes missing.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Module, Result, Tensor, WithDType, D};

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
                2 => x.matmul(&w)?,
                _ => x.broadcast_matmul(&w)?,
            }
        }
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Pads the last dimension of `x` by mirroring (PyTorch `F.pad(mode="reflect")`).
/// Implemented with `index_select`, which Candle can differentiate.
pub fn reflect_pad_last(x: &Tensor, left: usize, right: usize) -> Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(x.clone());
    }
    let len = x.dim(D::Minus1)?;
    if len <= left.max(right) {
        candle_core::bail!("reflect padding of ({left}, {right}) needs an input longer than {len}");
    }
    let mut idx: Vec<u32> = Vec::with_capacity(len + left + right);
    for i in (1..=left).rev() {
        idx.push(i as u32);
    }
    idx.extend(0..len as u32);
    for i in 0..right {
        idx.push((len - 2 - i) as u32);
    }
    let idx = Tensor::from_vec(idx, len + left + right, x.device())?;
    x.contiguous()?.index_select(&idx, x.rank() - 1)
}

/// Parameters of a 1-d transposed convolution, as in `torch.nn.functional.conv_transpose1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose1dParams {
    pub stride: usize,
    pub padding: usize,
    pub output_padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for ConvTranspose1dParams {
    fn default() -> Self {
        Self { stride: 1, padding: 0, output_padding: 0, dilation: 1, groups: 1 }
    }
}

/// Differentiable 1-d transposed convolution.
///
/// `x`: `[B, C_in, L]`, `w`: `[C_in, C_out / groups, K]` (PyTorch layout).
/// Computed as one matmul per group, `Z = Xᵀ·W` (`[B, L, C_out, K]`), followed by an
/// overlap-add of the K taps at offsets `j·stride + k·dilation`. Matmul, pad, narrow,
/// reshape and add all have backward passes in Candle, so gradients flow to `x` and `w`
/// — unlike Candle's own `conv_transpose1d`, which returns `BackwardNotSupported`.
pub fn conv_transpose1d(x: &Tensor, w: &Tensor, p: ConvTranspose1dParams) -> Result<Tensor> {
    let (b, c_in, l) = x.dims3()?;
    let (wc_in, c_out_g, k) = w.dims3()?;
    let g = p.groups.max(1);
    if wc_in != c_in || c_in % g != 0 {
        candle_core::bail!("conv_transpose1d: input has {c_in} channels, kernel {wc_in}, groups {g}");
    }
    if p.stride == 0 || p.dilation == 0 {
        candle_core::bail!("conv_transpose1d: stride and dilation must be positive");
    }
    let c_in_g = c_in / g;
    let s = p.stride;
    // Dilated kernel length: taps sit every `dilation` samples.
    let kd = p.dilation * (k - 1) + 1;
    let full_len = (l - 1) * s + kd;
    let out_len = (full_len + p.output_padding)
        .checked_sub(2 * p.padding)
        .ok_or_else(|| candle_core::Error::Msg("conv_transpose1d: padding too large".into()))?;

    let mut outs = Vec::with_capacity(g);
    for gi in 0..g {
        let xg = if g == 1 { x.clone() } else { x.narrow(1, gi * c_in_g, c_in_g)? };
        let wg = if g == 1 { w.clone() } else { w.narrow(0, gi * c_in_g, c_in_g)? };
        // [B, L, C_in_g] x [C_in_g, C_out_g*K] -> [B, L, C_out_g, K]
        let xt = xg.transpose(1, 2)?.contiguous()?;
        let wm = wg.reshape((c_in_g, c_out_g * k))?;
        let z = xt.broadcast_matmul(&wm)?.reshape((b, l, c_out_g, k))?;
        // Spread the K taps onto the dilated grid: tap k lands at offset k·dilation.
        let z = if p.dilation > 1 {
            let z = z.unsqueeze(4)?; // [B, L, C, K, 1]
            let z = z.pad_with_zeros(4, 0, p.dilation - 1)?; // [B, L, C, K, d]
            z.reshape((b, l, c_out_g, k * p.dilation))?.narrow(3, 0, kd)?
        } else {
            z
        };
        // Pad the tap axis to a multiple of the stride: kd = m·s.
        let m = kd.div_ceil(s);
        let z = if m * s > kd { z.pad_with_zeros(3, 0, m * s - kd)? } else { z };
        // Chunk c holds taps [c·s, (c+1)·s): it lands on frames shifted by c.
        let z = z.reshape((b, l, c_out_g, m, s))?;
        let mut acc: Option<Tensor> = None;
        for c in 0..m {
            let zc = z.narrow(3, c, 1)?.squeeze(3)?; // [B, L, C, s]
            let zc = zc.pad_with_zeros(1, c, m - 1 - c)?; // [B, L+m-1, C, s]
            acc = Some(match acc {
                None => zc,
                Some(a) => (a + zc)?,
            });
        }
        let acc = acc.expect("m >= 1");
        // [B, L+m-1, C, s] -> [B, C, (L+m-1)·s]
        let y = acc.permute((0, 2, 1, 3))?.reshape((b, c_out_g, (l + m - 1) * s))?;
        let y = y.narrow(2, 0, full_len.min((l + m - 1) * s))?;
        outs.push(y);
    }
    let y = if g == 1 { outs.pop().expect("one group") } else { Tensor::cat(&outs, 1)? };
    let y = if p.output_padding > 0 { y.pad_with_zeros(2, 0, p.output_padding)? } else { y };
    y.narrow(2, p.padding, out_len)
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

/// Calls `f` on a CPU tensor's values as f32, borrowed in place when they already are
/// contiguous f32 (a gradient of the model's size is not copied), converted otherwise.
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> anyhow::Result<R>) -> anyhow::Result<R> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<f32>()?[start..end]);
        }
    }
    let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    f(&values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let data: Vec<f32> =
            crate::rng::symmetric_uniforms(seed, shape.iter().product()).into_iter().map(|x| x as f32).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        diff / scale
    }

    /// Direct definition of PyTorch's conv_transpose1d, as loops.
    fn naive_conv_transpose1d(x: &Tensor, w: &Tensor, p: ConvTranspose1dParams) -> Tensor {
        let (b, c_in, l) = x.dims3().unwrap();
        let (_, c_out_g, k) = w.dims3().unwrap();
        let g = p.groups;
        let out_len = (l - 1) * p.stride + p.dilation * (k - 1) + p.output_padding + 1 - 2 * p.padding;
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let c_out = c_out_g * g;
        let mut y = vec![0f32; b * c_out * out_len];
        for bi in 0..b {
            for i in 0..c_in {
                let gi = i / (c_in / g);
                for j in 0..l {
                    for o in 0..c_out_g {
                        for kk in 0..k {
                            let pos = (j * p.stride + kk * p.dilation) as isize - p.padding as isize;
                            if pos >= 0 && (pos as usize) < out_len {
                                let oc = gi * c_out_g + o;
                                y[(bi * c_out + oc) * out_len + pos as usize] +=
                                    xv[(bi * c_in + i) * l + j] * wv[(i * c_out_g + o) * k + kk];
                            }
                        }
                    }
                }
            }
        }
        Tensor::from_vec(y, (b, c_out, out_len), &Device::Cpu).unwrap()
    }

    #[test]
    fn conv_transpose1d_matches_definition() {
        // Candle's own conv_transpose1d mixes up batch items (batch > 1), so the
        // reference is the definition itself.
        for &(s, pad, op, d, g) in &[
            (1, 0, 0, 1, 1),
            (2, 0, 0, 1, 1),
            (4, 2, 0, 1, 1),
            (3, 1, 1, 1, 1),
            (2, 0, 0, 2, 1),
            (5, 2, 1, 3, 1),
            (2, 1, 0, 1, 2),
        ] {
            let x = randn(&[2, 4, 6], 1);
            let w = randn(&[4, 6 / g, 5], 2);
            let ours = conv_transpose1d(
                &x,
                &w,
                ConvTranspose1dParams { stride: s, padding: pad, output_padding: op, dilation: d, groups: g },
            )
            .unwrap();
            let reference = naive_conv_transpose1d(
                &x,
                &w,
                ConvTranspose1dParams { stride: s, padding: pad, output_padding: op, dilation: d, groups: g },
            );
            assert_eq!(ours.dims(), reference.dims(), "shape for s={s} p={pad} op={op} d={d} g={g}");
            assert!(max_rel(&ours, &reference) < 1e-5, "values for s={s} p={pad} op={op} d={d} g={g}");
        }
    }

    #[test]
    fn conv_transpose1d_backward_matches_finite_differences() {
        use candle_core::Var;
        for &(s, pad, op, d, g) in &[(2, 0, 0, 1, 1), (3, 1, 1, 1, 1), (2, 1, 0, 2, 1), (2, 0, 1, 1, 2)] {
            let p = ConvTranspose1dParams { stride: s, padding: pad, output_padding: op, dilation: d, groups: g };
            let x = Var::from_tensor(&randn(&[1, 4, 5], 3).to_dtype(DType::F64).unwrap()).unwrap();
            let w = Var::from_tensor(&randn(&[4, 4 / g, 3], 4).to_dtype(DType::F64).unwrap()).unwrap();
            // A weighted sum makes every output position matter differently.
            let y0 = conv_transpose1d(&x, &w, p).unwrap();
            let weights = randn(y0.dims(), 5).to_dtype(DType::F64).unwrap();
            let f = |x: &Tensor, w: &Tensor| -> f64 {
                (conv_transpose1d(x, w, p).unwrap() * &weights).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let loss = (y0 * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            for (var, other, is_x) in [(&x, &w, true), (&w, &x, false)] {
                let grad: Vec<f64> = grads.get(var).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
                let eps = 1e-6;
                for idx in 0..base.len() {
                    let mut plus = base.clone();
                    plus[idx] += eps;
                    let mut minus = base.clone();
                    minus[idx] -= eps;
                    let tp = Tensor::from_vec(plus, var.dims(), &Device::Cpu).unwrap();
                    let tm = Tensor::from_vec(minus, var.dims(), &Device::Cpu).unwrap();
                    let (fp, fm) = if is_x {
                        (f(&tp, other.as_tensor()), f(&tm, other.as_tensor()))
                    } else {
                        (f(other.as_tensor(), &tp), f(other.as_tensor(), &tm))
                    };
                    let fd = (fp - fm) / (2.0 * eps);
                    assert!(
                        (fd - grad[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                        "s={s} p={pad} op={op} d={d} g={g} {} [{idx}]: fd {fd} vs autograd {}",
                        if is_x { "x" } else { "w" },
                        grad[idx]
                    );
                }
            }
        }
    }

    #[test]
    fn reflect_pad_mirrors_without_edge() {
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 1, 4), &Device::Cpu).unwrap();
        let y: Vec<f32> = reflect_pad_last(&x, 2, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![3., 2., 1., 2., 3., 4., 3., 2., 1.]);
    }

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
