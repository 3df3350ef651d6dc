//! `x · Wᵀ` for inputs of a few rows: the shape of every matmul in incremental
//! decoding (one new frame per step, two rows with classifier-free guidance).
//!
//! Such a step is bound by reading the weights once. Candle's general matmul packs the
//! weight matrix and reaches about a third of memory bandwidth at two rows (measured:
//! 8.7 GB/s against 27 GB/s for one row, on 2 cores). Here each row of `W` (stored
//! `[out, in]`, so a row is contiguous) is read once and dotted with every input row,
//! in parallel over blocks of `W`'s rows. Every output is one dot product with a fixed
//! summation order, so results do not depend on the thread count or the CPU's vector
//! width.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Largest number of input rows this kernel takes; beyond it the weights are reused
/// enough for the general matmul to win.
pub const MAX_ROWS: usize = 16;

/// Rows of `W` per parallel task.
const BLOCK: usize = 32;

/// `Some(x · Wᵀ)` (`x`: `[..., in]`, `W`: `[out, in]`) when the kernel applies: f32 on
/// the CPU, at most [`MAX_ROWS`] rows, contiguous `W`, and no autograd graph to record
/// (the kernel has no backward). `None` otherwise, for the caller to use the general path.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if x.track_op() || w.track_op() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    if !matches!(x.device(), Device::Cpu) || w.rank() != 2 || x.rank() == 0 {
        return Ok(None);
    }
    let (out, inner) = w.dims2()?;
    let dims = x.dims();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    if dims[dims.len() - 1] != inner || rows == 0 || rows > MAX_ROWS || inner == 0 {
        return Ok(None);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
    let ws = &cpu.as_slice::<f32>()?[start..end];
    let k = Kernels::detect();
    // Output transposed, [out, rows]: each task owns a contiguous block of it.
    let mut yt = vec![0f32; out * rows];
    yt.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, chunk)| {
        let w_rows = chunk.len() / rows;
        let w_row = |r: usize| &ws[(b * BLOCK + r) * inner..][..inner];
        // Four input rows at a time, against every row of this block of W: four
        // independent sets of sums keep the vector units busy (one row alone waits on
        // its own additions), the four input rows stay in the L1 cache while the block's
        // W rows stream past, and each row's result is still `dot`'s, bit for bit.
        let groups = rows / 4;
        for g in 0..groups {
            let x4: [&[f32]; 4] = std::array::from_fn(|j| &xs[(4 * g + j) * inner..][..inner]);
            for r in 0..w_rows {
                chunk[r * rows + 4 * g..][..4].copy_from_slice(&(k.dot4)(x4, w_row(r)));
            }
        }
        // The rest (all rows when there are fewer than four: one step of generation,
        // bound by reading W) row by row of W, each read once for all of them, two input
        // rows in one pass (the guided pair): one load of W feeds both sets of sums.
        let pairs = (rows - 4 * groups) / 2;
        for r in 0..w_rows {
            for p in 0..pairs {
                let i = 4 * groups + 2 * p;
                let x2 = [&xs[i * inner..][..inner], &xs[(i + 1) * inner..][..inner]];
                chunk[r * rows + i..][..2].copy_from_slice(&(k.dot2)(x2, w_row(r)));
            }
            for i in 4 * groups + 2 * pairs..rows {
                chunk[r * rows + i] = (k.dot)(&xs[i * inner..][..inner], w_row(r));
            }
        }
    });
    drop(storage);
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank ≥ 1") = out;
    Tensor::from_vec(yt, (out, rows), &Device::Cpu)?.t()?.contiguous()?.reshape(shape).map(Some)
}

/// Lanes of the dot product.
const L: usize = 16;

/// The dot products, compiled for the widest vectors the CPU has. Rust never fuses a
/// multiply and an add, so the numbers are the same whichever is chosen; only the speed
/// differs (with 256-bit registers, four rows' sums stay in registers).
#[derive(Clone, Copy)]
struct Kernels {
    dot: fn(&[f32], &[f32]) -> f32,
    dot2: fn([&[f32]; 2], &[f32]) -> [f32; 2],
    dot4: fn([&[f32]; 4], &[f32]) -> [f32; 4],
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return Self { dot: avx2::dot, dot2: avx2::dot2, dot4: avx2::dot4 };
        }
        Self { dot, dot2, dot4 }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// `super::dot` compiled with AVX2.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: chosen only when the CPU reports AVX2 (`Kernels::detect`).
        unsafe { dot_avx2(a, b) }
    }

    /// `super::dot2` compiled with AVX2.
    pub fn dot2(a: [&[f32]; 2], b: &[f32]) -> [f32; 2] {
        // SAFETY: as above.
        unsafe { dot2_avx2(a, b) }
    }

    /// `super::dot4` compiled with AVX2.
    pub fn dot4(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
        // SAFETY: as above.
        unsafe { dot4_avx2(a, b) }
    }

    #[target_feature(enable = "avx2")]
    fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        super::dot(a, b)
    }

    /// `super::dot2` with explicit vectors: each row's sixteen lanes are two registers
    /// and each lane adds the rounded product, as `dot` does, so the bits are `dot`'s.
    /// (Written generically the compiler mixed the two rows' lanes in one register and
    /// ran at a third of the speed of reading `b` once for both.)
    #[target_feature(enable = "avx2")]
    fn dot2_avx2(a: [&[f32]; 2], b: &[f32]) -> [f32; 2] {
        use std::arch::x86_64::*;
        assert!(a[0].len() == b.len() && a[1].len() == b.len());
        let n = b.len() / super::L * super::L;
        let (mut s00, mut s01, mut s10, mut s11) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < n {
            // SAFETY: i + 16 ≤ n ≤ the length of all three slices (asserted above).
            unsafe {
                let (y0, y1) = (_mm256_loadu_ps(b.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i + 8)));
                let (p, q) = (a[0].as_ptr().add(i), a[1].as_ptr().add(i));
                s00 = _mm256_add_ps(s00, _mm256_mul_ps(_mm256_loadu_ps(p), y0));
                s01 = _mm256_add_ps(s01, _mm256_mul_ps(_mm256_loadu_ps(p.add(8)), y1));
                s10 = _mm256_add_ps(s10, _mm256_mul_ps(_mm256_loadu_ps(q), y0));
                s11 = _mm256_add_ps(s11, _mm256_mul_ps(_mm256_loadu_ps(q.add(8)), y1));
            }
            i += super::L;
        }
        let lanes = |lo: __m256, hi: __m256| {
            let mut acc = [0f32; super::L];
            // SAFETY: `acc` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(acc.as_mut_ptr(), lo);
                _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
            }
            acc
        };
        let tail = |r: usize| a[r][n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
        [super::reduce(lanes(s00, s01), tail(0)), super::reduce(lanes(s10, s11), tail(1))]
    }

    #[target_feature(enable = "avx2")]
    fn dot4_avx2(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
        super::dot4(a, b)
    }
}

/// Dot product with 16 independent lanes (vectorised by the compiler without
/// reassociating anything) and a fixed final reduction.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    reduce(acc, tail)
}

/// Two dot products with one `b`, each exactly `dot` (the portable path reads `b` twice).
#[inline(always)]
fn dot2(a: [&[f32]; 2], b: &[f32]) -> [f32; 2] {
    [dot(a[0], b), dot(a[1], b)]
}

/// Four dot products with one `b`, each summed exactly as `dot` sums it.
#[inline(always)]
fn dot4(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    // Four named accumulators (not an array indexed later): the compiler keeps them in
    // registers.
    let (mut s0, mut s1, mut s2, mut s3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
    let chunks = a[0]
        .chunks_exact(L)
        .zip(a[1].chunks_exact(L))
        .zip(a[2].chunks_exact(L))
        .zip(a[3].chunks_exact(L))
        .zip(b.chunks_exact(L));
    for ((((x0, x1), x2), x3), y) in chunks {
        for l in 0..L {
            s0[l] += x0[l] * y[l];
            s1[l] += x1[l] * y[l];
            s2[l] += x2[l] * y[l];
            s3[l] += x3[l] * y[l];
        }
    }
    let n = b.len() / L * L;
    let tail = |r: usize| a[r][n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    [reduce(s0, tail(0)), reduce(s1, tail(1)), reduce(s2, tail(2)), reduce(s3, tail(3))]
}

/// The lanes' fixed pairwise reduction, plus the tail.
#[inline(always)]
fn reduce(mut acc: [f32; L], tail: f32) -> f32 {
    let mut width = L / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::symmetric_uniforms(seed, n).into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn matches_the_definition_in_double_precision() {
        // Widths that are and are not multiples of the lane count and the block size.
        for &(rows, out, inner) in &[(1usize, 5usize, 3usize), (2, 70, 37), (3, 32, 16), (8, 33, 100), (2, 1, 1)] {
            let xv = data(rows * inner, 1);
            let wv = data(out * inner, 2);
            let x = Tensor::from_vec(xv.clone(), (rows, 1, inner), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(wv.clone(), (out, inner), &Device::Cpu).unwrap();
            let y = matmul_t(&x, &w).unwrap().expect("the kernel applies");
            assert_eq!(y.dims(), &[rows, 1, out]);
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..rows {
                for j in 0..out {
                    let want: f64 = (0..inner).map(|k| xv[i * inner + k] as f64 * wv[j * inner + k] as f64).sum();
                    let got = y[i * out + j] as f64;
                    assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "({rows},{out},{inner}) [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn every_row_is_summed_as_when_it_is_alone() {
        // Rows go through the kernel four, then two at a time: a row's result must not
        // depend on how many rows came with it (batched generation relies on it, bit for
        // bit, and a guided pair must give what each of its rows gives alone). A width
        // with a tail past the last full set of lanes.
        let inner = 100;
        let wv = data(40 * inner, 8);
        let w = Tensor::from_vec(wv, (40, inner), &Device::Cpu).unwrap();
        for rows in [2, 3, 6, 7, MAX_ROWS] {
            let xv = data(rows * inner, 9 + rows as u64);
            let all = Tensor::from_vec(xv.clone(), (rows, inner), &Device::Cpu).unwrap();
            let together: Vec<Vec<f32>> = matmul_t(&all, &w).unwrap().unwrap().to_vec2().unwrap();
            for (i, row) in together.iter().enumerate() {
                let x = Tensor::from_vec(xv[i * inner..(i + 1) * inner].to_vec(), (1, inner), &Device::Cpu).unwrap();
                let alone: Vec<Vec<f32>> = matmul_t(&x, &w).unwrap().unwrap().to_vec2().unwrap();
                let same = row.iter().zip(&alone[0]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "row {i} differs when computed with {} others", rows - 1);
            }
        }
    }

    #[test]
    fn reads_a_row_block_of_a_larger_matrix() {
        // q/k/v are row blocks (`narrow`) of the packed in_proj weight: offsets must be honoured.
        let packed = Tensor::from_vec(data(3 * 8 * 4, 3), (24, 4), &Device::Cpu).unwrap();
        let k = packed.narrow(0, 8, 8).unwrap();
        let x = Tensor::from_vec(data(2 * 4, 4), (2, 4), &Device::Cpu).unwrap();
        let ours = matmul_t(&x, &k).unwrap().unwrap();
        let general = x.matmul(&k.t().unwrap()).unwrap();
        let diff: f32 = (ours - general).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let w = Tensor::from_vec(data(16, 5), (4, 4), &Device::Cpu).unwrap();
        let many = Tensor::from_vec(data(4 * (MAX_ROWS + 1), 6), (MAX_ROWS + 1, 4), &Device::Cpu).unwrap();
        assert!(matmul_t(&many, &w).unwrap().is_none(), "too many rows");
        let x = Tensor::from_vec(data(4, 7), (1, 4), &Device::Cpu).unwrap();
        assert!(matmul_t(&x.to_dtype(DType::F64).unwrap(), &w.to_dtype(DType::F64).unwrap()).unwrap().is_none());
        let var = candle_core::Var::from_tensor(&w).unwrap();
        assert!(matmul_t(&x, var.as_tensor()).unwrap().is_none(), "a graph to record");
        assert!(matmul_t(&x, &w.t().unwrap()).unwrap().is_none(), "W not contiguous");
    }
}
