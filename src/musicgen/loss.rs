//! MusicGen's training loss on codes: the per-codebook cross-entropy of teacher-forced
//! next-token predictions over the delay pattern, averaged over codebooks
//! (audiocraft `solvers/musicgen.py`, `_compute_cross_entropy`).
//!
//! For frames `[K][T]` laid out over the pattern's steps (see `pattern`), the LM reads
//! steps `0..S−1` and its logits at step `s` predict step `s + 1`. A position counts for
//! codebook `k` when its target is a real code (not the pattern's special token), so
//! each codebook is scored on all `T` of its frames:
//! `nll = (1/K) Σ_k mean_t −log p(frame[k][t] | steps before it, condition)`.
//!
//! Pieces longer than the model's window are cut into consecutive windows of at most
//! the window's length (each starting with an empty context, as in training), and the
//! windows' losses are averaged weighted by their frame counts.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::lm::Lm;
use super::pattern::DelayPattern;
use super::MusicGen;

/// The loss of a whole piece, as numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct NllValue {
    /// `mean(per_codebook)`.
    pub nll: f64,
    /// Frame-weighted mean over windows of each codebook's mean negative log-likelihood.
    pub per_codebook: Vec<f64>,
    /// Frames scored (`T`).
    pub frames: usize,
}

/// The teacher-forced input of one window: tokens `[1, K, S−1]`, targets `[K, S−1, 1]`
/// (special targets replaced by 0 so that gather stays in range) and the mask of real
/// targets `[K, S−1]` (1 where a frame is predicted).
pub struct TeacherForced {
    pub input: Tensor,
    pub target: Tensor,
    pub mask: Tensor,
}

impl TeacherForced {
    pub fn new(pattern: &DelayPattern, frames: &[Vec<u32>], dtype: DType, device: &Device) -> Result<Self> {
        let k = frames.len();
        let t = frames.first().map_or(0, Vec::len);
        if k != pattern.n_q() || t == 0 || frames.iter().any(|r| r.len() != t) {
            bail!("teacher forcing needs {} codebooks of equal, non-zero length", pattern.n_q());
        }
        let steps = pattern.build(frames);
        let s = steps[0].len();
        let input: Vec<u32> = steps.iter().flat_map(|r| r[..s - 1].iter().copied()).collect();
        let target: Vec<u32> = (0..k)
            .flat_map(|q| (1..s).map(move |p| (q, p)))
            .map(|(q, p)| pattern.frame_at(q, p, t).map_or(0, |f| frames[q][f]))
            .collect();
        let mask: Vec<f32> = (0..k)
            .flat_map(|q| (1..s).map(move |p| (q, p)))
            .map(|(q, p)| if pattern.frame_at(q, p, t).is_some() { 1.0 } else { 0.0 })
            .collect();
        Ok(Self {
            input: Tensor::from_vec(input, (1, k, s - 1), device)?,
            target: Tensor::from_vec(target, (k, s - 1, 1), device)?,
            mask: Tensor::from_vec(mask, (k, s - 1), device)?.to_dtype(dtype)?,
        })
    }

    /// Per-codebook mean negative log-likelihood `[K]` from the logits `[1, K, S−1, card]`
    /// of `input` (differentiable).
    pub fn per_codebook_nll(&self, logits: &Tensor) -> Result<Tensor> {
        let logits = logits.squeeze(0)?; // [K, S-1, card]
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&self.target, D::Minus1)?.squeeze(D::Minus1)?; // [K, S-1]
        let mask = self.mask.to_dtype(picked.dtype())?;
        Ok(((picked * &mask)?.sum(1)? / mask.sum(1)?)?.neg()?)
    }
}

/// `nll` of one window (`frames` no longer than the model's window), differentiable
/// through `lm`: `(scalar, [K])`. `conditioned` picks the text or the null condition.
pub fn window_nll(
    model: &MusicGen,
    lm: &Lm,
    t5: &Tensor,
    frames: &[Vec<u32>],
    conditioned: bool,
) -> Result<(Tensor, Tensor)> {
    let tf = TeacherForced::new(&model.pattern(), frames, model.lm_params.dtype(), &model.device)?;
    let cond = lm.conditioning(&lm.project_condition(t5)?, usize::from(conditioned))?;
    let per_codebook = tf.per_codebook_nll(&lm.forward(&tf.input, &cond, None)?)?;
    Ok((per_codebook.mean_all()?, per_codebook))
}

/// Consecutive windows `[start, end)` of at most `window` frames covering `total`.
pub fn consecutive_windows(total: usize, window: usize) -> Vec<(usize, usize)> {
    let window = window.max(1);
    (0..total).step_by(window).map(|s| (s, (s + window).min(total))).collect()
}

/// The model's window in frames.
pub fn window_frames(model: &MusicGen) -> usize {
    model.frames_for(model.cfg.generation.window_seconds).max(1)
}

/// The conditioned loss of a whole piece (`frames` `[K][T]`, any length), window by
/// window, without gradients.
pub fn codes_nll_windows(model: &MusicGen, lm: &Lm, t5: &Tensor, frames: &[Vec<u32>]) -> Result<NllValue> {
    let total = frames.first().map_or(0, Vec::len);
    if total == 0 {
        bail!("no frames to score");
    }
    let k = frames.len();
    let mut per_codebook = vec![0f64; k];
    for (start, end) in consecutive_windows(total, window_frames(model)) {
        let chunk: Vec<Vec<u32>> = frames.iter().map(|r| r[start..end].to_vec()).collect();
        let (_, pc) = window_nll(model, lm, t5, &chunk, true)?;
        let pc: Vec<f64> = pc.to_dtype(DType::F64)?.to_vec1()?;
        let weight = (end - start) as f64 / total as f64;
        for (acc, v) in per_codebook.iter_mut().zip(pc) {
            *acc += weight * v;
        }
    }
    let nll = per_codebook.iter().sum::<f64>() / k as f64;
    Ok(NllValue { nll, per_codebook, frames: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_piece_once() {
        assert_eq!(consecutive_windows(120, 50), vec![(0, 50), (50, 100), (100, 120)]);
        assert_eq!(consecutive_windows(50, 50), vec![(0, 50)]);
        assert_eq!(consecutive_windows(3, 50), vec![(0, 3)]);
        assert!(consecutive_windows(0, 50).is_empty());
    }

    #[test]
    fn every_frame_of_every_codebook_is_a_target_once() {
        let p = DelayPattern::new(vec![0, 1, 2, 3], 9);
        let frames: Vec<Vec<u32>> = (0..4).map(|k| (0..5).map(|t| ((k + t) % 9) as u32).collect()).collect();
        let tf = TeacherForced::new(&p, &frames, DType::F32, &Device::Cpu).unwrap();
        let mask: Vec<Vec<f32>> = tf.mask.to_vec2().unwrap();
        for row in &mask {
            assert_eq!(row.iter().sum::<f32>(), 5.0);
        }
        // Codebook 2 (delay 2): its frame t is the target at input position t + 2.
        let target: Vec<Vec<u32>> = tf.target.squeeze(2).unwrap().to_vec2().unwrap();
        for t in 0..5 {
            assert_eq!(target[2][t + 2], frames[2][t]);
            assert_eq!(mask[2][t + 2], 1.0);
        }
        assert_eq!(mask[2][0] + mask[2][1], 0.0);
    }

    #[test]
    fn nll_of_uniform_logits_is_log_card() {
        let p = DelayPattern::new(vec![0, 1], 4);
        let frames = vec![vec![0u32, 1, 2], vec![3, 2, 1]];
        let tf = TeacherForced::new(&p, &frames, DType::F64, &Device::Cpu).unwrap();
        let s = tf.input.dim(2).unwrap();
        let logits = Tensor::zeros((1, 2, s, 4), DType::F64, &Device::Cpu).unwrap();
        let v: Vec<f64> = tf.per_codebook_nll(&logits).unwrap().to_vec1().unwrap();
        for x in v {
            assert!((x - 4f64.ln()).abs() < 1e-12);
        }
        // A confident correct prediction at every real target gives ~0.
        let mut l = vec![0f64; 2 * s * 4];
        let target: Vec<Vec<u32>> = tf.target.squeeze(2).unwrap().to_vec2().unwrap();
        for q in 0..2 {
            for pos in 0..s {
                l[(q * s + pos) * 4 + target[q][pos] as usize] = 50.0;
            }
        }
        let logits = Tensor::from_vec(l, (1, 2, s, 4), &Device::Cpu).unwrap();
        let v: Vec<f64> = tf.per_codebook_nll(&logits).unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| *x < 1e-12), "{v:?}");
    }
}
