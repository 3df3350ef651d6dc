//! The T5 text encoder that conditions MusicGen. Frozen: its weights are buffers, never
//! parameters, and it sits outside every gradient.

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use tokenizers::Tokenizer;

use super::config::{T5Config, T5FeedForward};
use super::ops::{embedding, linear, rms_norm, softmax_last};
use super::params::Vb;

struct T5Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    num_heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn new(cfg: &T5Config, vb: Vb) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: vb.buffer("q.weight", &[inner, cfg.d_model])?,
            k: vb.buffer("k.weight", &[inner, cfg.d_model])?,
            v: vb.buffer("v.weight", &[inner, cfg.d_model])?,
            o: vb.buffer("o.weight", &[cfg.d_model, inner])?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `x`: `[B, L, d_model]`, `bias`: `[1, H, L, L]` (relative positions + mask).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |w: &Tensor| -> Result<Tensor> {
            Ok(linear(x, w, None)?.reshape((b, l, self.num_heads, self.d_kv))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        // T5 does not scale the scores by 1/sqrt(d).
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let attn = softmax_last(&scores)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, l, self.num_heads * self.d_kv))?;
        Ok(linear(&out, &self.o, None)?)
    }
}

enum FeedForward {
    Relu { wi: Tensor, wo: Tensor },
    GatedGelu { wi_0: Tensor, wi_1: Tensor, wo: Tensor },
}

struct T5Block {
    attn: T5Attention,
    attn_norm: Tensor,
    ff: FeedForward,
    ff_norm: Tensor,
    eps: f64,
}

impl T5Block {
    fn new(cfg: &T5Config, vb: Vb) -> Result<Self> {
        let l0 = vb.pp("layer.0");
        let l1 = vb.pp("layer.1");
        let ffv = l1.pp("DenseReluDense");
        let ff = match cfg.feed_forward {
            T5FeedForward::Relu => FeedForward::Relu {
                wi: ffv.buffer("wi.weight", &[cfg.d_ff, cfg.d_model])?,
                wo: ffv.buffer("wo.weight", &[cfg.d_model, cfg.d_ff])?,
            },
            T5FeedForward::GatedGelu => FeedForward::GatedGelu {
                wi_0: ffv.buffer("wi_0.weight", &[cfg.d_ff, cfg.d_model])?,
                wi_1: ffv.buffer("wi_1.weight", &[cfg.d_ff, cfg.d_model])?,
                wo: ffv.buffer("wo.weight", &[cfg.d_model, cfg.d_ff])?,
            },
        };
        Ok(Self {
            attn: T5Attention::new(cfg, l0.pp("SelfAttention"))?,
            attn_norm: l0.buffer("layer_norm.weight", &[cfg.d_model])?,
            ff,
            ff_norm: l1.buffer("layer_norm.weight", &[cfg.d_model])?,
            eps: cfg.layer_norm_epsilon,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&rms_norm(x, &self.attn_norm, self.eps)?, bias)?)?;
        let n = rms_norm(&h, &self.ff_norm, self.eps)?;
        let ff = match &self.ff {
            FeedForward::Relu { wi, wo } => linear(&linear(&n, wi, None)?.relu()?, wo, None)?,
            FeedForward::GatedGelu { wi_0, wi_1, wo } => {
                let g = linear(&n, wi_0, None)?.gelu()?;
                linear(&(g * linear(&n, wi_1, None)?)?, wo, None)?
            }
        };
        Ok((h + ff)?)
    }
}

/// The T5 encoder stack (`T5EncoderModel`).
pub struct T5Encoder {
    cfg: T5Config,
    shared: Tensor,
    rel_bias: Tensor,
    blocks: Vec<T5Block>,
    final_norm: Tensor,
    device: Device,
}

impl T5Encoder {
    /// `vb` points at the T5 root (keys `shared.weight`, `encoder.block.{i}...`).
    pub fn new(cfg: &T5Config, vb: Vb) -> Result<Self> {
        let shared = if vb.contains("shared.weight") {
            vb.buffer("shared.weight", &[cfg.vocab_size, cfg.d_model])?
        } else {
            vb.buffer("encoder.embed_tokens.weight", &[cfg.vocab_size, cfg.d_model])?
        };
        let enc = vb.pp("encoder");
        let rel_bias = enc.buffer(
            "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[cfg.relative_attention_num_buckets, cfg.num_heads],
        )?;
        let blocks =
            (0..cfg.num_layers).map(|i| T5Block::new(cfg, enc.pp("block").pp(i))).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            shared,
            rel_bias,
            blocks,
            final_norm: enc.buffer("final_layer_norm.weight", &[cfg.d_model])?,
            device: vb.device().clone(),
        })
    }

    /// Bucket of a relative position (bidirectional), as in T5.
    fn bucket(&self, relative: i64) -> usize {
        let nb = self.cfg.relative_attention_num_buckets / 2;
        let mut bucket = if relative > 0 { nb } else { 0 };
        let rel = relative.unsigned_abs() as usize;
        let max_exact = nb / 2;
        if rel < max_exact {
            bucket += rel;
        } else {
            let max_distance = self.cfg.relative_attention_max_distance as f64;
            let large = max_exact as f64
                + ((rel as f64 / max_exact as f64).ln() / (max_distance / max_exact as f64).ln()
                    * (nb - max_exact) as f64);
            // PyTorch truncates the float towards zero with `.to(long)`.
            bucket += (large as usize).min(nb - 1);
        }
        bucket
    }

    fn position_bias(&self, len: usize) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(len * len);
        for q in 0..len {
            for k in 0..len {
                ids.push(self.bucket(k as i64 - q as i64) as u32);
            }
        }
        let ids = Tensor::from_vec(ids, (len, len), &self.device)?;
        // [L, L, H] -> [1, H, L, L]
        Ok(embedding(&self.rel_bias, &ids)?.permute((2, 0, 1))?.unsqueeze(0)?)
    }

    /// Last hidden state `[1, L, d_model]` for one token sequence.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let ids_t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &self.device)?;
        let mut h = embedding(&self.shared, &ids_t)?;
        let bias = self.position_bias(ids.len())?;
        for block in &self.blocks {
            h = block.forward(&h, &bias)?;
        }
        Ok(rms_norm(&h, &self.final_norm, self.cfg.layer_norm_epsilon)?)
    }
}

/// The T5 tokenizer (tokenizer.json, sentencepiece unigram).
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: not a readable tokenizer.json: {e}", path.display()))?;
        Ok(Self { inner })
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let inner = Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| anyhow::anyhow!("built-in tokenizer is invalid: {e}"))?;
        Ok(Self { inner })
    }

    /// Token ids of a prompt, with the end-of-sequence token T5 appends.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokenizer.json text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Helper for tests: max |a−b| / max |b|.
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?.max(1e-12);
    Ok(diff / scale)
}
