//! `experiment-runner`, `experiment-{1,3,4}-results`, `score` and `attribute`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::{
    check_output_dir, progress_bar, progress_bar_examples, ExampleArgs, ModelArgs, ProjectionArgs, SamplingArgs,
};
use crate::attribution::score::{scores, top_influences};
use crate::attribution::{embed, Example, GenerationObjective, ProjectorSpec};
use crate::experiments::config::ExperimentConfig;
use crate::experiments::results::{experiment_results, load_training, read_embeddings, Experiment, Labels};
use crate::experiments::runner::{case_done, prepare_dir, run_case, write_aggregate};
use crate::store::EmbeddingFile;

/// Run an experiment grid (prompts × seeds × durations): audio and embeddings per case.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  experiment_runner --config ./experiments_configs/experiment_3.yaml
  spintrak experiment-runner --config experiments_configs/experiment_3.yaml --model builtin:tiny
  spintrak experiment-runner --config experiments_configs/experiment_3.yaml --resume-from experiment_3_1758808575

Writes <name>_<unix time>/ with config_<name>.yml, <case>.wav and <case>.bin per case, and
output_<name>.bin with every case. The projection and sampling options must match those
of the training embeddings the results are scored against.")]
pub struct ExperimentRunner {
    /// Experiment config (YAML: experiment {name, models, gpu_id}, input {prompts, seeds, durations}).
    #[arg(long)]
    pub config: PathBuf,
    /// `--model` overrides the config's `experiment.models` (e.g. `--model builtin:tiny`).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder in which `<name>_<unix time>/` is created.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// Continue the run in this folder, skipping finished cases.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    /// Cases processed at once.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub projection: ProjectionArgs,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl ExperimentRunner {
    pub fn run(&self) -> Result<()> {
        if self.jobs == 0 {
            bail!("--jobs must be at least 1");
        }
        let (cfg, text) = ExperimentConfig::read(&self.config)?;
        if !self.output_dir.is_dir() {
            bail!("{}: --output-dir does not exist", self.output_dir.display());
        }
        let mut model_args = self.model.clone();
        model_args.model = Some(model_args.model.unwrap_or_else(|| PathBuf::from(&cfg.experiment.models[0])));
        let model = model_args.load()?;
        let cases = cfg.cases();
        // Seeds vary per case; the objective's other settings are shared.
        let objective = GenerationObjective::from_options(&self.sampling.options(&model, 0)?);
        let spec = self.projection.spec(&model)?;
        let fingerprint = model.fingerprint()?;
        let layout = prepare_dir(&cfg, &text, &self.output_dir, self.resume_from.as_deref())?;
        let todo: Vec<_> = cases.iter().filter(|c| !case_done(&layout, c, &spec, &fingerprint)).collect();
        if !self.quiet {
            eprintln!("{}: {} cases ({} to do)", layout.dir.display(), cases.len(), todo.len());
        }
        let pb = progress_bar_examples(self.quiet, todo.len() as u64);
        let failures = crate::parallel::for_each(
            &todo,
            self.jobs,
            |c| c.name.clone(),
            |c| run_case(&model, &objective, &spec, &layout, c),
            &pb,
        );
        pb.finish_and_clear();
        if !failures.is_empty() {
            bail!(
                "{} of {} cases failed (finished ones are kept; rerun with --resume-from {}): {}",
                failures.len(),
                cases.len(),
                layout.dir.display(),
                failures.iter().map(|(c, e)| format!("{c}: {e}")).collect::<Vec<_>>().join("; ")
            );
        }
        let aggregate = write_aggregate(&model, &objective, &spec, &layout, &cases)?;
        println!("{}", aggregate.display());
        if !self.quiet {
            eprintln!("wrote {} cases to {}", cases.len(), layout.dir.display());
        }
        Ok(())
    }
}

/// Scores of an experiment's cases against training embeddings, with tables and a figure.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  experiment_3_results ./experiment_3_1758808575/output_experiment_3.bin ./two_songs_training_gradients_30.bin
  experiment_1_results ./experiment_1_1758810259/output_experiment_1.bin ./two_songs_training_gradients_*.bin
  spintrak experiment-3-results OUT.bin TRAIN.bin --label rock.wav=Rock --label salsa.wav=Salsa

Writes experiment_N_scores.csv / .json and experiment_N.svg / .png next to OUTPUT (or in --out-dir).")]
pub struct ExperimentResultsArgs {
    /// The runner's aggregate file (output_<name>.bin; the seed document's .pt name works too).
    pub output: PathBuf,
    /// Training embedding files (for experiment 1: one per duration).
    #[arg(required = true)]
    pub training: Vec<PathBuf>,
    /// Regularisation λ (default: 10 for experiment 1, 1 for experiments 3 and 4).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Rename a training song in tables and figures: NAME=LABEL (NAME is its file name or path).
    #[arg(long)]
    pub label: Vec<String>,
    /// Folder for the tables and figures (default: the folder of OUTPUT).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Print the scores as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl ExperimentResultsArgs {
    pub fn run(&self, exp: Experiment) -> Result<()> {
        let lambda = self.lambda.unwrap_or(exp.default_lambda());
        let labels = Labels::parse(&self.label)?;
        let out_dir = match &self.out_dir {
            Some(d) => d.clone(),
            None => match self.output.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
        };
        let r = experiment_results(exp, &self.output, &self.training, lambda, &labels, &out_dir)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"scores": r.scores, "files": r.files}))?);
        } else {
            print!("{}", r.tables);
            println!("scores: {} and {}", r.files.csv.display(), r.files.json.display());
            println!("figure: {} and {}", r.files.svg.display(), r.files.png.display());
        }
        Ok(())
    }
}

fn print_top(title: &str, infl: &[crate::attribution::score::Influence]) {
    println!("{title}");
    for i in infl {
        println!("  {:>2}. {:<40} {:>+13.6e}  {:>+7.2}%  {}", i.rank, i.name, i.score, i.percentage, i.direction);
    }
}

/// Top training songs for embeddings already computed.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  spintrak score calm.bin training_gradients_30.bin --top-k 5")]
pub struct Score {
    /// Query embeddings (e.g. from generate-gradients or an experiment run).
    pub query: PathBuf,
    /// Training embedding files.
    #[arg(required = true)]
    pub training: Vec<PathBuf>,
    /// Training songs listed per query, by |score|.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Regularisation λ.
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl Score {
    pub fn run(&self) -> Result<()> {
        let q = read_embeddings(&self.query)?;
        let t = load_training(&q, &self.query, &self.training)?;
        let k = q.k();
        let (s, _) = scores(&q.data, q.rows(), &t.data, t.records.len(), k, self.lambda)?;
        report(&q, &t.records, &s, self.top_k, self.json)
    }
}

fn report(q: &EmbeddingFile, training: &[crate::store::Record], s: &[f64], top: usize, json: bool) -> Result<()> {
    let n = training.len();
    let names: Vec<String> = training.iter().map(|r| r.source.clone().unwrap_or_else(|| r.name.clone())).collect();
    let mut out = Vec::new();
    for (qi, r) in q.header.records.iter().enumerate() {
        let infl = top_influences(&s[qi * n..(qi + 1) * n], &names, top);
        if json {
            out.push(serde_json::json!({"query": r, "top": infl}));
        } else {
            print_top(&format!("{} — \"{}\" ({} s, seed {}):", r.name, r.prompt, r.duration, r.seed), &infl);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Generate a track and tell which training songs shaped it, and by how much.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  spintrak attribute --model weights/ --prompt \"lively salsa\" --duration 30 --seed 42 --training training_gradients_30.bin --top-k 10"
)]
pub struct Attribute {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub example: ExampleArgs,
    /// Training embedding files; the projection and sampling settings are taken from them.
    #[arg(long, required = true, num_args = 1..)]
    pub training: Vec<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// Also write the generated audio.
    #[arg(long)]
    pub audio: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(long, short)]
    pub quiet: bool,
}

impl Attribute {
    pub fn run(&self) -> Result<()> {
        if let Some(a) = &self.audio {
            check_output_dir(a)?;
        }
        let first = read_embeddings(&self.training[0])?;
        let model = self.model.load()?;
        let fingerprint = model.fingerprint()?;
        if first.header.model.fingerprint != fingerprint {
            bail!(
                "{}: made with another model (fingerprint {}; this model's is {fingerprint})",
                self.training[0].display(),
                first.header.model.fingerprint
            );
        }
        let settings = serde_json::from_value(first.header.objective.settings.clone())
            .map_err(|e| anyhow::anyhow!("{}: objective settings unreadable: {e}", self.training[0].display()))?;
        let objective = GenerationObjective { settings };
        let p = &first.header.projector;
        let spec = ProjectorSpec::new(p.kind, p.seed, Some(p.k), p.d, p.sparsity)?;
        let example = Example {
            name: "query".into(),
            prompt: self.example.prompt.clone(),
            duration: self.example.duration,
            seed: self.example.seed,
            source: None,
        };
        let pb = progress_bar(self.quiet, "generating");
        let (embedding, prepared, _) = embed(&model, &objective, &spec, &example, Some(&pb))?;
        pb.finish_and_clear();
        if let Some(path) = &self.audio {
            crate::audio::write_generated(&model, &prepared.generation.frames, path)?;
        }
        let q = super::single_file(&model, &objective, &spec, vec![(example, embedding)])?;
        let t = load_training(&q, std::path::Path::new("the query"), &self.training)?;
        let (s, _) = scores(&q.data, 1, &t.data, t.records.len(), q.k(), self.lambda)?;
        report(&q, &t.records, &s, self.top_k, self.json)
    }
}
