//! The demo's two training songs, synthesised deterministically: a slow minor chord
//! progression with a steady kick and snare (a "rock ballad"), and a fast syncopated
//! pattern of clave, cowbell, montuno stabs and bass (a "salsa groove").

use std::f32::consts::TAU;

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

/// A slow (70 bpm) minor progression Am–F–C–G with kick on 1 and 3, snare on 2 and 4.
pub fn rock_ballad(sample_rate: u32, seconds: f32) -> Vec<f32> {
    let sr = sample_rate as f32;
    let mut out = vec![0f32; (seconds * sr) as usize];
    let beat = 60.0 / 70.0;
    let chords: [[f32; 3]; 4] =
        [[110.0, 130.81, 164.81], [87.31, 110.0, 130.81], [130.81, 164.81, 196.0], [98.0, 123.47, 146.83]];
    let bar = 4.0 * beat;
    let mut t = 0.0;
    let mut i = 0;
    while t < seconds {
        for &f in &chords[i % 4] {
            add_tone(&mut out, sr, t, bar, f, 0.18, 6, 0.25, 0.4);
        }
        add_tone(&mut out, sr, t, bar, chords[i % 4][0] / 2.0, 0.25, 2, 0.05, 0.3);
        for b in 0..4 {
            let bt = t + b as f32 * beat;
            if b % 2 == 0 {
                add_drum(&mut out, sr, bt, 120.0, 50.0, 0.12, 0.6);
            } else {
                add_noise(&mut out, sr, bt, 0.06, 0.35, 11);
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
    let sr = sample_rate as f32;
    let mut out = vec![0f32; (seconds * sr) as usize];
    let eighth = 60.0 / 180.0 / 2.0;
    let clave = [0usize, 3, 6, 10, 12];
    let montuno = [1usize, 3, 4, 6, 9, 11, 12, 14];
    let notes = [523.25f32, 659.25, 783.99, 659.25];
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
                add_tone(&mut out, sr, et, 0.08, notes[(n + e) % 4], 0.3, 5, 0.002, 0.05);
            }
            if e == 3 || e == 7 || e == 11 || e == 15 {
                add_tone(&mut out, sr, et, 0.15, 98.0, 0.5, 3, 0.005, 0.05);
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
