//! `spintrak index TRAINING.bin`: factorises a training file's scoring system once.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use crate::attribution::score::Method;
use crate::store::embedding_file::MappedEmbeddings;
use crate::store::index::build;

/// Factorise a training file's scoring system (ΦᵀΦ + λI) once and store it beside the
/// file, so that `score`, `attribute` and `experiment-N-results` answer a query with
/// one pass over the training rows instead of rebuilding the system.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak index training_gradients_30.bin                # writes training_gradients_30.bin.index (λ = 1)
  spintrak index training_gradients_10.bin --lambda 10    # experiment 1's λ, one index per duration's file
  spintrak score query.bin training_gradients_30.bin      # uses the index: same scores, one pass over Φ

The index records the training file's header hash, its rows' checksum and λ; a command
that scores with another λ, or against a training file changed since, ignores it (and
says so). It is made for one training file: experiment 1's per-duration tables use the
index of each duration's file; rows gathered from several files are scored without one.")]
pub struct Index {
    /// The training embedding file.
    pub training: PathBuf,
    /// Regularisation λ the index is made for (the scoring commands' --lambda).
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

impl Index {
    pub fn run(&self) -> Result<()> {
        let start = Instant::now();
        let n = MappedEmbeddings::open(&self.training)?.rows();
        let bar = super::progress_bar(self.quiet, "accumulating the system");
        bar.set_length(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} rows · ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let (out, header, bytes) = build(&self.training, self.lambda, &|done| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        let (k, method) = (header.k, header.method);
        let secs = start.elapsed().as_secs_f64();
        let summary = serde_json::json!({
            "index": out.display().to_string(),
            "training": self.training.display().to_string(),
            "rows": n,
            "k": k,
            "lambda": self.lambda,
            "method": method,
            "bytes": bytes,
            "seconds": secs,
        });
        if self.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            let system = match method {
                Method::Streamed => format!("ΦᵀΦ + λI ({k}×{k})"),
                Method::PushThrough => format!("ΦΦᵀ + λI ({n}×{n}, fewer rows than k)"),
            };
            eprintln!(
                "wrote {} ({:.1} MB): the Cholesky factor of {system} for {n} rows, λ = {}, in {secs:.1} s",
                out.display(),
                bytes as f64 / 1e6,
                self.lambda
            );
        }
        Ok(())
    }
}
