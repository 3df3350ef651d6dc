//! `spintrak demo [DIR]`: the whole EXPERIMENTS.md flow on a tiny MusicGen fine-tuned on
//! two synthesised songs, with no downloads.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser};

use super::app::{run, Cli};
use crate::demo::{
    rock_ballad, salsa_groove, ROCK_DESCRIPTION, ROCK_TRAINING_DESCRIPTION, SALSA_DESCRIPTION,
    SALSA_TRAINING_DESCRIPTION,
};

/// Run the whole flow on a tiny model fine-tuned on two synthesised songs.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  spintrak demo spintrak-demo\n\nEverything is written under DIR: dataset/, model/, training_gradients_<D>.bin,\nexperiment_3.yaml, the experiment folder with its scores and figure, and validate/\n(the counterfactual check of `spintrak validate --quick`; skip it with --no-validate)."
)]
pub struct Demo {
    /// Folder for everything the demo writes.
    #[arg(default_value = "spintrak-demo")]
    pub dir: PathBuf,
    /// Fine-tuning steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Seconds of audio per embedded example (training and generated).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Length of each synthesised song, seconds.
    #[arg(long, default_value_t = 12.0)]
    pub song_seconds: f64,
    /// Generation seeds of the experiment.
    #[arg(long, value_delimiter = ',', default_value = "42,43,44,45,46")]
    pub seeds: Vec<u64>,
    /// Skip the counterfactual validation (`validate --quick`, about a minute).
    #[arg(long)]
    pub no_validate: bool,
    /// Less output.
    #[arg(long, short)]
    pub quiet: bool,
}

fn step(args: &[String], quiet: bool) -> Result<()> {
    if !quiet {
        eprintln!(
            "\n$ spintrak {}",
            args.iter()
                .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.clone() })
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let mut full = vec!["spintrak".to_string()];
    full.extend_from_slice(args);
    let cli = Cli::try_parse_from(&full).map_err(|e| anyhow::anyhow!("{e}"))?;
    run(&cli.command)
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

impl Demo {
    pub fn run(&self) -> Result<()> {
        let start = Instant::now();
        let dir = &self.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let p = |name: &str| -> String { dir.join(name).display().to_string() };
        let q = self.quiet;
        // 1. Two songs, described in other words than the experiment's prompts.
        let data = dir.join("dataset");
        std::fs::create_dir_all(&data)?;
        let sr = crate::musicgen::tiny::config(1).codec.sample_rate as u32;
        for (name, audio, desc) in [
            ("rock_ballad", rock_ballad(sr, self.song_seconds as f32), ROCK_TRAINING_DESCRIPTION),
            ("salsa_groove", salsa_groove(sr, self.song_seconds as f32), SALSA_TRAINING_DESCRIPTION),
        ] {
            crate::audio::write_wav(&data.join(format!("{name}.wav")), &[audio], sr)?;
            let json = serde_json::json!({"description": desc, "duration": self.song_seconds});
            crate::io::write_atomic(
                &data.join(format!("{name}.json")),
                serde_json::to_string_pretty(&json)?.as_bytes(),
            )?;
        }
        if !q {
            eprintln!("wrote two synthesised songs to {}", data.display());
        }
        // 2. The tiny model, fine-tuned on them.
        let model = p("model");
        let mut args =
            vec![s("finetune"), s("--input"), p("dataset"), s("--output"), model.clone(), s("--steps"), s(self.steps)];
        if q {
            args.push(s("--quiet"));
        }
        step(&args, q)?;
        // 3. EXPERIMENTS.md step 1: training embeddings.
        let d = crate::experiments::config::format_seconds(self.duration);
        let training = p(&format!("training_gradients_{d}.bin"));
        let mut args = vec![
            s("generate-training-dataset-parallel"),
            s("--input"),
            p("dataset"),
            s("--model"),
            model.clone(),
            s("--duration"),
            d.clone(),
            s("--output"),
            training.clone(),
            s("--jobs"),
            s(2),
        ];
        if q {
            args.push(s("--quiet"));
        }
        step(&args, q)?;
        // 4. Step 2: the experiment runner on the seed's experiment 3 (this model, this duration).
        let config = dir.join("experiment_3.yaml");
        let yaml = format!(
            "experiment:\n  name: experiment_3\n  models: [{:?}]\n  gpu_id: null\n\ninput:\n  prompts:\n    - {:?}\n    - {:?}\n  seeds: {:?}\n  durations:\n    - {d}\n",
            Path::new(&model).canonicalize().unwrap_or_else(|_| PathBuf::from(&model)).display().to_string(),
            ROCK_DESCRIPTION,
            SALSA_DESCRIPTION,
            self.seeds,
        );
        crate::io::write_atomic(&config, yaml.as_bytes())?;
        let run_dir = dir.join("runs");
        std::fs::create_dir_all(&run_dir)?;
        // A fresh folder each time: remove earlier runs of the demo.
        for e in std::fs::read_dir(&run_dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("experiment_3_") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let mut args = vec![
            s("experiment-runner"),
            s("--config"),
            config.display().to_string(),
            s("--output-dir"),
            run_dir.display().to_string(),
            s("--jobs"),
            s(2),
        ];
        if q {
            args.push(s("--quiet"));
        }
        step(&args, q)?;
        let out = std::fs::read_dir(&run_dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("experiment_3_")))
            .context("the experiment folder is missing")?;
        // 5. Step 3: scores, tables and the figure.
        let aggregate = out.join("output_experiment_3.bin");
        step(
            &[
                s("experiment-3-results"),
                aggregate.display().to_string(),
                training,
                s("--label"),
                s("rock_ballad.wav=rock ballad (training song)"),
                s("--label"),
                s("salsa_groove.wav=salsa groove (training song)"),
            ],
            q,
        )?;
        // 6. Do the scores predict what training does? The counterfactual check.
        if !self.no_validate {
            if !q {
                eprintln!("\n$ spintrak validate {} --quick", dir.join("validate").display());
            }
            let report = crate::validate::validate(&crate::validate::ValidateConfig::quick(), &|line| {
                if !q {
                    eprintln!("  {line}");
                }
            })?;
            let vdir = dir.join("validate");
            std::fs::create_dir_all(&vdir)?;
            crate::io::write_atomic(&vdir.join("validate.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
            println!("\nCounterfactual check (validate --quick): does a score predict what training on a song does?");
            print!("{}", report.table());
            println!(
                "LDS of the fine-tuned model's audio-nll scores: {:+.3}; the untrained model's: {:+.3}; shuffled rows: {:+.3}",
                report.lds("audio-nll", "sparse", 1, false).unwrap_or(f64::NAN),
                report.untrained_lds,
                report.lds("audio-nll", "sparse", 1, true).unwrap_or(f64::NAN),
            );
        }
        if !q {
            eprintln!(
                "\ndemo finished in {:.0} s; open {}",
                start.elapsed().as_secs_f64(),
                out.join("experiment_3.png").display()
            );
        }
        Ok(())
    }
}
