//! Matrix products of the gradient step, without a zero-filled output.
//!
//! Candle's CPU matmul allocates its output with `vec![0; m·n]` and then asks gemm to
//! overwrite it (`read_dst = false`), so every product begins with a memset on the
//! calling thread while the gemm threads wait. For a weight's gradient at
//! musicgen-small's shape that is 16–64 MB per product, 2% of a 10 s audio-nll step's
//! CPU time, all of it serial. [`matmul`] writes into memory it never zeroes.
//!
//! Single products (the LM's `x·Wᵀ`, `dy·W` and `dyᵀ·x`) go through faer's matmul. gemm,
//! asked for a row-major `x·Wᵀ`, transposes the problem and then packs W into column
//! panels: a gather of 64 rows of W at a time, each a page or more apart, so that the
//! loads share one set of the L1 cache; with a few hundred rows of `x` that packing
//! costs as much as the arithmetic. Measured here (2 threads, GF/s, gemm → faer):
//! musicgen-small's `x·Wᵀ` at 100 / 200 / 500 / 1000 rows, 3072×1024 weight
//! 63→117, 102→145, 151→181, 171→193; 1024×4096 54→126, 87→153, 131→177, 160→185;
//! `dy·W` and `dyᵀ·x` as fast or up to 10% faster. The codec's convolutions use it for
//! their weight gradients `dY·Xcolᵀ`, whose inner dimension is thousands of steps
//! (32×96 by 64,000: 17→51 GF/s; 128×384 by 8,000: 96→149); their other products stay
//! Candle's, where gemm is as fast. Batched products (attention heads)
//! and thin ones (fewer than [`FAER_MIN`] rows or columns, where faer splits the sum
//! over threads and its bits would follow the thread count) stay with gemm, which gives
//! Candle's numbers bit for bit.

use candle_core::{DType, Device, Result, Storage, Tensor};

/// `a · b` with Candle's `matmul` semantics (batched over leading dimensions, which must
/// be equal). f32 tensors on the CPU outside autograd take faer or gemm directly (see
/// the module's notes); anything else (other dtypes, devices, a graph to record,
/// mismatched shapes) is Candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match direct(a, b)? {
        Some((y, shape)) => Tensor::from_vec(y, shape, &Device::Cpu),
        None => a.matmul(b),
    }
}

/// The 2-D strides `(row, column)` of a tensor's last two dimensions and the offset of
/// each batch (leading dimensions, in row-major order).
fn batch_offsets(t: &Tensor) -> (isize, isize, Vec<usize>) {
    let layout = t.layout();
    let (dims, stride) = (t.dims(), layout.stride());
    let r = dims.len();
    let mut offsets = vec![layout.start_offset()];
    for (&d, &s) in dims[..r - 2].iter().zip(&stride[..r - 2]) {
        offsets = offsets.iter().flat_map(|&o| (0..d).map(move |i| o + i * s)).collect();
    }
    (stride[r - 2] as isize, stride[r - 1] as isize, offsets)
}

/// Rows and columns of a product from which faer computes it (see the module's notes).
const FAER_MIN: usize = 8;

/// Whether faer computes a product of `batches` batches of m×n (see the module's notes).
fn takes_faer(batches: usize, m: usize, n: usize) -> bool {
    batches == 1 && m.min(n) >= FAER_MIN
}

fn direct(a: &Tensor, b: &Tensor) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
    if a.track_op() || b.track_op() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    if !matches!(a.device(), Device::Cpu) || !matches!(b.device(), Device::Cpu) {
        return Ok(None);
    }
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        return Ok(None); // Candle's matmul reports the mismatch
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    if m == 0 || k == 0 || n == 0 {
        return Ok(None);
    }
    let (a_rs, a_cs, a_off) = batch_offsets(a);
    let (b_rs, b_cs, b_off) = batch_offsets(b);
    let batches = a_off.len();
    let len = batches
        .checked_mul(m)
        .and_then(|x| x.checked_mul(n))
        .ok_or_else(|| candle_core::Error::Msg(format!("matmul output {ad:?} x {bd:?} too large")))?;
    let (sa, _) = a.storage_and_layout();
    let (sb, _) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else { return Ok(None) };
    let (av, bv) = (ca.as_slice::<f32>()?, cb.as_slice::<f32>()?);
    // Every element gemm reads lies inside the storage: the last one of each operand is
    // at offset + (rows−1)·rs + (cols−1)·cs (Candle's strides are never negative).
    let last = |off: &[usize], rs: isize, cs: isize, rows: usize, cols: usize| {
        off.iter().map(|&o| o + (rows - 1) * rs as usize + (cols - 1) * cs as usize).max().unwrap_or(0)
    };
    if last(&a_off, a_rs, a_cs, m, k) >= av.len() || last(&b_off, b_rs, b_cs, k, n) >= bv.len() {
        return Ok(None);
    }
    let mut dst: Vec<f32> = Vec::new();
    dst.try_reserve_exact(len).map_err(|e| candle_core::Error::Msg(format!("matmul output of {len} numbers: {e}")))?;
    let threads = rayon::current_num_threads();
    if takes_faer(batches, m, n) {
        // SAFETY: the operands' elements are in bounds (checked above) and stay borrowed
        // for the call; `dst` has capacity for m·n numbers, row-major. With
        // `Accum::Replace` faer writes every element of the destination before it reads
        // any (its kernels add into `dst` only from the second block of the inner
        // dimension on), so the uninitialised memory is never read.
        unsafe {
            let lhs = faer::MatRef::from_raw_parts(av.as_ptr().add(a_off[0]), m, k, a_rs, a_cs);
            let rhs = faer::MatRef::from_raw_parts(bv.as_ptr().add(b_off[0]), k, n, b_rs, b_cs);
            let out = faer::MatMut::from_raw_parts_mut(dst.as_mut_ptr(), m, n, n as isize, 1);
            faer::linalg::matmul::matmul(out, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::rayon(threads));
        }
    } else {
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for (i, (&ao, &bo)) in a_off.iter().zip(&b_off).enumerate() {
            // SAFETY: the operands' elements are in bounds (checked above); `dst` has
            // capacity for `batches·m·n` numbers and batch `i` writes m·n of them at i·m·n,
            // each exactly once (`read_dst = false`: gemm never reads the uninitialised
            // output). The storages are borrowed (read guards) for the whole call.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr().add(i * m * n),
                    1,
                    n as isize,
                    false,
                    av.as_ptr().add(ao),
                    a_cs,
                    a_rs,
                    bv.as_ptr().add(bo),
                    b_cs,
                    b_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
    }
    // SAFETY: every one of the `len` numbers was written by faer or gemm above.
    unsafe { dst.set_len(len) };
    drop((sa, sb));
    let mut shape = ad.to_vec();
    shape[r - 1] = n;
    Ok(Some((dst, shape)))
}

/// A strided view of an f32 matrix: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix whose rows lie `rs` apart.
    pub fn rows_apart(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self { data, rows, cols, rs, cs: 1 }
    }

    /// Rows `start..start + len`.
    pub fn rows(self, start: usize, len: usize) -> Self {
        let data = if len == 0 { &self.data[..0] } else { &self.data[start * self.rs..] };
        Self { data, rows: len, ..self }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a·b`, or `dst += a·b` with `accumulate`, on the calling thread (for products
/// small enough that many of them run side by side, one per task). `dst` is row-major
/// with rows `dst_rs` apart.
pub(crate) fn gemm_into(dst: &mut [f32], dst_rs: usize, a: View, b: View, accumulate: bool) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let fits = m == 0 || n == 0 || ((m - 1) * dst_rs + n <= dst.len() && n <= dst_rs);
    if b.rows != k || !a.in_bounds() || !b.in_bounds() || !fits {
        candle_core::bail!("gemm_into: {m}×{k} · {}×{n} into {} numbers (rows {dst_rs} apart)", b.rows, dst.len());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return Ok(());
    }
    // SAFETY: every element read lies in `a.data` / `b.data` and every one written in
    // `dst` (checked above); the borrows keep them alive and `dst` unaliased.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (crate::rng::hash(seed, &[i as u64]) % 2001) as f32 / 1000.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// `a · b` in f64, as a flat vector.
    fn reference(a: &Tensor, b: &Tensor) -> Vec<f64> {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().contiguous().unwrap();
        f64(a).matmul(&f64(b)).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// Batched and thin products (gemm) give Candle's numbers bit for bit; single products
    /// (faer) the f64 product's within f32 rounding. Layouts are the gradient step's
    /// (`x·Wᵀ`, `dyᵀ·x`, `dy·W`, narrowed operands, per-head attention blocks), at sizes
    /// that are not multiples of either library's register tiles.
    #[test]
    fn matches_candle_matmul() {
        let x = randn(&[37, 70], 1);
        let w = randn(&[53, 70], 2);
        let dy = randn(&[37, 53], 3);
        let single: Vec<(Tensor, Tensor)> = vec![
            (x.clone(), w.t().unwrap()),
            (dy.t().unwrap(), x.clone()),
            (dy.clone(), w.clone()),
            (x.narrow(1, 3, 50).unwrap(), w.narrow(1, 5, 50).unwrap().t().unwrap()),
            (randn(&[1, 1, 9, 16], 10), randn(&[1, 1, 16, 12], 11)),
        ];
        for (i, (a, b)) in single.iter().enumerate() {
            let ours = matmul(a, b).unwrap();
            assert_eq!(ours.dims(), a.matmul(b).unwrap().dims(), "case {i}");
            let got = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (j, (g, r)) in got.iter().zip(reference(a, b)).enumerate() {
                assert!((*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "case {i}, element {j}: {g} against {r}");
            }
        }
        let gemm_cases: Vec<(Tensor, Tensor)> = vec![
            (randn(&[2, 3, 19, 16], 4), randn(&[2, 3, 16, 23], 5)),
            (randn(&[2, 3, 19, 16], 6), randn(&[2, 3, 23, 16], 7).t().unwrap()),
            (randn(&[3, 2, 19, 16], 8).transpose(0, 1).unwrap(), randn(&[2, 3, 16, 5], 9)),
            (randn(&[5, 40], 12), randn(&[40, 33], 13)),
            (randn(&[33, 40], 14), randn(&[40, 7], 15)),
        ];
        for (i, (a, b)) in gemm_cases.iter().enumerate() {
            let ours = matmul(a, b).unwrap();
            // Candle refuses batches that are not laid out one after the other (the third
            // case); it gets them copied.
            let candle = a.matmul(b).or_else(|_| a.contiguous()?.matmul(b)).unwrap();
            assert_eq!(ours.dims(), candle.dims(), "gemm case {i}");
            assert_eq!(bits(&ours), bits(&candle), "gemm case {i}");
        }
    }

    /// An embedding must not depend on the thread count: the products of the gradient
    /// step give the same bits on one thread as on three, at sizes where faer splits
    /// the work (the LM's three layouts, a codec weight gradient's long inner dimension
    /// and a short one), and a product of one row, which gemm takes because faer would
    /// not.
    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        let x = randn(&[300, 256], 21);
        let w = randn(&[520, 256], 22);
        let dy = randn(&[300, 520], 23);
        let run = |threads: usize| -> Vec<Vec<u32>> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                [
                    (x.clone(), w.t().unwrap()),
                    (dy.t().unwrap(), x.clone()),
                    (dy.clone(), w.clone()),
                    (randn(&[16, 20000], 24), randn(&[24, 20000], 25).t().unwrap()),
                    // A cross-attention key weight's gradient: the inner dimension is the
                    // text's dozen tokens.
                    (randn(&[12, 300], 28).t().unwrap(), randn(&[12, 280], 29)),
                    // One row: faer would split the sum over threads (why FAER_MIN).
                    (randn(&[1, 3072], 26), randn(&[3072, 1024], 27)),
                ]
                .iter()
                .map(|(a, b)| bits(&matmul(a, b).unwrap()))
                .collect()
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// The gradient step's products take faer (a 2 s musicgen-small window: 100 rows
    /// against 1024- to 4096-wide weights; a weight's gradient; a codec weight gradient),
    /// and what it must not (batches, one-row products) stays with gemm.
    #[test]
    fn the_gradient_steps_products_take_faer() {
        for (m, n) in [(100, 3072), (200, 1024), (1024, 4096), (32, 96), (12, 1024)] {
            assert!(takes_faer(1, m, n), "{m}×{n}");
        }
        for (batches, m, n) in [(32, 128, 500), (1, 1, 4096), (1, 4096, 1), (1, 2, 1024)] {
            assert!(!takes_faer(batches, m, n), "{batches} × {m}×{n}");
        }
    }

    /// What the direct path does not take goes to Candle: other dtypes, tracked tensors
    /// (their graph is recorded), and mismatched shapes (Candle's error).
    #[test]
    fn falls_back_to_candle() {
        let a = randn(&[4, 6], 1).to_dtype(DType::F64).unwrap();
        let b = randn(&[6, 5], 2).to_dtype(DType::F64).unwrap();
        assert_eq!(matmul(&a, &b).unwrap().dtype(), DType::F64);
        let v = candle_core::Var::from_tensor(&randn(&[4, 6], 3)).unwrap();
        let y = matmul(v.as_tensor(), &randn(&[6, 5], 4)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(v.as_tensor()).is_some(), "the graph was recorded");
        assert!(matmul(&randn(&[4, 6], 5), &randn(&[5, 5], 6)).is_err());
    }
    /// `gemm_into` against Candle's matmul: transposed and row-offset views, a
    /// destination with wider rows, accumulation, and refused shapes.
    #[test]
    fn gemm_into_matches_candle() {
        let a = randn(&[9, 13], 11);
        let b = randn(&[7, 13], 12);
        let (av, bv) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // rows 2..8 of a, times bᵀ: 6×7, written into rows 10 apart.
        let expect = a.narrow(0, 2, 6).unwrap().matmul(&b.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let mut dst = vec![5.0f32; 60];
        let (va, vb) = (View::rows_apart(&av, 9, 13, 13).rows(2, 6), View::rows_apart(&bv, 7, 13, 13).t());
        gemm_into(&mut dst, 10, va, vb, false).unwrap();
        for (i, row) in expect.iter().enumerate() {
            for (j, &e) in row.iter().enumerate() {
                assert!((dst[i * 10 + j] - e).abs() <= 1e-5 * (1.0 + e.abs()), "({i}, {j})");
            }
            assert!(dst[i * 10 + 7..i * 10 + 10].iter().all(|&x| x == 5.0), "row {i}: written past its end");
        }
        gemm_into(&mut dst, 10, va, vb, true).unwrap();
        for (i, row) in expect.iter().enumerate() {
            for (j, &e) in row.iter().enumerate() {
                assert!((dst[i * 10 + j] - 2.0 * e).abs() <= 1e-5 * (1.0 + e.abs()), "accumulated ({i}, {j})");
            }
        }
        // aᵀ·a: a transposed left operand.
        let ata = a.t().unwrap().matmul(&a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut dst = vec![0.0f32; 13 * 13];
        let va = View::rows_apart(&av, 9, 13, 13);
        gemm_into(&mut dst, 13, va.t(), va, false).unwrap();
        assert!(dst.iter().zip(&ata).all(|(x, e)| (x - e).abs() <= 1e-5 * (1.0 + e.abs())));
        // Mismatched inner sizes, a view past its data, a destination too small.
        assert!(gemm_into(&mut dst, 13, va, va, false).is_err());
        assert!(gemm_into(&mut dst, 13, View::rows_apart(&av, 10, 13, 13).t(), va, false).is_err());
        assert!(gemm_into(&mut dst[..100], 13, va.t(), va, false).is_err());
    }
}
