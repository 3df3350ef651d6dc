//! MusicGen's "delay" codebook pattern.
//!
//! A sequence of `T` frames of `K` codebooks is laid out over `S = T + max_delay + 1`
//! steps: step 0 is the start column (the special token `card` everywhere) and, for
//! `s ≥ 1`, codebook `k` holds frame `s − 1 − delay[k]`, or the special token where
//! that frame does not exist. The LM reads steps `0..s` and predicts step `s`.

/// The delay pattern of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayPattern {
    pub delays: Vec<usize>,
    pub special: u32,
}

impl DelayPattern {
    pub fn new(delays: Vec<usize>, special: u32) -> Self {
        Self { delays, special }
    }

    pub fn n_q(&self) -> usize {
        self.delays.len()
    }

    pub fn max_delay(&self) -> usize {
        self.delays.iter().copied().max().unwrap_or(0)
    }

    fn min_delay(&self) -> usize {
        self.delays.iter().copied().min().unwrap_or(0)
    }

    /// Number of steps for `frames` frames (start column included).
    pub fn num_steps(&self, frames: usize) -> usize {
        frames + self.max_delay() + 1
    }

    /// Frame held by codebook `k` at step `s`, if any.
    pub fn frame_at(&self, k: usize, s: usize, frames: usize) -> Option<usize> {
        let t = s.checked_sub(1 + self.delays[k])?;
        (t < frames).then_some(t)
    }

    /// First step at which a frame `≥ prompt_len` appears: where generation starts
    /// (audiocraft's `get_first_step_with_timesteps`).
    pub fn first_step_after_prompt(&self, prompt_len: usize) -> usize {
        prompt_len + self.min_delay() + 1
    }

    /// Lays `frames` (`[K][T]`) out over the steps (`[K][S]`).
    pub fn build(&self, frames: &[Vec<u32>]) -> Vec<Vec<u32>> {
        let t = frames.first().map_or(0, Vec::len);
        let s_len = self.num_steps(t);
        (0..self.n_q())
            .map(|k| (0..s_len).map(|s| self.frame_at(k, s, t).map_or(self.special, |f| frames[k][f])).collect())
            .collect()
    }

    /// Reads frames (`[K][T]`) back from a step sequence (`[K][S]`).
    pub fn revert(&self, steps: &[Vec<u32>], frames: usize) -> Vec<Vec<u32>> {
        (0..self.n_q()).map(|k| (0..frames).map(|t| steps[k][t + 1 + self.delays[k]]).collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_revert_round_trip() {
        let p = DelayPattern::new(vec![0, 1, 2, 3], 99);
        let frames: Vec<Vec<u32>> = (0..4).map(|k| (0..5).map(|t| (10 * k + t) as u32).collect()).collect();
        let steps = p.build(&frames);
        assert_eq!(steps[0], vec![99, 0, 1, 2, 3, 4, 99, 99, 99]);
        assert_eq!(steps[3], vec![99, 99, 99, 99, 30, 31, 32, 33, 34]);
        assert_eq!(p.revert(&steps, 5), frames);
    }

    #[test]
    fn stereo_pattern_pairs_channels() {
        let p = DelayPattern::new(vec![0, 0, 1, 1], 7);
        let frames: Vec<Vec<u32>> = (0..4).map(|k| vec![k as u32; 2]).collect();
        let steps = p.build(&frames);
        assert_eq!(steps[1], vec![7, 1, 1, 7]);
        assert_eq!(steps[2], vec![7, 7, 2, 2]);
        assert_eq!(p.first_step_after_prompt(0), 1);
        assert_eq!(p.first_step_after_prompt(3), 4);
    }
}
