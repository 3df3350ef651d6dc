//! `spintrak generate-training-dataset-parallel`: one gradient embedding per training
//! example, in parallel, resumable after any crash, and shardable across machines.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{
    check_output_dir, parse_duration, parse_offset, single_file, ModelArgs, ObjectiveArgs, ProjectionArgs, SamplingArgs,
};
use crate::attribution::{embed_prepared, prepare_batch, AudioInput, Example, Objective, ObjectiveKind, ProjectorSpec};
use crate::dataset::{walk, TrainingExample};
use crate::musicgen::MusicGen;
use crate::store::embedding_file::ShardInfo;
use crate::store::run_state::{Inputs, RunState, Settings};

/// Embed every example of a training dataset (audio + JSON description).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spintrak generate-training-dataset-parallel --input DATASET/ --model WEIGHTS/ --duration 30 --output training_gradients_30.bin
  spintrak generate-training-dataset-parallel --input DATASET/ --model WEIGHTS/ --duration 30 --output training_gradients_30.bin --resume
  spintrak generate-training-dataset-parallel ... --shard 3/16 --output part3.bin   # then: spintrak merge all.bin part*.bin

Each finished example is saved at once in OUTPUT.state/ (beside the output); after a crash,
rerun with --resume. Under Slurm arrays the shard comes from SLURM_ARRAY_TASK_ID/COUNT, under
Kubernetes Indexed Jobs from JOB_COMPLETION_INDEX with --shards N.")]
pub struct GenerateTrainingDataset {
    /// Dataset folder: audio files (.wav .mp3 .flac .m4a .aac) each with a same-stem JSON
    /// `{"description": "...", "duration": seconds}`, searched recursively.
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seconds per example; overrides the JSON's `duration`.
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<f64>,
    /// Seconds into each audio file where the scored excerpt starts (audio-nll).
    #[arg(long, default_value_t = 0.0, value_parser = parse_offset)]
    pub offset: f64,
    /// Output embedding file.
    #[arg(long)]
    pub output: PathBuf,
    /// Generation seed of every example, for `--objective generation` (the earlier tool's default).
    #[arg(long, default_value_t = 27)]
    pub seed: u64,
    /// Continue an interrupted run from OUTPUT.state/.
    #[arg(long)]
    pub resume: bool,
    /// Examples processed at once; the CPU threads are shared among them.
    #[arg(long, visible_alias = "processes-per-gpu", default_value_t = 1)]
    pub jobs: usize,
    /// Examples generated together with the generation objective (1 to 8, of one
    /// duration): each decoding step is one forward pass for all of them, so the weights
    /// are read once per step. The output is identical for any value.
    #[arg(long, default_value_t = 1, value_parser = super::parse_batch)]
    pub batch: usize,
    /// Process only shard I of N (0-based), e.g. `--shard 3/16`.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Number of shards when the index comes from JOB_COMPLETION_INDEX (Kubernetes).
    #[arg(long)]
    pub shards: Option<usize>,
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

/// `I/N`, or the cluster's environment.
fn resolve_shard(arg: Option<&str>, shards: Option<usize>) -> Result<Option<(usize, usize)>> {
    let parse = |s: &str, what: &str| -> Result<usize> {
        s.trim().parse::<usize>().with_context(|| format!("{what}: `{s}` is not a non-negative integer"))
    };
    let (index, count) = if let Some(a) = arg {
        let (i, n) = a.split_once('/').with_context(|| format!("--shard `{a}`: expected I/N, e.g. 0/4"))?;
        (parse(i, "--shard")?, parse(n, "--shard")?)
    } else if let Ok(i) = std::env::var("SLURM_ARRAY_TASK_ID") {
        let n = std::env::var("SLURM_ARRAY_TASK_COUNT")
            .context("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
        let min = std::env::var("SLURM_ARRAY_TASK_MIN").ok().map(|m| parse(&m, "SLURM_ARRAY_TASK_MIN")).transpose()?;
        let i = parse(&i, "SLURM_ARRAY_TASK_ID")? - min.unwrap_or(0);
        (i, parse(&n, "SLURM_ARRAY_TASK_COUNT")?)
    } else if let Ok(i) = std::env::var("JOB_COMPLETION_INDEX") {
        let n = shards.context("JOB_COMPLETION_INDEX is set: pass the number of shards with --shards N")?;
        (parse(&i, "JOB_COMPLETION_INDEX")?, n)
    } else if let Some(n) = shards {
        bail!("--shards {n} needs a shard index: --shard I/{n} or JOB_COMPLETION_INDEX");
    } else {
        return Ok(None);
    };
    if count == 0 || index >= count {
        bail!("shard {index}/{count} is out of range (0 ≤ I < N)");
    }
    Ok(Some((index, count)))
}

impl GenerateTrainingDataset {
    pub fn run(&self) -> Result<()> {
        super::check_jobs(self.jobs)?;
        if self.offset != 0.0 && self.objective.objective == ObjectiveKind::Generation {
            bail!("--offset selects an excerpt of each training file, which the generation objective never reads");
        }
        let shard = resolve_shard(self.shard.as_deref(), self.shards)?;
        super::refuse_overlap(&self.output, "--output", &self.input, "--input", true)?;
        let dataset = walk(&self.input)?;
        check_output_dir(&self.output)?;
        if dataset.examples.is_empty() {
            bail!(
                "{}: no training examples (audio files .wav .mp3 .flac .m4a .aac with a same-stem .json){}",
                self.input.display(),
                if dataset.without_json.is_empty() {
                    String::new()
                } else {
                    format!("; {} audio file(s) have no JSON", dataset.without_json.len())
                }
            );
        }
        if !dataset.without_json.is_empty() && !self.quiet {
            eprintln!("note: {} audio file(s) without a JSON description are skipped:", dataset.without_json.len());
            for p in dataset.without_json.iter().take(20) {
                eprintln!("  {p}");
            }
        }
        let total = dataset.examples.len();
        let dataset_hash = {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for e in &dataset.examples {
                h.update(e.rel_path.as_bytes());
                h.update(b"\0");
            }
            format!("xxh3:{:016x}", h.digest())
        };
        let shard_info = shard.map(|(index, count)| ShardInfo {
            index,
            count,
            dataset_examples: total,
            dataset: Some(dataset_hash),
            duration: self.duration,
        });
        let mine: Vec<TrainingExample> = dataset
            .examples
            .into_iter()
            .enumerate()
            .filter(|(i, _)| shard.is_none_or(|(index, count)| i % count == index))
            .map(|(_, e)| e)
            .collect();

        let model = self.model.load_for(crate::musicgen::Purpose::Gradients)?;
        let objective = self.objective.build(&self.sampling.options(&model, self.seed)?);
        let objective = objective.as_ref();
        let spec = self.projection.spec(&model, objective)?;
        let settings = Settings::default()
            .with("model", model.fingerprint()?)?
            .with("objective", objective.info())?
            .with("projector", &spec)?
            .with("seed", self.seed)?
            .with("duration", self.duration)?
            .with("offset", self.offset)?
            .with("shard", &shard_info)?;
        let state_dir = PathBuf::from(format!("{}.state", self.output.display()));
        let state = RunState::open(&state_dir, &self.output, &settings, self.resume)?;

        // An example is done only if its state was made from exactly its current inputs.
        let todo: Vec<&TrainingExample> =
            mine.iter().filter(|e| self.inputs(e).is_none_or(|i| state.load(&e.rel_path, &i).is_none())).collect();
        let done_before = mine.len() - todo.len();
        if self.resume && done_before > 0 && !self.quiet {
            eprintln!("resuming: {done_before} of {} examples already done (changed ones are recomputed)", mine.len());
        }
        let failures = self.process(&model, objective, &spec, &todo, &state)?;
        if !failures.is_empty() {
            let mut msg = format!(
                "{} of {} examples failed (the {} finished ones are kept in {}; fix these and rerun with --resume):",
                failures.len(),
                mine.len(),
                mine.len() - failures.len(),
                state_dir.display()
            );
            for (p, e) in &failures {
                msg.push_str(&format!("\n  {}", crate::io::printable(&format!("{p}: {e}"))));
            }
            eprintln!("{msg}");
            bail!("{} example(s) failed", failures.len());
        }
        // Assemble the output in dataset order from the persisted rows.
        let mut rows = Vec::with_capacity(mine.len());
        for e in &mine {
            let f = self
                .inputs(e)
                .and_then(|i| state.load(&e.rel_path, &i))
                .with_context(|| format!("{}: changed while the run was writing; rerun with --resume", e.rel_path))?;
            rows.push((f.header.records[0].clone(), f.data));
        }
        let mut file = single_file(&model, objective, &spec, rows)?;
        file.header.shard = shard_info;
        file.write(&self.output)?;
        state.finish()?;
        if !self.quiet {
            eprintln!("wrote {} ({} examples, k = {})", self.output.display(), mine.len(), spec.k);
        }
        Ok(())
    }

    /// What an example's embedding depends on: its description file, the description and
    /// duration read from it, the seed, and (audio-nll) the audio file. `None` when the
    /// description cannot be read (the example is then attempted and its error reported).
    fn inputs(&self, ex: &TrainingExample) -> Option<Inputs> {
        let (prompt, duration) = ex.read_description(self.duration).ok()?;
        let inputs = Inputs::default()
            .with_content("description file", &ex.json)
            .with("description", prompt)
            .with("duration", duration)
            .with("seed", self.seed);
        Some(if self.objective.objective == ObjectiveKind::AudioNll {
            inputs.with_file("audio", &ex.audio)
        } else {
            inputs
        })
    }

    /// Embeds `todo` with `--jobs` workers, `--batch` examples generated together;
    /// returns the failures.
    fn process(
        &self,
        model: &MusicGen,
        objective: &dyn Objective,
        spec: &ProjectorSpec,
        todo: &[&TrainingExample],
        state: &RunState,
    ) -> Result<Vec<(String, String)>> {
        // Only generated examples share forward passes (audio-nll reads each file's own audio).
        let batch = if self.objective.objective == ObjectiveKind::Generation { self.batch } else { 1 };
        let groups = crate::parallel::batches(todo, batch, |e| {
            e.read_description(self.duration).map_or(0, |(_, d)| d.to_bits())
        });
        // One bar over the examples, and one per batch in progress (its generation or
        // backward steps), so that an ETA shows from the first steps of a long example.
        let bars = indicatif::MultiProgress::new();
        let pb = bars.add(super::progress_bar_examples(self.quiet, todo.len() as u64));
        let failures = crate::parallel::for_each_group(
            &groups,
            self.jobs,
            |ex| ex.rel_path.clone(),
            |group| {
                let steps = bars.add(super::progress_bar(self.quiet, &group[0].file_name()));
                let results = self.embed_group(model, objective, spec, group, state, &steps);
                steps.finish_and_clear();
                bars.remove(&steps);
                results
            },
            &pb,
        );
        pb.finish_and_clear();
        Ok(failures)
    }

    /// The example to embed for a dataset entry, and what its embedding depends on.
    fn example_of(&self, ex: &TrainingExample) -> Result<(Option<Inputs>, Example)> {
        // Taken before the work, so that a file edited meanwhile is recomputed next time.
        let inputs = self.inputs(ex);
        let (prompt, duration) = ex.read_description(self.duration)?;
        // audio-nll reads the example's own audio; generation only its description.
        let audio = (self.objective.objective == ObjectiveKind::AudioNll).then(|| AudioInput {
            path: ex.audio.clone(),
            offset: self.offset,
            duration: Some(duration),
        });
        if audio.is_none() {
            // Never read by the generation objective, but a dataset entry that is not audio
            // is a mistake the user wants to hear about.
            crate::audio::probe_audio(&ex.audio).with_context(|| format!("{}: not usable audio", ex.rel_path))?;
        }
        let seed = if audio.is_some() { 0 } else { self.seed };
        Ok((inputs, Example { name: ex.file_name(), prompt, duration, seed, source: Some(ex.rel_path.clone()), audio }))
    }

    /// Embeds and saves a group of examples (generated together when they can be); one
    /// result per example.
    fn embed_group(
        &self,
        model: &MusicGen,
        objective: &dyn Objective,
        spec: &ProjectorSpec,
        group: &[&TrainingExample],
        state: &RunState,
        progress: &indicatif::ProgressBar,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(group.len());
        let mut ready = Vec::new();
        for (i, ex) in group.iter().enumerate() {
            match self.example_of(ex) {
                Ok(x) => {
                    ready.push((i, x));
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let examples: Vec<Example> = ready.iter().map(|(_, (_, e))| e.clone()).collect();
        let prepared = prepare_batch(objective, model, &examples, Some(progress));
        for ((i, (inputs, example)), prepared) in ready.into_iter().zip(prepared) {
            let ex = group[i];
            results[i] = (|| {
                let (embedding, prepared, _) = embed_prepared(model, objective, spec, prepared?, Some(progress))
                    .map_err(|e| e.context(format!("embedding `{}`", example.name)))?;
                if !self.quiet {
                    for w in &prepared.warnings {
                        eprintln!("warning: {w}");
                    }
                }
                let file = single_file(model, objective, spec, vec![(example.record(prepared.duration), embedding)])?;
                let inputs = inputs.with_context(|| format!("{}: its description became unreadable", ex.rel_path))?;
                state.save(&ex.rel_path, &inputs, &file)
            })();
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_shard;

    #[test]
    fn shards_from_flags() {
        assert_eq!(resolve_shard(Some("3/16"), None).unwrap(), Some((3, 16)));
        assert!(resolve_shard(Some("16/16"), None).is_err());
        assert!(resolve_shard(Some("x/2"), None).is_err());
        assert!(resolve_shard(Some("1"), None).is_err());
    }
}
