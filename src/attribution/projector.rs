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
    /// Sparse, in two stages (projector version 3): a CountSketch of the D coordinates
    /// into M ≥ 8k buckets (each coordinate added with a random sign to one bucket; the 16
    /// coordinates of an aligned group go to the 16 buckets of one line, lanes permuted by
    /// the group's hash), then the block sparse JL of the M buckets to k (each bucket in `s`
    /// rows, one per block of k/s rows, sign ±1/√s). Cost O(D) plus O(M·s): the CPU default.
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
    /// Which definition of the matrix (files of another version are refused, not mixed):
    /// 1 for headers that predate the field.
    #[serde(default = "first_version")]
    pub version: u32,
}

fn first_version() -> u32 {
    1
}

/// The version of each kind's matrix this build computes. Sparse is 3. Version 1 put
/// every coordinate straight into `s` rows (two hashes and `s` scattered additions per
/// coordinate: about 2% of memory bandwidth); version 2 hashed each coordinate to its own
/// bucket (one scattered addition per coordinate); version 3 hashes groups of 16
/// coordinates to a line of 16 buckets (one cache line per 16 coordinates).
pub fn current_version(kind: ProjectorKind) -> u32 {
    match kind {
        ProjectorKind::Sparse => 3,
        _ => 1,
    }
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
        Ok(Self { kind, seed, k, d, sparsity, version: current_version(kind) })
    }

    /// A fresh accumulator for one example.
    pub fn start(&self) -> Projection {
        let sketch = match self.kind {
            ProjectorKind::Sparse => Some(Sketch::new(self)),
            _ => None,
        };
        Projection { spec: self.clone(), acc: vec![0.0; self.k], next: 0, added: 0, sketch }
    }
}

/// Coordinates per span of the sparse projection's first stage: spans (aligned on
/// global indices) are summed on their own (in f32, about four coordinates per bucket),
/// in parallel, then added into the f64 buckets in index order, so the result does not
/// depend on the thread count or on how the gradient is cut.
const SPAN: usize = 1 << 18;

/// Coordinates per group of the first stage, and buckets per line: one cache line of f32.
const LANES: usize = 16;

/// One line of first-stage buckets, aligned so that a group's additions touch one cache
/// line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; LANES]);

/// The first stage of the sparse projection: `M` buckets, and the span in progress.
struct Sketch {
    /// log2 of the number of lines, M / 16.
    line_bits: u32,
    key: u64,
    buckets: Vec<f64>,
    /// The partial sums of the span being filled, and the next index it expects.
    open: Vec<Line>,
    open_next: Option<usize>,
    /// Reused partial sums of whole spans summed in parallel.
    partials: Vec<Vec<Line>>,
}

impl Sketch {
    fn new(spec: &ProjectorSpec) -> Self {
        let m = (8 * spec.k).next_power_of_two().max(1 << 16);
        let key = mix64(spec.seed ^ 0x434F_554E_5453); // "COUNTS"
        Self {
            line_bits: (m / LANES).trailing_zeros(),
            key,
            buckets: vec![0.0; m],
            open: vec![Line([0.0; LANES]); m / LANES],
            open_next: None,
            partials: Vec::new(),
        }
    }

    /// Adds coordinates `first..first+values.len()`.
    fn add(&mut self, first: usize, values: &[f32]) {
        let (line_bits, key) = (self.line_bits, self.key);
        let mut first = first;
        let mut values = values;
        // A span already open continues only with its next index; otherwise it is closed.
        if self.open_next.is_some_and(|n| n != first) {
            self.close();
        }
        // Head: the rest of a span begun here or in an earlier call.
        if !first.is_multiple_of(SPAN) || values.len() < SPAN {
            let len = (SPAN - first % SPAN).min(values.len());
            sketch_span(line_bits, key, first, &values[..len], &mut self.open);
            self.open_next = Some(first + len);
            if (first + len).is_multiple_of(SPAN) {
                self.close();
            }
            first += len;
            values = &values[len..];
        }
        // Whole spans, a few per thread at a time, added in index order.
        let whole = values.len() / SPAN * SPAN;
        let lines = self.open.len();
        let batch = 2 * rayon::current_num_threads().max(1);
        for (g, group) in values[..whole].chunks(batch * SPAN).enumerate() {
            let spans = group.len() / SPAN;
            while self.partials.len() < spans {
                self.partials.push(vec![Line([0.0; LANES]); lines]);
            }
            let start = first + g * batch * SPAN;
            self.partials[..spans].par_iter_mut().zip(group.par_chunks(SPAN)).enumerate().for_each(
                |(i, (acc, span))| {
                    // (Zeroed by the merge below, or fresh.)
                    sketch_span(line_bits, key, start + i * SPAN, span, acc);
                },
            );
            // Each bucket adds the spans in index order, and leaves them zeroed for reuse.
            const CHUNK: usize = 4096;
            let mut slices: Vec<std::slice::ChunksMut<Line>> =
                self.partials[..spans].iter_mut().map(|p| p.chunks_mut(CHUNK / LANES)).collect();
            let jobs: Vec<(&mut [f64], Vec<&mut [Line]>)> = self
                .buckets
                .chunks_mut(CHUNK)
                .map(|out| (out, slices.iter_mut().filter_map(Iterator::next).collect()))
                .collect();
            jobs.into_par_iter().for_each(|(out, parts)| {
                for p in parts {
                    merge_lines(out, p);
                }
            });
        }
        // Tail: a span to be continued.
        if whole < values.len() {
            sketch_span(line_bits, key, first + whole, &values[whole..], &mut self.open);
            self.open_next = Some(first + values.len());
        }
    }

    /// Adds the open span's sums to the buckets.
    fn close(&mut self) {
        if self.open_next.take().is_some() {
            merge_lines(&mut self.buckets, &mut self.open);
        }
    }
}

/// `out[b] += lines[b / 16][b % 16]` in f64, leaving the lines zeroed.
fn merge_lines(out: &mut [f64], lines: &mut [Line]) {
    for (o16, line) in out.chunks_mut(LANES).zip(lines.iter_mut()) {
        for (o, x) in o16.iter_mut().zip(line.0.iter_mut()) {
            *o += *x as f64;
            *x = 0.0;
        }
    }
}

/// The first-stage hash of the group of coordinates `16·g .. 16·g + 16`: its line (the
/// top `line_bits` bits), the rotation of its lanes (bits 16..20) and one sign per lane
/// (bits 0..16; a set bit flips the sign).
#[inline(always)]
fn group_hash(key: u64, g: u64) -> u64 {
    mix64(key ^ g)
}

/// The line of a group hashed `h`, among `2^line_bits`.
#[inline(always)]
fn line_of(h: u64, line_bits: u32) -> usize {
    (h >> (64 - line_bits)) as usize
}

/// The rotation of a group hashed `h`: lane `l` goes to bucket `l ^ rotation` of its line.
#[inline(always)]
fn rotation_of(h: u64) -> usize {
    ((h >> 16) & 15) as usize
}

/// Adds `values` as lanes `lane..` of the group hashed `h`: lane `l` goes with sign bit
/// `l` of `h` into bucket `l ^ rotation` of the group's line. The rotation makes two
/// coordinates of different groups share a bucket with probability exactly 1/M, whatever
/// their lanes (a gradient concentrated on every 16th coordinate still uses all M buckets).
#[inline(always)]
fn add_lanes(line_bits: u32, h: u64, lane: usize, values: &[f32], acc: &mut [Line]) {
    let line = &mut acc[line_of(h, line_bits)].0;
    let rotation = rotation_of(h);
    for (l, &v) in (lane..LANES).zip(values) {
        line[l ^ rotation] += f32::from_bits(v.to_bits() ^ ((((h >> l) & 1) as u32) << 31));
    }
}

/// Adds coordinates `first..` of one span into `acc`, each bucket in index order (integer
/// hashing, sign flips and one f32 addition per coordinate are exact to reorder across
/// groups, so every instruction set gives the same bits).
fn sketch_span(line_bits: u32, key: u64, first: usize, values: &[f32], acc: &mut [Line]) {
    // A group begun before `first`, then whole groups, then a group left open.
    let head = ((LANES - first % LANES) % LANES).min(values.len());
    let (head_values, rest) = values.split_at(head);
    if head > 0 {
        add_lanes(line_bits, group_hash(key, (first / LANES) as u64), first % LANES, head_values, acc);
    }
    let whole = rest.len() / LANES * LANES;
    let (body, tail) = rest.split_at(whole);
    let g0 = (first + head) / LANES;
    sketch_groups(line_bits, key, g0 as u64, body, acc);
    if !tail.is_empty() {
        add_lanes(line_bits, group_hash(key, (g0 + whole / LANES) as u64), 0, tail, acc);
    }
}

/// Whole groups `g0..` (`values.len()` a multiple of 16), with the widest vectors the CPU has.
fn sketch_groups(line_bits: u32, key: u64, g0: u64, values: &[f32], acc: &mut [Line]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reports AVX-512F.
            return unsafe { groups_avx512(line_bits, key, g0, values, acc) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU reports AVX2.
            return unsafe { groups_avx2(line_bits, key, g0, values, acc) };
        }
    }
    groups_portable(line_bits, key, g0, values, acc)
}

fn groups_portable(line_bits: u32, key: u64, g0: u64, values: &[f32], acc: &mut [Line]) {
    for (g, group) in (g0..).zip(values.chunks_exact(LANES)) {
        add_lanes(line_bits, group_hash(key, g), 0, group, acc);
    }
}

/// A group is one 512-bit vector: sign flips under a mask, the rotation as one permute,
/// one load-add-store of its line.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn groups_avx512(line_bits: u32, key: u64, g0: u64, values: &[f32], acc: &mut [Line]) {
    use std::arch::x86_64::*;
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let sign = _mm512_set1_epi32(i32::MIN);
    for (g, group) in (g0..).zip(values.chunks_exact(LANES)) {
        let h = group_hash(key, g);
        let line = &mut acc[line_of(h, line_bits)];
        // SAFETY: `group` holds 16 f32 and `line` is a 64-byte aligned line of 16 f32.
        unsafe {
            let x = _mm512_castps_si512(_mm512_loadu_ps(group.as_ptr()));
            let x = _mm512_castsi512_ps(_mm512_mask_xor_epi32(x, h as u16, x, sign));
            // Lane l to l ^ rotation: output lane j takes input lane j ^ rotation.
            let x = _mm512_permutexvar_ps(_mm512_xor_si512(iota, _mm512_set1_epi32(rotation_of(h) as i32)), x);
            let p = line.0.as_mut_ptr();
            _mm512_store_ps(p, _mm512_add_ps(_mm512_load_ps(p), x));
        }
    }
}

/// A group is two 256-bit halves: signs from a bit test, the rotation as a permute within
/// halves and a blend that swaps them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn groups_avx2(line_bits: u32, key: u64, g0: u64, values: &[f32], acc: &mut [Line]) {
    use std::arch::x86_64::*;
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let bits_lo = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let bits_hi = _mm256_slli_epi32::<8>(bits_lo);
    let sign = _mm256_set1_epi32(i32::MIN);
    for (g, group) in (g0..).zip(values.chunks_exact(LANES)) {
        let h = group_hash(key, g);
        let line = &mut acc[line_of(h, line_bits)];
        let rotation = rotation_of(h) as i32;
        let signs = _mm256_set1_epi32((h & 0xFFFF) as i32);
        let flip_lo = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(signs, bits_lo), bits_lo), sign);
        let flip_hi = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(signs, bits_hi), bits_hi), sign);
        let within = _mm256_xor_si256(iota, _mm256_set1_epi32(rotation & 7));
        // All ones when rotation ≥ 8: the halves trade places.
        let swap = _mm256_castsi256_ps(_mm256_set1_epi32(-(rotation >> 3)));
        // SAFETY: `group` holds 16 f32 and `line` is a 64-byte aligned line of 16 f32.
        unsafe {
            let p = group.as_ptr();
            let lo = _mm256_xor_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(flip_lo));
            let hi = _mm256_xor_ps(_mm256_loadu_ps(p.add(8)), _mm256_castsi256_ps(flip_hi));
            let lo = _mm256_permutevar8x32_ps(lo, within);
            let hi = _mm256_permutevar8x32_ps(hi, within);
            let (out_lo, out_hi) = (_mm256_blendv_ps(lo, hi, swap), _mm256_blendv_ps(hi, lo, swap));
            let a = line.0.as_mut_ptr();
            _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), out_lo));
            _mm256_store_ps(a.add(8), _mm256_add_ps(_mm256_load_ps(a.add(8)), out_hi));
        }
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
    /// The sparse projection's first stage.
    sketch: Option<Sketch>,
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
        if self.spec.version != current_version(self.spec.kind) {
            bail!(
                "the {:?} projection of version {} is not computed by this build (version {}); re-embed with this build",
                self.spec.kind,
                self.spec.version,
                current_version(self.spec.kind)
            );
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
                if let Some(sketch) = self.sketch.as_mut() {
                    sketch.add(offset, values);
                }
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

    fn scaled(mut self) -> Result<Vec<f32>> {
        if let Some(mut sketch) = self.sketch.take() {
            // Second stage: the block sparse JL of the M buckets to k rows.
            sketch.close();
            let block = self.spec.k / self.spec.sparsity;
            let key = mix64(self.spec.seed ^ 0x5350_4152_5345); // "SPARSE"
            self.acc.par_chunks_mut(4 * block).enumerate().for_each(|(group, rows)| {
                let key = key ^ group as u64;
                let b = &sketch.buckets;
                match rows.len() / block {
                    4 => sparse_group::<4>(rows, block, key, 0, b),
                    3 => sparse_group::<3>(rows, block, key, 0, b),
                    2 => sparse_group::<2>(rows, block, key, 0, b),
                    _ => sparse_group::<1>(rows, block, key, 0, b),
                }
            });
        }
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

/// Adds the entries `values` (indices from `first`) into the `N` blocks of `block` rows
/// that make up `rows`, each entry into one row per block, chosen with its sign by 16
/// bits of `mix64(key ^ (index << 16))`. `key` already carries the group index (low 16
/// bits). `N` is a constant so that the per-block work unrolls.
fn sparse_group<const N: usize>(rows: &mut [f64], block: usize, key: u64, first: u64, values: &[f64]) {
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
        let v = v.to_bits();
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
        // Entry by entry, written out from the definition: coordinate i, in group g = i / 16
        // at lane l = i mod 16, goes into bucket 16·line + (l ^ rotation) of M with sign −1
        // if bit l of h is set, where h = mix64(key ^ g), line = its top log2(M/16) bits and
        // rotation = bits 16..20; bucket b goes into one row of each of the s blocks, chosen
        // with its sign by 16 bits of mix64(key' ^ (b << 16 | group)), groups of four
        // blocks per hash; scale 1/√s.
        let d = 300;
        let v = vector(6, d);
        for sparsity in [8, 6, 3] {
            let k = 24 * sparsity;
            let block = k / sparsity;
            let spec = ProjectorSpec::new(ProjectorKind::Sparse, 11, Some(k), d, sparsity).unwrap();
            assert_eq!(spec.version, 3);
            let m = 1usize << 16;
            let key1 = mix64(11 ^ 0x434F_554E_5453);
            let mut buckets = vec![0f64; m];
            for (i, &x) in v.iter().enumerate() {
                let h = mix64(key1 ^ (i / 16) as u64);
                let b = 16 * (h >> 52) as usize + ((i % 16) ^ ((h >> 16) & 15) as usize);
                let sign: f32 = if (h >> (i % 16)) & 1 == 1 { -1.0 } else { 1.0 };
                // (One span: its f32 sums are the buckets.)
                buckets[b] = (buckets[b] as f32 + sign * x) as f64;
            }
            let key2 = mix64(11 ^ 0x5350_4152_5345);
            let mut acc = vec![0f64; k];
            for (b, &x) in buckets.iter().enumerate() {
                for t in 0..sparsity {
                    let (group, q) = (t / 4, t % 4);
                    let h = mix64(key2 ^ ((b as u64) << 16 | group as u64));
                    let field = (h >> (16 * q)) & 0xFFFF;
                    let row = t * block + (((field >> 1) as usize * block) >> 15);
                    acc[row] += if field & 1 == 1 { x } else { -x };
                }
            }
            let want: Vec<f32> = acc.iter().map(|a| (a / (sparsity as f64).sqrt()) as f32).collect();
            assert_eq!(project(&spec, &v, 97), want, "sparsity {sparsity}");
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_sums() {
        // Groups far from the start (a 64-bit group index), onto sums already non-zero,
        // with values of both signs and of many magnitudes.
        let v: Vec<f32> = vector(12, 16 * 5000).iter().enumerate().map(|(i, x)| x * (1 + i % 7) as f32).collect();
        let (line_bits, key, g0) = (12, mix64(5), (1u64 << 40) + 3);
        let start: Vec<Line> = (0..1 << line_bits).map(|i| Line([i as f32 * 0.25; LANES])).collect();
        let sums = |kernel: &dyn Fn(&mut [Line])| {
            let mut acc = start.clone();
            kernel(&mut acc);
            acc.iter().flat_map(|l| l.0.map(f32::to_bits)).collect::<Vec<u32>>()
        };
        // The portable kernel against the definition, lane by lane.
        let want = sums(&|acc| {
            for (i, &x) in v.iter().enumerate() {
                add_lanes(line_bits, group_hash(key, g0 + (i / 16) as u64), i % 16, &[x], acc);
            }
        });
        assert_eq!(sums(&|acc| groups_portable(line_bits, key, g0, &v, acc)), want, "portable");
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                assert_eq!(sums(&|acc| unsafe { groups_avx2(line_bits, key, g0, &v, acc) }), want, "avx2");
            }
            if std::is_x86_feature_detected!("avx512f") {
                assert_eq!(sums(&|acc| unsafe { groups_avx512(line_bits, key, g0, &v, acc) }), want, "avx512");
            }
        }
    }

    /// `n` distinct non-zero numbers, each at lane 0 of its group of 16.
    fn on_lane_zero(n: usize) -> Vec<f32> {
        let mut v = vec![0f32; 16 * n];
        for j in 0..n {
            v[16 * j] = 1.0 + j as f32 / n as f32;
        }
        v
    }

    #[test]
    fn coordinates_of_one_lane_spread_over_all_buckets() {
        // 4096 coordinates all at lane 0 of their groups (a gradient concentrated on every
        // 16th number). Hashed into M = 65536 buckets they fill about
        // M·(1 − e^(−4096/M)) ≈ 3972 distinct buckets; without the lane rotation they
        // could only reach the 4096 lane-0 buckets and would fill about 2589.
        let v = on_lane_zero(4096);
        let spec = ProjectorSpec::new(ProjectorKind::Sparse, 21, Some(1024), v.len(), 8).unwrap();
        let mut sketch = Sketch::new(&spec);
        assert_eq!(sketch.buckets.len(), 1 << 16);
        sketch.add(0, &v);
        sketch.close();
        let filled = sketch.buckets.iter().filter(|&&b| b != 0.0).count();
        assert!((3850..=4096).contains(&filled), "{filled} distinct buckets");
        let lanes: std::collections::BTreeSet<usize> =
            sketch.buckets.iter().enumerate().filter(|(_, &b)| b != 0.0).map(|(i, _)| i % 16).collect();
        assert_eq!(lanes.len(), 16, "every lane of a line is used");
    }

    #[test]
    fn first_stage_norms_follow_the_countsketch_law() {
        // With random signs and every pair of coordinates sharing a bucket with probability
        // 1/M, ‖Sx‖² is unbiased with variance 2(‖x‖⁴ − Σx⁴)/M. x: 4096 numbers, each at
        // lane 0 of its group (the case the lane rotation is for: without it the variance
        // would be 16 times larger), over 300 seeds.
        let seeds = 300;
        let v = on_lane_zero(4096);
        let norm2: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
        let quartic: f64 = v.iter().map(|&x| (x as f64).powi(4)).sum();
        let m = (1 << 16) as f64;
        let law = 2.0 * (norm2 * norm2 - quartic) / m / (norm2 * norm2);
        let errors: Vec<f64> = (0..seeds)
            .map(|seed| {
                let spec = ProjectorSpec::new(ProjectorKind::Sparse, seed, Some(1024), v.len(), 8).unwrap();
                let mut sketch = Sketch::new(&spec);
                sketch.add(0, &v);
                sketch.close();
                sketch.buckets.iter().map(|b| b * b).sum::<f64>() / norm2 - 1.0
            })
            .collect();
        let mean = errors.iter().sum::<f64>() / seeds as f64;
        let var = errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (seeds - 1) as f64;
        assert!(mean.abs() < 4.0 * (law / seeds as f64).sqrt(), "biased: mean relative error {mean:e}");
        assert!((0.6..1.5).contains(&(var / law)), "variance {var:e} against the law's {law:e}");
    }

    #[test]
    fn spans_chunking_and_threads_do_not_change_bits() {
        // Longer than two spans, cut on and off span boundaries.
        let d = 2 * SPAN + 12_345;
        let v = vector(8, d);
        let spec = ProjectorSpec::new(ProjectorKind::Sparse, 3, Some(1024), d, 8).unwrap();
        let a = project(&spec, &v, d);
        for chunk in [SPAN, SPAN + 1, 333_333, 4096 + 7] {
            assert_eq!(project(&spec, &v, chunk), a, "chunks of {chunk}");
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(pool.install(|| project(&spec, &v, 1 << 19)), a, "one thread");
        // Files of earlier versions are told apart and not extended.
        for version in [1, 2] {
            let old = ProjectorSpec { version, ..spec.clone() };
            let err = format!("{:#}", old.start().update(0, &v[..10]).unwrap_err());
            assert!(err.contains(&format!("version {version}")), "{err}");
        }
        let old_json = serde_json::to_value(&spec).unwrap().as_object().unwrap().clone();
        let mut without = old_json.clone();
        without.remove("version");
        let parsed: ProjectorSpec = serde_json::from_value(serde_json::Value::Object(without)).unwrap();
        assert_eq!(parsed.version, 1, "headers without the field are version 1");
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
