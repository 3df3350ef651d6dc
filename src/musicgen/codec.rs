//! EnCodec, the audio codec under MusicGen: residual-vector-quantiser lookup and the
//! SEANet decoder, differentiable with respect to its stored tensors (weight-norm `g`
//! and `v`, biases, LSTM weights).
//!
//! Tensor names follow transformers' `EncodecModel` (`decoder.layers.{i}.conv.weight_g`,
//! `quantizer.layers.{q}.codebook.embed`); the loader maps audiocraft's names onto them.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use super::config::{CodecConfig, PadMode};
use super::lstm::lstm_layer;
use super::ops::{conv_transpose1d, embedding, reflect_pad_last, ConvTranspose1dParams};
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k_eff = (self.kernel - 1) * self.dilation + 1;
        let padding_total = k_eff - self.stride;
        let len = x.dim(D::Minus1)?;
        // Extra right padding so that the last window is complete.
        let n_frames = (len as f64 - k_eff as f64 + padding_total as f64) / self.stride as f64 + 1.0;
        let ideal = (n_frames.ceil() as usize - 1) * self.stride + (k_eff - padding_total);
        let extra = ideal.saturating_sub(len);
        let (left, right) = if self.causal {
            (padding_total, extra)
        } else {
            let r = padding_total / 2;
            (padding_total - r, r + extra)
        };
        let x = pad1d(x, left, right, self.pad_mode)?;
        let w = self.weight.get()?;
        let y = x.conv1d(&w, 0, self.stride, self.dilation, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1))?)?,
            None => y,
        })
    }
}

/// Pads the time axis, reproducing EnCodec's handling of reflect padding on inputs
/// shorter than the pad (zero-extend first, reflect, then drop the extension).
fn pad1d(x: &Tensor, left: usize, right: usize, mode: PadMode) -> Result<Tensor> {
    match mode {
        PadMode::Constant => Ok(x.pad_with_zeros(D::Minus1, left, right)?),
        PadMode::Reflect => {
            let len = x.dim(D::Minus1)?;
            let max_pad = left.max(right);
            let extra = if len <= max_pad { max_pad - len + 1 } else { 0 };
            let x = if extra > 0 { x.pad_with_zeros(D::Minus1, 0, extra)? } else { x.clone() };
            let padded = reflect_pad_last(&x, left, right)?;
            let keep = padded.dim(D::Minus1)? - extra;
            Ok(padded.narrow(D::Minus1, 0, keep)?)
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.get()?;
        let y = conv_transpose1d(x, &w, ConvTranspose1dParams { stride: self.stride, ..Default::default() })?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1))?)?,
            None => y,
        };
        let padding_total = self.kernel - self.stride;
        let right = if self.causal {
            (padding_total as f64 * self.trim_right_ratio).ceil() as usize
        } else {
            padding_total / 2
        };
        let left = padding_total - right;
        let len = y.dim(D::Minus1)?;
        Ok(y.narrow(D::Minus1, left, len - left - right)?)
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
        let h = self.conv1.forward(&x.elu(1.0)?)?;
        let h = self.conv2.forward(&h.elu(1.0)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
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
            SeanetLayer::Elu => h.elu(1.0)?,
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

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs layer `i` alone (for layer-wise recomputation of the gradient).
    pub fn layer(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        run_layers(&self.layers[i..=i], h)
    }
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
