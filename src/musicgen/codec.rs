//! EnCodec, the audio codec under MusicGen: residual-vector-quantiser lookup and the
//! SEANet decoder, differentiable with respect to its stored tensors (weight-norm `g`
//! and `v`, biases, LSTM weights).
//!
//! Tensor names follow transformers' `EncodecModel` (`decoder.layers.{i}.conv.weight_g`,
//! `quantizer.layers.{q}.codebook.embed`); the loader maps audiocraft's names onto them.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::config::{CodecConfig, PadMode};
use super::conv::{pad_source, Columns};
use super::lstm::{lstm_layer, lstm_layer_backward, lstm_layer_traced, Trace};
use super::matmul::matmul;
use super::ops::{accumulate, elu, elu_backward, elu_with_slope, embedding, is_untracked_f32};
use super::params::Vb;

/// A convolution weight, plain or weight-normalised (`W = g · v / ‖v‖`, the norm taken
/// over every dimension but the first, as `torch.nn.utils.weight_norm(dim=0)`).
enum ConvWeight {
    Plain(Tensor),
    Normed { g: Tensor, v: Tensor },
}

impl ConvWeight {
    fn new(vb: &Vb, shape: &[usize]) -> Result<Self> {
        if vb.contains("weight_g") {
            Ok(Self::Normed { g: vb.param("weight_g", &[shape[0], 1, 1])?, v: vb.param("weight_v", shape)? })
        } else {
            Ok(Self::Plain(vb.param("weight", shape)?))
        }
    }

    fn get(&self) -> Result<Tensor> {
        match self {
            Self::Plain(w) => Ok(w.clone()),
            Self::Normed { g, v } => {
                let norm = v.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?;
                Ok(v.broadcast_mul(&(g / norm)?)?)
            }
        }
    }

    /// The stored tensors' gradients from the weight's `dw`, named as stored. With
    /// `W = g·v/‖v‖` (per row `r`): `∂g_r = ⟨dW_r, v_r⟩/‖v_r‖` and
    /// `∂v_r = (g_r/‖v_r‖)·(dW_r − (⟨dW_r, v_r⟩/‖v_r‖²)·v_r)`.
    fn backward(&self, dw: Tensor, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        match self {
            Self::Plain(_) => out.push(("weight".into(), dw)),
            Self::Normed { g, v } => {
                let norm = v.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?;
                let dot = (&dw * v)?.sum_keepdim(2)?.sum_keepdim(1)?;
                let dg = (&dot / &norm)?;
                let along = (dot / norm.sqr()?)?;
                let dv = (dw - v.broadcast_mul(&along)?)?.broadcast_mul(&(g / norm)?)?;
                out.push(("weight_g".into(), dg));
                out.push(("weight_v".into(), dv));
            }
        }
        Ok(())
    }
}

/// `y` `[B, C, T]` plus a per-channel bias.
fn with_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1))?)?,
        None => y,
    })
}

/// What a convolution's backward pass gives: the input's gradient (when asked for) and
/// the stored tensors' gradients, named as stored (`weight_g`, `weight_v` or `weight`,
/// then `bias`).
struct ConvGradients {
    input: Option<Tensor>,
    params: Vec<(String, Tensor)>,
}

/// `EncodecConv1d`: a convolution with EnCodec's "same"-style padding.
struct Conv {
    weight: ConvWeight,
    bias: Option<Tensor>,
    kernel: usize,
    stride: usize,
    dilation: usize,
    causal: bool,
    pad_mode: PadMode,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &CodecConfig,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        vb: Vb,
    ) -> Result<Self> {
        Ok(Self {
            weight: ConvWeight::new(&vb, &[c_out, c_in, kernel])?,
            bias: vb.param_opt("bias", &[c_out])?,
            kernel,
            stride,
            dilation,
            causal: cfg.causal,
            pad_mode: cfg.pad_mode,
        })
    }

    /// Left and right padding of an input of `len` samples.
    fn padding(&self, len: usize) -> (usize, usize) {
        let k_eff = (self.kernel - 1) * self.dilation + 1;
        let padding_total = k_eff - self.stride;
        // Extra right padding so that the last window is complete.
        let n_frames = (len as f64 - k_eff as f64 + padding_total as f64) / self.stride as f64 + 1.0;
        let ideal = (n_frames.ceil() as usize - 1) * self.stride + (k_eff - padding_total);
        let extra = ideal.saturating_sub(len);
        if self.causal {
            (padding_total, extra)
        } else {
            let r = padding_total / 2;
            (padding_total - r, r + extra)
        }
    }

    /// The im2col pattern over an input of `len` samples, padding included.
    fn columns(&self, len: usize, device: &Device) -> Result<Columns> {
        if len == 0 {
            bail!("a convolution over zero samples");
        }
        let (left, right) = self.padding(len);
        let src = pad_source(len, left, right, self.pad_mode);
        let k_eff = (self.kernel - 1) * self.dilation + 1;
        let width = (src.len() - k_eff) / self.stride + 1;
        Ok(Columns::new(&src, len, self.kernel, width, self.stride, self.dilation, device)?)
    }

    /// `Y = W·Xcol + b` per batch row, the columns gathered part by part.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, c_in, len) = x.dims3()?;
        let cols = self.columns(len, x.device())?;
        let w = self.weight.get()?;
        let c_out = w.dim(0)?;
        let w = w.reshape((c_out, c_in * self.kernel))?;
        let parts = cols.parts(part_columns(c_in * self.kernel));
        let rows = (0..batch)
            .map(|b| {
                let xb = x.narrow(0, b, 1)?;
                let ys =
                    parts.iter().map(|(_, p)| w.matmul(&p.gather(&xb)?)).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ys, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        with_bias(Tensor::stack(&rows, 0)?, self.bias.as_ref())
    }

    /// The backward pass of [`forward`](Self::forward) at input `x` `[1, C_in, L]`, given
    /// the output's gradient `dy`: `∂W = dY·Xcolᵀ`, `∂X = col2im(Wᵀ·dY)` (the padding's
    /// share folded back onto the samples it mirrored), both summed part by part.
    fn backward(&self, x: &Tensor, dy: &Tensor, need_input: bool) -> Result<ConvGradients> {
        let (_, c_in, len) = x.dims3()?;
        let c_out = dy.dim(1)?;
        let cols = self.columns(len, x.device())?;
        let dy = dy.squeeze(0)?;
        let w = self.weight.get()?.reshape((c_out, c_in * self.kernel))?;
        let wt = w.t()?;
        let mut dw: Option<Tensor> = None;
        let mut input = need_input.then(|| ScatterSum::new(c_in, len, x.device()));
        for (range, part) in cols.parts(part_columns(c_in * self.kernel)) {
            let dy_part = dy.narrow(1, range.start, range.len())?;
            // ∂W's inner dimension is the part's steps (thousands): faer's product, 2–3×
            // gemm's speed on these shapes (see `matmul`).
            let g = matmul(&dy_part, &part.gather(x)?.t()?)?;
            accumulate(&mut dw, g)?;
            if let Some(input) = input.as_mut() {
                input.add(&part, &wt.matmul(&dy_part)?)?;
            }
        }
        let dw = dw.ok_or_else(|| anyhow::anyhow!("a convolution with no output steps"))?;
        let mut params = Vec::new();
        self.weight.backward(dw.reshape((c_out, c_in, self.kernel))?, &mut params)?;
        if self.bias.is_some() {
            params.push(("bias".into(), dy.sum(1)?));
        }
        Ok(ConvGradients { input: input.map(ScatterSum::finish).transpose()?, params })
    }
}

/// Columns per part of a convolution's gathered columns (`rows` = channels × taps):
/// about 8 MB of f32 columns, and never fewer than 256.
fn part_columns(rows: usize) -> usize {
    #[cfg(test)]
    if let Some(n) = tests::PART_COLUMNS.with(|c| c.get()) {
        return n;
    }
    ((2 << 20) / rows.max(1)).max(256)
}

/// The sum of a scatter's parts onto a signal `[1, C, len]`: one f32 buffer that the
/// parallel loop adds into when the parts are untracked f32 tensors, otherwise a sum of
/// Candle tensors (any dtype, through autograd).
struct ScatterSum {
    shape: (usize, usize, usize),
    device: Device,
    buffer: Option<Vec<f32>>,
    sum: Option<Tensor>,
}

impl ScatterSum {
    fn new(channels: usize, len: usize, device: &Device) -> Self {
        Self { shape: (1, channels, len), device: device.clone(), buffer: None, sum: None }
    }

    fn add(&mut self, part: &Columns, cols: &Tensor) -> Result<()> {
        if is_untracked_f32(cols) && self.sum.is_none() {
            let (_, c, len) = self.shape;
            let buffer = self.buffer.get_or_insert_with(|| vec![0f32; c * len]);
            if part.scatter_into(cols, buffer)? {
                return Ok(());
            }
        }
        if self.buffer.is_some() {
            bail!("the parts of one scatter came both as untracked f32 tensors and otherwise");
        }
        Ok(accumulate(&mut self.sum, part.scatter(cols)?)?)
    }

    fn finish(self) -> Result<Tensor> {
        match (self.buffer, self.sum) {
            (Some(b), None) => Ok(Tensor::from_vec(b, self.shape, &self.device)?),
            (None, Some(s)) => Ok(s),
            _ => bail!("a scatter with no parts"),
        }
    }
}

/// `EncodecConvTranspose1d`: upsampling, then trimming of the overlap.
struct ConvTr {
    weight: ConvWeight,
    bias: Option<Tensor>,
    kernel: usize,
    stride: usize,
    causal: bool,
    trim_right_ratio: f64,
}

impl ConvTr {
    fn new(cfg: &CodecConfig, c_in: usize, c_out: usize, kernel: usize, stride: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            weight: ConvWeight::new(&vb, &[c_in, c_out, kernel])?,
            bias: vb.param_opt("bias", &[c_out])?,
            kernel,
            stride,
            causal: cfg.causal,
            trim_right_ratio: cfg.trim_right_ratio,
        })
    }

    /// Samples trimmed off the left and right of the full transposed convolution.
    fn trim(&self) -> (usize, usize) {
        let padding_total = self.kernel - self.stride;
        let right = if self.causal {
            (padding_total as f64 * self.trim_right_ratio).ceil() as usize
        } else {
            padding_total / 2
        };
        (padding_total - right, right)
    }

    /// Where the taps land: input sample `j`'s tap `k` is output `j·stride + k − left`
    /// (outside the kept range: trimmed away).
    fn columns(&self, len: usize, device: &Device) -> Result<Columns> {
        if len == 0 {
            bail!("a transposed convolution over zero samples");
        }
        let (left, right) = self.trim();
        let full = (len - 1) * self.stride + self.kernel;
        let out_len = full
            .checked_sub(left + right)
            .ok_or_else(|| anyhow::anyhow!("transposed convolution: {len} inputs give no output"))?;
        let src = pad_source(out_len, left, right, PadMode::Constant);
        Ok(Columns::new(&src, out_len, self.kernel, len, self.stride, 1, device)?)
    }

    /// `Y = col2im(Wᵀ·X) + b` per batch row (the overlap-add of every tap), part by part
    /// of the input's steps.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, c_in, len) = x.dims3()?;
        let cols = self.columns(len, x.device())?;
        let w = self.weight.get()?;
        let c_out = w.dim(1)?;
        let out_len = cols.signal_len();
        let w = w.reshape((c_in, c_out * self.kernel))?.t()?;
        let parts = cols.parts(part_columns(c_out * self.kernel));
        let rows = (0..batch)
            .map(|b| {
                let xb = x.get(b)?;
                let mut y = ScatterSum::new(c_out, out_len, x.device());
                for (range, part) in &parts {
                    y.add(part, &w.matmul(&xb.narrow(1, range.start, range.len())?.contiguous()?)?)?;
                }
                Ok(y.finish()?.squeeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        with_bias(Tensor::stack(&rows, 0)?, self.bias.as_ref())
    }

    /// The backward pass of [`forward`](Self::forward) at input `x` `[1, C_in, L]`: input
    /// sample `j` reached outputs `j·stride + k` through tap `k`, so the gradient gathers
    /// those (trimmed ones are zero) into columns `dYcol` `[C_out·K, L]`, and
    /// `∂W = X·dYcolᵀ`, `∂X = W·dYcol`, part by part of the input's steps.
    fn backward(&self, x: &Tensor, dy: &Tensor, need_input: bool) -> Result<ConvGradients> {
        let (_, c_in, len) = x.dims3()?;
        let c_out = dy.dim(1)?;
        let cols = self.columns(len, x.device())?;
        let x = x.squeeze(0)?;
        let w = self.weight.get()?.reshape((c_in, c_out * self.kernel))?;
        let mut dw: Option<Tensor> = None;
        let mut dx = Vec::new();
        for (range, part) in cols.parts(part_columns(c_out * self.kernel)) {
            let d_cols = part.gather(dy)?;
            let g = matmul(&x.narrow(1, range.start, range.len())?, &d_cols.t()?)?;
            accumulate(&mut dw, g)?;
            if need_input {
                dx.push(w.matmul(&d_cols)?);
            }
        }
        let dw = dw.ok_or_else(|| anyhow::anyhow!("a transposed convolution over no steps"))?;
        let input = if need_input { Some(Tensor::cat(&dx, 1)?.unsqueeze(0)?) } else { None };
        let mut params = Vec::new();
        self.weight.backward(dw.reshape((c_in, c_out, self.kernel))?, &mut params)?;
        if self.bias.is_some() {
            params.push(("bias".into(), dy.squeeze(0)?.sum(1)?));
        }
        Ok(ConvGradients { input, params })
    }
}

/// `EncodecLSTM`: stacked LSTM over time with a skip connection.
struct Lstm {
    layers: Vec<[Tensor; 4]>,
}

impl Lstm {
    fn new(dim: usize, num_layers: usize, vb: Vb) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|n| {
                Ok([
                    vb.param(&format!("weight_ih_l{n}"), &[4 * dim, dim])?,
                    vb.param(&format!("weight_hh_l{n}"), &[4 * dim, dim])?,
                    vb.param(&format!("bias_ih_l{n}"), &[4 * dim])?,
                    vb.param(&format!("bias_hh_l{n}"), &[4 * dim])?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xt = x.permute((2, 0, 1))?.contiguous()?; // [T, B, C]
        let mut h = xt.clone();
        for [w_ih, w_hh, b_ih, b_hh] in &self.layers {
            h = lstm_layer(&h, w_ih, w_hh, Some(b_ih), Some(b_hh))?;
        }
        Ok((h + xt)?.permute((1, 2, 0))?.contiguous()?)
    }

    /// [`forward`](Self::forward), keeping each layer's input and trace.
    fn forward_saved(&self, x: &Tensor) -> Result<(Tensor, Vec<(Tensor, Trace)>)> {
        let xt = x.permute((2, 0, 1))?.contiguous()?;
        let mut h = xt.clone();
        let mut kept = Vec::with_capacity(self.layers.len());
        for [w_ih, w_hh, b_ih, b_hh] in &self.layers {
            let trace = lstm_layer_traced(&h, w_ih, w_hh, Some(b_ih), Some(b_hh))?;
            let out = trace.h.clone();
            kept.push((h, trace));
            h = out;
        }
        Ok(((h + xt)?.permute((1, 2, 0))?.contiguous()?, kept))
    }

    fn backward(&self, kept: Vec<(Tensor, Trace)>, dy: &Tensor) -> Result<ConvGradients> {
        let skip = dy.permute((2, 0, 1))?.contiguous()?; // [T, B, C]
        let mut dh = skip.clone();
        let mut params = Vec::new();
        for (n, ((input, trace), [w_ih, w_hh, _, _])) in kept.iter().zip(&self.layers).enumerate().rev() {
            let g = lstm_layer_backward(input, w_ih, w_hh, trace, &dh)?;
            dh = g.input;
            // Pushed in reverse; put back in stored order below.
            params.push((format!("bias_hh_l{n}"), g.bias.clone()));
            params.push((format!("bias_ih_l{n}"), g.bias));
            params.push((format!("weight_hh_l{n}"), g.w_hh));
            params.push((format!("weight_ih_l{n}"), g.w_ih));
        }
        params.reverse();
        let input = (dh + skip)?.permute((1, 2, 0))?.contiguous()?;
        Ok(ConvGradients { input: Some(input), params })
    }
}

/// `EncodecResnetBlock`.
struct ResBlock {
    conv1: Conv,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResBlock {
    fn new(cfg: &CodecConfig, dim: usize, dilation: usize, vb: Vb) -> Result<Self> {
        let hidden = dim / cfg.compress;
        let block = vb.pp("block");
        Ok(Self {
            conv1: Conv::new(cfg, dim, hidden, cfg.residual_kernel_size, 1, dilation, block.pp(1).pp("conv"))?,
            conv2: Conv::new(cfg, hidden, dim, 1, 1, 1, block.pp(3).pp("conv"))?,
            shortcut: if cfg.conv_shortcut {
                Some(Conv::new(cfg, dim, dim, 1, 1, 1, vb.pp("shortcut").pp("conv"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_saved(x)?.0)
    }

    /// The output and the first convolution's output (what the backward pass needs
    /// besides `x`).
    fn forward_saved(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h1 = self.conv1.forward(&elu(x)?)?;
        let h = self.conv2.forward(&elu(&h1)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok(((skip + h)?, h1))
    }

    /// The ELUs are evaluated again, each with its slope in the same pass (kept from the
    /// forward pass they would double the tape at the full sample rate).
    fn backward(&self, x: &Tensor, h1: &Tensor, dy: &Tensor, need_input: bool) -> Result<ConvGradients> {
        let (elu_h1, slope_h1) = elu_with_slope(h1)?;
        let g2 = self.conv2.backward(&elu_h1, dy, true)?;
        drop(elu_h1);
        let d_h1 = (missing_input(g2.input)? * slope_h1)?;
        let (elu_x, slope_x) = elu_with_slope(x)?;
        let g1 = self.conv1.backward(&elu_x, &d_h1, need_input)?;
        drop(elu_x);
        let mut params = prefixed("block.1.conv", g1.params);
        params.extend(prefixed("block.3.conv", g2.params));
        let mut input = g1.input.map(|d| d * slope_x).transpose()?;
        match &self.shortcut {
            Some(c) => {
                let gs = c.backward(x, dy, need_input)?;
                params.extend(prefixed("shortcut.conv", gs.params));
                input = match (input, gs.input) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    _ => None,
                };
            }
            None => input = input.map(|d| d + dy).transpose()?,
        }
        Ok(ConvGradients { input, params })
    }
}

fn missing_input(g: Option<Tensor>) -> Result<Tensor> {
    g.ok_or_else(|| anyhow::anyhow!("a convolution's input gradient was not computed"))
}

/// Prefixes gradient names with a sub-module's path.
fn prefixed(prefix: &str, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    params.into_iter().map(|(n, g)| (format!("{prefix}.{n}"), g)).collect()
}

/// `g` with its parameters' names under `prefix`.
fn named(prefix: &str, g: ConvGradients) -> ConvGradients {
    ConvGradients { input: g.input, params: prefixed(prefix, g.params) }
}

/// One entry of a SEANet module list (encoder or decoder).
enum SeanetLayer {
    Conv(Conv),
    Lstm(Lstm),
    Elu,
    ConvTr(ConvTr),
    Res(ResBlock),
}

fn run_layers(layers: &[SeanetLayer], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for layer in layers {
        h = match layer {
            SeanetLayer::Conv(c) => c.forward(&h)?,
            SeanetLayer::Lstm(l) => l.forward(&h)?,
            SeanetLayer::Elu => elu(&h)?,
            SeanetLayer::ConvTr(c) => c.forward(&h)?,
            SeanetLayer::Res(r) => r.forward(&h)?,
        };
    }
    Ok(h)
}

/// The SEANet decoder: latent `[B, D, T]` to waveform `[B, C, T·hop]`.
pub struct CodecDecoder {
    layers: Vec<SeanetLayer>,
}

impl CodecDecoder {
    /// `vb` points at `decoder`; layer indices mirror EnCodec's module list, so that
    /// names line up with both transformers' and audiocraft's checkpoints.
    pub fn new(cfg: &CodecConfig, vb: Vb) -> Result<Self> {
        let vb = vb.pp("layers");
        let mut layers = Vec::new();
        let mut mult = 1usize << cfg.ratios.len();
        let push = |layer: SeanetLayer, layers: &mut Vec<SeanetLayer>| layers.push(layer);
        let first = Conv::new(cfg, cfg.dimension, mult * cfg.n_filters, cfg.kernel_size, 1, 1, vb.pp(0).pp("conv"))?;
        push(SeanetLayer::Conv(first), &mut layers);
        if cfg.lstm_layers > 0 {
            let idx = layers.len();
            push(
                SeanetLayer::Lstm(Lstm::new(mult * cfg.n_filters, cfg.lstm_layers, vb.pp(idx).pp("lstm"))?),
                &mut layers,
            );
        }
        for &ratio in &cfg.ratios {
            let dim = mult * cfg.n_filters;
            push(SeanetLayer::Elu, &mut layers);
            let idx = layers.len();
            let tr = ConvTr::new(cfg, dim, dim / 2, ratio * 2, ratio, vb.pp(idx).pp("conv"))?;
            push(SeanetLayer::ConvTr(tr), &mut layers);
            for j in 0..cfg.n_residual_layers {
                let idx = layers.len();
                let dilation = cfg.dilation_base.pow(j as u32);
                push(SeanetLayer::Res(ResBlock::new(cfg, dim / 2, dilation, vb.pp(idx))?), &mut layers);
            }
            mult /= 2;
        }
        push(SeanetLayer::Elu, &mut layers);
        let idx = layers.len();
        let last = Conv::new(cfg, cfg.n_filters, cfg.channels, cfg.last_kernel_size, 1, 1, vb.pp(idx).pp("conv"))?;
        push(SeanetLayer::Conv(last), &mut layers);
        Ok(Self { layers })
    }

    pub fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        run_layers(&self.layers, latent)
    }

    /// [`forward`](Self::forward) on one latent `[1, D, T]`, keeping what
    /// [`backward`](Self::backward) needs: every layer's input, each residual block's
    /// inner activation and the LSTM's traces (together a few times the output's size).
    pub fn forward_saved(&self, latent: &Tensor) -> Result<(Tensor, DecoderTape)> {
        if latent.dim(0)? != 1 {
            bail!("the decoder's backward pass takes one latent at a time, given {}", latent.dim(0)?);
        }
        let mut tape = DecoderTape { inputs: Vec::with_capacity(self.layers.len()), kept: Vec::new() };
        let mut h = latent.clone();
        for layer in &self.layers {
            let (out, kept) = match layer {
                SeanetLayer::Res(r) => {
                    let (out, h1) = r.forward_saved(&h)?;
                    (out, Kept::Res(h1))
                }
                SeanetLayer::Lstm(l) => {
                    let (out, traces) = l.forward_saved(&h)?;
                    (out, Kept::Lstm(traces))
                }
                other => (run_layers(std::slice::from_ref(other), &h)?, Kept::Nothing),
            };
            tape.inputs.push(std::mem::replace(&mut h, out));
            tape.kept.push(kept);
        }
        Ok((h, tape))
    }

    /// The backward pass by hand, top layer first, from the gradient of the output
    /// `d_out`: hands each stored tensor's gradient to `sink`, named as stored below
    /// `decoder.` (`layers.{i}.conv.weight_g`, …). Each layer's saved tensors are freed
    /// as soon as it is done.
    pub fn backward(
        &self,
        mut tape: DecoderTape,
        d_out: &Tensor,
        sink: &mut dyn FnMut(String, Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut upstream = d_out.clone();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let (Some(x), Some(kept)) = (tape.inputs.pop(), tape.kept.pop()) else {
                bail!("the decoder's tape holds fewer layers than the decoder");
            };
            let need_input = i > 0;
            let g = match (layer, kept) {
                (SeanetLayer::Conv(c), _) => named("conv", c.backward(&x, &upstream, need_input)?),
                (SeanetLayer::ConvTr(c), _) => named("conv", c.backward(&x, &upstream, need_input)?),
                (SeanetLayer::Elu, _) => {
                    ConvGradients { input: Some(elu_backward(&x, &upstream)?), params: Vec::new() }
                }
                (SeanetLayer::Res(r), Kept::Res(h1)) => r.backward(&x, &h1, &upstream, need_input)?,
                (SeanetLayer::Lstm(l), Kept::Lstm(traces)) => named("lstm", l.backward(traces, &upstream)?),
                _ => bail!("decoder layer {i}: the tape does not match the layer"),
            };
            for (name, grad) in g.params {
                sink(format!("layers.{i}.{name}"), grad)?;
            }
            if need_input {
                upstream = missing_input(g.input)?;
            }
        }
        Ok(())
    }
}

/// What [`CodecDecoder::forward_saved`] keeps for the backward pass.
pub struct DecoderTape {
    inputs: Vec<Tensor>,
    kept: Vec<Kept>,
}

impl DecoderTape {
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let kept = |k: &Kept| match k {
            Kept::Nothing => 0,
            Kept::Res(h1) => size(h1),
            Kept::Lstm(v) => v.iter().map(|(x, tr)| size(x) + tr.bytes()).sum(),
        };
        self.inputs.iter().map(size).sum::<usize>() + self.kept.iter().map(kept).sum::<usize>()
    }
}

/// A layer's activations beyond its input, kept for its backward pass.
enum Kept {
    Nothing,
    /// A residual block's first convolution's output.
    Res(Tensor),
    /// Each LSTM layer's input and trace.
    Lstm(Vec<(Tensor, Trace)>),
}

/// Codebooks of the residual vector quantiser (buffers, not parameters).
pub struct Quantizer {
    codebooks: Vec<Tensor>,
}

impl Quantizer {
    pub fn new(cfg: &CodecConfig, vb: Vb) -> Result<Self> {
        if cfg.codebook_dim != cfg.dimension {
            bail!("codebook width {} differs from the latent width {}; not supported", cfg.codebook_dim, cfg.dimension);
        }
        let codebooks = (0..cfg.n_q)
            .map(|q| vb.pp("layers").pp(q).pp("codebook").buffer("embed", &[cfg.card, cfg.codebook_dim]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { codebooks })
    }

    /// Codes `[n_q, T]` -> latent `[1, D, T]` (sum of the codebook vectors).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let n_q = codes.dim(0)?;
        if n_q > self.codebooks.len() {
            bail!("{n_q} codebooks given, the codec has {}", self.codebooks.len());
        }
        let mut acc = embedding(&self.codebooks[0], &codes.get(0)?)?;
        for q in 1..n_q {
            acc = (acc + embedding(&self.codebooks[q], &codes.get(q)?)?)?;
        }
        Ok(acc.t()?.unsqueeze(0)?)
    }

    pub fn codebooks(&self) -> &[Tensor] {
        &self.codebooks
    }
}

/// The codec as MusicGen uses it: codes in, audio out.
pub struct Codec {
    pub cfg: CodecConfig,
    pub quantizer: Quantizer,
    pub decoder: CodecDecoder,
}

impl Codec {
    /// `vb` points at the codec root (`quantizer.*`, `decoder.*`).
    pub fn new(cfg: &CodecConfig, vb: Vb) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            quantizer: Quantizer::new(cfg, vb.pp("quantizer"))?,
            decoder: CodecDecoder::new(cfg, vb.pp("decoder"))?,
        })
    }

    /// Decodes the LM's codes `[K, T]` into audio `[channels, samples]`. With two
    /// channels the LM's codebooks are interleaved [1L, 1R, 2L, 2R, ...]: even rows are
    /// the left channel, odd rows the right, each decoded by the mono codec.
    pub fn decode(&self, codes: &Tensor, audio_channels: usize) -> Result<Tensor> {
        let chans = self
            .latents(codes, audio_channels)?
            .iter()
            .map(|z| Ok(self.decoder.forward(z)?.squeeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&chans, 0)?)
    }

    /// The decoder input of each output channel, `[1, D, T]`: the codebook vectors of the
    /// channel's codes (rows `c, c + channels, ...` of interleaved stereo codes).
    pub fn latents(&self, codes: &Tensor, audio_channels: usize) -> Result<Vec<Tensor>> {
        let k = codes.dim(0)?;
        if audio_channels == 1 {
            return Ok(vec![self.quantizer.decode(codes)?]);
        }
        let per = k / audio_channels;
        (0..audio_channels)
            .map(|c| {
                let idx: Vec<u32> = (0..per).map(|q| (q * audio_channels + c) as u32).collect();
                let idx = Tensor::from_vec(idx, per, codes.device())?;
                self.quantizer.decode(&codes.index_select(&idx, 0)?)
            })
            .collect()
    }
}

/// The SEANet encoder: waveform `[B, C, L]` to latent `[B, D, T]` (used to encode
/// training audio; not part of any gradient).
pub struct CodecEncoder {
    layers: Vec<SeanetLayer>,
}

impl CodecEncoder {
    /// `vb` points at `encoder`; indices mirror EnCodec's module list.
    pub fn new(cfg: &CodecConfig, vb: Vb) -> Result<Self> {
        let vb = vb.pp("layers");
        let mut layers = Vec::new();
        layers.push(SeanetLayer::Conv(Conv::new(
            cfg,
            cfg.channels,
            cfg.n_filters,
            cfg.kernel_size,
            1,
            1,
            vb.pp(0).pp("conv"),
        )?));
        let mut mult = 1usize;
        for &ratio in cfg.ratios.iter().rev() {
            let dim = mult * cfg.n_filters;
            for j in 0..cfg.n_residual_layers {
                let idx = layers.len();
                let dilation = cfg.dilation_base.pow(j as u32);
                layers.push(SeanetLayer::Res(ResBlock::new(cfg, dim, dilation, vb.pp(idx))?));
            }
            layers.push(SeanetLayer::Elu);
            let idx = layers.len();
            layers.push(SeanetLayer::Conv(Conv::new(cfg, dim, dim * 2, ratio * 2, ratio, 1, vb.pp(idx).pp("conv"))?));
            mult *= 2;
        }
        let dim = mult * cfg.n_filters;
        if cfg.lstm_layers > 0 {
            let idx = layers.len();
            layers.push(SeanetLayer::Lstm(Lstm::new(dim, cfg.lstm_layers, vb.pp(idx).pp("lstm"))?));
        }
        layers.push(SeanetLayer::Elu);
        let idx = layers.len();
        layers.push(SeanetLayer::Conv(Conv::new(
            cfg,
            dim,
            cfg.dimension,
            cfg.last_kernel_size,
            1,
            1,
            vb.pp(idx).pp("conv"),
        )?));
        Ok(Self { layers })
    }

    pub fn forward(&self, wav: &Tensor) -> Result<Tensor> {
        run_layers(&self.layers, wav)
    }
}

impl Quantizer {
    /// Latent `[1, D, T]` -> codes `[n_q, T]`: residual vector quantisation, each stage
    /// picking the nearest codebook entry of what the previous stages left.
    pub fn encode(&self, latent: &Tensor) -> Result<Tensor> {
        let mut residual = latent.squeeze(0)?.t()?.contiguous()?; // [T, D]
        let mut codes = Vec::with_capacity(self.codebooks.len());
        for cb in &self.codebooks {
            // ‖r − e‖² = ‖r‖² − 2 r·e + ‖e‖²; the ‖r‖² term does not change the argmin.
            let dots = residual.matmul(&cb.t()?)?; // [T, card]
            let norms = cb.sqr()?.sum_keepdim(1)?.t()?; // [1, card]
            let dist = norms.broadcast_sub(&(dots * 2.0)?)?;
            let idx = dist.argmin_keepdim(1)?.squeeze(1)?; // [T]
            residual = (residual - embedding(cb, &idx)?)?;
            codes.push(idx);
        }
        Ok(Tensor::stack(&codes, 0)?)
    }
}

impl Codec {
    /// Encodes audio `[channels, samples]` at the codec's rate into the LM's codes
    /// `[K, T]` (stereo: each channel separately, codebooks interleaved L, R).
    pub fn encode(&self, encoder: &CodecEncoder, audio: &Tensor, audio_channels: usize) -> Result<Tensor> {
        let (c, _) = audio.dims2()?;
        if c != audio_channels {
            bail!("{c} channel(s) given, the model expects {audio_channels}");
        }
        let per_channel = (0..c)
            .map(|ch| self.quantizer.encode(&encoder.forward(&audio.narrow(0, ch, 1)?.unsqueeze(0)?)?))
            .collect::<Result<Vec<_>>>()?;
        if c == 1 {
            return Ok(per_channel.into_iter().next().expect("one channel"));
        }
        // [n_q, T] per channel -> [n_q·c, T] with rows q·c + ch.
        let stacked = Tensor::stack(&per_channel, 1)?; // [n_q, c, T]
        let (q, c, t) = stacked.dims3()?;
        Ok(stacked.reshape((q * c, t))?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::{DType, Device};

    use super::*;
    use crate::musicgen::params::ParamStore;

    /// A small SEANet: reflect padding, two LSTM layers, two dilated residual blocks per
    /// stage, weight norm and biases everywhere.
    fn reflect_cfg() -> CodecConfig {
        CodecConfig {
            sample_rate: 800,
            channels: 1,
            dimension: 6,
            // Residual blocks' 1×1 convolutions need two inputs per row: with one, the
            // weight-normed kernel is g·sign(v) and ∂v is exactly zero.
            n_filters: 4,
            ratios: vec![4, 2],
            kernel_size: 7,
            last_kernel_size: 5,
            residual_kernel_size: 3,
            dilation_base: 2,
            n_residual_layers: 2,
            lstm_layers: 2,
            compress: 2,
            conv_shortcut: false,
            pad_mode: PadMode::Reflect,
            causal: false,
            trim_right_ratio: 1.0,
            n_q: 2,
            card: 8,
            codebook_dim: 6,
        }
    }

    /// The other branches: zero padding, causal trimming split by the ratio, an odd
    /// stride, 1×1 shortcut convolutions, no LSTM, two output channels.
    fn causal_cfg() -> CodecConfig {
        CodecConfig {
            channels: 2,
            ratios: vec![3, 2],
            n_residual_layers: 1,
            lstm_layers: 0,
            conv_shortcut: true,
            pad_mode: PadMode::Constant,
            causal: true,
            trim_right_ratio: 0.5,
            ..reflect_cfg()
        }
    }

    fn uniform(seed: u64, shape: &[usize], scale: f64) -> Tensor {
        let data: Vec<f64> =
            crate::rng::symmetric_uniforms(seed, shape.iter().product()).iter().map(|x| x * scale).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Every codec tensor drawn at random (seeded by its name), in f64.
    fn random_tensors(cfg: &CodecConfig) -> HashMap<String, Tensor> {
        let init: crate::musicgen::params::Initializer = Arc::new(|name: &str, shape: &[usize]| {
            let seed = name.bytes().fold(17u64, |h, b| crate::rng::hash(h, &[b as u64]));
            Ok(uniform(seed, shape, 0.7))
        });
        let store = ParamStore::initializing(init, "test codec", &Device::Cpu).with_dtype(DType::F64);
        CodecDecoder::new(cfg, store.vb(true).pp("decoder")).unwrap();
        store.claimed()
    }

    /// Turns some weight-normed convolutions into plain ones and drops some biases, so
    /// both stored forms are differentiated.
    fn mix_forms(tensors: &mut HashMap<String, Tensor>) {
        let prefixes: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".weight_g").map(str::to_string))
            .filter(|p| p.bytes().map(|b| b as usize).sum::<usize>() % 2 == 0)
            .collect();
        assert!(!prefixes.is_empty());
        for p in prefixes {
            let g = tensors.remove(&format!("{p}.weight_g")).unwrap();
            let v = tensors.remove(&format!("{p}.weight_v")).unwrap();
            let w = ConvWeight::Normed { g, v }.get().unwrap();
            tensors.insert(format!("{p}.weight"), w);
            tensors.remove(&format!("{p}.bias"));
        }
    }

    fn decoder(cfg: &CodecConfig, tensors: &HashMap<String, Tensor>, dtype: DType) -> (CodecDecoder, ParamStore) {
        let store = ParamStore::new(tensors.clone(), "test codec", &Device::Cpu).with_dtype(dtype);
        (CodecDecoder::new(cfg, store.vb(false).pp("decoder")).unwrap(), store)
    }

    /// ∇⟨decoder(z), r⟩ through `forward_saved` and `backward`, by name (`decoder.…`).
    fn by_hand(dec: &CodecDecoder, z: &Tensor, r: &Tensor) -> HashMap<String, Tensor> {
        let (out, tape) = dec.forward_saved(z).unwrap();
        assert_eq!(out.dims(), r.dims());
        assert!(tape.bytes() > 0);
        let mut grads = HashMap::new();
        dec.backward(tape, r, &mut |name, g| {
            assert!(grads.insert(format!("decoder.{name}"), g).is_none(), "a gradient given twice");
            Ok(())
        })
        .unwrap();
        grads
    }

    /// A random latent of `frames` frames and random weights `r` for `⟨decoder(z), r⟩`.
    fn latent_and_weights(cfg: &CodecConfig, frames: usize, seed: u64) -> (Tensor, Tensor) {
        let hop: usize = cfg.ratios.iter().product();
        (uniform(seed, &[1, cfg.dimension, frames], 1.0), uniform(seed + 1, &[1, cfg.channels, frames * hop], 1.0))
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Candle's autograd through the same forward pass, against the backward by hand.
    fn check_against_autograd(cfg: &CodecConfig, tensors: &HashMap<String, Tensor>, frames: usize) {
        let (dec, store) = decoder(cfg, tensors, DType::F64);
        let (z, r) = latent_and_weights(cfg, frames, 3);
        let out = dec.forward(&z).unwrap();
        let want = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let detached = CodecDecoder::new(cfg, store.vb(true).pp("decoder")).unwrap();
        let got = by_hand(&detached, &z, &r);
        let params = store.params();
        assert_eq!(got.len(), params.len(), "one gradient per stored tensor");
        for (name, var) in params {
            let e = want.get(var.as_tensor()).unwrap_or_else(|| panic!("autograd: no gradient for {name}"));
            let a = &got[&name];
            assert_eq!(a.dims(), e.dims(), "{name}");
            let scale = max_abs(e);
            // One step of the LSTM sees h₋₁ = 0: ∇W_hh is rightly zero there.
            if frames > 1 || !name.contains("weight_hh") {
                assert!(scale > 1e-8, "{name}: the reference gradient vanishes, nothing is checked");
            }
            let err = max_abs(&(a - e).unwrap());
            assert!(err <= 1e-10 * scale, "{name}: by hand differs from autograd by {err:e} (scale {scale:e})");
        }
    }

    #[test]
    fn decoder_backward_matches_autograd() {
        let cfg = reflect_cfg();
        check_against_autograd(&cfg, &random_tensors(&cfg), 5);
        // One frame: shorter than the first convolution's padding (EnCodec's zero extension).
        check_against_autograd(&cfg, &random_tensors(&cfg), 1);
        let mut mixed = random_tensors(&cfg);
        mix_forms(&mut mixed);
        check_against_autograd(&cfg, &mixed, 3);
        let cfg = causal_cfg();
        let mut mixed = random_tensors(&cfg);
        mix_forms(&mut mixed);
        check_against_autograd(&cfg, &mixed, 4);
        check_against_autograd(&cfg, &random_tensors(&cfg), 2);
    }

    #[test]
    fn decoder_backward_matches_finite_differences() {
        for cfg in [reflect_cfg(), causal_cfg()] {
            let tensors = random_tensors(&cfg);
            let frames = 3;
            let (z, r) = latent_and_weights(&cfg, frames, 5);
            let f = |t: &HashMap<String, Tensor>| -> f64 {
                let (dec, _) = decoder(&cfg, t, DType::F64);
                (dec.forward(&z).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let (dec, _) = decoder(&cfg, &tensors, DType::F64);
            let grads = by_hand(&dec, &z, &r);
            let mut names: Vec<&String> = grads.keys().collect();
            names.sort();
            for name in names {
                let base: Vec<f64> = tensors[name].flatten_all().unwrap().to_vec1().unwrap();
                let g: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
                for idx in [0, base.len() / 2, base.len() - 1] {
                    let eps = 1e-6;
                    let at = |d: f64| {
                        let mut v = base.clone();
                        v[idx] += d;
                        let mut t = tensors.clone();
                        t.insert(name.clone(), Tensor::from_vec(v, tensors[name].dims(), &Device::Cpu).unwrap());
                        f(&t)
                    };
                    let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                    assert!((fd - g[idx]).abs() <= 1e-6 * (1.0 + fd.abs()), "{name}[{idx}]: fd {fd} vs {}", g[idx]);
                }
            }
        }
    }

    #[test]
    fn transposed_convolution_matches_its_definition() {
        // y[b, o, j·s + k − left] += Σ_i x[b, i, j]·W[i, o, k], trimmed, plus the bias;
        // a batch of two, both trims, an odd stride.
        // The trims, as audiocraft's SEANet decoder sets them: non-causal, half of
        // kernel − stride on each side; causal, ⌈ratio·(kernel − stride)⌉ on the right.
        for (causal, ratio, stride, left, right) in [(false, 1.0, 4, 2, 2), (true, 0.5, 3, 1, 2), (true, 1.0, 2, 0, 2)]
        {
            let cfg = CodecConfig { causal, trim_right_ratio: ratio, ..reflect_cfg() };
            let (c_in, c_out, kernel, len) = (3, 2, 2 * stride, 5);
            let w = uniform(21, &[c_in, c_out, kernel], 1.0);
            let bias = uniform(22, &[c_out], 1.0);
            let store = ParamStore::new(
                HashMap::from([("weight".to_string(), w.clone()), ("bias".to_string(), bias.clone())]),
                "test",
                &Device::Cpu,
            )
            .with_dtype(DType::F64);
            let tr = ConvTr::new(&cfg, c_in, c_out, kernel, stride, store.vb(true)).unwrap();
            let x = uniform(23, &[2, c_in, len], 1.0);
            let y: Vec<Vec<Vec<f64>>> = tr.forward(&x).unwrap().to_vec3().unwrap();
            let xs: Vec<Vec<Vec<f64>>> = x.to_vec3().unwrap();
            let ws: Vec<Vec<Vec<f64>>> = w.to_vec3().unwrap();
            let bs: Vec<f64> = bias.to_vec1().unwrap();
            let full = (len - 1) * stride + kernel;
            assert_eq!(y[0][0].len(), full - left - right);
            for b in 0..2 {
                let mut want = vec![vec![0f64; full]; c_out];
                for i in 0..c_in {
                    for (o, row) in want.iter_mut().enumerate() {
                        for j in 0..len {
                            for k in 0..kernel {
                                row[j * stride + k] += xs[b][i][j] * ws[i][o][k];
                            }
                        }
                    }
                }
                for o in 0..c_out {
                    for (t, &got) in y[b][o].iter().enumerate() {
                        let e = want[o][t + left] + bs[o];
                        assert!((got - e).abs() < 1e-12, "causal {causal}, b {b}, o {o}, t {t}: {got} vs {e}");
                    }
                }
            }
        }
    }

    thread_local! {
        /// Overrides [`part_columns`] on this thread.
        pub(super) static PART_COLUMNS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    #[test]
    fn convolutions_by_parts_give_what_the_whole_gives() {
        // Columns gathered and scattered a few at a time (down to one) against all at
        // once: output and every gradient, in f64 (Candle's ops, summed as tensors) and
        // f32 (the parallel loops, one buffer).
        for cfg in [reflect_cfg(), causal_cfg()] {
            let tensors = random_tensors(&cfg);
            let (z, r) = latent_and_weights(&cfg, 6, 9);
            let run = |dtype: DType, parts: Option<usize>| {
                PART_COLUMNS.with(|c| c.set(parts));
                let store = ParamStore::new(tensors.clone(), "test codec", &Device::Cpu).with_dtype(dtype);
                let dec = CodecDecoder::new(&cfg, store.vb(true).pp("decoder")).unwrap();
                let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let y = dec.forward(&cast(&z)).unwrap().to_dtype(DType::F64).unwrap();
                let g = by_hand(&dec, &cast(&z), &cast(&r));
                PART_COLUMNS.with(|c| c.set(None));
                (y, g)
            };
            // Candle's autograd through the parts (tensors cut, scattered and summed)
            // against the backward by hand, also by parts.
            PART_COLUMNS.with(|c| c.set(Some(3)));
            check_against_autograd(&cfg, &tensors, 6);
            PART_COLUMNS.with(|c| c.set(None));
            let (y_whole, g_whole) = run(DType::F64, None);
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
                for parts in [1, 3, 7] {
                    let (y, g) = run(dtype, Some(parts));
                    let err = max_abs(&(y - &y_whole).unwrap());
                    assert!(err <= tol * max_abs(&y_whole), "{dtype:?}, {parts} columns a part: output off by {err:e}");
                    for (name, e) in &g_whole {
                        let err = max_abs(&(g[name].to_dtype(DType::F64).unwrap() - e).unwrap());
                        assert!(err <= tol * max_abs(e), "{dtype:?}, {parts} columns a part: {name} off by {err:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn single_precision_kernels_match_double() {
        // f32 takes the parallel gather / scatter / ELU loops, f64 Candle's generic ops.
        for cfg in [reflect_cfg(), causal_cfg()] {
            let tensors = random_tensors(&cfg);
            let frames = 6;
            let (z, r) = latent_and_weights(&cfg, frames, 7);
            let detached = |dtype| {
                let store = ParamStore::new(tensors.clone(), "test codec", &Device::Cpu).with_dtype(dtype);
                CodecDecoder::new(&cfg, store.vb(true).pp("decoder")).unwrap()
            };
            let (d64, d32) = (detached(DType::F64), detached(DType::F32));
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let y64 = d64.forward(&z).unwrap();
            let y32 = d32.forward(&f32s(&z)).unwrap();
            assert_eq!(y32.dtype(), DType::F32);
            let err = max_abs(&(y32.to_dtype(DType::F64).unwrap() - &y64).unwrap());
            assert!(err <= 1e-5 * max_abs(&y64), "forward: f32 differs from f64 by {err:e}");
            let g64 = by_hand(&d64, &z, &r);
            let g32 = by_hand(&d32, &f32s(&z), &f32s(&r));
            for (name, e) in &g64 {
                let a = g32[name].to_dtype(DType::F64).unwrap();
                let err = max_abs(&(a - e).unwrap());
                assert!(err <= 1e-4 * max_abs(e), "{name}: f32 differs from f64 by {err:e}");
            }
        }
    }
}
