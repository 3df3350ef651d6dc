//! `spintrak validate [DIR]`: counterfactual validation of the scores (LDS).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::experiments::plot::{render_scatter, Series};
use crate::validate::{validate, ValidateConfig};

/// Measure whether scores predict what training does: the linear datamodeling score.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak validate                      # default run, about 10-15 minutes on 2 cores
  spintrak validate runs/validate --quick --json

Synthesises a catalogue (songs in several styles, one description per style), fine-tunes
the built-in tiny MusicGen on all of it and on random half-subsets (same start, same
steps), generates query tracks with the full model, measures each query's loss under
every subset model, and correlates (Spearman) the change with the sum of the query's
scores over each subset: LDS, for each objective and projector, for a shuffled control
(≈ 0 when scores mean something), and for an ensemble of full-catalogue models.
Writes validate.json and validate.svg/.png (predicted vs actual for four queries) in DIR.")]
pub struct Validate {
    /// Folder for validate.json and the figure.
    #[arg(default_value = "spintrak-validate")]
    pub dir: PathBuf,
    /// A smaller run (16 subset models, 8 queries, a 2-model ensemble, no normal projector).
    #[arg(long)]
    pub quick: bool,
    /// Half-subset models M (default 32; --quick 16).
    #[arg(long)]
    pub subsets: Option<usize>,
    /// Query tracks Q (default 16; --quick 8).
    #[arg(long)]
    pub queries: Option<usize>,
    /// Fine-tuning steps of every model (default 60).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Fine-tuning learning rate (default 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Regularisation λ of the scores (default 1, as `score`).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Train every model on the mean loss of all its songs at every step, instead of one
    /// song per step.
    #[arg(long)]
    pub full_batch: bool,
    /// Give every subset model a training seed of its own, as independently trained models
    /// have (the outcome is then measured over training randomness, which an ensemble
    /// averages over). Default: the attributed model's seed, so that only the subset differs.
    #[arg(long)]
    pub vary_seed: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress lines.
    #[arg(long, short)]
    pub quiet: bool,
}

impl Validate {
    pub fn run(&self) -> Result<()> {
        let mut cfg = if self.quick { ValidateConfig::quick() } else { ValidateConfig::full() };
        if let Some(m) = self.subsets {
            cfg.subsets = m;
        }
        if let Some(q) = self.queries {
            cfg.queries = q;
        }
        if let Some(x) = self.steps {
            cfg.steps = x;
        }
        if let Some(x) = self.lr {
            cfg.lr = x;
        }
        if let Some(x) = self.lambda {
            if !(x.is_finite() && x >= 0.0) {
                anyhow::bail!("--lambda must be a finite number ≥ 0, got {x}");
            }
            cfg.lambda = x;
        }
        cfg.full_batch = self.full_batch;
        cfg.vary_seed = self.vary_seed;
        if cfg.subsets > 1000 || cfg.queries > 1000 {
            anyhow::bail!("--subsets and --queries are limited to 1000 each");
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("{}: cannot create", self.dir.display()))?;
        let quiet = self.quiet;
        let report = validate(&cfg, &|line| {
            if !quiet {
                eprintln!("{line}");
            }
        })?;
        let json_path = self.dir.join("validate.json");
        crate::io::write_atomic(&json_path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        let series: Vec<Series> = report
            .outcomes
            .iter()
            .map(|o| Series {
                name: format!("{} ({})", o.prompt, o.style),
                points: zscore(&o.predicted).into_iter().zip(zscore(&o.actual)).collect(),
            })
            .collect();
        let (svg, png) = (self.dir.join("validate.svg"), self.dir.join("validate.png"));
        render_scatter(
            "Predicted vs actual effect of training on a half-subset (z-scores per query)",
            "predicted: Σ of the query's scores over the subset",
            "actual: −loss of the query under the subset model",
            &series,
            &svg,
            &png,
        )?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
            println!(
                "untrained model's scores (audio-nll, sparse): LDS {:+.3}; {} songs, {} subset models, {} queries, {:.0} s",
                report.untrained_lds,
                report.songs.len(),
                cfg.subsets,
                cfg.queries,
                report.seconds
            );
            println!("report: {}; figure: {} and {}", json_path.display(), svg.display(), png.display());
        }
        Ok(())
    }
}

fn zscore(x: &[f64]) -> Vec<f64> {
    let n = x.len().max(1) as f64;
    let m = x.iter().sum::<f64>() / n;
    let sd = (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n).sqrt().max(1e-300);
    x.iter().map(|v| (v - m) / sd).collect()
}
