//! Runs an experiment grid: for every (prompt, seed, duration) generate the audio, embed
//! its gradient, and keep both; then write the aggregate embedding file.
//!
//! Layout of `<name>_<unix time>/`: `config_<name>.yml` (the config as given), per case
//! `<case>.wav` and `<case>.bin`, and `output_<name>.bin` with every case in config order.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::{Case, ExperimentConfig};
use crate::attribution::{embed_prepared, prepare_batch, Example, Objective, ProjectorSpec};
use crate::audio::write_generated;
use crate::musicgen::MusicGen;
use crate::store::embedding_file::single_file;
use crate::store::run_state::{RunLock, Settings};
use crate::store::EmbeddingFile;

/// The file names of a run.
pub struct RunLayout {
    pub dir: PathBuf,
    pub name: String,
}

impl RunLayout {
    pub fn config_copy(&self) -> PathBuf {
        self.dir.join(format!("config_{}.yml", self.name))
    }
    pub fn aggregate(&self) -> PathBuf {
        self.dir.join(format!("output_{}.bin", self.name))
    }
    pub fn case_embedding(&self, case: &Case) -> PathBuf {
        self.dir.join(format!("{}.bin", case.name))
    }
    pub fn case_audio(&self, case: &Case) -> PathBuf {
        self.dir.join(format!("{}.wav", case.name))
    }
}

/// Prepares the output folder: a new `<name>_<unix time>` under `parent`, or the folder
/// of an interrupted run (which must hold the same config).
pub fn prepare_dir(cfg: &ExperimentConfig, text: &str, parent: &Path, resume_from: Option<&Path>) -> Result<RunLayout> {
    let name = cfg.experiment.name.clone();
    let layout = match resume_from {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("{}: --resume-from expects the folder of an earlier run", dir.display());
            }
            let layout = RunLayout { dir: dir.to_path_buf(), name };
            let copy = layout.config_copy();
            let old = std::fs::read_to_string(&copy).with_context(|| {
                format!("{}: not found; is {} a run of this experiment?", copy.display(), dir.display())
            })?;
            let old_cfg: ExperimentConfig =
                serde_yaml::from_str(&old).with_context(|| format!("{}: unreadable config copy", copy.display()))?;
            if old_cfg != *cfg {
                bail!("{}: that run used a different config; resume it with the same config", copy.display());
            }
            layout
        }
        None => {
            let stamp =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let mut dir = parent.join(format!("{name}_{stamp}"));
            let mut n = 1;
            while dir.exists() {
                dir = parent.join(format!("{name}_{stamp}_{n}"));
                n += 1;
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
            let layout = RunLayout { dir, name };
            crate::io::write_atomic(&layout.config_copy(), text.as_bytes())?;
            layout
        }
    };
    Ok(layout)
}

/// Locks the run's folder against a second runner and records (or, resuming, checks) the
/// settings every case shares: a resume with other sampling flags, projector or model is
/// refused naming the setting, instead of mixing settings in the aggregate file.
pub fn open_run(
    layout: &RunLayout,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    fingerprint: &str,
) -> Result<RunLock> {
    let lock = RunLock::acquire(&layout.dir, &layout.dir)?;
    Settings::default()
        .with("model", fingerprint)?
        .with("objective", objective.info())?
        .with("generated_with", objective.generated_with())?
        .with("projector", spec)?
        .write_or_check(&layout.dir.join(format!("run_{}.json", layout.name)))?;
    Ok(lock)
}

/// Whether `case` is finished in `layout` with these settings.
pub fn case_done(
    layout: &RunLayout,
    case: &Case,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    fingerprint: &str,
) -> bool {
    match EmbeddingFile::read(&layout.case_embedding(case)) {
        Ok(f) => {
            f.rows() == 1
                && f.header.projector == *spec
                && f.header.objective == objective.info()
                && f.header.generated_with == objective.generated_with()
                && f.header.model.fingerprint == fingerprint
                && f.header.records[0].prompt == case.prompt
                && f.header.records[0].seed == case.seed
                && f.header.records[0].duration == case.duration
                && layout.case_audio(case).exists()
        }
        Err(_) => false,
    }
}

/// Generates, embeds and saves a group of cases of one duration (generated together:
/// one forward pass per decoding step for all); one result per case. Audio is written
/// first; the embedding marks completion.
pub fn run_cases(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    layout: &RunLayout,
    cases: &[&Case],
) -> Vec<Result<()>> {
    let examples: Vec<Example> =
        cases.iter().map(|c| Example::generated(&c.name, &c.prompt, c.duration, c.seed)).collect();
    let prepared = prepare_batch(objective, model, &examples, None);
    cases
        .iter()
        .zip(examples)
        .zip(prepared)
        .map(|((case, example), prepared)| {
            let (embedding, prepared, _) = embed_prepared(model, objective, spec, prepared?, None)
                .map_err(|e| e.context(format!("embedding `{}`", example.name)))?;
            write_generated(model, &prepared.generation.frames, &layout.case_audio(case))?;
            single_file(model, objective, spec, vec![(example.record(case.duration), embedding)])?
                .write(&layout.case_embedding(case))
        })
        .collect()
}

/// Joins the case files, in config order, into the aggregate file.
pub fn write_aggregate(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    layout: &RunLayout,
    cases: &[Case],
) -> Result<PathBuf> {
    let mut rows = Vec::with_capacity(cases.len());
    for case in cases {
        let f = EmbeddingFile::read(&layout.case_embedding(case))?;
        rows.push((f.header.records[0].clone(), f.data));
    }
    let path = layout.aggregate();
    single_file(model, objective, spec, rows)?.write(&path)?;
    Ok(path)
}
