//! `spintrak finetune`: trains a MusicGen's LM on a dataset of audio + descriptions.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::finetune::{encode_dataset, finetune, FinetuneOptions};
use crate::musicgen::tiny::save_transformers;

/// Fine-tune a MusicGen's language model on audio files with JSON descriptions.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak finetune --input dataset/ --output finetuned/ --steps 300
  spintrak finetune --model weights/ --input dataset/ --output finetuned/ --lr 1e-5

The dataset is laid out as for generate-training-dataset-parallel: each audio file with a
same-stem JSON {\"description\": ..., \"duration\": ...}. The output is a transformers-layout
model directory (config.json, model.safetensors, tokenizer.json) that every command loads.")]
pub struct Finetune {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset folder.
    #[arg(long)]
    pub input: PathBuf,
    /// Output model directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Optimiser steps (one segment of one example each).
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of segment choice and condition dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest training segment, seconds (default: the model's window).
    #[arg(long)]
    pub segment: Option<f64>,
    /// Probability of training a step without its description (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub cond_dropout: f64,
    #[arg(long, short)]
    pub quiet: bool,
}

impl Finetune {
    pub fn run(&self) -> Result<()> {
        if self.steps == 0 {
            anyhow::bail!("--steps must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            anyhow::bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            anyhow::bail!("--weight-decay must be a finite number ≥ 0, got {}", self.weight_decay);
        }
        if self.steps > 10_000_000 {
            anyhow::bail!("--steps {} is more than 10 million; split the training", self.steps);
        }
        if !(0.0..=1.0).contains(&self.cond_dropout) {
            anyhow::bail!("--cond-dropout must be between 0 and 1");
        }
        if let Some(m) = &self.model.model {
            super::refuse_overlap(&self.output, "--output", m, "--model", false)?;
        }
        if self.output.exists() && !self.output.is_dir() {
            anyhow::bail!("{}: exists and is not a directory", self.output.display());
        }
        let model = self.model.load_for(crate::musicgen::Purpose::Training)?;
        let data = encode_dataset(&model, &self.input)?;
        let pb = super::progress_bar_examples(self.quiet, self.steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("fine-tuning [{bar:30}] {pos}/{len} steps · ETA {eta} · {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let opts = FinetuneOptions {
            steps: self.steps,
            lr: self.lr,
            weight_decay: self.weight_decay,
            seed: self.seed,
            segment: self.segment,
            cond_dropout: self.cond_dropout,
            full_batch: false,
        };
        let losses = finetune(&model, &data, &opts, &pb)?;
        pb.finish_and_clear();
        save_transformers(&model, &self.output)?;
        if !self.quiet {
            let first = losses.iter().take(10).sum::<f64>() / losses.len().min(10) as f64;
            let last = losses.iter().rev().take(10).sum::<f64>() / losses.len().min(10) as f64;
            eprintln!(
                "fine-tuned on {} example(s), {} steps: loss {first:.3} -> {last:.3}; wrote {}",
                data.len(),
                self.steps,
                self.output.display()
            );
        }
        Ok(())
    }
}
