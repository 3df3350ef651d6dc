//! TRAK scores `S = G (ΦᵀΦ + λI)⁻¹ Φᵀ` (m queries × n training rows), in f64 with faer.
//!
//! With fewer training rows than dimensions (n < k) the push-through identity gives the
//! same matrix from an n×n system, `S = G Φᵀ (ΦΦᵀ + λI)⁻¹`; otherwise `ΦᵀΦ` is
//! accumulated over row blocks (so a memory-mapped Φ is streamed, never copied whole)
//! and the k×k system is solved. Both use a Cholesky factorisation: never an inverse.

use anyhow::{bail, Result};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

/// Rows converted per block when streaming Φ.
const BLOCK_ROWS: usize = 2048;

fn par() -> Par {
    Par::rayon(0)
}

/// Rows `[start, start+len)` of a row-major f32 matrix with `k` columns, as f64.
fn block_f64(data: &[f32], k: usize, start: usize, len: usize) -> Mat<f64> {
    let rows = &data[start * k..(start + len) * k];
    Mat::from_fn(len, k, |i, j| rows[i * k + j] as f64)
}

/// Which algebra was used (for reports and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// n×n system (n < k).
    PushThrough,
    /// k×k system, Φ streamed in blocks.
    Streamed,
}

/// `S` (row-major m × n) for queries `g` (m × k) and training rows `phi` (n × k).
pub fn scores(g: &[f32], m: usize, phi: &[f32], n: usize, k: usize, lambda: f64) -> Result<(Vec<f64>, Method)> {
    if g.len() != m * k || phi.len() != n * k {
        bail!("score: matrices do not match their shapes");
    }
    if !(lambda.is_finite() && lambda >= 0.0) {
        bail!("--lambda must be a finite number ≥ 0, got {lambda}");
    }
    if n == 0 || m == 0 {
        bail!("score: no {} rows", if n == 0 { "training" } else { "query" });
    }
    let g64 = block_f64(g, k, 0, m);
    if n < k {
        let phi64 = block_f64(phi, k, 0, n);
        // K = ΦΦᵀ + λI (n×n), A = GΦᵀ (m×n), S = A K⁻¹ = (K⁻¹ Aᵀ)ᵀ (K symmetric).
        let mut kern = Mat::<f64>::zeros(n, n);
        gram_lower(kern.as_mut(), Accum::Replace, phi64.transpose());
        for i in 0..n {
            kern[(i, i)] += lambda;
        }
        let mut at = Mat::<f64>::zeros(n, m);
        matmul(at.as_mut(), Accum::Replace, phi64.as_ref(), g64.transpose(), 1.0, par());
        let llt = kern.llt(Side::Lower).map_err(|_| not_pd(lambda))?;
        llt.solve_in_place(at.as_mut());
        Ok((row_major_transposed(at.as_ref()), Method::PushThrough))
    } else {
        // M = ΦᵀΦ + λI (k×k), accumulated block by block.
        let mut gram = Mat::<f64>::zeros(k, k);
        let mut start = 0;
        while start < n {
            let len = BLOCK_ROWS.min(n - start);
            let b = block_f64(phi, k, start, len);
            gram_lower(gram.as_mut(), Accum::Add, b.as_ref());
            start += len;
        }
        for i in 0..k {
            gram[(i, i)] += lambda;
        }
        // Y = M⁻¹ Gᵀ (k×m); S = (Φ Y)ᵀ, computed per block of Φ.
        let mut y = g64.transpose().to_owned();
        let llt = gram.llt(Side::Lower).map_err(|_| not_pd(lambda))?;
        drop(gram);
        llt.solve_in_place(y.as_mut());
        let mut s = vec![0f64; m * n];
        let mut start = 0;
        while start < n {
            let len = BLOCK_ROWS.min(n - start);
            let b = block_f64(phi, k, start, len);
            let mut sb = Mat::<f64>::zeros(len, m);
            matmul(sb.as_mut(), Accum::Replace, b.as_ref(), y.as_ref(), 1.0, par());
            for i in 0..len {
                for q in 0..m {
                    s[q * n + start + i] = sb[(i, q)];
                }
            }
            start += len;
        }
        Ok((s, Method::Streamed))
    }
}

/// `dst (+)= Bᵀ B` on the lower triangle only: the Cholesky factorisation reads no
/// more, and skipping the upper half halves the dominant cost (n·k² for the Gram).
fn gram_lower(dst: MatMut<'_, f64>, accum: Accum, b: MatRef<'_, f64>) {
    triangular::matmul(
        dst,
        BlockStructure::TriangularLower,
        accum,
        b.transpose(),
        BlockStructure::Rectangular,
        b,
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

/// `a` (n × m) -> row-major m × n.
fn row_major_transposed(a: MatRef<'_, f64>) -> Vec<f64> {
    let (n, m) = (a.nrows(), a.ncols());
    let mut out = vec![0f64; m * n];
    for q in 0..m {
        for i in 0..n {
            out[q * n + i] = a[(i, q)];
        }
    }
    out
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
    fn singular_kernels_are_explained() {
        let phi = vec![1f32; 4 * 3]; // identical rows
        let err = scores(&[1.0, 0.0, 0.0], 1, &phi, 4, 3, 0.0).unwrap_err();
        assert!(format!("{err}").contains("positive definite"));
    }
}
