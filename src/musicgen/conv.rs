//! The gathers under 1-d convolutions, for their backward passes by hand.
//!
//! A convolution reads, for output step `t` and tap `k`, the input sample
//! `src[t·stride + k·dilation]` of a padded signal. [`Columns`] holds that reading pattern
//! as one index (padding included: a padded position is a mirrored sample or a zero), so
//! the convolution is a matmul of the weight with the gathered columns (im2col), and its
//! adjoint — the gradient of the input — is the matmul's transpose scattered back onto
//! the samples the columns came from (col2im); a transposed convolution is that scatter
//! too. On untracked f32 tensors both run as parallel loops; otherwise as Candle's index
//! ops, which any float type and Candle's autograd go through (the tests differentiate
//! in f64).

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::config::PadMode;
use super::ops::{is_untracked_f32, untracked_f32};

/// Where each position of a signal of `len` samples padded by `left` and `right` reads
/// from: a sample index, or `len` for a zero. Reflect padding mirrors without repeating
/// the edge sample; an input shorter than the pad is zero-extended first, then mirrored,
/// as EnCodec's `pad1d` does (the extension is not part of the output).
pub fn pad_source(len: usize, left: usize, right: usize, mode: PadMode) -> Vec<u32> {
    match mode {
        PadMode::Constant => (0..left + len + right)
            .map(|p| if p < left || p >= left + len { len as u32 } else { (p - left) as u32 })
            .collect(),
        PadMode::Reflect => {
            let extra = if len <= left.max(right) { left.max(right) - len + 1 } else { 0 };
            let n = len + extra;
            (0..left + len + right)
                .map(|p| {
                    let r = if p < left {
                        left - p
                    } else if p < left + n {
                        p - left
                    } else {
                        n - 2 - (p - left - n)
                    };
                    r.min(len) as u32
                })
                .collect()
        }
    }
}

/// The im2col pattern of one convolution over a signal of `len` samples: column `t` of
/// tap `k` is `src[t·stride + k·dilation]` (`len`: a zero).
pub struct Columns {
    idx: Vec<u32>,
    len: usize,
    taps: usize,
    width: usize,
    device: Device,
}

impl Columns {
    /// `width` columns of `taps` taps each over the positions `src` (see [`pad_source`]).
    pub fn new(
        src: &[u32],
        len: usize,
        taps: usize,
        width: usize,
        stride: usize,
        dilation: usize,
        device: &Device,
    ) -> Result<Self> {
        let last = (width.max(1) - 1) * stride + (taps.max(1) - 1) * dilation;
        if width == 0 || taps == 0 || last >= src.len() {
            candle_core::bail!("{width} columns of {taps} taps do not fit {} padded positions", src.len());
        }
        let mut idx = Vec::with_capacity(taps * width);
        for k in 0..taps {
            idx.extend((0..width).map(|t| src[t * stride + k * dilation]));
        }
        Ok(Self { idx, len, taps, width, device: device.clone() })
    }

    /// Samples of the signal the columns read.
    pub fn signal_len(&self) -> usize {
        self.len
    }

    /// Columns that are the signal itself (a 1×1 convolution without padding).
    fn is_identity(&self) -> bool {
        self.taps == 1 && self.width == self.len && self.idx.iter().enumerate().all(|(i, &s)| s as usize == i)
    }

    /// `x` `[1, C, len]` → columns `[C·taps, width]` (row `c·taps + k`, the layout of a
    /// PyTorch kernel `[·, C, taps]` flattened).
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, len) = x.dims3()?;
        if len != self.len {
            candle_core::bail!("columns made for {} samples, given {len}", self.len);
        }
        let shape = (c * self.taps, self.width);
        if self.is_identity() {
            return x.reshape(shape);
        }
        let x = x.contiguous()?;
        let tw = self.taps * self.width;
        let fast = untracked_f32(&x, |xs| {
            let mut out = vec![0f32; c * tw];
            out.par_chunks_mut(tw).zip(xs.par_chunks(len)).for_each(|(o, row)| {
                for (o, &i) in o.iter_mut().zip(&self.idx) {
                    *o = row.get(i as usize).copied().unwrap_or(0.0);
                }
            });
            out
        })?;
        match fast {
            Some(out) => Tensor::from_vec(out, shape, &self.device),
            None => x.pad_with_zeros(2, 0, 1)?.index_select(&self.idx_tensor()?, 2)?.reshape(shape),
        }
    }

    /// The adjoint of [`gather`](Self::gather): columns `[C·taps, width]` → `[1, C, len]`,
    /// each sample receiving the sum of every column entry read from it.
    pub fn scatter(&self, cols: &Tensor) -> Result<Tensor> {
        let (rows, width) = cols.dims2()?;
        if width != self.width || rows % self.taps != 0 {
            candle_core::bail!("columns [{rows}, {width}] do not match {} taps × {} columns", self.taps, self.width);
        }
        let c = rows / self.taps;
        if self.is_identity() {
            return cols.reshape((1, c, self.len));
        }
        let cols = cols.contiguous()?;
        let (tw, len) = (self.taps * self.width, self.len);
        if is_untracked_f32(&cols) {
            let mut out = vec![0f32; c * len];
            if self.scatter_into(&cols, &mut out)? {
                return Tensor::from_vec(out, (1, c, len), &self.device);
            }
        }
        let cols = cols.reshape((1, c, tw))?;
        let acc = Tensor::zeros((1, c, len + 1), cols.dtype(), cols.device())?;
        acc.index_add(&self.idx_tensor()?, &cols, 2)?.narrow(2, 0, len)
    }

    /// Columns `range` of this pattern alone: a convolution's output steps
    /// `range` read (or, transposed, write) through it, over the same signal.
    pub fn part(&self, range: std::ops::Range<usize>) -> Columns {
        let idx = (0..self.taps).flat_map(|k| self.idx[k * self.width..][range.clone()].iter().copied()).collect();
        Columns { idx, len: self.len, taps: self.taps, width: range.len(), device: self.device.clone() }
    }

    /// The pattern cut into consecutive parts of at most `columns` columns each (one
    /// part when it has no more): a convolution over a long signal gathers its columns
    /// part by part, so that they stay a few MB (cached) instead of `C·taps` times the
    /// signal (573 MB for the last layer of a 10 s decoder).
    pub fn parts(&self, columns: usize) -> Vec<(std::ops::Range<usize>, Columns)> {
        let columns = columns.max(1);
        if self.width <= columns || self.is_identity() {
            return vec![(0..self.width, self.part(0..self.width))];
        }
        (0..self.width)
            .step_by(columns)
            .map(|t0| {
                let range = t0..(t0 + columns).min(self.width);
                (range.clone(), self.part(range))
            })
            .collect()
    }

    /// [`scatter`](Self::scatter) added into `out` (`[C, len]` f32, row-major) instead of
    /// returned, for summing the parts of a long scatter in one buffer; `false` (and
    /// nothing added) unless `cols` is an untracked f32 tensor.
    pub fn scatter_into(&self, cols: &Tensor, out: &mut [f32]) -> Result<bool> {
        let (rows, width) = cols.dims2()?;
        if width != self.width || rows % self.taps != 0 || out.len() != rows / self.taps * self.len {
            candle_core::bail!("columns [{rows}, {width}] do not match {} taps × {} columns", self.taps, self.width);
        }
        let cols = cols.contiguous()?;
        let (tw, len) = (self.taps * self.width, self.len);
        let done = untracked_f32(&cols, |cs| {
            out.par_chunks_mut(len).zip(cs.par_chunks(tw)).for_each(|(o, col)| {
                for (&v, &i) in col.iter().zip(&self.idx) {
                    if let Some(s) = o.get_mut(i as usize) {
                        *s += v;
                    }
                }
            });
        })?;
        Ok(done.is_some())
    }

    fn idx_tensor(&self) -> Result<Tensor> {
        Tensor::new(self.idx.as_slice(), &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let data = crate::rng::symmetric_uniforms(seed, shape.iter().product());
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn pad_source_reflects_without_the_edge_and_zero_pads() {
        // x = [1 2 3 4 5]; 0 stands for a zero.
        let read =
            |src: Vec<u32>, len: u32| -> Vec<u32> { src.iter().map(|&i| if i == len { 0 } else { i + 1 }).collect() };
        assert_eq!(read(pad_source(5, 2, 3, PadMode::Reflect), 5), [3, 2, 1, 2, 3, 4, 5, 4, 3, 2]);
        assert_eq!(read(pad_source(5, 4, 0, PadMode::Reflect), 5), [5, 4, 3, 2, 1, 2, 3, 4, 5]);
        assert_eq!(read(pad_source(5, 2, 1, PadMode::Constant), 5), [0, 0, 1, 2, 3, 4, 5, 0]);
        assert_eq!(read(pad_source(5, 0, 0, PadMode::Reflect), 5), [1, 2, 3, 4, 5]);
        // Shorter than the pad (EnCodec's pad1d): [1 2] zero-extended to [1 2 0 0 0 0 0],
        // mirrored by (6, 4), the extension's five samples dropped from the end.
        assert_eq!(read(pad_source(2, 6, 4, PadMode::Reflect), 2), [0, 0, 0, 0, 0, 2, 1, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn columns_convolve_like_conv1d_and_scatter_is_the_adjoint() {
        let (c_in, c_out, len, k, stride, dil) = (3, 2, 11, 3, 2, 2);
        let x = randn(&[1, c_in, len], 1);
        let w = randn(&[c_out, c_in, k], 2);
        let src: Vec<u32> = (0..len as u32).collect();
        let width = (len - (k - 1) * dil - 1) / stride + 1;
        let cols = Columns::new(&src, len, k, width, stride, dil, &Device::Cpu).unwrap();
        let y = w.reshape((c_out, c_in * k)).unwrap().matmul(&cols.gather(&x).unwrap()).unwrap();
        let want = x.conv1d(&w, 0, stride, dil, 1).unwrap().squeeze(0).unwrap();
        let diff: f64 =
            (y - want).unwrap().abs().unwrap().max_keepdim(1).unwrap().max(0).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!(diff < 1e-12, "im2col convolution differs by {diff}");
        // ⟨gather(x), r⟩ = ⟨x, scatter(r)⟩ for any r: scatter is gather's transpose; with
        // padding too (mirrored samples are read twice, zeros never written back).
        let padded = pad_source(len, 4, 3, PadMode::Reflect);
        let width = (padded.len() - (k - 1) * dil - 1) / stride + 1;
        let cols = Columns::new(&padded, len, k, width, stride, dil, &Device::Cpu).unwrap();
        let r = randn(&[c_in * k, width], 3);
        let lhs: f64 = (cols.gather(&x).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar().unwrap();
        let rhs: f64 = (&x * cols.scatter(&r).unwrap()).unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!((lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        // The f32 loops give what Candle's index ops give (taken for f64).
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let close = |a: Tensor, b: Tensor| {
            let d: f64 = (a.to_dtype(DType::F64).unwrap() - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-6, "f32 loops differ by {d}");
        };
        close(cols.gather(&f32s(&x)).unwrap(), cols.gather(&x).unwrap());
        close(cols.scatter(&f32s(&r)).unwrap(), cols.scatter(&r).unwrap());
    }
}
