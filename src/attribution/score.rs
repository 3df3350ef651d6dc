//! TRAK scores `S = G (ΦᵀΦ + λI)⁻¹ Φᵀ` (m queries × n training rows), in f64.
//!
//! Scoring is split in two: `factorise` (the Cholesky factor of the system, once per
//! training set and λ; `spintrak index` stores it) and `scores_factored` (per batch of
//! queries). With fewer training rows than dimensions (n < k) the push-through identity
//! gives the same matrix from an n×n system, `S = G Φᵀ (ΦΦᵀ + λI)⁻¹`; otherwise the k×k
//! system `ΦᵀΦ + λI` is accumulated over row blocks. Either way Φ is read through
//! `Rows` one block at a time, so a memory-mapped Φ is streamed, never copied whole,
//! and a query costs one pass over Φ plus two triangular solves: never an inverse.

use std::borrow::Cow;

use anyhow::{bail, Result};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_solve;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

/// Rows converted per block when accumulating the system.
const BLOCK_ROWS: usize = 2048;

fn par() -> Par {
    Par::rayon(0)
}

/// Training rows Φ (n × k, f32), read a block of rows at a time.
pub trait Rows: Sync {
    fn n(&self) -> usize;
    fn k(&self) -> usize;
    /// Rows `[start, start+len)`, row-major (borrowed when they lie contiguously).
    fn block(&self, start: usize, len: usize) -> Cow<'_, [f32]>;
    /// How messages name these rows.
    fn name(&self) -> String {
        "the training rows".into()
    }
}

/// Φ held in a row-major slice.
pub struct SliceRows<'a> {
    pub data: &'a [f32],
    pub k: usize,
}

impl Rows for SliceRows<'_> {
    fn n(&self) -> usize {
        self.data.len() / self.k.max(1)
    }
    fn k(&self) -> usize {
        self.k
    }
    fn block(&self, start: usize, len: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(&self.data[start * self.k..(start + len) * self.k])
    }
}

/// Which system was factorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `ΦΦᵀ + λI` (n×n; n < k).
    PushThrough,
    /// `ΦᵀΦ + λI` (k×k), Φ streamed in blocks.
    Streamed,
}

impl Method {
    /// The form `scores` uses for n rows of k numbers.
    pub fn for_shape(n: usize, k: usize) -> Self {
        if n < k {
            Self::PushThrough
        } else {
            Self::Streamed
        }
    }
}

/// The lower Cholesky factor `L` (`L Lᵀ` = the system) of one training set and λ,
/// packed row by row (`L[i][0..=i]`, `dim(dim+1)/2` numbers): half the bytes of a full
/// matrix, and each triangular solve reads it front to back.
#[derive(Debug, Clone)]
pub struct Factor<'a> {
    pub method: Method,
    pub lambda: f64,
    pub dim: usize,
    pub packed: Cow<'a, [f64]>,
}

/// Numbers in a packed lower triangle of `dim` rows.
pub fn packed_len(dim: usize) -> usize {
    dim * (dim + 1) / 2
}

fn check_lambda(lambda: f64) -> Result<()> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        bail!("--lambda must be a finite number ≥ 0, got {lambda}");
    }
    Ok(())
}

/// `S` (row-major m × n) for queries `g` (m × k) and training rows `phi` (n × k).
pub fn scores(g: &[f32], m: usize, phi: &[f32], n: usize, k: usize, lambda: f64) -> Result<(Vec<f64>, Method)> {
    if g.len() != m * k || phi.len() != n * k {
        bail!("score: matrices do not match their shapes");
    }
    scores_rows(g, m, &SliceRows { data: phi, k }, lambda)
}

/// `S` for training rows read through `rows`.
pub fn scores_rows(g: &[f32], m: usize, rows: &dyn Rows, lambda: f64) -> Result<(Vec<f64>, Method)> {
    let factor = factorise(rows, lambda, &|_| {})?;
    Ok((scores_factored(g, m, rows, &factor, false)?.0, factor.method))
}

/// Factorises the system of `rows` and λ; `progress` is told the rows done so far.
pub fn factorise(rows: &dyn Rows, lambda: f64, progress: &(dyn Fn(usize) + Sync)) -> Result<Factor<'static>> {
    check_lambda(lambda)?;
    let (n, k) = (rows.n(), rows.k());
    if n == 0 {
        bail!("score: no training rows");
    }
    let method = Method::for_shape(n, k);
    let dim = match method {
        Method::PushThrough => n,
        Method::Streamed => k,
    };
    let mut system = Mat::<f64>::zeros(dim, dim);
    match method {
        Method::PushThrough => {
            // K = ΦΦᵀ (n×n, n < k: Φ is small enough to hold as f64 once).
            let phi = block_f64(&rows.block(0, n), k, n);
            gram_lower(system.as_mut(), Accum::Replace, phi.transpose());
            progress(n);
        }
        Method::Streamed => {
            // M = ΦᵀΦ (k×k), accumulated block by block.
            let mut start = 0;
            while start < n {
                let len = BLOCK_ROWS.min(n - start);
                let b = block_f64(&rows.block(start, len), k, len);
                gram_lower(system.as_mut(), Accum::Add, b.as_ref());
                start += len;
                progress(start);
            }
        }
    }
    for i in 0..dim {
        system[(i, i)] += lambda;
    }
    if (0..dim).any(|j| (j..dim).any(|i| !system[(i, j)].is_finite())) {
        bail!("{} hold non-finite values; re-embed them", rows.name());
    }
    let llt = system.llt(Side::Lower).map_err(|_| not_pd(lambda))?;
    drop(system);
    let l = llt.L();
    let mut packed = Vec::with_capacity(packed_len(dim));
    for i in 0..dim {
        for j in 0..=i {
            packed.push(l[(i, j)]);
        }
    }
    Ok(Factor { method, lambda, dim, packed: Cow::Owned(packed) })
}

/// `S` (row-major m × n) from a factor of the same rows: one pass over Φ. With
/// `checksum`, the pass also returns the rows' `rows_checksum` (at no extra read of Φ),
/// to compare with the one the factor was made from.
pub fn scores_factored(
    g: &[f32],
    m: usize,
    rows: &dyn Rows,
    factor: &Factor<'_>,
    checksum: bool,
) -> Result<(Vec<f64>, Option<u64>)> {
    let (n, k) = (rows.n(), rows.k());
    if g.len() != m * k {
        bail!("score: the queries have {} numbers, {m} rows of k = {k} make {}", g.len(), m * k);
    }
    if m == 0 {
        bail!("score: no query rows");
    }
    let expected = match factor.method {
        Method::PushThrough => n,
        Method::Streamed => k,
    };
    if factor.dim != expected || factor.packed.len() != packed_len(factor.dim) {
        bail!("the factor is of a {}×{} system; these rows need {expected}×{expected}", factor.dim, factor.dim);
    }
    let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
    let s = match factor.method {
        Method::Streamed => {
            // Y = M⁻¹ Gᵀ (m rows of k); S[q][i] = φ_i · y_q.
            let mut y = g64;
            solve_packed(&factor.packed, factor.dim, &mut y, m);
            let (a, sum) = row_dots(rows, &y, m, checksum); // n × m
            (transpose(&a, n, m), sum)
        }
        Method::PushThrough => {
            // A = Φ Gᵀ (n × m), S = (K⁻¹ A)ᵀ.
            let (a, sum) = row_dots(rows, &g64, m, checksum);
            let mut at = transpose(&a, n, m); // m rows of n
            solve_packed(&factor.packed, factor.dim, &mut at, m);
            (at, sum)
        }
    };
    if s.0.iter().any(|x| !x.is_finite()) {
        bail!("{} hold non-finite values; re-embed them", rows.name());
    }
    Ok(s)
}

/// Solves `L Lᵀ x = b` in place for `m` right-hand sides (`b`: m rows of `dim`).
fn solve_packed(packed: &[f64], dim: usize, b: &mut [f64], m: usize) {
    let row = |i: usize| &packed[i * (i + 1) / 2..i * (i + 1) / 2 + i + 1];
    if m >= 8 {
        // Many right-hand sides: faer's blocked, parallel solves on L laid out whole
        // (row i of L is column i of `u`, copied contiguously).
        let mut u = Mat::<f64>::zeros(dim, dim);
        for i in 0..dim {
            for (j, &x) in row(i).iter().enumerate() {
                u[(j, i)] = x;
            }
        }
        let l = u.transpose();
        let mut x = MatMut::from_column_major_slice_mut(b, dim, m);
        triangular_solve::solve_lower_triangular_in_place(l, x.as_mut(), par());
        triangular_solve::solve_upper_triangular_in_place(l.transpose(), x, par());
        return;
    }
    // Forward: L y = b.
    for i in 0..dim {
        let r = row(i);
        for q in 0..m {
            let x = &mut b[q * dim..(q + 1) * dim];
            x[i] = (x[i] - dot64(&r[..i], &x[..i])) / r[i];
        }
    }
    // Backward: Lᵀ x = y, column by column of Lᵀ (= row by row of L, read in order).
    for i in (0..dim).rev() {
        let r = row(i);
        for q in 0..m {
            let x = &mut b[q * dim..(q + 1) * dim];
            x[i] /= r[i];
            let xi = x[i];
            for (xj, lij) in x[..i].iter_mut().zip(&r[..i]) {
                *xj -= lij * xi;
            }
        }
    }
}

/// `Σ a_j b_j` with eight independent sums (so that it vectorises).
fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ a_j b_j` of f32 rows against f64 vectors, summed in f64.
fn dot_mixed(a: &[f32], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] as f64 * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(&x, y)| x as f64 * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// Rows per job when streaming Φ against the queries: a block converted to f64 stays
/// within a core's share of the cache-friendly working set (256 × 8192 × 8 B = 16 MB).
const DOT_ROWS: usize = 256;

/// `Φ Vᵀ` (n × m, row-major) for `v`: m rows of k, and with `hash` the rows' checksum
/// (each row hashed while it is in cache). Blocks of Φ are read in parallel; one query
/// is a dot product per row (memory-bound), several are a matrix product per block, so
/// that V is not re-read from memory for every row.
fn row_dots(rows: &dyn Rows, v: &[f64], m: usize, hash: bool) -> (Vec<f64>, Option<u64>) {
    let (n, k) = (rows.n(), rows.k());
    let mut out = vec![0f64; n * m];
    let mut hashes = vec![0u64; if hash { n } else { 0 }];
    let mut block_hashes = hashes.chunks_mut(DOT_ROWS);
    // (block number, its scores, its row hashes when asked for)
    type Job<'a> = (usize, &'a mut [f64], Option<&'a mut [u64]>);
    let jobs: Vec<Job> = out.chunks_mut(DOT_ROWS * m).enumerate().map(|(b, c)| (b, c, block_hashes.next())).collect();
    let vt = (m > 1).then(|| Mat::from_fn(k, m, |j, q| v[q * k + j]));
    jobs.into_par_iter().for_each(|(b, chunk, hs)| {
        let start = b * DOT_ROWS;
        let len = chunk.len() / m;
        let block = rows.block(start, len);
        match &vt {
            None => {
                for (o, phi) in chunk.iter_mut().zip(block.chunks_exact(k)) {
                    *o = dot_mixed(phi, v);
                }
            }
            Some(vt) => {
                let b64 = block_f64(&block, k, len);
                let mut prod = Mat::<f64>::zeros(len, m);
                faer::linalg::matmul::matmul(
                    prod.as_mut(),
                    Accum::Replace,
                    b64.transpose(),
                    vt.as_ref(),
                    1.0,
                    Par::Seq,
                );
                for i in 0..len {
                    for q in 0..m {
                        chunk[i * m + q] = prod[(i, q)];
                    }
                }
            }
        }
        if let Some(h) = hs {
            for (h, phi) in h.iter_mut().zip(block.chunks_exact(k)) {
                *h = row_hash(phi);
            }
        }
    });
    let sum = hash.then(|| combine_hashes(&hashes));
    (out, sum)
}

fn row_hash(row: &[f32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(row))
}

fn combine_hashes(hashes: &[u64]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(hashes))
}

/// A checksum of Φ's numbers: the hash of every row's hash (so it is computed a row at
/// a time, in any order, with the row in cache).
pub fn rows_checksum(rows: &dyn Rows) -> u64 {
    let (n, k) = (rows.n(), rows.k());
    let starts: Vec<usize> = (0..n).step_by(BLOCK_ROWS).collect();
    let hashes: Vec<u64> = starts
        .into_par_iter()
        .flat_map_iter(|s| {
            let len = BLOCK_ROWS.min(n - s);
            rows.block(s, len).chunks_exact(k).map(row_hash).collect::<Vec<_>>()
        })
        .collect();
    combine_hashes(&hashes)
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0f64; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// Row-major `len × k` f32 rows as a f64 matrix whose columns are the rows (k × len):
/// filled in memory order, used transposed.
fn block_f64(rows: &[f32], k: usize, len: usize) -> Mat<f64> {
    Mat::from_fn(k, len, |j, i| rows[i * k + j] as f64)
}

/// `dst (+)= B Bᵀ` on the lower triangle only (`b` is dim × len): the Cholesky
/// factorisation reads no more, and skipping the upper half halves the dominant cost.
fn gram_lower(dst: MatMut<'_, f64>, accum: Accum, b: MatRef<'_, f64>) {
    triangular::matmul(
        dst,
        BlockStructure::TriangularLower,
        accum,
        b,
        BlockStructure::Rectangular,
        b.transpose(),
        BlockStructure::Rectangular,
        1.0,
        par(),
    );
}

fn not_pd(lambda: f64) -> anyhow::Error {
    anyhow::anyhow!(
        "the kernel matrix is not positive definite (λ = {lambda}): training embeddings are linearly dependent; use a positive --lambda"
    )
}
/// One training row's influence on a query.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Influence {
    pub rank: usize,
    pub index: usize,
    pub name: String,
    pub score: f64,
    /// `score / Σ|scores| · 100`.
    pub percentage: f64,
    pub direction: &'static str,
}

/// The `top` rows by |score| (ties by index), with signed score and share.
pub fn top_influences(scores: &[f64], names: &[String], top: usize) -> Vec<Influence> {
    let total: f64 = scores.iter().map(|s| s.abs()).sum();
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()).then(a.cmp(&b)));
    idx.into_iter()
        .take(top)
        .enumerate()
        .map(|(rank, i)| Influence {
            rank: rank + 1,
            index: i,
            name: names.get(i).cloned().unwrap_or_default(),
            score: scores[i],
            percentage: if total > 0.0 { scores[i] / total * 100.0 } else { 0.0 },
            direction: if scores[i] >= 0.0 { "positively" } else { "negatively" },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| crate::rng::normal(seed, i as u64, 0) as f32).collect()
    }

    /// Direct dense reference: solve (ΦᵀΦ + λI) X = Gᵀ by Gauss–Jordan with partial
    /// pivoting (independent of faer and of the push-through identity), then S = (ΦX)ᵀ.
    fn reference(g: &[f32], m: usize, phi: &[f32], n: usize, k: usize, lambda: f64) -> Vec<f64> {
        let mut a = vec![0f64; k * k];
        for r in 0..n {
            for i in 0..k {
                for j in 0..k {
                    a[i * k + j] += phi[r * k + i] as f64 * phi[r * k + j] as f64;
                }
            }
        }
        for i in 0..k {
            a[i * k + i] += lambda;
        }
        let mut x: Vec<f64> = (0..k * m).map(|t| g[(t % m) * k + t / m] as f64).collect(); // k×m = Gᵀ
        for col in 0..k {
            let p = (col..k).max_by(|&i, &j| a[i * k + col].abs().total_cmp(&a[j * k + col].abs())).unwrap();
            for j in 0..k {
                a.swap(col * k + j, p * k + j);
            }
            for j in 0..m {
                x.swap(col * m + j, p * m + j);
            }
            let d = a[col * k + col];
            for row in 0..k {
                if row != col {
                    let f = a[row * k + col] / d;
                    for j in 0..k {
                        a[row * k + j] -= f * a[col * k + j];
                    }
                    for j in 0..m {
                        x[row * m + j] -= f * x[col * m + j];
                    }
                }
            }
        }
        for row in 0..k {
            let d = a[row * k + row];
            for j in 0..m {
                x[row * m + j] /= d;
            }
        }
        let mut s = vec![0f64; m * n];
        for q in 0..m {
            for r in 0..n {
                s[q * n + r] = (0..k).map(|i| phi[r * k + i] as f64 * x[i * m + q]).sum();
            }
        }
        s
    }

    #[test]
    fn both_forms_match_a_direct_dense_solve() {
        let (m, k) = (3, 24);
        for (n, lambda, method) in
            [(10, 1.0, Method::PushThrough), (50, 10.0, Method::Streamed), (5000, 0.5, Method::Streamed)]
        {
            let g = random(m * k, 1);
            let phi = random(n * k, 2);
            let (s, used) = scores(&g, m, &phi, n, k, lambda).unwrap();
            assert_eq!(used, method);
            let r = reference(&g, m, &phi, n, k, lambda);
            let scale = r.iter().fold(0f64, |a, b| a.max(b.abs()));
            let err = s.iter().zip(&r).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= 1e-9 * scale, "n={n}: max error {err} vs scale {scale}");
        }
    }

    #[test]
    fn top_influences_rank_by_magnitude_with_signed_shares() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let top = top_influences(&[1.0, -3.0, 0.5], &names, 2);
        assert_eq!(top[0].name, "b");
        assert_eq!(top[0].direction, "negatively");
        assert!((top[0].percentage + 3.0 / 4.5 * 100.0).abs() < 1e-12);
        assert_eq!(top[1].name, "a");
        assert_eq!(top.len(), 2);
    }

    #[test]
    fn a_factor_made_once_scores_new_queries_and_knows_its_rows() {
        let k = 16;
        for n in [9, 40] {
            let phi = random(n * k, 3);
            let rows = SliceRows { data: &phi, k };
            let factor = factorise(&rows, 0.7, &|_| {}).unwrap();
            assert_eq!(factor.method, Method::for_shape(n, k));
            let sum = rows_checksum(&rows);
            for (m, seed) in [(1, 4), (5, 5), (9, 7)] {
                let g = random(m * k, seed);
                let (s, found) = scores_factored(&g, m, &rows, &factor, true).unwrap();
                assert_eq!(found, Some(sum));
                let r = reference(&g, m, &phi, n, k, 0.7);
                let scale = r.iter().fold(0f64, |a, b| a.max(b.abs()));
                let err = s.iter().zip(&r).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                assert!(err <= 1e-9 * scale, "n={n} m={m}: max error {err}");
            }
            // One number changed: the checksum the pass returns no longer matches.
            let mut other = phi.clone();
            other[n * k / 2] += 1.0;
            let other_rows = SliceRows { data: &other, k };
            let (_, found) = scores_factored(&random(k, 6), 1, &other_rows, &factor, true).unwrap();
            assert_ne!(found, Some(sum));
            assert_eq!(found, Some(rows_checksum(&other_rows)));
        }
    }

    #[test]
    fn singular_kernels_are_explained() {
        let phi = vec![1f32; 4 * 3]; // identical rows
        let err = scores(&[1.0, 0.0, 0.0], 1, &phi, 4, 3, 0.0).unwrap_err();
        assert!(format!("{err}").contains("positive definite"));
    }
}
