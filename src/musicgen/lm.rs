//! The MusicGen language model: a pre-norm transformer decoder over the sum of the K
//! codebook embeddings, with sinusoidal positions, causal self-attention, cross-attention
//! to the projected T5 states, and one linear head per codebook.
//!
//! Tensor names follow audiocraft's LM state dict (`best_state`), which is the
//! parameter set of the gradient embedding; the loader maps the transformers layout
//! onto it (q/k/v are concatenated into `in_proj_weight`).

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use candle_nn::kv_cache::KvCache;

use super::attention::attention;
use super::config::LmConfig;
use super::matmul::matmul;
use super::ops::{
    embedding, gelu_erf, gelu_erf_with_slope, layer_norm, layer_norm_backward_f32, linear, sinusoidal_positions,
};
use super::params::Vb;

/// Layer norm weights.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(dim: usize, eps: f64, vb: Vb) -> Result<Self> {
        Ok(Self { weight: vb.param("weight", &[dim])?, bias: vb.param("bias", &[dim])?, eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, &self.weight, Some(&self.bias), self.eps)?)
    }

    /// The same output as `forward` (the same operations), with what the backward
    /// needs: the normalised input x̂ and 1/σ per row.
    fn forward_saved(&self, x: &Tensor) -> Result<(Tensor, NormSaved)> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let std = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        let x_hat = centered.broadcast_div(&std)?;
        let y = x_hat.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?;
        Ok((y, NormSaved { x_hat, inv_std: std.recip()? }))
    }

    /// `(dx, dweight, dbias)` of `y = x̂·w + b`, x̂ = (x − μ)/σ:
    /// `dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂)) / σ` with `dx̂ = dy·w`.
    fn backward(&self, saved: &NormSaved, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let NormSaved { x_hat, inv_std } = saved;
        if let Some(fused) = layer_norm_backward_f32(x_hat, inv_std, &self.weight, dy)? {
            return Ok(fused);
        }
        let (dy_rows, x_hat_rows) = (rows(dy)?, rows(x_hat)?);
        let d_weight = (&dy_rows * &x_hat_rows)?.sum(0)?;
        let d_bias = dy_rows.sum(0)?;
        let dx_hat = dy.broadcast_mul(&self.weight)?;
        let mean = dx_hat.mean_keepdim(D::Minus1)?;
        let mean_x = (&dx_hat * x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = (dx_hat.broadcast_sub(&mean)? - x_hat.broadcast_mul(&mean_x)?)?.broadcast_mul(inv_std)?;
        Ok((dx, d_weight, d_bias))
    }
}

/// What a layer norm's backward needs from its forward.
struct NormSaved {
    x_hat: Tensor,
    inv_std: Tensor,
}

/// `[..., n]` -> `[rows, n]`.
fn rows(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    Ok(x.reshape((x.elem_count() / n.max(1), n))?)
}

/// Backward of `y = x·Wᵀ` (`linear` without bias): `(dx, dW)` with `dx = dy·W`,
/// `dW = dyᵀ·x` summed over every row.
fn linear_backward(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dy_rows = rows(dy)?;
    let dw = matmul(&dy_rows.t()?, &rows(x)?)?;
    let dx = matmul(&dy_rows, w)?.reshape(x.shape())?;
    Ok((dx, dw))
}

/// Multi-head attention with a packed `in_proj_weight` ([q; k; v], no biases).
struct Attention {
    in_proj: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LmConfig, vb: Vb) -> Result<Self> {
        let d = cfg.dim;
        let in_proj = vb.param("in_proj_weight", &[3 * d, d])?;
        Ok(Self {
            in_proj: in_proj.clone(),
            q: in_proj.narrow(0, 0, d)?,
            k: in_proj.narrow(0, d, d)?,
            v: in_proj.narrow(0, 2 * d, d)?,
            out: vb.param("out_proj.weight", &[d, d])?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `[B, S, D]` -> `[B, H, S, hd]`.
    fn split(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        Ok(linear(x, w, None)?.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
    }

    /// `[B, S, D]` -> q, k and v, each `[B, H, S, hd]`, from one product with the packed
    /// `in_proj_weight` (one wide product runs faster than three narrow ones), as views
    /// of its output (the attention reads them in place).
    fn split_packed(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let qkv = linear(x, &self.in_proj, None)?.reshape((b, s, 3, self.heads, self.head_dim))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?) };
        Ok((part(0)?, part(1)?, part(2)?))
    }

    /// Attention of `q` over `k`, `v` (causal: the queries are the last positions of the
    /// keys), heads merged, output projection applied.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        Ok(linear(&self.mix(q, k, v, causal)?, &self.out, None)?)
    }

    /// The attention-weighted values, heads joined again: `[B, S, H·hd]`, before the
    /// output projection.
    fn mix(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, _, s, _) = q.dims4()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        Ok(attention(q, k, v, scale, causal)?.transpose(1, 2)?.reshape((b, s, self.heads * self.head_dim))?)
    }

    /// `[B, S, H·hd]` -> `[B, H, S, hd]`: the head split of a projection's output,
    /// used on gradients.
    fn heads_of(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        Ok(x.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
    }

    /// `[B, H, S, hd]` -> `[B, S, H·hd]`, heads joined (the inverse of `heads_of`).
    fn join_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, s, _) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b, s, self.heads * self.head_dim))?)
    }

    /// Gradients of `mix(q, k, v, causal)` against `d_mixed` (`[B, S, H·hd]`), each
    /// with its heads joined: `[B, S, H·hd]` (q) and `[B, Skv, H·hd]` (k, v).
    fn mix_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        causal: bool,
        d_mixed: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (dq, dk, dv) = super::attention::backward(q, k, v, scale, causal, &self.heads_of(d_mixed)?)?;
        Ok((self.join_heads(&dq)?, self.join_heads(&dk)?, self.join_heads(&dv)?))
    }

    fn self_attention(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let Some(cache) = cache else {
            let (q, k, v) = self.split_packed(x)?;
            return self.attend(&q, &k, &v, true);
        };
        // Decoding: a few rows at a time (`gemv`'s products), keys and values copied
        // into the cache.
        let q = self.split(x, &self.q)?;
        let (k, v) = cache.append(&self.split(x, &self.k)?, &self.split(x, &self.v)?)?;
        self.attend(&q, &k, &v, true)
    }

    /// Keys and values of the conditioning memory.
    fn memory(&self, mem: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.split(mem, &self.k)?, self.split(mem, &self.v)?))
    }
}

struct Layer {
    norm1: Norm,
    self_attn: Attention,
    norm_cross: Norm,
    cross_attn: Attention,
    norm2: Norm,
    linear1: Tensor,
    linear2: Tensor,
}

impl Layer {
    fn new(cfg: &LmConfig, vb: Vb) -> Result<Self> {
        // Declaration order here is the documented parameter order of a layer.
        Ok(Self {
            norm1: Norm::new(cfg.dim, cfg.norm_eps, vb.pp("norm1"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            norm_cross: Norm::new(cfg.dim, cfg.norm_eps, vb.pp("norm_cross"))?,
            cross_attn: Attention::new(cfg, vb.pp("cross_attention"))?,
            norm2: Norm::new(cfg.dim, cfg.norm_eps, vb.pp("norm2"))?,
            linear1: vb.param("linear1.weight", &[cfg.ffn_dim, cfg.dim])?,
            linear2: vb.param("linear2.weight", &[cfg.dim, cfg.ffn_dim])?,
        })
    }

    fn forward(&self, x: &Tensor, memory: &LayerMemory, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = (x + self.self_attn.self_attention(&self.norm1.forward(x)?, cache)?)?;
        let h = match memory.n_cond {
            0 => h,
            n => {
                // Rows past `n_cond` carry the null condition: MusicGen's null condition is an
                // all-zero memory, whose keys and values (no biases) are zero, so their
                // cross-attention output is exactly zero — skip the work.
                let b = h.dim(0)?;
                let normed = self.norm_cross.forward(&h.narrow(0, 0, n)?)?;
                let q = self.cross_attn.split(&normed, &self.cross_attn.q)?;
                let c = match memory.parts.as_slice() {
                    [(k, v)] => self.cross_attn.attend(&q, k, v, false)?,
                    parts => {
                        // Rows of several prompts (batched generation): each group of rows
                        // attends to its own text, then one output projection for all, so
                        // each row's numbers are those it gets when generated alone.
                        let mut mixed = Vec::with_capacity(parts.len());
                        let mut row = 0;
                        for (k, v) in parts {
                            let rows = k.dim(0)?;
                            mixed.push(self.cross_attn.mix(&q.narrow(0, row, rows)?, k, v, false)?);
                            row += rows;
                        }
                        linear(&Tensor::cat(&mixed, 0)?, &self.cross_attn.out, None)?
                    }
                };
                let c = if b > n { c.pad_with_zeros(0, 0, b - n)? } else { c };
                (h + c)?
            }
        };
        let ff = linear(&gelu_erf(&linear(&self.norm2.forward(&h)?, &self.linear1, None)?)?, &self.linear2, None)?;
        Ok((h + ff)?)
    }
    /// The gradients of `⟨forward(x), d_out⟩` by hand: the forward is run again keeping
    /// its intermediates, then each step's gradient formula is applied top-down. `states`
    /// (`[1, L, D]`, broadcast over the first `n_cond` rows) is the memory the
    /// cross-attention keys and values are computed from.
    ///
    /// Why not Candle's autograd: it gives every node of the graph a zero-filled gradient
    /// buffer and adds into it, so each weight's gradient costs an extra zeroing and an
    /// extra pass over its size; and the packed `in_proj_weight`, read through three
    /// narrowed views, gets three zero-padded full-size gradients summed. Here each
    /// weight's gradient is one matmul, written once.
    fn backward(&self, x: &Tensor, states: &Tensor, n_cond: usize, d_out: &Tensor) -> Result<LayerGradients> {
        let (_, saved) = self.forward_saved(x, states, n_cond, false)?;
        self.backward_saved(saved, d_out)
    }

    /// The forward pass keeping what the backward needs: the same operations as
    /// `forward`, so the output (given `with_output`) is the same, bit for bit.
    fn forward_saved(
        &self,
        x: &Tensor,
        states: &Tensor,
        n_cond: usize,
        with_output: bool,
    ) -> Result<(Option<Tensor>, LayerSaved)> {
        let b = x.dim(0)?;
        let sa = &self.self_attn;
        let (a, a_saved) = self.norm1.forward_saved(x)?;
        let (q, k, v) = sa.split_packed(&a)?;
        let m1 = sa.mix(&q, &k, &v, true)?;
        let h1 = (x + linear(&m1, &sa.out, None)?)?;
        let ca = &self.cross_attn;
        let cross = match n_cond {
            0 => None,
            n => {
                let memory = if n > 1 {
                    states.broadcast_as((n, states.dim(1)?, states.dim(2)?))?.contiguous()?
                } else {
                    states.clone()
                };
                let (hn, hn_saved) = self.norm_cross.forward_saved(&h1.narrow(0, 0, n)?)?;
                let qc = ca.split(&hn, &ca.q)?;
                let (kc, vc) = ca.memory(&memory)?;
                let m2 = ca.mix(&qc, &kc, &vc, false)?;
                Some(CrossSaved { memory, hn, hn_saved, qc, kc, vc, m2 })
            }
        };
        let h2 = match &cross {
            None => h1,
            Some(cr) => {
                let c = linear(&cr.m2, &ca.out, None)?;
                let c = if b > n_cond { c.pad_with_zeros(0, 0, b - n_cond)? } else { c };
                (h1 + c)?
            }
        };
        let (f, f_saved) = self.norm2.forward_saved(&h2)?;
        let (g, gelu_slope) = gelu_erf_with_slope(&linear(&f, &self.linear1, None)?)?;
        let out = if with_output { Some((&h2 + linear(&g, &self.linear2, None)?)?) } else { None };
        let saved = LayerSaved { rows: b, n_cond, a, a_saved, q, k, v, m1, cross, f, f_saved, gelu_slope, g };
        Ok((out, saved))
    }

    /// The backward pass from what `forward_saved` kept (see `backward`).
    fn backward_saved(&self, saved: LayerSaved, d_out: &Tensor) -> Result<LayerGradients> {
        let LayerSaved { rows: b, n_cond, a, a_saved, q, k, v, m1, cross, f, f_saved, gelu_slope, g } = saved;
        let (sa, ca) = (&self.self_attn, &self.cross_attn);
        // Feed-forward.
        let (dg, d_linear2) = linear_backward(&g, &self.linear2, d_out)?;
        let du = (dg * gelu_slope)?;
        let (df, d_linear1) = linear_backward(&f, &self.linear1, &du)?;
        let (dh, d_norm2_w, d_norm2_b) = self.norm2.backward(&f_saved, &df)?;
        let d_h2 = (d_out + dh)?;
        // Cross-attention (rows past `n_cond` have none).
        let d = d_out.dim(2)?;
        let (d_h1, d_states, cross_grads) = match cross {
            None => {
                let zeros = |shape: &[usize]| Tensor::zeros(shape, d_out.dtype(), d_out.device());
                let grads = [zeros(&[d])?, zeros(&[d])?, zeros(&[3 * d, d])?, zeros(&[d, d])?];
                (d_h2, None, grads)
            }
            Some(CrossSaved { memory, hn, hn_saved, qc, kc, vc, m2 }) => {
                let dc = d_h2.narrow(0, 0, n_cond)?;
                let (dm2, d_out_c) = linear_backward(&m2, &ca.out, &dc)?;
                let (dqc, dkc, dvc) = ca.mix_backward((&qc, &kc, &vc), false, &dm2)?;
                let (dhn, d_qc) = linear_backward(&hn, &ca.q, &dqc)?;
                let (dm_k, d_kc) = linear_backward(&memory, &ca.k, &dkc)?;
                let (dm_v, d_vc) = linear_backward(&memory, &ca.v, &dvc)?;
                let d_states = (dm_k + dm_v)?.sum_keepdim(0)?;
                let (dh1n, d_nc_w, d_nc_b) = self.norm_cross.backward(&hn_saved, &dhn)?;
                let d_h1 = if b > n_cond {
                    Tensor::cat(&[(dc + dh1n)?, d_h2.narrow(0, n_cond, b - n_cond)?], 0)?
                } else {
                    (d_h2 + dh1n)?
                };
                (d_h1, Some(d_states), [d_nc_w, d_nc_b, Tensor::cat(&[d_qc, d_kc, d_vc], 0)?, d_out_c])
            }
        };
        // Self-attention.
        let (dm1, d_out_s) = linear_backward(&m1, &sa.out, &d_h1)?;
        let (dq, dk, dv) = sa.mix_backward((&q, &k, &v), true, &dm1)?;
        // One product each for the packed weight's gradient and the input's.
        let (da, d_in) = linear_backward(&a, &sa.in_proj, &Tensor::cat(&[dq, dk, dv], 2)?)?;
        let (dx, d_norm1_w, d_norm1_b) = self.norm1.backward(&a_saved, &da)?;
        let [d_nc_w, d_nc_b, d_in_c, d_out_c] = cross_grads;
        let params = vec![
            ("norm1.weight", d_norm1_w),
            ("norm1.bias", d_norm1_b),
            ("self_attn.in_proj_weight", d_in),
            ("self_attn.out_proj.weight", d_out_s),
            ("norm_cross.weight", d_nc_w),
            ("norm_cross.bias", d_nc_b),
            ("cross_attention.in_proj_weight", d_in_c),
            ("cross_attention.out_proj.weight", d_out_c),
            ("norm2.weight", d_norm2_w),
            ("norm2.bias", d_norm2_b),
            ("linear1.weight", d_linear1),
            ("linear2.weight", d_linear2),
        ];
        Ok(LayerGradients { input: (d_h1 + dx)?, states: d_states, params })
    }
}

/// A layer's intermediates, kept by its forward pass for its backward pass.
pub struct LayerSaved {
    rows: usize,
    n_cond: usize,
    a: Tensor,
    a_saved: NormSaved,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    m1: Tensor,
    cross: Option<CrossSaved>,
    f: Tensor,
    f_saved: NormSaved,
    /// Φ(u) + u·φ(u) at the feed-forward's pre-activation u: GELU's slope.
    gelu_slope: Tensor,
    g: Tensor,
}

struct CrossSaved {
    memory: Tensor,
    hn: Tensor,
    hn_saved: NormSaved,
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    m2: Tensor,
}

impl LayerSaved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let norm = |n: &NormSaved| size(&n.x_hat) + size(&n.inv_std);
        let mut total = [&self.a, &self.q, &self.k, &self.v, &self.m1, &self.f, &self.gelu_slope, &self.g]
            .map(size)
            .iter()
            .sum::<usize>()
            + norm(&self.a_saved)
            + norm(&self.f_saved);
        if let Some(c) = &self.cross {
            total += [&c.memory, &c.hn, &c.qc, &c.kc, &c.vc, &c.m2].map(size).iter().sum::<usize>() + norm(&c.hn_saved);
        }
        total
    }
}

/// What `Lm::layer_backward` gives.
pub struct LayerGradients {
    /// Gradient of the layer's input.
    pub input: Tensor,
    /// Gradient of the conditioning states (`None` when no row is conditioned).
    pub states: Option<Tensor>,
    /// Each parameter's gradient, named within the layer (`norm1.weight`, …), in the
    /// layer's parameter order.
    pub params: Vec<(&'static str, Tensor)>,
}

/// Per-layer keys and values of the conditioning memory.
struct LayerMemory {
    /// Keys and values of the text states: one pair for all conditioned rows, or one
    /// per group of rows with its own prompt (their batch sizes sum to `n_cond`).
    parts: Vec<(Tensor, Tensor)>,
    n_cond: usize,
}

/// Conditioning prepared for a batch: the first `n_cond` rows attend to `states`,
/// the others get the null condition.
pub struct Conditioning {
    layers: Vec<LayerMemory>,
}

/// Key/value cache for incremental decoding. Each layer's keys and values live in
/// buffers sized for the whole window, written in place step by step, rather than the
/// whole history being copied into a fresh tensor at every step.
pub struct LmCache {
    layers: Vec<KvCache>,
    pub len: usize,
}

/// The language model.
pub struct Lm {
    cfg: LmConfig,
    cond_proj: Option<(Tensor, Tensor)>,
    emb: Vec<Tensor>,
    layers: Vec<Layer>,
    out_norm: Norm,
    heads: Vec<Tensor>,
    device: Device,
}

impl Lm {
    pub fn new(cfg: &LmConfig, vb: Vb) -> Result<Self> {
        let cond_proj = if cfg.cond_proj {
            let p = vb.pp("condition_provider.conditioners.description.output_proj");
            Some((p.param("weight", &[cfg.dim, cfg.cond_dim])?, p.param("bias", &[cfg.dim])?))
        } else {
            None
        };
        let emb = (0..cfg.n_q)
            .map(|k| vb.pp("emb").pp(k).param("weight", &[cfg.card + 1, cfg.dim]))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::new(cfg, vb.pp("transformer.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let out_norm = Norm::new(cfg.dim, cfg.norm_eps, vb.pp("out_norm"))?;
        let heads = (0..cfg.n_q)
            .map(|k| vb.pp("linears").pp(k).param("weight", &[cfg.card, cfg.dim]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg: cfg.clone(), cond_proj, emb, layers, out_norm, heads, device: vb.device().clone() })
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Projects T5 states `[1, L, cond_dim]` to the LM width: the conditioning tensor
    /// audiocraft feeds to cross-attention.
    pub fn project_condition(&self, t5_states: &Tensor) -> Result<Tensor> {
        match &self.cond_proj {
            Some((w, b)) => Ok(linear(t5_states, w, Some(b))?),
            None => Ok(t5_states.clone()),
        }
    }

    /// Prepares cross-attention memory. `states`: `[1, L, dim]` projected conditioning
    /// (broadcast over the `n_cond` conditioned rows).
    pub fn conditioning(&self, states: &Tensor, n_cond: usize) -> Result<Conditioning> {
        let states = if n_cond > 1 {
            states.broadcast_as((n_cond, states.dim(1)?, states.dim(2)?))?.contiguous()?
        } else {
            states.clone()
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (k, v) = l.cross_attn.memory(&states)?;
                Ok(LayerMemory { parts: vec![(k, v)], n_cond })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Conditioning { layers })
    }

    /// A cache for up to `capacity` positions (it grows if more are fed).
    /// Conditioning of a batch of prompts: row `i < states.len()` attends to
    /// `states[i]` (`[1, L_i, D]`; the prompts' lengths may differ), the rest get the
    /// null condition.
    pub fn conditioning_each(&self, states: &[Tensor]) -> Result<Conditioning> {
        if let [one] = states {
            return self.conditioning(one, 1);
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let parts = states.iter().map(|s| l.cross_attn.memory(s)).collect::<Result<Vec<_>>>()?;
                Ok(LayerMemory { parts, n_cond: states.len() })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Conditioning { layers })
    }

    pub fn new_cache(&self, capacity: usize) -> LmCache {
        LmCache { layers: (0..self.layers.len()).map(|_| KvCache::new(2, capacity.max(1))).collect(), len: 0 }
    }

    /// Logits `[B, K, S, card]` for tokens `[B, K, S]` (u32, values ≤ card). With a
    /// cache, positions continue from the cache length and the cache is extended.
    pub fn forward(&self, tokens: &Tensor, cond: &Conditioning, mut cache: Option<&mut LmCache>) -> Result<Tensor> {
        let s = tokens.dim(2)?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let mut h = self.embed(tokens, offset)?;
        for i in 0..self.layers.len() {
            let c = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = self.layers[i].forward(&h, &cond.layers[i], c)?;
        }
        if let Some(c) = cache {
            c.len += s;
        }
        self.head(&h)
    }

    /// Summed codebook embeddings plus positions: `[B, K, S]` tokens -> `[B, S, D]`.
    pub fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, k, s) = tokens.dims3()?;
        let mut h = embedding(&self.emb[0], &tokens.narrow(1, 0, 1)?.squeeze(1)?)?;
        for (q, table) in self.emb.iter().enumerate().take(k).skip(1) {
            h = (h + embedding(table, &tokens.narrow(1, q, 1)?.squeeze(1)?)?)?;
        }
        if self.cfg.scale_embedding {
            h = (h * (self.cfg.dim as f64).sqrt())?;
        }
        let pos = sinusoidal_positions(offset, s, self.cfg.dim, self.cfg.max_period, h.dtype(), &self.device)?;
        Ok(h.broadcast_add(&pos)?)
    }

    /// Transformer layer `i` without a cache.
    pub fn layer(&self, i: usize, h: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        self.layers[i].forward(h, &cond.layers[i], None)
    }

    /// Gradients of `⟨layer(i, h, conditioning(states, n_cond)), d_out⟩` with respect to
    /// `h`, `states` and layer `i`'s parameters, computed by hand (no graph).
    pub fn layer_backward(
        &self,
        i: usize,
        h: &Tensor,
        states: &Tensor,
        n_cond: usize,
        d_out: &Tensor,
    ) -> Result<LayerGradients> {
        self.layers[i].backward(h, states, n_cond, d_out)
    }

    /// Layer `i`'s output (the same numbers as `layer`) and its intermediates, for
    /// `layer_backward_saved`.
    pub fn layer_forward_saved(
        &self,
        i: usize,
        h: &Tensor,
        states: &Tensor,
        n_cond: usize,
    ) -> Result<(Tensor, LayerSaved)> {
        let (out, saved) = self.layers[i].forward_saved(h, states, n_cond, true)?;
        Ok((out.ok_or_else(|| anyhow::anyhow!("layer {i}: no output"))?, saved))
    }

    /// `layer_backward` from intermediates kept by `layer_forward_saved(i, …)`.
    pub fn layer_backward_saved(&self, i: usize, saved: LayerSaved, d_out: &Tensor) -> Result<LayerGradients> {
        self.layers[i].backward_saved(saved, d_out)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Output norm and the per-codebook heads: `[B, S, D]` -> logits `[B, K, S, card]`.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.logits(&self.out_norm.forward(h)?)
    }

    fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        let logits = self.heads.iter().map(|w| linear(normed, w, None)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&logits, 1)?)
    }

    /// `head`'s logits (the same numbers) and what `head_backward` needs.
    pub fn head_forward_saved(&self, h: &Tensor) -> Result<(Tensor, HeadSaved)> {
        let (normed, norm) = self.out_norm.forward_saved(h)?;
        Ok((self.logits(&normed)?, HeadSaved { normed, norm }))
    }

    /// The gradients of `⟨head(h), d_logits⟩` by hand: `h`'s, and each head parameter's
    /// (`out_norm.weight`, `out_norm.bias`, `linears.{k}.weight`). Through Candle's
    /// autograd the head took 0.39 s of a 10 s guided gradient of musicgen-small, about
    /// twice its products' time.
    pub fn head_backward(&self, saved: HeadSaved, d_logits: &Tensor) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let HeadSaved { normed, norm } = saved;
        let mut d_normed = None;
        let mut params = Vec::with_capacity(self.heads.len() + 2);
        for (k, w) in self.heads.iter().enumerate() {
            let (dx, dw) = linear_backward(&normed, w, &d_logits.narrow(1, k, 1)?.squeeze(1)?.contiguous()?)?;
            super::ops::accumulate(&mut d_normed, dx)?;
            params.push((format!("linears.{k}.weight"), dw));
        }
        let d_normed = d_normed.ok_or_else(|| anyhow::anyhow!("the LM has no heads"))?;
        let (dh, d_weight, d_bias) = self.out_norm.backward(&norm, &d_normed)?;
        params.push(("out_norm.weight".into(), d_weight));
        params.push(("out_norm.bias".into(), d_bias));
        Ok((dh, params))
    }
}

/// What the head's backward needs from its forward: the normalised input and the norm's
/// own intermediates.
pub struct HeadSaved {
    normed: Tensor,
    norm: NormSaved,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::musicgen::tiny;
    use candle_core::{DType, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let data = crate::rng::symmetric_uniforms(seed, shape.iter().product());
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The hand-written layer backward against Candle's autograd of the same layer (in
    /// f64): the input, the conditioning states and every parameter, for one row, for
    /// classifier-free guidance's two rows, for two conditioned rows of three, and for
    /// no conditioned row (cross-attention gradients are then zero). The tolerance is
    /// Candle's: its GELU derivative uses 1/√(2π) ≈ 0.398942 (relative error 7e-7); the
    /// exact constant is checked by finite differences below.
    #[test]
    fn layer_backward_matches_autograd() {
        let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
        let model = tiny::random_model(tiny::config(vocab), 77, DType::F64, &Device::Cpu).unwrap();
        let tracked = Lm::new(&model.cfg.lm, model.lm_params.vb(false)).unwrap();
        let dim = model.cfg.lm.dim;
        for (case, &(b, n, s, l)) in [(1, 1, 5, 3), (2, 1, 7, 4), (3, 2, 4, 2), (2, 0, 3, 3)].iter().enumerate() {
            let seed = 10 * case as u64;
            let (x, states, d_out) =
                (randn(&[b, s, dim], seed), randn(&[1, l, dim], seed + 1), randn(&[b, s, dim], seed + 2));
            for i in 0..model.lm.num_layers() {
                let ours = model.lm.layer_backward(i, &x, &states, n, &d_out).unwrap();
                let (xv, sv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&states).unwrap());
                let cond = tracked.conditioning(sv.as_tensor(), n).unwrap();
                let out = tracked.layer(i, xv.as_tensor(), &cond).unwrap();
                let grads = (out * &d_out).unwrap().sum_all().unwrap().backward().unwrap();
                let close = |what: &str, a: &Tensor, e: &Tensor| {
                    let scale = max_abs(e);
                    let err = max_abs(&(a - e).unwrap());
                    assert!(
                        err <= 2e-6 * (1.0 + scale),
                        "case {case}, layer {i}, {what}: error {err:e} (scale {scale:e})"
                    );
                };
                close("input", &ours.input, grads.get(xv.as_tensor()).unwrap());
                match (&ours.states, grads.get(sv.as_tensor())) {
                    (Some(a), Some(e)) => close("states", a, e),
                    (None, _) => assert_eq!(n, 0, "case {case}: no states gradient"),
                    (Some(_), None) => panic!("case {case}: autograd has no states gradient"),
                }
                assert_eq!(ours.params.len(), 12);
                for (suffix, g) in &ours.params {
                    let var = model.lm_params.var(&format!("transformer.layers.{i}.{suffix}")).unwrap();
                    assert_eq!(g.dims(), var.dims(), "{suffix}");
                    match grads.get(var.as_tensor()) {
                        Some(e) => {
                            assert!(n == 0 || max_abs(e) > 1e-6, "case {case}: {suffix}'s gradient vanishes");
                            close(suffix, g, e)
                        }
                        None => {
                            assert!(n == 0 && suffix.contains("cross"), "case {case}: autograd lacks {suffix}");
                            assert_eq!(max_abs(g), 0.0, "{suffix}");
                        }
                    }
                }
            }
        }
    }

    /// The head's backward by hand against Candle's autograd of `head` (f64, guidance's
    /// two rows): the input and every head parameter.
    #[test]
    fn head_backward_matches_autograd() {
        let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
        let model = tiny::random_model(tiny::config(vocab), 79, DType::F64, &Device::Cpu).unwrap();
        let tracked = Lm::new(&model.cfg.lm, model.lm_params.vb(false)).unwrap();
        let (b, s, dim) = (2, 5, model.cfg.lm.dim);
        let x = randn(&[b, s, dim], 1);
        let d_logits = randn(&[b, model.cfg.lm.n_q, s, model.cfg.lm.card], 2);
        let (logits, saved) = model.lm.head_forward_saved(&x).unwrap();
        assert_eq!(max_abs(&(&logits - model.lm.head(&x).unwrap()).unwrap()), 0.0);
        let (dx, params) = model.lm.head_backward(saved, &d_logits).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let grads = (tracked.head(xv.as_tensor()).unwrap() * &d_logits).unwrap().sum_all().unwrap().backward().unwrap();
        let close = |what: &str, a: &Tensor, e: &Tensor| {
            let (scale, err) = (max_abs(e), max_abs(&(a - e).unwrap()));
            assert!(scale > 1e-6, "{what}: the reference vanishes");
            assert!(err <= 1e-12 * (1.0 + scale), "{what}: error {err:e} (scale {scale:e})");
        };
        close("input", &dx, grads.get(xv.as_tensor()).unwrap());
        assert_eq!(params.len(), model.cfg.lm.n_q + 2);
        for (name, g) in &params {
            close(name, g, grads.get(model.lm_params.var(name).unwrap().as_tensor()).unwrap());
        }
    }

    /// The input gradient against central finite differences of `⟨layer(x), d_out⟩` (f64,
    /// guidance's two rows, one conditioned), tight enough to tell the exact GELU
    /// derivative from a constant rounded to six digits.
    #[test]
    fn layer_backward_matches_finite_differences() {
        let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
        let model = tiny::random_model(tiny::config(vocab), 78, DType::F64, &Device::Cpu).unwrap();
        let (b, n, s, l, dim) = (2, 1, 6, 3, model.cfg.lm.dim);
        let (x, states, d_out) = (randn(&[b, s, dim], 1), randn(&[1, l, dim], 2), randn(&[b, s, dim], 3));
        let cond = model.lm.conditioning(&states, n).unwrap();
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let f = |at: usize, h: f64| -> f64 {
            let mut v = base.clone();
            v[at] += h;
            let x = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            let out = model.lm.layer(1, &x, &cond).unwrap();
            (out * &d_out).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let grad: Vec<f64> =
            model.lm.layer_backward(1, &x, &states, n, &d_out).unwrap().input.flatten_all().unwrap().to_vec1().unwrap();
        // Kept intermediates give the same numbers as running the layer again.
        let (out, saved) = model.lm.layer_forward_saved(1, &x, &states, n).unwrap();
        assert_eq!(max_abs(&(out - model.lm.layer(1, &x, &cond).unwrap()).unwrap()), 0.0);
        let from_saved = model.lm.layer_backward_saved(1, saved, &d_out).unwrap();
        let again: Vec<f64> = from_saved.input.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(again, grad);
        for at in (0..base.len()).step_by(base.len() / 23) {
            let h = 1e-4;
            let fd = (f(at, h) - f(at, -h)) / (2.0 * h);
            assert!((fd - grad[at]).abs() <= 1e-8 * (1.0 + fd.abs()), "x[{at}]: fd {fd} vs {}", grad[at]);
        }
    }
}
