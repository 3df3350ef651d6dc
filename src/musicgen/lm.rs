//! The MusicGen language model: a pre-norm transformer decoder over the sum of the K
//! codebook embeddings, with sinusoidal positions, causal self-attention, cross-attention
//! to the projected T5 states, and one linear head per codebook.
//!
//! Tensor names follow audiocraft's LM state dict (`best_state`), which is the
//! parameter set of the gradient embedding; the loader maps the transformers layout
//! onto it (q/k/v are concatenated into `in_proj_weight`).

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::kv_cache::KvCache;

use super::attention::attention;
use super::config::LmConfig;
use super::ops::{embedding, layer_norm, linear, sinusoidal_positions};
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
}

/// Multi-head attention with a packed `in_proj_weight` ([q; k; v], no biases).
struct Attention {
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

    fn self_attention(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let q = self.split(x, &self.q)?;
        let mut k = self.split(x, &self.k)?;
        let mut v = self.split(x, &self.v)?;
        if let Some(cache) = cache {
            (k, v) = cache.append(&k, &v)?;
        }
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
        let ff = linear(&linear(&self.norm2.forward(&h)?, &self.linear1, None)?.gelu_erf()?, &self.linear2, None)?;
        Ok((h + ff)?)
    }
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

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Output norm and the per-codebook heads: `[B, S, D]` -> logits `[B, K, S, card]`.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.out_norm.forward(h)?;
        let logits = self.heads.iter().map(|w| linear(&h, w, None)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&logits, 1)?)
    }
}
