//! `spintrak generate-gradients`: one example (a generated track, or an audio file) →
//! one gradient embedding file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{progress_bar, AudioArgs, ExampleArgs, ModelArgs, ObjectiveArgs, ProjectionArgs, SamplingArgs};
use crate::attribution::{embed, Example};
use crate::audio::write_generated;

/// Write the gradient embedding of a generated track or of an audio file.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spintrak generate-gradients --prompt \"calm ocean waves\" --duration 4 --seed 42 --output calm.bin --audio calm.wav\n  spintrak generate-gradients --input-audio song.mp3 --prompt \"calm ocean waves\" --offset 30 --duration 10 --output song.bin\n  spintrak generate-gradients --model weights/ --prompt \"calm ocean waves\" --duration 30 --output calm.bin --objective generation\n\nWith the default objective (audio-nll) the embedding is the gradient of MusicGen's\ntraining loss on the track's codes (generated, or encoded from --input-audio),\nconditioned on --prompt. Scored against training embeddings, a positive score means\ntraining on that song made this track more likely.\n\nPython:\n  from safetensors.numpy import load_file; from safetensors import safe_open; import json\n  emb = load_file(\"calm.bin\")[\"embeddings\"]            # (1, k) float32\n  header = json.loads(safe_open(\"calm.bin\", \"np\").metadata()[\"spintrak\"])"
)]
pub struct GenerateGradients {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub example: ExampleArgs,
    #[command(flatten)]
    pub input: AudioArgs,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
    /// Output embedding file (.bin: safetensors with a JSON header).
    #[arg(long)]
    pub output: PathBuf,
    /// Also write the generated audio (WAV, loudness-normalised; not with --input-audio).
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
        let audio_input = self.input.input(self.example.duration)?;
        if audio_input.is_some() && self.objective.objective == crate::attribution::ObjectiveKind::Generation {
            anyhow::bail!("--input-audio needs the audio-nll objective: `generation` generates its own audio");
        }
        if audio_input.is_some() && self.audio.is_some() {
            anyhow::bail!("--audio writes a generated track; with --input-audio nothing is generated");
        }
        let name = self.output.file_stem().and_then(|s| s.to_str()).unwrap_or("example").to_string();
        let example = match audio_input {
            Some(a) => Example {
                name,
                prompt: self.example.prompt.clone(),
                duration: 0.0,
                seed: 0,
                source: Some(a.path.display().to_string()),
                audio: Some(a),
            },
            None => Example::generated(name, &self.example.prompt, self.example.generate_seconds()?, self.example.seed),
        };
        let model = self.model.load_for(crate::musicgen::Purpose::Gradients)?;
        let objective = self.objective.build(&self.sampling.options(&model, self.example.seed)?);
        let spec = self.projection.spec(&model, objective.as_ref())?;
        let pb = progress_bar(self.quiet, if example.audio.is_some() { "scoring" } else { "generating" });
        let (embedding, prepared, timings) = embed(&model, objective.as_ref(), &spec, &example, Some(&pb))?;
        pb.finish_and_clear();
        super::warn_all(&prepared.warnings);
        let file = super::single_file(
            &model,
            objective.as_ref(),
            &spec,
            vec![(example.record(prepared.duration), embedding)],
        )?;
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
                "objective": file.header.objective.name,
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
