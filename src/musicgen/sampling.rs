//! Next-token sampling: temperature, top-k, top-p (nucleus) and greedy, driven by the
//! counter-based generator so a seed gives the same tokens on any machine or thread count.

use crate::rng;

/// How the next token is chosen from the (guided) logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    /// `false` = argmax.
    pub use_sampling: bool,
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all). `1` is greedy.
    pub top_k: usize,
    /// Keep the smallest set with this much probability (0 = off; wins over top-k).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampler {
    /// Picks a token from `logits`; `counters` identify the draw (window, step, codebook).
    pub fn sample(&self, logits: &[f32], counters: &[u64]) -> u32 {
        if !self.use_sampling || self.temperature <= 0.0 || self.top_k == 1 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) / self.temperature).exp())).collect();
        // Most likely first; ties broken by index so the order is total and reproducible.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let keep = if self.top_p > 0.0 {
            // audiocraft: drop a token when the mass before it already exceeds p.
            let mut cum = 0.0;
            let mut n = 0;
            for (_, p) in &probs {
                if cum / total > self.top_p {
                    break;
                }
                cum += p;
                n += 1;
            }
            n.max(1)
        } else if self.top_k > 0 {
            self.top_k.min(probs.len())
        } else {
            probs.len()
        };
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().map(|p| p.1).sum();
        let u = rng::uniform(self.seed, counters) * mass;
        let mut acc = 0.0;
        for &(i, p) in kept {
            acc += p;
            if u < acc {
                return i;
            }
        }
        kept[keep - 1].0
    }
}

/// Index of the largest value (first one on ties, like `torch.argmax`).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(top_k: usize, top_p: f64) -> Sampler {
        Sampler { use_sampling: true, temperature: 1.0, top_k, top_p, seed: 5 }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        for i in 0..50 {
            assert_eq!(sampler(1, 0.0).sample(&logits, &[i]), 1);
        }
    }

    #[test]
    fn top_k_restricts_support_and_matches_probabilities() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), 5.0];
        let s = sampler(2, 0.0);
        let n = 40_000;
        let mut counts = [0usize; 4];
        for i in 0..n {
            counts[s.sample(&logits, &[i]) as usize] += 1;
        }
        assert_eq!(counts[0] + counts[1], 0, "only the two best tokens may be drawn");
        // Renormalised over {2, 3}: p(2) = 3 / (3 + e^5).
        let p2 = 3.0 / (3.0 + 5f64.exp());
        let got = counts[2] as f64 / n as f64;
        assert!((got - p2).abs() < 4.0 * (p2 * (1.0 - p2) / n as f64).sqrt() + 1e-3, "{got} vs {p2}");
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2: p = 0.6 keeps the first two.
        let logits = [(0.5f32).ln(), (0.3f32).ln(), (0.2f32).ln()];
        let s = sampler(0, 0.6);
        let mut seen = [false; 3];
        for i in 0..2000 {
            seen[s.sample(&logits, &[i]) as usize] = true;
        }
        assert_eq!(seen, [true, true, false]);
    }

    #[test]
    fn same_counters_same_token() {
        let logits: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = sampler(250, 0.0);
        assert_eq!(s.sample(&logits, &[1, 2, 3]), s.sample(&logits, &[1, 2, 3]));
    }
}
