//! `spintrak loss`: the audio-nll objective's value f for an audio file and a description.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{parse_duration, parse_offset, ModelArgs};
use crate::musicgen::loss::codes_nll_windows;

/// Print MusicGen's training loss (the audio-nll objective f) of an audio file.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak loss --input-audio song.wav --prompt \"lively salsa groove\"
  spintrak loss --model weights/ --input-audio song.mp3 --prompt \"lively salsa groove\" --offset 30 --duration 10 --json

f = (1/K) Σ_k mean over codebook k's frames of −log p(code): the file is decoded,
resampled and mixed to the model's format, EnCodec-encoded, and the codes are scored
teacher-forced over the delay pattern, conditioned on --prompt, without guidance.
Pieces longer than the model's window are scored in consecutive windows, averaged by
frames. --json prints {\"nll\": f, \"nll_per_codebook\": [...], \"frames\": T}.")]
pub struct Loss {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Audio file to score (wav, mp3, flac, m4a, aac).
    #[arg(long, value_name = "FILE")]
    pub input_audio: PathBuf,
    /// Its description (the text condition).
    #[arg(long)]
    pub prompt: String,
    /// Seconds to score (default: to the end of the file).
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<f64>,
    /// Seconds into the file where scoring starts.
    #[arg(long, default_value_t = 0.0, value_parser = parse_offset)]
    pub offset: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl Loss {
    pub fn run(&self) -> Result<()> {
        if self.prompt.trim().is_empty() {
            anyhow::bail!("--prompt is empty: give the description the audio is scored under");
        }
        if !self.input_audio.is_file() {
            anyhow::bail!("{}: --input-audio is not a readable file", self.input_audio.display());
        }
        let model = self.model.load()?;
        let rate = model.cfg.sample_rate() as u32;
        let excerpt =
            crate::audio::read_excerpt(&self.input_audio, rate, model.cfg.audio_channels, self.offset, self.duration)?;
        super::warn_all(&excerpt.warnings);
        let frames = crate::attribution::objective::encode_audio(&model, &excerpt.channels)?;
        let t5 = model.encode_text(&self.prompt)?;
        let v = codes_nll_windows(&model, &model.lm, &t5, &frames)?;
        if self.json {
            let out = serde_json::json!({"nll": v.nll, "nll_per_codebook": v.per_codebook, "frames": v.frames});
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!("nll {:.6} over {} frames", v.nll, v.frames);
            let per: Vec<String> = v.per_codebook.iter().map(|x| format!("{x:.6}")).collect();
            println!("per codebook: {}", per.join(" "));
        }
        Ok(())
    }
}
