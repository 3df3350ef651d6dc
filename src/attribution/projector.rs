//! Random projections of a gradient from D numbers to k.
//!
//! Every matrix entry is a pure function of (seed, row, global parameter index), drawn
//! from the counter-based generator, so the D×k matrix is never stored, gradients stream
//! through tensor by tensor, and the result is bit-identical for any thread count or
//! chunking: each output row is a sum over the parameter index in increasing order,
//! accumulated in f64, and threads split the rows, never a row's sum.

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::rng::{hash, mix64};

/// The projection kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProjectorKind {
    /// Dense Gaussian N(0, 1/k): the earlier tool's and TRAK's. Cost O(D·k).
    Normal,
    /// Dense ±1/√k. Cost O(D·k), cheaper per entry than `normal`.
    Rademacher,
    /// Sparse JL (block CountSketch): each coordinate lands in `s` rows, one per block
    /// of k/s rows, with sign ±1/√s. Cost O(D·s): the CPU default.
    Sparse,
    /// No projection: the raw gradient (k = D), for small models and debugging.
    Identity,
}

/// Settings that fix a projection; stored in every embedding file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectorSpec {
    pub kind: ProjectorKind,
    pub seed: u64,
    /// Output dimension k.
    pub k: usize,
    /// Input dimension D (gradient length).
    pub d: usize,
    /// Non-zeros per column of the sparse projection.
    pub sparsity: usize,
}

/// `JL(n, eps) = 4 ln n / (eps²/2 − eps³/3)`.
pub fn jl_dimension(n: usize, eps: f64) -> f64 {
    4.0 * (n as f64).ln() / (eps * eps / 2.0 - eps * eps * eps / 3.0)
}

/// The earlier tool's rule: `k = 512 · floor(JL(D, 0.15) / 512)`.
pub fn default_k(d: usize) -> usize {
    512 * (jl_dimension(d, 0.15) / 512.0).floor() as usize
}

impl ProjectorSpec {
    /// Resolves the output dimension and validates the settings.
    pub fn new(kind: ProjectorKind, seed: u64, k: Option<usize>, d: usize, sparsity: usize) -> Result<Self> {
        let k = match (kind, k) {
            (ProjectorKind::Identity, Some(k)) if k != d => {
                bail!("--proj-dim {k} conflicts with the identity projection, whose dimension is the gradient's ({d})")
            }
            (ProjectorKind::Identity, _) => d,
            (_, Some(0)) => bail!("--proj-dim must be positive"),
            (_, Some(k)) if k > d => {
                bail!("--proj-dim {k} exceeds the gradient's {d} numbers; use a smaller k or --projector identity")
            }
            (_, Some(k)) => k,
            (_, None) => {
                let k = default_k(d);
                if k == 0 || k > d {
                    bail!("the default k = 512·floor(JL(D, 0.15)/512) = {k} does not fit D = {d}; pass --proj-dim or --projector identity");
                }
                k
            }
        };
        if kind == ProjectorKind::Sparse {
            if sparsity == 0 || sparsity > k || !k.is_multiple_of(sparsity) {
                bail!("the sparse projection needs k ({k}) to be a multiple of --proj-sparsity ({sparsity})");
            }
            if k / sparsity > 1 << 15 {
                bail!(
                    "the sparse projection supports at most 32768 rows per block (k / sparsity); raise --proj-sparsity"
                );
            }
        }
        Ok(Self { kind, seed, k, d, sparsity })
    }

    /// A fresh accumulator for one example.
    pub fn start(&self) -> Projection {
        Projection { spec: self.clone(), acc: vec![0.0; self.k], next: 0, added: 0 }
    }
}

/// Rows handled together: one hash yields 64 Rademacher signs or 32 Gaussian pairs.
const ROW_BLOCK: usize = 64;

/// The projection of one gradient, filled as its pieces stream by.
pub struct Projection {
    spec: ProjectorSpec,
    acc: Vec<f64>,
    /// Next expected global index: pieces must come in order, without gaps.
    next: usize,
    /// Entries given through `add` (any order; a range may come several times).
    added: usize,
}

impl Projection {
    /// Adds the gradient entries `values` at global indices `offset..offset+len`, in order
    /// and without gaps (checked by `finish`).
    pub fn update(&mut self, offset: usize, values: &[f32]) -> Result<()> {
        if offset != self.next {
            bail!("projection fed out of order: expected index {}, got {offset}", self.next);
        }
        self.next += values.len();
        self.add(offset, values)?;
        self.added -= values.len();
        Ok(())
    }

    /// Adds `P[:, offset..offset+len] · values` in any order: the projection is linear, so
    /// pieces of a sum (one per generation window) may come one after another. Finish
    /// with `finish_added`.
    pub fn add(&mut self, offset: usize, values: &[f32]) -> Result<()> {
        if offset + values.len() > self.spec.d {
            bail!("gradient longer than the projector's D = {}", self.spec.d);
        }
        self.added += values.len();
        let seed = self.spec.seed;
        match self.spec.kind {
            ProjectorKind::Identity => {
                for (a, &v) in self.acc[offset..].iter_mut().zip(values) {
                    *a += v as f64;
                }
            }
            ProjectorKind::Rademacher => {
                self.acc.par_chunks_mut(ROW_BLOCK).enumerate().for_each(|(blk, rows)| {
                    for (j, &v) in values.iter().enumerate() {
                        let bits = hash(seed, &[(offset + j) as u64, blk as u64]);
                        let v = v as f64;
                        // Branch-free sign: a set bit keeps +v, a clear bit flips the sign bit.
                        for (b, a) in rows.iter_mut().enumerate() {
                            *a += f64::from_bits(v.to_bits() ^ ((!(bits >> b) & 1) << 63));
                        }
                    }
                });
            }
            ProjectorKind::Normal => {
                self.acc.par_chunks_mut(ROW_BLOCK).enumerate().for_each(|(blk, rows)| {
                    let mut z = [0f64; ROW_BLOCK];
                    for (j, &v) in values.iter().enumerate() {
                        gaussian_block(seed, (offset + j) as u64, blk as u64, &mut z[..rows.len()]);
                        let v = v as f64;
                        for (a, zb) in rows.iter_mut().zip(&z) {
                            *a += v * zb;
                        }
                    }
                });
            }
            ProjectorKind::Sparse => {
                let block = self.spec.k / self.spec.sparsity;
                let key = mix64(seed ^ 0x5350_4152_5345); // "SPARSE"

                // One 64-bit hash per (coordinate, group of four blocks): 16 bits per block,
                // 15 for the row within the block and 1 for the sign. Threads take groups.
                self.acc.par_chunks_mut(4 * block).enumerate().for_each(|(group, rows)| {
                    // `(index << 16) | group` hashed under `key` = `index << 16` under `key ^ group`.
                    let (key, first) = (key ^ group as u64, offset as u64);
                    match rows.len() / block {
                        4 => sparse_group::<4>(rows, block, key, first, values),
                        3 => sparse_group::<3>(rows, block, key, first, values),
                        2 => sparse_group::<2>(rows, block, key, first, values),
                        _ => sparse_group::<1>(rows, block, key, first, values),
                    }
                });
            }
        }
        Ok(())
    }

    /// The finished k-dimensional embedding of a gradient fed with `update`.
    pub fn finish(self) -> Result<Vec<f32>> {
        if self.next != self.spec.d {
            bail!("projection incomplete: {} of {} gradient entries", self.next, self.spec.d);
        }
        self.scaled()
    }

    /// The finished embedding of pieces fed with `add`, which must total `expected` entries.
    pub fn finish_added(self, expected: usize) -> Result<Vec<f32>> {
        if self.added != expected {
            bail!("projection incomplete: {} of {expected} gradient entries", self.added);
        }
        self.scaled()
    }

    fn scaled(self) -> Result<Vec<f32>> {
        let scale = match self.spec.kind {
            ProjectorKind::Identity => 1.0,
            ProjectorKind::Normal | ProjectorKind::Rademacher => 1.0 / (self.spec.k as f64).sqrt(),
            ProjectorKind::Sparse => 1.0 / (self.spec.sparsity as f64).sqrt(),
        };
        Ok(self.acc.iter().map(|&a| (a * scale) as f32).collect())
    }
}

/// Projects several whole gradients with one spec. For the dense kinds each matrix entry
/// is drawn once for all of them (the draw is most of a dense projection's cost); the
/// results are bit-identical to projecting each gradient on its own.
pub fn project_all(spec: &ProjectorSpec, grads: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
    if let Some(g) = grads.iter().find(|g| g.len() != spec.d) {
        bail!("a gradient of {} numbers for a projection of D = {}", g.len(), spec.d);
    }
    if !matches!(spec.kind, ProjectorKind::Normal | ProjectorKind::Rademacher) || grads.len() < 2 {
        return grads
            .iter()
            .map(|g| {
                let mut p = spec.start();
                p.update(0, g)?;
                p.finish()
            })
            .collect();
    }
    let (seed, kind, e) = (spec.seed, spec.kind, grads.len());
    let blocks: Vec<Vec<Vec<f64>>> = (0..spec.k.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let n = ROW_BLOCK.min(spec.k - blk * ROW_BLOCK);
            let mut acc = vec![vec![0f64; n]; e];
            let mut z = [0f64; ROW_BLOCK];
            for j in 0..spec.d {
                match kind {
                    ProjectorKind::Normal => gaussian_block(seed, j as u64, blk as u64, &mut z[..n]),
                    _ => {
                        let bits = hash(seed, &[j as u64, blk as u64]);
                        for (b, zb) in z[..n].iter_mut().enumerate() {
                            *zb = if (bits >> b) & 1 == 1 { 1.0 } else { -1.0 };
                        }
                    }
                }
                for (a, g) in acc.iter_mut().zip(grads) {
                    let v = g[j] as f64;
                    for (x, zb) in a.iter_mut().zip(&z) {
                        *x += v * zb;
                    }
                }
            }
            acc
        })
        .collect();
    let scale = 1.0 / (spec.k as f64).sqrt();
    Ok((0..e).map(|i| blocks.iter().flat_map(|b| b[i].iter().map(|&a| (a * scale) as f32)).collect()).collect())
}

/// Adds the coordinates `values` (global indices from `first`) into the `N` blocks of
/// `block` rows that make up `rows`. `key` already carries the group index (low 16 bits).
/// `N` is a constant so that the per-block work unrolls.
fn sparse_group<const N: usize>(rows: &mut [f64], block: usize, key: u64, first: u64, values: &[f32]) {
    debug_assert_eq!(rows.len(), N * block);
    let mut parts: [&mut [f64]; N] = std::array::from_fn(|_| &mut [][..]);
    let mut rest = rows;
    for part in parts.iter_mut() {
        let (head, tail) = rest.split_at_mut(block);
        *part = head;
        rest = tail;
    }
    let block = block as u64;
    for (j, &v) in values.iter().enumerate() {
        let h = mix64(key ^ ((first + j as u64) << 16));
        let v = (v as f64).to_bits();
        for (b, part) in parts.iter_mut().enumerate() {
            let field = (h >> (16 * b)) & 0xFFFF;
            // (field >> 1) < 2¹⁵, so the row is below `block`.
            let row = (((field >> 1) * block) >> 15) as usize;
            // Branch-free sign (random signs defeat branch prediction).
            part[row] += f64::from_bits(v ^ ((!field & 1) << 63));
        }
    }
}

/// Standard normals for rows `blk·64 ..` of column `col` (Box–Muller, two per hash).
fn gaussian_block(seed: u64, col: u64, blk: u64, out: &mut [f64]) {
    let mut i = 0;
    let mut pair = 0u64;
    while i < out.len() {
        let h1 = hash(seed ^ 0x4E4F_524D, &[col, blk, pair]);
        let h2 = mix64(h1 ^ 0xD6E8_FEB8_6659_FD93);
        let u1 = ((h1 >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        let u2 = (h2 >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        out[i] = r * c;
        if i + 1 < out.len() {
            out[i + 1] = r * s;
        }
        i += 2;
        pair += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(seed: u64, d: usize) -> Vec<f32> {
        (0..d).map(|i| crate::rng::normal(seed, i as u64, 9) as f32).collect()
    }

    fn project(spec: &ProjectorSpec, v: &[f32], chunk: usize) -> Vec<f32> {
        let mut p = spec.start();
        for (i, c) in v.chunks(chunk).enumerate() {
            p.update(i * chunk, c).unwrap();
        }
        p.finish().unwrap()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn jl_rule_matches_the_earlier_tool() {
        // About 8192 for a 3.3B-parameter model.
        assert_eq!(default_k(3_300_000_000), 8192);
        assert!(jl_dimension(1000, 0.15) > 2700.0 && jl_dimension(1000, 0.15) < 2740.0);
    }

    #[test]
    fn inner_products_are_preserved_within_the_jl_bound() {
        let d = 3000;
        let k = 1024;
        let vs: Vec<Vec<f32>> = (0..6).map(|s| vector(s, d)).collect();
        for kind in [ProjectorKind::Normal, ProjectorKind::Rademacher, ProjectorKind::Sparse] {
            let spec = ProjectorSpec::new(kind, 42, Some(k), d, 8).unwrap();
            let ps: Vec<Vec<f32>> = vs.iter().map(|v| project(&spec, v, 777)).collect();
            // JL: |<Pu,Pv> − <u,v>| ≤ eps·|u||v| with eps ~ sqrt(8 ln(n) / k) for n points.
            let eps = (8.0 * (vs.len() as f64).ln() / k as f64).sqrt();
            for i in 0..vs.len() {
                for j in 0..vs.len() {
                    let exact = dot(&vs[i], &vs[j]);
                    let approx = dot(&ps[i], &ps[j]);
                    let bound = eps * dot(&vs[i], &vs[i]).sqrt() * dot(&vs[j], &vs[j]).sqrt();
                    assert!((approx - exact).abs() <= bound, "{kind:?} ({i},{j}): {approx} vs {exact} (bound {bound})");
                }
            }
        }
    }

    #[test]
    fn sparse_matrix_is_the_documented_one() {
        // Entry by entry: coordinate i lands in one row of each of the s blocks, chosen with
        // its sign by 16 bits of mix64(key ^ (i << 16 | group)), groups of four blocks per hash.
        let d = 300;
        let v = vector(6, d);
        for sparsity in [8, 6, 3] {
            let k = 24 * sparsity;
            let block = k / sparsity;
            let spec = ProjectorSpec::new(ProjectorKind::Sparse, 11, Some(k), d, sparsity).unwrap();
            let key = mix64(11 ^ 0x5350_4152_5345);
            let mut acc = vec![0f64; k];
            for (i, &x) in v.iter().enumerate() {
                for t in 0..sparsity {
                    let (group, b) = (t / 4, t % 4);
                    let h = mix64(key ^ ((i as u64) << 16 | group as u64));
                    let field = (h >> (16 * b)) & 0xFFFF;
                    let row = t * block + (((field >> 1) as usize * block) >> 15);
                    acc[row] += if field & 1 == 1 { x as f64 } else { -(x as f64) };
                }
            }
            let want: Vec<f32> = acc.iter().map(|a| (a / (sparsity as f64).sqrt()) as f32).collect();
            assert_eq!(project(&spec, &v, 97), want, "sparsity {sparsity}");
        }
    }

    #[test]
    fn projecting_together_gives_the_same_bits() {
        let vs: Vec<Vec<f32>> = (0..3).map(|s| vector(20 + s, 700)).collect();
        for kind in [ProjectorKind::Normal, ProjectorKind::Rademacher, ProjectorKind::Sparse] {
            // k not a multiple of the row block: the last block is partial.
            let spec = ProjectorSpec::new(kind, 9, Some(200), 700, 8).unwrap();
            let together = project_all(&spec, &vs).unwrap();
            for (v, t) in vs.iter().zip(&together) {
                assert_eq!(&project(&spec, v, 123), t, "{kind:?}");
            }
        }
    }

    #[test]
    fn identity_is_the_raw_gradient() {
        let v = vector(3, 100);
        let spec = ProjectorSpec::new(ProjectorKind::Identity, 42, None, 100, 8).unwrap();
        assert_eq!(project(&spec, &v, 13), v);
    }

    #[test]
    fn chunking_and_threads_do_not_change_bits() {
        let v = vector(4, 5000);
        for kind in [ProjectorKind::Normal, ProjectorKind::Rademacher, ProjectorKind::Sparse] {
            let spec = ProjectorSpec::new(kind, 7, Some(512), 5000, 8).unwrap();
            let a = project(&spec, &v, 5000);
            let b = project(&spec, &v, 3);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let c = pool.install(|| project(&spec, &v, 1000));
            assert_eq!(a, b, "{kind:?} chunking");
            assert_eq!(a, c, "{kind:?} threads");
        }
    }

    #[test]
    fn seeds_matter_and_settings_are_validated() {
        let v = vector(5, 2000);
        let a = project(&ProjectorSpec::new(ProjectorKind::Sparse, 1, Some(256), 2000, 8).unwrap(), &v, 2000);
        let b = project(&ProjectorSpec::new(ProjectorKind::Sparse, 2, Some(256), 2000, 8).unwrap(), &v, 2000);
        assert_ne!(a, b);
        assert!(ProjectorSpec::new(ProjectorKind::Normal, 1, Some(0), 2000, 8).is_err());
        assert!(ProjectorSpec::new(ProjectorKind::Normal, 1, Some(2001), 2000, 8).is_err());
        assert!(ProjectorSpec::new(ProjectorKind::Sparse, 1, Some(100), 2000, 8).is_err());
        assert!(ProjectorSpec::new(ProjectorKind::Identity, 1, Some(5), 2000, 8).is_err());
        let mut p = ProjectorSpec::new(ProjectorKind::Normal, 1, Some(64), 100, 8).unwrap().start();
        assert!(p.update(5, &[1.0]).is_err(), "gaps are refused");
    }
}
