//! `spintrak merge OUT.bin SHARD.bin...`: joins the shards of a sharded run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Merge the shard outputs of a sharded `generate-training-dataset-parallel` run.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  spintrak merge training_gradients_30.bin part*.bin\n\nThe result is byte-identical to a single-machine run over the same dataset."
)]
pub struct Merge {
    /// Output embedding file.
    pub output: PathBuf,
    /// Shard files (every shard of the run, in any order).
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

impl Merge {
    pub fn run(&self) -> Result<()> {
        super::check_output_dir(&self.output)?;
        for shard in &self.shards {
            super::refuse_overlap(&self.output, "the output", shard, "the shard", false)?;
        }
        let merged = crate::store::merge::merge_shards(&self.shards)?;
        merged.write(&self.output)?;
        eprintln!("wrote {} ({} examples from {} shards)", self.output.display(), merged.rows(), self.shards.len());
        Ok(())
    }
}
