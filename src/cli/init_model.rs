//! `spintrak init-model DIR --tiny`: writes the built-in tiny MusicGen to disk.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::musicgen::tiny;

/// Write the built-in tiny MusicGen (transformers layout) to a directory.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  spintrak init-model tiny-model --tiny\n  spintrak generate-audio --model tiny-model --prompt \"calm piano\" --duration 4 --output calm.wav"
)]
pub struct InitModel {
    /// Output directory (created if needed).
    pub dir: PathBuf,
    /// The built-in tiny model (the only kind available offline).
    #[arg(long)]
    pub tiny: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = super::TINY_SEED)]
    pub seed: u64,
    /// Overwrite a model already in DIR.
    #[arg(long)]
    pub force: bool,
}

impl InitModel {
    pub fn run(&self) -> Result<()> {
        if !self.tiny {
            bail!("pass --tiny: the built-in tiny model is the only model spintrak can create offline");
        }
        let existing =
            ["config.json", "model.safetensors", "state_dict.bin"].iter().find(|f| self.dir.join(f).exists());
        if let (Some(f), false) = (existing, self.force) {
            bail!(
                "{}: already holds a model ({f}); pass --force to overwrite it, or choose another directory",
                self.dir.display()
            );
        }
        tiny::write(&self.dir, self.seed)?;
        eprintln!("wrote the tiny MusicGen to {}", self.dir.display());
        Ok(())
    }
}
