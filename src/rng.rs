//! Counter-based random numbers: every draw is a pure function of (seed, counters), so
//! results never depend on thread count, chunking or the order work is done in.

/// SplitMix64 finaliser: a strong 64-bit mixing function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit hash of a seed and a tuple of counters.
#[inline]
pub fn hash(seed: u64, counters: &[u64]) -> u64 {
    let mut h = mix64(seed ^ 0x5851_F42D_4C95_7F2D);
    for &c in counters {
        h = mix64(h ^ c);
    }
    h
}

/// A uniform number in [0, 1) from 53 random bits.
#[inline]
pub fn uniform(seed: u64, counters: &[u64]) -> f64 {
    (hash(seed, counters) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A standard normal number (Box–Muller on two counter-derived uniforms).
#[inline]
pub fn normal(seed: u64, a: u64, b: u64) -> f64 {
    let h1 = hash(seed, &[a, b, 0]);
    let h2 = mix64(h1 ^ 0xD6E8_FEB8_6659_FD93);
    let u1 = ((h1 >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    let u2 = (h2 >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `n` numbers uniform in [−1, 1), fully determined by `seed` (test data, synthetic inputs).
pub fn symmetric_uniforms(seed: u64, n: usize) -> Vec<f64> {
    let mut s = Stream::new(seed);
    (0..n).map(|_| s.uniform() * 2.0 - 1.0).collect()
}

/// A sequential generator for places that want a stream (weight init, data synthesis),
/// still fully determined by its seed.
#[derive(Debug, Clone)]
pub struct Stream {
    seed: u64,
    counter: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        hash(self.seed, &[self.counter])
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    pub fn normal(&mut self) -> f64 {
        self.counter += 1;
        normal(self.seed, self.counter, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| uniform(7, &[i])).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.002, "var {var}");
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn normal_moments() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(3, i, 1)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!((kurt - 3.0).abs() < 0.1, "kurtosis {kurt}");
    }

    #[test]
    fn draws_depend_on_every_counter() {
        assert_ne!(hash(1, &[2, 3]), hash(1, &[3, 2]));
        assert_ne!(hash(1, &[2, 3]), hash(2, &[2, 3]));
        assert_eq!(hash(1, &[2, 3]), hash(1, &[2, 3]));
    }
}
