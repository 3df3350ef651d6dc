//! `experiment-runner`, `experiment-{1,3,4}-results`, `score` and `attribute`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::{
    check_output_dir, progress_bar, progress_bar_examples, AudioArgs, ExampleArgs, ModelArgs, ObjectiveArgs,
    ProjectionArgs, SamplingArgs,
};
use crate::attribution::objective::objective_of;
use crate::attribution::score::top_influences;
use crate::attribution::{embed, Example, GenerationObjective, ObjectiveKind, ProjectorSpec};
use crate::experiments::config::ExperimentConfig;
use crate::experiments::results::{experiment_results, read_embeddings, Ensemble, Experiment, Labels};
use crate::experiments::runner::{case_done, prepare_dir, run_cases, write_aggregate};
use crate::store::EmbeddingFile;

/// Run an experiment grid (prompts × seeds × durations): audio and embeddings per case.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  experiment_runner --config ./experiments_configs/experiment_3.yaml
  spintrak experiment-runner --config experiments_configs/experiment_3.yaml --model builtin:tiny
  spintrak experiment-runner --config experiments_configs/experiment_3.yaml --resume-from experiment_3_1758808575

Writes <name>_<unix time>/ with config_<name>.yml, <case>.wav and <case>.bin per case, and
output_<name>.bin with every case. Each case's embedding is the gradient of the objective
(default audio-nll: MusicGen's training loss on the generated codes, conditioned on the
prompt); objective and projection must match the training embeddings the results are
scored against.")]
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
    /// Cases of one duration generated together (1 to 8): each decoding step is one
    /// forward pass for all of them, so the weights are read once per step. The output
    /// is identical for any value.
    #[arg(long, default_value_t = 1, value_parser = super::parse_batch)]
    pub batch: usize,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
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
        super::check_jobs(self.jobs)?;
        let (cfg, text) = ExperimentConfig::read(&self.config)?;
        if !self.output_dir.is_dir() {
            bail!("{}: --output-dir does not exist", self.output_dir.display());
        }
        let mut model_args = self.model.clone();
        model_args.model = Some(model_args.model.unwrap_or_else(|| PathBuf::from(&cfg.experiment.models[0])));
        let model = model_args.load_for(crate::musicgen::Purpose::Gradients)?;
        let cases = cfg.cases();
        // Seeds vary per case; the objective's other settings are shared.
        let objective = self.objective.build(&self.sampling.options(&model, 0)?);
        let objective = objective.as_ref();
        let spec = self.projection.spec(&model, objective)?;
        let fingerprint = model.fingerprint()?;
        let layout = prepare_dir(&cfg, &text, &self.output_dir, self.resume_from.as_deref())?;
        let _lock = crate::experiments::runner::open_run(&layout, objective, &spec, &fingerprint)?;
        let todo: Vec<_> = cases.iter().filter(|c| !case_done(&layout, c, objective, &spec, &fingerprint)).collect();
        if !self.quiet {
            eprintln!("{}: {} cases ({} to do)", layout.dir.display(), cases.len(), todo.len());
        }
        let pb = progress_bar_examples(self.quiet, todo.len() as u64);
        let groups = crate::parallel::batches(&todo, self.batch, |c| c.duration.to_bits());
        let failures = crate::parallel::for_each_group(
            &groups,
            self.jobs,
            |c| c.name.clone(),
            |group| run_cases(&model, objective, &spec, &layout, group),
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
        let aggregate = write_aggregate(&model, objective, &spec, &layout, &cases)?;
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
  spintrak experiment-3-results OUT_m1.bin TRAIN_m1.bin TRAIN_m2.bin --ensemble-query OUT_m2.bin   # 2-model ensemble

A positive score means training on that song made the case's track more likely (audio-nll).
Writes experiment_N_scores.csv / .json and experiment_N.svg / .png next to OUTPUT (or in --out-dir).")]
pub struct ExperimentResultsArgs {
    /// The runner's aggregate file (output_<name>.bin; the seed document's .pt name works too).
    pub output: PathBuf,
    /// Training embedding files (for experiment 1: one per duration; for an ensemble: those
    /// of every model).
    #[arg(required = true)]
    pub training: Vec<PathBuf>,
    /// The same cases embedded under another model of the same architecture (a TRAK
    /// ensemble: files are paired by model fingerprint, scores averaged over models).
    #[arg(long, value_name = "FILE")]
    pub ensemble_query: Vec<PathBuf>,
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
        let mut queries = vec![self.output.clone()];
        queries.extend(self.ensemble_query.iter().cloned());
        let r = experiment_results(exp, &queries, &self.training, lambda, &labels, &out_dir)?;
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
        let name = crate::io::printable(&i.name);
        println!("  {:>2}. {:<40} {:>+13.6e}  {:>+7.2}%  {}", i.rank, name, i.score, i.percentage, i.direction);
    }
}

/// Top training songs for embeddings already computed.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak score calm.bin training_gradients_30.bin --top-k 5
  spintrak score calm_m1.bin train_m1.bin train_m2.bin --ensemble-query calm_m2.bin   # 2-model ensemble

A positive score means training on that song made the query more likely (audio-nll:
S = G (ΦᵀΦ + λI)⁻¹ Φᵀ of loss gradients; a training step lowers a song's loss, so a
positive kernel with the query lowers the query's loss too). Percentages are
score / Σ|scores|.")]
pub struct Score {
    /// Query embeddings (e.g. from generate-gradients or an experiment run).
    pub query: PathBuf,
    /// Training embedding files.
    #[arg(required = true)]
    pub training: Vec<PathBuf>,
    /// The same queries embedded under another model (ensemble; paired by fingerprint).
    #[arg(long, value_name = "FILE")]
    pub ensemble_query: Vec<PathBuf>,
    /// Expect this objective (it is read from the files; a mismatch is an error).
    #[arg(long, value_enum)]
    pub objective: Option<ObjectiveKind>,
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

/// Refuses files whose objective is not the one the user asked for.
fn check_objective(expected: Option<ObjectiveKind>, found: &str, file: &std::path::Path) -> Result<()> {
    if let Some(e) = expected {
        if e.name() != found {
            bail!(
                "{}: embedded with the `{found}` objective, but --objective {} was given; drop --objective or use files made with it",
                file.display(),
                e.name()
            );
        }
    }
    Ok(())
}

impl Score {
    pub fn run(&self) -> Result<()> {
        let mut queries = vec![self.query.clone()];
        queries.extend(self.ensemble_query.iter().cloned());
        let ensemble = Ensemble::load(&queries, &self.training)?;
        check_objective(self.objective, &ensemble.query().header.objective.name, &self.query)?;
        let rows: Vec<usize> = (0..ensemble.query().rows()).collect();
        let s = ensemble.scores(&rows, self.lambda)?;
        report(ensemble.query(), ensemble.training_records(), &s, self.top_k, self.json)
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
            let (name, prompt) = (crate::io::printable(&r.name), crate::io::printable(&r.prompt));
            print_top(&format!("{name} — \"{prompt}\" ({} s, seed {}):", r.duration, r.seed), &infl);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Tell which training songs shaped a track (generated on the spot, or any audio file),
/// and by how much.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak attribute --model weights/ --prompt \"lively salsa\" --duration 30 --seed 42 --training training_gradients_30.bin --top-k 10
  spintrak attribute --model weights/ --input-audio clip.wav --prompt \"lively salsa\" --training training_gradients_30.bin
  spintrak attribute --model m1/ --ensemble-model m2/ --input-audio clip.wav --prompt \"salsa\" --training train_m1.bin train_m2.bin

The objective and projection are taken from the training files. A positive score means
training on that song made the track more likely; percentages are score / Σ|scores|.")]
pub struct Attribute {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Further models of the same architecture (a TRAK ensemble): the track is embedded
    /// under each, and scores are averaged over models. The track itself is generated by
    /// --model.
    #[arg(long, value_name = "DIR")]
    pub ensemble_model: Vec<PathBuf>,
    #[command(flatten)]
    pub example: ExampleArgs,
    #[command(flatten)]
    pub input: AudioArgs,
    /// Expect this objective (read from the training files; a mismatch is an error).
    #[arg(long, value_enum)]
    pub objective: Option<ObjectiveKind>,
    /// Training embedding files (of every model, for an ensemble).
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
            if self.training.iter().any(|t| same_file(t, a)) {
                bail!("--audio {} is also a --training file; choose another output", a.display());
            }
        }
        if self.example.prompt.trim().is_empty() {
            bail!("--prompt is empty: describe the track");
        }
        let audio_input = self.input.input(self.example.duration)?;
        if audio_input.is_some() && self.audio.is_some() {
            bail!("--audio writes a generated track; with --input-audio nothing is generated");
        }
        let first = read_embeddings(&self.training[0])?;
        let header = &first.header;
        check_objective(self.objective, &header.objective.name, &self.training[0])?;
        let kind = ObjectiveKind::from_name(&header.objective.name)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.training[0].display()))?;
        if audio_input.is_some() && kind == ObjectiveKind::Generation {
            bail!(
                "{}: made with the `generation` objective, which cannot score an audio file; embed the training set with --objective audio-nll",
                self.training[0].display()
            );
        }
        let p = &header.projector;
        let spec = ProjectorSpec::new(p.kind, p.seed, Some(p.k), p.d, p.sparsity)?;
        let example = match audio_input {
            Some(a) => Example {
                name: "query".into(),
                prompt: self.example.prompt.clone(),
                duration: 0.0,
                seed: 0,
                source: Some(a.path.display().to_string()),
                audio: Some(a),
            },
            None => {
                Example::generated("query", &self.example.prompt, self.example.generate_seconds()?, self.example.seed)
            }
        };
        let mut model_dirs = vec![self.model.clone()];
        for d in &self.ensemble_model {
            let mut m = self.model.clone();
            m.model = Some(d.clone());
            model_dirs.push(m);
        }
        let mut queries = Vec::new();
        let mut frames: Option<Vec<Vec<u32>>> = None;
        for (i, margs) in model_dirs.iter().enumerate() {
            let model = margs.load_for(crate::musicgen::Purpose::Gradients)?;
            // The generation settings are those the training files record (the generation
            // objective), else the checkpoint's defaults.
            let objective: Box<dyn crate::attribution::Objective> = match kind {
                ObjectiveKind::Generation => {
                    let settings = serde_json::from_value(header.objective.settings.clone()).map_err(|e| {
                        anyhow::anyhow!("{}: objective settings unreadable: {e}", self.training[0].display())
                    })?;
                    Box::new(GenerationObjective { settings })
                }
                ObjectiveKind::AudioNll => {
                    // The checkpoint's sampling defaults generate the track.
                    let defaults = SamplingArgs {
                        top_k: None,
                        top_p: None,
                        temperature: None,
                        guidance: None,
                        extend_stride: None,
                    };
                    let opts = defaults.options(&model, self.example.seed)?;
                    objective_of(kind, &opts)
                }
            };
            let pb = progress_bar(self.quiet, if example.audio.is_some() { "scoring" } else { "generating" });
            // Ensemble members score the track the first model generated (same codes).
            let (embedding, prepared, _) = match (&frames, kind) {
                (Some(f), ObjectiveKind::AudioNll) => {
                    let t5 = model.encode_text(&example.prompt)?;
                    let prepared = crate::attribution::objective::prepared_from_codes(&model, f.clone(), t5)?;
                    crate::attribution::gradient::embed_prepared(&model, objective.as_ref(), &spec, prepared, None)?
                }
                _ => embed(&model, objective.as_ref(), &spec, &example, Some(&pb))?,
            };
            pb.finish_and_clear();
            if i == 0 {
                if !self.quiet {
                    super::warn_all(&prepared.warnings);
                }
                if let Some(path) = &self.audio {
                    crate::audio::write_generated(&model, &prepared.generation.frames, path)?;
                }
                frames = Some(prepared.generation.frames.clone());
            }
            let q = super::single_file(
                &model,
                objective.as_ref(),
                &spec,
                vec![(example.record(prepared.duration), embedding)],
            )?;
            let label = margs.model.clone().unwrap_or_else(|| PathBuf::from("builtin:tiny"));
            queries.push((PathBuf::from(format!("the query under {}", label.display())), q));
        }
        let ensemble = Ensemble::with_queries(queries, &self.training)?;
        let rows: Vec<usize> = (0..ensemble.query().rows()).collect();
        let s = ensemble.scores(&rows, self.lambda)?;
        report(ensemble.query(), ensemble.training_records(), &s, self.top_k, self.json)
    }
}

/// Whether two paths name the same file (by canonical path).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
