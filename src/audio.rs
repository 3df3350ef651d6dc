//! Audio output: loudness normalisation (ITU-R BS.1770 via `ebur128`, as audiocraft's
//! `loudness` strategy) and 16-bit PCM WAV files.

use std::path::Path;

use anyhow::{Context, Result};

/// audiocraft's defaults: −14 LUFS target, silence below an RMS of 2e-3 left alone.
pub const TARGET_LUFS: f64 = -14.0;
const ENERGY_FLOOR: f64 = 2e-3;

/// What normalisation did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loudness {
    pub input_lufs: Option<f64>,
    pub gain_db: f64,
    /// The gain was lowered so that no sample exceeds full scale.
    pub limited: bool,
}

/// Scales `channels` (planar, equal lengths) to `TARGET_LUFS` integrated loudness, then
/// lowers the gain if needed so the peak stays within [−1, 1] (never clipping).
pub fn normalize_loudness(channels: &mut [Vec<f32>], sample_rate: u32) -> Result<Loudness> {
    let n: usize = channels.iter().map(Vec::len).sum();
    let energy = if n == 0 {
        0.0
    } else {
        (channels.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    if energy < ENERGY_FLOOR {
        return Ok(Loudness { input_lufs: None, gain_db: 0.0, limited: false });
    }
    let mut meter = ebur128::EbuR128::new(channels.len() as u32, sample_rate, ebur128::Mode::I)
        .map_err(|e| anyhow::anyhow!("loudness meter: {e:?}"))?;
    let refs: Vec<&[f32]> = channels.iter().map(Vec::as_slice).collect();
    meter.add_frames_planar_f32(&refs).map_err(|e| anyhow::anyhow!("loudness meter: {e:?}"))?;
    let lufs = meter.loudness_global().map_err(|e| anyhow::anyhow!("loudness meter: {e:?}"))?;
    if !lufs.is_finite() {
        // Too short for a gated measurement (< 400 ms): leave it as is.
        return Ok(Loudness { input_lufs: None, gain_db: 0.0, limited: false });
    }
    let mut gain_db = TARGET_LUFS - lufs;
    let peak = channels.iter().flatten().fold(0f32, |m, &x| m.max(x.abs())) as f64;
    let mut limited = false;
    if peak * 10f64.powf(gain_db / 20.0) > 1.0 {
        gain_db = -20.0 * peak.log10();
        limited = true;
    }
    let gain = 10f64.powf(gain_db / 20.0) as f32;
    for x in channels.iter_mut().flatten() {
        *x *= gain;
    }
    Ok(Loudness { input_lufs: Some(lufs), gain_db, limited })
}

/// Writes planar channels as a 16-bit PCM WAV, atomically.
pub fn write_wav(path: &Path, channels: &[Vec<f32>], sample_rate: u32) -> Result<()> {
    let spec = hound::WavSpec {
        channels: channels.len() as u16,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut cursor = std::io::Cursor::new(Vec::new());
    {
        let mut w = hound::WavWriter::new(&mut cursor, spec).context("WAV header")?;
        let len = channels.first().map_or(0, Vec::len);
        for i in 0..len {
            for ch in channels {
                let v = (ch[i].clamp(-1.0, 1.0) * i16::MAX as f32).round() as i16;
                w.write_sample(v).context("WAV data")?;
            }
        }
        w.finalize().context("WAV finalize")?;
    }
    crate::io::write_atomic(path, &cursor.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_a_sine_to_target_without_clipping() {
        let sr = 8000u32;
        let mut ch = vec![(0..sr * 3).map(|i| 0.01 * (i as f32 * 0.3).sin()).collect::<Vec<f32>>()];
        let info = normalize_loudness(&mut ch, sr).unwrap();
        assert!(info.input_lufs.is_some());
        let mut meter = ebur128::EbuR128::new(1, sr, ebur128::Mode::I).unwrap();
        meter.add_frames_f32(&ch[0]).unwrap();
        let out = meter.loudness_global().unwrap();
        assert!((out - TARGET_LUFS).abs() < 0.1 || info.limited, "{out}");
        assert!(ch[0].iter().all(|x| x.abs() <= 1.0));
    }

    #[test]
    fn loud_peaks_are_limited_not_clipped() {
        let sr = 8000u32;
        // Mostly quiet with one loud click: reaching −14 LUFS would clip the click.
        let mut data = vec![0.003f32; (sr * 2) as usize];
        for (i, x) in data.iter_mut().enumerate() {
            *x *= ((i as f32) * 0.2).sin();
        }
        data[100] = 0.9;
        let mut ch = vec![data];
        let info = normalize_loudness(&mut ch, sr).unwrap();
        assert!(info.limited);
        let peak = ch[0].iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((peak - 1.0).abs() < 1e-4, "{peak}");
    }
}
