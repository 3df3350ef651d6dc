//! Songs synthesised deterministically, for the demo and for `validate`: a slow minor
//! chord progression with a steady kick and snare (a "rock ballad"), a fast syncopated
//! pattern of clave, cowbell, montuno stabs and bass (a "salsa groove"), four-on-the-floor
//! techno with an acid bass line, and slow ambient pad swells. Each style comes in
//! variants (key, tempo, voicing, noise), so a catalogue can hold many different songs of
//! one style.

use std::f32::consts::TAU;

/// The demo's training descriptions: worded unlike the experiment's prompts, so that an
/// attribution cannot come from shared text alone.
pub const ROCK_TRAINING_DESCRIPTION: &str = "slow minor-key guitar song with heavy kick and snare";
pub const SALSA_TRAINING_DESCRIPTION: &str = "fast latin dance track with clave, cowbell and piano stabs";

/// The seed document's two experiment-3 descriptions.
pub const ROCK_DESCRIPTION: &str = "Moody alternative rock ballad with spacious electric guitars, steady drums, and warm bass; builds from soft verses to a bigger, emotive chorus. No vocals.";
pub const SALSA_DESCRIPTION: &str =
    "Lively salsa groove with bright horns, piano montuno, congas and timbales, rolling bass, and punchy breaks. No vocals.";

#[allow(clippy::too_many_arguments)] // a synthesiser voice: every argument is a musical parameter
fn add_tone(
    out: &mut [f32],
    sr: f32,
    start: f32,
    len: f32,
    freq: f32,
    amp: f32,
    harmonics: usize,
    attack: f32,
    release: f32,
) {
    let s0 = (start * sr) as usize;
    let n = (len * sr) as usize;
    for i in 0..n {
        let Some(o) = out.get_mut(s0 + i) else { break };
        let t = i as f32 / sr;
        let env = (t / attack).min(1.0) * ((len - t) / release).clamp(0.0, 1.0);
        let mut v = 0.0;
        for h in 1..=harmonics {
            let f = freq * h as f32;
            if f < sr / 2.0 {
                v += (TAU * f * t).sin() / h as f32;
            }
        }
        *o += amp * env * v;
    }
}

fn add_drum(out: &mut [f32], sr: f32, start: f32, freq_start: f32, freq_end: f32, decay: f32, amp: f32) {
    let s0 = (start * sr) as usize;
    let mut phase = 0.0f32;
    for i in 0..(decay * 4.0 * sr) as usize {
        let Some(o) = out.get_mut(s0 + i) else { break };
        let t = i as f32 / sr;
        let f = freq_end + (freq_start - freq_end) * (-t / (decay * 0.3)).exp();
        phase += TAU * f / sr;
        *o += amp * (-t / decay).exp() * phase.sin();
    }
}

fn add_noise(out: &mut [f32], sr: f32, start: f32, decay: f32, amp: f32, seed: u64) {
    let s0 = (start * sr) as usize;
    let mut prev = 0.0f32;
    for i in 0..(decay * 4.0 * sr) as usize {
        let Some(o) = out.get_mut(s0 + i) else { break };
        let t = i as f32 / sr;
        let w = crate::rng::uniform(seed, &[(s0 + i) as u64]) as f32 * 2.0 - 1.0;
        prev = 0.6 * prev + 0.4 * w; // a little low-pass
        *o += amp * (-t / decay).exp() * prev;
    }
}

fn normalise(mut x: Vec<f32>) -> Vec<f32> {
    let peak = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-9);
    for v in &mut x {
        *v *= 0.8 / peak;
    }
    x
}

/// The styles of synthesised songs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Ballad,
    Salsa,
    Techno,
    Ambient,
}

impl Style {
    pub const ALL: [Style; 4] = [Style::Ballad, Style::Salsa, Style::Techno, Style::Ambient];

    pub fn name(self) -> &'static str {
        match self {
            Style::Ballad => "ballad",
            Style::Salsa => "salsa",
            Style::Techno => "techno",
            Style::Ambient => "ambient",
        }
    }
}

/// How one variant differs from another of its style: a key shift in semitones, a tempo
/// factor, a timbre (harmonic count) and a noise seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub semitones: f32,
    pub tempo: f32,
    pub harmonics: usize,
    pub seed: u64,
}

impl Variant {
    /// Variant `i` (0 is the plain one).
    pub fn nth(i: u64) -> Self {
        if i == 0 {
            return Self { semitones: 0.0, tempo: 1.0, harmonics: 6, seed: 11 };
        }
        let u = |j: u64| crate::rng::uniform(0x5eed, &[i, j]) as f32;
        Self {
            semitones: (u(0) * 10.0).floor() - 5.0,
            tempo: 0.85 + 0.3 * u(1),
            harmonics: 2 + (u(2) * 7.0) as usize,
            seed: 100 + i,
        }
    }

    fn pitch(&self, f: f32) -> f32 {
        f * 2f32.powf(self.semitones / 12.0)
    }
}

/// A song of `style`, variant `variant`.
pub fn song(style: Style, variant: &Variant, sample_rate: u32, seconds: f32) -> Vec<f32> {
    match style {
        Style::Ballad => ballad(variant, sample_rate, seconds),
        Style::Salsa => salsa(variant, sample_rate, seconds),
        Style::Techno => techno(variant, sample_rate, seconds),
        Style::Ambient => ambient(variant, sample_rate, seconds),
    }
}

/// A slow (70 bpm) minor progression Am–F–C–G with kick on 1 and 3, snare on 2 and 4.
pub fn rock_ballad(sample_rate: u32, seconds: f32) -> Vec<f32> {
    ballad(&Variant::nth(0), sample_rate, seconds)
}

fn ballad(v: &Variant, sample_rate: u32, seconds: f32) -> Vec<f32> {
    let sr = sample_rate as f32;
    let mut out = vec![0f32; (seconds * sr) as usize];
    let beat = 60.0 / (70.0 * v.tempo);
    let chords: [[f32; 3]; 4] =
        [[110.0, 130.81, 164.81], [87.31, 110.0, 130.81], [130.81, 164.81, 196.0], [98.0, 123.47, 146.83]]
            .map(|c| c.map(|f| v.pitch(f)));
    let bar = 4.0 * beat;
    let mut t = 0.0;
    let mut i = 0;
    while t < seconds {
        for &f in &chords[i % 4] {
            add_tone(&mut out, sr, t, bar, f, 0.18, v.harmonics, 0.25, 0.4);
        }
        add_tone(&mut out, sr, t, bar, chords[i % 4][0] / 2.0, 0.25, 2, 0.05, 0.3);
        for b in 0..4 {
            let bt = t + b as f32 * beat;
            if b % 2 == 0 {
                add_drum(&mut out, sr, bt, 120.0, 50.0, 0.12, 0.6);
            } else {
                add_noise(&mut out, sr, bt, 0.06, 0.35, v.seed);
            }
        }
        t += bar;
        i += 1;
    }
    normalise(out)
}

/// A fast (180 bpm) 3-2 clave groove: clave clicks, cowbell on the beat, syncopated
/// bright montuno stabs, tumbao bass.
pub fn salsa_groove(sample_rate: u32, seconds: f32) -> Vec<f32> {
    salsa(&Variant::nth(0), sample_rate, seconds)
}

fn salsa(v: &Variant, sample_rate: u32, seconds: f32) -> Vec<f32> {
    let sr = sample_rate as f32;
    let mut out = vec![0f32; (seconds * sr) as usize];
    let eighth = 60.0 / (180.0 * v.tempo) / 2.0;
    let clave = [0usize, 3, 6, 10, 12];
    let montuno = [1usize, 3, 4, 6, 9, 11, 12, 14];
    let notes = [523.25f32, 659.25, 783.99, 659.25].map(|f| v.pitch(f));
    let harmonics = v.harmonics.clamp(2, 5);
    let mut t = 0.0;
    let mut n = 0;
    while t < seconds {
        for e in 0..16 {
            let et = t + e as f32 * eighth;
            if clave.contains(&e) {
                add_tone(&mut out, sr, et, 0.03, 2500.0, 0.5, 1, 0.001, 0.02);
            }
            if e % 2 == 0 {
                add_tone(&mut out, sr, et, 0.05, 800.0, 0.25, 3, 0.001, 0.04);
            }
            if montuno.contains(&e) {
                add_tone(&mut out, sr, et, 0.08, notes[(n + e) % 4], 0.3, harmonics, 0.002, 0.05);
            }
            if e == 3 || e == 7 || e == 11 || e == 15 {
                add_tone(&mut out, sr, et, 0.15, v.pitch(98.0), 0.5, 3, 0.005, 0.05);
            }
            if e % 4 == 2 {
                add_drum(&mut out, sr, et, 400.0, 300.0, 0.05, 0.4);
            }
        }
        t += 16.0 * eighth;
        n += 1;
    }
    normalise(out)
}

/// Techno at 128 bpm: kick on every beat, off-beat hats, a sixteenth-note bass line.
fn techno(v: &Variant, sample_rate: u32, seconds: f32) -> Vec<f32> {
    let sr = sample_rate as f32;
    let mut out = vec![0f32; (seconds * sr) as usize];
    let sixteenth = 60.0 / (128.0 * v.tempo) / 4.0;
    let line = [55.0f32, 55.0, 110.0, 55.0, 65.41, 55.0, 98.0, 55.0].map(|f| v.pitch(f));
    let mut t = 0.0;
    let mut i = 0usize;
    while t < seconds {
        if i.is_multiple_of(4) {
            add_drum(&mut out, sr, t, 150.0, 45.0, 0.09, 0.8);
        }
        if i % 4 == 2 {
            add_noise(&mut out, sr, t, 0.015, 0.25, v.seed);
        }
        add_tone(&mut out, sr, t, sixteenth * 0.8, line[i % 8], 0.22, v.harmonics + 4, 0.003, 0.02);
        t += sixteenth;
        i += 1;
    }
    normalise(out)
}

/// Slow overlapping pad swells (no drums): long attacks and releases over a drone.
fn ambient(v: &Variant, sample_rate: u32, seconds: f32) -> Vec<f32> {
    let sr = sample_rate as f32;
    let mut out = vec![0f32; (seconds * sr) as usize];
    let chords: [[f32; 3]; 3] =
        [[220.0, 277.18, 329.63], [246.94, 311.13, 369.99], [196.0, 246.94, 293.66]].map(|c| c.map(|f| v.pitch(f)));
    let len = 3.0 / v.tempo;
    add_tone(&mut out, sr, 0.0, seconds, v.pitch(110.0), 0.12, 2, 1.0, 1.0);
    let mut t = 0.0;
    let mut i = 0;
    while t < seconds {
        for &f in &chords[i % 3] {
            add_tone(&mut out, sr, t, len * 1.5, f, 0.12, v.harmonics.min(3), len * 0.6, len * 0.6);
        }
        t += len;
        i += 1;
    }
    normalise(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_of_a_style_differ_and_styles_differ_more() {
        let sr = 8000;
        let a = song(Style::Techno, &Variant::nth(1), sr, 2.0);
        let b = song(Style::Techno, &Variant::nth(2), sr, 2.0);
        assert_eq!(a.len(), 16000);
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 0.1));
        for style in Style::ALL {
            let x = song(style, &Variant::nth(3), sr, 2.0);
            let peak = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((peak - 0.8).abs() < 1e-4, "{style:?}: {peak}");
        }
        assert_eq!(rock_ballad(sr, 1.0), song(Style::Ballad, &Variant::nth(0), sr, 1.0));
    }
}
