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
    guarded_decode(path, false)
}

/// Checks that a file is audio this tool can decode (format, track, sample rate and the
/// first packet), without decoding it all: how the dataset walk reports a text file
/// named `.mp3` when the objective never reads the audio.
pub fn probe_audio(path: &Path) -> Result<()> {
    guarded_decode(path, true).map(|_| ())
}

fn guarded_decode(path: &Path, first_only: bool) -> Result<(Vec<Vec<f32>>, u32)> {
    // Decoders of damaged files may panic deep inside; a damaged file is an error, not a crash.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| decode_audio(path, first_only));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|_| anyhow::bail!("{}: damaged audio (the decoder could not read it)", path.display()))
}

fn decode_audio(path: &Path, first_only: bool) -> Result<(Vec<Vec<f32>>, u32)> {
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
    if rate == 0 || rate > MAX_SAMPLE_RATE {
        anyhow::bail!("{name}: the header says {rate} Hz, outside 1..={MAX_SAMPLE_RATE} Hz: a damaged file?");
    }
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
        if first_only && channels.first().is_some_and(|c| !c.is_empty()) {
            break;
        }
    }
    if channels.first().is_none_or(|c| c.is_empty()) {
        anyhow::bail!("{name}: no audio samples decoded");
    }
    Ok((channels, rate))
}

/// Highest sample rate a file may declare (a header saying more is damaged or hostile).
pub const MAX_SAMPLE_RATE: u32 = 768_000;

/// Zero crossings of the resampling kernel on each side of its centre (at the cut-off).
const SINC_ZEROS: f64 = 48.0;
/// Kaiser window β: side lobes about 100 dB down.
const KAISER_BETA: f64 = 10.0;
/// Cut-off as a fraction of the lower Nyquist frequency.
const CUTOFF: f64 = 0.95;

/// I₀, the modified Bessel function of order 0 (series; converges fast for the β used).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, mut k) = (1.0, 1.0, 1.0);
    while term > 1e-14 * sum {
        term *= (x / (2.0 * k)).powi(2);
        sum += term;
        k += 1.0;
    }
    sum
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Band-limited resampling by a Kaiser-windowed sinc (β = 10, 48 zero crossings, cut-off
/// at 95% of the lower Nyquist frequency): in-band error below 1e-3, everything above
/// the new Nyquist frequency at least 60 dB down (tested). Output sample `i` is the
/// signal at input time `i · from / to` exactly (no delay), and `round(len · to / from)`
/// samples long; outside the input the signal is taken as silence. Rational ratios use a
/// polyphase table, so the cost is one dot product per output sample.
pub fn resample(x: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    for r in [from, to] {
        if r == 0 || r > MAX_SAMPLE_RATE {
            anyhow::bail!("sample rate {r} Hz is outside 1..={MAX_SAMPLE_RATE} Hz");
        }
    }
    if from == to || x.is_empty() {
        return Ok(x.to_vec());
    }
    let g = gcd(from as u64, to as u64);
    let (up, down) = (to as u64 / g, from as u64 / g);
    let cutoff = CUTOFF * (to as f64 / from as f64).min(1.0); // in units of the input's Nyquist
    let half = SINC_ZEROS / cutoff; // half-width in input samples
    let taps = 2 * half.ceil() as usize + 2;
    let i0_beta = bessel_i0(KAISER_BETA);
    // Weights of the input samples around time n + frac, for n the integer part.
    let weights = |frac: f64| -> (i64, Vec<f32>) {
        let first = (frac - half).ceil() as i64;
        let w = (0..taps)
            .map(|j| {
                let t = (first + j as i64) as f64 - frac;
                if t.abs() > half {
                    return 0.0;
                }
                let arg = t * cutoff;
                let sinc = if arg.abs() < 1e-12 {
                    1.0
                } else {
                    (std::f64::consts::PI * arg).sin() / (std::f64::consts::PI * arg)
                };
                let r = t / half;
                let kaiser = bessel_i0(KAISER_BETA * (1.0 - r * r).max(0.0).sqrt()) / i0_beta;
                (cutoff * sinc * kaiser) as f32
            })
            .collect();
        (first, w)
    };
    // One table row per phase p/up when the ratio is a small fraction; else on the fly.
    let table: Option<Vec<(i64, Vec<f32>)>> =
        (up <= 4096).then(|| (0..up).map(|p| weights(p as f64 / up as f64)).collect());
    let out_len = ((x.len() as f64) * to as f64 / from as f64).round() as usize;
    let n_in = x.len() as i64;
    let out = (0..out_len as u64)
        .map(|i| {
            let pos = i * down; // input time · up
            let (n, p) = ((pos / up) as i64, pos % up);
            let computed;
            let (first, w) = match &table {
                Some(t) => (&t[p as usize].0, &t[p as usize].1),
                None => {
                    computed = weights(p as f64 / up as f64);
                    (&computed.0, &computed.1)
                }
            };
            let start = n + first;
            let mut acc = 0f32;
            if start >= 0 && start + w.len() as i64 <= n_in {
                let xs = &x[start as usize..start as usize + w.len()];
                for (a, b) in xs.iter().zip(w) {
                    acc += a * b;
                }
            } else {
                for (j, b) in w.iter().enumerate() {
                    let k = start + j as i64;
                    if (0..n_in).contains(&k) {
                        acc += x[k as usize] * b;
                    }
                }
            }
            acc
        })
        .collect();
    Ok(out)
}

/// Brings decoded audio to a model's format: resampled, and mixed down to mono or
/// spread to stereo as needed.
pub fn to_model_format(
    channels: Vec<Vec<f32>>,
    rate: u32,
    target_rate: u32,
    target_channels: usize,
) -> Result<Vec<Vec<f32>>> {
    let channels: Vec<Vec<f32>> =
        channels.iter().map(|c| resample(c, rate, target_rate)).collect::<Result<Vec<_>>>()?;
    Ok(match (channels.len(), target_channels) {
        (n, t) if n == t => channels,
        (_, 1) => {
            let len = channels[0].len();
            let n = channels.len() as f32;
            vec![(0..len).map(|i| channels.iter().map(|c| c[i]).sum::<f32>() / n).collect()]
        }
        (1, t) => vec![channels[0].clone(); t],
        (_, t) => channels.into_iter().take(t).collect(),
    })
}

/// An excerpt of an audio file in a model's format.
#[derive(Debug, Clone, PartialEq)]
pub struct Excerpt {
    /// Planar channels at the model's rate and channel count.
    pub channels: Vec<Vec<f32>>,
    /// Seconds of the file (before cropping).
    pub file_seconds: f64,
    /// Things the user should know (e.g. the excerpt was padded with silence).
    pub warnings: Vec<String>,
}

/// Peak below which audio counts as silence (−90 dBFS).
const SILENCE_PEAK: f32 = 3.2e-5;

/// Reads `duration` seconds (default: to the end) of `path` from `offset`, resampled to
/// `rate` and mixed to `channels`; no loudness normalisation. An excerpt reaching past
/// the end is padded with silence, with a warning; an offset at or past the end, a
/// silent excerpt or an unreadable file is an error naming the file.
pub fn read_excerpt(path: &Path, rate: u32, channels: usize, offset: f64, duration: Option<f64>) -> Result<Excerpt> {
    let name = path.display();
    if !(offset.is_finite() && offset >= 0.0) {
        anyhow::bail!("{name}: --offset must be a non-negative number of seconds, got {offset}");
    }
    if let Some(d) = duration {
        if !(d.is_finite() && d > 0.0) {
            anyhow::bail!("{name}: the duration must be a positive number of seconds, got {d}");
        }
    }
    let (decoded, file_rate) = read_audio(path)?;
    let file_len = decoded[0].len();
    let file_seconds = file_len as f64 / file_rate as f64;
    let start = (offset * file_rate as f64).round() as usize;
    if start >= file_len {
        anyhow::bail!("{name}: --offset {offset} s is at or beyond the end of the file ({file_seconds:.3} s)");
    }
    let mut warnings = Vec::new();
    let want_src = match duration {
        Some(d) => (d * file_rate as f64).round() as usize,
        None => file_len - start,
    };
    let end = (start + want_src).min(file_len);
    if (end - start) as f64 / file_rate as f64 > crate::musicgen::model::MAX_SECONDS {
        anyhow::bail!(
            "{name}: the excerpt is {:.0} s long, over the {} s limit; pass --duration",
            (end - start) as f64 / file_rate as f64,
            crate::musicgen::model::MAX_SECONDS
        );
    }
    if let Some(d) = duration {
        if start + want_src > file_len {
            warnings.push(format!(
                "{name}: {:.3} s available from {offset} s, shorter than the {d} s asked for; padded with silence",
                (file_len - start) as f64 / file_rate as f64
            ));
        }
    }
    // Crop with a margin so that the resampler's edges fall outside the excerpt.
    let margin = (file_rate as usize / 50).max(64);
    let (lo, hi) = (start.saturating_sub(margin), (end + margin).min(file_len));
    let cropped: Vec<Vec<f32>> = decoded.iter().map(|c| c[lo..hi].to_vec()).collect();
    drop(decoded);
    let converted = to_model_format(cropped, file_rate, rate, channels)?;
    let scale = rate as f64 / file_rate as f64;
    let skip = ((start - lo) as f64 * scale).round() as usize;
    let len = match duration {
        Some(d) => (d * rate as f64).round() as usize,
        None => ((end - start) as f64 * scale).round() as usize,
    };
    let channels: Vec<Vec<f32>> = converted
        .into_iter()
        .map(|c| {
            let mut v: Vec<f32> = c.into_iter().skip(skip).take(len).collect();
            v.resize(len, 0.0);
            v
        })
        .collect();
    let peak = channels.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    if peak < SILENCE_PEAK {
        anyhow::bail!(
            "{name}: the excerpt ({offset} s + {:.3} s) is silent (peak below −90 dBFS): nothing to score",
            len as f64 / rate as f64
        );
    }
    Ok(Excerpt { channels, file_seconds, warnings })
}

#[cfg(test)]
mod resample_tests {
    use super::*;

    #[test]
    fn resampling_keeps_a_tone_and_its_length() {
        let (from, to) = (8000u32, 16000u32);
        let f = 440.0f32;
        let x: Vec<f32> = (0..8000).map(|i| (2.0 * std::f32::consts::PI * f * i as f32 / from as f32).sin()).collect();
        let y = resample(&x, from, to).unwrap();
        assert_eq!(y.len(), 16000);
        // Away from the edges the output is the same sine at the new rate.
        for i in (2000..14000).step_by(97) {
            let want = (2.0 * std::f32::consts::PI * f * i as f32 / to as f32).sin();
            assert!((y[i] - want).abs() < 0.01, "{i}: {} vs {want}", y[i]);
        }
    }

    /// Amplitude of frequency `f` in `y` (a single-bin DFT over the middle of the signal).
    fn amplitude(y: &[f32], rate: u32, f: f64) -> f64 {
        let (lo, hi) = (y.len() / 4, 3 * y.len() / 4);
        let (mut re, mut im) = (0.0, 0.0);
        for (i, &v) in y.iter().enumerate().take(hi).skip(lo) {
            let ph = 2.0 * std::f64::consts::PI * f * i as f64 / rate as f64;
            re += v as f64 * ph.cos();
            im += v as f64 * ph.sin();
        }
        2.0 * (re * re + im * im).sqrt() / (hi - lo) as f64
    }

    fn tone(rate: u32, f: f64, n: usize) -> Vec<f32> {
        (0..n).map(|i| (2.0 * std::f64::consts::PI * f * i as f64 / rate as f64).sin() as f32).collect()
    }

    #[test]
    fn downsampling_from_44_1_and_48_khz_keeps_the_band_and_removes_what_is_above() {
        for from in [44_100u32, 48_000] {
            let to = 32_000u32;
            let n = from as usize; // 1 s
                                   // In band: 1 kHz and 12 kHz pass at full amplitude.
            for f in [1000.0, 12_000.0] {
                let y = resample(&tone(from, f, n), from, to).unwrap();
                assert_eq!(y.len(), to as usize);
                let a = amplitude(&y, to, f);
                assert!((a - 1.0).abs() < 0.01, "{from} Hz, {f} Hz tone: amplitude {a}");
            }
            // Above the new Nyquist (16 kHz): 17 and 20 kHz come out ≥ 60 dB down, at the
            // frequency they would alias to and in total energy.
            for f in [17_000.0, 20_000.0] {
                let y = resample(&tone(from, f, n), from, to).unwrap();
                let alias = to as f64 - f;
                let a = amplitude(&y, to, alias);
                // Away from the edges, where the tone starts and stops abruptly.
                let mid = &y[y.len() / 4..3 * y.len() / 4];
                let rms = (mid.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / mid.len() as f64).sqrt();
                assert!(20.0 * a.log10() < -60.0, "{from} Hz: {f} Hz tone aliases at {:.1} dB", 20.0 * a.log10());
                assert!(20.0 * (rms * 2f64.sqrt()).log10() < -60.0, "{from} Hz: {f} Hz tone leaves rms {rms}");
            }
        }
    }

    #[test]
    fn excerpts_are_cropped_padded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.wav");
        // 2 s stereo at 16 kHz, left ≠ right.
        let ch = vec![tone(16_000, 440.0, 32_000), tone(16_000, 660.0, 32_000)];
        write_wav(&p, &ch, 16_000).unwrap();
        let e = read_excerpt(&p, 8000, 1, 0.5, Some(1.0)).unwrap();
        assert_eq!(e.channels.len(), 1);
        assert_eq!(e.channels[0].len(), 8000);
        assert!(e.warnings.is_empty());
        assert!((e.file_seconds - 2.0).abs() < 1e-9);
        // The mix-down of the two tones, 0.5 s in.
        let want: Vec<f32> = (0..8000)
            .map(|i| {
                let t = 0.5 + i as f64 / 8000.0;
                (((2.0 * std::f64::consts::PI * 440.0 * t).sin() + (2.0 * std::f64::consts::PI * 660.0 * t).sin())
                    / 2.0) as f32
            })
            .collect();
        let err = e.channels[0].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 2e-3, "{err}");
        // Whole file by default; stereo kept for a stereo model.
        let e = read_excerpt(&p, 8000, 2, 0.0, None).unwrap();
        assert_eq!((e.channels.len(), e.channels[0].len()), (2, 16_000));
        // Past the end: padded with a warning.
        let e = read_excerpt(&p, 8000, 1, 1.5, Some(1.0)).unwrap();
        assert_eq!(e.channels[0].len(), 8000);
        assert!(e.channels[0][5000..].iter().all(|x| *x == 0.0));
        assert!(e.warnings[0].contains("padded"), "{:?}", e.warnings);
        // Offset beyond the end, silence: errors naming the file.
        let msg = format!("{:#}", read_excerpt(&p, 8000, 1, 2.5, None).unwrap_err());
        assert!(msg.contains("t.wav") && msg.contains("beyond the end"), "{msg}");
        let q = dir.path().join("silent.wav");
        write_wav(&q, &[vec![0.0; 8000]], 8000).unwrap();
        let msg = format!("{:#}", read_excerpt(&q, 8000, 1, 0.0, None).unwrap_err());
        assert!(msg.contains("silent.wav") && msg.contains("silent"), "{msg}");
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
        let mono = to_model_format(back, 8000, 8000, 1).unwrap();
        assert_eq!(mono.len(), 1);
    }
}
