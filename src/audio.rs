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

/// What `write_generated` wrote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrittenAudio {
    pub loudness: Loudness,
    pub channels: usize,
    pub samples: usize,
    pub sample_rate: u32,
}

/// Decodes generated frames with the model's codec, normalises the loudness and writes
/// the WAV: the one path every command takes from codes to a file.
pub fn write_generated(model: &crate::musicgen::MusicGen, frames: &[Vec<u32>], path: &Path) -> Result<WrittenAudio> {
    let mut channels: Vec<Vec<f32>> = model.decode(frames)?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    let sample_rate = model.cfg.sample_rate() as u32;
    let loudness = normalize_loudness(&mut channels, sample_rate)?;
    write_wav(path, &channels, sample_rate)?;
    Ok(WrittenAudio { loudness, channels: channels.len(), samples: channels.first().map_or(0, Vec::len), sample_rate })
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

/// Decodes an audio file (wav, mp3, flac, m4a/aac, ogg) to planar f32 channels and its
/// sample rate.
pub fn read_audio(path: &Path) -> Result<(Vec<Vec<f32>>, u32)> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::DecoderOptions;
    use symphonia::core::errors::Error as SymError;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let name = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open"))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        anyhow::bail!("{name}: the audio file is empty (0 bytes)");
    }
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(&ext.to_lowercase());
    }
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &FormatOptions::default(), &MetadataOptions::default())
        .map_err(|e| anyhow::anyhow!("{name}: not a readable audio file ({e})"))?;
    let mut format = probed.format;
    let track = format.default_track().ok_or_else(|| anyhow::anyhow!("{name}: no audio track"))?;
    let track_id = track.id;
    let rate = track.codec_params.sample_rate.ok_or_else(|| anyhow::anyhow!("{name}: unknown sample rate"))?;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| anyhow::anyhow!("{name}: unsupported codec ({e})"))?;
    let mut channels: Vec<Vec<f32>> = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => anyhow::bail!("{name}: corrupt audio ({e})"),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            Err(SymError::DecodeError(_)) => continue, // a damaged frame: skip it, as players do
            Err(e) => anyhow::bail!("{name}: corrupt audio ({e})"),
        };
        let spec = *decoded.spec();
        let n = spec.channels.count();
        if channels.is_empty() {
            channels = vec![Vec::new(); n];
        }
        let mut buf = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buf.copy_interleaved_ref(decoded);
        for frame in buf.samples().chunks(n) {
            for (c, &x) in frame.iter().enumerate() {
                channels[c].push(x);
            }
        }
    }
    if channels.first().is_none_or(|c| c.is_empty()) {
        anyhow::bail!("{name}: no audio samples decoded");
    }
    Ok((channels, rate))
}

/// Band-limited resampling (windowed sinc, 16 zero crossings, cut-off at the lower
/// Nyquist frequency).
pub fn resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || x.is_empty() {
        return x.to_vec();
    }
    let ratio = to as f64 / from as f64;
    let out_len = ((x.len() as f64) * ratio).round() as usize;
    let cutoff = ratio.min(1.0); // relative to the input's Nyquist
    let zeros = 16.0;
    let half_width = zeros / cutoff;
    (0..out_len)
        .map(|i| {
            let center = i as f64 / ratio;
            let lo = (center - half_width).ceil().max(0.0) as usize;
            let hi = ((center + half_width).floor() as usize).min(x.len() - 1);
            let mut acc = 0.0;
            for (j, &xj) in x.iter().enumerate().take(hi + 1).skip(lo) {
                let t = j as f64 - center;
                let arg = t * cutoff;
                let sinc = if arg.abs() < 1e-12 {
                    1.0
                } else {
                    (std::f64::consts::PI * arg).sin() / (std::f64::consts::PI * arg)
                };
                let w = 0.5 + 0.5 * (std::f64::consts::PI * t / half_width).cos();
                acc += xj as f64 * sinc * w * cutoff;
            }
            acc as f32
        })
        .collect()
}

/// Brings decoded audio to a model's format: resampled, and mixed down to mono or
/// spread to stereo as needed.
pub fn to_model_format(channels: Vec<Vec<f32>>, rate: u32, target_rate: u32, target_channels: usize) -> Vec<Vec<f32>> {
    let channels: Vec<Vec<f32>> = channels.iter().map(|c| resample(c, rate, target_rate)).collect();
    match (channels.len(), target_channels) {
        (n, t) if n == t => channels,
        (_, 1) => {
            let len = channels[0].len();
            let n = channels.len() as f32;
            vec![(0..len).map(|i| channels.iter().map(|c| c[i]).sum::<f32>() / n).collect()]
        }
        (1, t) => vec![channels[0].clone(); t],
        (_, t) => channels.into_iter().take(t).collect(),
    }
}

#[cfg(test)]
mod resample_tests {
    use super::*;

    #[test]
    fn resampling_keeps_a_tone_and_its_length() {
        let (from, to) = (8000u32, 16000u32);
        let f = 440.0f32;
        let x: Vec<f32> = (0..8000).map(|i| (2.0 * std::f32::consts::PI * f * i as f32 / from as f32).sin()).collect();
        let y = resample(&x, from, to);
        assert_eq!(y.len(), 16000);
        // Away from the edges the output is the same sine at the new rate.
        for i in (2000..14000).step_by(97) {
            let want = (2.0 * std::f32::consts::PI * f * i as f32 / to as f32).sin();
            assert!((y[i] - want).abs() < 0.01, "{i}: {} vs {want}", y[i]);
        }
    }

    #[test]
    fn wav_round_trip_through_the_decoder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.wav");
        let ch = vec![(0..800).map(|i| (i as f32 * 0.05).sin() * 0.5).collect::<Vec<f32>>(); 2];
        write_wav(&p, &ch, 8000).unwrap();
        let (back, rate) = read_audio(&p).unwrap();
        assert_eq!(rate, 8000);
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].len(), 800);
        assert!(back[0].iter().zip(&ch[0]).all(|(a, b)| (a - b).abs() < 1e-4));
        let mono = to_model_format(back, 8000, 8000, 1);
        assert_eq!(mono.len(), 1);
    }
}
