//! `spintrak generate-audio`: text to music with a MusicGen, on the CPU.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use super::{progress_bar, ExampleArgs, ModelArgs, SamplingArgs};
use crate::audio::write_generated;

/// Generate audio from a text prompt.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spintrak generate-audio --prompt \"calm piano melody\" --duration 8 --seed 42 --output calm.wav\n  spintrak generate-audio --model weights/ --prompt \"lively salsa\" --duration 120 --output salsa.wav\n  spintrak generate-audio --model weights/ --prompt \"ambient pads\" --duration 10 --top-k 1 --output greedy.wav"
)]
pub struct GenerateAudio {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub example: ExampleArgs,
    /// Output WAV file (16-bit PCM, loudness-normalised to −14 LUFS).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl GenerateAudio {
    pub fn run(&self) -> Result<()> {
        if self.example.prompt.trim().is_empty() {
            anyhow::bail!("--prompt is empty: describe the music, e.g. --prompt \"calm piano melody\"");
        }
        let duration = self.example.generate_seconds()?;
        let model = self.model.load()?;
        let opts = self.sampling.options(&model, self.example.seed)?;
        let pb = progress_bar(self.quiet, "generating");
        let start = Instant::now();
        let gen = model.generate(&self.example.prompt, duration, &opts, Some(&pb))?;
        pb.finish_and_clear();
        let gen_secs = start.elapsed().as_secs_f64();
        let written = write_generated(&model, &gen.frames, &self.output)?;
        let (sr, loud) = (written.sample_rate, written.loudness);
        let frames = gen.num_frames();
        if self.json {
            let summary = serde_json::json!({
                "output": self.output,
                "model": model.source,
                "prompt": self.example.prompt,
                "duration": duration,
                "seed": self.example.seed,
                "frames": frames,
                "sample_rate": sr,
                "channels": written.channels,
                "generation_seconds": gen_secs,
                "input_lufs": loud.input_lufs,
                "gain_db": loud.gain_db,
            });
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else if !self.quiet {
            eprintln!(
                "wrote {} ({} ch, {} Hz, {:.2} s; {} frames in {:.1} s, {:.1} frames/s)",
                self.output.display(),
                written.channels,
                sr,
                written.samples as f64 / sr as f64,
                frames,
                gen_secs,
                frames as f64 / gen_secs.max(1e-9)
            );
        }
        Ok(())
    }
}
