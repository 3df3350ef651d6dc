//! `spintrak generate-gradients`: one example → one gradient embedding file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{progress_bar, ExampleArgs, ModelArgs, ProjectionArgs, SamplingArgs};
use crate::attribution::{embed, Example, GenerationObjective};
use crate::audio::write_generated;

/// Generate audio for a prompt and write its gradient embedding.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spintrak generate-gradients --prompt \"calm ocean waves\" --duration 4 --seed 42 --output calm.bin --audio calm.wav\n  spintrak generate-gradients --model weights/ --prompt \"calm ocean waves\" --duration 30 --output calm.bin --projector normal\n\nPython:\n  from safetensors.numpy import load_file; from safetensors import safe_open; import json\n  emb = load_file(\"calm.bin\")[\"embeddings\"]            # (1, k) float32\n  header = json.loads(safe_open(\"calm.bin\", \"np\").metadata()[\"spintrak\"])"
)]
pub struct GenerateGradients {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub example: ExampleArgs,
    /// Output embedding file (.bin: safetensors with a JSON header).
    #[arg(long)]
    pub output: PathBuf,
    /// Also write the generated audio (WAV, loudness-normalised).
    #[arg(long)]
    pub audio: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub projection: ProjectionArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl GenerateGradients {
    pub fn run(&self) -> Result<()> {
        if self.example.prompt.trim().is_empty() {
            anyhow::bail!("--prompt is empty: describe the music, e.g. --prompt \"calm ocean waves\"");
        }
        super::check_output_dir(&self.output)?;
        if let Some(a) = &self.audio {
            super::check_output_dir(a)?;
        }
        let model = self.model.load()?;
        let objective = GenerationObjective::from_options(&self.sampling.options(&model, self.example.seed)?);
        let spec = self.projection.spec(&model)?;
        let example = Example {
            name: self.output.file_stem().and_then(|s| s.to_str()).unwrap_or("example").to_string(),
            prompt: self.example.prompt.clone(),
            duration: self.example.duration,
            seed: self.example.seed,
            source: None,
        };
        let pb = progress_bar(self.quiet, "generating");
        let (embedding, prepared, timings) = embed(&model, &objective, &spec, &example, Some(&pb))?;
        pb.finish_and_clear();
        let file = super::single_file(&model, &objective, &spec, vec![(example, embedding)])?;
        file.write(&self.output)?;
        if let Some(path) = &self.audio {
            write_generated(&model, &prepared.generation.frames, path)?;
        }
        if self.json {
            let summary = serde_json::json!({
                "output": self.output,
                "k": spec.k,
                "d": spec.d,
                "projector": spec.kind,
                "fingerprint": file.header.model.fingerprint,
                "seconds": {"generate": timings.prepare, "backward": timings.backward, "project": timings.project},
            });
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else if !self.quiet {
            eprintln!(
                "wrote {} (k = {}, D = {}, {:?}); generate {:.1} s, backward {:.1} s, project {:.1} s",
                self.output.display(),
                spec.k,
                spec.d,
                spec.kind,
                timings.prepare,
                timings.backward,
                timings.project
            );
        }
        Ok(())
    }
}
