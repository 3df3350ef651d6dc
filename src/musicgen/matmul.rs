//! Matrix products of the gradient step, through `gemm` without a zero-filled output.
//!
//! Candle's CPU matmul allocates its output with `vec![0; m·n]` and then asks gemm to
//! overwrite it (`read_dst = false`), so every product begins with a memset on the
//! calling thread while the gemm threads wait. For a weight's gradient at
//! musicgen-small's shape that is 16–64 MB per product, 2% of a 10 s audio-nll step's
//! CPU time, all of it serial. [`matmul`] makes the same gemm call into memory it never
//! zeroes: the same numbers, bit for bit (the test below holds it to Candle's).

use candle_core::{DType, Device, Result, Storage, Tensor};

/// `a · b` with Candle's `matmul` semantics (batched over leading dimensions, which must
/// be equal). f32 tensors on the CPU outside autograd take gemm directly; anything else
/// (other dtypes, devices, a graph to record, mismatched shapes) is Candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match matmul_f32(a, b)? {
        Some((y, shape)) => Tensor::from_vec(y, shape, &Device::Cpu),
        None => a.matmul(b),
    }
}

/// [`matmul`]'s direct path, the product's numbers and shape, for a caller that changes
/// them in place before they become a tensor; `None` where [`matmul`] takes Candle's.
pub fn matmul_f32(a: &Tensor, b: &Tensor) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
    direct(a, b)
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
    // SAFETY: every one of the `len` numbers was written by gemm above.
    unsafe { dst.set_len(len) };
    drop((sa, sb));
    let mut shape = ad.to_vec();
    shape[r - 1] = n;
    Ok(Some((dst, shape)))
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

    /// The same numbers as Candle's matmul, bit for bit, for contiguous, transposed,
    /// narrowed and batched operands (the gradient step's layouts: `dyᵀ·x`, `dy·W`,
    /// `x·Wᵀ`, per-head attention blocks), and sizes that are not multiples of gemm's
    /// register tiles.
    #[test]
    fn matches_candle_matmul_bit_for_bit() {
        let x = randn(&[37, 70], 1);
        let w = randn(&[53, 70], 2);
        let dy = randn(&[37, 53], 3);
        let cases: Vec<(Tensor, Tensor)> = vec![
            (x.clone(), w.t().unwrap()),
            (dy.t().unwrap(), x.clone()),
            (dy.clone(), w.clone()),
            (x.narrow(1, 3, 50).unwrap(), w.narrow(1, 5, 50).unwrap().t().unwrap()),
            (randn(&[2, 3, 19, 16], 4), randn(&[2, 3, 16, 23], 5)),
            (randn(&[2, 3, 19, 16], 6), randn(&[2, 3, 23, 16], 7).t().unwrap()),
            (randn(&[3, 2, 19, 16], 8).transpose(0, 1).unwrap(), randn(&[2, 3, 16, 5], 9)),
        ];
        for (i, (a, b)) in cases.iter().enumerate() {
            let ours = matmul(a, b).unwrap();
            // Candle refuses batches that are not laid out one after the other (the last
            // case); it gets them copied.
            let candle = a.matmul(b).or_else(|_| a.contiguous()?.matmul(b)).unwrap();
            assert_eq!(ours.dims(), candle.dims(), "case {i}");
            assert_eq!(bits(&ours), bits(&candle), "case {i}");
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
}
